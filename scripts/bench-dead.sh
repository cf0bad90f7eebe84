#!/usr/bin/env bash
# A replica down from the start (issue 13, item 7): REPS alternating rounds on loopback of
#   A: a push to three live replicas, and
#   B: a push to four replicas of which one (KILLED: 0 = the first, 2 = a middle one) is down
#      from the start, with --min-replicas 3 (the chain is formed again without it),
# each of SIZE bytes as a new version; medians of the process wall time and of the push's own
# "seconds", and their ratio B/A. Target: B <= 1.1 x A. Raw rounds in results/dead/bench-dead-*.csv.
# Env: REPS (9), SIZE (1GiB), CHUNK (4M), KILLED (2), BIN (target/release/shardcast; PROFILE=dev
# uses target/debug; NO_BUILD=1 runs the binary as it is). The replicas' roots are in /dev/shm.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
REPS=${REPS:-9}
SIZE=${SIZE:-1GiB}
CHUNK=${CHUNK:-4M}
KILLED=${KILLED:-2}
if [[ "${PROFILE:-release}" == dev ]]; then
    [[ -n "${NO_BUILD:-}" ]] || cargo build --quiet --bin shardcast
    BIN=target/debug/shardcast
else
    [[ -n "${NO_BUILD:-}" ]] || cargo build --release --quiet --bin shardcast
fi
base=/tmp
[[ -d /dev/shm ]] && base=/dev/shm
work=$(mktemp -d "$base/bench-dead.XXXXXX")
cleanup_register_dir "$work"
mkdir -p results/dead
out=results/dead/bench-dead-$(date -u +%Y%m%d-%H%M%S).csv
BD_BIN=$PWD/$BIN BD_WORK=$work BD_REPS=$REPS BD_SIZE=$(parse_size "$SIZE") BD_CHUNK=$CHUNK BD_KILLED=$KILLED BD_OUT=$out \
    python3 - <<'PY'
import json, os, shutil, statistics, subprocess, time
E = os.environ
BIN, W, REPS, SIZE, CHUNK, KILLED = E["BD_BIN"], E["BD_WORK"], int(E["BD_REPS"]), int(E["BD_SIZE"]), E["BD_CHUNK"], int(E["BD_KILLED"])
src = os.path.join(W, "src")
os.makedirs(src)
with open(os.path.join(src, "ckpt.bin"), "wb") as f:
    left = SIZE
    while left:
        n = min(left, 64 << 20)
        f.write(os.urandom(n))
        left -= n
procs = []
def serve(i):
    root = os.path.join(W, f"r{i}")
    p = subprocess.Popen([BIN, "serve", "--listen", "127.0.0.1:0", "--root", root, "--keep", "1"],
                         stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if "listening on" in line:
            addr = line.split("listening on ")[1].split()[0]
            break
    # Keep draining its log so that it never blocks on a full pipe.
    import threading
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
    procs.append(p)
    return p, addr
servers = [serve(i) for i in range(4)]
addrs = [a for _, a in servers]
dead_p, dead_addr = servers[KILLED]
dead_p.kill()
dead_p.wait()
live = [a for a in addrs if a != dead_addr]
def push(to, version, extra):
    t = time.monotonic()
    r = subprocess.run([BIN, "push", src, "--name", "b", "--version", str(version), "--to", ",".join(to),
                        "--chunk-size", CHUNK, "--transport", "tcp", "--json"] + extra, capture_output=True, text=True)
    wall = time.monotonic() - t
    j = json.loads(r.stdout)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    st = [x["status"] for x in j["replicas"]]
    return wall, j["seconds"], st
rows = []
v = 0
try:
    for i in range(REPS):
        for kind in ("A", "B") if i % 2 == 0 else ("B", "A"):
            v += 1
            if kind == "A":
                wall, secs, st = push(live, v, [])
                assert st == ["published"] * 3, st
            else:
                wall, secs, st = push(addrs, v, ["--min-replicas", "3"])
                want = ["published"] * 4
                want[KILLED] = "failed"
                assert st == want, st
            rows.append((i, kind, wall, secs))
            print(f"round {i} {kind}: wall {wall*1e3:.1f} ms, push {secs*1e3:.1f} ms", flush=True)
finally:
    for p in procs:
        if p.poll() is None:
            p.terminate()
            p.wait()
with open(E["BD_OUT"], "w") as f:
    f.write("round,kind,wall_s,push_s\n")
    for r in rows:
        f.write(f"{r[0]},{r[1]},{r[2]:.6f},{r[3]:.6f}\n")
med = {k: (statistics.median(r[2] for r in rows if r[1] == k), statistics.median(r[3] for r in rows if r[1] == k)) for k in "AB"}
print(f"size {SIZE} B, chunk {CHUNK}, {REPS} rounds, dead replica at position {KILLED}")
print(f"A (3 live replicas):          wall median {med['A'][0]*1e3:.1f} ms, push median {med['A'][1]*1e3:.1f} ms")
print(f"B (4 replicas, 1 down, -m 3): wall median {med['B'][0]*1e3:.1f} ms, push median {med['B'][1]*1e3:.1f} ms")
print(f"ratio B/A: wall {med['B'][0]/med['A'][0]:.3f}, push {med['B'][1]/med['A'][1]:.3f}")
print(f"raw: {E['BD_OUT']}")
PY

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
export PYTHONPATH=$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}
BD_BIN=$PWD/$BIN BD_WORK=$work BD_REPS=$REPS BD_SIZE=$(parse_size "$SIZE") BD_CHUNK=$CHUNK BD_KILLED=$KILLED BD_OUT=$out \
    python3 - <<'PY'
import os
import benchlib as bl
BIN, W, REPS, SIZE = bl.env("BD_BIN"), bl.env("BD_WORK"), bl.env("BD_REPS", int), bl.env("BD_SIZE", int)
CHUNK, KILLED, OUT = bl.env("BD_CHUNK"), bl.env("BD_KILLED", int), bl.env("BD_OUT")
src = os.path.join(W, "src")
os.makedirs(src)
bl.random_file(os.path.join(src, "ckpt.bin"), SIZE)
rows = []
v = 0
with bl.Replicas(BIN) as replicas:
    servers = [replicas.start(os.path.join(W, f"r{i}"), ["--keep", "1"]) for i in range(4)]
    addrs = [a for _, a in servers]
    dead_p, dead_addr = servers[KILLED]
    dead_p.kill()
    dead_p.wait()
    live = [a for a in addrs if a != dead_addr]
    for i in range(REPS):
        for kind in bl.alternate(i, ("A", "B")):
            v += 1
            if kind == "A":
                j, wall = bl.push(BIN, src, "b", v, live, "--transport", "tcp", chunk=CHUNK)
                want = ["published"] * 3
            else:
                j, wall = bl.push(BIN, src, "b", v, addrs, "--transport", "tcp", "--min-replicas", "3", chunk=CHUNK)
                want = ["published"] * 4
                want[KILLED] = "failed"
            assert bl.statuses(j) == want, bl.statuses(j)
            rows.append((i, kind, wall, j["seconds"]))
            print(f"round {i} {kind}: wall {wall*1e3:.1f} ms, push {j['seconds']*1e3:.1f} ms", flush=True)
with open(OUT, "w") as f:
    f.write("round,kind,wall_s,push_s\n")
    for r in rows:
        f.write(f"{r[0]},{r[1]},{r[2]:.6f},{r[3]:.6f}\n")
med = {k: (bl.median(r[2] for r in rows if r[1] == k), bl.median(r[3] for r in rows if r[1] == k)) for k in "AB"}
print(f"size {SIZE} B, chunk {CHUNK}, {REPS} rounds, dead replica at position {KILLED}")
print(f"A (3 live replicas):          wall median {med['A'][0]*1e3:.1f} ms, push median {med['A'][1]*1e3:.1f} ms")
print(f"B (4 replicas, 1 down, -m 3): wall median {med['B'][0]*1e3:.1f} ms, push median {med['B'][1]*1e3:.1f} ms")
print(f"ratio B/A: wall {med['B'][0]/med['A'][0]:.3f}, push {med['B'][1]/med['A'][1]:.3f}")
print(f"raw: {OUT}")
PY

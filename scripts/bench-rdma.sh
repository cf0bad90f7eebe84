#!/usr/bin/env bash
# One hop over soft-RoCE, side by side in one guest run (scripts/rxe-vm.sh):
#   ib_write_bw  perftest's RDMA WRITE bandwidth rxe_v1 -> rxe_v0 at MSG bytes per message;
#   rdma         `shardcast push --transport rdma` of SIZE bytes from rxe_v1 to a `serve` on rxe_v0
#                (chunks of MSG bytes: one RDMA WRITE WITH IMM per chunk);
#   tcp          the same push with --transport tcp between the same addresses.
# REPS rounds, cases interleaved; medians. CPU seconds per GiB = utime+stime of the push and the
# serve process over the push (wait4 and /proc), divided by GiB moved. The guest runs under TCG,
# so only the ratios within one run mean anything (see BENCHMARKS.md).
#
# OLD_BIN=path (another build of shardcast, e.g. an older commit's target/release/shardcast) adds
# the case `rdma-old`: the same RDMA push with that binary, to a `serve` of that binary, in the
# same rounds as `rdma`, the two alternating which goes first; the table then gives both and the
# ratio new/old (medians, and the median of the per-round ratios). Unset: the table as before.
#
# LANES=2 adds the case `rdma-2lanes`: the same push with `--lanes 2` over the guest's two rails
# (rxe_v1 -> rxe_v0 and rxe_w1 -> rxe_w0; the serve and pushes then name rails, not devices),
# and `ib_write_bw` on both rails at once (two instances in parallel, summed); the table ends
# with the ratio 2-lane / 1-lane RDMA push.
#
#   SIZE=256M REPS=3 MSG=4M ./scripts/bench-rdma.sh        # the BENCHMARKS.md run
#   SIZE=64M REPS=3 LANES=2 ./scripts/bench-rdma.sh        # RDMA lanes (issue 16)
#   SIZE=64M REPS=1 ./scripts/bench-rdma.sh                # the short one .ci/run prints
#   SIZE=256M REPS=5 MSG=4M OLD_BIN=../old/target/release/shardcast ./scripts/bench-rdma.sh
#
# Prints a markdown table; saves it under results/rdma/bench-rdma-<date>.md. Exit 4 when the guest
# cannot start (as rxe-vm.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-256M}
REPS=${REPS:-3}
MSG=${MSG:-4M}
OLD_BIN=${OLD_BIN:-}
LANES=${LANES:-1}
if [[ -n "$OLD_BIN" ]]; then
    # The guest sees the host's tree at the same paths: an absolute path works there too.
    OLD_BIN=$(realpath "$OLD_BIN")
    [[ -x "$OLD_BIN" ]] || { echo "bench-rdma: OLD_BIN=$OLD_BIN is not an executable" >&2; exit 2; }
fi

cargo build --release >/dev/null
mkdir -p results/rdma
stamp=$(date +%Y%m%d-%H%M%S)
out=results/rdma/bench-rdma-$stamp.md
job=$(mktemp /tmp/shardcast-bench-rdma.XXXXXX.py)
trap 'rm -f "$job"' EXIT
cat >"$job" <<'PY'
import json, os, re, shutil, statistics, subprocess, sys, tempfile, time

E = os.environ
BINS = {"new": os.path.abspath("target/release/shardcast")}
if E.get("B_OLD_BIN"):
    BINS["old"] = E["B_OLD_BIN"]
def size(s):
    m = re.fullmatch(r"(\d+)([KMG]?)", s)
    return int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]
SIZE, REPS, MSG = size(E["B_SIZE"]), int(E["B_REPS"]), size(E["B_MSG"])
LANES = int(E.get("B_LANES") or 1)
DEV, IP, GID = E["RXEVM_DEV"], E["RXEVM_IP"], E["RXEVM_GID"]
PDEV, PIP, PGID = E["RXEVM_PEER_DEV"], E["RXEVM_PEER_IP"], E["RXEVM_PEER_GID"]
if LANES > 1:
    DEV2, IP2, GID2 = E["RXEVM_DEV2"], E["RXEVM_IP2"], E["RXEVM_GID2"]
    PDEV2, PIP2, PGID2 = E["RXEVM_PEER_DEV2"], E["RXEVM_PEER_IP2"], E["RXEVM_PEER_GID2"]
def where(which, serve):
    # With lanes, the new binary's serve and pushes name their rails: each lane's queue pair goes
    # on the device of its rail.
    if LANES > 1 and which == "new":
        return ["--rail", IP, "--rail", IP2] if serve else ["--rail", PIP, "--rail", PIP2]
    return ["--rdma-device", DEV, "--gid-index", GID] if serve else ["--rdma-device", PDEV, "--gid-index", PGID]
work = tempfile.mkdtemp(dir="/dev/shm")
src = os.path.join(work, "src")
os.makedirs(src)
with open(os.path.join(src, "shard.bin"), "wb") as f:
    f.write(os.urandom(SIZE))

def cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")

# One replica per binary (a push goes to the serve of its own binary: both ends of the hop).
serves, ports, roots = {}, {}, {}
for i, (which, bin_) in enumerate(BINS.items()):
    ports[which] = 7391 + i
    roots[which] = os.path.join(work, "root-" + which)
    serve = subprocess.Popen([bin_, "serve", "--listen", f"{IP}:{ports[which]}", "--root", roots[which],
                              "--keep", "1"] + where(which, True),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # serve may log other lines first (the INSECURE warning of a key-less replica beyond loopback).
    line = serve.stderr.readline()
    while line and "listening on" not in line:
        line = serve.stderr.readline()
    assert "listening on" in line, f"serve ({which}) exited before listening"
    serves[which] = serve

def push(transport, v, which="new", lanes=1):
    serve, bin_ = serves[which], BINS[which]
    c0 = cpu(serve.pid)
    t0 = time.monotonic()
    p = subprocess.Popen([bin_, "push", src, "--name", "b", "--version", str(v), "--to", f"{IP}:{ports[which]}",
                          "--transport", transport, "--chunk-size", str(MSG), "--json", "--lanes", str(lanes)]
                         + where(which, False), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    out = p.stdout.read().decode()
    if status != 0:
        sys.exit(f"push --transport {transport} ({which}) failed: {out}\n{p.stderr.read().decode()}")
    rep = json.loads(out)
    c1 = cpu(serve.pid)
    if lanes > 1:
        assert rep["lane_transports"] == ["rdma"] * lanes, f"a lane did not run RDMA: {rep}"
    return {"s": rep["seconds"], "cpu_push": ru.ru_utime + ru.ru_stime, "cpu_serve": c1 - c0,
            "lane_chunks": rep.get("lane_chunks")}

def ib_write_bw(pairs=None):
    # One ib_write_bw per (server dev, gid, ip, client dev, gid, port), all at once; the sum.
    pairs = pairs or [(DEV, GID, IP, PDEV, PGID, 18515)]
    n = max(SIZE // MSG, 20)
    common = ["-s", str(MSG), "-n", str(n), "-F", "--report_gbits"]
    srvs = [subprocess.Popen(["timeout", "300", "ib_write_bw", "-p", str(port), "-d", d, "-x", g] + common,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for d, g, _, _, _, port in pairs]
    for _ in range(200):
        ss = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True).stdout
        if all(f":{port}" in ss for *_, port in pairs):
            break
        time.sleep(0.05)
    clis = [subprocess.Popen(["timeout", "300", "ib_write_bw", "-p", str(port), "-d", pd, "-x", pg] + common + [ip],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _, _, ip, pd, pg, port in pairs]
    total = 0.0
    for cli in clis:
        out, err = cli.communicate()
        got = [float(l.split()[3]) for l in out.splitlines()
               if len(l.split()) >= 4 and l.split()[0] == str(MSG) and l.split()[1] == str(n)]
        if not got:
            sys.exit("ib_write_bw printed no result:\n" + out + err)
        total += got[0]   # BW average [Gb/sec]
    for s in srvs:
        s.wait()
    return total
BOTH = [(DEV, GID, IP, PDEV, PGID, 18515), (DEV2, GID2, IP2, PDEV2, PGID2, 18516)] if LANES > 1 else None

# (case, transport, binary); with an old binary its RDMA push alternates with the new one's
# which goes first, round by round.
cases = [("rdma", "rdma", "new"), ("tcp", "tcp", "new")]
if "old" in BINS:
    cases.insert(1, ("rdma-old", "rdma", "old"))
if LANES > 1:
    cases.insert(1, ("rdma-2lanes", "rdma", "new"))
rows = {"ib_write_bw": [], "ib_write_bw-both": [], **{c: [] for c, _, _ in cases}}
v = 0
for r in range(REPS):
    rows["ib_write_bw"].append({"gbps": ib_write_bw()})
    if BOTH:
        rows["ib_write_bw-both"].append({"gbps": ib_write_bw(BOTH)})
    order = list(cases)
    if "old" in BINS and r % 2 == 1:
        order[0], order[1] = order[1], order[0]
    for c, t, which in order:
        v += 1
        x = push(t, v, which, LANES if c == "rdma-2lanes" else 1)
        x["gbps"] = SIZE * 8 / x["s"] / 1e9
        rows[c].append(x)
        shutil.rmtree(os.path.join(roots[which], "b"), ignore_errors=True)
    done = ", ".join(f"{c} {rows[c][-1]['gbps']:.3f}" for c, _, _ in order)
    print(f"rep {r+1}: ib_write_bw {rows['ib_write_bw'][-1]['gbps']:.3f} Gb/s, {done}", file=sys.stderr, flush=True)
for s in serves.values():
    s.terminate()
med = lambda xs: statistics.median(xs)
gib = SIZE / (1 << 30)
ib = med([x["gbps"] for x in rows["ib_write_bw"]])
print(f"| case | median Gb/s | min | max | ratio to ib_write_bw | CPU s/GiB push | CPU s/GiB serve |")
print(f"| --- | --- | --- | --- | --- | --- | --- |")
g = [x["gbps"] for x in rows["ib_write_bw"]]
print(f"| ib_write_bw {MSG} B × {max(SIZE // MSG, 20)} | {ib:.3f} | {min(g):.3f} | {max(g):.3f} | 1.00 | | |")
if BOTH:
    g = [x["gbps"] for x in rows["ib_write_bw-both"]]
    print(f"| ib_write_bw on both rails at once (sum of 2) | {med(g):.3f} | {min(g):.3f} | {max(g):.3f} | {med(g)/ib:.2f} | | |")
for c, t, which in cases:
    g = [x["gbps"] for x in rows[c]]
    cp = med([x["cpu_push"] for x in rows[c]]) / gib
    cs = med([x["cpu_serve"] for x in rows[c]]) / gib
    label = f"shardcast --transport {t}" + (" (OLD_BIN)" if which == "old" else "")
    if c == "rdma-2lanes":
        label += f" --lanes {LANES} (2 rails)"
    print(f"| {label}, {SIZE >> 20} MiB, {MSG >> 20} MiB chunks | {med(g):.3f} | {min(g):.3f} | {max(g):.3f} | {med(g)/ib:.2f} | {cp:.2f} | {cs:.2f} |")
if LANES > 1:
    one = [x["gbps"] for x in rows["rdma"]]
    two = [x["gbps"] for x in rows["rdma-2lanes"]]
    per_round = [a / b for a, b in zip(two, one)]
    both = med([x["gbps"] for x in rows["ib_write_bw-both"]])
    print()
    print(f"RDMA lanes, {LANES}-lane / 1-lane push: {med(two) / med(one):.3f} (ratio of medians); per round "
          f"{', '.join(f'{q:.3f}' for q in per_round)}; ib_write_bw both rails / one: {both / ib:.3f}; "
          f"lane_chunks {[x['lane_chunks'] for x in rows['rdma-2lanes']]}")
if "old" in BINS:
    new = [x["gbps"] for x in rows["rdma"]]
    old = [x["gbps"] for x in rows["rdma-old"]]
    per_round = [a / b for a, b in zip(new, old)]
    print()
    print(f"RDMA hop, new/old throughput: {med(new) / med(old):.3f} (ratio of medians); "
          f"per round {', '.join(f'{q:.3f}' for q in per_round)} (median {med(per_round):.3f}); "
          f"old = {BINS['old']}")
shutil.rmtree(work, ignore_errors=True)
PY
echo "bench-rdma: SIZE=$SIZE REPS=$REPS MSG=$MSG LANES=$LANES${OLD_BIN:+ OLD_BIN=$OLD_BIN} (guest under TCG: compare within this table only)" >&2
rc=0
B_SIZE=$SIZE B_REPS=$REPS B_MSG=$MSG B_OLD_BIN=$OLD_BIN B_LANES=$LANES RXEVM_PASS_ENV="B_SIZE B_REPS B_MSG B_OLD_BIN B_LANES" \
    scripts/rxe-vm.sh --timeout 900 --mem 4096 -- python3 "$job" | tee "$out.tmp" || rc=$?
if [[ $rc -ne 0 ]]; then
    rm -f "$out.tmp"
    exit "$rc"
fi
{
    lanes_env=
    [[ "$LANES" == 1 ]] || lanes_env=" LANES=$LANES"
    echo "command: \`SIZE=$SIZE REPS=$REPS MSG=$MSG$lanes_env${OLD_BIN:+ OLD_BIN=$OLD_BIN} ./scripts/bench-rdma.sh\` ($(date -u +%FT%TZ), commit $(git rev-parse --short HEAD))"
    echo
    grep '^|' "$out.tmp"
    if grep -q '^RDMA lanes' "$out.tmp"; then
        echo
        grep '^RDMA lanes' "$out.tmp"
    fi
    if grep -q '^RDMA hop, new/old' "$out.tmp"; then
        echo
        grep '^RDMA hop, new/old' "$out.tmp"
    fi
} >"$out"
rm -f "$out.tmp"
echo "saved $out" >&2

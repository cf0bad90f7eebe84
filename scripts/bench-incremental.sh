#!/usr/bin/env bash
# Incremental pushes on the emulated cluster (scripts/cluster.sh): a checkpoint N+1 that differs
# from N in PCT % of its chunks, pushed with `--incremental`, against a full push of the same
# bytes, down a chain of N replicas whose egress is shaped to RATE.
#
# Each rep:
#   full   `shardcast push SRC --json` as version 2k-1 (every chunk travels);
#   change PCT % of the chunks (chosen at random, a few bytes each rewritten);
#   incr   `shardcast push SRC --incremental --json` as version 2k (hashes first; each replica
#          receives only the chunks its version 2k-1 lacks and copies the rest locally).
# Around each push it reads every node's shaper byte counter (tc -s, Ethernet frames incl.
# headers, acks and the handshake) and each replica's received chunk bytes (Prometheus,
# `shardcast_received_bytes_total`); after it, every replica's copy is compared with the
# source (cmp). Targets (issue 5): incr time <= 0.15 x full time; bytes on every link <= 1.05 x
# the changed bytes (plus manifests).
#
# Env: SIZE (1G), FILES (8), N (3 replicas), PCT (10), REPS (3), RATE (1gbit), CHUNK (4MiB),
#      PORT (7071), SC_CLUSTER (sc), KEEP_WORK=1.
# Output: the table on stdout, also saved to results/incremental/bench-incremental-<date>.md.
# Needs root, iproute2, python3, cmp (scripts/deps.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

N=${N:-3}
PCT=${PCT:-10}
REPS=${REPS:-3}

cluster_bench_args
[[ "$PCT" =~ ^[1-9][0-9]?$ ]] || die "PCT must be 1..99, got '$PCT'"

# Source + two versions on each replica.
need=$(((2 * N + 1) * bytes + (512 << 20)))
cluster_bench_prepare bench-incr "$need"

log "cluster: primary + $N replicas, $RATE per node egress"
"$CLUSTER" up "$N" --rate "$RATE" >/dev/null
addrs=() roots=() maddrs=()
for ((k = 1; k <= N; k++)); do
    addr=$("$CLUSTER" addr "r$k")
    logf=$work/serve-r$k.log
    "$CLUSTER" exec "r$k" env NO_COLOR=1 "$bin" serve --listen "$addr:$PORT" --root "$work/root-r$k" \
        --keep 2 --metrics "$addr:9100" >/dev/null 2>"$logf" &
    bg_started $!
    for ((i = 0; i < 300; i++)); do
        grep -q "listening on $addr:$PORT" "$logf" 2>/dev/null && break
        sleep 0.1
    done
    ((i < 300)) || { cat "$logf" >&2; die "serve on r$k did not start"; }
    addrs+=("$addr:$PORT") roots+=("$work/root-r$k") maddrs+=("$addr:9100")
done

mkdir -p results/incremental
out=results/incremental/bench-incremental-$(date +%Y%m%d-%H%M%S).md
export PYTHONPATH=$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}
BI_BIN=$bin BI_SRC=$work/src BI_ADDRS="${addrs[*]}" BI_ROOTS="${roots[*]}" BI_MADDRS="${maddrs[*]}" \
    BI_N=$N BI_PCT=$PCT BI_REPS=$REPS BI_CHUNK=$chunk BI_PREFIX=$SC_CLUSTER \
    BI_CMD="SIZE=$SIZE FILES=$FILES N=$N PCT=$PCT REPS=$REPS RATE=$RATE CHUNK=$CHUNK ./scripts/bench-incremental.sh" \
    python3 - <<'PY' | tee "$out"
import os, random, re, subprocess
import benchlib as bl

BIN, SRC, N, PCT, REPS, CHUNK = bl.env("BI_BIN"), bl.env("BI_SRC"), bl.env("BI_N", int), bl.env("BI_PCT", int), bl.env("BI_REPS", int), bl.env("BI_CHUNK", int)
ADDRS, ROOTS, MADDRS = bl.env("BI_ADDRS").split(), bl.env("BI_ROOTS").split(), bl.env("BI_MADDRS").split()
CL = "scripts/cluster.sh"

def tc_bytes(node):
    out = subprocess.run([CL, "exec", node, "tc", "-s", "qdisc", "show", "dev", "scv0"],
                         check=True, capture_output=True, text=True).stdout
    return int(re.search(r"Sent (\d+) bytes", out).group(1))

def counters():
    return ([tc_bytes("p")] + [tc_bytes(f"r{k+1}") for k in range(N)],
            [bl.received_bytes(MADDRS[k], wrap=[CL, "exec", f"r{k+1}"]) for k in range(N)])

def push(version, extra):
    c0 = counters()
    j, _ = bl.push(BIN, SRC, "ck", version, ADDRS, *extra, chunk=CHUNK, wrap=[CL, "exec", "p"])
    c1 = counters()
    bl.check_copies(SRC, ROOTS, "ck", version)
    links = [b - a for a, b in zip(c0[0], c1[0])]          # p->r1, r1->r2, ... (egress of each node)
    recv = [b - a for a, b in zip(c0[1], c1[1])]
    return j["seconds"], links[:N], recv

files = sorted(os.listdir(SRC))
chunks = [(f, i) for f in files for i in range((os.path.getsize(os.path.join(SRC, f)) + CHUNK - 1) // CHUNK)]
rng = random.Random(1)
rows = []
for rep in range(REPS):
    t_full, links_full, _ = push(2 * rep + 1, [])
    pick = rng.sample(chunks, max(1, len(chunks) * PCT // 100))
    changed = 0
    for f, i in pick:
        path = os.path.join(SRC, f)
        size = os.path.getsize(path)
        with open(path, "r+b") as fh:
            fh.seek(i * CHUNK + 17)
            fh.write(os.urandom(64))
        changed += min(CHUNK, size - i * CHUNK)
    t_inc, links_inc, recv_inc = push(2 * rep + 2, ["--incremental"])
    rows.append((t_full, t_inc, changed, links_inc, recv_inc, links_full))
    print(f"rep {rep}: full {t_full:.3f} s, incremental {t_inc:.3f} s ({t_inc / t_full:.3f} x); changed {changed} B;"
          f" link bytes {links_inc}; chunk bytes received {recv_inc}", flush=True)

tf = bl.median(r[0] for r in rows)
ti = bl.median(r[1] for r in rows)
link_ratio = max(max(r[3]) / r[2] for r in rows)
recv_ratio = max(max(r[4]) / r[2] for r in rows)
print()
print(bl.md_header("bench-incremental", bl.env("BI_CMD")))
print(bl.md_table(["", "median s", "ratio"], [
    ["full push", f"{tf:.3f}", "1"],
    [f"incremental ({PCT} % of chunks changed)", f"{ti:.3f}", f"{ti / tf:.3f} (target <= 0.15)"],
]))
print()
print(f"bytes on the busiest link / changed bytes: {link_ratio:.3f} (Ethernet frames: TCP/IP headers, acks,"
      f" handshake and manifest included; target <= 1.05 plus manifests)")
print(f"chunk bytes received by any replica / changed bytes: {recv_ratio:.3f}")
PY
log "saved $out"

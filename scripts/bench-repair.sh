#!/usr/bin/env bash
# Chain repair on the emulated cluster (scripts/cluster.sh): a push down a chain of N replicas
# (egress shaped to RATE) with the middle replica SIGKILLed once it has received half, against
# the same push without a fault.
#
# Each rep:
#   clean  `shardcast push SRC --json` as version 2k-1 to every replica;
#   kill   the same as version 2k, and `kill -9` of replica MID once its Prometheus counter
#          shows SIZE/2 received; the push repairs around it (the replicas after it get the
#          rest again from the primary, resuming what they journaled) and reports it failed.
# Before every push each chunk of the source gets new bytes, so no replica can reuse its current
# version. Every surviving replica's copy is compared with the source (cmp); the killed replica
# is restarted between reps. Target (issue 5): kill time <= 1.3 x clean time.
#
# Env: SIZE (1G), FILES (8), N (4 replicas), MID (2), REPS (3), RATE (1gbit), CHUNK (4MiB),
#      PORT (7071), SC_CLUSTER (sc), KEEP_WORK=1.
# Output: the table on stdout, also saved to results/repair/bench-repair-<date>.md.
# Needs root, iproute2, python3, cmp (scripts/deps.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

N=${N:-4}
MID=${MID:-2}
REPS=${REPS:-3}

cluster_bench_args
((MID >= 1 && MID < N)) || die "MID must be a replica with one after it (1..N-1), got '$MID'"

# Source + two versions on each replica.
need=$(((2 * N + 1) * bytes + (512 << 20)))
cluster_bench_prepare bench-repair "$need"

log "cluster: primary + $N replicas, $RATE per node egress"
"$CLUSTER" up "$N" --rate "$RATE" >/dev/null
addrs=() roots=() maddrs=()
for ((k = 1; k <= N; k++)); do
    addr=$("$CLUSTER" addr "r$k")
    addrs+=("$addr:$PORT") roots+=("$work/root-r$k") maddrs+=("$addr:9100")
done
# The replicas are started (and the killed one restarted) by the python loop below, through
# this helper: `serve K` starts replica K in its namespace and prints its PID.
cat >"$work/serve.sh" <<SH
#!/usr/bin/env bash
k=\$1
addr=\$($PWD/$CLUSTER addr "r\$k")
logf=$work/serve-r\$k.\$(date +%s%N).log
$PWD/$CLUSTER exec "r\$k" env NO_COLOR=1 $bin serve --listen "\$addr:$PORT" --root "$work/root-r\$k" \\
    --keep 2 --metrics "\$addr:9100" >/dev/null 2>>"\$logf" &
pid=\$!
for ((i = 0; i < 300; i++)); do
    grep -q "listening on \$addr:$PORT" "\$logf" 2>/dev/null && break
    sleep 0.1
done
echo "\$pid"
SH
chmod +x "$work/serve.sh"


mkdir -p results/repair
out=results/repair/bench-repair-$(date +%Y%m%d-%H%M%S).md
export PYTHONPATH=$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}
BR_BIN=$bin BR_SRC=$work/src BR_ADDRS="${addrs[*]}" BR_ROOTS="${roots[*]}" BR_MADDRS="${maddrs[*]}" \
    BR_N=$N BR_MID=$MID BR_REPS=$REPS BR_CHUNK=$chunk BR_SERVE=$work/serve.sh BR_BYTES=$bytes \
    BR_CMD="SIZE=$SIZE FILES=$FILES N=$N MID=$MID REPS=$REPS RATE=$RATE CHUNK=$CHUNK ./scripts/bench-repair.sh" \
    python3 - <<'PY' | tee "$out"
import json, os, signal, subprocess, time
import benchlib as bl

BIN, SRC, N, MID, REPS, CHUNK = bl.env("BR_BIN"), bl.env("BR_SRC"), bl.env("BR_N", int), bl.env("BR_MID", int), bl.env("BR_REPS", int), bl.env("BR_CHUNK", int)
BYTES = bl.env("BR_BYTES", int)
ADDRS, ROOTS, MADDRS = bl.env("BR_ADDRS").split(), bl.env("BR_ROOTS").split(), bl.env("BR_MADDRS").split()
CL = "scripts/cluster.sh"
pids = {}

def serve(k):
    pids[k] = int(subprocess.run([bl.env("BR_SERVE"), str(k)], check=True, capture_output=True, text=True).stdout.split()[-1])

def received(k):
    return bl.received_bytes(MADDRS[k - 1], wrap=[CL, "exec", f"r{k}"])

def fresh():
    # Every chunk differs from every earlier version: the replicas cannot reuse their current
    # version (have-sets), so what a repair moves is what a new checkpoint would.
    for f in sorted(os.listdir(SRC)):
        path = os.path.join(SRC, f)
        size = os.path.getsize(path)
        with open(path, "r+b") as fh:
            for off in range(0, size, CHUNK):
                fh.seek(off)
                fh.write(os.urandom(min(8, size - off)))

def push(version, kill):
    fresh()
    # Started in the background: the replica is killed while the push runs.
    cmd = bl.push_cmd(BIN, SRC, "ck", version, ADDRS, chunk=CHUNK, wrap=[CL, "exec", "p"])
    base = received(MID)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    if kill:
        while p.poll() is None and received(MID) - base < BYTES // 2:
            time.sleep(0.05)
        os.kill(pids[MID], signal.SIGKILL)
    out, _ = p.communicate()
    j = json.loads(out)
    survivors = [k for k in range(1, N + 1) if not (kill and k == MID)]
    bl.check_copies(SRC, [ROOTS[k - 1] for k in survivors], "ck", version)
    return j["seconds"], bl.statuses(j)

for k in range(1, N + 1):
    serve(k)
rows = []
for rep in range(REPS):
    t_clean, st_clean = push(2 * rep + 1, False)
    t_kill, st_kill = push(2 * rep + 2, True)
    serve(MID)
    rows.append((t_clean, t_kill))
    print(f"rep {rep}: clean {t_clean:.3f} s {st_clean}; killed r{MID} at half: {t_kill:.3f} s ({t_kill / t_clean:.3f} x) {st_kill}", flush=True)
for k, pid in pids.items():
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
tc = bl.median(r[0] for r in rows)
tk = bl.median(r[1] for r in rows)
print()
print(bl.md_header("bench-repair", bl.env("BR_CMD")))
print(bl.md_table(["push", "median s", "ratio"], [
    ["no fault", f"{tc:.3f}", "1"],
    [f"r{MID} of {N} killed at half", f"{tk:.3f}", f"{tk / tc:.3f} (target <= 1.3)"],
]))
PY
log "saved $out"

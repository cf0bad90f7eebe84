#!/usr/bin/env bash
# Chain vs star on an emulated cluster (scripts/cluster.sh): 1 primary + N replicas, each in its
# own network namespace, each node's egress shaped to RATE. A chain is worth having only where
# the links, not the CPU, are the bottleneck: then a chain to N replicas should take about as long
# as a push to one, and a star (the primary pushing to each replica itself, N pushes in parallel
# through its one link) N times as long.
#
# What it does:
#   1. builds release and copies the binary into the work dir (a rebuild by someone else during
#      the run cannot change what is measured);
#   2. writes a shard set of SIZE random bytes in FILES files to tmpfs (/dev/shm);
#   3. `cluster.sh up MAXN --rate RATE --mtu MTU --qdisc QDISC`, and `shardcast serve --keep 1` on
#      every replica node (root on /dev/shm, listening on the node's address, port PORT);
#   4. one warm-up push through all replicas (not recorded: servers keep their buffer pool across
#      pushes, and the table is about that steady state); then REPS times, cases interleaved so that drift hits them alike:
#        iperf3   (IPERF=1) one TCP stream p -> r1 of SIZE bytes: what TCP itself gets on a link;
#        chain N  one `shardcast push SRC --to r1,…,rN --json` from the primary's namespace;
#        star N   N parallel `shardcast push SRC --to rK --json`, one per replica;
#      for every N in NS. Around each case it samples utime+stime of every serve process
#      (/proc/PID/stat), the rusage of the push processes (wait4), host CPU (/proc/stat) and each
#      node's shaper byte counter (tc -s); after each case it compares every replica's copy of
#      every file with the source (cmp), then deletes it (keeps tmpfs at SIZE x (1 + MAXN) max);
#   5. prints the summary table and the targets, saves it to results/cluster/bench-cluster-<date>.md,
#      raw rows (one per case and rep) to results/cluster/bench-cluster-<date>.csv.
#
# Seconds: a chain's time is the push's own "seconds" (start, manifest, handshake, transfer,
# fsync, publish, until the tail's report is back); a star's is the largest "seconds" of its N
# pushes, started together. The physical limit is SIZE x 8 / RATE (tc rates are decimal: 1gbit =
# 10^9 bit/s, charged on Ethernet frames incl. the 14-byte header, see cluster.sh); the best a TCP
# stream can do is (MTU+14)/(MTU-52) = 1514/1448 = 1.046 times that.
#
# Env: SIZE (1G), FILES (8), REPS (3), NS ("1 2 4 8"), TOPOS ("chain star"; chain-old with OLD_BIN;
#      chain-key: the same chain through replicas started with a cluster key, pushed with it, in
#      the same reps, and the ratio chain-key / chain per N: what authentication and the frame
#      MACs cost, issue 14's target <= 1.02),
#      OLD_BIN (an older release binary: adds chain-old, the same chain through replicas running
#      it, in the same reps, and the ratio this / old per N), RATE (1gbit),
#      MTU (1500), QDISC (htb|tbf, htb), CC (TCP congestion control in the namespaces, cluster.sh
#      --cc; default what they inherit from the host), CHUNK (push --chunk-size, default the engine's),
#      POOL_MB (serve and push --pool-mb, default the engine's), IPERF (1; 0 skips iperf3),
#      PORT (7071), SC_CLUSTER (cluster name prefix, sc), SHARDCAST_IO, SHARDCAST_ZEROCOPY and
#      SHARDCAST_PIECE_BYTES (relays' cut-through piece, 0 = store-and-forward) (passed through
#      to every serve and push, recorded in the table),
#      KEEP_WORK=1 (keep the tmpfs work dir).
# Needs root, iproute2, python3, cmp; iperf3 when IPERF=1 (scripts/deps.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

SIZE=${SIZE:-1G}
FILES=${FILES:-8}
REPS=${REPS:-3}
NS=${NS:-1 2 4 8}
TOPOS=${TOPOS:-chain star}
RATE=${RATE:-1gbit}
MTU=${MTU:-1500}
QDISC=${QDISC:-htb}
CC=${CC:-}
CHUNK=${CHUNK:-}
POOL_MB=${POOL_MB:-}
IPERF=${IPERF:-1}
PORT=${PORT:-7071}
export SC_CLUSTER=${SC_CLUSTER:-sc}
CLUSTER=scripts/cluster.sh

bytes=$(parse_size "$SIZE")
((bytes > 0)) || die "SIZE must be > 0"
[[ "$FILES" =~ ^[1-9][0-9]*$ ]] || die "FILES must be a positive integer, got '$FILES'"
[[ "$REPS" =~ ^[1-9][0-9]*$ ]] || die "REPS must be a positive integer, got '$REPS'"
[[ "$PORT" =~ ^[1-9][0-9]*$ ]] || die "PORT must be a port number, got '$PORT'"
[[ "$RATE" =~ ^[0-9]+(bit|kbit|mbit|gbit|tbit)$ ]] || die "RATE must look like 1gbit or 500mbit, got '$RATE'"
[[ -z "$POOL_MB" || "$POOL_MB" =~ ^[1-9][0-9]*$ ]] || die "POOL_MB must be a positive integer"
maxn=0
for n in $NS; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "NS must list positive integers, got '$NS'"
    ((n > maxn)) && maxn=$n
done
((maxn > 0)) || die "NS is empty"
for t in $TOPOS; do
    [[ "$t" == chain || "$t" == star || "$t" == chain-old || "$t" == chain-key ]] \
        || die "TOPOS may hold chain, star, chain-old and chain-key, got '$t'"
done
OLD_BIN=${OLD_BIN:-}
if [[ -n "$OLD_BIN" ]]; then
    [[ -x "$OLD_BIN" ]] || die "OLD_BIN=$OLD_BIN is not an executable"
    [[ " $TOPOS " == *" chain-old "* ]] || TOPOS="$TOPOS chain-old"
elif [[ " $TOPOS " == *" chain-old "* ]]; then
    die "TOPOS chain-old needs OLD_BIN=path to an older release binary"
fi

[[ $(id -u) -eq 0 ]] || die "needs root (network namespaces)"
command -v ip >/dev/null || die "ip not found: run scripts/deps.sh (iproute2)"
command -v tc >/dev/null || die "tc not found: run scripts/deps.sh (iproute2)"
command -v python3 >/dev/null || die "python3 not found: run scripts/deps.sh"
command -v cmp >/dev/null || die "cmp not found (diffutils)"
if [[ "$IPERF" == 1 ]]; then command -v iperf3 >/dev/null || die "iperf3 not found: run scripts/deps.sh, or IPERF=0"; fi

# The source plus up to MAXN full copies live on tmpfs at once.
need=$(((maxn + 1) * bytes + (512 << 20)))
avail=$(avail_bytes /dev/shm)
((avail >= need)) || die "/dev/shm has $(fmt_bytes "$avail") free, this run needs $(fmt_bytes "$need") (SIZE x (1 + max N) + 512 MiB)"

log "building release binary"
cargo build --release --quiet
[[ -x "$BIN" ]] || die "$BIN missing after cargo build --release"

work=$(mktemp -d /dev/shm/shardcast-bench-cluster.XXXXXX)
if [[ "${KEEP_WORK:-0}" == 1 ]]; then log "keeping $work"; else cleanup_register_dir "$work"; fi
cp "$BIN" "$work/shardcast"
bin=$work/shardcast
old_bin=
if [[ -n "$OLD_BIN" ]]; then
    cp "$OLD_BIN" "$work/shardcast-old"
    old_bin=$work/shardcast-old
    log "old binary for chain-old: $OLD_BIN ($("$OLD_BIN" --version))"
fi

# On exit (normal, error or signal): stop the servers, tear the cluster down, then lib.sh's
# cleanup (remaining processes, the work dir).
_bench_exit() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    [[ "$BASHPID" == "$$" ]] || exit "$rc"
    local pids=("${_PIDS[@]}") pid
    # The measurement loop first, so that it does not report the servers' end as a failure.
    [[ -n "${py_pid:-}" ]] && stop_pid "$py_pid"
    for pid in "${pids[@]}"; do stop_pid "$pid"; done
    "$CLUSTER" down >/dev/null 2>&1 || echo "warning: '$CLUSTER down' failed; run it by hand" >&2
    (exit "$rc")
    _cleanup
}
trap _bench_exit EXIT

log "generating $(fmt_bytes "$bytes") of random data in $FILES file(s) under $work/src"
gen_shard_set "$work/src" "$bytes" "$FILES"

log "cluster: primary + $maxn replicas, $RATE per node egress ($QDISC), MTU $MTU"
cc_args=()
[[ -n "$CC" ]] && cc_args+=(--cc "$CC")
"$CLUSTER" up "$maxn" --rate "$RATE" --mtu "$MTU" --qdisc "$QDISC" "${cc_args[@]}" >/dev/null

serve_args=(--keep 1)
[[ -n "$POOL_MB" ]] && serve_args+=(--pool-mb "$POOL_MB")
# start_serves BIN PORT TAG [ARG…]: one `serve` per replica namespace (with the extra ARGs);
# sets serve_pids, addrs, roots.
start_serves() {
    local sbin=$1 port=$2 tag=$3 k addr root logf pid i
    shift 3
    serve_pids=() addrs=() roots=()
    for ((k = 1; k <= maxn; k++)); do
        addr=$("$CLUSTER" addr "r$k")
        root=$work/root$tag-r$k
        logf=$work/serve$tag-r$k.log
        : >"$logf"
        "$CLUSTER" exec "r$k" env NO_COLOR=1 "$sbin" serve --listen "$addr:$port" --root "$root" "${serve_args[@]}" "$@" \
            >/dev/null 2>"$logf" &
        pid=$!
        bg_started "$pid"
        for ((i = 0; i < 300; i++)); do
            sed 's/\x1b\[[0-9;]*m//g' "$logf" | grep -q "listening on $addr:$port" && break
            kill -0 "$pid" 2>/dev/null || { cat "$logf" >&2; die "serve$tag on r$k exited before listening"; }
            sleep 0.1
        done
        ((i < 300)) || { cat "$logf" >&2; die "serve$tag on r$k did not print 'listening on $addr:$port' within 30 s"; }
        serve_pids+=("$pid") addrs+=("$addr:$port") roots+=("$root")
    done
}
old_pids=() old_addrs=() old_roots=()
if [[ -n "$old_bin" ]]; then
    start_serves "$old_bin" $((PORT + 1)) -old
    old_pids=("${serve_pids[@]}") old_addrs=("${addrs[@]}") old_roots=("${roots[@]}")
    log "old binary serving on ${old_addrs[*]}"
fi
key_file= key_pids=() key_addrs=() key_roots=()
if [[ " $TOPOS " == *" chain-key "* ]]; then
    key_file=$work/cluster.key
    head -c 32 /dev/urandom | base64 >"$key_file"
    chmod 600 "$key_file"
    start_serves "$bin" $((PORT + 2)) -key --key-file "$key_file"
    key_pids=("${serve_pids[@]}") key_addrs=("${addrs[@]}") key_roots=("${roots[@]}")
    log "keyed replicas serving on ${key_addrs[*]}"
fi
start_serves "$bin" "$PORT" ""
log "serving on ${addrs[*]}"

push_args=()
[[ -n "$CHUNK" ]] && push_args+=(--chunk-size "$CHUNK")
[[ -n "$POOL_MB" ]] && push_args+=(--pool-mb "$POOL_MB")

# The exact command, with every setting that differs from the defaults.
cmdline=""
[[ "$SIZE" != 1G ]] && cmdline+="SIZE=$SIZE "
[[ "$FILES" != 8 ]] && cmdline+="FILES=$FILES "
[[ "$REPS" != 3 ]] && cmdline+="REPS=$REPS "
[[ "$NS" != "1 2 4 8" ]] && cmdline+="NS=\"$NS\" "
[[ "$TOPOS" != "chain star" ]] && cmdline+="TOPOS=\"$TOPOS\" "
[[ "$RATE" != 1gbit ]] && cmdline+="RATE=$RATE "
[[ "$MTU" != 1500 ]] && cmdline+="MTU=$MTU "
[[ "$QDISC" != htb ]] && cmdline+="QDISC=$QDISC "
[[ -n "$CC" ]] && cmdline+="CC=$CC "
[[ -n "$CHUNK" ]] && cmdline+="CHUNK=$CHUNK "
[[ -n "$POOL_MB" ]] && cmdline+="POOL_MB=$POOL_MB "
[[ "$IPERF" != 1 ]] && cmdline+="IPERF=$IPERF "
[[ -n "${SHARDCAST_IO:-}" ]] && cmdline+="SHARDCAST_IO=$SHARDCAST_IO "
[[ -n "${SHARDCAST_ZEROCOPY:-}" ]] && cmdline+="SHARDCAST_ZEROCOPY=$SHARDCAST_ZEROCOPY "
[[ -n "${SHARDCAST_PIECE_BYTES:-}" ]] && cmdline+="SHARDCAST_PIECE_BYTES=$SHARDCAST_PIECE_BYTES "
[[ -n "$OLD_BIN" ]] && cmdline+="OLD_BIN=$OLD_BIN "
cmdline+="./scripts/bench-cluster.sh"

mkdir -p results/cluster
stamp=$(date +%Y%m%d-%H%M%S)
dirty=""
git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || dirty="+dirty"

# The measurement loop and the summary (python: timing, wait4 rusage, JSON, CSV).
cat >"$work/bench.py" <<'PY'
import csv, json, os, shutil, statistics, subprocess, sys, time
import benchlib as bl
from benchlib import host_cpu, log, proc_cpu

E = os.environ
BIN, SRC, WORK = E["BC_BIN"], E["BC_SRC"], E["BC_WORK"]
BYTES, REPS = int(E["BC_BYTES"]), int(E["BC_REPS"])
NS = [int(x) for x in E["BC_NS"].split()]
TOPOS = E["BC_TOPOS"].split()
RATE, MTU, PREFIX = E["BC_RATE"], int(E["BC_MTU"]), E["BC_PREFIX"]
PIDS = [int(x) for x in E["BC_SERVE_PIDS"].split()]
ADDRS, ROOTS = E["BC_ADDRS"].split(), E["BC_ROOTS"].split()
# chain-old: the same chain through a second set of replicas that run an older binary (OLD_BIN),
# pushed by that binary, in the same reps: how a change moved the chain's speed, side by side.
OLD_BIN = E.get("BC_OLD_BIN", "")
OLD_PIDS = [int(x) for x in E.get("BC_OLD_PIDS", "").split()]
OLD_ADDRS, OLD_ROOTS = E.get("BC_OLD_ADDRS", "").split(), E.get("BC_OLD_ROOTS", "").split()
# chain-key: the same chain through a third set of replicas started with a cluster key, pushed
# with it (authentication, and the MACs of every frame that decides something).
KEY_FILE = E.get("BC_KEY_FILE", "")
KEY_PIDS = [int(x) for x in E.get("BC_KEY_PIDS", "").split()]
KEY_ADDRS, KEY_ROOTS = E.get("BC_KEY_ADDRS", "").split(), E.get("BC_KEY_ROOTS", "").split()
PUSH_ARGS = E["BC_PUSH_ARGS"].split()
MAXN = len(PIDS)
UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
num = RATE.rstrip("abcdefghijklmnopqrstuvwxyz")
RATE_BPS = int(num) * UNITS[RATE[len(num):]]
LIMIT = BYTES * 8 / RATE_BPS                 # seconds: SIZE / RATE
TCP_BOUND = (MTU + 14) / (MTU - 52)          # frame bytes per payload byte, timestamps on
FILES = sorted(os.listdir(SRC))

def ns(node):
    return f"{PREFIX}-{node}"

def in_ns(node, *cmd):
    return ["ip", "netns", "exec", ns(node), *cmd]

def shaper_bytes(node):
    """Bytes the node's root qdisc has sent (Ethernet frames as the shaper charges them)."""
    out = subprocess.run(["tc", "-n", ns(node), "-s", "-j", "qdisc", "show", "dev", "scv0"],
                         capture_output=True, text=True, check=True).stdout
    for q in json.loads(out):
        if q.get("root"):
            return int(q["bytes"])
    return 0

def sample(nodes, pids=PIDS):
    for pid in PIDS + OLD_PIDS:
        if not os.path.exists(f"/proc/{pid}"):
            sys.exit(f"error: serve process {pid} is gone (see {WORK}/serve-r*.log)")
    return {
        "cpu": [proc_cpu(p) for p in pids],
        "host": host_cpu(),
        "tx": {n: shaper_bytes(n) for n in nodes},
        "t": time.monotonic(),
    }

def run_group(cmds, outs, timeout):
    """Starts every command at once and waits for all; returns [(exit code, cpu s)] and wall s."""
    t0 = time.monotonic()
    procs = []
    for cmd, out in zip(cmds, outs):
        with open(out, "wb") as fo, open(out + ".err", "wb") as fe:
            procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe))
    res = {}
    while len(res) < len(procs):
        for p in procs:
            if p.pid in res:
                continue
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                p.returncode = os.waitstatus_to_exitcode(status)
                res[p.pid] = (p.returncode, ru.ru_utime + ru.ru_stime)
        if time.monotonic() - t0 > timeout:
            for p in procs:
                if p.pid not in res:
                    p.kill()
            sys.exit(f"error: {' '.join(cmds[0])} … did not finish within {timeout:.0f} s")
        if len(res) < len(procs):
            time.sleep(0.02)
    return [res[p.pid] for p in procs], time.monotonic() - t0

def show(path):
    try:
        return open(path, errors="replace").read()[-4000:]
    except OSError:
        return ""

def verify_and_clean(ks, version, roots=ROOTS):
    """Every file on every replica in ks equals the source; then the copies go."""
    for k in ks:
        vdir = os.path.join(roots[k - 1], "bench", str(version))
        got = sorted(os.listdir(vdir)) if os.path.isdir(vdir) else None
        if got != FILES:
            sys.exit(f"error: r{k}: {vdir} holds {got}, expected {FILES}")
        bl.check_copies(SRC, [roots[k - 1]], "bench", version)
        shutil.rmtree(os.path.join(roots[k - 1], "bench"))

version = 0
rows = []

# Link timeline (chain cases): one sampler per sending node, inside its namespace, reads the
# link's tx byte counter from /proc/net/dev every 10 ms until a stop file appears. From it: when
# each node's link started carrying data (the lag per hop is the chain's store-and-forward delay)
# and how busy each link was in the middle of the transfer (10% .. 90% of its bytes), as a
# fraction of RATE, the counter scaled to the bytes the shaper charged.
SAMPLER = r"""
import os, sys, time
out, stop = sys.argv[1], sys.argv[2]
rows = []
while not os.path.exists(stop):
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "scv0":
                rows.append("%.5f %s" % (time.monotonic(), rest.split()[8]))
    time.sleep(0.01)
open(out, "w").write("\n".join(rows) + "\n")
"""

def start_samplers(nodes, tag):
    stop = os.path.join(WORK, f"stop-{tag}")
    procs = []
    for node in nodes:
        out = os.path.join(WORK, f"tl-{tag}-{node}.txt")  # kept in the work dir (KEEP_WORK=1)
        procs.append((node, out, subprocess.Popen(in_ns(node, sys.executable, "-c", SAMPLER, out, stop),
                                                   stdin=subprocess.DEVNULL)))
    time.sleep(0.2)  # let them take a first sample before the push starts
    return stop, procs

def stop_samplers(stop, procs, t0, shaper):
    """{node: (seconds from t0 to its first MiB on the wire, mid-transfer utilisation of RATE,
    seconds from t0 to its last byte)}."""
    open(stop, "w").close()
    res = {}
    for node, out, p in procs:
        p.wait(timeout=30)
        pts = [tuple(map(float, l.split())) for l in open(out) if l.strip()]
        if len(pts) < 3:
            continue
        base, total = pts[0][1], pts[-1][1] - pts[0][1]
        if total < (4 << 20):
            continue
        def at(b):
            return next(t for t, v in pts if v - base >= b)
        a, z = at(0.1 * total), at(0.9 * total)
        scale = shaper[node] / total if total else 0  # shaper-charged bytes per counted byte
        util = 0.8 * total * scale * 8 / (z - a) / RATE_BPS if z > a else 0
        # The last data byte: control frames (ACKs, the report) still follow it on the link.
        res[node] = (at(1 << 20) - t0, util, at(total - (64 << 10)) - t0)
    os.unlink(stop)
    return res

def push_case(rep, n, topo):
    global version
    version += 1
    ks = list(range(1, n + 1))
    nodes = ["p"] + [f"r{k}" for k in ks]
    old = topo == "chain-old"
    bin_, addrs, roots, pids = (OLD_BIN, OLD_ADDRS, OLD_ROOTS, OLD_PIDS) if old else (BIN, ADDRS, ROOTS, PIDS)
    keyed = topo == "chain-key"
    if keyed:
        addrs, roots, pids = KEY_ADDRS, KEY_ROOTS, KEY_PIDS
    chain = topo.startswith("chain")
    base = [bin_, "push", SRC, "--name", "bench", "--version", str(version), "--json", *PUSH_ARGS]
    if keyed:
        base += ["--key-file", KEY_FILE]
    if chain:
        cmds = [in_ns("p", *base, "--to", ",".join(addrs[k - 1] for k in ks))]
    else:
        cmds = [in_ns("p", *base, "--to", ADDRS[k - 1]) for k in ks]
    outs = [os.path.join(WORK, f"push-{topo}-{n}-{rep}-{i}.json") for i in range(len(cmds))]
    expect = LIMIT * TCP_BOUND * (n if topo == "star" else 1)
    load = os.getloadavg()[0]
    senders = nodes[:-1] if chain else ["p"]
    stop, samplers = start_samplers(senders, f"{topo}-{n}-{rep}")
    before = sample(nodes, pids)
    t0 = time.monotonic()
    res, wall = run_group(cmds, outs, timeout=3 * expect + 120)
    after = sample(nodes, pids)
    tl = stop_samplers(stop, samplers, t0, {x: after["tx"][x] - before["tx"][x] for x in senders})
    secs = []
    for (code, _), out in zip(res, outs):
        try:
            j = json.loads(open(out).read())
        except ValueError:
            j = {}
        pub = [r for r in j.get("replicas", []) if r.get("status") == "published"]
        want = n if chain else 1
        if code != 0 or not j.get("ok") or len(pub) != want or j.get("bytes") != BYTES:
            sys.exit(f"error: {topo} N={n} rep {rep}: push exited {code}\n--- stdout\n{show(out)}\n"
                     f"--- stderr\n{show(out + '.err')}\n--- serve logs in {WORK}")
        secs.append(float(j["seconds"]))
    seconds = max(secs)
    verify_and_clean(ks, version, roots)
    cpu = [a - b for a, b in zip(after["cpu"], before["cpu"])]
    busy = after["host"][0] - before["host"][0]
    soft = after["host"][1] - before["host"][1]
    row = {
        "rep": rep, "n": n, "topology": topo, "bytes": BYTES, "seconds": f"{seconds:.4f}",
        "wall_seconds": f"{wall:.4f}", "ratio_limit": f"{seconds / LIMIT:.4f}",
        "gbps_per_replica": f"{BYTES / seconds / 1e9:.4f}",
        "cpu_p": f"{sum(c for _, c in res):.3f}",
        "host_busy_s": f"{busy:.2f}", "host_softirq_s": f"{soft:.2f}", "loadavg1": f"{load:.2f}",
        "first_mib_s": f"{tl['p'][0]:.4f}" if "p" in tl else "",
        "link_util_min": f"{min(u for _, u, _ in tl.values()):.4f}" if tl else "",
        # From the last data byte on the last sender's link to the push's exit: the tail's last
        # writes, sync and publish, and the reports travelling back up the chain.
        "tail_ms": f"{(wall - tl[senders[-1]][2]) * 1000:.0f}" if chain and senders[-1] in tl else "",
        "hop_lag_ms": (f"{(tl[senders[-1]][0] - tl['p'][0]) / (len(senders) - 1) * 1000:.1f}"
                       if chain and len(senders) > 1 and senders[-1] in tl and "p" in tl else ""),
    }
    for k in range(1, MAXN + 1):
        row[f"cpu_r{k}"] = f"{cpu[k - 1]:.3f}" if k <= n else ""
    for node in ["p"] + [f"r{k}" for k in range(1, MAXN + 1)]:
        row[f"tx_{node}"] = str(after["tx"][node] - before["tx"][node]) if node in nodes else ""
    rows.append(row)
    relays = [float(row[f"cpu_r{k}"]) for k in ks[:-1]] if chain else []
    log(f"rep {rep}/{REPS} {topo:<9} N={n}: {seconds:7.3f} s = {seconds / LIMIT:.4f} x size/rate"
        f"  cpu p {row['cpu_p']} s" + (f", relays {statistics.mean(relays):.2f} s" if relays else "")
        + f", tail(s) {statistics.mean(float(row[f'cpu_r{k}']) for k in (ks[-1:] if topo == 'chain' else ks)):.2f} s"
        + f", host busy {busy:.1f} s, load {load:.1f}"
        + (f"; links: first MiB {row['first_mib_s']} s, slowest link busy {row['link_util_min']} of rate"
           if tl else "") + (f", lag/hop {row['hop_lag_ms']} ms" if row["hop_lag_ms"] else "")
        + (f", last byte to exit {row['tail_ms']} ms" if row["tail_ms"] else ""))

def iperf_case(rep):
    addr = ADDRS[0].split(":")[0]
    port = "5201"
    srv = subprocess.Popen(in_ns("r1", "iperf3", "-s", "-1", "-B", addr, "-p", port),
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        out = os.path.join(WORK, f"iperf3-{rep}.json")
        before = sample(["p", "r1"])
        for attempt in range(100):  # the server may not listen yet: a refused connect costs nothing
            r = subprocess.run(in_ns("p", "iperf3", "-c", addr, "-p", port, "-n", str(BYTES), "-J"),
                               capture_output=True, text=True, timeout=3 * LIMIT * TCP_BOUND + 60)
            if r.returncode == 0:
                break
            time.sleep(0.05)
        else:
            sys.exit(f"error: iperf3 client failed: {r.stdout[-2000:]} {r.stderr[-2000:]}")
        after = sample(["p", "r1"])
        open(out, "w").write(r.stdout)
        end = json.loads(r.stdout)["end"]["sum_received"]
        seconds = float(end["seconds"])
        srv.wait(timeout=30)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
    row = {"rep": rep, "n": 1, "topology": "iperf3", "bytes": int(end["bytes"]), "seconds": f"{seconds:.4f}",
           "wall_seconds": "", "ratio_limit": f"{seconds / (int(end['bytes']) * 8 / RATE_BPS):.4f}",
           "gbps_per_replica": f"{int(end['bytes']) / seconds / 1e9:.4f}", "cpu_p": "",
           "host_busy_s": f"{after['host'][0] - before['host'][0]:.2f}",
           "host_softirq_s": f"{after['host'][1] - before['host'][1]:.2f}", "loadavg1": f"{os.getloadavg()[0]:.2f}",
           "first_mib_s": "", "link_util_min": "", "hop_lag_ms": "", "tail_ms": ""}
    for k in range(1, MAXN + 1):
        row[f"cpu_r{k}"] = ""
    for node in ["p"] + [f"r{k}" for k in range(1, MAXN + 1)]:
        row[f"tx_{node}"] = str(after["tx"][node] - before["tx"][node]) if node in ("p", "r1") else ""
    rows.append(row)
    log(f"rep {rep}/{REPS} iperf3 N=1: {seconds:7.3f} s = {float(row['ratio_limit']):.4f} x size/rate")

kernel = os.uname().release
cc = subprocess.run(in_ns("p", "sysctl", "-n", "net.ipv4.tcp_congestion_control"),
                    capture_output=True, text=True).stdout.strip()
const = {"stamp": E["BC_STAMP"], "rate": RATE, "mtu": MTU, "qdisc": E["BC_QDISC"], "files": E["BC_FILES"],
         "chunk": E["BC_CHUNK"], "pool_mb": E["BC_POOL"], "io": E["BC_IO"], "cc": cc,
         "commit": E["BC_COMMIT"], "kernel": kernel}
log(f"SIZE {BYTES} bytes in {len(FILES)} files, RATE {RATE} -> size/rate = {LIMIT:.3f} s, "
    f"TCP bound {TCP_BOUND:.4f} x = {LIMIT * TCP_BOUND:.3f} s; congestion control {cc}")
# Warm-up, not recorded: one chain push through every replica, so that each server has set up
# what it keeps across pushes (buffer pool) and the measured pushes see a replica daemon's steady
# state. One shard file is enough.
warm = os.path.join(WORK, "warm")
os.makedirs(warm, exist_ok=True)
os.link(os.path.join(SRC, FILES[0]), os.path.join(warm, FILES[0]))
version += 1
r = subprocess.run(in_ns("p", BIN, "push", warm, "--name", "warmup", "--version", str(version), "--json", *PUSH_ARGS,
                         "--to", ",".join(ADDRS)), capture_output=True, text=True, timeout=600)
if r.returncode != 0:
    sys.exit(f"error: warm-up push failed ({r.returncode}): {r.stdout} {r.stderr}")
for root in ROOTS:
    shutil.rmtree(os.path.join(root, "warmup"))
log(f"warm-up push through all {MAXN} replicas: {json.loads(r.stdout)['seconds']:.3f} s")
if OLD_BIN:
    version += 1
    r = subprocess.run(in_ns("p", OLD_BIN, "push", warm, "--name", "warmup", "--version", str(version), "--json",
                             *PUSH_ARGS, "--to", ",".join(OLD_ADDRS)), capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        sys.exit(f"error: warm-up push of the old binary failed ({r.returncode}): {r.stdout} {r.stderr}")
    for root in OLD_ROOTS:
        shutil.rmtree(os.path.join(root, "warmup"))

if KEY_FILE:
    version += 1
    r = subprocess.run(in_ns("p", BIN, "push", warm, "--name", "warmup", "--version", str(version), "--json",
                             *PUSH_ARGS, "--key-file", KEY_FILE, "--to", ",".join(KEY_ADDRS)),
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        sys.exit(f"error: warm-up push to the keyed replicas failed ({r.returncode}): {r.stdout} {r.stderr}")
    for root in KEY_ROOTS:
        shutil.rmtree(os.path.join(root, "warmup"))

for rep in range(1, REPS + 1):
    if E["BC_IPERF"] == "1":
        iperf_case(rep)
    for n in NS:
        for topo in TOPOS:
            push_case(rep, n, topo)

fields = (["stamp", "rep", "n", "topology", "bytes", "seconds", "wall_seconds", "ratio_limit", "gbps_per_replica",
           "cpu_p"] + [f"cpu_r{k}" for k in range(1, MAXN + 1)]
          + ["host_busy_s", "host_softirq_s", "loadavg1", "first_mib_s", "link_util_min", "hop_lag_ms", "tail_ms", "tx_p"] + [f"tx_r{k}" for k in range(1, MAXN + 1)]
          + ["rate", "mtu", "qdisc", "files", "chunk", "pool_mb", "io", "cc", "commit", "kernel"])
with open(E["BC_CSV"], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    for r in rows:
        w.writerow({**r, **const})

# ---- summary ------------------------------------------------------------------------------
med = statistics.median
GIB = BYTES / 2**30
lines = []
def out(s=""):
    lines.append(s)
    print(s)

out(f"shardcast chain vs star on an emulated cluster ({E['BC_STAMP']}, commit {E['BC_COMMIT']}, kernel {kernel})")
out()
out(f"command: `{E['BC_CMD']}`")
out(f"shard set {BYTES / 2**30:.2f} GiB in {len(FILES)} files; each node's egress {RATE} ({E['BC_QDISC']}), "
    f"MTU {MTU}; chunk {E['BC_CHUNK']}, pool MiB {E['BC_POOL']}, io {E['BC_IO']}, TCP congestion control {cc}; "
    f"{REPS} reps")
out(f"size/rate = {LIMIT:.3f} s; TCP's bound at MTU {MTU} = {TCP_BOUND:.4f} x size/rate = {LIMIT * TCP_BOUND:.3f} s")
out()
out("| N | topology | median s | min s | max s | GB/s per replica | x size/rate | CPU s primary "
    "| CPU s per relay | CPU s per relay per GiB | CPU s tail | host CPU busy s | first MiB s | slowest link busy "
    "| lag per hop ms | last byte to end ms |")
out("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
def med_col(rs, key, fmt):
    v = [float(r[key]) for r in rs if r.get(key)]
    return fmt.format(med(v)) if v else "–"
order = ([("iperf3", 1)] if any(r["topology"] == "iperf3" for r in rows) else []) + \
        [(t, n) for n in NS for t in TOPOS]
summary = {}
for topo, n in order:
    rs = [r for r in rows if r["topology"] == topo and r["n"] == n]
    s = [float(r["seconds"]) for r in rs]
    m = med(s)
    summary[(topo, n)] = m
    b = int(rs[0]["bytes"])
    ratio = m / (b * 8 / RATE_BPS)
    if topo == "iperf3":
        out(f"| 1 | iperf3 (1 TCP stream) | {m:.3f} | {min(s):.3f} | {max(s):.3f} | {b / m / 1e9:.4f} | {ratio:.4f} "
            f"| | | | | {med(float(r['host_busy_s']) for r in rs):.1f} | | | | |")
        continue
    cp = med(float(r["cpu_p"]) for r in rs)
    if topo.startswith("chain"):
        relays = [med(float(r[f"cpu_r{k}"]) for r in rs) for k in range(1, n)]
        tails = [med(float(r[f"cpu_r{n}"]) for r in rs)]
    else:
        relays = []
        tails = [med(float(r[f"cpu_r{k}"]) for r in rs) for k in range(1, n + 1)]
    rel = f"{statistics.mean(relays):.2f}" if relays else "–"
    relg = f"{statistics.mean(relays) / GIB:.2f}" if relays else "–"
    out(f"| {n} | {topo} | {m:.3f} | {min(s):.3f} | {max(s):.3f} | {BYTES / m / 1e9:.4f} | {ratio:.4f} | {cp:.2f} "
        f"| {rel} | {relg} | {statistics.mean(tails):.2f} | {med(float(r['host_busy_s']) for r in rs):.1f} "
        f"| {med_col(rs, 'first_mib_s', '{:.3f}')} | {med_col(rs, 'link_util_min', '{:.3f}')} "
        f"| {med_col(rs, 'hop_lag_ms', '{:.0f}')} | {med_col(rs, 'tail_ms', '{:.0f}')} |")
out()
out("CPU s = utime+stime of the process over the push (primary: all its push processes; star: tail = mean "
    "over the N replicas); host CPU busy = all cores, whole machine, from /proc/stat (includes softirq "
    "network work charged to no process, and anything else running). Slowest link busy: of the links that "
    "carry the data (chain: p, r1 … r(N-1); star: p), the lowest rate between 10% and 90% of its bytes, as a "
    "fraction of the shaped rate (TCP's ceiling is 1.0). First MiB: from starting the push to its first MiB "
    "on the primary's link. Lag per hop: how much later each next link starts carrying data (its first MiB). "
    "Last byte to end: from the last data byte on the last relay's link (N=1: the primary's) to the push's exit.")
# Wire accounting: what the shaper charged per payload byte on the primary's link.
wire = [int(r["tx_p"]) / int(r["bytes"]) for r in rows if r["topology"] == "chain" and r["tx_p"]]
if wire:
    out(f"shaper bytes per payload byte on the primary's link (chain runs): {med(wire):.4f} "
        f"(Ethernet frame incl. 14-byte header / TCP payload = {TCP_BOUND:.4f}, plus protocol framing)")
out()
def target(label, value, limit, cmp="<="):
    ok = value <= limit if cmp == "<=" else None
    verdict = "" if ok is None else (" PASS" if ok else " FAIL")
    out(f"- {label}: {value:.4f} (target {cmp} {limit}){verdict}")
out("Targets (medians):")
if ("chain", 4) in summary:
    target("chain N=4 / (size/rate)", summary[("chain", 4)] / LIMIT, 1.05)
if ("chain", 8) in summary:
    target("chain N=8 / (size/rate)", summary[("chain", 8)] / LIMIT, 1.06)
if ("chain", 4) in summary and ("chain", 1) in summary:
    target("chain N=4 / chain N=1", summary[("chain", 4)] / summary[("chain", 1)], 1.02)
if ("star", 4) in summary and ("chain", 1) in summary:
    out(f"- star N=4 / chain N=1: {summary[('star', 4)] / summary[('chain', 1)]:.3f} (expected near 4)")
if ("star", 8) in summary and ("chain", 8) in summary:
    out(f"- star N=8 / chain N=8: {summary[('star', 8)] / summary[('chain', 8)]:.3f}")
for n in NS:
    if ("chain", n) in summary and ("chain-old", n) in summary:
        per = [float(a["seconds"]) / float(b["seconds"]) for a in rows for b in rows
               if a["topology"] == "chain" and b["topology"] == "chain-old" and a["n"] == b["n"] == n
               and a["rep"] == b["rep"]]
        out(f"- chain N={n} this binary / old binary (median seconds): "
            f"{summary[('chain', n)] / summary[('chain-old', n)]:.3f} (per rep {min(per):.3f} .. {max(per):.3f})")
for n in NS:
    if ("chain", n) in summary and ("chain-key", n) in summary:
        per = [float(a["seconds"]) / float(b["seconds"]) for a in rows for b in rows
               if a["topology"] == "chain-key" and b["topology"] == "chain" and a["n"] == b["n"] == n
               and a["rep"] == b["rep"]]
        target(f"chain N={n} with a cluster key / without (median seconds; per rep {min(per):.3f} .. {max(per):.3f})",
               summary[("chain-key", n)] / summary[("chain", n)], 1.02)
out()
out(f"raw rows: {E['BC_CSV']}")
with open(E["BC_MD"], "w") as f:
    f.write("\n".join(lines) + "\n")
print(f"table saved: {E['BC_MD']}")
PY

BC_BIN=$bin BC_SRC=$work/src BC_WORK=$work BC_BYTES=$bytes BC_FILES=$FILES BC_REPS=$REPS \
    BC_NS=$NS BC_TOPOS=$TOPOS BC_RATE=$RATE BC_MTU=$MTU BC_QDISC=$QDISC BC_IPERF=$IPERF \
    BC_PREFIX=$SC_CLUSTER BC_SERVE_PIDS="${serve_pids[*]}" BC_ADDRS="${addrs[*]}" BC_ROOTS="${roots[*]}" \
    BC_OLD_BIN=$old_bin BC_OLD_PIDS="${old_pids[*]}" BC_OLD_ADDRS="${old_addrs[*]}" BC_OLD_ROOTS="${old_roots[*]}" \
    BC_KEY_FILE=$key_file BC_KEY_PIDS="${key_pids[*]}" BC_KEY_ADDRS="${key_addrs[*]}" BC_KEY_ROOTS="${key_roots[*]}" \
    BC_PUSH_ARGS="${push_args[*]}" BC_CHUNK=${CHUNK:-default} BC_POOL=${POOL_MB:-default} \
    BC_IO=${SHARDCAST_IO:-auto}${SHARDCAST_ZEROCOPY:+,zerocopy=$SHARDCAST_ZEROCOPY}${SHARDCAST_PIECE_BYTES:+,piece=$SHARDCAST_PIECE_BYTES} BC_COMMIT="$(git_rev)$dirty" BC_STAMP=$stamp \
    BC_CSV=results/cluster/bench-cluster-$stamp.csv BC_MD=results/cluster/bench-cluster-$stamp.md BC_CMD=$cmdline \
    PYTHONPATH=$PWD/scripts${PYTHONPATH:+:$PYTHONPATH} python3 "$work/bench.py" &
py_pid=$!
bg_started "$py_pid"
# `wait` (unlike a foreground child) lets a TERM reach the trap at once; the trap stops python,
# and `cluster.sh down` ends any push it left running in the primary's namespace.
wait_pid "$py_pid"

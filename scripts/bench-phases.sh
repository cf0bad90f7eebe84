#!/usr/bin/env bash
# Where a single-rail chain's time goes, phase by phase (issue 16): a chain of N replicas on the
# emulated cluster, one file of SIZE bytes, MTU 1500, every link shaped to RATE in both directions
# (scripts/cluster.sh --ingress), TCP congestion control CC (cubic, the kernel's default). During
# each push a thread reads every node's link byte counters (/proc/PID/net/dev of a process in
# each namespace) every SAMPLE_MS ms, and the run is split into:
#   first byte    push start -> the primary's first data byte on its link
#   hop 1         the primary's first byte -> r1's last byte received, / TCP's best line time
#                 (size / (rate x 1448/1514): what one TCP stream can carry at MTU 1500)
#   hop K (K>=2)  how long after r(K-1)'s last byte r(K)'s arrives (backlog drained at the end)
#   end           the tail's last byte -> the push's return (shardcast: process exit)
#   total         start -> return, / (size / rate)
# A hop's last byte: the end of the last 5 ms interval in which its receiver's link took at least
# a tenth of the wire rate (a relay's link also takes the ACKs of what it sends on, ~2% of the
# rate), taken to run at the wire rate within it (benchlib.last_data).
# The same for a chain of `nc | tee` relays in the same reps (primary `nc -N r1 < file`, relays
# `nc -l | tee FILE | nc -N next`, the tail `nc -l > FILE`; its return = the tail's file complete),
# and, with OLD_BIN, for the same chain through replicas running an older binary. Cases are
# interleaved A B C, C B A, … so that drift hits them alike; medians over REPS.
# With RAILS=R (> 1) every node has R rails (cluster.sh --rails R; RAIL_RATES "K=RATE …" slows
# rail K), the replicas serve with `--rail` for each, the primary pushes with `--lanes R` and its
# rails, and the phases are given per rail (rK_…: rail K's first byte, its hop 1 ÷ the line time
# of the bytes it carried, its hops' lags, its tail's last byte from the start and its share of
# the bytes), with the spread between the rails' last tail bytes (how long the faster rails stood
# idle at the end) and the end after the last of them; total ÷ (size / sum of the rail rates).
# nc | tee has no lanes: RAILS > 1 runs without it.
#
# Env: SIZE (1G), N (4), REPS (3), RATE (1gbit), MTU (1500), CC (cubic), SAMPLE_MS (5), RAILS (1),
#      RAIL_RATES (e.g. "1=250mbit"),
#      OLD_BIN (an older release binary: adds the case shardcast-old), NC (1; 0 skips nc | tee),
#      PORT (7071; old binary PORT+1, nc PORT+10), SC_CLUSTER (sc), OUT (results/<date>-phases),
#      PUSH_ARGS (extra push arguments, e.g. "--chunk-size 1MiB"), SERVE_ARGS (extra serve arguments
#      of the replicas running this binary, e.g. "--pool-mb 8"), SERVE_ENV (environment of those
#      replicas only, e.g. "SHARDCAST_RELAY_BACKLOG_BYTES=2097152"; with OLD_BIN set to this same
#      binary, the two cases differ by that setting alone), SYSCTLS (sysctl settings applied in
#      every node's namespace, e.g. "net.ipv4.tcp_notsent_lowat=131072"), KEEP_WORK=1.
# CPU idle %: the whole host's idle share while each push runs (every namespace shares the cores).
# Run it under the shared locks: flock /tmp/sc-netns.lock flock /tmp/sc-bench.lock scripts/bench-phases.sh
# Needs root, iproute2, python3, nc (netcat-openbsd), cmp (scripts/deps.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

SIZE=${SIZE:-1G}
N=${N:-4}
REPS=${REPS:-3}
RATE=${RATE:-1gbit}
MTU=${MTU:-1500}
CC=${CC:-cubic}
SAMPLE_MS=${SAMPLE_MS:-5}
RAILS=${RAILS:-1}
RAIL_RATES=${RAIL_RATES:-}
OLD_BIN=${OLD_BIN:-}
NC=${NC:-1}
PORT=${PORT:-7071}
PUSH_ARGS=${PUSH_ARGS:-}
SERVE_ARGS=${SERVE_ARGS:-}
SERVE_ENV=${SERVE_ENV:-}
SYSCTLS=${SYSCTLS:-}
OUT=${OUT:-results/$(date -u +%Y-%m-%d)-phases}
export SC_CLUSTER=${SC_CLUSTER:-sc}
CLUSTER=scripts/cluster.sh

bytes=$(parse_size "$SIZE")
((bytes > 0)) || die "SIZE must be > 0"
[[ "$N" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, got '$N'"
[[ "$REPS" =~ ^[1-9][0-9]*$ ]] || die "REPS must be a positive integer, got '$REPS'"
[[ "$RATE" =~ ^[0-9]+(bit|kbit|mbit|gbit|tbit)$ ]] || die "RATE must look like 1gbit, got '$RATE'"
[[ "$SAMPLE_MS" =~ ^[1-9][0-9]*$ ]] || die "SAMPLE_MS must be a positive integer"
[[ "$RAILS" =~ ^[1-8]$ ]] || die "RAILS must be 1..8, got '$RAILS'"
rail_rate_args=()
for kv in $RAIL_RATES; do
    [[ "$kv" =~ ^([0-9])=([0-9]+(bit|kbit|mbit|gbit|tbit))$ ]] || die "RAIL_RATES entries look like 1=250mbit, got '$kv'"
    ((BASH_REMATCH[1] < RAILS)) || die "RAIL_RATES names rail ${BASH_REMATCH[1]}, but RAILS=$RAILS"
    rail_rate_args+=(--rail-rate "$kv")
done
if ((RAILS > 1)) && [[ "$NC" == 1 ]]; then
    log "RAILS=$RAILS: no nc | tee case (it has no lanes)"
    NC=0
fi
[[ -z "$OLD_BIN" || -x "$OLD_BIN" ]] || die "OLD_BIN=$OLD_BIN is not an executable"
[[ $(id -u) -eq 0 ]] || die "needs root (network namespaces)"
command -v tc >/dev/null || die "tc not found: run scripts/deps.sh (iproute2)"
if [[ "$NC" == 1 ]]; then command -v nc >/dev/null || die "nc not found: run scripts/deps.sh (netcat-openbsd), or NC=0"; fi

# The source and N copies of one case live on tmpfs at once.
need=$(((N + 1) * bytes + (512 << 20)))
avail=$(avail_bytes /dev/shm)
((avail >= need)) || die "/dev/shm has $(fmt_bytes "$avail") free, this run needs $(fmt_bytes "$need")"
log "building release binary"
cargo build --release --quiet
work=$(mktemp -d /dev/shm/shardcast-bench-phases.XXXXXX)
if [[ "${KEEP_WORK:-0}" == 1 ]]; then log "keeping $work"; else cleanup_register_dir "$work"; fi
cp "$BIN" "$work/shardcast"
old_bin=
if [[ -n "$OLD_BIN" ]]; then cp "$OLD_BIN" "$work/shardcast-old"; old_bin=$work/shardcast-old; fi
trap cluster_bench_exit EXIT
log "generating $(fmt_bytes "$bytes") in one file"
mkdir -p "$work/src"
gen_random_file "$work/src/shard.bin" "$bytes"

log "cluster: primary + $N replicas, $RAILS rail(s) of $RATE ${RAIL_RATES:+($RAIL_RATES) }both directions of every link, MTU $MTU, cc $CC"
"$CLUSTER" up "$N" --rate "$RATE" --mtu "$MTU" --cc "$CC" --ingress --rails "$RAILS" "${rail_rate_args[@]}" >/dev/null
# rails_of NODE: `--rail ADDR` for each of NODE's rails (nothing with one rail).
rails_of() {
    local j
    ((RAILS > 1)) || return 0
    for ((j = 0; j < RAILS; j++)); do printf -- '--rail %s ' "$("$CLUSTER" addr "$1" "$j")"; done
}

for kv in $SYSCTLS; do
    for node in p $(seq -f 'r%g' 1 "$N"); do "$CLUSTER" exec "$node" sysctl -q -w "$kv" >/dev/null; done
done
# A process in every node's namespace: the sampler reads /proc/PID/net/dev of each.
holders=()
for node in p $(seq -f 'r%g' 1 "$N"); do
    "$CLUSTER" exec "$node" sleep 100000 &
    bg_started $!
    holders+=("$node=$!")
done
# start_serves BIN PORT TAG [ARGS…]: one `serve` per replica; sets addrs.
start_serves() {
    local sbin=$1 port=$2 tag=$3 k addr logf pid i envs=()
    shift 3
    # shellcheck disable=SC2206 # SERVE_ENV: words
    [[ -z "$tag" ]] && envs=($SERVE_ENV)
    addrs=()
    for ((k = 1; k <= N; k++)); do
        addr=$("$CLUSTER" addr "r$k" 0)
        logf=$work/serve$tag-r$k.log
        : >"$logf"
        # shellcheck disable=SC2046 # rails_of: words
        "$CLUSTER" exec "r$k" env NO_COLOR=1 "${envs[@]}" "$sbin" serve --listen "$addr:$port" --root "$work/root$tag-r$k" \
            --keep 1 $(rails_of "r$k") "$@" >/dev/null 2>"$logf" &
        pid=$!
        bg_started "$pid"
        for ((i = 0; i < 300; i++)); do
            grep -q "listening on $addr:$port" <(sed 's/\x1b\[[0-9;]*m//g' "$logf") && break
            kill -0 "$pid" 2>/dev/null || { cat "$logf" >&2; die "serve$tag on r$k exited before listening"; }
            sleep 0.1
        done
        ((i < 300)) || die "serve$tag on r$k did not listen within 30 s"
        addrs+=("$addr:$port")
    done
}
# shellcheck disable=SC2086 # SERVE_ARGS: words
start_serves "$work/shardcast" "$PORT" "" $SERVE_ARGS
new_addrs="${addrs[*]}"
old_addrs=
if [[ -n "$old_bin" ]]; then
    start_serves "$old_bin" $((PORT + 1)) -old
    old_addrs="${addrs[*]}"
fi

cmdline="SIZE=$SIZE N=$N REPS=$REPS RATE=$RATE MTU=$MTU CC=$CC"
((RAILS > 1)) && cmdline+=" RAILS=$RAILS"
[[ -n "$RAIL_RATES" ]] && cmdline+=" RAIL_RATES=\"$RAIL_RATES\""
[[ -n "$OLD_BIN" ]] && cmdline+=" OLD_BIN=$OLD_BIN"
[[ "$NC" != 1 ]] && cmdline+=" NC=$NC"
[[ -n "$PUSH_ARGS" ]] && cmdline+=" PUSH_ARGS=\"$PUSH_ARGS\""
[[ -n "$SERVE_ARGS" ]] && cmdline+=" SERVE_ARGS=\"$SERVE_ARGS\""
[[ -n "$SERVE_ENV" ]] && cmdline+=" SERVE_ENV=\"$SERVE_ENV\""
[[ -n "$SYSCTLS" ]] && cmdline+=" SYSCTLS=\"$SYSCTLS\""
cmdline+=" scripts/bench-phases.sh"
mkdir -p "$OUT"
stamp=$(date -u +%Y%m%d-%H%M%S)
dirty=""
git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || dirty="+dirty"

cat >"$work/bench.py" <<'PY'
import csv, gzip, os, shutil, signal, subprocess, sys, time
import benchlib as bl
from benchlib import env, log

WORK, BYTES, N, REPS = env("BP_WORK"), env("BP_BYTES", int), env("BP_N", int), env("BP_REPS", int)
RATE, MTU, CC, PREFIX = env("BP_RATE"), env("BP_MTU", int), env("BP_CC"), env("BP_PREFIX")
PERIOD = env("BP_PERIOD", int) / 1000
HOLDERS = dict(h.split("=") for h in env("BP_HOLDERS").split())
HOLDERS = {k: int(v) for k, v in HOLDERS.items()}
ADDRS, OLD_ADDRS = env("BP_ADDRS").split(), env("BP_OLD_ADDRS").split()
BIN, OLD_BIN, PUSH_ARGS = env("BP_BIN"), env("BP_OLD_BIN"), env("BP_PUSH_ARGS").split()
RAILS = env("BP_RAILS", int)
if RAILS > 1:
    PUSH_ARGS = ["--lanes", str(RAILS), *env("BP_P_RAILS").split(), *PUSH_ARGS]
DEVS = [f"scv{k}" for k in range(RAILS)]
NC_PORT = env("BP_NC_PORT", int)
UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
def bps(rate):
    num = rate.rstrip("abcdefghijklmnopqrstuvwxyz")
    return int(num) * UNITS[rate[len(num):]]
RATE_BPS = bps(RATE)
RATES = [RATE_BPS] * RAILS
for kv in env("BP_RAIL_RATES").split():
    k, r = kv.split("=")
    RATES[int(k)] = bps(r)
LIMIT = BYTES * 8 / sum(RATES)
SRC = os.path.join(WORK, "src")
NODES = ["p"] + [f"r{k}" for k in range(1, N + 1)]
CASES = ["shardcast"] + (["shardcast-old"] if OLD_BIN else []) + (["nc"] if env("BP_NC") == "1" else [])
version = 0

def in_ns(node, *cmd):
    return ["ip", "netns", "exec", f"{PREFIX}-{node}", *cmd]

def host(addr):
    return addr.rsplit(":", 1)[0]

def push(binary, addrs, name, timeout):
    global version
    version += 1
    cmd = in_ns("p", binary, "push", SRC, "--name", name, "--version", str(version), "--json", *PUSH_ARGS,
                "--to", ",".join(addrs))
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    t1 = time.monotonic()
    if r.returncode != 0 or '"ok": true' not in r.stdout.replace('"ok":true', '"ok": true'):
        sys.exit(f"error: {' '.join(cmd)} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return t0, t1, version

def retrans():
    """TCP segments retransmitted so far in each node's namespace (its /proc/net/snmp)."""
    out = {}
    for node, pid in HOLDERS.items():
        lines = [l.split() for l in open(f"/proc/{pid}/net/snmp") if l.startswith("Tcp:")]
        out[node] = int(lines[1][lines[0].index("RetransSegs")])
    return out

def cpu_ticks():
    """(busy, idle) jiffies of the whole host (every namespace shares its CPUs)."""
    v = [int(x) for x in open("/proc/stat").readline().split()[1:8]]
    return sum(v) - v[3] - v[4], v[3] + v[4]

def shardcast_case(case):
    binary, addrs = (OLD_BIN, OLD_ADDRS) if case == "shardcast-old" else (BIN, ADDRS)
    tag = "-old" if case == "shardcast-old" else ""
    with bl.LinkSampler(HOLDERS, period=PERIOD, devs=DEVS) as s:
        time.sleep(0.05)
        c0 = cpu_ticks()
        t0, t1, v = push(binary, addrs, "phases", 3 * LIMIT + 120)
        c1 = cpu_ticks()
        time.sleep(0.05)
    roots = [os.path.join(WORK, f"root{tag}-r{k}") for k in range(1, N + 1)]
    bl.check_copies(SRC, roots, "phases", v)
    for r in roots:
        shutil.rmtree(os.path.join(r, "phases"))
    return s.samples, t0, t1, (c1[0] - c0[0], c1[1] - c0[1])

def listening(node, port):
    """Whether something in NODE's namespace listens on PORT (its /proc/net/tcp; no probe)."""
    want = f":{port:04X}"
    with open(f"/proc/{HOLDERS[node]}/net/tcp") as f:
        return any(l.split()[1].endswith(want) and l.split()[3] == "0A" for l in list(f)[1:])

def nc_case():
    out = [os.path.join(WORK, f"nc-r{k}.bin") for k in range(1, N + 1)]
    addrs = [host(a) for a in ADDRS]
    procs = []
    try:
        for k in range(N, 0, -1):  # the tail first: each relay connects onward at once
            if k == N:
                cmd = in_ns(f"r{k}", "sh", "-c", f'exec nc -N -l {addrs[k - 1]} {NC_PORT} </dev/null >"$0"', out[k - 1])
            else:
                cmd = in_ns(f"r{k}", "sh", "-c",
                            f'nc -N -l {addrs[k - 1]} {NC_PORT} </dev/null | tee "$0" | nc -N {addrs[k]} {NC_PORT}',
                            out[k - 1])
            procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True))
            for _ in range(400):
                if listening(f"r{k}", NC_PORT):
                    break
                time.sleep(0.01)
            else:
                sys.exit(f"error: nc on r{k} does not listen")
        with bl.LinkSampler(HOLDERS, period=PERIOD, watch=out[-1]) as s:
            time.sleep(0.05)
            t0, c0 = time.monotonic(), cpu_ticks()
            r = subprocess.run(in_ns("p", "sh", "-c", f'exec nc -N {addrs[0]} {NC_PORT} <"$0"',
                                     os.path.join(SRC, "shard.bin")), timeout=3 * LIMIT + 120)
            if r.returncode != 0:
                sys.exit(f"error: the primary's nc exited {r.returncode}")
            deadline = time.monotonic() + 60
            while s.first_size(BYTES) is None and time.monotonic() < deadline:
                time.sleep(0.01)
            c1 = cpu_ticks()
            time.sleep(0.05)
        t1 = s.first_size(BYTES)
        if t1 is None:
            sys.exit(f"error: the nc tail's file did not reach {BYTES} bytes")
        for o in out:
            r = subprocess.run(["cmp", os.path.join(SRC, "shard.bin"), o], capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"error: nc relay copy {o} differs: {r.stdout} {r.stderr}")
        return s.samples, t0, t1, (c1[0] - c0[0], c1[1] - c0[1])
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            p.wait()
        for o in out:
            if os.path.exists(o):
                os.unlink(o)

log(f"{BYTES} bytes, one file, chain of {N}, {RATE} both directions, MTU {MTU}, cc {CC}; "
    f"size/rate {LIMIT:.3f} s; cases {CASES}; {REPS} reps")
# Warm-up (not recorded): the servers set up their buffer pools.
push(BIN, ADDRS, "warmup", 600)
if OLD_BIN:
    push(OLD_BIN, OLD_ADDRS, "warmup", 600)
for tag in ["", "-old"] if OLD_BIN else [""]:
    for k in range(1, N + 1):
        shutil.rmtree(os.path.join(WORK, f"root{tag}-r{k}", "warmup"), ignore_errors=True)

rows = []
SAMPLES = env("BP_CSV")[:-4] + "-samples"  # every run's link counters: t (ms from start), rx/tx per node
os.makedirs(SAMPLES, exist_ok=True)
for rep in range(1, REPS + 1):
    for case in bl.alternate(rep, CASES):
        rt0 = retrans()
        samples, t0, t1, (busy, idle) = nc_case() if case == "nc" else shardcast_case(case)
        rt1 = retrans()
        with gzip.open(os.path.join(SAMPLES, f"{case}-{rep}.csv.gz"), "wt") as f:
            links = [n if k == 0 else f"{n}/{k}" for k in range(RAILS) for n in NODES]
            f.write("t_ms," + ",".join(f"{n}_rx,{n}_tx" for n in links) + "\n")
            for t, c, _ in samples:
                f.write(f"{(t - t0) * 1e3:.2f}," + ",".join(f"{c[n][0]},{c[n][1]}" for n in links) + "\n")
        ph = bl.rails_phases(samples, NODES, t0, t1, BYTES, RATES, MTU)
        rows.append({"rep": rep, "case": case, "seconds": round(t1 - t0, 4), "samples": len(samples),
                     **{k: round(v, 4) for k, v in ph.items()}, "idle_pct": round(100 * idle / max(1, busy + idle), 1),
                     "retrans": " ".join(f"{n}:{rt1[n] - rt0[n]}" for n in NODES)})
        per_rail = []
        for k in range(RAILS):
            pre = f"r{k}_" if RAILS > 1 else ""
            per_rail.append((f"rail {k}: " if RAILS > 1 else "") + f"first byte {ph[pre + 'first_byte_ms']:.0f} ms, "
                            f"hop 1 {ph[pre + 'hop1_x_line']:.4f} x line, "
                            + ", ".join(f"hop {j} +{ph[f'{pre}hop{j}_ms']:.0f} ms" for j in range(2, N + 1))
                            + (f", tail done {ph[pre + 'tail_ms']:.0f} ms, {ph[pre + 'share']:.3f} of the bytes" if RAILS > 1 else ""))
        log(f"rep {rep} {case:<13} {t1 - t0:7.3f} s = {ph['total_x']:.4f} x size/rate; " + "; ".join(per_rail)
            + (f"; rails' tails {ph['spread_ms']:.0f} ms apart" if RAILS > 1 else "")
            + f"; end {ph['end_ms']:.0f} ms; CPU idle {rows[-1]['idle_pct']:.0f}%; retransmitted segments {rows[-1]['retrans']}")

hops = ["first_byte_ms", "hop1_x_line"] + [f"hop{k}_ms" for k in range(2, N + 1)]
if RAILS == 1:
    keys = ["seconds", "total_x", *hops, "end_ms", "idle_pct"]
else:
    keys = ["seconds", "total_x", "idle_pct", "spread_ms", "end_ms"] + [f"r{k}_{h}" for k in range(RAILS) for h in [*hops, "tail_ms", "share"]]
with open(env("BP_CSV"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["rep", "case", *keys, "samples", "retrans"])
    w.writeheader()
    w.writerows(rows)
names = {"seconds": "median s", "total_x": "total ÷ (size/rate)", "first_byte_ms": "first byte ms",
         "hop1_x_line": "hop 1 ÷ TCP line time", "end_ms": "tail's last byte → return, ms",
         "idle_pct": "CPU idle %",
         "spread_ms": "rails' last tail bytes apart, ms", "tail_ms": "tail done, ms", "share": "share of bytes",
         **{f"hop{k}_ms": f"hop {k} after hop {k - 1}, ms" for k in range(2, N + 1)}}
def title(k):
    for j in range(RAILS):
        if RAILS > 1 and k.startswith(f"r{j}_"):
            return f"rail {j}: " + names[k[len(f"r{j}_"):]]
    return names[k]
head = ["case"] + [title(k) for k in keys]
table = []
for case in CASES:
    rs = [r for r in rows if r["case"] == case]
    m = {k: bl.median(r[k] for r in rs) for k in keys}
    fmt = lambda k: f"{m[k]:.4f}" if k.endswith(("total_x", "hop1_x_line")) else (f"{m[k]:.3f}" if k.endswith(("seconds", "share")) else f"{m[k]:.0f}")
    table.append([case] + [fmt(k) for k in keys])
md = (bl.md_header("shardcast chain phases", env("BP_CMD"))
      + f"commit {env('BP_COMMIT')}, kernel {os.uname().release}; {BYTES} bytes in one file, chain N={N}, "
      f"{RAILS} rail(s) of {RATE} {env('BP_RAIL_RATES')} both directions of every link (htb), MTU {MTU}, cc {CC}, samples every {PERIOD * 1000:.0f} ms; "
      f"medians of {REPS}\n\n" + bl.md_table(head, table) + "\n")
open(env("BP_MD"), "w").write(md)
print(md)
print(f"raw rows: {env('BP_CSV')}")
PY
BP_WORK=$work BP_BYTES=$bytes BP_N=$N BP_REPS=$REPS BP_RATE=$RATE BP_MTU=$MTU BP_CC=$CC \
    BP_RAILS=$RAILS BP_RAIL_RATES="$RAIL_RATES" BP_P_RAILS="$(rails_of p)" \
    BP_PERIOD=$SAMPLE_MS BP_HOLDERS="${holders[*]}" BP_ADDRS="$new_addrs" BP_OLD_ADDRS="$old_addrs" \
    BP_BIN=$work/shardcast BP_OLD_BIN=$old_bin BP_NC=$NC BP_NC_PORT=$((PORT + 10)) \
    BP_PUSH_ARGS="$PUSH_ARGS" BP_PREFIX=$SC_CLUSTER BP_CMD="$cmdline" BP_COMMIT="$(git_rev)$dirty" \
    BP_CSV="$OUT/phases-$stamp.csv" BP_MD="$OUT/phases-$stamp.md" \
    PYTHONPATH=$PWD/scripts${PYTHONPATH:+:$PYTHONPATH} python3 "$work/bench.py"

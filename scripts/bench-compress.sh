#!/usr/bin/env bash
# Compression and XOR deltas on real checkpoints (issue 17), each part measured side by side:
#   bound    scripts/compress-bound.py on the checkpoints: zstd -3, byte-grouped + zstd -3 and the
#            XOR deltas of consecutive checkpoints, per 4 MiB chunk and whole file (the offline
#            bounds the other parts are held against);
#   ratio    (emulated cluster) one push of a bf16 and of an fp32 checkpoint per --compress mode
#            the binary lists (off, auto, zstd, zstd-grouped, …): the bytes on the primary's link
#            (tc) against off's, next to the offline ratios of the same file;
#   cluster  (emulated cluster, N=4 replicas, RATE=1gbit) REPS rounds of `--compress off` and
#            `--compress auto`, alternating: medians; targets auto <= 1.05 x compressed bytes /
#            rate, and off / auto within 5 % of the compression ratio;
#   hop      (loopback, one replica) HOP_REPS rounds of off and auto alternating, the fine-tuning
#            checkpoints as source; target auto <= 1.03 x off;
#   delta    (emulated cluster) the fine-tuning series pushed in order, each after the first with
#            `--delta` (and `--delta-base` the previous step): bytes on the primary's link against
#            the offline XOR bound (target <= 1.1 x), time against moved bytes / rate.
# Parts the binary cannot run (no --compress, no --delta in `shardcast push --help`) print a SKIP
# line with the reason; without --compress the cluster and hop parts still measure the plain push
# (the baseline) so that their numbers and the script itself are exercised.
#
# Checkpoints: CKPT_DIR (default results/tmp/ckpt-$CKPT_SIZE, kept for later runs: medium is 3.9 GB)
# as scripts/gen-checkpoints.py writes them; made when missing (CKPT_SIZE small|medium, default
# medium; STEPS 4; ~10 min on 2 busy cores), PyTorch installed
# into SHARDCAST_TORCH_VENV (~/.cache/shardcast-torchvenv) as scripts/test.sh does, plus numpy, safetensors and zstandard.
# Locks: once the checkpoints and the binary exist, the run holds /tmp/sc-bench.lock, and
# /tmp/sc-netns.lock when PARTS has a cluster part (taken here, netns first: do not wrap the
# script in flock on those files; SC_LOCKS_HELD=1 when the caller holds them).
#
# Env: PARTS ("bound ratio cluster hop delta"), CKPT_SIZE, CKPT_DIR, STEPS, N (4), REPS (3),
#      HOP_REPS (5), RATE (1gbit), BOUND_JSON (reuse an earlier run's bound-*.json of the same
#      checkpoints instead of computing it again, ~6 min), PORT (7071), SC_CLUSTER (sc), KEEP_WORK=1, NO_BUILD=1 (no
#      cargo build: BIN, default target/release/shardcast, is measured as it is).
# Output: tables on stdout, saved under OUT (results/<UTC date>-compress/): bound-<stamp>.{md,json}
#      (compress-bound.py), bench-compress-<stamp>.md (the other parts), raw-<stamp>-*.json (every
#      push: seconds, link and metric counters, its JSON report).
# Needs root and iproute2 for the cluster parts, python3, cmp (scripts/deps.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

PARTS=${PARTS:-bound ratio cluster hop delta}
CKPT_SIZE=${CKPT_SIZE:-medium}
ckpt_cmd=${CKPT_DIR:+CKPT_DIR=$CKPT_DIR }
CKPT_DIR=${CKPT_DIR:-results/tmp/ckpt-$CKPT_SIZE}
STEPS=${STEPS:-4}
N=${N:-4}
REPS=${REPS:-3}
HOP_REPS=${HOP_REPS:-5}
for p in $PARTS; do
    [[ " bound ratio cluster hop delta " == *" $p "* ]] || die "PARTS may hold bound ratio cluster hop delta, got '$p'"
done
[[ "$CKPT_SIZE" == small || "$CKPT_SIZE" == medium ]] || die "CKPT_SIZE must be small or medium"
[[ "$HOP_REPS" =~ ^[1-9][0-9]*$ ]] || die "HOP_REPS must be a positive integer"
has_part() { [[ " $PARTS " == *" $1 "* ]]; }
cluster_parts=false
for p in ratio cluster delta; do has_part "$p" && cluster_parts=true; done

# lock FD FILE: flock FILE on FD, saying so when another benchmark holds it.
lock() {
    [[ "${SC_LOCKS_HELD:-0}" == 1 ]] && return 0
    eval "exec $1>>$2"
    flock -n "$1" || { log "waiting for $2 (another benchmark holds it)"; flock "$1"; }
}

# Python with torch (only to make checkpoints), numpy, safetensors and zstandard.
venv=${SHARDCAST_TORCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/shardcast-torchvenv}
[[ -x $venv/bin/python ]] || python3 -m venv "$venv"
if [[ ! -f "$CKPT_DIR/meta.json" ]] && ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    log "installing PyTorch into $venv (CPU use; ~5 GB)"
    "$venv/bin/pip" install -q torch numpy || die "PyTorch could not be installed from the package index"
fi
"$venv/bin/python" -c "import numpy, safetensors, zstandard" 2>/dev/null \
    || "$venv/bin/pip" install -q numpy safetensors zstandard || die "pip install numpy safetensors zstandard failed"
if [[ ! -f "$CKPT_DIR/meta.json" ]]; then
    log "making $CKPT_SIZE checkpoints in $CKPT_DIR (scripts/gen-checkpoints.py)"
    rm -rf "$CKPT_DIR"
    "$venv/bin/python" scripts/gen-checkpoints.py "$CKPT_DIR" --size "$CKPT_SIZE" --steps "$STEPS" >&2
fi
CKPT_DIR=$(cd "$CKPT_DIR" && pwd)
if [[ "$PARTS" != bound && "${NO_BUILD:-0}" != 1 ]]; then
    log "building release binary"
    cargo build --release --quiet
fi
[[ "$PARTS" == bound || -x "$BIN" ]] || die "$BIN missing (NO_BUILD=1 expects BIN=path to a release binary)"

# The measurements (bound included) under both locks, taken in the order the other benchmarks
# are run with (netns, then bench): never one held while waiting for the other the other way.
$cluster_parts && lock 7 /tmp/sc-netns.lock
lock 6 /tmp/sc-bench.lock

out=${OUT:-results/$(date -u +%Y-%m-%d)-compress}
stamp=$(date -u +%Y%m%d-%H%M%S)
summary=$out/bench-compress-$stamp.md
mkdir -p "$out"
cmdline="${ckpt_cmd}PARTS=\"$PARTS\" CKPT_SIZE=$CKPT_SIZE N=$N REPS=$REPS HOP_REPS=$HOP_REPS RATE=${RATE:-1gbit} ./scripts/bench-compress.sh"
export PYTHONPATH=$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}
if [[ -n "${BOUND_JSON:-}" ]]; then  # an earlier run's bounds of the same checkpoints
    [[ -f "$BOUND_JSON" ]] || die "BOUND_JSON=$BOUND_JSON does not exist"
    has_part bound && die "PARTS has bound: drop BOUND_JSON to compute the bounds again"
    bound=$BOUND_JSON
    cmdline="BOUND_JSON=$BOUND_JSON $cmdline"
    log "offline bounds from $BOUND_JSON"
else
    bound=$out/bound-$stamp.json
    log "offline bounds (scripts/compress-bound.py $CKPT_DIR)"
    "$venv/bin/python" scripts/compress-bound.py "$CKPT_DIR" --json "$bound" --md "$out/bound-$stamp.md" >/dev/null
    has_part bound && cat "$out/bound-$stamp.md"
fi

if [[ "$PARTS" == bound ]]; then
    log "saved $out"
    exit 0
fi
work=$(mktemp -d /dev/shm/shardcast-bench-compress.XXXXXX)
if [[ "${KEEP_WORK:-0}" == 1 ]]; then log "keeping $work"; else cleanup_register_dir "$work"; fi
cp "$BIN" "$work/shardcast"
bin=$work/shardcast
export BC_BIN=$bin BC_CKPT=$CKPT_DIR BC_BOUND=$bound BC_OUT=$out BC_STAMP=$stamp BC_WORK=$work \
    BC_PARTS=$PARTS BC_REPS=$REPS BC_HOP_REPS=$HOP_REPS BC_CMD=$cmdline

# The measurements (`bench.py hop`, `bench.py cluster`): pushes, counters, checks, tables.
cat >"$work/bench.py" <<'PY'
import json, os, re, resource, shutil, sys
import benchlib as bl

BIN, CKPT, WORK = bl.env("BC_BIN"), bl.env("BC_CKPT"), bl.env("BC_WORK")
PARTS, REPS, HOP_REPS = bl.env("BC_PARTS").split(), bl.env("BC_REPS", int), bl.env("BC_HOP_REPS", int)
BOUND = json.load(open(bl.env("BC_BOUND")))
RAW = os.path.join(bl.env("BC_OUT"), f"raw-{bl.env('BC_STAMP')}-{sys.argv[1]}.json")
OPTS = bl.push_options(BIN)
TCP_BOUND = 1514 / 1448  # Ethernet frame bytes per TCP payload byte at MTU 1500 (cluster.sh)
NCPU = os.cpu_count() or 1
help_c = OPTS.get("--compress", "")
# clap lists the values as "[possible values: a, b]", or as "Possible values: - a: … - b: …".
m = re.search(r"\[possible values: ([^\]]+)\]", help_c, re.I)
MODES = ([v.strip() for v in m.group(1).split(",")] if m else re.findall(r"(?:^|\s)- ([\w-]+):", help_c)
         or [v for v in ("off", "auto", "zstd", "zstd-grouped") if "--compress" in OPTS and v in re.split(r"[\s,;:.]+", help_c)])
OFF = "off" if "off" in MODES else None          # None: a plain push (a binary without --compress)
AUTO = "auto" if "auto" in MODES else None
rows = []


def skip(part, why):
    print(f"SKIP {part}: {why}", flush=True)


def mode_args(mode):
    return [] if mode is None else ["--compress", mode]


def label(mode):
    return mode or "plain"


def steps(setting, dtype):
    d = os.path.join(CKPT, setting, dtype)
    return [os.path.join(d, s) for s in sorted(os.listdir(d))]


def offline(src):
    """The offline bound's sums over the files below ``src``."""
    rel = os.path.relpath(src, CKPT)
    fs = [f for f in BOUND["files"] if f["file"].startswith(rel + os.sep)]
    return {k: sum(f[k] for f in fs) for k in ("bytes", "zstd_chunked", "grouped_chunked",
                                                "grouped_rot_chunked", "zstd_whole")}


def pair_bound(old, new):
    """The offline XOR bound of the files of step directory ``new`` against ``old``."""
    ro, rn = os.path.relpath(old, CKPT), os.path.relpath(new, CKPT)
    ps = [p for p in BOUND["pairs"] if p["old"].startswith(ro + os.sep) and p["new"].startswith(rn + os.sep)]
    return {k: sum(p[k] for p in ps) for k in ps[0] if k == "bytes" or k.startswith("xor")} if ps else {}


def save():
    with open(RAW, "w") as f:
        json.dump({"command": bl.env("BC_CMD"), "modes": MODES, "push_help": OPTS, "rows": rows}, f, indent=1)


def ratio_s(a, b):
    return f"{a / b:.3f}" if b else "–"


def hop():
    src = os.path.join(WORK, "hop-src")  # the fine-tuning checkpoints, flat: ft-bf16-step-000045-model.safetensors …
    os.makedirs(src)
    for d, _, fs in os.walk(os.path.join(CKPT, "finetune")):
        for f in fs:
            rel = os.path.relpath(os.path.join(d, f), os.path.join(CKPT, "finetune"))
            shutil.copyfile(os.path.join(d, f), os.path.join(src, "ft-" + rel.replace(os.sep, "-")))
    size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
    if AUTO is None:
        skip("hop auto vs off", "this binary's `push --help` has no --compress auto; measuring the plain push only")
    cases = [OFF, AUTO] if AUTO else [OFF]
    secs = {label(c): {} for c in cases}
    with bl.Replicas(BIN) as reps:
        root = os.path.join(WORK, "hop-root")
        _, addr = reps.start(root, ["--keep", "2"])
        bl.push(BIN, src, "warmup", 1, [addr])  # not recorded: the server sets up its buffer pool
        shutil.rmtree(os.path.join(root, "warmup"))
        v = 0
        for rep in range(HOP_REPS):
            for c in bl.alternate(rep, cases):
                v += 1
                j, wall = bl.push(BIN, src, "hop", v, [addr], *mode_args(c))
                if rep == 0:
                    bl.check_copies(src, [root], "hop", v)
                secs[label(c)][rep] = j["seconds"]
                rows.append({"part": "hop", "rep": rep, "mode": label(c), "bytes": size,
                             "seconds": j["seconds"], "wall": wall, "report": j})
                bl.log(f"hop rep {rep} {label(c)}: {j['seconds']:.3f} s ({size / j['seconds'] / 1e9:.3f} GB/s)")
                shutil.rmtree(os.path.join(root, "hop", str(v)))
    shutil.rmtree(src)
    save()
    print()
    print(bl.md_header("bench-compress: loopback hop", bl.env("BC_CMD")))
    print(f"source: {CKPT}/finetune ({size / 2**20:.1f} MiB, bf16 and fp32 steps), one replica on 127.0.0.1, "
          f"{HOP_REPS} rounds alternating; seconds: the push's own\n")
    t = [[label(c), f"{bl.median(secs[label(c)].values()):.3f}",
          f"{size / bl.median(secs[label(c)].values()) / 1e9:.3f}"] for c in cases]
    if AUTO:
        m, lo, hi = bl.ratio(secs["auto"], secs[label(OFF)])
        t.append(["auto / off", f"{m:.3f} (per round {lo:.3f} .. {hi:.3f})",
                  f"target <= 1.03: {'PASS' if m <= 1.03 else 'FAIL'}"])
    print(bl.md_table(["push", "median s", "GB/s"], t))


class Cluster:
    """The replicas on scripts/cluster.sh, and one push with every counter read around it."""

    def __init__(self, reps):
        self.reps = reps
        self.addrs, self.roots, self.maddrs = bl.start_cluster_replicas(
            reps, bl.env("BC_N", int), bl.env("BC_PORT", int), WORK, ["--keep", "2"])
        self.nodes = ["p"] + [f"r{k + 1}" for k in range(len(self.addrs))]
        rate = bl.env("BC_RATE")
        num = rate.rstrip("abcdefghijklmnopqrstuvwxyz")
        self.bps = int(num) * {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}[rate[len(num):]]
        self.version = {}

    def counters(self):
        return ([bl.link_bytes(n) for n in self.nodes],
                [bl.metric_sums(m, ["wire", "compress", "delta", "received_bytes"], wrap=["scripts/cluster.sh", "exec", f"r{k + 1}"])
                 for k, m in enumerate(self.maddrs)])

    def drop(self, name, v):
        """Removes version v of name from every replica (tmpfs holds 4 x 0.5 GB per version)."""
        for root in self.roots:
            shutil.rmtree(os.path.join(root, name, str(v)), ignore_errors=True)
            if os.path.exists(os.path.join(root, name, f"{v}.manifest")):
                os.remove(os.path.join(root, name, f"{v}.manifest"))

    def push(self, part, name, src, mode, *extra, rep=0, keep=False):
        """One push as version v+1 of name, checked on every replica, then dropped unless keep
        (a delta's base stays)."""
        v = self.version[name] = self.version.get(name, 0) + 1
        c0 = self.counters()
        # CPU around the push: the host's busy share (1.0: every core was busy all along, the
        # push's or anyone's), the replicas' own seconds and the primary's (a waited-for child).
        # (primary + replicas) / cores is the least wall time this machine can give the push,
        # whatever else runs.
        h0, s0 = bl.host_cpu()[0], sum(bl.proc_cpu(p.pid) for p in self.reps.procs)
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        j, wall = bl.push(BIN, src, name, v, self.addrs, *mode_args(mode), *extra, wrap=["scripts/cluster.sh", "exec", "p"])
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        h1, s1 = bl.host_cpu()[0], sum(bl.proc_cpu(p.pid) for p in self.reps.procs)
        primary = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
        c1 = self.counters()
        bl.check_copies(src, self.roots, name, v)
        if not keep:
            self.drop(name, v)
        links = [b - a for a, b in zip(c0[0], c1[0])]
        metrics = [{k: m1[k] - m0.get(k, 0) for k in m1} for m0, m1 in zip(c0[1], c1[1])]
        row = {"part": part, "rep": rep, "name": name, "version": v, "src": os.path.relpath(src, CKPT),
               "mode": label(mode), "extra": list(extra), "bytes": j["bytes"], "seconds": j["seconds"],
               "wall": wall, "link_p": links[0], "links": links, "metrics": metrics, "report": j,
               "busy": (h1 - h0) / (wall * NCPU), "replicas_cpu": s1 - s0, "primary_cpu": primary}
        rows.append(row)
        bl.log(f"{part} {row['src']} {label(mode)} {' '.join(extra)}: {j['seconds']:.3f} s, primary's link "
               f"{links[0] / 2**20:.1f} MiB for {j['bytes'] / 2**20:.1f} MiB, host busy {row['busy']:.2f}, "
               f"CPU s primary {primary:.2f} replicas {row['replicas_cpu']:.2f}")
        return row


def part_ratio(cl, srcs):
    modes = MODES or [None]
    if not MODES:
        skip("ratio per --compress mode", "this binary's `push --help` has no --compress; plain push only")
    res = {d: {label(m): cl.push("ratio", f"ratio-{d}-{label(m)}", s, m) for m in modes} for d, s in srcs.items()}
    print()
    print(bl.md_header("bench-compress: compression ratio on the wire (cluster, one push per mode)", bl.env("BC_CMD")))
    print("ratio on the wire = bytes on the primary's link with off (or a plain push) / with the mode; offline: "
          "scripts/compress-bound.py on the same file, per 4 MiB chunk (file bytes / compressed bytes); link "
          "bytes are Ethernet frames (x 1.046 over TCP payload at MTU 1500) plus framing\n")
    t = []
    for d, s in srcs.items():
        o = offline(s)
        base = res[d][label(OFF)]["link_p"]
        for m in modes:
            r = res[d][label(m)]
            t.append([d, label(m), f"{r['link_p'] / 2**20:.1f}", ratio_s(base, r["link_p"]),
                      ratio_s(o["bytes"] * TCP_BOUND, r["link_p"]), ratio_s(o["bytes"], o["zstd_chunked"]),
                      ratio_s(o["bytes"], o["grouped_chunked"]), ratio_s(o["bytes"], o["grouped_rot_chunked"]),
                      ratio_s(o["bytes"], o["zstd_whole"])])
    print(bl.md_table(["dtype", "mode", "link MiB", "ratio on wire vs off", "file bytes x 1.046 / link",
                       "offline zstd", "offline grouped", "offline rot", "zstd -3 whole file"], t))


def part_cluster(cl, srcs):
    if AUTO is None:
        skip("cluster auto vs off", "this binary's `push --help` has no --compress auto; measuring the plain push only")
    cases = [OFF, AUTO] if AUTO else [OFF]
    got = {}
    for rep in range(REPS):
        for d, s in srcs.items():
            for c in bl.alternate(rep, cases):
                got.setdefault((d, label(c)), {})[rep] = cl.push("cluster", f"cl-{d}", s, c, rep=rep)
    print()
    print(bl.md_header(f"bench-compress: shaped cluster, {len(cl.addrs)} replicas, {bl.env('BC_RATE')}", bl.env("BC_CMD")))
    print(f"{REPS} rounds, cases alternating; seconds: the push's own; compressed bytes: the primary's link bytes "
          f"/ 1.046 (TCP payload at MTU 1500); x rate = seconds / (compressed bytes x 8 / rate)\n")
    t, verdicts = [], []
    for d in srcs:
        for c in cases:
            rs = got[(d, label(c))]
            s = bl.median(r["seconds"] for r in rs.values())
            lb = bl.median(r["link_p"] for r in rs.values())
            busy = bl.median(r["busy"] for r in rs.values())
            rcpu = bl.median(r["replicas_cpu"] for r in rs.values())
            pcpu = bl.median(r["primary_cpu"] for r in rs.values())
            t.append([d, label(c), f"{s:.3f}", f"{lb / 2**20:.1f}", f"{s / (lb / TCP_BOUND * 8 / cl.bps):.3f}",
                      f"{busy:.2f}", f"{pcpu:.2f}", f"{rcpu:.2f}", f"{(pcpu + rcpu) / NCPU:.3f}"])
        if AUTO:
            off, auto = got[(d, label(OFF))], got[(d, "auto")]
            so = bl.median(r["seconds"] for r in off.values())
            sa = bl.median(r["seconds"] for r in auto.values())
            cr = bl.median(r["link_p"] for r in off.values()) / bl.median(r["link_p"] for r in auto.values())
            xr = sa / (bl.median(r["link_p"] for r in auto.values()) / TCP_BOUND * 8 / cl.bps)
            verdicts.append(f"- {d}: auto {xr:.3f} x compressed bytes / rate (target <= 1.05: "
                            f"{'PASS' if xr <= 1.05 else 'FAIL'}); off / auto {so / sa:.3f} vs compression ratio "
                            f"on the wire {cr:.3f}: {so / sa / cr:.3f} (target >= 0.95: {'PASS' if so / sa / cr >= 0.95 else 'FAIL'})")
    print(bl.md_table(["dtype", "mode", "median s", "link MiB", "x rate", "host busy", "primary CPU s",
                       "replicas CPU s", f"CPU s / {NCPU} cores"], t))
    print("\n".join([""] + verdicts))


def part_delta(cl):
    if "--delta" not in OPTS:
        skip("delta", "this binary's `push --help` has no --delta")
        return
    base_flag = "--delta-base" in OPTS
    print()
    print(bl.md_header("bench-compress: XOR deltas of consecutive fine-tuning checkpoints (cluster)", bl.env("BC_CMD")))
    print("each series pushed in order, the first step in full, each next one with --delta"
          + (" --delta-base PREVIOUS_STEP" if base_flag else "") + (f" --compress {AUTO}" if AUTO else "")
          + "; moved = bytes on the primary's link / 1.046; bound = the offline XOR deltas of the same pair, "
          "per 4 MiB chunk, the smaller of zstd -3 and byte-grouped + zstd -3 (unchanged chunks 0); best offline: "
          "the smallest of compress-bound's variants (sign rotation, zstd -1 included)\n")
    t, worst = [], 0.0
    for d in ("bf16", "fp32"):
        ss = steps("finetune", d)
        cl.push("delta", f"delta-{d}", ss[0], AUTO, keep=True)
        for old, new in zip(ss, ss[1:]):
            extra = ["--delta"] + (["--delta-base", old] if base_flag else [])
            r = cl.push("delta", f"delta-{d}", new, AUTO, *extra, keep=True)
            cl.drop(f"delta-{d}", r["version"] - 1)  # the base of the next push is this one
            b = pair_bound(old, new)
            if not b:
                sys.exit(f"error: the offline bound has no pair {old} -> {new}")
            moved = r["link_p"] / TCP_BOUND
            bound = min(b["xor"], b["xor_grouped"])
            worst = max(worst, moved / bound if bound else float("inf"))
            t.append([d, f"{os.path.basename(old)} -> {os.path.basename(new)}", f"{b['bytes'] / 2**20:.1f}",
                      f"{moved / 2**20:.2f}", f"{bound / 2**20:.2f}", ratio_s(moved, bound),
                      f"{min(v for k, v in b.items() if k.startswith('xor')) / 2**20:.2f}", f"{r['seconds']:.3f}",
                      f"{r['seconds'] / (moved * 8 / cl.bps):.3f}", f"{r['busy']:.2f}", f"{r['primary_cpu']:.2f}",
                      f"{r['replicas_cpu']:.2f}", f"{(r['primary_cpu'] + r['replicas_cpu']) / NCPU:.3f}"])
    print(bl.md_table(["dtype", "steps", "file MiB", "moved MiB", "bound MiB", "moved / bound",
                       "best offline MiB", "seconds", "s / (moved / rate)", "host busy", "primary CPU s",
                       "replicas CPU s", f"CPU s / {NCPU} cores"], t))
    print(f"\n- worst moved / bound: {worst:.3f} (target <= 1.1: {'PASS' if worst <= 1.1 else 'FAIL'})")


def cluster():
    srcs = {d: steps("finetune", d)[-1] for d in ("bf16", "fp32")}
    with bl.Replicas(BIN) as reps:
        cl = Cluster(reps)
        # Not recorded: each server sets up what it keeps across pushes (its buffer pool).
        bl.push(BIN, srcs["fp32"], "warmup", 1, cl.addrs, wrap=["scripts/cluster.sh", "exec", "p"])
        if "ratio" in PARTS:
            part_ratio(cl, srcs)
        if "cluster" in PARTS:
            part_cluster(cl, srcs)
        if "delta" in PARTS:
            part_delta(cl)
    save()


globals()[sys.argv[1]]()
PY

if has_part hop; then
    log "loopback hop: off vs auto"
    python3 "$work/bench.py" hop | tee -a "$summary"
fi

if $cluster_parts; then
    cluster_bench_args
    trap cluster_bench_exit EXIT
    log "cluster: primary + $N replicas, $RATE per node egress"
    "$CLUSTER" up "$N" --rate "$RATE" >/dev/null
    BC_N=$N BC_PORT=$PORT BC_RATE=$RATE python3 "$work/bench.py" cluster | tee -a "$summary"
fi
log "saved $out"

#!/usr/bin/env bash
# Single-hop loopback benchmark: one `shardcast push` to one replica on 127.0.0.1, against
# iperf3's single-stream loopback throughput measured in the same run, interleaved rep by rep.
# Target: shardcast hop >= 0.8 x iperf3.
#
# Each rep runs, in this order:
#   iperf3        iperf3 -s -1 / iperf3 -c 127.0.0.1 -n SIZE -J (one stream), receiver's rate
#   hop           shardcast serve + shardcast push SRC --json; rate = bytes / seconds from its JSON
#   hop-noverify  the same, replica started with SHARDCAST_BENCH_NO_VERIFY=1 (skips digest checks:
#                 the difference is what verification costs; the binary is built with
#                 --features bench-switches, the only build that obeys it)
#   hop-key       the same with a cluster key on both sides (SHARDCAST_KEY_FILE): authentication,
#                 and the MAC on every chunk header, END and ACK (issue 14: <= 5 % against hop)
#   with LANES=N (optional, 2..16): iperf3-pN, iperf3 with N parallel streams (-P N), and
#                 hop-lanes, the push with --lanes N (issue 16: hop-lanes >= 0.8 x iperf3-pN)
# Source file and replica roots live on tmpfs (/dev/shm), so disks are not measured.
#
# Env: SIZE (default 2G; 1G, 512M, bytes…), REPS (default 5), CHUNK (optional, --chunk-size),
#      LANES (optional, see above), FILES (default 1: the source is one file; 2..16: SIZE split
#      into that many files, which the replica may write in parallel: the kernel serializes the
#      writes to one file),
#      SHARDCAST_IO=plain (optional, benchmarks the plain-socket path), KEEP_WORK=1 (keep the
#      tmpfs work dir for inspection), OLD_BIN=path (optional: adds the measure hop-old, the same
#      push with an older release binary on both ends, in the same reps, and the ratio hop / hop-old:
#      how a change moved the hop's speed, measured side by side; and hop-old-key, the old binary
#      with the cluster key, for the same comparison of the keyed hop).
# Output: a summary table on stdout; raw rows in results/hop/bench-hop-<date>.csv.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

SIZE=${SIZE:-2G}
REPS=${REPS:-5}
CHUNK=${CHUNK:-}
LANES=${LANES:-}
[[ -z "$LANES" || "$LANES" =~ ^([2-9]|1[0-6])$ ]] || die "LANES must be 2..16, got '$LANES'"
FILES=${FILES:-1}
[[ "$FILES" =~ ^([1-9]|1[0-6])$ ]] || die "FILES must be 1..16, got '$FILES'"
bytes=$(parse_size "$SIZE")
[[ "$REPS" =~ ^[1-9][0-9]*$ ]] || die "REPS must be a positive integer, got '$REPS'"
((bytes > 0)) || die "SIZE must be > 0"

command -v iperf3 >/dev/null || die "iperf3 not found: run scripts/deps.sh"
command -v python3 >/dev/null || die "python3 not found: run scripts/deps.sh"

log "building release binary"
cargo build --release --quiet --features bench-switches
[[ -x "$BIN" ]] || die "$BIN missing after cargo build --release"

# tmpfs holds the source plus one replica copy at a time.
need=$((2 * bytes + (256 << 20)))
avail=$(avail_bytes /dev/shm)
((avail >= need)) || die "/dev/shm has $(fmt_bytes "$avail") free, this run needs $(fmt_bytes "$need") (2 x SIZE + 256 MiB); use a smaller SIZE"

work=$(mktemp -d /dev/shm/shardcast-bench-hop.XXXXXX)
if [[ "${KEEP_WORK:-0}" == 1 ]]; then log "keeping $work"; else cleanup_register_dir "$work"; fi
if ((FILES == 1)); then
    src=$work/src.bin
    log "generating $(fmt_bytes "$bytes") of random data in $src"
    gen_random_file "$src" "$bytes"
else
    src=$work/src
    log "generating $(fmt_bytes "$bytes") of random data in $FILES files in $src"
    mkdir -p "$src"
    for ((i = 0; i < FILES; i++)); do
        part=$((bytes / FILES))
        ((i == FILES - 1)) && part=$((bytes - part * (FILES - 1)))
        gen_random_file "$src/part-$i.bin" "$part"
    done
fi

mkdir -p results/hop
stamp=$(date +%Y%m%d-%H%M%S)
csv=results/hop/bench-hop-$stamp.csv
io_mode=${SHARDCAST_IO:-auto}
rev=$(git_rev)
echo "run,rep,measure,bytes,seconds,gb_per_s,wall_seconds,chunk,io,commit,kernel" >"$csv"
# row MEASURE BYTES SECONDS [WALL_SECONDS]: one CSV row; seconds is what the tool reports,
# wall_seconds the whole `shardcast push` process (includes start-up and manifest hashing).
row() {
    local gbps
    gbps=$(python3 -c 'import sys; print(f"{int(sys.argv[1]) / float(sys.argv[2]) / 1e9:.4f}")' "$2" "$3")
    echo "$stamp,$rep,$1,$2,$3,$gbps,${4:-},${CHUNK:-default},$io_mode,$rev,$(uname -r)" >>"$csv"
    log "rep $rep  $(printf '%-13s %7.3f GB/s  (%d bytes in %.3f s)' "$1" "$gbps" "$2" "$3")"
}

push_args=()
[[ -n "$CHUNK" ]] && push_args+=(--chunk-size "$CHUNK")

# run_iperf3 [STREAMS]: one loopback transfer of $bytes over STREAMS streams (default 1).
run_iperf3() {
    local streams=${1:-1} port out="$work/iperf3-$rep-${1:-1}.json" spid measure=iperf3
    ((streams > 1)) && measure=iperf3-p$streams
    port=$(free_port)
    iperf3 -s -1 -p "$port" -B 127.0.0.1 >"$work/iperf3-server.log" 2>&1 &
    spid=$!
    bg_started "$spid"
    wait_tcp_listen "$port"
    timeout 600 iperf3 -c 127.0.0.1 -p "$port" -n "$bytes" -P "$streams" -J >"$out" \
        || { cat "$out" >&2; die "iperf3 client failed"; }
    wait_pid "$spid" || true
    local b s
    b=$(json_get "$out" end sum_received bytes)
    s=$(json_get "$out" end sum_received seconds)
    row "$measure" "$b" "$s"
}

# The replicas are long-lived, as a replica daemon is: one server per measure, started once,
# receiving a new version every rep (the first push of a server also pays for faulting in its
# buffer pool; later ones reuse it).
declare -A HOP_ADDR=()
# start_hop MEASURE [ENV=VAL…]: starts the replica server for MEASURE.
start_hop() {
    local measure=$1
    shift
    SERVE_ENV=("$@")
    start_serve "$work/serve-$measure.log" "$work/replica-$measure"
    SERVE_ENV=()
    HOP_ADDR[$measure]=$SERVE_ADDR
}

# run_hop MEASURE [ENV=VAL…]: one push to MEASURE's replica (with that environment), checked,
# then the version removed.
run_hop() {
    local measure=$1 root="$work/replica-$1" out="$work/push-$1-$rep.json" rc=0 t0 wall bin=$BIN
    local lanes_args=()
    shift
    [[ $measure == hop-old* ]] && bin=$OLD_BIN
    [[ $measure == hop-lanes ]] && lanes_args=(--lanes "$LANES")
    t0=$(date +%s.%N)
    env "$@" timeout 900 "$bin" push "$src" --name bench --version "$rep" --to "${HOP_ADDR[$measure]}" --json \
        "${push_args[@]}" "${lanes_args[@]}" >"$out" 2>"$work/push-$measure-$rep.err" || rc=$?
    wall=$(python3 -c 'import sys; print(f"{float(sys.argv[2]) - float(sys.argv[1]):.4f}")' "$t0" "$(date +%s.%N)")
    if ((rc != 0)) || [[ "$(json_get "$out" ok 2>/dev/null)" != True ]]; then
        echo "--- push stdout" >&2; cat "$out" >&2
        echo "--- push stderr" >&2; cat "$work/push-$measure-$rep.err" >&2
        echo "--- serve log" >&2; cat "$work/serve-$measure.log" >&2
        die "shardcast push ($measure, rep $rep) exited $rc"
    fi
    # First rep: the replica's copy must be byte-identical to the source.
    if ((rep == 1)); then
        if ((FILES == 1)); then
            cmp "$src" "$root/bench/$rep/src.bin" || die "$measure: replica copy differs from source"
        else
            diff -rq "$src" "$root/bench/$rep" || die "$measure: replica copy differs from source"
        fi
    fi
    row "$measure" "$(json_get "$out" bytes)" "$(json_get "$out" seconds)" "$wall"
    # Keep tmpfs small: drop the version before the next rep.
    rm -rf "$root/bench/$rep" "$root/bench/$rep.manifest"
}

head -c 32 /dev/urandom | base64 >"$work/cluster.key"
chmod 600 "$work/cluster.key"
KEY_ENV=(SHARDCAST_KEY_FILE="$work/cluster.key")

start_hop hop
start_hop hop-noverify SHARDCAST_BENCH_NO_VERIFY=1
start_hop hop-key "${KEY_ENV[@]}"
[[ -n "$LANES" ]] && start_hop hop-lanes
if [[ -n "${OLD_BIN:-}" ]]; then
    [[ -x "$OLD_BIN" ]] || die "OLD_BIN=$OLD_BIN is not an executable"
    log "old binary: $OLD_BIN ($("$OLD_BIN" --version))"
    BIN_NEW=$BIN BIN=$OLD_BIN
    start_hop hop-old
    start_hop hop-old-key "${KEY_ENV[@]}"
    BIN=$BIN_NEW
fi

log "SIZE=$(fmt_bytes "$bytes") REPS=$REPS CHUNK=${CHUNK:-default} io=$io_mode -> $csv"
for ((rep = 1; rep <= REPS; rep++)); do
    run_iperf3
    run_hop hop
    run_hop hop-noverify SHARDCAST_BENCH_NO_VERIFY=1
    run_hop hop-key "${KEY_ENV[@]}"
    if [[ -n "$LANES" ]]; then
        run_iperf3 "$LANES"
        run_hop hop-lanes
    fi
    if [[ -n "${OLD_BIN:-}" ]]; then
        run_hop hop-old
        run_hop hop-old-key "${KEY_ENV[@]}"
    fi
done

# Summary: median/min/max per measure, and the ratios (of medians, plus the per-rep range).
PYTHONPATH=$PWD/scripts${PYTHONPATH:+:$PYTHONPATH} python3 - "$csv" <<'PY'
import csv, sys
import benchlib as bl
rows = list(csv.DictReader(open(sys.argv[1])))
by = {}
for r in rows:
    by.setdefault(r["measure"], {})[int(r["rep"])] = float(r["gb_per_s"])
    if r["wall_seconds"]:  # the whole push process, start-up and source hashing included
        by.setdefault(r["measure"] + "-wall", {})[int(r["rep"])] = int(r["bytes"]) / float(r["wall_seconds"]) / 1e9
r0 = next(r for r in rows if r["measure"] == "hop")  # iperf3's receiver may count a few bytes less
print(f"\nshardcast single-hop loopback benchmark  ({len(by['iperf3'])} reps, "
      f"{int(r0['bytes']) / 2**30:.2f} GiB, chunk {r0['chunk']}, io {r0['io']}, commit {r0['commit']})")
print("GB/s = 1e9 bytes/s; hop rates use the push's own \"seconds\", 'wall' rows the whole process\n")
print(f"{'measure':<26}{'median':>9}{'min':>9}{'max':>9}")
names = [("iperf3", "iperf3 (1 stream)"), ("hop", "shardcast hop"),
         ("hop-noverify", "shardcast hop, no verify"), ("hop-key", "shardcast hop, cluster key"),
         ("hop-wall", "  hop, process wall"), ("hop-noverify-wall", "  no verify, wall"),
         ("hop-key-wall", "  cluster key, wall"), ("hop-old", "old binary hop"),
         ("hop-old-wall", "  old binary, wall"), ("hop-old-key", "old binary, cluster key")]
names += [(k, f"iperf3 ({k[8:]} streams)") for k in sorted(by) if k.startswith("iperf3-p")]
names += [("hop-lanes", "shardcast hop, lanes"), ("hop-lanes-wall", "  lanes, wall")]
for key, label in [n for n in names if n[0] in by]:
    v = list(by[key].values())
    print(f"{label:<26}{bl.median(v):>9.3f}{min(v):>9.3f}{max(v):>9.3f}")
print()
def ratio(a, b, label, target=None):
    med, lo, hi = bl.ratio(by[a], by[b])
    line = f"{label:<26}{med:>9.3f}   (per rep {lo:.3f} .. {hi:.3f})"
    if target is not None:
        line += f"   target >= {target}: {'PASS' if med >= target else 'FAIL'}"
    print(line)
ratio("hop", "iperf3", "hop / iperf3", 0.8)
ratio("hop", "hop-noverify", "hop / hop-no-verify")
ratio("hop-key", "hop", "hop-key / hop", 0.95)
lanes = next((k for k in by if k.startswith("iperf3-p")), None)
if lanes and "hop-lanes" in by:
    ratio("hop-lanes", lanes, f"hop-lanes / {lanes}", 0.8)
    ratio("hop-lanes", "hop", "hop-lanes / hop")
if "hop-old" in by:
    ratio("hop", "hop-old", "hop / hop-old (this vs old)")
    ratio("hop-wall", "hop-old-wall", "  wall: this / old")
    ratio("hop-key", "hop-old-key", "hop-key: this / old")
    ratio("hop-old-key", "hop-old", "old: hop-key / hop")
PY
echo "raw rows: $csv"

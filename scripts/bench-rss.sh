#!/usr/bin/env bash
# Peak memory of a relay: a chain of 2 replicas on loopback (relay = the first, tail = the second),
# one push of a SIZE (default 4 GiB) file through it, then the relay's VmHWM (peak resident set)
# read from /proc/PID/status while it still runs. Target: VmHWM <= pool + 64 MiB.
#
# Replica roots are on /dev/shm (2 x SIZE must fit there); the source file is real random bytes
# (not sparse), generated once and kept in results/tmp/ (git-ignored) for later runs.
#
# Env: SIZE (default 4G), POOL_MB (default 64, passed as --pool-mb to serve and push),
#      CHUNK (optional, --chunk-size), SHARDCAST_IO=plain (optional).
# Output: a short report on stdout and one row appended to results/rss/bench-rss.csv.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

SIZE=${SIZE:-4G}
POOL_MB=${POOL_MB:-64}
CHUNK=${CHUNK:-}
bytes=$(parse_size "$SIZE")
((bytes > 0)) || die "SIZE must be > 0"
[[ "$POOL_MB" =~ ^[1-9][0-9]*$ ]] || die "POOL_MB must be a positive integer, got '$POOL_MB'"
command -v python3 >/dev/null || die "python3 not found: run scripts/deps.sh"

log "building release binary"
cargo build --release --quiet
[[ -x "$BIN" ]] || die "$BIN missing after cargo build --release"

# Both replicas keep a full copy on tmpfs.
need=$((2 * bytes + (256 << 20)))
avail=$(avail_bytes /dev/shm)
if ((avail < need)); then
    die "/dev/shm has $(fmt_bytes "$avail") free; two replica copies of $(fmt_bytes "$bytes") need $(fmt_bytes "$need").
       Free space in /dev/shm, or shrink the run, e.g.: SIZE=1G $0"
fi

# Source: generated once, reused while its size matches.
mkdir -p results/tmp
src=results/tmp/bench-rss-src-$bytes.bin
if [[ ! -f "$src" || $(stat -c %s "$src") -ne $bytes ]]; then
    src_avail=$(avail_bytes results/tmp)
    ((src_avail >= bytes + (1 << 30))) || die "results/tmp has $(fmt_bytes "$src_avail") free, the source needs $(fmt_bytes "$bytes") + 1 GiB"
    log "generating $(fmt_bytes "$bytes") of random data in $src (once)"
    gen_random_file "$src" "$bytes"
else
    log "reusing $src"
fi

work=$(mktemp -d /dev/shm/shardcast-bench-rss.XXXXXX)
cleanup_register_dir "$work"

# Replicas know nothing of each other: the push names the chain, and the relay learns its
# downstream from the HELLO.
start_serve "$work/tail.log" "$work/tail" --pool-mb "$POOL_MB"
tail_pid=$SERVE_PID tail_addr=$SERVE_ADDR
start_serve "$work/relay.log" "$work/relay" --pool-mb "$POOL_MB"
relay_pid=$SERVE_PID relay_addr=$SERVE_ADDR
log "relay $relay_addr (pid $relay_pid), tail $tail_addr (pid $tail_pid)"

push_args=(--pool-mb "$POOL_MB")
[[ -n "$CHUNK" ]] && push_args+=(--chunk-size "$CHUNK")
rc=0
timeout 1800 "$BIN" push "$src" --name rss --version 1 --to "$relay_addr,$tail_addr" --json \
    "${push_args[@]}" >"$work/push.json" 2>"$work/push.err" || rc=$?
if ((rc != 0)); then
    echo "--- push stdout" >&2; cat "$work/push.json" >&2
    echo "--- push stderr" >&2; cat "$work/push.err" >&2
    echo "--- relay log" >&2; cat "$work/relay.log" >&2
    echo "--- tail log" >&2; cat "$work/tail.log" >&2
    die "shardcast push exited $rc"
fi
for r in relay tail; do
    got=$(stat -c %s "$work/$r/rss/1/$(basename "$src")" 2>/dev/null || echo missing)
    [[ "$got" == "$bytes" ]] || die "$r holds $got bytes of the pushed file, expected $bytes"
done

# kB fields from /proc/PID/status, read while the relay is still alive.
status_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
kill -0 "$relay_pid" 2>/dev/null || die "relay exited before its VmHWM could be read"
relay_hwm_kb=$(status_kb "$relay_pid" VmHWM)
relay_rss_kb=$(status_kb "$relay_pid" VmRSS)
relay_anon_kb=$(status_kb "$relay_pid" RssAnon)
relay_file_kb=$(status_kb "$relay_pid" RssFile)
relay_shmem_kb=$(status_kb "$relay_pid" RssShmem)
tail_hwm_kb=$(status_kb "$tail_pid" VmHWM)
seconds=$(json_get "$work/push.json" seconds)
stop_pid "$relay_pid"
stop_pid "$tail_pid"

target_kb=$(((POOL_MB + 64) * 1024))
verdict=FAIL
((relay_hwm_kb <= target_kb)) && verdict=PASS
mib() { python3 -c 'import sys; print(f"{int(sys.argv[1]) / 1024:.1f}")' "$1"; }

mkdir -p results/rss
csv=results/rss/bench-rss.csv
[[ -f "$csv" ]] || echo "date,bytes,chunk,pool_mb,target_mib,relay_vmhwm_mib,relay_vmrss_end_mib,relay_rss_anon_mib,relay_rss_file_mib,relay_rss_shmem_mib,tail_vmhwm_mib,push_seconds,verdict,io,commit,kernel" >"$csv"
echo "$(date -Iseconds),$bytes,${CHUNK:-default},$POOL_MB,$((POOL_MB + 64)),$(mib "$relay_hwm_kb"),$(mib "$relay_rss_kb"),$(mib "$relay_anon_kb"),$(mib "$relay_file_kb"),$(mib "$relay_shmem_kb"),$(mib "$tail_hwm_kb"),$seconds,$verdict,${SHARDCAST_IO:-auto},$(git_rev),$(uname -r)" >>"$csv"

cat <<REPORT

relay peak RSS while $(fmt_bytes "$bytes") passed through it  (chunk ${CHUNK:-default}, io ${SHARDCAST_IO:-auto})
  pool (--pool-mb)         $POOL_MB MiB
  target (pool + 64 MiB)   $((POOL_MB + 64)) MiB
  relay VmHWM (peak)       $(mib "$relay_hwm_kb") MiB   $verdict
  relay at end             VmRSS $(mib "$relay_rss_kb") MiB = anon $(mib "$relay_anon_kb") + file $(mib "$relay_file_kb") + shmem $(mib "$relay_shmem_kb")
  tail VmHWM (reference)   $(mib "$tail_hwm_kb") MiB
  push                     ${seconds}s
row appended to $csv
REPORT

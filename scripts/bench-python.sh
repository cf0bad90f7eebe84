#!/usr/bin/env bash
# Python package benchmark (issue: launchers): buffer vs file push, how soon push() returns after
# the replica published, and how often progress() moves. See ffi/python/bench/bench_push.py.
#
# Builds the release library and binary, installs the package into target/pybench-venv, starts
# one `shardcast serve` on loopback, and pushes SIZE_MB of random bytes REPS times from a file and
# from a bytes object, alternating. Source file and replica root live on tmpfs (/dev/shm), so
# disks are not measured.
#
# Env: SIZE_MB (default 1024), REPS (default 5).
# Output: the table on stdout, also saved to results/python/bench-python-<date>.md.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

SIZE_MB=${SIZE_MB:-1024}
REPS=${REPS:-5}
[[ "$SIZE_MB" =~ ^[1-9][0-9]*$ ]] || die "SIZE_MB must be a positive integer, got '$SIZE_MB'"
[[ "$REPS" =~ ^[1-9][0-9]*$ ]] || die "REPS must be a positive integer, got '$REPS'"

log "building release binary and library"
cargo build --release --quiet --bin shardcast -p shardcast -p shardcast-ffi
venv=target/pybench-venv
[[ -x $venv/bin/python ]] || python3 -m venv "$venv"
SHARDCAST_CARGO_PROFILE=release "$venv/bin/pip" install -q --force-reinstall --no-deps ./ffi/python

# tmpfs holds the source file, one or two replica versions, and the process's copy in memory.
need=$(((4 * SIZE_MB + 256) << 20))
avail=$(avail_bytes /dev/shm)
((avail >= need)) || die "/dev/shm has $(fmt_bytes "$avail") free, this run needs $(fmt_bytes "$need")"

mkdir -p results/python
out=results/python/bench-python-$(date -u +%Y%m%d-%H%M%S).md
{
    echo "# bench-python $(date -u +%FT%TZ)"
    echo "command: SIZE_MB=$SIZE_MB REPS=$REPS ./scripts/bench-python.sh; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo '```'
    "$venv/bin/python" ffi/python/bench/bench_push.py --bin "$BIN" --size-mb "$SIZE_MB" --reps "$REPS" --dir /dev/shm
    echo '```'
} | tee "$out"
log "saved $out"

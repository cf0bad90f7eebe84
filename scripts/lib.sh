#!/usr/bin/env bash
# Helpers shared by the benchmark scripts. Source it, don't run it:
#   . scripts/lib.sh
# Provides: die, log, parse_size, fmt_bytes, avail_bytes, gen_random_file, start_serve, bg_started,
# wait_pid, stop_pid, wait_tcp_listen, free_port, json_get, git_rev,
# cleanup_register_dir and an EXIT trap that stops every started process and removes temp dirs.
# shellcheck disable=SC2034  # SERVE_PID/SERVE_ADDR/BIN are read by the scripts that source this.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    echo "scripts/lib.sh is a library: source it from another script" >&2
    exit 2
fi

BIN=${BIN:-target/release/shardcast}
_PIDS=()
_DIRS=()

die() { echo "error: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

# Stop every process we started (TERM, then KILL after 5 s) and remove our temp dirs.
_cleanup() {
    local rc=$? pid d
    trap - EXIT INT TERM
    # A background child that is signalled before it exec'd still runs this trap: only the main
    # shell cleans up.
    [[ "$BASHPID" == "$$" ]] || exit "$rc"
    local pids=("${_PIDS[@]}")
    for pid in "${pids[@]}"; do
        stop_pid "$pid"
    done
    for d in "${_DIRS[@]}"; do
        if [[ -n "$d" && -d "$d" ]]; then rm -rf -- "$d"; fi
    done
    exit "$rc"
}
trap _cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cleanup_register_dir() { _DIRS+=("$1"); }

# bg_started PID: remember a background process so that the EXIT trap stops it.
bg_started() { _PIDS+=("$1"); }

_forget() {
    local p keep=()
    for p in "${_PIDS[@]}"; do
        [[ "$p" == "$1" ]] || keep+=("$p")
    done
    _PIDS=("${keep[@]}")
}
_known() {
    local p
    for p in "${_PIDS[@]}"; do
        [[ "$p" == "$1" ]] && return 0
    done
    return 1
}

# wait_pid PID: wait for a process we started to exit by itself; returns its exit status.
wait_pid() {
    local rc=0
    _known "$1" || return 0
    wait "$1" || rc=$?
    _forget "$1"
    return "$rc"
}

# stop_pid PID: TERM, wait up to 5 s, then KILL, and reap it. No-op for a PID already reaped.
stop_pid() {
    local pid=$1 i
    _known "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    _forget "$pid"
}

# parse_size 2G | 2GiB | 512M | 4194304 -> bytes (binary units: K=1024).
parse_size() {
    local s=${1^^}
    [[ "$s" =~ ^([0-9]+)([KMGT]?)(I?B)?$ ]] || die "bad size '$1' (use e.g. 2G, 512MiB, 1048576)"
    local n=${BASH_REMATCH[1]} u=${BASH_REMATCH[2]}
    case "$u" in
        "") echo "$n" ;;
        K) echo $((n << 10)) ;;
        M) echo $((n << 20)) ;;
        G) echo $((n << 30)) ;;
        T) echo $((n << 40)) ;;
    esac
}

# fmt_bytes N -> "2.00 GiB"
fmt_bytes() {
    python3 -c 'import sys
n=int(sys.argv[1])
for u in ("B","KiB","MiB","GiB","TiB"):
    if n < 1024 or u == "TiB":
        print(f"{n:.2f} {u}" if u != "B" else f"{n} B"); break
    n /= 1024' "$1"
}

# avail_bytes DIR -> free bytes on DIR's filesystem
avail_bytes() { df --output=avail -B1 "$1" | tail -1 | tr -d ' '; }

# gen_random_file PATH BYTES: real (incompressible, non-sparse) random bytes, 16 MiB at a time.
gen_random_file() {
    local path=$1 bytes=$2
    python3 - "$path" "$bytes" <<'PY'
import os, sys
path, total = sys.argv[1], int(sys.argv[2])
block = 16 << 20
tmp = path + ".tmp"
with open(tmp, "wb") as f:
    left = total
    while left > 0:
        n = min(block, left)
        f.write(os.urandom(n))
        left -= n
os.rename(tmp, path)
PY
}

# gen_shard_set DIR BYTES FILES: FILES random files (shard-000.bin, …) adding up to BYTES in DIR.
gen_shard_set() {
    local dir=$1 bytes=$2 files=$3 per sz i
    mkdir -p "$dir"
    per=$((bytes / files))
    for ((i = 0; i < files; i++)); do
        sz=$per
        ((i == files - 1)) && sz=$((bytes - per * (files - 1)))
        gen_random_file "$(printf '%s/shard-%03d.bin' "$dir" "$i")" "$sz"
    done
}

# cluster_bench_exit: an EXIT trap for the benchmarks on scripts/cluster.sh (CLUSTER names the
# script): stops the background processes, tears the cluster down, then the usual cleanup.
cluster_bench_exit() {
    local rc=$? pid
    set +e
    trap - EXIT INT TERM
    [[ "$BASHPID" == "$$" ]] || exit "$rc"
    for pid in "${_PIDS[@]}"; do stop_pid "$pid"; done
    "$CLUSTER" down >/dev/null 2>&1 || echo "warning: '$CLUSTER down' failed; run it by hand" >&2
    (exit "$rc")
    _cleanup
}

# cluster_bench_args: the common settings of a cluster benchmark: defaults for SIZE (1G), FILES
# (8), RATE (1gbit), CHUNK (4MiB), PORT (7071) and SC_CLUSTER (sc) where the environment has none
# (the script sets its own N and REPS first); sets CLUSTER, and `bytes` and `chunk` from SIZE and
# CHUNK; checks N and REPS, root and tc.
cluster_bench_args() {
    : "${SIZE:=1G}" "${FILES:=8}" "${RATE:=1gbit}" "${CHUNK:=4MiB}" "${PORT:=7071}"
    export SC_CLUSTER=${SC_CLUSTER:-sc}
    CLUSTER=scripts/cluster.sh
    bytes=$(parse_size "$SIZE")
    chunk=$(parse_size "$CHUNK")
    ((bytes > 0 && chunk > 0)) || die "SIZE and CHUNK must be > 0"
    [[ "$N" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, got '$N'"
    [[ "$REPS" =~ ^[1-9][0-9]*$ ]] || die "REPS must be a positive integer, got '$REPS'"
    [[ $(id -u) -eq 0 ]] || die "needs root (network namespaces)"
    command -v tc >/dev/null || die "tc not found: run scripts/deps.sh (iproute2)"
}

# cluster_bench_prepare NAME NEED: the common start of a cluster benchmark: checks that
# /dev/shm has NEED bytes free, builds release, makes the work dir /dev/shm/shardcast-NAME.*
# (kept with KEEP_WORK=1), copies the binary into it (a rebuild during the run cannot change
# what is measured), installs cluster_bench_exit, and writes SIZE bytes in FILES files to
# $work/src. Sets `work` and `bin`. Expects `bytes` and FILES.
cluster_bench_prepare() {
    local name=$1 need=$2 avail
    avail=$(avail_bytes /dev/shm)
    ((avail >= need)) || die "/dev/shm has $(fmt_bytes "$avail") free, this run needs $(fmt_bytes "$need")"
    log "building release binary"
    cargo build --release --quiet
    work=$(mktemp -d "/dev/shm/shardcast-$name.XXXXXX")
    if [[ "${KEEP_WORK:-0}" == 1 ]]; then log "keeping $work"; else cleanup_register_dir "$work"; fi
    cp "$BIN" "$work/shardcast"
    bin=$work/shardcast
    trap cluster_bench_exit EXIT
    log "generating $(fmt_bytes "$bytes") in $FILES file(s)"
    gen_shard_set "$work/src" "$bytes" "$FILES"
}

# start_serve LOG ROOT [serve args...]: starts `shardcast serve` on 127.0.0.1:0 in the background
# with the extra environment in the array SERVE_ENV (e.g. SERVE_ENV=(SHARDCAST_BENCH_NO_VERIFY=1)).
# Sets SERVE_PID and SERVE_ADDR (127.0.0.1:PORT, parsed from the "listening on" line).
SERVE_ENV=()
start_serve() {
    local logf=$1 root=$2 i line
    shift 2
    : >"$logf" # exists before the server opens it, so the first poll can read it
    env NO_COLOR=1 "${SERVE_ENV[@]}" "$BIN" serve --listen 127.0.0.1:0 --root "$root" "$@" \
        >/dev/null 2>"$logf" &
    SERVE_PID=$!
    bg_started "$SERVE_PID"
    SERVE_ADDR=
    for ((i = 0; i < 300; i++)); do
        # Strip ANSI colour codes in case the log is coloured anyway.
        line=$(sed 's/\x1b\[[0-9;]*m//g' "$logf" | grep -o 'listening on 127\.0\.0\.1:[0-9]\+' | head -1 || true)
        if [[ -n "$line" ]]; then
            SERVE_ADDR=${line#listening on }
            return 0
        fi
        if ! kill -0 "$SERVE_PID" 2>/dev/null; then
            cat "$logf" >&2
            die "shardcast serve (root $root) exited before listening"
        fi
        sleep 0.1
    done
    cat "$logf" >&2
    die "shardcast serve (root $root) printed no 'listening on 127.0.0.1:PORT' line within 30 s"
}

# wait_tcp_listen PORT [SECONDS]: wait until something listens on 127.0.0.1:PORT (reads
# /proc/net/tcp, so it never connects: iperf3 -s -1 would take a probe connection as its one test).
wait_tcp_listen() {
    local port=$1 secs=${2:-10} hex i
    hex=$(printf '%04X' "$port")
    for ((i = 0; i < secs * 20; i++)); do
        if awk -v p=":$hex" '$2 ~ p"$" && $4 == "0A" { found = 1 } END { exit !found }' /proc/net/tcp; then
            return 0
        fi
        sleep 0.05
    done
    die "nothing listens on 127.0.0.1:$port after ${secs}s"
}

# free_port: a TCP port that is free on 127.0.0.1 right now.
free_port() {
    python3 -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# json_get JSONFILE KEY...: prints obj[KEY][KEY]...
json_get() {
    python3 - "$@" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))
for k in sys.argv[2:]:
    v = v[int(k)] if isinstance(v, list) else v[k]
print(v)
PY
}

git_rev() { git rev-parse --short HEAD 2>/dev/null || echo unknown; }

#!/usr/bin/env bash
# Fuzzes the parsers a malicious peer can reach (fuzz/fuzz_targets/): `frame` (headers, frames,
# every control payload), `handshake` (HELLO), `manifest` (manifests and plans) and `secure`
# (HELLO's grant and limits, data-plane frame MACs).
#
#   scripts/fuzz.sh                      # each target for FUZZ_SECONDS (default 15) seconds
#   FUZZ_RUNS=10000000 scripts/fuzz.sh   # each target for that many executions instead
#   FUZZ_TARGETS="frame" scripts/fuzz.sh # a subset
#
# Prints, per target, the executions and exec/s libFuzzer reports; exits non-zero when any target
# crashed (panic, failed assertion, allocation over the cap in fuzz/src/lib.rs, timeout), with
# the reproducer saved under fuzz/artifacts/<target>/ (replay: `cargo fuzz run --sanitizer none
# <target> <file>`).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-15}"
runs="${FUZZ_RUNS:-}"
targets="${FUZZ_TARGETS:-frame handshake manifest secure}"

# cargo-fuzz drives libFuzzer through libfuzzer-sys; 0.13 is the version this script is written
# against (its `--sanitizer none` and corpus arguments).
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked --version '^0.13'
fi

# --sanitizer none: AddressSanitizer needs nightly Rust, and CI has only stable. The targets are
# safe Rust, so ASan would add little; what it would catch that matters here (huge allocations
# from length fields) the targets' capped allocator catches instead. Coverage instrumentation,
# debug assertions and overflow checks stay on (cargo-fuzz's defaults).
# The fuzz crate's lock file is checked in: a stale one (a dependency of the library missing
# from it) fails here, loudly, instead of being rewritten by the build (which left the tree
# dirty after every test run). Refresh it with `cargo metadata --manifest-path fuzz/Cargo.toml`.
if ! cargo metadata --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null; then
    echo "fuzz: fuzz/Cargo.lock is stale; refresh it (cargo metadata --manifest-path fuzz/Cargo.toml) and commit it"
    exit 1
fi
cargo fuzz build --sanitizer none

target_dir="${CARGO_TARGET_DIR:-fuzz/target}"
logs="$target_dir/fuzz-logs"
mkdir -p "$logs"

if [[ -n "$runs" ]]; then
    limit=("-runs=$runs")
else
    limit=("-max_total_time=$seconds")
fi

failed=()
for t in $targets; do
    # The checked-in seeds (fuzz/corpus/<t>) are read only; libFuzzer writes what it finds into
    # the first directory, a working corpus kept under the target dir, so the repository stays
    # clean and later runs start from what earlier ones found.
    work="$target_dir/fuzz-corpus/$t"
    mkdir -p "$work"
    log="$logs/$t.log"
    start=$(date +%s.%N)
    rc=0
    # -timeout=10: a parser that spends 10 s on one input is a bug (a hang counts as a crash).
    # -print_final_stats=1: the executions count parsed below.
    cargo fuzz run --sanitizer none "$t" "$work" "fuzz/corpus/$t" -- \
        "${limit[@]}" -timeout=10 -print_final_stats=1 >"$log" 2>&1 || rc=$?
    end=$(date +%s.%N)
    execs=$(awk '/^stat::number_of_executed_units:/ {print $2}' "$log")
    rate=$(awk '/^stat::average_exec_per_sec:/ {print $2}' "$log")
    secs=$(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.1f", b - a}')
    if [[ $rc -ne 0 ]]; then
        failed+=("$t")
        echo "fuzz: $t: CRASHED (exit $rc) after ${execs:-?} executions in ${secs} s; log: $log"
        grep -E "panicked|==fuzz==|ERROR: libFuzzer|Test unit written" "$log" | head -n 10 || true
    else
        echo "fuzz: $t: ${execs:-?} executions in ${secs} s (${rate:-?} exec/s), 0 crashes"
    fi
done

if [[ ${#failed[@]} -ne 0 ]]; then
    echo "fuzz: FAILED: ${failed[*]}"
    exit 1
fi
echo "fuzz: all targets passed"

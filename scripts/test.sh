#!/usr/bin/env bash
# The whole test suite:
#   1. on this host: unit, integration and doc tests of every workspace member
#      (`cargo test --workspace --no-fail-fast`; the RDMA tests skip here, saying why);
#   2. the Python package (ffi/python): `pip install ./ffi/python` into a venv under target/,
#      then its unittest suite against real servers;
#   3. a short fuzzing run (scripts/fuzz.sh, ~10 s per target, stable Rust, --sanitizer none) of
#      the frame decoder, the handshake and the manifest parser;
#   4. the torchrun example (ffi/python/examples/torchrun_train.py) under real torchrun with
#      CPU PyTorch, in its own venv: SHARDCAST_TORCH_VENV, by default
#      ~/.cache/shardcast-torchvenv, outside the checkout so that a fresh clone on the same
#      machine (CI's) does not download and unpack PyTorch's ~5 GB again (~2 min here); when the
#      package index cannot give PyTorch, skipped with the reason printed.
#      SHARDCAST_SKIP_TORCH=1 skips it on purpose;
#   5. in a soft-RoCE guest (scripts/rxe-vm.sh: qemu booting Debian's kernel with rdma_rxe):
#      the RDMA tests (tests/rdma.rs) over real verbs devices. When the guest cannot start
#      (no qemu, no kernel package), this part is skipped with the reason printed; any other
#      failure fails the suite. SHARDCAST_SKIP_RXE=1 skips it on purpose.
#      In CI (CI=true) a guest that cannot start fails the suite, unless SHARDCAST_NO_RXE_GUEST=1
#      says on purpose that this machine has no guest (then it is counted as a skip).
# Skips are counted, not only printed: tests skip through tests/util `skip`, which appends
# "TEST: REASON" to $SHARDCAST_SKIP_LOG (set here); the script's own skips go there too. The run
# ends with the skip reasons and, as its very last line, `summary: P passed, F failed, S skipped`
# (summed over every cargo `test result:` line, host and guest, and the Python unittest runs;
# #[ignore]d tests count as skipped).
# --no-fail-fast: a failing test binary does not hide the results of the others.
# Extra arguments go to the host's `cargo test` (e.g. `./scripts/test.sh -- --nocapture`,
# `./scripts/test.sh --test cli`). Exits non-zero when any part failed.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
status=0
mkdir -p target
export SHARDCAST_SKIP_LOG="$PWD/target/test-skips.log"
results="$PWD/target/test-results.log"
: >"$SHARDCAST_SKIP_LOG"
: >"$results"
skipped() { echo "test: $1 SKIPPED: $2"; echo "$1: $2" >>"$SHARDCAST_SKIP_LOG"; }
# Prints the skip reasons and the summary line (the very last line of the run), then exits.
finish() {
    local passed=0 failed=0 ignored=0 py_ran=0 py_failed=0 py_skipped=0 skips
    # cargo: "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out"
    read -r passed failed ignored < <(awk '/test result:/ {
            for (i = 1; i <= NF; i++) {
                if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) g += $i
            }
        } END { print p + 0, f + 0, g + 0 }' "$results")
    # unittest: "Ran 12 tests in 3.1s" then "OK", "OK (skipped=2)" or "FAILED (failures=1, errors=2, skipped=1)"
    local py
    py=$(awk '/^Ran [0-9]+ tests? in/ { ran += $2 }
        /^(OK|FAILED)/ { if (match($0, /failures=[0-9]+/)) f += substr($0, RSTART + 9, RLENGTH - 9)
                         if (match($0, /errors=[0-9]+/)) f += substr($0, RSTART + 7, RLENGTH - 7)
                         if (match($0, /skipped=[0-9]+/)) s += substr($0, RSTART + 8, RLENGTH - 8) }
        END { print ran + 0, f + 0, s + 0 }' "$results")
    read -r py_ran py_failed py_skipped <<<"$py"
    # unittest quotes the reason with ' or, when the reason holds a ', with ".
    grep -E "\.\.\. skipped ['\"]" "$results" | sed -E "s/^(.*) \.\.\. skipped ['\"](.*)['\"].*/\1: \2/" \
        >>"$SHARDCAST_SKIP_LOG" || true
    skips=$(wc -l <"$SHARDCAST_SKIP_LOG")
    # A test that skipped through util::skip returned early, and cargo counted it as passed.
    passed=$((passed - host_skips + py_ran - py_failed - py_skipped))
    failed=$((failed + py_failed))
    if [[ $ignored -gt 0 ]]; then
        echo "#[ignore]d tests (long forms; cargo test -- --ignored runs them): $ignored" >>"$SHARDCAST_SKIP_LOG"
    fi
    echo "test: skipped tests and why:"
    if [[ -s "$SHARDCAST_SKIP_LOG" ]]; then sed 's/^/  /' "$SHARDCAST_SKIP_LOG"; else echo "  (none)"; fi
    if [[ $status -ne 0 && $failed -eq 0 ]]; then
        echo "test: a part failed outside the counted tests (see above)"
    fi
    echo "summary: $passed passed, $failed failed, $((skips + ignored)) skipped"
    exit "$status"
}
# Each part's wall time (build included), so a slow run shows where it went.
lap_start=$SECONDS
lap() { echo "test: time: $1: $((SECONDS - lap_start)) s"; lap_start=$SECONDS; }
host_skips=0
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee -a "$results" || status=$?
lap "cargo test --workspace"
host_skips=$(wc -l <"$SHARDCAST_SKIP_LOG")

echo "test: Python package (pip install ./ffi/python into target/pyvenv, then its tests)"
py_rc=0
(
    set -e
    rm -rf target/pyvenv
    python3 -m venv target/pyvenv
    # `cargo test --workspace` above built target/debug/shardcast and (in deps/, where cargo puts
    # every crate type of a library it builds for tests; only `cargo build` copies it up to
    # target/debug, so a copy there may be stale) libshardcast_ffi.so with
    # the workspace's features; a `cargo build -p ...` here would resolve other features for
    # a few shared crates (libc, serde, ...) and compile every dependency again (~4 min in CI).
    SHARDCAST_FFI_PREBUILT="$PWD/target/debug/deps/libshardcast_ffi.so" target/pyvenv/bin/pip install -q ./ffi/python
    # numpy arrays are the common in-memory source; without numpy that case is skipped.
    target/pyvenv/bin/pip install -q numpy || echo "test: numpy not installable; numpy buffer case skipped"
    SHARDCAST_BIN="$PWD/target/debug/shardcast" target/pyvenv/bin/python -m unittest discover -s ffi/python/tests -v
) 2>&1 | tee -a "$results" || py_rc=$?
if [[ $py_rc -ne 0 ]]; then
    echo "test: Python package tests FAILED (exit $py_rc)"
    status=1
fi

lap "Python package"
scripts/test-wheel.sh || { echo "test: wheel and release binary (scripts/test-wheel.sh) FAILED"; status=1; }

lap "wheel and release binary"
echo "test: short fuzzing run (scripts/fuzz.sh)"
if ! FUZZ_SECONDS=${FUZZ_SECONDS:-10} scripts/fuzz.sh; then
    echo "test: fuzzing FAILED (a crash, or the fuzz build failed)"
    status=1
fi

lap "fuzzing"
torchvenv=${SHARDCAST_TORCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/shardcast-torchvenv}
echo "test: torchrun example with CPU PyTorch ($torchvenv)"
if [[ "${SHARDCAST_SKIP_TORCH:-0}" == 1 ]]; then
    skipped "torchrun example" "SHARDCAST_SKIP_TORCH=1"
else
    torch_rc=0
    (
        set -e
        [[ -x $torchvenv/bin/python ]] || python3 -m venv "$torchvenv"
        if ! "$torchvenv/bin/python" -c "import torch" 2>/dev/null; then
            # The PyPI wheel is the CUDA build; it runs on CPU-only machines. ~1 min from cache.
            if ! "$torchvenv/bin/pip" install -q torch numpy; then
                echo "torchrun example: PyTorch could not be installed from the package index" >>"$SHARDCAST_SKIP_LOG"
                echo "test: torchrun example SKIPPED: PyTorch could not be installed from the package index"
                exit 0
            fi
        fi
        SHARDCAST_FFI_PREBUILT="$PWD/target/debug/deps/libshardcast_ffi.so" \
            "$torchvenv/bin/pip" install -q --force-reinstall --no-deps ./ffi/python
        SHARDCAST_BIN="$PWD/target/debug/shardcast" "$torchvenv/bin/python" -m unittest -v ffi/python/tests/test_torchrun.py
    ) 2>&1 | tee -a "$results" || torch_rc=$?
    if [[ $torch_rc -ne 0 ]]; then
        echo "test: torchrun example FAILED (exit $torch_rc)"
        status=1
    fi
fi

lap "torchrun example"
if [[ "${SHARDCAST_SKIP_RXE:-0}" == 1 ]]; then
    skipped "RDMA tests in the soft-RoCE guest" "SHARDCAST_SKIP_RXE=1"
    finish
fi
# Build the test binary on the host: compiling under TCG in the guest would take minutes. The
# guest runs that binary itself, not `cargo test`: cargo's freshness check alone takes 10-40 s
# under TCG, and it rebuilds everything there when the guest's environment differs from the
# host's in anything cargo tracks. The same packages and targets as `cargo test --workspace`
# above, so that cargo resolves the same features and builds nothing again: narrowed to
# `--test rdma`, the other members' test targets (and the dev-dependency features they bring,
# clap's among them) drop out, and on a clean clone ~35 crates (bindgen, rdma-sys, the proc
# macros ...) compiled again, 4 min of CI. Its output names every test binary; rdma's is taken.
rdma_bin=$(cargo test --workspace --no-run --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "rdma" and m.get("executable"):
        print(m["executable"])')
[[ -x "$rdma_bin" ]] || { echo "test: cargo built no tests/rdma.rs binary (got '$rdma_bin')"; status=1; finish; }
echo "test: RDMA tests (tests/rdma.rs: $rdma_bin) in the soft-RoCE guest (scripts/rxe-vm.sh)"
rc=0
scripts/rxe-vm.sh --timeout 1200 -- "$rdma_bin" --test-threads=1 | tee -a "$results" || rc=$?
case "$rc" in
    0) ;;
    4)
        if [[ "${SHARDCAST_NO_RXE_GUEST:-0}" == 1 ]]; then
            skipped "RDMA tests in the soft-RoCE guest" "the guest cannot start here (SHARDCAST_NO_RXE_GUEST=1)"
        elif [[ "${CI:-}" == true ]]; then
            echo "test: RDMA tests FAILED: the soft-RoCE guest did not start (see the rxe-vm message above);" \
                "CI expects it. On a machine that has no guest on purpose, set SHARDCAST_NO_RXE_GUEST=1."
            status=1
        else
            skipped "RDMA tests in the soft-RoCE guest" "the guest cannot start here (see the rxe-vm message above)"
        fi
        ;;
    *) echo "test: RDMA tests in the guest FAILED (exit $rc)"; status=1 ;;
esac
lap "RDMA tests in the guest"
finish

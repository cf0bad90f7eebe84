#!/usr/bin/env bash
# Builds the Python wheel: the shardcast package (ffi/python, ctypes over the C ABI) with the
# release libshardcast_ffi.so inside, tagged py3-none-manylinux_2_NN_ARCH:
#   1. `cargo build --release -p shardcast-ffi --lib` (libibverbs loaded at run time, as in the
#      release binary: the library links only glibc and libgcc_s);
#   2. `pip wheel` of ffi/python with SHARDCAST_FFI_PREBUILT pointing at that library (no cargo
#      inside the wheel build);
#   3. `auditwheel show` finds the oldest manylinux policy the library satisfies (the glibc
#      symbol versions it really uses); the wheel is retagged to it with `wheel tags`, and
#      `auditwheel show` must accept the result.
# Build tools (setuptools, wheel, auditwheel) live in a venv under the target dir, from PyPI.
#
#   scripts/build-wheel.sh              # OUT=target/dist by default
# Prints the wheel's path on stdout (the last line).
set -euo pipefail
cd "$(dirname "$0")/.."

target=${CARGO_TARGET_DIR:-$PWD/target}
target=$(realpath -m "$target")
out=$(realpath -m "${OUT:-$target/dist}")
tools=$target/wheel-tools

commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [[ "$commit" != unknown && -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
    commit="$commit-dirty"
fi
SHARDCAST_GIT_COMMIT=$commit cargo build --release --locked -p shardcast-ffi --lib >&2
lib=$target/release/libshardcast_ffi.so
if readelf -d "$lib" | grep -E '\(NEEDED\).*\[(libibverbs|librdmacm|libhwloc|libudev|libnl-3|libnl-route-3)\.' >&2; then
    echo "build-wheel: $lib links the libraries above; it must load them at run time" >&2
    exit 1
fi

if [[ ! -x $tools/bin/auditwheel ]]; then
    rm -rf "$tools"
    python3 -m venv "$tools"
    "$tools/bin/pip" install -q "setuptools>=70.1" wheel auditwheel >&2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
SHARDCAST_FFI_PREBUILT=$lib "$tools/bin/pip" wheel -q --no-deps --no-build-isolation -w "$work" ./ffi/python >&2
rm -rf ffi/python/build ffi/python/*.egg-info
whl=$(ls "$work"/shardcast-*.whl)

# "... is consistent with the following platform tag: "manylinux_2_34_x86_64"."
show=$("$tools/bin/auditwheel" show "$whl")
echo "$show" >&2
# (auditwheel wraps its lines: join them first)
tag=$(tr '\n' ' ' <<<"$show" | sed -n 's/.*consistent with the following platform tag: *"\([^"]*\)".*/\1/p')
[[ "$tag" == manylinux_* ]] || { echo "build-wheel: auditwheel found no manylinux tag for $whl" >&2; exit 1; }
"$tools/bin/python" -m wheel tags --remove --platform-tag "$tag" "$whl" >&2
whl=$(ls "$work"/shardcast-*"$tag".whl)
"$tools/bin/auditwheel" show "$whl" >&2
mkdir -p "$out"
cp "$whl" "$out/"
(cd "$out" && sha256sum "$(basename "$whl")" >"$(basename "$whl").sha256")
echo "build-wheel: $out/$(basename "$whl")" >&2
echo "$out/$(basename "$whl")"

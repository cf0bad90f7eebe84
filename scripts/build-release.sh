#!/usr/bin/env bash
# Builds the release binary the way it is shipped, and a checksum file beside it:
#   target/dist/shardcast-VERSION-ARCH-linux          (`shardcast --version` names the commit)
#   target/dist/shardcast-VERSION-ARCH-linux.sha256   (`sha256sum -c` it in that directory)
#
# The default features (rdma, numa) with libibverbs loaded at run time: the binary needs only
# glibc and libgcc_s, runs TCP on nodes without rdma-core and RDMA where libibverbs1 and
# ibverbs-providers are installed. The script refuses to finish if the binary links any of
# libibverbs, librdmacm, libhwloc, libudev or libnl. Built with .cargo/config.toml's
# target-cpu=x86-64-v3 (AVX2: x86 servers from 2015 on).
#
#   scripts/build-release.sh            # OUT=target/dist by default
#   OUT=/tmp/rel scripts/build-release.sh
# Prints the binary's path on stdout (the last line).
set -euo pipefail
cd "$(dirname "$0")/.."

commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [[ "$commit" != unknown && -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
    commit="$commit-dirty"
fi
export SHARDCAST_GIT_COMMIT=$commit
target=${CARGO_TARGET_DIR:-target}
out=${OUT:-$target/dist}

cargo build --release --locked --bin shardcast >&2

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
name="shardcast-$version-$(uname -m)-linux"
mkdir -p "$out"
cp "$target/release/shardcast" "$out/$name.tmp"
mv "$out/$name.tmp" "$out/$name"

# The point of the build: nothing RDMA or NUMA is linked (libibverbs is dlopen()ed).
if readelf -d "$out/$name" | grep -E '\(NEEDED\).*\[(libibverbs|librdmacm|libhwloc|libudev|libnl-3|libnl-route-3)\.' >&2; then
    echo "build-release: $out/$name links the libraries above; it must load them at run time" >&2
    exit 1
fi
(cd "$out" && sha256sum "$name" >"$name.sha256")
echo "build-release: $("$out/$name" --version) -> $out/$name (+ .sha256)" >&2
echo "$out/$name"

#!/usr/bin/env bash
# Install what shardcast's build, tests and benchmarks need on a fresh Debian 12.
# Idempotent: installs only the packages that are missing and skips apt entirely when none are.
# Runs `apt-get update` at most once per invocation.
#
#   build-essential pkg-config  C toolchain for crates that build C (and the linker)
#   iperf3                      the loopback baseline in scripts/bench-hop.sh
#   procps util-linux           ps/pgrep/free, and taskset/flock/etc. used by scripts and tests
#   iproute2                    ip/tc: the emulated cluster of scripts/cluster.sh (network
#                               namespaces, veth, bridge, tc shaping) and tests/cluster.rs
#   python3                     JSON/CSV handling and data generation in the bench scripts
#   clang libclang-dev          bindgen, which the rdma-sys crate runs at build time (feature `rdma`)
#   libibverbs-dev librdmacm-dev  the verbs and RDMA CM headers rdma-sys generates its bindings
#                               from (the binary loads libibverbs at run time; it links neither)
#   ibverbs-providers rdma-core   the user-space drivers (rxe among them) the RDMA transport loads
#   openssl                     the test CA and certificates of tests/tls.rs (mutual TLS)
#   e2fsprogs                   mkfs.ext4 for scripts/bench-journal.sh (ext4 on a loop device)
#   netcat-openbsd              nc: the `nc | tee` relay chain scripts/bench-phases.sh compares with
#
# Rust itself comes from rustup (preinstalled on these machines); this script only checks it.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(build-essential pkg-config iperf3 procps util-linux iproute2 openssl
    clang libclang-dev libibverbs-dev librdmacm-dev ibverbs-providers rdma-core e2fsprogs netcat-openbsd)

missing=()
for pkg in "${PACKAGES[@]}"; do
    # `dpkg-query -W` prints the status; only "install ok installed" counts.
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    if [[ "$status" != "install ok installed" ]]; then
        missing+=("$pkg")
    fi
done
# python3 may come from pyenv rather than Debian; only ask apt for it when none is on PATH.
# Debian's python3 needs python3-venv for the Python package tests (scripts/test.sh).
if ! command -v python3 >/dev/null 2>&1; then
    missing+=(python3 python3-venv)
elif ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi

if ((${#missing[@]} == 0)); then
    echo "deps: all system packages present (${PACKAGES[*]} python3)"
else
    if [[ $(id -u) -ne 0 ]]; then
        echo "deps: missing packages: ${missing[*]}" >&2
        echo "deps: run as root, or install them yourself:" >&2
        echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
        exit 1
    fi
    echo "deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive   # iperf3's postinst asks about a daemon otherwise
    apt-get -o DPkg::Lock::Timeout=600 update -q
    apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}"
fi

# Rust toolchain: preinstalled through rustup; never downloaded here.
if ! command -v cargo >/dev/null 2>&1 && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    echo "deps: cargo is in $HOME/.cargo/bin but not on PATH; run: source \"$HOME/.cargo/env\"" >&2
    exit 1
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "deps: cargo not found. shardcast needs a Rust toolchain >= 1.85 (install it with rustup:" >&2
    echo "      https://rustup.rs), then re-run this script." >&2
    exit 1
fi
echo "deps: $(cargo --version)"

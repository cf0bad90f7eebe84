#!/usr/bin/env bash
# Install what scripts/rxe-vm.sh needs to run soft-RoCE (rdma_rxe) tests in a throw-away QEMU guest
# on Debian 12. Idempotent: installs only the packages that are missing (with
# `apt-get update && apt-get install -y --no-install-recommends`) and skips apt entirely when none
# are. The guest kernel is NOT installed here: rxe-vm.sh downloads linux-image-amd64's package into
# its cache and never installs it on the host.
#
#   qemu-system-x86           the VM (TCG; KVM on this kind of machine is PVM and cannot boot Debian's kernel)
#   busybox-static            /init and the tools of the initramfs
#   kmod                      depmod/modprobe --show-depends for the guest's module tree
#   cpio gzip                 building the initramfs
#   xz-utils                  cutting the ELF vmlinux out of the bzImage (PVH boot)
#   iproute2                  ip, rdma and ss, in the guest (host binaries are reused over 9p)
#   rdma-core ibverbs-providers ibverbs-utils
#                             libibverbs + the rxe provider (librxe) + ibv_devices/ibv_devinfo/ibv_rc_pingpong
#   perftest                  ib_write_bw & co. for the self-test
#   procps util-linux coreutils   pgrep, flock, timeout, mktemp
#
# Exit status: 0 when everything is present afterwards, 1 with a message otherwise.
set -euo pipefail

PACKAGES=(qemu-system-x86 busybox-static kmod cpio gzip xz-utils iproute2 rdma-core ibverbs-utils
    ibverbs-providers perftest procps util-linux coreutils)

fail() {
    echo "deps-rxe: $*" >&2
    exit 1
}

missing_packages() {
    local pkg name status installed=" "
    # One dpkg-query for all of them; only "install ok installed" counts (not "deinstall ok
    # config-files" etc.). Unknown packages make it exit 1: that is fine, they are missing.
    while read -r name status; do
        [[ "$status" != "install ok installed" ]] || installed+="${name%%:*} "
    done < <(dpkg-query -W -f='${Package} ${Status}\n' "${PACKAGES[@]}" 2>/dev/null || true)
    for pkg in "${PACKAGES[@]}"; do
        [[ "$installed" == *" $pkg "* ]] || echo "$pkg"
    done
}

command -v dpkg-query >/dev/null 2>&1 || fail "dpkg-query not found: this script supports Debian/Ubuntu only"

mapfile -t missing < <(missing_packages)
if ((${#missing[@]} == 0)); then
    [[ -n "${RXEVM_QUIET_DEPS:-}" ]] || echo "deps-rxe: all packages present" >&2
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "deps-rxe: missing packages: ${missing[*]}" >&2
    echo "deps-rxe: run as root, or install them yourself:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
fi
command -v apt-get >/dev/null 2>&1 || fail "apt-get not found; install these yourself: ${missing[*]}"

echo "deps-rxe: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
if ! apt-get update -q >&2; then
    fail "apt-get update failed (no network to the Debian mirror?); missing: ${missing[*]}"
fi
if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; then
    fail "apt-get install failed for: ${missing[*]}"
fi

mapfile -t still < <(missing_packages)
((${#still[@]} == 0)) || fail "still missing after apt-get install: ${still[*]}"
echo "deps-rxe: installed ${missing[*]}" >&2

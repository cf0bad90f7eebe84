#!/usr/bin/env bash
# rxe-vm.sh: run a command inside a throw-away QEMU guest that has soft-RoCE (rdma_rxe) devices.
#
# The host kernel has no RDMA (CONFIG_INFINIBAND off, no module loading), so RDMA tests run in a VM
# that boots Debian's own kernel (linux-image-amd64 ships rdma_rxe). The guest sees the host's whole
# file tree (9p, read-only, under a tmpfs overlay: writable, and every write is thrown away), runs
# CMD in the host's current directory with the host's toolchain, and powers off.
#
# Usage:
#   scripts/rxe-vm.sh [--net eth,veth|eth|veth|none] [--timeout SECONDS] [--mem MB] [--smp N]
#                     [--accel tcg|kvm|auto] [--tty] [--prepare] [-- CMD ARGS...]
#     --net      guest networks with rxe devices (default eth,veth):
#                  eth   eth0 198.18.0.1/24 + rxe_eth0 (rxe loops the packets back internally)
#                  veth  veth0 198.18.1.1/24 <-> veth1 198.18.1.2/24 + rxe_v0 / rxe_v1 (RoCEv2
#                        packets really cross the veth; two processes act as two hosts), and a
#                        second rail: vethw0 198.18.2.1/24 <-> vethw1 198.18.2.2/24 + rxe_w0 / rxe_w1
#     --timeout  whole run, boot included (default 900 s)
#     --mem/--smp  guest RAM in MB (2048) and vCPUs (2)
#     --accel    auto (default): TCG when /sys/module/kvm_pvm exists or /dev/kvm is unusable
#     --prepare  only fetch the kernel and build the initramfs into the cache, then exit 0
#     --tty      leave CMD's stdout/stderr on the guest console tty (default: piped through cat, so
#                programs do not colour their output)
#   Without CMD: a short self-test (ibv_devices lists the rxe devices; ibv_rc_pingpong and
#   ib_write_bw over the veth pair, and over rxe_eth0 with eth; every check under `timeout`).
#   Example: scripts/rxe-vm.sh -- cargo test --offline --tests rdma -- --test-threads=1
#   Build on the host first (cargo test --no-run): anything cargo compiles in the guest compiles
#   under TCG, and the guest's writes (target dir included) are thrown away. No doc-tests there.
#   Even a fresh build costs cargo 10-40 s of checking under TCG: scripts/test.sh runs the test
#   binary itself (`scripts/rxe-vm.sh -- target/debug/deps/rdma-HASH --test-threads=1`).
#
# Output: CMD's output (stdout and stderr merged, one serial console) goes to stdout. The script's
# own messages ("rxe-vm: guest ready N ms", RXEVM-READY, RXEVM-EXIT-STATUS: N) go to stderr.
#
# Environment in the guest (CMD runs as root, in the host's cwd):
#   PATH (the host's, plus the sbin dirs), HOME, USER, LOGNAME, LANG, LC_ALL, TZ, TMPDIR, RUSTUP_HOME,
#   RUSTUP_TOOLCHAIN, RUSTFLAGS, RUSTDOCFLAGS, RUSTC, RUSTC_WRAPPER, RUSTC_BOOTSTRAP, CARGO_*
#   (CARGO_HOME, CARGO_TARGET_DIR, CARGO_INCREMENTAL, ...: so that cargo in the guest finds the
#   host's build fresh), RUST_*, SHARDCAST_* and the names listed in RXEVM_PASS_ENV are copied
#   from the host when set. TERM=dumb unless --tty.
#   RXEVM=1, RXEVM_NET (e.g. "eth,veth"), RXEVM_HOST=/run/rxevm/host (raw 9p view of the host's /)
#   RXEVM_DEV RXEVM_IP RXEVM_GID                 "server" side: rxe device, IPv4, RoCEv2 GID index
#   RXEVM_PEER_DEV RXEVM_PEER_IP RXEVM_PEER_GID  "client" side
#   RXEVM_DEV2 RXEVM_IP2 RXEVM_GID2 and RXEVM_PEER_DEV2 ...  the second rail (with veth):
#                                                rxe_w0 198.18.2.1, rxe_w1 198.18.2.2
#   RXEVM_LO_DEV RXEVM_LO_IP RXEVM_LO_GID        rxe_eth0 / 198.18.0.1 (with eth)
#     --net eth,veth or veth: DEV=rxe_v0 IP=198.18.1.1, PEER_DEV=rxe_v1 PEER_IP=198.18.1.2
#     --net eth:              DEV=PEER_DEV=rxe_eth0, IP=PEER_IP=198.18.0.1 (loopback)
#     --net none:             none of these are set
#   Shell functions (bash): gid_index DEV IPV4 (prints the RoCEv2 GID index of IPV4 on DEV) and
#   rxevm_wait_listen PORT [SECONDS] (waits until a TCP listener is up; start clients after it).
#
# Host environment knobs:
#   RXEVM_CACHE=DIR   kernel/initramfs cache (default ${XDG_CACHE_HOME:-$HOME/.cache}/shardcast-rxevm);
#                     guarded by flock, each run has its own mktemp dir under DIR/runs
#   RXEVM_NO_DEPS=1   do not call scripts/deps-rxe.sh first
#   RXEVM_VERBOSE=1   show the guest's boot console (kernel loglevel 6, init timestamps) on stderr
#   RXEVM_KEEP=1      keep the run dir (job.sh, console.log, qemu.stderr)
#   RXEVM_NO_RXE=1    do not load rdma_rxe in the guest (to test the exit-3 path)
#   RXEVM_KERNEL_PKG  kernel package to use instead of linux-image-amd64's dependency
#
# Exit status: CMD's (the self-test: 0 pass, 1 fail); 124 timeout; 125 the guest never reported a
# status; 3 "rxe-vm: soft-RoCE unavailable in the guest: ..." (rxe or its network set-up failed);
# 4 "rxe-vm: cannot start the VM: ..." (no qemu, no kernel, qemu failed to start; callers skip only
#   outside CI or with SHARDCAST_NO_RXE_GUEST=1: in CI the guest is expected to start);
# 2 usage.
#
# Pitfalls this script works around (details: the soft-RoCE spike notes, rxe-vm.md):
#   * /dev/kvm on these machines is PVM (kvm_pvm): it cannot run a stock kernel (MSR assertion,
#     then "emulation failure"), so the VM runs under TCG (-cpu max,-erms,-fsrm: rep movsb is slow
#     under TCG). --accel kvm is for machines with real KVM (untested here).
#   * The bzImage costs ~3.5 s under TCG (SeaBIOS + in-guest xz): the ELF vmlinux is cut out of it
#     once and QEMU boots it through the PVH entry point (~0.5 s).
#   * rxe's MTU follows the netdev: MTU 9000 gives rxe MTU 4096 and ~1.7x the bandwidth of 1500.
#   * Two rxe devices in one netns route via lo and fail ("Failed to modify QP to RTR", or perftest
#     exiting 0 after 0 iterations): the veth set-up demotes the local table to pref 100 and adds
#     oif rules to /32 routes out of each veth, with accept_local=1 and rp_filter=0.
#   * On Debian 12's 6.1 kernel rxe works only in the initial network namespace (its UDP socket and
#     route lookups live there): never put the peers in separate netns; use the veth pair.
#   * perftest can exit 0 having moved nothing: check the iterations/bandwidth columns; use -n, not
#     -D; wait for the server's listener (ss) before starting the client; port 18515 is shared by
#     ibv_rc_pingpong and perftest, so run pairs one at a time.
#   * Process creation costs ~0.1 s under TCG: the guest set-up uses ip -batch, /proc/sys writes and
#     bash builtins. The guest clock is set from a file the host rewrites every 20 ms until ready.
#   * The overlay keeps negative dentries: files created on the host after the guest looked them up
#     stay invisible under /; read such files through $RXEVM_HOST/<path> (raw 9p, cache=none).
#   * /proc, /sys, /dev and /run are the guest's own; the host's are not visible there.
#   * Nothing can leave the VM: its NIC hangs off a QEMU hub with no host backend (QEMU warns "hub 0
#     is not connected to host network"; that goes to qemu.stderr). The guest job refuses to run
#     unless /proc/cmdline has rxevm.job=, so it can never reconfigure the host.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

msg() { printf 'rxe-vm: %s\n' "$*" >&2; }
vlog() { [[ -z "${RXEVM_VERBOSE:-}" ]] || msg "$@"; }
usage() {
    sed -n '/^# Usage:/,/^#   Example/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit "${1:-2}"
}
cannot_start() {
    msg "cannot start the VM: $*"
    exit 4
}
now_us() { local t=${EPOCHREALTIME/[.,]/}; echo "$((10#$t))"; }

# ---------------------------------------------------------------- arguments
NET=eth,veth
TIMEOUT=900
MEM=2048
SMP=2
ACCEL=auto
TTY=0
PREPARE=0
CMD=()
while (($#)); do
    case "$1" in
        --net) NET=${2:?--net needs a value}; shift 2 ;;
        --net=*) NET=${1#*=}; shift ;;
        --timeout) TIMEOUT=${2:?--timeout needs a value}; shift 2 ;;
        --timeout=*) TIMEOUT=${1#*=}; shift ;;
        --mem) MEM=${2:?--mem needs a value}; shift 2 ;;
        --mem=*) MEM=${1#*=}; shift ;;
        --smp) SMP=${2:?--smp needs a value}; shift 2 ;;
        --smp=*) SMP=${1#*=}; shift ;;
        --accel) ACCEL=${2:?--accel needs a value}; shift 2 ;;
        --accel=*) ACCEL=${1#*=}; shift ;;
        --tty) TTY=1; shift ;;
        --prepare) PREPARE=1; shift ;;
        -h | --help) usage 0 ;;
        --) shift; CMD=("$@"); break ;;
        *) msg "unknown argument '$1' (put the command after --)"; usage ;;
    esac
done
[[ "$TIMEOUT" =~ ^[1-9][0-9]*$ ]] || { msg "--timeout wants whole seconds, got '$TIMEOUT'"; exit 2; }
[[ "$MEM" =~ ^[1-9][0-9]*$ ]] || { msg "--mem wants MB, got '$MEM'"; exit 2; }
[[ "$SMP" =~ ^[1-9][0-9]*$ ]] || { msg "--smp wants a count, got '$SMP'"; exit 2; }
NETS=()
if [[ "$NET" != none ]]; then
    IFS=, read -r -a NETS <<<"$NET"
    for n in "${NETS[@]}"; do
        [[ "$n" == eth || "$n" == veth ]] || { msg "--net: unknown network '$n' (eth, veth or none)"; exit 2; }
    done
fi
case "$ACCEL" in
    auto)
        if [[ -e /sys/module/kvm_pvm ]]; then
            ACCEL=tcg # PVM cannot run a stock kernel (pitfall 1)
        elif [[ -r /dev/kvm && -w /dev/kvm ]]; then
            ACCEL=kvm
        else
            ACCEL=tcg
        fi
        ;;
    tcg | kvm) ;;
    *) msg "--accel: tcg, kvm or auto, got '$ACCEL'"; exit 2 ;;
esac

# ---------------------------------------------------------------- host packages
if [[ -z "${RXEVM_NO_DEPS:-}" ]]; then
    if ! RXEVM_QUIET_DEPS=1 bash "$ROOT/scripts/deps-rxe.sh"; then
        command -v qemu-system-x86_64 >/dev/null 2>&1 ||
            cannot_start "scripts/deps-rxe.sh failed and qemu-system-x86_64 is missing"
        msg "warning: scripts/deps-rxe.sh failed; trying with what is installed"
    fi
fi
command -v qemu-system-x86_64 >/dev/null 2>&1 || cannot_start "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
BUSYBOX=/bin/busybox
[[ -x "$BUSYBOX" ]] || cannot_start "$BUSYBOX not found (apt-get install busybox-static)"
for tool in dpkg-deb depmod modprobe cpio xz flock timeout; do
    command -v "$tool" >/dev/null 2>&1 || cannot_start "$tool not found (run scripts/deps-rxe.sh)"
done

# ---------------------------------------------------------------- cache: kernel + initramfs
CACHE=${RXEVM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/shardcast-rxevm}
mkdir -p "$CACHE/runs" || cannot_start "cannot create the cache dir $CACHE"
CACHE=$(cd "$CACHE" && pwd -P)
# The run dir goes on the kernel command line: keep it free of spaces and odd characters.
[[ "$CACHE" =~ ^[A-Za-z0-9._/+-]+$ ]] || cannot_start "cache path '$CACHE' has unusual characters; set RXEVM_CACHE"

exec {LOCKFD}>"$CACHE/lock"
flock -w 900 "$LOCKFD" || cannot_start "timed out waiting for the cache lock $CACHE/lock"

# Runs killed hard leave their run dirs behind: drop those older than a day.
find "$CACHE/runs" -mindepth 1 -maxdepth 1 -name 'run.*' -mmin +1440 -exec rm -rf {} + 2>/dev/null || true

# Modules for the initramfs, loaded in this order (dependencies first, from modprobe
# --show-depends). crc32: rxe's ICRC uses the crypto API's "crc32" and has no module dependency on
# an implementation, and there is no modprobe in the initramfs to auto-load one.
MODULES=(crc32_generic crc32-pclmul udp_tunnel ip6_udp_tunnel ib_core ib_uverbs rdma_rxe virtio_ring virtio
    9pnet 9pnet_virtio netfs fscache 9p virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover
    net_failover virtio_net veth overlay)
# Module trees extracted from the kernel package (everything the modules above can depend on).
MODULE_TREES=(drivers/infiniband drivers/virtio drivers/net/veth.ko drivers/net/virtio_net.ko
    drivers/net/net_failover.ko net fs crypto arch lib)

resolve_kernel_pkg() {
    # linux-image-amd64 -> linux-image-6.1.0-56-amd64
    apt-cache depends linux-image-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -1
}

apt_update() {
    if [[ $(id -u) -eq 0 ]]; then
        msg "apt-get update"
        apt-get update -q >&2 || true
    fi
}

kernel_pkg() {
    local pkg marker="$CACHE/kernel-pkg" age
    if [[ -n "${RXEVM_KERNEL_PKG:-}" ]]; then
        echo "$RXEVM_KERNEL_PKG"
        return
    fi
    # apt-cache takes ~1 s: remember the answer for a day.
    if [[ -s "$marker" ]]; then
        age=$(($(date +%s) - $(stat -c %Y "$marker")))
        if ((age < 86400)); then
            cat "$marker"
            return
        fi
    fi
    pkg=$(resolve_kernel_pkg)
    if [[ -z "$pkg" ]]; then
        apt_update
        pkg=$(resolve_kernel_pkg)
    fi
    if [[ -z "$pkg" && -s "$marker" ]]; then
        pkg=$(cat "$marker") # offline: keep using the last one
    fi
    [[ -n "$pkg" ]] || return 1
    echo "$pkg" >"$marker"
    echo "$pkg"
}

# fetch_kernel PKG KVER DIR: download PKG, extract boot/ and the module trees into DIR, depmod,
# and cut the ELF vmlinux out of the bzImage.
fetch_kernel() {
    local pkg=$1 kver=$2 dir=$3 dl deb off t0 pats=() t
    t0=$(now_us)
    dl=$(mktemp -d "$CACHE/dl.XXXXXX")
    local aptopts=()
    [[ $(id -u) -ne 0 ]] || aptopts=(-o APT::Sandbox::User=root)
    if ! (cd "$dl" && apt-get download -q "${aptopts[@]}" "$pkg" >&2); then
        msg "apt-get download $pkg failed; refreshing the package lists and retrying"
        apt_update
        local again
        again=$(resolve_kernel_pkg)
        if [[ -n "$again" && "$again" != "$pkg" && -z "${RXEVM_KERNEL_PKG:-}" ]]; then
            rm -rf "$dl"
            echo "$again" >"$CACHE/kernel-pkg"
            return 10 # caller re-resolves
        fi
        (cd "$dl" && apt-get download -q "${aptopts[@]}" "$pkg" >&2) || { rm -rf "$dl"; return 1; }
    fi
    deb=$(echo "$dl"/*.deb)
    [[ -f "$deb" ]] || { rm -rf "$dl"; return 1; }
    rm -rf "$dir.tmp"
    mkdir -p "$dir.tmp"
    pats=("./boot/vmlinuz-$kver" "./boot/config-$kver" "./lib/modules/$kver/modules.*")
    for t in "${MODULE_TREES[@]}"; do pats+=("./lib/modules/$kver/kernel/$t"); done
    if ! dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$dir.tmp" --wildcards "${pats[@]}"; then
        rm -rf "$dl" "$dir.tmp"
        return 1
    fi
    rm -rf "$dl"
    depmod -b "$dir.tmp" "$kver" || { rm -rf "$dir.tmp"; return 1; }
    # PVH boot (pitfall 6): the xz payload of the bzImage is the ELF vmlinux.
    local bz="$dir.tmp/boot/vmlinuz-$kver"
    off=$(LC_ALL=C grep -abo $'\xfd7zXZ' "$bz" | head -1 | cut -d: -f1 || true)
    # (xz stops reading at the end of the stream, so tail may die of SIGPIPE: not a pipeline.)
    if [[ -n "$off" ]] && xz -dc --single-stream >"$dir.tmp/vmlinux" 2>/dev/null < <(tail -c +$((off + 1)) "$bz") &&
        [[ "$(head -c 4 "$dir.tmp/vmlinux" | od -An -c | tr -d ' ')" == '177ELF' ]]; then
        :
    else
        msg "warning: could not extract an ELF vmlinux from the bzImage; booting the bzImage (slower)"
        rm -f "$dir.tmp/vmlinux"
    fi
    rm -rf "$dir"
    mv "$dir.tmp" "$dir"
    msg "kernel $kver fetched and extracted in $((($(now_us) - t0) / 1000)) ms"
}

PKG=$(kernel_pkg) || cannot_start "cannot resolve linux-image-amd64's kernel package (apt-cache depends linux-image-amd64)"
KVER=${PKG#linux-image-}
KDIR="$CACHE/kernel-$KVER"
if [[ ! -f "$KDIR/boot/vmlinuz-$KVER" ]]; then
    rc=0
    fetch_kernel "$PKG" "$KVER" "$KDIR" || rc=$?
    if ((rc == 10)); then
        PKG=$(kernel_pkg) || cannot_start "cannot resolve linux-image-amd64's kernel package"
        KVER=${PKG#linux-image-}
        KDIR="$CACHE/kernel-$KVER"
        rc=0
        [[ -f "$KDIR/boot/vmlinuz-$KVER" ]] || fetch_kernel "$PKG" "$KVER" "$KDIR" || rc=$?
    fi
    ((rc == 0)) || cannot_start "could not download/extract the guest kernel $PKG (apt-get download $PKG)"
fi
KERNEL="$KDIR/vmlinux"
[[ -f "$KERNEL" ]] || KERNEL="$KDIR/boot/vmlinuz-$KVER"

# /init of the initramfs (busybox sh). Kept in a quoted heredoc: nothing here expands on the host.
INIT_SCRIPT=$(
    cat <<'INIT'
#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /bin /sbin /usr/bin /usr/sbin /lower /rw /newroot
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
stamp() { read -r up _ </proc/uptime; echo "rxevm-init: $up s: $*"; }
stamp "init started"
fail() {
    echo "RXEVM-INIT-FAILED: $*"
    poweroff -f
    reboot -f
    exit 1
}
job=
norxe=
# shellcheck disable=SC2013  # words, not lines
for w in $(cat /proc/cmdline); do
    case "$w" in
        rxevm.job=*) job=${w#rxevm.job=} ;;
        rxevm.norxe) norxe=1 ;;
    esac
done
while read -r m; do
    [ -n "$norxe" ] && [ "$m" = rdma_rxe ] && continue
    insmod "/lib/modules/$m.ko" || echo "rxevm-init: insmod $m failed"
done </etc/rxevm-modules
stamp "modules loaded"
i=0
until mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=none hostroot /lower; do
    i=$((i + 1))
    [ "$i" -lt 30 ] || fail "cannot mount the host's root over 9p"
    sleep 0.1
done
mount -t tmpfs -o mode=0755 rw /rw
mkdir -p /rw/upper /rw/work
if ! mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot; then
    echo "rxevm-init: overlay failed: read-only root with tmpfs on /tmp, /var/tmp and /root"
    mount --bind /lower /newroot
    for d in tmp var/tmp root; do mount -t tmpfs -o mode=1777 tmpfs "/newroot/$d"; done
fi
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
ln -s /proc/self/fd /newroot/dev/fd
ln -s /proc/self/fd/0 /newroot/dev/stdin
ln -s /proc/self/fd/1 /newroot/dev/stdout
ln -s /proc/self/fd/2 /newroot/dev/stderr
mount -t devpts -o newinstance,ptmxmode=0666 devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 shm /newroot/dev/shm
mount -t tmpfs -o mode=0755 run /newroot/run
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup 2>/dev/null
mkdir -p /newroot/run/rxevm/host
mount --bind /lower /newroot/run/rxevm/host
stamp "root mounted"
[ -n "$job" ] || fail "no rxevm.job= on the kernel command line"
[ -f "/newroot/run/rxevm/host$job" ] || fail "job script $job is not visible in the guest"
/bin/busybox env -i /bin/busybox chroot /newroot /bin/bash "/run/rxevm/host$job"
echo "RXEVM-EXIT-STATUS: $?"
poweroff -f
reboot -f
INIT
)

INITRD_KEY=$( {
    echo "$KVER"
    echo "${MODULES[*]}"
    echo "$INIT_SCRIPT"
    stat -c '%s %Y' "$BUSYBOX"
} | sha256sum | cut -c1-16)
INITRD="$CACHE/initrd-$KVER-$INITRD_KEY.cpio"

build_initrd() {
    local st m line f mods=() seen=" "
    st=$(mktemp -d "$CACHE/initrd.XXXXXX")
    mkdir -p "$st/bin" "$st/lib/modules" "$st/etc" "$st/dev"
    cp "$BUSYBOX" "$st/bin/busybox"
    printf '%s\n' "$INIT_SCRIPT" >"$st/init"
    chmod 0755 "$st/init"
    # The kernel opens /dev/console for init before anything is mounted.
    [[ $(id -u) -ne 0 ]] || mknod -m 0600 "$st/dev/console" c 5 1 2>/dev/null || true
    for m in "${MODULES[@]}"; do
        local deps
        deps=$(modprobe -d "$KDIR" -S "$KVER" --show-depends "$m" 2>&1) || {
            msg "modprobe --show-depends $m: $deps"
            rm -rf "$st"
            return 1
        }
        while read -r line; do
            [[ "$line" == insmod\ * ]] || continue # "builtin X" needs nothing
            f=${line#insmod }
            f=${f%% *}
            local name
            name=$(basename "$f" .ko)
            [[ "$seen" != *" $name "* ]] || continue
            seen+="$name "
            case "$f" in
                *.ko) cp "$f" "$st/lib/modules/$name.ko" ;;
                *) msg "unexpected module file $f"; rm -rf "$st"; return 1 ;;
            esac
            mods+=("$name")
        done <<<"$deps"
    done
    printf '%s\n' "${mods[@]}" >"$st/etc/rxevm-modules"
    # Uncompressed cpio: nothing to decompress under TCG.
    (cd "$st" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) >"$INITRD.tmp" || { rm -rf "$st"; return 1; }
    mv "$INITRD.tmp" "$INITRD"
    rm -rf "$st"
    # Older initramfs builds are dead weight.
    find "$CACHE" -maxdepth 1 -name 'initrd-*.cpio' ! -name "${INITRD##*/}" -delete 2>/dev/null || true
}
if [[ ! -s "$INITRD" ]]; then
    build_initrd || cannot_start "could not build the initramfs from $KDIR"
    vlog "initramfs $INITRD built"
fi

if ((PREPARE)); then
    msg "cache ready: kernel $KERNEL, initramfs $INITRD"
    exit 0
fi
RUN=$(mktemp -d "$CACHE/runs/run.XXXXXX")
exec {LOCKFD}>&- # the cache is ready; concurrent VMs may start now

# ---------------------------------------------------------------- clean-up
QEMU_WRAP_PID=
CLOCK_PID=
REAPER_PID=
# shellcheck disable=SC2317  # invoked through the EXIT trap
cleanup() {
    local rc=$? p comm
    trap - EXIT INT TERM HUP
    for p in "$CLOCK_PID" "$REAPER_PID"; do
        [[ -z "$p" ]] || kill "$p" 2>/dev/null || true
    done
    # Only a QEMU of ours (the PID of one that exited may have been reused).
    if [[ -s "$RUN/qemu.pid" ]] && read -r p <"$RUN/qemu.pid" && [[ "$p" =~ ^[0-9]+$ ]] &&
        read -r comm 2>/dev/null <"/proc/$p/comm" && [[ "$comm" == qemu* ]]; then
        kill -TERM "$p" 2>/dev/null || true
    fi
    if [[ -n "$QEMU_WRAP_PID" ]]; then
        # The wrapper subshell, and the `timeout` under it.
        for p in $(pgrep -P "$QEMU_WRAP_PID" 2>/dev/null) "$QEMU_WRAP_PID"; do
            kill -TERM "$p" 2>/dev/null || true
        done
    fi
    if [[ -n "${RXEVM_KEEP:-}" ]]; then
        msg "run dir kept: $RUN"
    else
        rm -rf "$RUN"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# ---------------------------------------------------------------- the guest's job
# Host variables handed to the guest, as NAME=value words.
# Everything cargo tracks goes too (CARGO_INCREMENTAL, CARGO_PROFILE_*, RUSTFLAGS, ...): a
# `cargo test` in the guest whose environment differs from the host build's rebuilds, under TCG.
PASS=(PATH HOME USER LOGNAME LANG LC_ALL TZ TMPDIR RUSTUP_HOME RUSTUP_TOOLCHAIN RUSTFLAGS RUSTDOCFLAGS RUSTC
      RUSTC_WRAPPER RUSTC_BOOTSTRAP)
while IFS= read -r name; do
    case "$name" in CARGO_* | RUST_* | SHARDCAST_*) PASS+=("$name") ;; esac
done < <(compgen -e)
if [[ -n "${RXEVM_PASS_ENV:-}" ]]; then
    read -r -a extra <<<"$RXEVM_PASS_ENV"
    PASS+=("${extra[@]}")
fi
GUEST_ENV=()
for name in "${PASS[@]}"; do
    [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
    [[ -n "${!name+x}" ]] || continue
    GUEST_ENV+=("$name=${!name}")
done
if [[ "$TTY" == 1 ]]; then GUEST_ENV+=("TERM=${TERM:-linux}"); else GUEST_ENV+=("TERM=dumb"); fi

JOB_BODY=$(
    cat <<'JOB'
set -u
H=/run/rxevm/host
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
exec {_SLP}<> <(:) # read -t on this fd sleeps without forking a `sleep` (processes are slow under TCG)
nap() { read -r -t "$1" -u "$_SLP" _ || true; }
info() { echo "RXEVM-INFO: $*"; }
rxe_fail() {
    echo "RXEVM-RXE-UNAVAILABLE: $*"
    exit 3
}
init_fail() {
    echo "RXEVM-INIT-FAILED: $*"
    exit 125
}

# Clock: the host rewrites $RUN/clock every 20 ms until we are ready.
for ((i = 0; i < 50; i++)); do
    t=
    read -r t 2>/dev/null <"$H$RXEVM_RUN/clock" || true
    [[ -z "$t" ]] || break
    nap 0.02
done
[[ -z "$t" ]] || date -s "@$t" >/dev/null || true
t0=${EPOCHREALTIME/[.,]/}

# gid_index DEV IPV4: prints the RoCEv2 GID index whose GID is IPV4 (::ffff:a.b.c.d); waits up to
# ~5 s for the GID table to fill. _gid_lookup sets GID_INDEX instead (no subshell).
# shellcheck disable=SC2317  # exported for CMD
gid_index() {
    local GID_INDEX
    _gid_lookup "$@" || return 1
    echo "$GID_INDEX"
}
_gid_lookup() {
    local dev=$1 ip=$2 want g t i n try a b c d
    local p=/sys/class/infiniband/$dev/ports/1
    IFS=. read -r a b c d <<<"$ip"
    printf -v want '0000:0000:0000:0000:0000:ffff:%02x%02x:%02x%02x' "$a" "$b" "$c" "$d"
    for ((try = 0; try < 100; try++)); do
        n=16
        ((try % 10 != 9)) || n=1024 # the usual place is index 1; scan everything now and then
        for ((i = 0; i < n; i++)); do
            read -r g 2>/dev/null <"$p/gids/$i" || break
            [[ "$g" == "$want" ]] || continue
            read -r t 2>/dev/null <"$p/gid_attrs/types/$i" || continue
            if [[ "$t" == "RoCE v2" ]]; then
                GID_INDEX=$i
                return 0
            fi
        done
        if [[ -n "${_SLP:-}" ]]; then nap 0.05; else sleep 0.05; fi
    done
    echo "gid_index: no RoCE v2 GID for $ip on $dev" >&2
    return 1
}
# rxevm_wait_listen PORT [SECONDS]: wait until something listens on TCP PORT.
rxevm_wait_listen() {
    local port=$1 secs=${2:-30} end
    end=$((SECONDS + secs))
    while ((SECONDS < end)); do
        [[ -z "$(ss -Hltn "sport = :$port" 2>/dev/null)" ]] || return 0
        sleep 0.1
    done
    echo "rxevm_wait_listen: nothing listens on TCP port $port after ${secs}s" >&2
    return 1
}
export -f gid_index _gid_lookup rxevm_wait_listen

# ---- networks and rxe devices
has_net() { [[ " ${RXEVM_NETS[*]} " == *" $1 "* ]]; }
batch="link set lo up"$'\n'
if has_net eth; then
    [[ -e /sys/class/net/eth0 ]] || rxe_fail "no eth0 in the guest (virtio_net not loaded?)"
    batch+="addr add 198.18.0.1/24 dev eth0
link set eth0 mtu 9000 up
"
fi
if has_net veth; then
    # Both addresses are local, so by default the kernel routes between them via lo and rxe cannot
    # connect QPs. Demote the local table, and send traffic whose output device is set (rxe sets
    # it) out of the veth through table 100.
    batch+="link add veth0 mtu 9000 type veth peer name veth1 mtu 9000
addr add 198.18.1.1/24 dev veth0
addr add 198.18.1.2/24 dev veth1
link set veth0 up
link set veth1 up
rule add pref 100 lookup local
rule del pref 0
route add 198.18.1.2/32 dev veth0 src 198.18.1.1 table 100
route add 198.18.1.1/32 dev veth1 src 198.18.1.2 table 100
rule add pref 10 oif veth0 lookup 100
rule add pref 11 oif veth1 lookup 100
link add vethw0 mtu 9000 type veth peer name vethw1 mtu 9000
addr add 198.18.2.1/24 dev vethw0
addr add 198.18.2.2/24 dev vethw1
link set vethw0 up
link set vethw1 up
route add 198.18.2.2/32 dev vethw0 src 198.18.2.1 table 100
route add 198.18.2.1/32 dev vethw1 src 198.18.2.2 table 100
rule add pref 12 oif vethw0 lookup 100
rule add pref 13 oif vethw1 lookup 100
"
fi
ip -batch - <<<"$batch" >/run/rxevm/ip.log 2>&1 || rxe_fail "network set-up failed: $(tr '\n' ' ' </run/rxevm/ip.log)"
if has_net veth; then
    for c in all default veth0 veth1 vethw0 vethw1; do
        echo 1 >"/proc/sys/net/ipv4/conf/$c/accept_local"
        echo 0 >"/proc/sys/net/ipv4/conf/$c/rp_filter"
    done
fi

rxe_add() { # NAME NETDEV
    rdma link add "$1" type rxe netdev "$2" >/run/rxevm/rdma.log 2>&1 && return 0
    [[ -d /sys/module/rdma_rxe ]] || rxe_fail "rdma_rxe is not loaded in the guest kernel"
    rxe_fail "rdma link add $1 type rxe netdev $2: $(tr '\n' ' ' </run/rxevm/rdma.log)"
}
port_active() { # DEV
    local s i
    for ((i = 0; i < 200; i++)); do
        s=
        read -r s 2>/dev/null <"/sys/class/infiniband/$1/ports/1/state" || true
        [[ "$s" != *ACTIVE* ]] || return 0
        nap 0.05
    done
    rxe_fail "$1: port not ACTIVE after 10 s (state '$s')"
}
gid_of() { # DEV IP -> sets G
    _gid_lookup "$1" "$2" 2>/dev/null || rxe_fail "$1: no RoCE v2 GID for $2"
    G=$GID_INDEX
}
devs=()
if has_net eth; then rxe_add rxe_eth0 eth0; devs+=(rxe_eth0); fi
if has_net veth; then
    rxe_add rxe_v0 veth0
    rxe_add rxe_v1 veth1
    rxe_add rxe_w0 vethw0
    rxe_add rxe_w1 vethw1
    devs+=(rxe_v0 rxe_v1 rxe_w0 rxe_w1)
fi
for d in "${devs[@]}"; do port_active "$d"; done

export RXEVM=1 RXEVM_NET RXEVM_HOST=$H
IFS=,
RXEVM_NET="${RXEVM_NETS[*]}"
IFS=$' \t\n'
[[ -n "$RXEVM_NET" ]] || RXEVM_NET=none
summary=
# rxe_vars PREFIX SUFFIX DEV IP: exports RXEVM_<PREFIX>DEV<SUFFIX>, ..IP.., ..GID.. (GID in $G).
rxe_vars() { export "RXEVM_$1DEV$2=$3" "RXEVM_$1IP$2=$4" "RXEVM_$1GID$2=$G"; }
# rxe_dev PREFIX SUFFIX DEV IP: looks up DEV's GID for IP, exports it as rxe_vars does, and
# adds it to the summary.
rxe_dev() { gid_of "$3" "$4"; rxe_vars "$@"; summary+=" $3=$4/gid$G"; }
if has_net eth; then
    rxe_dev LO_ "" rxe_eth0 198.18.0.1
    rxe_vars "" "" rxe_eth0 198.18.0.1
    rxe_vars PEER_ "" rxe_eth0 198.18.0.1
fi
if has_net veth; then
    rxe_dev "" "" rxe_v0 198.18.1.1
    rxe_dev PEER_ "" rxe_v1 198.18.1.2
    rxe_dev "" 2 rxe_w0 198.18.2.1
    rxe_dev PEER_ 2 rxe_w1 198.18.2.2
fi
t1=${EPOCHREALTIME/[.,]/}
read -r up _ </proc/uptime
info "net ${RXEVM_NET}:${summary:- no rxe devices}; set-up $(((t1 - t0) / 1000)) ms, guest uptime ${up} s"

# ---- the command's environment: the host's variables, nothing of init's
# shellcheck disable=SC2163  # NAME=value words
for kv in "${RXEVM_ENV[@]}"; do export "$kv"; done
for d in /usr/local/sbin /usr/sbin /sbin; do # ip, rdma, ... for CMD too
    [[ ":$PATH:" == *":$d:"* ]] || PATH+=":$d"
done
cd "$RXEVM_CWD" 2>/dev/null || init_fail "cannot cd to $RXEVM_CWD in the guest"

# ---- self-test (no CMD)
st_fail=0
st_ok() { echo "selftest: ok   $*"; }
st_bad() { echo "selftest: FAIL $*"; st_fail=1; }
# pair NAME SERVER_ARGS -- CLIENT_ARGS: server in the background, client once it listens.
pair() {
    local name=$1 srv=() cli=() rc_s rc_c spid
    shift
    while (($#)) && [[ "$1" != -- ]]; do srv+=("$1"); shift; done
    shift
    cli=("$@")
    timeout -k 5 120 "${srv[@]}" >"/run/rxevm/$name.srv" 2>&1 &
    spid=$!
    if ! rxevm_wait_listen "${PAIR_PORT:-18515}" 60 2>/dev/null; then
        kill "$spid" 2>/dev/null
        wait "$spid"
        st_bad "$name: server never listened: $(tail -3 "/run/rxevm/$name.srv" | tr '\n' ' ')"
        return 1
    fi
    timeout -k 5 120 "${cli[@]}" >"/run/rxevm/$name.cli" 2>&1
    rc_c=$?
    wait "$spid"
    rc_s=$?
    if ((rc_c != 0 || rc_s != 0)); then
        st_bad "$name: client rc $rc_c, server rc $rc_s: $(tail -3 "/run/rxevm/$name.cli" | tr '\n' ' ')"
        return 1
    fi
}
check_pingpong() { # NAME
    local l found=0
    while read -r l; do
        if [[ "$l" =~ ^([0-9]+)\ iters\ in\ ([0-9.]+)\ seconds\ =\ ([0-9.]+)\ usec/iter ]] &&
            ((BASH_REMATCH[1] > 0)); then
            found=1
            st_ok "$1: ${BASH_REMATCH[1]} iters, ${BASH_REMATCH[3]} usec/iter"
        fi
    done <"/run/rxevm/$1.cli"
    ((found)) || st_bad "$1: no 'N iters' line with N > 0: $(tail -3 "/run/rxevm/$1.cli" | tr '\n' ' ')"
}
check_bw() { # NAME
    local l hdr=0 found=0
    while read -r l; do
        if [[ "$l" == *"#bytes"*"#iterations"* ]]; then
            hdr=1
            continue
        fi
        ((hdr)) || continue
        if [[ "$l" =~ ^([0-9]+)[[:space:]]+([0-9]+)[[:space:]]+([0-9.]+)[[:space:]]+([0-9.]+)[[:space:]]+([0-9.]+) ]]; then
            hdr=0
            local bytes=${BASH_REMATCH[1]} iters=${BASH_REMATCH[2]} avg=${BASH_REMATCH[4]}
            if ((iters > 0)) && [[ "$avg" =~ [1-9] ]]; then
                found=1
                st_ok "$1: $bytes B x $iters iterations, $avg Gb/s average"
            fi
        fi
    done <"/run/rxevm/$1.cli"
    ((found)) || st_bad "$1: no result line with iterations > 0 and bandwidth > 0: $(tail -3 "/run/rxevm/$1.cli" | tr '\n' ' ')"
}
selftest() {
    local out d rx0 rx1
    if ((${#devs[@]} == 0)); then
        echo "selftest: --net none: no rxe devices to test"
        return 0
    fi
    out=$(timeout 60 ibv_devices 2>&1)
    for d in "${devs[@]}"; do
        if [[ "$out" == *"$d"* ]]; then st_ok "ibv_devices lists $d"; else st_bad "ibv_devices does not list $d: $out"; fi
    done
    out=$(timeout 60 ibv_devinfo -d "${devs[0]}" 2>&1)
    if [[ "$out" == *PORT_ACTIVE* ]]; then
        st_ok "ibv_devinfo ${devs[0]}: PORT_ACTIVE, $(grep -o 'active_mtu:.*' <<<"$out" | tr -s ' \t' ' ')"
    else
        st_bad "ibv_devinfo ${devs[0]}: $out"
    fi
    if has_net veth; then
        read -r rx0 </sys/class/net/veth0/statistics/rx_bytes
        pair pingpong-veth ibv_rc_pingpong -d rxe_v0 -g "$RXEVM_GID" -n 200 -s 4096 -- \
            ibv_rc_pingpong -d rxe_v1 -g "$RXEVM_PEER_GID" -n 200 -s 4096 198.18.1.1 &&
            check_pingpong pingpong-veth
        pair write_bw-veth ib_write_bw -d rxe_v0 -x "$RXEVM_GID" -s 65536 -n 300 -F --report_gbits -- \
            ib_write_bw -d rxe_v1 -x "$RXEVM_PEER_GID" -s 65536 -n 300 -F --report_gbits 198.18.1.1 &&
            check_bw write_bw-veth
        read -r rx1 </sys/class/net/veth0/statistics/rx_bytes
        if ((rx1 - rx0 > 10000000)); then
            st_ok "veth0 received $(((rx1 - rx0) >> 20)) MiB (RoCE packets crossed the veth)"
        else
            st_bad "veth0 received only $((rx1 - rx0)) bytes"
        fi
        # The second rail alone, then both rails at once (two ib_write_bw pairs on two ports).
        read -r rx0 </sys/class/net/vethw0/statistics/rx_bytes
        pair write_bw-vethw ib_write_bw -d rxe_w0 -x "$RXEVM_GID2" -s 65536 -n 300 -F --report_gbits -- \
            ib_write_bw -d rxe_w1 -x "$RXEVM_PEER_GID2" -s 65536 -n 300 -F --report_gbits 198.18.2.1 &&
            check_bw write_bw-vethw
        local r0 w0 r1 w1
        read -r r0 </sys/class/net/veth0/statistics/rx_bytes
        read -r w0 </sys/class/net/vethw0/statistics/rx_bytes
        pair write_bw-both0 ib_write_bw -d rxe_v0 -x "$RXEVM_GID" -s 65536 -n 300 -F --report_gbits -- \
            ib_write_bw -d rxe_v1 -x "$RXEVM_PEER_GID" -s 65536 -n 300 -F --report_gbits 198.18.1.1 &
        local both0=$!
        PAIR_PORT=18516 pair write_bw-both1 ib_write_bw -p 18516 -d rxe_w0 -x "$RXEVM_GID2" -s 65536 -n 300 -F \
            --report_gbits -- ib_write_bw -p 18516 -d rxe_w1 -x "$RXEVM_PEER_GID2" -s 65536 -n 300 -F \
            --report_gbits 198.18.2.1 && check_bw write_bw-both1
        if wait "$both0"; then check_bw write_bw-both0; else st_bad "write_bw-both0 failed"; fi
        read -r r1 </sys/class/net/veth0/statistics/rx_bytes
        read -r w1 </sys/class/net/vethw0/statistics/rx_bytes
        if ((r1 - r0 > 10000000 && w1 - w0 > 10000000)); then
            st_ok "both rails at once: veth0 $(((r1 - r0) >> 20)) MiB, vethw0 $(((w1 - w0) >> 20)) MiB"
        else
            st_bad "both rails at once: veth0 got $((r1 - r0)) bytes, vethw0 $((w1 - w0))"
        fi
    fi
    if has_net eth; then
        pair write_bw-eth ib_write_bw -d rxe_eth0 -x "$RXEVM_LO_GID" -s 65536 -n 300 -F --report_gbits -- \
            ib_write_bw -d rxe_eth0 -x "$RXEVM_LO_GID" -s 65536 -n 300 -F --report_gbits 198.18.0.1 &&
            check_bw write_bw-eth
    fi
    if ((st_fail)); then
        echo "selftest: FAILED"
        return 1
    fi
    echo "selftest: PASSED"
}

echo "RXEVM-CLOCK: $EPOCHREALTIME"
echo "RXEVM-READY"
if ((${#RXEVM_CMD[@]} == 0)); then
    selftest </dev/null 2>&1 | cat
    exit "${PIPESTATUS[0]}"
fi
if ((RXEVM_TTY)); then
    "${RXEVM_CMD[@]}" </dev/null
    exit $?
fi
"${RXEVM_CMD[@]}" </dev/null 2>&1 | cat
exit "${PIPESTATUS[0]}"
JOB
)

{
    echo '#!/bin/bash'
    echo '# rxe-vm guest job, generated by scripts/rxe-vm.sh. Runs only inside the rxe-vm guest.'
    # First thing: refuse to run anywhere but in the guest (it changes routing and sysctls).
    echo 'read -r _c </proc/cmdline || true'
    # shellcheck disable=SC2016  # written into the guest's script verbatim
    echo 'case " $_c " in *" rxevm.job="*) ;; *) echo "rxe-vm job: refusing to run outside the rxe-vm guest (no rxevm.job= in /proc/cmdline)" >&2; exit 99 ;; esac'
    printf 'RXEVM_RUN=%q\n' "$RUN"
    printf 'RXEVM_CWD=%q\n' "$PWD"
    printf 'RXEVM_TTY=%q\n' "$TTY"
    printf 'RXEVM_NETS=('
    ((${#NETS[@]} == 0)) || printf '%q ' "${NETS[@]}"
    printf ')\n'
    printf 'RXEVM_ENV=('
    printf '%q ' "${GUEST_ENV[@]}"
    printf ')\n'
    printf 'RXEVM_CMD=('
    ((${#CMD[@]} == 0)) || printf '%q ' "${CMD[@]}"
    printf ')\n'
    printf '%s\n' "$JOB_BODY"
} >"$RUN/job.sh"

# ---------------------------------------------------------------- QEMU
APPEND="console=ttyS0 panic=-1 rxevm.job=$RUN/job.sh"
if [[ -n "${RXEVM_VERBOSE:-}" ]]; then APPEND+=" loglevel=6"; else APPEND+=" quiet loglevel=3"; fi
if [[ -n "${RXEVM_NO_RXE:-}" ]]; then APPEND+=" rxevm.norxe"; fi
if [[ "$ACCEL" == tcg ]]; then
    # shellcheck disable=SC2054  # commas are QEMU's
    ACCEL_ARGS=(-accel tcg,thread=multi,tb-size=512 -cpu max,-erms,-fsrm)
    APPEND+=" clocksource=tsc tsc=reliable" # HPET reads cost ~770 ns under TCG, TSC ~55 ns
    # The kernel's check that the IO-APIC timer ticks gives up after a few emulated jiffies; on a
    # loaded host (load average ~18 while other builds ran) TCG misses it and the guest panics
    # with "IO-APIC + timer doesn't work!" before /init. Skip the check (as cloud guests do).
    APPEND+=" no_timer_check"
else
    ACCEL_ARGS=(-accel kvm -cpu host)
fi
# shellcheck disable=SC2054  # commas are QEMU's
QEMU=(qemu-system-x86_64 "${ACCEL_ARGS[@]}" -smp "$SMP" -m "$MEM"
    -nodefaults -no-user-config -display none -no-reboot -pidfile "$RUN/qemu.pid"
    -chardev stdio,id=con,signal=off -serial chardev:con
    -kernel "$KERNEL" -initrd "$INITRD" -append "$APPEND"
    -fsdev "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap"
    -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot
    -netdev hubport,id=n0,hubid=0 -device virtio-net-pci,netdev=n0,speed=10000,duplex=full)
vlog "accel $ACCEL, kernel $KERNEL, initrd $INITRD, run dir $RUN"

# The guest sets its clock from this file; rewrite it every 20 ms until the guest is ready.
mkfifo "$RUN/console"
(
    trap - EXIT INT TERM HUP
    exec {slp}<> <(:)
    while :; do
        printf '%s\n' "${EPOCHREALTIME/,/.}" >"$RUN/clock"
        read -r -t 0.02 -u "$slp" _ || true
    done
) &
CLOCK_PID=$!

T0=$(now_us)
# In a subshell whose stderr is /dev/null: bash's "Aborted" notice when QEMU dies of a signal (it
# aborts at once on PVM with --accel kvm) goes nowhere; the status is reported below instead.
(
    trap - EXIT INT TERM HUP
    timeout -k 5 "$TIMEOUT" "${QEMU[@]}" </dev/null >"$RUN/console" 2>"$RUN/qemu.stderr" || exit $?
) 2>/dev/null &
QEMU_WRAP_PID=$!
exec {CON}<"$RUN/console"
exec {LOG}>"$RUN/console.log"

ready=0 status='' rxe_reason='' init_reason='' lines=0 rss='' guest_clock='' offset=''
while IFS= read -r -u "$CON" line || [[ -n "$line" ]]; do
    line=${line%$'\r'}
    lines=$((lines + 1))
    printf '%s\n' "$line" >&"$LOG"
    if [[ "$line" =~ ^(.*)RXEVM-EXIT-STATUS:\ ([0-9]+)$ ]]; then
        [[ -z "${BASH_REMATCH[1]}" ]] || printf '%s' "${BASH_REMATCH[1]}"
        status=${BASH_REMATCH[2]}
        # QEMU is still up until the guest powers off: note its peak RSS.
        if [[ -s "$RUN/qemu.pid" ]] && read -r qp <"$RUN/qemu.pid"; then
            if [[ -r "/proc/$qp/status" ]]; then
                while read -r k v _; do [[ "$k" != VmHWM: ]] || rss=$((v / 1024)); done <"/proc/$qp/status" || true
            fi
            # Give the guest 15 s to power off before killing QEMU.
            (
                trap - EXIT INT TERM HUP
                exec {slp}<> <(:)
                read -r -t 15 -u "$slp" _ || true
                kill -TERM "$qp" 2>/dev/null
            ) &
            REAPER_PID=$!
        fi
        continue
    fi
    if ((!ready)); then
        case "$line" in
            RXEVM-READY*)
                ready=1
                ms=$((($(now_us) - T0) / 1000))
                kill "$CLOCK_PID" 2>/dev/null || true
                CLOCK_PID=
                if [[ -n "$guest_clock" ]]; then
                    offset=$((guest_clock - $(now_us)))
                    offset=" (guest clock offset $((offset / 1000)) ms)"
                fi
                msg "guest ready $ms ms${offset}"
                echo "RXEVM-READY" >&2
                ;;
            RXEVM-CLOCK:*)
                guest_clock=${line#RXEVM-CLOCK: }
                guest_clock=${guest_clock/[.,]/}
                [[ "$guest_clock" =~ ^[0-9]+$ ]] && guest_clock=$((10#$guest_clock)) || guest_clock=
                ;;
            RXEVM-INFO:*) msg "${line#RXEVM-INFO: }" ;;
            RXEVM-RXE-UNAVAILABLE:*) rxe_reason=${line#RXEVM-RXE-UNAVAILABLE: } ;;
            RXEVM-INIT-FAILED:*) init_reason=${line#RXEVM-INIT-FAILED: } ;;
            *) vlog "guest: $line" ;;
        esac
    elif [[ -z "$status" ]]; then
        printf '%s\n' "$line"
    else
        vlog "guest: $line" # power-off messages after the status
    fi
done
exec {CON}<&-
qrc=0
wait "$QEMU_WRAP_PID" || qrc=$?
QEMU_WRAP_PID=
total_ms=$((($(now_us) - T0) / 1000))

log_tail() {
    msg "last console lines ($RUN/console.log):"
    tail -n 25 "$RUN/console.log" | sed 's/^/  | /' >&2
    if [[ -s "$RUN/qemu.stderr" ]]; then
        msg "qemu stderr:"
        grep -v 'is not connected to host network' "$RUN/qemu.stderr" | tail -n 10 | sed 's/^/  | /' >&2 || true
    fi
}

if [[ -n "$rxe_reason" ]]; then
    msg "soft-RoCE unavailable in the guest: $rxe_reason"
    exit 3
fi
if [[ -n "$status" ]]; then
    echo "RXEVM-EXIT-STATUS: $status" >&2
    msg "exit status $status (total $total_ms ms${rss:+, qemu peak RSS $rss MiB})"
    exit "$status"
fi
if ((qrc == 124 || qrc == 137)); then
    msg "timed out after $TIMEOUT s (--timeout); the VM was killed"
    [[ -z "${RXEVM_VERBOSE:-}" ]] || log_tail
    exit 124
fi
if [[ -n "$init_reason" ]]; then
    msg "guest set-up failed: $init_reason"
    log_tail
    exit 125
fi
if ((lines == 0 && qrc != 0)); then
    err=$(grep -v 'is not connected to host network' "$RUN/qemu.stderr" | tail -n 3 | tr '\n' ' ' || true)
    cannot_start "qemu-system-x86_64 exited with status $qrc: ${err:-no message}"
fi
msg "the guest never reported an exit status (qemu exit status $qrc)"
log_tail
exit 125

#!/usr/bin/env bash
# What the resume journal costs a push where fsync costs something: one replica whose root is
# ext4 on a loop device backed by a file on disk (not tmpfs), SIZE pushed over loopback, ROUNDS
# rounds alternating journaling on / journaling off (SHARDCAST_BENCH_NO_JOURNAL=1 on a second
# replica of the same filesystem), and, when OLD_BIN is set, a third replica running that binary
# (e.g. a build from before the journal's fsync moved off the event loop). Each push is preceded
# by `sync`, so it starts with no dirty pages. Prints the median of the push's own "seconds"
# per variant and the ratios; the raw lines go to results/journal/bench-journal-DATE.txt.
# Target (issue 13): journaling on <= 1.10 x journaling off.
# Env: SIZE (1G), ROUNDS (5), CHUNK (4M), BIN (target/release/shardcast; PROFILE=dev uses
# target/debug), OLD_BIN (unset), IMG_DIR (/var/tmp: where the image file lives; must be disk).
# Needs root (losetup, mount) and e2fsprogs (scripts/deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
SIZE=${SIZE:-1G}
ROUNDS=${ROUNDS:-5}
CHUNK=${CHUNK:-4M}
IMG_DIR=${IMG_DIR:-/var/tmp}
[[ $(id -u) -eq 0 ]] || die "needs root (losetup, mount)"
command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 missing: run scripts/deps.sh (e2fsprogs)"
if [[ "${PROFILE:-release}" == dev ]]; then
    cargo build --quiet --bin shardcast
    BIN=target/debug/shardcast
else
    cargo build --release --quiet --bin shardcast
fi
bytes=$(parse_size "$SIZE")
work=$(mktemp -d -p "$IMG_DIR" shardcast-bench-journal.XXXXXX)
cleanup_register_dir "$work"
[[ $(stat -f -c %T "$work") != tmpfs ]] || die "$IMG_DIR is tmpfs: the image must live on disk"
LOOP=""
MNT="$work/mnt"
# Unmount and detach before lib.sh's trap removes the directory.
bj_cleanup() {
    local rc=$?
    if mountpoint -q "$MNT" 2>/dev/null; then
        umount "$MNT" 2>/dev/null || umount -l "$MNT" || true
    fi
    if [[ -n "$LOOP" ]]; then losetup -d "$LOOP" || true; fi
    (exit "$rc")
    _cleanup
}
trap bj_cleanup EXIT
# Room for three replicas' current and next version, and the journals.
img_bytes=$((bytes * 7 + (512 << 20)))
truncate -s "$img_bytes" "$work/img"
LOOP=$(losetup --find --show "$work/img")
mkfs.ext4 -q -F "$LOOP"
mkdir -p "$MNT"
mount "$LOOP" "$MNT"
log "ext4 on $LOOP ($(fmt_bytes "$img_bytes")), image $work/img on $(df --output=source "$work" | tail -1)"
gen_random_file "$work/src.bin" "$bytes"
out="results/journal/bench-journal-$(date +%Y%m%d-%H%M%S).txt"
mkdir -p results/journal
{
    echo "# scripts/bench-journal.sh SIZE=$SIZE ROUNDS=$ROUNDS CHUNK=$CHUNK BIN=$BIN OLD_BIN=${OLD_BIN:-} rev $(git_rev)"
    echo "# $(uname -r), $(nproc) cores, image on $(df --output=source "$work" | tail -1)"
} >"$out"
export PYTHONPATH=$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}
BJ_BIN=$PWD/$BIN BJ_OLD=${OLD_BIN:-} BJ_MNT=$MNT BJ_SRC=$work/src.bin BJ_ROUNDS=$ROUNDS BJ_CHUNK=$CHUNK \
    BJ_OUT=$out python3 - <<'PY'
import os, subprocess
import benchlib as bl
BIN, OLD, MNT, SRC = bl.env("BJ_BIN"), bl.env("BJ_OLD"), bl.env("BJ_MNT"), bl.env("BJ_SRC")
ROUNDS, CHUNK, OUT = bl.env("BJ_ROUNDS", int), bl.env("BJ_CHUNK"), bl.env("BJ_OUT")
with bl.Replicas(BIN) as replicas, open(OUT, "a") as raw:
    def serve(binary, root, env):
        return replicas.start(os.path.join(MNT, root), ["--keep", "1"], env=env, binary=binary)[1]
    variants = [("journal on", serve(BIN, "on", {}), BIN),
                ("journal off", serve(BIN, "off", {"SHARDCAST_BENCH_NO_JOURNAL": "1"}), BIN)]
    if OLD:
        variants.append(("journal on, before", serve(OLD, "old", {}), OLD))
    res = {v[0]: [] for v in variants}
    for r in range(1, ROUNDS + 1):
        # Alternate the order of the variants from round to round.
        for kind, addr, binary in bl.alternate(r - 1, variants):
            subprocess.run(["sync"], check=True)
            j, _ = bl.push(binary, SRC, "bench", r, [addr], chunk=CHUNK)
            res[kind].append(j["seconds"])
            line = f"round {r} {kind}: {j['seconds']:.3f} s"
            print(line, flush=True)
            raw.write(line + "\n")
    lines = [f"{kind}: median {bl.median(v):.3f} s over {len(v)} pushes" for kind, v in res.items()]
    off = bl.median(res["journal off"])
    lines += [f"{kind} / journal off: {bl.median(v) / off:.3f}" for kind, v in res.items() if kind != "journal off"]
    for l in lines:
        print(l)
        raw.write(l + "\n")
PY
log "raw results in $out"

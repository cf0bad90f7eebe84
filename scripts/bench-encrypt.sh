#!/usr/bin/env bash
# What --encrypt costs on the emulated cluster (scripts/cluster.sh): pushes of SIZE bytes down a
# chain of N replicas (egress shaped to RATE), every node with the same cluster key, alternating
# a push without and one with --encrypt (so both authenticate; only the chunk encryption
# differs). Each push publishes a new version; every replica's copy is compared with the source.
# Reports the medians of the push's own "seconds" and their ratio. Target (issue 7): encrypted
# time <= 1.15 x (encryption costs at most 15 % of hop throughput at 1 Gbit/s).
#
# Env: SIZE (1G), FILES (8), N (2 replicas), REPS (5), RATE (1gbit), CHUNK (4MiB), PORT (7071),
#      SC_CLUSTER (sc), KEEP_WORK=1.
# Output: the table on stdout, also saved to results/encrypt/bench-encrypt-<date>.md.
# Needs root, iproute2, python3, cmp (scripts/deps.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

N=${N:-2}
REPS=${REPS:-5}

cluster_bench_args

# Source + two versions on each replica.
need=$(((2 * N + 1) * bytes + (512 << 20)))
cluster_bench_prepare bench-encrypt "$need"
head -c 48 /dev/urandom | base64 >"$work/cluster.key"
chmod 600 "$work/cluster.key"

log "cluster: primary + $N replicas, $RATE per node egress"
"$CLUSTER" up "$N" --rate "$RATE" >/dev/null
addrs=() roots=()
for ((k = 1; k <= N; k++)); do
    addr=$("$CLUSTER" addr "r$k")
    logf=$work/serve-r$k.log
    : >"$logf"
    "$CLUSTER" exec "r$k" env NO_COLOR=1 "$bin" serve --listen "$addr:$PORT" --root "$work/root-r$k" --keep 2 \
        --key-file "$work/cluster.key" >/dev/null 2>"$logf" &
    bg_started $!
    addrs+=("$addr:$PORT") roots+=("$work/root-r$k")
done
for ((k = 1; k <= N; k++)); do
    for ((i = 0; i < 300; i++)); do
        grep -q "listening on" "$work/serve-r$k.log" && break
        sleep 0.1
    done
    grep -q "listening on" "$work/serve-r$k.log" || die "replica r$k did not start: $(cat "$work/serve-r$k.log")"
done

mkdir -p results/encrypt
out=results/encrypt/bench-encrypt-$(date +%Y%m%d-%H%M%S).md
export PYTHONPATH=$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}
BE_BIN=$bin BE_SRC=$work/src BE_ADDRS="${addrs[*]}" BE_ROOTS="${roots[*]}" BE_REPS=$REPS BE_CHUNK=$chunk \
    BE_KEY=$work/cluster.key BE_BYTES=$bytes \
    BE_CMD="SIZE=$SIZE FILES=$FILES N=$N REPS=$REPS RATE=$RATE CHUNK=$CHUNK ./scripts/bench-encrypt.sh" \
    python3 - <<'PY' | tee "$out"
import benchlib as bl

BIN, SRC, REPS, CHUNK, BYTES = bl.env("BE_BIN"), bl.env("BE_SRC"), bl.env("BE_REPS", int), bl.env("BE_CHUNK", int), bl.env("BE_BYTES", int)
ADDRS, ROOTS = bl.env("BE_ADDRS").split(), bl.env("BE_ROOTS").split()
PRIMARY = ["scripts/cluster.sh", "exec", "p"]

def push(version, encrypt):
    extra = ["--transport", "tcp", "--key-file", bl.env("BE_KEY")] + (["--encrypt"] if encrypt else [])
    j, _ = bl.push(BIN, SRC, "ck", version, ADDRS, *extra, chunk=CHUNK, wrap=PRIMARY)
    bl.check_copies(SRC, ROOTS, "ck", version)
    return j["seconds"]

def gbps(s):
    return BYTES * 8 / s / 1e9

rows = []
for rep in range(REPS):
    plain = push(2 * rep + 1, False)
    enc = push(2 * rep + 2, True)
    rows.append((plain, enc))
    print(f"rep {rep}: plain {plain:.3f} s ({gbps(plain):.3f} Gbit/s), encrypted {enc:.3f} s "
          f"({gbps(enc):.3f} Gbit/s), {enc / plain:.3f} x", flush=True)
tp = bl.median(r[0] for r in rows)
te = bl.median(r[1] for r in rows)
print()
print(bl.md_header("bench-encrypt", bl.env("BE_CMD")))
print(bl.md_table(["push", "median s", "Gbit/s", "ratio"], [
    ["key, chunks in clear", f"{tp:.3f}", f"{gbps(tp):.3f}", "1"],
    ["key, --encrypt", f"{te:.3f}", f"{gbps(te):.3f}", f"{te / tp:.3f} (target <= 1.15)"],
]))
PY
log "saved $out"

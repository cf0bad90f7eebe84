#!/usr/bin/env bash
# Quick numbers for `push --compress` (issue 17), not the formal benchmark (scripts/bench-compress.sh):
#  1. ratio of each mode (sent_wire_bytes / sent_raw_bytes from `push --json`) on bf16 and fp32
#     weights drawn from N(0, 0.02) (stand-ins until the real checkpoints of gen-checkpoints.py),
#     next to `zstd -3` on the same files;
#  2. the loopback hop (primary -> one replica): --compress auto vs off, alternating, N runs each.
# Run as: flock /tmp/sc-bench.lock results/2026-12-06-compress/quick.sh BIN [N]
set -euo pipefail
BIN=${1:?binary}; N=${2:-7}
W=$(mktemp -d /tmp/sc-zip-quick.XXXX); trap 'kill $SRV 2>/dev/null || true; rm -rf "$W"' EXIT
python3 - "$W" <<'PY'
import random, struct, sys, os
w = sys.argv[1]; random.seed(5)
vals = [random.gauss(0, 0.02) for _ in range(4 << 20)]          # 16 MiB fp32, 8 MiB bf16
fp32 = struct.pack(f"<{len(vals)}f", *vals)
bf16 = b"".join(fp32[i + 2:i + 4] for i in range(0, len(fp32), 4))
for name, blob, reps in (("bf16", bf16, 32), ("fp32", fp32, 16)):   # 256 MiB each
    os.makedirs(f"{w}/{name}")
    with open(f"{w}/{name}/model.bin", "wb") as f:
        for r in range(reps):
            f.write(blob[r * 4096:] + blob[:r * 4096])
PY
mkdir -p "$W/root"
"$BIN" serve --listen 127.0.0.1:0 --root "$W/root" --keep 1 >"$W/serve.log" 2>&1 & SRV=$!
for _ in $(seq 100); do grep -q "listening" "$W/serve.log" && break; sleep 0.1; done
ADDR=$(grep -o "listening on [0-9.:]*" "$W/serve.log" | head -1 | awk '{print $3}')
V=0
# A new name each push (a replica that holds the same bytes as its current version takes no
# data), removed from the replica after it.
push() { V=$((V+1)); "$BIN" push "$W/$1" --name "n$V" --version 1 --to "$ADDR" --compress "$2" --json; rm -rf "$W/root/n$V"; }
echo "# ratio: data mode sent_wire/sent_raw seconds"
for d in bf16 fp32; do
  echo "$d zstd-cli-3 $(zstd -3 -c -q "$W/$d/model.bin" | wc -c) $(stat -c %s "$W/$d/model.bin")" \
    | awk '{printf "%s %s %.4f -\n", $1, $2, $3/$4}'
  for m in zstd zstd-grouped auto off; do
    push $d $m | python3 -c "import json,sys; j=json.load(sys.stdin); print('$d $m %.4f %.3f' % (j['sent_wire_bytes']/j['sent_raw_bytes'], j['seconds']))"
  done
done
echo "# loopback: run mode seconds compressed_chunks"
for i in $(seq "$N"); do
  for m in off auto; do
    push bf16 $m | python3 -c "import json,sys; j=json.load(sys.stdin); print('$i $m %.4f %d' % (j['seconds'], j['compressed_chunks']))"
  done
done

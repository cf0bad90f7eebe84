#!/usr/bin/env bash
# Runs inside the soft-RoCE guest (scripts/rxe-vm.sh): for each binary given, a `serve` on rxe_v0
# takes an RDMA push from rxe_v1, then at once a second one, then SIGTERM. Prints per round and
# binary: push 1, push 2 and serve exit (SIGTERM -> reaped), in seconds. Rounds alternate the
# order of the binaries.
#   scripts/rxe-vm.sh -- results/2026-12-07-rdma-teardown/teardown.sh ROUNDS OLD_BIN NEW_BIN
set -euo pipefail
rounds=$1
shift
W=$(mktemp -d)
mkdir -p "$W/src"
head -c $((8 << 20)) /dev/urandom >"$W/src/a.bin"
now() { echo "$EPOCHREALTIME"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
port=7100
one() {
    local bin=$1 label=$2 r=$3
    port=$((port + 1))
    "$bin" serve --listen "$RXEVM_IP:$port" --root "$W/r-$label-$r" --rdma-device "$RXEVM_DEV" \
        --gid-index "$RXEVM_GID" --transport rdma 2>"$W/serve-$label-$r.log" &
    local sp=$!
    rxevm_wait_listen "$port" 30
    local times=()
    for v in 1 2; do
        local t0
        t0=$(now)
        "$bin" push "$W/src" --name x --version "$v" --to "$RXEVM_IP:$port" --transport rdma \
            --rdma-device "$RXEVM_PEER_DEV" --gid-index "$RXEVM_PEER_GID" --chunk-size 1M >/dev/null 2>"$W/push.log" ||
            { echo "push $v ($label) failed:"; cat "$W/push.log" "$W/serve-$label-$r.log"; exit 1; }
        times+=("$(since "$t0")")
    done
    local t0
    t0=$(now)
    kill -TERM "$sp"
    wait "$sp" || true
    times+=("$(since "$t0")")
    echo "round $r $label: push1 ${times[0]} s, push2 ${times[1]} s, serve exit ${times[2]} s"
}
bins=("$@")
for r in $(seq 1 "$rounds"); do
    if ((r % 2 == 1)); then order=(0 1); else order=(1 0); fi
    for i in "${order[@]}"; do
        one "${bins[$i]}" "$(basename "${bins[$i]}")" "$r"
    done
done
echo "kernel warnings from rxe teardown: $(dmesg | grep -c '__rxe_cleanup' || true)"

#!/usr/bin/env bash
# Local demo: 3 replica servers on loopback, a 1 GiB synthetic checkpoint pushed down the chain,
# every replica compared byte for byte with the source. Extra arguments go to `shardcast demo`
# (e.g. `./scripts/demo.sh --size 256MiB` or `--replicas 2`; later flags override earlier ones).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
cargo build --release
exec target/release/shardcast demo --replicas 3 --size 1GiB "$@"

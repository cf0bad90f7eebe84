#!/usr/bin/env bash
# The whole test suite: unit, integration and doc tests of every workspace member.
# --no-fail-fast: a failing test binary does not hide the results of the others.
# Extra arguments go to `cargo test` (e.g. `./scripts/test.sh -- --nocapture`,
# `./scripts/test.sh --test cli`). Exits with cargo's status.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
status=0
cargo test --workspace --no-fail-fast "$@" || status=$?
exit "$status"

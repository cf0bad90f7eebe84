#!/usr/bin/env bash
# What the end of a push costs: REPS pushes of one SIZE file to a chain of N replicas on
# loopback, medians of the push's own "seconds" (connect to the last report) and of the process
# wall time. With OLD_BIN, a second chain of serves runs that binary and each rep pushes with it
# right after the new one (same file, same machine): the end phase (the replicas' sync, their
# results going up the chain) is a larger share of a small push, so this shows what a change
# there costs. Env: SIZE (4M), N (3), REPS (30), CHUNK (1M), OLD_BIN, BIN
# (target/release/shardcast; PROFILE=dev uses target/debug).
# Run it under the shared lock: flock /tmp/sc-bench.lock scripts/bench-end.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
: "${SIZE:=4M}" "${N:=3}" "${REPS:=30}" "${CHUNK:=1M}" "${OLD_BIN:=}"
if [[ "${PROFILE:-release}" == dev ]]; then
    cargo build --quiet
    BIN=${BIN:-target/debug/shardcast}
else
    cargo build --quiet --release
    BIN=${BIN:-target/release/shardcast}
fi
[[ -z "$OLD_BIN" || -x "$OLD_BIN" ]] || die "OLD_BIN=$OLD_BIN is not an executable"
work=$(mktemp -d /tmp/sc-bench-end.XXXXXX)
cleanup_register_dir "$work"
bytes=$(parse_size "$SIZE")
mkdir -p "$work/src"
gen_random_file "$work/src/f.bin" "$bytes"
log "$REPS pushes of $SIZE to a chain of $N on loopback ($BIN${OLD_BIN:+ against $OLD_BIN}), commit $(git_rev)"
export PYTHONPATH=$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}
BE_BIN=$PWD/$BIN BE_OLD=$OLD_BIN BE_WORK=$work BE_REPS=$REPS BE_N=$N BE_CHUNK=$CHUNK python3 - <<'PY'
import os
import benchlib as bl
W, REPS, N, CHUNK = bl.env("BE_WORK"), bl.env("BE_REPS", int), bl.env("BE_N", int), bl.env("BE_CHUNK")
bins = {"new": bl.env("BE_BIN")}
if os.environ.get("BE_OLD"):
    bins["old"] = os.environ["BE_OLD"]
res = {k: [] for k in bins}
with bl.Replicas(bins["new"]) as replicas:
    chains = {k: [replicas.start(os.path.join(W, f"{k}{i}"), [], binary=b)[1] for i in range(N)]
              for k, b in bins.items()}
    for v in range(1, REPS + 1):
        for k, b in bins.items():
            j, wall = bl.push(b, os.path.join(W, "src"), "e", v, chains[k], chunk=CHUNK)
            res[k].append((j["seconds"] * 1e3, wall * 1e3))
med = {k: (bl.median(x[0] for x in v), bl.median(x[1] for x in v)) for k, v in res.items()}
for k, (s, w) in med.items():
    print(f"{k}: push seconds median {s:.2f} ms, process wall median {w:.2f} ms")
if "old" in med:
    print(f"new / old: push seconds {med['new'][0] / med['old'][0]:.3f}, wall {med['new'][1] / med['old'][1]:.3f}")
PY

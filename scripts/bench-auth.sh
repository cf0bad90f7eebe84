#!/usr/bin/env bash
# What authentication costs a push's start: REPS pushes of a 3-byte file to a replica without a
# key, REPS to one with a cluster key and REPS to one with mutual TLS (a test CA made with the
# openssl CLI), round-robin, on loopback; medians of the push's own "seconds" (connect to last
# report) and of the process wall time. Target (issue 7): <= 5 ms more.
# Env: REPS (30), BIN (target/release/shardcast; PROFILE=dev uses target/debug).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
REPS=${REPS:-30}
if [[ "${PROFILE:-release}" == dev ]]; then
    cargo build --quiet --bin shardcast
    BIN=target/debug/shardcast
else
    cargo build --release --quiet --bin shardcast
fi
work=$(mktemp -d)
cleanup_register_dir "$work"
head -c 32 /dev/urandom | base64 >"$work/k"
chmod 600 "$work/k"
echo hi >"$work/f.txt"
# A CA and one certificate valid for 127.0.0.1 as server and client.
(
    cd "$work"
    ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
    openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.pem -days 2 -subj /CN=bench-ca 2>/dev/null
    openssl req "${ec[@]}" -keyout n.key -out n.csr -subj /CN=n 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' >ext.cnf
    openssl x509 -req -in n.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out n.pem -days 2 -extfile ext.cnf 2>/dev/null
)
export PYTHONPATH=$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}
BA_BIN=$PWD/$BIN BA_WORK=$work BA_REPS=$REPS python3 - <<'PY'
import os
import benchlib as bl
BIN, W, REPS = bl.env("BA_BIN"), bl.env("BA_WORK"), bl.env("BA_REPS", int)
TLS = ["--tls-cert", os.path.join(W, "n.pem"), "--tls-key", os.path.join(W, "n.key"), "--tls-ca", os.path.join(W, "ca.pem")]
KEY = ["--key-file", os.path.join(W, "k")]
res = {"no key": [], "key": [], "tls": []}
with bl.Replicas(BIN) as replicas:
    cases = [(kind, replicas.start(os.path.join(W, root), auth)[1], auth)
             for kind, root, auth in (("no key", "ra", []), ("key", "rb", KEY), ("tls", "rc", TLS))]
    for i in range(1, REPS + 1):
        for kind, addr, extra in cases:
            j, wall = bl.push(BIN, os.path.join(W, "f.txt"), "s", i, [addr], *extra)
            res[kind].append((j["seconds"] * 1e3, wall * 1e3))
for k, v in res.items():
    print(f"{k:7s} push seconds median {bl.median(x[0] for x in v):.2f} ms, process wall median {bl.median(x[1] for x in v):.2f} ms")
PY

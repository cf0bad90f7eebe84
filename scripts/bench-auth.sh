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
BA_BIN=$PWD/$BIN BA_WORK=$work BA_REPS=$REPS python3 - <<'PY'
import json, os, statistics, subprocess, time
E = os.environ
BIN, W, REPS = E["BA_BIN"], E["BA_WORK"], int(E["BA_REPS"])
TLS = ["--tls-cert", os.path.join(W, "n.pem"), "--tls-key", os.path.join(W, "n.key"), "--tls-ca", os.path.join(W, "ca.pem")]
def serve(root, auth):
    args = [BIN, "serve", "--listen", "127.0.0.1:0", "--root", os.path.join(W, root)] + auth
    p = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if "listening on" in line:
            return p, line.split("listening on ")[1].split()[0]
KEY = ["--key-file", os.path.join(W, "k")]
plain, pa = serve("ra", [])
keyed, ka = serve("rb", KEY)
tls, ta = serve("rc", TLS)
res = {"no key": [], "key": [], "tls": []}
try:
    for i in range(1, REPS + 1):
        for kind, addr, extra in (("no key", pa, []), ("key", ka, KEY), ("tls", ta, TLS)):
            t = time.monotonic()
            out = subprocess.run([BIN, "push", os.path.join(W, "f.txt"), "--name", "s", "--version", str(i), "--to", addr, "--json"] + extra,
                                 capture_output=True, text=True)
            wall = time.monotonic() - t
            j = json.loads(out.stdout)
            assert j["ok"], out
            res[kind].append((j["seconds"] * 1e3, wall * 1e3))
finally:
    plain.terminate()
    keyed.terminate()
    tls.terminate()
for k, v in res.items():
    print(f"{k:7s} push seconds median {statistics.median(x[0] for x in v):.2f} ms, process wall median {statistics.median(x[1] for x in v):.2f} ms")
PY

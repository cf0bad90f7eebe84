#!/usr/bin/env bash
# The shipped artifacts on a node without a Rust toolchain, with and without rdma-core:
#   1. builds the wheel (scripts/build-wheel.sh) and the release binary (scripts/build-release.sh);
#   2. installs the wheel into a fresh venv with a PATH that has no cargo (checked), and from a
#      directory outside the source tree (so `import shardcast` is the installed package);
#   3. starts the release binary as a replica (`shardcast serve`), pushes a directory from
#      Python, and reads the bytes back from the replica's root;
#   4. does 3. again where libibverbs, librdmacm, libhwloc, libudev and libnl cannot be loaded
#      (a private mount namespace with /dev/null over each of their files: needs root; skipped
#      with the reason otherwise): `transport="auto"` pushes over TCP, `transport="rdma"` fails
#      with an error that names libibverbs.so.1 and the package to install.
# Exit non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
target=$(realpath -m "${CARGO_TARGET_DIR:-target}")

whl=$(scripts/build-wheel.sh | tail -1)
bin=$(scripts/build-release.sh | tail -1)
bin=$(realpath "$bin")
venv=$target/wheel-venv
rm -rf "$venv"
python3 -m venv "$venv"

# A PATH without cargo/rustc: the system directories only.
clean_path=/usr/local/bin:/usr/bin:/bin
if env PATH=$clean_path sh -c 'command -v cargo || command -v rustc' >/dev/null; then
    echo "test-wheel: cargo or rustc is on $clean_path: cannot show the wheel installs without them" >&2
    exit 1
fi
env -u CARGO -u CARGO_TARGET_DIR PATH="$venv/bin:$clean_path" pip install -q --no-index "$whl"

check=$(mktemp /tmp/shardcast-wheel-check.XXXXXX.py)
trap 'rm -f "$check"' EXIT
cat >"$check" <<'PY'
import filecmp, os, subprocess, sys, tempfile
from pathlib import Path

import shardcast

where = Path(shardcast.__file__).resolve()
assert "site-packages" in where.parts, f"shardcast imported from {where}, not the installed wheel"
bin_, expect = os.environ["SHARDCAST_BIN"], os.environ["EXPECT"]
tmp = Path(tempfile.mkdtemp())
src = tmp / "src"
(src / "d").mkdir(parents=True)
(src / "a.bin").write_bytes(os.urandom(3 << 20))
(src / "d" / "b.bin").write_bytes(os.urandom(70_000))
p = subprocess.Popen([bin_, "serve", "--listen", "127.0.0.1:0", "--root", str(tmp / "r")],
                     stderr=subprocess.PIPE, text=True, env={**os.environ, "NO_COLOR": "1"})
try:
    line = p.stderr.readline()
    while line and "listening on" not in line:  # serve may log other lines first
        line = p.stderr.readline()
    addr = line.split("listening on ")[1].split()[0]
    report = shardcast.push(str(src), to=[addr], name="w", version=1, transport="auto")
    assert report.ok, report
    for rel in ["a.bin", "d/b.bin"]:
        got = tmp / "r" / "w" / "1" / rel
        assert got.read_bytes() == (src / rel).read_bytes(), f"{got} differs from {src / rel}"
    print(f"test-wheel: pushed {src} from Python ({where.parent}) to {addr} over auto and read it back")
    if expect == "no-rdma-libs":
        try:
            shardcast.push(str(src), to=[addr], name="w", version=2, transport="rdma")
        except shardcast.ShardcastError as e:
            msg = str(e)
            for want in ["--transport rdma", "cannot load libibverbs.so.1", "libibverbs1", "ibverbs-providers"]:
                assert want in msg, f"{want!r} not in the error: {msg}"
            print(f"test-wheel: transport='rdma' refused as it should: {msg}")
        else:
            raise AssertionError("transport='rdma' pushed without libibverbs")
        assert not (tmp / "r" / "w" / "2").exists()
finally:
    p.kill()
    p.wait()
PY

run_check() {
    (cd /tmp && env -u CARGO -u CARGO_TARGET_DIR PATH="$venv/bin:$clean_path" SHARDCAST_BIN="$bin" "$@")
}
echo "test-wheel: $(basename "$whl") in a fresh venv, PATH=$clean_path (no cargo)"
run_check EXPECT=plain python "$check"

hide=$repo/scripts/hide-rdma-libs.sh
if ! unshare -m "$hide" true 2>/dev/null; then
    echo "test-wheel: the no-RDMA-libraries case SKIPPED: cannot make a mount namespace here (needs root)"
    exit 0
fi
echo "test-wheel: again where libibverbs, librdmacm, libhwloc, libudev and libnl cannot be loaded"
run_check unshare -m "$hide" env EXPECT=no-rdma-libs python "$check"
echo "test-wheel: OK"

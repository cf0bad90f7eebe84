"""Benchmarks of the Python package (run by scripts/bench-python.sh, which prints the commands).

1. Buffer vs file: the same bytes pushed from an in-memory buffer and from a file (page cache),
   alternating, to a `shardcast serve` process; medians and their ratio (target <= 1.05).
2. Return latency: how long after the last replica published (the mtime of its `current` link)
   `push()` returned in Python (target < 50 ms).
3. Progress cadence: `progress()` polled every 5 ms during a push; the longest time the bytes
   counter did not move while streaming (target <= 200 ms).
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import shardcast


def start_server(bin_path: str, root: Path) -> "tuple[subprocess.Popen, str]":
    p = subprocess.Popen(
        [bin_path, "serve", "--listen", "127.0.0.1:0", "--root", str(root), "--keep", "1"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
    )
    for line in p.stderr:
        if "listening on" in line:
            addr = line.split("listening on ", 1)[1].split()[0]
            # Keep draining its log so the server never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
            return p, addr
    raise RuntimeError("serve did not start")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where the source file and replica root live")
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(dir=a.dir, prefix="sc-pybench-"))
    data = os.urandom(a.size_mb << 20)
    src = work / "src"
    src.mkdir()
    (src / "blob.bin").write_bytes(data)
    root = work / "replica"
    server, addr = start_server(a.bin, root)
    version = 0
    times = {"file": [], "buffer": [], "return_ms": []}
    try:
        for rep in range(a.reps):
            for kind in ("file", "buffer"):
                version += 1
                source = src if kind == "file" else {"blob.bin": data}
                t0 = time.monotonic()
                r = shardcast.push(source, to=[addr], name="b", version=version)
                t1 = time.monotonic()
                wall_now = time.time()
                assert r.ok
                times[kind].append(t1 - t0)
                # `current` points at the version the replica just published: its mtime is when.
                published = os.lstat(root / "b" / "current").st_mtime
                times["return_ms"].append((wall_now - published) * 1e3)
                print(f"rep {rep} {kind:6s} {t1 - t0:.3f} s  {len(data) / (t1 - t0) / 1e9:.2f} GB/s", flush=True)

        # Progress cadence on one more push.
        version += 1
        h = shardcast.push_async({"blob.bin": data}, to=[addr], name="b", version=version)
        last_val, last_change, gaps, samples = -1, None, [], 0
        while True:
            p = h.progress()
            now = time.monotonic()
            samples += 1
            if p.state == "done":
                break
            if p.state == "streaming":
                if p.acked_bytes != last_val:
                    if last_change is not None:
                        gaps.append(now - last_change)
                    last_val, last_change = p.acked_bytes, now
            time.sleep(0.005)
        assert h.wait() is not None
        h.close()
    finally:
        server.terminate()
        server.wait()
        # The source and the replica's copies live on tmpfs (memory): never leave them behind.
        shutil.rmtree(work, ignore_errors=True)

    fm, bm = statistics.median(times["file"]), statistics.median(times["buffer"])
    print()
    print(f"size {a.size_mb} MiB, {a.reps} reps each, alternating, one serve process on loopback")
    print(f"| source | median s | GB/s |")
    print(f"|---|---|---|")
    print(f"| file   | {fm:.3f} | {len(data) / fm / 1e9:.2f} |")
    print(f"| buffer | {bm:.3f} | {len(data) / bm / 1e9:.2f} |")
    print(f"buffer / file = {bm / fm:.3f} (target <= 1.05)")
    rl = times["return_ms"]
    print(f"return after publish: median {statistics.median(rl):.1f} ms, max {max(rl):.1f} ms (target < 50 ms)")
    if gaps:
        print(
            f"progress: {len(gaps)} changes of acked_bytes while streaming, {samples} polls; "
            f"longest gap {max(gaps) * 1e3:.1f} ms, median {statistics.median(gaps) * 1e3:.1f} ms (target <= 200 ms)"
        )
    ok = bm / fm <= 1.05 and max(rl) < 50 and (not gaps or max(gaps) <= 0.2)
    print("targets met" if ok else "a target was NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())

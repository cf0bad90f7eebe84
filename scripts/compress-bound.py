#!/usr/bin/env python3
"""Offline compression bounds of real checkpoints (issue 17): what zstd -3 and byte-grouping
reach on each file, and how small the XOR deltas of consecutive checkpoints compress.

    compress-bound.py DIR [--chunk-size BYTES] [--level 3] [--json OUT.json] [--md OUT.md]

DIR holds checkpoints as scripts/gen-checkpoints.py writes them: every *.safetensors file below
it; files in sibling step directories (.../SERIES/step-N/FILE) form a series, consecutive in
step order. Per file, compressed bytes of:
  zstd           zstd at --level (3) of each --chunk-size (4 MiB) chunk on its own, as shardcast
                 compresses (a chunk that does not shrink counts raw), and of the whole file;
  grouped        the same after byte-grouping: with element width w (2 for bf16/fp16, 4 for
                 fp32, from the safetensors header) all byte 0s of the chunk's elements, then all
                 byte 1s, ... (the exponent bytes end up together);
and per consecutive pair in a series (old, new) of equal size:
  xor / xor-grouped  each chunk of new XOR the same chunk of old, compressed as above; an
                 unchanged chunk counts 0 bytes (an incremental push does not send it). This is
                 the bound `--delta` is measured against (target: bytes moved <= 1.1 x it);
  identical      the fraction of elements (w bytes) that are bit-identical, and of chunks that
                 are unchanged.
Ratios are original / compressed bytes (higher is better); "gain" = zstd bytes / grouped bytes
(issue 17's target for shardcast: >= 1.15 on bf16). Prints Markdown tables; writes the numbers
as JSON (--json). Needs numpy and zstandard (scripts/bench-compress.sh installs both into
~/.cache/shardcast-torchvenv); when the zstd CLI is on PATH, the first file's whole-file size is checked
against `zstd -LEVEL` as a cross-check.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

try:
    import numpy as np
    import zstandard
except ImportError as e:
    sys.exit(f"error: {e.name} is not installed in this Python: pip install numpy zstandard "
             "(scripts/bench-compress.sh installs them into target/torchvenv)")

WIDTH = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}
_local = threading.local()
POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)  # zstd releases the GIL


def zlen(buf, level: int) -> int:
    """Bytes of ``buf`` compressed by zstd at ``level`` (one frame, content size known)."""
    c = getattr(_local, "c", None)
    if c is None or _local.level != level:
        c = _local.c = zstandard.ZstdCompressor(level=level)
        _local.level = level
    return len(c.compress(buf))


def group(buf, w: int) -> bytes:
    """Byte-grouping: all byte 0s of the w-byte elements, then all byte 1s, ...; a tail shorter
    than one element stays at the end as it is."""
    a = np.frombuffer(buf, dtype=np.uint8)
    if w <= 1:
        return a.tobytes()
    n = len(a) - len(a) % w
    return a[:n].reshape(-1, w).T.tobytes() + a[n:].tobytes()


def rot_group(buf, w: int) -> bytes:
    """Each little-endian w-byte element rotated left by one bit (the sign bit moves to bit 0, so
    the top byte holds the exponent alone: 8 bits of bf16's and fp32's exponent), then grouped.
    ZipNN's bit layout; XOR commutes with it, so it applies to deltas too."""
    if w not in (2, 4, 8):
        return group(buf, w)
    a = np.frombuffer(buf, dtype=np.uint8)
    n = len(a) - len(a) % w
    v = a[:n].view({2: np.uint16, 4: np.uint32, 8: np.uint64}[w])
    bits = 8 * w
    r = (v << v.dtype.type(1)) | (v >> v.dtype.type(bits - 1))
    return group(r.view(np.uint8).tobytes() + a[n:].tobytes(), w)


# The transforms before zstd: name -> function(buffer, element width) -> bytes.
VARIANTS = {"zstd": lambda b, w: b, "grouped": group, "grouped_rot": rot_group}
EXTRA_LEVELS: list = []  # --also-levels: the per-chunk variants again at these levels, keys NAME_L<level>


def suffixes() -> list:
    return [""] + [f"_L{lv}" for lv in EXTRA_LEVELS]


def keys() -> list:
    """The per-chunk results' names: each variant at --level, then at each extra level."""
    return [v + x for x in suffixes() for v in VARIANTS]


def xor_key(k: str) -> str:
    """The name of a delta's result for the per-chunk result ``k`` (zstd -> xor, grouped_L1 ->
    xor_grouped_L1)."""
    return "xor" + k[len("zstd"):] if k.startswith("zstd") else "xor_" + k


def measure(c, w: int, level: int):
    """{variant: (compressed bytes, at most raw), CPU seconds of transform + compression}."""
    out = {}
    for lv, sfx in zip([level] + EXTRA_LEVELS, suffixes()):
        for name, fn in VARIANTS.items():
            t = time.thread_time()
            n = min(len(c), zlen(fn(c, w), lv))
            out[name + sfx] = (n, time.thread_time() - t)
    return out


def entropy_bytes(buf, w: int) -> int:
    """What an ideal order-0 entropy coder would make of the rotated, byte-grouped elements:
    the sum over the w byte streams of (stream length x its order-0 entropy) / 8. No coder that
    sees each byte on its own does better; zstd's Huffman literals are one."""
    a = np.frombuffer(rot_group(buf, w), dtype=np.uint8)
    n = len(a) // w
    bits = 0.0
    for j in range(w):
        c = np.bincount(a[j * n:(j + 1) * n], minlength=256)
        p = c[c > 0] / n
        bits += -(p * np.log2(p)).sum() * n
    return int(bits / 8) + len(a) - w * n


def read_checkpoint(path: str):
    """(bytes of the file, element width, dtype name, offset of the tensor data)."""
    with open(path, "rb") as f:
        data = f.read()
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + hlen])
    sizes: dict = {}
    for name, t in header.items():
        if name != "__metadata__":
            b, e = t["data_offsets"]
            sizes[t["dtype"]] = sizes.get(t["dtype"], 0) + e - b
    dtype = max(sizes, key=sizes.get)  # the dtype most of the bytes are in
    return data, WIDTH.get(dtype, 1), dtype, 8 + hlen


def summed(results) -> dict:
    """{variant: bytes} and {variant + "_cpu_s": seconds} summed over per-chunk results."""
    out: dict = {}
    for r in results:
        for name, (n, cpu) in r.items():
            out[name] = out.get(name, 0) + n
            out[name + "_cpu_s"] = out.get(name + "_cpu_s", 0.0) + cpu
    return out


def chunked(data: bytes, size: int, w: int, level: int) -> dict:
    """Each variant's compressed bytes summed over the chunks (each chunk compressed alone)."""
    mv = memoryview(data)
    return summed(POOL.map(lambda o: measure(mv[o:o + size], w, level), range(0, len(data), size)))


def delta(old: bytes, new: bytes, size: int, w: int, level: int, data_off: int) -> dict:
    """The XOR of new with old per chunk, compressed as each variant (unchanged chunks: 0 bytes),
    and how many elements and chunks are unchanged."""
    xa = np.bitwise_xor(np.frombuffer(old, dtype=np.uint8), np.frombuffer(new, dtype=np.uint8))
    x = memoryview(xa)

    def one(o):
        return measure(x[o:o + size], w, level) if xa[o:o + size].any() else None
    res = list(POOL.map(one, range(0, len(xa), size)))
    end = data_off + (len(new) - data_off) // w * w
    dt = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[w]
    same = int(np.count_nonzero(np.frombuffer(old[data_off:end], dtype=dt) == np.frombuffer(new[data_off:end], dtype=dt)))
    s = summed(r for r in res if r is not None)
    return {"bytes": len(new), "chunks": len(res), "changed_chunks": sum(r is not None for r in res),
            **{xor_key(k): s.get(k, 0) for k in keys()},
            "elements": (end - data_off) // w, "identical_elements": same}


def series_of(root: str):
    """{series key: [paths in step order]}; the key is the path without its step directory."""
    out: dict = {}
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            if f.endswith(".safetensors"):
                p = os.path.join(d, f)
                rel = os.path.relpath(p, root)
                parts = rel.split(os.sep)
                key = os.sep.join(parts[:-2] + parts[-1:]) if len(parts) >= 2 else rel
                out.setdefault(key, []).append(p)

    def step(p):
        m = re.search(r"(\d+)$", os.path.basename(os.path.dirname(p)))
        return (int(m.group(1)) if m else -1, p)
    return {k: sorted(v, key=step) for k, v in sorted(out.items())}


def ratio(raw: int, comp: int) -> str:
    return f"{raw / comp:.3f}" if comp else "inf"


def table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def cli_check(path: str, level: int, got: int) -> str:
    if not shutil.which("zstd"):
        return "zstd CLI not on PATH: no cross-check"
    r = subprocess.run(["zstd", f"-{level}", "-c", "-q", path], capture_output=True)
    if r.returncode != 0:
        return f"zstd CLI failed: {r.stderr.decode(errors='replace').strip()}"
    return (f"cross-check: `zstd -{level}` on {os.path.basename(path)}: {len(r.stdout)} bytes, "
            f"the zstandard package: {got} bytes ({len(r.stdout) / got:.4f} x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--chunk-size", type=int, default=4 << 20)
    ap.add_argument("--level", type=int, default=3)
    ap.add_argument("--also-levels", default="1", help="per-chunk variants at these levels too (comma list, '' for none)")
    ap.add_argument("--json", help="write the numbers here")
    ap.add_argument("--md", help="write the tables here too")
    a = ap.parse_args()
    EXTRA_LEVELS.extend(int(x) for x in a.also_levels.split(",") if x.strip())
    ser = series_of(a.dir)
    if not ser:
        sys.exit(f"error: no *.safetensors files under {a.dir} (make them with scripts/gen-checkpoints.py; it "
                 "writes torch.save files instead when the safetensors package is missing: pip install safetensors)")
    t0 = time.monotonic()
    files, pairs = [], []
    check = None
    for key, paths in ser.items():
        prev = None
        for p in paths:
            data, w, dtype, off = read_checkpoint(p)
            rel = os.path.relpath(p, a.dir)
            f = {"file": rel, "series": key, "dtype": dtype, "width": w, "bytes": len(data)}
            c = chunked(data, a.chunk_size, w, a.level)
            f.update({k + "_chunked": c[k] for k in keys()})
            f.update({k + "_chunked_cpu_s": c[k + "_cpu_s"] for k in keys()})
            f.update({k + "_whole": zlen(fn(data, w), a.level) for k, fn in VARIANTS.items()})
            f["entropy_rot_whole"] = entropy_bytes(data, w)
            files.append(f)
            if check is None:
                check = cli_check(p, a.level, f["zstd_whole"])
            print(f"[{time.monotonic() - t0:6.1f} s] {rel}: per chunk zstd {ratio(len(data), f['zstd_chunked'])}, "
                  f"grouped {ratio(len(data), f['grouped_chunked'])}, rotated+grouped "
                  f"{ratio(len(data), f['grouped_rot_chunked'])}", file=sys.stderr, flush=True)
            if prev is not None:
                if len(prev[0]) != len(data) or prev[2] != dtype:
                    print(f"SKIP delta {prev[1]} -> {rel}: sizes or dtypes differ", file=sys.stderr)
                else:
                    pairs.append({"old": prev[1], "new": rel, "series": key, "dtype": dtype, "width": w,
                                  **delta(prev[0], data, a.chunk_size, w, a.level, off)})
            prev = (data, rel, dtype)
    text = "\n".join(report(files, pairs, a, check))
    print(text)
    if a.md:
        with open(a.md, "w") as f:
            f.write(text + "\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"dir": os.path.abspath(a.dir), "chunk_size": a.chunk_size, "level": a.level,
                       "zstandard": f"{zstandard.__version__} (libzstd {'.'.join(map(str, zstandard.ZSTD_VERSION))})",
                       "cross_check": check, "files": files, "pairs": pairs, "totals": totals(files, pairs)},
                      f, indent=1)


def totals(files, pairs) -> dict:
    """Per series group (setting/dtype, e.g. finetune/bf16) and per dtype: the sums."""
    FILE_SUMS = [f"{k}_{x}" for k in keys() for x in ("chunked", "chunked_cpu_s")] + [f"{v}_whole" for v in VARIANTS] + ["entropy_rot_whole"]
    PAIR_SUMS = [xor_key(k) for k in keys()] + ["elements", "identical_elements", "chunks", "changed_chunks"]
    out: dict = {}
    for f in files:
        for k in (os.path.dirname(f["series"]) or f["series"], f"all {f['dtype']}"):
            t = out.setdefault(k, {"bytes": 0, "pairs": 0, "delta_bytes": 0, **{c: 0 for c in FILE_SUMS + PAIR_SUMS}})
            t["bytes"] += f["bytes"]
            for c in FILE_SUMS:
                t[c] += f[c]
    for p in pairs:
        for k in (os.path.dirname(p["series"]) or p["series"], f"all {p['dtype']}"):
            t = out[k]
            t["pairs"] += 1
            t["delta_bytes"] += p["bytes"]
            for c in PAIR_SUMS:
                t[c] += p[c]
    return out


def report(files, pairs, a, check) -> list:
    mib = a.chunk_size / 2**20
    lv = a.level
    L = [f"# compress-bound {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}", "",
         f"command: `scripts/compress-bound.py {a.dir} --chunk-size {a.chunk_size} --level {lv}`", "",
         f"zstd -{lv} (zstandard {zstandard.__version__}) of: the bytes as they are (zstd), byte-grouped "
         f"(grouped: element width 2 for bf16, 4 for fp32), and each element rotated left one bit (sign to "
         f"bit 0, the exponent alone in the top byte) then byte-grouped (rot); per {mib:g} MiB chunk "
         f"(each alone, at most raw, as shardcast compresses) and whole file. ratio = original / "
         f"compressed; gain = zstd bytes / transformed bytes.", "", check, "", "## Per file", ""]
    L.append(table(["file", "dtype", "MiB", "zstd chunk", "zstd whole", "grouped chunk", "grouped whole",
                    "rot chunk", "rot whole", "gain grouped", "gain rot"],
                   [[f["file"], f["dtype"], f"{f['bytes'] / 2**20:.1f}", ratio(f["bytes"], f["zstd_chunked"]),
                     ratio(f["bytes"], f["zstd_whole"]), ratio(f["bytes"], f["grouped_chunked"]),
                     ratio(f["bytes"], f["grouped_whole"]), ratio(f["bytes"], f["grouped_rot_chunked"]),
                     ratio(f["bytes"], f["grouped_rot_whole"]), ratio(f["zstd_chunked"], f["grouped_chunked"]),
                     ratio(f["zstd_chunked"], f["grouped_rot_chunked"])] for f in files]))
    if pairs:
        L += ["", "## Consecutive checkpoints: XOR deltas per chunk (unchanged chunks count 0 bytes)", ""]
        L.append(table(["old -> new", "dtype", "identical elements", "changed chunks", "xor ratio",
                        "xor grouped ratio", "xor rot ratio", "xor rot MiB", "grouped full / xor rot"],
                       [[f"{p['old']} -> {os.path.basename(os.path.dirname(p['new']))}", p["dtype"],
                         f"{100 * p['identical_elements'] / p['elements']:.2f} %",
                         f"{p['changed_chunks']} / {p['chunks']}", ratio(p["bytes"], p["xor"]),
                         ratio(p["bytes"], p["xor_grouped"]), ratio(p["bytes"], p["xor_grouped_rot"]),
                         f"{p['xor_grouped_rot'] / 2**20:.2f}",
                         ratio(next(f["grouped_chunked"] for f in files if f["file"] == p["new"]),
                               p["xor_grouped_rot"])] for p in pairs]))
    tot = totals(files, pairs)
    L += ["", "## Totals (per chunk unless 'whole'; CPU: MB/s of input per core, transform + zstd)", ""]
    L.append(table(["group", "MiB", "zstd", "zstd whole", "grouped", "rot", "gain grouped", "gain rot",
                    "CPU zstd", "CPU grouped", "CPU rot", "pairs", "identical elements", "changed chunks",
                    "xor", "xor grouped", "xor rot"],
                   [[k, f"{t['bytes'] / 2**20:.1f}", ratio(t["bytes"], t["zstd_chunked"]),
                     ratio(t["bytes"], t["zstd_whole"]), ratio(t["bytes"], t["grouped_chunked"]),
                     ratio(t["bytes"], t["grouped_rot_chunked"]), ratio(t["zstd_chunked"], t["grouped_chunked"]),
                     ratio(t["zstd_chunked"], t["grouped_rot_chunked"]),
                     *[f"{t['bytes'] / t[v + '_chunked_cpu_s'] / 1e6:.0f}" for v in VARIANTS], t["pairs"],
                     f"{100 * t['identical_elements'] / t['elements']:.2f} %" if t["elements"] else "–",
                     f"{t['changed_chunks']} / {t['chunks']}" if t["chunks"] else "–",
                     *[ratio(t["delta_bytes"], t[c]) if t["pairs"] else "–"
                       for c in ("xor", "xor_grouped", "xor_grouped_rot")]] for k, t in tot.items()]))
    for xl, x in zip(EXTRA_LEVELS, suffixes()[1:]):
        L += ["", f"## The same per chunk at zstd level {xl} (gain: against zstd -{lv} per chunk)", ""]
        L.append(table(["group", "zstd", "grouped", "rot", "gain zstd", "gain grouped", "gain rot", "CPU zstd",
                        "CPU grouped", "CPU rot", "xor", "xor grouped", "xor rot"],
                       [[k, *[ratio(t["bytes"], t[v + x + "_chunked"]) for v in VARIANTS],
                         *[ratio(t["zstd_chunked"], t[v + x + "_chunked"]) for v in VARIANTS],
                         *[f"{t['bytes'] / t[v + x + '_chunked_cpu_s'] / 1e6:.0f}" for v in VARIANTS],
                         *[ratio(t["delta_bytes"], t[xor_key(v + x)]) if t["pairs"] else "–" for v in VARIANTS]]
                        for k, t in tot.items()]))
    L += [""]
    for k, t in tot.items():
        if k.startswith("all "):
            best = min(keys(), key=lambda c: t[c + "_chunked"])
            L.append(f"- {k[4:]}: the smallest per chunk is {best} (level {a.level if best in VARIANTS else best.rsplit('_L', 1)[1]}): "
                     f"{t['zstd_whole'] / t[best + '_chunked']:.3f} x `zstd -{a.level}` of the whole files; an ideal "
                     f"order-0 coder of the rotated byte streams (whole file): ratio {ratio(t['bytes'], t['entropy_rot_whole'])}, "
                     f"{t['zstd_whole'] / t['entropy_rot_whole']:.3f} x `zstd -{a.level}`")
            ref = t["zstd_whole"]
            L.append(f"- {k[4:]}: against `zstd -{lv}` of the whole files, per {mib:g} MiB chunk: zstd "
                     f"{ref / t['zstd_chunked']:.3f} x, byte-grouped {ref / t['grouped_chunked']:.3f} x, "
                     f"rotated + grouped {ref / t['grouped_rot_chunked']:.3f} x"
                     + (f" (issue target for bf16 >= 1.15: grouped {'reaches' if ref / t['grouped_chunked'] >= 1.15 else 'does NOT reach'} it, "
                        f"rotated + grouped {'reaches' if ref / t['grouped_rot_chunked'] >= 1.15 else 'does NOT reach'} it)"
                        if k[4:] in ("BF16", "F16") else ""))
    ft = False
    for k, t in tot.items():
        if k.startswith("finetune") and t["elements"]:
            ft = True
            L.append(f"- {k}: bit-identical elements between consecutive checkpoints "
                     f"{100 * t['identical_elements'] / t['elements']:.2f} %, unchanged chunks "
                     f"{t['chunks'] - t['changed_chunks']} / {t['chunks']}; XOR delta (rot) "
                     f"{t['xor_grouped_rot'] / 2**20:.2f} MiB for {t['delta_bytes'] / 2**20:.1f} MiB "
                     f"({ratio(t['delta_bytes'], t['xor_grouped_rot'])} x)")
    if not ft:
        L.append("- no consecutive fine-tuning checkpoints (a series under finetune/) in this directory")
    return L


if __name__ == "__main__":
    main()

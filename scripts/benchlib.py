"""What the benchmark scripts (scripts/bench-*.sh) share: starting replicas, timing pushes,
checking copies, CPU and byte counters, and the medians and tables at the end.

The scripts run their Python with ``PYTHONPATH`` set to this directory (see
``scripts/bench-*.sh``) and ``import benchlib``. Their configuration arrives in environment
variables; :func:`env` reads one and says which is missing.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

TICK = os.sysconf("SC_CLK_TCK")


_REQUIRED = object()


def env(name: str, kind=str, default=_REQUIRED):
    """The environment variable ``name`` converted by ``kind``; ``default`` when unset (no
    default: the script that set up the run forgot it, which is a bug worth a clear stop)."""
    v = os.environ.get(name)
    if v is None:
        if default is _REQUIRED:
            sys.exit(f"error: {name} is not set (the calling script passes it)")
        return default
    return kind(v)


def log(msg: str) -> None:
    """A timestamped progress line on stderr (stdout carries the results)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- replicas ---------------------------------------------------------------------------------


class Replicas:
    """``shardcast serve`` processes on loopback, stopped together (a context manager)."""

    def __init__(self, binary: str):
        self.binary = binary
        self.procs: List[subprocess.Popen] = []

    def start(self, root: str, args: Sequence[str] = (), env: Optional[Dict[str, str]] = None,
              binary: Optional[str] = None) -> Tuple[subprocess.Popen, str]:
        """Starts ``serve --listen 127.0.0.1:0 --root ROOT ARGS`` and returns (process, address)
        once it listens. Its log keeps being read so that it never blocks on a full pipe."""
        cmd = [binary or self.binary, "serve", "--listen", "127.0.0.1:0", "--root", root, *args]
        p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **(env or {})})
        self.procs.append(p)
        for line in p.stderr:
            if "listening on" in line:
                addr = line.split("listening on ")[1].split()[0]
                threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
                return p, addr
        sys.exit(f"error: {' '.join(cmd)} exited ({p.wait()}) before listening")

    def stop(self) -> None:
        """Terminates every replica still running and waits for it."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            p.wait()

    def __enter__(self) -> "Replicas":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- pushes -----------------------------------------------------------------------------------


def push_cmd(binary: str, src: str, name: str, version: int, to: Sequence[str], *extra: str,
             chunk=None, wrap: Sequence[str] = ()) -> List[str]:
    """The command line of ``shardcast push SRC --json`` (``wrap``: a prefix such as
    ``scripts/cluster.sh exec p`` to run it in the primary's namespace)."""
    cmd = [*wrap, binary, "push", src, "--name", name, "--version", str(version), "--to", ",".join(to)]
    if chunk is not None:
        cmd += ["--chunk-size", str(chunk)]
    return cmd + ["--json", *extra]


def push(binary: str, src: str, name: str, version: int, to: Sequence[str], *extra: str,
         chunk=None, wrap: Sequence[str] = (), env: Optional[Dict[str, str]] = None,
         check_ok: bool = True) -> Tuple[dict, float]:
    """Runs one push and returns (its JSON report, the process's wall seconds). Stops the
    benchmark with the push's output when it did not succeed (``check_ok=False``: the caller
    judges the report)."""
    cmd = push_cmd(binary, src, name, version, to, *extra, chunk=chunk, wrap=wrap)
    t = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.monotonic() - t
    try:
        j = json.loads(r.stdout)
    except ValueError:
        j = {}
    if check_ok and (r.returncode != 0 or not j.get("ok")):
        sys.exit(f"error: {' '.join(cmd)} exited {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n"
                 f"--- stderr\n{r.stderr[-4000:]}")
    if not j:
        sys.exit(f"error: {' '.join(cmd)} printed no JSON ({r.returncode}): {r.stderr[-4000:]}")
    return j, wall


def statuses(report: dict) -> List[str]:
    """Each replica's status in a push's JSON report, in chain order."""
    return [r["status"] for r in report["replicas"]]


def check_copies(src: str, roots: Iterable[str], name: str, version: int) -> None:
    """Every file of the directory ``src`` is byte-identical in each replica root's
    ``NAME/VERSION/``; stops the benchmark naming the first that is not."""
    files = sorted(os.listdir(src))
    for root in roots:
        vdir = os.path.join(root, name, str(version))
        for f in files:
            r = subprocess.run(["cmp", os.path.join(src, f), os.path.join(vdir, f)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"error: {vdir}/{f} differs from the source: {r.stdout.strip()} {r.stderr.strip()}")


def random_file(path: str, size: int) -> None:
    """Writes ``size`` random bytes (real data, not sparse) to ``path``."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 64 << 20)
            f.write(os.urandom(n))
            left -= n


# ---- counters ---------------------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """utime + stime of a whole process (all its threads, live and exited), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / TICK


def host_cpu() -> Tuple[float, float]:
    """(busy, softirq) seconds summed over all CPUs since boot (busy: not idle, iowait or steal)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
    return (user + nice + system + irq + softirq) / TICK, softirq / TICK


METRIC_RECEIVED = "shardcast_received_bytes_total{"


def received_bytes(metrics_addr: str, wrap: Sequence[str] = ()) -> int:
    """A replica's chunk bytes received so far (the sum of ``shardcast_received_bytes_total``
    at ``http://ADDR/metrics``), read from inside ``wrap`` (e.g. the replica's namespace);
    0 while the endpoint does not answer (a replica being restarted)."""
    code = ("import urllib.request;t=urllib.request.urlopen('http://%s/metrics').read().decode();"
            "print(sum(float(l.rsplit(' ',1)[1]) for l in t.splitlines() if l.startswith(%r)))"
            % (metrics_addr, METRIC_RECEIVED))
    r = subprocess.run([*wrap, sys.executable if not wrap else "python3", "-c", code],
                       capture_output=True, text=True)
    return int(float(r.stdout)) if r.returncode == 0 and r.stdout.strip() else 0


# ---- summaries --------------------------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def ratio(a: Dict[int, float], b: Dict[int, float]) -> Tuple[float, float, float]:
    """(median(a) / median(b), and the lowest and highest per-rep ratio a[i] / b[i])."""
    per = [a[i] / b[i] for i in a if i in b]
    return median(a.values()) / median(b.values()), min(per), max(per)


def alternate(rep: int, cases: Sequence):
    """The cases of round ``rep`` in A B, B A, A B… order, so that drift hits them alike."""
    return list(cases) if rep % 2 == 0 else list(reversed(cases))


def md_header(title: str, command: str) -> str:
    """The heading the saved tables start with: the benchmark, the UTC time, the command."""
    return (f"# {title} {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n"
            f"command: {command}\n")


def md_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ---- compression and deltas (issue 17) --------------------------------------------------------


def push_options(binary: str) -> Dict[str, str]:
    """The long options ``BINARY push --help`` lists, each with the text of its entry (where
    clap names the possible values), so that a benchmark can skip what a binary lacks."""
    r = subprocess.run([binary, "push", "--help"], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"error: {binary} push --help exited {r.returncode}: {r.stderr[-2000:]}")
    opts: Dict[str, str] = {}
    current = None
    for line in r.stdout.splitlines():
        s = line.strip()
        m = re.match(r"(?:-\w,?\s+)?(--[\w-]+)", s)
        if m:  # an option's first line ("- auto: …" lines of possible values are not)
            current = m.group(1)
            opts[current] = s
        elif current and s:  # its help, blank lines included (clap's long help has them)
            opts[current] += " " + s
    return opts


def link_bytes(node: str, cluster: str = "scripts/cluster.sh") -> int:
    """The bytes the egress shaper of ``node`` (a scripts/cluster.sh node: p, r1, …) has sent so
    far: Ethernet frames incl. headers, as tc charges them against the rate."""
    out = subprocess.run([cluster, "exec", node, "tc", "-s", "-j", "qdisc", "show", "dev", "scv0"],
                         check=True, capture_output=True, text=True).stdout
    return next((int(q["bytes"]) for q in json.loads(out) if q.get("root")), 0)


def metric_sums(metrics_addr: str, words: Sequence[str], wrap: Sequence[str] = ()) -> Dict[str, float]:
    """{metric name: value summed over its labels} for the metrics at ``http://ADDR/metrics``
    whose name holds any of ``words`` (e.g. "wire", "compress"), read from inside ``wrap``;
    {} while the endpoint does not answer."""
    code = ("import urllib.request,json,sys;t=urllib.request.urlopen('http://%s/metrics').read().decode();"
            "w=json.loads(sys.argv[1]);d={}\n"
            "for l in t.splitlines():\n"
            " n=l.split('{')[0].split(' ')[0]\n"
            " if l and not l.startswith('#') and any(x in n for x in w): d[n]=d.get(n,0)+float(l.rsplit(' ',1)[1])\n"
            "print(json.dumps(d))" % metrics_addr)
    r = subprocess.run([*wrap, sys.executable if not wrap else "python3", "-c", code, json.dumps(list(words))],
                       capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else {}


def start_cluster_replicas(reps: Replicas, n: int, port: int, work: str, args: Sequence[str] = (),
                           cluster: str = "scripts/cluster.sh") -> Tuple[List[str], List[str], List[str]]:
    """Starts ``serve`` on the nodes r1 … rN of scripts/cluster.sh (``reps`` stops them): each
    listens on its node's address at ``port``, keeps its root in WORK/root-rK and serves
    metrics on ADDR:9100. Returns (listen addresses, roots, metrics addresses) once all listen."""
    addrs, roots, maddrs = [], [], []
    for k in range(1, n + 1):
        addr = subprocess.run([cluster, "addr", f"r{k}"], check=True, capture_output=True, text=True).stdout.strip()
        root = os.path.join(work, f"root-r{k}")
        cmd = [cluster, "exec", f"r{k}", reps.binary, "serve", "--listen", f"{addr}:{port}", "--root", root,
               "--metrics", f"{addr}:9100", *args]
        p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "NO_COLOR": "1"})
        reps.procs.append(p)  # `cluster.sh exec` execs the server: stopping p stops it
        if not any("listening on" in line for line in p.stderr):
            sys.exit(f"error: {' '.join(cmd)} exited ({p.wait()}) before listening")
        threading.Thread(target=lambda p=p: [None for _ in p.stderr], daemon=True).start()
        addrs.append(f"{addr}:{port}")
        roots.append(root)
        maddrs.append(f"{addr}:9100")
    return addrs, roots, maddrs


# ---- link timelines (scripts/bench-phases.sh) -------------------------------------------------


class LinkSampler:
    """Samples, every ``period`` seconds in a thread of its own, the byte counters of one link
    in each of several network namespaces, and optionally a file's size.

    ``pids`` maps a node name to the PID of any process in that node's namespace: its
    ``/proc/PID/net/dev`` shows that namespace's links, so one thread in the host's namespace
    reads them all (an open seq_file re-read from offset 0 gives fresh counters). Each sample is
    ``(monotonic seconds, {node: (rx bytes, tx bytes)}, file size or -1)``; with ``devs`` (one
    link per rail, rail 0 first) the counters of rail K >= 1 are under ``f"{node}/{K}"``."""

    def __init__(self, pids: Dict[str, int], dev: str = "scv0", period: float = 0.005,
                 watch: Optional[str] = None, devs: Sequence[str] = ()):
        self.devs = list(devs) or [dev]
        self.period, self.watch = period, watch
        self.fds = {n: os.open(f"/proc/{p}/net/dev", os.O_RDONLY) for n, p in pids.items()}
        self.samples: List[Tuple[float, Dict[str, Tuple[int, int]], int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self, node: str, fd: int) -> Dict[str, Tuple[int, int]]:
        text = os.pread(fd, 1 << 16, 0).decode()
        seen = {}
        for line in text.splitlines():
            name, _, rest = line.partition(":")
            seen[name.strip()] = rest
        out = {}
        for k, dev in enumerate(self.devs):
            if dev not in seen:
                raise RuntimeError(f"no link {dev} in {node}'s namespace")
            v = seen[dev].split()
            out[node if k == 0 else f"{node}/{k}"] = (int(v[0]), int(v[8]))
        return out

    def _size(self) -> int:
        try:
            return os.stat(self.watch).st_size if self.watch else -1
        except OSError:
            return -1

    def _run(self) -> None:
        nxt = time.monotonic()
        while not self._stop.is_set():
            now, counters = time.monotonic(), {}
            for n, fd in self.fds.items():
                counters.update(self._read(n, fd))
            self.samples.append((now, counters, self._size()))
            nxt += self.period
            time.sleep(max(0.0, nxt - time.monotonic()))

    def __enter__(self) -> "LinkSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for fd in self.fds.values():
            os.close(fd)

    def first_size(self, size: int) -> Optional[float]:
        """When the watched file first had ``size`` bytes (None: never while sampled)."""
        return next((t for t, _, s in self.samples if s >= size), None)


def _crossing(ts: Sequence[float], vs: Sequence[float], level: float) -> Optional[float]:
    """When the series (ts, vs) first reaches ``level``, interpolated between samples."""
    for i, v in enumerate(vs):
        if v >= level:
            if i == 0:
                return ts[0]
            t0, v0 = ts[i - 1], vs[i - 1]
            return t0 + (ts[i] - t0) * (level - v0) / (v - v0) if v > v0 else ts[i]
    return None


def last_data(samples, node: str, wire_Bps: float, frac: float = 0.1) -> Optional[float]:
    """When ``node``'s link received its last data byte, from a :class:`LinkSampler`'s samples:
    the end of the last interval whose received bytes came to at least ``frac`` of the wire
    rate, taken to run at the wire rate within it (its start plus its bytes at that rate). A
    relay's link also receives the ACKs of what it sends on, but those carry ~2% of the rate
    (a 66-byte frame per two 1514-byte segments); per-byte framing differs between hops (GRO),
    so a threshold on the total would not do."""
    last = None
    for (t0, a, _), (t1, b, _) in zip(samples, samples[1:]):
        d = b[node][0] - a[node][0]
        if d >= frac * wire_Bps * (t1 - t0):
            last = min(t1, t0 + d / wire_Bps)
    return last


def chain_phases(samples, nodes: Sequence[str], t_start: float, t_end: float, size: int,
                 rate_bps: float, mtu: int) -> Dict[str, float]:
    """Where a chain push's time goes, from link samples. ``nodes`` = [p, r1, …, rN].

    first_byte_ms: push start to the primary's first data on its link (its tx counter past
    64 KiB, less 64 KiB at the wire rate; the handshake is far smaller); hop1_x_line: the first
    hop's transfer (that first byte to r1's last, see :func:`last_data`) ÷ TCP's best line time
    (size ÷ (rate × (MTU-52)/(MTU+14))); hopK_ms (K >= 2): r_K's last data byte after
    r_(K-1)'s; end_ms: the tail's last byte to the push's return (``t_end``); total_x:
    (t_end - t_start) ÷ (size / rate)."""
    wire = rate_bps / 8
    line = size / (wire * (mtu - 52) / (mtu + 14))
    ts = [t for t, _, _ in samples]
    p_tx = [c[nodes[0]][1] - samples[0][1][nodes[0]][1] for _, c, _ in samples]
    first = _crossing(ts, p_tx, 64 << 10)
    lasts = [last_data(samples, n, wire) for n in nodes[1:]]
    if first is None or any(t is None for t in lasts):
        raise RuntimeError("the samples do not show the whole transfer")
    first -= (64 << 10) / wire
    out = {"first_byte_ms": (first - t_start) * 1e3, "hop1_x_line": (lasts[0] - first) / line}
    for k in range(1, len(lasts)):
        out[f"hop{k + 1}_ms"] = (lasts[k] - lasts[k - 1]) * 1e3
    out["end_ms"] = (t_end - lasts[-1]) * 1e3
    out["total_x"] = (t_end - t_start) / (size * 8 / rate_bps)
    return out


def rails_phases(samples, nodes: Sequence[str], t_start: float, t_end: float, size: int,
                 rates_bps: Sequence[float], mtu: int) -> Dict[str, float]:
    """:func:`chain_phases` for a chain whose hops have one lane per rail (``rates_bps``: each
    rail's rate; the samples from a :class:`LinkSampler` with one link per rail). With one rail,
    exactly :func:`chain_phases`. With several, per rail K the keys ``rK_``-prefixed (its first
    byte, its hop 1 ÷ the line time of the bytes r1 received on it, its further hops' lags, its
    tail's last byte ``rK_tail_ms`` from the start, ``rK_share`` of the bytes, as r1 received
    them), and for the push:
    ``spread_ms`` (the last rail's tail finished this long after the first rail's: the time the
    faster rails stood idle at the end), ``end_ms`` (the last tail byte on any rail to the
    return) and ``total_x`` ((t_end - t_start) ÷ (size / sum of the rates))."""
    if len(rates_bps) == 1:
        return chain_phases(samples, nodes, t_start, t_end, size, rates_bps[0], mtu)
    r1 = nodes[1]
    got = [samples[-1][1][r1 if k == 0 else f"{r1}/{k}"][0] - samples[0][1][r1 if k == 0 else f"{r1}/{k}"][0]
           for k in range(len(rates_bps))]
    out: Dict[str, float] = {}
    tails = []
    for k, rate in enumerate(rates_bps):
        names = [n if k == 0 else f"{n}/{k}" for n in nodes]
        # r1's received bytes split the size between the rails (a link's counters do not give
        # the payload itself: GRO counts one header per aggregate, and the ACKs of the next hop
        # come in too, alike on every rail).
        share = size * got[k] / sum(got)
        ph = chain_phases(samples, names, t_start, t_end, max(1, int(share)), rate, mtu)
        tails.append(t_end - ph["end_ms"] / 1e3)
        for key in ("first_byte_ms", "hop1_x_line", *[f"hop{j}_ms" for j in range(2, len(nodes))]):
            out[f"r{k}_{key}"] = ph[key]
        out[f"r{k}_tail_ms"] = (tails[-1] - t_start) * 1e3
        out[f"r{k}_share"] = got[k] / sum(got)
    out["spread_ms"] = (max(tails) - min(tails)) * 1e3
    out["end_ms"] = (t_end - max(tails)) * 1e3
    out["total_x"] = (t_end - t_start) / (size * 8 / sum(rates_bps))
    return out

"""shardcast for training launchers: push checkpoints and dataset shards down a chain of replicas.

A thin layer over the shardcast C ABI (``ffi/include/shardcast.h``), loaded with ctypes: the data
moves in Rust threads, and every call that waits releases the GIL.

>>> import shardcast
>>> with shardcast.serve("127.0.0.1:0", root="/tmp/replica") as srv:   # doctest: +SKIP
...     report = shardcast.push("/ckpt/step-100", to=[srv.addr], name="ckpt", version=100)
...     report.replicas[0].published
True
"""

from __future__ import annotations

import ctypes
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import List, Optional, Sequence, Tuple, Union

from . import _native
from ._native import lib

__all__ = [
    "ShardcastError",
    "PushCancelled",
    "PartialPush",
    "ReplicaResult",
    "PushReport",
    "Progress",
    "PushHandle",
    "Server",
    "serve",
    "push",
    "push_async",
    "stage",
    "stage_async",
    "version",
]

PathLike = Union[str, "os.PathLike[str]"]
#: Any object with the buffer protocol and contiguous bytes: bytes, bytearray, memoryview,
#: mmap, a numpy array, array.array...
BufferLike = object
#: What to push: a directory or file on disk, or ``{relative path: buffer}`` in memory.
Source = Union[PathLike, Mapping[str, BufferLike]]


class ShardcastError(Exception):
    """A push or server call failed.

    ``kind`` is the machine-readable cause (``"unreachable"``, ``"version_exists"``,
    ``"disk_full"``, ``"digest_mismatch"``, …), ``node`` the replica it is about when known,
    ``code`` the C ABI's status code.
    """

    def __init__(self, message: str, kind: str = "internal", node: Optional[str] = None, code: int = -23):
        super().__init__(message)
        self.kind = kind
        self.node = node
        self.code = code


class PushCancelled(ShardcastError):
    """The push was cancelled by the caller. Replicas that had not published dropped what they
    staged; one that already published (each replica of a sync push publishes before the tail
    reports) keeps its version."""


class PartialPush(ShardcastError):
    """Some replicas published and some did not; ``report`` says which."""

    def __init__(self, message: str, report: "PushReport"):
        super().__init__(message, kind="partial", code=_native.SC_PARTIAL)
        self.report = report


def _node_of(message: str) -> Optional[str]:
    # Messages name the node first: "replica 10.0.0.2:7071: ...".
    if message.startswith("replica "):
        return message[len("replica ") :].split(": ", 1)[0]
    return None


def _raise(code: int, what: str) -> None:
    msg = _native.last_error() or what
    kind = _native.ERROR_KINDS.get(code, "internal")
    if code == _native.SC_ERR_CANCELLED:
        raise PushCancelled(msg, kind=kind, code=code)
    raise ShardcastError(msg, kind=kind, node=_node_of(msg), code=code)


def version() -> str:
    """The version of the shardcast library in use."""
    return lib.sc_version().decode()


@dataclass(frozen=True)
class ReplicaResult:
    """One replica's outcome: ``published``; ``behind`` (an async push returned while it was
    still receiving: it completes on its own); else ``kind`` and ``message`` say why not."""

    node: str
    published: bool
    kind: Optional[str] = None
    message: Optional[str] = None
    behind: bool = False


@dataclass(frozen=True)
class PushReport:
    """A finished push: one result per replica, in chain order; for each lane of the first
    hop (lane 0 first), the chunks it sent and what it ran on (``"rdma"`` or ``"tcp"``); and how
    many times the chain was repaired around a replica lost mid-push (``repairs``)."""

    replicas: List[ReplicaResult] = field(default_factory=list)
    lane_chunks: List[int] = field(default_factory=list)
    lane_transports: List[str] = field(default_factory=list)
    repairs: int = 0

    @property
    def ok(self) -> bool:
        return bool(self.replicas) and all(r.published or r.behind for r in self.replicas)


@dataclass(frozen=True)
class Progress:
    """A snapshot of a running push. ``state``: "connecting", "streaming" or "done"."""

    state: str
    total_bytes: int
    acked_bytes: int
    sent_chunks: int
    total_chunks: int
    elapsed_s: float

    @property
    def fraction(self) -> float:
        """Share of the bytes written on every replica (0.0 until the source is scanned)."""
        return self.acked_bytes / self.total_bytes if self.total_bytes else 0.0


class PushHandle:
    """A push running in the background (from :func:`push_async`)."""

    def __init__(self, handle: ctypes.c_void_p, exported: Sequence["_native.Exported"] = ()):
        self._h: Optional[ctypes.c_void_p] = handle
        self._report: Optional[PushReport] = None
        # Buffers the push reads from: kept exported until the push has ended and been freed.
        self._exported = list(exported)

    def _handle(self) -> ctypes.c_void_p:
        if self._h is None:
            raise ShardcastError("the push handle was closed", kind="invalid_argument", code=-20)
        return self._h

    def progress(self) -> Progress:
        """Where the push is; never blocks."""
        p = _native.Progress()
        rc = lib.sc_push_poll(self._handle(), ctypes.byref(p))
        if rc != _native.SC_OK:
            _raise(rc, "sc_push_poll failed")
        state = {0: "connecting", 1: "streaming", 2: "done"}.get(p.state, "unknown")
        return Progress(state, p.total_bytes, p.acked_bytes, p.sent_chunks, p.total_chunks, p.elapsed_s)

    def wait(self, timeout: Optional[float] = None) -> Optional[PushReport]:
        """Waits for the push to end (``timeout`` seconds, ``None`` = forever).

        Returns the :class:`PushReport` when every replica published, ``None`` when the timeout
        passed first. Raises :class:`PartialPush` when only some published,
        :class:`PushCancelled` after :meth:`cancel`, :class:`ShardcastError` otherwise.
        """
        if self._report is not None:
            return self._report
        ms = 0 if timeout is None else max(1, int(timeout * 1000))
        rc = lib.sc_push_wait(self._handle(), ms)
        if rc == _native.SC_ERR_TIMEOUT:
            return None
        if rc == _native.SC_OK:
            self._report = self._results()
            return self._report
        if rc == _native.SC_PARTIAL:
            msg = _native.last_error()
            raise PartialPush(msg or "some replicas did not publish", self._results())
        _raise(rc, "the push failed")
        return None

    def _results(self) -> PushReport:
        out = []
        n = lib.sc_push_replica_count(self._handle())
        for i in range(max(n, 0)):
            r = _native.ReplicaResult()
            buf = ctypes.create_string_buffer(4096)
            lib.sc_push_replica_result(self._handle(), i, ctypes.byref(r), buf, len(buf))
            text = buf.value.decode("utf-8", "replace")
            node, _, message = text.partition(": ")
            if r.status == _native.SC_REPLICA_PUBLISHED:
                out.append(ReplicaResult(node=node, published=True))
            elif r.status == _native.SC_REPLICA_BEHIND:
                out.append(ReplicaResult(node=node, published=False, behind=True))
            else:
                kind = _native.ERROR_KINDS.get(r.error, "internal")
                out.append(ReplicaResult(node=node, published=False, kind=kind, message=message))
        counts = (ctypes.c_uint64 * 16)()
        lanes = lib.sc_push_lane_chunks(self._handle(), counts, len(counts))
        rdma = (ctypes.c_uint8 * 16)()
        kinds = lib.sc_push_lane_rdma(self._handle(), rdma, len(rdma))
        transports = ["rdma" if b else "tcp" for b in rdma[: max(kinds, 0)]]
        repairs = max(lib.sc_push_repairs(self._handle()), 0)
        return PushReport(out, [int(c) for c in counts[: max(lanes, 0)]], transports, repairs)

    def cancel(self) -> None:
        """Asks the push to stop; the replicas drop what they staged. :meth:`wait` then raises
        :class:`PushCancelled`."""
        lib.sc_push_cancel(self._handle())

    def close(self) -> None:
        """Frees the handle (cancelling the push if it still runs)."""
        if self._h is not None:
            lib.sc_push_free(self._h)  # joins the push: the buffers are no longer read after it
            self._h = None
        for e in self._exported:
            e.release()
        self._exported = []

    def __enter__(self) -> "PushHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def push_async(
    source: Source,
    to: Sequence[str],
    name: str,
    version: int,
    chunk_size: int = 0,
    transport: str = "auto",
    connect_timeout: float = 0,
    keep: int = 0,
    incremental: bool = False,
    mode: str = "sync",
    min_replicas: int = 0,
    repair: bool = True,
    key_file: Optional[PathLike] = None,
    encrypt: bool = False,
    tls: Optional[Tuple[PathLike, PathLike, PathLike]] = None,
    compress: str = "off",
    compress_level: int = 0,
    delta_base: Optional[PathLike] = None,
    lanes: int = 1,
    rails: Sequence[str] = (),
) -> PushHandle:
    """Starts pushing ``source`` as ``name@version`` down the chain ``to`` (replica addresses,
    first replica first) and returns at once.

    ``source`` is a directory or file on disk, or a mapping of relative paths to in-memory
    buffers (``bytes``, ``bytearray``, ``memoryview``, numpy arrays: any C-contiguous
    buffer-protocol object), published as files without being written to disk on this side.
    Buffers are read while the push runs: do not change them until it has ended (a ``bytearray``
    cannot be resized meanwhile). A repair reads them again and checks them against the digests
    of the first pass: a buffer changed meanwhile fails the replicas being repaired (kind
    ``"source"``, naming the file) rather than giving replicas different bytes. ``keep``: versions of ``name`` each replica keeps (0: its own
    setting). ``incremental``: hash first, and send each replica only the chunks its current
    version of ``name`` lacks (a checkpoint that changed in places). ``mode="async"``: done once
    the first replica has published (the rest are ``behind`` and complete on their own).
    ``min_replicas``: how many must publish for success (0: all; the first in async mode).
    ``repair``: go on around a replica that dies mid-push (the others resume). ``key_file``:
    the cluster key every hop authenticates with (see ``shardcast --key-file``). ``encrypt``:
    encrypt the chunks on every hop (AES-256-GCM; needs ``key_file`` or ``tls``). ``tls``:
    ``(cert, key, ca)`` PEM files for mutual TLS instead of a cluster key. ``compress``:
    ``"off"``, ``"auto"``, ``"zstd"`` or ``"zstd-grouped"`` (see ``shardcast push --compress``),
    at zstd level ``compress_level`` (0: the default). ``delta_base``: the previous version of
    ``source`` on this host, laid out like it: chunks go as XOR deltas against the replicas'
    current version where they hold the same bytes (see ``shardcast push --delta``; implies
    ``incremental``; for buffers, the files of the base are those at the buffers' paths).
    ``lanes``: TCP connections per hop of the chain (1 to 16; see ``shardcast push --lanes``);
    the report's ``lane_chunks`` says what each carried. ``rails``: this host's addresses the
    lanes bind to, lane k to ``rails[k % len(rails)]`` (see ``shardcast push --rail``)."""
    if mode not in ("sync", "async"):
        raise ValueError(f"mode {mode!r}: 'sync' or 'async'")
    if compress not in _COMPRESS:
        raise ValueError(f"compress {compress!r}: one of {', '.join(_COMPRESS)}")
    if isinstance(to, str):
        to = [to]
    opts = _native.PushOpts(
        None,
        name.encode(),
        int(version),
        ",".join(to).encode(),
        int(chunk_size),
        int(connect_timeout),
        transport.encode(),
        int(keep),
        int(bool(incremental)),
        1 if mode == "async" else 0,
        int(min_replicas),
        0 if repair else 1,
        os.fsencode(key_file) if key_file is not None else None,
        int(bool(encrypt)),
        *_tls_args(tls),
        _COMPRESS[compress],
        int(compress_level),
        os.fsencode(delta_base) if delta_base is not None else None,
        _lanes(lanes),
        _rails(rails),
    )
    h = ctypes.c_void_p()
    if isinstance(source, Mapping):
        exported: List[_native.Exported] = []
        try:
            bufs = (_native.Buffer * max(1, len(source)))()
            for i, (path, data) in enumerate(source.items()):
                if not isinstance(path, str):
                    raise TypeError(f"buffer names must be str, not {type(path).__name__}")
                try:
                    e = _native.Exported(data)
                except (BufferError, TypeError) as err:
                    raise TypeError(f"{path!r}: not a contiguous buffer ({err})") from None
                exported.append(e)
                bufs[i] = _native.Buffer(path.encode(), e.address, e.nbytes)
            rc = lib.sc_push_start_buffers(ctypes.byref(opts), bufs, len(source), ctypes.byref(h))
        except BaseException:
            for e in exported:
                e.release()
            raise
        if rc != _native.SC_OK:
            for e in exported:
                e.release()
            _raise(rc, "sc_push_start_buffers failed")
        return PushHandle(h, exported)
    opts.source = os.fsencode(source)
    rc = lib.sc_push_start(ctypes.byref(opts), ctypes.byref(h))
    if rc != _native.SC_OK:
        _raise(rc, "sc_push_start failed")
    return PushHandle(h)


def push(
    source: Source,
    to: Sequence[str],
    name: str,
    version: int,
    mode: str = "sync",
    timeout: Optional[float] = None,
    chunk_size: int = 0,
    transport: str = "auto",
    keep: int = 0,
    incremental: bool = False,
    min_replicas: int = 0,
    repair: bool = True,
    key_file: Optional[PathLike] = None,
    encrypt: bool = False,
    tls: Optional[Tuple[PathLike, PathLike, PathLike]] = None,
    compress: str = "off",
    compress_level: int = 0,
    delta_base: Optional[PathLike] = None,
    lanes: int = 1,
    rails: Sequence[str] = (),
) -> PushReport:
    """Pushes ``source`` (a path, or ``{relative path: buffer}``: see :func:`push_async`) as
    ``name@version`` to the chain ``to`` and returns when every replica has published
    (``mode="sync"``) or the first one has (``mode="async"``). Raises :class:`ShardcastError`
    (with ``node`` and ``kind``) on failure, and when ``timeout`` seconds pass first (the push
    is then cancelled)."""
    with push_async(
        source,
        to,
        name,
        version,
        chunk_size=chunk_size,
        transport=transport,
        keep=keep,
        incremental=incremental,
        mode=mode,
        min_replicas=min_replicas,
        repair=repair,
        key_file=key_file,
        encrypt=encrypt,
        tls=tls,
        compress=compress,
        compress_level=compress_level,
        delta_base=delta_base,
        lanes=lanes,
        rails=rails,
    ) as h:
        return _finish(h, timeout, f"push {name}@{version}")


_COMPRESS = {"off": 0, "auto": 1, "zstd": 2, "zstd-grouped": 3}


def _lanes(lanes: int) -> int:
    if not 1 <= int(lanes) <= 16:
        raise ValueError(f"lanes {lanes!r}: 1 to 16")
    return int(lanes)


def _rails(rails: Sequence[str]) -> Optional[bytes]:
    if isinstance(rails, str):
        rails = [rails]
    return ",".join(rails).encode() if rails else None


def _tls_args(tls: Optional[Tuple[PathLike, PathLike, PathLike]]) -> Tuple[Optional[bytes], ...]:
    if tls is None:
        return (None, None, None)
    if len(tls) != 3:
        raise ValueError("tls: (cert, key, ca), three PEM files")
    return tuple(os.fsencode(p) for p in tls)


def _finish(h: PushHandle, timeout: Optional[float], what: str) -> PushReport:
    """Waits for ``h``; past ``timeout`` cancels it, waits for the cancel, and raises."""
    report = h.wait(timeout)
    if report is None:
        h.cancel()
        try:
            h.wait()
        except ShardcastError:
            pass
        raise ShardcastError(f"{what} did not finish within {timeout} s", kind="timeout", code=-21)
    return report


def _plan_toml(plan: Mapping) -> str:
    """A plan dict as TOML (the schema is flat: strings, integers, and [[node]] tables)."""

    def value(v: object) -> str:
        if isinstance(v, bool) or not isinstance(v, (str, int, os.PathLike, list, tuple)):
            raise TypeError(f"plan value {v!r}: expected a string, an integer or a list of strings")
        if isinstance(v, int):
            return str(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(os.fspath(v))  # a JSON string is a valid TOML basic string

    lines = [f"{k} = {value(v)}" for k, v in plan.items() if k != "node"]
    for node in plan.get("node", []):
        lines.append("[[node]]")
        lines += [f"{k} = {value(v)}" for k, v in node.items()]
    return "\n".join(lines) + "\n"


def stage_async(
    plan: Union[PathLike, Mapping],
    transport: str = "auto",
    connect_timeout: float = 0,
    keep: int = 0,
    key_file: Optional[PathLike] = None,
    encrypt: bool = False,
    tls: Optional[Tuple[PathLike, PathLike, PathLike]] = None,
    lanes: int = 1,
    rails: Sequence[str] = (),
) -> PushHandle:
    """Starts staging an epoch's shards and returns at once (use the handle like a push's).

    ``plan`` is a plan file (TOML, see ``shardcast stage --help``) or the same as a dict::

        {"name": "train", "version": epoch, "source": "/datasets/train",
         "node": [{"addr": "node1:7071", "files": ["shard-0.tar", "shard-1.tar"]},
                  {"addr": "node2:7071", "files": ["shard-1.tar", "shard-2.tar"]}]}

    Every node gets exactly its files, published as ``name@version``; each chunk travels down
    the chain (the nodes in order) only as far as the last node that wants it. ``lanes``: TCP
    connections per hop, ``rails``: this host's addresses they bind to (see :func:`push_async`)."""
    opts = _native.PushOpts(
        None,
        None,
        0,
        None,
        0,
        int(connect_timeout),
        transport.encode(),
        int(keep),
        0,
        0,
        0,
        0,
        os.fsencode(key_file) if key_file is not None else None,
        int(bool(encrypt)),
        *_tls_args(tls),
    )
    opts.lanes = _lanes(lanes)
    opts.rails = _rails(rails)
    h = ctypes.c_void_p()
    if isinstance(plan, Mapping):
        plan = dict(plan)
        if not os.path.isabs(os.fspath(plan.get("source", "."))):
            plan["source"] = os.path.abspath(os.fspath(plan.get("source", ".")))
        with tempfile.NamedTemporaryFile("w", suffix=".toml", prefix="shardcast-plan-") as f:
            f.write(_plan_toml(plan))
            f.flush()
            rc = lib.sc_stage_start(ctypes.byref(opts), os.fsencode(f.name), ctypes.byref(h))
    else:
        rc = lib.sc_stage_start(ctypes.byref(opts), os.fsencode(plan), ctypes.byref(h))
    if rc != _native.SC_OK:
        _raise(rc, "sc_stage_start failed")
    return PushHandle(h)


def stage(
    plan: Union[PathLike, Mapping],
    timeout: Optional[float] = None,
    transport: str = "auto",
    keep: int = 0,
    key_file: Optional[PathLike] = None,
    encrypt: bool = False,
    tls: Optional[Tuple[PathLike, PathLike, PathLike]] = None,
    lanes: int = 1,
    rails: Sequence[str] = (),
) -> PushReport:
    """Stages ``plan`` (see :func:`stage_async`) and returns when every node has published its
    files. Raises :class:`ShardcastError` on failure or when ``timeout`` seconds pass first."""
    with stage_async(
        plan,
        transport=transport,
        keep=keep,
        key_file=key_file,
        encrypt=encrypt,
        tls=tls,
        lanes=lanes,
        rails=rails,
    ) as h:
        return _finish(h, timeout, "staging")


class Server:
    """A replica server running in this process (from :func:`serve`)."""

    def __init__(self, handle: ctypes.c_void_p):
        self._h: Optional[ctypes.c_void_p] = handle
        buf = ctypes.create_string_buffer(128)
        lib.sc_server_addr(handle, buf, len(buf))
        #: The bound address, "IP:PORT".
        self.addr: str = buf.value.decode()

    def stop(self) -> None:
        """Stops accepting pushes and frees the server."""
        if self._h is not None:
            lib.sc_server_stop(self._h)
            self._h = None

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    listen: str = "0.0.0.0:7071",
    root: PathLike = ".",
    keep: int = 2,
    pool_mb: int = 0,
    key_file: Optional[PathLike] = None,
    require_encrypt: bool = False,
    tls: Optional[Tuple[PathLike, PathLike, PathLike]] = None,
    rails: Sequence[str] = (),
) -> Server:
    """Starts a replica server in this process, listening on ``listen`` ("127.0.0.1:0" picks a
    free port; see :attr:`Server.addr`) and publishing under ``root``. With ``key_file`` every
    peer must prove it holds the cluster key; with ``tls=(cert, key, ca)`` every peer must present
    a certificate from the CA instead; with ``require_encrypt`` only pushes that encrypt their
    chunks are accepted. ``rails``: this host's addresses, rail 0 first, listened on at the serve
    port and announced to the node upstream, whose lane k connects to rail k mod R (see
    ``shardcast serve --rail``)."""
    opts = _native.ServerOpts(
        listen.encode(),
        os.fsencode(root),
        int(keep),
        int(pool_mb),
        0,
        os.fsencode(key_file) if key_file is not None else None,
        int(bool(require_encrypt)),
        *_tls_args(tls),
        _rails(rails),
    )
    h = ctypes.c_void_p()
    rc = lib.sc_server_start(ctypes.byref(opts), ctypes.byref(h))
    if rc != _native.SC_OK:
        _raise(rc, "sc_server_start failed")
    return Server(h)

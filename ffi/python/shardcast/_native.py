"""ctypes declarations of the shardcast C ABI (ffi/include/shardcast.h)."""

import ctypes
import os
from pathlib import Path


class ServerOpts(ctypes.Structure):
    _fields_ = [
        ("listen", ctypes.c_char_p),
        ("root", ctypes.c_char_p),
        ("keep", ctypes.c_uint32),
        ("pool_mb", ctypes.c_uint32),
        ("idle_timeout_s", ctypes.c_uint32),
        ("key_file", ctypes.c_char_p),
        ("require_encrypt", ctypes.c_uint32),
        ("tls_cert", ctypes.c_char_p),
        ("tls_key", ctypes.c_char_p),
        ("tls_ca", ctypes.c_char_p),
        ("rails", ctypes.c_char_p),
    ]


class PushOpts(ctypes.Structure):
    _fields_ = [
        ("source", ctypes.c_char_p),
        ("name", ctypes.c_char_p),
        ("version", ctypes.c_uint64),
        ("to", ctypes.c_char_p),
        ("chunk_size", ctypes.c_uint32),
        ("connect_timeout_s", ctypes.c_uint32),
        ("transport", ctypes.c_char_p),
        ("keep", ctypes.c_uint32),
        ("incremental", ctypes.c_uint32),
        ("mode", ctypes.c_uint32),
        ("min_replicas", ctypes.c_uint32),
        ("no_repair", ctypes.c_uint32),
        ("key_file", ctypes.c_char_p),
        ("encrypt", ctypes.c_uint32),
        ("tls_cert", ctypes.c_char_p),
        ("tls_key", ctypes.c_char_p),
        ("tls_ca", ctypes.c_char_p),
        ("compress", ctypes.c_uint32),
        ("compress_level", ctypes.c_uint32),
        ("delta_base", ctypes.c_char_p),
        ("lanes", ctypes.c_uint32),
        ("rails", ctypes.c_char_p),
    ]


class Buffer(ctypes.Structure):
    _fields_ = [
        ("path", ctypes.c_char_p),
        ("data", ctypes.c_void_p),
        ("len", ctypes.c_size_t),
    ]


class PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer`` (stable ABI since 3.11)."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_PyBUF_SIMPLE = 0
_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(PyBuffer)]
_release_buffer.restype = None


class Exported:
    """A buffer-protocol object's bytes, held exported (so a ``bytearray`` cannot be resized and
    its memory cannot move) until :meth:`release`. Accepts any C-contiguous buffer: ``bytes``,
    ``bytearray``, ``memoryview``, ``mmap``, numpy arrays, ``array.array``..."""

    def __init__(self, obj: object):
        self._view = PyBuffer()
        # PyBUF_SIMPLE: a plain contiguous run of bytes, read-only is fine; a non-contiguous
        # exporter raises BufferError here.
        _get_buffer(obj, ctypes.byref(self._view), _PyBUF_SIMPLE)
        self.address: int = self._view.buf or 0
        self.nbytes: int = self._view.len

    def release(self) -> None:
        if self._view is not None:
            _release_buffer(ctypes.byref(self._view))
            self._view = None


class Progress(ctypes.Structure):
    _fields_ = [
        ("state", ctypes.c_int32),
        ("total_bytes", ctypes.c_uint64),
        ("acked_bytes", ctypes.c_uint64),
        ("sent_chunks", ctypes.c_uint64),
        ("total_chunks", ctypes.c_uint64),
        ("elapsed_s", ctypes.c_double),
    ]


class ReplicaResult(ctypes.Structure):
    _fields_ = [("status", ctypes.c_int32), ("error", ctypes.c_int32)]


def _load() -> ctypes.CDLL:
    path = os.environ.get("SHARDCAST_FFI_LIB") or str(Path(__file__).with_name("libshardcast_ffi.so"))
    # CDLL (not PyDLL): every call releases the GIL while it runs, so waiting on a push does
    # not stall the launcher's other threads.
    lib = ctypes.CDLL(path)
    p = ctypes.POINTER
    sigs = {
        "sc_version": ([], ctypes.c_char_p),
        "sc_last_error": ([ctypes.c_char_p, ctypes.c_size_t], ctypes.c_int32),
        "sc_server_start": ([p(ServerOpts), p(ctypes.c_void_p)], ctypes.c_int32),
        "sc_server_addr": ([ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t], ctypes.c_int32),
        "sc_server_stop": ([ctypes.c_void_p], ctypes.c_int32),
        "sc_push_start": ([p(PushOpts), p(ctypes.c_void_p)], ctypes.c_int32),
        "sc_stage_start": ([p(PushOpts), ctypes.c_char_p, p(ctypes.c_void_p)], ctypes.c_int32),
        "sc_push_start_buffers": ([p(PushOpts), p(Buffer), ctypes.c_size_t, p(ctypes.c_void_p)], ctypes.c_int32),
        "sc_push_poll": ([ctypes.c_void_p, p(Progress)], ctypes.c_int32),
        "sc_push_wait": ([ctypes.c_void_p, ctypes.c_uint32], ctypes.c_int32),
        "sc_push_cancel": ([ctypes.c_void_p], ctypes.c_int32),
        "sc_push_replica_count": ([ctypes.c_void_p], ctypes.c_int32),
        "sc_push_replica_result": (
            [ctypes.c_void_p, ctypes.c_size_t, p(ReplicaResult), ctypes.c_char_p, ctypes.c_size_t],
            ctypes.c_int32,
        ),
        "sc_push_lane_chunks": ([ctypes.c_void_p, p(ctypes.c_uint64), ctypes.c_size_t], ctypes.c_int32),
        "sc_push_lane_rdma": ([ctypes.c_void_p, p(ctypes.c_uint8), ctypes.c_size_t], ctypes.c_int32),
        "sc_push_repairs": ([ctypes.c_void_p], ctypes.c_int32),
        "sc_push_free": ([ctypes.c_void_p], ctypes.c_int32),
    }
    for name, (args, res) in sigs.items():
        f = getattr(lib, name)
        f.argtypes = args
        f.restype = res
    return lib


lib = _load()

SC_OK = 0
SC_PARTIAL = 1
SC_ERR_TIMEOUT = -21
SC_ERR_CANCELLED = -22
SC_REPLICA_PUBLISHED = 0
SC_REPLICA_BEHIND = 2

ERROR_KINDS = {
    -1: "unreachable",
    -2: "version_exists",
    -3: "busy",
    -4: "disk_full",
    -5: "digest_mismatch",
    -6: "connection_lost",
    -7: "protocol",
    -8: "io",
    -9: "bad_manifest",
    -10: "source",
    -11: "stalled",
    -12: "aborted",
    -13: "unsupported",
    -14: "unauthorized",
    -20: "invalid_argument",
    -21: "timeout",
    -22: "cancelled",
    -23: "internal",
}


def last_error() -> str:
    buf = ctypes.create_string_buffer(4096)
    n = lib.sc_last_error(buf, len(buf))
    if n >= len(buf):
        buf = ctypes.create_string_buffer(n + 1)
        lib.sc_last_error(buf, len(buf))
    return buf.value.decode("utf-8", "replace")

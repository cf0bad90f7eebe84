//! C ABI for shardcast: start a replica server, push a shard set in the background, follow its
//! progress, wait with a timeout, cancel, read the per-replica result and the last error.
//!
//! Conventions (the header, `ffi/include/shardcast.h`, is generated from this file by cbindgen):
//! - every function returns `SC_OK` (0) or a negative `SC_ERR_*` code; the calling thread's last
//!   error message is read with [`sc_last_error`];
//! - handles are opaque, created by `*_start` and freed exactly once by [`sc_server_stop`] /
//!   [`sc_push_free`]; passing NULL where a handle is expected returns `SC_ERR_INVALID_ARG`;
//! - strings in are UTF-8, NUL-terminated, and copied; strings out go into caller buffers;
//! - no panic crosses the boundary: each body runs under `catch_unwind` and a panic becomes
//!   `SC_ERR_PANIC`;
//! - no callbacks: progress is polled, so no foreign code runs on shardcast's threads.

#![allow(clippy::missing_safety_doc)]

use std::cell::RefCell;
use std::ffi::{CStr, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use shardcast::Progress;
use shardcast::server::ServerHandle;
use shardcast::wire::Outcome;
use shardcast::{Auth, ErrorKind, PushError, PushOptions, PushReport, ServeOptions, Server};

/// Success.
pub const SC_OK: i32 = 0;
/// Some replicas published, others did not (the CLI's exit code 3).
pub const SC_PARTIAL: i32 = 1;
/// A replica could not be reached.
pub const SC_ERR_UNREACHABLE: i32 = -1;
/// The version is already published (or being received) on a replica.
pub const SC_ERR_VERSION_EXISTS: i32 = -2;
/// A replica refused: too many sessions.
pub const SC_ERR_BUSY: i32 = -3;
/// A replica's disk is full.
pub const SC_ERR_DISK_FULL: i32 = -4;
/// Bytes did not match their digest.
pub const SC_ERR_DIGEST_MISMATCH: i32 = -5;
/// A connection broke.
pub const SC_ERR_CONNECTION_LOST: i32 = -6;
/// A peer spoke the protocol wrong.
pub const SC_ERR_PROTOCOL: i32 = -7;
/// A local I/O error.
pub const SC_ERR_IO: i32 = -8;
/// The source or its manifest is unusable (bad name, bad path, bad chunk size).
pub const SC_ERR_BAD_MANIFEST: i32 = -9;
/// The source could not be read.
pub const SC_ERR_SOURCE: i32 = -10;
/// Nothing moved for the idle timeout.
pub const SC_ERR_STALLED: i32 = -11;
/// The push was aborted (cancelled, or a node upstream failed).
pub const SC_ERR_ABORTED: i32 = -12;
/// Asked for something this build or node cannot do (e.g. `--transport rdma` without RDMA).
pub const SC_ERR_UNSUPPORTED: i32 = -13;
/// Authentication with the cluster key failed (no key, a wrong key, a peer without it).
pub const SC_ERR_UNAUTHORIZED: i32 = -14;
/// A bad argument: NULL handle, non-UTF-8 string, buffer too small, or an option the push cannot
/// use (a rail that is not this host's address, a chunk size the pool cannot hold).
pub const SC_ERR_INVALID_ARG: i32 = -20;
/// The wait timed out; the push is still running.
pub const SC_ERR_TIMEOUT: i32 = -21;
/// The push was cancelled by the caller.
pub const SC_ERR_CANCELLED: i32 = -22;
/// A bug: a panic was caught at the boundary.
pub const SC_ERR_PANIC: i32 = -23;

/// Replica outcome in [`ScReplicaResult::status`]: published.
pub const SC_REPLICA_PUBLISHED: i32 = 0;
/// Replica outcome: failed (see `error`).
pub const SC_REPLICA_FAILED: i32 = 1;
/// Replica outcome: still receiving when an async push returned (it completes on its own).
pub const SC_REPLICA_BEHIND: i32 = 2;

fn code_of(kind: ErrorKind) -> i32 {
    match kind {
        ErrorKind::Unreachable => SC_ERR_UNREACHABLE,
        ErrorKind::VersionExists => SC_ERR_VERSION_EXISTS,
        ErrorKind::Busy => SC_ERR_BUSY,
        ErrorKind::DiskFull => SC_ERR_DISK_FULL,
        ErrorKind::DigestMismatch => SC_ERR_DIGEST_MISMATCH,
        ErrorKind::ConnectionLost => SC_ERR_CONNECTION_LOST,
        ErrorKind::Protocol => SC_ERR_PROTOCOL,
        ErrorKind::Io => SC_ERR_IO,
        ErrorKind::BadManifest => SC_ERR_BAD_MANIFEST,
        ErrorKind::InvalidArgument => SC_ERR_INVALID_ARG,
        ErrorKind::Source => SC_ERR_SOURCE,
        ErrorKind::Stalled => SC_ERR_STALLED,
        ErrorKind::Aborted => SC_ERR_ABORTED,
        ErrorKind::Unsupported => SC_ERR_UNSUPPORTED,
        ErrorKind::Unauthorized => SC_ERR_UNAUTHORIZED,
    }
}

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

fn set_error(msg: impl Into<String>) {
    LAST_ERROR.with(|e| *e.borrow_mut() = msg.into());
}

/// Runs `f`, turning a panic into `SC_ERR_PANIC` and an `Err((code, message))` into its code
/// with the message as the thread's last error.
fn guard(f: impl FnOnce() -> Result<i32, (i32, String)>) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(code)) => code,
        Ok(Err((code, msg))) => {
            set_error(msg);
            code
        }
        Err(p) => {
            let what =
                p.downcast_ref::<&str>().map(|s| (*s).to_owned()).or_else(|| p.downcast_ref::<String>().cloned());
            set_error(format!("internal error (panic): {}", what.unwrap_or_default()));
            SC_ERR_PANIC
        }
    }
}

fn invalid(msg: impl Into<String>) -> (i32, String) {
    (SC_ERR_INVALID_ARG, msg.into())
}

/// # Safety
/// `p` is NULL or a NUL-terminated string.
unsafe fn str_arg(p: *const c_char, what: &str) -> Result<String, (i32, String)> {
    if p.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    unsafe { CStr::from_ptr(p) }.to_str().map(str::to_owned).map_err(|_| invalid(format!("{what} is not UTF-8")))
}

/// Copies `s` into `buf` (NUL-terminated, truncated to fit) and returns the full length (without
/// the NUL), so a caller can retry with a larger buffer.
///
/// # Safety
/// `buf` is NULL or points to `len` writable bytes.
unsafe fn copy_out(s: &str, buf: *mut c_char, len: usize) -> i32 {
    if !buf.is_null() && len > 0 {
        let n = s.len().min(len - 1);
        // SAFETY: `buf` has room for `len` > n bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(s.as_ptr(), buf.cast::<u8>(), n);
            *buf.add(n) = 0;
        }
    }
    i32::try_from(s.len()).unwrap_or(i32::MAX)
}

/// The library version, a static NUL-terminated string.
#[unsafe(no_mangle)]
pub extern "C" fn sc_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Copies the calling thread's last error message into `buf` (`len` bytes, NUL-terminated,
/// truncated to fit) and returns its full length; 0 when there is none.
///
/// # Safety
/// `buf` is NULL or points to `len` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sc_last_error(buf: *mut c_char, len: usize) -> i32 {
    LAST_ERROR.with(|e| {
        // SAFETY: passed on from the caller.
        unsafe { copy_out(&e.borrow(), buf, len) }
    })
}

// ---------------------------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------------------------

/// Options of [`sc_server_start`]. Zero means the default for every number.
#[repr(C)]
pub struct ScServerOpts {
    /// Address to listen on, e.g. "0.0.0.0:7071" or "127.0.0.1:0" (a free port).
    pub listen: *const c_char,
    /// Directory that holds the published shard sets.
    pub root: *const c_char,
    /// Versions kept per name (default 2).
    pub keep: u32,
    /// Buffer pool per push in MiB (default 64).
    pub pool_mb: u32,
    /// Seconds without progress before a push is dropped (default 120).
    pub idle_timeout_s: u32,
    /// The cluster key file every peer must prove it holds (NULL: no authentication).
    pub key_file: *const c_char,
    /// Non-zero: accept only pushes that encrypt their chunks (`serve --encrypt`).
    pub require_encrypt: u32,
    /// Mutual TLS instead of a cluster key: this node's certificate chain, its key and the CA
    /// (PEM files; all three or none; NULL: no TLS).
    pub tls_cert: *const c_char,
    /// See `tls_cert`.
    pub tls_key: *const c_char,
    /// See `tls_cert`.
    pub tls_ca: *const c_char,
    /// This node's rails (`serve --rail`): comma-separated local addresses, rail 0 first, each
    /// listened on at the serve port and announced to the node upstream, whose lane k connects
    /// to rail k mod R (NULL: the listen address alone).
    pub rails: *const c_char,
}

/// A running replica server (opaque).
pub struct ScServer {
    handle: ServerHandle,
}

/// Starts a replica server on its own threads and returns once it listens.
///
/// # Safety
/// `opts` points to a valid `ScServerOpts` whose strings are NUL-terminated; `out` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sc_server_start(opts: *const ScServerOpts, out: *mut *mut ScServer) -> i32 {
    guard(|| {
        if opts.is_null() || out.is_null() {
            return Err(invalid("sc_server_start: opts and out must not be NULL"));
        }
        // SAFETY: non-NULL and valid by the caller's contract.
        let o = unsafe { &*opts };
        // SAFETY: as above.
        let listen = unsafe { str_arg(o.listen, "listen") }?;
        // SAFETY: as above.
        let root = unsafe { str_arg(o.root, "root") }?;
        let mut so = ServeOptions::new(listen, PathBuf::from(root));
        if o.keep > 0 {
            so.keep = o.keep as usize;
        }
        if o.pool_mb > 0 {
            so.pool_bytes = (o.pool_mb as usize) << 20;
        }
        if o.idle_timeout_s > 0 {
            so.limits.idle_timeout = Duration::from_secs(u64::from(o.idle_timeout_s));
        }
        // SAFETY: each NULL or NUL-terminated by the caller's contract.
        so.auth = unsafe { auth_arg(o.key_file, o.tls_cert, o.tls_key, o.tls_ca) }?;
        so.require_encrypt = o.require_encrypt != 0;
        // SAFETY: NULL or NUL-terminated by the caller's contract.
        so.rails = unsafe { rails_arg(o.rails) }?;
        let server = Server::bind(so).map_err(|e| match e {
            shardcast::ServeError::BadRail(m) => invalid(m),
            e => (SC_ERR_IO, format!("cannot start the server: {e}")),
        })?;
        let boxed = Box::new(ScServer { handle: server.spawn() });
        // SAFETY: out is writable.
        unsafe { *out = Box::into_raw(boxed) };
        Ok(SC_OK)
    })
}

/// Copies the server's bound address ("IP:PORT") into `buf`; returns its length.
///
/// # Safety
/// `server` is a live handle; `buf` is NULL or `len` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sc_server_addr(server: *const ScServer, buf: *mut c_char, len: usize) -> i32 {
    guard(|| {
        if server.is_null() {
            return Err(invalid("sc_server_addr: server is NULL"));
        }
        // SAFETY: a live handle by the caller's contract.
        let addr = unsafe { &*server }.handle.addr().to_string();
        // SAFETY: passed on from the caller.
        Ok(unsafe { copy_out(&addr, buf, len) })
    })
}

/// Stops accepting, waits for the server's thread, and frees the handle.
///
/// # Safety
/// `server` is a live handle (or NULL); it is invalid afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sc_server_stop(server: *mut ScServer) -> i32 {
    guard(|| {
        if server.is_null() {
            return Err(invalid("sc_server_stop: server is NULL"));
        }
        // SAFETY: created by Box::into_raw in sc_server_start, freed once here.
        drop(unsafe { Box::from_raw(server) });
        Ok(SC_OK)
    })
}

// ---------------------------------------------------------------------------------------------
// Pushes
// ---------------------------------------------------------------------------------------------

/// Options of [`sc_push_start`]. Zero means the default for every number.
#[repr(C)]
pub struct ScPushOpts {
    /// The directory or file to push.
    pub source: *const c_char,
    /// Shard set name.
    pub name: *const c_char,
    /// Version.
    pub version: u64,
    /// The chain: comma-separated replica addresses, first replica first.
    pub to: *const c_char,
    /// Chunk size in bytes (default 4 MiB).
    pub chunk_size: u32,
    /// Seconds to wait for each connection and the chain's answer (default 10).
    pub connect_timeout_s: u32,
    /// "auto", "tcp" or "rdma" (NULL: auto).
    pub transport: *const c_char,
    /// Versions of `name` each replica keeps once this one is published (0: the replica's own
    /// setting).
    pub keep: u32,
    /// Non-zero: hash first and send each replica only the chunks its current version of
    /// `name` does not have (see `shardcast push --incremental`).
    pub incremental: u32,
    /// 0 sync (return when every replica published), 1 async (return when the first one has;
    /// the others complete on their own and are reported `SC_REPLICA_BEHIND`).
    pub mode: u32,
    /// Replicas that must publish for `SC_OK` (0: all, or the first in async mode).
    pub min_replicas: u32,
    /// Non-zero: do not repair the chain around a replica that dies mid-push.
    pub no_repair: u32,
    /// The cluster key file to authenticate with (NULL: no authentication).
    pub key_file: *const c_char,
    /// Non-zero: encrypt the chunks on every hop (AES-256-GCM; needs `key_file` or TLS; TCP hops).
    pub encrypt: u32,
    /// Mutual TLS instead of a cluster key: this node's certificate chain, its key and the CA
    /// (PEM files; all three or none; NULL: no TLS).
    pub tls_cert: *const c_char,
    /// See `tls_cert`.
    pub tls_key: *const c_char,
    /// See `tls_cert`.
    pub tls_ca: *const c_char,
    /// Chunk compression (`shardcast push --compress`): 0 off, 1 auto, 2 zstd, 3 zstd-grouped.
    pub compress: u32,
    /// The zstd level, 1 to 19 (0: the default, 1).
    pub compress_level: u32,
    /// XOR deltas (`shardcast push --delta --delta-base`): the previous version of `source` on
    /// this host, laid out like it (NULL: no deltas). Implies `incremental`. For buffers, the
    /// base's files are those at the buffers' paths.
    pub delta_base: *const c_char,
    /// Lanes per hop (`shardcast push --lanes`): every hop of the chain runs as this many TCP
    /// connections, each chunk on the lane that has room (0: 1 lane; at most 16).
    pub lanes: u32,
    /// This node's rails (`shardcast push --rail`): comma-separated local addresses the first
    /// hop's lanes bind to, lane k to rail k mod R (NULL: the kernel picks).
    pub rails: *const c_char,
}

/// One file of a push from memory ([`sc_push_start_buffers`]).
#[repr(C)]
pub struct ScBuffer {
    /// Relative path the bytes are published under (`/`-separated; parents are created).
    pub path: *const c_char,
    /// The bytes (may be NULL when `len` is 0).
    pub data: *const u8,
    /// Their length.
    pub len: usize,
}

/// A snapshot of a push's progress.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct ScProgress {
    /// 0 connecting, 1 streaming, 2 done.
    pub state: i32,
    /// Bytes of the shard set (0 until the source is scanned).
    pub total_bytes: u64,
    /// Bytes written on every replica so far.
    pub acked_bytes: u64,
    /// Chunks sent to the first replica.
    pub sent_chunks: u64,
    /// Chunks of the shard set.
    pub total_chunks: u64,
    /// Seconds since the push started.
    pub elapsed_s: f64,
}

/// One replica's result.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ScReplicaResult {
    /// `SC_REPLICA_PUBLISHED` or `SC_REPLICA_FAILED`.
    pub status: i32,
    /// For a failed replica, the `SC_ERR_*` code of the cause; else 0.
    pub error: i32,
}

type Outcome2 = Result<PushReport, PushError>;

struct Shared {
    progress: Progress,
    result: Mutex<Option<Outcome2>>,
    done: Condvar,
}

/// A push running in the background (opaque).
pub struct ScPush {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    started: Instant,
}

/// Starts a push on a background thread and returns at once.
///
/// # Safety
/// `opts` points to a valid `ScPushOpts` whose strings are NUL-terminated; `out` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sc_push_start(opts: *const ScPushOpts, out: *mut *mut ScPush) -> i32 {
    guard(|| {
        if opts.is_null() || out.is_null() {
            return Err(invalid("sc_push_start: opts and out must not be NULL"));
        }
        // SAFETY: non-NULL and valid by the caller's contract.
        let o = unsafe { &*opts };
        // SAFETY: as above.
        let source = unsafe { str_arg(o.source, "source") }?;
        // SAFETY: as above.
        let po = unsafe { push_options(o) }?;
        start(out, move |p| shardcast::push(source.as_ref(), &po, Some(p)))
    })
}

/// Starts a push of `count` buffers in memory (no file is written on this side) and returns at
/// once; `opts->source` is ignored. Paths are copied now; the bytes are read while the push
/// runs, so they must stay valid and unchanged until [`sc_push_wait`] has returned something
/// other than `SC_ERR_TIMEOUT`, or [`sc_push_free`] has returned. A repair (a replica lost
/// mid-push) reads them again and checks them against the digests of the first pass: a buffer
/// changed meanwhile fails the replicas being repaired (kind `source`, naming the file) rather
/// than giving replicas different bytes under one version.
///
/// # Safety
/// `opts` as for [`sc_push_start`]; `buffers` points to `count` `ScBuffer`s whose `data` point
/// to `len` readable bytes each, valid as said above; `out` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sc_push_start_buffers(
    opts: *const ScPushOpts,
    buffers: *const ScBuffer,
    count: usize,
    out: *mut *mut ScPush,
) -> i32 {
    guard(|| {
        if opts.is_null() || out.is_null() || (buffers.is_null() && count > 0) {
            return Err(invalid("sc_push_start_buffers: opts, buffers and out must not be NULL"));
        }
        // SAFETY: non-NULL and valid by the caller's contract.
        let o = unsafe { &*opts };
        // SAFETY: as above.
        let po = unsafe { push_options(o) }?;
        let bufs = if count == 0 {
            &[][..]
        } else {
            // SAFETY: `count` valid ScBuffers at `buffers`, by the caller's contract.
            unsafe { std::slice::from_raw_parts(buffers, count) }
        };
        let mut files: Vec<(String, shardcast::MemoryData)> = Vec::with_capacity(count);
        for (i, b) in bufs.iter().enumerate() {
            // SAFETY: NUL-terminated by the caller's contract.
            let path = unsafe { str_arg(b.path, &format!("buffers[{i}].path")) }?;
            if b.data.is_null() && b.len > 0 {
                return Err(invalid(format!("buffers[{i}].data is NULL with len {}", b.len)));
            }
            files.push((path, std::sync::Arc::new(Borrowed { ptr: b.data, len: b.len })));
        }
        start(out, move |p| shardcast::push_memory(files, &po, Some(p)))
    })
}

/// Starts staging the plan at `plan_path` (see `shardcast stage --help` for its TOML format)
/// on a background thread and returns at once: every node of the plan gets exactly its files,
/// published as the plan's NAME@VERSION. From `opts` only the options of the chain are used:
/// `connect_timeout_s`, `transport`, `keep`, the authentication (`key_file`, `tls_*`),
/// `encrypt`, `compress`, `compress_level`, `lanes` and `rails` (name, version, chain and chunk
/// size come from the plan). The handle is used like a push's.
///
/// # Safety
/// `opts` as for [`sc_push_start`] (its `source`, `name` and `to` may be NULL); `plan_path` is
/// a NUL-terminated string; `out` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sc_stage_start(
    opts: *const ScPushOpts,
    plan_path: *const c_char,
    out: *mut *mut ScPush,
) -> i32 {
    guard(|| {
        if opts.is_null() || out.is_null() {
            return Err(invalid("sc_stage_start: opts and out must not be NULL"));
        }
        // SAFETY: NUL-terminated by the caller's contract.
        let path = unsafe { str_arg(plan_path, "plan_path") }?;
        let plan = shardcast::stage::Plan::load(path.as_ref()).map_err(|e| (code_of(e.kind()), e.to_string()))?;
        // SAFETY: non-NULL and valid by the caller's contract.
        let o = unsafe { &*opts };
        let mut po = PushOptions::new(plan.name.clone(), plan.version, plan.chain());
        // SAFETY: the caller's contract.
        unsafe { chain_options(o, &mut po) }?;
        start(out, move |p| shardcast::stage::stage(&plan, &po, Some(p)))
    })
}

/// Bytes lent by the caller of [`sc_push_start_buffers`] for the duration of the push.
struct Borrowed {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the caller keeps the bytes valid until the push thread has ended (the documented
// contract of sc_push_start_buffers); shardcast only reads them.
unsafe impl Send for Borrowed {}
// SAFETY: as above; reads only.
unsafe impl Sync for Borrowed {}

impl AsRef<[u8]> for Borrowed {
    fn as_ref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `len` readable bytes at `ptr` while the push runs, by the caller's contract;
        // this is only called by the push, on its thread, before it ends.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// The `PushOptions` an `ScPushOpts` asks for (everything but the source).
///
/// # Safety
/// The strings of `o` are NULL or NUL-terminated.
unsafe fn push_options(o: &ScPushOpts) -> Result<PushOptions, (i32, String)> {
    // SAFETY: the caller's contract.
    let (name, to) = unsafe { (str_arg(o.name, "name")?, str_arg(o.to, "to")?) };
    let to: Vec<String> = to.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect();
    let mut po = PushOptions::new(name, o.version, to);
    if o.chunk_size > 0 {
        po.chunk_size = o.chunk_size;
    }
    // SAFETY: the caller's contract.
    unsafe { chain_options(o, &mut po) }?;
    po.incremental = o.incremental != 0;
    po.mode = match o.mode {
        0 => shardcast::wire::Mode::Sync,
        1 => shardcast::wire::Mode::Async,
        m => return Err(invalid(format!("mode {m}: 0 (sync) or 1 (async)"))),
    };
    po.min_replicas = (o.min_replicas > 0).then_some(o.min_replicas as usize);
    po.repair = o.no_repair == 0;
    if !o.delta_base.is_null() {
        // SAFETY: non-NULL and NUL-terminated by the caller's contract.
        po.delta_base = Some(PathBuf::from(unsafe { str_arg(o.delta_base, "delta_base") }?));
    }
    Ok(po)
}

/// The options of `o` a push and a staging share: connect timeout, transport, retention.
///
/// # Safety
/// `o.transport` is NULL or NUL-terminated.
unsafe fn chain_options(o: &ScPushOpts, po: &mut PushOptions) -> Result<(), (i32, String)> {
    if o.connect_timeout_s > 0 {
        po.connect_timeout = Duration::from_secs(u64::from(o.connect_timeout_s));
    }
    if !o.transport.is_null() {
        // SAFETY: non-NULL and NUL-terminated by the caller's contract.
        let t = unsafe { str_arg(o.transport, "transport") }?;
        po.transport = t.parse().map_err(invalid)?;
    }
    po.keep = o.keep;
    // SAFETY: each NULL or NUL-terminated by the caller's contract.
    po.auth = unsafe { auth_arg(o.key_file, o.tls_cert, o.tls_key, o.tls_ca) }?;
    po.encrypt = o.encrypt != 0;
    po.compress = match o.compress {
        0 => shardcast::compress::Compress::Off,
        1 => shardcast::compress::Compress::Auto,
        2 => shardcast::compress::Compress::Zstd,
        3 => shardcast::compress::Compress::ZstdGrouped,
        n => return Err(invalid(format!("compress {n}: 0 off, 1 auto, 2 zstd, 3 zstd-grouped"))),
    };
    po.compress_level = match o.compress_level {
        0 => None,
        n @ 1..=19 => Some(n as i32),
        n => return Err(invalid(format!("compress_level {n}: 1 to 19, or 0 for the default"))),
    };
    po.lanes = match o.lanes {
        0 => 1,
        n => u8::try_from(n).map_err(|_| invalid(format!("lanes {n}: 1 to 16, or 0 for one lane")))?,
    };
    // SAFETY: NULL or NUL-terminated by the caller's contract.
    po.rails = unsafe { rails_arg(o.rails) }?;
    Ok(())
}

/// The addresses of a comma-separated `rails` option (NULL: none).
///
/// # Safety
/// `rails` is NULL or a NUL-terminated string.
unsafe fn rails_arg(rails: *const c_char) -> Result<Vec<std::net::IpAddr>, (i32, String)> {
    if rails.is_null() {
        return Ok(Vec::new());
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    let text = unsafe { str_arg(rails, "rails") }?;
    text.split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(|r| r.parse().map_err(|_| invalid(format!("rails: {r:?} is not an IP address"))))
        .collect()
}

/// The node's authentication from the C options' four file arguments: a cluster key
/// (`key_file`), mutual TLS (`tls_cert`, `tls_key`, `tls_ca`, all three) or none (all NULL).
/// Both a key and TLS is an error: they are two ways to authenticate.
///
/// # Safety
/// Each pointer is NULL or a NUL-terminated string.
unsafe fn auth_arg(
    key_file: *const c_char,
    cert: *const c_char,
    key: *const c_char,
    ca: *const c_char,
) -> Result<Auth, (i32, String)> {
    // SAFETY: the caller's contract.
    let cluster_key = unsafe { key_arg(key_file) }?;
    // SAFETY: the caller's contract.
    let tls = unsafe { tls_arg(cert, key, ca) }?;
    match (cluster_key, tls) {
        (Some(_), Some(_)) => Err(invalid("key_file and tls_cert are two ways to authenticate: give one of them")),
        (Some(k), None) => Ok(Auth::Key(k)),
        (None, Some(id)) => Ok(Auth::Tls(id)),
        (None, None) => Ok(Auth::None),
    }
}

/// A TLS identity from its three file arguments (all NULL: none).
///
/// # Safety
/// Each pointer is NULL or a NUL-terminated string.
unsafe fn tls_arg(
    cert: *const c_char,
    key: *const c_char,
    ca: *const c_char,
) -> Result<Option<std::sync::Arc<shardcast::tls::TlsIdentity>>, (i32, String)> {
    match (cert.is_null(), key.is_null(), ca.is_null()) {
        (true, true, true) => Ok(None),
        (false, false, false) => {
            // SAFETY: the caller's contract.
            let (cert, key, ca) =
                unsafe { (str_arg(cert, "tls_cert")?, str_arg(key, "tls_key")?, str_arg(ca, "tls_ca")?) };
            shardcast::tls::TlsIdentity::load(
                PathBuf::from(cert).as_path(),
                PathBuf::from(key).as_path(),
                PathBuf::from(ca).as_path(),
            )
            .map(|id| Some(std::sync::Arc::new(id)))
            .map_err(invalid)
        }
        _ => Err(invalid("tls_cert, tls_key and tls_ca go together: give all three or none")),
    }
}

/// The cluster key from a key file argument (NULL: none).
///
/// # Safety
/// `p` is NULL or a NUL-terminated string.
unsafe fn key_arg(p: *const c_char) -> Result<Option<shardcast::auth::ClusterKey>, (i32, String)> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller's contract.
    let path = unsafe { str_arg(p, "key_file") }?;
    shardcast::auth::ClusterKey::load(path.as_ref()).map(Some).map_err(invalid)
}

/// Runs `push` on a new thread with the handle's progress, and stores the handle in `out`.
fn start(
    out: *mut *mut ScPush,
    push: impl FnOnce(&Progress) -> Result<PushReport, PushError> + Send + 'static,
) -> Result<i32, (i32, String)> {
    let shared = Arc::new(Shared { progress: Progress::default(), result: Mutex::new(None), done: Condvar::new() });
    let s2 = Arc::clone(&shared);
    let thread = std::thread::Builder::new()
        .name("shardcast-push".into())
        .spawn(move || {
            let r = catch_unwind(AssertUnwindSafe(|| push(&s2.progress)))
                .unwrap_or_else(|_| Err(PushError::BadInput("internal error (panic) in the push".into())));
            *s2.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            s2.done.notify_all();
        })
        .map_err(|e| (SC_ERR_IO, format!("cannot start the push thread: {e}")))?;
    let boxed = Box::new(ScPush { shared, thread: Some(thread), started: Instant::now() });
    // SAFETY: out is non-NULL (checked by the callers) and writable by their contract.
    unsafe { *out = Box::into_raw(boxed) };
    Ok(SC_OK)
}

/// # Safety
/// `push` is NULL or a live handle.
unsafe fn push_ref<'a>(push: *const ScPush, what: &str) -> Result<&'a ScPush, (i32, String)> {
    if push.is_null() {
        return Err(invalid(format!("{what}: push is NULL")));
    }
    // SAFETY: a live handle by the caller's contract.
    Ok(unsafe { &*push })
}

/// Fills `out` with the push's progress. Never blocks.
///
/// # Safety
/// `push` is a live handle; `out` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sc_push_poll(push: *const ScPush, out: *mut ScProgress) -> i32 {
    guard(|| {
        // SAFETY: the caller's contract.
        let p = unsafe { push_ref(push, "sc_push_poll") }?;
        if out.is_null() {
            return Err(invalid("sc_push_poll: out is NULL"));
        }
        let pr = &p.shared.progress;
        let done = p.shared.result.lock().unwrap_or_else(|e| e.into_inner()).is_some();
        let snap = ScProgress {
            state: if done {
                2
            } else if pr.streaming.load(Relaxed) {
                1
            } else {
                0
            },
            total_bytes: pr.total_bytes.load(Relaxed),
            acked_bytes: pr.acked_bytes.load(Relaxed),
            sent_chunks: pr.sent_chunks.load(Relaxed),
            total_chunks: pr.total_chunks.load(Relaxed),
            elapsed_s: p.started.elapsed().as_secs_f64(),
        };
        // SAFETY: out is writable.
        unsafe { *out = snap };
        Ok(SC_OK)
    })
}

fn outcome_code(r: &Outcome2, cancelled: bool) -> Result<i32, (i32, String)> {
    match r {
        Ok(rep) if rep.ok() => Ok(SC_OK),
        Ok(rep) if cancelled => Err((SC_ERR_CANCELLED, format!("push {}@{} cancelled", rep.name, rep.version))),
        Ok(rep) => {
            let failed: Vec<String> = rep
                .replicas
                .iter()
                .filter_map(|r| match &r.outcome {
                    Outcome::Failed(e) => Some(format!("{}: {}", r.node, e.message)),
                    Outcome::Published | Outcome::Behind => None,
                })
                .collect();
            let code = if rep.published() > 0 {
                SC_PARTIAL
            } else {
                rep.replicas
                    .iter()
                    .find_map(|r| match &r.outcome {
                        Outcome::Failed(e) if e.kind != ErrorKind::Aborted => Some(code_of(e.kind)),
                        _ => None,
                    })
                    .unwrap_or(SC_ERR_ABORTED)
            };
            set_error(failed.join("; "));
            Ok(code)
        }
        Err(_) if cancelled => Err((SC_ERR_CANCELLED, "push cancelled".into())),
        Err(e) => Err((code_of(e.kind()), e.to_string())),
    }
}

/// Waits up to `timeout_ms` (0: forever) for the push to end. Returns `SC_ERR_TIMEOUT` if it is
/// still running, else its outcome: `SC_OK` (every replica published), `SC_PARTIAL` (some did),
/// `SC_ERR_CANCELLED`, or the error's code (message in `sc_last_error`).
///
/// # Safety
/// `push` is a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sc_push_wait(push: *mut ScPush, timeout_ms: u32) -> i32 {
    guard(|| {
        // SAFETY: the caller's contract.
        let p = unsafe { push_ref(push, "sc_push_wait") }?;
        let deadline = (timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(u64::from(timeout_ms)));
        let mut g = p.shared.result.lock().unwrap_or_else(|e| e.into_inner());
        while g.is_none() {
            match deadline {
                None => g = p.shared.done.wait(g).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err((SC_ERR_TIMEOUT, format!("the push is still running after {timeout_ms} ms")));
                    }
                    g = p.shared.done.wait_timeout(g, d - now).unwrap_or_else(|e| e.into_inner()).0;
                }
            }
        }
        outcome_code(g.as_ref().expect("checked"), p.shared.progress.cancelled())
    })
}

/// Asks the push to stop (within ~20 ms once chunks move; a push still connecting stops when
/// the chain has answered). Replicas that have not published drop what they staged. A replica
/// that already published (a sync push publishes on each replica once its chunks are written,
/// before the tail reports) keeps that version: a cancel never takes a published version back.
///
/// # Safety
/// `push` is a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sc_push_cancel(push: *mut ScPush) -> i32 {
    guard(|| {
        // SAFETY: the caller's contract.
        let p = unsafe { push_ref(push, "sc_push_cancel") }?;
        p.shared.progress.cancel.store(true, Relaxed);
        Ok(SC_OK)
    })
}

/// Number of replicas in the finished push's result (0 while it runs, or when it failed before
/// the chain reported).
///
/// # Safety
/// `push` is a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sc_push_replica_count(push: *const ScPush) -> i32 {
    guard(|| {
        // SAFETY: the caller's contract.
        let p = unsafe { push_ref(push, "sc_push_replica_count") }?;
        let g = p.shared.result.lock().unwrap_or_else(|e| e.into_inner());
        Ok(match g.as_ref() {
            Some(Ok(rep)) => i32::try_from(rep.replicas.len()).unwrap_or(i32::MAX),
            _ => 0,
        })
    })
}

/// Times the finished push repaired its chain: re-formed it without a replica that was lost
/// mid-push (died, its link broke, or it stalled), the others resuming (0 while it runs, or
/// when it failed before the chain reported).
///
/// # Safety
/// `push` is a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sc_push_repairs(push: *const ScPush) -> i32 {
    guard(|| {
        // SAFETY: the caller's contract.
        let p = unsafe { push_ref(push, "sc_push_repairs") }?;
        let g = p.shared.result.lock().unwrap_or_else(|e| e.into_inner());
        Ok(match g.as_ref() {
            Some(Ok(rep)) => i32::try_from(rep.repairs).unwrap_or(i32::MAX),
            _ => 0,
        })
    })
}

/// Replica `i` of the finished push: fills `out`, copies "NODE: message" (or "NODE") into
/// `msg` (`msg_len` bytes) and returns that text's full length.
///
/// # Safety
/// `push` is a live handle; `out` is writable; `msg` is NULL or `msg_len` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sc_push_replica_result(
    push: *const ScPush,
    i: usize,
    out: *mut ScReplicaResult,
    msg: *mut c_char,
    msg_len: usize,
) -> i32 {
    guard(|| {
        // SAFETY: the caller's contract.
        let p = unsafe { push_ref(push, "sc_push_replica_result") }?;
        if out.is_null() {
            return Err(invalid("sc_push_replica_result: out is NULL"));
        }
        let g = p.shared.result.lock().unwrap_or_else(|e| e.into_inner());
        let Some(Ok(rep)) = g.as_ref() else {
            return Err(invalid("sc_push_replica_result: the push has no replica results (running, or failed early)"));
        };
        let r = rep.replicas.get(i).ok_or_else(|| invalid(format!("replica index {i} out of range")))?;
        let (res, text) = match &r.outcome {
            Outcome::Published => (ScReplicaResult { status: SC_REPLICA_PUBLISHED, error: 0 }, r.node.clone()),
            Outcome::Failed(e) => (
                ScReplicaResult { status: SC_REPLICA_FAILED, error: code_of(e.kind) },
                format!("{}: {}", r.node, e.message),
            ),
            Outcome::Behind => (ScReplicaResult { status: SC_REPLICA_BEHIND, error: 0 }, r.node.clone()),
        };
        // SAFETY: out is writable; msg per the caller's contract.
        unsafe {
            *out = res;
            Ok(copy_out(&text, msg, msg_len))
        }
    })
}

/// Chunks the finished push sent on each lane of its first hop: fills `out` with up to `len`
/// counts (lane 0 first) and returns the number of lanes (0 while the push runs, or when it
/// failed before the chain reported).
///
/// # Safety
/// `push` is a live handle; `out` is NULL (with `len` 0) or `len` writable `uint64_t`s.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sc_push_lane_chunks(push: *const ScPush, out: *mut u64, len: usize) -> i32 {
    // SAFETY: the caller's contract is `per_lane`'s.
    guard(|| unsafe { per_lane(push, "sc_push_lane_chunks", out, len, |rep| rep.lane_chunks.clone()) })
}

/// Copies one value per lane of the finished push's first hop (`of` its report; none while it
/// runs or when it failed) into `out`, up to `len`; returns the number of lanes.
///
/// # Safety
/// `push` is a live handle; `out` is NULL (with `len` 0) or `len` writable `T`s.
unsafe fn per_lane<T>(
    push: *const ScPush,
    name: &str,
    out: *mut T,
    len: usize,
    of: impl Fn(&PushReport) -> Vec<T>,
) -> Result<i32, (i32, String)> {
    // SAFETY: the caller's contract.
    let p = unsafe { push_ref(push, name) }?;
    if out.is_null() && len > 0 {
        return Err(invalid(format!("{name}: out is NULL with len > 0")));
    }
    let g = p.shared.result.lock().unwrap_or_else(|e| e.into_inner());
    let values = match g.as_ref() {
        Some(Ok(rep)) => of(rep),
        _ => Vec::new(),
    };
    let lanes = i32::try_from(values.len()).unwrap_or(i32::MAX);
    for (i, v) in values.into_iter().take(len).enumerate() {
        // SAFETY: i < len, and `out` has `len` writable entries by the caller's contract.
        unsafe { out.add(i).write(v) };
    }
    Ok(lanes)
}

/// What each lane of the finished push's first hop ran on: fills `out` with up to `len` bytes
/// (lane 0 first), 1 for RDMA and 0 for TCP, and returns the number of lanes (0 while the push
/// runs, or when it failed before the chain reported). Lanes of one hop may differ under
/// `transport = "auto"` (a rail without an RDMA device runs TCP).
///
/// # Safety
/// `push` is a live handle; `out` is NULL (with `len` 0) or `len` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sc_push_lane_rdma(push: *const ScPush, out: *mut u8, len: usize) -> i32 {
    // SAFETY: the caller's contract is `per_lane`'s.
    guard(|| unsafe {
        per_lane(push, "sc_push_lane_rdma", out, len, |rep| {
            rep.lane_transports.iter().map(|t| u8::from(t == "rdma")).collect()
        })
    })
}

/// Frees the handle; a push still running is cancelled and waited for first.
///
/// # Safety
/// `push` is a live handle (or NULL); it is invalid afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sc_push_free(push: *mut ScPush) -> i32 {
    guard(|| {
        if push.is_null() {
            return Err(invalid("sc_push_free: push is NULL"));
        }
        // SAFETY: created by Box::into_raw in sc_push_start, freed once here.
        let mut p = unsafe { Box::from_raw(push) };
        p.shared.progress.cancel.store(true, Relaxed);
        if let Some(t) = p.thread.take() {
            let _ = t.join();
        }
        Ok(SC_OK)
    })
}

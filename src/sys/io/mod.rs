//! The I/O executor a session's event loop submits operations to.
//!
//! Two back ends behind one enum (no `dyn` on the hot path):
//! - [`uring::UringIo`]: one io_uring per session. Sockets use `RECV` (with `MSG_WAITALL`) and
//!   `SEND`; files use `READ_FIXED`/`WRITE_FIXED` on the pool, which is registered once as a
//!   fixed buffer. Several operations are in flight at once: a receive from upstream, a send to
//!   downstream, an ack receive, and any number of file writes or reads.
//! - [`plain::PlainIo`]: blocking syscalls on worker threads (one per socket direction, two for
//!   files), used where io_uring is refused (seccomp profiles of Docker and containerd refuse
//!   `io_uring_setup`) or forced with `SHARDCAST_IO=plain`.
//!
//! Both complete an operation only when it is whole: short reads and writes are resubmitted
//! for the remainder, so the engine sees exactly one [`Completion`] per [`Op`]. A receive
//! completes short only at end of stream.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use crate::pool::Pool;

pub mod plain;
pub mod uring;

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Receive exactly `len` bytes from a socket (short only at end of stream).
    Recv,
    /// Send `len` bytes to a socket.
    Send,
    /// Read `len` bytes of a file at an offset (short only at end of file).
    Read(u64),
    /// Write `len` bytes to a file at an offset.
    Write(u64),
    /// fsync a file.
    Fsync,
    /// Wait until `fd` is readable (an RDMA completion channel); `buf` and `len` are unused.
    /// May complete spuriously (with 0); the caller checks and submits it again.
    PollIn,
}

/// One operation: a kind, a file descriptor and a buffer inside the session's pool.
#[derive(Debug, Clone, Copy)]
pub struct Op {
    /// What to do.
    pub kind: OpKind,
    /// The socket or file.
    pub fd: RawFd,
    /// Start of the buffer (inside the pool mapping).
    pub buf: *mut u8,
    /// Length of the buffer.
    pub len: u32,
}

// SAFETY: an Op is plain data; the buffer it points to is owned by the pool and the contract of
// `Io::submit` keeps it valid and otherwise untouched until the op completes.
unsafe impl Send for Op {}

/// A finished operation: its token and the bytes done, or the error.
#[derive(Debug)]
pub struct Completion {
    /// The token given at submission.
    pub token: u64,
    /// Bytes transferred (less than asked only at end of stream / file), or the error.
    pub result: io::Result<usize>,
}

/// Which executor to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoChoice {
    /// io_uring when the kernel allows it, plain sockets otherwise.
    Auto,
    /// Plain blocking syscalls on worker threads.
    Plain,
}

impl IoChoice {
    /// `SHARDCAST_IO=plain` forces the plain back end; anything else is `Auto`.
    pub fn from_env() -> Self {
        match std::env::var("SHARDCAST_IO").as_deref() {
            Ok("plain") => Self::Plain,
            _ => Self::Auto,
        }
    }
}

/// The executor. One per session, not moved on the hot path, so the size difference between
/// the variants does not matter.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Io {
    /// io_uring.
    Uring(uring::UringIo),
    /// Blocking syscalls on threads.
    Plain(plain::PlainIo),
}

impl Io {
    /// Sets up the executor for a session over `pool`, falling back from io_uring to plain
    /// sockets when the kernel refuses it. Logs the choice once per process.
    pub fn new(choice: IoChoice, pool: &Pool) -> Self {
        if choice == IoChoice::Plain {
            log_once("plain sockets (SHARDCAST_IO=plain)");
            return Self::Plain(plain::PlainIo::new());
        }
        match uring::UringIo::new(pool) {
            Ok(u) => {
                log_once(&format!("io_uring ({})", u.features()));
                Self::Uring(u)
            }
            Err(e) => {
                log_once(&format!("plain sockets: io_uring setup refused ({e})"));
                Self::Plain(plain::PlainIo::new())
            }
        }
    }

    /// Submits an operation; its completion carries `token`.
    ///
    /// # Safety
    /// `op.buf..op.buf+op.len` must stay valid, and must be neither read nor written by anyone
    /// else (for `Send`/`Write`: not written), until the completion for `token` has been
    /// returned by [`Io::wait`] or [`Io::drain`].
    pub unsafe fn submit(&mut self, token: u64, op: Op) -> io::Result<()> {
        match self {
            // SAFETY: the caller's contract is passed on unchanged.
            Self::Uring(u) => unsafe { u.submit(token, op) },
            // SAFETY: likewise.
            Self::Plain(p) => unsafe { p.submit(token, op) },
        }
    }

    /// Waits up to `timeout` for at least one completion and appends all that are ready.
    pub fn wait(&mut self, out: &mut Vec<Completion>, timeout: Duration) -> io::Result<()> {
        match self {
            Self::Uring(u) => u.wait(out, timeout),
            Self::Plain(p) => p.wait(out, timeout),
        }
    }

    /// Operations submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        match self {
            Self::Uring(u) => u.in_flight(),
            Self::Plain(p) => p.in_flight(),
        }
    }

    /// Waits until nothing is in flight (the caller has shut its sockets down, so receives
    /// end), discarding completions. Called before the pool may be freed; returns false when
    /// operations are still in flight after 30 s, and the caller must then leak the pool rather
    /// than free memory the kernel or a worker may still write.
    #[must_use]
    pub fn drain(&mut self) -> bool {
        if let Self::Uring(u) = self {
            // Nothing else ends a readiness poll on a descriptor that stays quiet.
            u.cancel_polls();
        }
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.in_flight() > 0 && std::time::Instant::now() < deadline {
            out.clear();
            if self.wait(&mut out, Duration::from_millis(100)).is_err() {
                break;
            }
        }
        if self.in_flight() > 0 {
            tracing::error!("{} I/O operations did not finish; leaking their buffers", self.in_flight());
            return false;
        }
        true
    }

    /// Short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Uring(_) => "io_uring",
            Self::Plain(_) => "plain",
        }
    }
}

fn log_once(what: &str) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| tracing::info!("data path: {what}"));
}

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
//! for the remainder, so the engine sees exactly one [`Completion`] per submission. A receive
//! completes short only at end of stream.
//!
//! Buffers: an operation's bytes are a [`Span`] of the session's [`Pinned`] mapping. Submitting
//! takes a [`Lease`] on them, which travels with the operation (to the ring's in-flight table,
//! or to a worker thread) and is settled on the mapping when [`Io::wait`] hands the completion
//! over: until then the session cannot touch those bytes (see `sys::mem`).

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use crate::sys::mem::{Access, Lease, Pinned, Span};

pub(crate) mod plain;
pub(crate) mod uring;

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpKind {
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

/// One operation as the back ends see it: a kind, a file descriptor, and the lease on its
/// buffer (none for `Fsync` and `PollIn`).
#[derive(Debug)]
struct Op {
    kind: OpKind,
    fd: RawFd,
    lease: Option<Lease>,
}

impl Op {
    /// Start of the buffer (null without one).
    fn buf(&self) -> *mut u8 {
        self.lease.as_ref().map_or(std::ptr::null_mut(), Lease::ptr)
    }

    /// Length of the buffer (0 without one).
    fn len(&self) -> u32 {
        self.lease.as_ref().map_or(0, Lease::len)
    }
}

/// What a back end returns: the completion and the lease its operation held.
#[derive(Debug)]
struct Done {
    token: u64,
    result: io::Result<usize>,
    lease: Option<Lease>,
}

/// A finished operation: its token and the bytes done, or the error.
#[derive(Debug)]
pub(crate) struct Completion {
    /// The token given at submission.
    pub(crate) token: u64,
    /// Bytes transferred (less than asked only at end of stream / file), or the error.
    pub(crate) result: io::Result<usize>,
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
pub(crate) enum Io {
    /// io_uring.
    Uring(uring::UringIo),
    /// Blocking syscalls on threads.
    Plain(plain::PlainIo),
}

impl Io {
    /// Sets up the executor for a session over `mem` (its pool), falling back from io_uring to
    /// plain sockets when the kernel refuses it. Logs the choice once per process.
    pub(crate) fn new(choice: IoChoice, mem: &Pinned) -> Self {
        if choice == IoChoice::Plain {
            log_once("plain sockets (SHARDCAST_IO=plain)");
            return Self::Plain(plain::PlainIo::new());
        }
        match uring::UringIo::new(mem) {
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

    /// Submits an operation of `kind` on `fd` over the bytes `span` of `mem`; its completion
    /// carries `token`. The bytes are leased to the operation until [`Io::wait`] returns its
    /// completion.
    ///
    /// # Panics
    /// When `kind` takes no buffer (see [`Io::poll_in`]), or when an operation in flight holds
    /// bytes of `span` in a way that would race (see `sys::mem`).
    pub(crate) fn submit(
        &mut self,
        mem: &mut Pinned,
        token: u64,
        kind: OpKind,
        fd: RawFd,
        span: Span,
    ) -> io::Result<()> {
        let access = match kind {
            OpKind::Recv | OpKind::Read(_) => Access::Write,
            OpKind::Send | OpKind::Write(_) => Access::Read,
            OpKind::Fsync | OpKind::PollIn => panic!("{kind:?} takes no buffer"),
        };
        let op = Op { kind, fd, lease: Some(mem.lease(span, access)) };
        self.push(token, op).map_err(|(e, op)| {
            if let Some(l) = op.lease {
                mem.settle(l);
            }
            e
        })
    }

    /// Submits a readiness poll on `fd` (an RDMA completion channel): completes when it is
    /// readable, or spuriously with 0.
    pub(crate) fn poll_in(&mut self, token: u64, fd: RawFd) -> io::Result<()> {
        self.push(token, Op { kind: OpKind::PollIn, fd, lease: None }).map_err(|(e, _)| e)
    }

    fn push(&mut self, token: u64, op: Op) -> Result<(), (io::Error, Op)> {
        match self {
            Self::Uring(u) => u.submit(token, op),
            Self::Plain(p) => p.submit(token, op),
        }
    }

    /// Waits up to `timeout` for at least one completion and appends all that are ready; the
    /// leases of their operations go back to `mem`.
    pub(crate) fn wait(&mut self, mem: &mut Pinned, out: &mut Vec<Completion>, timeout: Duration) -> io::Result<()> {
        let mut done = std::mem::take(self.scratch());
        let r = match self {
            Self::Uring(u) => u.wait(&mut done, timeout),
            Self::Plain(p) => p.wait(&mut done, timeout),
        };
        for d in done.drain(..) {
            if let Some(l) = d.lease {
                mem.settle(l);
            }
            out.push(Completion { token: d.token, result: d.result });
        }
        *self.scratch() = done;
        r
    }

    fn scratch(&mut self) -> &mut Vec<Done> {
        match self {
            Self::Uring(u) => &mut u.scratch,
            Self::Plain(p) => &mut p.scratch,
        }
    }

    /// Operations submitted and not yet completed.
    pub(crate) fn in_flight(&self) -> usize {
        match self {
            Self::Uring(u) => u.in_flight(),
            Self::Plain(p) => p.in_flight(),
        }
    }

    /// Waits until nothing is in flight (the caller has shut its sockets down, so receives
    /// end), handing each completion to `seen`. Called before the pool may be freed; returns false when
    /// operations are still in flight after 30 s, and the caller must then leak the pool rather
    /// than free memory the kernel or a worker may still write.
    #[must_use]
    pub(crate) fn drain(&mut self, mem: &mut Pinned, mut seen: impl FnMut(Completion)) -> bool {
        if let Self::Uring(u) = self {
            // Nothing else ends a readiness poll on a descriptor that stays quiet.
            u.cancel_polls();
        }
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.in_flight() > 0 && std::time::Instant::now() < deadline {
            out.clear();
            if self.wait(mem, &mut out, Duration::from_millis(100)).is_err() {
                break;
            }
            out.drain(..).for_each(&mut seen);
        }
        if self.in_flight() > 0 {
            tracing::error!("{} I/O operations did not finish; leaking their buffers", self.in_flight());
            return false;
        }
        true
    }

    /// Short name for logs and metrics.
    pub(crate) fn name(&self) -> &'static str {
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

//! io_uring back end: the only module besides `plain` that hands buffers to the kernel.
//!
//! What it uses, and what happens without it:
//! - `RECV` with `MSG_WAITALL` and `SEND` with `MSG_NOSIGNAL` on sockets (kernel 5.6+);
//! - `READ_FIXED` / `WRITE_FIXED` on files, from the pool registered as one fixed buffer; when
//!   registration is refused (memlock limit) plain `READ` / `WRITE` are used;
//! - `FSYNC`; timeouts through `IORING_ENTER_EXT_ARG` (5.11+);
//! - file reads and writes are submitted with `IOSQE_ASYNC`, so their copies run on io_uring's
//!   worker threads, beside the socket copies of the session thread.
//!
//! Where `io_uring_setup` fails (EPERM under seccomp, ENOSYS on old kernels) the caller falls
//! back to [`super::plain`]. `wr_id`-style bookkeeping: an SQE's `user_data` is an index into a
//! slab of in-flight operations, never a pointer, so a stale completion cannot touch freed memory.

use std::io;
use std::time::Duration;

use io_uring::{IoUring, Probe, cqueue, opcode, squeue, types};

use super::{Done, Op, OpKind};

/// `user_data` of cancel requests: not an index into the slab, so their CQEs are skipped.
const CANCEL_DATA: u64 = u64::MAX;
use crate::sys::mem::Pinned;

#[derive(Debug)]
struct InFlight {
    token: u64,
    op: Op,
    done: usize,
    /// SEND_ZC notifications still to come: the buffer is the kernel's until they arrive.
    notifs: u32,
    /// The final result, held back while notifications are pending.
    result: Option<io::Result<usize>>,
}

/// One io_uring and its in-flight table.
pub(crate) struct UringIo {
    /// Completions reaped and not yet handed over (kept to reuse its allocation).
    pub(super) scratch: Vec<Done>,
    ring: IoUring,
    slab: Vec<Option<InFlight>>,
    free: Vec<usize>,
    live: usize,
    /// The registered pool range, when registration succeeded.
    fixed: Option<(usize, usize)>,
    /// Send from the registered pool with SEND_ZC (opt-in: `SHARDCAST_ZEROCOPY=1`).
    zero_copy: bool,
    features: String,
}

impl std::fmt::Debug for UringIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringIo").field("live", &self.live).field("features", &self.features).finish()
    }
}

impl UringIo {
    /// A ring with the pool registered as fixed buffer 0.
    pub(super) fn new(mem: &Pinned) -> io::Result<Self> {
        let ring = IoUring::builder().build(256)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (name, code) in [("RECV", opcode::Recv::CODE), ("SEND", opcode::Send::CODE), ("FSYNC", opcode::Fsync::CODE)]
        {
            if !probe.is_supported(code) {
                return Err(io::Error::new(io::ErrorKind::Unsupported, format!("io_uring lacks {name}")));
            }
        }
        if !ring.params().is_feature_ext_arg() {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "io_uring lacks EXT_ARG timeouts"));
        }
        let iov = libc::iovec { iov_base: mem.base().cast(), iov_len: mem.len() };
        // SAFETY: the iovec covers exactly the pool's mapping, which outlives this ring: the
        // session owns both, and drains this ring (`Io::drain`) before the pool is dropped.
        let fixed = match unsafe { ring.submitter().register_buffers(&[iov]) } {
            Ok(()) => Some((mem.base() as usize, mem.len())),
            Err(e) => {
                tracing::debug!("io_uring buffer registration refused ({e}); using unregistered reads/writes");
                None
            }
        };
        // Zero-copy sends pin the pool's pages instead of copying them into the socket. On
        // loopback and veth the kernel copies them on delivery anyway, so it is a loss there
        // (BENCHMARKS.md); it is meant for real NICs and stays opt-in.
        let zc_supported = probe.is_supported(opcode::SendZc::CODE);
        let zero_copy =
            zc_supported && fixed.is_some() && std::env::var_os("SHARDCAST_ZEROCOPY").is_some_and(|v| v == "1");
        let features = format!(
            "registered buffers={} SEND_ZC={} fast_poll={}",
            if fixed.is_some() { "yes" } else { "no" },
            match (zc_supported, zero_copy) {
                (_, true) => "yes, in use",
                (true, false) => "yes, off (SHARDCAST_ZEROCOPY=1 turns it on)",
                (false, _) => "no",
            },
            if ring.params().is_feature_fast_poll() { "yes" } else { "no" },
        );
        Ok(Self { scratch: Vec::new(), ring, slab: Vec::new(), free: Vec::new(), live: 0, fixed, zero_copy, features })
    }

    /// What the probe found, for the log.
    pub(super) fn features(&self) -> &str {
        &self.features
    }

    /// Operations in flight.
    pub(super) fn in_flight(&self) -> usize {
        self.live
    }

    fn is_fixed(&self, op: &Op) -> bool {
        self.fixed.is_some_and(|(base, len)| {
            let start = op.buf() as usize;
            start >= base && start + op.len() as usize <= base + len
        })
    }

    fn entry(&self, idx: usize) -> squeue::Entry {
        let f = self.slab[idx].as_ref().expect("live slab entry");
        let op = &f.op;
        let done = f.done;
        // SAFETY (pointer arithmetic): `done < op.len()` (or both are 0 for ops without a
        // buffer, whose null pointer is not used), so the pointer stays in the buffer.
        let buf = unsafe { op.buf().add(done) };
        let len = op.len() - done as u32;
        let fd = types::Fd(op.fd);
        let e = match op.kind {
            OpKind::Recv => opcode::Recv::new(fd, buf, len).flags(libc::MSG_WAITALL).build(),
            OpKind::Send if self.zero_copy && self.is_fixed(op) => {
                opcode::SendZc::new(fd, buf, len).buf_index(Some(0)).flags(libc::MSG_NOSIGNAL).build()
            }
            OpKind::Send => opcode::Send::new(fd, buf, len).flags(libc::MSG_NOSIGNAL).build(),
            OpKind::Read(off) if self.is_fixed(op) => {
                opcode::ReadFixed::new(fd, buf, len, 0).offset(off + done as u64).build()
            }
            OpKind::Read(off) => opcode::Read::new(fd, buf, len).offset(off + done as u64).build(),
            OpKind::Write(off) if self.is_fixed(op) => {
                opcode::WriteFixed::new(fd, buf, len, 0).offset(off + done as u64).build()
            }
            OpKind::Write(off) => opcode::Write::new(fd, buf, len).offset(off + done as u64).build(),
            OpKind::Fsync => opcode::Fsync::new(fd).build(),
            OpKind::PollIn => opcode::PollAdd::new(fd, libc::POLLIN as u32).build(),
        };
        // File I/O goes straight to io_uring's worker threads: a page-cache copy done inline
        // would run on the session thread, in series with the socket copies, while a worker
        // runs it on the other core (tmpfs and ext4 buffered writes are punted there anyway).
        let e = if matches!(op.kind, OpKind::Read(_) | OpKind::Write(_)) { e.flags(squeue::Flags::ASYNC) } else { e };
        e.user_data(idx as u64)
    }

    fn push(&mut self, idx: usize) -> io::Result<()> {
        let e = self.entry(idx);
        loop {
            // SAFETY: the entry's buffer is leased to the op (its `Lease`, in the in-flight
            // table until the CQE is reaped), so the session neither touches nor frees it.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                return Ok(());
            }
            // The queue is full: hand what is queued to the kernel and try again.
            self.ring.submit()?;
        }
    }

    /// Submits `op`; on failure it comes back with the error.
    pub(super) fn submit(&mut self, token: u64, op: Op) -> Result<(), (io::Error, Op)> {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slab.push(None);
                self.slab.len() - 1
            }
        };
        self.slab[idx] = Some(InFlight { token, op, done: 0, notifs: 0, result: None });
        self.live += 1;
        if let Err(e) = self.push(idx) {
            let f = self.slab[idx].take().expect("just stored");
            self.free.push(idx);
            self.live -= 1;
            return Err((e, f.op));
        }
        Ok(())
    }

    /// Cancels every readiness poll in flight (they then complete with ECANCELED).
    pub(super) fn cancel_polls(&mut self) {
        let polls: Vec<usize> = (0..self.slab.len())
            .filter(|&i| self.slab[i].as_ref().is_some_and(|f| f.op.kind == OpKind::PollIn))
            .collect();
        for idx in polls {
            let e = opcode::AsyncCancel::new(idx as u64).build().user_data(CANCEL_DATA);
            // SAFETY: a cancel request references no buffer.
            while unsafe { self.ring.submission().push(&e) }.is_err() {
                if self.ring.submit().is_err() {
                    return;
                }
            }
        }
        let _ = self.ring.submit();
    }

    /// Submits what is queued, waits up to `timeout` for a completion, and reaps every CQE.
    pub(super) fn wait(&mut self, out: &mut Vec<Done>, timeout: Duration) -> io::Result<()> {
        let before = out.len();
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ETIME) || e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(e),
        }
        let cqes: Vec<(usize, i32, u32)> =
            self.ring.completion().map(|c| (c.user_data() as usize, c.result(), c.flags())).collect();
        let mut resubmit = Vec::new();
        for (idx, res, flags) in cqes {
            let Some(f) = self.slab.get_mut(idx).and_then(Option::as_mut) else {
                continue;
            };
            if cqueue::notif(flags) {
                // SEND_ZC: the kernel is done with the buffer of one submission.
                f.notifs -= 1;
                if f.notifs == 0
                    && let Some(result) = f.result.take()
                {
                    let f = self.slab[idx].take().expect("live slab entry");
                    self.free.push(idx);
                    self.live -= 1;
                    out.push(Done { token: f.token, result, lease: f.op.lease });
                }
                continue;
            }
            if cqueue::more(flags) {
                f.notifs += 1;
            }
            let finished = if res < 0 {
                let err = -res;
                if err == libc::EINTR || err == libc::EAGAIN {
                    resubmit.push(idx);
                    None
                } else {
                    Some(Err(io::Error::from_raw_os_error(err)))
                }
            } else {
                f.done += res as usize;
                let eof = res == 0 && matches!(f.op.kind, OpKind::Recv | OpKind::Read(_));
                if matches!(f.op.kind, OpKind::Fsync | OpKind::PollIn) || eof || f.done >= f.op.len() as usize {
                    Some(Ok(f.done))
                } else if res == 0 {
                    Some(Err(io::Error::new(io::ErrorKind::WriteZero, "write returned 0")))
                } else {
                    resubmit.push(idx);
                    None
                }
            };
            if let Some(result) = finished {
                if f.notifs > 0 {
                    // Completed, but the pages are still pinned by a zero-copy send.
                    f.result = Some(result);
                    continue;
                }
                let f = self.slab[idx].take().expect("live slab entry");
                self.free.push(idx);
                self.live -= 1;
                out.push(Done { token: f.token, result, lease: f.op.lease });
            }
        }
        for idx in resubmit {
            self.push(idx)?;
        }
        if out.len() == before && !self.ring.submission().is_empty() {
            self.ring.submit()?;
        }
        Ok(())
    }
}

//! Plain back end: blocking syscalls on worker threads, for hosts that refuse io_uring.
//!
//! Each socket direction gets its own worker thread (so a blocked receive never holds up a
//! send), and file operations share two workers. Workers post completions to one channel the
//! session's event loop waits on, so the loop above looks the same as with io_uring.

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, unbounded};

use super::{Done, Op, OpKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Lane {
    SockIn(RawFd),
    SockOut(RawFd),
    Poll(RawFd),
    Files,
}

#[derive(Debug)]
struct Worker {
    tx: Sender<(u64, Op)>,
    handles: Vec<JoinHandle<()>>,
}

/// Worker threads and the completion channel.
#[derive(Debug)]
pub(crate) struct PlainIo {
    /// Completions taken and not yet handed over (kept to reuse its allocation).
    pub(super) scratch: Vec<Done>,
    lanes: HashMap<Lane, Worker>,
    done_tx: Sender<Done>,
    done_rx: Receiver<Done>,
    live: usize,
}

impl Default for PlainIo {
    fn default() -> Self {
        Self::new()
    }
}

impl PlainIo {
    /// No workers yet; they start with the first operation on each lane.
    pub(super) fn new() -> Self {
        let (done_tx, done_rx) = unbounded();
        Self { scratch: Vec::new(), lanes: HashMap::new(), done_tx, done_rx, live: 0 }
    }

    /// Operations in flight.
    pub(super) fn in_flight(&self) -> usize {
        self.live
    }

    /// Submits `op` to its lane's worker; on failure it comes back with the error.
    pub(super) fn submit(&mut self, token: u64, op: Op) -> Result<(), (io::Error, Op)> {
        let lane = match op.kind {
            OpKind::Recv => Lane::SockIn(op.fd),
            OpKind::Send => Lane::SockOut(op.fd),
            OpKind::PollIn => Lane::Poll(op.fd),
            _ => Lane::Files,
        };
        let done_tx = &self.done_tx;
        let worker = self.lanes.entry(lane).or_insert_with(|| {
            let (tx, rx) = unbounded::<(u64, Op)>();
            let threads = if lane == Lane::Files { 2 } else { 1 };
            let handles = (0..threads)
                .map(|_| {
                    let rx = rx.clone();
                    let done = done_tx.clone();
                    std::thread::Builder::new()
                        .name("shardcast-io".into())
                        .spawn(move || {
                            for (token, op) in rx {
                                let result = run(&op);
                                if done.send(Done { token, result, lease: op.lease }).is_err() {
                                    return;
                                }
                            }
                        })
                        .expect("spawn I/O worker")
                })
                .collect();
            Worker { tx, handles }
        });
        worker.tx.send((token, op)).map_err(|e| (io::Error::other("I/O worker stopped"), e.into_inner().1))?;
        self.live += 1;
        Ok(())
    }

    /// Waits up to `timeout` for a completion and takes every one that is ready.
    pub(super) fn wait(&mut self, out: &mut Vec<Done>, timeout: Duration) -> io::Result<()> {
        match self.done_rx.recv_timeout(timeout) {
            Ok(c) => {
                self.live -= 1;
                out.push(c);
            }
            Err(_) => return Ok(()),
        }
        while let Ok(c) = self.done_rx.try_recv() {
            self.live -= 1;
            out.push(c);
        }
        Ok(())
    }
}

impl Drop for PlainIo {
    fn drop(&mut self) {
        for (_, w) in self.lanes.drain() {
            drop(w.tx);
            for h in w.handles {
                let _ = h.join();
            }
        }
    }
}

/// Runs one operation to completion with blocking syscalls.
fn run(op: &Op) -> io::Result<usize> {
    let mut done = 0usize;
    let len = op.len() as usize;
    loop {
        if op.kind == OpKind::PollIn {
            // Bounded, so that a session draining its operations never waits on a quiet
            // descriptor for long: a timeout is a spurious wake-up the caller resubmits.
            let mut pfd = libc::pollfd { fd: op.fd, events: libc::POLLIN, revents: 0 };
            // SAFETY: poll reads and writes only the one pollfd we pass.
            let rc = unsafe { libc::poll(&mut pfd, 1, 100) };
            return if rc >= 0 { Ok(0) } else { Err(io::Error::last_os_error()) };
        }
        if op.kind == OpKind::Fsync {
            // SAFETY: fsync takes only a descriptor.
            let rc = unsafe { libc::fsync(op.fd) };
            return if rc == 0 { Ok(0) } else { Err(io::Error::last_os_error()) };
        }
        if done >= len {
            return Ok(done);
        }
        // SAFETY: `done < len`, so the pointer and length stay inside the op's buffer, which
        // is leased to this op (the lease travels with it and is settled only after its
        // completion is delivered), so nobody else touches or frees it meanwhile.
        let rc = unsafe {
            let buf = op.buf().add(done);
            let rest = len - done;
            match op.kind {
                OpKind::Recv => libc::recv(op.fd, buf.cast(), rest, libc::MSG_WAITALL),
                OpKind::Send => libc::send(op.fd, buf.cast(), rest, libc::MSG_NOSIGNAL),
                OpKind::Read(off) => libc::pread(op.fd, buf.cast(), rest, (off + done as u64) as i64),
                OpKind::Write(off) => libc::pwrite(op.fd, buf.cast(), rest, (off + done as u64) as i64),
                OpKind::Fsync | OpKind::PollIn => unreachable!("handled above"),
            }
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if rc == 0 {
            return match op.kind {
                OpKind::Recv | OpKind::Read(_) => Ok(done),
                _ => Err(io::Error::new(io::ErrorKind::WriteZero, "write returned 0")),
            };
        }
        done += rc as usize;
    }
}

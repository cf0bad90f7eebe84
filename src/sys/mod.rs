//! Everything that talks to the kernel (or the NIC) through raw pointers and descriptors: the
//! only place in the library where `unsafe` is
//! allowed.
//!
//! # The contract
//! Modules outside `sys` see only safe functions and types. Each `unsafe` block here carries a
//! `// SAFETY:` comment, and each type here upholds these rules on behalf of its callers:
//! - **Memory handed to the kernel or the NIC stays valid and untouched until its completion.**
//!   [`mem::Pinned`] is the one mapping operations may point into. Submitting an operation
//!   takes a [`mem::Lease`] on a byte range of it (a range the kernel will read, or one it will
//!   write); the executor ([`io::Io`]) keeps the lease with the operation and gives it back to
//!   the mapping when it hands over the completion. While a lease is out, safe access to its
//!   range is checked: reading a range the kernel writes, or writing a range it reads or
//!   writes, panics (a bug in the caller, never a data race).
//! - **The mapping outlives every operation on it.** A session drains its executor before it
//!   frees the mapping, and leaks the mapping when an operation does not finish (`Io::drain`).
//! - **Descriptors are borrowed, never owned here:** the functions take a `RawFd` that the
//!   caller keeps open for the duration of the call (or of the operation).
//! - Plain libc calls (`shutdown`, `getrlimit`, `getsockopt`) get a safe wrapper each, which
//!   passes only values and memory it owns.
#![allow(unsafe_code)]

use std::os::fd::RawFd;

pub(crate) mod fs;
pub(crate) mod io;
pub(crate) mod mem;
pub(crate) mod nic;

pub(crate) mod numa;
pub(crate) mod rdma;
pub(crate) mod tcpinfo;

/// Shuts a socket down both ways: wakes any operation blocked on it, and tells the peer. The
/// descriptor stays open (its owner closes it). Errors (not a socket, already closed) are of no
/// interest to a caller that is giving up on the connection anyway.
pub(crate) fn shutdown(fd: RawFd) {
    // SAFETY: shutdown takes only a descriptor and touches no memory of ours.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

/// Raises the soft open-files limit to the hard limit: a push keeps one descriptor per
/// non-empty file open on the primary and on every replica.
pub(crate) fn raise_nofile_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write only the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The soft RLIMIT_MEMLOCK in bytes, if it can be read.
pub(crate) fn memlock_limit() -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes only into the struct we pass.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    (rc == 0).then_some(lim.rlim_cur)
}

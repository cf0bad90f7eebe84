//! The pinned mapping that I/O operations point into, and the leases that keep it sound.
//!
//! [`Pinned`] is one anonymous mapping (advised to huge pages before its first touch, then
//! locked), plus an optional *spare* buffer beside it (the sealing buffer of an encrypted hop,
//! which is not registered with anything). Both are addressed by one byte offset: offsets past
//! the mapping's end fall into the spare buffer.
//!
//! An operation that hands a range to the kernel or the NIC first takes a [`Lease`] on it,
//! saying whether the other side will read the range ([`Access::Read`]: a send, a file write,
//! an RDMA write) or write it ([`Access::Write`]: a receive, a file read, an RDMA landing). The
//! lease goes with the operation and comes back with its completion ([`Pinned::settle`]).
//! Meanwhile:
//! - a new lease that would race with one out (a write beside anything, a read beside a write,
//!   over the same bytes) panics;
//! - [`Pinned::bytes`] panics on a range the kernel may be writing, [`Pinned::bytes_mut`] on a
//!   range it may be reading or writing;
//! - dropping the mapping with a lease out leaks it instead of unmapping memory the kernel may
//!   still touch.
//!
//! The checks scan the leases out (a few per slot of the pool): no allocation and no lock per
//! operation once the table has grown to its working size.

use std::io;
use std::sync::Arc;

use memmap2::{Advice, MmapMut, MmapOptions};

/// An anonymous mapping that stays mapped while any clone of it lives.
///
/// The pool's [`Pinned`] holds one, and so does every RDMA endpoint that registered it
/// (`sys::rdma::verbs::Endpoint::open` takes a `&Mapping` and keeps a clone): a NIC
/// registration can therefore never outlive the memory it points at, whatever order its owners
/// are dropped in. Its bytes are reachable only through [`Mapping::bytes_mut`] while nobody else
/// holds it, through a [`Pinned`]'s leases and borrows, or by the NIC.
#[derive(Debug, Clone)]
pub struct Mapping(Arc<MmapMut>);

impl Mapping {
    /// Maps `len` anonymous bytes (zeroed), advised to huge pages before any page is touched.
    pub fn anon(len: usize) -> io::Result<Self> {
        let map = MmapOptions::new().len(len).map_anon()?;
        // Advice first, before any page is touched: afterwards it finds no huge pages to make.
        let _ = map.advise(Advice::HugePage);
        Ok(Self(Arc::new(map)))
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether nothing is mapped (a zero-length mapping).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The first byte's address (for a registration; reads and writes go through leases).
    pub fn base(&self) -> *mut u8 {
        self.0.as_ptr().cast_mut()
    }

    /// The bytes, to fill before the mapping is shared (`None` once a clone exists, e.g. once
    /// an endpoint registered it: the NIC may then read or write them).
    pub fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        Arc::get_mut(&mut self.0).map(|m| &mut m[..])
    }

    fn lock(&self) -> io::Result<()> {
        self.0.lock()
    }
}

/// What the other side of an operation does with the leased range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// The kernel or the NIC reads it (send, file write, RDMA write): it must not change.
    Read,
    /// The kernel or the NIC writes it (receive, file read, RDMA landing): nobody may look.
    Write,
}

/// A byte range of a [`Pinned`] mapping: `len` bytes at offset `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    /// Offset from the mapping's start (past its end: into the spare buffer).
    pub(crate) off: usize,
    /// Length in bytes.
    pub(crate) len: u32,
}

impl Span {
    fn end(self) -> usize {
        self.off + self.len as usize
    }
}

/// A range handed to the kernel or the NIC: taken from [`Pinned::lease`], moved into the
/// operation, given back to [`Pinned::settle`] with the operation's completion.
#[derive(Debug)]
#[must_use = "a lease goes back to its mapping (Pinned::settle) once its operation completed"]
pub(crate) struct Lease {
    hold: u32,
    span: Span,
    ptr: *mut u8,
}

// SAFETY: a lease is an address and a length; the mapping it points into is not freed while a
// lease is out (see `Pinned`'s Drop), and the operation it travels with is its only user.
unsafe impl Send for Lease {}

impl Lease {
    /// Start of the leased range (for the executor and the NIC, inside `sys` only).
    pub(super) fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length of the leased range.
    pub(crate) fn len(&self) -> u32 {
        self.span.len
    }
}

#[derive(Debug, Clone, Copy)]
struct Hold {
    start: usize,
    end: usize,
    access: Access,
}

impl Hold {
    fn overlaps(&self, start: usize, end: usize) -> bool {
        start < self.end && self.start < end
    }
}

/// The pinned mapping and the table of leases out on it.
#[derive(Debug)]
pub(crate) struct Pinned {
    map: Option<Mapping>,
    spare: Box<[u8]>,
    holds: Vec<Option<Hold>>,
    free_holds: Vec<u32>,
    live: usize,
}

// SAFETY: the mapping is owned by this value; the raw pointers inside `MmapMut` are addresses,
// and every access to the memory goes through `&self`/`&mut self` or through a lease.
unsafe impl Send for Pinned {}

impl Pinned {
    /// Maps `len` bytes, advised to huge pages before any page is touched.
    pub(crate) fn map(len: usize) -> io::Result<Self> {
        let map = Mapping::anon(len)?;
        Ok(Self { map: Some(map), spare: Box::default(), holds: Vec::new(), free_holds: Vec::new(), live: 0 })
    }

    /// Nothing mapped: the value a mapping leaves behind when it is moved out of its owner.
    pub(crate) fn unmapped() -> Self {
        Self { map: None, spare: Box::default(), holds: Vec::new(), free_holds: Vec::new(), live: 0 }
    }

    /// Locks the mapping in memory (`mlock`), which also faults it in; refused above
    /// RLIMIT_MEMLOCK without CAP_IPC_LOCK.
    pub(crate) fn lock(&self) -> io::Result<()> {
        self.mapping().lock()
    }

    /// The mapping itself (to register it with a NIC, which keeps it mapped while registered).
    pub(crate) fn mapping(&self) -> &Mapping {
        self.map.as_ref().expect("mapped until dropped")
    }

    /// Bytes of the mapping (without the spare buffer).
    pub(crate) fn len(&self) -> usize {
        self.mapping().len()
    }

    /// The mapping's base address, for registration with io_uring or a NIC (which then only
    /// touch what a lease covers).
    pub(crate) fn base(&self) -> *mut u8 {
        self.mapping().base()
    }

    /// Binds the mapping's pages to the NUMA node of RDMA device `device`, moving them there
    /// (see `sys::numa`); the node, or why not.
    ///
    /// # Panics
    /// When a lease is out: pages that I/O may be using must not move.
    pub(crate) fn place_for_device(&self, device: &str) -> Result<String, String> {
        assert_eq!(self.live, 0, "the pool is placed before any I/O");
        // SAFETY: the mapping is ours, mapped and page-aligned (mmap), and no operation holds
        // any of it (checked above; leasing needs `&mut self`, which this borrow excludes).
        unsafe { super::numa::place_for_device(self.base(), self.len(), device) }
    }

    /// Makes the spare buffer `len` bytes long (zeroed); it starts at offset [`Pinned::len`].
    ///
    /// # Panics
    /// When a lease is out on the spare buffer.
    pub(crate) fn set_spare(&mut self, len: usize) {
        if self.spare.len() != len {
            let start = self.len();
            assert!(!self.held(start, usize::MAX, None), "the spare buffer is leased");
            self.spare = vec![0; len].into_boxed_slice();
        }
    }

    /// Leases `span` for an operation that does `access` to it.
    ///
    /// # Panics
    /// When `span` is out of bounds, or a lease out on the same bytes conflicts (two writers,
    /// or a reader and a writer): a bug in the caller's slot discipline.
    pub(crate) fn lease(&mut self, span: Span, access: Access) -> Lease {
        let ptr = self.addr(span);
        let (start, end) = (span.off, span.end());
        let conflict = match access {
            Access::Write => None,
            Access::Read => Some(Access::Read),
        };
        // A writer conflicts with every hold; a reader only with writers.
        assert!(
            !self.held(start, end, conflict),
            "bytes {start}..{end} are in flight: a {access:?} lease on them would race"
        );
        let hold = Hold { start, end, access };
        let idx = match self.free_holds.pop() {
            Some(i) => {
                self.holds[i as usize] = Some(hold);
                i
            }
            None => {
                self.holds.push(Some(hold));
                (self.holds.len() - 1) as u32
            }
        };
        self.live += 1;
        Lease { hold: idx, span, ptr }
    }

    /// Takes back a lease whose operation completed: its range is the caller's again.
    pub(crate) fn settle(&mut self, lease: Lease) {
        let slot = &mut self.holds[lease.hold as usize];
        assert!(slot.is_some(), "lease settled twice");
        *slot = None;
        self.free_holds.push(lease.hold);
        self.live -= 1;
    }

    /// Leases out.
    pub(crate) fn leases_out(&self) -> usize {
        self.live
    }

    /// Whether a lease out on `start..end` has an access other than `except` (None: any).
    fn held(&self, start: usize, end: usize, except: Option<Access>) -> bool {
        self.live > 0
            && self.holds.iter().flatten().any(|h| h.overlaps(start, end) && except.is_none_or(|a| h.access != a))
    }

    /// Whether a lease is out on any byte of `span`.
    pub(crate) fn in_flight(&self, span: Span) -> bool {
        self.held(span.off, span.end(), None)
    }

    /// The address of `span`, checked to lie inside the mapping or inside the spare buffer.
    fn addr(&self, span: Span) -> *mut u8 {
        let map_len = self.len();
        if span.off < map_len {
            assert!(span.end() <= map_len, "span {span:?} crosses the end of the mapping");
            // SAFETY: `off < map_len`, so the pointer stays inside the mapping.
            unsafe { self.base().add(span.off) }
        } else {
            let off = span.off - map_len;
            assert!(off + span.len as usize <= self.spare.len(), "span {span:?} past the spare buffer");
            // SAFETY: `off + len <= spare.len()`, checked above. The pointer is derived from the
            // box's own pointer, so writes through it are allowed while `&mut self` is not live.
            unsafe { self.spare.as_ptr().cast_mut().add(off) }
        }
    }

    /// Copies the bytes of `from` over those of `to` (same length, not overlapping).
    ///
    /// # Panics
    /// When the lengths differ or the spans overlap, when an operation in flight writes into
    /// `from`, or when one reads or writes `to`.
    pub(crate) fn copy(&mut self, from: Span, to: Span) {
        assert!(from.len == to.len && (from.end() <= to.off || to.end() <= from.off), "bad copy {from:?} -> {to:?}");
        assert!(!self.held(from.off, from.end(), Some(Access::Read)), "copy from bytes being written: {from:?}");
        assert!(!self.held(to.off, to.end(), None), "copy into bytes in flight: {to:?}");
        let (src, dst) = (self.addr(from), self.addr(to));
        // SAFETY: both ranges are inside our memory (checked by `addr`) and do not overlap; no
        // operation in flight writes `from` or touches `to` (checked above), and `&mut self`
        // excludes every other borrow.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, from.len as usize) };
    }

    /// The bytes of `span`, to read.
    ///
    /// # Panics
    /// When an operation in flight may write into them.
    pub(crate) fn bytes(&self, span: Span) -> &[u8] {
        assert!(
            !self.held(span.off, span.end(), Some(Access::Read)),
            "bytes {}..{} are being written by an operation in flight",
            span.off,
            span.end()
        );
        let ptr = self.addr(span);
        // SAFETY: the range is inside our memory (checked by `addr`); no operation in flight
        // writes into it (checked above), and none can start while this shared borrow of `self`
        // lives, because leasing takes `&mut self`.
        unsafe { std::slice::from_raw_parts(ptr, span.len as usize) }
    }

    /// The bytes of `span`, to write.
    ///
    /// # Panics
    /// When an operation in flight may read or write them.
    pub(crate) fn bytes_mut(&mut self, span: Span) -> &mut [u8] {
        assert!(
            !self.held(span.off, span.end(), None),
            "bytes {}..{} are in flight: they cannot be written now",
            span.off,
            span.end()
        );
        let ptr = self.addr(span);
        // SAFETY: the range is inside our memory (checked by `addr`), no operation in flight
        // reads or writes it (checked above), and `&mut self` excludes every other borrow.
        unsafe { std::slice::from_raw_parts_mut(ptr, span.len as usize) }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if self.live > 0 {
            // The kernel or the NIC may still read or write it: never unmap.
            tracing::error!("{} I/O operations did not give their buffers back; leaking the buffer pool", self.live);
            std::mem::forget(self.map.take());
            std::mem::forget(std::mem::take(&mut self.spare));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(off: usize, len: u32) -> Span {
        Span { off, len }
    }

    #[test]
    fn readers_share_and_writers_exclude() {
        let mut m = Pinned::map(8192).unwrap();
        let a = m.lease(span(0, 100), Access::Read);
        let b = m.lease(span(50, 100), Access::Read);
        // A write after the readers' bytes does not race with them.
        let c = m.lease(span(150, 100), Access::Write);
        assert_eq!(m.bytes(span(0, 150)).len(), 150);
        assert!(m.in_flight(span(140, 20)));
        m.settle(c);
        m.settle(b);
        m.settle(a);
        assert_eq!(m.leases_out(), 0);
        m.bytes_mut(span(0, 300)).fill(7);
        assert_eq!(m.bytes(span(299, 1)), &[7]);
    }

    #[test]
    #[should_panic(expected = "race")]
    fn a_write_over_a_read_in_flight_panics() {
        let mut m = Pinned::map(4096).unwrap();
        let _a = m.lease(span(0, 100), Access::Read);
        let _b = m.lease(span(99, 10), Access::Write);
    }

    #[test]
    #[should_panic(expected = "being written")]
    fn reading_what_the_kernel_writes_panics() {
        let mut m = Pinned::map(4096).unwrap();
        let _a = m.lease(span(10, 100), Access::Write);
        let _ = m.bytes(span(0, 11));
    }

    #[test]
    #[should_panic(expected = "in flight")]
    fn writing_what_the_kernel_reads_panics() {
        let mut m = Pinned::map(4096).unwrap();
        let _a = m.lease(span(10, 100), Access::Read);
        let _ = m.bytes_mut(span(100, 20));
    }

    #[test]
    fn spare_buffer_follows_the_mapping() {
        let mut m = Pinned::map(4096).unwrap();
        m.set_spare(100);
        m.bytes_mut(span(4096, 100)).fill(3);
        let l = m.lease(span(4096, 100), Access::Read);
        assert_eq!(l.len(), 100);
        assert_eq!(m.bytes(span(4096 + 99, 1)), &[3]);
        m.settle(l);
    }
}

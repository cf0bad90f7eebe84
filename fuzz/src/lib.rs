//! Shared by the fuzz targets: an allocator that turns an oversized allocation into a crash, and
//! manifest comparisons that stay cheap on plans announcing millions of chunks.
//!
//! Without AddressSanitizer (stable Rust builds with `--sanitizer none`), libFuzzer's
//! `-malloc_limit_mb` has no malloc hooks to work with, and a huge `calloc` that is never
//! touched does not raise the RSS either, so a length field trusted too far would go unnoticed.
//! [`CappedAlloc`] aborts (which libFuzzer reports as a crash, with the input saved) on any single
//! allocation above [`ALLOC_CAP`].

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;

use shardcast::manifest::{MAX_PLAN_CHUNKS, Manifest};

/// The largest single allocation the decoders may make on a peer's say-so: the digest table of a
/// plan announcing [`MAX_PLAN_CHUNKS`] chunks (16 bytes each, 1 GiB). Every other bound is
/// smaller (a HELLO payload is at most `wire::MAX_HELLO`, 256 MiB).
pub const ALLOC_CAP: usize = MAX_PLAN_CHUNKS as usize * 16;

/// The system allocator, aborting on any allocation larger than [`ALLOC_CAP`].
pub struct CappedAlloc;

#[cold]
fn over_cap(size: usize) -> ! {
    // No formatting machinery: it could allocate, from inside the allocator.
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = size;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(b"==fuzz== allocation of ");
    let _ = err.write_all(&digits[i..]);
    let _ = err.write_all(b" bytes exceeds ALLOC_CAP (a length field trusted too far?)\n");
    std::process::abort();
}

// SAFETY: forwards to `System` unchanged for every allocation it does not refuse.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOC_CAP {
            over_cap(layout.size());
        }
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    // Forwarded (not the default alloc + memset): `vec![0; n]` must stay a lazily zeroed
    // calloc, as in the real program.
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOC_CAP {
            over_cap(layout.size());
        }
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > ALLOC_CAP {
            over_cap(new_size);
        }
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Plans up to this many chunks are compared whole; larger ones by encoding and chunk count
/// (their digests are all zero by construction, and comparing 1 GiB of them per input would
/// slow the fuzzer to a crawl).
const FULL_COMPARE_CHUNKS: u64 = 1 << 16;

/// Asserts that two decoded plans are the same.
pub fn assert_same_plan(a: &Manifest, b: &Manifest) {
    if a.chunk_count() <= FULL_COMPARE_CHUNKS {
        assert_eq!(a, b, "plan changed through encode_plan/decode_plan");
    } else {
        assert_eq!(a.chunk_count(), b.chunk_count(), "plan chunk count changed through a round trip");
        assert_eq!(a.encode_plan(), b.encode_plan(), "plan changed through encode_plan/decode_plan");
    }
}

/// Checks the invariants every decoded manifest (or plan) must hold, and exercises the lookups a
/// replica does with numbers that come from a peer (chunk numbers in CHUNK headers).
pub fn check_manifest(m: &Manifest) {
    for e in m.entries() {
        if let Err(err) = shardcast::manifest::check_path(&e.path) {
            panic!("decoded manifest holds an unsafe path: {err}");
        }
    }
    let _ = m.total_bytes();
    let _ = m.file_count();
    let n = m.chunk_count();
    let mut next = 0;
    for i in 0..m.entries().len() {
        let r = m.chunk_range(i);
        assert_eq!(r.start, next, "entry {i} does not start where the previous one ends");
        next = r.end;
    }
    assert_eq!(next, n, "entries do not cover the chunk count");
    for seq in [0, n / 2, n.saturating_sub(1), n, n.saturating_add(1), u64::MAX] {
        match m.chunk(seq) {
            Some(c) => {
                assert!(seq < n, "chunk {seq} found past the end ({n} chunks)");
                assert!(m.chunk_range(c.entry).contains(&seq), "chunk {seq} mapped to entry {}", c.entry);
                assert!(c.len >= 1 && c.len <= m.chunk_size(), "chunk {seq} of {} bytes", c.len);
                assert!(c.offset + u64::from(c.len) <= m.entries()[c.entry].size, "chunk {seq} past its file");
            }
            None => assert!(seq >= n, "chunk {seq} missing ({n} chunks)"),
        }
    }
}

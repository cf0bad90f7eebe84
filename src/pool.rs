//! The bounded pool of pinned buffers a session moves chunks through.
//!
//! One anonymous mapping holds `slots` chunk slots (each a frame header plus a chunk) and three
//! small control areas (for ACK/END/RESULT frames). The mapping is advised to huge pages
//! before its first touch and then locked (`mlock`), which both faults it in and pins it; when
//! the memlock limit refuses, the pool still works unpinned and a warning says what to raise.
//! The whole mapping is registered with io_uring once (see `io::uring`).
//!
//! The pool bounds a node's memory and gives backpressure: a session that has no free slot
//! stops reading from its upstream until a slot is released.

use std::io;
use std::os::fd::RawFd;
use std::sync::{Mutex, Once};

use crate::sys::io::{Io, OpKind};
use crate::sys::mem::{Pinned, Span};
use crate::wire::{HEADER_LEN, MAX_REPORTS};

/// Index of a slot in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotId(pub u16);

/// The control areas, one per direction that sends or receives control frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ctrl {
    /// Receives ACK / RESULT frames from downstream.
    DownRecv = 0,
    /// Sends ACK / RESULT frames upstream.
    UpSend = 1,
    /// Sends the END frame downstream.
    DownSend = 2,
    /// Watches the upstream socket of an RDMA hop (chunks arrive by RDMA; the socket only
    /// closes or carries nothing).
    UpRecv = 3,
}

/// Size of one control area: a header and the largest report list.
pub(crate) const CTRL_LEN: usize = HEADER_LEN + MAX_REPORTS as usize;
const CTRL_AREAS: usize = 4;

/// The small control areas of the further lanes of RDMA hops (CREDIT frames go on the lane they
/// grant for), one of each [`LaneArea`] per lane 1..MAX_LANES.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LaneArea {
    /// Sends CREDIT frames upstream on the lane.
    UpSend = 0,
    /// Watches the lane's upstream socket (it only closes, or carries nothing).
    UpWatch = 1,
    /// Receives CREDIT frames from downstream on the lane.
    DownRecv = 2,
}

/// Bytes of one lane area: a CREDIT frame of up to 600 credits and its MAC.
pub(crate) const LANE_CTRL_LEN: usize = 4096;
const LANE_AREAS: usize = 3 * crate::wire::MAX_LANES as usize;
/// Bytes after the slots: the control areas, then the lane areas.
const CTRL_BYTES: usize = CTRL_LEN * CTRL_AREAS + LANE_CTRL_LEN * LANE_AREAS;

/// Where an operation's bytes lie in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Buf {
    /// `len` bytes from byte `off` of a chunk slot.
    Slot { id: SlotId, off: usize, len: u32 },
    /// `len` bytes from byte `off` of a control area.
    Ctrl { area: Ctrl, off: usize, len: u32 },
    /// The first `len` bytes of lane `lane`'s sealing buffer (see [`Pool::set_seal_len`]).
    Seal { lane: u8, len: u32 },
    /// `len` bytes from byte `off` of lane `lane`'s (1..MAX_LANES) area `area`.
    Lane { lane: u8, area: LaneArea, off: usize, len: u32 },
}

impl Buf {
    /// Its length in bytes.
    pub(crate) fn len(&self) -> u32 {
        match *self {
            Buf::Slot { len, .. } | Buf::Ctrl { len, .. } | Buf::Seal { len, .. } | Buf::Lane { len, .. } => len,
        }
    }
}

/// A pinned buffer pool of fixed-size slots.
///
/// Safe to use: the bytes of a slot are read and written through [`Pool::slot`] /
/// [`Pool::slot_mut`], and handed to the kernel only through [`Pool::submit`], which leases
/// them to the operation until its completion (see `sys::mem`). Touching bytes an operation
/// still owns panics instead of racing with the kernel.
#[derive(Debug)]
pub(crate) struct Pool {
    mem: Pinned,
    slot_size: usize,
    slots: usize,
    free: Vec<SlotId>,
    leased: Vec<bool>,
    locked: bool,
    /// Bytes of each lane's sealing buffer (they follow one another in the spare buffer).
    seal_len: usize,
}

static MEMLOCK_WARNING: Once = Once::new();

impl Pool {
    /// A pool of `slots` slots, each holding a frame header and `chunk_size` bytes.
    pub(crate) fn new(slots: usize, chunk_size: u32) -> io::Result<Self> {
        let slots = slots.clamp(2, usize::from(u16::MAX));
        let slot_size = slot_size(chunk_size);
        let len = slot_size * slots + CTRL_BYTES;
        let mem = Pinned::map(len)?;
        let locked = match mem.lock() {
            Ok(()) => true,
            Err(e) => {
                MEMLOCK_WARNING.call_once(|| {
                    let limit = memlock_limit();
                    tracing::warn!(
                        "could not pin the {} MiB buffer pool in memory ({e}; RLIMIT_MEMLOCK is {}): \
                         raise `ulimit -l` to at least {} KiB or grant CAP_IPC_LOCK; continuing unpinned",
                        len >> 20,
                        limit.map_or("unknown".into(), |l| format!("{} KiB", l >> 10)),
                        len.div_ceil(1024),
                    );
                });
                false
            }
        };
        let free = (0..slots as u16).rev().map(SlotId).collect();
        Ok(Self { mem, slot_size, slots, free, leased: vec![false; slots], locked, seal_len: 0 })
    }

    /// A pool whose slots hold at most `bytes` bytes of chunks; refused (`InvalidInput`, the
    /// message names both numbers) when fewer than [`MIN_SLOTS`] chunks fit (see
    /// [`check_budget`]).
    pub(crate) fn with_budget(bytes: usize, chunk_size: u32) -> io::Result<Self> {
        let slots = check_budget(bytes, chunk_size).map_err(|why| io::Error::new(io::ErrorKind::InvalidInput, why))?;
        Self::new(slots, chunk_size)
    }

    /// Whether the pool is pinned (mlocked).
    pub(crate) fn is_locked(&self) -> bool {
        self.locked
    }

    /// Bytes from one slot's start to the next (a frame header and a chunk, page-rounded).
    pub(crate) fn slot_size(&self) -> usize {
        self.slot_size
    }

    /// Number of chunk slots.
    pub(crate) fn slots(&self) -> usize {
        self.slots
    }
    /// Slots not leased.
    pub(crate) fn free_slots(&self) -> usize {
        self.free.len()
    }
    /// Base address of the mapping (tests: the same mapping is handed out again).
    #[cfg(test)]
    fn base(&self) -> *mut u8 {
        self.mem.base()
    }
    /// Binds the pool's pages to the NUMA node of RDMA device `device` (before any I/O on it).
    pub(crate) fn place_for_device(&self, device: &str) -> Result<String, String> {
        self.mem.place_for_device(device)
    }
    /// The mapping, for the executor (which settles leases on it as operations complete).
    pub(crate) fn mem(&self) -> &Pinned {
        &self.mem
    }
    /// The mapping, mutably (see [`Pool::mem`]).
    pub(crate) fn mem_mut(&mut self) -> &mut Pinned {
        &mut self.mem
    }

    /// Moves the pool out, leaving an empty one that owns no memory (for a `Drop` that hands
    /// the pool back to its cache).
    pub(crate) fn take(&mut self) -> Pool {
        let husk = Self {
            mem: Pinned::unmapped(),
            slot_size: 0,
            slots: 0,
            free: Vec::new(),
            leased: Vec::new(),
            locked: false,
            seal_len: 0,
        };
        std::mem::replace(self, husk)
    }

    /// Whether this pool has `slots` slots for chunks of `chunk_size` bytes.
    fn fits(&self, slots: usize, chunk_size: u32) -> bool {
        self.slots == slots && self.slot_size == slot_size(chunk_size)
    }

    /// Marks every slot free again and drops the sealing buffer; false (and nothing changes)
    /// while an operation still holds pool memory.
    fn reset(&mut self) -> bool {
        if self.mem.leases_out() > 0 {
            return false;
        }
        self.mem.set_spare(0);
        self.seal_len = 0;
        self.leased.iter_mut().for_each(|l| *l = false);
        self.free = (0..self.slots as u16).rev().map(SlotId).collect();
        true
    }

    /// Takes a free slot, or `None` when every slot is leased.
    pub(crate) fn lease(&mut self) -> Option<SlotId> {
        let id = self.free.pop()?;
        self.leased[usize::from(id.0)] = true;
        Some(id)
    }

    /// Returns a leased slot.
    ///
    /// # Panics
    /// When the slot is not leased (returning a slot twice would let two chunks share it), or
    /// when an operation on it is still in flight.
    pub(crate) fn release(&mut self, id: SlotId) {
        let leased = &mut self.leased[usize::from(id.0)];
        assert!(*leased, "slot {} released twice", id.0);
        let whole = self.span(Buf::Slot { id, off: 0, len: self.slot_size as u32 });
        assert!(!self.mem.in_flight(whole), "slot {} released while an operation on it is in flight", id.0);
        self.leased[usize::from(id.0)] = false;
        self.free.push(id);
    }

    /// Where `buf` lies in the mapping.
    ///
    /// # Panics
    /// When `buf` does not fit in its slot or area.
    pub(crate) fn span(&self, buf: Buf) -> Span {
        match buf {
            Buf::Slot { id, off, len } => {
                assert!(
                    usize::from(id.0) < self.slots && off + len as usize <= self.slot_size,
                    "{buf:?} out of bounds"
                );
                Span { off: usize::from(id.0) * self.slot_size + off, len }
            }
            Buf::Ctrl { area, off, len } => {
                assert!(off + len as usize <= CTRL_LEN, "{buf:?} out of bounds");
                Span { off: self.slots * self.slot_size + area as usize * CTRL_LEN + off, len }
            }
            Buf::Seal { lane, len } => {
                assert!(len as usize <= self.seal_len, "{buf:?} out of bounds");
                Span { off: self.mem.len() + usize::from(lane) * self.seal_len, len }
            }
            Buf::Lane { lane, area, off, len } => {
                let k = usize::from(lane);
                assert!(
                    (1..usize::from(crate::wire::MAX_LANES)).contains(&k) && off + len as usize <= LANE_CTRL_LEN,
                    "{buf:?} out of bounds"
                );
                let start = self.slots * self.slot_size + CTRL_LEN * CTRL_AREAS;
                Span { off: start + (3 * (k - 1) + area as usize) * LANE_CTRL_LEN + off, len }
            }
        }
    }

    /// The first `len` bytes of lane `lane`'s area `area`, to write.
    pub(crate) fn lane_mut(&mut self, lane: u8, area: LaneArea, len: usize) -> &mut [u8] {
        let span = self.span(Buf::Lane { lane, area, off: 0, len: len as u32 });
        self.mem.bytes_mut(span)
    }

    /// The first `len` bytes of lane `lane`'s area `area`.
    pub(crate) fn lane_bytes(&self, lane: u8, area: LaneArea, len: usize) -> &[u8] {
        self.mem.bytes(self.span(Buf::Lane { lane, area, off: 0, len: len as u32 }))
    }

    /// Bytes `off..off+len` of slot `id`, to read.
    ///
    /// # Panics
    /// When an operation in flight writes into them.
    pub(crate) fn slot(&self, id: SlotId, off: usize, len: usize) -> &[u8] {
        self.mem.bytes(self.span(Buf::Slot { id, off, len: len as u32 }))
    }

    /// Bytes `off..off+len` of slot `id`, to write.
    ///
    /// # Panics
    /// When an operation in flight reads or writes them.
    pub(crate) fn slot_mut(&mut self, id: SlotId, off: usize, len: usize) -> &mut [u8] {
        let span = self.span(Buf::Slot { id, off, len: len as u32 });
        self.mem.bytes_mut(span)
    }

    /// Bytes `0..len` of a control area, to read (panics as [`Pool::slot`] does).
    pub(crate) fn ctrl(&self, area: Ctrl, len: usize) -> &[u8] {
        self.mem.bytes(self.span(Buf::Ctrl { area, off: 0, len: len as u32 }))
    }

    /// Bytes `0..len` of a control area, to write (panics as [`Pool::slot_mut`] does).
    pub(crate) fn ctrl_mut(&mut self, area: Ctrl, len: usize) -> &mut [u8] {
        let span = self.span(Buf::Ctrl { area, off: 0, len: len as u32 });
        self.mem.bytes_mut(span)
    }

    /// Gives the pool a sealing buffer of `len` bytes for each of `lanes` lanes (an encrypted
    /// hop seals each chunk in its lane's buffer and sends it from there); 0 drops them.
    pub(crate) fn set_seal_len(&mut self, len: usize, lanes: usize) {
        self.mem.set_spare(len * lanes);
        self.seal_len = len;
    }

    /// The first `len` bytes of lane `lane`'s sealing buffer, to write.
    pub(crate) fn seal_mut(&mut self, lane: u8, len: usize) -> &mut [u8] {
        let span = self.span(Buf::Seal { lane, len: len as u32 });
        self.mem.bytes_mut(span)
    }

    /// Copies bytes `0..len` of slot `id` to the start of lane `lane`'s sealing buffer.
    pub(crate) fn copy_to_seal(&mut self, id: SlotId, lane: u8, len: usize) {
        let from = self.span(Buf::Slot { id, off: 0, len: len as u32 });
        let to = self.span(Buf::Seal { lane, len: len as u32 });
        self.mem.copy(from, to);
    }

    /// Submits an operation of `kind` on `fd` over `buf`; its completion, from [`Io::wait`],
    /// carries `token`. `buf` belongs to the operation until then.
    pub(crate) fn submit(&mut self, io: &mut Io, token: u64, kind: OpKind, fd: RawFd, buf: Buf) -> io::Result<()> {
        let span = self.span(buf);
        io.submit(&mut self.mem, token, kind, fd, span)
    }
}

/// Slot size for a chunk size: a header and the chunk, rounded to 4 KiB so that every payload
/// starts at the same offset in a page.
fn slot_size(chunk_size: u32) -> usize {
    // Room for an encrypted hop's tag after the payload.
    (HEADER_LEN + chunk_size as usize + crate::crypt::TAG_LEN).next_multiple_of(4096)
}

/// The fewest chunk slots a session works with (reading ahead, sending and writing at once).
pub(crate) const MIN_SLOTS: usize = 4;

/// The slots a pool of `bytes` has for chunks of `chunk_size` bytes: as many chunks as fit in
/// `bytes` (each slot also holds a frame header and is rounded up to a page, and the pool adds
/// its small control areas). Never more than that: a chunk size of which fewer than
/// [`MIN_SLOTS`] fit is refused, with both numbers, rather than pinning more than the budget.
pub fn check_budget(bytes: usize, chunk_size: u32) -> Result<usize, String> {
    let slots = bytes / (chunk_size.max(1) as usize);
    if slots < MIN_SLOTS {
        return Err(format!(
            "a buffer pool of {} holds {slots} chunks of {}, and a session needs {MIN_SLOTS}: \
             use chunks of at most {}, or a pool of at least {} MiB",
            show_bytes(bytes as u64),
            show_bytes(chunk_size.into()),
            show_bytes((bytes / MIN_SLOTS) as u64),
            (chunk_size as usize * MIN_SLOTS).div_ceil(1 << 20),
        ));
    }
    Ok(slots.min(usize::from(u16::MAX)))
}

/// Bytes as "N MiB" / "N KiB" / "N bytes", exactly.
fn show_bytes(n: u64) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n % (1 << 10) == 0 {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} bytes")
    }
}

/// Pools kept between sessions of a long-lived process (a replica server).
///
/// Faulting in and pinning a fresh pool is not free: on this project's VMs, the first touch of
/// 64 MiB costs ~0.1-0.2 s, which a short push pays in full. A server keeps up to `max` idle
/// pools and hands one to the next session of the same chunk size.
#[derive(Debug)]
pub(crate) struct PoolCache {
    idle: Mutex<Vec<Pool>>,
    max: usize,
}

impl PoolCache {
    /// A cache keeping at most `max` idle pools.
    pub(crate) fn new(max: usize) -> Self {
        Self { idle: Mutex::new(Vec::new()), max }
    }

    /// An idle pool of at most `bytes` of `chunk_size` chunks, or a new one (refused as
    /// [`Pool::with_budget`] is).
    pub(crate) fn get(&self, bytes: usize, chunk_size: u32) -> io::Result<Pool> {
        let slots = check_budget(bytes, chunk_size).map_err(|why| io::Error::new(io::ErrorKind::InvalidInput, why))?;
        let mut idle = self.idle.lock().expect("pool cache lock");
        if let Some(i) = idle.iter().position(|p| p.fits(slots, chunk_size)) {
            return Ok(idle.swap_remove(i));
        }
        drop(idle);
        fresh(slots, chunk_size, "mapped a new buffer pool")
    }

    /// Maps and pins a pool of `bytes` of `chunk_size` chunks and keeps it idle, so that the
    /// first push of that chunk size does not wait for it (pinning faults every page in: tens
    /// to hundreds of milliseconds for 64 MiB). A push that comes first maps its own.
    pub(crate) fn warm(&self, bytes: usize, chunk_size: u32) {
        let Ok(slots) = check_budget(bytes, chunk_size) else { return };
        match fresh(slots, chunk_size, "buffer pool ready") {
            Ok(pool) => self.put(pool),
            Err(e) => tracing::debug!("no buffer pool mapped ahead: {e}"),
        }
    }

    /// Keeps `pool` for a later session, in place of the idle pool kept longest when the cache
    /// is full: the next push most likely has the shape of the last one (a launcher pushing
    /// every checkpoint with its own `--chunk-size` kept paying a fresh pool per push while the
    /// cache held the warm default-shaped one). A pool that an operation still holds is never
    /// reused (dropping it leaks its memory).
    pub(crate) fn put(&self, mut pool: Pool) {
        if !pool.reset() || self.max == 0 {
            return;
        }
        let mut idle = self.idle.lock().expect("pool cache lock");
        if idle.len() >= self.max {
            idle.remove(0);
        }
        idle.push(pool);
    }
}

/// A new pool, its mapping and pinning timed in the debug log as `what`.
fn fresh(slots: usize, chunk_size: u32, what: &str) -> io::Result<Pool> {
    let t = std::time::Instant::now();
    let pool = Pool::new(slots, chunk_size)?;
    let (locked, ms) = (pool.is_locked(), t.elapsed().as_secs_f64() * 1e3);
    tracing::debug!(slots, chunk_size, locked, ms, "{what}");
    Ok(pool)
}

/// The soft RLIMIT_MEMLOCK in bytes, if it can be read.
pub fn memlock_limit() -> Option<u64> {
    crate::sys::memlock_limit()
}

/// Whether this process may lock memory beyond RLIMIT_MEMLOCK (CAP_IPC_LOCK in its effective
/// set, from `/proc/self/status`).
pub(crate) fn has_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// Checked at start: can this process pin `sessions` pools of `pool_bytes`? `Err` says what to
/// raise and by how much (pools that cannot be pinned still work, unpinned and unregistrable
/// for RDMA, with a warning).
pub fn check_memlock(pool_bytes: usize, sessions: usize) -> Result<(), String> {
    if has_ipc_lock() {
        return Ok(());
    }
    let Some(limit) = memlock_limit() else { return Ok(()) };
    // A pool maps its slots plus its control areas.
    let one = (pool_bytes + CTRL_BYTES) as u64;
    let want = one.saturating_mul(sessions.max(1) as u64);
    if limit >= want {
        return Ok(());
    }
    Err(format!(
        "RLIMIT_MEMLOCK is {} KiB, but pinning {} buffer pool(s) of {} MiB needs {} KiB: raise it \
         (`ulimit -l {}`, LimitMEMLOCK= in a systemd unit, or memlock in /etc/security/limits.conf) \
         or grant CAP_IPC_LOCK; until then pools are not pinned and RDMA cannot register them",
        limit >> 10,
        sessions.max(1),
        one >> 20,
        want.div_ceil(1024),
        want.div_ceil(1024),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_areas_lie_after_the_control_areas_apart_and_inside_the_pool() {
        let pool = Pool::new(4, 64 << 10).unwrap();
        let ctrl_end = {
            let last = pool.span(Buf::Ctrl { area: Ctrl::UpRecv, off: 0, len: CTRL_LEN as u32 });
            last.off + last.len as usize
        };
        let mut spans = Vec::new();
        for lane in 1..crate::wire::MAX_LANES {
            for area in [LaneArea::UpSend, LaneArea::UpWatch, LaneArea::DownRecv] {
                let sp = pool.span(Buf::Lane { lane, area, off: 0, len: LANE_CTRL_LEN as u32 });
                assert!(sp.off >= ctrl_end && sp.off + sp.len as usize <= pool.mem.len(), "{lane} {area:?}: {sp:?}");
                spans.push(sp.off);
            }
        }
        spans.sort_unstable();
        assert!(spans.windows(2).all(|w| w[1] - w[0] >= LANE_CTRL_LEN), "lane areas overlap");
        // Lane 0 has the control areas; no lane past the last.
        for lane in [0, crate::wire::MAX_LANES] {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.span(Buf::Lane { lane, area: LaneArea::UpSend, off: 0, len: 1 })
            }));
            assert!(r.is_err(), "lane {lane} has an area");
        }
    }

    #[test]
    fn memlock_check_names_the_numbers() {
        // Whatever this process may do, a check that cannot pass names the limit to raise.
        match check_memlock(usize::MAX / 4, 4) {
            Ok(()) => assert!(has_ipc_lock() || memlock_limit().is_none_or(|l| l == u64::MAX)),
            Err(m) => assert!(m.contains("ulimit -l") && m.contains("CAP_IPC_LOCK"), "{m}"),
        }
    }

    #[test]
    fn lease_and_release_bound_the_pool() {
        let mut p = Pool::new(4, 4096).unwrap();
        let ids: Vec<_> = std::iter::from_fn(|| p.lease()).collect();
        assert_eq!(ids.len(), 4);
        assert_eq!(p.free_slots(), 0);
        p.release(ids[2]);
        assert_eq!(p.lease(), Some(ids[2]));
    }

    #[test]
    fn cache_reuses_a_pool_of_the_same_shape() {
        let cache = PoolCache::new(1);
        let mut p = cache.get(1 << 20, 64 << 10).unwrap();
        let base = p.base();
        let _leaked = p.lease().unwrap();
        cache.put(p);
        let mut q = cache.get(1 << 20, 64 << 10).unwrap();
        assert_eq!(q.base(), base, "same mapping handed out again");
        assert_eq!(q.free_slots(), q.slots(), "every slot is free again");
        assert!(q.lease().is_some());
        let other = cache.get(1 << 20, 128 << 10).unwrap();
        assert_ne!(other.base(), base);
    }

    #[test]
    fn a_full_cache_keeps_the_shape_of_the_last_session() {
        // The warm pool of the default shape, then sessions of another chunk size: each one
        // after the first gets the pool the one before it used.
        let cache = PoolCache::new(1);
        cache.warm(1 << 20, 64 << 10);
        let p = cache.get(1 << 20, 128 << 10).unwrap();
        let base = p.base();
        cache.put(p);
        let q = cache.get(1 << 20, 128 << 10).unwrap();
        assert_eq!(q.base(), base, "the last session's pool was dropped for the warm one");
        cache.put(q);
        // The default shape comes back: a fresh pool, and the cache keeps that one next.
        let d = cache.get(1 << 20, 64 << 10).unwrap();
        assert_ne!(d.base(), base);
    }

    #[test]
    fn budget_is_a_bound() {
        // The case: 64 MiB chunks in a 64 MiB pool used to get 4 slots (256 MiB).
        let why = check_budget(64 << 20, 64 << 20).unwrap_err();
        assert!(why.contains("64 MiB") && why.contains("256 MiB"), "{why}");
        assert!(Pool::with_budget(64 << 20, 64 << 20).is_err());
        assert!(PoolCache::new(1).get(64 << 20, 64 << 20).is_err());
        assert_eq!(check_budget(16 << 20, 4 << 20), Ok(4));
        assert_eq!(check_budget(64 << 20, 4 << 20), Ok(16));
    }

    #[test]
    fn bytes_in_flight_are_held_until_the_completion() {
        use std::os::fd::AsRawFd;
        let mut p = Pool::new(2, 4096).unwrap();
        let mut io = Io::new(crate::sys::io::IoChoice::Plain, p.mem());
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let id = p.lease().unwrap();
        let buf = Buf::Slot { id, off: 0, len: 5 };
        p.submit(&mut io, 7, OpKind::Recv, b.as_raw_fd(), buf).unwrap();
        // The receive owns the bytes: reading them now panics instead of racing the worker.
        let peek = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.slot(id, 0, 5).to_vec()));
        assert!(peek.is_err(), "bytes of a receive in flight were readable");
        std::io::Write::write_all(&mut a, b"hello").unwrap();
        let mut done = Vec::new();
        while done.is_empty() {
            io.wait(p.mem_mut(), &mut done, std::time::Duration::from_secs(1)).unwrap();
        }
        assert_eq!((done[0].token, done[0].result.as_ref().ok()), (7, Some(&5)));
        // The completion gave the lease back: the bytes are the caller's, the slot releasable.
        assert_eq!(p.slot(id, 0, 5), b"hello");
        p.release(id);
    }

    #[test]
    #[should_panic(expected = "in flight")]
    fn releasing_a_slot_in_flight_panics() {
        use std::os::fd::AsRawFd;
        let mut p = Pool::new(2, 4096).unwrap();
        let mut io = Io::new(crate::sys::io::IoChoice::Plain, p.mem());
        let (_a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let id = p.lease().unwrap();
        p.submit(&mut io, 1, OpKind::Recv, b.as_raw_fd(), Buf::Slot { id, off: 0, len: 5 }).unwrap();
        p.release(id);
    }

    #[test]
    #[should_panic(expected = "released twice")]
    fn double_release_panics() {
        let mut p = Pool::new(2, 4096).unwrap();
        let id = p.lease().unwrap();
        p.release(id);
        p.release(id);
    }
}

//! The data-plane event loop of one push on one node.
//!
//! [`Session`] owns a buffer pool, an executor ([`Io`]) and a [`NodeMachine`]. It keeps these
//! operations in flight at once: one receive from upstream (a frame header, then the chunk
//! payload into the same pool slot), one send to downstream (chunk frames straight from the
//! slots they arrived in, then END), one receive from downstream (ACK / RESULT), one send
//! upstream (ACK / RESULT), and any number of file writes (replica) or reads (primary).
//! Completions become machine events; machine actions become new operations.
//!
//! The slot discipline: a slot is leased before the first op on it is submitted and released
//! only by the machine, after every op on it completed (see `proto.rs`). The pool enforces it:
//! the bytes of an op in flight are leased to it (`sys::mem`), and touching them, or releasing
//! their slot, panics. The session drains the executor before the pool is dropped.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use crate::crypt::{FRAME_MAC_LEN, FrameMacs, TAG_LEN};
use crate::error::{ErrorKind, NodeError};
use crate::manifest::{Manifest, digest};
use crate::pool::{Buf, CTRL_LEN, Ctrl, Pool, PoolCache, SlotId};
use crate::proto::{Action, Event, NodeMachine, Role};
use crate::rdma::{DnLink, UpLink, WorkCompletion};
use crate::route::Route;
use crate::store::Staging;
use crate::sys::io::{Completion, Io, IoChoice, OpKind};
use crate::wire::{self, HEADER_LEN, Header, Kind, ReplicaReport};

/// Progress counters a caller can read while a push runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Chunks written on every replica so far (the ack at the primary).
    pub acked_chunks: std::sync::atomic::AtomicU64,
    /// Bytes of those chunks.
    pub acked_bytes: std::sync::atomic::AtomicU64,
    /// Chunks sent to the first replica.
    pub sent_chunks: std::sync::atomic::AtomicU64,
    /// Bytes of the whole shard set (set once the source is scanned).
    pub total_bytes: std::sync::atomic::AtomicU64,
    /// Chunks of the whole shard set (set once the source is scanned).
    pub total_chunks: std::sync::atomic::AtomicU64,
    /// Set once the chain accepted and chunks move.
    pub streaming: std::sync::atomic::AtomicBool,
    /// Set by the caller to stop the push: the session aborts at its next wake-up (within
    /// ~100 ms), the chain drops its staging, nothing is published.
    pub cancel: std::sync::atomic::AtomicBool,
}

impl Progress {
    /// Whether the caller asked to stop.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Tunables of a session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Bytes of pool to allocate for chunk slots.
    pub pool_bytes: usize,
    /// Which executor.
    pub io: IoChoice,
    /// A session that sees no completion for this long gives up.
    pub idle_timeout: Duration,
    /// Whether to verify chunk digests on arrival (always on, but for benchmarks that measure
    /// what verification costs).
    pub verify: bool,
    /// A relay forwards each chunk in pieces of this many bytes as they arrive (cut-through),
    /// instead of waiting for the whole chunk; 0 forwards whole chunks only (store-and-forward).
    pub piece_bytes: u32,
    /// A downstream that takes nothing while chunks wait for it, for this long times the number
    /// of nodes after this one, is reported as stalled and the push goes on without it.
    pub hop_timeout: Duration,
}

/// Default cut-through piece: 256 KiB is 2 ms on a 1 Gbit/s link, against 34 ms for a whole
/// 4 MiB chunk, and 16 receives and sends per 4 MiB chunk instead of one are cheap.
pub const DEFAULT_PIECE_BYTES: u32 = 256 << 10;

/// The piece size from `SHARDCAST_PIECE_BYTES` (benchmarks compare it), else the default.
pub fn piece_bytes_from_env() -> u32 {
    std::env::var("SHARDCAST_PIECE_BYTES").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_PIECE_BYTES)
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            pool_bytes: 64 << 20,
            io: IoChoice::from_env(),
            idle_timeout: Duration::from_secs(120),
            verify: true,
            piece_bytes: DEFAULT_PIECE_BYTES,
            hop_timeout: Duration::from_secs(10),
        }
    }
}

/// Bytes in memory that a push reads its chunks from (a checkpoint that was never written to
/// disk). Anything that can lend a byte slice and be shared with the session's thread.
pub type MemoryData = std::sync::Arc<dyn AsRef<[u8]> + Send + Sync>;

/// Where one file entry's bytes come from on the primary.
pub enum SourceData {
    /// An open file, read with the executor (io_uring or pread).
    File(File),
    /// A buffer in memory, copied into the pinned pool (its length is the entry's size).
    Memory(MemoryData),
}

impl std::fmt::Debug for SourceData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(file) => write!(f, "File({file:?})"),
            Self::Memory(m) => write!(f, "Memory({} bytes)", (**m).as_ref().len()),
        }
    }
}

/// Where a session's chunks come from and go to locally.
#[derive(Debug)]
pub enum Local {
    /// The primary: one source per entry (None for directories and empty files).
    Source(Vec<Option<SourceData>>),
    /// A replica: the staging area it writes into and publishes (taken when published).
    Staging(Option<Staging>),
}

/// How a session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// Every node settled: the reports, this node first on a replica.
    Finished(Vec<ReplicaReport>),
    /// This node gave up.
    Aborted(NodeError),
    /// The upstream connection broke (replica only); nothing was published.
    UpstreamLost(String),
}

const T_UP_RECV: u64 = 1;
const T_UP_SEND: u64 = 2;
const T_DN_SEND: u64 = 3;
const T_DN_RECV: u64 = 4;
const T_WRITE: u64 = 5;
const T_READ: u64 = 6;
/// Readiness of an RDMA completion channel; value 0 upstream, 1 downstream.
const T_RDMA_POLL: u64 = 7;
/// The value of END's RDMA write (chunks use their sequence number).
const END_WR: u64 = (1 << 56) - 1;

fn token(kind: u64, value: u64) -> u64 {
    (kind << 56) | value
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpRecv {
    Idle,
    Header(SlotId),
    /// Receiving chunk `seq`'s payload; its header's digest; payload bytes received before the
    /// receive in flight, and how many that receive asked for.
    Payload(SlotId, u64, u128, u32, u32),
    /// Authenticated hop: receiving the MAC after a frame other than CHUNK (END).
    Trailer(SlotId),
    /// RDMA hop: chunks arrive by RDMA; a receive on the socket only watches for it closing.
    Watch,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DnRecv {
    Idle,
    Header,
    /// A RESULT's or CREDIT's payload.
    Payload(Kind, u32),
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DnItem {
    /// A whole chunk frame, header and payload.
    Chunk(u64, SlotId),
    /// Part of a chunk frame being cut through: `len` bytes from offset `off` of the slot (the
    /// first piece starts at 0 and carries the header).
    Piece {
        seq: u64,
        slot: SlotId,
        off: u32,
        len: u32,
    },
    End,
}

/// A chunk a relay forwards piece by piece while it arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CutThrough {
    seq: u64,
    /// Pieces queued or in flight downstream.
    pending: u32,
    /// Every piece was queued (the whole chunk arrived).
    complete: bool,
    /// The machine asked for the chunk's forward: it hears `ForwardDone` once no piece is
    /// pending.
    asked: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpItem {
    Ack,
    Result,
    Credit,
}

/// One push on one node.
pub struct Session<'a> {
    // Declared before `pool`, so that it drops first; `Drop` drains it explicitly anyway.
    io: Io,
    /// Returned to `pools` in `Drop`; freed, or leaked (by `sys::mem`) when I/O might still
    /// touch it.
    pool: Pool,
    pools: Option<&'a PoolCache>,
    machine: NodeMachine,
    manifest: Manifest,
    local: Local,
    up: Option<RawFd>,
    down: Option<RawFd>,
    downstream_name: String,
    cfg: SessionConfig,
    progress: Option<&'a Progress>,

    up_recv: UpRecv,
    next_recv_seq: u64,
    next_read: u64,
    /// Bytes of all entries before entry i (progress in bytes; only when progress is watched).
    bytes_before: Vec<u64>,
    dn_queue: VecDeque<DnItem>,
    dn_sending: Option<DnItem>,
    /// Chunks being cut through, oldest first (relays only).
    cut: VecDeque<CutThrough>,
    /// The RDMA hop downstream, when this hop negotiated RDMA.
    dn_rdma: Option<DnLink>,
    /// RDMA writes posted downstream and not completed.
    dn_rdma_inflight: usize,
    /// The RDMA hop upstream, when that hop negotiated RDMA.
    up_rdma: Option<UpLink>,
    /// Slots granted to upstream and not yet sent in a CREDIT frame.
    up_credits: Vec<u16>,
    /// Whether END arrived from upstream (RDMA: the socket may close after it).
    end_received: bool,
    /// A readiness poll is in flight on the completion channel (upstream, downstream).
    rdma_polling: [bool; 2],
    /// Prometheus counters of a server's session, and the pool slots it last reported in use.
    metrics: Option<crate::metrics::SessionMetrics>,
    slots_reported: i64,
    dn_recv: DnRecv,
    /// An event about downstream that waits for the send in flight to complete.
    dn_deferred: Option<Event>,
    dn_closed: bool,
    up_sending: Option<UpItem>,
    up_ack: Option<u64>,
    up_ack_sent: u64,
    up_result: Option<Vec<ReplicaReport>>,
    up_gone: bool,
    end: Option<SessionEnd>,
    events: VecDeque<Event>,
    actions: Vec<Action>,
    /// Which chunks this node stores and passes on (everything, for an ordinary push).
    route: Route,
    /// The manifest came with every chunk's digest (a routed push): chunks are checked against
    /// it instead of filling it in.
    digests_known: bool,
    /// A replica that stores part of the push: its staging entry for each manifest entry, and
    /// the manifest it publishes.
    own: Option<(Vec<Option<usize>>, Manifest)>,
    /// Chunks this replica already held, being copied into staging: joined before syncing.
    prefill: Option<std::thread::JoinHandle<Result<(), crate::error::StoreError>>>,
    /// When downstream last took or answered something (while this node waited on it).
    dn_progress: Instant,
    /// Test-only fault (debug builds, `SHARDCAST_TEST_FLIP_FORWARD=N`): this relay flips a bit
    /// of the digest in the header of every Nth chunk it forwards, so the next node sees a
    /// chunk whose bytes do not match. Release builds never set it.
    flip_every: Option<u64>,
    /// Async push: this node has told upstream it published; upstream leaving is expected now.
    reported_early: bool,
    /// Set when a newer push of the same version supersedes this one (replicas).
    superseded: Option<std::sync::Arc<crate::store::Receiving>>,
    /// Routed push progress: chunks counted into `ack_bytes` so far.
    ack_counted: u64,
    ack_bytes: u64,
    /// Encrypted hop upstream: opens each chunk that arrives.
    open: Option<crate::crypt::Opener>,
    /// Encrypted hop downstream: seals each chunk sent, in the pool's sealing buffer (sends go
    /// one at a time, so one buffer does; the pool keeps it untouched while a send from it is
    /// in flight).
    seal: Option<crate::crypt::Sealer>,
    /// RDMA writes downstream and slots granted upstream, holding their pool bytes for the NIC.
    nic_writes: crate::sys::nic::Writes,
    nic_grants: crate::sys::nic::Grants,
    /// Authenticated connections: the session secrets of the hop upstream (RESULT sent there
    /// carries a MAC) and downstream (RESULT from there must carry one).
    up_secret: Option<crate::crypt::SessionSecret>,
    dn_secret: Option<crate::crypt::SessionSecret>,
    /// The header of the chunk being received, as it came (an encrypted chunk's associated
    /// data; the test fault may change the slot's copy).
    up_header: [u8; HEADER_LEN],
    /// Authenticated hops: the MACs of the data-plane frames (CHUNK, END, ACK, CREDIT; see
    /// `crypt::FrameMacs`) from and to upstream, and to and from downstream.
    up_macs: Option<FrameMacs>,
    dn_macs: Option<FrameMacs>,
}

impl<'a> Session<'a> {
    /// A session for one push. `up`/`down` are connected sockets (none upstream on the
    /// primary, none downstream on the tail); `node` is this node's name in the chain and
    /// `downstream` the names after it. `pool` holds the chunk slots; it goes back to `pools`
    /// (when given) at the end.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        role: Role,
        node: &str,
        downstream: Vec<String>,
        manifest: Manifest,
        local: Local,
        up: Option<RawFd>,
        down: Option<RawFd>,
        cfg: SessionConfig,
        progress: Option<&'a Progress>,
        pool: Pool,
        pools: Option<&'a PoolCache>,
        links: (Option<UpLink>, Option<DnLink>),
    ) -> Self {
        let (up_rdma, dn_rdma) = links;
        let up_credits = Vec::new();
        let mut pool = pool;
        let io = Io::new(cfg.io, pool.mem());
        // The slots the hop's negotiation granted upstream are the NIC's until a frame lands.
        let mut nic_grants = crate::sys::nic::Grants::default();
        for &s in up_rdma.as_ref().map_or(&[][..], |l| &l.granted[..]) {
            let span = pool.span(Buf::Slot { id: s, off: 0, len: pool.slot_size() as u32 });
            nic_grants.grant(pool.mem_mut(), s.0, span);
        }
        let downstream_name = downstream.first().cloned().unwrap_or_default();
        let machine = NodeMachine::new(role, node, downstream, manifest.chunk_count());
        let bytes_before = if progress.is_some() {
            manifest
                .entries()
                .iter()
                .scan(0u64, |acc, e| {
                    let before = *acc;
                    *acc += e.size;
                    Some(before)
                })
                .collect()
        } else {
            Vec::new()
        };
        Self {
            io,
            pool,
            pools,
            machine,
            manifest,
            local,
            up,
            down,
            downstream_name,
            cfg,
            progress,
            up_recv: if up.is_some() { UpRecv::Idle } else { UpRecv::Done },
            next_recv_seq: 0,
            next_read: 0,
            bytes_before,
            dn_queue: VecDeque::new(),
            dn_sending: None,
            cut: VecDeque::new(),
            dn_rdma,
            dn_rdma_inflight: 0,
            up_rdma,
            up_credits,
            end_received: false,
            rdma_polling: [false; 2],
            metrics: None,
            slots_reported: 0,
            dn_recv: if down.is_some() { DnRecv::Idle } else { DnRecv::Done },
            dn_deferred: None,
            dn_closed: down.is_none(),
            up_sending: None,
            up_ack: None,
            up_ack_sent: 0,
            up_result: None,
            up_gone: up.is_none(),
            end: None,
            events: VecDeque::new(),
            actions: Vec::new(),
            route: Route::everything(),
            digests_known: false,
            own: None,
            ack_counted: 0,
            ack_bytes: 0,
            prefill: None,
            dn_progress: Instant::now(),
            flip_every: if cfg!(debug_assertions) {
                std::env::var("SHARDCAST_TEST_FLIP_FORWARD").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0)
            } else {
                None
            },
            superseded: None,
            reported_early: false,
            open: None,
            seal: None,
            nic_writes: crate::sys::nic::Writes::default(),
            nic_grants,
            up_header: [0; HEADER_LEN],
            up_secret: None,
            dn_secret: None,
            up_macs: None,
            dn_macs: None,
        }
    }

    /// Async push on the first replica: report upstream once published here (see
    /// `NodeMachine::with_early_report`).
    pub fn with_early_report(mut self) -> Self {
        self.machine.set_report_early();
        self
    }

    /// A relay of a push the primary repairs: when a node after it dies, it stops too (see
    /// [`NodeMachine::set_stop_on_loss`]).
    pub fn with_stop_on_loss(mut self) -> Self {
        self.machine.set_stop_on_loss();
        self
    }

    /// Encrypted hops (`--encrypt`): `open` decrypts the chunks from upstream, `seal`
    /// encrypts those sent downstream. Either hop then moves whole chunks (no cut-through: a
    /// chunk is checked before any of it is used), and sealing needs one chunk-sized buffer.
    pub fn with_crypt(mut self, open: Option<crate::crypt::Opener>, seal: Option<crate::crypt::Sealer>) -> Self {
        if seal.is_some() {
            self.pool.set_seal_len(HEADER_LEN + self.manifest.chunk_size() as usize + TAG_LEN);
        }
        self.open = open;
        self.seal = seal;
        self
    }

    /// Authenticated hops: the RESULT this node sends upstream carries a MAC under `up`, and the
    /// one from downstream must carry one under `dn` (see `crypt::seal_frame`); so do the
    /// data-plane frames each way (see `crypt::FrameMacs`).
    pub fn with_macs(
        mut self,
        up: Option<crate::crypt::SessionSecret>,
        dn: Option<crate::crypt::SessionSecret>,
    ) -> Self {
        self.up_macs = up.as_ref().map(FrameMacs::downstream_end);
        self.dn_macs = dn.as_ref().map(FrameMacs::upstream_end);
        self.up_secret = up;
        self.dn_secret = dn;
        self
    }

    /// Authenticated hop downstream without encryption: writes the MAC of the chunk frame in
    /// `slot` (its header as it is sent) after its payload, and returns its length (0 without).
    fn mac_chunk(&mut self, seq: u64, slot: SlotId) -> u32 {
        let Some(m) = self.dn_macs.as_mut() else { return 0 };
        let c = self.manifest.chunk(seq).expect("in range");
        // The slot holds the chunk's header; nothing writes the header while the chunk waits to
        // be forwarded.
        let header: [u8; HEADER_LEN] = self.pool.slot(slot, 0, HEADER_LEN).try_into().expect("header");
        let mac = m.sign(&header, &[]);
        // The bytes after the payload (room the pool leaves for a tag) are used by no other op:
        // disk writes cover the payload only, and the frame is not being sent yet.
        self.pool.slot_mut(slot, HEADER_LEN + c.len as usize, FRAME_MAC_LEN).copy_from_slice(&mac);
        FRAME_MAC_LEN as u32
    }

    /// The flag that a newer push of the same version sets to make this session give up.
    pub fn with_superseded(mut self, flag: std::sync::Arc<crate::store::Receiving>) -> Self {
        self.superseded = Some(flag);
        self
    }

    /// Chunks held from an earlier version are being copied into staging by `prefill`; the
    /// session waits for it before syncing, and fails the node if the copy failed.
    pub fn with_prefill(
        mut self,
        prefill: Option<std::thread::JoinHandle<Result<(), crate::error::StoreError>>>,
    ) -> Self {
        self.prefill = prefill;
        self
    }

    /// Restricts this node to its route in a routed push, whose manifest carries every digest.
    /// `own`: on a replica that stores a subset, the staging entry of each manifest entry and
    /// the manifest it publishes.
    pub fn with_route(mut self, route: Route, own: Option<(Vec<Option<usize>>, Manifest)>) -> Self {
        let total = self.manifest.chunk_count();
        let role = if self.up.is_some() { Role::Replica } else { Role::Primary };
        let downstream = self.machine.downstream_nodes().to_vec();
        self.machine = NodeMachine::new(role, self.machine.node(), downstream, total).with_route(route.clone());
        self.next_recv_seq = route.next_passing(0, total);
        self.next_read = route.next_passing(0, total);
        self.route = route;
        self.digests_known = true;
        self.own = own;
        self
    }

    /// Counts this session's bytes, chunks and pool use in a server's metrics.
    pub fn with_metrics(mut self, m: crate::metrics::SessionMetrics) -> Self {
        self.metrics = Some(m);
        self
    }

    fn report_pool_use(&mut self) {
        if let Some(m) = &self.metrics {
            let in_use = (self.pool.slots() - self.pool.free_slots()) as i64;
            m.all.pool_slots_in_use.inc_by(in_use - self.slots_reported);
            self.slots_reported = in_use;
        }
    }

    fn count_out(&self, bytes: u64) {
        if let Some(m) = &self.metrics {
            m.bytes_out.inc_by(bytes);
        }
    }

    /// The executor's name (for logs).
    pub fn io_name(&self) -> &'static str {
        self.io.name()
    }

    /// Whether the pool is pinned.
    pub fn pool_locked(&self) -> bool {
        self.pool.is_locked()
    }

    /// Runs the push to its end.
    pub fn run(mut self) -> SessionEnd {
        self.drive()
    }

    /// Runs the push to its end and returns, with the end, the manifest as this node knows it
    /// then: on the primary of an ordinary push, the digest of every chunk it read (zero for
    /// chunks it never read), which a repair of the push must keep to.
    pub fn run_keeping_manifest(mut self) -> (SessionEnd, Manifest) {
        let end = self.drive();
        (end, self.manifest.clone())
    }

    fn drive(&mut self) -> SessionEnd {
        self.machine.start(&mut self.actions);
        for a in std::mem::take(&mut self.actions) {
            self.act(a);
        }
        self.process();
        let mut completions = Vec::new();
        let mut last_progress = Instant::now();
        loop {
            if let Some(end) = self.finished() {
                if let Some(s) = self.down.and_then(crate::sys::tcpinfo::tcp_stats) {
                    tracing::debug!(
                        to = %self.downstream_name,
                        busy_ms = s.busy_ms,
                        rwnd_limited_ms = s.rwnd_limited_ms,
                        sndbuf_limited_ms = s.sndbuf_limited_ms,
                        retrans = s.total_retrans,
                        rtt_us = s.rtt_us,
                        cwnd = s.snd_cwnd,
                        "downstream connection"
                    );
                }
                return end;
            }
            if self.end.is_none() && self.progress.is_some_and(Progress::cancelled) {
                self.abort(NodeError::new(ErrorKind::Aborted, "push cancelled by the caller"));
                continue;
            }
            if self.end.is_none()
                && self.superseded.as_ref().is_some_and(|f| f.cancel.load(std::sync::atomic::Ordering::Relaxed))
            {
                self.abort(NodeError::new(ErrorKind::Aborted, "superseded by a newer push of the same version"));
                continue;
            }
            self.check_hops();
            if let Err(e) = self.pump() {
                self.end = Some(SessionEnd::Aborted(NodeError::io("submitting I/O", &e)));
                continue;
            }
            if !self.events.is_empty() {
                // Chunks copied from memory are ready without any I/O to wait for.
                last_progress = Instant::now();
                self.process();
                self.report_pool_use();
                continue;
            }
            completions.clear();
            // Short slices when a caller watches (and may cancel) the push.
            let slice = self.cfg.idle_timeout.min(self.cfg.hop_timeout).min(if self.progress.is_some() {
                Duration::from_millis(100)
            } else {
                Duration::from_secs(1)
            });
            if let Err(e) = self.io.wait(self.pool.mem_mut(), &mut completions, slice) {
                self.end = Some(SessionEnd::Aborted(NodeError::io("waiting for I/O", &e)));
                continue;
            }
            if completions.is_empty() {
                if last_progress.elapsed() >= self.cfg.idle_timeout {
                    self.end = Some(SessionEnd::Aborted(NodeError::new(
                        ErrorKind::Stalled,
                        format!("no progress for {} s", self.cfg.idle_timeout.as_secs()),
                    )));
                }
                continue;
            }
            last_progress = Instant::now();
            for c in completions.drain(..) {
                self.complete(c);
            }
            self.process();
            self.report_pool_use();
        }
    }

    /// The session is over once an end is set and the reports (if any) went upstream.
    fn finished(&mut self) -> Option<SessionEnd> {
        self.end.as_ref()?;
        if !self.up_gone && (self.up_result.is_some() || self.up_sending == Some(UpItem::Result)) {
            return None;
        }
        self.end.take()
    }

    fn process(&mut self) {
        while let Some(ev) = self.events.pop_front() {
            self.machine.handle(ev, &mut self.actions);
            let actions = std::mem::take(&mut self.actions);
            for a in actions {
                self.act(a);
            }
        }
    }

    fn act(&mut self, action: Action) {
        match action {
            Action::Forward { seq, slot } => {
                if let Some(i) = self.cut.iter().position(|c| c.seq == seq) {
                    // Its pieces went (or are going) downstream as they arrived.
                    self.cut[i].asked = true;
                    self.cut_settle(i);
                } else if !self.dn_closed {
                    self.dn_queue.push_back(DnItem::Chunk(seq, slot));
                }
                // With downstream closed, the machine releases the slot when it hears so.
            }
            Action::SendEnd => self.dn_queue.push_back(DnItem::End),
            Action::Write { seq, slot } => {
                let c = self.manifest.chunk(seq).expect("machine only writes chunks in range");
                let Local::Staging(Some(st)) = &self.local else { unreachable!("only replicas write") };
                let entry = match &self.own {
                    Some((map, _)) => map[c.entry].expect("the route stores only this node's entries"),
                    None => c.entry,
                };
                let fd = st.fd(entry).expect("files with chunks have a descriptor");
                // The slot stays leased until the machine releases it, which it does only after
                // this write's completion (WriteDone/WriteFailed).
                let buf = Buf::Slot { id: slot, off: HEADER_LEN, len: c.len };
                if let Err(e) = self.pool.submit(&mut self.io, token(T_WRITE, seq), OpKind::Write(c.offset), fd, buf) {
                    self.events.push_back(Event::WriteFailed { seq, error: NodeError::io("submitting a write", &e) });
                }
            }
            Action::Release { slot } => {
                self.pool.release(slot);
                // RDMA upstream: every freed slot is granted to the sender again.
                if let Some(link) = self.up_rdma.as_mut()
                    && !self.end_received
                    && self.end.is_none()
                    && let Some(s) = self.pool.lease()
                {
                    link.granted.push(s);
                    self.up_credits.push(s.0);
                    let span = self.pool.span(Buf::Slot { id: s, off: 0, len: self.pool.slot_size() as u32 });
                    self.nic_grants.grant(self.pool.mem_mut(), s.0, span);
                }
            }
            Action::AckUpstream { through } => {
                if let Some(p) = self.progress {
                    use std::sync::atomic::Ordering::Relaxed;
                    p.acked_chunks.store(through, Relaxed);
                    let bytes = if !self.route.is_everything() {
                        // Routed: count only the chunks that travel (incrementally: acks grow).
                        while self.ack_counted < through {
                            if self.route.onward(self.ack_counted) {
                                let c = self.manifest.chunk(self.ack_counted).expect("acked chunk exists");
                                self.ack_bytes += u64::from(c.len);
                            }
                            self.ack_counted += 1;
                        }
                        self.ack_bytes
                    } else if through == 0 {
                        0
                    } else {
                        let c = self.manifest.chunk(through - 1).expect("acked chunk exists");
                        self.bytes_before[c.entry] + c.offset + u64::from(c.len)
                    };
                    p.acked_bytes.store(bytes, Relaxed);
                }
                if self.up.is_some() {
                    self.up_ack = Some(through);
                }
            }
            Action::Sync => {
                let copied = match self.prefill.take().map(std::thread::JoinHandle::join) {
                    None | Some(Ok(Ok(()))) => Ok(()),
                    Some(Ok(Err(e))) => Err(e.to_node_error()),
                    Some(Err(_)) => Err(NodeError::new(ErrorKind::Io, "the copy of held chunks panicked")),
                };
                if let Err(e) = copied {
                    self.events.push_back(Event::SyncDone { result: Err(e) });
                    return;
                }
                let Local::Staging(Some(st)) = &mut self.local else { unreachable!("only replicas sync") };
                let result = st.sync().map_err(|e| e.to_node_error());
                self.events.push_back(Event::SyncDone { result });
            }
            Action::Publish => {
                let Local::Staging(st) = &mut self.local else { unreachable!("only replicas publish") };
                let st = st.take().expect("published once");
                let manifest = self.own.as_ref().map_or(&self.manifest, |(_, m)| m);
                let result = st.publish(manifest).map_err(|e| e.to_node_error());
                self.events.push_back(Event::PublishDone { result });
            }
            Action::Finish { reports } => {
                if self.up.is_some() {
                    self.up_result = Some(reports.clone());
                }
                self.end = Some(SessionEnd::Finished(reports));
            }
            Action::ReportEarly { reports } => {
                // Upstream (the primary of an async push) goes away after this; the rest of
                // the chain completes on its own.
                if self.up.is_some() {
                    self.up_result = Some(reports);
                    self.reported_early = true;
                }
            }
            Action::Abort { error } => self.abort(error),
            Action::Stop { error, downstream } => self.abort_with(error, Some(downstream)),
        }
    }

    /// Gives up: on a replica, reports the failure upstream (this node failed, the nodes after
    /// it were not finished) and cuts the downstream connection, so the rest of the chain
    /// drops its staging too.
    fn abort(&mut self, error: NodeError) {
        self.abort_with(error, None);
    }

    /// [`Session::abort`], with the reports of the nodes after this one when they are known
    /// (a relay stopping because one of them died).
    fn abort_with(&mut self, error: NodeError, downstream: Option<Vec<ReplicaReport>>) {
        if self.end.is_some() {
            return;
        }
        tracing::warn!(%error, "push aborted");
        if !self.up_gone {
            let mut reports = vec![ReplicaReport::failed(self.machine.node(), error.clone())];
            match downstream {
                Some(d) => reports.extend(d),
                None => {
                    for n in self.machine.downstream_nodes() {
                        reports.push(ReplicaReport::failed(
                            n,
                            NodeError::new(ErrorKind::Aborted, format!("push aborted upstream: {}", error.message)),
                        ));
                    }
                }
            }
            self.up_result = Some(reports);
        }
        if let Some(down) = self.down {
            crate::sys::shutdown(down);
        }
        self.dn_closed = true;
        self.dn_queue.clear();
        self.cut.clear();
        self.end = Some(SessionEnd::Aborted(error));
    }

    /// Submits whatever can be submitted now.
    fn pump(&mut self) -> std::io::Result<()> {
        if self.end.is_none() {
            self.pump_data()?;
        }
        self.pump_up_send()
    }

    fn pump_data(&mut self) -> std::io::Result<()> {
        // RDMA: a readiness poll on each completion channel.
        self.pump_rdma_polls()?;
        // RDMA upstream: chunks land by themselves; the socket is only watched for closing.
        if self.up_recv == UpRecv::Idle && self.up_rdma.is_some() {
            let fd = self.up.expect("replica has upstream");
            let buf = Buf::Ctrl { area: Ctrl::UpRecv, off: 0, len: HEADER_LEN as u32 };
            self.pool.submit(&mut self.io, token(T_UP_RECV, 0), OpKind::Recv, fd, buf)?;
            self.up_recv = UpRecv::Watch;
        }
        // Upstream receive: one frame header at a time, into a fresh slot.
        if self.up_recv == UpRecv::Idle
            && let Some(slot) = self.pool.lease()
        {
            let fd = self.up.expect("replica has upstream");
            let buf = Buf::Slot { id: slot, off: 0, len: HEADER_LEN as u32 };
            self.pool.submit(&mut self.io, token(T_UP_RECV, 0), OpKind::Recv, fd, buf)?;
            self.up_recv = UpRecv::Header(slot);
        }
        // Primary reads: as far ahead as the pool allows.
        while matches!(self.local, Local::Source(_))
            && self.end.is_none()
            && self.next_read < self.manifest.chunk_count()
        {
            let Some(slot) = self.pool.lease() else { break };
            let seq = self.next_read;
            let c = self.manifest.chunk(seq).expect("in range");
            // Routed: only the chunks some node downstream needs.
            self.next_read = self.route.next_passing(seq + 1, self.manifest.chunk_count());
            let Local::Source(sources) = &self.local else { unreachable!("checked by the loop") };
            match sources[c.entry].as_ref().expect("entries with chunks have a source") {
                SourceData::File(file) => {
                    // The machine releases the slot only after its read and its send completed.
                    let (fd, buf) = (file.as_raw_fd(), Buf::Slot { id: slot, off: HEADER_LEN, len: c.len });
                    let t = token(T_READ, (seq << 16) | u64::from(slot.0));
                    self.pool.submit(&mut self.io, t, OpKind::Read(c.offset), fd, buf)?;
                }
                SourceData::Memory(data) => {
                    let bytes = (**data).as_ref();
                    let start = c.offset as usize;
                    let got = bytes.len().saturating_sub(start).min(c.len as usize);
                    self.pool.slot_mut(slot, HEADER_LEN, got).copy_from_slice(&bytes[start..start + got]);
                    self.read_done(seq, slot, Ok(got));
                }
            }
        }
        // RDMA downstream: a write per granted slot, several in flight.
        if self.dn_rdma.is_some() {
            self.pump_rdma_writes();
        }
        // Downstream send: one at a time keeps the stream in order.
        if self.dn_rdma.is_none()
            && self.dn_sending.is_none()
            && !self.dn_closed
            && let Some(item) = self.dn_queue.pop_front()
        {
            let buf = match item {
                DnItem::Chunk(seq, slot) if self.seal.is_some() => {
                    let c = self.manifest.chunk(seq).expect("in range");
                    let len = HEADER_LEN + c.len as usize;
                    // The slot holds the whole frame (its payload is checked or read, and
                    // nothing writes it while it waits to be forwarded).
                    self.pool.copy_to_seal(slot, len);
                    self.seal.as_mut().expect("checked").seal(self.pool.seal_mut(len + TAG_LEN), HEADER_LEN, len);
                    Buf::Seal { len: (len + TAG_LEN) as u32 }
                }
                DnItem::Chunk(seq, slot) => {
                    let c = self.manifest.chunk(seq).expect("in range");
                    let mac = self.mac_chunk(seq, slot);
                    Buf::Slot { id: slot, off: 0, len: HEADER_LEN as u32 + c.len + mac }
                }
                DnItem::Piece { seq, slot, off, len } => {
                    // The last piece of a cut-through chunk on an authenticated hop is its MAC,
                    // queued once the chunk from upstream authenticated; made now, in send order.
                    let c = self.manifest.chunk(seq).expect("in range");
                    if off == HEADER_LEN as u32 + c.len && len == FRAME_MAC_LEN as u32 {
                        self.mac_chunk(seq, slot);
                    }
                    Buf::Slot { id: slot, off: off as usize, len }
                }
                DnItem::End => self.end_frame(),
            };
            // A chunk's slot stays leased until ForwardDone, which follows this send's completion
            // (for pieces: the last piece's); a piece's bytes were received before it was queued
            // and are not written again; the END area is not touched again.
            let fd = self.down.expect("downstream open");
            self.pool.submit(&mut self.io, token(T_DN_SEND, 0), OpKind::Send, fd, buf)?;
            self.dn_sending = Some(item);
        }
        // Downstream receive: ACK / RESULT headers.
        if self.dn_recv == DnRecv::Idle && !self.dn_closed {
            let fd = self.down.expect("downstream open");
            let buf = Buf::Ctrl { area: Ctrl::DownRecv, off: 0, len: HEADER_LEN as u32 };
            self.pool.submit(&mut self.io, token(T_DN_RECV, 0), OpKind::Recv, fd, buf)?;
            self.dn_recv = DnRecv::Header;
        }
        Ok(())
    }

    /// Writes the END frame into its control area: every chunk was dispatched, so every digest
    /// is known, and END carries the completed manifest's digest, which each replica checks.
    fn end_frame(&mut self) -> Buf {
        let h = Header { kind: Kind::End, len: 0, seq: self.manifest.chunk_count(), digest: self.manifest.digest() };
        let mut frame = h.to_bytes().to_vec();
        if let Some(m) = self.dn_macs.as_mut() {
            let mac = m.sign(&frame, &[]);
            frame.extend_from_slice(&mac);
        }
        // The END area is written once, and no op uses it before END is sent.
        self.pool.ctrl_mut(Ctrl::DownSend, frame.len()).copy_from_slice(&frame);
        Buf::Ctrl { area: Ctrl::DownSend, off: 0, len: frame.len() as u32 }
    }

    fn pump_rdma_polls(&mut self) -> std::io::Result<()> {
        for (i, fd) in [self.up_rdma.as_ref().map(|l| l.ep.event_fd()), self.dn_rdma.as_ref().map(|l| l.ep.event_fd())]
            .into_iter()
            .enumerate()
        {
            if let Some(fd) = fd
                && !self.rdma_polling[i]
            {
                self.io.poll_in(token(T_RDMA_POLL, i as u64), fd)?;
                self.rdma_polling[i] = true;
            }
        }
        Ok(())
    }

    /// Posts an RDMA write for every queued frame that has a granted slot downstream.
    fn pump_rdma_writes(&mut self) {
        while !self.dn_closed {
            let Some(link) = self.dn_rdma.as_mut() else { return };
            if link.credits.is_empty() || self.dn_queue.is_empty() {
                return;
            }
            let item = self.dn_queue.pop_front().expect("checked");
            let remote_slot = self.dn_rdma.as_mut().expect("checked").credits.pop_front().expect("checked");
            let (buf, wr) = match item {
                DnItem::Chunk(seq, slot) => {
                    // The MAC travels in the slot too, after the payload (the receiver's slots
                    // leave room for it).
                    let c = self.manifest.chunk(seq).expect("in range");
                    let mac = self.mac_chunk(seq, slot);
                    (Buf::Slot { id: slot, off: 0, len: HEADER_LEN as u32 + c.len + mac }, seq)
                }
                DnItem::End => (self.end_frame(), END_WR),
                DnItem::Piece { .. } => unreachable!("no cut-through onto an RDMA hop"),
            };
            let link = self.dn_rdma.as_ref().expect("checked");
            let remote = link.remote_addr + u64::from(remote_slot) * link.slot_size;
            // The frame (a leased slot or the END area) is held for the NIC until this write
            // completes (ForwardDone releases the slot only after it); the remote slot was
            // granted by the receiver and holds a whole frame.
            let span = self.pool.span(buf);
            let (rkey, imm) = (link.rkey, u32::from(remote_slot));
            let posted =
                self.nic_writes.post(&link.ep, self.pool.mem_mut(), token(T_DN_SEND, wr), span, remote, rkey, imm);
            match posted {
                Ok(()) => self.dn_rdma_inflight += 1,
                Err(e) => {
                    if let DnItem::Chunk(seq, _) = item {
                        self.events.push_back(Event::ForwardDone { seq });
                    }
                    let name = self.downstream_name.clone();
                    self.downstream_settled(Event::DownstreamLost {
                        error: NodeError::new(ErrorKind::ConnectionLost, format!("RDMA to {name} failed: {e}")),
                    });
                    return;
                }
            }
        }
    }

    /// Takes every RDMA completion of endpoint `i` (0 upstream, 1 downstream).
    fn rdma_ready(&mut self, i: usize) {
        self.rdma_polling[i] = false;
        let mut wcs = Vec::new();
        let polled = match i {
            0 => self.up_rdma.as_mut().map(|l| l.ep.poll(&mut wcs)),
            _ => self.dn_rdma.as_mut().map(|l| l.ep.poll(&mut wcs)),
        };
        if let Some(Err(e)) = polled {
            let what = format!("polling RDMA completions: {e}");
            if i == 0 {
                self.upstream_lost(what);
            } else {
                self.downstream_settled(Event::DownstreamLost {
                    error: NodeError::new(ErrorKind::ConnectionLost, what),
                });
            }
            return;
        }
        for wc in wcs {
            if i == 0 {
                self.rdma_arrived(wc);
            } else {
                self.rdma_written(wc);
            }
        }
    }

    /// A write downstream completed (or failed).
    fn rdma_written(&mut self, wc: WorkCompletion) {
        self.dn_rdma_inflight = self.dn_rdma_inflight.saturating_sub(1);
        self.nic_writes.completed(self.pool.mem_mut(), wc.wr_id);
        let value = wc.wr_id & ((1 << 56) - 1);
        let seq = (value != END_WR).then_some(value);
        match wc.status {
            Ok(()) => {
                if let Some(seq) = seq {
                    if let Some(c) = self.manifest.chunk(seq) {
                        self.count_out(u64::from(c.len) + HEADER_LEN as u64);
                    }
                    if let Some(p) = self.progress {
                        p.sent_chunks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    self.events.push_back(Event::ForwardDone { seq });
                }
            }
            Err(status) => {
                if let Some(seq) = seq {
                    self.events.push_back(Event::ForwardDone { seq });
                }
                // After the first failure (or a flush) the rest only drain.
                if !self.dn_closed {
                    let name = self.downstream_name.clone();
                    self.downstream_settled(Event::DownstreamLost {
                        error: NodeError::new(
                            ErrorKind::ConnectionLost,
                            format!("RDMA write to {name} failed: {status}"),
                        ),
                    });
                }
            }
        }
        if self.dn_rdma_inflight == 0
            && self.dn_sending.is_none()
            && let Some(ev) = self.dn_deferred.take()
        {
            self.events.push_back(ev);
        }
    }

    /// A frame landed in a granted slot upstream (or the hop failed).
    fn rdma_arrived(&mut self, wc: WorkCompletion) {
        if self.end.is_some() {
            return;
        }
        if let Err(status) = wc.status {
            if !self.end_received {
                self.upstream_lost(format!("RDMA from upstream failed: {status}"));
            }
            return;
        }
        let link = self.up_rdma.as_mut().expect("completions come from the link");
        // Every write consumes a receive: post the next one.
        if let Err(e) = link.ep.post_recv(wc.wr_id) {
            self.abort(NodeError::new(ErrorKind::ConnectionLost, e.to_string()));
            return;
        }
        let Some(pos) = link.granted.iter().position(|s| u32::from(s.0) == wc.imm) else {
            self.abort(NodeError::new(
                ErrorKind::Protocol,
                format!("upstream wrote into slot {} that was not granted to it", wc.imm),
            ));
            return;
        };
        let slot = link.granted.swap_remove(pos);
        // The write into this slot has completed (its receive completion is here) and the
        // sender has no other grant for it.
        self.nic_grants.landed(self.pool.mem_mut(), slot.0);
        let bytes: [u8; HEADER_LEN] = self.pool.slot(slot, 0, HEADER_LEN).try_into().expect("header");
        match Header::decode(&bytes) {
            Ok(h) if h.kind == Kind::Chunk => {
                if let Err((kind, message)) = self.check_chunk_header(&h) {
                    self.pool.release(slot);
                    self.abort(NodeError::new(kind, message));
                    return;
                }
                if let Some(m) = self.up_macs.as_mut() {
                    // The frame's MAC follows its payload in the slot.
                    let mac = self.pool.slot(slot, HEADER_LEN + h.len as usize, FRAME_MAC_LEN);
                    if m.verify(&bytes, &[], mac).is_err() {
                        self.pool.release(slot);
                        return self.abort(unauthentic_chunk(h.seq));
                    }
                }
                self.chunk_arrived(slot, h.seq, h.digest);
            }
            Ok(h) => {
                if let Some(m) = self.up_macs.as_mut() {
                    // The frame's MAC follows its header in the slot.
                    let mac = self.pool.slot(slot, HEADER_LEN, FRAME_MAC_LEN);
                    if m.verify(&bytes, &[], mac).is_err() {
                        self.pool.release(slot);
                        return self.abort(unauthentic_frame(h.kind));
                    }
                }
                self.pool.release(slot);
                self.frame_after_chunks(h);
            }
            Err(e) => {
                self.pool.release(slot);
                self.abort(NodeError::new(ErrorKind::Protocol, format!("bad frame from upstream: {e}")));
            }
        }
    }

    /// A chunk header from upstream is the one expected next and matches the manifest.
    fn check_chunk_header(&self, h: &Header) -> Result<(), (ErrorKind, String)> {
        match self.manifest.chunk(h.seq) {
            _ if h.seq != self.next_recv_seq => Err((
                ErrorKind::Protocol,
                format!("chunk {} arrived while chunk {} was expected", h.seq, self.next_recv_seq),
            )),
            None => Err((ErrorKind::Protocol, format!("chunk {} is past the end", h.seq))),
            Some(c) if h.len != c.len => Err((
                ErrorKind::Protocol,
                format!("chunk {} announces {} bytes, the manifest says {}", h.seq, h.len, c.len),
            )),
            Some(_) => Ok(()),
        }
    }

    /// Chunk `seq` is whole in `slot`: check its digest and hand it to the machine.
    fn chunk_arrived(&mut self, slot: SlotId, seq: u64, announced: u128) {
        let c = self.manifest.chunk(seq).expect("checked on the header");
        let n = c.len as usize;
        self.next_recv_seq = self.route.next_passing(seq + 1, self.manifest.chunk_count());
        // The payload has landed in this slot and nothing writes it now.
        let ok = (!self.digests_known || announced == c.digest)
            && (!self.cfg.verify || digest(self.pool.slot(slot, HEADER_LEN, n)) == announced);
        if let Some(m) = &self.metrics {
            m.bytes_in.inc_by(n as u64);
            if ok {
                m.all.chunks_verified.inc()
            } else {
                m.all.digest_failures.inc()
            };
        }
        if ok {
            self.manifest.set_digest(seq, announced);
            self.events.push_back(Event::ChunkReady { seq, slot });
        } else {
            self.events.push_back(Event::ChunkCorrupt { seq, slot });
        }
    }

    /// A non-chunk frame from upstream: END after the last chunk, or a protocol error.
    fn frame_after_chunks(&mut self, h: Header) {
        let total = self.manifest.chunk_count();
        if h.kind == Kind::End && h.seq == total && self.next_recv_seq == total {
            let mine = self.manifest.digest();
            if h.digest == mine {
                self.end_received = true;
                self.events.push_back(Event::UpstreamEnd);
            } else {
                self.abort(NodeError::new(
                    ErrorKind::DigestMismatch,
                    format!(
                        "manifest digest mismatch: the chunks received add up to manifest {mine:032x}, \
                         the primary announced {:032x}",
                        h.digest
                    ),
                ));
            }
        } else {
            self.abort(NodeError::new(
                ErrorKind::Protocol,
                format!(
                    "unexpected {} frame from upstream (seq {}) after {} of {total} chunks",
                    h.kind.name(),
                    h.seq,
                    self.next_recv_seq
                ),
            ));
        }
    }

    fn pump_up_send(&mut self) -> std::io::Result<()> {
        // Upstream send: the result when there is one, else the newest ack.
        if self.up_sending.is_none()
            && !self.up_gone
            && let Some(up) = self.up
        {
            // Credits first (the sender may be waiting for a slot), then the newest ack, which
            // goes before the result so that upstream's progress reaches 100 %.
            let (item, bytes) = if !self.up_credits.is_empty() {
                let n = self.up_credits.len().min((CTRL_LEN - HEADER_LEN - FRAME_MAC_LEN) / 2);
                let slots: Vec<u16> = self.up_credits.drain(..n).collect();
                let h = Header { kind: Kind::Credit, len: 2 * n as u32, seq: 0, digest: 0 };
                let mut b = h.to_bytes().to_vec();
                wire::encode_credits(&slots, &mut b);
                if let Some(m) = self.up_macs.as_mut() {
                    let mac = m.sign(&b[..HEADER_LEN], &b[HEADER_LEN..]);
                    b.extend_from_slice(&mac);
                }
                (UpItem::Credit, b)
            } else if let Some(through) = self.up_ack.take().filter(|t| *t > self.up_ack_sent) {
                self.up_ack_sent = through;
                let mut b = Header { kind: Kind::Ack, len: 0, seq: through, digest: 0 }.to_bytes().to_vec();
                if let Some(m) = self.up_macs.as_mut() {
                    let mac = m.sign(&b, &[]);
                    b.extend_from_slice(&mac);
                }
                (UpItem::Ack, b)
            } else if let Some(reports) = self.up_result.take() {
                let payload = crate::crypt::seal_frame(
                    self.up_secret.as_ref(),
                    crate::crypt::LABEL_RESULT,
                    wire::encode_reports(&reports),
                );
                let h = Header { kind: Kind::Result, len: payload.len() as u32, seq: 0, digest: 0 };
                let mut b = h.to_bytes().to_vec();
                b.extend_from_slice(&payload);
                (UpItem::Result, b)
            } else {
                return Ok(());
            };
            let len = bytes.len().min(CTRL_LEN);
            // The UpSend area is used by one send at a time, and none is in flight.
            self.pool.ctrl_mut(Ctrl::UpSend, len).copy_from_slice(&bytes[..len]);
            let buf = Buf::Ctrl { area: Ctrl::UpSend, off: 0, len: len as u32 };
            self.pool.submit(&mut self.io, token(T_UP_SEND, 0), OpKind::Send, up, buf)?;
            self.up_sending = Some(item);
        }
        Ok(())
    }

    fn upstream_lost(&mut self, why: String) {
        self.up_gone = true;
        self.up_result = None;
        if self.reported_early {
            // An async push's primary left after this node's early report: expected.
            tracing::debug!("upstream gone after the early report ({why}); the chain goes on");
            return;
        }
        if !matches!(self.end, Some(SessionEnd::Aborted(_))) {
            self.end = Some(SessionEnd::UpstreamLost(why));
        }
        if let Some(down) = self.down {
            // Downstream then drops its staging too.
            crate::sys::shutdown(down);
        }
        self.dn_closed = true;
    }

    /// Downstream broke or reported: stop sending to it, and tell the machine once no send is
    /// in flight (the machine then releases the slots that waited for their forward).
    fn downstream_settled(&mut self, event: Event) {
        if self.dn_deferred.is_some() {
            // Already settled, waiting for the send in flight: the first cause stands (a
            // stalled hop's send then fails with a broken pipe, which is not the news).
            return;
        }
        if let Some(down) = self.down {
            // Wake any op still blocked on the socket; the descriptor stays open until the
            // session's owner closes it.
            crate::sys::shutdown(down);
        }
        self.dn_closed = true;
        self.dn_queue.clear();
        // The machine releases every slot it forwarded from when it hears of `event`.
        self.cut.clear();
        if self.dn_rdma_inflight > 0
            && let Some(link) = &self.dn_rdma
            && let Err(e) = link.ep.flush()
        {
            // The writes then end by the transport's own retries.
            tracing::warn!("cannot flush the RDMA queue pair to {}: {e}", self.downstream_name);
        }
        if self.dn_sending.is_some() || self.dn_rdma_inflight > 0 {
            self.dn_deferred.get_or_insert(event);
        } else {
            self.events.push_back(event);
        }
    }

    /// Tells the machine a cut-through chunk's forward is done once it asked for it and every
    /// piece was sent.
    fn cut_settle(&mut self, i: usize) {
        let c = self.cut[i];
        if c.asked && c.complete && c.pending == 0 {
            self.cut.remove(i);
            self.events.push_back(Event::ForwardDone { seq: c.seq });
        }
    }

    /// Bytes the hop upstream adds after each chunk's payload: an encrypted hop its GCM tag,
    /// an authenticated one its MAC.
    fn tag_len(&self) -> u32 {
        if self.open.is_some() {
            TAG_LEN as u32
        } else if self.up_macs.is_some() {
            FRAME_MAC_LEN as u32
        } else {
            0
        }
    }

    /// Receives the next piece of chunk `seq`'s payload into `slot` after `got` bytes.
    fn recv_piece(&mut self, slot: SlotId, seq: u64, digest: u128, got: u32, len: u32) -> std::io::Result<()> {
        let piece = if self.cut.back().is_some_and(|c| c.seq == seq) { self.cfg.piece_bytes } else { 0 };
        let want = if piece == 0 { len - got } else { piece.min(len - got) };
        // The payload receive completes before the slot goes to the machine, and pieces already
        // queued downstream lie before `got`.
        let buf = Buf::Slot { id: slot, off: HEADER_LEN + got as usize, len: want };
        self.pool.submit(&mut self.io, token(T_UP_RECV, 0), OpKind::Recv, self.up.expect("upstream"), buf)?;
        self.up_recv = UpRecv::Payload(slot, seq, digest, got, want);
        Ok(())
    }

    /// A chunk's bytes are in `slot` (read from a file, or copied from memory): hash them, put
    /// the header in front and hand the chunk to the machine.
    fn read_done(&mut self, seq: u64, slot: SlotId, result: io::Result<usize>) {
        let chunk = self.manifest.chunk(seq).expect("in range");
        match result {
            Ok(n) if n == chunk.len as usize => {
                let payload = self.pool.slot(slot, HEADER_LEN, n);
                // Hashed as it is read: the source is read once, and the digest travels in the
                // chunk's header.
                let d = digest(payload);
                if self.digests_known && d != chunk.digest {
                    self.pool.release(slot);
                    let path = &self.manifest.entries()[chunk.entry].path;
                    let e = NodeError::new(
                        ErrorKind::Source,
                        format!("source {path} changed after it was hashed (chunk {seq} differs)"),
                    );
                    return self.abort(e);
                }
                self.manifest.set_digest(seq, d);
                let h = Header { kind: Kind::Chunk, len: chunk.len, seq, digest: d };
                self.pool.slot_mut(slot, 0, HEADER_LEN).copy_from_slice(&h.to_bytes());
                self.events.push_back(Event::ChunkReady { seq, slot });
            }
            Ok(_) => {
                self.pool.release(slot);
                let path = &self.manifest.entries()[chunk.entry].path;
                let e = NodeError::new(ErrorKind::Source, format!("source {path} shrank while it was pushed"));
                self.abort(e);
            }
            Err(e) => {
                self.pool.release(slot);
                let path = &self.manifest.entries()[chunk.entry].path;
                let e = NodeError::new(ErrorKind::Source, format!("cannot read source file {path}: {e}"));
                self.abort(e);
            }
        }
    }

    /// The downstream deadline: a downstream that takes nothing while chunks wait for it for
    /// `hop_timeout` times the number of nodes after this one. Scaled so that the node nearest
    /// a hung replica gives up on it first: the nodes before it only see backpressure, which
    /// ends as soon as that node lets go. (Upstream has no deadline of its own: a node cut off
    /// by a hung upstream waits until the primary's repair supersedes its session, or the idle
    /// timeout.)
    fn check_hops(&mut self) {
        if self.end.is_some() {
            return;
        }
        let waiting_on_down = self.dn_sending.is_some() || !self.dn_queue.is_empty() || self.dn_rdma_inflight > 0;
        if !waiting_on_down {
            // Only late while this node waits on it (not while it had nothing to send).
            self.dn_progress = Instant::now();
            return;
        }
        let limit = self.cfg.hop_timeout * (self.machine.downstream_nodes().len().max(1) as u32);
        if !self.dn_closed && self.down.is_some() && self.dn_progress.elapsed() >= limit {
            let name = self.downstream_name.clone();
            tracing::warn!("{name} took nothing for {} s: going on without it", limit.as_secs());
            self.downstream_settled(Event::DownstreamLost {
                error: NodeError::new(
                    ErrorKind::Stalled,
                    format!("{name} made no progress for {} s (hung, or its link is down)", limit.as_secs()),
                ),
            });
        }
    }

    fn complete(&mut self, c: Completion) {
        let kind = c.token >> 56;
        let value = c.token & ((1 << 56) - 1);
        if kind == T_DN_SEND || kind == T_DN_RECV || (kind == T_RDMA_POLL && value == 1) {
            self.dn_progress = Instant::now();
        }
        match kind {
            T_UP_RECV => self.up_recv_done(c.result),
            T_READ => {
                let (seq, slot) = (value >> 16, SlotId((value & 0xffff) as u16));
                self.read_done(seq, slot, c.result);
            }
            T_WRITE => {
                let seq = value;
                match c.result {
                    Ok(_) => {
                        // Journaled, so that a failed or interrupted push can be resumed.
                        let c = self.manifest.chunk(seq).expect("in range");
                        let index = seq - self.manifest.entries()[c.entry].first_chunk;
                        let entry = match &self.own {
                            Some((map, _)) => map[c.entry].expect("only this node's entries are written"),
                            None => c.entry,
                        };
                        if let Local::Staging(Some(st)) = &mut self.local {
                            st.record(entry, index, c.digest, c.len);
                        }
                        self.events.push_back(Event::WriteDone { seq });
                    }
                    Err(e) => {
                        let c = self.manifest.chunk(seq).expect("in range");
                        let path = &self.manifest.entries()[c.entry].path;
                        let error = NodeError::io(format!("cannot write {path} in staging"), &e);
                        tracing::warn!(%error, "local write failed; forwarding continues");
                        self.events.push_back(Event::WriteFailed { seq, error });
                    }
                }
            }
            T_DN_SEND => {
                let item = self.dn_sending.take().expect("a send was in flight");
                match c.result {
                    Ok(n) => match item {
                        DnItem::Chunk(seq, _) => {
                            self.count_out(n as u64);
                            if let Some(p) = self.progress {
                                p.sent_chunks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            self.events.push_back(Event::ForwardDone { seq });
                        }
                        DnItem::Piece { seq, .. } => {
                            self.count_out(n as u64);
                            if let Some(i) = self.cut.iter().position(|c| c.seq == seq) {
                                self.cut[i].pending -= 1;
                                self.cut_settle(i);
                            }
                        }
                        DnItem::End => {}
                    },
                    Err(e) => {
                        match item {
                            // The machine hears of the loss right after; the slot is idle now.
                            DnItem::Chunk(seq, _) => self.events.push_back(Event::ForwardDone { seq }),
                            DnItem::Piece { seq, .. } => {
                                if self.cut.iter().any(|c| c.seq == seq && c.asked) {
                                    self.events.push_back(Event::ForwardDone { seq });
                                }
                            }
                            DnItem::End => {}
                        }
                        let name = self.downstream_name.clone();
                        self.downstream_settled(Event::DownstreamLost {
                            error: NodeError::new(
                                ErrorKind::ConnectionLost,
                                format!("connection to {name} lost while sending: {e}"),
                            ),
                        });
                    }
                }
                if let Some(ev) = self.dn_deferred.take() {
                    self.events.push_back(ev);
                }
            }
            T_DN_RECV => self.dn_recv_done(c.result),
            T_RDMA_POLL => match c.result {
                Ok(_) => self.rdma_ready(value as usize),
                // Cancelled while the session winds down.
                Err(_) => self.rdma_polling[value as usize] = false,
            },
            T_UP_SEND => {
                self.up_sending.take().expect("an upstream send was in flight");
                if let Err(e) = c.result {
                    self.upstream_lost(format!("sending to upstream failed: {e}"));
                }
            }
            _ => unreachable!("unknown token kind {kind}"),
        }
    }

    fn up_recv_done(&mut self, result: std::io::Result<usize>) {
        if self.end.is_some() {
            if let UpRecv::Header(slot) | UpRecv::Payload(slot, ..) | UpRecv::Trailer(slot) = self.up_recv {
                self.pool.release(slot);
            }
            self.up_recv = UpRecv::Done;
            return;
        }
        match (self.up_recv, result) {
            (UpRecv::Watch, res) => {
                // Nothing but the socket's end may come here on an RDMA hop.
                self.up_recv = UpRecv::Done;
                match res {
                    Ok(0) if self.end_received => {}
                    Ok(0) => self.upstream_lost("upstream closed the connection before END".into()),
                    Ok(_) => self.abort(NodeError::new(
                        ErrorKind::Protocol,
                        "upstream sent bytes on the control connection of an RDMA hop",
                    )),
                    Err(_) if self.end_received => {}
                    Err(e) => self.upstream_lost(format!("upstream connection failed: {e}")),
                }
            }
            (UpRecv::Header(slot), Ok(n)) if n == HEADER_LEN => {
                let bytes: [u8; HEADER_LEN] = self.pool.slot(slot, 0, HEADER_LEN).try_into().expect("header");
                match Header::decode(&bytes) {
                    Ok(h) if h.kind == Kind::Chunk => {
                        if let Err((kind, message)) = self.check_chunk_header(&h) {
                            self.pool.release(slot);
                            self.up_recv = UpRecv::Done;
                            self.abort(NodeError::new(kind, message));
                            return;
                        }
                        if let Some(n) = self.flip_every
                            && h.seq % n == n - 1
                        {
                            tracing::warn!(seq = h.seq, "test fault: flipping a bit of the forwarded chunk");
                            // Nothing reads the header before the forward queued below; this node
                            // keeps `h` as it came.
                            let header = self.pool.slot_mut(slot, 0, HEADER_LEN);
                            header[HEADER_LEN - 1] ^= 1;
                        }
                        self.up_header = bytes;
                        if self.cfg.piece_bytes > 0
                            && !self.dn_closed
                            && self.dn_rdma.is_none()
                            && self.open.is_none()
                            && self.seal.is_none()
                            && h.len > 0
                            && self.route.onward(h.seq)
                        {
                            self.cut.push_back(CutThrough { seq: h.seq, pending: 0, complete: false, asked: false });
                        }
                        let wire_len = h.len + self.tag_len();
                        if let Err(e) = self.recv_piece(slot, h.seq, h.digest, 0, wire_len) {
                            self.pool.release(slot);
                            self.up_recv = UpRecv::Done;
                            self.abort(NodeError::io("submitting a receive", &e));
                        }
                    }
                    Ok(_) if self.up_macs.is_some() => {
                        // Its MAC follows: taken into the same slot, after the header.
                        self.up_header = bytes;
                        let fd = self.up.expect("replica has upstream");
                        let buf = Buf::Slot { id: slot, off: HEADER_LEN, len: FRAME_MAC_LEN as u32 };
                        match self.pool.submit(&mut self.io, token(T_UP_RECV, 0), OpKind::Recv, fd, buf) {
                            Ok(()) => self.up_recv = UpRecv::Trailer(slot),
                            Err(e) => {
                                self.pool.release(slot);
                                self.up_recv = UpRecv::Done;
                                self.abort(NodeError::io("submitting a receive", &e));
                            }
                        }
                    }
                    Ok(h) => {
                        self.pool.release(slot);
                        self.up_recv = UpRecv::Done;
                        self.frame_after_chunks(h);
                    }
                    Err(e) => {
                        self.pool.release(slot);
                        self.up_recv = UpRecv::Done;
                        self.abort(NodeError::new(ErrorKind::Protocol, format!("bad frame from upstream: {e}")));
                    }
                }
            }
            (UpRecv::Payload(slot, seq, announced, got, want), Ok(n)) => {
                let c = self.manifest.chunk(seq).expect("checked on the header");
                let cutting = self.cut.back().is_some_and(|c| c.seq == seq);
                if n != want as usize {
                    self.pool.release(slot);
                    self.up_recv = UpRecv::Done;
                    self.upstream_lost(format!("upstream closed the connection in the middle of chunk {seq}"));
                    return;
                }
                let now = got + want;
                let wire_len = c.len + self.tag_len();
                // Payload bytes of this receive (not the MAC after them, which is this hop's).
                let payload_end = now.min(c.len);
                if cutting && !self.dn_closed && payload_end > got {
                    // The first piece carries the chunk's header, exactly as it arrived.
                    let (off, len) = if got == 0 {
                        (0, HEADER_LEN as u32 + payload_end)
                    } else {
                        (HEADER_LEN as u32 + got, payload_end - got)
                    };
                    self.dn_queue.push_back(DnItem::Piece { seq, slot, off, len });
                    let ct = self.cut.back_mut().expect("cutting");
                    ct.pending += 1;
                    // Authenticated downstream: complete once its MAC is queued (below).
                    ct.complete = payload_end == c.len && self.dn_macs.is_none();
                }
                if now < wire_len {
                    if let Err(e) = self.recv_piece(slot, seq, announced, now, wire_len) {
                        self.up_recv = UpRecv::Done;
                        self.abort(NodeError::io("submitting a receive", &e));
                    }
                    return;
                }
                self.up_recv = UpRecv::Idle;
                if let Some(open) = self.open.as_mut() {
                    let sealed = self.pool.slot_mut(slot, HEADER_LEN, wire_len as usize);
                    if open.open(&self.up_header, sealed).is_err() {
                        self.pool.release(slot);
                        self.up_recv = UpRecv::Done;
                        return self.abort(NodeError::new(
                            ErrorKind::Unauthorized,
                            format!(
                                "encrypted chunk {seq} from upstream does not authenticate: changed in transit, \
                                 dropped or replayed, or sealed with another key"
                            ),
                        ));
                    }
                } else if let Some(m) = self.up_macs.as_mut() {
                    // The frame's MAC follows the payload.
                    let mac = self.pool.slot(slot, HEADER_LEN + c.len as usize, FRAME_MAC_LEN);
                    if m.verify(&self.up_header, &[], mac).is_err() {
                        self.pool.release(slot);
                        self.up_recv = UpRecv::Done;
                        return self.abort(unauthentic_chunk(seq));
                    }
                }
                if cutting && !self.dn_closed && self.dn_macs.is_some() {
                    // Only now, the chunk's header authentic, does this node vouch for it
                    // downstream: its own MAC goes last (made when sent, in send order).
                    let off = HEADER_LEN as u32 + c.len;
                    self.dn_queue.push_back(DnItem::Piece { seq, slot, off, len: FRAME_MAC_LEN as u32 });
                    let ct = self.cut.back_mut().expect("cutting");
                    ct.pending += 1;
                    ct.complete = true;
                }
                self.chunk_arrived(slot, seq, announced);
            }
            (UpRecv::Trailer(slot), Ok(n)) if n == FRAME_MAC_LEN => {
                self.up_recv = UpRecv::Done;
                let mac = self.pool.slot(slot, HEADER_LEN, FRAME_MAC_LEN);
                let ok = self.up_macs.as_mut().expect("a trailer only on authenticated hops").verify(
                    &self.up_header,
                    &[],
                    mac,
                );
                self.pool.release(slot);
                match Header::decode(&self.up_header) {
                    Ok(h) if ok.is_ok() => self.frame_after_chunks(h),
                    Ok(h) => self.abort(unauthentic_frame(h.kind)),
                    Err(e) => self.abort(NodeError::new(ErrorKind::Protocol, format!("bad frame from upstream: {e}"))),
                }
            }
            (UpRecv::Header(slot) | UpRecv::Payload(slot, ..) | UpRecv::Trailer(slot), res) => {
                self.pool.release(slot);
                self.up_recv = UpRecv::Done;
                let why = match res {
                    Ok(_) => "upstream closed the connection before END".to_owned(),
                    Err(e) => format!("upstream connection failed: {e}"),
                };
                self.upstream_lost(why);
            }
            (state, _) => unreachable!("upstream receive completed in state {state:?}"),
        }
    }

    fn dn_recv_done(&mut self, result: std::io::Result<usize>) {
        let name = self.downstream_name.clone();
        let lost = |what: String| Event::DownstreamLost { error: NodeError::new(ErrorKind::ConnectionLost, what) };
        match (self.dn_recv, result) {
            (_, _) if self.dn_closed => self.dn_recv = DnRecv::Done,
            (DnRecv::Header, Ok(n)) if n == HEADER_LEN => {
                let bytes: [u8; HEADER_LEN] =
                    self.pool.ctrl(Ctrl::DownRecv, HEADER_LEN).try_into().expect("header-sized");
                // Authenticated hop: ACK and CREDIT carry a MAC after their payload.
                let macs = self.dn_macs.is_some();
                let mac_len = |k: Kind| if macs && k != Kind::Result { FRAME_MAC_LEN as u32 } else { 0 };
                match Header::decode(&bytes) {
                    Ok(h) if h.kind == Kind::Ack && self.dn_macs.is_none() => {
                        self.dn_recv = DnRecv::Idle;
                        self.events.push_back(Event::DownstreamAck { through: h.seq });
                    }
                    Ok(h) if h.kind == Kind::Credit && h.len == 0 && self.dn_macs.is_none() => {
                        self.dn_recv = DnRecv::Idle;
                    }
                    Ok(h)
                        if matches!(h.kind, Kind::Result | Kind::Credit | Kind::Ack)
                            && ((h.len + mac_len(h.kind)) as usize) < CTRL_LEN - HEADER_LEN =>
                    {
                        let len = h.len + mac_len(h.kind);
                        // The payload follows the header inside the area.
                        let buf = Buf::Ctrl { area: Ctrl::DownRecv, off: HEADER_LEN, len };
                        let fd = self.down.expect("downstream");
                        match self.pool.submit(&mut self.io, token(T_DN_RECV, 0), OpKind::Recv, fd, buf) {
                            Ok(()) => self.dn_recv = DnRecv::Payload(h.kind, len),
                            Err(e) => {
                                self.dn_recv = DnRecv::Done;
                                self.downstream_settled(lost(format!("{name}: cannot receive its result: {e}")));
                            }
                        }
                    }
                    Ok(h) => {
                        self.dn_recv = DnRecv::Done;
                        self.downstream_settled(lost(format!("{name} sent an unexpected {} frame", h.kind.name())));
                    }
                    Err(e) => {
                        self.dn_recv = DnRecv::Done;
                        self.downstream_settled(lost(format!("{name} sent a bad frame: {e}")));
                    }
                }
            }
            (DnRecv::Payload(kind @ (Kind::Ack | Kind::Credit), len), Ok(n)) if n == len as usize => {
                let bytes = self.pool.ctrl(Ctrl::DownRecv, HEADER_LEN + n);
                let (header, rest) = bytes.split_at(HEADER_LEN);
                let mac_len = if self.dn_macs.is_some() { FRAME_MAC_LEN.min(n) } else { 0 };
                let (payload, mac) = rest.split_at(n - mac_len);
                let authentic = self.dn_macs.as_mut().is_none_or(|m| m.verify(header, payload, mac).is_ok());
                if !authentic {
                    self.dn_recv = DnRecv::Done;
                    let error = NodeError::new(
                        ErrorKind::Unauthorized,
                        format!(
                            "{} from {name} does not authenticate: changed, dropped or replayed in transit, or not \
                             from {name}",
                            kind.name()
                        ),
                    );
                    return self.downstream_settled(Event::DownstreamLost { error });
                }
                if kind == Kind::Ack {
                    let through = u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"));
                    self.dn_recv = DnRecv::Idle;
                    self.events.push_back(Event::DownstreamAck { through });
                    return;
                }
                match (wire::decode_credits(payload), self.dn_rdma.as_mut()) {
                    (Ok(slots), Some(link)) => {
                        link.credits.extend(slots);
                        self.dn_recv = DnRecv::Idle;
                    }
                    (Ok(_), None) => {
                        self.dn_recv = DnRecv::Done;
                        self.downstream_settled(lost(format!("{name} sent CREDIT on a TCP hop")));
                    }
                    (Err(e), _) => {
                        self.dn_recv = DnRecv::Done;
                        self.downstream_settled(lost(format!("{name} sent a bad CREDIT: {e}")));
                    }
                }
            }
            (DnRecv::Payload(_, len), Ok(n)) if n == len as usize => {
                self.dn_recv = DnRecv::Done;
                let bytes = self.pool.ctrl(Ctrl::DownRecv, HEADER_LEN + n);
                let Ok(body) =
                    crate::crypt::open_frame(self.dn_secret.as_ref(), crate::crypt::LABEL_RESULT, &bytes[HEADER_LEN..])
                else {
                    let error = NodeError::new(
                        ErrorKind::Unauthorized,
                        format!("the result from {name} does not authenticate: changed in transit, or not from {name}"),
                    );
                    return self.downstream_settled(Event::DownstreamLost { error });
                };
                match wire::decode_reports(body) {
                    Ok(reports) => self.downstream_settled(Event::DownstreamResult { reports }),
                    Err(e) => self.downstream_settled(lost(format!("{name} sent a bad result: {e}"))),
                }
            }
            (_, res) => {
                self.dn_recv = DnRecv::Done;
                let why = match res {
                    Ok(_) => format!("connection to {name} lost: it closed the connection before reporting"),
                    Err(e) => format!("connection to {name} lost: {e}"),
                };
                self.downstream_settled(lost(why));
            }
        }
    }
}

/// A chunk from an authenticated hop whose MAC does not check out.
fn unauthentic_chunk(seq: u64) -> NodeError {
    NodeError::new(
        ErrorKind::Unauthorized,
        format!(
            "chunk {seq} from upstream does not authenticate: its header (with the digest) was changed in transit, \
             or it was dropped, replayed or reordered, or not sent by the node before this one"
        ),
    )
}

/// A frame from an authenticated hop (END) whose MAC does not check out.
fn unauthentic_frame(kind: Kind) -> NodeError {
    NodeError::new(
        ErrorKind::Unauthorized,
        format!(
            "{} from upstream does not authenticate: changed, dropped or replayed in transit, or not sent by the \
             node before this one",
            kind.name()
        ),
    )
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        if let Some(m) = &self.metrics {
            m.all.pool_slots_in_use.dec_by(self.slots_reported);
        }
        if self.io.in_flight() > 0 {
            for fd in [self.up, self.down].into_iter().flatten() {
                // Ends receives still in flight.
                crate::sys::shutdown(fd);
            }
            if !self.io.drain(self.pool.mem_mut()) {
                // The kernel or a worker may still write into the pool (or read the sealing
                // buffer): its leases stay out, and the pool leaks rather than free them.
                return;
            }
        }
        // The NIC may write into and read from the pool until its queue pairs are gone.
        self.up_rdma = None;
        self.dn_rdma = None;
        self.nic_writes.settle_all(self.pool.mem_mut());
        self.nic_grants.settle_all(self.pool.mem_mut());
        if let Some(cache) = self.pools {
            // A pool with leases still out is not reused (`PoolCache::put`).
            cache.put(self.pool.take());
        }
    }
}

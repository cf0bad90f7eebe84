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
//!
//! The files: this one runs the loop and carries out the machine's actions; [`up`] is the hop
//! upstream, [`down`] the hop downstream, [`rdma`] the RDMA side of both, and [`local`] this
//! node's own reads or writes.
#![deny(unsafe_code)]

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use crate::crypt::{FRAME_MAC_LEN, FrameMacs, TAG_LEN};
use crate::error::{ErrorKind, NodeError};
use crate::manifest::{Manifest, digest};
use crate::pool::{Buf, CTRL_LEN, Ctrl, LANE_CTRL_LEN, LaneArea, Pool, PoolCache, SlotId};
use crate::proto::route::Route;
use crate::proto::{Action, Event, NodeMachine, Role};
use crate::rdma::{DnLink, UpLink, WorkCompletion};
use crate::store::Staging;
use crate::sys::io::{Completion, Io, IoChoice, OpKind};
use crate::wire::{self, HEADER_LEN, Header, Kind, ReplicaReport};

mod coders;
mod compress;
mod config;
mod down;
mod local;
mod rdma;
mod up;

pub(crate) use config::SessionConfig;
use down::{CutThrough, DnItem, Downstream};
use local::LocalSide;
pub use local::MemoryData;
pub(crate) use local::{Local, SourceData};
use up::{UpItem, Upstream};

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
    /// ~100 ms) and the replicas that have not published drop their staging (a version
    /// already published stays).
    pub cancel: std::sync::atomic::AtomicBool,
}

impl Progress {
    /// Whether the caller asked to stop.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Default cut-through piece: 256 KiB is 2 ms on a 1 Gbit/s link, against 34 ms for a whole
/// 4 MiB chunk, and 16 receives and sends per 4 MiB chunk instead of one are cheap.
pub(crate) const DEFAULT_PIECE_BYTES: u32 = 256 << 10;

/// The piece size from `SHARDCAST_PIECE_BYTES` (benchmarks compare it), else the default.
pub(crate) fn piece_bytes_from_env() -> u32 {
    std::env::var("SHARDCAST_PIECE_BYTES").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_PIECE_BYTES)
}

/// How a session ended.
#[derive(Debug)]
pub(crate) enum SessionEnd {
    /// Every node settled: the reports, this node first on a replica.
    Finished(Vec<ReplicaReport>),
    /// This node gave up.
    Aborted(NodeError),
    /// The upstream connection broke (replica only) before this node's RESULT went upstream.
    /// `published`: this node had published its version by then (it stays published: every
    /// chunk was verified and synced); otherwise nothing was.
    UpstreamLost { why: String, published: bool },
}

const T_UP_RECV: u64 = 1;
const T_UP_SEND: u64 = 2;
const T_DN_SEND: u64 = 3;
const T_DN_RECV: u64 = 4;
const T_WRITE: u64 = 5;
const T_READ: u64 = 6;
/// Readiness of an RDMA completion channel; value 2 × lane + 0 upstream, + 1 downstream.
const T_RDMA_POLL: u64 = 7;
/// A coder thread finished a job (readiness of its wake-up socket).
const T_CODER: u64 = 8;
/// The value of END's RDMA write (chunks use their sequence number).
const END_WR: u64 = (1 << 56) - 1;

fn token(kind: u64, value: u64) -> u64 {
    (kind << 56) | value
}

/// One push on one node: the machine, the executor and the pool, and the state of each side
/// of this node (the hop upstream, the hop downstream, the local reads or writes).
pub(crate) struct Session<'a> {
    // Declared before `pool`, so that it drops first; `Drop` drains it explicitly anyway.
    io: Io,
    /// Returned to `pools` in `Drop`; freed, or leaked (by `sys::mem`) when I/O might still
    /// touch it.
    pool: Pool,
    pools: Option<&'a PoolCache>,
    machine: NodeMachine,
    manifest: Manifest,
    /// The hop upstream (none on the primary).
    up: Upstream,
    /// The hop downstream (none on the tail).
    down: Downstream,
    /// Local reads (primary) or writes (replica).
    here: LocalSide,
    cfg: SessionConfig,
    progress: Option<&'a Progress>,
    /// Prometheus counters of a server's session, and the pool slots it last reported in use.
    metrics: Option<crate::metrics::SessionMetrics>,
    slots_reported: i64,
    end: Option<SessionEnd>,
    events: VecDeque<Event>,
    actions: Vec<Action>,
    /// Which chunks this node stores and passes on (everything, for an ordinary push).
    route: Route,
    /// The manifest came with every chunk's digest (a routed push): chunks are checked against
    /// it instead of filling it in.
    digests_known: bool,
    /// Set when a newer push of the same version supersedes this one (replicas).
    superseded: Option<std::sync::Arc<crate::store::Receiving>>,
    /// Compressed pushes: the primary's encoder, a replica's decoder.
    codec: compress::Codec,
}

impl<'a> Session<'a> {
    /// A session for one push. `up`/`down` are connected sockets (none upstream on the
    /// primary, none downstream on the tail); `node` is this node's name in the chain and
    /// `downstream` the names after it. `pool` holds the chunk slots; it goes back to `pools`
    /// (when given) at the end.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
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
        let mut cfg = cfg;
        let parts = std::mem::take(&mut cfg.parts);
        let mut pool = pool;
        let io = Io::new(cfg.io, pool.mem());
        // The slots the hop's negotiation granted upstream are the NIC's until a frame lands
        // (further lanes' grants: in `apply`).
        let mut nic_grants = crate::sys::nic::Grants::default();
        granted_to_nic(&mut pool, &mut nic_grants, up_rdma.as_ref());
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
            up: Upstream::new(up, up_rdma, nic_grants),
            down: Downstream::new(down, downstream_name, dn_rdma),
            here: LocalSide::new(local, bytes_before),
            cfg,
            progress,
            metrics: None,
            slots_reported: 0,
            end: None,
            events: VecDeque::new(),
            actions: Vec::new(),
            route: Route::everything(),
            digests_known: false,
            superseded: None,
            codec: compress::Codec::default(),
        }
        .apply(parts)
    }

    /// Applies the optional parts of the configuration (the route first: it remakes the
    /// machine, which the modes then set).
    fn apply(mut self, parts: config::Parts) -> Self {
        if let Some((route, own)) = parts.route {
            let total = self.manifest.chunk_count();
            let role = if self.up.fd.is_some() { Role::Replica } else { Role::Primary };
            let downstream = self.machine.downstream_nodes().to_vec();
            self.machine = NodeMachine::new(role, self.machine.node(), downstream, total).with_route(route.clone());
            for lane in &mut self.up.lanes {
                lane.next_seq = route.next_passing(0, total);
            }
            self.here.next_read = route.next_passing(0, total);
            self.route = route;
            self.digests_known = true;
            self.here.own = own;
        }
        if parts.early_report {
            self.machine.set_report_early();
        }
        if parts.stop_on_loss {
            self.machine.set_stop_on_loss();
        }
        if parts.seal.is_some() {
            let lanes = 1 + parts.dn_lanes.len();
            self.pool.set_seal_len(HEADER_LEN + self.manifest.chunk_size() as usize + TAG_LEN, lanes);
        }
        self.up.expected = {
            let total = self.manifest.chunk_count();
            (0..total).filter(|&q| self.route.passes(q)).count() as u64
        };
        let (opens, seals) = (parts.open.is_some(), parts.seal.is_some());
        if let Some(lane) = self.up.lanes.first_mut() {
            lane.macs = parts.up_secret.as_ref().map(FrameMacs::downstream_end);
            lane.open = parts.open;
        }
        if let Some(lane) = self.down.lanes.first_mut() {
            lane.macs = parts.dn_secret.as_ref().map(FrameMacs::upstream_end);
            lane.seal = parts.seal;
        }
        // Further lanes, each with its own handshake's secret, so its own MACs and, on an
        // encrypted hop, its own keys (an encrypted push is authenticated: every lane has one).
        let next_seq = self.up.lanes.first().map_or(0, |l| l.next_seq);
        let mut keyless = false;
        let (mut up_links, mut dn_links) = (parts.up_links.into_iter(), parts.dn_links.into_iter());
        for (fd, secret) in parts.up_lanes {
            let link = up_links.next().flatten();
            granted_to_nic(&mut self.pool, &mut self.up.nic_grants, link.as_ref());
            let mut lane = up::UpLane::new(fd, link);
            lane.next_seq = next_seq;
            lane.macs = secret.as_ref().map(FrameMacs::downstream_end);
            lane.open = secret.as_ref().filter(|_| opens).map(crate::crypt::Opener::new);
            keyless |= opens && secret.is_none();
            self.up.lanes.push(lane);
        }
        for (fd, secret) in parts.dn_lanes {
            let mut lane = down::DnLane::new(fd, dn_links.next().flatten());
            lane.macs = secret.as_ref().map(FrameMacs::upstream_end);
            lane.seal = secret.as_ref().filter(|_| seals).map(crate::crypt::Sealer::new);
            keyless |= seals && secret.is_none();
            self.down.lanes.push(lane);
        }
        if keyless {
            // Never send or take a lane's chunks in the clear on an encrypted push.
            self.abort(NodeError::new(
                ErrorKind::Unauthorized,
                "a lane of an encrypted hop has no secret to seal with",
            ));
        }
        self.up.secret = parts.up_secret;
        self.down.secret = parts.dn_secret;
        self.superseded = parts.superseded;
        self.here.prefill = parts.prefill;
        self.metrics = parts.metrics;
        let chunk = self.manifest.chunk_size();
        let primary = self.up.fd.is_none();
        if primary && (parts.compress.is_some() || parts.deltas.is_some()) {
            let count = coders::coder_count();
            let level = parts.compress.and_then(|(_, l)| l);
            match coders::Coders::new(count, level, chunk) {
                Ok(c) => {
                    self.codec.coders = Some(c);
                    self.codec.policy = parts.compress.and_then(|(m, l)| crate::compress::Policy::new(m, l, count));
                }
                Err(e) => tracing::warn!("cannot set up the coder threads ({e}): chunks go whole and uncompressed"),
            }
        }
        if let Some(bases) = parts.deltas {
            self.codec.bases = Some(bases.into_iter().map(|b| (b.seq, b)).collect());
        }
        self.codec.compressed = parts.decompress;
        if parts.decompress || self.codec.bases.is_some() && !primary {
            match crate::compress::Decoder::new(chunk) {
                Ok(dec) => self.codec.dec = Some(dec),
                Err(e) => {
                    self.end =
                        Some(SessionEnd::Aborted(NodeError::new(ErrorKind::Io, format!("cannot set up zstd: {e}"))))
                }
            }
        }
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
    pub(crate) fn io_name(&self) -> &'static str {
        self.io.name()
    }

    /// Whether the pool is pinned.
    pub(crate) fn pool_locked(&self) -> bool {
        self.pool.is_locked()
    }

    /// Runs the push to its end.
    pub(crate) fn run(mut self) -> SessionEnd {
        self.drive()
    }

    /// Runs the push to its end and returns, with the end, the manifest as this node knows it
    /// then: on the primary of an ordinary push, the digest of every chunk it read (zero for
    /// chunks it never read), which a repair of the push must keep to.
    pub(crate) fn run_keeping_manifest(mut self) -> (SessionEnd, Manifest, crate::compress::CodedBytes, Vec<u64>) {
        let end = self.drive();
        let coded = self.codec.coded;
        let lanes = self.down.lanes.iter().map(|l| l.chunks).collect();
        (end, self.manifest.clone(), coded, lanes)
    }

    /// Queues chunk `seq` (whole, from `slot`) for downstream: one lane takes it; with several,
    /// a relay sends it on the lane it came on, the primary on the first lane with room.
    fn forward(&mut self, seq: u64, slot: SlotId, lane: Option<usize>) {
        let lanes = self.down.lanes.len();
        if lanes > 1 && self.up.fd.is_none() {
            // Taken by the next lane whose send completes (`next_for_lane`).
            self.down.shared.push_back(DnItem::Chunk(seq, slot));
            return;
        }
        let lane = lane.unwrap_or(0) % lanes;
        self.down.lanes[lane].count_chunk(self.metrics.as_ref(), lane);
        self.down.lanes[lane].queue.push_back(DnItem::Chunk(seq, slot));
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
            if self.here.syncing.is_some() {
                if self.sync_done(false) {
                    self.process();
                    continue;
                }
                // This node's own disk is at work: not idle, up to the sync timeout.
                last_progress = Instant::now();
                if self.here.sync_started.elapsed() >= self.cfg.sync_timeout {
                    self.sync_overdue();
                    continue;
                }
            }
            if let Some(end) = self.finished() {
                // Ended while the staging area was being synced (an abort): it comes back first,
                // so that what it journaled is kept as the session's owner expects.
                self.sync_done(true);
                if let Some(s) = self.down.fd.and_then(crate::sys::tcpinfo::tcp_stats) {
                    tracing::debug!(
                        to = %self.down.name,
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
            // Short slices when a caller watches (and may cancel) the push, or a newer push of
            // the same version may supersede it: a repair re-forming the chain waits at each
            // relay in turn for the old session to see that (20 ms, not 100: at N = 4 that was
            // ~0.3 s of a rail failure's repair; an idle session waking 50 times a second costs
            // nothing measurable).
            let slice = self.cfg.idle_timeout.min(self.cfg.hop_timeout).min(
                if self.progress.is_some() || self.superseded.is_some() {
                    Duration::from_millis(20)
                } else {
                    Duration::from_secs(1)
                },
            );
            // A hop of several lanes looks at its lanes' acknowledgements that often
            // (`check_lanes`), also while nothing completes.
            let slice = if self.down.watches_lanes() { slice.min(crate::proto::stall::LANE_LOOK_EVERY) } else { slice };
            // Upstream hears this node is alive after END (`keepalive_due`); a sync's end is
            // looked for every 2 ms.
            let slice = if self.up.end_received { slice.min(up::KEEPALIVE_EVERY) } else { slice };
            let slice = if self.here.syncing.is_some() { slice.min(Duration::from_millis(2)) } else { slice };
            let slice = self.coder_slice(slice);
            if let Err(e) = self.io.wait(self.pool.mem_mut(), &mut completions, slice) {
                self.end = Some(SessionEnd::Aborted(NodeError::io("waiting for I/O", &e)));
                continue;
            }
            if completions.is_empty() {
                if last_progress.elapsed() >= self.cfg.idle_timeout {
                    self.idle_too_long();
                    last_progress = Instant::now();
                }
                continue;
            }
            // This node's own keepalive going out is no news from anyone.
            if completions
                .iter()
                .any(|c| !(c.token == token(T_UP_SEND, 0) && self.up.sending == Some(UpItem::Keepalive)))
            {
                last_progress = Instant::now();
            }
            for c in completions.drain(..) {
                self.complete(c);
            }
            self.process();
            self.report_pool_use();
        }
    }

    /// Nothing happened for the idle timeout. Once this node has handed END downstream, only
    /// the nodes after it are left to answer: the next node is given up on (reported stalled,
    /// this node's own outcome stands, a published version stays published). Before that, the
    /// push is stuck here or upstream, and this node gives up on it.
    fn idle_too_long(&mut self) {
        let idle = self.cfg.idle_timeout;
        if self.down.end_queued && !self.down.closed && self.down.fd.is_some() {
            let name = self.down.name.clone();
            tracing::warn!("{name} sent nothing for {} s after END: going on without it", idle.as_secs());
            let error = crate::proto::stall::Stalled { limit: idle }.error(&name);
            self.downstream_settled(Event::DownstreamLost { error });
        } else {
            self.end = Some(SessionEnd::Aborted(NodeError::new(
                ErrorKind::Stalled,
                format!("no progress for {} s", idle.as_secs()),
            )));
        }
    }

    /// The session is over once an end is set and the reports (if any) went upstream.
    fn finished(&mut self) -> Option<SessionEnd> {
        self.end.as_ref()?;
        if !self.up.gone && (self.up.result.is_some() || self.up.sending == Some(UpItem::Result)) {
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
                let lane = self.up.lane_of.remove(&seq);
                if let Some(i) = self.down.cut.iter().position(|c| c.seq == seq) {
                    // Its pieces went (or are going) downstream as they arrived.
                    self.down.cut[i].asked = true;
                    self.cut_settle(i);
                } else if !self.down.closed {
                    self.forward(seq, slot, lane);
                }
                // With downstream closed, the machine releases the slot when it hears so.
            }
            Action::SendEnd if self.down.lanes.len() > 1 && self.up.fd.is_none() => {
                self.down.end_queued = true;
                self.down.shared.push_back(DnItem::End)
            }
            Action::SendEnd => {
                self.down.end_queued = true;
                self.down.lanes[0].queue.push_back(DnItem::End)
            }
            Action::Write { seq, slot } => self.write_chunk(seq, slot),
            Action::Release { slot } => {
                self.pool.release(slot);
                // RDMA upstream: a freed slot is granted to a lane again (`grant_rdma_slots`).
                self.grant_rdma_slots();
            }
            Action::AckUpstream { through } => self.acked(through),
            Action::Sync => {
                tracing::debug!("every chunk written here: syncing");
                self.sync()
            }
            Action::Publish => self.publish(),
            Action::Finish { reports } => {
                tracing::debug!("every report in: the result goes upstream");
                if self.up.fd.is_some() {
                    self.up.result = Some(reports.clone());
                }
                self.end = Some(SessionEnd::Finished(reports));
            }
            Action::ReportEarly { reports } => {
                // Upstream (the primary of an async push) goes away after this; the rest of
                // the chain completes on its own.
                if self.up.fd.is_some() {
                    self.up.result = Some(reports);
                    self.up.reported_early = true;
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
        if !self.up.gone {
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
            self.up.result = Some(reports);
        }
        self.down.shutdown();
        self.down.closed = true;
        self.down.clear_queues();
        self.down.cut.clear();
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
        self.pump_up_recv()?;
        self.pump_reads()?;
        self.pump_coders()?;
        self.pump_down()
    }

    fn complete(&mut self, c: Completion) {
        let kind = c.token >> 56;
        let value = c.token & ((1 << 56) - 1);
        if kind == T_DN_SEND || kind == T_DN_RECV || (kind == T_RDMA_POLL && value & 1 == 1) {
            self.down.progress.progress(Instant::now());
        }
        match kind {
            T_UP_RECV => self.up_recv_done(value as usize, c.result),
            T_READ => {
                let (seq, slot) = (value >> 16, SlotId((value & 0xffff) as u16));
                self.read_done(seq, slot, c.result);
            }
            T_WRITE => self.write_done(value, c.result),
            T_DN_SEND => self.dn_send_done(value as usize, c.result),
            T_DN_RECV if value == 0 => self.dn_recv_done(c.result),
            T_DN_RECV => self.dn_lane_recv_done(value as usize, c.result),
            T_RDMA_POLL => {
                let (lane, side) = ((value >> 1) as usize, value & 1);
                match side {
                    0 => self.up.lanes[lane].polling = false,
                    _ => self.down.lanes[lane].polling = false,
                }
                // An error: cancelled while the session winds down.
                if c.result.is_ok() {
                    self.rdma_ready(lane, side == 1);
                }
            }
            T_CODER => match c.result {
                Ok(_) => self.coders_done(),
                // Cancelled while the session winds down.
                Err(_) => self.codec.coders.iter_mut().for_each(|c| c.polling = false),
            },
            T_UP_SEND if value > 0 => {
                self.up.lanes[value as usize].credit_sending = false;
                if let Err(e) = c.result {
                    self.upstream_lost(format!("sending credits on lane {value} to upstream failed: {e}"));
                }
            }
            T_UP_SEND => {
                self.up.sending.take().expect("an upstream send was in flight");
                if let Err(e) = c.result {
                    self.upstream_lost(format!("sending to upstream failed: {e}"));
                }
            }
            _ => unreachable!("unknown token kind {kind}"),
        }
    }
}

/// Hands the slots an RDMA lane's negotiation granted upstream (`link`'s) to the NIC, until a
/// frame lands in each.
fn granted_to_nic(pool: &mut Pool, grants: &mut crate::sys::nic::Grants, link: Option<&UpLink>) {
    for &s in link.map_or(&[][..], |l| &l.granted[..]) {
        let span = pool.span(Buf::Slot { id: s, off: 0, len: pool.slot_size() as u32 });
        grants.granted(pool.mem_mut(), s.0, span);
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        if let Some(m) = &self.metrics {
            m.all.pool_slots_in_use.dec_by(self.slots_reported);
        }
        if self.io.in_flight() > 0 {
            let lanes = self.up.lanes.iter().map(|l| l.fd).chain(self.down.lanes.iter().map(|l| l.fd));
            for fd in lanes {
                // Ends receives still in flight.
                crate::sys::shutdown(fd);
            }
            // Staging writes that complete now are journaled all the same: the chunk was
            // verified before its write, and a resume (the repair of this chain, above all)
            // then does not send it again.
            let mut written = Vec::new();
            let drained = self.io.drain(self.pool.mem_mut(), |c| {
                if c.token >> 56 == T_WRITE && c.result.is_ok() {
                    written.push(c.token & ((1 << 56) - 1));
                }
            });
            for seq in written {
                self.journal_write(seq);
            }
            if !drained {
                // The kernel or a worker may still write into the pool (or read the sealing
                // buffer): its leases stay out, and the pool leaks rather than free them.
                return;
            }
        }
        // The NIC may write into and read from the pool until its queue pairs are gone.
        self.up.lanes.iter_mut().for_each(|l| l.rdma = None);
        self.down.lanes.iter_mut().for_each(|l| l.rdma = None);
        self.down.nic_writes.settle_all(self.pool.mem_mut());
        self.up.nic_grants.settle_all(self.pool.mem_mut());
        if let Some(cache) = self.pools {
            // A pool with leases still out is not reused (`PoolCache::put`).
            cache.put(self.pool.take());
        }
    }
}

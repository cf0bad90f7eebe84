//! The hop downstream: forwarding chunk frames (whole, sealed, or cut through in pieces) and
//! END, receiving acks, credits and the result, and the hop's stall deadline.

use super::*;

/// What the receive from downstream in flight is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DnRecv {
    Idle,
    Header,
    /// The payload of a frame of `kind` (RESULT, ACK or CREDIT), `len` bytes (with its MAC).
    Payload {
        kind: Kind,
        len: u32,
    },
    Done,
}

/// A frame (or part of one) queued for downstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DnItem {
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
pub(super) struct CutThrough {
    pub(super) seq: u64,
    /// Pieces queued or in flight downstream.
    pub(super) pending: u32,
    /// Every piece was queued (the whole chunk arrived).
    pub(super) complete: bool,
    /// The machine asked for the chunk's forward: it hears `ForwardDone` once no piece is
    /// pending.
    pub(super) asked: bool,
    /// The lane downstream its pieces go on (the lane it came on).
    pub(super) lane: usize,
}

/// One lane of the hop downstream: its connection, the frames queued for it, the send in
/// flight on it.
#[derive(Debug)]
pub(super) struct DnLane {
    pub(super) fd: RawFd,
    pub(super) queue: VecDeque<DnItem>,
    pub(super) sending: Option<DnItem>,
    /// Authenticated hop: the MACs of the frames on this lane (lane 0: to and from
    /// downstream); each lane has its own handshake and secret.
    pub(super) macs: Option<FrameMacs>,
    /// Encrypted hop: seals each chunk sent on this lane (under this lane's secret), in the
    /// lane's sealing buffer (sends go one at a time on a lane).
    pub(super) seal: Option<crate::crypt::Sealer>,
    /// Chunks sent (or being cut through) on this lane.
    pub(super) chunks: u64,
    /// The lane's queue pair, when this lane negotiated RDMA (each lane does on its own).
    pub(super) rdma: Option<DnLink>,
    /// RDMA lane: a readiness poll is in flight on its completion channel.
    pub(super) polling: bool,
    /// Lanes 1..R of RDMA: the receive of CREDIT frames on the lane's connection (lane 0's
    /// is `Downstream::recv`).
    pub(super) recv: DnRecv,
    /// Whether what this lane's connection sent goes unacknowledged (its link down).
    pub(super) acks: crate::proto::stall::LaneAcks,
    /// What this lane was handed and drained (the primary's lanes take chunks by it).
    pub(super) meter: crate::proto::lanes::LaneMeter,
    /// RDMA lane: bytes of its writes that completed (what its peer took, as TCP's
    /// acknowledged bytes are for a TCP lane).
    pub(super) written: u64,
}

impl DnLane {
    pub(super) fn new(fd: RawFd, rdma: Option<DnLink>) -> Self {
        let recv = if rdma.is_some() { DnRecv::Idle } else { DnRecv::Done };
        Self {
            fd,
            queue: VecDeque::new(),
            sending: None,
            macs: None,
            seal: None,
            chunks: 0,
            rdma,
            polling: false,
            recv,
            acks: crate::proto::stall::LaneAcks::default(),
            meter: crate::proto::lanes::LaneMeter::default(),
            written: 0,
        }
    }

    /// Counts a chunk that goes on this lane (`lane`, its index).
    pub(super) fn count_chunk(&mut self, metrics: Option<&crate::metrics::SessionMetrics>, lane: usize) {
        self.chunks += 1;
        if let Some(m) = metrics {
            m.lane_chunks("out", lane).inc();
        }
    }
}

/// The hop downstream: chunk frames forwarded to it (whole, or cut through in pieces), END,
/// and its acks, credits and result.
#[derive(Debug)]
pub(super) struct Downstream {
    /// The socket (none on the tail).
    pub(super) fd: Option<RawFd>,
    /// The next node's name (for messages).
    pub(super) name: String,
    /// The hop's lanes: lane 0 is `fd`, which also carries END and the answers; the others
    /// carry chunks only.
    pub(super) lanes: Vec<DnLane>,
    /// The primary with several lanes: chunks no lane took yet, in order; each lane takes the
    /// next one when its send completes, so a slower lane takes fewer (back-pressure).
    pub(super) shared: VecDeque<DnItem>,
    /// The lane offered the next chunk of `shared` first (the one after the lane that took the
    /// last), so that chunks ready one at a time (from the coders) still spread over the lanes.
    pub(super) next_lane: usize,
    /// Chunks being cut through, oldest first (relays only).
    pub(super) cut: VecDeque<CutThrough>,
    /// RDMA writes posted downstream (on every lane) and not completed.
    pub(super) rdma_inflight: usize,
    /// Those writes' bytes, held for the NIC until each completes.
    pub(super) nic_writes: crate::sys::nic::Writes,
    pub(super) recv: DnRecv,
    /// An event about downstream that waits for the send in flight to complete.
    pub(super) deferred: Option<Event>,
    /// END was queued for downstream: every chunk went (or goes) before it, and only the
    /// nodes after this one are left to answer.
    pub(super) end_queued: bool,
    pub(super) closed: bool,
    /// When downstream last took or answered something (while this node waited on it).
    pub(super) progress: crate::proto::stall::HopStall,
    /// When the lanes' acknowledgements were last looked at (a hop of several lanes).
    pub(super) acks_looked: Instant,
    /// Authenticated hop: its session secret (the RESULT from there must carry a MAC).
    pub(super) secret: Option<crate::crypt::SessionSecret>,
    /// A relay takes no new frame from upstream while this many bytes it received wait to be
    /// handed to the socket downstream (`relay_backlog_full`; 0: no bound).
    pub(super) backlog_limit: u64,
    /// Test-only fault (debug builds, `SHARDCAST_TEST_FLIP_FORWARD=N`): this relay flips a bit
    /// of the digest in the header of every Nth chunk it forwards, so the next node sees a
    /// chunk whose bytes do not match. Release builds never set it.
    pub(super) flip_every: Option<u64>,
}

impl Downstream {
    pub(super) fn new(fd: Option<RawFd>, name: String, rdma: Option<DnLink>) -> Self {
        Self {
            fd,
            name,
            lanes: fd.map(|fd| DnLane::new(fd, rdma)).into_iter().collect(),
            shared: VecDeque::new(),
            next_lane: 0,
            cut: VecDeque::new(),
            rdma_inflight: 0,
            nic_writes: crate::sys::nic::Writes::default(),
            recv: if fd.is_some() { DnRecv::Idle } else { DnRecv::Done },
            deferred: None,
            end_queued: false,
            closed: fd.is_none(),
            progress: crate::proto::stall::HopStall::new(Instant::now()),
            acks_looked: Instant::now(),
            secret: None,
            backlog_limit: relay_backlog_from_env(),
            flip_every: if cfg!(debug_assertions) {
                std::env::var("SHARDCAST_TEST_FLIP_FORWARD").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0)
            } else {
                None
            },
        }
    }
}

/// The most a relay queues for downstream before it stops taking frames from upstream (0: no
/// bound). Without a bound a relay whose downstream runs slower for a while takes its upstream's
/// chunks as fast as they come, into every free slot of its pool (64 MiB: half a second at
/// 1 Gbit/s), and that backlog drains only after upstream has finished: each hop of a chain then
/// ends later than the one before it. Bounded, upstream sees backpressure at once, as through
/// `nc | tee` relays; the gate is at frame boundaries, kernel socket buffers come on top.
/// Off by default: `push --mode async` counts on the relays absorbing a push that fits in their
/// pools (the first replica publishes while a later one is slow or stopped), and the effect on a
/// chain's time could not be measured yet (BENCHMARKS.md, "Where a chain's time goes").
pub(crate) const DEFAULT_RELAY_BACKLOG_BYTES: u64 = 0;

/// The relay backlog bound: `SHARDCAST_RELAY_BACKLOG_BYTES` (a benchmark-only switch, e.g.
/// 2097152), else [`DEFAULT_RELAY_BACKLOG_BYTES`].
fn relay_backlog_from_env() -> u64 {
    std::env::var("SHARDCAST_RELAY_BACKLOG_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_RELAY_BACKLOG_BYTES)
}

impl Downstream {
    /// Whether this hop's lanes are watched for a link gone down ([`Session::check_lanes`]): a
    /// hop of several lanes, still open.
    pub(super) fn watches_lanes(&self) -> bool {
        self.lanes.len() > 1 && !self.closed
    }

    /// Whether any lane of the hop downstream runs RDMA.
    pub(super) fn rdma(&self) -> bool {
        self.lanes.iter().any(|l| l.rdma.is_some())
    }

    /// Whether a send is in flight on any lane.
    pub(super) fn sending(&self) -> bool {
        self.lanes.iter().any(|l| l.sending.is_some())
    }

    /// Whether frames wait for any lane.
    pub(super) fn queued(&self) -> bool {
        !self.shared.is_empty() || self.lanes.iter().any(|l| !l.queue.is_empty())
    }

    /// Drops every frame queued for downstream.
    pub(super) fn clear_queues(&mut self) {
        self.shared.clear();
        for l in &mut self.lanes {
            l.queue.clear();
        }
    }

    /// Shuts every lane's connection (wakes any op blocked on one).
    pub(super) fn shutdown(&self) {
        for l in &self.lanes {
            crate::sys::shutdown(l.fd);
        }
    }

    /// Lane 0's MACs (END and the answers travel there).
    pub(super) fn macs(&mut self) -> Option<&mut FrameMacs> {
        self.lanes.first_mut().and_then(|l| l.macs.as_mut())
    }

    /// Whether the hop downstream is authenticated.
    pub(super) fn authenticated(&self) -> bool {
        self.lanes.first().is_some_and(|l| l.macs.is_some())
    }

    /// Whether the hop downstream is encrypted (every lane seals its chunks).
    pub(super) fn sealed(&self) -> bool {
        self.lanes.first().is_some_and(|l| l.seal.is_some())
    }
}

impl Session<'_> {
    /// Whether this relay already holds `backlog_limit` bytes for downstream that no send has
    /// taken yet: then it takes no new frame from upstream (`pump_up_recv`) until sends drain it.
    pub(super) fn relay_backlog_full(&self) -> bool {
        let limit = self.down.backlog_limit;
        if limit == 0 || self.down.fd.is_none() || self.down.closed {
            return false;
        }
        let mut bytes = 0;
        for item in self.down.lanes.iter().flat_map(|l| l.queue.iter()) {
            bytes += match *item {
                DnItem::Chunk(_, slot) => u64::from(self.frame_len(slot)),
                DnItem::Piece { len, .. } => u64::from(len),
                DnItem::End => 0,
            };
            if bytes >= limit {
                return true;
            }
        }
        false
    }

    /// The send downstream in flight completed (or failed).
    pub(super) fn dn_send_done(&mut self, lane: usize, result: std::io::Result<usize>) {
        let item = self.down.lanes[lane].sending.take().expect("a send was in flight");
        match result {
            Ok(n) => match item {
                DnItem::Chunk(seq, _) => {
                    self.count_out(n as u64);
                    if let (Some(enc), Some(t)) = (self.codec.policy.as_mut(), self.codec.send_started.take()) {
                        // A send's duration says how fast the link drains only while the socket
                        // buffer stays full; the kernel's delivery rate (from the ACKs) says it
                        // always, so it wins where there is one.
                        // Lanes share the link alike (the primary balances them): this lane's
                        // rate times their number.
                        let lanes = self.down.lanes.len() as u64;
                        match crate::sys::tcpinfo::tcp_stats(self.down.lanes[lane].fd) {
                            Some(s) if s.delivery_rate > 0 => enc.link_delivery_rate(s.delivery_rate * lanes),
                            _ => enc.link_sent(t.elapsed(), n),
                        }
                    }
                    if let Some(p) = self.progress {
                        p.sent_chunks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    self.events.push_back(Event::ForwardDone { seq });
                }
                DnItem::Piece { seq, .. } => {
                    self.count_out(n as u64);
                    if let Some(i) = self.down.cut.iter().position(|c| c.seq == seq) {
                        self.down.cut[i].pending -= 1;
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
                        if self.down.cut.iter().any(|c| c.seq == seq && c.asked) {
                            self.events.push_back(Event::ForwardDone { seq });
                        }
                    }
                    DnItem::End => {}
                }
                let name = self.down.name.clone();
                self.downstream_settled(Event::DownstreamLost {
                    error: NodeError::new(
                        ErrorKind::ConnectionLost,
                        format!("connection to {name} lost while sending: {e}"),
                    ),
                });
            }
        }
        if !self.down.sending()
            && let Some(ev) = self.down.deferred.take()
        {
            self.events.push_back(ev);
        }
    }

    /// Submits what can go downstream now (RDMA writes, or the next send), and the receive of
    /// its next ACK / CREDIT / RESULT.
    pub(super) fn pump_down(&mut self) -> std::io::Result<()> {
        // RDMA lanes downstream: a write per granted slot, several in flight.
        if self.down.rdma() {
            self.pump_rdma_writes();
        }
        // TCP lanes downstream: one send at a time on each lane keeps its stream in order.
        let (n, first) = (self.down.lanes.len(), self.down.next_lane);
        for lane in (0..n).map(|i| (first + i) % n) {
            if self.down.closed || self.down.lanes[lane].sending.is_some() || self.down.lanes[lane].rdma.is_some() {
                continue;
            }
            let Some(item) = self.next_for_lane(lane) else { continue };
            self.send_down(lane, item)?;
        }
        // Further RDMA lanes: their CREDIT frames come on their own connections.
        for lane in 1..n {
            if self.down.lanes[lane].recv == DnRecv::Idle && !self.down.closed {
                let (fd, k) = (self.down.lanes[lane].fd, lane as u8);
                let buf = Buf::Lane { lane: k, area: LaneArea::DownRecv, off: 0, len: HEADER_LEN as u32 };
                self.pool.submit(&mut self.io, token(T_DN_RECV, lane as u64), OpKind::Recv, fd, buf)?;
                self.down.lanes[lane].recv = DnRecv::Header;
            }
        }
        // Downstream receive: ACK / RESULT headers.
        if self.down.recv == DnRecv::Idle && !self.down.closed {
            let fd = self.down.fd.expect("downstream open");
            let buf = Buf::Ctrl { area: Ctrl::DownRecv, off: 0, len: HEADER_LEN as u32 };
            self.pool.submit(&mut self.io, token(T_DN_RECV, 0), OpKind::Recv, fd, buf)?;
            self.down.recv = DnRecv::Header;
        }
        Ok(())
    }

    /// The next frame lane `lane` sends: its own queue's, else (the primary with several lanes)
    /// the next chunk no lane took yet; END goes on lane 0 once every chunk was taken.
    pub(super) fn next_for_lane(&mut self, lane: usize) -> Option<DnItem> {
        if let Some(item) = self.down.lanes[lane].queue.pop_front() {
            return Some(item);
        }
        match self.down.shared.front()? {
            DnItem::End if lane != 0 => None,
            DnItem::End => self.down.shared.pop_front(),
            _ if self.leaves_to_others(lane) => None,
            _ => {
                let item = self.down.shared.pop_front();
                self.down.next_lane = (lane + 1) % self.down.lanes.len();
                self.down.lanes[lane].count_chunk(self.metrics.as_ref(), lane);
                item
            }
        }
    }

    /// Whether lane `lane` of the primary's hop leaves the next untaken chunk to the other
    /// lanes: near the end of a push, a lane that would finish it after they finished everything
    /// left (`proto::lanes::leaves_to_others`, by each lane's bytes queued and taken: a TCP
    /// lane's acknowledged bytes, an RDMA lane's completed writes). Another lane's send or
    /// write completing asks this lane again.
    fn leaves_to_others(&self, lane: usize) -> bool {
        let lanes = &self.down.lanes;
        let Some(&DnItem::Chunk(seq, slot)) = self.down.shared.front() else { return false };
        if lanes.len() < 2 {
            return false;
        }
        let now = Instant::now();
        let mut loads = Vec::with_capacity(lanes.len());
        for l in lanes {
            let taken = match l.rdma {
                Some(_) => l.written,
                None => match crate::sys::tcpinfo::ack_state(l.fd) {
                    Some(acks) => acks.bytes_acked,
                    None => return false,
                },
            };
            loads.push(l.meter.load(now, taken));
        }
        let chunk = HEADER_LEN as u64 + u64::from(self.frame_len(slot));
        // What is left to send: this chunk and every one after it (the primary reads only a
        // few ahead, so `shared` alone says little), at most the push's bytes; a routed push
        // sends fewer, and counting them all only makes a lane take a chunk sooner.
        let m = &self.manifest;
        let left = m
            .chunk_count()
            .saturating_sub(seq)
            .saturating_mul(u64::from(m.chunk_size()))
            .min(m.total_bytes())
            .max(chunk);
        crate::proto::lanes::leaves_to_others(lane, &loads, chunk, left)
    }

    /// Submits the send of `item` on lane `lane`.
    fn send_down(&mut self, lane: usize, item: DnItem) -> std::io::Result<()> {
        let buf = match item {
            DnItem::Chunk(_, slot) if self.down.sealed() => {
                let len = HEADER_LEN + self.frame_len(slot) as usize;
                // The slot holds the whole frame (its payload is checked or read, and
                // nothing writes it while it waits to be forwarded). The lane's sealing buffer
                // is free: its previous send completed (one send at a time on a lane), and the
                // pool keeps it untouched while a send from it is in flight.
                let k = lane as u8;
                self.pool.copy_to_seal(slot, k, len);
                let seal = self.down.lanes[lane].seal.as_mut().expect("every lane of a sealed hop seals");
                seal.seal(self.pool.seal_mut(k, len + TAG_LEN), HEADER_LEN, len);
                Buf::Seal { lane: k, len: (len + TAG_LEN) as u32 }
            }
            DnItem::Chunk(seq, slot) => {
                let mac = self.mac_chunk(lane, seq, slot);
                if self.codec.policy.is_some() {
                    self.codec.send_started = Some(Instant::now());
                }
                Buf::Slot { id: slot, off: 0, len: HEADER_LEN as u32 + self.frame_len(slot) + mac }
            }
            DnItem::Piece { seq, slot, off, len } => {
                // The last piece of a cut-through chunk on an authenticated hop is its MAC,
                // queued once the chunk from upstream authenticated; made now, in send order.
                if off == HEADER_LEN as u32 + self.frame_len(slot) && len == FRAME_MAC_LEN as u32 {
                    self.mac_chunk(lane, seq, slot);
                }
                Buf::Slot { id: slot, off: off as usize, len }
            }
            DnItem::End => self.end_frame(),
        };
        // A chunk's slot stays leased until ForwardDone, which follows this send's completion
        // (for pieces: the last piece's); a piece's bytes were received before it was queued
        // and are not written again; the END area is not touched again.
        let fd = self.down.lanes[lane].fd;
        if self.down.lanes.len() > 1 {
            let acked = || crate::sys::tcpinfo::ack_state(fd).map(|a| a.bytes_acked);
            self.down.lanes[lane].meter.handed(u64::from(buf.len()), Instant::now(), acked);
        }
        self.pool.submit(&mut self.io, token(T_DN_SEND, lane as u64), OpKind::Send, fd, buf)?;
        self.down.lanes[lane].sending = Some(item);
        Ok(())
    }

    /// Authenticated hop downstream without encryption: writes the MAC of the chunk frame in
    /// `slot` (its header as it is sent) after its payload, and returns its length (0 without).
    pub(super) fn mac_chunk(&mut self, lane: usize, seq: u64, slot: SlotId) -> u32 {
        debug_assert!(self.manifest.chunk(seq).is_some(), "chunk {seq} in range");
        let frame_len = self.frame_len(slot);
        let Some(m) = self.down.lanes[lane].macs.as_mut() else { return 0 };
        // The slot holds the chunk's header; nothing writes the header while the chunk waits to
        // be forwarded.
        let header: [u8; HEADER_LEN] = self.pool.slot(slot, 0, HEADER_LEN).try_into().expect("header");
        let mac = m.sign(&header, &[]);
        // The bytes after the payload (room the pool leaves for a tag) are used by no other op:
        // disk writes cover the payload only, and the frame is not being sent yet.
        self.pool.slot_mut(slot, HEADER_LEN + frame_len as usize, FRAME_MAC_LEN).copy_from_slice(&mac);
        FRAME_MAC_LEN as u32
    }

    /// Writes the END frame into its control area: every chunk was dispatched, so every digest
    /// is known, and END carries the completed manifest's digest, which each replica checks.
    pub(super) fn end_frame(&mut self) -> Buf {
        let h = Header { kind: Kind::End, len: 0, seq: self.manifest.chunk_count(), digest: self.manifest.digest() };
        let mut frame = h.to_bytes().to_vec();
        if let Some(m) = self.down.macs() {
            let mac = m.sign(&frame, &[]);
            frame.extend_from_slice(&mac);
        }
        // The END area is written once, and no op uses it before END is sent.
        self.pool.ctrl_mut(Ctrl::DownSend, frame.len()).copy_from_slice(&frame);
        Buf::Ctrl { area: Ctrl::DownSend, off: 0, len: frame.len() as u32 }
    }

    /// Downstream broke or reported: stop sending to it, and tell the machine once no send is
    /// in flight (the machine then releases the slots that waited for their forward).
    pub(super) fn downstream_settled(&mut self, event: Event) {
        if self.down.deferred.is_some() {
            // Already settled, waiting for the send in flight: the first cause stands (a
            // stalled hop's send then fails with a broken pipe, which is not the news).
            return;
        }
        // Wake any op still blocked on the sockets; the descriptors stay open until the
        // session's owner closes them.
        self.down.shutdown();
        self.down.closed = true;
        self.down.clear_queues();
        // The machine releases every slot it forwarded from when it hears of `event`.
        self.down.cut.clear();
        if self.down.rdma_inflight > 0 {
            for link in self.down.lanes.iter().filter_map(|l| l.rdma.as_ref()) {
                if let Err(e) = link.ep.flush() {
                    // The writes then end by the transport's own retries.
                    tracing::warn!("cannot flush an RDMA queue pair to {}: {e}", self.down.name);
                }
            }
        }
        if self.down.sending() || self.down.rdma_inflight > 0 {
            self.down.deferred.get_or_insert(event);
        } else {
            self.events.push_back(event);
        }
    }

    /// Tells the machine a cut-through chunk's forward is done once it asked for it and every
    /// piece was sent.
    pub(super) fn cut_settle(&mut self, i: usize) {
        let c = self.down.cut[i];
        if c.asked && c.complete && c.pending == 0 {
            self.down.cut.remove(i);
            self.events.push_back(Event::ForwardDone { seq: c.seq });
        }
    }

    /// The downstream deadline: a downstream that takes nothing while chunks wait for it for
    /// `hop_timeout` times the number of nodes after this one. Scaled so that the node nearest
    /// a hung replica gives up on it first: the nodes before it only see backpressure, which
    /// ends as soon as that node lets go. (Upstream has no deadline of its own: a node cut off
    /// by a hung upstream waits until the primary's repair supersedes its session, or the idle
    /// timeout.)
    pub(super) fn check_hops(&mut self) {
        use crate::proto::stall::{Tick, hop_limit};
        if self.end.is_some() {
            return;
        }
        let waiting = self.down.sending() || self.down.queued() || self.down.rdma_inflight > 0;
        let limit = hop_limit(self.cfg.hop_timeout, self.machine.downstream_nodes().len());
        let now = Instant::now();
        let stalled = self.down.progress.tick(Tick { now, waiting }, limit);
        if let Some(stalled) = stalled
            && !self.down.closed
            && self.down.fd.is_some()
        {
            let name = self.down.name.clone();
            tracing::warn!("{name} took nothing for {} s: going on without it", limit.as_secs());
            self.downstream_settled(Event::DownstreamLost { error: stalled.error(&name) });
            return;
        }
        self.check_lanes(now);
    }

    /// A hop of several lanes (each its own rail, maybe), at `now`: every [`LANE_LOOK_EVERY`], whether
    /// data a lane's connection sent has gone unacknowledged for [`LANE_DEAD_AFTER`], its link
    /// down. Then the hop is lost at once (the repair moves it to the rails left), long before
    /// the stall deadline. A receiver that keeps its window shut (its slots full, its disk
    /// slow) has every byte sent acknowledged and is waited for.
    ///
    /// [`LANE_LOOK_EVERY`]: crate::proto::stall::LANE_LOOK_EVERY
    /// [`LANE_DEAD_AFTER`]: crate::proto::stall::LANE_DEAD_AFTER
    fn check_lanes(&mut self, now: Instant) {
        use crate::proto::stall::{LANE_DEAD_AFTER, LANE_LOOK_EVERY};
        if !self.down.watches_lanes() || now.saturating_duration_since(self.down.acks_looked) < LANE_LOOK_EVERY {
            return;
        }
        self.down.acks_looked = now;
        let dead =
            self.down.lanes.iter_mut().position(|l| {
                crate::sys::tcpinfo::ack_state(l.fd).is_some_and(|a| l.acks.look(now, a, LANE_DEAD_AFTER))
            });
        if let Some(k) = dead {
            let name = self.down.name.clone();
            let message = format!(
                "lane {k} to {name}: nothing it sent was acknowledged for {} ms (its link is down)",
                LANE_DEAD_AFTER.as_millis()
            );
            tracing::warn!("{message}");
            self.downstream_settled(Event::DownstreamLost {
                error: NodeError::new(ErrorKind::ConnectionLost, message),
            });
        }
    }

    /// A receive on further RDMA lane `lane` completed: a CREDIT frame's header or payload (with
    /// its MAC under the lane's own secret), granting slots on that lane's queue pair. The
    /// lane closing is not news by itself: the node downstream ends all its lanes at once, and
    /// lane 0 carries its RESULT or its loss.
    pub(super) fn dn_lane_recv_done(&mut self, lane: usize, result: std::io::Result<usize>) {
        let name = self.down.name.clone();
        let lost = |what: String| Event::DownstreamLost { error: NodeError::new(ErrorKind::ConnectionLost, what) };
        let k = lane as u8;
        let mac_len = if self.down.authenticated() { FRAME_MAC_LEN } else { 0 };
        let state = std::mem::replace(&mut self.down.lanes[lane].recv, DnRecv::Done);
        match (state, result) {
            (_, _) if self.down.closed => {}
            (DnRecv::Header, Ok(n)) if n == HEADER_LEN => {
                let bytes: [u8; HEADER_LEN] =
                    self.pool.lane_bytes(k, LaneArea::DownRecv, HEADER_LEN).try_into().expect("header-sized");
                match Header::decode(&bytes) {
                    Ok(h) if h.kind == Kind::Credit && HEADER_LEN + h.len as usize + mac_len <= LANE_CTRL_LEN => {
                        let len = h.len + mac_len as u32;
                        if len == 0 {
                            self.down.lanes[lane].recv = DnRecv::Idle;
                            return;
                        }
                        let buf = Buf::Lane { lane: k, area: LaneArea::DownRecv, off: HEADER_LEN, len };
                        let fd = self.down.lanes[lane].fd;
                        match self.pool.submit(&mut self.io, token(T_DN_RECV, lane as u64), OpKind::Recv, fd, buf) {
                            Ok(()) => self.down.lanes[lane].recv = DnRecv::Payload { kind: h.kind, len },
                            Err(e) => {
                                self.downstream_settled(lost(format!("{name}: cannot receive on lane {lane}: {e}")))
                            }
                        }
                    }
                    Ok(h) => self.downstream_settled(lost(format!(
                        "{name} sent an unexpected {} frame on lane {lane}",
                        h.kind.name()
                    ))),
                    Err(e) => self.downstream_settled(lost(format!("{name} sent a bad frame on lane {lane}: {e}"))),
                }
            }
            (DnRecv::Payload { len, .. }, Ok(n)) if n == len as usize => {
                let frame = self.pool.lane_bytes(k, LaneArea::DownRecv, HEADER_LEN + n);
                match take_credits(&mut self.down.lanes[lane], lane, &name, frame, mac_len) {
                    Ok(()) => self.down.lanes[lane].recv = DnRecv::Idle,
                    Err(error) => self.downstream_settled(Event::DownstreamLost { error }),
                }
            }
            (_, res) => tracing::debug!("lane {lane} to {name} ended: {res:?}"),
        }
    }

    pub(super) fn dn_recv_done(&mut self, result: std::io::Result<usize>) {
        let name = self.down.name.clone();
        let lost = |what: String| Event::DownstreamLost { error: NodeError::new(ErrorKind::ConnectionLost, what) };
        match (self.down.recv, result) {
            (_, _) if self.down.closed => self.down.recv = DnRecv::Done,
            (DnRecv::Header, Ok(n)) if n == HEADER_LEN => {
                let bytes: [u8; HEADER_LEN] =
                    self.pool.ctrl(Ctrl::DownRecv, HEADER_LEN).try_into().expect("header-sized");
                // Authenticated hop: ACK and CREDIT carry a MAC after their payload.
                let macs = self.down.authenticated();
                let mac_len = |k: Kind| if macs && k != Kind::Result { FRAME_MAC_LEN as u32 } else { 0 };
                match Header::decode(&bytes) {
                    Ok(h) if h.kind == Kind::Ack && !macs => {
                        self.down.recv = DnRecv::Idle;
                        self.events.push_back(Event::DownstreamAck { through: h.seq });
                    }
                    Ok(h) if h.kind == Kind::Credit && h.len == 0 && !macs => {
                        self.down.recv = DnRecv::Idle;
                    }
                    Ok(h)
                        if matches!(h.kind, Kind::Result | Kind::Credit | Kind::Ack)
                            && ((h.len + mac_len(h.kind)) as usize) < CTRL_LEN - HEADER_LEN =>
                    {
                        let len = h.len + mac_len(h.kind);
                        // The payload follows the header inside the area.
                        let buf = Buf::Ctrl { area: Ctrl::DownRecv, off: HEADER_LEN, len };
                        let fd = self.down.fd.expect("downstream");
                        match self.pool.submit(&mut self.io, token(T_DN_RECV, 0), OpKind::Recv, fd, buf) {
                            Ok(()) => self.down.recv = DnRecv::Payload { kind: h.kind, len },
                            Err(e) => {
                                self.down.recv = DnRecv::Done;
                                self.downstream_settled(lost(format!("{name}: cannot receive its result: {e}")));
                            }
                        }
                    }
                    Ok(h) => {
                        self.down.recv = DnRecv::Done;
                        self.downstream_settled(lost(format!("{name} sent an unexpected {} frame", h.kind.name())));
                    }
                    Err(e) => {
                        self.down.recv = DnRecv::Done;
                        self.downstream_settled(lost(format!("{name} sent a bad frame: {e}")));
                    }
                }
            }
            (DnRecv::Payload { kind: kind @ (Kind::Ack | Kind::Credit), len }, Ok(n)) if n == len as usize => {
                let frame = self.pool.ctrl(Ctrl::DownRecv, HEADER_LEN + n);
                let mac_len = if self.down.authenticated() { FRAME_MAC_LEN.min(n) } else { 0 };
                let taken = if kind == Kind::Ack {
                    verify_frame(&mut self.down.lanes[0], 0, &name, kind, frame, mac_len).map(|()| {
                        let through = u64::from_le_bytes(frame[16..24].try_into().expect("8 bytes"));
                        self.events.push_back(Event::DownstreamAck { through });
                    })
                } else {
                    take_credits(&mut self.down.lanes[0], 0, &name, frame, mac_len)
                };
                match taken {
                    Ok(()) => self.down.recv = DnRecv::Idle,
                    Err(error) => {
                        self.down.recv = DnRecv::Done;
                        self.downstream_settled(Event::DownstreamLost { error });
                    }
                }
            }
            (DnRecv::Payload { len, .. }, Ok(n)) if n == len as usize => {
                self.down.recv = DnRecv::Done;
                let bytes = self.pool.ctrl(Ctrl::DownRecv, HEADER_LEN + n);
                let Ok(body) = crate::crypt::open_frame(
                    self.down.secret.as_ref(),
                    crate::crypt::LABEL_RESULT,
                    &bytes[HEADER_LEN..],
                ) else {
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
                self.down.recv = DnRecv::Done;
                let why = match res {
                    Ok(_) => format!("connection to {name} lost: it closed the connection before reporting"),
                    Err(e) => format!("connection to {name} lost: {e}"),
                };
                self.downstream_settled(lost(why));
            }
        }
    }
}

/// Checks the MAC of a `kind` frame (header, payload, then `mac_len` bytes of MAC: `frame`)
/// from downstream `name` on lane `lane`, under that lane's secret.
fn verify_frame(
    l: &mut DnLane,
    lane: usize,
    name: &str,
    kind: Kind,
    frame: &[u8],
    mac_len: usize,
) -> Result<(), NodeError> {
    let (header, rest) = frame.split_at(HEADER_LEN);
    let (payload, mac) = rest.split_at(rest.len() - mac_len);
    if l.macs.as_mut().is_none_or(|m| m.verify(header, payload, mac).is_ok()) {
        return Ok(());
    }
    let on = if lane == 0 { String::new() } else { format!(" on lane {lane}") };
    Err(NodeError::new(
        ErrorKind::Unauthorized,
        format!(
            "{} from {name}{on} does not authenticate: changed, dropped or replayed in transit, or not from {name}",
            kind.name()
        ),
    ))
}

/// A CREDIT frame from downstream `name` on lane `lane` (`frame`: header, payload, `mac_len`
/// bytes of MAC), checked under the lane's secret: the slots it grants go to the lane's queue
/// pair.
fn take_credits(l: &mut DnLane, lane: usize, name: &str, frame: &[u8], mac_len: usize) -> Result<(), NodeError> {
    verify_frame(l, lane, name, Kind::Credit, frame, mac_len)?;
    let payload = &frame[HEADER_LEN..frame.len() - mac_len];
    let lost = |what: String| NodeError::new(ErrorKind::ConnectionLost, what);
    match (wire::decode_credits(payload), l.rdma.as_mut()) {
        (Ok(slots), Some(link)) => {
            link.credits.extend(slots);
            Ok(())
        }
        (Ok(_), None) => Err(lost(format!("{name} sent CREDIT on TCP lane {lane}"))),
        (Err(e), _) => Err(lost(format!("{name} sent a bad CREDIT on lane {lane}: {e}"))),
    }
}

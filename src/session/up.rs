//! The hop upstream: receiving chunk frames (header, payload, MAC) into pool slots, checking
//! them, and sending credits, acks and the result back.

use super::*;

/// A chunk's payload being received from upstream, into its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PayloadRecv {
    pub(super) slot: SlotId,
    pub(super) seq: u64,
    /// The digest its header announced.
    pub(super) digest: u128,
    /// Payload bytes received before the receive in flight.
    pub(super) got: u32,
    /// Bytes the receive in flight asked for.
    pub(super) want: u32,
}

/// What the receive from upstream in flight is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum UpRecv {
    Idle,
    Header(SlotId),
    Payload(PayloadRecv),
    /// Authenticated hop: receiving the MAC after a frame other than CHUNK (END).
    Trailer(SlotId),
    /// RDMA hop: chunks arrive by RDMA; a receive on the socket only watches for it closing.
    Watch,
    Done,
}

/// What the send upstream in flight carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum UpItem {
    Ack,
    Result,
    Credit,
    /// The last ACK again ([`KEEPALIVE_EVERY`]): this node is alive, syncing or waiting for
    /// the nodes after it.
    Keepalive,
}

/// After END, while this node syncs or waits for the results of the nodes after it, upstream
/// hears nothing new: this node sends its last ACK again when nothing went upstream for this
/// long, so that upstream's idle deadline (`--idle-timeout`, 1 s at least) does not give up on a
/// node whose disk is slow to flush. Only a live session loop sends it: a hung node sends
/// nothing, and upstream's deadline still finds it.
pub(super) const KEEPALIVE_EVERY: Duration = Duration::from_millis(250);

/// The hop upstream: the frames it sends (chunks, END) and what this node answers (credits,
/// acks, the result).
#[derive(Debug)]
pub(super) struct Upstream {
    /// The socket (none on the primary).
    pub(super) fd: Option<RawFd>,
    /// The hop's lanes (`push --lanes R`): lane 0 is `fd`, which also carries the control
    /// frames; the others carry chunks only. One receive in flight on each.
    pub(super) lanes: Vec<UpLane>,
    /// Chunks that arrived whole, on whichever lane, and the number this node is to receive
    /// (END is acted on only once they are equal).
    pub(super) arrived: u64,
    pub(super) expected: u64,
    /// Several lanes: END came before every chunk it counts (they are still on other lanes).
    pub(super) end_pending: Option<Header>,
    /// Several lanes: the lane each chunk received and not yet forwarded came on (a relay
    /// forwards it on the same lane downstream).
    pub(super) lane_of: std::collections::HashMap<u64, usize>,
    /// The granted slots' bytes (every RDMA lane's), held for the NIC until a frame lands in them.
    pub(super) nic_grants: crate::sys::nic::Grants,
    /// Whether END arrived from upstream (RDMA: the socket may close after it).
    pub(super) end_received: bool,
    pub(super) sending: Option<UpItem>,
    pub(super) ack: Option<u64>,
    pub(super) ack_sent: u64,
    /// When the last frame went upstream on lane 0 (or the session started).
    pub(super) last_sent: Instant,
    pub(super) result: Option<Vec<ReplicaReport>>,
    pub(super) gone: bool,
    /// Async push: this node has told upstream it published; upstream leaving is expected now.
    pub(super) reported_early: bool,
    /// Authenticated hop: its session secret (the RESULT sent there carries a MAC).
    pub(super) secret: Option<crate::crypt::SessionSecret>,
}

/// One lane of the hop upstream: its connection and the receive in flight on it.
#[derive(Debug)]
pub(super) struct UpLane {
    pub(super) fd: RawFd,
    pub(super) recv: UpRecv,
    /// The next chunk expected on this lane (one lane: the next one at all; several: chunks
    /// come in increasing order on each lane, and this is past the last one).
    pub(super) next_seq: u64,
    /// The header of the chunk being received, as it came (an encrypted chunk's associated
    /// data; the test fault may change the slot's copy).
    pub(super) header: [u8; HEADER_LEN],
    /// Authenticated hop: the MACs of the data-plane frames on this lane (lane 0: from and to
    /// upstream; see `crypt::FrameMacs`). Each lane has its own handshake and secret.
    pub(super) macs: Option<FrameMacs>,
    /// Encrypted hop: opens each chunk that arrives on this lane (under this lane's secret).
    pub(super) open: Option<crate::crypt::Opener>,
    /// Chunks that arrived on this lane.
    pub(super) chunks: u64,
    /// The lane's queue pair, when this lane negotiated RDMA (each lane does on its own).
    pub(super) rdma: Option<UpLink>,
    /// RDMA lane: slots granted on it (with their windows' keys) and not yet sent in a CREDIT
    /// frame, which goes on this lane's connection.
    pub(super) credits: Vec<wire::Credit>,
    /// Lanes 1..R: a CREDIT frame is being sent on this lane (lane 0 sends them as `sending`).
    pub(super) credit_sending: bool,
    /// RDMA lane: a readiness poll is in flight on its completion channel.
    pub(super) polling: bool,
}

impl UpLane {
    pub(super) fn new(fd: RawFd, rdma: Option<UpLink>) -> Self {
        Self {
            fd,
            recv: UpRecv::Idle,
            next_seq: 0,
            header: [0; HEADER_LEN],
            macs: None,
            open: None,
            chunks: 0,
            rdma,
            credits: Vec::new(),
            credit_sending: false,
            polling: false,
        }
    }
}

impl Upstream {
    pub(super) fn new(fd: Option<RawFd>, rdma: Option<UpLink>, nic_grants: crate::sys::nic::Grants) -> Self {
        Self {
            fd,
            lanes: fd.map(|fd| UpLane::new(fd, rdma)).into_iter().collect(),
            arrived: 0,
            expected: 0,
            end_pending: None,
            lane_of: std::collections::HashMap::new(),
            nic_grants,
            end_received: false,
            sending: None,
            ack: None,
            ack_sent: 0,
            last_sent: Instant::now(),
            result: None,
            gone: fd.is_none(),
            reported_early: false,
            secret: None,
        }
    }

    /// Whether any lane of the hop upstream runs RDMA.
    pub(super) fn rdma(&self) -> bool {
        self.lanes.iter().any(|l| l.rdma.is_some())
    }

    /// Whether the hop upstream is encrypted (every lane opens its chunks).
    pub(super) fn opened(&self) -> bool {
        self.lanes.first().is_some_and(|l| l.open.is_some())
    }
}

impl Session<'_> {
    /// Submits the next receive from upstream when none is in flight: on an RDMA hop a watch on
    /// the socket, else a frame header into a fresh slot.
    pub(super) fn pump_up_recv(&mut self) -> std::io::Result<()> {
        // RDMA lanes: chunks land by themselves; each socket is only watched for closing.
        for lane in 0..self.up.lanes.len() {
            if self.up.lanes[lane].recv == UpRecv::Idle && self.up.lanes[lane].rdma.is_some() {
                let fd = self.up.lanes[lane].fd;
                let buf = match lane {
                    0 => Buf::Ctrl { area: Ctrl::UpRecv, off: 0, len: HEADER_LEN as u32 },
                    k => Buf::Lane { lane: k as u8, area: LaneArea::UpWatch, off: 0, len: HEADER_LEN as u32 },
                };
                self.pool.submit(&mut self.io, token(T_UP_RECV, lane as u64), OpKind::Recv, fd, buf)?;
                self.up.lanes[lane].recv = UpRecv::Watch;
            }
        }
        self.grant_rdma_slots();
        // Upstream receive: one frame header at a time on each lane, into a fresh slot; a relay
        // with a full backlog for downstream waits (backpressure upstream).
        for lane in 0..self.up.lanes.len() {
            if self.up.lanes[lane].recv == UpRecv::Idle
                && !self.relay_backlog_full()
                && self.lane_may_lease(lane)
                && let Some(slot) = self.pool.lease()
            {
                let fd = self.up.lanes[lane].fd;
                let buf = Buf::Slot { id: slot, off: 0, len: HEADER_LEN as u32 };
                self.pool.submit(&mut self.io, token(T_UP_RECV, lane as u64), OpKind::Recv, fd, buf)?;
                self.up.lanes[lane].recv = UpRecv::Header(slot);
            }
        }
        Ok(())
    }

    /// Grants free slots to the RDMA lanes upstream, each to the lane that holds the fewest
    /// grants (of those, the one furthest behind), as far as `proto::lanes::may_lease` lets it
    /// (a lane past the first missing chunk leaves the last slots to the lanes that may still
    /// carry it). Fewest first, because a grant is a slot held for the lane until its sender
    /// fills it: a lane served first every time would hold every slot, and the missing chunk,
    /// queued on another lane, would have none to land in. Each grant binds the slot's window
    /// on that lane's queue pair and goes out in a CREDIT frame on that lane's connection.
    pub(super) fn grant_rdma_slots(&mut self) {
        if self.up.end_received || self.end.is_some() || !self.up.rdma() {
            return;
        }
        loop {
            let lane = (0..self.up.lanes.len())
                .filter(|&k| self.up.lanes[k].rdma.is_some() && self.lane_may_lease(k))
                .min_by_key(|&k| {
                    let l = &self.up.lanes[k];
                    (l.rdma.as_ref().map_or(0, |r| r.granted.len()), l.next_seq)
                });
            let Some(lane) = lane else { return };
            let Some(s) = self.pool.lease() else { return };
            let span = self.pool.span(Buf::Slot { id: s, off: 0, len: self.pool.slot_size() as u32 });
            let link = self.up.lanes[lane].rdma.as_mut().expect("an RDMA lane");
            match self.up.nic_grants.grant(&mut link.ep, self.pool.mem_mut(), s.0, span) {
                Ok(rkey) => {
                    link.granted.push(s);
                    self.up.lanes[lane].credits.push(wire::Credit { slot: s.0, rkey });
                }
                Err(e) => {
                    self.pool.release(s);
                    return self.abort(NodeError::new(ErrorKind::ConnectionLost, format!("granting a slot: {e}")));
                }
            }
        }
    }

    /// Whether lane `lane` may take a slot for its next frame (`proto::lanes`).
    fn lane_may_lease(&self, lane: usize) -> bool {
        use crate::proto::lanes::{EndSeen, may_lease};
        let end = match (self.up.end_received, self.up.end_pending.is_some()) {
            (true, _) => EndSeen::Received,
            (false, true) => EndSeen::Pending,
            (false, false) => EndSeen::No,
        };
        let (lanes, next) = (self.up.lanes.len(), self.up.lanes[lane].next_seq);
        may_lease(lane, lanes, next, self.machine.next_dispatch(), self.pool.free_slots(), end)
    }

    /// A chunk header from upstream is the one expected next and matches the manifest.
    pub(super) fn check_chunk_header(&self, lane: usize, h: &Header) -> Result<(), (ErrorKind, String)> {
        let next = self.up.lanes[lane].next_seq;
        let several = self.up.lanes.len() > 1;
        match self.manifest.chunk(h.seq) {
            _ if !several && h.seq != next => {
                Err((ErrorKind::Protocol, format!("chunk {} arrived while chunk {next} was expected", h.seq)))
            }
            _ if several && (h.seq < next || !self.route.passes(h.seq)) => Err((
                ErrorKind::Protocol,
                format!("chunk {} arrived on lane {lane}, which had reached chunk {next}", h.seq),
            )),
            None => Err((ErrorKind::Protocol, format!("chunk {} is past the end", h.seq))),
            // A compressed push's chunk may come shorter (its coding is checked once it is whole).
            Some(c) if h.len != c.len && !(self.codec.dec.is_some() && h.len < c.len) => Err((
                ErrorKind::Protocol,
                format!("chunk {} announces {} bytes, the manifest says {}", h.seq, h.len, c.len),
            )),
            Some(_) => Ok(()),
        }
    }

    /// Chunk `seq` is whole in `slot`: check its digest and hand it to the machine.
    pub(super) fn chunk_arrived(&mut self, lane: usize, slot: SlotId, seq: u64, announced: u128) {
        let c = self.manifest.chunk(seq).expect("checked on the header");
        let n = c.len as usize;
        self.up.lanes[lane].next_seq = self.route.next_passing(seq + 1, self.manifest.chunk_count());
        self.up.lanes[lane].chunks += 1;
        self.up.arrived += 1;
        if self.up.lanes.len() > 1 && !self.down.closed && self.route.onward(seq) {
            // A relay forwards it on the same lane.
            self.up.lane_of.insert(seq, lane);
        }
        // The payload has landed in this slot and nothing writes it now. A compressed chunk is
        // checked after it is decompressed, whatever `verify` says; one whose coding does not
        // fit the manifest, or that does not decompress, is refused like a bad digest (its
        // pieces may be on their way downstream: the machine settles its slot).
        let coding = self.coding_fits(slot, c.len);
        let delta = coding.as_ref().is_ok_and(|c| c.is_delta()) && self.route.here(seq);
        let checked = coding.and_then(|coding| {
            // A relay forwards a delta it does not store as it came (it may hold no base for
            // it): the nodes that store it check it.
            if !self.cfg.verify && coding.is_raw() || coding.is_delta() && !self.route.here(seq) {
                return Ok(announced);
            }
            self.chunk_digest(slot, seq, coding)
        });
        let ok = (!self.digests_known || announced == c.digest)
            && match checked {
                Ok(d) => d == announced,
                Err(why) => {
                    tracing::warn!(seq, "compressed chunk refused: {why}");
                    false
                }
            };
        if let Some(m) = &self.metrics {
            m.lane_chunks("in", lane).inc();
            m.bytes_in.inc_by(n as u64);
            m.wire_in.inc_by(u64::from(self.frame_len(slot)));
            if ok && delta {
                m.all.delta_chunks.inc();
            }
            if ok {
                m.all.chunks_verified.inc()
            } else {
                m.all.digest_failures.inc()
            };
        }
        if ok {
            self.manifest.set_digest(seq, announced);
            // Its forward keeps the order of the lane it came on without the machine's chunk
            // order when its pieces went downstream as they arrived, or when the hop has several
            // lanes: it then goes on its lane's queue as it becomes ready, and chunks become
            // ready here in the order they came on their lane (checked as they arrive).
            let lane_order = self.down.cut.iter().any(|c| c.seq == seq) || self.up.lanes.len() > 1;
            self.events.push_back(Event::ChunkReady { seq, slot, lane_order });
        } else {
            self.events.push_back(Event::ChunkCorrupt { seq, slot });
        }
        if self.up.arrived == self.up.expected
            && let Some(end) = self.up.end_pending.take()
        {
            // END came ahead of this chunk, on another lane.
            self.frame_after_chunks(end);
        }
    }

    /// A non-chunk frame from upstream: END after the last chunk, or a protocol error.
    pub(super) fn frame_after_chunks(&mut self, h: Header) {
        let total = self.manifest.chunk_count();
        let several = self.up.lanes.len() > 1;
        if several && h.kind == Kind::End && h.seq == total && self.up.arrived < self.up.expected {
            // Chunks it counts are still on other lanes: acted on once they are all here.
            self.up.end_pending = Some(h);
            return;
        }
        let all_here = if several { self.up.arrived == self.up.expected } else { self.up.lanes[0].next_seq == total };
        if h.kind == Kind::End && h.seq == total && all_here {
            let mine = self.manifest.digest();
            if h.digest == mine {
                self.up.end_received = true;
                tracing::debug!(
                    slots_held = self.pool.slots() - self.pool.free_slots(),
                    "END from upstream: every chunk arrived"
                );
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
                    self.up.arrived
                ),
            ));
        }
    }

    /// An ACK frame for every chunk before `through` (with its MAC on an authenticated hop).
    fn ack_frame(&mut self, through: u64) -> Vec<u8> {
        let mut b = Header { kind: Kind::Ack, len: 0, seq: through, digest: 0 }.to_bytes().to_vec();
        if let Some(m) = self.up.lanes[0].macs.as_mut() {
            let mac = m.sign(&b, &[]);
            b.extend_from_slice(&mac);
        }
        b
    }

    /// Whether upstream should hear this node is alive ([`KEEPALIVE_EVERY`]): every chunk and
    /// END arrived, the session has not ended (its result follows then), upstream still waits
    /// for that result, and nothing went there for that long.
    pub(super) fn keepalive_due(&self) -> bool {
        self.up.end_received
            && self.end.is_none()
            && !self.up.reported_early
            && !self.up.gone
            && self.up.last_sent.elapsed() >= KEEPALIVE_EVERY
    }

    pub(super) fn pump_up_send(&mut self) -> std::io::Result<()> {
        self.pump_lane_credits()?;
        // Upstream send: the result when there is one, else the newest ack.
        if self.up.sending.is_none()
            && !self.up.gone
            && let Some(up) = self.up.fd
        {
            // Credits first (the sender may be waiting for a slot), then the newest ack, which
            // goes before the result so that upstream's progress reaches 100 %.
            let (item, bytes) = if !self.up.lanes[0].credits.is_empty() {
                (UpItem::Credit, self.credit_frame(0, CTRL_LEN))
            } else if let Some(through) = self.up.ack.take().filter(|t| *t > self.up.ack_sent) {
                self.up.ack_sent = through;
                (UpItem::Ack, self.ack_frame(through))
            } else if let Some(reports) = self.up.result.take() {
                let payload = crate::crypt::seal_frame(
                    self.up.secret.as_ref(),
                    crate::crypt::LABEL_RESULT,
                    wire::encode_reports(&reports),
                );
                let h = Header { kind: Kind::Result, len: payload.len() as u32, seq: 0, digest: 0 };
                let mut b = h.to_bytes().to_vec();
                b.extend_from_slice(&payload);
                (UpItem::Result, b)
            } else if self.keepalive_due() {
                (UpItem::Keepalive, self.ack_frame(self.up.ack_sent))
            } else {
                return Ok(());
            };
            self.up.last_sent = Instant::now();
            let len = bytes.len().min(CTRL_LEN);
            // The UpSend area is used by one send at a time, and none is in flight.
            self.pool.ctrl_mut(Ctrl::UpSend, len).copy_from_slice(&bytes[..len]);
            let buf = Buf::Ctrl { area: Ctrl::UpSend, off: 0, len: len as u32 };
            self.pool.submit(&mut self.io, token(T_UP_SEND, 0), OpKind::Send, up, buf)?;
            self.up.sending = Some(item);
        }
        Ok(())
    }

    /// A CREDIT frame (with its MAC on an authenticated hop) of lane `lane`'s pending credits,
    /// as many as fit in `room` bytes.
    fn credit_frame(&mut self, lane: usize, room: usize) -> Vec<u8> {
        let l = &mut self.up.lanes[lane];
        let n = l.credits.len().min((room - HEADER_LEN - FRAME_MAC_LEN) / wire::CREDIT_LEN);
        let credits: Vec<wire::Credit> = l.credits.drain(..n).collect();
        let h = Header { kind: Kind::Credit, len: (wire::CREDIT_LEN * n) as u32, seq: 0, digest: 0 };
        let mut b = h.to_bytes().to_vec();
        wire::encode_credits(&credits, &mut b);
        if let Some(m) = l.macs.as_mut() {
            let mac = m.sign(&b[..HEADER_LEN], &b[HEADER_LEN..]);
            b.extend_from_slice(&mac);
        }
        b
    }

    /// Sends the credits of each further RDMA lane on that lane's own connection, one CREDIT
    /// frame in flight per lane (lane 0's go with the acks, as `sending`).
    fn pump_lane_credits(&mut self) -> std::io::Result<()> {
        if self.up.gone {
            return Ok(());
        }
        for lane in 1..self.up.lanes.len() {
            if self.up.lanes[lane].credit_sending || self.up.lanes[lane].credits.is_empty() {
                continue;
            }
            let bytes = self.credit_frame(lane, LANE_CTRL_LEN);
            let k = lane as u8;
            // The lane's UpSend area is used by one send at a time, and none is in flight.
            self.pool.lane_mut(k, LaneArea::UpSend, bytes.len()).copy_from_slice(&bytes);
            let buf = Buf::Lane { lane: k, area: LaneArea::UpSend, off: 0, len: bytes.len() as u32 };
            let fd = self.up.lanes[lane].fd;
            self.pool.submit(&mut self.io, token(T_UP_SEND, lane as u64), OpKind::Send, fd, buf)?;
            self.up.lanes[lane].credit_sending = true;
        }
        Ok(())
    }

    pub(super) fn upstream_lost(&mut self, why: String) {
        self.up.gone = true;
        self.up.result = None;
        if self.up.reported_early {
            // An async push's primary left after this node's early report: expected.
            tracing::debug!("upstream gone after the early report ({why}); the chain goes on");
            return;
        }
        if !matches!(self.end, Some(SessionEnd::Aborted(_))) {
            self.end = Some(SessionEnd::UpstreamLost { why, published: self.here.published });
        }
        // Downstream then drops its staging too.
        self.down.shutdown();
        self.down.closed = true;
    }

    /// Bytes the hop upstream adds after each chunk's payload: an encrypted hop its GCM tag,
    /// an authenticated one its MAC.
    pub(super) fn tag_len(&self) -> u32 {
        if self.up.opened() {
            TAG_LEN as u32
        } else if self.up.lanes.first().is_some_and(|l| l.macs.is_some()) {
            FRAME_MAC_LEN as u32
        } else {
            0
        }
    }

    /// Receives the next piece of chunk `seq`'s payload into `slot` after `got` bytes.
    pub(super) fn recv_piece(
        &mut self,
        lane: usize,
        slot: SlotId,
        seq: u64,
        digest: u128,
        got: u32,
        len: u32,
    ) -> std::io::Result<()> {
        let piece = if self.down.cut.iter().any(|c| c.seq == seq) { self.cfg.piece_bytes } else { 0 };
        let want = if piece == 0 { len - got } else { piece.min(len - got) };
        // The payload receive completes before the slot goes to the machine, and pieces already
        // queued downstream lie before `got`.
        let buf = Buf::Slot { id: slot, off: HEADER_LEN + got as usize, len: want };
        self.pool.submit(&mut self.io, token(T_UP_RECV, lane as u64), OpKind::Recv, self.up.lanes[lane].fd, buf)?;
        self.up.lanes[lane].recv = UpRecv::Payload(PayloadRecv { slot, seq, digest, got, want });
        Ok(())
    }

    pub(super) fn up_recv_done(&mut self, lane: usize, result: std::io::Result<usize>) {
        if self.end.is_some() {
            if let UpRecv::Header(slot) | UpRecv::Payload(PayloadRecv { slot, .. }) | UpRecv::Trailer(slot) =
                self.up.lanes[lane].recv
            {
                self.pool.release(slot);
            }
            self.up.lanes[lane].recv = UpRecv::Done;
            return;
        }
        match (self.up.lanes[lane].recv, result) {
            (UpRecv::Watch, res) => {
                // Nothing but the socket's end may come here on an RDMA hop.
                self.up.lanes[lane].recv = UpRecv::Done;
                match res {
                    Ok(0) if self.up.end_received => {}
                    Ok(0) => self.upstream_lost("upstream closed the connection before END".into()),
                    Ok(_) => self.abort(NodeError::new(
                        ErrorKind::Protocol,
                        "upstream sent bytes on the control connection of an RDMA hop",
                    )),
                    Err(_) if self.up.end_received => {}
                    Err(e) => self.upstream_lost(format!("upstream connection failed: {e}")),
                }
            }
            (UpRecv::Header(slot), Ok(n)) if n == HEADER_LEN => self.up_header_done(lane, slot),
            (UpRecv::Header(slot), _) if lane > 0 && self.up.end_received => {
                // A further lane closing once END was acted on: nothing more was to come on it.
                self.pool.release(slot);
                self.up.lanes[lane].recv = UpRecv::Done;
            }
            (UpRecv::Payload(p), Ok(n)) if n == p.want as usize => self.up_payload_done(lane, p),
            (UpRecv::Payload(p), Ok(_)) => {
                self.pool.release(p.slot);
                self.up.lanes[lane].recv = UpRecv::Done;
                self.upstream_lost(format!("upstream closed the connection in the middle of chunk {}", p.seq));
            }
            (UpRecv::Trailer(slot), Ok(n)) if n == FRAME_MAC_LEN => {
                self.up.lanes[lane].recv = UpRecv::Done;
                let mac = self.pool.slot(slot, HEADER_LEN, FRAME_MAC_LEN);
                let header = self.up.lanes[lane].header;
                let ok = self.up.lanes[lane].macs.as_mut().expect("a trailer only on authenticated hops").verify(
                    &header,
                    &[],
                    mac,
                );
                self.pool.release(slot);
                match Header::decode(&self.up.lanes[lane].header) {
                    Ok(h) if ok.is_ok() => self.frame_after_chunks(h),
                    Ok(h) => self.abort(unauthentic_frame(h.kind)),
                    Err(e) => self.abort(NodeError::new(ErrorKind::Protocol, format!("bad frame from upstream: {e}"))),
                }
            }
            (UpRecv::Header(slot) | UpRecv::Payload(PayloadRecv { slot, .. }) | UpRecv::Trailer(slot), res) => {
                self.pool.release(slot);
                self.up.lanes[lane].recv = UpRecv::Done;
                let why = match res {
                    Ok(_) => "upstream closed the connection before END".to_owned(),
                    Err(e) => format!("upstream connection failed: {e}"),
                };
                self.upstream_lost(why);
            }
            (state, _) => unreachable!("upstream receive completed in state {state:?}"),
        }
    }

    /// Gives up on the upstream receive into `slot` (its submission failed).
    fn up_recv_failed(&mut self, lane: usize, slot: SlotId, e: &std::io::Error) {
        self.pool.release(slot);
        self.up.lanes[lane].recv = UpRecv::Done;
        self.abort(NodeError::io("submitting a receive", e));
    }

    /// A frame header landed in `slot`: a chunk's (receive its payload next), or END's.
    fn up_header_done(&mut self, lane: usize, slot: SlotId) {
        let bytes: [u8; HEADER_LEN] = self.pool.slot(slot, 0, HEADER_LEN).try_into().expect("header");
        match Header::decode(&bytes) {
            Ok(h) if h.kind == Kind::Chunk => {
                if let Err((kind, message)) = self.check_chunk_header(lane, &h) {
                    self.pool.release(slot);
                    self.up.lanes[lane].recv = UpRecv::Done;
                    self.abort(NodeError::new(kind, message));
                    return;
                }
                if let Some(n) = self.down.flip_every
                    && h.seq % n == n - 1
                {
                    tracing::warn!(seq = h.seq, "test fault: flipping a bit of the forwarded chunk");
                    // Nothing reads the header before the forward queued below; this node keeps
                    // `h` as it came.
                    let header = self.pool.slot_mut(slot, 0, HEADER_LEN);
                    header[HEADER_LEN - 1] ^= 1;
                }
                self.up.lanes[lane].header = bytes;
                if self.cuts_through(&h) {
                    let dn = lane % self.down.lanes.len().max(1);
                    self.down.cut.push_back(CutThrough {
                        seq: h.seq,
                        pending: 0,
                        complete: false,
                        asked: false,
                        lane: dn,
                    });
                    self.down.lanes[dn].count_chunk(self.metrics.as_ref(), dn);
                }
                let wire_len = h.len + self.tag_len();
                if let Err(e) = self.recv_piece(lane, slot, h.seq, h.digest, 0, wire_len) {
                    self.up_recv_failed(lane, slot, &e);
                }
            }
            Ok(_) if self.up.lanes[lane].macs.is_some() => {
                // Its MAC follows: taken into the same slot, after the header.
                self.up.lanes[lane].header = bytes;
                let fd = self.up.lanes[lane].fd;
                let buf = Buf::Slot { id: slot, off: HEADER_LEN, len: FRAME_MAC_LEN as u32 };
                match self.pool.submit(&mut self.io, token(T_UP_RECV, lane as u64), OpKind::Recv, fd, buf) {
                    Ok(()) => self.up.lanes[lane].recv = UpRecv::Trailer(slot),
                    Err(e) => self.up_recv_failed(lane, slot, &e),
                }
            }
            Ok(h) => {
                self.pool.release(slot);
                self.up.lanes[lane].recv = UpRecv::Done;
                self.frame_after_chunks(h);
            }
            Err(e) => {
                self.pool.release(slot);
                self.up.lanes[lane].recv = UpRecv::Done;
                self.abort(NodeError::new(ErrorKind::Protocol, format!("bad frame from upstream: {e}")));
            }
        }
    }

    /// Whether the chunk whose header just arrived is cut through: forwarded piece by piece
    /// while it arrives, rather than once it is whole. Only when pieces are configured and
    /// downstream is open, and only where forwarding bytes before the chunk is checked cannot
    /// pass on anything unauthenticated or in the wrong form: not onto an RDMA hop (a write per
    /// granted slot takes whole frames), not from or onto an encrypted hop (a chunk is opened,
    /// or sealed, whole), and only for a non-empty chunk the route sends onward.
    fn cuts_through(&self, h: &Header) -> bool {
        // With several lanes an empty chunk is cut through too (its header alone), so that each
        // lane downstream carries its chunks in the order they came on it.
        let several = self.up.lanes.len() > 1;
        self.cfg.piece_bytes > 0
            && !self.down.closed
            && !self.down.rdma()
            && !self.up.opened()
            && !self.down.sealed()
            && (h.len > 0 || several)
            && self.route.onward(h.seq)
    }

    /// The receive of `p` completed whole: queue what arrived downstream when the chunk is cut
    /// through, then receive the rest, or check the whole chunk.
    fn up_payload_done(&mut self, lane: usize, p: PayloadRecv) {
        let PayloadRecv { slot, seq, digest: announced, got, want } = p;
        // The frame's payload length as its header announced it (shorter than the chunk when
        // compressed).
        let frame_len = u32::from_le_bytes(self.up.lanes[lane].header[8..12].try_into().expect("4 bytes"));
        let cut = self.down.cut.iter().position(|c| c.seq == seq);
        let now = got + want;
        let wire_len = frame_len + self.tag_len();
        // Payload bytes of this receive (not the MAC after them, which is this hop's).
        let payload_end = now.min(frame_len);
        // An empty chunk (several lanes only) goes as its header alone.
        if let Some(ci) = cut
            && !self.down.closed
            && (payload_end > got || (got == 0 && frame_len == 0))
        {
            // The first piece carries the chunk's header, exactly as it arrived.
            let (off, len) = if got == 0 {
                (0, HEADER_LEN as u32 + payload_end)
            } else {
                (HEADER_LEN as u32 + got, payload_end - got)
            };
            let dn = self.down.cut[ci].lane;
            self.down.lanes[dn].queue.push_back(DnItem::Piece { seq, slot, off, len });
            let macs_down = self.down.lanes[dn].macs.is_some();
            let ct = &mut self.down.cut[ci];
            ct.pending += 1;
            // Authenticated downstream: complete once its MAC is queued (below).
            ct.complete = payload_end == frame_len && !macs_down;
        }
        if now < wire_len {
            if let Err(e) = self.recv_piece(lane, slot, seq, announced, now, wire_len) {
                self.up.lanes[lane].recv = UpRecv::Done;
                self.abort(NodeError::io("submitting a receive", &e));
            }
            return;
        }
        self.up.lanes[lane].recv = UpRecv::Idle;
        if let Err(error) = self.authenticate_chunk(lane, slot, seq, frame_len, wire_len) {
            self.pool.release(slot);
            self.up.lanes[lane].recv = UpRecv::Done;
            return self.abort(error);
        }
        if let Some(ci) = self.down.cut.iter().position(|c| c.seq == seq)
            && !self.down.closed
            && self.down.lanes[self.down.cut[ci].lane].macs.is_some()
        {
            // Only now, the chunk's header authentic, does this node vouch for it downstream:
            // its own MAC goes last (made when sent, in send order).
            let off = HEADER_LEN as u32 + frame_len;
            let dn = self.down.cut[ci].lane;
            self.down.lanes[dn].queue.push_back(DnItem::Piece { seq, slot, off, len: FRAME_MAC_LEN as u32 });
            let ct = &mut self.down.cut[ci];
            ct.pending += 1;
            ct.complete = true;
        }
        self.chunk_arrived(lane, slot, seq, announced);
    }

    /// A whole chunk frame from an encrypted hop is opened in place; one from an authenticated
    /// hop has its MAC checked. Err: it does not authenticate.
    fn authenticate_chunk(
        &mut self,
        lane: usize,
        slot: SlotId,
        seq: u64,
        len: u32,
        wire_len: u32,
    ) -> Result<(), NodeError> {
        let header = self.up.lanes[lane].header;
        if let Some(open) = self.up.lanes[lane].open.as_mut() {
            let sealed = self.pool.slot_mut(slot, HEADER_LEN, wire_len as usize);
            if open.open(&header, sealed).is_err() {
                return Err(NodeError::new(
                    ErrorKind::Unauthorized,
                    format!(
                        "encrypted chunk {seq} from upstream does not authenticate: changed in transit, dropped or \
                         replayed, or sealed with another key"
                    ),
                ));
            }
        } else if let Some(m) = self.up.lanes[lane].macs.as_mut() {
            // The frame's MAC follows the payload.
            let mac = self.pool.slot(slot, HEADER_LEN + len as usize, FRAME_MAC_LEN);
            if m.verify(&header, &[], mac).is_err() {
                return Err(unauthentic_chunk(seq));
            }
        }
        Ok(())
    }
}

/// A chunk from an authenticated hop whose MAC does not check out.
pub(super) fn unauthentic_chunk(seq: u64) -> NodeError {
    NodeError::new(
        ErrorKind::Unauthorized,
        format!(
            "chunk {seq} from upstream does not authenticate: its header (with the digest) was changed in transit, \
             or it was dropped, replayed or reordered, or not sent by the node before this one"
        ),
    )
}

/// A frame from an authenticated hop (END) whose MAC does not check out.
pub(super) fn unauthentic_frame(kind: Kind) -> NodeError {
    NodeError::new(
        ErrorKind::Unauthorized,
        format!(
            "{} from upstream does not authenticate: changed, dropped or replayed in transit, or not sent by the \
             node before this one",
            kind.name()
        ),
    )
}

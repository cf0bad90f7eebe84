//! The RDMA side of both hops: readiness polls on the completion channels, writes posted
//! downstream into granted slots, frames landing upstream. Each lane of a hop that runs RDMA
//! has its own queue pair, completion queue and channel (one poll each, token value
//! 2 × lane + side), its own grants and credits.

use super::up::{unauthentic_chunk, unauthentic_frame};
use super::*;

impl Session<'_> {
    pub(super) fn pump_rdma_polls(&mut self) -> std::io::Result<()> {
        for lane in 0..self.up.lanes.len() {
            let l = &mut self.up.lanes[lane];
            if let Some(link) = &l.rdma
                && !l.polling
            {
                self.io.poll_in(token(T_RDMA_POLL, 2 * lane as u64), link.ep.event_fd())?;
                l.polling = true;
            }
        }
        for lane in 0..self.down.lanes.len() {
            let l = &mut self.down.lanes[lane];
            if let Some(link) = &l.rdma
                && !l.polling
            {
                self.io.poll_in(token(T_RDMA_POLL, 2 * lane as u64 + 1), link.ep.event_fd())?;
                l.polling = true;
            }
        }
        Ok(())
    }

    /// Posts an RDMA write for every frame queued for an RDMA lane (or, on the primary, not
    /// taken by any lane yet) that has a slot granted on that lane downstream: a lane takes a
    /// chunk only while it holds a credit, so a lane slower anywhere along the chain takes fewer.
    ///
    /// One frame per lane per round, from the lane after the one that took the last shared
    /// chunk: chunks that become ready one at a time then spread over the lanes that hold
    /// credits (drained lane by lane, lane 0 took every chunk while its credits came back).
    pub(super) fn pump_rdma_writes(&mut self) {
        let n = self.down.lanes.len();
        let mut wrote = true;
        while wrote && !self.down.closed {
            wrote = false;
            let first = self.down.next_lane;
            for lane in (0..n).map(|i| (first + i) % n) {
                if self.down.closed || self.down.lanes[lane].rdma.as_ref().is_none_or(|l| l.credits.is_empty()) {
                    continue;
                }
                let Some(item) = self.next_for_lane(lane) else { continue };
                self.rdma_write(lane, item);
                wrote = true;
            }
        }
    }

    /// Posts the RDMA write of `item` on lane `lane`, into the first slot granted there.
    fn rdma_write(&mut self, lane: usize, item: DnItem) {
        {
            let credit =
                self.down.lanes[lane].rdma.as_mut().expect("an RDMA lane").credits.pop_front().expect("checked");
            let (buf, wr) = match item {
                DnItem::Chunk(seq, slot) => {
                    // The MAC travels in the slot too, after the payload (the receiver's slots
                    // leave room for it).
                    let mac = self.mac_chunk(lane, seq, slot);
                    (Buf::Slot { id: slot, off: 0, len: HEADER_LEN as u32 + self.frame_len(slot) + mac }, seq)
                }
                DnItem::End => (self.end_frame(), END_WR),
                DnItem::Piece { .. } => unreachable!("no cut-through onto an RDMA hop"),
            };
            let link = self.down.lanes[lane].rdma.as_ref().expect("checked");
            let remote = link.remote_addr + u64::from(credit.slot) * link.slot_size;
            // The frame (a leased slot or the END area) is held for the NIC until this write
            // completes (ForwardDone releases the slot only after it); the remote slot was
            // granted by the receiver (the credit's key opens that slot alone) and holds a whole
            // frame.
            let span = self.pool.span(buf);
            let (rkey, imm) = (credit.rkey, u32::from(credit.slot));
            let posted =
                self.down.nic_writes.post(&link.ep, self.pool.mem_mut(), token(T_DN_SEND, wr), span, remote, rkey, imm);
            match posted {
                Ok(()) => {
                    self.down.rdma_inflight += 1;
                    if self.down.lanes.len() > 1 {
                        let len = self.written_len(wr);
                        let l = &mut self.down.lanes[lane];
                        let written = l.written;
                        l.meter.handed(len, Instant::now(), || Some(written));
                    }
                }
                Err(e) => {
                    if let DnItem::Chunk(seq, _) = item {
                        self.events.push_back(Event::ForwardDone { seq });
                    }
                    let name = self.down.name.clone();
                    self.downstream_settled(Event::DownstreamLost {
                        error: NodeError::new(
                            ErrorKind::ConnectionLost,
                            format!("RDMA to {name} (lane {lane}) failed: {e}"),
                        ),
                    });
                }
            }
        }
    }

    /// Takes every RDMA completion of lane `lane`'s endpoint (downstream or upstream).
    pub(super) fn rdma_ready(&mut self, lane: usize, down: bool) {
        let mut wcs = Vec::new();
        let polled = if down {
            self.down.lanes[lane].rdma.as_mut().map(|l| l.ep.poll(&mut wcs))
        } else {
            self.up.lanes[lane].rdma.as_mut().map(|l| l.ep.poll(&mut wcs))
        };
        if let Some(Err(e)) = polled {
            let what = format!("polling RDMA completions of lane {lane}: {e}");
            if !down {
                self.upstream_lost(what);
            } else {
                self.downstream_settled(Event::DownstreamLost {
                    error: NodeError::new(ErrorKind::ConnectionLost, what),
                });
            }
            return;
        }
        for wc in wcs {
            if down {
                self.rdma_written(lane, wc);
            } else {
                self.rdma_arrived(lane, wc);
            }
        }
    }

    /// What a write of chunk `wr` (or END) counts for its lane's meter: the chunk's bytes and
    /// its header, END nothing (the same when posted and when completed).
    fn written_len(&self, wr: u64) -> u64 {
        if wr == END_WR {
            return 0;
        }
        self.manifest.chunk(wr).map_or(0, |c| u64::from(c.len) + HEADER_LEN as u64)
    }

    /// A write downstream on lane `lane` completed (or failed).
    pub(super) fn rdma_written(&mut self, lane: usize, wc: WorkCompletion) {
        self.down.rdma_inflight = self.down.rdma_inflight.saturating_sub(1);
        self.down.nic_writes.completed(self.pool.mem_mut(), wc.wr_id);
        let value = wc.wr_id & ((1 << 56) - 1);
        let seq = (value != END_WR).then_some(value);
        match wc.status {
            Ok(()) => {
                if let Some(seq) = seq {
                    // The bytes out, and what the lane's meter counts as taken.
                    let len = self.written_len(seq);
                    self.count_out(len);
                    self.down.lanes[lane].written += len;
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
                if !self.down.closed {
                    let name = self.down.name.clone();
                    self.downstream_settled(Event::DownstreamLost {
                        error: NodeError::new(
                            ErrorKind::ConnectionLost,
                            format!("RDMA write to {name} failed: {status}"),
                        ),
                    });
                }
            }
        }
        if self.down.rdma_inflight == 0
            && !self.down.sending()
            && let Some(ev) = self.down.deferred.take()
        {
            self.events.push_back(ev);
        }
    }

    /// A frame landed in a slot granted on lane `lane` upstream (or the lane failed).
    pub(super) fn rdma_arrived(&mut self, lane: usize, wc: WorkCompletion) {
        if self.end.is_some() {
            return;
        }
        if let Err(status) = wc.status {
            if !self.up.end_received {
                self.upstream_lost(format!("RDMA from upstream failed: {status}"));
            }
            return;
        }
        let link = self.up.lanes[lane].rdma.as_mut().expect("completions come from the link");
        // Every write consumes a receive: post the next one.
        if let Err(e) = link.ep.post_recv(wc.wr_id) {
            self.abort(NodeError::new(ErrorKind::ConnectionLost, e.to_string()));
            return;
        }
        let Some(pos) = link.granted.iter().position(|s| u32::from(s.0) == wc.imm) else {
            self.abort(NodeError::new(
                ErrorKind::Protocol,
                format!("upstream wrote into slot {} that was not granted to it on lane {lane}", wc.imm),
            ));
            return;
        };
        let slot = link.granted.swap_remove(pos);
        // The write into this slot has completed (its receive completion is here); its window
        // is invalidated before anything reads the slot, so no later write with its key lands.
        if let Err(e) = self.up.nic_grants.landed(&mut link.ep, self.pool.mem_mut(), slot.0) {
            return self.abort(NodeError::new(ErrorKind::ConnectionLost, format!("ending the grant of a slot: {e}")));
        }
        let bytes: [u8; HEADER_LEN] = self.pool.slot(slot, 0, HEADER_LEN).try_into().expect("header");
        match Header::decode(&bytes) {
            Ok(h) if h.kind == Kind::Chunk => {
                if let Err((kind, message)) = self.check_chunk_header(lane, &h) {
                    self.pool.release(slot);
                    self.abort(NodeError::new(kind, message));
                    return;
                }
                if let Some(m) = self.up.lanes[lane].macs.as_mut() {
                    // The frame's MAC follows its payload in the slot.
                    let mac = self.pool.slot(slot, HEADER_LEN + h.len as usize, FRAME_MAC_LEN);
                    if m.verify(&bytes, &[], mac).is_err() {
                        self.pool.release(slot);
                        return self.abort(unauthentic_chunk(h.seq));
                    }
                }
                self.chunk_arrived(lane, slot, h.seq, h.digest);
            }
            Ok(h) => {
                if let Some(m) = self.up.lanes[lane].macs.as_mut() {
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
}

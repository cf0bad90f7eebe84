//! The sans-IO core of a chain node: events in, actions out.
//!
//! [`NodeMachine`] decides, for one push on one node, what happens to every chunk: forward it
//! downstream, write it locally, release its slot once both are done, when to acknowledge
//! upstream, when to sync and publish, and what to report. It does no I/O and reads no clock; the
//! event loop in `chain.rs` turns its [`Action`]s into io_uring (or plain) operations and feeds
//! their completions back as [`Event`]s. That makes the chain's logic testable step by step,
//! deterministically (see the tests below).
//!
//! Invariants the machine keeps:
//! - chunks are forwarded in chunk order, whatever order they became ready in, except that a
//!   replica hands on at once a chunk whose forward needs no place in that order (the tail's,
//!   one it does not send on, one that keeps the order of the lane it came on by itself: cut
//!   through as it arrived, or queued on its lane as it became ready), so its write and its slot
//!   do not wait for chunks still on a slower lane;
//! - a slot is released exactly once, after its forward and its write have both completed;
//! - the ack sent upstream never exceeds what this node *and* every node after it have written;
//! - a replica publishes only after END arrived and every chunk was written and synced;
//! - a replica whose own write fails keeps forwarding, so the rest of the chain still gets the data.
//!
//! The driver promises one thing in return: it reports [`Event::DownstreamLost`] or
//! [`Event::DownstreamResult`] only when no send to downstream is in flight, so that the slots the
//! machine releases on that event are idle.

use std::collections::{BTreeMap, HashMap};

use super::route::Route;
use crate::error::{ErrorKind, NodeError};
use crate::pool::SlotId;
use crate::wire::{Outcome, ReplicaReport};

/// What a node is in the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The source: reads chunks from files, never writes.
    Primary,
    /// A replica: receives, verifies, forwards and writes chunks, then publishes.
    Replica,
}

/// Something that happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// Chunk `seq` is in `slot` and its digest checked out.
    ChunkReady {
        /// Chunk number.
        seq: u64,
        /// Where it is.
        slot: SlotId,
        /// A replica: its forward keeps the order of the lane it came on without the machine's
        /// chunk order: its bytes went downstream as they arrived (cut through), or the hop has
        /// several lanes and the chunk goes on its lane's queue as it becomes ready (chunks
        /// become ready in the order they came on their lane).
        lane_order: bool,
    },
    /// Chunk `seq` arrived in `slot` but its bytes do not match the digest in its header.
    ChunkCorrupt {
        /// Chunk number.
        seq: u64,
        /// Where it is.
        slot: SlotId,
    },
    /// The send of chunk `seq` downstream completed.
    ForwardDone {
        /// Chunk number.
        seq: u64,
    },
    /// The local write of chunk `seq` completed.
    WriteDone {
        /// Chunk number.
        seq: u64,
    },
    /// The local write of chunk `seq` failed.
    WriteFailed {
        /// Chunk number.
        seq: u64,
        /// Why.
        error: NodeError,
    },
    /// Upstream sent END: no more chunks.
    UpstreamEnd,
    /// Downstream acknowledged chunks `0..through` as written there and beyond.
    DownstreamAck {
        /// Exclusive end of the acknowledged prefix.
        through: u64,
    },
    /// Downstream reported the outcome for itself and every node after it.
    DownstreamResult {
        /// One report per node, downstream first.
        reports: Vec<ReplicaReport>,
    },
    /// The connection to downstream broke.
    DownstreamLost {
        /// What broke.
        error: NodeError,
    },
    /// Syncing the staged files finished.
    SyncDone {
        /// Whether it worked.
        result: Result<(), NodeError>,
    },
    /// Publishing finished.
    PublishDone {
        /// Whether it worked.
        result: Result<(), NodeError>,
    },
}

/// Something to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Send chunk `seq` from `slot` downstream (queued in order behind earlier sends).
    Forward {
        /// Chunk number.
        seq: u64,
        /// Where it is.
        slot: SlotId,
    },
    /// Write chunk `seq` from `slot` to its staging file.
    Write {
        /// Chunk number.
        seq: u64,
        /// Where it is.
        slot: SlotId,
    },
    /// Return `slot` to the pool.
    Release {
        /// The slot.
        slot: SlotId,
    },
    /// Send END downstream (after every chunk).
    SendEnd,
    /// Tell upstream that chunks `0..through` are written here and beyond.
    AckUpstream {
        /// Exclusive end of the acknowledged prefix.
        through: u64,
    },
    /// fsync the staged files and directories.
    Sync,
    /// Publish the staged version.
    Publish,
    /// The push is over for this node: send these reports upstream (replica) or return them
    /// (primary). This node's own report comes first on a replica.
    Finish {
        /// One per node, this node first (replica), then downstream in chain order.
        reports: Vec<ReplicaReport>,
    },
    /// Async push, first replica: it has published, so upstream gets these reports now (this
    /// node published, the ones after it behind) and the push goes on down the chain.
    ReportEarly {
        /// This node first, then the nodes after it.
        reports: Vec<ReplicaReport>,
    },
    /// Give up: stop all I/O and report this error for this node.
    Abort {
        /// Why.
        error: NodeError,
    },
    /// A relay of a repaired push stops because a node after it died: like `Abort`, with the
    /// downstream reports as they came (the dead node's cause, the others cut off).
    Stop {
        /// Why this node stopped.
        error: NodeError,
        /// One per node after this one, in chain order.
        downstream: Vec<ReplicaReport>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Downstream {
    /// The tail has nobody after it.
    None,
    /// Connected; chunks `0..acked` are written there and beyond.
    Alive { acked: u64 },
    /// Done: it sent its result, or the connection broke (reports made up for it).
    Settled(Vec<ReplicaReport>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Own {
    /// Receiving and writing chunks.
    Receiving,
    /// A local write failed: no more writes, no publish; forwarding goes on.
    WriteFailed(NodeError),
    Syncing,
    Publishing,
    Done(Outcome),
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    slot: SlotId,
    forwarding: bool,
    writing: bool,
}

/// The state of one push on one node.
#[derive(Debug)]
pub(crate) struct NodeMachine {
    role: Role,
    node: String,
    downstream_nodes: Vec<String>,
    total: u64,
    /// Chunks ready and not handed on yet: their slot, and whether their forward keeps their
    /// lane's order by itself.
    ready: BTreeMap<u64, (SlotId, bool)>,
    /// The first chunk (passing this node) not handed on yet.
    next_dispatch: u64,
    /// Chunks handed on (a replica hands some on ahead of `next_dispatch`).
    dispatched: Vec<u64>,
    in_flight: HashMap<u64, InFlight>,
    written: Vec<u64>,
    written_through: u64,
    downstream: Downstream,
    own: Own,
    end_received: bool,
    end_sent: bool,
    acked_upstream: u64,
    finished: bool,
    route: Route,
    /// Async push, first replica: report upstream as soon as this node has published.
    report_early: bool,
    /// The primary repairs the chain: stop when a node downstream dies (see
    /// [`NodeMachine::set_stop_on_loss`]).
    stop_on_loss: bool,
}

impl NodeMachine {
    /// A machine for a push of `total` chunks. `node` is this node's name in the chain (empty on
    /// the primary); `downstream_nodes` are the nodes after it, in order.
    pub(crate) fn new(role: Role, node: impl Into<String>, downstream_nodes: Vec<String>, total: u64) -> Self {
        let downstream = if downstream_nodes.is_empty() { Downstream::None } else { Downstream::Alive { acked: 0 } };
        Self {
            role,
            node: node.into(),
            downstream_nodes,
            total,
            ready: BTreeMap::new(),
            next_dispatch: 0,
            dispatched: vec![0; total.div_ceil(64) as usize],
            in_flight: HashMap::new(),
            written: vec![0; total.div_ceil(64) as usize],
            written_through: 0,
            downstream,
            own: Own::Receiving,
            end_received: role == Role::Primary,
            end_sent: false,
            acked_upstream: 0,
            finished: false,
            route: Route::everything(),
            report_early: false,
            stop_on_loss: false,
        }
    }

    /// Async push on the first replica: once this node has published, report it (and the
    /// nodes after it as behind) upstream without waiting for them.
    pub(crate) fn set_report_early(&mut self) {
        self.report_early = true;
    }

    /// A push the primary repairs: when a node after this one dies (the connection to it breaks
    /// or stalls, or its report names a node that did) before END arrived, this relay stops too,
    /// keeping what it journaled, rather than take the rest of the push alone. The primary then
    /// feeds it and the nodes cut off behind it in one repair push over the chain closed
    /// around the dead node, instead of one after the other over its own link.
    pub(crate) fn set_stop_on_loss(&mut self) {
        self.stop_on_loss = true;
    }

    /// Restricts the push on this node to its route: it dispatches only the chunks that pass
    /// it, writes only those it stores (the others count as written here), and forwards only
    /// those that go onward.
    pub(crate) fn with_route(mut self, route: Route) -> Self {
        if self.role == Role::Replica && !route.is_everything() {
            for seq in 0..self.total {
                if !route.here(seq) {
                    self.written[(seq / 64) as usize] |= 1 << (seq % 64);
                }
            }
            self.written_through = 0;
            self.mark_through();
        }
        self.route = route;
        self
    }

    /// Emits what a fresh push can do before any event (an empty push: END, or sync on a tail
    /// that already has END).
    pub(crate) fn start(&mut self, out: &mut Vec<Action>) {
        self.progress(out);
    }

    /// This node's name in the chain.
    pub(crate) fn node(&self) -> &str {
        &self.node
    }

    /// The nodes after this one.
    pub(crate) fn downstream_nodes(&self) -> &[String] {
        &self.downstream_nodes
    }

    /// Whether the machine has emitted `Finish` or `Abort`.
    #[cfg(test)]
    pub(crate) fn is_finished(&self) -> bool {
        self.finished
    }

    /// The first chunk not handed on yet (chunks after it that arrived wait for it).
    pub(crate) fn next_dispatch(&self) -> u64 {
        self.next_dispatch
    }

    /// Whether chunks still go downstream.
    pub(crate) fn downstream_alive(&self) -> bool {
        matches!(self.downstream, Downstream::Alive { .. })
    }

    /// Handles one event and appends the resulting actions to `out`.
    pub(crate) fn handle(&mut self, event: Event, out: &mut Vec<Action>) {
        if self.finished {
            return;
        }
        match event {
            Event::ChunkReady { seq, slot, lane_order } => {
                if seq < self.next_dispatch
                    || seq >= self.total
                    || !self.route.passes(seq)
                    || self.is_dispatched(seq)
                    || self.ready.insert(seq, (slot, lane_order)).is_some()
                {
                    self.abort(ErrorKind::Protocol, format!("chunk {seq} arrived twice or out of range"), out);
                    return;
                }
            }
            Event::ChunkCorrupt { seq, slot } => {
                // Only replicas see corrupt chunks: the primary computes the digests it sends.
                out.push(Action::Release { slot });
                let what = format!(
                    "digest mismatch in chunk {seq}: the bytes received do not match the digest the primary computed"
                );
                self.abort(ErrorKind::DigestMismatch, what, out);
                return;
            }
            Event::ForwardDone { seq } => {
                if let Some(f) = self.in_flight.get_mut(&seq) {
                    f.forwarding = false;
                }
                self.maybe_release(seq, out);
            }
            Event::WriteDone { seq } => {
                if let Some(f) = self.in_flight.get_mut(&seq) {
                    f.writing = false;
                }
                self.mark_written(seq);
                self.maybe_release(seq, out);
            }
            Event::WriteFailed { seq, error } => {
                if let Some(f) = self.in_flight.get_mut(&seq) {
                    f.writing = false;
                }
                if self.own == Own::Receiving {
                    self.own = Own::WriteFailed(error);
                }
                self.maybe_release(seq, out);
            }
            Event::UpstreamEnd => self.end_received = true,
            Event::DownstreamAck { through } => {
                if let Downstream::Alive { acked } = &mut self.downstream {
                    *acked = (*acked).max(through.min(self.next_dispatch));
                }
            }
            Event::DownstreamResult { reports } => {
                self.settle_downstream(reports, out);
                if self.maybe_stop(out) {
                    return;
                }
            }
            Event::DownstreamLost { error } => {
                if self.downstream_alive() {
                    let first = self.downstream_nodes[0].clone();
                    let mut reports = vec![ReplicaReport::failed(&first, error)];
                    for n in &self.downstream_nodes[1..] {
                        reports.push(ReplicaReport::failed(
                            n,
                            NodeError::new(ErrorKind::Aborted, format!("not reached: the chain broke at {first}")),
                        ));
                    }
                    self.settle_downstream(reports, out);
                    if self.maybe_stop(out) {
                        return;
                    }
                }
            }
            Event::SyncDone { result } => {
                if self.own == Own::Syncing {
                    match result {
                        Ok(()) => {
                            self.own = Own::Publishing;
                            out.push(Action::Publish);
                        }
                        Err(e) => self.own = Own::Done(Outcome::Failed(e)),
                    }
                }
            }
            Event::PublishDone { result } => {
                if self.own == Own::Publishing {
                    self.own = Own::Done(match result {
                        Ok(()) => Outcome::Published,
                        Err(e) => Outcome::Failed(e),
                    });
                }
            }
        }
        self.progress(out);
    }

    fn abort(&mut self, kind: ErrorKind, message: String, out: &mut Vec<Action>) {
        self.finished = true;
        out.push(Action::Abort { error: NodeError::new(kind, message) });
    }

    /// A relay with `stop_on_loss` stops when a node after it died (lost or stalled; not one
    /// that refused corrupt bytes, which the primary retries on its own) while chunks are still
    /// to come. Returns whether it stopped.
    fn maybe_stop(&mut self, out: &mut Vec<Action>) -> bool {
        if !self.stop_on_loss || self.role != Role::Replica || self.end_received || self.own != Own::Receiving {
            return false;
        }
        let Downstream::Settled(reports) = &self.downstream else { return false };
        let Some(dead) = reports.iter().find(|r| {
            matches!(&r.outcome, Outcome::Failed(e) if matches!(e.kind, ErrorKind::ConnectionLost | ErrorKind::Stalled))
        }) else {
            return false;
        };
        let error = NodeError::new(
            ErrorKind::Aborted,
            format!("stopped so that the primary repairs the chain around {}", dead.node),
        );
        let downstream = reports.clone();
        self.finished = true;
        out.push(Action::Stop { error, downstream });
        true
    }

    fn settle_downstream(&mut self, mut reports: Vec<ReplicaReport>, out: &mut Vec<Action>) {
        if !self.downstream_alive() {
            return;
        }
        // A report list must name every node after this one, in order; fill in what is missing.
        for n in self.downstream_nodes.iter().skip(reports.len()) {
            reports.push(ReplicaReport::failed(
                n,
                NodeError::new(ErrorKind::Protocol, "no report received for this node"),
            ));
        }
        reports.truncate(self.downstream_nodes.len());
        self.downstream = Downstream::Settled(reports);
        // Nothing more goes downstream: the driver guarantees no send is in flight.
        let seqs: Vec<u64> = self.in_flight.keys().copied().collect();
        for seq in seqs {
            if let Some(f) = self.in_flight.get_mut(&seq) {
                f.forwarding = false;
            }
            self.maybe_release(seq, out);
        }
    }

    fn mark_written(&mut self, seq: u64) {
        self.written[(seq / 64) as usize] |= 1 << (seq % 64);
        self.mark_through();
    }

    fn mark_through(&mut self) {
        while self.written_through < self.total
            && self.written[(self.written_through / 64) as usize] & (1 << (self.written_through % 64)) != 0
        {
            self.written_through += 1;
        }
    }

    fn maybe_release(&mut self, seq: u64, out: &mut Vec<Action>) {
        if let Some(f) = self.in_flight.get(&seq)
            && !f.forwarding
            && !f.writing
        {
            out.push(Action::Release { slot: f.slot });
            self.in_flight.remove(&seq);
        }
    }

    fn writes_local(&self) -> bool {
        self.role == Role::Replica && self.own == Own::Receiving
    }

    fn is_dispatched(&self, seq: u64) -> bool {
        self.dispatched[(seq / 64) as usize] & (1 << (seq % 64)) != 0
    }

    /// Hands chunk `seq` in `slot` on: forward, write, or release.
    fn dispatch(&mut self, seq: u64, slot: SlotId, out: &mut Vec<Action>) {
        self.dispatched[(seq / 64) as usize] |= 1 << (seq % 64);
        let forwarding = self.downstream_alive() && self.route.onward(seq);
        let writing = self.writes_local() && self.route.here(seq);
        if forwarding {
            out.push(Action::Forward { seq, slot });
        }
        if writing {
            out.push(Action::Write { seq, slot });
        } else if self.role == Role::Replica && self.route.here(seq) {
            // The local copy already failed: count the chunk as handled so that acks for
            // the rest of the chain keep flowing.
            self.mark_written(seq);
        }
        if forwarding || writing {
            self.in_flight.insert(seq, InFlight { slot, forwarding, writing });
        } else {
            out.push(Action::Release { slot });
        }
    }

    fn progress(&mut self, out: &mut Vec<Action>) {
        // 1. Hand ready chunks on, in order (skipping those that do not pass this node, and
        //    those handed on ahead)...
        loop {
            while self.next_dispatch < self.total
                && (!self.route.passes(self.next_dispatch) || self.is_dispatched(self.next_dispatch))
            {
                self.next_dispatch += 1;
            }
            let Some((slot, _)) = self.ready.remove(&self.next_dispatch) else { break };
            self.dispatch(self.next_dispatch, slot, out);
        }
        // ...and on a replica, at once those whose forward needs no place in the order: chunks
        // that go nowhere further, or whose forward keeps its lane's order. A chunk that arrived
        // ahead of one still on a slower lane is written and its slot freed without waiting.
        if self.role == Role::Replica {
            let alive = self.downstream_alive();
            let free: Vec<u64> = self
                .ready
                .iter()
                .filter(|&(&seq, &(_, lane_order))| lane_order || !alive || !self.route.onward(seq))
                .map(|(&seq, _)| seq)
                .collect();
            for seq in free {
                let (slot, _) = self.ready.remove(&seq).expect("listed above");
                self.dispatch(seq, slot, out);
            }
        }
        let all_dispatched = self.end_received && self.next_dispatch == self.total;

        // 2. END follows the last chunk downstream.
        if all_dispatched && !self.end_sent && self.downstream_alive() {
            self.end_sent = true;
            out.push(Action::SendEnd);
        }

        // 3. Sync once every chunk is written.
        if all_dispatched
            && self.own == Own::Receiving
            && self.role == Role::Replica
            && self.written_through == self.total
        {
            self.own = Own::Syncing;
            out.push(Action::Sync);
        }
        if let Own::WriteFailed(e) = &self.own
            && all_dispatched
            && !self.in_flight.values().any(|f| f.writing)
        {
            self.own = Own::Done(Outcome::Failed(e.clone()));
        }

        // 4. Acknowledge what is written here and beyond. (ACK is progress; durability is what
        //    RESULT reports, after fsync and publish.)
        let local = match (&self.role, &self.own) {
            (Role::Replica, Own::Receiving | Own::Syncing | Own::Publishing | Own::Done(Outcome::Published)) => {
                self.written_through
            }
            _ => u64::MAX,
        };
        let remote = match self.downstream {
            Downstream::Alive { acked } => acked,
            _ => u64::MAX,
        };
        let through = local.min(remote).min(self.next_dispatch);
        if through > self.acked_upstream {
            self.acked_upstream = through;
            out.push(Action::AckUpstream { through });
        }

        // 4b. Async: report early once published here, while downstream still works.
        if self.report_early && self.own == Own::Done(Outcome::Published) && self.downstream_alive() {
            self.report_early = false;
            let mut reports = vec![ReplicaReport { node: self.node.clone(), outcome: Outcome::Published }];
            reports.extend(
                self.downstream_nodes.iter().map(|n| ReplicaReport { node: n.clone(), outcome: Outcome::Behind }),
            );
            out.push(Action::ReportEarly { reports });
        }

        // 5. Finish when this node is settled and downstream has reported.
        let own_settled = self.role == Role::Primary || matches!(self.own, Own::Done(_));
        // A primary whose downstream is settled has nobody left to send to: it stops reading
        // its source rather than reading the rest for nothing.
        let nothing_left =
            all_dispatched || (self.role == Role::Primary && matches!(self.downstream, Downstream::Settled(_)));
        if nothing_left && own_settled && !self.finished {
            let downstream_reports = match &self.downstream {
                Downstream::None => Some(Vec::new()),
                Downstream::Settled(r) => Some(r.clone()),
                Downstream::Alive { .. } => None,
            };
            if let Some(ds) = downstream_reports {
                let mut reports = Vec::with_capacity(ds.len() + 1);
                if let (Role::Replica, Own::Done(outcome)) = (self.role, &self.own) {
                    reports.push(ReplicaReport { node: self.node.clone(), outcome: outcome.clone() });
                }
                reports.extend(ds);
                self.finished = true;
                out.push(Action::Finish { reports });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(i: u16) -> SlotId {
        SlotId(i)
    }

    fn step(m: &mut NodeMachine, e: Event) -> Vec<Action> {
        let mut out = Vec::new();
        m.handle(e, &mut out);
        out
    }

    fn published(node: &str) -> ReplicaReport {
        ReplicaReport { node: node.into(), outcome: Outcome::Published }
    }

    #[test]
    fn relay_forwards_writes_and_releases_after_both() {
        let mut m = NodeMachine::new(Role::Replica, "r1", vec!["r2".into()], 2);
        let a = step(&mut m, Event::ChunkReady { seq: 0, slot: s(0), lane_order: false });
        assert_eq!(a, vec![Action::Forward { seq: 0, slot: s(0) }, Action::Write { seq: 0, slot: s(0) }]);
        assert_eq!(step(&mut m, Event::WriteDone { seq: 0 }), vec![]);
        // Written here but not yet acked downstream: no ack upstream.
        assert_eq!(step(&mut m, Event::ForwardDone { seq: 0 }), vec![Action::Release { slot: s(0) }]);
        assert_eq!(step(&mut m, Event::DownstreamAck { through: 1 }), vec![Action::AckUpstream { through: 1 }]);
    }

    #[test]
    fn out_of_order_reads_are_sent_in_order() {
        let mut m = NodeMachine::new(Role::Primary, "", vec!["r1".into()], 3);
        assert_eq!(step(&mut m, Event::ChunkReady { seq: 1, slot: s(1), lane_order: false }), vec![]);
        assert_eq!(step(&mut m, Event::ChunkReady { seq: 2, slot: s(2), lane_order: false }), vec![]);
        let a = step(&mut m, Event::ChunkReady { seq: 0, slot: s(0), lane_order: false });
        assert_eq!(
            a,
            vec![
                Action::Forward { seq: 0, slot: s(0) },
                Action::Forward { seq: 1, slot: s(1) },
                Action::Forward { seq: 2, slot: s(2) },
                Action::SendEnd,
            ]
        );
    }

    /// Several lanes (`push --lanes`): a replica sees chunks out of order across lanes, and
    /// END (on lane 0) may come before chunks still on another lane.
    #[test]
    fn a_replica_takes_chunks_out_of_order_across_lanes_and_acks_only_a_written_prefix() {
        let mut m = NodeMachine::new(Role::Replica, "r2", vec![], 3);
        // Chunk 1 (lane 1) before chunk 0 (lane 0): the tail forwards nothing, so it writes
        // chunk 1 at once and frees its slot, whatever lane chunk 0 is still on.
        let a = step(&mut m, Event::ChunkReady { seq: 1, slot: s(1), lane_order: false });
        assert_eq!(a, vec![Action::Write { seq: 1, slot: s(1) }]);
        assert_eq!(m.next_dispatch(), 0);
        // Written: no ack, the prefix is still empty.
        assert_eq!(step(&mut m, Event::WriteDone { seq: 1 }), vec![Action::Release { slot: s(1) }]);
        let a = step(&mut m, Event::ChunkReady { seq: 0, slot: s(0), lane_order: false });
        assert_eq!(a, vec![Action::Write { seq: 0, slot: s(0) }]);
        assert_eq!(m.next_dispatch(), 2);
        let a = step(&mut m, Event::WriteDone { seq: 0 });
        assert_eq!(a, vec![Action::Release { slot: s(0) }, Action::AckUpstream { through: 2 }]);
        // END before chunk 2 (still on lane 1): nothing is synced yet.
        assert_eq!(step(&mut m, Event::UpstreamEnd), vec![]);
        // A chunk that came twice (on two lanes) is refused.
        let mut twice = NodeMachine::new(Role::Replica, "r3", vec![], 3);
        step(&mut twice, Event::ChunkReady { seq: 2, slot: s(2), lane_order: false });
        let a = step(&mut twice, Event::ChunkReady { seq: 2, slot: s(3), lane_order: false });
        assert!(matches!(&a[..], [Action::Abort { error }] if error.kind == ErrorKind::Protocol), "{a:?}");
        assert_eq!(
            step(&mut m, Event::ChunkReady { seq: 2, slot: s(2), lane_order: false }),
            vec![Action::Write { seq: 2, slot: s(2) }]
        );
        let a = step(&mut m, Event::WriteDone { seq: 2 });
        assert_eq!(a, vec![Action::Release { slot: s(2) }, Action::Sync, Action::AckUpstream { through: 3 }]);
    }

    #[test]
    fn a_relay_hands_on_at_once_only_the_chunks_whose_forward_keeps_its_lanes_order() {
        let mut m = NodeMachine::new(Role::Replica, "r1", vec!["r2".into()], 3);
        // Chunk 2 arrived whole ahead of 0 and 1 on a hop of one lane: its forward keeps its
        // place in chunk order.
        assert_eq!(step(&mut m, Event::ChunkReady { seq: 2, slot: s(2), lane_order: false }), vec![]);
        // Chunk 1 went downstream piece by piece as it arrived (or goes on its own lane's
        // queue): written, and its forward settled, at once.
        let a = step(&mut m, Event::ChunkReady { seq: 1, slot: s(1), lane_order: true });
        assert_eq!(a, vec![Action::Forward { seq: 1, slot: s(1) }, Action::Write { seq: 1, slot: s(1) }]);
        assert_eq!(step(&mut m, Event::WriteDone { seq: 1 }), vec![]);
        assert_eq!(step(&mut m, Event::ForwardDone { seq: 1 }), vec![Action::Release { slot: s(1) }]);
        assert_eq!(m.next_dispatch(), 0);
        // Chunk 0: it, then 2, in order; nothing is acked before 0 is written and acked below.
        let a = step(&mut m, Event::ChunkReady { seq: 0, slot: s(0), lane_order: false });
        assert_eq!(
            a,
            vec![
                Action::Forward { seq: 0, slot: s(0) },
                Action::Write { seq: 0, slot: s(0) },
                Action::Forward { seq: 2, slot: s(2) },
                Action::Write { seq: 2, slot: s(2) },
            ]
        );
        assert_eq!(m.next_dispatch(), 3);
        step(&mut m, Event::WriteDone { seq: 0 });
        step(&mut m, Event::WriteDone { seq: 2 });
        assert_eq!(step(&mut m, Event::DownstreamAck { through: 3 }), vec![Action::AckUpstream { through: 3 }]);
    }

    #[test]
    fn tail_syncs_publishes_and_reports_after_end() {
        let mut m = NodeMachine::new(Role::Replica, "r2", vec![], 1);
        step(&mut m, Event::ChunkReady { seq: 0, slot: s(0), lane_order: false });
        let a = step(&mut m, Event::WriteDone { seq: 0 });
        assert_eq!(a, vec![Action::Release { slot: s(0) }, Action::AckUpstream { through: 1 }]);
        assert_eq!(step(&mut m, Event::UpstreamEnd), vec![Action::Sync]);
        assert_eq!(step(&mut m, Event::SyncDone { result: Ok(()) }), vec![Action::Publish]);
        let a = step(&mut m, Event::PublishDone { result: Ok(()) });
        assert_eq!(a, vec![Action::Finish { reports: vec![published("r2")] }]);
        assert!(m.is_finished());
    }

    #[test]
    fn empty_push_publishes_on_end() {
        let mut m = NodeMachine::new(Role::Replica, "r1", vec![], 0);
        assert_eq!(step(&mut m, Event::UpstreamEnd), vec![Action::Sync]);
    }

    #[test]
    fn relay_reports_itself_then_downstream() {
        let mut m = NodeMachine::new(Role::Replica, "r1", vec!["r2".into(), "r3".into()], 0);
        assert_eq!(step(&mut m, Event::UpstreamEnd), vec![Action::SendEnd, Action::Sync]);
        step(&mut m, Event::SyncDone { result: Ok(()) });
        assert_eq!(step(&mut m, Event::PublishDone { result: Ok(()) }), vec![]);
        let a = step(&mut m, Event::DownstreamResult { reports: vec![published("r2"), published("r3")] });
        assert_eq!(a, vec![Action::Finish { reports: vec![published("r1"), published("r2"), published("r3")] }]);
    }

    #[test]
    fn lost_downstream_releases_slots_and_names_every_node_after_it() {
        let mut m = NodeMachine::new(Role::Replica, "r1", vec!["r2".into(), "r3".into()], 2);
        step(&mut m, Event::ChunkReady { seq: 0, slot: s(0), lane_order: false });
        step(&mut m, Event::WriteDone { seq: 0 });
        let lost = NodeError::new(ErrorKind::ConnectionLost, "connection to r2 lost");
        let a = step(&mut m, Event::DownstreamLost { error: lost.clone() });
        // The slot is free now, and r1 alone holds chunk 0 durably: that is what it acks.
        assert_eq!(a, vec![Action::Release { slot: s(0) }, Action::AckUpstream { through: 1 }]);
        let a = step(&mut m, Event::ChunkReady { seq: 1, slot: s(1), lane_order: false });
        assert_eq!(a, vec![Action::Write { seq: 1, slot: s(1) }], "no forward after the loss");
        step(&mut m, Event::WriteDone { seq: 1 });
        step(&mut m, Event::UpstreamEnd);
        step(&mut m, Event::SyncDone { result: Ok(()) });
        let a = step(&mut m, Event::PublishDone { result: Ok(()) });
        let Some(Action::Finish { reports }) = a.last() else { panic!("{a:?}") };
        assert_eq!(reports[0], published("r1"));
        assert_eq!(reports[1], ReplicaReport::failed("r2", lost));
        assert!(matches!(&reports[2].outcome, Outcome::Failed(e) if e.kind == ErrorKind::Aborted));
    }

    #[test]
    fn repaired_push_relay_stops_when_a_node_after_it_dies() {
        let mut m = NodeMachine::new(Role::Replica, "r1", vec!["r2".into(), "r3".into()], 3);
        m.set_stop_on_loss();
        step(&mut m, Event::ChunkReady { seq: 0, slot: s(0), lane_order: false });
        step(&mut m, Event::WriteDone { seq: 0 });
        let lost = NodeError::new(ErrorKind::ConnectionLost, "connection to r2 lost");
        let a = step(&mut m, Event::DownstreamLost { error: lost.clone() });
        let Some(Action::Stop { error, downstream }) = a.last() else { panic!("{a:?}") };
        assert_eq!(error.kind, ErrorKind::Aborted);
        assert!(error.message.contains("around r2"), "{error}");
        assert_eq!(downstream[0], ReplicaReport::failed("r2", lost));
        assert!(matches!(&downstream[1].outcome, Outcome::Failed(e) if e.kind == ErrorKind::Aborted));
        assert!(m.is_finished());
        assert_eq!(
            step(&mut m, Event::ChunkReady { seq: 1, slot: s(1), lane_order: false }),
            vec![],
            "nothing after stopping"
        );
    }

    #[test]
    fn repaired_push_relay_stops_on_a_report_naming_a_dead_node_but_not_a_corrupt_one() {
        let dead = NodeError::new(ErrorKind::ConnectionLost, "connection to r3 lost");
        let mut m = NodeMachine::new(Role::Replica, "r1", vec!["r2".into(), "r3".into()], 3);
        m.set_stop_on_loss();
        step(&mut m, Event::ChunkReady { seq: 0, slot: s(0), lane_order: false });
        let stopped = NodeError::new(ErrorKind::Aborted, "stopped");
        let a = step(
            &mut m,
            Event::DownstreamResult {
                reports: vec![ReplicaReport::failed("r2", stopped), ReplicaReport::failed("r3", dead)],
            },
        );
        assert!(matches!(a.last(), Some(Action::Stop { .. })), "{a:?}");

        let mut m = NodeMachine::new(Role::Replica, "r1", vec!["r2".into()], 3);
        m.set_stop_on_loss();
        let corrupt = NodeError::new(ErrorKind::DigestMismatch, "chunk 0");
        let a = step(&mut m, Event::DownstreamResult { reports: vec![ReplicaReport::failed("r2", corrupt)] });
        assert!(!a.iter().any(|a| matches!(a, Action::Stop { .. })), "{a:?}");
        assert!(!m.is_finished());
    }

    #[test]
    fn repaired_push_relay_with_every_chunk_finishes_instead_of_stopping() {
        let mut m = NodeMachine::new(Role::Replica, "r1", vec!["r2".into()], 1);
        m.set_stop_on_loss();
        step(&mut m, Event::ChunkReady { seq: 0, slot: s(0), lane_order: false });
        step(&mut m, Event::UpstreamEnd);
        let lost = NodeError::new(ErrorKind::ConnectionLost, "connection to r2 lost");
        let a = step(&mut m, Event::DownstreamLost { error: lost });
        assert!(!a.iter().any(|a| matches!(a, Action::Stop { .. })), "{a:?}");
    }

    #[test]
    fn failed_write_keeps_forwarding_and_reports_failure() {
        let mut m = NodeMachine::new(Role::Replica, "r1", vec!["r2".into()], 2);
        step(&mut m, Event::ChunkReady { seq: 0, slot: s(0), lane_order: false });
        let full = NodeError::new(ErrorKind::DiskFull, "No space left on device");
        step(&mut m, Event::WriteFailed { seq: 0, error: full.clone() });
        step(&mut m, Event::ForwardDone { seq: 0 });
        let a = step(&mut m, Event::ChunkReady { seq: 1, slot: s(1), lane_order: false });
        assert_eq!(a, vec![Action::Forward { seq: 1, slot: s(1) }]);
        step(&mut m, Event::ForwardDone { seq: 1 });
        assert_eq!(step(&mut m, Event::UpstreamEnd), vec![Action::SendEnd]);
        let a = step(&mut m, Event::DownstreamResult { reports: vec![published("r2")] });
        assert_eq!(
            a.last(),
            Some(&Action::Finish { reports: vec![ReplicaReport::failed("r1", full), published("r2")] })
        );
    }

    #[test]
    fn corrupt_chunk_aborts_and_frees_its_slot() {
        let mut m = NodeMachine::new(Role::Replica, "r1", vec![], 3);
        let a = step(&mut m, Event::ChunkCorrupt { seq: 0, slot: s(4) });
        assert_eq!(a[0], Action::Release { slot: s(4) });
        assert!(matches!(&a[1], Action::Abort { error } if error.kind == ErrorKind::DigestMismatch));
        assert!(m.is_finished());
        assert_eq!(step(&mut m, Event::UpstreamEnd), vec![]);
    }

    #[test]
    fn ack_is_the_minimum_of_local_and_downstream() {
        let mut m = NodeMachine::new(Role::Replica, "r1", vec!["r2".into()], 4);
        for i in 0..4 {
            step(&mut m, Event::ChunkReady { seq: i, slot: s(i as u16), lane_order: false });
        }
        assert_eq!(step(&mut m, Event::DownstreamAck { through: 3 }), vec![]);
        step(&mut m, Event::WriteDone { seq: 1 });
        assert_eq!(step(&mut m, Event::WriteDone { seq: 0 }), vec![Action::AckUpstream { through: 2 }]);
    }

    #[test]
    fn primary_stops_as_soon_as_its_downstream_is_gone() {
        let mut m = NodeMachine::new(Role::Primary, "", vec!["r1".into(), "r2".into()], 1000);
        step(&mut m, Event::ChunkReady { seq: 0, slot: s(0), lane_order: false });
        step(&mut m, Event::ForwardDone { seq: 0 });
        let lost = NodeError::new(ErrorKind::ConnectionLost, "connection to r1 lost");
        let a = step(&mut m, Event::DownstreamLost { error: lost.clone() });
        let Some(Action::Finish { reports }) = a.last() else { panic!("{a:?}") };
        assert_eq!(reports[0], ReplicaReport::failed("r1", lost));
        assert_eq!(reports.len(), 2);
        assert!(m.is_finished(), "999 chunks are not read for nobody");
    }

    #[test]
    fn primary_finishes_with_downstream_reports() {
        let mut m = NodeMachine::new(Role::Primary, "", vec!["r1".into()], 1);
        step(&mut m, Event::ChunkReady { seq: 0, slot: s(0), lane_order: false });
        assert_eq!(step(&mut m, Event::ForwardDone { seq: 0 }), vec![Action::Release { slot: s(0) }]);
        let a = step(&mut m, Event::DownstreamAck { through: 1 });
        assert_eq!(a, vec![Action::AckUpstream { through: 1 }]);
        let a = step(&mut m, Event::DownstreamResult { reports: vec![published("r1")] });
        assert_eq!(a, vec![Action::Finish { reports: vec![published("r1")] }]);
    }
}

//! The downstream hop's deadline, driven by time passed in.
//!
//! A downstream that takes nothing while chunks wait for it, for `hop_timeout` times the number
//! of nodes after this one ([`hop_limit`]), is stalled: the node reports it and goes on without
//! it. Scaled so that the node nearest a hung replica gives up on it first: the nodes before it
//! only see backpressure, which ends as soon as that node lets go. (Upstream has no deadline of
//! its own: a node cut off by a hung upstream waits until the primary's repair supersedes its
//! session, or the idle timeout.)
//!
//! A lane of a hop of several has a second, much shorter deadline ([`LaneAcks`]): data it sent
//! that stays unacknowledged for [`LANE_DEAD_AFTER`] means its link is down (a rail failed), and
//! the hop is lost at once so that the repair moves its lanes to the rails left. Back-pressure
//! never counts there: a receiver that keeps its window shut has acknowledged every byte sent.
//!
//! [`HopStall`] and [`LaneAcks`] read no clock: the driver tells it when downstream made progress and gives it
//! a [`Tick`] with the time now whenever it looks; the session passes `Instant::now()`, the
//! simulated chain its virtual clock.

use std::time::{Duration, Instant};

use crate::error::{ErrorKind, NodeError};

/// The time now, and whether this node is waiting on downstream (a send queued or in flight).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tick {
    /// Now.
    pub now: Instant,
    /// Chunks (or END) wait for downstream to take them.
    pub waiting: bool,
}

/// The deadline `limit` passed with nothing taken downstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stalled {
    /// The deadline that passed.
    pub limit: Duration,
}

impl Stalled {
    /// The error this node reports for `node`, its downstream.
    pub(crate) fn error(&self, node: &str) -> NodeError {
        NodeError::new(
            ErrorKind::Stalled,
            format!("{node} made no progress for {} s (hung, or its link is down)", self.limit.as_secs()),
        )
    }
}

/// The deadline of a hop to a downstream with `nodes_after` nodes from it to the tail
/// (at least one).
pub(crate) fn hop_limit(hop_timeout: Duration, nodes_after: usize) -> Duration {
    hop_timeout * (nodes_after.max(1) as u32)
}

/// When downstream last took or answered something, while this node waited on it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HopStall {
    last: Instant,
}

impl HopStall {
    /// A hop that made progress at `now` (it just formed).
    pub(crate) fn new(now: Instant) -> Self {
        Self { last: now }
    }

    /// Downstream took or answered something at `now`.
    pub(crate) fn progress(&mut self, now: Instant) {
        self.last = now;
    }

    /// Looks at the hop: stalled when this node waits on downstream and `limit` passed since
    /// its last progress. The time not waiting does not count (only late while this node waits
    /// on it, not while it had nothing to send).
    pub(crate) fn tick(&mut self, tick: Tick, limit: Duration) -> Option<Stalled> {
        if !tick.waiting {
            self.last = tick.now;
            return None;
        }
        (tick.now.saturating_duration_since(self.last) >= limit).then_some(Stalled { limit })
    }
}

/// How long data a lane sent may stay unacknowledged, nothing acknowledged meanwhile, before
/// the lane counts as cut off (its rail's link down): a live receiver acknowledges within a
/// round trip, however slow its link, and a retransmission timer's first firing (200 ms at
/// least) fits.
pub(crate) const LANE_DEAD_AFTER: Duration = Duration::from_millis(500);

/// How often a session looks at its lanes' acknowledgements.
pub(crate) const LANE_LOOK_EVERY: Duration = Duration::from_millis(100);

/// A lane's sending side as the kernel reports it (`TCP_INFO`): segments in flight, and bytes
/// acknowledged so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Acks {
    /// Segments sent and not acknowledged.
    pub unacked: u32,
    /// Bytes acknowledged over the connection's life.
    pub bytes_acked: u64,
}

/// Whether a lane's link is down: data in flight and no byte acknowledged for a deadline.
///
/// Unlike the kernel's `TCP_USER_TIMEOUT`, which also counts the time a receiver keeps its
/// window shut (Linux 5.11 on: zero-window probes answered or not), this tells a dead link (data
/// in flight, nothing acknowledged) from back-pressure (nothing in flight: every byte sent was
/// acknowledged, the receiver takes no more yet). A link that goes down while the window is shut
/// has nothing in flight; the hop's stall deadline catches that one.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LaneAcks {
    /// Since when data was seen in flight with `bytes_acked` acknowledged, and no more since.
    waiting: Option<(Instant, u64)>,
}

impl LaneAcks {
    /// Looks at the lane at `now`: true when data has been in flight since at least `limit`
    /// ago with no byte acknowledged since.
    pub(crate) fn look(&mut self, now: Instant, acks: Acks, limit: Duration) -> bool {
        if acks.unacked == 0 {
            self.waiting = None;
            return false;
        }
        match self.waiting {
            Some((since, acked)) if acked == acks.bytes_acked => now.saturating_duration_since(since) >= limit,
            _ => {
                self.waiting = Some((now, acks.bytes_acked));
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lane_is_cut_off_only_when_what_it_sent_goes_unacknowledged() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let limit = LANE_DEAD_AFTER;
        let mut l = LaneAcks::default();
        let at = |m: u64| t0 + ms(m);
        // Data in flight, acknowledged as it goes: alive however long it takes.
        for (i, m) in (0..50).map(|i| (i, i * 100)) {
            assert!(!l.look(at(m), Acks { unacked: 10, bytes_acked: i * 1000 }, limit), "at {m} ms");
        }
        // A receiver that shut its window for 3 s: every byte sent was acknowledged.
        for m in (5000..8000).step_by(100) {
            assert!(!l.look(at(m), Acks { unacked: 0, bytes_acked: 50_000 }, limit), "at {m} ms");
        }
        // The window opens, data goes out, and nothing more is acknowledged: the clock starts at
        // the first look that sees it in flight.
        assert!(!l.look(at(8100), Acks { unacked: 4, bytes_acked: 50_000 }, limit));
        assert!(!l.look(at(8500), Acks { unacked: 4, bytes_acked: 50_000 }, limit));
        assert!(l.look(at(8600), Acks { unacked: 4, bytes_acked: 50_000 }, limit), "500 ms in flight unacknowledged");
        // One byte acknowledged starts it again.
        assert!(!l.look(at(8700), Acks { unacked: 4, bytes_acked: 50_001 }, limit));
        assert!(!l.look(at(9100), Acks { unacked: 4, bytes_acked: 50_001 }, limit));
        assert!(l.look(at(9200), Acks { unacked: 4, bytes_acked: 50_001 }, limit));
    }

    #[test]
    fn only_the_time_spent_waiting_counts() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let limit = hop_limit(s(10), 2);
        assert_eq!(limit, s(20));
        let mut h = HopStall::new(t0);
        // Idle for a minute: nothing was waiting, so nothing is late.
        assert_eq!(h.tick(Tick { now: t0 + s(60), waiting: false }, limit), None);
        assert_eq!(h.tick(Tick { now: t0 + s(79), waiting: true }, limit), None);
        assert_eq!(h.tick(Tick { now: t0 + s(80), waiting: true }, limit), Some(Stalled { limit }));
        h.progress(t0 + s(80));
        assert_eq!(h.tick(Tick { now: t0 + s(99), waiting: true }, limit), None);
        let e = h.tick(Tick { now: t0 + s(100), waiting: true }, limit).unwrap().error("r2:1");
        assert_eq!(e.kind, ErrorKind::Stalled);
        assert_eq!(e.message, "r2:1 made no progress for 20 s (hung, or its link is down)");
    }

    #[test]
    fn the_tail_counts_as_one_node() {
        assert_eq!(hop_limit(Duration::from_secs(3), 0), Duration::from_secs(3));
    }
}

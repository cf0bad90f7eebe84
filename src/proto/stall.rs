//! The downstream hop's deadline, driven by time passed in.
//!
//! A downstream that takes nothing while chunks wait for it, for `hop_timeout` times the number
//! of nodes after this one ([`hop_limit`]), is stalled: the node reports it and goes on without
//! it. Scaled so that the node nearest a hung replica gives up on it first: the nodes before it
//! only see backpressure, which ends as soon as that node lets go. (Upstream has no deadline of
//! its own: a node cut off by a hung upstream waits until the primary's repair supersedes its
//! session, or the idle timeout.)
//!
//! [`HopStall`] reads no clock: the driver tells it when downstream made progress and gives it
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

#[cfg(test)]
mod tests {
    use super::*;

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

//! The rule of a hop of several lanes (`push --lanes`) that the sessions and the sim share:
//! when a lane of the hop upstream may take a pool slot for its next frame.
//!
//! Chunks arrive out of order across lanes, and the machine hands them on in order, so a chunk
//! that arrives ahead of one still missing waits in its slot. Lanes running ahead could take
//! every slot, and the missing chunk would have none to land in: the chain would stop. So the
//! last `lanes` free slots are kept for the lanes that may still carry the missing chunk (those
//! not yet past it). Lane 0 also carries END: once END came there, lane 0 takes nothing more.
//!
//! And the rule the primary's lanes take chunks by near the end of a push
//! ([`leaves_to_others`]): a slow lane leaves the last chunks to the faster ones.

use std::time::{Duration, Instant};

/// Where END stands on the hop upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EndSeen {
    /// Not arrived.
    No,
    /// Arrived on lane 0 while chunks it counts were still on other lanes.
    Pending,
    /// Acted on: every chunk is here.
    Received,
}

/// Whether lane `lane` of `lanes` may take a slot for its next frame. `lane_next` is the next
/// chunk that lane may carry (lanes carry rising sequence numbers), `next_dispatch` the first
/// chunk the machine still waits for, `free_slots` the pool's free slots.
pub(crate) fn may_lease(
    lane: usize,
    lanes: usize,
    lane_next: u64,
    next_dispatch: u64,
    free_slots: usize,
    end: EndSeen,
) -> bool {
    if lanes == 1 {
        return true;
    }
    match end {
        EndSeen::Received => false,
        EndSeen::Pending if lane == 0 => false,
        EndSeen::No | EndSeen::Pending => lane_next <= next_dispatch || free_slots > lanes,
    }
}

/// How long a lane of the primary must have been sending before its rate counts for
/// [`leaves_to_others`] (slow start and the first chunks say little about it).
pub(crate) const RATE_AFTER: Duration = Duration::from_millis(250);

/// What one lane of the primary's hop has been handed and has drained: the bytes given to it
/// (every send or write, counted whole when submitted) and, from its first send on, what its
/// peer took (a TCP lane's `tcpi_bytes_acked`, an RDMA lane's completed writes; given by the
/// driver: this reads no clock and no socket).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct LaneMeter {
    handed: u64,
    /// The first send's time, and the bytes the connection had acknowledged then.
    start: Option<(Instant, u64)>,
}

/// A lane's load at one moment: bytes handed to it not yet acknowledged, and the rate it has
/// drained at since its first send (bytes per second; 0 while unknown).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LaneLoad {
    pub queued: u64,
    pub rate: f64,
}

impl LaneMeter {
    /// A send of `bytes` goes on the lane at `now`; `acked` is what its connection's peer has
    /// acknowledged so far (asked for on the first send only).
    pub(crate) fn handed(&mut self, bytes: u64, now: Instant, acked: impl FnOnce() -> Option<u64>) {
        if self.start.is_none() {
            self.start = Some((now, acked().unwrap_or(0)));
        }
        self.handed += bytes;
    }

    /// The lane's load at `now`, its connection's peer having acknowledged `acked` bytes.
    pub(crate) fn load(&self, now: Instant, acked: u64) -> LaneLoad {
        let Some((t0, acked0)) = self.start else { return LaneLoad { queued: 0, rate: 0.0 } };
        let delivered = acked.saturating_sub(acked0).min(self.handed);
        let elapsed = now.saturating_duration_since(t0);
        let rate = if elapsed >= RATE_AFTER { delivered as f64 / elapsed.as_secs_f64() } else { 0.0 };
        LaneLoad { queued: self.handed - delivered, rate }
    }
}

/// Whether lane `lane` of the primary's hop should leave the next chunk (`chunk` bytes) to the
/// other lanes, `left` bytes of chunks (that one included) being still untaken: when, at the
/// rates the lanes have drained at, it would finish that chunk later than the other lanes
/// would finish their own queues and everything left. Without this, near the end of a push a
/// slow lane takes a chunk that then ends up to a chunk's time on it after the fast lanes are
/// done (BENCHMARKS, "The slow lane's last chunk"). The fastest lane never leaves a chunk, and a
/// lane whose rate or whose others' rate is not known yet takes it: chunks always move.
pub(crate) fn leaves_to_others(lane: usize, loads: &[LaneLoad], chunk: u64, left: u64) -> bool {
    let me = loads[lane];
    if me.rate <= 0.0 || loads.iter().all(|l| l.rate <= me.rate) {
        return false;
    }
    let (mut queued, mut rate) = (0u64, 0f64);
    for (k, l) in loads.iter().enumerate() {
        if k != lane && l.rate > 0.0 {
            queued += l.queued;
            rate += l.rate;
        }
    }
    let mine = (me.queued + chunk) as f64 / me.rate;
    let theirs = (queued + left) as f64 / rate;
    mine > theirs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lane_ahead_of_the_missing_chunk_leaves_the_last_slots_to_the_others() {
        // One lane: no limit.
        assert!(may_lease(0, 1, 9, 0, 1, EndSeen::No));
        // Lane 1 is past chunk 4, which the machine waits for: it may not take the last 2.
        assert!(!may_lease(1, 2, 7, 4, 2, EndSeen::No));
        assert!(may_lease(1, 2, 7, 4, 3, EndSeen::No));
        // Lane 0, which may still carry chunk 4, takes the very last slot.
        assert!(may_lease(0, 2, 4, 4, 1, EndSeen::No));
        // END on lane 0 ahead of chunks on lane 1: lane 0 is done, lane 1 goes on.
        assert!(!may_lease(0, 2, 4, 4, 8, EndSeen::Pending));
        assert!(may_lease(1, 2, 4, 4, 1, EndSeen::Pending));
        assert!(!may_lease(1, 2, 4, 4, 8, EndSeen::Received));
    }

    const MIB: u64 = 1 << 20;

    fn load(queued: u64, rate: f64) -> LaneLoad {
        LaneLoad { queued, rate }
    }

    #[test]
    fn a_slow_lane_leaves_the_last_chunks_to_a_fast_one() {
        let (fast, slow) = (125e6, 31.25e6); // 1 Gbit/s and 250 Mbit/s
        let loads = [load(MIB, fast), load(MIB, slow)];
        // Plenty left: the slow lane takes its share.
        assert!(!leaves_to_others(1, &loads, 4 * MIB, 64 * MIB));
        // Four chunks left: the fast lane does them all (136 ms) before the slow one would
        // finish one more (168 ms).
        assert!(leaves_to_others(1, &loads, 4 * MIB, 16 * MIB));
        // The fastest lane never leaves one, however little is left.
        assert!(!leaves_to_others(0, &loads, 4 * MIB, 4 * MIB));
        // A rate not known yet (its own or the others'): the chunk is taken.
        assert!(!leaves_to_others(1, &[load(MIB, 0.0), load(MIB, slow)], 4 * MIB, 4 * MIB));
        assert!(!leaves_to_others(1, &[load(MIB, fast), load(MIB, 0.0)], 4 * MIB, 4 * MIB));
        // Equal lanes: each takes chunks to the end.
        assert!(!leaves_to_others(1, &[load(MIB, fast), load(MIB, fast)], 4 * MIB, 4 * MIB));
    }

    #[test]
    fn a_meter_counts_what_its_lane_was_handed_less_what_was_acknowledged() {
        let t0 = Instant::now();
        let mut m = LaneMeter::default();
        assert_eq!(m.load(t0, 0), load(0, 0.0));
        // The connection had acknowledged 1000 bytes (the handshake) before the first send.
        m.handed(4 * MIB, t0, || Some(1000));
        m.handed(4 * MIB, t0 + Duration::from_millis(10), || panic!("asked once, on the first send"));
        // Before RATE_AFTER: queued is known, the rate not yet.
        assert_eq!(m.load(t0 + Duration::from_millis(100), 1000 + MIB), load(7 * MIB, 0.0));
        let l = m.load(t0 + Duration::from_secs(1), 1000 + 6 * MIB);
        assert_eq!(l.queued, 2 * MIB);
        assert!((l.rate - 6.0 * MIB as f64).abs() < 1.0, "{l:?}");
    }

    /// Two lanes draining at fixed rates on a virtual clock (1 ms steps), each taking the next
    /// chunk once what it holds fits its socket buffer, as the primary's do: returns when each
    /// lane finished, in ms, and the chunks it took.
    fn drain(rates: [f64; 2], chunks: u64, chunk: u64, rule: bool) -> ([u64; 2], [u64; 2]) {
        const SNDBUF: u64 = 2 << 20;
        let t0 = Instant::now();
        let mut meters = [LaneMeter::default(); 2];
        let (mut held, mut acked, mut took, mut done) = ([0u64; 2], [0f64; 2], [0u64; 2], [0u64; 2]);
        let mut left = chunks;
        for ms in 0..100_000u64 {
            let now = t0 + Duration::from_millis(ms);
            for k in 0..2 {
                let step = (rates[k] / 1000.0).min(held[k] as f64);
                held[k] -= step as u64;
                acked[k] += step.floor();
                if held[k] == 0 && left == 0 && done[k] == 0 {
                    done[k] = ms;
                }
            }
            if done.iter().all(|&d| d > 0) {
                break;
            }
            for k in 0..2 {
                if left == 0 || held[k] > SNDBUF {
                    continue;
                }
                let loads: Vec<LaneLoad> = (0..2).map(|j| meters[j].load(now, acked[j] as u64)).collect();
                if rule && leaves_to_others(k, &loads, chunk, left * chunk) {
                    continue;
                }
                meters[k].handed(chunk, now, || Some(0));
                held[k] += chunk;
                took[k] += 1;
                left -= 1;
            }
        }
        (done, took)
    }

    #[test]
    fn with_the_rule_a_slow_lane_ends_with_the_fast_one() {
        // 1 GiB in 4 MiB chunks over 1 Gbit/s and 250 Mbit/s: 6.87 s at the sum of the rates.
        let rates = [125e6, 31.25e6];
        let (greedy, greedy_took) = drain(rates, 256, 4 * MIB, false);
        let (ruled, ruled_took) = drain(rates, 256, 4 * MIB, true);
        let fast_chunk_ms = (4 * MIB) as f64 / rates[0] * 1000.0; // 33.5 ms
        let apart = |d: [u64; 2]| d[0].abs_diff(d[1]) as f64;
        // Taking whatever it can, the slow lane ends well after the fast one (134 ms: its one
        // chunk more than its share, at 250 Mbit/s).
        assert!(apart(greedy) > 3.0 * fast_chunk_ms, "greedy {greedy:?} {greedy_took:?}");
        // With the rule, within one fast chunk of each other, and the push ends that much sooner.
        assert!(apart(ruled) <= fast_chunk_ms + 2.0, "ruled {ruled:?} {ruled_took:?}");
        let (end_greedy, end_ruled) = (greedy.iter().max().unwrap(), ruled.iter().max().unwrap());
        assert!(end_ruled + 60 < *end_greedy, "ruled {ruled:?}, greedy {greedy:?}");
        // The slow lane still carries its share (about a fifth) up to the end.
        assert!((48..=52).contains(&ruled_took[1]), "{ruled_took:?}");
        // Equal lanes: the rule changes nothing.
        assert_eq!(drain([125e6; 2], 64, 4 * MIB, true), drain([125e6; 2], 64, 4 * MIB, false));
    }
}

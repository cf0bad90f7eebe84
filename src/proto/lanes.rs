//! The rule of a hop of several lanes (`push --lanes`) that the sessions and the sim share:
//! when a lane of the hop upstream may take a pool slot for its next frame.
//!
//! Chunks arrive out of order across lanes, and the machine hands them on in order, so a chunk
//! that arrives ahead of one still missing waits in its slot. Lanes running ahead could take
//! every slot, and the missing chunk would have none to land in: the chain would stop. So the
//! last `lanes` free slots are kept for the lanes that may still carry the missing chunk (those
//! not yet past it). Lane 0 also carries END: once END came there, lane 0 takes nothing more.

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
}

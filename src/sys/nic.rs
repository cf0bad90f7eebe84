//! What the NIC reads and writes in the pool: RDMA writes posted from leased bytes, and pool
//! slots granted to the peer, which its writes land in.
//!
//! Both hold a [`Lease`] for as long as the NIC may touch the bytes: a write until its work
//! completion is polled, a grant until a frame has landed in the slot. The queue pairs are
//! destroyed before [`Writes::settle_all`] / [`Grants::settle_all`] give everything back.

use std::collections::VecDeque;

use crate::sys::mem::{Access, Lease, Pinned, Span};
use crate::sys::rdma::verbs::{Endpoint, VerbsError};

/// RDMA writes posted and not completed, each holding its bytes for reading.
#[derive(Debug, Default)]
pub(crate) struct Writes {
    out: VecDeque<(u64, Lease)>,
}

impl Writes {
    /// Posts an RDMA WRITE WITH IMM of the bytes `span` of `mem` (the pool `ep` registered)
    /// to `remote` (a slot the peer granted) with key `rkey`; its completion carries `wr_id`,
    /// which must be unique among the writes out.
    ///
    /// # Panics
    /// When `span` is not inside the registered mapping, or would race (see `sys::mem`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn post(
        &mut self,
        ep: &Endpoint,
        mem: &mut Pinned,
        wr_id: u64,
        span: Span,
        remote: u64,
        rkey: u32,
        imm: u32,
    ) -> Result<(), VerbsError> {
        assert!(span.off + span.len as usize <= mem.len(), "RDMA writes come from the registered mapping");
        let lease = mem.lease(span, Access::Read);
        // SAFETY: the bytes lie in the pool the endpoint registered (checked above) and are
        // leased for reading: nobody writes them until the write's completion gives the lease
        // back (`completed`), or the queue pair is gone (`settle_all`).
        match unsafe { ep.post_write(wr_id, lease.ptr(), lease.len(), remote, rkey, Some(imm)) } {
            Ok(()) => {
                self.out.push_back((wr_id, lease));
                Ok(())
            }
            Err(e) => {
                mem.settle(lease);
                Err(e)
            }
        }
    }

    /// The write `wr_id` completed (or was flushed): its bytes are the caller's again.
    pub(crate) fn completed(&mut self, mem: &mut Pinned, wr_id: u64) {
        if let Some(i) = self.out.iter().position(|(w, _)| *w == wr_id)
            && let Some((_, lease)) = self.out.remove(i)
        {
            mem.settle(lease);
        }
    }

    /// Gives every lease back; only once the queue pair that posted them is destroyed.
    pub(crate) fn settle_all(&mut self, mem: &mut Pinned) {
        for (_, lease) in self.out.drain(..) {
            mem.settle(lease);
        }
    }
}

/// Pool slots granted to the peer: its NIC may write into each until a frame lands there.
///
/// A grant binds the endpoint's memory window over the slot (the key goes to the peer with
/// the credit); a landing invalidates it before the slot's bytes are the caller's again, so a
/// write with that key after the frame landed (or into any other slot) is refused by the NIC.
#[derive(Debug, Default)]
pub(crate) struct Grants {
    held: Vec<(u16, Lease)>,
}

impl Grants {
    /// Grants slot `slot` (the bytes `span` of `mem`) to the peer of `ep`; the key of its window.
    pub(crate) fn grant(
        &mut self,
        ep: &mut Endpoint,
        mem: &mut Pinned,
        slot: u16,
        span: Span,
    ) -> Result<u32, VerbsError> {
        let lease = mem.lease(span, Access::Write);
        match ep.grant(slot) {
            Ok(rkey) => {
                self.held.push((slot, lease));
                Ok(rkey)
            }
            Err(e) => {
                // Not bound: the peer cannot write there.
                mem.settle(lease);
                Err(e)
            }
        }
    }

    /// Slot `slot` was granted by [`Grants::grant`] beforehand (the connection set-up's grants).
    pub(crate) fn granted(&mut self, mem: &mut Pinned, slot: u16, span: Span) {
        self.held.push((slot, mem.lease(span, Access::Write)));
    }

    /// A frame landed in `slot` (its receive completion was polled): invalidates its window, and
    /// then its bytes are the caller's. On an error the slot stays leased to the NIC (until
    /// [`Grants::settle_all`]).
    pub(crate) fn landed(&mut self, ep: &mut Endpoint, mem: &mut Pinned, slot: u16) -> Result<(), VerbsError> {
        ep.revoke(slot)?;
        if let Some(i) = self.held.iter().position(|(s, _)| *s == slot) {
            mem.settle(self.held.swap_remove(i).1);
        }
        Ok(())
    }

    /// Gives every lease back; only once the queue pair the grants were made on is destroyed.
    pub(crate) fn settle_all(&mut self, mem: &mut Pinned) {
        for (_, lease) in self.held.drain(..) {
            mem.settle(lease);
        }
    }
}

//! Compressed pushes at this node (`push --compress`, see `crate::compress`): the primary codes
//! each chunk it read in place in its slot; a replica decodes each coded chunk into one scratch
//! buffer to check its digest and to write it. Relays forward a coded frame as it came, so a
//! frame's payload length is read from the header in its slot, not from the manifest.

use super::*;
use crate::compress::{Decoder, Encoder};
use crate::wire::Coding;

/// The coding state of a session.
#[derive(Debug, Default)]
pub(super) struct Codec {
    /// Primary of a compressed push: codes the chunks it reads.
    pub(super) enc: Option<Encoder>,
    /// Replica of a compressed push (HELLO's COMPRESS flag): upstream may send coded chunks,
    /// decoded here.
    pub(super) dec: Option<Decoder>,
    /// When the chunk send in flight downstream was submitted (`auto` measures the link).
    pub(super) send_started: Option<Instant>,
}

impl Session<'_> {
    /// The payload length (coded or raw) of the chunk frame whose header is in `slot`.
    pub(super) fn frame_len(&self, slot: SlotId) -> u32 {
        // The header landed (or was written) before the slot went to the machine, and nothing
        // receives into it again while the slot is leased.
        u32::from_le_bytes(self.pool.slot(slot, 8, 4).try_into().expect("4 bytes"))
    }

    /// How the chunk frame in `slot` is coded (its header was checked when it arrived).
    pub(super) fn slot_coding(&self, slot: SlotId) -> Coding {
        let header: [u8; HEADER_LEN] = self.pool.slot(slot, 0, HEADER_LEN).try_into().expect("header");
        let len = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
        Coding::read(&header, len).unwrap_or(Coding::RAW)
    }

    /// Primary: puts chunk header `h` in front of the `h.len` bytes just read into `slot`,
    /// after coding them in place when the push compresses and they shrink.
    pub(super) fn stamp_chunk(&mut self, slot: SlotId, h: Header) {
        let mut header = h.to_bytes();
        // Frames waiting for the first hop, the sends in flight included; with several lanes
        // each lane but one has its own send in flight before anything waits.
        let lanes = &self.down.lanes;
        let waiting = self.down.shared.len()
            + lanes.iter().map(|l| l.queue.len() + usize::from(l.sending.is_some())).sum::<usize>();
        let backlog = waiting.saturating_sub(lanes.len().saturating_sub(1));
        if let Some(enc) = self.codec.enc.as_mut() {
            enc.first_hop_backlog(backlog);
            // The read into the slot completed; nothing else touches it yet.
            let raw = self.pool.slot(slot, HEADER_LEN, h.len as usize);
            if let Some((coding, payload)) = enc.encode(raw) {
                let n = payload.len();
                self.pool.slot_mut(slot, HEADER_LEN, n).copy_from_slice(payload);
                header[8..12].copy_from_slice(&(n as u32).to_le_bytes());
                coding.stamp(&mut header);
            }
        }
        self.pool.slot_mut(slot, 0, HEADER_LEN).copy_from_slice(&header);
    }

    /// Replica: whether the frame in `slot` may stand for chunk `seq` of `len` bytes: raw with
    /// that length, or coded for that length on a push that compresses.
    pub(super) fn coding_fits(&self, slot: SlotId, len: u32) -> Result<Coding, String> {
        let coding = self.slot_coding(slot);
        match coding {
            c if c.is_raw() && self.frame_len(slot) == len => Ok(c),
            c if c.is_raw() => {
                Err(format!("a raw chunk of {} bytes where the manifest says {len}", self.frame_len(slot)))
            }
            _ if self.codec.dec.is_none() => Err("a compressed chunk in a push that does not compress".into()),
            c if c.raw_len == len => Ok(c),
            c => Err(format!("a compressed chunk of {} bytes where the manifest says {len}", c.raw_len)),
        }
    }

    /// Replica: the digest of chunk `seq` in `slot`, decoding it first when it is coded. Err:
    /// it does not decode (the caller treats that as a corrupt chunk).
    pub(super) fn chunk_digest(&mut self, slot: SlotId, seq: u64, coding: Coding) -> Result<u128, String> {
        if coding.is_raw() {
            let n = self.frame_len(slot) as usize;
            return Ok(digest(self.pool.slot(slot, HEADER_LEN, n)));
        }
        let n = self.frame_len(slot) as usize;
        // The payload has landed and nothing writes the slot now.
        let payload = self.pool.slot(slot, HEADER_LEN, n);
        let dec = self.codec.dec.as_mut().expect("checked by coding_fits");
        dec.decode(seq, coding, payload).map(digest).map_err(|e| e.to_string())
    }

    /// Replica: writes coded chunk `seq` from `slot` decoded (from the scratch buffer when it
    /// still holds it, else decoded again), with a plain positioned write on this thread: one
    /// page-cache copy of a chunk, small next to the slow link a push compresses for.
    pub(super) fn write_decoded(&mut self, seq: u64, slot: SlotId, coding: Coding) {
        use std::os::unix::fs::FileExt;
        let c = self.manifest.chunk(seq).expect("in range");
        let entry = match &self.here.own {
            Some(own) => own.map[c.entry].expect("the route stores only this node's entries"),
            None => c.entry,
        };
        let Local::Staging(Some(st)) = &self.here.data else { unreachable!("only replicas write") };
        let file = st.file(entry).expect("files with chunks are open");
        let dec = self.codec.dec.as_mut().expect("coded chunks only arrive with a decoder");
        let mut bytes = Ok(());
        if dec.held(seq, c.len as usize).is_none() {
            let n = u32::from_le_bytes(self.pool.slot(slot, 8, 4).try_into().expect("4 bytes")) as usize;
            bytes = dec.decode(seq, coding, self.pool.slot(slot, HEADER_LEN, n)).map(|_| ());
        }
        let result = match bytes {
            Ok(()) => {
                let raw = dec.held(seq, c.len as usize).expect("just decoded");
                file.write_all_at(raw, c.offset).map(|()| raw.len())
            }
            // It decoded when it arrived; the slot has not changed since.
            Err(e) => Err(std::io::Error::other(e.to_string())),
        };
        self.write_done(seq, result);
    }
}

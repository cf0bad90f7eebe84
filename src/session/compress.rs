//! Compressed pushes at this node (`push --compress`, see `crate::compress`): the primary codes
//! each chunk it read in place in its slot; a replica decodes each coded chunk into one scratch
//! buffer to check its digest and to write it. Relays forward a coded frame as it came, so a
//! frame's payload length is read from the header in its slot, not from the manifest.

use std::collections::HashMap;
use std::path::PathBuf;

use super::*;
use crate::compress::{CodedBytes, Decoder, DeltaEncoder, Encoder};
use crate::store::BaseChunk;
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
    /// Primary of a delta push: codes the chunks of `bases` as XOR deltas.
    pub(super) denc: Option<DeltaEncoder>,
    /// A delta push: the chunks sent (primary) or accepted (replica) as deltas, with their
    /// base.
    pub(super) bases: Option<HashMap<u64, BaseChunk>>,
    /// The files bases are read from, opened once.
    base_files: HashMap<PathBuf, File>,
    /// One base chunk.
    base_buf: Vec<u8>,
    /// Primary: what the chunks sent took on the wire.
    pub(super) coded: CodedBytes,
}

impl Codec {
    /// Reads the base of chunk `seq` (`len` bytes) into `base_buf`; None: it has no base here.
    fn read_base(&mut self, seq: u64, len: usize) -> Option<Result<(&[u8], u128), String>> {
        use std::os::unix::fs::FileExt;
        let b = self.bases.as_ref()?.get(&seq)?;
        let file = match self.base_files.entry(b.from.clone()) {
            std::collections::hash_map::Entry::Occupied(f) => f.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => match File::open(&b.from) {
                Ok(f) => v.insert(f),
                Err(e) => return Some(Err(format!("cannot open the base {}: {e}", b.from.display()))),
            },
        };
        self.base_buf.resize(len, 0);
        Some(match file.read_exact_at(&mut self.base_buf[..len], b.offset) {
            Ok(()) => Ok((&self.base_buf[..len], b.digest)),
            Err(e) => Err(format!("cannot read the base {}: {e}", b.from.display())),
        })
    }
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
    /// after coding them in place: as an XOR delta against its base on a delta push when it
    /// has one and that shrinks it, else compressed when the push compresses and they shrink.
    pub(super) fn stamp_chunk(&mut self, slot: SlotId, h: Header) {
        let mut header = h.to_bytes();
        let n = h.len as usize;
        let mut coded = None;
        if self.codec.denc.is_some() {
            match self.codec.read_base(h.seq, n) {
                None => {}
                Some(Err(e)) => tracing::warn!(seq = h.seq, "chunk goes whole: {e}"),
                Some(Ok(_)) => {
                    let Codec { denc, base_buf, bases, .. } = &mut self.codec;
                    let digest = bases.as_ref().and_then(|b| b.get(&h.seq)).map_or(0, |b| b.digest);
                    let enc = denc.as_mut().expect("checked");
                    // The read into the slot completed; nothing else touches it yet.
                    if let Some((coding, payload)) = enc.encode(self.pool.slot(slot, HEADER_LEN, n), base_buf, digest) {
                        let k = payload.len();
                        self.pool.slot_mut(slot, HEADER_LEN, k).copy_from_slice(payload);
                        self.codec.coded.delta_chunks += 1;
                        self.codec.coded.delta_wire += k as u64;
                        coded = Some((coding, k));
                    }
                }
            }
        }
        // Frames waiting for the first hop, the sends in flight included; with several lanes
        // each lane but one has its own send in flight before anything waits.
        let lanes = &self.down.lanes;
        let waiting = self.down.shared.len()
            + lanes.iter().map(|l| l.queue.len() + usize::from(l.sending.is_some())).sum::<usize>();
        let backlog = waiting.saturating_sub(lanes.len().saturating_sub(1));
        if let Some(enc) = self.codec.enc.as_mut() {
            enc.first_hop_backlog(backlog);
        }
        if coded.is_none()
            && let Some(enc) = self.codec.enc.as_mut()
            && let Some((coding, payload)) = enc.encode(self.pool.slot(slot, HEADER_LEN, n))
        {
            let k = payload.len();
            self.pool.slot_mut(slot, HEADER_LEN, k).copy_from_slice(payload);
            coded = Some((coding, k));
        }
        self.codec.coded.raw += n as u64;
        self.codec.coded.wire += coded.map_or(n, |(_, k)| k) as u64;
        if let Some((coding, k)) = coded {
            self.codec.coded.compressed_chunks += 1;
            header[8..12].copy_from_slice(&(k as u32).to_le_bytes());
            coding.stamp(&mut header);
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
            c if c.is_delta() && self.codec.bases.is_none() => Err("a delta in a push that sends no deltas".into()),
            c if c.raw_len == len => Ok(c),
            c => Err(format!("a compressed chunk of {} bytes where the manifest says {len}", c.raw_len)),
        }
    }

    /// Replica: the digest of chunk `seq` in `slot`, decoding it first when it is coded. Err:
    /// it does not decode, or it is a delta whose base is not this node's (the caller treats
    /// that as a corrupt chunk).
    pub(super) fn chunk_digest(&mut self, slot: SlotId, seq: u64, coding: Coding) -> Result<u128, String> {
        if coding.is_raw() {
            let n = self.frame_len(slot) as usize;
            return Ok(digest(self.pool.slot(slot, HEADER_LEN, n)));
        }
        self.decode_slot(slot, seq, coding)?;
        let dec = self.codec.dec.as_ref().expect("just decoded");
        Ok(digest(dec.held(seq, coding.raw_len as usize).expect("just decoded")))
    }

    /// Replica: decodes the coded chunk `seq` in `slot` into the decoder's buffer: a delta is
    /// applied to this node's base, after checking that the frame names that base (its
    /// manifest's digest) and that the base's bytes on disk still have that digest.
    fn decode_slot(&mut self, slot: SlotId, seq: u64, coding: Coding) -> Result<(), String> {
        let n = self.frame_len(slot) as usize;
        // The payload has landed and nothing writes the slot now.
        let payload = self.pool.slot(slot, HEADER_LEN, n);
        if !coding.is_delta() {
            let dec = self.codec.dec.as_mut().expect("checked by coding_fits");
            return dec.decode(seq, coding, payload).map(|_| ()).map_err(|e| e.to_string());
        }
        let named = u128::from_le_bytes(payload[..16].try_into().expect("checked by Coding::read"));
        let len = coding.raw_len as usize;
        let (base, want) = match self.codec.read_base(seq, len) {
            None => return Err(format!("a delta for chunk {seq}, which has no base here")),
            Some(r) => r?,
        };
        if named != want {
            return Err(format!("the delta's base is {named:032x}, this node's {want:032x}"));
        }
        if digest(base) != want {
            return Err("this node's base chunk no longer matches its manifest".into());
        }
        let Codec { dec, base_buf, .. } = &mut self.codec;
        let dec = dec.as_mut().expect("checked by coding_fits");
        dec.decode_delta(seq, coding, &payload[16..], &base_buf[..len]).map(|_| ()).map_err(|e| e.to_string())
    }

    /// Replica: writes coded chunk `seq` from `slot` decoded (from the scratch buffer when it
    /// still holds it, else decoded again), with a plain positioned write on this thread: one
    /// page-cache copy of a chunk, small next to the slow link a push compresses for.
    pub(super) fn write_decoded(&mut self, seq: u64, slot: SlotId, coding: Coding) {
        use std::os::unix::fs::FileExt;
        let c = self.manifest.chunk(seq).expect("in range");
        let held = self.codec.dec.as_ref().is_some_and(|d| d.held(seq, c.len as usize).is_some());
        // It decoded when it arrived; the slot and the base have not changed since.
        let bytes = if held { Ok(()) } else { self.decode_slot(slot, seq, coding) };
        let entry = match &self.here.own {
            Some(own) => own.map[c.entry].expect("the route stores only this node's entries"),
            None => c.entry,
        };
        let Local::Staging(Some(st)) = &self.here.data else { unreachable!("only replicas write") };
        let file = st.file(entry).expect("files with chunks are open");
        let dec = self.codec.dec.as_ref().expect("coded chunks only arrive with a decoder");
        let result = match bytes {
            Ok(()) => {
                let raw = dec.held(seq, c.len as usize).expect("just decoded");
                file.write_all_at(raw, c.offset).map(|()| raw.len())
            }
            Err(e) => Err(std::io::Error::other(e)),
        };
        self.write_done(seq, result);
    }
}

//! Compressed pushes at this node (`push --compress`, see `crate::compress`): the primary has
//! each chunk it read coded by its coder threads (`coders.rs`) and puts the result in the
//! chunk's slot before the machine hears of the chunk; a replica decodes each coded chunk into
//! one scratch buffer to check its digest and to write it. Relays forward a coded frame as it
//! came, so a frame's payload length is read from the header in its slot, not from the
//! manifest.

use std::collections::HashMap;
use std::path::PathBuf;

use super::coders::{Coders, Job};
use super::*;
use crate::compress::{CodedBytes, Decoder, Policy};
use crate::store::BaseChunk;
use crate::wire::Coding;

/// `auto` sends raw the chunk next in order whose coder is not done once the first hop has at
/// most this long left to send.
const GIVE_WAY_AHEAD: Duration = Duration::from_millis(2);

/// The coding state of a session.
#[derive(Debug, Default)]
pub(super) struct Codec {
    /// Primary of a compressed push: which chunks its coders compress.
    pub(super) policy: Option<Policy>,
    /// Primary of a compressed or delta push: the coder threads.
    pub(super) coders: Option<Coders>,
    /// Primary: the chunk next in order is at a coder while the first hop is about to run dry:
    /// look again soon (`auto` then sends it raw).
    pub(super) recheck: bool,
    /// Replica: decodes coded chunks (a push whose HELLO says COMPRESS or DELTA).
    pub(super) dec: Option<Decoder>,
    /// Replica: HELLO said COMPRESS, so chunks may come compressed; without it (a push with
    /// DELTA only) the only coded frames allowed are deltas.
    pub(super) compressed: bool,
    /// When the chunk send in flight downstream was submitted (`auto` measures the link).
    pub(super) send_started: Option<Instant>,
    /// A delta push: the chunks sent (primary) or accepted (replica) as deltas, with their
    /// base.
    pub(super) bases: Option<HashMap<u64, BaseChunk>>,
    /// Replica: the files bases are read from, opened once.
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

    /// Primary: chunk `h.seq`'s bytes were read into `slot` and hashed: it waits for a coder
    /// when it may be coded (a delta push's chunk with a base; any chunk of a compressed push),
    /// else it is stamped raw and handed to the machine now.
    pub(super) fn chunk_read(&mut self, slot: SlotId, h: Header) {
        let has_base = self.codec.bases.as_ref().is_some_and(|b| b.contains_key(&h.seq));
        // `auto` over RDMA: no socket sends to measure the link by, so it stays raw.
        let auto_raw = self.down.rdma() && self.codec.policy.as_ref().is_some_and(Policy::gives_way);
        match self.codec.coders.as_mut() {
            Some(c) if has_base || self.codec.policy.is_some() && !auto_raw => c.waiting.push_back((slot, h)),
            _ => self.chunk_coded(slot, h, None),
        }
    }

    /// Primary: stamps chunk header `h` in front of the chunk in `slot`, with `coded` (its
    /// coding, payload length, and whether it is a delta: the payload is in the slot already),
    /// counts it, and hands it to the machine.
    fn chunk_coded(&mut self, slot: SlotId, h: Header, coded: Option<(Coding, usize, bool)>) {
        let mut header = h.to_bytes();
        let n = h.len as usize;
        let c = &mut self.codec.coded;
        c.raw += n as u64;
        c.wire += coded.map_or(n, |(_, k, _)| k) as u64;
        if let Some((coding, k, delta)) = coded {
            c.compressed_chunks += 1;
            if delta {
                c.delta_chunks += 1;
                c.delta_wire += k as u64;
            }
            header[8..12].copy_from_slice(&(k as u32).to_le_bytes());
            coding.stamp(&mut header);
        }
        // The chunk's read completed and no op owns the slot before the machine hears of it.
        self.pool.slot_mut(slot, 0, HEADER_LEN).copy_from_slice(&header);
        self.events.push_back(Event::ChunkReady { seq: h.seq, slot, lane_order: false });
    }

    /// Primary: hands waiting chunks to free coders (`auto` decides here, with what it measured
    /// so far, whether a chunk is compressed), sends raw the chunk next in order when the first
    /// hop would otherwise wait for its coder (`auto`), and polls for the coders' results.
    pub(super) fn pump_coders(&mut self) -> io::Result<()> {
        if self.codec.coders.is_none() {
            return Ok(());
        }
        self.give_way();
        let now = Instant::now();
        while let Some(coders) = self.codec.coders.as_mut() {
            if coders.waiting.is_empty() {
                break;
            }
            let Some(mut job) = coders.free_job() else { break };
            let (slot, h) = coders.waiting.pop_front().expect("checked");
            let base = self.codec.bases.as_ref().and_then(|b| b.get(&h.seq)).cloned();
            let compress = self.codec.policy.as_mut().and_then(|p| p.code_next(now).then(|| p.mode()));
            if base.is_none() && compress.is_none() {
                coders.recycle(job);
                self.chunk_coded(slot, h, None);
                continue;
            }
            (job.seq, job.base, job.compress) = (h.seq, base, compress);
            job.raw.clear();
            // The read into the slot completed, and no op owns it until the machine hears of it.
            job.raw.extend_from_slice(self.pool.slot(slot, HEADER_LEN, h.len as usize));
            coders.start(job, slot, h);
        }
        let coders = self.codec.coders.as_mut().expect("checked");
        if !coders.at_coder.is_empty() && !coders.polling {
            self.io.poll_in(token(T_CODER, 0), coders.wake_fd())?;
            coders.polling = true;
        }
        Ok(())
    }

    /// Primary, `auto`: when the first hop is about to have nothing to send and the chunk next
    /// in order waits for its coder (not a delta: those are worth the wait), it goes raw now;
    /// its coder's result is dropped.
    fn give_way(&mut self) {
        self.codec.recheck = false;
        let next = self.machine.next_dispatch();
        let (Some(p), Some(coders)) = (self.codec.policy.as_ref(), self.codec.coders.as_ref()) else { return };
        let has_base = self.codec.bases.as_ref().is_some_and(|b| b.contains_key(&next));
        if !p.gives_way() || has_base || !coders.holds(next) || self.down.closed || self.down.queued() {
            return;
        }
        let lanes = self.down.lanes.iter().filter(|l| l.sending.is_none());
        let unsent = lanes.map(|l| crate::sys::tcpinfo::tcp_stats(l.fd).map_or(0, |s| s.notsent_bytes)).min();
        let Some(unsent) = unsent else {
            // Every lane is sending: its completion wakes this thread.
            return;
        };
        if !p.drains_within(unsent as usize, GIVE_WAY_AHEAD) {
            self.codec.recheck = true;
            return;
        }
        let coders = self.codec.coders.as_mut().expect("checked");
        let (slot, h) = match coders.at_coder.remove(&next) {
            Some(at) => at,
            None => {
                let i = coders.waiting.iter().position(|(_, h)| h.seq == next).expect("held");
                coders.waiting.remove(i).expect("in range")
            }
        };
        self.chunk_coded(slot, h, None);
    }

    /// Primary: the coders finished jobs: each result goes into its chunk's slot (unless the
    /// chunk went raw meanwhile), and `auto` learns the coders' rate and ratio.
    pub(super) fn coders_done(&mut self) {
        let Some(coders) = self.codec.coders.as_mut() else { return };
        coders.polling = false;
        for job in coders.finished() {
            let Job { seq, ref raw, ref out, coded, delta, took, ref warning, .. } = job;
            if let Some(w) = warning {
                tracing::warn!(seq, "chunk goes whole: {w}");
            }
            if let (Some(p), Some(took)) = (self.codec.policy.as_mut(), took) {
                p.coded(took, raw.len(), coded.map_or(raw.len(), |(_, k)| k));
            }
            let coders = self.codec.coders.as_mut().expect("checked");
            if let Some((slot, h)) = coders.at_coder.remove(&seq) {
                if let Some((_, k)) = coded {
                    // No op owns the slot until the machine hears of the chunk.
                    self.pool.slot_mut(slot, HEADER_LEN, k).copy_from_slice(&out[..k]);
                }
                self.chunk_coded(slot, h, coded.map(|(c, k)| (c, k, delta)));
            }
            self.codec.coders.as_mut().expect("checked").recycle(job);
        }
    }

    /// Primary: how long to wait for I/O before looking again (short while `give_way` waits
    /// for the first hop to run dry).
    pub(super) fn coder_slice(&self, slice: Duration) -> Duration {
        if self.codec.recheck { slice.min(Duration::from_millis(1)) } else { slice }
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
            // A delta push decodes (its deltas are zstd frames), but HELLO did not say COMPRESS:
            // a plain compressed frame is not what the primary announced.
            c if !c.is_delta() && !self.codec.compressed => {
                Err("a compressed chunk in a push that does not compress (only deltas)".into())
            }
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

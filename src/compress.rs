//! Per-chunk compression of a push (`push --compress`): zstd, optionally after grouping the
//! bytes of float elements by position (all first bytes, then all second bytes, ...), which
//! puts the repetitive exponent bytes of bf16/fp32 weights together.
//!
//! The primary codes each chunk once, on coder threads ([`Coder`]; its session thread decides
//! which chunks, [`Policy`]); relays forward the coded frame as it came; every replica decodes
//! it ([`Decoder`]) and checks the digest of the decoded bytes. A chunk that does not shrink by
//! at least 1/32 travels raw. `auto` compresses only while compressing is faster than the first
//! hop drains, and never makes the link wait for a coder (see [`Policy`]).

use std::time::{Duration, Instant};

use crate::wire::Coding;

/// What a push does about compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compress {
    /// Chunks travel as they are.
    #[default]
    Off,
    /// zstd, with byte grouping where a sample says it helps, and only while compressing is
    /// faster than the first hop drains (so a fast link is never slowed down).
    Auto,
    /// zstd on every chunk (raw where it does not shrink).
    Zstd,
    /// Byte grouping (element width 2 or 4, chosen per chunk by a sample) then zstd, on every
    /// chunk.
    ZstdGrouped,
}

impl std::str::FromStr for Compress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" | "none" => Ok(Self::Off),
            "auto" => Ok(Self::Auto),
            "zstd" => Ok(Self::Zstd),
            "zstd-grouped" => Ok(Self::ZstdGrouped),
            other => Err(format!("unknown compression {other:?}: expected auto, off, zstd or zstd-grouped")),
        }
    }
}

impl std::fmt::Display for Compress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::Auto => "auto",
            Self::Zstd => "zstd",
            Self::ZstdGrouped => "zstd-grouped",
        })
    }
}

/// The zstd level when none is given. On real bf16/fp32 checkpoints (scripts/compress-bound.py,
/// BENCHMARKS.md) level 1 is both faster and smaller than 3 once bytes are grouped (bf16: ratio
/// 1.461 against 1.407, 333 against 139 MB/s a core; ungrouped the same 1.282): levels 2-12
/// find matches in the exponent stream that cost more than they save.
pub const DEFAULT_LEVEL: i32 = 1;

/// Bytes of a chunk the sample that picks the grouping (and measures the rate) compresses.
const SAMPLE: usize = 64 << 10;

/// Groups `src` by element width `w` into `dst` (same length): byte k of every element, for
/// k = 0..w, then the tail that does not fill an element.
pub fn group(src: &[u8], w: usize, dst: &mut [u8]) {
    let n = src.len() / w;
    match w {
        // One pass over the elements (the general loop makes w strided passes).
        2 => {
            let (a, rest) = dst.split_at_mut(n);
            for ((x, y), e) in a.iter_mut().zip(&mut rest[..n]).zip(src.chunks_exact(2)) {
                (*x, *y) = (e[0], e[1]);
            }
        }
        4 => {
            let (a, rest) = dst.split_at_mut(n);
            let (b, rest) = rest.split_at_mut(n);
            let (c, d) = rest.split_at_mut(n);
            for ((((p, q), r), t), e) in a.iter_mut().zip(b).zip(c).zip(&mut d[..n]).zip(src.chunks_exact(4)) {
                (*p, *q, *r, *t) = (e[0], e[1], e[2], e[3]);
            }
        }
        _ => {
            for k in 0..w {
                for (i, o) in dst[k * n..(k + 1) * n].iter_mut().enumerate() {
                    *o = src[i * w + k];
                }
            }
        }
    }
    dst[n * w..src.len()].copy_from_slice(&src[n * w..]);
}

/// Undoes [`group`].
pub fn ungroup(src: &[u8], w: usize, dst: &mut [u8]) {
    let n = src.len() / w;
    match w {
        2 => {
            let (a, b) = src.split_at(n);
            for ((x, y), e) in a.iter().zip(&b[..n]).zip(dst.chunks_exact_mut(2)) {
                (e[0], e[1]) = (*x, *y);
            }
        }
        4 => {
            let (a, rest) = src.split_at(n);
            let (b, rest) = rest.split_at(n);
            let (c, d) = rest.split_at(n);
            for ((((p, q), r), t), e) in a.iter().zip(b).zip(c).zip(&d[..n]).zip(dst.chunks_exact_mut(4)) {
                (e[0], e[1], e[2], e[3]) = (*p, *q, *r, *t);
            }
        }
        _ => {
            for k in 0..w {
                for (i, b) in src[k * n..(k + 1) * n].iter().enumerate() {
                    dst[i * w + k] = *b;
                }
            }
        }
    }
    dst[n * w..src.len()].copy_from_slice(&src[n * w..]);
}

fn group_flag(w: usize) -> u8 {
    match w {
        2 => Coding::GROUP2,
        4 => Coding::GROUP4,
        _ => 0,
    }
}

/// Compresses a sample from the middle of `raw` (at most [`SAMPLE`] bytes) grouped by each of
/// `widths` (1: not grouped) with `zc`: the width that came out smallest, its compressed
/// length, and the sample's length. `grouped` and `out` are scratch space.
fn sample_width(
    zc: &mut zstd::bulk::Compressor<'static>,
    raw: &[u8],
    widths: &[usize],
    grouped: &mut [u8],
    out: &mut [u8],
) -> (usize, usize, usize) {
    let len = raw.len().min(SAMPLE) & !3;
    let start = ((raw.len() - len) / 2) & !3;
    let s = &raw[start..start + len];
    let (mut best, mut best_len) = (widths[0], usize::MAX);
    for &w in widths {
        if let Ok(n) = zc.compress_to_buffer(grouped_by(s, w, grouped), out)
            && n < best_len
        {
            (best, best_len) = (w, n);
        }
    }
    (best, best_len, len)
}

/// What the primary's session sent (its report): raw bytes of the chunks, and the bytes their
/// frames' payloads took on the wire, counted where each chunk is stamped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CodedBytes {
    /// Bytes of every chunk sent, as they are on disk.
    pub raw: u64,
    /// Bytes of their payloads on the wire (compressed or raw).
    pub wire: u64,
    /// Chunks that travelled compressed.
    pub compressed_chunks: u64,
    /// Chunks that travelled as XOR deltas (`push --delta`; counted in `compressed_chunks`
    /// too).
    pub delta_chunks: u64,
    /// Bytes of those deltas' payloads on the wire (counted in `wire` too).
    pub delta_wire: u64,
}

/// An exponentially weighted mean of nanoseconds per byte.
#[derive(Debug, Clone, Copy, Default)]
struct Rate(Option<f64>);

impl Rate {
    fn add(&mut self, d: Duration, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let x = d.as_nanos() as f64 / bytes as f64;
        self.0 = Some(self.0.map_or(x, |m| 0.75 * m + 0.25 * x));
    }
}

/// `auto`'s measurements: how fast one coder thread compresses and how well, and how fast the
/// first hop drains.
#[derive(Debug, Default)]
struct Auto {
    /// One coder thread's time per raw byte.
    compress: Rate,
    /// Wire bytes over raw bytes of what was compressed lately.
    ratio: Option<f64>,
    link: Rate,
    /// While the link is known to be faster than the coders, a chunk is still coded now and
    /// then to measure again: the next one not before this.
    next_probe: Option<Instant>,
}

impl Auto {
    /// Whether compressing pays now, with `coders` threads: only when they produce raw bytes
    /// faster than the link takes them (then the link, not the coders, sets the pace, and it
    /// moves fewer bytes) and the data shrinks. None: not known yet (no link measured, or
    /// nothing coded yet).
    fn pays(&self, coders: usize) -> Option<bool> {
        match (self.compress.0, self.link.0, self.ratio) {
            // ns per raw byte compressing (the coders share the chunks) vs ns per raw byte the
            // link takes uncompressed, with a margin so that a tie goes raw.
            (Some(c), Some(l), Some(r)) => Some(r < 0.97 && c / coders.max(1) as f64 * 1.2 < l),
            (_, Some(_), Some(r)) if r >= 0.97 => Some(false),
            _ => None,
        }
    }
}

/// The primary's side of a compressed push, on its session thread: decides which chunks go to
/// the coder threads ([`Coder`]) and learns from what they report.
///
/// `auto` hands a chunk to a coder when compressing pays (the coders are faster than the first
/// hop and the data shrinks) or when that is not known yet (no link measured); it decides as a
/// coder takes the chunk, not when the chunk was read, so the first chunks are decided with the
/// measurements there are by then. Whatever it decided, a chunk whose coding is not done when the
/// first hop has nothing left to send goes raw ([`Policy::gives_way`]): the link never waits for
/// a coder. While the link is known to be faster, one chunk is still coded now and then (under
/// 1 % of a coder's time) to measure again.
#[derive(Debug)]
pub struct Policy {
    mode: Compress,
    level: Option<i32>,
    coders: usize,
    auto: Auto,
}

impl Policy {
    /// The policy of a push compressing as `mode` says at zstd `level` with `coders` threads;
    /// None when `mode` is off.
    pub fn new(mode: Compress, level: Option<i32>, coders: usize) -> Option<Self> {
        (mode != Compress::Off).then(|| Self { mode, level, coders: coders.max(1), auto: Auto::default() })
    }

    /// The mode.
    pub fn mode(&self) -> Compress {
        self.mode
    }

    /// The zstd level (None: [`DEFAULT_LEVEL`]).
    pub fn level(&self) -> Option<i32> {
        self.level
    }

    /// Whether the next chunk a coder takes is to be compressed (at `now`).
    pub fn code_next(&mut self, now: Instant) -> bool {
        if self.mode != Compress::Auto {
            return true;
        }
        match self.auto.pays(self.coders) {
            None | Some(true) => true,
            Some(false) if self.auto.next_probe.is_some_and(|t| now < t) => false,
            Some(false) => {
                // A probe; when its result comes the next one is set from its cost.
                self.auto.next_probe = Some(now + Duration::from_secs(1));
                true
            }
        }
    }

    /// Whether a chunk whose coding is not done yet goes raw when the first hop has nothing
    /// else to send (`auto`; a forced mode waits for its coder).
    pub fn gives_way(&self) -> bool {
        self.mode == Compress::Auto
    }

    /// Whether the first hop sends `bytes` within `within` (at the rate measured; while none
    /// is, whether they are at most 256 KiB, 2 ms at 1 Gbit/s).
    pub fn drains_within(&self, bytes: usize, within: Duration) -> bool {
        match self.auto.link.0 {
            Some(ns) => bytes as f64 * ns <= within.as_nanos() as f64,
            None => bytes <= 256 << 10,
        }
    }

    /// A coder compressed `raw` bytes into `wire` in `took` (one thread's time).
    pub fn coded(&mut self, took: Duration, raw: usize, wire: usize) {
        if self.mode != Compress::Auto || raw == 0 {
            return;
        }
        self.auto.compress.add(took, raw);
        self.auto.ratio = Some(wire as f64 / raw as f64);
        if self.auto.pays(self.coders) == Some(false) {
            // Probes take under 1 % of one coder's time.
            let now = Instant::now();
            self.auto.next_probe = Some(now + took * 100);
        }
    }

    /// A send of `bytes` to the first hop took `d` from submission to completion: a measure of
    /// the link only while its socket buffer is full (a send that finds room completes at
    /// once), so a TCP hop uses [`Policy::link_delivery_rate`] instead.
    pub fn link_sent(&mut self, d: Duration, bytes: usize) {
        self.auto.link.add(d, bytes);
    }

    /// The kernel's delivery rate of the first hop's TCP connection, bytes per second (from
    /// its ACKs: what the path takes, whether the send buffer was full or not).
    pub fn link_delivery_rate(&mut self, bytes_per_sec: u64) {
        if let Ok(n) = usize::try_from(bytes_per_sec) {
            self.auto.link.add(Duration::from_secs(1), n);
        }
    }
}

/// One coder thread's state: zstd contexts and fixed-size scratch buffers of one chunk, so
/// memory does not grow with the push. Codes bytes it owns (copies of chunks), never a pool
/// slot.
pub struct Coder {
    zc: zstd::bulk::Compressor<'static>,
    /// The fast compressor of samples.
    sample: zstd::bulk::Compressor<'static>,
    grouped: Vec<u8>,
    sample_out: Vec<u8>,
}

impl std::fmt::Debug for Coder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coder").finish_non_exhaustive()
    }
}

/// Room a coded payload of a chunk of `chunk_size` bytes needs (a delta's base digest and the
/// zstd bound).
pub fn coded_capacity(chunk_size: u32) -> usize {
    Coding::BASE_LEN as usize + zstd::zstd_safe::compress_bound(chunk_size as usize)
}

impl Coder {
    /// A coder for chunks of at most `chunk_size` bytes at zstd `level` (None: the default).
    pub fn new(level: Option<i32>, chunk_size: u32) -> std::io::Result<Self> {
        Ok(Self {
            zc: zstd::bulk::Compressor::new(level.unwrap_or(DEFAULT_LEVEL))?,
            sample: zstd::bulk::Compressor::new(1)?,
            grouped: vec![0; chunk_size as usize],
            sample_out: vec![0; zstd::zstd_safe::compress_bound(SAMPLE)],
        })
    }

    /// Compresses `raw` into `out` (at least [`coded_capacity`] long) as `mode` says: the
    /// coding and the payload's length, or None when it does not shrink by 1/32 (it goes raw).
    /// `zstd` never groups; `zstd-grouped` groups by 2 or 4, `auto` by 1, 2 or 4, whichever
    /// a sample from the chunk's middle says is smaller.
    pub fn compress(&mut self, mode: Compress, raw: &[u8], out: &mut [u8]) -> Option<(Coding, usize)> {
        if raw.len() < 64 {
            return None;
        }
        let width = match mode {
            Compress::Off => return None,
            Compress::Zstd => 1,
            Compress::ZstdGrouped => self.pick_width(raw, &[2, 4]),
            Compress::Auto => self.pick_width(raw, &[1, 2, 4]),
        };
        let input = grouped_by(raw, width, &mut self.grouped);
        let n = self.zc.compress_to_buffer(input, out).ok()?;
        (n <= raw.len() - raw.len() / 32)
            .then_some((Coding { flags: Coding::ZSTD | group_flag(width), raw_len: raw.len() as u32 }, n))
    }

    fn pick_width(&mut self, raw: &[u8], widths: &[usize]) -> usize {
        sample_width(&mut self.sample, raw, widths, &mut self.grouped, &mut self.sample_out).0
    }

    /// Codes `raw` as a delta against `base` (as long), whose digest is `base_digest`, into
    /// `out`: the coding and the payload's length (the base's digest, then the zstd frame), or
    /// None when that does not shrink the chunk by 1/32 (it then goes as an ordinary chunk).
    /// `raw` is XORed with `base` meanwhile and restored before this returns.
    pub fn delta(&mut self, raw: &mut [u8], base: &[u8], base_digest: u128, out: &mut [u8]) -> Option<(Coding, usize)> {
        let n = raw.len();
        if n < 64 || base.len() != n {
            return None;
        }
        xor_into(raw, base);
        let coded = self.delta_of_xor(raw, base_digest, out);
        xor_into(raw, base);
        coded
    }

    fn delta_of_xor(&mut self, xor: &[u8], base_digest: u128, out: &mut [u8]) -> Option<(Coding, usize)> {
        let n = xor.len();
        // The element width from a sample in the middle, as `zstd-grouped` picks it.
        let width = self.pick_width(xor, &[1, 2, 4]);
        let input = grouped_by(xor, width, &mut self.grouped);
        let head = Coding::BASE_LEN as usize;
        let k = self.zc.compress_to_buffer(input, &mut out[head..]).ok()?;
        out[..head].copy_from_slice(&base_digest.to_le_bytes());
        let coding = Coding { flags: Coding::ZSTD | Coding::DELTA | group_flag(width), raw_len: n as u32 };
        (head + k <= n - n / 32).then_some((coding, head + k))
    }
}

/// `dst[i] ^= src[i]` (as long).
fn xor_into(dst: &mut [u8], src: &[u8]) {
    // Word by word: the byte loop is not always vectorised.
    let mut d = dst.chunks_exact_mut(8);
    let mut s = src.chunks_exact(8);
    for (a, b) in (&mut d).zip(&mut s) {
        let x = u64::from_ne_bytes(a.try_into().expect("8")) ^ u64::from_ne_bytes(b.try_into().expect("8"));
        a.copy_from_slice(&x.to_ne_bytes());
    }
    for (a, b) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *a ^= b;
    }
}

/// `raw` as the coder takes it at element width `width`: itself (1), else its bytes grouped by
/// position into `scratch` (at least as long).
fn grouped_by<'a>(raw: &'a [u8], width: usize, scratch: &'a mut [u8]) -> &'a [u8] {
    if width == 1 {
        return raw;
    }
    group(raw, width, &mut scratch[..raw.len()]);
    &scratch[..raw.len()]
}

/// Why a coded payload could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// zstd refused the bytes (corrupt, or not zstd).
    #[error("the compressed payload does not decompress: {0}")]
    Corrupt(std::io::Error),
    /// A delta whose base is not the receiver's (its digest, or the bytes read, differ).
    #[error("the delta's base differs from this node's: {0}")]
    Base(String),
    /// It decompressed to another length than the header says.
    #[error("the compressed payload decompresses to {got} bytes, the header says {want}")]
    Length {
        /// Bytes it decompressed to.
        got: usize,
        /// The raw length the header announced.
        want: usize,
    },
}

/// A replica's side: decodes payloads into a scratch buffer of one chunk (so a session's
/// memory does not grow with the push), and remembers which chunk it holds.
pub struct Decoder {
    zd: zstd::bulk::Decompressor<'static>,
    buf: Vec<u8>,
    grouped: Vec<u8>,
    /// The chunk whose bytes `buf` holds.
    holds: Option<u64>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder").field("holds", &self.holds).finish()
    }
}

impl Decoder {
    /// A decoder for chunks of at most `chunk_size` bytes.
    pub fn new(chunk_size: u32) -> std::io::Result<Self> {
        Ok(Self {
            zd: zstd::bulk::Decompressor::new()?,
            buf: vec![0; chunk_size as usize],
            grouped: vec![0; chunk_size as usize],
            holds: None,
        })
    }

    /// The bytes of chunk `seq` when they are the last decoded.
    pub fn held(&self, seq: u64, len: usize) -> Option<&[u8]> {
        (self.holds == Some(seq)).then(|| &self.buf[..len])
    }

    /// Decodes chunk `seq`'s `payload` coded as `coding`; its bytes stay held until the next
    /// decode.
    pub fn decode(&mut self, seq: u64, coding: Coding, payload: &[u8]) -> Result<&[u8], DecodeError> {
        self.holds = None;
        let want = coding.raw_len as usize;
        let w = coding.group_width();
        let target = if w == 1 { &mut self.buf[..want] } else { &mut self.grouped[..want] };
        // At most `want` bytes come out: a payload that would inflate further is refused.
        let got = self.zd.decompress_to_buffer(payload, target).map_err(DecodeError::Corrupt)?;
        if got != want {
            return Err(DecodeError::Length { got, want });
        }
        if w != 1 {
            ungroup(&self.grouped[..want], w, &mut self.buf[..want]);
        }
        self.holds = Some(seq);
        Ok(&self.buf[..want])
    }

    /// Decodes chunk `seq`'s delta (`zstd`: the payload after the base digest) and XORs it
    /// into `base`'s bytes; the result stays held like [`Decoder::decode`]'s.
    pub fn decode_delta(&mut self, seq: u64, coding: Coding, zstd: &[u8], base: &[u8]) -> Result<&[u8], DecodeError> {
        let want = coding.raw_len as usize;
        if base.len() != want {
            return Err(DecodeError::Base(format!("{} bytes for a chunk of {want}", base.len())));
        }
        self.decode(seq, coding, zstd)?;
        for (b, x) in self.buf[..want].iter_mut().zip(base) {
            *b ^= x;
        }
        Ok(&self.buf[..want])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A smooth bf16-like array: small values, few distinct exponents.
    fn bf16ish(n: usize) -> Vec<u8> {
        (0..n / 2)
            .flat_map(|i| {
                let x = ((i as f32) * 0.001).sin() * 0.02;
                let b = (x.to_bits() >> 16) as u16;
                b.to_le_bytes()
            })
            .collect()
    }

    #[test]
    fn group_round_trips_with_a_tail() {
        let src: Vec<u8> = (0..1027u32).map(|i| (i * 7) as u8).collect();
        for w in [2, 3, 4] {
            let mut g = vec![0; src.len()];
            let mut back = vec![0; src.len()];
            group(&src, w, &mut g);
            assert_ne!(g, src);
            // The layout on the wire: byte k of element i at k * n + i, then the tail.
            let n = src.len() / w;
            for (i, k) in (0..n).flat_map(|i| (0..w).map(move |k| (i, k))) {
                assert_eq!(g[k * n + i], src[i * w + k], "width {w}, element {i}, byte {k}");
            }
            assert_eq!(g[n * w..], src[n * w..]);
            ungroup(&g, w, &mut back);
            assert_eq!(back, src, "width {w}");
        }
    }

    fn coder() -> (Coder, Vec<u8>) {
        (Coder::new(None, 1 << 20).unwrap(), vec![0; coded_capacity(1 << 20)])
    }

    #[test]
    fn encode_decode_each_mode() {
        let raw = bf16ish(1 << 20);
        for mode in [Compress::Zstd, Compress::ZstdGrouped, Compress::Auto] {
            let (mut e, mut out) = coder();
            let (coding, n) = e.compress(mode, &raw, &mut out).expect("float data shrinks");
            assert!(n < raw.len());
            if mode != Compress::Auto {
                assert_eq!(coding.group_width() != 1, mode == Compress::ZstdGrouped, "{mode}: {coding:?}");
            }
            let mut d = Decoder::new(1 << 20).unwrap();
            assert_eq!(d.decode(3, coding, &out[..n]).unwrap(), &raw[..]);
            assert_eq!(d.held(3, raw.len()).unwrap(), &raw[..]);
            assert!(d.held(4, raw.len()).is_none());
        }
    }

    #[test]
    fn a_delta_decodes_onto_its_base_only() {
        let base = bf16ish(1 << 20);
        let mut new = base.clone();
        for i in (0..new.len()).step_by(4099) {
            new[i] ^= 0x5a;
        }
        let (mut e, mut out) = coder();
        let mut raw = new.clone();
        let (coding, n) = e.delta(&mut raw, &base, 77, &mut out).expect("a sparse XOR shrinks");
        let payload = &out[..n];
        assert!(coding.is_delta() && payload.len() < new.len() / 50, "{} bytes", payload.len());
        assert_eq!(raw, new, "the chunk is as it was after coding");
        assert_eq!(u128::from_le_bytes(payload[..16].try_into().unwrap()), 77);
        let payload = payload.to_vec();
        let mut d = Decoder::new(1 << 20).unwrap();
        assert_eq!(d.decode_delta(5, coding, &payload[16..], &base).unwrap(), &new[..]);
        let mut other = base.clone();
        other[10] ^= 1;
        assert_ne!(d.decode_delta(5, coding, &payload[16..], &other).unwrap(), &new[..]);
        assert!(d.decode_delta(5, coding, &payload[16..], &base[1..]).is_err());
    }

    #[test]
    fn random_bytes_go_raw() {
        // Hashes of a counter: as good as random to a compressor.
        let raw: Vec<u8> =
            (0..1u64 << 16).flat_map(|i| crate::manifest::digest(&i.to_le_bytes()).to_le_bytes()).collect();
        let (mut e, mut out) = coder();
        assert!(e.compress(Compress::Zstd, &raw, &mut out).is_none());
        let mut copy = raw.clone();
        let same = raw.clone();
        assert!(e.delta(&mut copy, &same, 1, &mut out).is_some(), "the XOR with itself is all zeros");
        assert_eq!(copy, raw);
    }

    #[test]
    fn corrupt_payload_is_refused() {
        let raw = bf16ish(1 << 18);
        let (mut e, mut out) = coder();
        let (coding, n) = e.compress(Compress::ZstdGrouped, &raw, &mut out).unwrap();
        let mut payload = out[..n].to_vec();
        let mut d = Decoder::new(1 << 18).unwrap();
        // A longer announced length than the data: refused, not padded.
        let long = Coding { raw_len: coding.raw_len - 1, ..coding };
        assert!(d.decode(0, long, &payload).is_err());
        payload.truncate(payload.len() / 2);
        assert!(d.decode(0, coding, &payload).is_err());
        assert!(d.held(0, raw.len()).is_none());
    }

    #[test]
    fn chunk_headers_carry_their_coding_and_nothing_else_does() {
        use crate::wire::{Header, Kind};
        let h = Header { kind: Kind::Chunk, len: 100, seq: 1, digest: 9 };
        let with = |flags: u8, raw_len: u32, kind: Kind| {
            let mut b = Header { kind, ..h }.to_bytes();
            Coding { flags, raw_len }.stamp(&mut b);
            Header::decode(&b)
        };
        assert_eq!(with(Coding::ZSTD | Coding::GROUP2, 4096, Kind::Chunk), Ok(h));
        assert!(with(Coding::ZSTD, 100, Kind::Chunk).is_err(), "a payload as long as the chunk");
        assert!(with(Coding::ZSTD | Coding::GROUP2 | Coding::GROUP4, 4096, Kind::Chunk).is_err());
        assert!(with(Coding::GROUP4, 0, Kind::Chunk).is_err(), "grouping without zstd");
        assert!(with(16, 4096, Kind::Chunk).is_err(), "an unknown flag");
        assert!(with(Coding::DELTA, 4096, Kind::Chunk).is_err(), "a delta without zstd");
        assert_eq!(with(Coding::ZSTD | Coding::DELTA, 4096, Kind::Chunk), Ok(h));
        let short = Header { len: 16, ..h };
        let mut b = short.to_bytes();
        Coding { flags: Coding::ZSTD | Coding::DELTA, raw_len: 4096 }.stamp(&mut b);
        assert!(Header::decode(&b).is_err(), "a delta payload of its base digest only");
        assert!(with(0, 4096, Kind::Chunk).is_err(), "a raw length on a raw chunk");
        assert!(with(Coding::ZSTD, 4096, Kind::End).is_err(), "flags on END");
    }

    #[test]
    fn auto_compresses_where_the_link_is_slower_than_its_coders() {
        // The rule itself, on given rates (ns a byte), not measured ones.
        let auto = |c: f64, l: f64, r: f64| Auto {
            compress: Rate(Some(c)),
            link: Rate(Some(l)),
            ratio: Some(r),
            next_probe: None,
        };
        assert_eq!(auto(1.0, 0.1, 0.5).pays(1), Some(false), "a link faster than the coder (loopback)");
        assert_eq!(auto(1.0, 8.0, 0.7).pays(1), Some(true), "1 Gbit/s against 1 GB/s of compression");
        assert_eq!(auto(1.0, 8.0, 0.99).pays(4), Some(false), "data that does not compress");
        assert_eq!(auto(7.0, 8.0, 0.5).pays(1), Some(false), "a tie goes raw");
        assert_eq!(auto(7.0, 8.0, 0.5).pays(2), Some(true), "two coders share the chunks");
        assert_eq!(Auto::default().pays(2), None);
        // Unknown: code (and let an idle link take the chunk raw); known slow link: code.
        let mut p = Policy::new(Compress::Auto, None, 1).unwrap();
        let now = Instant::now();
        assert!(p.code_next(now) && p.gives_way());
        p.link_sent(Duration::from_secs(1), 1000);
        p.coded(Duration::from_millis(1), 1 << 20, 1 << 19);
        assert!(p.code_next(now));
        // A link far faster than the coder: raw, but for a probe now and then.
        let mut p = Policy::new(Compress::Auto, None, 1).unwrap();
        p.link_delivery_rate(100_000_000_000);
        p.coded(Duration::from_millis(10), 1 << 20, 1 << 19);
        let now = Instant::now();
        assert!(!p.code_next(now), "a probe waits 100 x the last coding time");
        assert!(p.code_next(now + Duration::from_secs(2)), "a probe");
        assert!(!p.code_next(now + Duration::from_secs(2)), "one probe at a time");
        // Forced modes code every chunk and wait for it.
        let mut z = Policy::new(Compress::Zstd, None, 1).unwrap();
        z.link_delivery_rate(100_000_000_000);
        assert!(z.code_next(now) && !z.gives_way());
        assert!(Policy::new(Compress::Off, None, 1).is_none());
    }
}

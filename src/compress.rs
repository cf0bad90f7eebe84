//! Per-chunk compression of a push (`push --compress`): zstd, optionally after grouping the
//! bytes of float elements by position (all first bytes, then all second bytes, ...), which
//! puts the repetitive exponent bytes of bf16/fp32 weights together.
//!
//! The primary codes each chunk once ([`Encoder`]); relays forward the coded frame as it came;
//! every replica decodes it ([`Decoder`]) and checks the digest of the decoded bytes. A chunk
//! that does not shrink by at least 1/32 travels raw. `auto` compresses only while compressing
//! is faster than the first hop drains (see [`Encoder::encode`]).

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

/// `auto` codes a chunk only while this many frames wait for the first hop, the one being sent
/// included ([`Encoder::first_hop_backlog`]).
const AUTO_BACKLOG_FRAMES: usize = 2;

/// Bytes of a chunk the sample that picks the grouping (and measures the rate) compresses.
const SAMPLE: usize = 64 << 10;

/// Groups `src` by element width `w` into `dst` (same length): byte k of every element, for
/// k = 0..w, then the tail that does not fill an element.
pub fn group(src: &[u8], w: usize, dst: &mut [u8]) {
    let n = src.len() / w;
    for k in 0..w {
        let out = &mut dst[k * n..(k + 1) * n];
        for (i, o) in out.iter_mut().enumerate() {
            *o = src[i * w + k];
        }
    }
    dst[n * w..src.len()].copy_from_slice(&src[n * w..]);
}

/// Undoes [`group`].
pub fn ungroup(src: &[u8], w: usize, dst: &mut [u8]) {
    let n = src.len() / w;
    for k in 0..w {
        let inp = &src[k * n..(k + 1) * n];
        for (i, b) in inp.iter().enumerate() {
            dst[i * w + k] = *b;
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

/// `auto`'s measurements: how fast this node compresses and how well, how fast the first hop
/// drains (from the send completions downstream, which wait for the socket's buffer once the
/// link is the bottleneck), and how much waits for it now.
#[derive(Debug, Default)]
struct Auto {
    /// Frames waiting for the first hop (the send in flight included) when the chunk being
    /// coded was read ([`Encoder::first_hop_backlog`]).
    backlog: usize,
    compress: Rate,
    /// Wire bytes over raw bytes of what was compressed lately.
    ratio: Option<f64>,
    link: Rate,
    /// Samples cost time; while not compressing one is taken only once the last one's cost is
    /// under 1 % of the time since.
    next_probe: Option<Instant>,
}

impl Auto {
    /// Whether compressing pays now: only when the compressor produces raw bytes faster than
    /// the link takes them (then the link, not the compressor, sets the pace, and it moves
    /// fewer bytes). Unknown rates say no: a link is only measured once it pushed back.
    fn pays(&self) -> bool {
        match (self.compress.0, self.link.0, self.ratio) {
            // ns per raw byte compressing vs ns per raw byte the link takes uncompressed, with
            // a margin so that a tie goes raw.
            (Some(c), Some(l), Some(r)) => r < 0.97 && c * 1.2 < l,
            _ => false,
        }
    }
}

/// The primary's side: codes chunks into frames' payloads.
pub struct Encoder {
    mode: Compress,
    zc: zstd::bulk::Compressor<'static>,
    /// The fast compressor of samples.
    sample: zstd::bulk::Compressor<'static>,
    grouped: Vec<u8>,
    out: Vec<u8>,
    auto: Auto,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder").field("mode", &self.mode).finish_non_exhaustive()
    }
}

impl Encoder {
    /// An encoder for chunks of at most `chunk_size` bytes; None when `mode` is off.
    pub fn new(mode: Compress, level: Option<i32>, chunk_size: u32) -> std::io::Result<Option<Self>> {
        if mode == Compress::Off {
            return Ok(None);
        }
        let n = chunk_size as usize;
        Ok(Some(Self {
            mode,
            zc: zstd::bulk::Compressor::new(level.unwrap_or(DEFAULT_LEVEL))?,
            sample: zstd::bulk::Compressor::new(1)?,
            grouped: vec![0; n],
            out: vec![0; zstd::zstd_safe::compress_bound(n)],
            auto: Auto::default(),
        }))
    }

    /// Frames that wait for the first hop (the send in flight and those queued behind it) as
    /// the next chunk is coded: `auto` compresses a chunk only while at least
    /// [`AUTO_BACKLOG_FRAMES`] wait. Then the link, not this thread, sets the pace, and the time
    /// spent coding is covered by what the link still has to send; when coding falls behind (a
    /// slower core, a busy machine) the queue empties and chunks go raw until it fills again,
    /// so `auto` never starves the link it is meant to relieve. Frames, not bytes: the
    /// primary's pool holds 4 chunks by default, so coded frames (shorter) must count alike.
    pub fn first_hop_backlog(&mut self, frames: usize) {
        self.auto.backlog = frames;
    }

    /// A send of `bytes` to the first hop took `d` from submission to completion: a measure of
    /// the link only while its socket buffer is full (a send that finds room completes at
    /// once), so a TCP hop uses [`Encoder::link_delivery_rate`] instead.
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

    /// Picks the element width for `raw` from a sample in its middle (1: no grouping), among
    /// `widths`, measuring the sample's compression rate and ratio on the way.
    fn pick_width(&mut self, raw: &[u8], widths: &[usize]) -> usize {
        let t = Instant::now();
        let (best, best_len, len) = sample_width(&mut self.sample, raw, widths, &mut self.grouped, &mut self.out);
        if self.mode == Compress::Auto && len > 0 {
            // One trial per width: the rate of one, and the ratio of the best.
            self.auto.compress.add(t.elapsed() / widths.len() as u32, len);
            self.auto.ratio = Some(best_len as f64 / len as f64);
        }
        best
    }

    /// Codes `raw`: the coding and the coded payload, or None when it goes raw (it does not
    /// shrink by 1/32, or `auto` finds compressing slower than the link).
    pub fn encode(&mut self, raw: &[u8]) -> Option<(Coding, &[u8])> {
        let (coding, n) = self.try_encode(raw)?;
        Some((coding, &self.out[..n]))
    }

    fn try_encode(&mut self, raw: &[u8]) -> Option<(Coding, usize)> {
        if raw.len() < 64 {
            return None;
        }
        let width = match self.mode {
            Compress::Off => return None,
            Compress::Zstd => 1,
            Compress::ZstdGrouped => self.pick_width(raw, &[2, 4]),
            Compress::Auto => {
                if self.auto.backlog < AUTO_BACKLOG_FRAMES {
                    return None;
                }
                if !self.auto.pays() {
                    let now = Instant::now();
                    if self.auto.next_probe.is_some_and(|t| now < t) {
                        return None;
                    }
                    self.pick_width(raw, &[1, 2, 4]);
                    self.auto.next_probe = Some(now + now.elapsed() * 100);
                    if !self.auto.pays() {
                        return None;
                    }
                }
                self.pick_width(raw, &[1, 2, 4])
            }
        };
        let t = Instant::now();
        let input = grouped_by(raw, width, &mut self.grouped);
        let n = self.zc.compress_to_buffer(input, &mut self.out[..]).ok()?;
        if self.mode == Compress::Auto {
            self.auto.compress.add(t.elapsed(), raw.len());
            self.auto.ratio = Some(n as f64 / raw.len() as f64);
        }
        (n <= raw.len() - raw.len() / 32)
            .then_some((Coding { flags: Coding::ZSTD | group_flag(width), raw_len: raw.len() as u32 }, n))
    }
}

/// The primary's side of `push --delta`: codes the XOR of a chunk with its base (the same
/// chunk of the version the replicas hold), byte-grouped where a sample says it helps.
pub struct DeltaEncoder {
    zc: zstd::bulk::Compressor<'static>,
    sample: zstd::bulk::Compressor<'static>,
    xor: Vec<u8>,
    grouped: Vec<u8>,
    out: Vec<u8>,
}

impl std::fmt::Debug for DeltaEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeltaEncoder").finish_non_exhaustive()
    }
}

impl DeltaEncoder {
    /// A delta encoder for chunks of at most `chunk_size` bytes at zstd `level` (None: the
    /// default).
    pub fn new(level: Option<i32>, chunk_size: u32) -> std::io::Result<Self> {
        let n = chunk_size as usize;
        Ok(Self {
            zc: zstd::bulk::Compressor::new(level.unwrap_or(DEFAULT_LEVEL))?,
            sample: zstd::bulk::Compressor::new(1)?,
            xor: vec![0; n],
            grouped: vec![0; n],
            out: vec![0; Coding::BASE_LEN as usize + zstd::zstd_safe::compress_bound(n)],
        })
    }

    /// Codes `raw` as a delta against `base` (as long), whose digest is `base_digest`: the
    /// coding and the payload (the base's digest, then the zstd frame), or None when that does
    /// not shrink the chunk by 1/32 (it then goes as an ordinary chunk).
    pub fn encode(&mut self, raw: &[u8], base: &[u8], base_digest: u128) -> Option<(Coding, &[u8])> {
        let n = raw.len();
        if n < 64 || base.len() != n {
            return None;
        }
        for ((x, a), b) in self.xor[..n].iter_mut().zip(raw).zip(base) {
            *x = a ^ b;
        }
        // The element width from a sample in the middle, as `zstd-grouped` picks it.
        let (width, _, _) =
            sample_width(&mut self.sample, &self.xor[..n], &[1, 2, 4], &mut self.grouped, &mut self.out);
        let input = grouped_by(&self.xor[..n], width, &mut self.grouped);
        let head = Coding::BASE_LEN as usize;
        let k = self.zc.compress_to_buffer(input, &mut self.out[head..]).ok()?;
        self.out[..head].copy_from_slice(&base_digest.to_le_bytes());
        let coding = Coding { flags: Coding::ZSTD | Coding::DELTA | group_flag(width), raw_len: n as u32 };
        (head + k <= n - n / 32).then_some((coding, &self.out[..head + k]))
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
        for w in [2, 4] {
            let mut g = vec![0; src.len()];
            let mut back = vec![0; src.len()];
            group(&src, w, &mut g);
            assert_ne!(g, src);
            ungroup(&g, w, &mut back);
            assert_eq!(back, src, "width {w}");
        }
    }

    #[test]
    fn encode_decode_each_mode() {
        let raw = bf16ish(1 << 20);
        for mode in [Compress::Zstd, Compress::ZstdGrouped] {
            let mut e = Encoder::new(mode, None, 1 << 20).unwrap().unwrap();
            let (coding, payload) = e.encode(&raw).expect("float data shrinks");
            assert!(payload.len() < raw.len());
            assert_eq!(coding.group_width() != 1, mode == Compress::ZstdGrouped, "{mode}: {coding:?}");
            let payload = payload.to_vec();
            let mut d = Decoder::new(1 << 20).unwrap();
            assert_eq!(d.decode(3, coding, &payload).unwrap(), &raw[..]);
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
        let mut e = DeltaEncoder::new(None, 1 << 20).unwrap();
        let (coding, payload) = e.encode(&new, &base, 77).expect("a sparse XOR shrinks");
        assert!(coding.is_delta() && payload.len() < new.len() / 50, "{} bytes", payload.len());
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
        let mut e = Encoder::new(Compress::Zstd, None, 1 << 20).unwrap().unwrap();
        assert!(e.encode(&raw).is_none());
    }

    #[test]
    fn corrupt_payload_is_refused() {
        let raw = bf16ish(1 << 18);
        let mut e = Encoder::new(Compress::ZstdGrouped, None, 1 << 18).unwrap().unwrap();
        let (coding, payload) = e.encode(&raw).unwrap();
        let mut payload = payload.to_vec();
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
    fn auto_does_not_compress_without_a_slow_link() {
        let raw = bf16ish(1 << 20);
        let mut e = Encoder::new(Compress::Auto, None, 1 << 20).unwrap().unwrap();
        // Nothing waits for the link: raw, and not even a sample is taken.
        assert!(e.encode(&raw).is_none());
        assert!(e.auto.compress.0.is_none());
        // Two frames wait but no link was measured yet: raw, after one sample.
        e.first_hop_backlog(2);
        assert!(e.encode(&raw).is_none());
        assert!(e.auto.compress.0.is_some() && e.auto.ratio.is_some());
        // The rule itself, on given rates (ns a byte), not measured ones.
        let auto = |c: f64, l: f64, r: f64| Auto {
            backlog: 0,
            compress: Rate(Some(c)),
            link: Rate(Some(l)),
            ratio: Some(r),
            next_probe: None,
        };
        assert!(!auto(1.0, 0.1, 0.5).pays(), "a link faster than the compressor (loopback)");
        assert!(auto(1.0, 8.0, 0.7).pays(), "1 Gbit/s against 1 GB/s of compression");
        assert!(!auto(1.0, 8.0, 0.99).pays(), "data that does not compress");
        assert!(!auto(7.0, 8.0, 0.5).pays(), "a tie goes raw");
        assert!(!Auto::default().pays());
    }

    #[test]
    fn auto_compresses_only_while_chunks_wait_for_the_link() {
        let raw = bf16ish(1 << 20);
        let mut e = Encoder::new(Compress::Auto, Some(1), 1 << 20).unwrap().unwrap();
        // A link that takes 1 ms a byte: slower than any compressor, even a debug build's.
        e.link_sent(Duration::from_secs(1), 1000);
        e.first_hop_backlog(2);
        assert!(e.encode(&raw).is_some(), "two frames wait for a slow link: compress");
        // The queue ran dry (coding fell behind the link): raw, whatever the rates say.
        e.first_hop_backlog(1);
        assert!(e.auto.pays());
        assert!(e.encode(&raw).is_none());
        e.first_hop_backlog(3);
        assert!(e.encode(&raw).is_some());
    }
}

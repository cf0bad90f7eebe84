//! Frame formats, versioned, with explicit and bounded lengths.
//!
//! Every frame is a [`HEADER_LEN`]-byte [`Header`] followed by `len` payload bytes (layout in
//! ARCHITECTURE.md). Payloads are encoded with [`Enc`] and decoded with [`Dec`], which checks
//! every length against what is left before it reads, so garbage yields a [`WireError`], never a
//! panic or an unbounded allocation.

use std::io::{self, Read, Write};

use crate::error::{ErrorKind, NodeError, WireError};
use crate::manifest::Manifest;

/// Length of a frame header in bytes.
pub const HEADER_LEN: usize = 40;
/// The magic that opens every frame.
pub const MAGIC: [u8; 4] = *b"SHCS";
/// The protocol version this build speaks.
pub const PROTO_VERSION: u16 = 5;
/// The largest chunk a manifest may declare.
pub const MAX_CHUNK: u32 = 64 << 20;
/// The smallest chunk a manifest may declare.
pub const MIN_CHUNK: u32 = 4 << 10;
/// The largest HELLO (it carries the manifest).
pub const MAX_HELLO: u32 = 256 << 20;
/// The largest REJECT / RESULT payload (a list of replica reports).
pub const MAX_REPORTS: u32 = 1 << 20;
/// The largest STATUS_RESP payload.
pub const MAX_STATUS: u32 = 16 << 20;
/// The longest string field (a path, a message, an address).
pub const MAX_STR: usize = 4096;

/// The kinds of frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Start of a push: name, version, the rest of the chain, the manifest.
    Hello = 1,
    /// Every node from here to the tail accepted the push.
    Accept = 2,
    /// A node refused the push; payload: reports.
    Reject = 3,
    /// One chunk: `seq` its number, `digest` its xxh3-128, payload its bytes.
    Chunk = 4,
    /// No more chunks; `seq` is the chunk count, `digest` the completed manifest's digest.
    End = 5,
    /// Chunks `0..seq` are written here and at every node after this one (progress; durability is what RESULT reports).
    Ack = 6,
    /// The outcome of the push for this node and every node after it; payload: reports.
    Result = 7,
    /// Asks a replica what it holds.
    StatusReq = 8,
    /// What a replica holds; payload: a list of shard sets.
    StatusResp = 9,
    /// Per-hop transport negotiation after ACCEPT (when the push allows RDMA); payload: a
    /// [`TransportMsg`].
    Transport = 10,
    /// RDMA hops: pool slots the receiver grants the sender to write into; payload: u16 slot
    /// numbers.
    Credit = 11,
    /// Authentication with the cluster key (see `auth.rs`): the first frames of a connection.
    Auth = 12,
}

/// Largest ACCEPT payload: a routed push's held-chunk ranges (16 bytes a range; at worst every
/// other chunk of a large push on each node).
pub const MAX_HAVES: u32 = 64 << 20;
/// Largest TRANSPORT payload.
pub const MAX_TRANSPORT: u32 = 64 << 10;
/// The largest CREDIT payload (every slot of a pool, twice over).
pub const MAX_CREDIT: u32 = 4 << 16;

impl Kind {
    /// Decodes a kind byte.
    pub fn from_u8(b: u8) -> Result<Self, WireError> {
        Ok(match b {
            1 => Self::Hello,
            2 => Self::Accept,
            3 => Self::Reject,
            4 => Self::Chunk,
            5 => Self::End,
            6 => Self::Ack,
            7 => Self::Result,
            8 => Self::StatusReq,
            9 => Self::StatusResp,
            10 => Self::Transport,
            11 => Self::Credit,
            12 => Self::Auth,
            other => return Err(WireError::UnknownKind(other)),
        })
    }

    /// The frame's name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hello => "HELLO",
            Self::Accept => "ACCEPT",
            Self::Reject => "REJECT",
            Self::Chunk => "CHUNK",
            Self::End => "END",
            Self::Ack => "ACK",
            Self::Result => "RESULT",
            Self::StatusReq => "STATUS_REQ",
            Self::StatusResp => "STATUS_RESP",
            Self::Transport => "TRANSPORT",
            Self::Credit => "CREDIT",
            Self::Auth => "AUTH",
        }
    }

    /// The largest payload a frame of this kind may carry.
    pub fn max_len(self) -> u32 {
        match self {
            Self::Hello => MAX_HELLO,
            Self::Chunk => MAX_CHUNK,
            Self::Reject | Self::Result => MAX_REPORTS,
            Self::StatusResp => MAX_STATUS,
            Self::Transport => MAX_TRANSPORT,
            Self::Credit => MAX_CREDIT,
            Self::Accept => MAX_HAVES,
            Self::Auth => 1024,
            Self::End | Self::Ack | Self::StatusReq => 0,
        }
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The frame kind.
    pub kind: Kind,
    /// Payload length in bytes.
    pub len: u32,
    /// Kind-specific number (chunk number, ack point, chunk count).
    pub seq: u64,
    /// xxh3-128 of a CHUNK's payload; zero otherwise.
    pub digest: u128,
}

impl Header {
    /// A header of `kind` with everything else zero.
    pub fn new(kind: Kind) -> Self {
        Self { kind, len: 0, seq: 0, digest: 0 }
    }

    /// Encodes into `out`.
    pub fn encode(&self, out: &mut [u8; HEADER_LEN]) {
        out[0..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&PROTO_VERSION.to_le_bytes());
        out[6] = self.kind as u8;
        out[7] = 0;
        out[8..12].copy_from_slice(&self.len.to_le_bytes());
        out[12..16].copy_from_slice(&[0; 4]);
        out[16..24].copy_from_slice(&self.seq.to_le_bytes());
        out[24..40].copy_from_slice(&self.digest.to_le_bytes());
    }

    /// Encodes into a new array.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0; HEADER_LEN];
        self.encode(&mut out);
        out
    }

    /// Decodes and checks a header: magic, version, kind, and the kind's length bound.
    pub fn decode(buf: &[u8; HEADER_LEN]) -> Result<Self, WireError> {
        let magic: [u8; 4] = buf[0..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let version = u16::from_le_bytes(buf[4..6].try_into().expect("2 bytes"));
        if version != PROTO_VERSION {
            return Err(WireError::BadVersion(version));
        }
        let kind = Kind::from_u8(buf[6])?;
        // No kind uses the flags byte or the reserved bytes yet: refusing anything but zero
        // keeps them usable later (a peer that sets them speaks something this build does not).
        if buf[7] != 0 || buf[12..16] != [0; 4] {
            return Err(WireError::Invalid(format!(
                "frame header: flags {:#04x} and reserved bytes {:02x?} must be zero",
                buf[7],
                &buf[12..16]
            )));
        }
        let len = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes"));
        if len > kind.max_len() {
            return Err(WireError::TooLong { kind: kind.name(), len: len.into(), max: kind.max_len().into() });
        }
        Ok(Self {
            kind,
            len,
            seq: u64::from_le_bytes(buf[16..24].try_into().expect("8 bytes")),
            digest: u128::from_le_bytes(buf[24..40].try_into().expect("16 bytes")),
        })
    }
}

/// A payload encoder.
#[derive(Debug, Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    /// Appends a byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    /// Appends a little-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a little-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a little-endian u128.
    pub fn u128(&mut self, v: u128) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a string: u32 length, then its UTF-8 bytes (truncated to [`MAX_STR`] bytes at a
    /// character boundary, so that what is encoded always decodes).
    pub fn str(&mut self, s: &str) -> &mut Self {
        let mut end = s.len().min(MAX_STR);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.u32(end as u32);
        self.0.extend_from_slice(&s.as_bytes()[..end]);
        self
    }
}

/// A payload decoder over a byte slice.
#[derive(Debug)]
pub struct Dec<'a> {
    buf: &'a [u8],
}

impl<'a> Dec<'a> {
    /// A decoder over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }
    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    /// Reads a byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }
    /// Reads a little-endian u32.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4")))
    }
    /// Reads a little-endian u64.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8")))
    }
    /// Reads a little-endian u128.
    pub fn u128(&mut self, what: &'static str) -> Result<u128, WireError> {
        Ok(u128::from_le_bytes(self.take(16, what)?.try_into().expect("16")))
    }
    /// Reads a string of at most [`MAX_STR`] bytes.
    pub fn str(&mut self, what: &'static str) -> Result<String, WireError> {
        let len = self.u32(what)? as usize;
        if len > MAX_STR {
            return Err(WireError::Invalid(format!("{what}: {len} bytes is too long")));
        }
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| WireError::Invalid(format!("{what}: not UTF-8")))
    }
    /// Reads a count and checks that at least `count * min_item` bytes remain, so that a
    /// hostile count cannot make the caller allocate more than the frame holds.
    pub fn count(&mut self, what: &'static str, min_item: usize) -> Result<usize, WireError> {
        let n = self.u64(what)?;
        let need = n.checked_mul(min_item as u64).ok_or(WireError::Truncated(what))?;
        if need > self.buf.len() as u64 {
            return Err(WireError::Truncated(what));
        }
        Ok(n as usize)
    }
    /// Checks that nothing is left over.
    pub fn finish(&self, what: &'static str) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Invalid(format!("{} trailing bytes after {what}", self.buf.len())))
        }
    }
}

/// Flags a HELLO carries to every node of the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HelloFlags(pub u8);

impl HelloFlags {
    /// The primary repairs the chain when a replica dies: a relay whose downstream dies (or
    /// reports a dead node) stops at once, keeping what it journaled, instead of receiving the
    /// rest alone, so that one repair push feeds it and every node cut off together.
    pub const REPAIR: u8 = 1;
    /// Chunk payloads are encrypted on every TCP hop (AES-256-GCM, per-hop keys from the
    /// authentication handshake; see `crypt.rs`).
    pub const ENCRYPT: u8 = 2;
    const KNOWN: u8 = Self::REPAIR | Self::ENCRYPT;

    /// From the wire byte; unknown bits are refused (a newer primary asks for something this
    /// replica cannot do).
    pub fn from_bits(b: u8) -> Result<Self, NodeError> {
        if b & !Self::KNOWN != 0 {
            return Err(NodeError::new(
                ErrorKind::Unsupported,
                format!("HELLO asks for features this replica does not have (flags {b:#04x}); upgrade it"),
            ));
        }
        Ok(Self(b))
    }

    /// Whether `bit` is set.
    pub fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }

    /// With `bit` set or cleared.
    #[must_use]
    pub fn with(self, bit: u8, on: bool) -> Self {
        Self(if on { self.0 | bit } else { self.0 & !bit })
    }
}

/// Replication mode of a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The push returns when the tail has published.
    Sync,
    /// The push returns when the first replica has published; the rest of the chain completes
    /// on its own (`shardcast status` shows how far each replica is).
    Async,
}

/// The first frame of a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Shard set name.
    pub name: String,
    /// Version being pushed.
    pub version: u64,
    /// Replication mode.
    pub mode: Mode,
    /// Transport choice for every hop (each hop negotiates what both ends can do).
    pub transport: crate::transport::Transport,
    /// How many versions of this name each replica keeps after publishing (0: the replica's
    /// own `--keep`).
    pub keep: u32,
    /// [`HelloFlags`]: what the push asks of every node besides the data.
    pub flags: HelloFlags,
    /// The receiver's name in the chain (the address its upstream dialed); replicas report
    /// themselves under it.
    pub you: String,
    /// The nodes after the receiver, in chain order.
    pub downstream: Vec<String>,
    /// The version's manifest: a plan without digests (they travel with the chunks), or, in a
    /// routed push, complete with every chunk's digest.
    pub manifest: Manifest,
    /// A routed push: the manifest entries each node wants, the receiver first, then each node
    /// after it in chain order (None: all of them). Empty: an ordinary push (everything to
    /// everyone). Routed pushes carry every digest.
    pub wants: Vec<Option<Vec<u32>>>,
    /// The rights the push travels with: whose key started it and the limits the nodes before
    /// the receiver put on it (protocol 5). Every node narrows them with its own rules, never
    /// widens them.
    pub grant: Grant,
}

/// On whose behalf a push travels, and what it may do (HELLO, protocol 5).
///
/// The first replica sets it from the key the primary authenticated with; each relay forwards
/// what it allowed, so the limits of a key hold at every node of the chain, though the relays
/// dial onward with their own keys.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Grant {
    /// The id of the key the push started with (the primary's); empty: none known.
    pub origin: String,
    /// The limits on the push (None: none).
    pub limits: Option<Limits>,
}

/// What a limited key may do (`serve --acl`), as a push carries it down the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Name prefixes it may push (an empty prefix: any name).
    pub names: Vec<String>,
    /// Whether its versions may become `current`.
    pub replace_current: bool,
    /// Whether it may prune versions (HELLO's `keep`).
    pub prune: bool,
}

impl Limits {
    /// Whether these limits allow pushing `name`.
    pub fn allows(&self, name: &str) -> bool {
        self.names.iter().any(|p| name.starts_with(p.as_str()))
    }

    /// What both `a` and `b` allow (None: no limit).
    pub fn intersect(a: Option<&Self>, b: Option<&Self>) -> Option<Self> {
        match (a, b) {
            (None, None) => None,
            (Some(x), None) | (None, Some(x)) => Some(x.clone()),
            (Some(a), Some(b)) => {
                // A name passes both lists when it starts with a prefix of each: the longer of
                // two prefixes where one extends the other.
                let mut names: Vec<String> = Vec::new();
                for p in &a.names {
                    for q in &b.names {
                        let both = if p.starts_with(q.as_str()) {
                            p
                        } else if q.starts_with(p.as_str()) {
                            q
                        } else {
                            continue;
                        };
                        if !names.contains(both) {
                            names.push(both.clone());
                        }
                    }
                }
                Some(Self { names, replace_current: a.replace_current && b.replace_current, prune: a.prune && b.prune })
            }
        }
    }
}

impl Grant {
    fn encode(&self, e: &mut Enc) {
        e.str(&self.origin);
        match &self.limits {
            None => {
                e.u8(0);
            }
            Some(l) => {
                e.u8(1).u64(l.names.len() as u64);
                for n in &l.names {
                    e.str(n);
                }
                e.u8(u8::from(l.replace_current)).u8(u8::from(l.prune));
            }
        }
    }

    fn decode(d: &mut Dec<'_>) -> Result<Self, WireError> {
        let origin = d.str("grant origin")?;
        let limits = match d.u8("limits flag")? {
            0 => None,
            1 => {
                let n = d.count("limit names", 4)?;
                let mut names = Vec::with_capacity(n);
                for _ in 0..n {
                    names.push(d.str("limit name")?);
                }
                let flag = |d: &mut Dec<'_>, what| match d.u8(what)? {
                    0 => Ok(false),
                    1 => Ok(true),
                    f => Err(WireError::Invalid(format!("{what} {f}"))),
                };
                let replace_current = flag(d, "replace_current")?;
                let prune = flag(d, "prune")?;
                Some(Limits { names, replace_current, prune })
            }
            f => return Err(WireError::Invalid(format!("limits flag {f}"))),
        };
        Ok(Self { origin, limits })
    }
}

impl Hello {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.str(&self.name).u64(self.version).u8(match self.mode {
            Mode::Sync => 0,
            Mode::Async => 1,
        });
        e.u8(self.transport.code());
        e.u32(self.keep);
        e.u8(self.flags.0);
        e.str(&self.you);
        e.u64(self.downstream.len() as u64);
        for node in &self.downstream {
            e.str(node);
        }
        e.u64(self.wants.len() as u64);
        for w in &self.wants {
            match w {
                None => {
                    e.u8(0);
                }
                Some(list) => {
                    e.u8(1).u64(list.len() as u64);
                    for &i in list {
                        e.u32(i);
                    }
                }
            }
        }
        // Protocol 5: the grant, after every fixed field (the manifest takes the rest).
        self.grant.encode(&mut e);
        let manifest = if self.wants.is_empty() { self.manifest.encode_plan() } else { self.manifest.encode() };
        e.0.extend_from_slice(&manifest);
        e.0
    }

    /// Decodes and validates the payload (including the manifest's paths).
    pub fn decode(buf: &[u8]) -> Result<Self, NodeError> {
        let bad = |e: WireError| NodeError::new(ErrorKind::Protocol, format!("bad HELLO: {e}"));
        let mut d = Dec::new(buf);
        let name = d.str("name").map_err(bad)?;
        let version = d.u64("version").map_err(bad)?;
        let mode = match d.u8("mode").map_err(bad)? {
            0 => Mode::Sync,
            1 => Mode::Async,
            m => {
                return Err(NodeError::new(
                    ErrorKind::Unsupported,
                    format!("replication mode {m} is not supported by this replica"),
                ));
            }
        };
        let transport = crate::transport::Transport::from_code(d.u8("transport").map_err(bad)?)
            .ok_or_else(|| NodeError::new(ErrorKind::Protocol, "bad HELLO: unknown transport code"))?;
        let keep = d.u32("keep").map_err(bad)?;
        let flags = HelloFlags::from_bits(d.u8("flags").map_err(bad)?)?;
        let you = d.str("you").map_err(bad)?;
        let n = d.count("downstream", 4).map_err(bad)?;
        let mut downstream = Vec::with_capacity(n);
        for _ in 0..n {
            downstream.push(d.str("downstream node").map_err(bad)?);
        }
        let n = d.count("wants", 1).map_err(bad)?;
        if n != 0 && n != downstream.len() + 1 {
            return Err(NodeError::new(
                ErrorKind::Protocol,
                format!("bad HELLO: wants for {n} nodes in a chain of {}", downstream.len() + 1),
            ));
        }
        let mut wants = Vec::with_capacity(n);
        for _ in 0..n {
            wants.push(match d.u8("wants flag").map_err(bad)? {
                0 => None,
                1 => {
                    let k = d.count("wanted entries", 4).map_err(bad)?;
                    let mut list = Vec::with_capacity(k);
                    for _ in 0..k {
                        list.push(d.u32("wanted entry").map_err(bad)?);
                    }
                    Some(list)
                }
                f => return Err(NodeError::new(ErrorKind::Protocol, format!("bad HELLO: wants flag {f}"))),
            });
        }
        let grant = Grant::decode(&mut d).map_err(bad)?;
        let rest = &buf[buf.len() - d.remaining()..];
        let manifest = if wants.is_empty() { Manifest::decode_plan(rest) } else { Manifest::decode(rest) }
            .map_err(|e| NodeError::new(ErrorKind::BadManifest, e.to_string()))?;
        let entries = manifest.entries().len();
        if let Some(&i) = wants.iter().flatten().flatten().find(|&&i| i as usize >= entries) {
            return Err(NodeError::new(
                ErrorKind::BadManifest,
                format!("a wanted entry ({i}) is past the manifest's {entries} entries"),
            ));
        }
        Ok(Self { name, version, mode, transport, keep, flags, you, downstream, manifest, wants, grant })
    }
}

/// ACCEPT's payload in a routed push: for this node and each node after it, in chain order,
/// the chunks it already holds (from its current version) as `(start, len)` ranges; they do
/// not travel to it. An ordinary push's ACCEPT is empty.
pub fn encode_haves(haves: &[Vec<(u64, u64)>]) -> Vec<u8> {
    let mut e = Enc::default();
    e.u64(haves.len() as u64);
    for ranges in haves {
        e.u64(ranges.len() as u64);
        for &(start, len) in ranges {
            e.u64(start).u64(len);
        }
    }
    e.0
}

/// Decodes [`encode_haves`]'s payload, checking every range lies below `total` chunks.
pub fn decode_haves(buf: &[u8], total: u64) -> Result<Vec<Vec<(u64, u64)>>, WireError> {
    let mut d = Dec::new(buf);
    let n = d.count("nodes", 8)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let k = d.count("ranges", 16)?;
        let mut ranges = Vec::with_capacity(k);
        for _ in 0..k {
            let (start, len) = (d.u64("range start")?, d.u64("range length")?);
            if start.checked_add(len).is_none_or(|end| end > total) {
                return Err(WireError::Invalid(format!("held chunks {start}+{len} past the {total} chunks")));
            }
            ranges.push((start, len));
        }
        out.push(ranges);
    }
    d.finish("haves")?;
    Ok(out)
}

/// What a push achieved on one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The version is published there.
    Published,
    /// It is not, and why.
    Failed(NodeError),
    /// Still receiving when an async push returned (it goes on by itself).
    Behind,
}

/// One replica's report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaReport {
    /// The node's address as named in the chain.
    pub node: String,
    /// What happened there.
    pub outcome: Outcome,
}

impl ReplicaReport {
    /// A failed report.
    pub fn failed(node: impl Into<String>, error: NodeError) -> Self {
        Self { node: node.into(), outcome: Outcome::Failed(error) }
    }
}

/// Encodes a list of reports (REJECT and RESULT payloads).
pub fn encode_reports(reports: &[ReplicaReport]) -> Vec<u8> {
    let mut e = Enc::default();
    e.u64(reports.len() as u64);
    for r in reports {
        e.str(&r.node);
        match &r.outcome {
            Outcome::Published => {
                e.u8(0);
            }
            Outcome::Failed(err) => {
                e.u8(err.kind.code()).str(&err.message);
            }
            Outcome::Behind => {
                e.u8(BEHIND);
            }
        }
    }
    e.0
}

/// The status byte of a report that says [`Outcome::Behind`].
const BEHIND: u8 = 255;

/// Decodes a list of reports.
pub fn decode_reports(buf: &[u8]) -> Result<Vec<ReplicaReport>, WireError> {
    let mut d = Dec::new(buf);
    let n = d.count("reports", 5)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let node = d.str("report node")?;
        let outcome = match d.u8("report status")? {
            0 => Outcome::Published,
            BEHIND => Outcome::Behind,
            code => Outcome::Failed(NodeError::new(ErrorKind::from_code(code), d.str("report message")?)),
        };
        out.push(ReplicaReport { node, outcome });
    }
    d.finish("reports")?;
    Ok(out)
}

/// What a replica holds of one shard set.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SetStatus {
    /// Shard set name.
    pub name: String,
    /// The version `current` points at, if any.
    pub current: Option<u64>,
    /// Every published version, ascending.
    pub versions: Vec<u64>,
    /// Versions being received: (version, bytes written so far, bytes in all).
    pub receiving: Vec<(u64, u64, u64)>,
}

/// Encodes a STATUS_RESP payload.
pub fn encode_status(sets: &[SetStatus]) -> Vec<u8> {
    let mut e = Enc::default();
    e.u64(sets.len() as u64);
    for s in sets {
        e.str(&s.name);
        match s.current {
            Some(v) => e.u8(1).u64(v),
            None => e.u8(0),
        };
        e.u64(s.versions.len() as u64);
        for v in &s.versions {
            e.u64(*v);
        }
        e.u64(s.receiving.len() as u64);
        for &(v, done, total) in &s.receiving {
            e.u64(v).u64(done).u64(total);
        }
    }
    e.0
}

/// Decodes a STATUS_RESP payload.
pub fn decode_status(buf: &[u8]) -> Result<Vec<SetStatus>, WireError> {
    let mut d = Dec::new(buf);
    let n = d.count("sets", 13)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let name = d.str("set name")?;
        let current = match d.u8("current flag")? {
            0 => None,
            1 => Some(d.u64("current")?),
            f => return Err(WireError::Invalid(format!("current flag {f}"))),
        };
        let nv = d.count("versions", 8)?;
        let mut versions = Vec::with_capacity(nv);
        for _ in 0..nv {
            versions.push(d.u64("version")?);
        }
        let nr = d.count("receiving", 24)?;
        let mut receiving = Vec::with_capacity(nr);
        for _ in 0..nr {
            receiving.push((d.u64("version")?, d.u64("bytes done")?, d.u64("bytes")?));
        }
        out.push(SetStatus { name, current, versions, receiving });
    }
    d.finish("status")?;
    Ok(out)
}

/// One side's word in a hop's transport negotiation (TRANSPORT frames, after ACCEPT).
///
/// The upstream side offers, the downstream side answers; RDMA is used only when both say
/// `Rdma`. The answer's `credits` are the pool slots the sender may write into first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportMsg {
    /// TCP for this hop, and why not RDMA (shown to the user when RDMA was required).
    Tcp {
        /// Why this side does not do RDMA here.
        reason: String,
    },
    /// RDMA: this side's queue pair and registered pool.
    Rdma {
        /// The device and GID index used (for messages).
        device: String,
        /// Queue pair number.
        qpn: u32,
        /// First packet sequence number.
        psn: u32,
        /// GID (RoCEv2: IPv4-mapped address).
        gid: [u8; 16],
        /// Active path MTU (ibv_mtu enum).
        mtu: u8,
        /// Remote key of the pool.
        rkey: u32,
        /// Pool base address.
        addr: u64,
        /// Bytes between slots of the pool (the receiver's; the sender's is ignored).
        slot_size: u32,
        /// Slots the sender may write into now (answer only).
        credits: Vec<u16>,
    },
}

impl TransportMsg {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        match self {
            Self::Tcp { reason } => {
                e.u8(0).str(reason);
            }
            Self::Rdma { device, qpn, psn, gid, mtu, rkey, addr, slot_size, credits } => {
                e.u8(1).str(device).u32(*qpn).u32(*psn).u128(u128::from_le_bytes(*gid)).u8(*mtu).u32(*rkey);
                e.u64(*addr).u32(*slot_size).u64(credits.len() as u64);
                for c in credits {
                    e.u32(u32::from(*c));
                }
            }
        }
        e.0
    }

    /// Decodes the payload.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut d = Dec::new(buf);
        let msg = match d.u8("transport kind")? {
            0 => Self::Tcp { reason: d.str("reason")? },
            1 => {
                let device = d.str("device")?;
                let qpn = d.u32("qpn")?;
                let psn = d.u32("psn")?;
                let gid = d.u128("gid")?.to_le_bytes();
                let mtu = d.u8("mtu")?;
                let rkey = d.u32("rkey")?;
                let addr = d.u64("addr")?;
                let slot_size = d.u32("slot size")?;
                let n = d.count("credits", 4)?;
                let mut credits = Vec::with_capacity(n);
                for _ in 0..n {
                    let c = d.u32("credit")?;
                    credits.push(u16::try_from(c).map_err(|_| WireError::Invalid(format!("credit slot {c}")))?);
                }
                Self::Rdma { device, qpn, psn, gid, mtu, rkey, addr, slot_size, credits }
            }
            k => return Err(WireError::Invalid(format!("transport kind {k}"))),
        };
        d.finish("transport")?;
        Ok(msg)
    }
}

/// Encodes a CREDIT payload: slot numbers.
pub fn encode_credits(slots: &[u16], out: &mut Vec<u8>) {
    for s in slots {
        out.extend_from_slice(&s.to_le_bytes());
    }
}

/// Decodes a CREDIT payload.
pub fn decode_credits(buf: &[u8]) -> Result<Vec<u16>, WireError> {
    if buf.len() % 2 != 0 {
        return Err(WireError::Invalid(format!("CREDIT payload of {} bytes", buf.len())));
    }
    Ok(buf.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect())
}

/// A frame read with blocking I/O (control plane only; chunks go through the data plane).
#[derive(Debug)]
pub struct Frame {
    /// The header.
    pub header: Header,
    /// The payload.
    pub payload: Vec<u8>,
}

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadFrameError {
    /// The connection failed or closed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The bytes are not a valid frame.
    #[error("{0}")]
    Wire(#[from] WireError),
}

/// Reads one frame; the payload is bounded by the header's kind.
pub fn read_frame(r: &mut impl Read) -> Result<Frame, ReadFrameError> {
    read_frame_max(r, u32::MAX)
}

/// Reads one frame whose payload is at most `max` bytes (and its kind's bound): a frame that
/// announces more is refused from its header, before anything is allocated for it (what an
/// unauthenticated peer may send is small).
pub fn read_frame_max(r: &mut impl Read, max: u32) -> Result<Frame, ReadFrameError> {
    let mut hdr = [0u8; HEADER_LEN];
    r.read_exact(&mut hdr)?;
    let header = Header::decode(&hdr)?;
    if header.len > max {
        return Err(WireError::TooLong { kind: header.kind.name(), len: header.len.into(), max: max.into() }.into());
    }
    if header.kind == Kind::Chunk {
        // Chunks never travel through the blocking path; refusing here keeps a control read
        // from allocating a chunk-sized buffer on a peer's say-so.
        return Err(WireError::Unexpected { got: "CHUNK", expected: "a control frame" }.into());
    }
    let mut payload = vec![0u8; header.len as usize];
    r.read_exact(&mut payload)?;
    Ok(Frame { header, payload })
}

/// Writes one frame with a payload.
pub fn write_frame(w: &mut impl Write, kind: Kind, seq: u64, payload: &[u8]) -> io::Result<()> {
    let header = Header { kind, len: payload.len() as u32, seq, digest: 0 };
    let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
    buf.extend_from_slice(&header.to_bytes());
    buf.extend_from_slice(payload);
    w.write_all(&buf)?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_round_trip() {
        let h = Header { kind: Kind::Chunk, len: 4096, seq: 7, digest: 0xdead_beef };
        assert_eq!(Header::decode(&h.to_bytes()).unwrap(), h);
    }

    #[test]
    fn header_rejects_garbage() {
        let mut b = Header::new(Kind::Ack).to_bytes();
        b[0] = b'X';
        assert!(matches!(Header::decode(&b), Err(WireError::BadMagic(_))));
        let mut b = Header::new(Kind::Ack).to_bytes();
        b[6] = 200;
        assert_eq!(Header::decode(&b), Err(WireError::UnknownKind(200)));
        let mut b = Header::new(Kind::Ack).to_bytes();
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(Header::decode(&b), Err(WireError::TooLong { .. })));
        let mut b = Header::new(Kind::Hello).to_bytes();
        b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(Header::decode(&b), Err(WireError::TooLong { .. })));
    }

    #[test]
    fn an_older_version_is_refused_naming_both_versions() {
        let mut b = Header::new(Kind::Hello).to_bytes();
        b[4..6].copy_from_slice(&4u16.to_le_bytes());
        let e = Header::decode(&b).unwrap_err();
        assert_eq!(e, WireError::BadVersion(4));
        let msg = e.to_string();
        assert!(msg.contains("version 4") && msg.contains(&format!("speaks {PROTO_VERSION}")), "{msg}");
    }

    #[test]
    fn grants_round_trip_in_hello_and_limits_intersect() {
        let lim = |names: &[&str], rc, prune| Limits {
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            replace_current: rc,
            prune,
        };
        let a = lim(&["ckpt-", "llm-"], true, false);
        let b = lim(&["ckpt-big", "data"], false, true);
        let both = Limits::intersect(Some(&a), Some(&b)).unwrap();
        assert_eq!(both, lim(&["ckpt-big"], false, false));
        assert!(both.allows("ckpt-big-1") && !both.allows("ckpt-small") && !both.allows("data-1"));
        assert_eq!(Limits::intersect(None, Some(&a)), Some(a.clone()));
        assert_eq!(Limits::intersect(None, None), None);
        let any = lim(&[""], true, true);
        assert_eq!(Limits::intersect(Some(&any), Some(&a)).unwrap().names, a.names);

        let (m, _) = crate::manifest::Manifest::plan_for_files(1 << 20, &[("a.bin", 3 << 20)]).unwrap();
        for grant in [Grant::default(), Grant { origin: "0123abcd".into(), limits: Some(both) }] {
            let h = Hello {
                name: "ckpt-big-1".into(),
                version: 3,
                mode: Mode::Sync,
                transport: crate::transport::Transport::Tcp,
                keep: 0,
                flags: HelloFlags::default(),
                you: "a:1".into(),
                downstream: vec!["b:2".into()],
                manifest: m.clone(),
                wants: Vec::new(),
                grant,
            };
            assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        }
    }

    #[test]
    fn transport_messages_round_trip() {
        let msgs = [
            TransportMsg::Tcp { reason: "no RDMA device".into() },
            TransportMsg::Rdma {
                device: "rxe_v0".into(),
                qpn: 17,
                psn: 0x12_3456,
                gid: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 1, 1],
                mtu: 5,
                rkey: 0xdead,
                addr: 0x7f00_0000_1000,
                slot_size: (4 << 20) + 4096,
                credits: vec![0, 1, 2, 65535],
            },
        ];
        for m in msgs {
            assert_eq!(TransportMsg::decode(&m.encode()).unwrap(), m);
        }
        let mut b = Vec::new();
        encode_credits(&[3, 9, 400], &mut b);
        assert_eq!(decode_credits(&b).unwrap(), vec![3, 9, 400]);
        assert!(decode_credits(&[1]).is_err());
    }

    #[test]
    fn hostile_counts_do_not_allocate() {
        let mut e = Enc::default();
        e.u64(u64::MAX / 2);
        assert!(decode_reports(&e.0).is_err());
        assert!(decode_status(&e.0).is_err());
    }

    proptest! {
        #[test]
        fn reports_round_trip(nodes in proptest::collection::vec(("[a-z0-9.:]{0,30}", any::<bool>(), ".{0,60}"), 0..8)) {
            let reports: Vec<ReplicaReport> = nodes.into_iter().map(|(node, ok, msg)| ReplicaReport {
                node,
                outcome: if ok { Outcome::Published } else { Outcome::Failed(NodeError::new(ErrorKind::DiskFull, msg)) },
            }).collect();
            prop_assert_eq!(decode_reports(&encode_reports(&reports)).unwrap(), reports);
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_reports(&bytes);
            let _ = decode_status(&bytes);
            let _ = Hello::decode(&bytes);
            let _ = TransportMsg::decode(&bytes);
            let _ = decode_credits(&bytes);
            if bytes.len() >= HEADER_LEN {
                let _ = Header::decode(bytes[..HEADER_LEN].try_into().unwrap());
            }
        }
    }
}

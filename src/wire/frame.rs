//! The frame header, frame kinds and their payload bounds, and blocking frame I/O for the
//! control plane.

use std::io::{self, Read, Write};

use crate::error::WireError;

/// Length of a frame header in bytes.
pub const HEADER_LEN: usize = 40;
/// The magic that opens every frame.
pub const MAGIC: [u8; 4] = *b"SHCS";
/// The protocol version this build speaks.
pub const PROTO_VERSION: u16 = 6;
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
    /// A further lane of a push's hop (`push --lanes R`): the first frame after the lane
    /// connection's authentication; payload: [`LaneJoin`] under the connection's MAC.
    Lane = 13,
}

/// Largest ACCEPT payload: a routed push's held-chunk ranges (16 bytes a range; at worst every
/// other chunk of a large push on each node).
pub const MAX_HAVES: u32 = 64 << 20;
/// Largest LANE payload: the token, the lane index, and a MAC.
pub const MAX_LANE: u32 = 64;
/// Bytes of the token a replica gives in ACCEPT for the lanes of a push.
pub const LANE_TOKEN_LEN: usize = 16;
/// The most lanes a hop may have.
pub const MAX_LANES: u8 = 16;

/// LANE's payload: which push (the token its ACCEPT gave) and which lane (1..R) this
/// connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneJoin {
    /// The random token of the push, from the downstream node's ACCEPT.
    pub token: [u8; LANE_TOKEN_LEN],
    /// The lane's index, 1..R (lane 0 is the hop's first connection).
    pub lane: u8,
}

impl LaneJoin {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.token.to_vec();
        b.push(self.lane);
        b
    }

    /// Decodes the payload.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        if b.len() != LANE_TOKEN_LEN + 1 {
            return Err(WireError::Invalid(format!("LANE payload of {} bytes", b.len())));
        }
        let token = b[..LANE_TOKEN_LEN].try_into().expect("checked length");
        Ok(Self { token, lane: b[LANE_TOKEN_LEN] })
    }
}

/// What a push of several lanes learns from the next node's ACCEPT: the token its further
/// lanes present, and the node's rails (`serve --rail`: the addresses its lanes may be dialed
/// at, rail 0 first; empty: the address the chain names, alone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneOffer {
    /// The token of LANE.
    pub token: [u8; LANE_TOKEN_LEN],
    /// The node's rails, each with its serve port.
    pub rails: Vec<std::net::SocketAddr>,
}

/// Bytes of one announced rail: an IPv6 address (IPv4 as mapped) and a port.
const RAIL_LEN: usize = 18;

impl LaneOffer {
    /// The offer's bytes as they end an ACCEPT: the token, each rail (16-byte address, IPv4
    /// mapped, then the port), then the rail count (one byte).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.token.to_vec();
        for r in self.rails.iter().take(MAX_RAILS) {
            let ip = match r.ip() {
                std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                std::net::IpAddr::V6(v6) => v6,
            };
            b.extend_from_slice(&ip.octets());
            b.extend_from_slice(&r.port().to_be_bytes());
        }
        b.push(self.rails.len().min(MAX_RAILS) as u8);
        b
    }
}

/// The most rails a node announces.
pub const MAX_RAILS: usize = 16;

/// Splits the lane offer ([`LaneOffer`]: the token and the node's rails) off the end of an
/// ACCEPT's payload (a push of `lanes` > 1 carries one; one lane: the payload as it is). None
/// when it is too short to hold one, or names more than [`MAX_RAILS`] rails.
pub fn split_lane_token(mut payload: Vec<u8>, lanes: u8) -> Option<(Vec<u8>, Option<LaneOffer>)> {
    if lanes <= 1 {
        return Some((payload, None));
    }
    let n = usize::from(*payload.last()?);
    if n > MAX_RAILS {
        return None;
    }
    let at = payload.len().checked_sub(1 + n * RAIL_LEN + LANE_TOKEN_LEN)?;
    let token = payload[at..at + LANE_TOKEN_LEN].try_into().expect("token-sized");
    let rails = payload[at + LANE_TOKEN_LEN..payload.len() - 1]
        .chunks_exact(RAIL_LEN)
        .map(|r| {
            let ip = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&r[..16]).expect("16 bytes"));
            let ip = ip.to_ipv4_mapped().map_or(std::net::IpAddr::V6(ip), std::net::IpAddr::V4);
            std::net::SocketAddr::new(ip, u16::from_be_bytes([r[16], r[17]]))
        })
        .collect();
    payload.truncate(at);
    Some((payload, Some(LaneOffer { token, rails })))
}

/// Largest TRANSPORT payload (an answer granting every slot of a pool: 8 bytes a credit).
pub const MAX_TRANSPORT: u32 = 1 << 20;
/// The largest CREDIT payload (every slot of a pool with its key, slot and key 6 bytes).
pub const MAX_CREDIT: u32 = 8 << 16;

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
            13 => Self::Lane,
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
            Self::Lane => "LANE",
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
            Self::Lane => MAX_LANE,
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
        let len = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes"));
        if kind == Kind::Chunk {
            // A CHUNK's flags and reserved bytes say how its payload is coded; checked whole.
            Coding::read(buf, len)?;
        } else if buf[7] != 0 || buf[12..16] != [0; 4] {
            // No other kind uses the flags byte or the reserved bytes yet: refusing anything but
            // zero keeps them usable later (a peer that sets them speaks something this build
            // does not).
            return Err(WireError::Invalid(format!(
                "frame header: flags {:#04x} and reserved bytes {:02x?} must be zero",
                buf[7],
                &buf[12..16]
            )));
        }
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

/// How a CHUNK frame's payload is coded: its header's flags byte (offset 7) and, when the
/// payload is compressed, the uncompressed length in the reserved bytes (offset 12). The
/// header's `digest` always covers the uncompressed bytes. Other kinds keep both zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Coding {
    /// [`Coding::ZSTD`], [`Coding::GROUP2`], [`Coding::GROUP4`]; zero: the payload is the
    /// chunk's bytes as they are.
    pub flags: u8,
    /// The chunk's uncompressed length (zero when the payload is raw).
    pub raw_len: u32,
}

impl Coding {
    /// The payload is one zstd frame of the chunk's bytes.
    pub const ZSTD: u8 = 1;
    /// Before compression the bytes were grouped by position in 2-byte elements (all first
    /// bytes, then all second bytes; a tail shorter than an element stays last, as it is).
    pub const GROUP2: u8 = 2;
    /// The same with 4-byte elements.
    pub const GROUP4: u8 = 4;
    /// The coded bytes are the XOR of the chunk with the same chunk (path, index) of the
    /// receiver's current version: the payload starts with that base chunk's digest (16 bytes),
    /// then the zstd frame. Only with ZSTD, and only on a push whose HELLO says DELTA.
    pub const DELTA: u8 = 8;
    /// Bytes of a delta payload before its zstd frame (the base's digest).
    pub const BASE_LEN: u32 = 16;
    const KNOWN: u8 = Self::ZSTD | Self::GROUP2 | Self::GROUP4 | Self::DELTA;
    /// A raw payload.
    pub const RAW: Self = Self { flags: 0, raw_len: 0 };

    /// Whether the payload is the chunk's bytes as they are.
    pub fn is_raw(self) -> bool {
        self.flags == 0
    }

    /// Whether the payload is an XOR delta against the receiver's base chunk.
    pub fn is_delta(self) -> bool {
        self.flags & Self::DELTA != 0
    }

    /// The element width the bytes were grouped by (1: not grouped).
    pub fn group_width(self) -> usize {
        if self.flags & Self::GROUP2 != 0 {
            2
        } else if self.flags & Self::GROUP4 != 0 {
            4
        } else {
            1
        }
    }

    /// Reads and checks the coding of a CHUNK header whose payload is `len` bytes: known flags
    /// only, grouping only under zstd, and a compressed payload shorter than the chunk it
    /// stands for (a chunk that does not shrink travels raw).
    pub fn read(buf: &[u8; HEADER_LEN], len: u32) -> Result<Self, WireError> {
        let flags = buf[7];
        let raw_len = u32::from_le_bytes(buf[12..16].try_into().expect("4 bytes"));
        let bad = |why: &str| {
            Err(WireError::Invalid(format!("CHUNK coding (flags {flags:#04x}, raw length {raw_len}): {why}")))
        };
        if flags & !Self::KNOWN != 0 {
            return bad("unknown flags; the sender is newer than this node");
        }
        if flags & Self::ZSTD == 0 {
            return if flags != 0 || raw_len != 0 {
                bad("grouping or a raw length without compression")
            } else {
                Ok(Self::RAW)
            };
        }
        if flags & Self::GROUP2 != 0 && flags & Self::GROUP4 != 0 {
            return bad("two element widths");
        }
        if flags & Self::DELTA != 0 && len <= Self::BASE_LEN {
            return bad("a delta payload without its base digest and zstd frame");
        }
        if raw_len > MAX_CHUNK || len >= raw_len {
            return bad(&format!(
                "a compressed payload of {len} bytes must be shorter than the chunk, at most {MAX_CHUNK}"
            ));
        }
        Ok(Self { flags, raw_len })
    }

    /// Writes this coding into an encoded CHUNK header.
    pub fn stamp(self, header: &mut [u8]) {
        header[7] = self.flags;
        header[12..16].copy_from_slice(&self.raw_len.to_le_bytes());
    }
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

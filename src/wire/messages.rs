//! The other control payloads: reports, status, the transport negotiation, credits.

use super::codec::{Dec, Enc};
use crate::error::{ErrorKind, NodeError, WireError};

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
/// `Rdma`. The answer's `credits` are the pool slots the sender may write into first, each with
/// the key of the memory window the receiver bound over that slot alone.
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
        /// Pool base address (the receiver's; 0 from the sender). No key for the whole pool
        /// travels: each credit carries its own.
        addr: u64,
        /// Bytes between slots of the pool (the receiver's; the sender's is ignored).
        slot_size: u32,
        /// Slots the sender may write into now, with their keys (answer only).
        credits: Vec<Credit>,
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
            Self::Rdma { device, qpn, psn, gid, mtu, addr, slot_size, credits } => {
                e.u8(1).str(device).u32(*qpn).u32(*psn).u128(u128::from_le_bytes(*gid)).u8(*mtu);
                e.u64(*addr).u32(*slot_size).u64(credits.len() as u64);
                for c in credits {
                    e.u32(u32::from(c.slot)).u32(c.rkey);
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
                let addr = d.u64("addr")?;
                let slot_size = d.u32("slot size")?;
                let n = d.count("credits", 8)?;
                let mut credits = Vec::with_capacity(n);
                for _ in 0..n {
                    let c = d.u32("credit")?;
                    let slot = u16::try_from(c).map_err(|_| WireError::Invalid(format!("credit slot {c}")))?;
                    credits.push(Credit { slot, rkey: d.u32("credit key")? });
                }
                Self::Rdma { device, qpn, psn, gid, mtu, addr, slot_size, credits }
            }
            k => return Err(WireError::Invalid(format!("transport kind {k}"))),
        };
        d.finish("transport")?;
        Ok(msg)
    }
}

/// One grant of an RDMA hop's receiver: a pool slot the sender may write one frame into, and
/// the key that lets it (a memory window's, bound over that slot alone until the frame lands).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credit {
    /// The receiver's slot.
    pub slot: u16,
    /// The key of the window over it.
    pub rkey: u32,
}

/// Bytes per credit in a CREDIT payload: the slot (u16) and its key (u32), little-endian.
pub const CREDIT_LEN: usize = 6;

/// Encodes a CREDIT payload: a slot number and its key per credit.
pub fn encode_credits(credits: &[Credit], out: &mut Vec<u8>) {
    for c in credits {
        out.extend_from_slice(&c.slot.to_le_bytes());
        out.extend_from_slice(&c.rkey.to_le_bytes());
    }
}

/// Decodes a CREDIT payload.
pub fn decode_credits(buf: &[u8]) -> Result<Vec<Credit>, WireError> {
    if buf.len() % CREDIT_LEN != 0 {
        return Err(WireError::Invalid(format!("CREDIT payload of {} bytes", buf.len())));
    }
    Ok(buf
        .chunks_exact(CREDIT_LEN)
        .map(|c| Credit { slot: u16::from_le_bytes([c[0], c[1]]), rkey: u32::from_le_bytes([c[2], c[3], c[4], c[5]]) })
        .collect())
}

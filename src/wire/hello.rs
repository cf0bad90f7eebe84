//! HELLO (a push's start: name, version, mode, the rest of the chain, the plan, the grant)
//! and ACCEPT's have-sets.

use super::codec::{Dec, Enc};
use crate::error::{ErrorKind, NodeError, WireError};
use crate::manifest::Manifest;

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
    /// Chunk frames may come compressed (`push --compress`; see `wire::Coding`): relays forward
    /// them as they are, and every replica decompresses and checks the digest before writing.
    /// A replica without it refuses the HELLO, so an old one says so before any chunk moves.
    pub const COMPRESS: u8 = 4;
    /// Every hop of the push opens more than one lane (`push --lanes R`): the lane count
    /// follows the grant. Without it a hop is one connection, as before.
    pub const LANES: u8 = 16;
    /// Chunk frames may come as XOR deltas against the replica's current version (`push
    /// --delta`; see `wire::Coding::DELTA`), and ACCEPT carries each node's base digests after
    /// its have-sets ([`encode_accept`]). Only with a routed push.
    pub const DELTA: u8 = 8;
    const KNOWN: u8 = Self::REPAIR | Self::ENCRYPT | Self::COMPRESS | Self::DELTA | Self::LANES;

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
    /// Lanes per hop (1: one connection; more: `HelloFlags::LANES` is set and the count
    /// travels after the grant).
    pub lanes: u8,
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
        if self.flags.has(HelloFlags::LANES) {
            e.u8(self.lanes);
        }
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
        let lanes = if flags.has(HelloFlags::LANES) { d.u8("lanes").map_err(bad)? } else { 1 };
        if lanes == 0 || lanes > super::MAX_LANES {
            return Err(NodeError::new(ErrorKind::Protocol, format!("bad HELLO: {lanes} lanes per hop")));
        }
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
        Ok(Self { name, version, mode, transport, keep, flags, you, downstream, manifest, wants, grant, lanes })
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
    let out = read_haves(&mut d, total)?;
    d.finish("haves")?;
    Ok(out)
}

fn read_haves(d: &mut Dec<'_>, total: u64) -> Result<Vec<Vec<(u64, u64)>>, WireError> {
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
    Ok(out)
}

/// For each node, in chain order, its held chunks as `(start, len)` ranges.
pub type HaveSets = Vec<Vec<(u64, u64)>>;

/// For each node, in chain order, the chunks of a delta push (HELLO flag `DELTA`) it could
/// take as XOR deltas: `(seq, digest)` where its current version has, at the same path and
/// chunk index, a chunk of the same length with that digest (and not the push's).
pub type Bases = Vec<Vec<(u64, u128)>>;

/// ACCEPT's payload of a routed push: the have-sets ([`encode_haves`]), then, on a delta push,
/// each node's [`Bases`].
pub fn encode_accept(haves: &[Vec<(u64, u64)>], bases: Option<&Bases>) -> Vec<u8> {
    let mut e = Enc(encode_haves(haves));
    if let Some(bases) = bases {
        e.u64(bases.len() as u64);
        for list in bases {
            e.u64(list.len() as u64);
            for &(seq, digest) in list {
                e.u64(seq).u128(digest);
            }
        }
    }
    e.0
}

/// Decodes [`encode_accept`]'s payload (`delta`: the push is a delta push, so bases follow),
/// checking every chunk number lies below `total`.
pub fn decode_accept(buf: &[u8], total: u64, delta: bool) -> Result<(HaveSets, Bases), WireError> {
    let mut d = Dec::new(buf);
    let haves = read_haves(&mut d, total)?;
    let mut bases = Vec::new();
    if delta {
        let n = d.count("base nodes", 8)?;
        if n != haves.len() {
            return Err(WireError::Invalid(format!("bases for {n} nodes, have-sets for {}", haves.len())));
        }
        for _ in 0..n {
            let k = d.count("bases", 24)?;
            let mut list = Vec::with_capacity(k);
            for _ in 0..k {
                let (seq, digest) = (d.u64("base chunk")?, d.u128("base digest")?);
                if seq >= total {
                    return Err(WireError::Invalid(format!("a base for chunk {seq} past the {total} chunks")));
                }
                list.push((seq, digest));
            }
            bases.push(list);
        }
    }
    d.finish("ACCEPT")?;
    Ok((haves, bases))
}

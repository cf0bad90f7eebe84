//! The RDMA transport: per-hop negotiation over the TCP control connection, device and GID
//! selection, and the two ends of an RDMA hop that a session drives.
//!
//! A hop between two nodes always has a TCP connection: HELLO/ACCEPT, ACK and RESULT travel on
//! it whatever the transport. When the push allows RDMA (`--transport auto|rdma`), the upstream
//! node sends a TRANSPORT offer right after ACCEPT and the downstream node answers; the hop
//! uses RDMA only when both sides offer it. Then:
//! - the receiver registers each slot of its pool once as its own memory region (no remote
//!   access), leases slots and grants them to the sender as credits (the answer carries the
//!   first ones, CREDIT frames the rest): a grant binds a type-2 memory window over that slot
//!   alone, and the credit carries the window's key; the window is invalidated when the frame
//!   has landed, so the sender writes only into the slots it holds, and only while it holds them;
//! - the sender RDMA-WRITEs each chunk frame (header and payload, exactly the bytes of the TCP
//!   frame) WITH IMM into a granted slot; the immediate value names the slot;
//! - the receiver sees a receive completion with that immediate, finds the frame in the slot and
//!   handles it as if it had arrived over TCP; once the slot is free again it grants a new one.
//!   END travels the same way, so it cannot overtake a chunk.
//!
//! Chains mix transports hop by hop: each hop negotiates for itself.

use std::collections::VecDeque;
use std::net::{IpAddr, TcpStream};
use std::path::Path;

use super::policy::Transport;
use crate::error::{ErrorKind, NodeError};
use crate::pool::{Pool, SlotId};
use crate::rdma::verbs;
use crate::wire::{self, Credit, Kind, TransportMsg};
pub(crate) use verbs::{Access, Endpoint, PeerInfo, VerbsError};

/// Explicit device choices (`--rdma-device`, `--gid-index`); found automatically when unset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RdmaConfig {
    /// Device names, one per rail in rail order, e.g. `mlx5_0` or `rxe_v0`: lane k of a hop
    /// uses the k-th (modulo their number, so one device serves every lane). Empty: each lane
    /// takes the device with a RoCEv2 GID for its connection's local address.
    pub devices: Vec<String>,
    /// GID table indexes on port 1, one per rail likewise (one serves every lane).
    pub gid_indexes: Vec<u8>,
    /// Why this node never takes the RDMA side of a hop (`serve --transport tcp`).
    pub disabled: Option<String>,
    /// Let `--transport auto` use soft-RoCE / soft-iWARP devices too (`--rdma-allow-soft`).
    pub allow_soft: bool,
}

impl RdmaConfig {
    /// The settings lane `lane` of a hop uses: the device and GID index given for its rail
    /// (the `lane`-th, modulo how many were given), the rest unchanged.
    pub(crate) fn for_lane(&self, lane: usize) -> RdmaConfig {
        fn pick<T: Clone>(v: &[T], lane: usize) -> Vec<T> {
            v.get(lane % v.len().max(1)).cloned().into_iter().collect()
        }
        RdmaConfig { devices: pick(&self.devices, lane), gid_indexes: pick(&self.gid_indexes, lane), ..self.clone() }
    }
}

/// A device, port and GID that reach a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Chosen {
    /// Device name.
    pub device: String,
    /// Port number (1-based).
    pub port: u8,
    /// GID index.
    pub gid_index: u8,
    /// A hardware RNIC (not soft-RoCE / soft-iWARP).
    pub hardware: bool,
}

const SYS_IB: &str = "/sys/class/infiniband";

/// Whether `device` is backed by hardware: soft-RoCE (rxe) and soft-iWARP (siw) devices live
/// under `/sys/devices/virtual`.
fn is_hardware(device: &str) -> bool {
    std::fs::canonicalize(Path::new(SYS_IB).join(device))
        .map(|p| !p.to_string_lossy().contains("/virtual/"))
        .unwrap_or(false)
}

/// The GID for `ip` as a RoCEv2 GID table holds it (IPv4-mapped IPv6 for IPv4).
fn gid_of(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn parse_gid(s: &str) -> Option<[u8; 16]> {
    let hex: String = s.trim().chars().filter(|c| *c != ':').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Finds the device, port and GID index to reach peers from `local_ip` (the address of the TCP
/// connection to the peer, i.e. the interface that routes to it): a RoCEv2 GID equal to that
/// address, on the configured device or any device. `Err` says why there is no RDMA here.
pub(crate) fn choose(cfg: &RdmaConfig, local_ip: IpAddr) -> Result<Chosen, String> {
    let names = verbs::device_names()?;
    let candidates: Vec<String> = match cfg.devices.first() {
        Some(d) if names.contains(d) => vec![d.clone()],
        Some(d) => return Err(format!("no RDMA device named {d} (found: {})", names.join(", "))),
        None => names,
    };
    let want = gid_of(local_ip);
    for dev in &candidates {
        let port = 1u8;
        let dir = Path::new(SYS_IB).join(dev).join("ports").join(port.to_string());
        if let Some(&idx) = cfg.gid_indexes.first() {
            return Ok(Chosen { device: dev.clone(), port, gid_index: idx, hardware: is_hardware(dev) });
        }
        let Ok(entries) = std::fs::read_dir(dir.join("gids")) else { continue };
        let mut found: Option<(u8, bool)> = None;
        for e in entries.flatten() {
            let Some(idx) = e.file_name().to_str().and_then(|s| s.parse::<u8>().ok()) else { continue };
            let Some(gid) = std::fs::read_to_string(e.path()).ok().as_deref().and_then(parse_gid) else { continue };
            if gid != want {
                continue;
            }
            let ty = std::fs::read_to_string(dir.join("gid_attrs/types").join(idx.to_string())).unwrap_or_default();
            let v2 = ty.trim().eq_ignore_ascii_case("RoCE v2");
            // Prefer RoCEv2 (routable, UDP) over v1 for the same address.
            if found.is_none_or(|(_, was_v2)| v2 && !was_v2) {
                found = Some((idx, v2));
            }
        }
        if let Some((gid_index, _)) = found {
            return Ok(Chosen { device: dev.clone(), port, gid_index, hardware: is_hardware(dev) });
        }
    }
    Err(format!(
        "no RDMA device has a GID for {local_ip} (devices: {}); pass --rdma-device and --gid-index",
        candidates.join(", ")
    ))
}

/// Decides whether this node can take the RDMA side of a hop under `policy`, from the local
/// address of the hop's TCP connection. `Err` is the reason it cannot (shown when RDMA was
/// required, logged under `auto`).
pub(crate) fn usable(policy: Transport, cfg: &RdmaConfig, local_ip: IpAddr) -> Result<Chosen, String> {
    if !cfg!(feature = "rdma") {
        return Err("this build of shardcast has no RDMA transport (built without the `rdma` feature)".into());
    }
    if let Some(why) = &cfg.disabled {
        return Err(why.clone());
    }
    let c = choose(cfg, local_ip)?;
    if policy == Transport::Auto && !c.hardware && !cfg.allow_soft {
        return Err(format!(
            "{} is soft-RoCE/soft-iWARP, not a hardware RNIC (--transport rdma or --rdma-allow-soft use it)",
            c.device
        ));
    }
    Ok(c)
}

/// Send queue / receive queue depth for a pool: every slot can be in flight once, plus END.
fn depth_for(pool: &Pool) -> u32 {
    (pool.slots() as u32 + 8).max(16)
}

fn open_endpoint(c: &Chosen, pool: &Pool, access: Access) -> Result<Endpoint, String> {
    // Before registration pins the pages: move them next to the NIC.
    match pool.place_for_device(&c.device) {
        Ok(nodes) => tracing::info!(device = %c.device, %nodes, "buffer pool placed on the NIC's NUMA node"),
        Err(why) => tracing::debug!(device = %c.device, "buffer pool not placed: {why}"),
    }
    // The endpoint keeps the pool's mapping alive for as long as it is registered.
    Endpoint::open(&c.device, c.port, c.gid_index, pool.mem().mapping(), depth_for(pool), access)
        .map_err(|e| e.to_string())
}

/// The TRANSPORT message that offers (or answers with) endpoint `ep`, granting `credits`.
pub fn msg_of(ep: &Endpoint, slot_size: u32, credits: Vec<Credit>) -> TransportMsg {
    let l = ep.local();
    TransportMsg::Rdma {
        device: ep.device().to_owned(),
        qpn: l.qpn,
        psn: l.psn,
        gid: l.gid,
        mtu: l.mtu,
        addr: l.addr,
        slot_size,
        credits,
    }
}

fn peer_of(m: &TransportMsg) -> Option<PeerInfo> {
    match m {
        TransportMsg::Rdma { qpn, psn, gid, mtu, addr, .. } => {
            Some(PeerInfo { qpn: *qpn, psn: *psn, gid: *gid, mtu: *mtu, addr: *addr })
        }
        TransportMsg::Tcp { .. } => None,
    }
}

/// Sends a TRANSPORT frame, under the hop's MAC (`label`: the offer's or the answer's) on an
/// authenticated hop.
fn send_msg(stream: &mut TcpStream, mac: Mac<'_>, m: &TransportMsg) -> std::io::Result<()> {
    let (secret, label) = mac;
    wire::write_frame(stream, Kind::Transport, 0, &crate::crypt::seal_frame(secret, label, m.encode()))
}

/// Receives a TRANSPORT frame, checked against the hop's MAC on an authenticated hop.
fn recv_msg(stream: &mut TcpStream, mac: Mac<'_>, peer: &str) -> Result<TransportMsg, NodeError> {
    let lost = |e: String| NodeError::new(ErrorKind::ConnectionLost, format!("{peer}: transport negotiation: {e}"));
    let f = wire::read_frame(stream).map_err(|e| lost(e.to_string()))?;
    if f.header.kind != Kind::Transport {
        return Err(NodeError::new(
            ErrorKind::Protocol,
            format!("{peer} sent {} where a TRANSPORT frame was expected", f.header.kind.name()),
        ));
    }
    let (secret, label) = mac;
    let body =
        crate::crypt::open_frame(secret, label, &f.payload).map_err(|_| super::unauthentic(peer, Kind::Transport))?;
    TransportMsg::decode(body).map_err(|e| NodeError::new(ErrorKind::Protocol, format!("{peer}: bad TRANSPORT: {e}")))
}

/// The hop's session secret (None: unauthenticated) and the label of one TRANSPORT frame.
type Mac<'a> = (Option<&'a crate::crypt::SessionSecret>, &'static [u8]);

/// The sending end of an RDMA hop.
#[derive(Debug)]
pub struct DnLink {
    /// The queue pair.
    pub ep: Endpoint,
    /// The receiver's pool base.
    pub remote_addr: u64,
    /// The receiver's slot size.
    pub slot_size: u64,
    /// Receiver slots granted and not yet written, each with its window's key.
    pub credits: VecDeque<Credit>,
    /// The receiver's device (for messages).
    pub peer_device: String,
}

/// The receiving end of an RDMA hop.
#[derive(Debug)]
pub struct UpLink {
    /// The queue pair.
    pub ep: Endpoint,
    /// Slots granted to the sender (leased from the pool, waiting for a chunk).
    pub granted: Vec<SlotId>,
}

fn local_ip(stream: &TcpStream) -> Result<IpAddr, NodeError> {
    stream.local_addr().map(|a| a.ip()).map_err(|e| NodeError::io("reading the connection's local address", &e))
}

/// The upstream side of a hop: offers RDMA when `policy` allows it and this node (`me`) can,
/// reads the answer, connects. `Ok(None)`: the hop uses TCP. An error names the node at fault
/// (`me` or `peer`): when `policy` is `Rdma` and that side cannot, or the hop broke.
pub(crate) fn offer(
    stream: &mut TcpStream,
    secret: Option<&crate::crypt::SessionSecret>,
    me: &str,
    peer: &str,
    policy: Transport,
    cfg: &RdmaConfig,
    pool: &Pool,
) -> Result<Option<DnLink>, (String, NodeError)> {
    if policy == Transport::Tcp {
        return Ok(None);
    }
    let at = |node: &str| {
        let node = node.to_owned();
        move |e: NodeError| (node, e)
    };
    let mine =
        usable(policy, cfg, local_ip(stream).map_err(at(me))?).and_then(|c| open_endpoint(&c, pool, Access::SendOnly));
    let (ep, offer) = match mine {
        Ok(ep) => {
            let m = msg_of(&ep, pool.slot_size() as u32, Vec::new());
            (Some(ep), m)
        }
        Err(reason) => (None, TransportMsg::Tcp { reason }),
    };
    let (offer_mac, answer_mac) =
        ((secret, crate::crypt::LABEL_TRANSPORT_OFFER), (secret, crate::crypt::LABEL_TRANSPORT_ANSWER));
    send_msg(stream, offer_mac, &offer)
        .map_err(|e| NodeError::io(format!("{peer}: sending the transport offer"), &e))
        .map_err(at(peer))?;
    let answer = recv_msg(stream, answer_mac, peer).map_err(at(peer))?;
    let unavailable = |who: &str, why: &str| {
        NodeError::new(ErrorKind::Unsupported, format!("--transport rdma: RDMA unavailable on {who}: {why}"))
    };
    let remote = peer_of(&answer);
    match (ep, answer, remote) {
        (Some(mut ep), TransportMsg::Rdma { device, slot_size, credits, .. }, Some(remote)) => {
            ep.connect(&remote)
                .map_err(|e| NodeError::new(ErrorKind::ConnectionLost, format!("connecting to {peer}: {e}")))
                .map_err(at(me))?;
            tracing::info!(%peer, local = ep.device(), remote = %device, credits = credits.len(), "hop transport: rdma");
            Ok(Some(DnLink {
                ep,
                remote_addr: remote.addr,
                slot_size: u64::from(slot_size),
                credits: credits.into(),
                peer_device: device,
            }))
        }
        (None, _, _) if policy == Transport::Rdma => {
            let TransportMsg::Tcp { reason } = offer else { unreachable!("no endpoint means a TCP offer") };
            Err((me.to_owned(), unavailable(me, &reason)))
        }
        (Some(_), TransportMsg::Tcp { reason }, _) if policy == Transport::Rdma => {
            Err((peer.to_owned(), unavailable(peer, &reason)))
        }
        (_, TransportMsg::Tcp { reason }, _) => {
            tracing::info!(%peer, "hop transport: tcp ({reason})");
            Ok(None)
        }
        (None, TransportMsg::Rdma { .. }, _) | (Some(_), TransportMsg::Rdma { .. }, None) => Ok(None),
    }
}

/// The downstream side of a hop (or of one lane of it): reads the offer (only sent when the
/// push allows RDMA), answers, connects. Grants the sender up to `grant_max` slots leased from
/// `pool` (a hop of R lanes: its share, the session grants the rest as they free up).
/// `Ok(None)`: the hop uses TCP.
pub(crate) fn answer(
    stream: &mut TcpStream,
    secret: Option<&crate::crypt::SessionSecret>,
    peer: &str,
    policy: Transport,
    cfg: &RdmaConfig,
    pool: &mut Pool,
    grant_max: usize,
) -> Result<Option<UpLink>, NodeError> {
    if policy == Transport::Tcp {
        return Ok(None);
    }
    let (offer_mac, answer_mac) =
        ((secret, crate::crypt::LABEL_TRANSPORT_OFFER), (secret, crate::crypt::LABEL_TRANSPORT_ANSWER));
    let offer = recv_msg(stream, offer_mac, peer)?;
    let Some(remote) = peer_of(&offer) else {
        // The upstream cannot; it reports the failure itself when RDMA was required.
        let reason = "upstream offered TCP".to_owned();
        send_msg(stream, answer_mac, &TransportMsg::Tcp { reason })
            .map_err(|e| NodeError::io(format!("{peer}: answering the transport offer"), &e))?;
        return Ok(None);
    };
    let grants = Access::Grants { slot_size: pool.slot_size(), slots: pool.slots() };
    let mine = usable(policy, cfg, local_ip(stream)?).and_then(|c| open_endpoint(&c, pool, grants));
    let mut ep = match mine {
        Ok(ep) => ep,
        Err(reason) => {
            send_msg(stream, answer_mac, &TransportMsg::Tcp { reason: reason.clone() })
                .map_err(|e| NodeError::io(format!("{peer}: answering the transport offer"), &e))?;
            if policy == Transport::Rdma {
                return Err(NodeError::new(
                    ErrorKind::Unsupported,
                    format!("--transport rdma: RDMA unavailable here: {reason}"),
                ));
            }
            return Ok(None);
        }
    };
    let io = |e: VerbsError| NodeError::new(ErrorKind::ConnectionLost, format!("{peer}: {e}"));
    // One receive per possible write in flight: every granted slot, plus END.
    for i in 0..depth_for(pool) {
        ep.post_recv(u64::from(i)).map_err(io)?;
    }
    ep.connect(&remote).map_err(io)?;
    // Binding a window is a work request on the queue pair: once it is connected.
    let (mut granted, mut credits) = (Vec::new(), Vec::new());
    while granted.len() < grant_max
        && let Some(s) = pool.lease()
    {
        granted.push(s);
        credits.push(Credit { slot: s.0, rkey: ep.grant(s.0).map_err(io)? });
    }
    send_msg(stream, answer_mac, &msg_of(&ep, pool.slot_size() as u32, credits))
        .map_err(|e| NodeError::io(format!("{peer}: answering the transport offer"), &e))?;
    tracing::info!(%peer, local = ep.device(), credits = granted.len(), "hop transport: rdma (receiving)");
    Ok(Some(UpLink { ep, granted }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gids_parse_and_map_ipv4() {
        let g = parse_gid("0000:0000:0000:0000:0000:ffff:c612:0101").unwrap();
        assert_eq!(g, gid_of("198.18.1.1".parse().unwrap()));
        assert!(parse_gid("fe80:0000").is_none());
        assert!(parse_gid("zz00:0000:0000:0000:0000:ffff:c612:0101").is_none());
    }

    /// The devices in sysfs, and each device's IPv4-mapped GIDs on port 1 (what `choose`
    /// matches a hop's address against), read independently of `choose`.
    fn sysfs_devices() -> Vec<(String, Vec<std::net::Ipv4Addr>)> {
        let mut out = Vec::new();
        for dev in std::fs::read_dir(SYS_IB).into_iter().flatten().flatten() {
            let name = dev.file_name().to_string_lossy().into_owned();
            let mut ips = Vec::new();
            for g in std::fs::read_dir(dev.path().join("ports/1/gids")).into_iter().flatten().flatten() {
                let text = std::fs::read_to_string(g.path()).unwrap_or_default();
                let hex: String = text.trim().chars().filter(|c| *c != ':').collect();
                // ::ffff:a.b.c.d is 20 hex zeros, ffff, then the address.
                if hex.len() == 32 && hex[..20].chars().all(|c| c == '0') && hex[20..24].eq_ignore_ascii_case("ffff") {
                    let v = u32::from_str_radix(&hex[24..], 16).unwrap();
                    ips.push(std::net::Ipv4Addr::from(v));
                }
            }
            out.push((name, ips));
        }
        out
    }

    /// `--rdma-device`/`--gid-index` given once per rail: lane k takes rail k's (modulo how
    /// many were given, so one serves every lane); none given: every lane looks its own up.
    #[test]
    fn each_lane_takes_its_rails_device_and_gid_index() {
        let cfg =
            RdmaConfig { devices: vec!["mlx5_0".into(), "mlx5_1".into()], gid_indexes: vec![3], ..Default::default() };
        let lanes: Vec<Vec<String>> = (0..4).map(|k| cfg.for_lane(k).devices).collect();
        assert_eq!(lanes, [["mlx5_0"], ["mlx5_1"], ["mlx5_0"], ["mlx5_1"]]);
        assert!((0..4).all(|k| cfg.for_lane(k).gid_indexes == [3]));
        let auto = RdmaConfig::default();
        assert!(auto.for_lane(1).devices.is_empty() && auto.for_lane(1).gid_indexes.is_empty());
        // A lane whose rail names a device that is not here is refused naming that device.
        let err = choose(&cfg.for_lane(1), "127.0.0.1".parse().unwrap()).unwrap_err();
        if !sysfs_devices().is_empty() {
            assert!(err.contains("mlx5_1"), "{err}");
        }
    }

    #[test]
    fn choose_finds_the_device_holding_the_address_or_says_why_not() {
        let devices = sysfs_devices();
        // No device ever holds a GID for the loopback address (rdma_rxe cannot bind lo): the
        // answer is a reason, and the reason says which case this machine is in.
        let err = match choose(&RdmaConfig::default(), "127.0.0.1".parse().unwrap()) {
            Ok(c) => panic!("chose {c:?} for 127.0.0.1"),
            Err(e) => e,
        };
        if devices.is_empty() {
            assert!(err.contains("RDMA"), "no RDMA device here, but the reason does not say so: {err}");
        } else {
            assert!(err.contains("127.0.0.1"), "the reason does not name the address: {err}");
            for (name, _) in &devices {
                assert!(err.contains(name.as_str()), "the reason does not list device {name}: {err}");
            }
        }
        // Every address a device holds a GID for chooses that device (in the rxe guest: the
        // veth address); on a host without RDMA this loop has nothing to check.
        for (name, ips) in &devices {
            for ip in ips {
                let holders: Vec<&String> = devices.iter().filter(|(_, i)| i.contains(ip)).map(|(n, _)| n).collect();
                let c = choose(&RdmaConfig::default(), (*ip).into())
                    .unwrap_or_else(|e| panic!("{name} holds a GID for {ip}, but choose says: {e}"));
                assert!(holders.contains(&&c.device), "{ip} is on {holders:?}, choose picked {}", c.device);
                assert_eq!(c.port, 1);
            }
        }
    }
}

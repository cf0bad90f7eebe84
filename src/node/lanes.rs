//! The further lanes of a hop (`push --lanes R`), as the replica's control plane sees them.
//!
//! A push of R lanes opens its hop's first connection as ever (HELLO, ACCEPT); the downstream
//! node's ACCEPT then ends with a random token. The upstream node dials R - 1 more connections,
//! each authenticated like the first (its own key handshake or TLS, so its own secret and frame
//! MACs), whose first frame is LANE {token, lane index}. The serve loop hands such a connection
//! to the push waiting under that token ([`LaneTable::join`]); a LANE with an unknown token, or
//! from a peer that authenticated with another key than the push's, is refused.
//!
//! Rails (`serve --rail`, `push --rail`): the ACCEPT also lists the downstream node's rails, and
//! lane k (k >= 1) goes from this node's rail (k mod R_up) to the next node's rail (k mod
//! R_down); lane 0 is the hop's first connection, to the address the chain names, from rail 0.
//! A lane whose rail cannot be reached (its link down, say) runs on lane 0's path instead, so
//! that a repair after a rail went down goes on with every lane on the rails that are left.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{ErrorKind, NodeError};
use crate::hop::{Hop, LanePath, RAIL_CONNECT_TIMEOUT};
use crate::wire::{LANE_TOKEN_LEN, LaneJoin};

/// A lane token.
pub(crate) type Token = [u8; LANE_TOKEN_LEN];

/// A push waiting for its lanes: who may join it, and where the lanes go.
#[derive(Debug)]
struct Waiting {
    /// The key (or certificate) id the push's first connection authenticated with.
    peer_id: Option<String>,
    tx: Sender<(u8, Hop)>,
}

/// The pushes on this node waiting for lanes, by token; and the rails this node announces.
#[derive(Debug, Default)]
pub(crate) struct LaneTable(Mutex<HashMap<Token, Waiting>>, Vec<SocketAddr>);

/// A push's registration in the [`LaneTable`]: its token and the lanes that joined; removed
/// from the table when dropped.
#[derive(Debug)]
pub(crate) struct LaneWait {
    table: Arc<LaneTable>,
    pub(crate) token: Token,
    rx: Receiver<(u8, Hop)>,
}

impl Drop for LaneWait {
    fn drop(&mut self) {
        self.table.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&self.token);
    }
}

impl LaneTable {
    /// A table of a node whose rails are `rails` (each with the serve port; empty: the listen
    /// address alone).
    pub(crate) fn new(rails: Vec<SocketAddr>) -> Self {
        Self(Mutex::default(), rails)
    }

    /// The rails this node announces in ACCEPT.
    pub(crate) fn rails(&self) -> &[SocketAddr] {
        &self.1
    }

    /// Registers a push whose first connection authenticated as `peer_id`, under a fresh
    /// random token.
    pub(crate) fn register(self: &Arc<Self>, peer_id: Option<String>) -> Result<LaneWait, NodeError> {
        let mut token = [0u8; LANE_TOKEN_LEN];
        getrandom::fill(&mut token)
            .map_err(|e| NodeError::new(ErrorKind::Io, format!("no randomness for a lane token: {e}")))?;
        let (tx, rx) = channel();
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(token, Waiting { peer_id, tx });
        Ok(LaneWait { table: Arc::clone(self), token, rx })
    }

    /// Hands the lane connection `hop` (its LANE said `join`) to the push waiting for it, after
    /// telling the peer it joined. Err: why it was refused (the hop back, to answer on).
    pub(crate) fn join(&self, join: LaneJoin, mut hop: Hop) -> Result<(), (Hop, NodeError)> {
        let refuse = |why: &str| NodeError::new(ErrorKind::Unauthorized, why.to_owned());
        let tx = {
            let table = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match table.get(&join.token) {
                None => return Err((hop, refuse("LANE names no push waiting for lanes here"))),
                Some(w) if w.peer_id != hop.peer_id => {
                    return Err((hop, refuse("LANE from a peer that authenticated otherwise than the push")));
                }
                Some(w) => w.tx.clone(),
            }
        };
        if let Err(e) = hop.accept_lane() {
            tracing::debug!("lane {} went away before it joined: {e}", join.lane);
            return Ok(());
        }
        // A push that stopped waiting drops the lane (its peer sees the connection close).
        let _ = tx.send((join.lane, hop));
        Ok(())
    }
}

impl LaneWait {
    /// Waits until `lanes - 1` further lanes joined (by `deadline`), and returns them in lane
    /// order (lane 1 first).
    pub(crate) fn collect(&self, lanes: u8, deadline: Instant) -> Result<Vec<Hop>, NodeError> {
        let mut got: Vec<Option<Hop>> = (1..lanes).map(|_| None).collect();
        while got.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            let (k, hop) = self.rx.recv_timeout(left).map_err(|_| {
                let missing = got.iter().filter(|h| h.is_none()).count();
                NodeError::new(ErrorKind::Stalled, format!("{missing} of {} lanes from upstream never came", lanes - 1))
            })?;
            match got.get_mut(usize::from(k).wrapping_sub(1)) {
                Some(slot @ None) => *slot = Some(hop),
                _ => {
                    return Err(NodeError::new(
                        ErrorKind::Protocol,
                        format!("upstream opened lane {k} of a hop of {lanes} lanes, or opened it twice"),
                    ));
                }
            }
        }
        Ok(got.into_iter().flatten().collect())
    }
}

/// The paths of a hop's further lanes 1..`lanes` to `node`: lane k from `mine[k mod R_up]` (no
/// rails: the kernel picks) to `theirs[k mod R_down]` (none announced: `node` itself).
pub(crate) fn lane_paths(node: &str, theirs: &[SocketAddr], mine: &[IpAddr], lanes: u8) -> Vec<LanePath> {
    (1..usize::from(lanes))
        .map(|k| LanePath {
            to: theirs.get(k % theirs.len().max(1)).map_or_else(|| node.to_owned(), SocketAddr::to_string),
            from: mine.get(k % mine.len().max(1)).copied(),
            rail: (!theirs.is_empty()).then(|| k % theirs.len()),
        })
        .collect()
}

/// The rails each node announced in its last lane offer to this process (by the name the chain
/// gives it), so that a later push can reach it over another rail when its rail 0 is down.
/// Bounded: a node forgotten is dialed on its name alone, as before it announced anything.
static RAILS_SEEN: Mutex<BTreeMap<String, Vec<SocketAddr>>> = Mutex::new(BTreeMap::new());
const RAILS_SEEN_MAX: usize = 1024;

/// Remembers the rails `node` announced (its lane offer).
pub(crate) fn remember_rails(node: &str, rails: &[SocketAddr]) {
    let mut seen = RAILS_SEEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if rails.len() < 2 {
        seen.remove(node);
    } else if seen.len() < RAILS_SEEN_MAX || seen.contains_key(node) {
        seen.insert(node.to_owned(), rails.to_vec());
    }
}

/// Dials `node` for a hop's first connection (lane 0, which carries the control frames), from
/// `mine[0]`. When `node` announced other rails to this process before ([`remember_rails`])
/// and cannot be reached on its name within [`RAIL_CONNECT_TIMEOUT`] (its rail 0 or ours is
/// down), each of its other rails k is tried from our rail (k mod R), with a warning: the hop
/// goes over a rail that is left rather than losing the node. The hop answers to `node` either
/// way (authentication, reports).
pub(crate) fn dial_chain(
    node: &str,
    mine: &[IpAddr],
    timeout: Duration,
    (key, tls): (Option<&crate::hop::auth::ClusterKey>, Option<&crate::hop::tls::TlsIdentity>),
) -> Result<Hop, NodeError> {
    let others = RAILS_SEEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(node).cloned();
    let Some(others) = others else { return Hop::dial_from(node, mine.first().copied(), timeout, key, tls) };
    let first = LanePath { to: node.to_owned(), from: mine.first().copied(), rail: None };
    let error = match Hop::dial_via(node, &first, timeout.min(RAIL_CONNECT_TIMEOUT), timeout, key, tls) {
        Err(e) if e.kind == ErrorKind::Unreachable => e,
        other => return other,
    };
    for (k, rail) in others.iter().enumerate().skip(1) {
        let path = LanePath { to: rail.to_string(), from: mine.get(k % mine.len().max(1)).copied(), rail: Some(k) };
        match Hop::dial_via(node, &path, timeout.min(RAIL_CONNECT_TIMEOUT), timeout, key, tls) {
            Ok(hop) => {
                tracing::warn!("{}; the hop to {node} goes over its rail {k} ({rail}) instead", error.message);
                return Ok(hop);
            }
            Err(e) if e.kind == ErrorKind::Unreachable => {
                tracing::warn!("{node}'s rail {k} ({rail}) cannot be reached either: {}", e.message);
            }
            Err(e) => return Err(e),
        }
    }
    Err(error)
}

/// Lane 0's path as it was opened: the addresses of its connection (another rail of the node
/// when [`dial_chain`] went around a rail that is down).
pub(crate) fn path_of(hop: &Hop) -> LanePath {
    let (local, peer) = (hop.stream.local_addr().ok(), hop.stream.peer_addr().ok());
    LanePath { to: peer.map_or_else(|| hop.peer.clone(), |a| a.to_string()), from: local.map(|a| a.ip()), rail: None }
}

/// Opens the further lanes of a hop to `node` on `paths` (lane 1 first; `token` from `node`'s
/// ACCEPT). A lane whose rail cannot be reached is dialed again on `control`, the path lane 0
/// took ([`path_of`]), with a warning that names the rail; an error on that path too fails the
/// hop.
pub(crate) fn open_lanes(
    node: &str,
    paths: &[LanePath],
    control: &LanePath,
    timeout: Duration,
    auth: (Option<&crate::hop::auth::ClusterKey>, Option<&crate::hop::tls::TlsIdentity>),
    token: Token,
) -> Result<Vec<Hop>, NodeError> {
    let mut hops = Vec::with_capacity(paths.len());
    for (i, path) in paths.iter().enumerate() {
        let lane = u8::try_from(i + 1).expect("at most MAX_LANES lanes");
        let hop = match Hop::dial_lane(node, path, timeout, auth, token, lane) {
            Err(e) if e.kind == ErrorKind::Unreachable && (&path.to, path.from) != (&control.to, control.from) => {
                tracing::warn!("{}; lane {lane} runs on the path of lane 0 ({}) instead", e.message, node);
                Hop::dial_lane(node, control, timeout, auth, token, lane)?
            }
            other => other?,
        };
        let (local, peer) = hop.addrs();
        tracing::info!("lane {lane} to {node}: {local} -> {peer}");
        hops.push(hop);
    }
    Ok(hops)
}

/// Checks that every address of `rails` is one of this host's (binds a socket to it): a rail
/// must be a local address.
pub(crate) fn check_rails(rails: &[IpAddr], flag: &str) -> Result<(), String> {
    for ip in rails {
        if let Err(e) = std::net::TcpListener::bind(SocketAddr::new(*ip, 0)) {
            return Err(format!(
                "{flag} {ip}: not an address of this host ({e}); give each rail as one of its own addresses (`ip -br addr`)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_k_goes_from_rail_k_mod_r_up_to_rail_k_mod_r_down() {
        let theirs: Vec<SocketAddr> = vec!["10.0.0.2:7".parse().unwrap(), "10.0.1.2:7".parse().unwrap()];
        let mine: Vec<IpAddr> = ["10.0.0.1", "10.0.1.1", "10.0.2.1"].map(|a| a.parse().unwrap()).to_vec();
        let paths = lane_paths("node:7", &theirs, &mine, 4);
        let got: Vec<(String, Option<IpAddr>, Option<usize>)> =
            paths.into_iter().map(|p| (p.to, p.from, p.rail)).collect();
        let ip = |a: &str| Some(a.parse::<IpAddr>().unwrap());
        assert_eq!(
            got,
            vec![
                ("10.0.1.2:7".to_owned(), ip("10.0.1.1"), Some(1)),
                ("10.0.0.2:7".to_owned(), ip("10.0.2.1"), Some(0)),
                ("10.0.1.2:7".to_owned(), ip("10.0.0.1"), Some(1)),
            ]
        );
        // No rails on either side: every lane to the address the chain names, the kernel's pick.
        let plain = lane_paths("node:7", &[], &[], 3);
        assert!(plain.iter().all(|p| p.to == "node:7" && p.from.is_none() && p.rail.is_none()), "{plain:?}");
        assert_eq!(plain.len(), 2);
    }

    /// A port on `ip` where nothing listens (bound, then closed: connects are refused).
    fn dead_port(ip: &str) -> SocketAddr {
        std::net::TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap()
    }

    #[test]
    fn dial_chain_goes_over_another_announced_rail_when_the_name_is_unreachable() {
        let name = dead_port("127.0.0.1").to_string();
        let live = std::net::TcpListener::bind("127.0.0.3:0").unwrap();
        let (live_addr, dead_rail) = (live.local_addr().unwrap(), dead_port("127.0.0.2"));
        let me: Vec<IpAddr> = ["127.0.0.1", "127.0.0.4", "127.0.0.5"].map(|a| a.parse().unwrap()).to_vec();
        let none = (None, None);
        // Never announced anything: the name alone, unreachable.
        let e = dial_chain(&name, &me, Duration::from_secs(2), none).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unreachable, "{e}");
        // Announced rails 0..2, rail 1 down too: rail 2, from our rail 2 mod 3, and the hop is the named node's.
        remember_rails(&name, &[name.parse().unwrap(), dead_rail, live_addr]);
        let hop = dial_chain(&name, &me, Duration::from_secs(2), none).expect("over rail 2");
        assert_eq!(hop.peer, name);
        assert_eq!(hop.stream.peer_addr().unwrap(), live_addr);
        assert_eq!(hop.stream.local_addr().unwrap().ip(), me[2]);
        let control = path_of(&hop);
        assert_eq!((control.to, control.from), (live_addr.to_string(), Some(me[2])));
        // One rail announced since: forgotten, the name alone again.
        remember_rails(&name, &[name.parse().unwrap()]);
        assert_eq!(dial_chain(&name, &me, Duration::from_secs(2), none).unwrap_err().kind, ErrorKind::Unreachable);
    }
}

//! One hop: a connection between two nodes of the chain, from dial or accept to close.
//!
//! [`Hop::dial`] connects to the next node and authenticates (a cluster key, or mutual TLS);
//! [`Hop::handshake`] then sends it HELLO and waits for the chain's answer. On the other end
//! [`Hop::accept`] authenticates the peer and reads its first frame; the replica answers with
//! [`Hop::accept_push`] (or a REJECT). After ACCEPT the two ends negotiate the hop's link
//! ([`Hop::offer_rdma`] upstream, [`Hop::answer_rdma`] downstream): RDMA when both can, else TCP.
//!
//! - `auth`, `tls`: who is at the other end, and the hop's session secret;
//! - `crypt`: what that secret protects (the handshake frames' MACs, sealed chunks);
//! - `policy`: which transport a push allows (`--transport auto|tcp|rdma`);
//! - `rdma`: the per-hop negotiation of an RDMA link and its two ends;
//! - `error`: why the accepting side refused a peer.

#![deny(unsafe_code)]

pub mod auth;
pub mod crypt;
pub(crate) mod error;
pub mod policy;
pub(crate) mod rdma;
pub mod tls;

use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::error::{ErrorKind, NodeError};
use crate::pool::Pool;
use crate::wire::{self, Frame, Hello, Kind, Outcome, ReadFrameError, ReplicaReport};
use auth::ClusterKey;
use crypt::SessionSecret;
pub(crate) use error::HandshakeError;
use policy::Transport;
use rdma::{DnLink, RdmaConfig, UpLink};
use tls::TlsIdentity;

/// The most an AUTH frame carries (what a peer may send before it is authenticated).
const MAX_AUTH: u32 = 1024;

/// One authenticated connection to the next or the previous node.
#[derive(Debug)]
pub(crate) struct Hop {
    /// The TCP connection: the control connection, and the data path on a TCP link.
    pub stream: TcpStream,
    /// The node at the other end: its address as the chain names it (dialed), or the peer's
    /// socket address (accepted).
    pub peer: String,
    /// The key id or certificate id the peer authenticated with (accepted hops only).
    pub peer_id: Option<String>,
    /// The hop's session secret (from the key or TLS authentication; None: unauthenticated):
    /// the handshake frames' MACs and, on an encrypted push, the chunks' keys.
    pub secret: Option<SessionSecret>,
}

/// What the accepting side requires of a peer before its first frame counts.
#[derive(Debug)]
pub(crate) struct AcceptPolicy<'a> {
    /// The cluster keys a peer may prove it holds (none: no key authentication).
    pub keys: Vec<&'a ClusterKey>,
    /// Mutual TLS instead of a key.
    pub tls: Option<&'a TlsIdentity>,
    /// How long the peer may take for each step.
    pub timeout: Duration,
    /// The most an authenticated peer's first frame (its HELLO) may carry.
    pub max_frame: u32,
}

/// Where a further lane of a hop goes: the address it dials (a rail of the next node, or the
/// address the chain names it by), the local address it binds first (a rail of this node; None:
/// the kernel picks), and the next node's rail it is meant for (for what an error says).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LanePath {
    /// What to connect to.
    pub to: String,
    /// This node's address to connect from.
    pub from: Option<IpAddr>,
    /// The next node's rail index `to` is (None: the address the chain names).
    pub rail: Option<usize>,
}

/// How long a lane's TCP connect may take before its rail counts as down: a rail whose link is
/// down answers ENETUNREACH at once, or not at all (an ARP timeout takes ~3 s).
pub(crate) const RAIL_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A handshake the accepting side refused, with the connection to tell the peer on.
#[derive(Debug)]
pub(crate) struct Refused {
    /// The connection.
    pub stream: TcpStream,
    /// The connection's secret when the peer had authenticated before the refusal (the REJECT
    /// then carries its MAC).
    pub secret: Option<SessionSecret>,
    /// Why.
    pub error: HandshakeError,
}

impl Hop {
    /// Connects to `node` within `timeout` and, with a cluster key or a TLS identity,
    /// authenticates both ways (the hop's session secret comes from that).
    pub(crate) fn dial(
        node: &str,
        timeout: Duration,
        key: Option<&ClusterKey>,
        tls: Option<&TlsIdentity>,
    ) -> Result<Self, NodeError> {
        Self::dial_from(node, None, timeout, key, tls)
    }

    /// [`Hop::dial`] from the local address `from` (bound before connecting; None: the kernel
    /// picks).
    pub(crate) fn dial_from(
        node: &str,
        from: Option<IpAddr>,
        timeout: Duration,
        key: Option<&ClusterKey>,
        tls: Option<&TlsIdentity>,
    ) -> Result<Self, NodeError> {
        Self::dial_via(node, &LanePath { to: node.to_owned(), from, rail: None }, timeout, timeout, key, tls)
    }

    /// [`Hop::dial_from`] to `node` over `path` (another of its rails, say): connects to
    /// `path.to` from `path.from` within `connect_timeout`, then authenticates as to `node`
    /// within `timeout`; the hop is `node`'s whatever address it went to.
    pub(crate) fn dial_via(
        node: &str,
        path: &LanePath,
        connect_timeout: Duration,
        timeout: Duration,
        key: Option<&ClusterKey>,
        tls: Option<&TlsIdentity>,
    ) -> Result<Self, NodeError> {
        let stream = connect_plain(&path.to, path.from, connect_timeout)?;
        Self::authenticate_to(stream, node, timeout, key, tls)
    }

    /// Authenticates the connection `stream` to `node` (a cluster key or TLS, if any).
    fn authenticate_to(
        mut stream: TcpStream,
        node: &str,
        timeout: Duration,
        key: Option<&ClusterKey>,
        tls: Option<&TlsIdentity>,
    ) -> Result<Self, NodeError> {
        let secret = match (tls, key) {
            (Some(id), _) => Some(tls::client(&mut stream, node, id, timeout)?),
            (None, Some(k)) => Some(auth::client(&mut stream, node, k, timeout)?),
            (None, None) => None,
        };
        Ok(Self { stream, peer: node.to_owned(), peer_id: None, secret })
    }

    /// Opens lane `lane` (1..R) of a push to `node` on `path`: connects (within
    /// [`RAIL_CONNECT_TIMEOUT`] at most) and authenticates like the hop's first connection (so
    /// the lane has its own session secret, and its own frame MACs), then sends LANE with the
    /// push's `token` (from `node`'s ACCEPT) and waits for its ACCEPT. A rail that cannot be
    /// reached fails with `unreachable`, naming the node, the rail and both addresses.
    pub(crate) fn dial_lane(
        node: &str,
        path: &LanePath,
        timeout: Duration,
        (key, tls): (Option<&ClusterKey>, Option<&TlsIdentity>),
        token: [u8; wire::LANE_TOKEN_LEN],
        lane: u8,
    ) -> Result<Self, NodeError> {
        let stream = connect_plain(&path.to, path.from, timeout.min(RAIL_CONNECT_TIMEOUT)).map_err(|e| {
            let rail = path.rail.map_or_else(|| "its address".to_owned(), |r| format!("its rail {r}"));
            let from = path.from.map_or_else(String::new, |a| format!(" from {a}"));
            NodeError::new(
                ErrorKind::Unreachable,
                format!("lane {lane} to {node}: {rail} at {}{from} cannot be reached: {}", path.to, e.message),
            )
        })?;
        let mut hop = Self::authenticate_to(stream, node, timeout, key, tls)?;
        hop.peer = node.to_owned();
        let lost = |e: &dyn std::fmt::Display| {
            NodeError::new(ErrorKind::ConnectionLost, format!("lane {lane} to {node} failed at its start: {e}"))
        };
        let payload =
            crypt::seal_frame(hop.secret.as_ref(), crypt::LABEL_LANE, wire::LaneJoin { token, lane }.encode());
        wire::write_frame(&mut hop.stream, Kind::Lane, 0, &payload).map_err(|e| lost(&e))?;
        hop.stream.set_read_timeout(Some(timeout)).map_err(|e| lost(&e))?;
        let frame = wire::read_frame(&mut hop.stream).map_err(|e| lost(&e))?;
        hop.stream.set_read_timeout(None).map_err(|e| lost(&e))?;
        match frame.header.kind {
            Kind::Accept if crypt::open_frame(hop.secret.as_ref(), crypt::LABEL_LANE, &frame.payload).is_ok() => {
                Ok(hop)
            }
            Kind::Accept => Err(unauthentic(node, Kind::Accept)),
            Kind::Reject => Err(match rejected(node, hop.secret.as_ref(), &frame.payload).into_iter().next() {
                Some(ReplicaReport { outcome: Outcome::Failed(e), .. }) => e,
                _ => NodeError::new(ErrorKind::Protocol, format!("{node} refused lane {lane}")),
            }),
            k => Err(NodeError::new(ErrorKind::Protocol, format!("{node} answered LANE with {}", k.name()))),
        }
    }

    /// The connection's local and peer socket addresses (`?` when the socket cannot say).
    pub(crate) fn addrs(&self) -> (String, String) {
        let show = |a: io::Result<SocketAddr>| a.map_or_else(|_| "?".to_owned(), |a| a.to_string());
        (show(self.stream.local_addr()), show(self.stream.peer_addr()))
    }

    /// The payload of the peer's LANE `frame`, checked against this connection's key.
    pub(crate) fn open_lane(&self, frame: &Frame) -> Result<wire::LaneJoin, HandshakeError> {
        let body = crypt::open_frame(self.secret.as_ref(), crypt::LABEL_LANE, &frame.payload).map_err(|_| {
            HandshakeError::Unauthorized("LANE does not authenticate under this connection's key".into())
        })?;
        wire::LaneJoin::decode(body).map_err(HandshakeError::BadFrame)
    }

    /// Tells the peer its lane joined the push (an empty ACCEPT under the lane's MAC).
    pub(crate) fn accept_lane(&mut self) -> io::Result<()> {
        let payload = crypt::seal_frame(self.secret.as_ref(), crypt::LABEL_LANE, Vec::new());
        wire::write_frame(&mut self.stream, Kind::Accept, 0, &payload)
    }

    /// Sends HELLO to the node dialed and waits for the whole chain's answer.
    /// Returns ACCEPT's payload (a routed push's have-sets; empty otherwise), or the reports of
    /// a REJECT.
    pub(crate) fn handshake(&mut self, hello: &Hello, timeout: Duration) -> Result<Vec<u8>, Vec<ReplicaReport>> {
        let (stream, secret) = (&mut self.stream, self.secret.as_ref());
        let node = hello.you.clone();
        let lost = |e: &dyn std::fmt::Display| {
            vec![ReplicaReport::failed(
                &node,
                NodeError::new(
                    ErrorKind::ConnectionLost,
                    format!("connection to {node} lost during the handshake: {e}"),
                ),
            )]
        };
        stream.set_read_timeout(Some(timeout)).map_err(|e| lost(&e))?;
        let payload = crypt::seal_frame(secret, crypt::LABEL_HELLO, hello.encode());
        wire::write_frame(stream, Kind::Hello, 0, &payload).map_err(|e| lost(&e))?;
        let frame = wire::read_frame(stream).map_err(|e| match e {
            ReadFrameError::Io(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                vec![ReplicaReport::failed(
                    &node,
                    NodeError::new(ErrorKind::Stalled, format!("{node} did not answer within {} s", timeout.as_secs())),
                )]
            }
            e => lost(&e),
        })?;
        stream.set_read_timeout(None).map_err(|e| lost(&e))?;
        match frame.header.kind {
            // What each node already holds (a routed push) decides what travels: authenticated.
            Kind::Accept => match crypt::open_frame(secret, crypt::LABEL_ACCEPT, &frame.payload) {
                Ok(body) => Ok(body.to_vec()),
                Err(_) => Err(vec![ReplicaReport::failed(
                    &node,
                    NodeError::new(
                        ErrorKind::Unauthorized,
                        format!("the ACCEPT from {node} does not authenticate: changed in transit, or not from {node}"),
                    ),
                )]),
            },
            Kind::Reject => Err(rejected(&node, secret, &frame.payload)),
            k => Err(vec![ReplicaReport::failed(
                &node,
                NodeError::new(ErrorKind::Protocol, format!("{node} answered HELLO with {}", k.name())),
            )]),
        }
    }

    /// Takes a connection a peer opened: authenticates it as `policy` says and reads its first
    /// frame after that (a HELLO or a STATUS_REQ, when the peer behaves).
    pub(crate) fn accept(
        mut stream: TcpStream,
        peer: &str,
        policy: &AcceptPolicy<'_>,
    ) -> Result<(Self, Frame), Refused> {
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(policy.timeout));
        let mut secret = None;
        match authenticate(&mut stream, peer, policy, &mut secret) {
            Ok((peer_id, frame)) => Ok((Self { stream, peer: peer.to_owned(), peer_id, secret }, frame)),
            Err(error) => Err(Refused { stream, secret, error }),
        }
    }

    /// The payload of the peer's HELLO `frame`, checked against the hop's key.
    pub(crate) fn open_hello<'a>(&self, frame: &'a Frame) -> Result<&'a [u8], HandshakeError> {
        crypt::open_frame(self.secret.as_ref(), crypt::LABEL_HELLO, &frame.payload).map_err(|_| {
            HandshakeError::Unauthorized(
                "HELLO does not authenticate under this connection's key: changed in transit".into(),
            )
        })
    }

    /// Accepts the push upstream: ACCEPT with `payload` (a routed push's have-sets), under the
    /// hop's MAC.
    pub(crate) fn accept_push(&mut self, payload: Vec<u8>) -> io::Result<()> {
        let accept = crypt::seal_frame(self.secret.as_ref(), crypt::LABEL_ACCEPT, payload);
        wire::write_frame(&mut self.stream, Kind::Accept, 0, &accept)
    }

    /// Sends upstream the RESULT `reports`, under the hop's MAC.
    pub(crate) fn send_result(&mut self, reports: &[ReplicaReport]) -> io::Result<()> {
        let payload = crypt::seal_frame(self.secret.as_ref(), crypt::LABEL_RESULT, wire::encode_reports(reports));
        wire::write_frame(&mut self.stream, Kind::Result, 0, &payload)
    }

    /// Sends the peer a STATUS_RESP with `payload` (an encoded status), under the hop's MAC.
    pub(crate) fn send_status(&mut self, payload: Vec<u8>) -> io::Result<()> {
        let payload = crypt::seal_frame(self.secret.as_ref(), crypt::LABEL_STATUS, payload);
        wire::write_frame(&mut self.stream, Kind::StatusResp, 0, &payload)
    }

    /// Asks the node dialed what it holds: STATUS_REQ, then its STATUS_RESP (or REJECT), each
    /// checked against the hop's MAC.
    pub(crate) fn status(&mut self, timeout: Duration) -> Result<Vec<wire::SetStatus>, NodeError> {
        let node = self.peer.clone();
        let lost = |e: &dyn std::fmt::Display| NodeError::new(ErrorKind::ConnectionLost, format!("{node}: {e}"));
        self.stream.set_read_timeout(Some(timeout)).map_err(|e| lost(&e))?;
        wire::write_frame(&mut self.stream, Kind::StatusReq, 0, &[]).map_err(|e| lost(&e))?;
        let f = wire::read_frame(&mut self.stream).map_err(|e| lost(&e))?;
        match f.header.kind {
            Kind::StatusResp => {
                let body = crypt::open_frame(self.secret.as_ref(), crypt::LABEL_STATUS, &f.payload)
                    .map_err(|_| unauthentic(&node, Kind::StatusResp))?;
                wire::decode_status(body).map_err(|e| NodeError::new(ErrorKind::Protocol, format!("{node}: {e}")))
            }
            Kind::Reject => Err(match rejected(&node, self.secret.as_ref(), &f.payload).into_iter().next() {
                Some(ReplicaReport { outcome: Outcome::Failed(e), .. }) => e,
                _ => NodeError::new(ErrorKind::Protocol, format!("{node} refused the status request")),
            }),
            k => Err(NodeError::new(ErrorKind::Protocol, format!("{node} answered with {}", k.name()))),
        }
    }

    /// The downstream end of the link (or of one lane of it): answers upstream's TRANSPORT
    /// offer (RDMA when both ends can and `policy` allows it; None: chunks come over TCP),
    /// granting up to `grant_max` slots.
    pub(crate) fn answer_rdma(
        &mut self,
        policy: Transport,
        cfg: &RdmaConfig,
        pool: &mut Pool,
        grant_max: usize,
    ) -> Result<Option<UpLink>, NodeError> {
        rdma::answer(&mut self.stream, self.secret.as_ref(), &self.peer, policy, cfg, pool, grant_max)
    }

    /// The upstream end of the link: offers RDMA to the node dialed, as `me` (None: chunks go
    /// over TCP). The error names the node that failed.
    pub(crate) fn offer_rdma(
        &mut self,
        me: &str,
        policy: Transport,
        cfg: &RdmaConfig,
        pool: &Pool,
    ) -> Result<Option<DnLink>, (String, NodeError)> {
        rdma::offer(&mut self.stream, self.secret.as_ref(), me, &self.peer, policy, cfg, pool)
    }
}

/// The reports of a REJECT from `node`. On an authenticated connection it carries the hop's MAC,
/// like RESULT: why a push was refused, and who already holds the version, must not be
/// forgeable. One that does not authenticate is reported as that, its content not shown.
fn rejected(node: &str, secret: Option<&SessionSecret>, payload: &[u8]) -> Vec<ReplicaReport> {
    let Ok(body) = crypt::open_frame(secret, crypt::LABEL_REJECT, payload) else {
        return vec![ReplicaReport::failed(node, unauthentic(node, Kind::Reject))];
    };
    wire::decode_reports(body).unwrap_or_else(|e| {
        vec![ReplicaReport::failed(node, NodeError::new(ErrorKind::Protocol, format!("{node} sent a bad REJECT: {e}")))]
    })
}

/// A REJECT to the peer with `reports`, under the hop's MAC when `secret` is the connection's
/// (every REJECT sent after the peer authenticated).
pub(crate) fn write_reject(
    stream: &mut TcpStream,
    secret: Option<&SessionSecret>,
    reports: &[ReplicaReport],
) -> io::Result<()> {
    let payload = crypt::seal_frame(secret, crypt::LABEL_REJECT, wire::encode_reports(reports));
    wire::write_frame(stream, Kind::Reject, 0, &payload)
}

/// A frame of `kind` from `node` whose MAC does not check out.
pub(crate) fn unauthentic(node: &str, kind: Kind) -> NodeError {
    NodeError::new(
        ErrorKind::Unauthorized,
        format!(
            "the {} from {node} does not authenticate: changed in transit, or not from {node}; not believed",
            kind.name()
        ),
    )
}

/// Connects to `node` within `timeout`, trying each address it resolves to (of `from`'s family,
/// bound to `from` first when given).
fn connect_plain(node: &str, from: Option<IpAddr>, timeout: Duration) -> Result<TcpStream, NodeError> {
    let unreachable = |e: &dyn std::fmt::Display| {
        NodeError::new(ErrorKind::Unreachable, format!("unreachable: {e} (is `shardcast serve` running at {node}?)"))
    };
    let addrs = node.to_socket_addrs().map_err(|e| unreachable(&e))?;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the address resolves to nothing");
    for addr in addrs {
        if from.is_some_and(|f| f.is_ipv4() != addr.is_ipv4()) {
            last = io::Error::new(io::ErrorKind::AddrNotAvailable, format!("{addr} is not of the family of {from:?}"));
            continue;
        }
        match connect_from(addr, from, timeout) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(unreachable(&last))
}

/// One TCP connect to `addr` within `timeout`, from the local address `from` when given.
fn connect_from(addr: SocketAddr, from: Option<IpAddr>, timeout: Duration) -> io::Result<TcpStream> {
    let Some(from) = from else { return TcpStream::connect_timeout(&addr, timeout) };
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(from, 0).into()).map_err(|e| {
        io::Error::new(e.kind(), format!("cannot bind to {from} (is it an address of this host?): {e}"))
    })?;
    socket.connect_timeout(&addr.into(), timeout)?;
    Ok(socket.into())
}

/// The accepting side's authentication: mutual TLS, or a cluster key's challenge, as `policy`
/// requires; then the peer's first frame after it. Returns who the peer proved to be, the
/// hop's secret, and that frame.
/// `secret` is set as soon as the peer authenticated (a refusal after that carries its MAC).
fn authenticate(
    stream: &mut TcpStream,
    peer: &str,
    policy: &AcceptPolicy<'_>,
    secret: &mut Option<SessionSecret>,
) -> Result<(Option<String>, Frame), HandshakeError> {
    let unauthorized = |why: &str| Err(HandshakeError::Unauthorized(why.to_owned()));
    let mut peer_id = None;
    if let Some(id) = policy.tls {
        // A peer speaking shardcast frames without TLS is told so in a frame it can read.
        let mut first = [0u8; 4];
        if stream.peek(&mut first).is_ok_and(|n| n == 4) && first == wire::MAGIC {
            return unauthorized("this replica requires mutual TLS: connect with --tls-cert, --tls-key and --tls-ca");
        }
        let (id, s) = tls::server(stream, id, policy.timeout).map_err(HandshakeError::Tls)?;
        tracing::debug!(%peer, cert = %id, "peer authenticated (mutual TLS)");
        (peer_id, *secret) = (Some(id), Some(s));
    }
    // A frame at most `max` bytes long: before a peer is authenticated, only AUTH's size.
    let read = |stream: &mut TcpStream, max: u32| {
        wire::read_frame_max(stream, max).map_err(|e| match e {
            ReadFrameError::Io(e) => HandshakeError::Closed(e),
            ReadFrameError::Wire(e) => HandshakeError::BadFrame(e),
        })
    };
    let first_max = if policy.keys.is_empty() || policy.tls.is_some() { policy.max_frame } else { MAX_AUTH };
    let mut frame = read(stream, first_max)?;
    // With a cluster key, nothing but a peer that proves it holds the key gets further.
    match (policy.keys.first(), frame.header.kind) {
        _ if policy.tls.is_some() && frame.header.kind == Kind::Auth => {
            return unauthorized("this replica authenticates with mutual TLS, not a cluster key");
        }
        _ if policy.tls.is_some() => {}
        (Some(_), Kind::Auth) => {
            let (id, s) = auth::server(stream, &frame.payload, &policy.keys, policy.timeout)
                .map_err(HandshakeError::Unauthorized)?;
            tracing::debug!(%peer, key = %id, "peer authenticated");
            (peer_id, *secret) = (Some(id), Some(s));
            frame = read(stream, policy.max_frame)?;
        }
        // Which key is not said to a peer that has not proved it holds one.
        (Some(_), _) => {
            return unauthorized("authentication required: this replica needs its cluster key (--key-file)");
        }
        (None, Kind::Auth) => {
            return unauthorized("this replica has no cluster key: start it with --key-file, or push without one");
        }
        (None, _) => {}
    }
    Ok((peer_id, frame))
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;
    use crate::manifest::Manifest;
    use crate::wire::{Grant, HelloFlags, Mode};

    fn hello(you: &str) -> Hello {
        let (manifest, _) = Manifest::plan_for_files(1 << 20, &[("a.bin", 3 << 20)]).unwrap();
        Hello {
            name: "ckpt".into(),
            version: 1,
            mode: Mode::Sync,
            transport: Transport::Tcp,
            keep: 0,
            flags: HelloFlags::default(),
            you: you.into(),
            downstream: Vec::new(),
            manifest,
            wants: Vec::new(),
            grant: Grant::default(),
            lanes: 1,
        }
    }

    /// One replica-side handshake on a thread: accepts under `keys`, and answers a HELLO that
    /// opens with ACCEPT("held"). Returns who the peer proved to be, or the refusal.
    fn serve_once(keys: Vec<ClusterKey>) -> (String, std::thread::JoinHandle<Result<Option<String>, String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let t = std::thread::spawn(move || {
            let (conn, peer) = listener.accept().unwrap();
            let policy = AcceptPolicy {
                keys: keys.iter().collect(),
                tls: None,
                timeout: Duration::from_secs(10),
                max_frame: 64 << 20,
            };
            let (mut hop, frame) = Hop::accept(conn, &peer.to_string(), &policy).map_err(|r| {
                if let Some(e) = r.error.reply() {
                    let mut stream = r.stream;
                    let _ = wire::write_frame(
                        &mut stream,
                        Kind::Reject,
                        0,
                        &wire::encode_reports(&[ReplicaReport::failed("r", e)]),
                    );
                }
                r.error.to_string()
            })?;
            assert_eq!(frame.header.kind, Kind::Hello);
            let payload = hop.open_hello(&frame).map_err(|e| e.to_string())?;
            assert_eq!(Hello::decode(payload).unwrap().you, "r:1");
            hop.accept_push(b"held".to_vec()).unwrap();
            Ok(hop.peer_id)
        });
        (addr, t)
    }

    #[test]
    fn dial_and_accept_agree_on_the_key_and_authenticate_hello_and_accept() {
        let key = ClusterKey::from_secret(b"a cluster key of enough length");
        let (addr, replica) = serve_once(vec![key.clone()]);
        let mut hop = Hop::dial(&addr, Duration::from_secs(10), Some(&key), None).unwrap();
        assert!(hop.secret.is_some());
        assert_eq!(hop.handshake(&hello("r:1"), Duration::from_secs(10)).unwrap(), b"held");
        assert_eq!(replica.join().unwrap().unwrap().as_deref(), Some(key.id()));
    }

    #[test]
    fn accept_refuses_a_peer_without_the_key_and_says_why() {
        let (addr, replica) = serve_once(vec![ClusterKey::from_secret(b"a cluster key of enough length")]);
        let mut hop = Hop::dial(&addr, Duration::from_secs(10), None, None).unwrap();
        assert!(hop.secret.is_none());
        let reports = hop.handshake(&hello("r:1"), Duration::from_secs(10)).unwrap_err();
        let why = "authentication required: this replica needs its cluster key (--key-file)";
        assert!(
            matches!(&reports[0].outcome, Outcome::Failed(e) if e.kind == ErrorKind::Unauthorized && e.message == why)
        );
        assert_eq!(replica.join().unwrap().unwrap_err(), why);
    }

    #[test]
    fn accept_refuses_a_key_it_does_not_hold() {
        let (addr, replica) = serve_once(vec![ClusterKey::from_secret(b"the replica's own cluster key")]);
        let other = ClusterKey::from_secret(b"another cluster key entirely");
        let e = Hop::dial(&addr, Duration::from_secs(10), Some(&other), None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unauthorized);
        let why = replica.join().unwrap().unwrap_err();
        assert!(why.starts_with("wrong cluster key"), "{why}");
        assert!(e.message.contains(&why), "{}", e.message);
    }
}

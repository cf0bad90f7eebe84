//! `shardcast serve`: accepts pushes and status requests, one thread per connection.

use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{ErrorKind, NodeError, ServeError};
use crate::manifest::Manifest;
use crate::pool::PoolCache;
use crate::proto::Role;
use crate::push::{connect, handshake};
use crate::route::{ChunkSet, Route};
use crate::session::{Local, Session, SessionConfig, SessionEnd};
use crate::store::Store;
use crate::sys::io::IoChoice;
use crate::transport::Transport;
use crate::wire::{self, Hello, Kind, ReadFrameError, ReplicaReport};

/// How a replica server runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    pub listen: String,
    /// Root directory of the store.
    pub root: PathBuf,
    /// Versions kept per name.
    pub keep: usize,
    /// Pool bytes per session.
    pub pool_bytes: usize,
    /// Transport choice.
    pub transport: Transport,
    /// Executor choice.
    pub io: IoChoice,
    /// A session with no progress for this long is dropped.
    pub idle_timeout: Duration,
    /// Give up on a downstream hop that takes nothing this long (times the nodes after it).
    pub hop_timeout: Duration,
    /// How long a peer may take to send its first frame, and downstream to answer.
    pub handshake_timeout: Duration,
    /// Most sessions at once; more are refused.
    pub max_sessions: usize,
    /// Most concurrent connections from one peer address (so that one peer that opens
    /// connections and sends nothing cannot take every session).
    pub max_per_peer: usize,
    /// Verify chunk digests on arrival (turned off only to measure what verifying costs).
    pub verify: bool,
    /// Cut-through piece size for relaying (0: forward whole chunks); see `SessionConfig`.
    pub piece_bytes: u32,
    /// RDMA device and GID index (found from the route to each peer when unset).
    pub rdma: crate::rdma::RdmaConfig,
    /// Prometheus metrics to update (`serve --metrics`).
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    /// The cluster key every peer must prove it holds (None: no authentication).
    pub key: Option<crate::auth::ClusterKey>,
    /// Accept only pushes that encrypt their chunks (`serve --encrypt`).
    pub require_encrypt: bool,
    /// Mutual TLS instead of the cluster key (`--tls-cert`, `--tls-key`, `--tls-ca`): every
    /// connection must present a certificate from the CA.
    pub tls: Option<Arc<crate::tls::TlsIdentity>>,
    /// Where every push and refusal is recorded (JSON lines).
    pub audit: Option<Arc<crate::audit::AuditLog>>,
    /// Most bytes the pushes being received may add up to (0: no limit).
    pub max_staging: u64,
    /// Partial stagings (kept for resumes) older than this are removed (None: never).
    pub partial_max_age: Option<Duration>,
    /// Partial stagings beyond this many bytes in all are removed, oldest first (0: no cap).
    pub partial_max_bytes: u64,
    /// More keys this replica accepts, each limited to some names (`--acl`); `key` (when set)
    /// may push anything.
    pub acl: Vec<crate::auth::AclEntry>,
    /// Most connections at once that have not finished their handshake (not yet authenticated
    /// and admitted); counted apart from sessions, so that slow peers cannot take the session
    /// slots, and closed when they take longer than `handshake_timeout` in all.
    pub max_handshakes: usize,
    /// Most connections from one peer address that have not finished their handshake.
    pub max_handshakes_per_peer: usize,
    /// Most nodes a HELLO's chain may name (this node and the ones after it).
    pub max_chain: usize,
    /// Most entries (files and directories) a pushed manifest may list.
    pub max_entries: usize,
    /// Most bytes a HELLO (the encoded manifest) may take.
    pub max_manifest: u32,
    /// How far beyond a name's `current` a pushed version may go (0: no limit), so that one push
    /// of a huge version cannot pin `current` (it only moves forward).
    pub max_version_ahead: u64,
}

impl ServeOptions {
    /// Defaults: keep 2, 64 MiB pool per session, 120 s idle timeout, 64 sessions, 5 s to finish
    /// a handshake (128 at once, 8 per peer address), chains of 16 nodes, 1 000 000 entries and
    /// 64 MiB per manifest, versions at most 2^32 beyond `current`.
    pub fn new(listen: impl Into<String>, root: impl Into<PathBuf>) -> Self {
        Self {
            listen: listen.into(),
            root: root.into(),
            keep: 2,
            pool_bytes: 64 << 20,
            transport: Transport::Auto,
            io: IoChoice::from_env(),
            idle_timeout: Duration::from_secs(120),
            hop_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(5),
            max_sessions: 64,
            max_per_peer: 16,
            verify: !bench_no_verify(),
            piece_bytes: crate::session::piece_bytes_from_env(),
            rdma: crate::rdma::RdmaConfig::default(),
            metrics: None,
            key: None,
            require_encrypt: false,
            tls: None,
            audit: None,
            max_staging: 0,
            partial_max_age: Some(Duration::from_secs(24 * 3600)),
            partial_max_bytes: 100 << 30,
            acl: Vec::new(),
            max_handshakes: 128,
            max_handshakes_per_peer: 8,
            max_chain: 16,
            max_entries: 1_000_000,
            max_manifest: 64 << 20,
            max_version_ahead: 1 << 32,
        }
    }
}

/// Whether `SHARDCAST_BENCH_NO_VERIFY` turns digest verification off: only in a build with the
/// `bench-switches` feature (benchmarks); a user's build always verifies.
pub fn bench_no_verify() -> bool {
    cfg!(feature = "bench-switches") && std::env::var_os("SHARDCAST_BENCH_NO_VERIFY").is_some()
}

/// A bound replica server.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    store: Arc<Store>,
    opts: ServeOptions,
    addr: SocketAddr,
}

/// A server running on a background thread; stops when dropped.
#[derive(Debug)]
pub struct ServerHandle {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Server {
    /// Opens the store and binds the listener.
    pub fn bind(mut opts: ServeOptions) -> Result<Self, ServeError> {
        opts.transport.resolve().map_err(ServeError::Unsupported)?;
        if opts.transport == Transport::Tcp {
            opts.rdma.disabled.get_or_insert_with(|| "this replica serves with --transport tcp".into());
        }
        let store = Store::open(&opts.root, opts.keep)?;
        store.set_max_staging(opts.max_staging);
        store.set_partial_limits(opts.partial_max_age, opts.partial_max_bytes);
        expire_partials(&store, &opts);
        let listener =
            TcpListener::bind(&opts.listen).map_err(|source| ServeError::Bind { addr: opts.listen.clone(), source })?;
        let addr = listener.local_addr().map_err(|source| ServeError::Bind { addr: opts.listen.clone(), source })?;
        Ok(Self { listener, store, opts, addr })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until the process ends.
    pub fn run(self) {
        self.run_until(&AtomicBool::new(false));
    }

    /// Serves on a background thread.
    pub fn spawn(self) -> ServerHandle {
        let stop = Arc::new(AtomicBool::new(false));
        let addr = self.addr;
        let s2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("shardcast-serve".into())
            .spawn(move || self.run_until(&s2))
            .expect("spawn server thread");
        ServerHandle { addr, stop, thread: Some(thread) }
    }

    fn run_until(self, stop: &AtomicBool) {
        let opts = Arc::new(self.opts);
        let slots = Arc::new(Slots { active: Arc::new(AtomicUsize::new(0)), per_peer: Arc::default() });
        // Connections still in their handshake, counted and timed apart from sessions.
        let gate = Gate::start(&opts);
        // One idle pool is kept for the next push (see `PoolCache`).
        let pools = Arc::new(PoolCache::new(1));
        for conn in self.listener.incoming() {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let mut conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let peer = conn.peer_addr().map_or_else(|_| "?".into(), |a| a.to_string());
            let pending = match gate.enter(&conn) {
                Ok(p) => p,
                Err(why) => {
                    tracing::warn!(%peer, "refused: {why}");
                    // Answered on the accept thread, so it must not block: no lingering.
                    let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
                    let busy = NodeError::new(ErrorKind::Busy, format!("replica busy: {why}; retry later"));
                    let reports = [ReplicaReport::failed(self.addr.to_string(), busy)];
                    let _ = wire::write_frame(&mut conn, Kind::Reject, 0, &wire::encode_reports(&reports));
                    continue;
                }
            };
            let (store, opts, pools, slots, me) = (
                Arc::clone(&self.store),
                Arc::clone(&opts),
                Arc::clone(&pools),
                Arc::clone(&slots),
                self.addr.to_string(),
            );
            let spawned = std::thread::Builder::new().name("shardcast-session".into()).spawn(move || {
                handle(conn, &peer, &me, &store, &pools, &opts, pending, &slots);
            });
            if let Err(e) = spawned {
                tracing::error!("cannot start a session thread: {e}");
            }
        }
    }
}

/// The session slots: sessions running, and per peer address.
#[derive(Debug)]
struct Slots {
    active: Arc<AtomicUsize>,
    per_peer: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
}

impl Slots {
    /// A session slot for a peer whose handshake is done, or why there is none.
    fn take(&self, conn: &TcpStream, opts: &ServeOptions) -> Result<(ActiveGuard, Option<PeerGuard>), String> {
        if self.active.load(Ordering::SeqCst) >= opts.max_sessions {
            return Err(format!("{} sessions already running", opts.max_sessions));
        }
        let peer = match conn.peer_addr().map(|a| a.ip()) {
            Ok(ip) => Some(
                PeerGuard::new(&self.per_peer, ip, opts.max_per_peer)
                    .map_err(|n| format!("{n} sessions from your address already running"))?,
            ),
            Err(_) => None,
        };
        Ok((ActiveGuard::new(&self.active), peer))
    }
}

/// Connections that have not finished their handshake (authentication, HELLO or STATUS_REQ):
/// at most `max` at once and `max_per_peer` per address, and each closed when it is not done
/// within the handshake timeout in all, however slowly its bytes trickle in (each read's own
/// timeout would not bound that). Sessions are counted apart ([`Slots`]), once a peer is through.
#[derive(Debug)]
struct Gate {
    inner: std::sync::Mutex<GateInner>,
    max: usize,
    max_per_peer: usize,
    timeout: Duration,
}

#[derive(Debug, Default)]
struct GateInner {
    next: u64,
    /// Each connection in its handshake (a handle to close it) and its deadline.
    conns: std::collections::HashMap<u64, (TcpStream, std::time::Instant)>,
    per_peer: std::collections::HashMap<std::net::IpAddr, usize>,
}

/// One connection in its handshake; leaves the gate when dropped.
#[derive(Debug)]
struct Pending {
    gate: Arc<Gate>,
    id: u64,
    ip: Option<std::net::IpAddr>,
}

impl Gate {
    /// The gate, and its reaper thread (which ends with the gate).
    fn start(opts: &ServeOptions) -> Arc<Self> {
        let gate = Arc::new(Self {
            inner: std::sync::Mutex::default(),
            max: opts.max_handshakes.max(1),
            max_per_peer: opts.max_handshakes_per_peer.max(1),
            timeout: opts.handshake_timeout,
        });
        let weak = Arc::downgrade(&gate);
        let spawned = std::thread::Builder::new().name("shardcast-gate".into()).spawn(move || {
            while let Some(gate) = weak.upgrade() {
                gate.reap();
                drop(gate);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        if let Err(e) = spawned {
            tracing::error!("cannot start the handshake reaper: {e}; slow handshakes are bounded per read only");
        }
        gate
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateInner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Lets `conn` in, or says why not.
    fn enter(self: &Arc<Self>, conn: &TcpStream) -> Result<Pending, String> {
        let ip = conn.peer_addr().map(|a| a.ip()).ok();
        let handle = conn.try_clone().map_err(|e| format!("cannot track the connection: {e}"))?;
        let mut g = self.lock();
        if g.conns.len() >= self.max {
            return Err(format!("{} connections already in their handshake", self.max));
        }
        if let Some(ip) = ip {
            let n = g.per_peer.entry(ip).or_insert(0);
            if *n >= self.max_per_peer {
                let n = *n;
                return Err(format!("{n} connections from your address already in their handshake"));
            }
            *n += 1;
        }
        let id = g.next;
        g.next += 1;
        g.conns.insert(id, (handle, std::time::Instant::now() + self.timeout));
        Ok(Pending { gate: Arc::clone(self), id, ip })
    }

    /// Closes every connection past its deadline (its thread then sees the connection end).
    fn reap(&self) {
        let now = std::time::Instant::now();
        let mut g = self.lock();
        g.conns.retain(|_, (conn, deadline)| {
            if *deadline > now {
                return true;
            }
            let peer = conn.peer_addr().map_or_else(|_| "?".into(), |a| a.to_string());
            tracing::warn!(%peer, "closed: handshake not done within {} s", self.timeout.as_secs_f64());
            let _ = conn.shutdown(std::net::Shutdown::Both);
            false
        });
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut g = self.gate.lock();
        g.conns.remove(&self.id);
        if let Some(ip) = self.ip
            && let Some(n) = g.per_peer.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                g.per_peer.remove(&ip);
            }
        }
    }
}

/// Counts a running session; the count drops when the session's thread ends, even by panic.
struct ActiveGuard(Arc<AtomicUsize>);

impl ActiveGuard {
    fn new(active: &Arc<AtomicUsize>) -> Self {
        active.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(active))
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts a peer address's open connections; the count drops with the guard.
struct PeerGuard {
    map: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl PeerGuard {
    /// A guard for one more connection from `ip`, or the count already open when it is `max`.
    fn new(
        map: &Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
        max: usize,
    ) -> Result<Self, usize> {
        let mut m = map.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return Err(*n);
        }
        *n += 1;
        Ok(Self { map: Arc::clone(map), ip })
    }
}

impl Drop for PeerGuard {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

fn reject(conn: &mut TcpStream, node: &str, error: NodeError) -> io::Result<()> {
    reject_reports(conn, &[ReplicaReport::failed(node, error)])
}

fn reject_reports(conn: &mut TcpStream, reports: &[ReplicaReport]) -> io::Result<()> {
    wire::write_frame(conn, Kind::Reject, 0, &wire::encode_reports(reports))?;
    linger_close(conn);
    Ok(())
}

/// [`reject_reports`], with a MAC (on an authenticated connection) when a report says
/// "published": a node after this one already holds the version (see `push::handshake`).
fn reject_reports_sealed(
    conn: &mut TcpStream,
    reports: &[ReplicaReport],
    secret: Option<&crate::crypt::SessionSecret>,
) -> io::Result<()> {
    let payload = wire::encode_reports(reports);
    let payload = if reports.iter().any(|r| r.outcome == wire::Outcome::Published) {
        crate::crypt::seal_frame(secret, crate::push::LABEL_HELD, payload)
    } else {
        payload
    };
    wire::write_frame(conn, Kind::Reject, 0, &payload)?;
    linger_close(conn);
    Ok(())
}

/// Closes our sending side and reads until the peer closes, for at most a moment, so that the
/// last frame we sent is not destroyed by a reset caused by unread data.
fn linger_close(conn: &mut TcpStream) {
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let mut sink = [0u8; 64 << 10];
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        match conn.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// The most an AUTH frame carries (what a peer may send before it is authenticated).
const MAX_AUTH: u32 = 1024;

#[allow(clippy::too_many_arguments)]
fn handle(
    mut conn: TcpStream,
    peer: &str,
    me: &str,
    store: &Arc<Store>,
    pools: &PoolCache,
    opts: &ServeOptions,
    pending: Pending,
    slots: &Slots,
) {
    let _ = conn.set_nodelay(true);
    let _ = conn.set_read_timeout(Some(opts.handshake_timeout));
    // A frame at most `max` bytes long: before a peer is authenticated, only AUTH's size.
    let read = |conn: &mut TcpStream, max: u32| match wire::read_frame_max(conn, max) {
        Ok(f) => Some(f),
        Err(ReadFrameError::Io(e)) => {
            tracing::debug!(%peer, "connection closed before a full frame: {e}");
            None
        }
        Err(ReadFrameError::Wire(e)) => {
            tracing::warn!(%peer, "refused: {e}");
            audit_refusal(opts, peer, None, format!("bad frame: {e}"));
            let _ = reject(conn, me, NodeError::new(ErrorKind::Protocol, format!("refused: {e}")));
            None
        }
    };
    let mut key_id = None;
    let mut secret = None;
    if let Some(tls) = &opts.tls {
        // A peer speaking shardcast frames without TLS is told so in a frame it can read.
        let mut first = [0u8; 4];
        let _ = conn.set_read_timeout(Some(opts.handshake_timeout));
        if conn.peek(&mut first).is_ok_and(|n| n == 4) && first == wire::MAGIC {
            let why = "this replica requires mutual TLS: connect with --tls-cert, --tls-key and --tls-ca".to_owned();
            tracing::warn!(%peer, "refused: {why}");
            audit_refusal(opts, peer, None, why.clone());
            let _ = reject(&mut conn, me, NodeError::new(ErrorKind::Unauthorized, why));
            return;
        }
        match crate::tls::server(&mut conn, tls, opts.handshake_timeout) {
            Ok((id, s)) => {
                tracing::debug!(%peer, cert = %id, "peer authenticated (mutual TLS)");
                key_id = Some(id);
                secret = Some(s);
            }
            Err(why) => {
                tracing::warn!(%peer, "refused: {why}");
                audit_refusal(opts, peer, None, why);
                return;
            }
        }
    }
    let keys: Vec<&crate::auth::ClusterKey> = opts.key.iter().chain(opts.acl.iter().map(|e| &e.key)).collect();
    let first_max = if keys.is_empty() || opts.tls.is_some() { opts.max_manifest } else { MAX_AUTH };
    let Some(mut frame) = read(&mut conn, first_max) else { return };
    // With a cluster key, nothing but a peer that proves it holds the key gets further.
    let unauthorized = |conn: &mut TcpStream, why: String| {
        tracing::warn!(%peer, "refused: {why}");
        audit_refusal(opts, peer, None, why.clone());
        let _ = reject(conn, me, NodeError::new(ErrorKind::Unauthorized, why));
    };
    match (keys.first(), frame.header.kind) {
        _ if opts.tls.is_some() && frame.header.kind == Kind::Auth => {
            return unauthorized(&mut conn, "this replica authenticates with mutual TLS, not a cluster key".into());
        }
        _ if opts.tls.is_some() => {}
        (Some(_), Kind::Auth) => match crate::auth::server(&mut conn, &frame.payload, &keys, opts.handshake_timeout) {
            Ok((id, s)) => {
                tracing::debug!(%peer, key = %id, "peer authenticated");
                key_id = Some(id);
                secret = Some(s);
                let Some(next) = read(&mut conn, opts.max_manifest) else { return };
                frame = next;
            }
            Err(why) => return unauthorized(&mut conn, why),
        },
        (Some(_), _) => {
            // Which key is not said to a peer that has not proved it holds one.
            return unauthorized(
                &mut conn,
                "authentication required: this replica needs its cluster key (--key-file)".into(),
            );
        }
        (None, Kind::Auth) => {
            return unauthorized(
                &mut conn,
                "this replica has no cluster key: start it with --key-file, or push without one".into(),
            );
        }
        (None, _) => {}
    }
    match frame.header.kind {
        Kind::StatusReq => {
            let result = store.list().map(|sets| wire::encode_status(&sets));
            match result {
                Ok(payload) => {
                    let _ = wire::write_frame(&mut conn, Kind::StatusResp, 0, &payload);
                }
                Err(e) => {
                    let _ = reject(&mut conn, me, e.to_node_error());
                }
            }
        }
        Kind::Hello => {
            let Ok(payload) = crate::crypt::open_frame(secret.as_ref(), crate::crypt::LABEL_HELLO, &frame.payload)
            else {
                return unauthorized(
                    &mut conn,
                    "HELLO does not authenticate under this connection's key: changed in transit".into(),
                );
            };
            let hello = match Hello::decode(payload).and_then(|h| admit(&h, opts).map(|()| h)) {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(%peer, "refused HELLO: {e}");
                    audit_refusal(opts, peer, key_id.as_deref(), format!("bad HELLO: {}", e.message));
                    let _ = reject(&mut conn, me, e);
                    return;
                }
            };
            // The handshake is done: from here on the connection counts as a session.
            drop(pending);
            let _slot = match slots.take(&conn, opts) {
                Ok(slot) => slot,
                Err(why) => {
                    tracing::warn!(%peer, "refused: {why}");
                    audit_refusal(opts, peer, key_id.as_deref(), format!("busy: {why}"));
                    let busy = NodeError::new(ErrorKind::Busy, format!("replica busy: {why}; retry later"));
                    let _ = reject(&mut conn, me, busy);
                    return;
                }
            };
            push_session(conn, peer, key_id.as_deref(), secret, hello, store, pools, opts);
        }
        k => {
            tracing::warn!(%peer, "refused: {} frame where HELLO or STATUS_REQ was expected", k.name());
            audit_refusal(opts, peer, key_id.as_deref(), format!("unexpected {} frame", k.name()));
            let _ = reject(
                &mut conn,
                me,
                NodeError::new(
                    ErrorKind::Protocol,
                    format!("unexpected {} frame: a session starts with HELLO or STATUS_REQ", k.name()),
                ),
            );
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn push_session(
    mut conn: TcpStream,
    peer: &str,
    key_id: Option<&str>,
    up_secret: Option<crate::crypt::SessionSecret>,
    hello: Hello,
    store: &Arc<Store>,
    pools: &PoolCache,
    opts: &ServeOptions,
) {
    let me = hello.you.clone();
    let span = tracing::info_span!("push", name = %hello.name, version = hello.version, %peer);
    let _enter = span.enter();
    // Written when this function returns, however it returns: refused (the default), or the
    // push's outcome set at the end.
    let mut audit = AuditGuard {
        log: opts.audit.clone(),
        peer,
        key_id,
        name: hello.name.clone(),
        version: hello.version,
        bytes: hello.manifest.total_bytes(),
        outcome: "refused",
        reason: None,
    };
    // Encrypted chunks: each hop's key comes from its authentication, so both hops of this
    // node must have authenticated, and chunks go over TCP.
    let encrypt = hello.flags.has(wire::HelloFlags::ENCRYPT);
    if encrypt && up_secret.is_none() {
        let e = NodeError::new(
            ErrorKind::Unsupported,
            "the push asks for encryption (--encrypt), but the connection to this replica is not \
             authenticated, so there is no key to derive: start it with --key-file (or --tls-cert, --tls-key \
             and --tls-ca)",
        );
        let _ = audit.reject(&mut conn, &me, e);
        return;
    }
    if opts.require_encrypt && !encrypt {
        let e = NodeError::new(
            ErrorKind::Unauthorized,
            "this replica accepts only encrypted pushes (serve --encrypt): push with --encrypt and the cluster key",
        );
        tracing::warn!(%peer, "refused: {}", e.message);
        let _ = audit.reject(&mut conn, &me, e);
        return;
    }
    if encrypt && hello.transport == crate::transport::Transport::Rdma {
        let e = NodeError::new(ErrorKind::Unsupported, "encrypted pushes travel over TCP, not RDMA");
        let _ = audit.reject(&mut conn, &me, e);
        return;
    }
    // A routed push (epoch staging): this node stores only the entries it wants.
    let own = match hello.wants.first() {
        Some(Some(wanted)) => match hello.manifest.subset(wanted) {
            Ok((m, map)) => Some((map, m)),
            Err(e) => {
                let _ = audit.reject(&mut conn, &me, NodeError::new(ErrorKind::BadManifest, e.to_string()));
                return;
            }
        },
        _ => None,
    };
    // The push's rights here: the limits the nodes before this one put on it (HELLO's grant),
    // narrowed by this replica's ACL rule for the key the peer authenticated with and for the
    // key the push started with. A relay forwards on the pusher's behalf, never with more.
    let rule = |id: &str| {
        let limited = opts.key.as_ref().is_none_or(|k| k.id() != id);
        limited.then(|| opts.acl.iter().find(|e| e.key.id() == id).map(crate::auth::AclEntry::limits)).flatten()
    };
    let origin = if hello.grant.origin.is_empty() { key_id.unwrap_or_default() } else { &hello.grant.origin };
    let limits = [key_id.and_then(rule), rule(origin)]
        .iter()
        .fold(hello.grant.limits.clone(), |acc, l| wire::Limits::intersect(acc.as_ref(), l.as_ref()));
    if let Some(l) = &limits {
        let who = if origin.is_empty() { "this push".to_owned() } else { format!("key {origin}") };
        let why = if !l.allows(&hello.name) {
            Some(format!("{who} may not push '{}' (it may push names starting with {:?})", hello.name, l.names))
        } else if hello.keep > 0 && !l.prune {
            Some(format!(
                "{who} may not prune versions (the push asks to keep {}): push without --keep (each replica keeps \
                 its own --keep), or allow it with `prune = true` in the ACL",
                hello.keep
            ))
        } else {
            None
        };
        if let Some(why) = why {
            tracing::warn!("refused: {why}");
            let _ = audit.reject(&mut conn, &me, NodeError::new(ErrorKind::Unauthorized, why));
            return;
        }
    }
    // `current` only moves forward, so one push of a huge version would pin it for good: a
    // version too far beyond `current` is refused (`--max-version-ahead`).
    if let Some(cur) = store.current_version(&hello.name)
        && opts.max_version_ahead > 0
        && hello.version > cur.saturating_add(opts.max_version_ahead)
    {
        let why = format!(
            "version {} of '{}' is more than {} beyond its current version {cur}: refused so that one push \
             cannot pin `current` (which only moves forward); push a nearer version, or raise serve \
             --max-version-ahead (0: no limit)",
            hello.version, hello.name, opts.max_version_ahead
        );
        tracing::warn!("refused: {why}");
        let _ = audit.reject(&mut conn, &me, NodeError::new(ErrorKind::Unauthorized, why));
        return;
    }
    let routed = !hello.wants.is_empty();
    // A routed push carries every digest, so a partial staging of this version (an earlier
    // attempt that failed here) can be taken over and checked chunk by chunk.
    let staged = own.as_ref().map_or(&hello.manifest, |(_, m)| m);
    expire_partials(store, opts);
    // Pushes are idempotent: a routed push (every digest known) of a version published here with
    // the same manifest is answered with a REJECT whose report says "published": this node
    // takes no data and the primary forms the chain again without it. (A plain push carries no
    // digests; it is refused as `version_exists` and the primary asks again, routed.)
    if routed && store.published_manifest(&hello.name, hello.version).is_some_and(|m| m.digest() == staged.digest()) {
        tracing::info!("already held: the same manifest is published here; taking no data");
        audit.outcome = "already held";
        let held = [ReplicaReport { node: me.clone(), outcome: wire::Outcome::Published }];
        let _ = reject_reports_sealed(&mut conn, &held, up_secret.as_ref());
        return;
    }
    let staging = match store.begin_resuming(&hello.name, hello.version, staged, routed) {
        Ok(mut s) => {
            if limits.as_ref().is_some_and(|l| !l.replace_current) {
                s.keep_current();
            }
            s
        }
        Err(e) => {
            tracing::warn!("refused: {e}");
            let _ = audit.reject(&mut conn, &me, e.to_node_error());
            return;
        }
    };
    // A routed push also says which of its chunks this node already holds: those it resumed
    // from a partial staging (journaled, same digest), and those its current version of the
    // name has (copied locally). They do not travel here.
    let resumed = resumed_chunks(&hello.manifest, own.as_ref().map(|(m, _)| &m[..]), staging.resumed());
    let (mut held, copies) = match (routed, store.current_manifest(&hello.name)) {
        (true, Some((v, old, dir))) => {
            let wanted = hello.wants.first().and_then(Option::as_deref);
            let map = own.as_ref().map(|(m, _)| &m[..]);
            let r = crate::store::find_reuse(&hello.manifest, wanted, map, &old, &dir, &|q| resumed.contains(q));
            tracing::info!(from = v, chunks = r.0.iter().map(|x| x.1).sum::<u64>(), "chunks already held");
            r
        }
        _ => (Vec::new(), Vec::new()),
    };
    held.extend((0..resumed.total()).filter(|&q| resumed.contains(q)).map(|q| (q, 1)));
    // Onward connection, then the rest of the chain's answer, before accepting.
    let mut down = None;
    let mut down_secret = None;
    let mut haves = vec![held];
    if let Some(next) = hello.downstream.first() {
        // The onward handshake as a whole (connect, authenticate, the rest of the chain's
        // answer) is bounded: one handshake timeout per node from here to the tail, so that the
        // nearest node to a silent one times out first and is the one that reports it.
        let onward_deadline = std::time::Instant::now() + opts.handshake_timeout * (hello.downstream.len() as u32 + 1);
        // On a refusal the reservation is dropped before answering, so that the caller can
        // retry the same version at once.
        let mut stream = match connect(next, opts.handshake_timeout, opts.key.as_ref(), opts.tls.as_deref()) {
            Ok((_, None)) if encrypt => {
                drop(staging);
                let e = NodeError::new(
                    ErrorKind::Unsupported,
                    format!(
                        "the push asks for encryption, but this replica reaches {next} unauthenticated: start it with \
                         --key-file (or --tls-cert, --tls-key and --tls-ca)"
                    ),
                );
                let _ = audit.reject(&mut conn, &me, e);
                return;
            }
            Ok((s, secret)) => {
                down_secret = secret;
                s
            }
            Err(e) => {
                tracing::warn!("refused: {e}");
                drop(staging);
                let _ = audit.reject(&mut conn, next, e);
                return;
            }
        };
        let onward = Hello {
            you: next.clone(),
            downstream: hello.downstream[1..].to_vec(),
            wants: hello.wants.iter().skip(1).cloned().collect(),
            // Only the first replica of an async push reports early; the rest run as usual.
            mode: wire::Mode::Sync,
            // The pusher's rights as far as this node knows them: the next node narrows them
            // with its own rules (this node's key may have more).
            grant: wire::Grant { origin: origin.to_owned(), limits: limits.clone() },
            ..hello.clone()
        };
        let timeout =
            onward_deadline.saturating_duration_since(std::time::Instant::now()).max(Duration::from_millis(1));
        match handshake(&mut stream, &onward, timeout, down_secret.as_ref()) {
            Ok(payload) if !routed => drop(payload),
            Ok(payload) => match wire::decode_haves(&payload, hello.manifest.chunk_count()) {
                Ok(h) if h.len() == hello.downstream.len() => haves.extend(h),
                _ => {
                    drop(staging);
                    let e = NodeError::new(ErrorKind::Protocol, "bad ACCEPT: no valid list of held chunks");
                    let _ = audit.reject(&mut conn, next, e);
                    return;
                }
            },
            Err(reports) => {
                tracing::warn!("downstream refused: {:?}", reports.first());
                drop(staging);
                audit.reason = Some(summary(&reports));
                let _ = reject_reports_sealed(&mut conn, &reports, up_secret.as_ref());
                return;
            }
        }
        down = Some(stream);
    }
    let accept = if routed { wire::encode_haves(&haves) } else { Vec::new() };
    let accept = crate::crypt::seal_frame(up_secret.as_ref(), crate::crypt::LABEL_ACCEPT, accept);
    if let Err(e) = wire::write_frame(&mut conn, Kind::Accept, 0, &accept) {
        tracing::warn!("upstream went away before the push started: {e}");
        return;
    }
    let manifest = hello.manifest;
    let route = routed.then(|| Route::for_position(&crate::route::needs(&manifest, &hello.wants, &haves), 1));
    let prefill = if copies.is_empty() {
        None
    } else {
        match staging.spawn_reuse(copies) {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!("cannot reuse held chunks: {e}");
                let reports = std::iter::once(me.as_str())
                    .chain(hello.downstream.iter().map(String::as_str))
                    .map(|n| ReplicaReport::failed(n, e.to_node_error()))
                    .collect::<Vec<_>>();
                let payload = crate::crypt::seal_frame(
                    up_secret.as_ref(),
                    crate::crypt::LABEL_RESULT,
                    wire::encode_reports(&reports),
                );
                let _ = wire::write_frame(&mut conn, Kind::Result, 0, &payload);
                return;
            }
        }
    };
    tracing::info!(
        bytes = manifest.total_bytes(),
        chunks = manifest.chunk_count(),
        downstream = hello.downstream.len(),
        "receiving"
    );
    let cfg = SessionConfig::default()
        .pool_bytes(opts.pool_bytes)
        .io(opts.io)
        .idle_timeout(opts.idle_timeout)
        .hop_timeout(opts.hop_timeout)
        .verify(opts.verify)
        .piece_bytes(opts.piece_bytes);
    // From here on a failure goes upstream as a RESULT: it has accepted and waits for chunks.
    let fail = |conn: &mut TcpStream, node: &str, error: NodeError| {
        tracing::error!("push failed before it started: {error}");
        let mut reports = Vec::new();
        for n in std::iter::once(me.as_str()).chain(hello.downstream.iter().map(String::as_str)) {
            reports.push(if n == node {
                ReplicaReport::failed(n, error.clone())
            } else {
                ReplicaReport::failed(n, NodeError::new(ErrorKind::Aborted, format!("push aborted: {node} failed")))
            });
        }
        let payload =
            crate::crypt::seal_frame(up_secret.as_ref(), crate::crypt::LABEL_RESULT, wire::encode_reports(&reports));
        let _ = wire::write_frame(conn, Kind::Result, 0, &payload);
    };
    let mut pool = match pools.get(opts.pool_bytes, manifest.chunk_size()) {
        Ok(pool) => pool,
        Err(e) => {
            let e = NodeError::io("cannot set up the buffer pool", &e);
            (audit.outcome, audit.reason) = ("failed", Some(e.message.clone()));
            return fail(&mut conn, &me, e);
        }
    };
    // The transport of the hop from upstream, then of the hop downstream (each hop on its own:
    // a chain may mix RDMA and TCP).
    let up_link = match crate::rdma::answer(&mut conn, peer, hello.transport, &opts.rdma, &mut pool) {
        Ok(l) => l,
        Err(e) => {
            (audit.outcome, audit.reason) = ("failed", Some(e.message.clone()));
            return fail(&mut conn, &me, e);
        }
    };
    let dn_link = match (down.as_mut(), hello.downstream.first()) {
        (Some(d), Some(next)) => match crate::rdma::offer(d, &me, next, hello.transport, &opts.rdma, &pool) {
            Ok(l) => l,
            Err((node, e)) => {
                (audit.outcome, audit.reason) = ("failed", Some(format!("{node}: {}", e.message)));
                return fail(&mut conn, &node, e);
            }
        },
        _ => None,
    };
    let _ = conn.set_read_timeout(None);
    // Metrics: the hops' transports, the session, and the per-peer byte counters.
    let gauges = opts.metrics.as_ref().map(|m| {
        let up = m.hop(if up_link.is_some() { "rdma" } else { "tcp" }, "upstream");
        let dn = hello.downstream.first().map(|_| m.hop(if dn_link.is_some() { "rdma" } else { "tcp" }, "downstream"));
        up.inc();
        if let Some(g) = &dn {
            g.inc();
        }
        m.sessions.inc();
        (up, dn)
    });
    let started = std::time::Instant::now();
    let (bytes, chunks) = (manifest.total_bytes(), manifest.chunk_count());
    let cfg = match route {
        Some(route) => cfg.route(Some(route), own).prefill(prefill),
        None => cfg,
    }
    .superseded(staging.receiving())
    .early_report(hello.mode == wire::Mode::Async)
    .stop_on_loss(hello.flags.has(wire::HelloFlags::REPAIR))
    .crypt(
        up_secret.as_ref().filter(|_| encrypt).map(crate::crypt::Opener::new),
        down_secret.as_ref().filter(|_| encrypt).map(crate::crypt::Sealer::new),
    )
    .macs(up_secret.clone(), down_secret.clone())
    .metrics(
        opts.metrics
            .as_ref()
            .map(|m| crate::metrics::SessionMetrics::new(m, peer, hello.downstream.first().map_or("", String::as_str))),
    );
    let session = Session::new(
        Role::Replica,
        &me,
        hello.downstream.clone(),
        manifest,
        Local::Staging(Some(staging)),
        Some(conn.as_raw_fd()),
        down.as_ref().map(AsRawFd::as_raw_fd),
        cfg,
        None,
        pool,
        Some(pools),
        (up_link, dn_link),
    );
    let end = session.run();
    // The session's staging is gone: published, or kept as a partial.
    expire_partials(store, opts);
    if let (Some(m), Some((up, dn))) = (&opts.metrics, gauges) {
        up.dec();
        if let Some(g) = dn {
            g.dec();
        }
        m.sessions.dec();
        let outcome = match &end {
            SessionEnd::Finished(r) if r.first().is_some_and(|r| r.outcome == wire::Outcome::Published) => "published",
            SessionEnd::Finished(_) => "failed",
            SessionEnd::Aborted(_) => "aborted",
            SessionEnd::UpstreamLost(_) => "upstream_lost",
        };
        m.push_outcome(outcome);
        if outcome == "published" {
            let secs = started.elapsed().as_secs_f64().max(1e-6);
            m.hop_throughput.observe(bytes as f64 / secs);
            m.chunk_latency.observe(secs / chunks.max(1) as f64);
        }
    }
    match end {
        SessionEnd::Finished(reports) => {
            tracing::info!("push finished: {}", summary(&reports));
            let mine = reports.first().map(|r| r.outcome.clone());
            (audit.outcome, audit.reason) = match mine {
                Some(wire::Outcome::Published) => ("published", None),
                Some(wire::Outcome::Failed(e)) => ("failed", Some(e.message)),
                _ => ("failed", Some(summary(&reports))),
            };
            linger_close(&mut conn);
            store.retain(&hello.name, (hello.keep > 0).then_some(hello.keep as usize), hello.version);
        }
        SessionEnd::Aborted(e) => {
            tracing::warn!("push aborted: {e}");
            (audit.outcome, audit.reason) = ("aborted", Some(e.message.clone()));
            linger_close(&mut conn);
        }
        SessionEnd::UpstreamLost(why) => {
            tracing::warn!("push abandoned, nothing published: {why}");
            (audit.outcome, audit.reason) = ("upstream_lost", Some(why));
        }
    }
}

/// The checks a HELLO must pass before anything is staged or dialed: the limits this replica
/// sets (`--max-chain`, `--max-entries`, `--pool-mb`) and node names that are addresses.
/// Pure, so that the fuzz targets run it on every HELLO they decode.
pub fn admit(hello: &Hello, opts: &ServeOptions) -> Result<(), NodeError> {
    let nodes = hello.downstream.len() + 1;
    if nodes > opts.max_chain {
        return Err(NodeError::new(
            ErrorKind::Unsupported,
            format!(
                "a chain of {nodes} nodes from here is longer than this replica allows (serve --max-chain {})",
                opts.max_chain
            ),
        ));
    }
    let entries = hello.manifest.entries().len();
    if entries > opts.max_entries {
        return Err(NodeError::new(
            ErrorKind::BadManifest,
            format!(
                "the manifest lists {entries} entries, more than this replica accepts (serve --max-entries {})",
                opts.max_entries
            ),
        ));
    }
    crate::pool::check_budget(opts.pool_bytes, hello.manifest.chunk_size())
        .map_err(|why| NodeError::new(ErrorKind::Unsupported, format!("{why} (serve --pool-mb)")))?;
    for node in std::iter::once(&hello.you).chain(&hello.downstream) {
        check_node(node)
            .map_err(|why| NodeError::new(ErrorKind::Protocol, format!("bad HELLO: node {node:?} {why}")))?;
    }
    Ok(())
}

/// A node name as the chain lists it: `HOST:PORT`, printable, no spaces (it is dialed, logged
/// and reported, so nothing else passes).
fn check_node(node: &str) -> Result<(), &'static str> {
    if node.is_empty() || node.len() > 255 {
        return Err("is not 1 to 255 bytes long");
    }
    if !node.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("holds characters that are not printable ASCII");
    }
    match node.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err("is not HOST:PORT"),
    }
}

/// Records one push (or refusal) in the audit log when dropped.
struct AuditGuard<'a> {
    log: Option<Arc<crate::audit::AuditLog>>,
    peer: &'a str,
    key_id: Option<&'a str>,
    name: String,
    version: u64,
    bytes: u64,
    outcome: &'static str,
    reason: Option<String>,
}

impl AuditGuard<'_> {
    /// Refuses the push with `error` (a REJECT naming `node`) and remembers why.
    fn reject(&mut self, conn: &mut TcpStream, node: &str, error: NodeError) -> io::Result<()> {
        self.reason = Some(format!("{node}: {}", error.message));
        reject(conn, node, error)
    }
}

impl Drop for AuditGuard<'_> {
    fn drop(&mut self) {
        if let Some(log) = &self.log {
            log.record(&crate::audit::Record {
                peer: self.peer,
                key_id: self.key_id,
                name: Some(&self.name),
                version: Some(self.version),
                bytes: self.bytes,
                outcome: self.outcome,
                reason: self.reason.take(),
            });
        }
    }
}

/// Records a connection refused before any push (bad frames, authentication).
fn audit_refusal(opts: &ServeOptions, peer: &str, key_id: Option<&str>, reason: String) {
    if let Some(log) = &opts.audit {
        log.record(&crate::audit::Record {
            peer,
            key_id,
            outcome: "refused",
            reason: Some(reason),
            ..Default::default()
        });
    }
}

/// Expires partial stagings by the serve limits and updates their gauges.
fn expire_partials(store: &Store, opts: &ServeOptions) {
    let stats = store.expire_partials();
    if let Some(m) = &opts.metrics {
        m.partials.set(stats.count as i64);
        m.partial_bytes.set(stats.bytes as i64);
    }
}

/// The chunks (in `manifest`'s numbering) that a resumed partial staging holds with the right
/// digest. `map`: the push's entry → the staged entry (None: the same).
fn resumed_chunks(
    manifest: &Manifest,
    map: Option<&[Option<usize>]>,
    records: &[crate::store::JournalRecord],
) -> ChunkSet {
    let mut set = ChunkSet::empty(manifest.chunk_count());
    if records.is_empty() {
        return set;
    }
    let mut staged_to_push = std::collections::HashMap::new();
    for i in 0..manifest.entries().len() {
        if let Some(staged) = map.map_or(Some(i), |m| m[i]) {
            staged_to_push.insert(staged, i);
        }
    }
    for &(entry, chunk, digest) in records {
        if let Some(&e) = staged_to_push.get(&(entry as usize)) {
            let r = manifest.chunk_range(e);
            let seq = r.start + chunk;
            if seq < r.end && manifest.chunk(seq).is_some_and(|c| c.digest == digest) {
                set.insert_range(seq, seq + 1);
            }
        }
    }
    set
}

fn summary(reports: &[ReplicaReport]) -> String {
    reports
        .iter()
        .map(|r| match &r.outcome {
            wire::Outcome::Published => format!("{} published", r.node),
            wire::Outcome::Failed(e) => format!("{} failed ({})", r.node, e.message),
            wire::Outcome::Behind => format!("{} behind", r.node),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Asks a replica what it holds.
pub fn status(
    node: &str,
    timeout: Duration,
    key: Option<&crate::auth::ClusterKey>,
    tls: Option<&crate::tls::TlsIdentity>,
) -> Result<Vec<wire::SetStatus>, NodeError> {
    let (mut s, _) = connect(node, timeout, key, tls)?;
    let lost = |e: &dyn std::fmt::Display| NodeError::new(ErrorKind::ConnectionLost, format!("{node}: {e}"));
    s.set_read_timeout(Some(timeout)).map_err(|e| lost(&e))?;
    wire::write_frame(&mut s, Kind::StatusReq, 0, &[]).map_err(|e| lost(&e))?;
    let f = wire::read_frame(&mut s).map_err(|e| lost(&e))?;
    match f.header.kind {
        Kind::StatusResp => {
            wire::decode_status(&f.payload).map_err(|e| NodeError::new(ErrorKind::Protocol, format!("{node}: {e}")))
        }
        Kind::Reject => {
            let reports = wire::decode_reports(&f.payload).unwrap_or_default();
            Err(match reports.into_iter().next().map(|r| r.outcome) {
                Some(wire::Outcome::Failed(e)) => e,
                _ => NodeError::new(ErrorKind::Protocol, format!("{node} refused the status request")),
            })
        }
        k => Err(NodeError::new(ErrorKind::Protocol, format!("{node} answered with {}", k.name()))),
    }
}

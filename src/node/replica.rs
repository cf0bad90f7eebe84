//! `shardcast serve`: accepts pushes and status requests. The control plane (accepting, the
//! handshake gate, status requests) runs on a tokio runtime; each push runs on a thread of its own.

use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{ErrorKind, NodeError, ServeError};
use crate::hop::policy::Transport;
use crate::hop::rdma::{DnLink, UpLink};
use crate::hop::{AcceptPolicy, HandshakeError, Hop, LanePath, Refused};
use crate::manifest::{Manifest, Subset};
use crate::pool::PoolCache;
use crate::proto::Role;
use crate::proto::admission::{self, Admit, Peer};
use crate::proto::route::{ChunkSet, Route};
use crate::session::{Local, Session, SessionConfig, SessionEnd};
use crate::store::Store;
use crate::sys::io::IoChoice;
use crate::wire::{self, Hello, Kind, ReadFrameError, ReplicaReport};
use prometheus_client::metrics::gauge::Gauge;

/// How a replica server runs: what it serves and how (its limits are in [`ServeLimits`]).
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
    /// Verify chunk digests on arrival (turned off only to measure what verifying costs).
    pub verify: bool,
    /// Cut-through piece size for relaying (0: forward whole chunks); see `SessionConfig`.
    pub piece_bytes: u32,
    /// RDMA device and GID index (found from the route to each peer when unset).
    pub rdma: crate::rdma::RdmaConfig,
    /// Prometheus metrics to update (`serve --metrics`).
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    /// How every peer must authenticate: prove it holds the cluster key (`--key-file`; the
    /// key is also the one used downstream), present a certificate from the CA (`--tls-cert`,
    /// `--tls-key`, `--tls-ca`), or not at all.
    pub auth: crate::credentials::Auth,
    /// Accept only pushes that encrypt their chunks (`serve --encrypt`).
    pub require_encrypt: bool,
    /// Where every push and refusal is recorded (JSON lines).
    pub audit: Option<Arc<crate::audit::AuditLog>>,
    /// More keys this replica accepts, each limited to some names (`--acl`); the cluster key of
    /// `auth` (when set) may push anything.
    pub acl: Vec<crate::auth::AclEntry>,
    /// Timeouts, and how many and how large: what a peer may take of this replica.
    pub limits: ServeLimits,
    /// This node's rails (`serve --rail ADDR`): local addresses, rail 0 first, announced to
    /// upstream in ACCEPT (with the serve port) so that lane k of a hop comes in on rail
    /// (k mod R), and the local addresses its own lanes downstream bind to. Empty: the listen
    /// address alone.
    pub rails: Vec<std::net::IpAddr>,
}

impl ServeOptions {
    /// Defaults: keep 2, 64 MiB pool per session, the limits of [`ServeLimits::default`].
    pub fn new(listen: impl Into<String>, root: impl Into<PathBuf>) -> Self {
        Self {
            listen: listen.into(),
            root: root.into(),
            keep: 2,
            pool_bytes: 64 << 20,
            transport: Transport::Auto,
            io: IoChoice::from_env(),
            verify: !bench_no_verify(),
            piece_bytes: crate::session::piece_bytes_from_env(),
            rdma: crate::rdma::RdmaConfig::default(),
            metrics: None,
            auth: crate::credentials::Auth::None,
            require_encrypt: false,
            audit: None,
            acl: Vec::new(),
            limits: ServeLimits::default(),
            rails: Vec::new(),
        }
    }
}

/// A replica's limits: how long a peer or a hop may take, how many connections and sessions it
/// may hold, how large a push and its staging may be (the `serve --max-*` and `--*-timeout`
/// flags).
#[derive(Debug, Clone)]
pub struct ServeLimits {
    /// A session with no progress for this long is dropped.
    pub idle_timeout: Duration,
    /// Give up on a downstream hop that takes nothing this long (times the nodes after it).
    pub hop_timeout: Duration,
    /// A push whose final sync (flushing its staging area to disk) takes longer than this fails
    /// here: its disk is hung or far too slow. Upstream waits that long, told every 250 ms that
    /// this node is alive.
    pub sync_timeout: Duration,
    /// How long a peer may take to send its first frame, and downstream to answer.
    pub handshake_timeout: Duration,
    /// Most sessions at once; more are refused.
    pub max_sessions: usize,
    /// Most concurrent connections from one peer address (so that one peer that opens
    /// connections and sends nothing cannot take every session).
    pub max_per_peer: usize,
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
    /// Most bytes the pushes being received may add up to (0: no limit).
    pub max_staging: u64,
    /// Partial stagings (kept for resumes) older than this are removed (None: never).
    pub partial_max_age: Option<Duration>,
    /// Partial stagings beyond this many bytes in all are removed, oldest first (0: no cap).
    pub partial_max_bytes: u64,
}

impl Default for ServeLimits {
    /// 120 s idle timeout, 10 s hop timeout, 600 s to sync a push, 64 sessions (16 per peer address), 5 s to finish a
    /// handshake (128 at once, 8 per peer address), chains of 16 nodes, 1 000 000 entries and
    /// 64 MiB per manifest, versions at most 2^32 beyond `current`, no staging cap, partials
    /// kept 24 h and 100 GiB at most.
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(120),
            hop_timeout: Duration::from_secs(10),
            sync_timeout: Duration::from_secs(600),
            handshake_timeout: Duration::from_secs(5),
            max_sessions: 64,
            max_per_peer: 16,
            max_handshakes: 128,
            max_handshakes_per_peer: 8,
            max_chain: 16,
            max_entries: 1_000_000,
            max_manifest: 64 << 20,
            max_version_ahead: 1 << 32,
            max_staging: 0,
            partial_max_age: Some(Duration::from_secs(24 * 3600)),
            partial_max_bytes: 100 << 30,
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
    /// Listeners on the rails the main one does not cover (`--rail` addresses other than an
    /// unspecified or the same listen address), on the same port.
    rail_listeners: Vec<TcpListener>,
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

/// Tries at most this many ports the kernel picks (`--listen ADDR:0`) for one free on every rail.
const RAIL_PORT_TRIES: usize = 16;

/// Binds `listen` and, on each rail in `rails` other than its address, the same port. With port
/// 0 the kernel picks a port free on the listen address only; one already in use on a rail is
/// given back and another picked (up to [`RAIL_PORT_TRIES`]). A fixed port busy on a rail is an
/// error naming the rail.
fn bind_rails(
    listen: &str,
    rails: &[std::net::IpAddr],
    mut bind: impl FnMut(SocketAddr) -> std::io::Result<TcpListener>,
) -> Result<(TcpListener, Vec<TcpListener>, SocketAddr), ServeError> {
    let bind_err = |source| ServeError::Bind { addr: listen.to_owned(), source };
    let wanted: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(listen).map_err(bind_err)?.collect();
    let mut tries = 0;
    'port: loop {
        tries += 1;
        let mut last = None;
        let listener = wanted.iter().find_map(|a| bind(*a).map_err(|e| last = Some(e)).ok());
        let listener = listener.ok_or_else(|| {
            bind_err(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address")))
        })?;
        let addr = listener.local_addr().map_err(bind_err)?;
        let picked = wanted.iter().all(|a| a.port() == 0);
        let mut rail_listeners = Vec::new();
        for ip in rails {
            if addr.ip().is_unspecified() || addr.ip() == *ip {
                continue;
            }
            let at = SocketAddr::new(*ip, addr.port());
            match bind(at) {
                Ok(l) => rail_listeners.push(l),
                Err(e) if picked && e.kind() == std::io::ErrorKind::AddrInUse && tries < RAIL_PORT_TRIES => {
                    continue 'port;
                }
                Err(e) => {
                    return Err(ServeError::BadRail(format!(
                        "--rail {ip}: cannot listen on {at} (the serve port on that rail): {e}"
                    )));
                }
            }
        }
        return Ok((listener, rail_listeners, addr));
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
        store.set_max_staging(opts.limits.max_staging);
        store.set_partial_limits(opts.limits.partial_max_age, opts.limits.partial_max_bytes);
        expire_partials(&store, &opts);
        super::lanes::check_rails(&opts.rails, "--rail").map_err(ServeError::BadRail)?;
        let (listener, rail_listeners, addr) = bind_rails(&opts.listen, &opts.rails, TcpListener::bind)?;
        Ok(Self { listener, rail_listeners, store, opts, addr })
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

    /// The control plane: accepting, the handshake gate and status requests run as tasks on
    /// one tokio thread, so a connection that sends nothing costs no thread. A push is handed
    /// over to a thread of its own (the data plane: blocking sockets and rings), as is the
    /// handshake of an authenticated connection once its peer sends something (the TLS and
    /// cluster-key handshakes are blocking code shared with the pusher).
    fn run_until(self, stop: &AtomicBool) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
        let runtime = match runtime {
            Ok(r) => r,
            Err(e) => return tracing::error!("cannot start the control plane (a tokio runtime): {e}"),
        };
        let Self { listener, rail_listeners, store, opts, addr } = self;
        runtime.block_on(async move {
            let to_tokio = |l: TcpListener| l.set_nonblocking(true).and_then(|()| tokio::net::TcpListener::from_std(l));
            let listener = match to_tokio(listener) {
                Ok(l) => l,
                Err(e) => return tracing::error!("cannot listen on {addr} with tokio: {e}"),
            };
            let mut rails = Vec::new();
            for l in rail_listeners {
                match to_tokio(l) {
                    Ok(l) => rails.push(l),
                    Err(e) => return tracing::error!("cannot listen on a rail with tokio: {e}"),
                }
            }
            // The rails announced: each --rail with the serve port.
            let announced = opts.rails.iter().map(|ip| SocketAddr::new(*ip, addr.port())).collect();
            let shared = Arc::new(Shared {
                store,
                // One idle pool is kept for the next push (see `PoolCache`).
                pools: Arc::new(PoolCache::new(1)),
                slots: Slots { active: Arc::new(AtomicUsize::new(0)), per_peer: Arc::default() },
                // Connections still in their handshake, counted and timed apart from sessions.
                gate: Gate::start(&opts),
                opts,
                me: addr.to_string(),
                lanes: Arc::new(super::lanes::LaneTable::new(announced)),
            });
            // The pool of the default chunk size, mapped and pinned before the first push
            // needs it (a push's pool goes back to the cache after it anyway).
            let (pools, bytes) = (Arc::clone(&shared.pools), shared.opts.pool_bytes);
            let _ = std::thread::Builder::new()
                .name("shardcast-warm".into())
                .spawn(move || pools.warm(bytes, crate::manifest::DEFAULT_CHUNK));
            // The rails' own listeners (when the listen address does not cover them) take
            // connections like the main one; they end with the runtime.
            for l in rails {
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    loop {
                        match l.accept().await {
                            Ok((conn, _)) => accept(conn, &shared),
                            Err(e) => {
                                tracing::warn!("accept failed on a rail: {e}");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                });
            }
            loop {
                let accepted = listener.accept().await;
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                match accepted {
                    Ok((conn, _)) => accept(conn, &shared),
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        // Connections still waiting for their first frame close with the runtime; pushes (on
        // their own threads) go on.
        runtime.shutdown_background();
    }
}

/// What the handling of every connection shares.
struct Shared {
    store: Arc<Store>,
    pools: Arc<PoolCache>,
    slots: Slots,
    gate: Arc<Gate>,
    opts: ServeOptions,
    /// This node's listening address, as its reports name it.
    me: String,
    /// Pushes waiting for their further lanes (`push --lanes R`).
    lanes: Arc<super::lanes::LaneTable>,
}

/// Lets a new connection through the gate (a task reads its first frame) or refuses it.
fn accept(conn: tokio::net::TcpStream, shared: &Arc<Shared>) {
    let peer = conn.peer_addr().map_or_else(|_| "?".into(), |a| a.to_string());
    // The gate keeps a handle of the socket, to close it at its deadline.
    let entered = conn.into_std().map(|c| (shared.gate.enter(&c), c));
    let (entered, conn) = match entered.and_then(|(e, c)| Ok((e, tokio::net::TcpStream::from_std(c)?))) {
        Ok(both) => both,
        Err(e) => return tracing::warn!(%peer, "cannot take the connection: {e}"),
    };
    match entered {
        Ok(pending) => {
            tokio::spawn(first_frame(conn, peer, Arc::clone(shared), pending));
        }
        Err(why) => {
            tracing::warn!(%peer, "refused: {why}");
            let busy = NodeError::new(ErrorKind::Busy, format!("replica busy: {why}; retry later"));
            let payload = wire::encode_reports(&[ReplicaReport::failed(shared.me.clone(), busy)]);
            // No lingering: a refused connection holds nothing for long.
            tokio::spawn(async move {
                let mut conn = conn;
                let write = write_frame_async(&mut conn, Kind::Reject, &payload);
                let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
            });
        }
    }
}

/// A connection's handshake up to its first frame, on the runtime: a status request is answered
/// here; a HELLO (and any authenticated connection once its peer sends something) goes on on a
/// thread. The gate closes the connection at its deadline, which ends the reads here.
async fn first_frame(mut conn: tokio::net::TcpStream, peer: String, shared: Arc<Shared>, pending: Pending) {
    let _ = conn.set_nodelay(true);
    let opts = &shared.opts;
    if !opts.auth.is_none() || !opts.acl.is_empty() {
        // The TLS and cluster-key handshakes are blocking code: wait for the peer's first bytes
        // here, then run them on the connection's thread.
        if !matches!(conn.peek(&mut [0u8; 1]).await, Ok(n) if n > 0) {
            return tracing::debug!(%peer, "connection closed before a full frame");
        }
        return hand_over(conn, peer, move |c, peer| handle(c, peer, &shared, pending));
    }
    let frame = match read_frame_async(&mut conn, opts.limits.max_manifest).await {
        Ok(f) => f,
        Err(ReadFrameError::Io(e)) => return tracing::debug!(%peer, "connection closed before a full frame: {e}"),
        Err(ReadFrameError::Wire(e)) => {
            tracing::warn!(%peer, "refused: {e}");
            audit_refusal(opts, &peer, None, format!("bad frame: {e}"));
            let error = NodeError::new(ErrorKind::Protocol, format!("refused: {e}"));
            return reject_async(&mut conn, &shared.me, error).await;
        }
    };
    if frame.header.kind == Kind::StatusReq {
        answer_status(&mut conn, &shared).await;
        return drop(pending);
    }
    if frame.header.kind == Kind::Auth {
        let why = NO_KEY.to_owned();
        tracing::warn!(%peer, "refused: {why}");
        audit_refusal(opts, &peer, None, why.clone());
        return reject_async(&mut conn, &shared.me, NodeError::new(ErrorKind::Unauthorized, why)).await;
    }
    hand_over(conn, peer, move |c, peer| {
        let _ = c.set_read_timeout(Some(shared.opts.limits.handshake_timeout));
        let hop = Hop { stream: c, peer: peer.to_owned(), peer_id: None, secret: None };
        dispatch(hop, peer, frame, &shared, pending);
    });
}

/// Runs `then` on a thread of its own with the connection as a blocking std socket.
fn hand_over(conn: tokio::net::TcpStream, peer: String, then: impl FnOnce(TcpStream, &str) + Send + 'static) {
    let conn = match conn.into_std().and_then(|c| c.set_nonblocking(false).map(|()| c)) {
        Ok(c) => c,
        Err(e) => return tracing::warn!(%peer, "cannot hand the connection to a thread: {e}"),
    };
    let spawned = std::thread::Builder::new().name("shardcast-session".into()).spawn(move || then(conn, &peer));
    if let Err(e) = spawned {
        tracing::error!("cannot start a session thread: {e}");
    }
}

/// STATUS_REQ: what the store holds (listed on tokio's blocking pool), or why not.
async fn answer_status(conn: &mut tokio::net::TcpStream, shared: &Shared) {
    let store = Arc::clone(&shared.store);
    let listed = match tokio::task::spawn_blocking(move || store.list()).await {
        Ok(listed) => listed.map_err(|e| e.to_node_error()),
        Err(e) => Err(NodeError::new(ErrorKind::Io, format!("listing the store failed: {e}"))),
    };
    match listed {
        Ok(sets) => {
            let _ = write_frame_async(conn, Kind::StatusResp, &wire::encode_status(&sets)).await;
        }
        Err(e) => reject_async(conn, &shared.me, e).await,
    }
}

/// [`wire::read_frame_max`] on the runtime.
async fn read_frame_async(conn: &mut tokio::net::TcpStream, max: u32) -> Result<wire::Frame, ReadFrameError> {
    use tokio::io::AsyncReadExt;
    let mut hdr = [0u8; wire::HEADER_LEN];
    conn.read_exact(&mut hdr).await?;
    let header = wire::Header::decode(&hdr)?;
    if header.len > max || header.kind == Kind::Chunk {
        // Refused from the header alone, for the reason the blocking reader gives.
        return wire::read_frame_max(&mut &hdr[..], max);
    }
    let mut payload = vec![0u8; header.len as usize];
    conn.read_exact(&mut payload).await?;
    Ok(wire::Frame { header, payload })
}

/// [`wire::write_frame`] on the runtime.
async fn write_frame_async(conn: &mut tokio::net::TcpStream, kind: Kind, payload: &[u8]) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut buf = Vec::with_capacity(wire::HEADER_LEN + payload.len());
    wire::write_frame(&mut buf, kind, 0, payload)?;
    conn.write_all(&buf).await
}

/// `reject` on the runtime: a REJECT naming this node, then [`linger_close_async`].
async fn reject_async(conn: &mut tokio::net::TcpStream, me: &str, error: NodeError) {
    let payload = wire::encode_reports(&[ReplicaReport::failed(me, error)]);
    if write_frame_async(conn, Kind::Reject, &payload).await.is_ok() {
        linger_close_async(conn).await;
    }
}

/// [`linger_close`] on the runtime.
async fn linger_close_async(conn: &mut tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = conn.shutdown().await;
    let mut sink = vec![0u8; 64 << 10];
    let drain = async {
        while let Ok(n) = conn.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
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
        if self.active.load(Ordering::SeqCst) >= opts.limits.max_sessions {
            return Err(format!("{} sessions already running", opts.limits.max_sessions));
        }
        let peer = match conn.peer_addr().map(|a| a.ip()) {
            Ok(ip) => Some(
                PeerGuard::new(&self.per_peer, ip, opts.limits.max_per_peer)
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
    /// The gate, and its reaper (which ends with the gate).
    fn start(opts: &ServeOptions) -> Arc<Self> {
        let gate = Arc::new(Self {
            inner: std::sync::Mutex::default(),
            max: opts.limits.max_handshakes.max(1),
            max_per_peer: opts.limits.max_handshakes_per_peer.max(1),
            timeout: opts.limits.handshake_timeout,
        });
        // A task of the control plane's runtime (where `start` is called), ending with the gate.
        let weak = Arc::downgrade(&gate);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let Some(gate) = weak.upgrade() else { break };
                gate.reap();
            }
        });
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

/// A REJECT naming `node`, under the connection's MAC when it has a `secret` (see
/// `hop::write_reject`), then [`linger_close`].
fn reject(conn: &mut TcpStream, secret: Option<&Secret>, node: &str, error: NodeError) -> io::Result<()> {
    reject_reports(conn, secret, &[ReplicaReport::failed(node, error)])
}

/// A REJECT with `reports` (under the connection's MAC when it has a `secret`), then
/// [`linger_close`].
fn reject_reports(conn: &mut TcpStream, secret: Option<&Secret>, reports: &[ReplicaReport]) -> io::Result<()> {
    crate::hop::write_reject(conn, secret, reports)?;
    linger_close(conn);
    Ok(())
}

type Secret = crate::crypt::SessionSecret;

/// Tells a peer whose handshake `error` refused why (when it can read it; under the connection's
/// MAC when the peer had authenticated), and records it.
fn refuse_handshake(
    conn: &mut TcpStream,
    secret: Option<&Secret>,
    peer: &str,
    me: &str,
    opts: &ServeOptions,
    error: &HandshakeError,
) {
    match error.audit_reason() {
        None => tracing::debug!(%peer, "{error}"),
        Some(reason) => {
            tracing::warn!(%peer, "refused: {error}");
            audit_refusal(opts, peer, None, reason);
        }
    }
    if let Some(e) = error.reply() {
        let _ = reject(conn, secret, me, e);
    }
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

/// Why an AUTH frame is refused by a replica without a cluster key.
const NO_KEY: &str = "this replica has no cluster key: start it with --key-file, or push without one";

/// A connection of an authenticating replica (mutual TLS or a cluster key), on its own thread
/// once its peer sent something: the blocking handshake (`Hop::accept`), then its first frame.
fn handle(conn: TcpStream, peer: &str, shared: &Shared, pending: Pending) {
    let (opts, me) = (&shared.opts, shared.me.as_str());
    let policy = AcceptPolicy {
        keys: opts.auth.key().into_iter().chain(opts.acl.iter().map(|e| &e.key)).collect(),
        tls: opts.auth.tls(),
        timeout: opts.limits.handshake_timeout,
        max_frame: opts.limits.max_manifest,
    };
    let (hop, frame) = match Hop::accept(conn, peer, &policy) {
        Ok(accepted) => accepted,
        Err(Refused { mut stream, secret, error }) => {
            return refuse_handshake(&mut stream, secret.as_ref(), peer, me, opts, &error);
        }
    };
    dispatch(hop, peer, frame, shared, pending);
}

/// A connection's first frame after its authentication (if any), on the connection's thread:
/// a status request is answered, a HELLO admitted and its push run.
fn dispatch(mut hop: Hop, peer: &str, frame: wire::Frame, shared: &Shared, pending: Pending) {
    let (opts, me, store) = (&shared.opts, shared.me.as_str(), &shared.store);
    match frame.header.kind {
        Kind::StatusReq => {
            let result = store.list().map(|sets| wire::encode_status(&sets));
            match result {
                Ok(payload) => {
                    let _ = hop.send_status(payload);
                }
                Err(e) => {
                    let _ = reject(&mut hop.stream, hop.secret.as_ref(), me, e.to_node_error());
                }
            }
        }
        Kind::Hello => {
            let payload = match hop.open_hello(&frame) {
                Ok(payload) => payload,
                Err(e) => return refuse_handshake(&mut hop.stream, hop.secret.as_ref(), peer, me, opts, &e),
            };
            let hello = match Hello::decode(payload).and_then(|h| admit(&h, opts).map(|()| h)) {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(%peer, "refused HELLO: {e}");
                    audit_refusal(opts, peer, hop.peer_id.as_deref(), format!("bad HELLO: {}", e.message));
                    let _ = reject(&mut hop.stream, hop.secret.as_ref(), me, e);
                    return;
                }
            };
            // The handshake is done: from here on the connection counts as a session.
            drop(pending);
            let _slot = match shared.slots.take(&hop.stream, opts) {
                Ok(slot) => slot,
                Err(why) => {
                    tracing::warn!(%peer, "refused: {why}");
                    audit_refusal(opts, peer, hop.peer_id.as_deref(), format!("busy: {why}"));
                    let busy = NodeError::new(ErrorKind::Busy, format!("replica busy: {why}; retry later"));
                    let _ = reject(&mut hop.stream, hop.secret.as_ref(), me, busy);
                    return;
                }
            };
            push_session(hop, hello, store, (&shared.pools, &shared.lanes), opts);
        }
        Kind::Lane => {
            // A further lane of a push running here: not a session of its own.
            drop(pending);
            let join = match hop.open_lane(&frame) {
                Ok(join) => join,
                Err(e) => return refuse_handshake(&mut hop.stream, hop.secret.as_ref(), peer, me, opts, &e),
            };
            if let Err((mut hop, e)) = shared.lanes.join(join, hop) {
                tracing::warn!(%peer, "refused LANE: {e}");
                audit_refusal(opts, peer, hop.peer_id.as_deref(), e.message.clone());
                let _ = reject(&mut hop.stream, hop.secret.as_ref(), me, e);
            }
        }
        k => {
            tracing::warn!(%peer, "refused: {} frame where HELLO or STATUS_REQ was expected", k.name());
            audit_refusal(opts, peer, hop.peer_id.as_deref(), format!("unexpected {} frame", k.name()));
            let _ = reject(
                &mut hop.stream,
                hop.secret.as_ref(),
                me,
                NodeError::new(
                    ErrorKind::Protocol,
                    format!("unexpected {} frame: a session starts with HELLO or STATUS_REQ", k.name()),
                ),
            );
        }
    }
}

/// A push this replica takes part in, from its admission to its report. `up` is the hop from
/// upstream: authenticated, its HELLO (`hello`) read and checked by [`admit`].
///
/// Each step answers upstream itself when it stops the push (a REJECT before ACCEPT, a RESULT
/// after it) and returns None.
fn push_session(
    mut up: Hop,
    hello: Hello,
    store: &Arc<Store>,
    (pools, lanes): (&PoolCache, &Arc<super::lanes::LaneTable>),
    opts: &ServeOptions,
) {
    let me = hello.you.clone();
    let (peer, key_id) = (up.peer.clone(), up.peer_id.clone());
    let span = tracing::info_span!("push", name = %hello.name, version = hello.version, %peer);
    let _enter = span.enter();
    // Written when this function returns, however it returns: refused (the default), or the
    // push's outcome set at the end.
    let mut audit = AuditGuard {
        log: opts.audit.clone(),
        peer: &peer,
        key_id: key_id.as_deref(),
        name: hello.name.clone(),
        version: hello.version,
        bytes: hello.manifest.total_bytes(),
        outcome: "refused",
        reason: None,
    };
    let admitted = match admission(&hello, key_id.as_deref(), up.secret.is_some(), store, opts) {
        Ok(a) => a,
        Err(e) => {
            let _ = audit.reject(&mut up, &me, e);
            return;
        }
    };
    let Some(claimed) = claim(&mut up, &hello, &admitted, store, opts, &mut audit) else { return };
    // The version is held here. A partial staging to resume is taken over (re-hashed: ~0.25 s
    // a GiB) while the rest of the chain forms, rather than before this node dials on; any
    // other staging opens at once, before the dial, so that a failure here leaves the next
    // nodes untouched. Holding the version first matters: the next nodes supersede their own
    // stuck sessions only for a push that this node takes.
    let (opened, onward) = if claimed.has_partial() {
        let span = tracing::Span::current();
        std::thread::scope(|s| {
            let opening = std::thread::Builder::new()
                .name("shardcast-open".into())
                .spawn_scoped(s, || span.in_scope(|| open_staging(claimed, &hello, &admitted, store)));
            let onward = dial_onward(&hello, &admitted, opts);
            let opened = match opening {
                Ok(t) => t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
                Err(e) => Err(NodeError::new(ErrorKind::Io, format!("cannot start a thread: {e}"))),
            };
            (opened, Some(onward))
        })
    } else {
        (open_staging(claimed, &hello, &admitted, store), None)
    };
    // On a refusal downstream the reservation is dropped before answering, so that the caller
    // can retry the same version at once.
    let reserved = match opened {
        Ok(r) => r,
        Err(e) => {
            drop(onward);
            tracing::warn!("refused: {}", e.message);
            let _ = audit.reject(&mut up, &me, e);
            return;
        }
    };
    let (mut down, mut haves, mut bases, down_offer) =
        match onward.unwrap_or_else(|| dial_onward(&hello, &admitted, opts)) {
            Ok(onward) => onward,
            Err(Onward::Refused(node, e)) => {
                drop(reserved);
                let _ = audit.reject(&mut up, &node, e);
                return;
            }
            Err(Onward::Reports(reports)) => {
                drop(reserved);
                audit.reason = Some(summary(&reports));
                let _ = reject_reports(&mut up.stream, up.secret.as_ref(), &reports);
                return;
            }
        };
    haves.insert(0, reserved.held.clone());
    bases.insert(0, reserved.bases.iter().map(|b| (b.seq, b.digest)).collect());
    let delta = hello.flags.has(wire::HelloFlags::DELTA);
    let mut accept = if admitted.routed { wire::encode_accept(&haves, delta.then_some(&bases)) } else { Vec::new() };
    // Several lanes: ACCEPT ends with the token the further lanes from upstream present.
    let lane_wait = match (hello.lanes > 1).then(|| lanes.register(up.peer_id.clone())).transpose() {
        Ok(w) => w,
        Err(e) => {
            let _ = audit.reject(&mut up, &me, e);
            return;
        }
    };
    if let Some(w) = &lane_wait {
        accept.extend(wire::LaneOffer { token: w.token, rails: lanes.rails().to_vec() }.encode());
    }
    if let Err(e) = up.accept_push(accept) {
        tracing::warn!("upstream went away before the push started: {e}");
        return;
    }
    let retain = (hello.name.clone(), hello.version, hello.keep);
    let lanes = LaneSetUp { wait: lane_wait, down_offer };
    let started =
        start_session(&mut up, down.as_mut(), hello, admitted, reserved, &haves, pools, (opts, lanes), &mut audit);
    // The further lanes' connections stay open while the session uses them.
    let Some((session, watch, _lanes)) = started else { return };
    let end = session.run();
    // The session's staging is gone: published, or kept as a partial.
    expire_partials(store, opts);
    watch.finish(opts, &end);
    finish(&mut up, retain, end, store, &mut audit);
}

/// What this replica admits a push with (see [`admission`]).
struct Admitted {
    /// Chunks travel encrypted (HELLO's `ENCRYPT` flag).
    encrypt: bool,
    /// A routed push (HELLO says which entries each node wants).
    routed: bool,
    /// The entries this node stores of a routed push: the push's entry -> the staged one, and
    /// the staged manifest (None: all of it).
    own: Option<Subset>,
    /// The key the push started with (HELLO's grant, or the key upstream authenticated with).
    origin: String,
    /// The push's rights here (None: no limits).
    limits: Option<wire::Limits>,
}

/// Whether this replica takes the push `hello` from a peer that authenticated as `key_id`
/// (`secured`: the hop has a session secret): the checks are `proto::admission`'s.
fn admission(
    hello: &Hello,
    key_id: Option<&str>,
    secured: bool,
    store: &Store,
    opts: &ServeOptions,
) -> Result<Admitted, NodeError> {
    let peer = Peer { authenticated: secured, key_id, current_version: store.current_version(&hello.name) };
    let Admit { encrypt, own, origin, limits } =
        admission::admit(hello, &opts.into(), &peer).inspect_err(|e| tracing::warn!("refused: {}", e.message))?;
    Ok(Admitted { encrypt, routed: !hello.wants.is_empty(), own, origin, limits })
}

/// The staging a push reserved here, and what of it this node already holds.
struct Reserved {
    /// The staging area the chunks are written to.
    staging: crate::store::Staging,
    /// The chunks (push numbering) that need not travel here: resumed or copied locally.
    held: Vec<(u64, u64)>,
    /// The chunks the current version of the name has, to copy into the staging.
    copies: Vec<crate::store::Reuse>,
    /// A delta push: the chunks this node may take as XOR deltas, and its base of each.
    bases: Vec<crate::store::BaseChunk>,
}

/// Holds the push's version here ([`Store::claim`]: a stuck session of it gives up first). None
/// when the push stops here (already held, or refused): upstream was answered.
fn claim(
    up: &mut Hop,
    hello: &Hello,
    admitted: &Admitted,
    store: &Arc<Store>,
    opts: &ServeOptions,
    audit: &mut AuditGuard<'_>,
) -> Option<crate::store::Claimed> {
    let (me, routed) = (&hello.you, admitted.routed);
    let staged = admitted.own.as_ref().map_or(&hello.manifest, |s| &s.manifest);
    expire_partials(store, opts);
    // Pushes are idempotent: a routed push (every digest known) of a version published here with
    // the same manifest is answered with a REJECT whose report says "published": this node
    // takes no data and the primary forms the chain again without it. (A plain push carries no
    // digests; it is refused as `version_exists` and the primary asks again, routed.)
    let held_here = || {
        routed && store.published_manifest(&hello.name, hello.version).is_some_and(|m| m.digest() == staged.digest())
    };
    let answer_held = |up: &mut Hop, audit: &mut AuditGuard<'_>| {
        tracing::info!("already held: the same manifest is published here; taking no data");
        audit.outcome = "already held";
        let held = [ReplicaReport { node: me.clone(), outcome: wire::Outcome::Published }];
        let _ = reject_reports(&mut up.stream, up.secret.as_ref(), &held);
    };
    if held_here() {
        answer_held(up, audit);
        return None;
    }
    // A routed push carries every digest, so a partial staging of this version (an earlier
    // attempt that failed here) can be taken over and checked chunk by chunk.
    match store.claim(&hello.name, hello.version, staged, routed) {
        Ok(c) => Some(c),
        // An earlier session of this version published it while this one waited for it to let
        // go (or between the check above and the claim): the same manifest is held all the same.
        Err(crate::error::StoreError::VersionExists { .. }) if held_here() => {
            answer_held(up, audit);
            None
        }
        Err(e) => {
            tracing::warn!("refused: {e}");
            let _ = audit.reject(up, me, e.to_node_error());
            None
        }
    }
}

/// Opens the claimed staging (taking over a partial one of a routed push), and finds the
/// chunks this node already holds.
fn open_staging(
    claimed: crate::store::Claimed,
    hello: &Hello,
    admitted: &Admitted,
    store: &Store,
) -> Result<Reserved, NodeError> {
    let (routed, own) = (admitted.routed, admitted.own.as_ref());
    let staged = own.map_or(&hello.manifest, |s| &s.manifest);
    let mut staging = claimed.open(staged).map_err(|e| e.to_node_error())?;
    if admitted.limits.as_ref().is_some_and(|l| !l.replace_current) {
        staging.keep_current();
    }
    // A routed push also says which of its chunks this node already holds: those it resumed
    // from a partial staging (journaled, same digest), and those its current version of the
    // name has (copied locally). They do not travel here.
    let resumed = resumed_chunks(&hello.manifest, own.map(|s| &s.map[..]), staging.resumed());
    let crate::store::Reusable { mut held, copies, mut bases } = match (routed, store.current_manifest(&hello.name)) {
        (true, Some((v, old, dir))) => {
            let wanted = hello.wants.first().and_then(Option::as_deref);
            let map = own.map(|s| &s.map[..]);
            let r = crate::store::find_reuse(&hello.manifest, wanted, map, &old, &dir, &|q| resumed.contains(q));
            tracing::info!(from = v, chunks = r.held.iter().map(|x| x.1).sum::<u64>(), "chunks already held");
            r
        }
        _ => crate::store::Reusable::default(),
    };
    held.extend((0..resumed.total()).filter(|&q| resumed.contains(q)).map(|q| (q, 1)));
    if !routed || !hello.flags.has(wire::HelloFlags::DELTA) {
        bases.clear();
    }
    Ok(Reserved { staging, held, copies, bases })
}

/// For each node from this one to the tail, the chunk ranges (start, count) it already holds.
type Haves = Vec<Vec<(u64, u64)>>;

/// How the onward dial stopped a push.
enum Onward {
    /// A REJECT upstream naming this node: the node that failed, and why.
    Refused(String, NodeError),
    /// The nodes after this one refused: their reports go upstream in a REJECT.
    Reports(Vec<ReplicaReport>),
}

/// What [`dial_onward`] returns: the hop downstream; for each node after this one to the tail,
/// the chunks it holds and (a delta push) its bases; the lane token from the next node.
type Onwards = (Option<Hop>, Haves, wire::Bases, Option<wire::LaneOffer>);

/// Dials the next node (if any) and hands it the push, narrowed to the nodes after this one.
/// Returns the hop downstream and, for each node after this one to the tail, the chunks it
/// holds and (a delta push) its bases.
fn dial_onward(hello: &Hello, admitted: &Admitted, opts: &ServeOptions) -> Result<Onwards, Onward> {
    let (mut haves, mut bases) = (Vec::new(), Vec::new());
    let Some(next) = hello.downstream.first() else { return Ok((None, haves, bases, None)) };
    // The onward handshake as a whole (connect, authenticate, the rest of the chain's answer)
    // is bounded: one handshake timeout per node from here to the tail, so that the nearest
    // node to a silent one times out first and is the one that reports it.
    let onward_deadline =
        std::time::Instant::now() + opts.limits.handshake_timeout * (hello.downstream.len() as u32 + 1);
    let auth = (opts.auth.key(), opts.auth.tls());
    let mut down = match super::lanes::dial_chain(next, &opts.rails, opts.limits.handshake_timeout, auth) {
        Ok(hop) if admitted.encrypt && hop.secret.is_none() => {
            let e = NodeError::new(
                ErrorKind::Unsupported,
                format!(
                    "the push asks for encryption, but this replica reaches {next} unauthenticated: start it with \
                     --key-file (or --tls-cert, --tls-key and --tls-ca)"
                ),
            );
            return Err(Onward::Refused(hello.you.clone(), e));
        }
        Ok(hop) => hop,
        Err(e) => {
            tracing::warn!("refused: {e}");
            return Err(Onward::Refused(next.clone(), e));
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
        grant: wire::Grant { origin: admitted.origin.clone(), limits: admitted.limits.clone() },
        ..hello.clone()
    };
    let timeout = onward_deadline.saturating_duration_since(std::time::Instant::now()).max(Duration::from_millis(1));
    let accepted = down.handshake(&onward, timeout).map(|payload| wire::split_lane_token(payload, hello.lanes));
    let token;
    match accepted {
        Ok(None) => {
            let e = NodeError::new(ErrorKind::Protocol, "bad ACCEPT: no lane token");
            return Err(Onward::Refused(next.clone(), e));
        }
        Ok(Some((payload, t))) if !admitted.routed => (token, _) = (t, payload),
        Ok(Some((payload, t))) => {
            let delta = hello.flags.has(wire::HelloFlags::DELTA);
            match wire::decode_accept(&payload, hello.manifest.chunk_count(), delta) {
                Ok((h, b)) if h.len() == hello.downstream.len() => {
                    haves.extend(h);
                    bases.extend(b);
                    token = t;
                }
                _ => {
                    let e = NodeError::new(ErrorKind::Protocol, "bad ACCEPT: no valid list of held chunks");
                    return Err(Onward::Refused(next.clone(), e));
                }
            }
        }
        Err(reports) => {
            tracing::warn!("downstream refused: {:?}", reports.first());
            return Err(Onward::Reports(reports));
        }
    }
    Ok((Some(down), haves, bases, token))
}

/// The reports of a push that failed at `node` after it was accepted: `node` failed with
/// `error`, the others from this node to the tail were aborted because of it.
fn failed_at(hello: &Hello, node: &str, error: &NodeError) -> Vec<ReplicaReport> {
    std::iter::once(hello.you.as_str())
        .chain(hello.downstream.iter().map(String::as_str))
        .map(|n| {
            if n == node {
                ReplicaReport::failed(n, error.clone())
            } else {
                ReplicaReport::failed(n, NodeError::new(ErrorKind::Aborted, format!("push aborted: {node} failed")))
            }
        })
        .collect()
}

/// Sets up the accepted push's session: the local copies of held chunks, the pool, the links
/// of both hops (`down`: to the next node), then the session itself. None when that failed:
/// upstream got a RESULT.
#[allow(clippy::too_many_arguments)]
fn start_session<'a>(
    up: &mut Hop,
    down: Option<&mut Hop>,
    hello: Hello,
    admitted: Admitted,
    reserved: Reserved,
    haves: &[Vec<(u64, u64)>],
    pools: &'a PoolCache,
    (opts, lanes): (&ServeOptions, LaneSetUp),
    audit: &mut AuditGuard<'_>,
) -> Option<(Session<'a>, Watch, Vec<Hop>)> {
    let me = hello.you.as_str();
    let Reserved { staging, copies, bases, .. } = reserved;
    let route = admitted
        .routed
        .then(|| Route::for_position(&crate::proto::route::needs(&hello.manifest, &hello.wants, haves), 1));
    let prefill = if copies.is_empty() {
        None
    } else {
        match staging.spawn_reuse(copies) {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!("cannot reuse held chunks: {e}");
                let reports = std::iter::once(me)
                    .chain(hello.downstream.iter().map(String::as_str))
                    .map(|n| ReplicaReport::failed(n, e.to_node_error()))
                    .collect::<Vec<_>>();
                let _ = up.send_result(&reports);
                return None;
            }
        }
    };
    tracing::info!(
        bytes = hello.manifest.total_bytes(),
        chunks = hello.manifest.chunk_count(),
        downstream = hello.downstream.len(),
        "receiving"
    );
    let down_secret = down.as_ref().and_then(|d| d.secret.clone());
    let down_fd = down.as_ref().map(|d| d.stream.as_raw_fd());
    let down_peer = down.as_ref().map(|d| (d.peer.clone(), super::lanes::path_of(d)));
    // From here on a failure goes upstream as a RESULT: it has accepted and waits for chunks.
    let set_up = links(up, down, &hello, pools, opts).and_then(|(mut pool, links)| {
        let (mut up_lanes, mut dn_lanes) =
            lanes.open(&hello, down_peer.as_ref().map(|(n, p)| (n.as_str(), p.clone())), opts)?;
        let lane_links = lane_links(&mut up_lanes, &mut dn_lanes, &hello, &mut pool, opts)?;
        Ok((pool, links, (up_lanes, dn_lanes), lane_links))
    });
    let (pool, (up_link, dn_link), (up_lanes, dn_lanes), (up_lane_links, dn_lane_links)) = match set_up {
        Ok(set_up) => set_up,
        Err(Failed { node, error, reason }) => {
            tracing::error!("push failed before it started: {error}");
            (audit.outcome, audit.reason) = ("failed", Some(reason));
            let _ = up.send_result(&failed_at(&hello, &node, &error));
            return None;
        }
    };
    let _ = up.stream.set_read_timeout(None);
    let watch = Watch::start(opts, &hello, up_link.is_some(), dn_link.is_some());
    let up_secret = up.secret.clone();
    let encrypt = admitted.encrypt;
    let cfg = SessionConfig::default()
        .pool_bytes(opts.pool_bytes)
        .io(opts.io)
        .idle_timeout(opts.limits.idle_timeout)
        .sync_timeout(opts.limits.sync_timeout)
        .hop_timeout(opts.limits.hop_timeout)
        .verify(opts.verify)
        .piece_bytes(opts.piece_bytes);
    let cfg =
        match route {
            Some(route) => cfg.route(Some(route), admitted.own).prefill(prefill),
            None => cfg,
        }
        .superseded(staging.receiving())
        .early_report(hello.mode == wire::Mode::Async)
        .stop_on_loss(hello.flags.has(wire::HelloFlags::REPAIR))
        .decompress(hello.flags.has(wire::HelloFlags::COMPRESS))
        .deltas(hello.flags.has(wire::HelloFlags::DELTA).then_some(bases))
        .crypt(
            up_secret.as_ref().filter(|_| encrypt).map(crate::crypt::Opener::new),
            down_secret.as_ref().filter(|_| encrypt).map(crate::crypt::Sealer::new),
        )
        .macs(up_secret.clone(), down_secret.clone())
        .lanes(lane_fds(&up_lanes), lane_fds(&dn_lanes))
        .lane_links(up_lane_links, dn_lane_links)
        .metrics(opts.metrics.as_ref().map(|m| {
            crate::metrics::SessionMetrics::new(m, &up.peer, hello.downstream.first().map_or("", String::as_str))
        }));
    let session = Session::new(
        Role::Replica,
        me,
        hello.downstream.clone(),
        hello.manifest,
        Local::Staging(Some(staging)),
        Some(up.stream.as_raw_fd()),
        down_fd,
        cfg,
        None,
        pool,
        Some(pools),
        (up_link, dn_link),
    );
    Some((session, watch, up_lanes.into_iter().chain(dn_lanes).collect()))
}

/// What a push of several lanes needs to open them: its registration for the lanes from
/// upstream, and the token of the node downstream.
struct LaneSetUp {
    wait: Option<super::lanes::LaneWait>,
    down_offer: Option<wire::LaneOffer>,
}

impl LaneSetUp {
    /// Opens the further lanes of both hops: first those to the node downstream (which waits for
    /// them), then waits for those from upstream. Returns (upstream's, downstream's).
    fn open(
        self,
        hello: &Hello,
        down: Option<(&str, LanePath)>,
        opts: &ServeOptions,
    ) -> Result<(Vec<Hop>, Vec<Hop>), Failed> {
        let timeout = opts.limits.handshake_timeout;
        let mut dn = Vec::new();
        if let (Some((next, control)), Some(offer)) = (down, self.down_offer) {
            super::lanes::remember_rails(next, &offer.rails);
            let paths = super::lanes::lane_paths(next, &offer.rails, &opts.rails, hello.lanes);
            let auth = (opts.auth.key(), opts.auth.tls());
            dn = super::lanes::open_lanes(next, &paths, &control, timeout, auth, offer.token)
                .map_err(|error| Failed { node: next.to_owned(), reason: error.message.clone(), error })?;
        }
        let up = match &self.wait {
            Some(w) => w.collect(hello.lanes, std::time::Instant::now() + timeout).map_err(|error| Failed {
                node: hello.you.clone(),
                reason: error.message.clone(),
                error,
            })?,
            None => Vec::new(),
        };
        Ok((up, dn))
    }
}

/// The sockets and secrets of further lanes, as the session takes them.
fn lane_fds(hops: &[Hop]) -> Vec<(std::os::fd::RawFd, Option<Secret>)> {
    hops.iter().map(|h| (h.stream.as_raw_fd(), h.secret.clone())).collect()
}

/// The link of the hop from upstream and of the hop downstream (None: TCP).
type Links = (Option<UpLink>, Option<DnLink>);

/// The links of the further lanes of the hop from upstream and of the hop downstream, lane 1
/// first (None: that lane runs TCP).
type LaneLinks = (Vec<Option<UpLink>>, Vec<Option<DnLink>>);

/// A push that failed after it was accepted and before its session ran.
struct Failed {
    /// The node that failed.
    node: String,
    /// Why.
    error: NodeError,
    /// What the audit log records.
    reason: String,
}

/// The session's pool, then the link of the hop from upstream and of the hop downstream (each
/// hop on its own: a chain may mix RDMA and TCP).
fn links(
    up: &mut Hop,
    down: Option<&mut Hop>,
    hello: &Hello,
    pools: &PoolCache,
    opts: &ServeOptions,
) -> Result<(crate::pool::Pool, Links), Failed> {
    let here = |error: NodeError| Failed { node: hello.you.clone(), reason: error.message.clone(), error };
    let mut pool = pools
        .get(opts.pool_bytes, hello.manifest.chunk_size())
        .map_err(|e| here(NodeError::io("cannot set up the buffer pool", &e)))?;
    let transport = hello.transport;
    // Of several lanes, each takes its share of the pool at first (the session grants the rest).
    let share = pool.slots() / usize::from(hello.lanes.max(1));
    let lane0 = opts.rdma.for_lane(0);
    let up_link = up.answer_rdma(transport, &lane0, &mut pool, share).map_err(here)?;
    let dn_link = match down {
        Some(d) => d.offer_rdma(&hello.you, transport, &lane0, &pool).map_err(|(node, error)| Failed {
            reason: format!("{node}: {}", error.message),
            node,
            error,
        })?,
        None => None,
    };
    Ok((pool, (up_link, dn_link)))
}

/// The transports of the further lanes of both hops, each negotiated on its own lane's connection
/// after its LANE/ACCEPT exactly as lane 0's after ACCEPT (first those from upstream, then those
/// downstream, so that a chain's lanes negotiate from the primary down without waiting on each
/// other). A lane's device is the one whose GID is its connection's local address, so lane k on
/// rail k uses that rail's NIC. None: that lane runs TCP (under `auto`).
fn lane_links(
    up_lanes: &mut [Hop],
    dn_lanes: &mut [Hop],
    hello: &Hello,
    pool: &mut crate::pool::Pool,
    opts: &ServeOptions,
) -> Result<LaneLinks, Failed> {
    let here = |error: NodeError| Failed { node: hello.you.clone(), reason: error.message.clone(), error };
    let share = pool.slots() / usize::from(hello.lanes.max(1));
    let mut ups = Vec::with_capacity(up_lanes.len());
    // Lane k (k >= 1) is entry k - 1, on rail k: that rail's device.
    for (k, lane) in (1..).zip(up_lanes.iter_mut()) {
        ups.push(lane.answer_rdma(hello.transport, &opts.rdma.for_lane(k), pool, share).map_err(here)?);
    }
    let mut dns = Vec::with_capacity(dn_lanes.len());
    for (k, lane) in (1..).zip(dn_lanes.iter_mut()) {
        let cfg = opts.rdma.for_lane(k);
        let link = lane.offer_rdma(&hello.you, hello.transport, &cfg, pool).map_err(|(node, error)| Failed {
            reason: format!("{node}: {}", error.message),
            node,
            error,
        })?;
        dns.push(link);
    }
    Ok((ups, dns))
}

/// The push's metrics while its session runs: the gauges of its hops and of the sessions, then
/// its outcome, throughput and chunk latency.
struct Watch {
    /// The upstream hop's gauge and the downstream hop's (None: no metrics).
    gauges: Option<(Gauge, Option<Gauge>)>,
    /// When the session started.
    started: std::time::Instant,
    /// The push's bytes and chunks.
    size: (u64, u64),
}

impl Watch {
    /// Counts the session and its hops (`up_rdma`, `dn_rdma`: which of them run RDMA).
    fn start(opts: &ServeOptions, hello: &Hello, up_rdma: bool, dn_rdma: bool) -> Self {
        // Metrics: the hops' transports, the session, and the per-peer byte counters.
        let gauges = opts.metrics.as_ref().map(|m| {
            let up = m.hop(if up_rdma { "rdma" } else { "tcp" }, "upstream");
            let dn = hello.downstream.first().map(|_| m.hop(if dn_rdma { "rdma" } else { "tcp" }, "downstream"));
            up.inc();
            if let Some(g) = &dn {
                g.inc();
            }
            m.sessions.inc();
            (up, dn)
        });
        let size = (hello.manifest.total_bytes(), hello.manifest.chunk_count());
        Self { gauges, started: std::time::Instant::now(), size }
    }

    /// The session ended with `end`.
    fn finish(self, opts: &ServeOptions, end: &SessionEnd) {
        let (Some(m), Some((up, dn))) = (&opts.metrics, self.gauges) else { return };
        up.dec();
        if let Some(g) = dn {
            g.dec();
        }
        m.sessions.dec();
        let outcome = match end {
            SessionEnd::Finished(r) if r.first().is_some_and(|r| r.outcome == wire::Outcome::Published) => "published",
            SessionEnd::Finished(_) => "failed",
            SessionEnd::Aborted(_) => "aborted",
            // Published here: the version stays, whoever hears about it.
            SessionEnd::UpstreamLost { published: true, .. } => "published",
            SessionEnd::UpstreamLost { .. } => "upstream_lost",
        };
        m.push_outcome(outcome);
        if outcome == "published" {
            let (bytes, chunks) = self.size;
            let secs = self.started.elapsed().as_secs_f64().max(1e-6);
            m.hop_throughput.observe(bytes as f64 / secs);
            m.chunk_latency.observe(secs / chunks.max(1) as f64);
        }
    }
}

/// After the session `end`ed (its RESULT went upstream): closes the hop from upstream, keeps
/// the name's versions to `keep` (`retain`: name, version, keep), and records the outcome.
fn finish(up: &mut Hop, retain: (String, u64, u32), end: SessionEnd, store: &Store, audit: &mut AuditGuard<'_>) {
    let (name, version, keep) = retain;
    match end {
        SessionEnd::Finished(reports) => {
            tracing::info!("push finished: {}", summary(&reports));
            let mine = reports.first().map(|r| r.outcome.clone());
            (audit.outcome, audit.reason) = match mine {
                Some(wire::Outcome::Published) => ("published", None),
                Some(wire::Outcome::Failed(e)) => ("failed", Some(e.message)),
                _ => ("failed", Some(summary(&reports))),
            };
            linger_close(&mut up.stream);
            store.retain(&name, (keep > 0).then_some(keep as usize), version);
        }
        SessionEnd::Aborted(e) => {
            tracing::warn!("push aborted: {e}");
            (audit.outcome, audit.reason) = ("aborted", Some(e.message.clone()));
            linger_close(&mut up.stream);
        }
        SessionEnd::UpstreamLost { why, published: true } => {
            // Every chunk was verified and synced here before the publish: the version stands,
            // and a repeated push of it finds it published.
            tracing::warn!("published here, but upstream left before it heard the result: {why}");
            (audit.outcome, audit.reason) = ("published", Some(format!("upstream left before the result: {why}")));
            store.retain(&name, (keep > 0).then_some(keep as usize), version);
        }
        SessionEnd::UpstreamLost { why, published: false } => {
            tracing::warn!("push abandoned, nothing published: {why}");
            (audit.outcome, audit.reason) = ("upstream_lost", Some(why));
        }
    }
}

/// The checks a HELLO must pass before anything is staged or dialed: the limits this replica
/// sets (`--max-chain`, `--max-entries`, `--pool-mb`) and node names that are addresses.
/// Pure, so that the fuzz targets run it on every HELLO they decode
/// ([`crate::proto::admission::check_hello`]).
pub fn admit(hello: &Hello, opts: &ServeOptions) -> Result<(), NodeError> {
    crate::proto::admission::check_hello(hello, &opts.into())
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
    fn reject(&mut self, up: &mut Hop, node: &str, error: NodeError) -> io::Result<()> {
        self.reason = Some(format!("{node}: {}", error.message));
        reject(&mut up.stream, up.secret.as_ref(), node, error)
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
    Hop::dial(node, timeout, key, tls)?.status(timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `serve --listen 127.0.0.1:0 --rail 127.0.0.1 --rail 127.0.0.2` where the port the kernel
    /// picked first is taken on the second rail (seen in CI: "Address already in use").
    #[test]
    fn a_picked_port_taken_on_a_rail_is_given_back_and_another_picked() {
        let rails: Vec<std::net::IpAddr> = vec!["127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap()];
        let mut refused = 0;
        let bind = |a: SocketAddr| {
            if a.ip() == rails[1] && refused == 0 {
                refused += 1;
                return Err(std::io::Error::from(std::io::ErrorKind::AddrInUse));
            }
            TcpListener::bind(a)
        };
        let (listener, on_rails, addr) = bind_rails("127.0.0.1:0", &rails, bind).expect("a second port");
        assert_eq!(listener.local_addr().unwrap(), addr);
        assert_eq!(on_rails.len(), 1);
        assert_eq!(on_rails[0].local_addr().unwrap(), SocketAddr::new(rails[1], addr.port()));
    }

    /// A port given on the command line and busy on a rail is an error naming the rail.
    #[test]
    fn a_fixed_port_taken_on_a_rail_is_an_error() {
        let rails: Vec<std::net::IpAddr> = vec!["127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap()];
        for _ in 0..10 {
            let busy = TcpListener::bind("127.0.0.2:0").unwrap();
            let port = busy.local_addr().unwrap().port();
            match bind_rails(&format!("127.0.0.1:{port}"), &rails, TcpListener::bind) {
                Err(ServeError::BadRail(m)) => return assert!(m.contains("--rail 127.0.0.2"), "{m}"),
                // That port was taken on 127.0.0.1 too: another.
                Err(ServeError::Bind { .. }) => continue,
                Err(e) => panic!("{e}"),
                Ok(_) => panic!("port {port} is busy on 127.0.0.2"),
            }
        }
        panic!("no port free on 127.0.0.1 and taken on 127.0.0.2 in 10 tries");
    }
}

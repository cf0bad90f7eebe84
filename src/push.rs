//! The primary side of a push: describe the source, set up the chain, stream, collect reports.

use std::fs::File;
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::ClusterKey;
use crate::chain::{Local, MemoryData, Progress, Session, SessionConfig, SessionEnd, SourceData};
use crate::error::{ErrorKind, NodeError, PushError};
use crate::io::IoChoice;
use crate::manifest::{DEFAULT_CHUNK, Manifest};
use crate::pool::Pool;
use crate::proto::Role;
use crate::route::Route;
use crate::store::check_name;
use crate::transport::Transport;
use crate::wire::{self, Hello, Kind, Mode, Outcome, ReplicaReport};

/// What to push, where, and how.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// Shard set name.
    pub name: String,
    /// Version to publish.
    pub version: u64,
    /// The chain, first replica first.
    pub to: Vec<String>,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Replication mode.
    pub mode: Mode,
    /// Transport choice.
    pub transport: Transport,
    /// RDMA device and GID index (found from the route to each peer when unset).
    pub rdma: crate::rdma::RdmaConfig,
    /// Pool bytes on the primary.
    pub pool_bytes: usize,
    /// Executor choice.
    pub io: IoChoice,
    /// How long to wait for a connection and for the chain to accept.
    pub connect_timeout: Duration,
    /// Give up when nothing moves for this long.
    pub idle_timeout: Duration,
    /// Give up on a downstream hop that takes nothing this long (times the nodes after it).
    pub hop_timeout: Duration,
    /// Versions of this name each replica keeps once this one is published (0: the replica's
    /// `--keep`).
    pub keep: u32,
    /// Hash the source before sending, so that each replica can say which chunks its current
    /// version already has and only the others travel (a checkpoint after a checkpoint).
    pub incremental: bool,
    /// When a replica dies or its link breaks mid-push, go on without it: the replicas after it
    /// get the push again from the primary (as an incremental push: each resumes from what it
    /// had journaled), and the dead one is reported as failed.
    pub repair: bool,
    /// How many replicas must publish for the push to count as a success (None: all).
    pub min_replicas: Option<usize>,
    /// The cluster key every hop authenticates with (None: no authentication).
    pub key: Option<ClusterKey>,
    /// Encrypt chunks on every hop (AES-256-GCM, per-hop keys from the authentication; needs
    /// `key` or `tls`, and means TCP on every hop).
    pub encrypt: bool,
    /// Mutual TLS instead of the cluster key (`--tls-cert`, `--tls-key`, `--tls-ca`).
    pub tls: Option<Arc<crate::tls::TlsIdentity>>,
}

impl PushOptions {
    /// Options with defaults: 4 MiB chunks, sync mode, 16 MiB pool (read-ahead of 4 chunks).
    pub fn new(name: impl Into<String>, version: u64, to: Vec<String>) -> Self {
        Self {
            name: name.into(),
            version,
            to,
            chunk_size: DEFAULT_CHUNK,
            mode: Mode::Sync,
            transport: Transport::Auto,
            rdma: crate::rdma::RdmaConfig::default(),
            pool_bytes: 16 << 20,
            io: IoChoice::from_env(),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            hop_timeout: Duration::from_secs(10),
            keep: 0,
            incremental: false,
            repair: true,
            min_replicas: None,
            key: None,
            encrypt: false,
            tls: None,
        }
    }
}

/// The outcome of a push that ran to the end of the chain.
#[derive(Debug, Clone)]
pub struct PushReport {
    /// Shard set name.
    pub name: String,
    /// Version.
    pub version: u64,
    /// Bytes of file data.
    pub bytes: u64,
    /// Number of files.
    pub files: usize,
    /// Number of chunks.
    pub chunks: u64,
    /// Wall time from start (including hashing the source) to the last report.
    pub seconds: f64,
    /// Seconds spent describing the source (walking it; chunks are hashed as they stream).
    pub manifest_seconds: f64,
    /// One report per replica, in chain order.
    pub replicas: Vec<ReplicaReport>,
    /// Replicas that must publish for [`PushReport::ok`] (`--min-replicas`; default all).
    pub required: usize,
}

impl PushReport {
    /// Replicas that published.
    pub fn published(&self) -> usize {
        self.replicas.iter().filter(|r| r.outcome == Outcome::Published).count()
    }
    /// Whether enough replicas published (all of them, unless `--min-replicas` says fewer).
    pub fn ok(&self) -> bool {
        self.published() >= self.required.max(1).min(self.replicas.len())
    }

    /// Whether every replica published.
    pub fn complete(&self) -> bool {
        self.published() == self.replicas.len()
    }
    /// Bytes per second of wall time (decimal GB/s = this / 1e9).
    pub fn rate(&self) -> f64 {
        if self.seconds > 0.0 { self.bytes as f64 / self.seconds } else { 0.0 }
    }
}

/// Connects to `node` within `timeout` and, with a cluster key or a TLS identity, authenticates
/// both ways (the connection's session secret then comes back too).
pub(crate) fn connect(
    node: &str,
    timeout: Duration,
    key: Option<&ClusterKey>,
    tls: Option<&crate::tls::TlsIdentity>,
) -> Result<(TcpStream, Option<crate::crypt::SessionSecret>), NodeError> {
    let mut s = connect_plain(node, timeout)?;
    let secret = match (tls, key) {
        (Some(id), _) => Some(crate::tls::client(&mut s, node, id, timeout)?),
        (None, Some(k)) => Some(crate::auth::client(&mut s, node, k, timeout)?),
        (None, None) => None,
    };
    Ok((s, secret))
}

/// Connects to `node` within `timeout`, trying each address it resolves to.
fn connect_plain(node: &str, timeout: Duration) -> Result<TcpStream, NodeError> {
    let unreachable = |e: &dyn std::fmt::Display| {
        NodeError::new(ErrorKind::Unreachable, format!("unreachable: {e} (is `shardcast serve` running at {node}?)"))
    };
    let addrs = node.to_socket_addrs().map_err(|e| unreachable(&e))?;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the address resolves to nothing");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(unreachable(&last))
}

/// Sends HELLO to the first node and waits for the whole chain's answer.
/// Returns ACCEPT's payload (a routed push's have-sets; empty otherwise).
pub(crate) fn handshake(
    stream: &mut TcpStream,
    hello: &Hello,
    timeout: Duration,
    secret: Option<&crate::crypt::SessionSecret>,
) -> Result<Vec<u8>, Vec<ReplicaReport>> {
    let node = hello.you.clone();
    let lost = |e: &dyn std::fmt::Display| {
        vec![ReplicaReport::failed(
            &node,
            NodeError::new(ErrorKind::ConnectionLost, format!("connection to {node} lost during the handshake: {e}")),
        )]
    };
    stream.set_read_timeout(Some(timeout)).map_err(|e| lost(&e))?;
    let payload = crate::crypt::seal_frame(secret, crate::crypt::LABEL_HELLO, hello.encode());
    wire::write_frame(stream, Kind::Hello, 0, &payload).map_err(|e| lost(&e))?;
    let frame = wire::read_frame(stream).map_err(|e| match e {
        wire::ReadFrameError::Io(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            vec![ReplicaReport::failed(
                &node,
                NodeError::new(ErrorKind::Stalled, format!("{node} did not answer within {} s", timeout.as_secs())),
            )]
        }
        e => lost(&e),
    })?;
    stream.set_read_timeout(None).map_err(|e| lost(&e))?;
    match frame.header.kind {
        Kind::Accept => Ok(frame.payload),
        Kind::Reject => Err(wire::decode_reports(&frame.payload).unwrap_or_else(|e| {
            vec![ReplicaReport::failed(
                &node,
                NodeError::new(ErrorKind::Protocol, format!("{node} sent a bad REJECT: {e}")),
            )]
        })),
        k => Err(vec![ReplicaReport::failed(
            &node,
            NodeError::new(ErrorKind::Protocol, format!("{node} answered HELLO with {}", k.name())),
        )]),
    }
}

/// Pushes `source` (a directory or a file) to the chain `opts.to`.
///
/// Returns a report when the chain ran to its end (check [`PushReport::ok`]), and an error when
/// the push could not start (bad source, unreachable or refusing replica) or the first replica
/// could not report at all.
pub fn push(source: &Path, opts: &PushOptions, progress: Option<&Progress>) -> Result<PushReport, PushError> {
    with_repair(opts, |o| push_once(source, o, progress))
}

fn push_once(source: &Path, opts: &PushOptions, progress: Option<&Progress>) -> Result<PushReport, PushError> {
    let start = Instant::now();
    check_options(opts)?;
    let (mut manifest, paths) = Manifest::scan(source, opts.chunk_size)?;
    if opts.incremental {
        manifest.hash(&paths)?;
    }
    let manifest_seconds = start.elapsed().as_secs_f64();
    let sources = open_sources(&manifest, paths)?;
    run_push(manifest, sources, everyone(opts), opts, progress, start, manifest_seconds)
}

/// Pushes a routed shard set: `manifest` (complete with digests) describes the union of what
/// the nodes want, `paths` where each of its files is on this node, and `wants` the entries each
/// replica of `opts.to` wants (same order; None: all). Each replica publishes exactly its
/// entries; a chunk travels only as far down the chain as the last replica that wants it.
pub fn push_routed(
    manifest: Manifest,
    paths: Vec<(usize, PathBuf)>,
    wants: Vec<Option<Vec<u32>>>,
    opts: &PushOptions,
    progress: Option<&Progress>,
) -> Result<PushReport, PushError> {
    let start = Instant::now();
    check_options(opts)?;
    if wants.len() != opts.to.len() {
        return Err(PushError::BadInput(format!("{} want lists for {} replicas", wants.len(), opts.to.len())));
    }
    let sources = open_sources(&manifest, paths)?;
    run_push(manifest, sources, wants, opts, progress, start, 0.0)
}

/// Pushes buffers held in memory, each published as the file at its relative path (nested paths
/// get their directories), without writing them anywhere on the primary first.
///
/// The bytes are copied chunk by chunk into the pinned pool as the chain takes them, so the
/// primary's memory does not grow with their size. Each buffer is read once; if the caller
/// changes it during the push, every replica still gets the same bytes (those that were read),
/// and their digests match.
pub fn push_memory(
    files: Vec<(String, MemoryData)>,
    opts: &PushOptions,
    progress: Option<&Progress>,
) -> Result<PushReport, PushError> {
    with_repair(opts, |o| push_memory_once(files.clone(), o, progress))
}

fn push_memory_once(
    files: Vec<(String, MemoryData)>,
    opts: &PushOptions,
    progress: Option<&Progress>,
) -> Result<PushReport, PushError> {
    let start = Instant::now();
    check_options(opts)?;
    if files.is_empty() {
        return Err(PushError::BadInput("no buffers to push".into()));
    }
    let sizes: Vec<(&str, u64)> = files.iter().map(|(p, d)| (p.as_str(), (**d).as_ref().len() as u64)).collect();
    let (manifest, index) = Manifest::plan_for_files(opts.chunk_size, &sizes)?;
    let mut sources: Vec<Option<SourceData>> = (0..manifest.entries().len()).map(|_| None).collect();
    for ((_, data), i) in files.into_iter().zip(index) {
        if manifest.entries()[i].size > 0 {
            sources[i] = Some(SourceData::Memory(data));
        }
    }
    let mut manifest = manifest;
    if opts.incremental {
        for seq in 0..manifest.chunk_count() {
            let c = manifest.chunk(seq).expect("in range");
            let Some(SourceData::Memory(m)) = &sources[c.entry] else { unreachable!("buffers only") };
            let bytes = &(**m).as_ref()[c.offset as usize..c.offset as usize + c.len as usize];
            manifest.set_digest(seq, crate::manifest::digest(bytes));
        }
    }
    run_push(manifest, sources, everyone(opts), opts, progress, start, 0.0)
}

/// Runs `attempt` with `opts`, then, while replicas were cut off by a replica that died (or
/// whose link broke), again with the cut-off ones only: an incremental push, so each of them
/// resumes from the chunks it had journaled and only the rest travels. The dead replica is not
/// waited for; it is reported with its cause. Replicas in the final report keep the chain order.
fn with_repair(
    opts: &PushOptions,
    mut attempt: impl FnMut(&PushOptions) -> Result<PushReport, PushError>,
) -> Result<PushReport, PushError> {
    let start = Instant::now();
    let first = attempt(opts);
    if !opts.repair {
        return first;
    }
    let mut outcomes: std::collections::HashMap<String, Outcome> = std::collections::HashMap::new();
    let mut base: Option<PushReport> = None;
    let mut result = first;
    let mut chain = opts.to.clone();
    let mut repairing = false;
    for _ in 0..opts.to.len() {
        let cut_off: Vec<String> = match &result {
            Ok(r) => {
                for rep in &r.replicas {
                    outcomes.insert(rep.node.clone(), rep.outcome.clone());
                }
                base.get_or_insert_with(|| r.clone());
                // Cut off: not reached because the chain broke before them, or sent corrupt
                // bytes by a node before them (those are fetched again from the primary; what
                // they verified and journaled is kept).
                // A lost connection is tried once more too: a replica that went away after
                // refusing a corrupt chunk looks the same from upstream as a dead one, and a
                // dead one is refused at once and left out.
                r.replicas
                    .iter()
                    .filter(|rep| {
                        matches!(&rep.outcome, Outcome::Failed(e)
                            if matches!(e.kind, ErrorKind::Aborted | ErrorKind::DigestMismatch | ErrorKind::ConnectionLost))
                    })
                    .map(|rep| rep.node.clone())
                    .collect()
            }
            // A replica broke before the chain could report: the first one mid-push, or, while
            // repairing, any one (also one that cannot be reached any more). Go on with the
            // others. (A replica unreachable when the push starts is refused whole, as before:
            // the caller hears at once and can leave it out.)
            Err(PushError::Node { node, error })
                if chain.len() > 1
                    && ((*node == chain[0]
                        && matches!(error.kind, ErrorKind::ConnectionLost | ErrorKind::Stalled))
                        || (repairing
                            && chain.contains(node)
                            && matches!(
                                error.kind,
                                ErrorKind::ConnectionLost | ErrorKind::Stalled | ErrorKind::Unreachable
                            ))) =>
            {
                // The first real cause stands (a dead replica's lost connection, not the refused
                // connect of the retry).
                let known = matches!(outcomes.get(node), Some(Outcome::Failed(e))
                    if !matches!(e.kind, ErrorKind::Aborted | ErrorKind::DigestMismatch));
                if !known {
                    outcomes.insert(node.clone(), Outcome::Failed(error.clone()));
                }
                chain.iter().filter(|n| *n != node).cloned().collect()
            }
            Err(_) if base.is_none() => return result,
            Err(e) => {
                let error = NodeError::new(e.kind(), e.to_string());
                for n in &chain {
                    outcomes.insert(n.clone(), Outcome::Failed(error.clone()));
                }
                Vec::new()
            }
        };
        // Someone must have failed for real: a chain where every failure is "aborted" (e.g.
        // the push was cancelled) is not repaired.
        let dead =
            chain.iter().any(|n| matches!(outcomes.get(n), Some(Outcome::Failed(e)) if e.kind != ErrorKind::Aborted));
        if cut_off.is_empty() || !dead {
            break;
        }
        tracing::warn!("repairing the chain: going on with {} (resuming what each holds)", cut_off.join(","));
        let mut o = opts.clone();
        o.to = cut_off.clone();
        o.incremental = true;
        repairing = true;
        result = attempt(&o);
        chain = cut_off;
    }
    let Some(mut report) = base else { return result };
    if let Ok(r) = &result {
        for rep in &r.replicas {
            outcomes.insert(rep.node.clone(), rep.outcome.clone());
        }
    }
    report.replicas = opts
        .to
        .iter()
        .map(|n| ReplicaReport {
            node: n.clone(),
            outcome: outcomes
                .remove(n)
                .unwrap_or_else(|| Outcome::Failed(NodeError::new(ErrorKind::Aborted, "no report for this replica"))),
        })
        .collect();
    report.seconds = start.elapsed().as_secs_f64();
    report.required = required(opts, opts.to.len());
    Ok(report)
}

/// Replicas that must publish: `--min-replicas`, else all of them (sync) or the first (async).
fn required(opts: &PushOptions, replicas: usize) -> usize {
    opts.min_replicas.unwrap_or(if opts.mode == Mode::Async { 1 } else { replicas })
}

/// An incremental push is routed with every replica wanting everything (its have-set does the
/// rest); an ordinary push is not routed.
fn everyone(opts: &PushOptions) -> Vec<Option<Vec<u32>>> {
    if opts.incremental { vec![None; opts.to.len()] } else { Vec::new() }
}

fn check_options(opts: &PushOptions) -> Result<(), PushError> {
    check_name(&opts.name).map_err(|e| PushError::BadInput(e.to_string()))?;
    if opts.to.is_empty() {
        return Err(PushError::BadInput("no replicas given (--to ADDR[,ADDR…])".into()));
    }
    opts.transport.resolve().map_err(PushError::Unsupported)?;
    // The pool is the bound on pinned memory it says it is: a chunk size it cannot hold enough
    // of is refused here, not rounded up.
    crate::pool::check_budget(opts.pool_bytes, opts.chunk_size)
        .map_err(|why| PushError::BadInput(format!("{why} (--pool-mb, --chunk-size)")))?;
    if opts.encrypt && opts.key.is_none() && opts.tls.is_none() {
        return Err(PushError::BadInput(
            "--encrypt needs a cluster key (--key-file) or mutual TLS (--tls-cert, --tls-key, --tls-ca): each \
             hop's key comes from its authentication"
                .into(),
        ));
    }
    if opts.encrypt && opts.transport == Transport::Rdma {
        return Err(PushError::BadInput(
            "--encrypt covers TCP hops only (RDMA writes land in the replica's memory as they are): \
             use --transport tcp or auto with --encrypt"
                .into(),
        ));
    }
    Ok(())
}

fn run_push(
    manifest: Manifest,
    files: Vec<Option<SourceData>>,
    wants: Vec<Option<Vec<u32>>>,
    opts: &PushOptions,
    progress: Option<&Progress>,
    start: Instant,
    manifest_seconds: f64,
) -> Result<PushReport, PushError> {
    let (mut bytes, file_count, chunks) = (manifest.total_bytes(), manifest.file_count(), manifest.chunk_count());
    if let Some(p) = progress {
        use std::sync::atomic::Ordering::Relaxed;
        p.total_bytes.store(bytes, Relaxed);
        p.total_chunks.store(chunks, Relaxed);
    }

    // Mapping and pinning the pool takes tens of milliseconds: do it while the chain connects.
    let (pool_bytes, chunk_size) = (opts.pool_bytes, manifest.chunk_size());
    let pool = std::thread::Builder::new()
        .name("shardcast-pool".into())
        .spawn(move || {
            let t = Instant::now();
            let pool = Pool::with_budget(pool_bytes, chunk_size);
            tracing::debug!(ms = t.elapsed().as_secs_f64() * 1e3, "pool mapped and pinned");
            pool
        })
        .map_err(|e| PushError::Local { context: "cannot start a thread".into(), source: e })?;

    let first = opts.to[0].clone();
    let (mut stream, secret) = connect(&first, opts.connect_timeout, opts.key.as_ref(), opts.tls.as_deref())
        .map_err(|error| PushError::Node { node: first.clone(), error })?;
    let hello = Hello {
        name: opts.name.clone(),
        version: opts.version,
        mode: opts.mode,
        keep: opts.keep,
        flags: wire::HelloFlags::default()
            .with(wire::HelloFlags::REPAIR, opts.repair && opts.mode == Mode::Sync)
            .with(wire::HelloFlags::ENCRYPT, opts.encrypt),
        // Encrypted chunks travel over TCP (`auto` would take RDMA on a hardware RNIC).
        transport: if opts.encrypt { Transport::Tcp } else { opts.transport },
        you: first.clone(),
        downstream: opts.to[1..].to_vec(),
        manifest: manifest.clone(),
        wants: wants.clone(),
    };
    // Every node validates, reserves and connects onward before any chunk moves: the whole
    // chain's answer takes up to one connect timeout per hop.
    let chain_timeout = opts.connect_timeout * (opts.to.len() as u32 + 1);
    let accept = match handshake(&mut stream, &hello, chain_timeout, secret.as_ref()) {
        Ok(payload) => payload,
        Err(reports) => {
            let r = reports.into_iter().find(|r| r.outcome != Outcome::Published).unwrap_or_else(|| {
                ReplicaReport::failed(&first, NodeError::new(ErrorKind::Protocol, "refused without a reason"))
            });
            let Outcome::Failed(error) = r.outcome else { unreachable!("filtered above") };
            return Err(PushError::Node { node: r.node, error });
        }
    };
    // A routed push reads and sends only the chunks some replica wants and does not hold yet.
    let route = if wants.is_empty() {
        None
    } else {
        let haves = wire::decode_haves(&accept, chunks).ok().filter(|h| h.len() == opts.to.len()).ok_or_else(|| {
            PushError::Node {
                node: first.clone(),
                error: NodeError::new(ErrorKind::Protocol, "bad ACCEPT: no valid list of held chunks"),
            }
        })?;
        let r = Route::for_position(&crate::route::needs(&manifest, &wants, &haves), 0);
        bytes = (0..chunks).filter(|&q| r.onward(q)).map(|q| u64::from(manifest.chunk(q).expect("in range").len)).sum();
        if let Some(p) = progress {
            p.total_bytes.store(bytes, std::sync::atomic::Ordering::Relaxed);
        }
        Some(r)
    };

    let cfg = SessionConfig {
        pool_bytes: opts.pool_bytes,
        io: opts.io,
        idle_timeout: opts.idle_timeout,
        hop_timeout: opts.hop_timeout,
        verify: true,
        // The primary reads whole chunks; only relays cut through.
        piece_bytes: 0,
    };
    tracing::debug!(ms = start.elapsed().as_secs_f64() * 1e3, "chain accepted");
    let pool = pool
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the pool set-up thread panicked")))
        .map_err(|e| PushError::Local { context: "cannot set up the buffer pool".into(), source: e })?;
    // The first hop's transport (the replicas negotiate the hops after it themselves).
    let dn_link = crate::rdma::offer(&mut stream, "primary", &first, hello.transport, &opts.rdma, &pool)
        .map_err(|(node, error)| PushError::Node { node, error })?;
    let sealer = match (opts.encrypt, &secret) {
        (true, Some(s)) => Some(crate::crypt::Sealer::new(s)),
        _ => None,
    };
    let session = Session::new(
        Role::Primary,
        "",
        opts.to.clone(),
        manifest,
        Local::Source(files),
        None,
        Some(stream.as_raw_fd()),
        cfg,
        progress,
        pool,
        None,
        (None, dn_link),
    );
    let session = match route {
        Some(r) => session.with_route(r, None),
        None => session,
    }
    .with_crypt(None, sealer)
    .with_macs(None, secret);
    tracing::debug!(
        io = session.io_name(),
        pinned = session.pool_locked(),
        ms = start.elapsed().as_secs_f64() * 1e3,
        "streaming"
    );
    if let Some(p) = progress {
        p.streaming.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let end = session.run();
    drop(stream);
    let replicas = match end {
        SessionEnd::Finished(reports) => reports,
        SessionEnd::Aborted(error) if error.kind == ErrorKind::Source => {
            return Err(PushError::Node { node: "primary".into(), error });
        }
        SessionEnd::Aborted(error) => return Err(PushError::Node { node: first, error }),
        SessionEnd::UpstreamLost(why) => unreachable!("the primary has no upstream ({why})"),
    };
    Ok(PushReport {
        name: opts.name.clone(),
        version: opts.version,
        bytes,
        files: file_count,
        chunks,
        seconds: start.elapsed().as_secs_f64(),
        manifest_seconds,
        required: required(opts, replicas.len()),
        replicas,
    })
}

/// Opens every source file that has chunks (`paths`: entry index and path of each file).
fn open_sources(manifest: &Manifest, paths: Vec<(usize, PathBuf)>) -> Result<Vec<Option<SourceData>>, PushError> {
    let mut files: Vec<Option<SourceData>> = (0..manifest.entries().len()).map(|_| None).collect();
    for (i, path) in paths {
        if manifest.entries()[i].size == 0 {
            continue;
        }
        let f = File::open(&path)
            .map_err(|err| PushError::Source(crate::error::ManifestError::Source { path, source: err }))?;
        files[i] = Some(SourceData::File(f));
    }
    Ok(files)
}

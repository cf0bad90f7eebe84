//! The primary side of a push: describe the source, set up the chain, stream, collect reports.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::credentials::Auth;
use crate::error::{ErrorKind, ManifestError, NodeError, PushError};
use crate::hop::{Hop, LanePath};
use crate::manifest::{DEFAULT_CHUNK, Manifest};
use crate::pool::Pool;
use crate::proto::Role;
use crate::proto::repair::{Attempted, Failed, Repair, Step, Why};
use crate::proto::route::Route;
use crate::session::{Local, MemoryData, Progress, Session, SessionConfig, SessionEnd, SourceData};
use crate::store::{BaseChunk, check_name};
use crate::sys::io::IoChoice;
use crate::transport::Transport;
use crate::wire::{self, Hello, Mode, Outcome, ReplicaReport};

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
    /// How every hop authenticates: a cluster key (`--key-file`), mutual TLS (`--tls-cert`,
    /// `--tls-key`, `--tls-ca`) or not at all.
    pub auth: Auth,
    /// Encrypt chunks on every hop (AES-256-GCM, per-hop keys from the authentication; needs
    /// `auth`, and means TCP on every hop).
    pub encrypt: bool,
    /// Compress chunks (`--compress`): each once here, forwarded as they are, decompressed and
    /// checked at every replica.
    pub compress: crate::compress::Compress,
    /// The zstd level (None: `compress::DEFAULT_LEVEL`).
    pub compress_level: Option<i32>,
    /// Lanes per hop (`--lanes R`): each hop of the chain is R TCP connections; chunks go on
    /// the lane with room at the primary and keep their lane down the chain.
    pub lanes: u8,
    /// This node's rails (`push --rail ADDR`): the local addresses the first hop's lanes bind
    /// to, lane k to `rails[k mod R]` (lane 0, the hop's first connection, to `rails[0]`);
    /// empty: the kernel picks.
    pub rails: Vec<std::net::IpAddr>,
    /// XOR deltas (`--delta-base DIR`): the previous version of the source, laid out like it
    /// (a directory, or a file of the same name). A chunk whose replicas all hold, at the same
    /// path and index, the same bytes as this base's chunk goes as the compressed XOR of the
    /// two; the push is incremental (routed). The first attempt only: a repair sends whole
    /// chunks.
    pub delta_base: Option<PathBuf>,
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
            auth: Auth::None,
            encrypt: false,
            compress: crate::compress::Compress::Off,
            compress_level: None,
            lanes: 1,
            rails: Vec::new(),
            delta_base: None,
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
    /// Replicas that already held this version with the same manifest: reported published,
    /// they took no data.
    pub already_held: Vec<String>,
    /// What the chunks sent took on the wire to the first replica against their size (the
    /// first attempt of the push; all raw unless it compresses).
    pub coded: crate::compress::CodedBytes,
    /// Chunks sent on each lane of the first hop (`--lanes`; one entry per lane; empty when
    /// no chunk moved).
    pub lane_chunks: Vec<u64>,
    /// The first hop's lanes as connected, lane 0 first: (local address, peer address) of
    /// each (empty when the push did not stream).
    pub lane_addrs: Vec<(String, String)>,
    /// The transport each lane of the first hop negotiated, lane 0 first (`rdma` or `tcp`;
    /// empty when the push did not stream).
    pub lane_transports: Vec<String>,
    /// Times the chain was repaired mid-push: re-formed without a replica that was lost (died,
    /// its link broke, or it stalled past `--hop-timeout`), the others resuming.
    pub repairs: u32,
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

/// Pushes `source` (a directory or a file) to the chain `opts.to`.
///
/// Returns a report when the chain ran to its end (check [`PushReport::ok`]), and an error when
/// the push could not start (bad source, unreachable or refusing replica) or the first replica
/// could not report at all.
pub fn push(source: &Path, opts: &PushOptions, progress: Option<&Progress>) -> Result<PushReport, PushError> {
    attempts(opts, |o, pinned| push_once(source, o, progress, pinned))
}

/// Runs a push's attempts through [`with_repair`], as [`push`] and [`push_memory`] both do.
/// Deltas need the have-set exchange of a routed push; an attempt after chunks moved (a repair)
/// sends whole chunks, so a delta refused for its base is never sent as a delta again.
fn attempts(
    opts: &PushOptions,
    mut once: impl FnMut(&PushOptions, &mut Option<Manifest>) -> Result<PushReport, Failure>,
) -> Result<PushReport, PushError> {
    let opts = &PushOptions { incremental: opts.incremental || opts.delta_base.is_some(), ..opts.clone() };
    with_repair(opts, |o, pinned| {
        let o = &PushOptions { delta_base: o.delta_base.clone().filter(|_| pinned.is_none()), ..o.clone() };
        once(o, pinned)
    })
}

/// Why an attempt failed, and whether that was before any chunk left the primary (the chain
/// did not form: a replica unreachable, or a relay that could not reach the next one). Such a
/// failure can be retried without the node it names and sends nothing twice.
#[derive(Debug)]
struct Failure {
    error: PushError,
    at_start: bool,
    /// The node the error names already holds this version, with the same manifest: it is
    /// published there and takes no data (the chain is formed again without it).
    held: bool,
}

impl From<PushError> for Failure {
    fn from(error: PushError) -> Self {
        Self { error, at_start: false, held: false }
    }
}

impl Failure {
    fn at_start(error: PushError) -> Self {
        Self { error, at_start: true, held: false }
    }
}

impl From<ManifestError> for Failure {
    fn from(error: ManifestError) -> Self {
        PushError::from(error).into()
    }
}

/// One attempt of a push from files. `pinned`: the digests of the push's first pass, which a
/// repair keeps to (set by the first attempt that streamed).
fn push_once(
    source: &Path,
    opts: &PushOptions,
    progress: Option<&Progress>,
    pinned: &mut Option<Manifest>,
) -> Result<PushReport, Failure> {
    let start = Instant::now();
    check_options(opts)?;
    let (mut manifest, paths) = Manifest::scan(source, opts.chunk_size)?;
    if opts.incremental && pinned.is_none() {
        manifest.hash(&paths)?;
    }
    let sources = open_sources(&manifest, paths)?;
    if let Some(first) = pinned.as_ref() {
        manifest = keep_digests(&manifest, first, &sources)?;
    }
    let manifest_seconds = start.elapsed().as_secs_f64();
    run_push(manifest, sources, everyone(opts), opts, progress, (start, manifest_seconds), pinned)
}

/// A repair pushes against the first pass's digests (`first`), not against what the source
/// holds now: replicas of one version must never get different bytes. `now` is the source's
/// plan as scanned (or built) for the repair: it must list the same entries with the same
/// sizes. Chunks the first pass never read get their digests now; a chunk it read that reads
/// differently now makes the repair fail naming the file (checked as it is read).
fn keep_digests(now: &Manifest, first: &Manifest, sources: &[Option<SourceData>]) -> Result<Manifest, Failure> {
    let changed = |path: &str, what: &str| -> Failure {
        PushError::Node {
            node: "primary".into(),
            error: NodeError::new(
                ErrorKind::Source,
                format!(
                    "source {path} changed during the push ({what}); the replicas repaired would get other bytes \
                     than those already sent: push it again as a new version, and do not change a source until \
                     its push returns"
                ),
            ),
        }
        .into()
    };
    if now.chunk_size() != first.chunk_size() || now.entries().len() != first.entries().len() {
        return Err(changed(first.entries().first().map_or("", |e| e.path.as_str()), "its files differ"));
    }
    for (a, b) in now.entries().iter().zip(first.entries()) {
        if a.path != b.path || a.kind != b.kind || a.size != b.size {
            return Err(changed(&b.path, "its size or kind differs"));
        }
    }
    let mut pinned = first.clone();
    for seq in 0..pinned.chunk_count() {
        let c = pinned.chunk(seq).expect("in range");
        if c.digest != 0 {
            continue;
        }
        let path = &pinned.entries()[c.entry].path;
        let d = match &sources[c.entry] {
            Some(SourceData::File(f)) => {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; c.len as usize];
                f.read_exact_at(&mut buf, c.offset).map_err(|e| {
                    Failure::from(PushError::Node {
                        node: "primary".into(),
                        error: NodeError::new(ErrorKind::Source, format!("cannot read source file {path}: {e}")),
                    })
                })?;
                crate::manifest::digest(&buf)
            }
            Some(SourceData::Memory(m)) => {
                crate::manifest::digest(&(**m).as_ref()[c.offset as usize..c.offset as usize + c.len as usize])
            }
            None => return Err(changed(path, "it has no data")),
        };
        pinned.set_digest(seq, d);
    }
    Ok(pinned)
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
    // A replica that already holds its part of this version (same manifest) is published there
    // and left out; the chain is formed again without it.
    let (mut current, mut wants, mut held) = (opts.clone(), wants, Vec::new());
    loop {
        let sources = open_sources(&manifest, paths.clone())?;
        match run_push(manifest.clone(), sources, wants.clone(), &current, progress, (start, 0.0), &mut None) {
            Err(Failure { error: PushError::Node { node, .. }, held: true, .. }) if current.to.contains(&node) => {
                let i = current.to.iter().position(|n| *n == node).expect("contained");
                current.to.remove(i);
                wants.remove(i);
                held.push(node);
                if current.to.is_empty() {
                    return Ok(PushReport {
                        name: opts.name.clone(),
                        version: opts.version,
                        bytes: 0,
                        files: 0,
                        chunks: 0,
                        seconds: start.elapsed().as_secs_f64(),
                        manifest_seconds: 0.0,
                        replicas: opts
                            .to
                            .iter()
                            .map(|n| ReplicaReport { node: n.clone(), outcome: Outcome::Published })
                            .collect(),
                        required: required(opts, opts.to.len()),
                        already_held: held,
                        coded: Default::default(),
                        lane_chunks: Vec::new(),
                        lane_addrs: Vec::new(),
                        lane_transports: Vec::new(),
                        repairs: 0,
                    });
                }
            }
            Err(f) => return Err(f.error),
            Ok(mut r) if !held.is_empty() => {
                let mut got: std::collections::HashMap<String, Outcome> =
                    r.replicas.drain(..).map(|x| (x.node, x.outcome)).collect();
                r.replicas = opts
                    .to
                    .iter()
                    .map(|n| ReplicaReport { node: n.clone(), outcome: got.remove(n).unwrap_or(Outcome::Published) })
                    .collect();
                r.required = required(opts, opts.to.len());
                r.already_held = held;
                return Ok(r);
            }
            Ok(r) => return Ok(r),
        }
    }
}

/// Pushes buffers held in memory, each published as the file at its relative path (nested paths
/// get their directories), without writing them anywhere on the primary first.
///
/// The bytes are copied chunk by chunk into the pinned pool as the chain takes them, so the
/// primary's memory does not grow with their size. The buffers must not change until the push
/// returns: a repair reads them again, checks them against the first pass's digests and fails
/// the repaired replicas naming the file when they differ (so that one version never has two
/// contents).
pub fn push_memory(
    files: Vec<(String, MemoryData)>,
    opts: &PushOptions,
    progress: Option<&Progress>,
) -> Result<PushReport, PushError> {
    attempts(opts, |o, pinned| push_memory_once(files.clone(), o, progress, pinned))
}

fn push_memory_once(
    files: Vec<(String, MemoryData)>,
    opts: &PushOptions,
    progress: Option<&Progress>,
    pinned: &mut Option<Manifest>,
) -> Result<PushReport, Failure> {
    let start = Instant::now();
    check_options(opts)?;
    if files.is_empty() {
        return Err(PushError::BadInput("no buffers to push".into()).into());
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
    if let Some(first) = pinned.as_ref() {
        manifest = keep_digests(&manifest, first, &sources)?;
    } else if opts.incremental {
        for seq in 0..manifest.chunk_count() {
            let c = manifest.chunk(seq).expect("in range");
            let Some(SourceData::Memory(m)) = &sources[c.entry] else { unreachable!("buffers only") };
            let bytes = &(**m).as_ref()[c.offset as usize..c.offset as usize + c.len as usize];
            manifest.set_digest(seq, crate::manifest::digest(bytes));
        }
    }
    run_push(manifest, sources, everyone(opts), opts, progress, (start, 0.0), pinned)
}

/// Runs `attempt` with `opts`, then, while replicas were cut off by a replica that died (or
/// whose link broke), again with the cut-off ones only: an incremental push, so each of them
/// resumes from the chunks it had journaled and only the rest travels. The dead replica is not
/// waited for; it is reported with its cause. Replicas in the final report keep the chain order.
///
/// A replica that cannot be reached when the chain forms (connect refused or timed out, or its
/// connection lost before it answered HELLO; at the primary's own connect or at a relay's
/// onward one) is treated the same way: it is reported `unreachable` and the chain is formed
/// again at once without it. No chunk moved yet, so that retry is the same push, not a repair.
/// A deliberate refusal (`version_exists`, `unauthorized`, `busy`, ...) still fails the push.
fn with_repair(
    opts: &PushOptions,
    mut attempt: impl FnMut(&PushOptions, &mut Option<Manifest>) -> Result<PushReport, Failure>,
) -> Result<PushReport, PushError> {
    let start = Instant::now();
    // The digests of the first attempt that streamed: every repair pushes against them.
    let mut pinned = None;
    let mut repair = Repair::new(opts.to.clone(), opts.incremental, opts.repair, opts.min_replicas.is_some());
    let mut current = opts.clone();
    // The first report: the push's totals (bytes, files, chunks) are the first pass's.
    let mut base: Option<PushReport> = None;
    let mut repairs = 0;
    let mut result = attempt(opts, &mut pinned);
    loop {
        let step = match &result {
            Ok(r) => {
                base.get_or_insert_with(|| r.clone());
                repair.next(Attempted::Reported(&r.replicas))
            }
            Err(f) => {
                let whole = NodeError::new(f.error.kind(), f.error.to_string());
                let node = match &f.error {
                    PushError::Node { node, error } => Some((node.as_str(), error)),
                    _ => None,
                };
                repair.next(Attempted::Failed(Failed { node, error: &whole, at_start: f.at_start, held: f.held }))
            }
        };
        match step {
            Step::Stop => break,
            Step::Attempt(Why::Held(node)) => {
                tracing::info!("{node} already holds {}@{}: going on without it", opts.name, opts.version);
            }
            Step::Attempt(Why::AskRouted) => {}
            Step::Attempt(Why::LeftOut(node, error)) => {
                tracing::warn!("{node} cannot be reached: going on without it ({error})");
            }
            Step::Attempt(Why::Repair(nodes)) => {
                repairs += 1;
                tracing::warn!("repairing the chain: going on with {} (resuming what each holds)", nodes.join(","));
            }
        }
        current.to = repair.chain().to_vec();
        current.incremental = repair.incremental();
        result = attempt(&current, &mut pinned);
    }
    if let Ok(r) = &result {
        base.get_or_insert_with(|| r.clone());
    }
    let end = repair.finish(result.as_ref().ok().map(|r| r.replicas.as_slice()));
    if end.nothing_sent {
        // Every replica already held it: nothing to send.
        base.get_or_insert_with(|| PushReport {
            name: opts.name.clone(),
            version: opts.version,
            bytes: 0,
            files: 0,
            chunks: 0,
            seconds: 0.0,
            manifest_seconds: 0.0,
            replicas: Vec::new(),
            required: 0,
            already_held: Vec::new(),
            coded: Default::default(),
            lane_chunks: Vec::new(),
            lane_addrs: Vec::new(),
            lane_transports: Vec::new(),
            repairs: 0,
        });
    }
    let Some(mut report) = base else {
        // Only replicas that were down, and a last attempt that failed: that failure stands.
        return result.map_err(|f| f.error);
    };
    report.replicas = end.replicas;
    report.seconds = start.elapsed().as_secs_f64();
    report.required = required(opts, opts.to.len());
    report.already_held = end.already_held;
    report.repairs = repairs;
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
    if opts.encrypt && opts.auth.is_none() {
        return Err(PushError::BadInput(
            "--encrypt needs a cluster key (--key-file) or mutual TLS (--tls-cert, --tls-key, --tls-ca): each \
             hop's key comes from its authentication"
                .into(),
        ));
    }
    if opts.lanes == 0 || opts.lanes > wire::MAX_LANES {
        return Err(PushError::BadInput(format!("--lanes {}: from 1 to {}", opts.lanes, wire::MAX_LANES)));
    }
    super::lanes::check_rails(&opts.rails, "--rail").map_err(PushError::BadInput)?;
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
    (start, manifest_seconds): (Instant, f64),
    pinned: &mut Option<Manifest>,
) -> Result<PushReport, Failure> {
    let (mut bytes, file_count, chunks) = (manifest.total_bytes(), manifest.file_count(), manifest.chunk_count());
    if let Some(p) = progress {
        use std::sync::atomic::Ordering::Relaxed;
        p.total_bytes.store(bytes, Relaxed);
        p.total_chunks.store(chunks, Relaxed);
    }

    // Mapping and pinning the pool takes tens of milliseconds: do it while the chain connects.
    let pool = spawn_pool(opts.pool_bytes, manifest.chunk_size())?;
    let first = opts.to[0].clone();
    let mut hop =
        super::lanes::dial_chain(&first, &opts.rails, opts.connect_timeout, (opts.auth.key(), opts.auth.tls()))
            .map_err(|error| Failure::at_start(PushError::Node { node: first.clone(), error }))?;
    let hello = hello_for(opts, &manifest, &wants);
    // Every node validates, reserves and connects onward before any chunk moves: the whole
    // chain's answer takes up to one connect timeout per hop.
    let chain_timeout = opts.connect_timeout * (opts.to.len() as u32 + 1);
    let accept = hop.handshake(&hello, chain_timeout).map_err(|reports| refused_at_start(opts, reports))?;
    let (accept, token) = wire::split_lane_token(accept, opts.lanes).ok_or_else(|| {
        let error = NodeError::new(ErrorKind::Protocol, "ACCEPT without the token of the push's lanes");
        PushError::Node { node: first.clone(), error }
    })?;
    // A routed push reads and sends only the chunks some replica wants and does not hold yet.
    let (route, deltas) = primary_route(&accept, opts, &manifest, &wants)?;
    if let Some(r) = &route {
        bytes = (0..chunks).filter(|&q| r.onward(q)).map(|q| u64::from(manifest.chunk(q).expect("in range").len)).sum();
        if let Some(p) = progress {
            p.total_bytes.store(bytes, std::sync::atomic::Ordering::Relaxed);
        }
    }

    tracing::debug!(ms = start.elapsed().as_secs_f64() * 1e3, "chain accepted");
    let pool = pool
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the pool set-up thread panicked")))
        .map_err(|e| PushError::Local { context: "cannot set up the buffer pool".into(), source: e })?;
    // The first hop's transport (the replicas negotiate the hops after it themselves).
    let dn_link = hop
        .offer_rdma("primary", hello.transport, &opts.rdma.for_lane(0), &pool)
        .map_err(|(node, error)| PushError::Node { node, error })?;
    let mut lanes = dial_lanes(&first, opts, token, &super::lanes::path_of(&hop))?;
    // Each further lane negotiates its own transport on its own connection, like lane 0 above.
    let lane_links = lanes
        .iter_mut()
        .zip(1..)
        .map(|(l, k)| l.offer_rdma("primary", hello.transport, &opts.rdma.for_lane(k), &pool))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|(node, error)| PushError::Node { node, error })?;
    let lane_transports = std::iter::once(dn_link.is_some())
        .chain(lane_links.iter().map(Option::is_some))
        .map(|rdma| if rdma { "rdma" } else { "tcp" }.to_owned())
        .collect();
    let lane_addrs = std::iter::once(&hop).chain(&lanes).map(Hop::addrs).collect();
    let lane_fds = lanes.iter().map(|h| (h.stream.as_raw_fd(), h.secret.clone())).collect();
    let Hop { stream, secret, .. } = hop;
    let cfg = primary_config(opts, route, deltas, secret, lane_fds).lane_links(Vec::new(), lane_links);
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
    tracing::debug!(
        io = session.io_name(),
        pinned = session.pool_locked(),
        ms = start.elapsed().as_secs_f64() * 1e3,
        "streaming"
    );
    if let Some(p) = progress {
        p.streaming.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    // The session counts every chunk it stamps (`coded`), compressed or not.
    let (end, streamed, coded, lane_chunks) = session.run_keeping_manifest();
    drop(lanes);
    drop(stream);
    // Chunks moved: whatever a later attempt of this push sends must match what was read now.
    if pinned.is_none() {
        *pinned = Some(streamed);
    }
    let replicas = chain_reports(end, first)?;
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
        already_held: Vec::new(),
        coded,
        lane_chunks,
        lane_addrs,
        lane_transports,
        repairs: 0,
    })
}

/// The primary's session settings: the push's options, its `route` and `deltas`, and the first
/// hop's `secret` (MACs, and sealing when the push encrypts) and further lanes.
fn primary_config(
    opts: &PushOptions,
    route: Option<Route>,
    deltas: Option<Vec<crate::store::BaseChunk>>,
    secret: Option<crate::crypt::SessionSecret>,
    lane_fds: Vec<(std::os::fd::RawFd, Option<crate::crypt::SessionSecret>)>,
) -> SessionConfig {
    let sealer = secret.as_ref().filter(|_| opts.encrypt).map(crate::crypt::Sealer::new);
    SessionConfig::default()
        .pool_bytes(opts.pool_bytes)
        .io(opts.io)
        .idle_timeout(opts.idle_timeout)
        .hop_timeout(opts.hop_timeout)
        .verify(true)
        // The primary reads whole chunks; only relays cut through.
        .piece_bytes(0)
        .route(route, None)
        .crypt(None, sealer)
        .macs(None, secret)
        .lanes(Vec::new(), lane_fds)
        .compress(opts.compress, opts.compress_level)
        .deltas(deltas)
}

/// The first hop's further lanes (1..R), each authenticated on its own (`node::lanes`) and
/// joined to the push with the token from the first replica's ACCEPT, on the rails it announced.
fn dial_lanes(
    first: &str,
    opts: &PushOptions,
    offer: Option<wire::LaneOffer>,
    control: &LanePath,
) -> Result<Vec<Hop>, PushError> {
    let Some(offer) = offer.filter(|_| opts.lanes > 1) else { return Ok(Vec::new()) };
    super::lanes::remember_rails(first, &offer.rails);
    let paths = super::lanes::lane_paths(first, &offer.rails, &opts.rails, opts.lanes);
    let auth = (opts.auth.key(), opts.auth.tls());
    super::lanes::open_lanes(first, &paths, control, opts.connect_timeout, auth, offer.token)
        .map_err(|error| PushError::Node { node: first.to_owned(), error })
}

/// The replicas' reports of a session that ran to the end, or why it did not (`first`: the
/// first replica, which reports for the chain when the session aborted).
fn chain_reports(end: SessionEnd, first: String) -> Result<Vec<ReplicaReport>, Failure> {
    match end {
        SessionEnd::Finished(reports) => Ok(reports),
        SessionEnd::Aborted(error) if error.kind == ErrorKind::Source => {
            Err(PushError::Node { node: "primary".into(), error }.into())
        }
        SessionEnd::Aborted(error) => Err(PushError::Node { node: first, error }.into()),
        SessionEnd::UpstreamLost { why, .. } => unreachable!("the primary has no upstream ({why})"),
    }
}

/// Maps and pins the pool on a thread of its own, so that it is ready when the chain is.
fn spawn_pool(pool_bytes: usize, chunk_size: u32) -> Result<std::thread::JoinHandle<std::io::Result<Pool>>, PushError> {
    std::thread::Builder::new()
        .name("shardcast-pool".into())
        .spawn(move || {
            let t = Instant::now();
            let pool = Pool::with_budget(pool_bytes, chunk_size);
            tracing::debug!(ms = t.elapsed().as_secs_f64() * 1e3, "pool mapped and pinned");
            pool
        })
        .map_err(|e| PushError::Local { context: "cannot start a thread".into(), source: e })
}

/// The HELLO the primary sends down the chain.
fn hello_for(opts: &PushOptions, manifest: &Manifest, wants: &[Option<Vec<u32>>]) -> Hello {
    Hello {
        name: opts.name.clone(),
        version: opts.version,
        mode: opts.mode,
        keep: opts.keep,
        flags: wire::HelloFlags::default()
            .with(wire::HelloFlags::REPAIR, opts.repair && opts.mode == Mode::Sync)
            .with(wire::HelloFlags::ENCRYPT, opts.encrypt)
            .with(wire::HelloFlags::COMPRESS, opts.compress != crate::compress::Compress::Off)
            .with(wire::HelloFlags::LANES, opts.lanes > 1)
            .with(wire::HelloFlags::DELTA, opts.delta_base.is_some() && !wants.is_empty()),
        lanes: opts.lanes,
        // Encrypted chunks travel over TCP (`auto` would take RDMA on a hardware RNIC).
        transport: if opts.encrypt { Transport::Tcp } else { opts.transport },
        you: opts.to[0].clone(),
        downstream: opts.to[1..].to_vec(),
        manifest: manifest.clone(),
        wants: wants.to_vec(),
        // The replicas know the key's limits (from their ACL); the primary claims none.
        grant: wire::Grant { origin: opts.auth.key().map(|k| k.id().to_owned()).unwrap_or_default(), limits: None },
    }
}

/// The chain refused the push before it started, with these reports: "already held" when every
/// report says the version is published there, else the first refusal.
fn refused_at_start(opts: &PushOptions, reports: Vec<ReplicaReport>) -> Failure {
    // Only reports that say "published": that node already holds this version.
    if let Some(r) = reports.iter().find(|r| r.outcome == Outcome::Published)
        && reports.iter().all(|r| r.outcome == Outcome::Published)
    {
        let error = NodeError::new(
            ErrorKind::VersionExists,
            format!("{}@{} is already published there with the same manifest", opts.name, opts.version),
        );
        return Failure { error: PushError::Node { node: r.node.clone(), error }, at_start: true, held: true };
    }
    let r = reports.into_iter().find(|r| r.outcome != Outcome::Published).unwrap_or_else(|| {
        ReplicaReport::failed(&opts.to[0], NodeError::new(ErrorKind::Protocol, "refused without a reason"))
    });
    let Outcome::Failed(error) = r.outcome else { unreachable!("filtered above") };
    Failure::at_start(PushError::Node { node: r.node, error })
}

/// A routed push's route at the primary, from ACCEPT's have-sets (None: an ordinary push), and
/// on a delta push the chunks to send as deltas ([`delta_plan`]).
fn primary_route(
    accept: &[u8],
    opts: &PushOptions,
    manifest: &Manifest,
    wants: &[Option<Vec<u32>>],
) -> Result<(Option<Route>, Option<Vec<BaseChunk>>), PushError> {
    if wants.is_empty() {
        return Ok((None, None));
    }
    let (haves, bases) = wire::decode_accept(accept, manifest.chunk_count(), opts.delta_base.is_some())
        .ok()
        .filter(|(h, _)| h.len() == opts.to.len())
        .ok_or_else(|| PushError::Node {
            node: opts.to[0].clone(),
            error: NodeError::new(ErrorKind::Protocol, "bad ACCEPT: no valid list of held chunks"),
        })?;
    let needs = crate::proto::route::needs(manifest, wants, &haves);
    let deltas = match &opts.delta_base {
        Some(dir) => Some(delta_plan(dir, manifest, &needs, &bases)?),
        None => None,
    };
    Ok((Some(Route::for_position(&needs, 0)), deltas))
}

/// The chunks of a delta push that go as XOR deltas: those whose every storing node (`needs`)
/// reported the same base digest (`bases`), and whose chunk at the same path and index of
/// `base_dir` has that digest here (read and hashed now; a base that changes before it is read
/// again makes a delta the replicas refuse, and the repair sends that chunk whole).
fn delta_plan(
    base_dir: &Path,
    manifest: &Manifest,
    needs: &[crate::proto::route::ChunkSet],
    bases: &wire::Bases,
) -> Result<Vec<BaseChunk>, PushError> {
    use std::collections::HashMap;
    use std::os::unix::fs::FileExt;
    let (old, paths) = Manifest::scan(base_dir, manifest.chunk_size())
        .map_err(|e| PushError::BadInput(format!("--delta-base {}: {e}", base_dir.display())))?;
    let files: HashMap<&str, &PathBuf> = paths.iter().map(|(i, p)| (old.entries()[*i].path.as_str(), p)).collect();
    let reported: Vec<HashMap<u64, u128>> = bases.iter().map(|b| b.iter().copied().collect()).collect();
    let (mut plan, mut open, mut buf) = (Vec::new(), HashMap::new(), Vec::new());
    for q in 0..manifest.chunk_count() {
        let mut storing = needs.iter().zip(&reported).filter(|(n, _)| n.contains(q)).map(|(_, r)| r.get(&q));
        let Some(Some(&want)) = storing.next() else { continue };
        if !storing.all(|d| d == Some(&want)) {
            continue;
        }
        let c = manifest.chunk(q).expect("in range");
        let Some(&path) = files.get(manifest.entries()[c.entry].path.as_str()) else { continue };
        let file = match open.entry(path) {
            std::collections::hash_map::Entry::Occupied(f) => f.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => match File::open(path) {
                Ok(f) => v.insert(f),
                Err(e) => {
                    tracing::warn!("--delta-base {}: {e}: its chunks go whole", path.display());
                    continue;
                }
            },
        };
        buf.resize(c.len as usize, 0);
        if file.read_exact_at(&mut buf, c.offset).is_ok() && crate::manifest::digest(&buf) == want {
            plan.push(BaseChunk { seq: q, digest: want, from: path.clone(), offset: c.offset });
        }
    }
    tracing::debug!(chunks = plan.len(), "chunks go as XOR deltas");
    Ok(plan)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn report(to: &[String], outcome: impl Fn(&str) -> Outcome) -> PushReport {
        PushReport {
            name: "n".into(),
            version: 1,
            bytes: 10,
            files: 1,
            chunks: 1,
            seconds: 0.0,
            manifest_seconds: 0.0,
            replicas: to.iter().map(|n| ReplicaReport { node: n.clone(), outcome: outcome(n) }).collect(),
            required: to.len(),
            already_held: Vec::new(),
            coded: Default::default(),
            lane_chunks: Vec::new(),
            lane_addrs: Vec::new(),
            lane_transports: Vec::new(),
            repairs: 0,
        }
    }

    fn opts(min: Option<usize>) -> PushOptions {
        let mut o = PushOptions::new("n", 1, ["a", "b", "c", "d"].map(String::from).to_vec());
        o.min_replicas = min;
        o
    }

    fn node_err(node: &str, kind: ErrorKind) -> PushError {
        PushError::Node { node: node.into(), error: NodeError::new(kind, "x") }
    }

    fn statuses(r: &PushReport) -> Vec<(String, Option<ErrorKind>)> {
        r.replicas
            .iter()
            .map(|x| {
                (
                    x.node.clone(),
                    match &x.outcome {
                        Outcome::Failed(e) => Some(e.kind),
                        _ => None,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn a_replica_down_at_the_start_is_left_out_at_once_and_reported_unreachable() {
        for (dead, kind) in
            [("a", ErrorKind::Unreachable), ("c", ErrorKind::Unreachable), ("b", ErrorKind::ConnectionLost)]
        {
            let mut tried: Vec<(Vec<String>, bool)> = Vec::new();
            let r = with_repair(&opts(Some(3)), |o, _| {
                tried.push((o.to.clone(), o.incremental));
                if o.to.iter().any(|n| n == dead) {
                    Err(Failure::at_start(node_err(dead, kind)))
                } else {
                    Ok(report(&o.to, |_| Outcome::Published))
                }
            })
            .unwrap();
            let live: Vec<String> = ["a", "b", "c", "d"].into_iter().filter(|n| *n != dead).map(String::from).collect();
            // One more attempt, the same push (not a repair) without the dead one.
            assert_eq!(tried.len(), 2);
            assert_eq!(tried[1], (live, false));
            assert!(r.ok() && r.published() == 3, "{r:?}");
            for (n, k) in statuses(&r) {
                assert_eq!(k, (n == dead).then_some(ErrorKind::Unreachable), "{n}");
            }
        }
    }

    #[test]
    fn a_deliberate_refusal_at_the_start_still_fails_the_push() {
        for kind in [ErrorKind::VersionExists, ErrorKind::Unauthorized, ErrorKind::Busy] {
            let mut n = 0;
            let e = with_repair(&opts(Some(3)), |_, _| {
                n += 1;
                Err(Failure::at_start(node_err("b", kind)))
            })
            .unwrap_err();
            assert_eq!(e.kind(), kind);
            // version_exists is asked once more, routed (the replica can then compare digests).
            assert_eq!(n, if kind == ErrorKind::VersionExists { 2 } else { 1 });
        }
    }

    #[test]
    fn without_repair_or_min_replicas_a_dead_replica_fails_the_push() {
        let mut o = opts(None);
        o.repair = false;
        let e = with_repair(&o, |_, _| Err(Failure::at_start(node_err("b", ErrorKind::Unreachable)))).unwrap_err();
        assert_eq!(e.node(), Some("b"));
    }

    #[test]
    fn holders_are_published_already_held_and_the_rest_get_the_push() {
        let mut tried: Vec<(Vec<String>, bool)> = Vec::new();
        let r = with_repair(&opts(None), |o, _| {
            tried.push((o.to.clone(), o.incremental));
            // "b" and "d" hold it: a plain push is refused, a routed one answered "held".
            match o.to.iter().find(|n| *n == "b" || *n == "d") {
                Some(h) if !o.incremental => Err(Failure::at_start(node_err(h, ErrorKind::VersionExists))),
                Some(h) => Err(Failure { error: node_err(h, ErrorKind::VersionExists), at_start: true, held: true }),
                None => Ok(report(&o.to, |_| Outcome::Published)),
            }
        })
        .unwrap();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            tried,
            vec![
                (s(&["a", "b", "c", "d"]), false),
                (s(&["a", "b", "c", "d"]), true),
                (s(&["a", "c", "d"]), true),
                (s(&["a", "c"]), true),
            ]
        );
        assert!(r.complete() && r.ok(), "{r:?}");
        assert_eq!(r.already_held, s(&["b", "d"]));
    }

    #[test]
    fn when_every_replica_holds_it_nothing_is_sent_and_all_are_published() {
        let mut n = 0;
        let r = with_repair(&opts(None), |o, _| {
            n += 1;
            Err(Failure { error: node_err(&o.to[0], ErrorKind::VersionExists), at_start: true, held: true })
        })
        .unwrap();
        assert_eq!(n, 4);
        assert!(r.complete() && r.bytes == 0, "{r:?}");
        assert_eq!(r.already_held.len(), 4);
    }

    #[test]
    fn a_repair_gets_the_first_pass_digests() {
        let m = Manifest::plan_for_files(crate::wire::MIN_CHUNK, &[("f", 10)]).unwrap().0;
        let mut seen = Vec::new();
        let r = with_repair(&opts(None), |o, pinned| {
            seen.push(pinned.clone());
            if pinned.is_none() {
                *pinned = Some(m.clone());
                Ok(report(&o.to, |n| match n {
                    "b" => Outcome::Failed(NodeError::new(ErrorKind::ConnectionLost, "killed")),
                    "c" | "d" => Outcome::Failed(NodeError::new(ErrorKind::Aborted, "cut off")),
                    _ => Outcome::Published,
                }))
            } else if o.to.iter().any(|n| n == "b") {
                Err(Failure::at_start(node_err("b", ErrorKind::Unreachable)))
            } else {
                Ok(report(&o.to, |_| Outcome::Published))
            }
        })
        .unwrap();
        assert_eq!(seen.len(), 3, "b is tried once more, then left out");
        assert!(seen[1..].iter().all(|p| p.as_ref() == Some(&m)));
        assert_eq!(r.published(), 3);
        // The first real cause stands.
        assert_eq!(statuses(&r)[1], ("b".to_owned(), Some(ErrorKind::ConnectionLost)));
    }
}

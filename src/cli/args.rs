//! The command line's definitions: the flags of `shardcast` and of each subcommand, their
//! defaults, environment variables and help texts (clap derive). Nothing here runs anything.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use shardcast::parse_size;
use shardcast::transport::Transport;

// `shardcast --version`: the crate version and the commit it was built from (build.rs).
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("SHARDCAST_GIT_COMMIT"), ")");

#[derive(Parser)]
#[command(name = "shardcast", version = VERSION, about = "Replicate checkpoints and dataset shards down a chain of replicas")]
#[command(after_help = "Examples:\n  \
    shardcast serve --listen 0.0.0.0:7071 --root /data/replica\n  \
    shardcast push ./ckpt --name ckpt --version 100 --to node1:7071,node2:7071,node3:7071\n  \
    shardcast status node2:7071 --json\n  \
    shardcast verify --root /data/replica ckpt\n  \
    shardcast demo --replicas 3 --size 1GiB")]
pub(crate) struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"], env = "SHARDCAST_LOG_FORMAT")]
    pub(crate) log_format: String,
    /// A TOML file with defaults for `serve` and `push` flags ([serve] and [push] tables, keys
    /// named like the flags: `pool_mb = 64`, `to = ["a:7071", "b:7071"]`). Precedence: command
    /// line, then environment (SHARDCAST_SERVE_*, SHARDCAST_PUSH_*, SHARDCAST_RDMA_*), then this
    /// file, then the built-in defaults.
    #[arg(long, global = true, env = "SHARDCAST_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// The cluster key (a file of at least 32 secret bytes, mode 600): every connection between
    /// nodes then authenticates both ways with it (HMAC challenge-response), and a peer without
    /// it is refused before anything is staged. Same file on every node.
    #[arg(long, global = true, env = "SHARDCAST_KEY_FILE")]
    pub(crate) key_file: Option<PathBuf>,
    /// Encrypt the chunks on every hop (AES-256-GCM, each hop with its own key derived from its
    /// authentication; needs --key-file or --tls-cert, and means TCP on every hop). On `serve`: accept only
    /// pushes that encrypt.
    #[arg(long, global = true, env = "SHARDCAST_ENCRYPT")]
    pub(crate) encrypt: bool,
    /// Mutual TLS instead of a cluster key, for sites with a PKI: this node's certificate
    /// chain (PEM; valid for the address peers dial it at, for serving, and usable as a client
    /// certificate). Needs --tls-key and --tls-ca.
    #[arg(long, global = true, env = "SHARDCAST_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    pub(crate) tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, global = true, env = "SHARDCAST_TLS_KEY", requires_all = ["tls_cert", "tls_ca"])]
    pub(crate) tls_key: Option<PathBuf>,
    /// The CA certificates (PEM) every peer's certificate must chain to.
    #[arg(long, global = true, env = "SHARDCAST_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    pub(crate) tls_ca: Option<PathBuf>,
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

/// RDMA device selection, shared by `serve` and `push`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct RdmaArgs {
    /// RDMA device (e.g. mlx5_0, rxe_v0), repeatable: one per rail, in rail order (lane k uses
    /// the k-th; one device serves every lane); default: each lane takes the device with a
    /// RoCEv2 GID for the address its connection leaves from.
    #[arg(long, env = "SHARDCAST_RDMA_DEVICE", value_delimiter = ',')]
    pub(crate) rdma_device: Vec<String>,
    /// GID index on port 1 of the RDMA device, repeatable like --rdma-device (one serves every
    /// lane); default: the RoCEv2 GID of the lane's address.
    #[arg(long, env = "SHARDCAST_GID_INDEX", value_delimiter = ',')]
    pub(crate) gid_index: Vec<u8>,
    /// Let `--transport auto` take RDMA on soft-RoCE (rxe) and soft-iWARP (siw) devices too
    /// (they are slower than TCP on most hosts, so auto skips them by default).
    #[arg(long, env = "SHARDCAST_RDMA_ALLOW_SOFT")]
    pub(crate) rdma_allow_soft: bool,
}

impl RdmaArgs {
    pub(crate) fn config(self) -> shardcast::rdma::RdmaConfig {
        shardcast::rdma::RdmaConfig {
            devices: self.rdma_device,
            gid_indexes: self.gid_index,
            disabled: None,
            allow_soft: self.rdma_allow_soft,
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
    /// Run a replica: receive pushes into ROOT and relay them down the chain.
    Serve(ServeArgs),
    /// Push a directory or file as NAME@VERSION to a chain of replicas.
    Push(PushArgs),
    /// Watch a checkpoint directory and push each completed checkpoint as the next version
    /// (its step number, from the end of its name); see ARCHITECTURE.md for the conventions.
    Mirror(MirrorArgs),
    /// Stage an epoch's dataset shards: every node gets exactly the files a plan assigns it,
    /// published there as NAME@VERSION, each chunk sent only as far down the chain as needed.
    /// Plan format: `name`, `version`, `source`, optional `chunk_size`, then one `[[node]]` per
    /// replica (chain order) with `addr` and `files` (relative to source).
    Stage(StageArgs),
    /// List the shard sets and versions a replica holds.
    Status(StatusArgs),
    /// Re-hash a published version against its manifest.
    Verify(VerifyArgs),
    /// Start a local demo cluster, push a synthetic checkpoint, check every byte.
    Demo(DemoArgs),
}

// `shardcast serve`: its flags (the variant of [`Cmd`] documents the command). One field per
// flag, as clap derives them: 24, over the ~20 the code keeps to, because `serve` has that many.
#[derive(clap::Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the log says which).
    #[arg(long, default_value = "0.0.0.0:7071", env = "SHARDCAST_SERVE_LISTEN")]
    pub(crate) listen: String,
    /// A rail of this node (repeatable, rail 0 first): a local IP address, one per NIC. The
    /// rails are announced to upstream (with the serve port, listened on there too) and lane k
    /// of a hop of several (`push --lanes`) comes in on rail (k mod R) and leaves from it.
    /// Default: the listen address alone.
    #[arg(long = "rail", value_name = "ADDR", env = "SHARDCAST_SERVE_RAILS", value_delimiter = ',')]
    pub(crate) rails: Vec<std::net::IpAddr>,
    /// Directory that holds the published shard sets.
    #[arg(long, env = "SHARDCAST_SERVE_ROOT")]
    pub(crate) root: PathBuf,
    /// Versions kept per shard set name.
    #[arg(long, default_value_t = 2, env = "SHARDCAST_SERVE_KEEP")]
    pub(crate) keep: usize,
    /// Buffer pool per push, in MiB (pinned memory; bounds the node's memory use).
    #[arg(long, default_value_t = 64, env = "SHARDCAST_SERVE_POOL_MB")]
    pub(crate) pool_mb: usize,
    /// Transport this replica offers: auto (RDMA where the push allows it), tcp (never RDMA)
    /// or rdma (refuse to start without RDMA support).
    #[arg(long, default_value = "auto", env = "SHARDCAST_SERVE_TRANSPORT")]
    pub(crate) transport: Transport,
    #[command(flatten)]
    pub(crate) rdma: RdmaArgs,
    /// Give up on a push that makes no progress for this many seconds.
    #[arg(long, default_value_t = 120, env = "SHARDCAST_SERVE_IDLE_TIMEOUT")]
    pub(crate) idle_timeout: u64,
    /// A replica after this one that takes nothing for this many seconds (times the number
    /// of replicas after this one, so the nearest node decides) is reported as stalled
    /// (hung, or its link down) and the push goes on without it.
    #[arg(long, default_value_t = 10, env = "SHARDCAST_SERVE_HOP_TIMEOUT")]
    pub(crate) hop_timeout: u64,
    /// A push whose final sync (flushing what it received to disk) takes longer than this many
    /// seconds fails on this node (its disk hung, or far too slow); until then upstream waits.
    #[arg(long, default_value_t = 600, env = "SHARDCAST_SERVE_SYNC_TIMEOUT")]
    pub(crate) sync_timeout: u64,
    /// Most concurrent sessions.
    #[arg(long, default_value_t = 64, env = "SHARDCAST_SERVE_MAX_SESSIONS")]
    pub(crate) max_sessions: usize,
    /// Most concurrent connections from one peer address (a peer that opens connections
    /// and sends nothing cannot take every session).
    #[arg(long, default_value_t = 16, env = "SHARDCAST_SERVE_MAX_SESSIONS_PER_PEER")]
    pub(crate) max_sessions_per_peer: usize,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9471).
    #[arg(long, env = "SHARDCAST_SERVE_METRICS")]
    pub(crate) metrics: Option<String>,
    /// Append one JSON line per push and per refusal to this file: time, peer, key id,
    /// name, version, bytes, outcome, reason.
    #[arg(long, env = "SHARDCAST_SERVE_AUDIT_LOG")]
    pub(crate) audit_log: Option<PathBuf>,
    /// Refuse a push (as busy, with the numbers) when the pushes being received would add up
    /// to more than this many MiB (0: no limit beyond the free-disk check).
    #[arg(long, default_value_t = 0, env = "SHARDCAST_SERVE_MAX_STAGING_MB")]
    pub(crate) max_staging_mb: u64,
    /// Remove partial stagings (kept by pushes that did not finish, so that a repeat
    /// resumes) this many hours after their last chunk arrived (0: never).
    #[arg(long, default_value_t = 24, env = "SHARDCAST_SERVE_PARTIAL_MAX_AGE_HOURS")]
    pub(crate) partial_max_age_hours: u64,
    /// Keep at most this many MiB of partial stagings in all, removing the oldest first
    /// (0: no cap). Checked at start and at every push.
    #[arg(long, default_value_t = 102_400, env = "SHARDCAST_SERVE_PARTIAL_MAX_MB")]
    pub(crate) partial_max_mb: u64,
    /// More keys this replica accepts, each limited to name prefixes, to whether its
    /// versions may become `current` and to whether it may prune (TOML: [[key]] file, names,
    /// replace_current, prune). The limits hold at every replica of the chain.
    /// `--key-file` stays the key with every right (and the one used downstream).
    #[arg(long, env = "SHARDCAST_SERVE_ACL")]
    pub(crate) acl: Option<PathBuf>,
    /// A connection must finish its handshake (TLS or key authentication, then HELLO or a
    /// status request) within this many seconds in all, else it is closed; a replica also
    /// gives the chain after it this long per node to answer.
    #[arg(long, default_value_t = 5, env = "SHARDCAST_SERVE_HANDSHAKE_TIMEOUT")]
    pub(crate) handshake_timeout: u64,
    /// Most connections in their handshake at once (counted apart from sessions, so that
    /// slow or silent peers cannot take the session slots).
    #[arg(long, default_value_t = 128, env = "SHARDCAST_SERVE_MAX_HANDSHAKES")]
    pub(crate) max_handshakes: usize,
    /// Most connections in their handshake at once from one peer address.
    #[arg(long, default_value_t = 8, env = "SHARDCAST_SERVE_MAX_HANDSHAKES_PER_PEER")]
    pub(crate) max_handshakes_per_peer: usize,
    /// Longest chain a push may name, counted from this replica to the tail.
    #[arg(long, default_value_t = 16, env = "SHARDCAST_SERVE_MAX_CHAIN")]
    pub(crate) max_chain: usize,
    /// Most entries (files and directories) a pushed version may have.
    #[arg(long, default_value_t = 1_000_000, env = "SHARDCAST_SERVE_MAX_ENTRIES")]
    pub(crate) max_entries: usize,
    /// Largest manifest a push may send, in MiB (it travels in HELLO).
    #[arg(long, default_value_t = 64, env = "SHARDCAST_SERVE_MAX_MANIFEST_MB")]
    pub(crate) max_manifest_mb: u32,
    /// Refuse a version more than this far beyond the name's `current` (which only moves
    /// forward, so one huge version would pin it); 0: no limit.
    #[arg(long, default_value_t = 1 << 32, env = "SHARDCAST_SERVE_MAX_VERSION_AHEAD")]
    pub(crate) max_version_ahead: u64,
}

// `shardcast push`: its flags (the variant of [`Cmd`] documents the command).
#[derive(clap::Args)]
pub(crate) struct PushArgs {
    /// The directory (its tree) or file to push.
    pub(crate) source: PathBuf,
    /// Shard set name.
    #[arg(long, env = "SHARDCAST_PUSH_NAME")]
    pub(crate) name: String,
    /// Version (a growing number: the step or epoch).
    #[arg(long, env = "SHARDCAST_PUSH_VERSION")]
    pub(crate) version: u64,
    /// The chain: comma-separated replica addresses, first replica first.
    #[arg(long, value_delimiter = ',', required = true, env = "SHARDCAST_PUSH_TO")]
    pub(crate) to: Vec<String>,
    /// Chunk size (bytes, or with K/M/G/KiB/MiB/GiB).
    #[arg(long, default_value = "4MiB", value_parser = parse_size_u32, env = "SHARDCAST_PUSH_CHUNK_SIZE")]
    pub(crate) chunk_size: u32,
    /// sync: return when every replica (the tail last) has published; async: return when the
    /// first replica has published, the rest of the chain completes on its own (listed as
    /// "behind"; `shardcast status NODE` shows how far each is).
    #[arg(long, default_value = "sync", value_parser = ["sync", "async"], env = "SHARDCAST_PUSH_MODE")]
    pub(crate) mode: String,
    /// Transport of every hop: auto (RDMA where both ends have a hardware RNIC, else TCP),
    /// tcp, or rdma (every hop over RDMA verbs, soft-RoCE included, or fail).
    #[arg(long, default_value = "auto", env = "SHARDCAST_PUSH_TRANSPORT")]
    pub(crate) transport: Transport,
    #[command(flatten)]
    pub(crate) rdma: RdmaArgs,
    /// Buffer pool in MiB. The primary only reads ahead of its sends (a slot is free again
    /// once its send completed), so it needs less than a relay.
    #[arg(long, default_value_t = 16, env = "SHARDCAST_PUSH_POOL_MB")]
    pub(crate) pool_mb: usize,
    /// Seconds to wait for each connection and the chain's answer.
    #[arg(long, default_value_t = 10, env = "SHARDCAST_PUSH_CONNECT_TIMEOUT")]
    pub(crate) connect_timeout: u64,
    /// Give up when nothing moves for this many seconds.
    #[arg(long, default_value_t = 120, env = "SHARDCAST_PUSH_IDLE_TIMEOUT")]
    pub(crate) idle_timeout: u64,
    /// Give up on the first replica when it takes nothing for this many seconds times the
    /// number of replicas (the push then goes on without it, see --no-repair).
    #[arg(long, default_value_t = 10, env = "SHARDCAST_PUSH_HOP_TIMEOUT")]
    pub(crate) hop_timeout: u64,
    /// Versions of NAME each replica keeps once this one is published, oldest removed first,
    /// the current one never (default: each replica's `serve --keep`).
    #[arg(long, env = "SHARDCAST_PUSH_KEEP", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) keep: Option<u32>,
    /// Hash the source first, so that each replica receives only the chunks its current
    /// version of NAME does not already have (the rest it copies locally): for a checkpoint
    /// that changed in places, or a re-push after a failure.
    #[arg(long, env = "SHARDCAST_PUSH_INCREMENTAL")]
    pub(crate) incremental: bool,
    /// Succeed (exit 0) once this many replicas published; the others are reported (default:
    /// all of them).
    #[arg(long, env = "SHARDCAST_PUSH_MIN_REPLICAS", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) min_replicas: Option<u32>,
    /// Do not repair the chain: when a replica dies mid-push, fail the replicas after it
    /// instead of pushing to them again around it.
    #[arg(long, env = "SHARDCAST_PUSH_NO_REPAIR")]
    pub(crate) no_repair: bool,
    /// Compress chunks for slow links: each once here, forwarded as it is, decompressed and
    /// checked at every replica. zstd; zstd-grouped: float bytes grouped by position first
    /// (bf16/fp32 weights); auto: grouping where a sample says it helps, and only while
    /// compressing is faster than the first hop drains; off.
    #[arg(long, default_value = "off", env = "SHARDCAST_PUSH_COMPRESS")]
    pub(crate) compress: shardcast::compress::Compress,
    /// zstd level (1 fastest ... 19; default 1: on float weights the smallest once grouped).
    #[arg(long, env = "SHARDCAST_PUSH_COMPRESS_LEVEL", value_parser = clap::value_parser!(i32).range(1..=19))]
    pub(crate) compress_level: Option<i32>,
    /// Lanes per hop: each hop of the chain opens this many TCP connections; the primary hands
    /// each chunk to the lane with room, relays forward each lane on its own (1 to 16; more than
    /// 1 runs TCP lanes; with --encrypt each lane has its own keys).
    #[arg(long, default_value_t = 1, env = "SHARDCAST_PUSH_LANES", value_parser = clap::value_parser!(u8).range(1..=16))]
    pub(crate) lanes: u8,
    /// A rail of this node (repeatable, rail 0 first): the local IP address lane k of the first
    /// hop binds to is rail (k mod R); it goes to the first replica's rail (k mod R') as that
    /// replica announces them (`serve --rail`). Default: none, the kernel picks.
    #[arg(long = "rail", value_name = "ADDR", env = "SHARDCAST_PUSH_RAILS", value_delimiter = ',')]
    pub(crate) rails: Vec<std::net::IpAddr>,
    /// Send chunks as XOR deltas against the replicas' current version of NAME where they hold
    /// the same bytes as --delta-base at the same path and chunk index (zstd of the XOR; the
    /// rest whole). Implies --incremental. Needs --delta-base.
    #[arg(long, requires = "delta_base", env = "SHARDCAST_PUSH_DELTA")]
    pub(crate) delta: bool,
    /// The previous version of SOURCE on this host (a directory, or a file of the same name),
    /// laid out like it: the base of --delta.
    #[arg(long, requires = "delta", env = "SHARDCAST_PUSH_DELTA_BASE")]
    pub(crate) delta_base: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long, env = "SHARDCAST_PUSH_JSON")]
    pub(crate) json: bool,
}

// `shardcast mirror`: its flags (the variant of [`Cmd`] documents the command).
#[derive(clap::Args)]
pub(crate) struct MirrorArgs {
    /// The directory the training job saves checkpoints into.
    #[arg(long, env = "SHARDCAST_MIRROR_WATCH")]
    pub(crate) watch: PathBuf,
    /// Shard set name.
    #[arg(long, env = "SHARDCAST_MIRROR_NAME")]
    pub(crate) name: String,
    /// The chain: comma-separated replica addresses, first replica first.
    #[arg(long, value_delimiter = ',', required = true, env = "SHARDCAST_MIRROR_TO")]
    pub(crate) to: Vec<String>,
    /// A checkpoint directory is complete once it holds this file (else: once it stopped
    /// changing between two polls, for the write-then-rename convention).
    #[arg(long, env = "SHARDCAST_MIRROR_MARKER")]
    pub(crate) marker: Option<String>,
    /// Milliseconds between polls.
    #[arg(long, default_value_t = 1000, env = "SHARDCAST_MIRROR_INTERVAL_MS")]
    pub(crate) interval_ms: u64,
    /// Push what is complete now and exit (for cron or an end-of-job hook).
    #[arg(long)]
    pub(crate) once: bool,
    /// Chunk size (bytes, or with K/M/G/KiB/MiB/GiB).
    #[arg(long, default_value = "4MiB", value_parser = parse_size_u32, env = "SHARDCAST_MIRROR_CHUNK_SIZE")]
    pub(crate) chunk_size: u32,
    /// Transport of every hop: auto, tcp or rdma.
    #[arg(long, default_value = "auto", env = "SHARDCAST_MIRROR_TRANSPORT")]
    pub(crate) transport: Transport,
    /// Checkpoints each replica keeps: the last K mirrored steps, older ones removed once a
    /// newer one is published (default: each replica's `serve --keep`).
    #[arg(long, env = "SHARDCAST_MIRROR_KEEP", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) keep: Option<u32>,
    /// Send each replica only the chunks its previous checkpoint does not have (hashes each
    /// checkpoint first): worth it when checkpoints change in places.
    #[arg(long, env = "SHARDCAST_MIRROR_INCREMENTAL")]
    pub(crate) incremental: bool,
    /// Compress chunks (as `push --compress`: auto, off, zstd, zstd-grouped).
    #[arg(long, default_value = "off", env = "SHARDCAST_MIRROR_COMPRESS")]
    pub(crate) compress: shardcast::compress::Compress,
    /// Send each checkpoint as XOR deltas against the previous one mirrored (still in --watch:
    /// as `push --delta --delta-base PREVIOUS`; implies --incremental).
    #[arg(long, env = "SHARDCAST_MIRROR_DELTA")]
    pub(crate) delta: bool,
}

// `shardcast stage`: its flags (the variant of [`Cmd`] documents the command).
#[derive(clap::Args)]
pub(crate) struct StageArgs {
    /// The plan (TOML).
    #[arg(long, env = "SHARDCAST_STAGE_PLAN")]
    pub(crate) plan: PathBuf,
    /// Transport of every hop: auto, tcp or rdma.
    #[arg(long, default_value = "auto", env = "SHARDCAST_STAGE_TRANSPORT")]
    pub(crate) transport: Transport,
    #[command(flatten)]
    pub(crate) rdma: RdmaArgs,
    /// Seconds to wait for each connection and the chain's answer.
    #[arg(long, default_value_t = 10, env = "SHARDCAST_STAGE_CONNECT_TIMEOUT")]
    pub(crate) connect_timeout: u64,
    /// Versions of NAME each node keeps (default: each node's `serve --keep`).
    #[arg(long, env = "SHARDCAST_STAGE_KEEP", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) keep: Option<u32>,
    /// Print one JSON object instead of text.
    #[arg(long, env = "SHARDCAST_STAGE_JSON")]
    pub(crate) json: bool,
}

// `shardcast status`: its flags (the variant of [`Cmd`] documents the command).
#[derive(clap::Args)]
pub(crate) struct StatusArgs {
    /// The replica's address.
    pub(crate) addr: String,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

// `shardcast verify`: its flags (the variant of [`Cmd`] documents the command).
#[derive(clap::Args)]
pub(crate) struct VerifyArgs {
    /// The replica's root directory.
    #[arg(long)]
    pub(crate) root: PathBuf,
    /// Shard set name.
    pub(crate) name: String,
    /// Version (default: the current one).
    #[arg(long)]
    pub(crate) version: Option<u64>,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

// `shardcast demo`: its flags (the variant of [`Cmd`] documents the command).
#[derive(clap::Args)]
pub(crate) struct DemoArgs {
    /// Number of replicas.
    #[arg(long, default_value_t = 3)]
    pub(crate) replicas: usize,
    /// Size of the synthetic checkpoint.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub(crate) size: u64,
    /// Work directory (default: a temporary one, removed afterwards).
    #[arg(long)]
    pub(crate) dir: Option<PathBuf>,
    /// Chunk size.
    #[arg(long, default_value = "4MiB", value_parser = parse_size_u32)]
    pub(crate) chunk_size: u32,
}

/// A chunk size (`4MiB`, `65536`, ...) within the protocol's bounds.
fn parse_size_u32(s: &str) -> Result<u32, String> {
    let n = parse_size(s)?;
    let (min, max) = (shardcast::wire::MIN_CHUNK, shardcast::wire::MAX_CHUNK);
    if n < u64::from(min) || n > u64::from(max) {
        return Err(format!("chunk size must be between {} KiB and {} MiB", min >> 10, max >> 20));
    }
    Ok(n as u32)
}

//! The `shardcast` command line: parses flags, calls the library, maps outcomes to exit codes.
//!
//! Exit codes (documented in the README):
//! 0 success; 1 the push failed (a replica refused, was unreachable, failed or was lost; or
//! `verify` found a difference); 2 usage error or bad input (flags, source path, names);
//! 3 some replicas published but not all.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::json;
use shardcast::IoChoice;
use shardcast::push::{PushOptions, PushReport};
use shardcast::server::{ServeOptions, Server};
use shardcast::transport::Transport;
use shardcast::wire::{Mode, Outcome};
use shardcast::{PushError, VerifyError};

mod demo;

const EXIT_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_PARTIAL: u8 = 3;

/// `shardcast --version`: the crate version and the commit it was built from (build.rs).
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("SHARDCAST_GIT_COMMIT"), ")");

#[derive(Parser)]
#[command(name = "shardcast", version = VERSION, about = "Replicate checkpoints and dataset shards down a chain of replicas")]
#[command(after_help = "Examples:\n  \
    shardcast serve --listen 0.0.0.0:7071 --root /data/replica\n  \
    shardcast push ./ckpt --name ckpt --version 100 --to node1:7071,node2:7071,node3:7071\n  \
    shardcast status node2:7071 --json\n  \
    shardcast verify --root /data/replica ckpt\n  \
    shardcast demo --replicas 3 --size 1GiB")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"], env = "SHARDCAST_LOG_FORMAT")]
    log_format: String,
    /// A TOML file with defaults for `serve` and `push` flags ([serve] and [push] tables, keys
    /// named like the flags: `pool_mb = 64`, `to = ["a:7071", "b:7071"]`). Precedence: command
    /// line, then environment (SHARDCAST_SERVE_*, SHARDCAST_PUSH_*, SHARDCAST_RDMA_*), then this
    /// file, then the built-in defaults.
    #[arg(long, global = true, env = "SHARDCAST_CONFIG")]
    config: Option<PathBuf>,
    /// The cluster key (a file of at least 32 secret bytes, mode 600): every connection between
    /// nodes then authenticates both ways with it (HMAC challenge-response), and a peer without
    /// it is refused before anything is staged. Same file on every node.
    #[arg(long, global = true, env = "SHARDCAST_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// Encrypt the chunks on every hop (AES-256-GCM, each hop with its own key derived from its
    /// authentication; needs --key-file or --tls-cert, and means TCP on every hop). On `serve`: accept only
    /// pushes that encrypt.
    #[arg(long, global = true, env = "SHARDCAST_ENCRYPT")]
    encrypt: bool,
    /// Mutual TLS instead of a cluster key, for sites with a PKI: this node's certificate
    /// chain (PEM; valid for the address peers dial it at, for serving, and usable as a client
    /// certificate). Needs --tls-key and --tls-ca.
    #[arg(long, global = true, env = "SHARDCAST_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, global = true, env = "SHARDCAST_TLS_KEY", requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<PathBuf>,
    /// The CA certificates (PEM) every peer's certificate must chain to.
    #[arg(long, global = true, env = "SHARDCAST_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// RDMA device selection, shared by `serve` and `push`.
#[derive(clap::Args, Debug, Clone)]
struct RdmaArgs {
    /// RDMA device (e.g. mlx5_0, rxe_v0); default: the one with a RoCEv2 GID for the address
    /// that routes to the peer.
    #[arg(long, env = "SHARDCAST_RDMA_DEVICE")]
    rdma_device: Option<String>,
    /// GID index on port 1 of the RDMA device; default: the RoCEv2 GID of that address.
    #[arg(long, env = "SHARDCAST_GID_INDEX")]
    gid_index: Option<u8>,
    /// Let `--transport auto` take RDMA on soft-RoCE (rxe) and soft-iWARP (siw) devices too
    /// (they are slower than TCP on most hosts, so auto skips them by default).
    #[arg(long, env = "SHARDCAST_RDMA_ALLOW_SOFT")]
    rdma_allow_soft: bool,
}

impl RdmaArgs {
    fn config(self) -> shardcast::rdma::RdmaConfig {
        shardcast::rdma::RdmaConfig {
            device: self.rdma_device,
            gid_index: self.gid_index,
            disabled: None,
            allow_soft: self.rdma_allow_soft,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a replica: receive pushes into ROOT and relay them down the chain.
    Serve {
        /// Address to listen on (port 0 picks a free port; the log says which).
        #[arg(long, default_value = "0.0.0.0:7071", env = "SHARDCAST_SERVE_LISTEN")]
        listen: String,
        /// Directory that holds the published shard sets.
        #[arg(long, env = "SHARDCAST_SERVE_ROOT")]
        root: PathBuf,
        /// Versions kept per shard set name.
        #[arg(long, default_value_t = 2, env = "SHARDCAST_SERVE_KEEP")]
        keep: usize,
        /// Buffer pool per push, in MiB (pinned memory; bounds the node's memory use).
        #[arg(long, default_value_t = 64, env = "SHARDCAST_SERVE_POOL_MB")]
        pool_mb: usize,
        /// Transport this replica offers: auto (RDMA where the push allows it), tcp (never RDMA)
        /// or rdma (refuse to start without RDMA support).
        #[arg(long, default_value = "auto", env = "SHARDCAST_SERVE_TRANSPORT")]
        transport: Transport,
        #[command(flatten)]
        rdma: RdmaArgs,
        /// Give up on a push that makes no progress for this many seconds.
        #[arg(long, default_value_t = 120, env = "SHARDCAST_SERVE_IDLE_TIMEOUT")]
        idle_timeout: u64,
        /// A replica after this one that takes nothing for this many seconds (times the number
        /// of replicas after this one, so the nearest node decides) is reported as stalled
        /// (hung, or its link down) and the push goes on without it.
        #[arg(long, default_value_t = 10, env = "SHARDCAST_SERVE_HOP_TIMEOUT")]
        hop_timeout: u64,
        /// Most concurrent sessions.
        #[arg(long, default_value_t = 64, env = "SHARDCAST_SERVE_MAX_SESSIONS")]
        max_sessions: usize,
        /// Most concurrent connections from one peer address (a peer that opens connections
        /// and sends nothing cannot take every session).
        #[arg(long, default_value_t = 16, env = "SHARDCAST_SERVE_MAX_SESSIONS_PER_PEER")]
        max_sessions_per_peer: usize,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9471).
        #[arg(long, env = "SHARDCAST_SERVE_METRICS")]
        metrics: Option<String>,
        /// Append one JSON line per push and per refusal to this file: time, peer, key id,
        /// name, version, bytes, outcome, reason.
        #[arg(long, env = "SHARDCAST_SERVE_AUDIT_LOG")]
        audit_log: Option<PathBuf>,
        /// Refuse a push (as busy, with the numbers) when the pushes being received would add up
        /// to more than this many MiB (0: no limit beyond the free-disk check).
        #[arg(long, default_value_t = 0, env = "SHARDCAST_SERVE_MAX_STAGING_MB")]
        max_staging_mb: u64,
        /// Remove partial stagings (kept by pushes that did not finish, so that a repeat
        /// resumes) this many hours after their last chunk arrived (0: never).
        #[arg(long, default_value_t = 24, env = "SHARDCAST_SERVE_PARTIAL_MAX_AGE_HOURS")]
        partial_max_age_hours: u64,
        /// Keep at most this many MiB of partial stagings in all, removing the oldest first
        /// (0: no cap). Checked at start and at every push.
        #[arg(long, default_value_t = 102_400, env = "SHARDCAST_SERVE_PARTIAL_MAX_MB")]
        partial_max_mb: u64,
        /// More keys this replica accepts, each limited to name prefixes, to whether its
        /// versions may become `current` and to whether it may prune (TOML: [[key]] file, names,
        /// replace_current, prune). The limits hold at every replica of the chain.
        /// `--key-file` stays the key with every right (and the one used downstream).
        #[arg(long, env = "SHARDCAST_SERVE_ACL")]
        acl: Option<PathBuf>,
        /// A connection must finish its handshake (TLS or key authentication, then HELLO or a
        /// status request) within this many seconds in all, else it is closed; a replica also
        /// gives the chain after it this long per node to answer.
        #[arg(long, default_value_t = 5, env = "SHARDCAST_SERVE_HANDSHAKE_TIMEOUT")]
        handshake_timeout: u64,
        /// Most connections in their handshake at once (counted apart from sessions, so that
        /// slow or silent peers cannot take the session slots).
        #[arg(long, default_value_t = 128, env = "SHARDCAST_SERVE_MAX_HANDSHAKES")]
        max_handshakes: usize,
        /// Most connections in their handshake at once from one peer address.
        #[arg(long, default_value_t = 8, env = "SHARDCAST_SERVE_MAX_HANDSHAKES_PER_PEER")]
        max_handshakes_per_peer: usize,
        /// Longest chain a push may name, counted from this replica to the tail.
        #[arg(long, default_value_t = 16, env = "SHARDCAST_SERVE_MAX_CHAIN")]
        max_chain: usize,
        /// Most entries (files and directories) a pushed version may have.
        #[arg(long, default_value_t = 1_000_000, env = "SHARDCAST_SERVE_MAX_ENTRIES")]
        max_entries: usize,
        /// Largest manifest a push may send, in MiB (it travels in HELLO).
        #[arg(long, default_value_t = 64, env = "SHARDCAST_SERVE_MAX_MANIFEST_MB")]
        max_manifest_mb: u32,
        /// Refuse a version more than this far beyond the name's `current` (which only moves
        /// forward, so one huge version would pin it); 0: no limit.
        #[arg(long, default_value_t = 1 << 32, env = "SHARDCAST_SERVE_MAX_VERSION_AHEAD")]
        max_version_ahead: u64,
    },
    /// Push a directory or file as NAME@VERSION to a chain of replicas.
    Push {
        /// The directory (its tree) or file to push.
        source: PathBuf,
        /// Shard set name.
        #[arg(long, env = "SHARDCAST_PUSH_NAME")]
        name: String,
        /// Version (a growing number: the step or epoch).
        #[arg(long, env = "SHARDCAST_PUSH_VERSION")]
        version: u64,
        /// The chain: comma-separated replica addresses, first replica first.
        #[arg(long, value_delimiter = ',', required = true, env = "SHARDCAST_PUSH_TO")]
        to: Vec<String>,
        /// Chunk size (bytes, or with K/M/G/KiB/MiB/GiB).
        #[arg(long, default_value = "4MiB", value_parser = parse_size_u32, env = "SHARDCAST_PUSH_CHUNK_SIZE")]
        chunk_size: u32,
        /// sync: return when every replica (the tail last) has published; async: return when the
        /// first replica has published, the rest of the chain completes on its own (listed as
        /// "behind"; `shardcast status NODE` shows how far each is).
        #[arg(long, default_value = "sync", value_parser = ["sync", "async"], env = "SHARDCAST_PUSH_MODE")]
        mode: String,
        /// Transport of every hop: auto (RDMA where both ends have a hardware RNIC, else TCP),
        /// tcp, or rdma (every hop over RDMA verbs, soft-RoCE included, or fail).
        #[arg(long, default_value = "auto", env = "SHARDCAST_PUSH_TRANSPORT")]
        transport: Transport,
        #[command(flatten)]
        rdma: RdmaArgs,
        /// Buffer pool in MiB. The primary only reads ahead of its sends (a slot is free again
        /// once its send completed), so it needs less than a relay.
        #[arg(long, default_value_t = 16, env = "SHARDCAST_PUSH_POOL_MB")]
        pool_mb: usize,
        /// Seconds to wait for each connection and the chain's answer.
        #[arg(long, default_value_t = 10, env = "SHARDCAST_PUSH_CONNECT_TIMEOUT")]
        connect_timeout: u64,
        /// Give up when nothing moves for this many seconds.
        #[arg(long, default_value_t = 120, env = "SHARDCAST_PUSH_IDLE_TIMEOUT")]
        idle_timeout: u64,
        /// Give up on the first replica when it takes nothing for this many seconds times the
        /// number of replicas (the push then goes on without it, see --no-repair).
        #[arg(long, default_value_t = 10, env = "SHARDCAST_PUSH_HOP_TIMEOUT")]
        hop_timeout: u64,
        /// Versions of NAME each replica keeps once this one is published, oldest removed first,
        /// the current one never (default: each replica's `serve --keep`).
        #[arg(long, env = "SHARDCAST_PUSH_KEEP", value_parser = clap::value_parser!(u32).range(1..))]
        keep: Option<u32>,
        /// Hash the source first, so that each replica receives only the chunks its current
        /// version of NAME does not already have (the rest it copies locally): for a checkpoint
        /// that changed in places, or a re-push after a failure.
        #[arg(long, env = "SHARDCAST_PUSH_INCREMENTAL")]
        incremental: bool,
        /// Succeed (exit 0) once this many replicas published; the others are reported (default:
        /// all of them).
        #[arg(long, env = "SHARDCAST_PUSH_MIN_REPLICAS", value_parser = clap::value_parser!(u32).range(1..))]
        min_replicas: Option<u32>,
        /// Do not repair the chain: when a replica dies mid-push, fail the replicas after it
        /// instead of pushing to them again around it.
        #[arg(long, env = "SHARDCAST_PUSH_NO_REPAIR")]
        no_repair: bool,
        /// Print one JSON object instead of text.
        #[arg(long, env = "SHARDCAST_PUSH_JSON")]
        json: bool,
    },
    /// Watch a checkpoint directory and push each completed checkpoint as the next version
    /// (its step number, from the end of its name); see ARCHITECTURE.md for the conventions.
    Mirror {
        /// The directory the training job saves checkpoints into.
        #[arg(long, env = "SHARDCAST_MIRROR_WATCH")]
        watch: PathBuf,
        /// Shard set name.
        #[arg(long, env = "SHARDCAST_MIRROR_NAME")]
        name: String,
        /// The chain: comma-separated replica addresses, first replica first.
        #[arg(long, value_delimiter = ',', required = true, env = "SHARDCAST_MIRROR_TO")]
        to: Vec<String>,
        /// A checkpoint directory is complete once it holds this file (else: once it stopped
        /// changing between two polls, for the write-then-rename convention).
        #[arg(long, env = "SHARDCAST_MIRROR_MARKER")]
        marker: Option<String>,
        /// Milliseconds between polls.
        #[arg(long, default_value_t = 1000, env = "SHARDCAST_MIRROR_INTERVAL_MS")]
        interval_ms: u64,
        /// Push what is complete now and exit (for cron or an end-of-job hook).
        #[arg(long)]
        once: bool,
        /// Chunk size (bytes, or with K/M/G/KiB/MiB/GiB).
        #[arg(long, default_value = "4MiB", value_parser = parse_size_u32, env = "SHARDCAST_MIRROR_CHUNK_SIZE")]
        chunk_size: u32,
        /// Transport of every hop: auto, tcp or rdma.
        #[arg(long, default_value = "auto", env = "SHARDCAST_MIRROR_TRANSPORT")]
        transport: Transport,
        /// Checkpoints each replica keeps: the last K mirrored steps, older ones removed once a
        /// newer one is published (default: each replica's `serve --keep`).
        #[arg(long, env = "SHARDCAST_MIRROR_KEEP", value_parser = clap::value_parser!(u32).range(1..))]
        keep: Option<u32>,
        /// Send each replica only the chunks its previous checkpoint does not have (hashes each
        /// checkpoint first): worth it when checkpoints change in places.
        #[arg(long, env = "SHARDCAST_MIRROR_INCREMENTAL")]
        incremental: bool,
    },
    /// Stage an epoch's dataset shards: every node gets exactly the files a plan assigns it,
    /// published there as NAME@VERSION, each chunk sent only as far down the chain as needed.
    /// Plan format: `name`, `version`, `source`, optional `chunk_size`, then one `[[node]]` per
    /// replica (chain order) with `addr` and `files` (relative to source).
    Stage {
        /// The plan (TOML).
        #[arg(long, env = "SHARDCAST_STAGE_PLAN")]
        plan: PathBuf,
        /// Transport of every hop: auto, tcp or rdma.
        #[arg(long, default_value = "auto", env = "SHARDCAST_STAGE_TRANSPORT")]
        transport: Transport,
        #[command(flatten)]
        rdma: RdmaArgs,
        /// Seconds to wait for each connection and the chain's answer.
        #[arg(long, default_value_t = 10, env = "SHARDCAST_STAGE_CONNECT_TIMEOUT")]
        connect_timeout: u64,
        /// Versions of NAME each node keeps (default: each node's `serve --keep`).
        #[arg(long, env = "SHARDCAST_STAGE_KEEP", value_parser = clap::value_parser!(u32).range(1..))]
        keep: Option<u32>,
        /// Print one JSON object instead of text.
        #[arg(long, env = "SHARDCAST_STAGE_JSON")]
        json: bool,
    },
    /// List the shard sets and versions a replica holds.
    Status {
        /// The replica's address.
        addr: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-hash a published version against its manifest.
    Verify {
        /// The replica's root directory.
        #[arg(long)]
        root: PathBuf,
        /// Shard set name.
        name: String,
        /// Version (default: the current one).
        #[arg(long)]
        version: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Start a local demo cluster, push a synthetic checkpoint, check every byte.
    Demo {
        /// Number of replicas.
        #[arg(long, default_value_t = 3)]
        replicas: usize,
        /// Size of the synthetic checkpoint.
        #[arg(long, default_value = "1GiB", value_parser = parse_size)]
        size: u64,
        /// Work directory (default: a temporary one, removed afterwards).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Chunk size.
        #[arg(long, default_value = "4MiB", value_parser = parse_size_u32)]
        chunk_size: u32,
    },
}

use shardcast::parse_size;

fn parse_size_u32(s: &str) -> Result<u32, String> {
    let n = parse_size(s)?;
    let (min, max) = (shardcast::wire::MIN_CHUNK, shardcast::wire::MAX_CHUNK);
    if n < u64::from(min) || n > u64::from(max) {
        return Err(format!("chunk size must be between {} KiB and {} MiB", min >> 10, max >> 20));
    }
    Ok(n as u32)
}

fn init_logging(format: &str, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHARDCAST_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.with_target(false).init();
    }
}

/// Applies `--config FILE` (or `SHARDCAST_CONFIG`): each key of the invoked command's table
/// becomes the value of that flag's environment variable, unless the environment already sets
/// it. clap then resolves command line > environment (> file) > default. Every key of every
/// table is checked against the flags, so a typo is an error rather than silently ignored.
fn apply_config_file() -> Result<(), String> {
    use clap::CommandFactory;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut path = std::env::var_os("SHARDCAST_CONFIG").map(PathBuf::from);
    let mut sub = None;
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if let Some(v) = a.strip_prefix("--config=") {
            path = Some(PathBuf::from(v));
        } else if a == "--config" {
            path = args.get(i + 1).map(PathBuf::from);
            i += 1;
        } else if a == "--log-format" {
            i += 1;
        } else if !a.starts_with('-') && sub.is_none() {
            sub = Some(a.clone());
        }
        i += 1;
    }
    let Some(path) = path else { return Ok(()) };
    let shown = path.display();
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read the config file {shown}: {e}"))?;
    let table: toml::Table = text.parse().map_err(|e| format!("config file {shown}: {e}"))?;
    let cmd = Cli::command();
    for (section, value) in table {
        let Some(subcmd) = cmd.find_subcommand(&section).filter(|_| section == "serve" || section == "push") else {
            return Err(format!("config file {shown}: unknown table [{section}] (expected [serve] or [push])"));
        };
        let toml::Value::Table(entries) = value else {
            return Err(format!("config file {shown}: `{section}` must be a table ([{section}])"));
        };
        for (key, v) in entries {
            let arg = subcmd.get_arguments().find(|a| a.get_id().as_str() == key);
            let Some(env) = arg.and_then(|a| a.get_env()) else {
                return Err(format!("config file {shown}: [{section}] has no setting `{key}`"));
            };
            let text = match v {
                toml::Value::String(s) => s,
                toml::Value::Integer(n) => n.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Array(items) => items
                    .iter()
                    .map(|x| x.as_str().map(str::to_owned).unwrap_or_else(|| x.to_string()))
                    .collect::<Vec<_>>()
                    .join(","),
                other => return Err(format!("config file {shown}: [{section}] {key}: unsupported value {other}")),
            };
            if sub.as_deref() == Some(section.as_str()) && std::env::var_os(env).is_none() {
                // SAFETY: called first thing in main, before any other thread exists.
                unsafe { std::env::set_var(env, text) };
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    if let Err(e) = apply_config_file() {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let cli = Cli::parse();
    shardcast::raise_nofile_limit();
    let key = match cli.key_file.as_deref().map(shardcast::auth::ClusterKey::load).transpose() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let tls = match (&cli.tls_cert, &cli.tls_key, &cli.tls_ca) {
        (Some(c), Some(k), Some(ca)) if key.is_none() => match shardcast::tls::TlsIdentity::load(c, k, ca) {
            Ok(id) => Some(std::sync::Arc::new(id)),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        },
        (Some(_), ..) => {
            eprintln!("error: --key-file and --tls-cert are two ways to authenticate: give one of them");
            return ExitCode::from(EXIT_USAGE);
        }
        _ => None,
    };
    let code = match cli.cmd {
        Cmd::Serve {
            listen,
            root,
            keep,
            pool_mb,
            transport,
            rdma,
            idle_timeout,
            hop_timeout,
            max_sessions,
            max_sessions_per_peer,
            metrics,
            audit_log,
            max_staging_mb,
            partial_max_age_hours,
            partial_max_mb,
            acl,
            handshake_timeout,
            max_handshakes,
            max_handshakes_per_peer,
            max_chain,
            max_entries,
            max_manifest_mb,
            max_version_ahead,
        } => {
            init_logging(&cli.log_format, "info");
            let mut opts = ServeOptions::new(listen, root);
            opts.key = key.clone();
            opts.tls = tls.clone();
            opts.require_encrypt = cli.encrypt;
            opts.max_staging = max_staging_mb << 20;
            opts.partial_max_age =
                (partial_max_age_hours > 0).then(|| Duration::from_secs(partial_max_age_hours * 3600));
            opts.partial_max_bytes = partial_max_mb << 20;
            if acl.is_some() && tls.is_some() {
                eprintln!(
                    "error: --acl lists cluster keys, and this replica authenticates with mutual TLS (every \
                     certificate from --tls-ca may push): use one or the other"
                );
                return ExitCode::from(EXIT_USAGE);
            }
            if let Some(path) = acl {
                match shardcast::auth::load_acl(&path) {
                    Ok(a) => opts.acl = a,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(EXIT_USAGE);
                    }
                }
            }
            if let Some(path) = audit_log {
                match shardcast::audit::AuditLog::open(&path) {
                    Ok(log) => opts.audit = Some(log),
                    Err(e) => {
                        eprintln!("error: cannot open the audit log {}: {e}", path.display());
                        return ExitCode::from(EXIT_USAGE);
                    }
                }
            }
            opts.keep = keep;
            opts.pool_bytes = pool_mb << 20;
            opts.transport = transport;
            opts.rdma = rdma.config();
            opts.idle_timeout = Duration::from_secs(idle_timeout.max(1));
            opts.hop_timeout = Duration::from_secs(hop_timeout.max(1));
            opts.max_sessions = max_sessions.max(1);
            opts.max_per_peer = max_sessions_per_peer.max(1);
            opts.handshake_timeout = Duration::from_secs(handshake_timeout.max(1));
            opts.max_handshakes = max_handshakes.max(1);
            opts.max_handshakes_per_peer = max_handshakes_per_peer.max(1);
            opts.max_chain = max_chain.max(1);
            opts.max_entries = max_entries;
            opts.max_manifest = max_manifest_mb.clamp(1, shardcast::wire::MAX_HELLO >> 20) << 20;
            opts.max_version_ahead = max_version_ahead;
            if let Some(addr) = metrics {
                let m = std::sync::Arc::new(shardcast::metrics::Metrics::new());
                match shardcast::metrics::serve(&addr, std::sync::Arc::clone(&m)) {
                    Ok(bound) => tracing::info!("metrics on http://{bound}/metrics"),
                    Err(e) => {
                        eprintln!("error: cannot serve metrics on {addr}: {e}");
                        return ExitCode::from(EXIT_FAILED);
                    }
                }
                opts.metrics = Some(m);
            }
            let root = opts.root.clone();
            // Pinned pools: one per concurrent push, a few at a time in practice.
            if let Err(why) = shardcast::check_memlock(pool_mb << 20, 2) {
                tracing::warn!("{why}");
            }
            let open_to_anyone = opts.key.is_none() && opts.acl.is_empty() && opts.tls.is_none();
            match Server::bind(opts) {
                Ok(server) => {
                    // Without a key or TLS nothing is authenticated: say so loudly where others can
                    // reach the replica (loopback is this host's business).
                    if open_to_anyone && !server.local_addr().ip().is_loopback() {
                        tracing::warn!(
                            "INSECURE: no --key-file or --tls-cert: anyone who can reach {} can push to this \
                             replica (write under {}) and, as a replica after it, lie about what was published; \
                             give every node a cluster key (--key-file) or mutual TLS",
                            server.local_addr(),
                            root.display()
                        );
                    }
                    let pinned = shardcast::memlock_limit().map_or("unknown".into(), |l| {
                        if l == u64::MAX { "unlimited".into() } else { format!("{} KiB", l >> 10) }
                    });
                    tracing::info!(
                        "listening on {} (root {}, keep {keep}, pool {pool_mb} MiB per push, memlock limit {pinned}{})",
                        server.local_addr(),
                        root.display(),
                        if shardcast::server::bench_no_verify() { ", DIGEST VERIFICATION OFF (benchmark)" } else { "" }
                    );
                    server.run();
                    0
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    if matches!(e, shardcast::ServeError::Unsupported(_)) { EXIT_USAGE } else { EXIT_FAILED }
                }
            }
        }
        Cmd::Push {
            source,
            name,
            version,
            to,
            chunk_size,
            mode,
            transport,
            rdma,
            pool_mb,
            connect_timeout,
            idle_timeout,
            hop_timeout,
            keep,
            incremental,
            min_replicas,
            no_repair,
            json,
        } => {
            init_logging(&cli.log_format, "warn");
            let mut opts = PushOptions::new(name, version, to);
            opts.key = key.clone();
            opts.tls = tls.clone();
            opts.encrypt = cli.encrypt;
            opts.chunk_size = chunk_size;
            opts.mode = if mode == "async" { Mode::Async } else { Mode::Sync };
            opts.transport = transport;
            opts.rdma = rdma.config();
            opts.pool_bytes = pool_mb.max(1) << 20;
            opts.io = IoChoice::from_env();
            opts.connect_timeout = Duration::from_secs(connect_timeout.max(1));
            opts.idle_timeout = Duration::from_secs(idle_timeout.max(1));
            opts.hop_timeout = Duration::from_secs(hop_timeout.max(1));
            opts.keep = keep.unwrap_or(0);
            opts.incremental = incremental;
            opts.min_replicas = min_replicas.map(|m| m as usize);
            opts.repair = !no_repair;
            run_push(&source, &opts, json)
        }
        Cmd::Stage { plan, transport, rdma, connect_timeout, keep, json } => {
            init_logging(&cli.log_format, "warn");
            let plan = match shardcast::stage::Plan::load(&plan) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            let mut opts = PushOptions::new(plan.name.clone(), plan.version, plan.chain());
            opts.key = key.clone();
            opts.tls = tls.clone();
            opts.encrypt = cli.encrypt;
            opts.transport = transport;
            opts.rdma = rdma.config();
            opts.connect_timeout = Duration::from_secs(connect_timeout.max(1));
            opts.keep = keep.unwrap_or(0);
            run_with_progress(&opts, json, |o, p| shardcast::stage::stage(&plan, o, p))
        }
        Cmd::Status { addr, json } => {
            init_logging(&cli.log_format, "warn");
            match shardcast::server::status(&addr, Duration::from_secs(10), key.as_ref(), tls.as_deref()) {
                Ok(sets) => {
                    if json {
                        println!("{}", json!({ "node": addr, "sets": sets }));
                    } else if sets.is_empty() {
                        println!("{addr}: no shard sets");
                    } else {
                        println!("{addr}:");
                        for s in sets {
                            let cur = s.current.map_or("-".into(), |c| c.to_string());
                            let vs: Vec<String> = s.versions.iter().map(u64::to_string).collect();
                            println!("  {:<24} current {cur:<10} versions {}", s.name, vs.join(", "));
                            for (v, done, total) in &s.receiving {
                                let pct = if *total > 0 { 100.0 * *done as f64 / *total as f64 } else { 100.0 };
                                println!(
                                    "  {:<24} receiving {v}: {:.1} of {:.1} MiB ({pct:.0} %)",
                                    "",
                                    *done as f64 / 1048576.0,
                                    *total as f64 / 1048576.0
                                );
                            }
                        }
                    }
                    0
                }
                Err(e) => {
                    if json {
                        println!("{}", json!({ "node": addr, "error": { "kind": e.kind, "message": e.message } }));
                    }
                    eprintln!("error: {e}");
                    EXIT_FAILED
                }
            }
        }
        Cmd::Verify { root, name, version, json } => {
            init_logging(&cli.log_format, "warn");
            match shardcast::store::verify(&root, &name, version) {
                Ok(s) => {
                    if json {
                        println!("{}", json!({ "ok": true, "summary": s }));
                    } else {
                        println!(
                            "{}@{}: {} files, {} bytes, {} chunks verified",
                            s.name, s.version, s.files, s.bytes, s.chunks
                        );
                    }
                    0
                }
                Err(e) => {
                    if json {
                        println!("{}", json!({ "ok": false, "error": e.to_string() }));
                    }
                    eprintln!("error: {e}");
                    match e {
                        VerifyError::NotFound(_) => EXIT_USAGE,
                        _ => EXIT_FAILED,
                    }
                }
            }
        }
        Cmd::Mirror { watch, name, to, marker, interval_ms, once, chunk_size, transport, keep, incremental } => {
            init_logging(&cli.log_format, "warn");
            let mut push = PushOptions::new(name, 0, to);
            push.key = key.clone();
            push.tls = tls.clone();
            push.encrypt = cli.encrypt;
            push.chunk_size = chunk_size;
            push.transport = transport;
            push.keep = keep.unwrap_or(0);
            push.incremental = incremental;
            if !watch.is_dir() {
                eprintln!("error: --watch {}: not a directory", watch.display());
                return ExitCode::from(EXIT_USAGE);
            }
            let opts = shardcast::mirror::MirrorOptions {
                watch,
                marker,
                interval: Duration::from_millis(interval_ms.max(10)),
                push,
            };
            shardcast::mirror::run(&opts, once, |_, line| println!("{line}"));
            0
        }
        Cmd::Demo { replicas, size, dir, chunk_size } => {
            init_logging(&cli.log_format, "warn");
            match demo::run(demo::DemoArgs { replicas: replicas.max(1), size, dir, chunk_size }) {
                Ok(_) => 0,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    EXIT_FAILED
                }
            }
        }
    };
    ExitCode::from(code)
}

fn report_json(r: &PushReport) -> serde_json::Value {
    let replicas: Vec<_> = r
        .replicas
        .iter()
        .map(|rep| match &rep.outcome {
            Outcome::Published if r.already_held.contains(&rep.node) => {
                json!({ "node": rep.node, "status": "published", "already_held": true })
            }
            Outcome::Published => json!({ "node": rep.node, "status": "published" }),
            Outcome::Behind => json!({ "node": rep.node, "status": "behind" }),
            Outcome::Failed(e) => {
                json!({ "node": rep.node, "status": "failed", "error": { "kind": e.kind, "message": e.message } })
            }
        })
        .collect();
    json!({
        "name": r.name, "version": r.version, "bytes": r.bytes, "files": r.files, "chunks": r.chunks,
        "seconds": r.seconds, "manifest_seconds": r.manifest_seconds, "gbps": r.rate() / 1e9,
        "ok": r.ok(), "published": r.published(), "required": r.required.min(r.replicas.len()),
        "replicas": replicas,
    })
}

/// Draws a one-line progress bar on stderr until `done`: bytes written on every replica, the
/// first hop's bytes, rate and ETA. Only on a terminal (the caller checks).
fn draw_progress(p: &shardcast::Progress, replicas: usize, done: &std::sync::atomic::AtomicBool) {
    use std::io::Write;
    use std::sync::atomic::Ordering::Relaxed;
    let start = std::time::Instant::now();
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let mut drawn = false;
    while !done.load(Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
        let (total, acked) = (p.total_bytes.load(Relaxed), p.acked_bytes.load(Relaxed));
        if total == 0 || !p.streaming.load(Relaxed) {
            continue;
        }
        let secs = start.elapsed().as_secs_f64();
        let rate = acked as f64 / secs.max(1e-3);
        let frac = acked as f64 / total as f64;
        let width = 30;
        let filled = ((frac * width as f64) as usize).min(width);
        let eta = if rate > 0.0 { format!("{:.0}s", (total - acked) as f64 / rate) } else { "?".into() };
        let sent = p.sent_chunks.load(Relaxed);
        let chunks = p.total_chunks.load(Relaxed).max(1);
        let line = format!(
            "\r[{}{}] {:>3.0}%  {:.2}/{:.2} GiB on all {replicas} replica(s)  {:.2} GB/s  ETA {eta}  (first hop: {}/{} chunks)",
            "#".repeat(filled),
            "-".repeat(width - filled),
            frac * 100.0,
            gib(acked),
            gib(total),
            rate / 1e9,
            sent,
            chunks,
        );
        let mut e = std::io::stderr().lock();
        let _ = write!(e, "{line}\x1b[K");
        let _ = e.flush();
        drawn = true;
    }
    if drawn {
        let _ = write!(std::io::stderr(), "\r\x1b[K");
    }
}

fn run_push(source: &std::path::Path, opts: &PushOptions, json: bool) -> u8 {
    run_with_progress(opts, json, |o, p| shardcast::push(source, o, p))
}

/// Runs a push (plain or staged) with a progress bar on a terminal, prints its report and
/// returns the exit code.
fn run_with_progress(
    opts: &PushOptions,
    json: bool,
    push: impl FnOnce(&PushOptions, Option<&shardcast::Progress>) -> Result<shardcast::PushReport, PushError>,
) -> u8 {
    use std::io::IsTerminal;
    let show = !json && std::io::stderr().is_terminal();
    let progress = shardcast::Progress::default();
    let done = std::sync::atomic::AtomicBool::new(false);
    let result = std::thread::scope(|s| {
        if show {
            s.spawn(|| draw_progress(&progress, opts.to.len(), &done));
        }
        let r = push(opts, show.then_some(&progress));
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        r
    });
    match result {
        Ok(r) => {
            if json {
                println!("{}", report_json(&r));
            } else {
                println!(
                    "{}@{}: {} bytes in {} files, {:.2} s, {:.2} GB/s",
                    r.name,
                    r.version,
                    r.bytes,
                    r.files,
                    r.seconds,
                    r.rate() / 1e9
                );
                for rep in &r.replicas {
                    match &rep.outcome {
                        Outcome::Published if r.already_held.contains(&rep.node) => {
                            println!("  {:<22} published (already held: took no data)", rep.node)
                        }
                        Outcome::Published => println!("  {:<22} published", rep.node),
                        Outcome::Behind => {
                            println!("  {:<22} behind: still receiving (`shardcast status {}`)", rep.node, rep.node)
                        }
                        Outcome::Failed(e) => println!("  {:<22} failed: {e}", rep.node),
                    }
                }
            }
            for rep in &r.replicas {
                if let Outcome::Failed(e) = &rep.outcome {
                    eprintln!("error: replica {}: {e}", rep.node);
                }
            }
            if r.ok() {
                0
            } else if r.published() > 0 {
                EXIT_PARTIAL
            } else {
                EXIT_FAILED
            }
        }
        Err(e) => {
            if json {
                println!(
                    "{}",
                    json!({
                        "name": opts.name, "version": opts.version, "ok": false,
                        "error": { "node": e.node(), "kind": e.kind(), "message": e.to_string() },
                    })
                );
            }
            eprintln!("error: {e}");
            if e.is_input_error() || matches!(e, PushError::Unsupported(_)) { EXIT_USAGE } else { EXIT_FAILED }
        }
    }
}

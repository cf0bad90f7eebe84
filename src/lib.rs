//! shardcast: chained, pipelined replication of checkpoints and dataset shards.
//!
//! A push sends one shard set version (a directory tree or a file) from a primary down a chain
//! of replicas: primary → r1 → … → rN. Every replica verifies each chunk's xxh3-128 digest,
//! forwards the chunk from the pool slot it arrived in while it writes it to its staging area,
//! and publishes the version atomically once all of it is synced.
//!
//! The principal types:
//! - [`manifest::Manifest`]: a version's files, modes, sizes and per-chunk digests.
//! - `pool::Pool`: the bounded, pinned buffer pool a session moves chunks through.
//! - [`proto::NodeMachine`]: the sans-IO chain logic (events in, actions out).
//! - `session::Session`: the event loop around it, on `sys::io::Io` (io_uring or plain sockets).
//! - [`store::Store`]: a replica's staging, publish and retention.
//! - [`server::Server`] and [`push::push`]: the two ends a program calls.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use shardcast::{push, server};
//! let dir = tempfile::tempdir()?;
//! std::fs::create_dir(dir.path().join("ckpt"))?;
//! std::fs::write(dir.path().join("ckpt/weights.bin"), vec![7u8; 100_000])?;
//! let replica = server::Server::bind(server::ServeOptions::new("127.0.0.1:0", dir.path().join("r1")))?.spawn();
//! let opts = push::PushOptions::new("ckpt", 1, vec![replica.addr().to_string()]);
//! let report = push::push(&dir.path().join("ckpt"), &opts, None)?;
//! assert!(report.ok());
//! assert_eq!(std::fs::read(dir.path().join("r1/ckpt/1/weights.bin"))?, vec![7u8; 100_000]);
//! # Ok(()) }
//! ```

#![deny(unsafe_code)]

pub mod audit;
pub mod compress;
pub(crate) mod credentials;
pub mod error;
pub(crate) mod hop;
pub mod manifest;
pub mod metrics;
pub mod mirror;
pub(crate) mod node;
pub(crate) mod pool;
pub(crate) mod proto;
pub mod rdma;
pub(crate) mod session;
pub mod stage;
pub mod store;
pub(crate) mod sys;
pub mod wire;

// The hop's parts under their old paths (`shardcast::auth::ClusterKey`, `crate::crypt::...`).
pub use credentials::Auth;
pub use error::{ErrorKind, NodeError, PushError, ServeError, VerifyError};
pub use hop::policy as transport;
pub use hop::{auth, crypt, tls};
pub use node::primary as push;
pub use node::replica as server;
pub use pool::{check_budget, check_memlock, memlock_limit};
pub use push::{PushOptions, PushReport, push, push_memory};
pub use server::{ServeLimits, ServeOptions, Server};
pub use session::{MemoryData, Progress};
pub use sys::io::IoChoice;

/// Parses a size: bytes, or a number with K/M/G (or KiB/MiB/GiB, KB/MB/GB: all binary).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size (e.g. 4194304, 4M, 4MiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        u => return Err(format!("unknown size unit {u:?} (use K, M, G, KiB, MiB, GiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

/// Raises the soft open-files limit to the hard limit: a push keeps one descriptor per
/// non-empty file open on the primary and on every replica.
pub fn raise_nofile_limit() {
    sys::raise_nofile_limit();
}

//! Epoch staging: `shardcast stage --plan plan.toml` makes every node hold the dataset shards
//! it needs for the next epoch, and only those.
//!
//! ```toml
//! name = "train-shards"      # shard set published on every node (NAME@VERSION)
//! version = 3                # e.g. the epoch
//! source = "/datasets/train" # where the shards are on this (the primary) node;
//!                            # relative paths are relative to the plan file
//! chunk_size = "4MiB"        # optional
//!
//! [[node]]                   # chain order: the first node is the first replica
//! addr = "10.0.0.2:7071"
//! files = ["shard-0000.tar", "shard-0001.tar"]
//!
//! [[node]]
//! addr = "10.0.0.3:7071"
//! files = ["shard-0001.tar", "sub/shard-0002.tar"]
//! ```
//!
//! One routed push does it: the manifest is the union of the files, every node stores (and
//! publishes as NAME@VERSION) exactly its own files, and each chunk travels down the chain only
//! as far as the last node that wants it; a node in between relays it without writing it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::PushError;
use crate::manifest::{DEFAULT_CHUNK, Manifest};
use crate::push::{PushOptions, PushReport, push_routed};
use crate::session::Progress;

/// A staging plan as written in its TOML file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Shard set name.
    pub name: String,
    /// Version to publish on every node.
    pub version: u64,
    /// Directory the files are read from on this node.
    pub source: PathBuf,
    /// Chunk size ("4MiB", or bytes).
    #[serde(default)]
    pub chunk_size: Option<toml::Value>,
    /// The nodes, in chain order, with the files each needs.
    #[serde(rename = "node", default)]
    pub nodes: Vec<PlanNode>,
}

/// One node of a plan.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanNode {
    /// The node's `shardcast serve` address.
    pub addr: String,
    /// The files it needs, relative to `source`.
    pub files: Vec<String>,
}

impl Plan {
    /// Reads and checks a plan file; a relative `source` is taken relative to the file.
    pub fn load(path: &Path) -> Result<Self, PushError> {
        let shown = path.display();
        let text = std::fs::read_to_string(path)
            .map_err(|e| PushError::BadInput(format!("cannot read the plan {shown}: {e}")))?;
        let mut plan: Plan =
            toml::from_str(&text).map_err(|e| PushError::BadInput(format!("plan {shown}: {}", e.message())))?;
        if plan.source.is_relative() {
            plan.source = path.parent().unwrap_or(Path::new(".")).join(&plan.source);
        }
        plan.check().map_err(|e| PushError::BadInput(format!("plan {shown}: {e}")))?;
        Ok(plan)
    }

    fn check(&self) -> Result<(), String> {
        if self.nodes.is_empty() {
            return Err("no [[node]] entries".into());
        }
        let mut seen = HashSet::new();
        for n in &self.nodes {
            if !seen.insert(n.addr.as_str()) {
                return Err(format!("node {} is listed twice", n.addr));
            }
        }
        self.chunk_size()?;
        Ok(())
    }

    /// The chunk size the plan asks for (default 4 MiB).
    pub fn chunk_size(&self) -> Result<u32, String> {
        match &self.chunk_size {
            None => Ok(DEFAULT_CHUNK),
            Some(toml::Value::Integer(n)) => u32::try_from(*n).map_err(|_| format!("chunk_size {n} is out of range")),
            Some(toml::Value::String(s)) => crate::parse_size(s)
                .and_then(|n| u32::try_from(n).map_err(|_| format!("chunk_size {s} is too large")))
                .map_err(|e| format!("chunk_size: {e}")),
            Some(v) => Err(format!("chunk_size: expected a size like \"4MiB\", got {v}")),
        }
    }

    /// The replica addresses, in chain order.
    pub fn chain(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }
}

/// Stages `plan`: describes and hashes the union of its files, then pushes them in one routed
/// push down the plan's chain (`opts.to`, `name`, `version` and `chunk_size` come from the plan).
pub fn stage(plan: &Plan, opts: &PushOptions, progress: Option<&Progress>) -> Result<PushReport, PushError> {
    let mut opts = opts.clone();
    opts.name = plan.name.clone();
    opts.version = plan.version;
    opts.to = plan.chain();
    opts.chunk_size = plan.chunk_size().map_err(PushError::BadInput)?;
    let all: Vec<String> = plan.nodes.iter().flat_map(|n| n.files.iter().cloned()).collect();
    let (manifest, index, paths) = Manifest::for_files(&plan.source, &all, opts.chunk_size)?;
    let mut at = 0;
    let wants = plan
        .nodes
        .iter()
        .map(|n| {
            let mut w: Vec<u32> = index[at..at + n.files.len()].iter().map(|&i| i as u32).collect();
            at += n.files.len();
            w.sort_unstable();
            w.dedup();
            Some(w)
        })
        .collect();
    push_routed(manifest, paths, wants, &opts, progress)
}

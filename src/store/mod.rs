//! A replica's store: staging, atomic publish, retention, listing and verification.
//!
//! Layout under the root (see ARCHITECTURE.md):
//! ```text
//! ROOT/.staging/NAME@VERSION.<pid>.<n>/data/…   being received
//! ROOT/NAME/VERSION/…                           published data, the pushed tree byte for byte
//! ROOT/NAME/VERSION.manifest                    its manifest; a version exists iff this exists
//! ROOT/NAME/current -> VERSION                  flipped by an atomic rename
//! ```
//! Publishing renames the synced data directory into place first and the manifest second, so
//! a crash in between leaves a version directory without a manifest, which is not a version:
//! listings skip it and the next push of that version removes it.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::StoreError;
use crate::manifest::Manifest;
use crate::wire::SetStatus;

mod disk;
mod journal;
mod partial;
mod reuse;
mod staging;
mod verify;

use disk::fsync_dir;
use journal::journal_records;
use partial::keep_partial;

pub use disk::free_bytes;
pub use partial::Claimed;
pub use reuse::{BaseChunk, Reusable, Reuse, find_reuse};
pub use staging::Staging;
pub use verify::{VerifySummary, verify};

const STAGING: &str = ".staging";
/// Staging of pushes that did not finish, kept with their journal so a repeat can resume.
const PARTIAL: &str = ".partial";
/// The journal inside a staging directory.
const JOURNAL: &str = "journal";
const JOURNAL_MAGIC: &[u8; 8] = b"SCJOURN1";
/// Journal records are made durable in batches of this many chunks (and at the end).
const JOURNAL_BATCH: usize = 32;
/// How long a resuming push waits for the stuck session it supersedes to let go.
const SUPERSEDE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// One journal record: a chunk written and durable (staged entry, chunk index in the file,
/// digest).
pub type JournalRecord = (u32, u64, u128);
const CURRENT: &str = "current";
const MANIFEST_EXT: &str = "manifest";
/// Space a push needs beyond its file bytes (directories, the manifest): 1 MiB plus the
/// manifest's size.
const SPACE_MARGIN: u64 = 1 << 20;

/// Checks a shard set name: `[A-Za-z0-9._-]{1,128}`, not starting with `.`.
pub fn check_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok { Ok(()) } else { Err(StoreError::BadName(name.to_owned())) }
}

/// A version being received, as `status` shows it.
#[derive(Debug, Default)]
pub struct Receiving {
    /// Set when a newer push of the same version supersedes this one.
    pub cancel: std::sync::atomic::AtomicBool,
    /// Bytes staged so far (received and written, resumed, or copied from the current version).
    pub done: AtomicU64,
    /// Bytes of the version on this node.
    pub total: AtomicU64,
    /// Free space this push reserved at admission (its bytes and margin); what it has not
    /// written yet (`reserved - done`) stays reserved until the session ends.
    pub reserved: AtomicU64,
}

/// A replica's root directory.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    keep: usize,
    /// Versions being received: how far each is, and a flag that asks its session to give up.
    receiving: Mutex<std::collections::HashMap<(String, u64), Arc<Receiving>>>,
    /// Most bytes all pushes being received may add up to (0: no limit).
    max_staging: AtomicU64,
    counter: AtomicU64,
    /// One lock per name, held while `current` is read and moved.
    current_locks: Mutex<std::collections::HashMap<String, Arc<Mutex<()>>>>,
    /// Partial stagings older than this are removed (None: kept however old).
    partial_max_age: Mutex<Option<std::time::Duration>>,
    /// Partial stagings beyond this many bytes in all are removed, oldest first (0: no cap).
    partial_max_bytes: AtomicU64,
    /// Held while partials are taken over, kept, or expired.
    partials: Mutex<()>,
    /// Journal received chunks for resumes (off only to measure what journaling costs:
    /// `SHARDCAST_BENCH_NO_JOURNAL`).
    journaling: bool,
}

/// The partial stagings a root keeps for resumes, after expiry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartialStats {
    /// How many there are.
    pub count: u64,
    /// Bytes they take on disk.
    pub bytes: u64,
    /// How many this expiry removed.
    pub removed: u64,
}

impl Store {
    /// Opens (creating if needed) a root that keeps the newest `keep` versions of each name.
    /// Staging left by an earlier process is kept as a partial (when it journaled chunks) or
    /// removed: this process owns the root.
    pub fn open(root: &Path, keep: usize) -> Result<Arc<Self>, StoreError> {
        let staging = root.join(STAGING);
        fs::create_dir_all(&staging).map_err(|e| StoreError::io(format!("cannot create {}", staging.display()), e))?;
        let root =
            fs::canonicalize(root).map_err(|e| StoreError::io(format!("cannot resolve {}", root.display()), e))?;
        fsync_dir(&root).map_err(|e| StoreError::io(format!("cannot sync {}", root.display()), e))?;
        // Staging left by an earlier process: what it journaled is kept as a partial version
        // (a repeated push resumes from it); the rest is removed.
        if let Ok(dir) = fs::read_dir(&staging) {
            for entry in dir.flatten() {
                let path = entry.path();
                // NAME@VERSION.<pid>.<n>: NAME may hold dots, the last two fields do not.
                let key = entry.file_name().to_str().and_then(|n| n.rsplitn(3, '.').nth(2).map(str::to_owned));
                match key {
                    Some(key) if journal_records(&path.join(JOURNAL)).is_some_and(|(_, r)| !r.is_empty()) => {
                        keep_partial(&root, &key, &path)
                    }
                    _ => {
                        let _ = fs::remove_dir_all(&path);
                    }
                }
            }
        }
        Ok(Arc::new(Self {
            root,
            keep: keep.max(1),
            receiving: Mutex::new(std::collections::HashMap::new()),
            max_staging: AtomicU64::new(0),
            counter: AtomicU64::new(0),
            current_locks: Mutex::new(std::collections::HashMap::new()),
            partial_max_age: Mutex::new(None),
            partial_max_bytes: AtomicU64::new(0),
            partials: Mutex::new(()),
            journaling: std::env::var_os("SHARDCAST_BENCH_NO_JOURNAL").is_none(),
        }))
    }

    /// Caps the bytes all pushes being received may add up to (0: no cap); a push that would
    /// go over is refused as busy, with the numbers.
    pub fn set_max_staging(&self, bytes: u64) {
        self.max_staging.store(bytes, Ordering::Relaxed);
    }

    /// Expires partial stagings (see [`Store::expire_partials`]) older than `max_age` (None:
    /// never) or, oldest first, beyond `max_bytes` in all (0: no cap).
    pub fn set_partial_limits(&self, max_age: Option<std::time::Duration>, max_bytes: u64) {
        *self.partial_max_age.lock().expect("store lock") = max_age;
        self.partial_max_bytes.store(max_bytes, Ordering::Relaxed);
    }
    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn manifest_path(&self, name: &str, version: u64) -> PathBuf {
        self.root.join(name).join(format!("{version}.{MANIFEST_EXT}"))
    }

    /// The current published version of `name` and its manifest, if any (an unreadable or
    /// damaged manifest counts as none: its chunks are then simply sent again).
    pub fn current_manifest(&self, name: &str) -> Option<(u64, Manifest, PathBuf)> {
        let v = read_current(&self.root.join(name))?;
        let bytes = fs::read(self.manifest_path(name, v)).ok()?;
        let m = Manifest::decode(&bytes).ok()?;
        Some((v, m, self.root.join(name).join(v.to_string())))
    }

    /// The lock that makes moving `name`'s `current` one step.
    fn current_lock(&self, name: &str) -> Arc<Mutex<()>> {
        let mut locks = self.current_locks.lock().expect("store lock");
        Arc::clone(locks.entry(name.to_owned()).or_default())
    }

    /// The manifest of the published `name@version`, if it is published and its manifest reads
    /// and decodes.
    pub fn published_manifest(&self, name: &str, version: u64) -> Option<Manifest> {
        Manifest::decode(&fs::read(self.manifest_path(name, version)).ok()?).ok()
    }

    /// Whether `name@version` is published.
    pub fn exists(&self, name: &str, version: u64) -> bool {
        self.manifest_path(name, version).exists()
    }

    /// Prepares to receive `name@version`: refuses an existing version, a concurrent push of the
    /// same version, or a push larger than the free space; then creates the staging tree.
    pub fn begin(self: &Arc<Self>, name: &str, version: u64, manifest: &Manifest) -> Result<Staging, StoreError> {
        self.begin_resuming(name, version, manifest, false)
    }
    /// Every shard set under the root with its versions.
    pub fn list(&self) -> Result<Vec<SetStatus>, StoreError> {
        let mut out = Vec::new();
        let dir =
            fs::read_dir(&self.root).map_err(|e| StoreError::io(format!("cannot list {}", self.root.display()), e))?;
        let mut names: Vec<String> = dir
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| check_name(n).is_ok())
            .collect();
        let receiving: Vec<((String, u64), (u64, u64))> = self
            .receiving
            .lock()
            .expect("store lock")
            .iter()
            .map(|(k, r)| (k.clone(), (r.done.load(Ordering::Relaxed), r.total.load(Ordering::Relaxed))))
            .collect();
        for ((name, _), _) in &receiving {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        names.sort();
        for name in names {
            let versions = self.versions(&name);
            let current = read_current(&self.root.join(&name));
            let mut incoming: Vec<(u64, u64, u64)> =
                receiving.iter().filter(|((n, _), _)| *n == name).map(|((_, v), (d, t))| (*v, *d, *t)).collect();
            incoming.sort_unstable();
            if !versions.is_empty() || current.is_some() || !incoming.is_empty() {
                out.push(SetStatus { name, current, versions, receiving: incoming });
            }
        }
        Ok(out)
    }

    /// Published versions of `name`, ascending.
    pub fn versions(&self, name: &str) -> Vec<u64> {
        let mut v: Vec<u64> = fs::read_dir(self.root.join(name))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().into_string().ok()?;
                n.strip_suffix(".manifest")?.parse().ok()
            })
            .collect();
        v.sort_unstable();
        v
    }

    /// The version `current` of `name` points at, if any.
    pub fn current_version(&self, name: &str) -> Option<u64> {
        read_current(&self.root.join(name))
    }

    /// Removes the oldest versions of `name` beyond `keep` (the push's choice, else the store's),
    /// never the current one and never `published` (the version the push just published, even
    /// when it is older than `current`: a push that reported it published must find it there).
    /// Called after a push has reported (deleting a large old version is off the push's
    /// critical path).
    pub fn retain(&self, name: &str, keep: Option<usize>, published: u64) {
        let versions = self.versions(name);
        let current = read_current(&self.root.join(name));
        let keep = keep.unwrap_or(self.keep).max(1);
        let excess = versions.len().saturating_sub(keep);
        for &v in versions.iter().take(excess) {
            if Some(v) == current || v == published {
                continue;
            }
            // Manifest first: the version stops existing before its data goes.
            let _ = fs::remove_file(self.manifest_path(name, v));
            let _ = fs::remove_dir_all(self.root.join(name).join(v.to_string()));
            tracing::info!(name, version = v, "retention: removed old version");
        }
    }
}

fn read_current(dir: &Path) -> Option<u64> {
    fs::read_link(dir.join(CURRENT)).ok()?.to_str()?.parse().ok()
}

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

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{StoreError, VerifyError};
use crate::manifest::{EntryKind, Manifest, digest, set_mode};
use crate::wire::SetStatus;

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

    /// Removes the partial stagings (kept by pushes that did not finish, for a resume) that
    /// are older than the age limit, then the oldest ones until the rest fit the size cap, and
    /// counts what is left. A partial's age is the time since its journal last grew.
    pub fn expire_partials(&self) -> PartialStats {
        let _held = self.partials.lock().expect("store lock");
        let max_age = *self.partial_max_age.lock().expect("store lock");
        let max_bytes = self.partial_max_bytes.load(Ordering::Relaxed);
        let now = std::time::SystemTime::now();
        let mut stats = PartialStats::default();
        // (last change, bytes, path)
        let mut kept: Vec<(std::time::SystemTime, u64, PathBuf)> = Vec::new();
        for entry in fs::read_dir(self.root.join(PARTIAL)).into_iter().flatten().flatten() {
            let path = entry.path();
            let changed = fs::metadata(path.join(JOURNAL))
                .or_else(|_| fs::symlink_metadata(&path))
                .and_then(|m| m.modified())
                .unwrap_or(now);
            let age = now.duration_since(changed).unwrap_or_default();
            if max_age.is_some_and(|max| age > max) {
                remove_partial(&path, "older than the age limit", &mut stats);
                continue;
            }
            kept.push((changed, disk_bytes(&path), path));
        }
        kept.sort();
        let mut total: u64 = kept.iter().map(|k| k.1).sum();
        for (_, bytes, path) in kept {
            if max_bytes > 0 && total > max_bytes {
                total -= bytes;
                remove_partial(&path, "over the size cap of all partials", &mut stats);
            } else {
                stats.count += 1;
                stats.bytes += bytes;
            }
        }
        stats
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

    /// [`Store::begin`], and with `resume` a partial staging of the same version and the same
    /// files (a push that failed or a replica that was killed) is taken over instead of starting
    /// empty: [`Staging::resumed`] lists the chunks it already holds durably. A partial that
    /// does not match is removed.
    pub fn begin_resuming(
        self: &Arc<Self>,
        name: &str,
        version: u64,
        manifest: &Manifest,
        resume: bool,
    ) -> Result<Staging, StoreError> {
        check_name(name)?;
        // The set's directory must be a directory of this root, not a symlink to elsewhere:
        // publishing renames into it, and nothing may land outside the root.
        let set_dir = self.root.join(name);
        if let Ok(m) = fs::symlink_metadata(&set_dir)
            && !m.is_dir()
        {
            return Err(StoreError::io(
                format!(
                    "{} is not a directory of the root (a symlink or a file): refusing to publish through it",
                    set_dir.display()
                ),
                io::Error::new(io::ErrorKind::InvalidInput, "not a directory"),
            ));
        }
        if self.exists(name, version) {
            return Err(StoreError::VersionExists { name: name.into(), version });
        }
        let key = (name.to_owned(), version);
        let cancel = Arc::new(Receiving::default());
        cancel.total.store(manifest.total_bytes(), Ordering::Relaxed);
        let needed =
            manifest.total_bytes() + SPACE_MARGIN + manifest.chunk_count() * 16 + manifest.entries().len() as u64 * 64;
        let mut waited = std::time::Duration::ZERO;
        loop {
            let mut receiving = self.receiving.lock().expect("store lock");
            match receiving.get(&key) {
                None => {
                    let limit = self.max_staging.load(Ordering::Relaxed);
                    let busy: u64 = receiving.values().map(|r| r.total.load(Ordering::Relaxed)).sum();
                    if limit > 0 && busy + manifest.total_bytes() > limit {
                        return Err(StoreError::StagingLimit {
                            receiving: busy,
                            needed: manifest.total_bytes(),
                            limit,
                        });
                    }
                    // Free space is reserved, not only checked: what the pushes being received
                    // have yet to write is not free for this one. Checked and reserved under
                    // the lock, so two pushes cannot both count the same bytes.
                    let reserved: u64 = receiving
                        .values()
                        .map(|r| r.reserved.load(Ordering::Relaxed).saturating_sub(r.done.load(Ordering::Relaxed)))
                        .sum();
                    let available = free_bytes(&self.root)
                        .map_err(|e| StoreError::io(format!("cannot stat {}", self.root.display()), e))?;
                    if needed.saturating_add(reserved) > available {
                        return Err(StoreError::NoSpace { root: self.root.clone(), needed, available, reserved });
                    }
                    cancel.reserved.store(needed, Ordering::Relaxed);
                    receiving.insert(key.clone(), Arc::clone(&cancel));
                    break;
                }
                // A resuming push (the primary repairing its chain, or a repeat after a failure)
                // supersedes an earlier session of the same version that is stuck (its
                // upstream hung or gone): that one is asked to give up, and what it had
                // journaled is resumed below.
                Some(old) if resume && waited < SUPERSEDE_WAIT => {
                    old.cancel.store(true, Ordering::Relaxed);
                }
                Some(_) => return Err(StoreError::Busy { name: name.into(), version }),
            }
            drop(receiving);
            std::thread::sleep(std::time::Duration::from_millis(20));
            waited += std::time::Duration::from_millis(20);
        }
        // From here on the guard in Staging releases the reservation, whatever happens.
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let dir = self.root.join(STAGING).join(format!("{name}@{version}.{}.{n}", std::process::id()));
        let mut staging = Staging {
            store: Arc::clone(self),
            name: name.to_owned(),
            version,
            dir,
            entries: manifest.entries().to_vec(),
            files: Vec::new(),
            done: false,
            plan: manifest.encode_plan(),
            cancel,
            journal: None,
            pending: Vec::new(),
            durable: 0,
            writer: None,
            resumed: Vec::new(),
            keep_current: false,
        };
        // Look again now that this session holds the version: the session it superseded may
        // have published it while this one waited (its reservation goes only after publish).
        // A version that has its manifest is never removed.
        if self.exists(name, version) {
            return Err(StoreError::VersionExists { name: name.into(), version });
        }
        // A version directory without its manifest is a leftover of a crash during publish.
        let leftover = self.root.join(name).join(version.to_string());
        if leftover.exists() {
            fs::remove_dir_all(&leftover)
                .map_err(|e| StoreError::io(format!("cannot remove leftover {}", leftover.display()), e))?;
        }
        let partial = self.root.join(PARTIAL).join(format!("{name}@{version}"));
        let partials = self.partials.lock().expect("store lock");
        if partial.exists() {
            let plan = manifest.encode_plan();
            match journal_records(&partial.join(JOURNAL)) {
                Some((header, records)) if resume && header == plan && fs::rename(&partial, &staging.dir).is_ok() => {
                    sync_parents(&[&self.root.join(PARTIAL), &self.root.join(STAGING)]);
                    staging.open_existing()?;
                    // The journal says which chunks were written and synced, but after a power
                    // loss a file can come back short or as zeros (its directory entry or its
                    // blocks were not durable): a chunk counts as held only when its bytes
                    // still hash to the journaled digest.
                    let journaled = records.len();
                    let records = staging.rehash(records, manifest.chunk_size());
                    if records.len() < journaled {
                        tracing::warn!(
                            name,
                            version,
                            bad = journaled - records.len(),
                            "journaled chunks whose bytes no longer match their digest are received again"
                        );
                    }
                    tracing::info!(name, version, chunks = records.len(), "resuming a partial staging");
                    let cs = u64::from(manifest.chunk_size());
                    let bytes: u64 = records
                        .iter()
                        .filter_map(|&(e, c, _)| {
                            staging.entries.get(e as usize).map(|e| e.size.saturating_sub(c * cs).min(cs))
                        })
                        .sum();
                    staging.cancel.done.store(bytes, Ordering::Relaxed);
                    staging.resumed = records;
                    drop(partials);
                    return Ok(staging);
                }
                _ => {
                    let _ = fs::remove_dir_all(&partial);
                }
            }
        }
        drop(partials);
        staging.create()?;
        Ok(staging)
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

/// Bytes available to unprivileged writers on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut st: libc::statvfs = unsafe_zeroed_statvfs();
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail * st.f_frsize)
}

fn unsafe_zeroed_statvfs() -> libc::statvfs {
    // SAFETY: statvfs is a plain C struct of integers, for which all-zero bytes are valid.
    unsafe { std::mem::zeroed() }
}

fn fsync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Syncs directories whose entries were renamed (best effort: the move itself succeeded, and a
/// move that is lost to a power loss leaves a partial or staging that is found again).
fn sync_parents(dirs: &[&Path]) {
    for d in dirs {
        if let Err(e) = fsync_dir(d) {
            tracing::warn!("cannot sync {}: {e}", d.display());
        }
    }
}

/// Bytes of an earlier published version copied into staging instead of received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reuse {
    /// The published file they come from.
    pub from: PathBuf,
    /// The staging entry they go to.
    pub entry: usize,
    /// Byte offset (the same in both files).
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Which chunks of the push described by `manifest` a node already holds in its current version
/// (`old`, published under `old_dir`): a chunk counts when the file at the same path has, at the
/// same chunk index, a chunk of the same length and digest (same chunk size). `wanted`: the
/// entries this node stores (None: all); `map`: their staging entry indices (None: the same).
/// Chunks for which `skip` is true are left out (held already some other way). Returns the
/// held chunks as `(start, len)` ranges of `manifest`'s chunk numbers, and the copies that fill
/// them in.
pub fn find_reuse(
    manifest: &Manifest,
    wanted: Option<&[u32]>,
    map: Option<&[Option<usize>]>,
    old: &Manifest,
    old_dir: &Path,
    skip: &dyn Fn(u64) -> bool,
) -> (Vec<(u64, u64)>, Vec<Reuse>) {
    let (mut held, mut copies) = (Vec::new(), Vec::new());
    if old.chunk_size() != manifest.chunk_size() {
        return (held, copies);
    }
    let old_index: std::collections::HashMap<&str, usize> =
        old.entries().iter().enumerate().map(|(i, e)| (e.path.as_str(), i)).collect();
    let all: Vec<u32>;
    let wanted = match wanted {
        Some(w) => w,
        None => {
            all = (0..manifest.entries().len() as u32).collect();
            &all
        }
    };
    let cs = u64::from(manifest.chunk_size());
    for &e in wanted {
        let e = e as usize;
        let entry = &manifest.entries()[e];
        let Some(&oi) = old_index.get(entry.path.as_str()) else { continue };
        if entry.kind != EntryKind::File || old.entries()[oi].kind != EntryKind::File {
            continue;
        }
        let (new_r, old_r) = (manifest.chunk_range(e), old.chunk_range(oi));
        let staging_entry = map.map_or(Some(e), |m| m[e]).expect("a wanted entry is staged");
        let mut run: Option<(u64, u64)> = None; // (first chunk index in file, count)
        let flush = |run: (u64, u64), held: &mut Vec<(u64, u64)>, copies: &mut Vec<Reuse>| {
            held.push((new_r.start + run.0, run.1));
            let offset = run.0 * cs;
            let end = ((run.0 + run.1) * cs).min(entry.size);
            copies.push(Reuse { from: old_dir.join(&entry.path), entry: staging_entry, offset, len: end - offset });
        };
        for i in 0..(new_r.end - new_r.start) {
            let same = !skip(new_r.start + i) && old_r.start + i < old_r.end && {
                let (a, b) = (manifest.chunk(new_r.start + i), old.chunk(old_r.start + i));
                a.zip(b).is_some_and(|(a, b)| a.len == b.len && a.digest == b.digest)
            };
            run = match (run, same) {
                (Some((s, n)), true) => Some((s, n + 1)),
                (None, true) => Some((i, 1)),
                (Some(r), false) => {
                    flush(r, &mut held, &mut copies);
                    None
                }
                (None, false) => None,
            };
        }
        if let Some(r) = run {
            flush(r, &mut held, &mut copies);
        }
    }
    (held, copies)
}

/// Copies `len` bytes at `offset` from `src` to the same offset of `dst`: copy_file_range (a
/// reflink or an in-kernel copy where the filesystem can), else read and write.
fn copy_range(src: &File, dst: &File, offset: u64, len: u64) -> io::Result<()> {
    let (mut done, mut kernel) = (0u64, true);
    let mut buf = Vec::new();
    while done < len {
        let (mut off_in, mut off_out) = ((offset + done) as libc::loff_t, (offset + done) as libc::loff_t);
        let want = (len - done).min(1 << 30) as usize;
        if kernel {
            // SAFETY: valid descriptors and offsets we own; no memory is passed.
            let n =
                unsafe { libc::copy_file_range(src.as_raw_fd(), &mut off_in, dst.as_raw_fd(), &mut off_out, want, 0) };
            match n {
                n if n > 0 => {
                    done += n as u64;
                    continue;
                }
                0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the earlier version is shorter")),
                _ => {
                    let e = io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EXDEV | libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP) => kernel = false,
                        Some(libc::EINTR) => {}
                        _ => return Err(e),
                    }
                    continue;
                }
            }
        }
        use std::os::unix::fs::FileExt;
        buf.resize(want.min(1 << 20), 0);
        let n = src.read_at(&mut buf, offset + done)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the earlier version is shorter"));
        }
        dst.write_all_at(&buf[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Removes one expired partial staging.
fn remove_partial(path: &Path, why: &str, stats: &mut PartialStats) {
    match fs::remove_dir_all(path) {
        Ok(()) => {
            stats.removed += 1;
            tracing::info!(partial = %path.display(), "removed a partial staging: {why}");
        }
        Err(e) => tracing::warn!("cannot remove the partial staging {}: {e}", path.display()),
    }
}

/// Bytes the files under `dir` take on disk (allocated blocks: staged files are sparse until
/// their chunks arrive).
fn disk_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.metadata() else { continue };
            total += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

/// Moves a staging directory to `.partial/KEY` (KEY = NAME@VERSION), replacing an older one.
fn keep_partial(root: &Path, key: &str, dir: &Path) {
    let partials = root.join(PARTIAL);
    let target = partials.join(key);
    let moved = fs::create_dir_all(&partials)
        .and_then(|()| match fs::remove_dir_all(&target) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        })
        .and_then(|()| fs::rename(dir, &target));
    if moved.is_ok()
        && let Some(from) = dir.parent()
    {
        sync_parents(&[&partials, from, root]);
    }
    match moved {
        Ok(()) => tracing::info!(partial = %target.display(), "kept what was received for a resume"),
        Err(e) => {
            tracing::warn!("cannot keep the partial staging {}: {e}", dir.display());
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// A journal's header (the staged plan) and its complete records; None when unreadable.
fn journal_records(path: &Path) -> Option<(Vec<u8>, Vec<JournalRecord>)> {
    let bytes = fs::read(path).ok()?;
    let rest = bytes.strip_prefix(&JOURNAL_MAGIC[..])?;
    let n = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?) as usize;
    let header = rest.get(8..8usize.checked_add(n)?)?.to_vec();
    // A torn last record (killed while appending) is ignored: it was not durable.
    let records = rest[8 + n..]
        .chunks_exact(28)
        .map(|r| {
            let entry = u32::from_le_bytes(r[..4].try_into().expect("4 bytes"));
            let chunk = u64::from_le_bytes(r[4..12].try_into().expect("8 bytes"));
            let digest = u128::from_le_bytes(r[12..].try_into().expect("16 bytes"));
            (entry, chunk, digest)
        })
        .collect();
    Some((header, records))
}

/// A batch for the journal's thread: records, and the files their chunks were written to.
type JournalBatch = (Vec<JournalRecord>, Vec<Arc<File>>);

/// The thread that makes journal batches durable, off the session's event loop. For each batch
/// it syncs the files the chunks were written to first, then appends the records and syncs the
/// journal: the journal never names bytes that are not durable. It stops at the first error
/// (later batches are then not journaled, which costs a resume only the chunks they name).
#[derive(Debug)]
struct JournalWriter {
    tx: crossbeam_channel::Sender<JournalBatch>,
    thread: std::thread::JoinHandle<(usize, io::Result<()>)>,
}

impl JournalWriter {
    fn start(mut journal: File) -> io::Result<Self> {
        // A rendezvous channel: a batch is handed over only once the previous one is durable,
        // so at most two batches (the one being synced and the one filling) are not durable
        // yet. Unbounded, a disk slower than the link let the undurable window grow without
        // bound, and a resume after a crash then sent all of it again.
        let (tx, rx) = crossbeam_channel::bounded::<JournalBatch>(0);
        let thread = std::thread::Builder::new().name("shardcast-journal".into()).spawn(move || {
            let mut durable = 0;
            for (records, files) in rx {
                if let Err(e) = append_durably(&mut journal, &records, &files) {
                    return (durable, Err(e));
                }
                durable += records.len();
            }
            (durable, Ok(()))
        })?;
        Ok(Self { tx, thread })
    }

    fn send(&self, records: Vec<JournalRecord>, files: Vec<Arc<File>>) {
        // A thread that stopped at an error has said so when it is finished.
        let _ = self.tx.send((records, files));
    }

    /// Waits until every batch sent is durable (or the thread failed): the records made
    /// durable, and the first error.
    fn finish(self) -> (usize, io::Result<()>) {
        drop(self.tx);
        self.thread.join().unwrap_or_else(|_| (0, Err(io::Error::other("the journal thread panicked"))))
    }
}

/// Syncs `files`, then appends `records` to the journal and syncs it.
fn append_durably(journal: &mut File, records: &[JournalRecord], files: &[Arc<File>]) -> io::Result<()> {
    for f in files {
        f.sync_data()?;
    }
    let mut buf = Vec::with_capacity(records.len() * 28);
    for &(entry, chunk, digest) in records {
        buf.extend_from_slice(&entry.to_le_bytes());
        buf.extend_from_slice(&chunk.to_le_bytes());
        buf.extend_from_slice(&digest.to_le_bytes());
    }
    io::Write::write_all(journal, &buf)?;
    journal.sync_data()
}

/// A version being received. Dropped without [`Staging::publish`], it removes itself.
#[derive(Debug)]
pub struct Staging {
    store: Arc<Store>,
    name: String,
    version: u64,
    dir: PathBuf,
    entries: Vec<crate::manifest::Entry>,
    /// Shared with the journal's thread, which syncs them.
    files: Vec<Option<Arc<File>>>,
    done: bool,
    /// The staged manifest's plan encoding: the journal's header (a partial is resumed only by
    /// a push of the same files).
    plan: Vec<u8>,
    /// Progress and the flag a newer push of the same version sets.
    cancel: Arc<Receiving>,
    /// Which chunks are written and durable: (entry, chunk index in the file, digest) records.
    journal: Option<File>,
    /// Records of written chunks not yet made durable.
    pending: Vec<JournalRecord>,
    /// Records made durable so far (counted when the journal's thread is done).
    durable: usize,
    /// The journal's thread, once the first batch is sent (boxed: a session holds its staging
    /// in an enum beside the primary's small variant).
    writer: Option<Box<JournalWriter>>,
    /// Records taken over from a partial staging.
    resumed: Vec<JournalRecord>,
    /// Publish beside `current` without moving it (a key that may not replace it).
    keep_current: bool,
}

impl Staging {
    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Makes the staged tree's directory entries durable (the files' and directories' names, the
    /// journal's, and the staging directory's own in `.staging`): a journal record is only
    /// worth something if the file it names is still there after a power loss.
    fn sync_dirs(&self) -> Result<(), StoreError> {
        let data = self.data();
        let err = |p: &Path, e| StoreError::io(format!("cannot sync {}", p.display()), e);
        for e in self.entries.iter().rev().filter(|e| e.kind == EntryKind::Dir) {
            let path = data.join(&e.path);
            fsync_dir(&path).map_err(|err_| err(&path, err_))?;
        }
        for p in [data, self.dir.clone(), self.store.root.join(STAGING)] {
            fsync_dir(&p).map_err(|e| err(&p, e))?;
        }
        Ok(())
    }

    /// The journal `records` whose chunk bytes, read back from the staged files, still have
    /// the journaled digest (xxh3-128).
    fn rehash(&self, records: Vec<JournalRecord>, chunk_size: u32) -> Vec<JournalRecord> {
        use std::os::unix::fs::FileExt;
        let cs = u64::from(chunk_size);
        let mut buf = vec![0u8; chunk_size as usize];
        records
            .into_iter()
            .filter(|&(e, c, d)| {
                let (Some(entry), Some(Some(f))) = (self.entries.get(e as usize), self.files.get(e as usize)) else {
                    return false;
                };
                let Some(offset) = c.checked_mul(cs).filter(|&o| o < entry.size) else { return false };
                let b = &mut buf[..(entry.size - offset).min(cs) as usize];
                f.read_exact_at(b, offset).is_ok() && digest(b) == d
            })
            .collect()
    }

    fn create(&mut self) -> Result<(), StoreError> {
        let data = self.data();
        let io_err = |p: &Path, e| StoreError::io(format!("cannot create {}", p.display()), e);
        fs::create_dir_all(&data).map_err(|e| io_err(&data, e))?;
        self.create_journal()?;
        for e in &self.entries {
            let path = data.join(&e.path);
            match e.kind {
                // Directories stay writable until sync; their modes are applied last.
                EntryKind::Dir => fs::create_dir(&path).map_err(|err| io_err(&path, err))?,
                EntryKind::File => {
                    let f = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(&path)
                        .map_err(|err| io_err(&path, err))?;
                    f.set_len(e.size).map_err(|err| io_err(&path, err))?;
                    // Only files with chunks keep a descriptor open for the data path.
                    self.files.push((e.size > 0).then(|| Arc::new(f)));
                    continue;
                }
            }
            self.files.push(None);
        }
        self.sync_dirs()
    }

    fn create_journal(&mut self) -> Result<(), StoreError> {
        let path = self.dir.join(JOURNAL);
        let mut f = File::create(&path).map_err(|e| StoreError::io(format!("cannot create {}", path.display()), e))?;
        let mut head = JOURNAL_MAGIC.to_vec();
        head.extend_from_slice(&(self.plan.len() as u64).to_le_bytes());
        head.extend_from_slice(&self.plan);
        io::Write::write_all(&mut f, &head)
            .map_err(|e| StoreError::io(format!("cannot write {}", path.display()), e))?;
        self.journal = Some(f);
        Ok(())
    }

    /// Takes over a partial staging's files (already sized) and its journal.
    fn open_existing(&mut self) -> Result<(), StoreError> {
        let data = self.data();
        // The journal can be durable while `data/` is not (a power loss before its directory
        // entry was synced), or gone (a crash after publish renamed it away, before the manifest
        // was written): recreate what is missing; the journaled chunks of files that come back
        // empty fail their re-hash and are received again.
        fs::create_dir_all(&data).map_err(|e| StoreError::io(format!("cannot recreate {}", data.display()), e))?;
        for e in &self.entries {
            let path = data.join(&e.path);
            let err = |err| StoreError::io(format!("cannot reopen {}", path.display()), err);
            match e.kind {
                EntryKind::Dir => {
                    fs::create_dir_all(&path).map_err(err)?;
                    self.files.push(None);
                }
                EntryKind::File => {
                    if let Some(parent) = path.parent() {
                        fs::create_dir_all(parent).map_err(err)?;
                    }
                    let f = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .mode(0o600)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(&path)
                        .map_err(err)?;
                    f.set_len(e.size).map_err(err)?;
                    self.files.push((e.size > 0).then(|| Arc::new(f)));
                }
            }
        }
        let path = self.dir.join(JOURNAL);
        let f = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| StoreError::io(format!("cannot reopen {}", path.display()), e))?;
        self.journal = Some(f);
        // Files that were missing came back empty: their names must be durable too.
        self.sync_dirs()
    }

    /// This staging's progress and the flag a newer push of the same version sets to make it
    /// give up.
    pub fn receiving(&self) -> Arc<Receiving> {
        Arc::clone(&self.cancel)
    }

    /// Publishes without moving `current` (the pusher's key may not replace it).
    pub fn keep_current(&mut self) {
        self.keep_current = true;
    }

    /// Chunks a taken-over partial staging already holds: (entry, chunk index, digest).
    pub fn resumed(&self) -> &[JournalRecord] {
        &self.resumed
    }

    /// Notes that chunk `chunk` of entry `entry` (with `digest`) is written; every
    /// `JOURNAL_BATCH` chunks the batch goes to the journal's thread, which syncs the files and
    /// then makes the records durable (the session's event loop never waits for an fsync).
    pub fn record(&mut self, entry: usize, chunk: u64, digest: u128, len: u32) {
        self.cancel.done.fetch_add(u64::from(len), Ordering::Relaxed);
        if !self.store.journaling {
            return;
        }
        self.pending.push((entry as u32, chunk, digest));
        if self.pending.len() >= JOURNAL_BATCH {
            self.send_batch();
        }
    }

    /// Hands the pending records, with the files they were written to, to the journal's
    /// thread (started with the first batch).
    fn send_batch(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        if self.writer.is_none() {
            let Some(journal) = self.journal.take() else { return };
            match JournalWriter::start(journal) {
                Ok(w) => self.writer = Some(Box::new(w)),
                Err(e) => {
                    // Not journaled: a resume receives these chunks again.
                    tracing::warn!("journal: cannot start its thread: {e}");
                    self.pending.clear();
                    return;
                }
            }
        }
        let mut entries = HashSet::new();
        let files = self
            .pending
            .iter()
            .filter(|&&(e, _, _)| entries.insert(e))
            .filter_map(|&(e, _, _)| self.files.get(e as usize).cloned().flatten())
            .collect();
        let records = std::mem::take(&mut self.pending);
        if let Some(w) = &self.writer {
            w.send(records, files);
        }
    }

    /// Makes every pending record durable and waits for the journal's thread to finish.
    fn flush_journal(&mut self) -> io::Result<()> {
        self.send_batch();
        match self.writer.take() {
            Some(w) => {
                let (durable, result) = w.finish();
                self.durable += durable;
                result
            }
            None => Ok(()),
        }
    }

    /// The descriptor chunks of entry `i` are written to.
    pub fn fd(&self, entry: usize) -> Option<RawFd> {
        self.files.get(entry)?.as_ref().map(|f| f.as_raw_fd())
    }

    /// Starts copying `copies` (chunks this node already holds) into the staged files on a
    /// thread; the push joins it before syncing. The ranges never overlap what is received.
    pub fn spawn_reuse(
        &self,
        copies: Vec<Reuse>,
    ) -> Result<std::thread::JoinHandle<Result<(), StoreError>>, StoreError> {
        let mut jobs = Vec::with_capacity(copies.len());
        for c in copies {
            let f = self.files.get(c.entry).and_then(Option::as_ref).ok_or_else(|| {
                StoreError::io(
                    format!("no staged file for entry {}", c.entry),
                    io::Error::other("not a file with data"),
                )
            })?;
            let f = f.try_clone().map_err(|e| StoreError::io("cannot duplicate a staged file", e))?;
            jobs.push((c, f));
        }
        let progress = Arc::clone(&self.cancel);
        std::thread::Builder::new()
            .name("shardcast-reuse".into())
            .spawn(move || {
                for (c, dst) in jobs {
                    let err = |e| StoreError::io(format!("cannot copy held chunks from {}", c.from.display()), e);
                    let src = File::open(&c.from).map_err(err)?;
                    copy_range(&src, &dst, c.offset, c.len).map_err(err)?;
                    progress.done.fetch_add(c.len, Ordering::Relaxed);
                }
                Ok(())
            })
            .map_err(|e| StoreError::io("cannot start a thread", e))
    }

    /// Applies modes and fsyncs every file and directory.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        let data = self.data();
        let entries = &self.entries;
        for (i, e) in entries.iter().enumerate() {
            if e.kind == EntryKind::File {
                let path = data.join(&e.path);
                let err = |err| StoreError::io(format!("cannot sync {}", path.display()), err);
                match &self.files[i] {
                    Some(f) => f.sync_all().map_err(err)?,
                    None => File::open(&path).and_then(|f| f.sync_all()).map_err(err)?,
                }
                set_mode(&path, e.mode)
                    .map_err(|err| StoreError::io(format!("cannot chmod {}", path.display()), err))?;
            }
        }
        self.files.clear();
        // Directories deepest first: a read-only parent must not stop its children's changes.
        for e in entries.iter().rev().filter(|e| e.kind == EntryKind::Dir) {
            let path = data.join(&e.path);
            fsync_dir(&path).map_err(|err| StoreError::io(format!("cannot sync {}", path.display()), err))?;
            set_mode(&path, e.mode).map_err(|err| StoreError::io(format!("cannot chmod {}", path.display()), err))?;
        }
        fsync_dir(&data).map_err(|err| StoreError::io(format!("cannot sync {}", data.display()), err))?;
        Ok(())
    }

    /// Publishes the synced version with its completed `manifest`: data into place, then the
    /// manifest, then `current`.
    pub fn publish(mut self, manifest: &Manifest) -> Result<(), StoreError> {
        let store = &self.store;
        let set_dir = store.root.join(&self.name);
        let io_err = |what: String, e| StoreError::io(what, e);
        if !set_dir.is_dir() {
            fs::create_dir_all(&set_dir).map_err(|e| io_err(format!("cannot create {}", set_dir.display()), e))?;
            // The name's directory is an entry of the root: durable before anything in it is.
            fsync_dir(&store.root).map_err(|e| io_err(format!("cannot sync {}", store.root.display()), e))?;
        }
        let target = set_dir.join(self.version.to_string());
        fs::rename(self.data(), &target)
            .map_err(|e| io_err(format!("cannot move staged data to {}", target.display()), e))?;
        // The data's new name is durable before the manifest that makes it a version.
        fsync_dir(&set_dir).map_err(|e| io_err(format!("cannot sync {}", set_dir.display()), e))?;
        // The data has moved: if anything below fails, the version directory (without manifest)
        // is a leftover that the next push of this version removes.
        let tmp = set_dir.join(format!(".{}.manifest.tmp", self.version));
        let manifest_path = store.manifest_path(&self.name, self.version);
        (|| {
            let mut f = File::create(&tmp)?;
            io::Write::write_all(&mut f, &manifest.encode())?;
            f.sync_all()?;
            fs::rename(&tmp, &manifest_path)
        })()
        .map_err(|e| io_err(format!("cannot write {}", manifest_path.display()), e))?;
        // `current` moves forward only: publishing an older version keeps the newer one current.
        // The read, the comparison and the rename are one step per name (concurrent publishes
        // of one name would otherwise move it backwards), and each publish has its own
        // temporary link.
        if !self.keep_current {
            let lock = store.current_lock(&self.name);
            let _moving = lock.lock().expect("current lock");
            if read_current(&set_dir).is_none_or(|c| c < self.version) {
                let n = store.counter.fetch_add(1, Ordering::Relaxed);
                let link_tmp = set_dir.join(format!(".current.{}.{n}.tmp", self.version));
                std::os::unix::fs::symlink(self.version.to_string(), &link_tmp)
                    .and_then(|()| fs::rename(&link_tmp, set_dir.join(CURRENT)))
                    .map_err(|e| {
                        let _ = fs::remove_file(&link_tmp);
                        io_err(format!("cannot update {}/current", set_dir.display()), e)
                    })?;
            }
        }
        fsync_dir(&set_dir).map_err(|e| io_err(format!("cannot sync {}", set_dir.display()), e))?;
        self.done = true;
        let _ = fs::remove_dir_all(&self.dir);
        tracing::info!(name = %self.name, version = self.version, "published");
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            // What was written and synced is kept as a partial version, so that a repeated push
            // (or a repaired chain) resumes instead of starting over.
            let flushed = self.flush_journal();
            if let Err(e) = &flushed {
                tracing::warn!("journal: {e}");
            }
            let kept = flushed.is_ok() && self.durable + self.resumed.len() > 0;
            self.files.clear();
            self.journal = None;
            if kept {
                let _held = self.store.partials.lock().expect("store lock");
                keep_partial(&self.store.root, &format!("{}@{}", self.name, self.version), &self.dir);
            } else {
                let _ = fs::remove_dir_all(&self.dir);
            }
        }
        let mut receiving = self.store.receiving.lock().expect("store lock");
        if receiving.get(&(self.name.clone(), self.version)).is_some_and(|c| Arc::ptr_eq(c, &self.cancel)) {
            receiving.remove(&(self.name.clone(), self.version));
        }
    }
}

/// What `verify` checked.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifySummary {
    /// Shard set name.
    pub name: String,
    /// The version checked.
    pub version: u64,
    /// Files checked.
    pub files: usize,
    /// Bytes hashed.
    pub bytes: u64,
    /// Chunks hashed.
    pub chunks: u64,
}

/// Re-hashes a published version (default: `current`) against its manifest, and checks that
/// no file is missing, extra, of another size or mode.
pub fn verify(root: &Path, name: &str, version: Option<u64>) -> Result<VerifySummary, VerifyError> {
    let set_dir = root.join(name);
    let version = match version {
        Some(v) => v,
        None => read_current(&set_dir)
            .ok_or_else(|| VerifyError::NotFound(format!("{name} has no current version under {}", root.display())))?,
    };
    let mpath = set_dir.join(format!("{version}.{MANIFEST_EXT}"));
    let bytes = fs::read(&mpath).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            VerifyError::NotFound(format!("{name}@{version} is not published under {}", root.display()))
        } else {
            VerifyError::Manifest { path: mpath.clone(), error: e.to_string() }
        }
    })?;
    let manifest =
        Manifest::decode(&bytes).map_err(|e| VerifyError::Manifest { path: mpath.clone(), error: e.to_string() })?;
    let data = set_dir.join(version.to_string());
    let mismatch = |path: &str, what: String| VerifyError::Mismatch { path: format!("{name}/{version}/{path}"), what };
    let mut buf = vec![0u8; manifest.chunk_size() as usize];
    let mut listed = HashSet::new();
    for (i, e) in manifest.entries().iter().enumerate() {
        listed.insert(e.path.clone());
        let path = data.join(&e.path);
        let meta = fs::symlink_metadata(&path).map_err(|err| mismatch(&e.path, format!("missing ({err})")))?;
        let kind_ok = match e.kind {
            EntryKind::Dir => meta.is_dir(),
            EntryKind::File => meta.is_file(),
        };
        if !kind_ok {
            return Err(mismatch(&e.path, "is not of the kind the manifest lists".into()));
        }
        if meta.mode() & 0o7777 != e.mode {
            return Err(mismatch(&e.path, format!("mode {:o}, manifest says {:o}", meta.mode() & 0o7777, e.mode)));
        }
        if e.kind == EntryKind::File {
            if meta.len() != e.size {
                return Err(mismatch(&e.path, format!("size {}, manifest says {}", meta.len(), e.size)));
            }
            let f = File::open(&path)
                .map_err(|err| VerifyError::Io { context: format!("cannot open {}", path.display()), source: err })?;
            for seq in manifest.chunk_range(i) {
                let c = manifest.chunk(seq).expect("chunk in range");
                let b = &mut buf[..c.len as usize];
                std::os::unix::fs::FileExt::read_exact_at(&f, b, c.offset).map_err(|err| VerifyError::Io {
                    context: format!("cannot read {}", path.display()),
                    source: err,
                })?;
                if digest(b) != c.digest {
                    return Err(mismatch(&e.path, format!("chunk at offset {} does not match its digest", c.offset)));
                }
            }
        }
    }
    // Nothing extra.
    let mut stack = vec![(data.clone(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let rd = fs::read_dir(&dir)
            .map_err(|err| VerifyError::Io { context: format!("cannot list {}", dir.display()), source: err })?;
        for entry in rd.flatten() {
            let n = entry.file_name().to_string_lossy().into_owned();
            let child = if rel.is_empty() { n } else { format!("{rel}/{n}") };
            if !listed.contains(&child) {
                return Err(mismatch(&child, "is not in the manifest".into()));
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push((entry.path(), child));
            }
        }
    }
    Ok(VerifySummary {
        name: name.to_owned(),
        version,
        files: manifest.file_count(),
        bytes: manifest.total_bytes(),
        chunks: manifest.chunk_count(),
    })
}

//! Partial stagings: taking one over for a resume, and expiring the ones no push came back for.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::{fs, io};

use crate::error::StoreError;
use crate::manifest::Manifest;

use super::disk::sync_parents;
use super::journal::journal_records;
use super::{
    JOURNAL, PARTIAL, PartialStats, Receiving, SPACE_MARGIN, STAGING, SUPERSEDE_WAIT, Staging, Store, check_name,
    free_bytes,
};

impl Store {
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

    /// [`Store::begin`], and with `resume` a partial staging of the same version and the same
    /// files (a push that failed or a replica that was killed) is taken over instead of starting
    /// empty: [`Staging::resumed`] lists the chunks it already holds durably. A partial that
    /// does not match is removed. [`Store::claim`] then [`Claimed::open`].
    pub fn begin_resuming(
        self: &Arc<Self>,
        name: &str,
        version: u64,
        manifest: &Manifest,
        resume: bool,
    ) -> Result<Staging, StoreError> {
        self.claim(name, version, manifest, resume)?.open(manifest)
    }

    /// The first half of [`Store::begin_resuming`]: holds `NAME@VERSION` for this session
    /// (with `resume`, an earlier stuck session of it gives up first and keeps its partial),
    /// without touching the partial yet. Cheap, so that a relay holds the version before it
    /// dials on, and takes the partial over ([`Claimed::open`], which re-hashes it) while the
    /// rest of the chain forms.
    pub fn claim(
        self: &Arc<Self>,
        name: &str,
        version: u64,
        manifest: &Manifest,
        resume: bool,
    ) -> Result<Claimed, StoreError> {
        check_name(name)?;
        self.check_set_dir(name)?;
        if self.exists(name, version) {
            return Err(StoreError::VersionExists { name: name.into(), version });
        }
        let cancel = self.reserve(name, version, manifest, resume)?;
        // From here on the guard in Staging releases the reservation, whatever happens.
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let dir = self.root.join(STAGING).join(format!("{name}@{version}.{}.{n}", std::process::id()));
        let staging = Staging::new(Arc::clone(self), name, version, dir, manifest, cancel);
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
        Ok(Claimed { staging, resume })
    }

    /// The set's directory must be a directory of this root, not a symlink to elsewhere:
    /// publishing renames into it, and nothing may land outside the root.
    fn check_set_dir(&self, name: &str) -> Result<(), StoreError> {
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
        Ok(())
    }

    /// Registers `NAME@VERSION` as being received, within the staging limit, with its free
    /// space reserved; with `resume`, an earlier stuck session of the same version is asked to
    /// give up first (for up to [`SUPERSEDE_WAIT`]).
    fn reserve(
        &self,
        name: &str,
        version: u64,
        manifest: &Manifest,
        resume: bool,
    ) -> Result<Arc<Receiving>, StoreError> {
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
                    receiving.insert(key, Arc::clone(&cancel));
                    return Ok(cancel);
                }
                // A resuming push (the primary repairing its chain, or a repeat after a failure)
                // supersedes an earlier session of the same version that is stuck (its
                // upstream hung or gone): that one is asked to give up, and what it had
                // journaled is resumed by the caller.
                Some(old) if resume && waited < SUPERSEDE_WAIT => {
                    old.cancel.store(true, Ordering::Relaxed);
                }
                Some(_) => return Err(StoreError::Busy { name: name.into(), version }),
            }
            drop(receiving);
            std::thread::sleep(std::time::Duration::from_millis(20));
            waited += std::time::Duration::from_millis(20);
        }
    }

    /// With `resume`, takes over the partial staging of the same version and the same files
    /// (returns true); a partial that does not match is removed (returns false).
    fn take_over_partial(&self, staging: &mut Staging, manifest: &Manifest, resume: bool) -> Result<bool, StoreError> {
        let (name, version) = (staging.name.clone(), staging.version);
        let partial = self.root.join(PARTIAL).join(format!("{name}@{version}"));
        let _partials = self.partials.lock().expect("store lock");
        if !partial.exists() {
            return Ok(false);
        }
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
                Ok(true)
            }
            _ => {
                let _ = fs::remove_dir_all(&partial);
                Ok(false)
            }
        }
    }
}

/// A version held for a session by [`Store::claim`], its staging not yet opened. Dropping it
/// releases the version (and leaves the partial, if any, where it was).
#[derive(Debug)]
pub struct Claimed {
    staging: Staging,
    resume: bool,
}

impl Claimed {
    /// Whether [`Claimed::open`] has a partial staging to take over (and re-hash).
    pub fn has_partial(&self) -> bool {
        let st = &self.staging;
        self.resume && st.store.root.join(PARTIAL).join(format!("{}@{}", st.name, st.version)).exists()
    }

    /// Opens the staging: takes the partial over (with `resume`, re-hashing its journaled
    /// chunks) or creates it empty.
    pub fn open(mut self, manifest: &Manifest) -> Result<Staging, StoreError> {
        let store = Arc::clone(&self.staging.store);
        if !store.take_over_partial(&mut self.staging, manifest, self.resume)? {
            self.staging.create()?;
        }
        Ok(self.staging)
    }
}

/// Removes one expired partial staging.
pub(super) fn remove_partial(path: &Path, why: &str, stats: &mut PartialStats) {
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
pub(super) fn disk_bytes(dir: &Path) -> u64 {
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
pub(super) fn keep_partial(root: &Path, key: &str, dir: &Path) {
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

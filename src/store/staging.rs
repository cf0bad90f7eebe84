//! A push being received: its staging directory, journal, sync and atomic publish.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::{fs, io};

use crate::error::StoreError;
use crate::manifest::{EntryKind, Manifest, digest, set_mode};

use super::disk::fsync_dir;
use super::journal::JournalWriter;
use super::partial::keep_partial;
use super::reuse::copy_range;
use super::{
    CURRENT, JOURNAL, JOURNAL_BATCH, JOURNAL_MAGIC, JournalRecord, Receiving, Reuse, STAGING, Store, read_current,
};

/// A version being received. Dropped without [`Staging::publish`], it removes itself.
#[derive(Debug)]
pub struct Staging {
    pub(super) store: Arc<Store>,
    pub(super) name: String,
    pub(super) version: u64,
    pub(super) dir: PathBuf,
    pub(super) entries: Vec<crate::manifest::Entry>,
    /// Shared with the journal's thread, which syncs them.
    pub(super) files: Vec<Option<Arc<File>>>,
    pub(super) done: bool,
    /// The staged manifest's plan encoding: the journal's header (a partial is resumed only by
    /// a push of the same files).
    pub(super) plan: Vec<u8>,
    /// Progress and the flag a newer push of the same version sets.
    pub(super) cancel: Arc<Receiving>,
    /// Which chunks are written and durable: (entry, chunk index in the file, digest) records.
    pub(super) journal: Option<File>,
    /// Records of written chunks not yet made durable.
    pub(super) pending: Vec<JournalRecord>,
    /// Records made durable so far (counted when the journal's thread is done).
    pub(super) durable: usize,
    /// The journal's thread, once the first batch is sent (boxed: a session holds its staging
    /// in an enum beside the primary's small variant).
    pub(super) writer: Option<Box<JournalWriter>>,
    /// Records taken over from a partial staging.
    pub(super) resumed: Vec<JournalRecord>,
    /// Publish beside `current` without moving it (a key that may not replace it).
    pub(super) keep_current: bool,
}

impl Staging {
    /// A staging that holds the reservation `cancel` and has no directory yet.
    pub(super) fn new(
        store: Arc<Store>,
        name: &str,
        version: u64,
        dir: PathBuf,
        manifest: &Manifest,
        cancel: Arc<Receiving>,
    ) -> Self {
        Self {
            store,
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
        }
    }

    pub(super) fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Makes the staged tree's directory entries durable (the files' and directories' names, the
    /// journal's, and the staging directory's own in `.staging`): a journal record is only
    /// worth something if the file it names is still there after a power loss.
    pub(super) fn sync_dirs(&self) -> Result<(), StoreError> {
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
    pub(super) fn rehash(&self, records: Vec<JournalRecord>, chunk_size: u32) -> Vec<JournalRecord> {
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

    pub(super) fn create(&mut self) -> Result<(), StoreError> {
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

    pub(super) fn create_journal(&mut self) -> Result<(), StoreError> {
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
    pub(super) fn open_existing(&mut self) -> Result<(), StoreError> {
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
    pub(super) fn send_batch(&mut self) {
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
    pub(super) fn flush_journal(&mut self) -> io::Result<()> {
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

    /// The file chunks of entry `i` are written to (a compressed push writes decoded chunks
    /// with it).
    pub fn file(&self, entry: usize) -> Option<&File> {
        self.files.get(entry)?.as_deref()
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

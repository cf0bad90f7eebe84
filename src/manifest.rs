//! Manifests: what a shard set version holds, chunked and digested.
//!
//! A manifest lists entries (files and directories, relative paths, modes, sizes) in a fixed
//! order, the chunk size, and one xxh3-128 digest per chunk. Chunks never cross files; chunk
//! numbers (`seq`) run over all files in entry order, so chunk `seq` is found by a binary search
//! over the entries' first chunk numbers. The manifest's own digest is the xxh3-128 of its
//! encoding.
//!
//! A push does not hash its source before it streams: [`Manifest::scan`] gives a *plan* (the
//! entries, digests still unknown), HELLO carries the plan, each chunk's digest is computed as
//! the primary reads it and travels in the chunk's header, and END carries the digest of the
//! completed manifest, which every replica checks against the manifest it assembled. The source
//! is read once, not twice.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use xxhash_rust::xxh3::xxh3_128;

use crate::error::{ManifestError, WireError};
use crate::wire::codec::{Dec, Enc, MAX_STR};
use crate::wire::frame::{MAX_CHUNK, MIN_CHUNK};

/// The default chunk size: 4 MiB.
pub const DEFAULT_CHUNK: u32 = 4 << 20;
/// The most entries a manifest may hold.
pub const MAX_ENTRIES: usize = 10_000_000;
/// The most chunks a plan may announce (64 Mi chunks: 256 TiB at 4 MiB).
pub const MAX_PLAN_CHUNKS: u64 = 64 << 20;

/// A chunk digest.
pub type Digest = u128;

/// xxh3-128 of a chunk.
pub fn digest(bytes: &[u8]) -> Digest {
    xxh3_128(bytes)
}

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory (listed so that empty directories travel too).
    Dir,
}

/// One file or directory of a shard set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path relative to the shard set root, `/`-separated, validated.
    pub path: String,
    /// File or directory.
    pub kind: EntryKind,
    /// Permission bits (`mode & 0o7777`).
    pub mode: u32,
    /// Size in bytes (0 for directories).
    pub size: u64,
    /// Number of this entry's first chunk.
    pub first_chunk: u64,
}

/// Where one chunk lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    /// Index of the entry (file) in the manifest.
    pub entry: usize,
    /// Byte offset in the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
    /// Its digest.
    pub digest: Digest,
}

/// A shard set version's manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    chunk_size: u32,
    entries: Vec<Entry>,
    digests: Vec<Digest>,
}

fn chunks_of(size: u64, chunk_size: u32) -> u64 {
    size.div_ceil(u64::from(chunk_size))
}

/// Checks a manifest path: relative, `/`-separated normal components, no `.`/`..`, no empty
/// component, no NUL, not over [`MAX_STR`] bytes.
pub fn check_path(path: &str) -> Result<(), ManifestError> {
    let bad = |why| Err(ManifestError::BadPath { path: path.to_owned(), why });
    if path.is_empty() {
        return bad("empty path");
    }
    if path.len() > MAX_STR {
        return bad("path too long");
    }
    if path.contains('\0') {
        return bad("NUL byte");
    }
    if path.starts_with('/') {
        return bad("absolute path");
    }
    for comp in path.split('/') {
        match comp {
            "" => return bad("empty component"),
            "." | ".." => return bad("'.' or '..' component"),
            _ => {}
        }
    }
    Ok(())
}

/// The entries of a routed push that one node stores ([`Manifest::subset`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subset {
    /// The node's own manifest: its entries, the directories above them, their digests.
    pub manifest: Manifest,
    /// For each entry of the whole push, its index in `manifest` (None: not stored here).
    pub map: Vec<Option<usize>>,
}

impl Manifest {
    /// Builds a manifest from entries and per-chunk digests (in chunk order).
    pub fn new(chunk_size: u32, mut entries: Vec<Entry>, digests: Vec<Digest>) -> Result<Self, ManifestError> {
        if !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) {
            return Err(ManifestError::Invalid(format!(
                "chunk size {chunk_size} is outside {MIN_CHUNK}..={MAX_CHUNK}"
            )));
        }
        if entries.len() > MAX_ENTRIES {
            return Err(ManifestError::Invalid(format!("more than {MAX_ENTRIES} entries")));
        }
        let mut seen = HashSet::with_capacity(entries.len());
        let mut dirs = HashSet::new();
        let mut next = 0u64;
        for e in &mut entries {
            check_path(&e.path)?;
            if !seen.insert(e.path.clone()) {
                return Err(ManifestError::BadPath { path: e.path.clone(), why: "duplicate entry" });
            }
            // A parent must be listed as a directory before its children, so that a file can
            // never stand where a directory is needed.
            if let Some((parent, _)) = e.path.rsplit_once('/')
                && !dirs.contains(parent)
            {
                return Err(ManifestError::BadPath {
                    path: e.path.clone(),
                    why: "parent directory not listed before it",
                });
            }
            if e.kind == EntryKind::Dir {
                if e.size != 0 {
                    return Err(ManifestError::BadPath { path: e.path.clone(), why: "directory with a size" });
                }
                dirs.insert(e.path.clone());
            }
            e.mode &= 0o7777;
            // A replica running as root would publish a setuid-root file on a peer's say-so:
            // setuid, setgid and sticky bits are refused, on the pusher (its source) and on the
            // replica (the plan), never silently dropped.
            if e.mode & 0o7000 != 0 {
                return Err(ManifestError::SpecialMode { path: e.path.clone(), mode: e.mode });
            }
            e.first_chunk = next;
            next = next
                .checked_add(chunks_of(e.size, chunk_size))
                .ok_or_else(|| ManifestError::Invalid("chunk count overflows".into()))?;
        }
        if next != digests.len() as u64 {
            return Err(ManifestError::Invalid(format!("{} digests for {next} chunks", digests.len())));
        }
        Ok(Self { chunk_size, entries, digests })
    }

    /// Describes and digests `source`: a directory (its tree) or a single file.
    ///
    /// Hashing runs on every core; the files are read, not mapped, so a file truncated while
    /// it is read gives an error rather than SIGBUS.
    pub fn from_path(source: &Path, chunk_size: u32) -> Result<Self, ManifestError> {
        let (mut plan, files) = Self::scan(source, chunk_size)?;
        plan.digests = hash_files(&plan.entries, &files, chunk_size)?;
        Ok(plan)
    }

    /// Describes `source` without reading its files: a plan whose digests are still zero, and
    /// the path of every file entry (by entry index).
    pub fn scan(source: &Path, chunk_size: u32) -> Result<(Self, Vec<(usize, PathBuf)>), ManifestError> {
        let src_err = |path: &Path, source| ManifestError::Source { path: path.to_owned(), source };
        let meta = fs::symlink_metadata(source).map_err(|e| src_err(source, e))?;
        let mut entries = Vec::new();
        let mut files = Vec::new(); // (entry index, absolute path)
        if meta.is_file() {
            let name = source
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| ManifestError::Invalid(format!("{} has no UTF-8 file name", source.display())))?;
            files.push((0, source.to_owned()));
            entries.push(Entry {
                path: name.to_owned(),
                kind: EntryKind::File,
                mode: meta.mode(),
                size: meta.len(),
                first_chunk: 0,
            });
        } else if meta.is_dir() {
            walk(source, "", &mut entries, &mut files)?;
        } else {
            return Err(ManifestError::Unsupported { path: source.to_owned(), what: file_type_name(&meta) });
        }
        let chunks: u64 = entries.iter().map(|e| chunks_of(e.size, chunk_size)).sum();
        let plan = Self::new(chunk_size, entries, vec![0; chunks as usize])?;
        Ok((plan, files))
    }

    /// A plan (digests still zero) for files given by path and size, as when pushing buffers
    /// from memory: files get mode 0644, and the parent directories of nested paths are listed
    /// (mode 0755) before their first child. Returns the plan and each file's entry index, in
    /// the order given. Bad or duplicate paths are refused like any manifest's.
    pub fn plan_for_files(chunk_size: u32, files: &[(&str, u64)]) -> Result<(Self, Vec<usize>), ManifestError> {
        let mut entries = Vec::with_capacity(files.len());
        let mut dirs = HashSet::new();
        let mut index = Vec::with_capacity(files.len());
        for &(path, size) in files {
            check_path(path)?;
            let mut at = 0;
            while let Some(i) = path[at..].find('/') {
                let dir = &path[..at + i];
                if dirs.insert(dir.to_owned()) {
                    entries.push(Entry {
                        path: dir.to_owned(),
                        kind: EntryKind::Dir,
                        mode: 0o755,
                        size: 0,
                        first_chunk: 0,
                    });
                }
                at += i + 1;
            }
            index.push(entries.len());
            entries.push(Entry { path: path.to_owned(), kind: EntryKind::File, mode: 0o644, size, first_chunk: 0 });
        }
        let chunks: u64 = entries.iter().map(|e| chunks_of(e.size, chunk_size)).sum();
        if chunks > MAX_PLAN_CHUNKS {
            return Err(ManifestError::Invalid(format!("{chunks} chunks (limit {MAX_PLAN_CHUNKS})")));
        }
        Ok((Self::new(chunk_size, entries, vec![0; chunks as usize])?, index))
    }

    /// The part of this manifest a node keeps when it wants only `wanted` entries: those
    /// entries, the directories above them, with their digests, and where each entry went.
    pub fn subset(&self, wanted: &[u32]) -> Result<Subset, ManifestError> {
        let mut keep = vec![false; self.entries.len()];
        let index: HashMap<&str, usize> = self.entries.iter().enumerate().map(|(i, e)| (e.path.as_str(), i)).collect();
        for &w in wanted {
            let w = w as usize;
            let Some(e) = self.entries.get(w) else {
                return Err(ManifestError::Invalid(format!("wanted entry {w} is past the end")));
            };
            keep[w] = true;
            let mut path = e.path.as_str();
            while let Some((parent, _)) = path.rsplit_once('/') {
                if let Some(&p) = index.get(parent) {
                    keep[p] = true;
                }
                path = parent;
            }
        }
        let mut entries = Vec::new();
        let mut digests = Vec::new();
        let mut map = vec![None; self.entries.len()];
        for (i, e) in self.entries.iter().enumerate() {
            if keep[i] {
                map[i] = Some(entries.len());
                entries.push(e.clone());
                let r = self.chunk_range(i);
                digests.extend_from_slice(&self.digests[r.start as usize..r.end as usize]);
            }
        }
        Ok(Subset { manifest: Self::new(self.chunk_size, entries, digests)?, map })
    }

    /// Describes and digests the given files under `root` (relative `/`-separated paths, each a
    /// regular file; duplicates count once), with the directories above them, sorted by path.
    /// Returns the manifest, each file's entry index (in the order given) and the path of every
    /// file entry (as [`Manifest::scan`] does).
    #[allow(clippy::type_complexity)]
    pub fn for_files(
        root: &Path,
        files: &[String],
        chunk_size: u32,
    ) -> Result<(Self, Vec<usize>, Vec<(usize, PathBuf)>), ManifestError> {
        let mut sorted: Vec<&str> = files.iter().map(String::as_str).collect();
        sorted.sort_unstable();
        sorted.dedup();
        let mut entries = Vec::new();
        let mut paths = Vec::new();
        let mut dirs = HashSet::new();
        let mut index = HashMap::new();
        let src_err = |path: PathBuf, source| ManifestError::Source { path, source };
        for rel in sorted {
            check_path(rel)?;
            let mut at = 0;
            while let Some(i) = rel[at..].find('/') {
                let dir = &rel[..at + i];
                if dirs.insert(dir.to_owned()) {
                    let full = root.join(dir);
                    let meta = fs::symlink_metadata(&full).map_err(|e| src_err(full.clone(), e))?;
                    if !meta.is_dir() {
                        return Err(ManifestError::Unsupported { path: full, what: file_type_name(&meta) });
                    }
                    entries.push(Entry {
                        path: dir.to_owned(),
                        kind: EntryKind::Dir,
                        mode: meta.mode(),
                        size: 0,
                        first_chunk: 0,
                    });
                }
                at += i + 1;
            }
            let full = root.join(rel);
            let meta = fs::symlink_metadata(&full).map_err(|e| src_err(full.clone(), e))?;
            if !meta.is_file() {
                return Err(ManifestError::Unsupported { path: full, what: file_type_name(&meta) });
            }
            index.insert(rel, entries.len());
            paths.push((entries.len(), full));
            entries.push(Entry {
                path: rel.to_owned(),
                kind: EntryKind::File,
                mode: meta.mode(),
                size: meta.len(),
                first_chunk: 0,
            });
        }
        let chunks: u64 = entries.iter().map(|e| chunks_of(e.size, chunk_size)).sum();
        let mut m = Self::new(chunk_size, entries, vec![0; chunks as usize])?;
        m.digests = hash_files(&m.entries, &paths, chunk_size)?;
        let order = files.iter().map(|f| index[f.as_str()]).collect();
        Ok((m, order, paths))
    }

    /// Fills in every digest of a plan from its files (`files` as [`Manifest::scan`] returns
    /// them), hashing on every core.
    pub fn hash(&mut self, files: &[(usize, PathBuf)]) -> Result<(), ManifestError> {
        self.digests = hash_files(&self.entries, files, self.chunk_size)?;
        Ok(())
    }

    /// Records chunk `seq`'s digest (as a plan is filled in during a push).
    pub fn set_digest(&mut self, seq: u64, digest: Digest) {
        self.digests[seq as usize] = digest;
    }

    /// The chunk size.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }
    /// The entries in order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }
    /// The number of chunks.
    pub fn chunk_count(&self) -> u64 {
        self.digests.len() as u64
    }
    /// Total file bytes.
    pub fn total_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }
    /// Number of regular files.
    pub fn file_count(&self) -> usize {
        self.entries.iter().filter(|e| e.kind == EntryKind::File).count()
    }
    /// The chunks of entry `i`, as a range of chunk numbers.
    pub fn chunk_range(&self, i: usize) -> std::ops::Range<u64> {
        let e = &self.entries[i];
        e.first_chunk..e.first_chunk + chunks_of(e.size, self.chunk_size)
    }

    /// Where chunk `seq` lives, or `None` past the end.
    pub fn chunk(&self, seq: u64) -> Option<ChunkRef> {
        let digest = *self.digests.get(usize::try_from(seq).ok()?)?;
        let cs = u64::from(self.chunk_size);
        let entry = self.entries.partition_point(|e| e.first_chunk + chunks_of(e.size, self.chunk_size) <= seq);
        let e = &self.entries[entry];
        let offset = (seq - e.first_chunk) * cs;
        let len = (e.size - offset).min(cs) as u32;
        Some(ChunkRef { entry, offset, len, digest })
    }

    /// Encodes the manifest (the form stored beside a published version).
    pub fn encode(&self) -> Vec<u8> {
        self.encode_with(true)
    }

    /// Encodes the plan: everything but the digests (the form HELLO carries).
    pub fn encode_plan(&self) -> Vec<u8> {
        self.encode_with(false)
    }

    fn encode_with(&self, digests: bool) -> Vec<u8> {
        let mut e = Enc::default();
        e.u32(self.chunk_size).u64(self.entries.len() as u64);
        for entry in &self.entries {
            e.u8(match entry.kind {
                EntryKind::File => 0,
                EntryKind::Dir => 1,
            })
            .u32(entry.mode)
            .u64(entry.size)
            .str(&entry.path);
        }
        if digests {
            e.u64(self.digests.len() as u64);
            for d in &self.digests {
                e.u128(*d);
            }
        } else {
            e.u64(0);
        }
        e.0
    }

    /// Decodes and validates an encoded manifest.
    pub fn decode(buf: &[u8]) -> Result<Self, ManifestError> {
        Self::decode_with(buf, false)
    }

    /// Decodes and validates an encoded plan (digests zero, to be filled in).
    pub fn decode_plan(buf: &[u8]) -> Result<Self, ManifestError> {
        Self::decode_with(buf, true)
    }

    fn decode_with(buf: &[u8], plan: bool) -> Result<Self, ManifestError> {
        let mut d = Dec::new(buf);
        let chunk_size = d.u32("chunk size")?;
        // Checked before anything is sized from it (a plan's digest table is sized from the
        // declared file sizes divided by the chunk size).
        if !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) {
            return Err(ManifestError::Invalid(format!(
                "chunk size {chunk_size} is outside {MIN_CHUNK}..={MAX_CHUNK}"
            )));
        }
        let n = d.count("entries", 17)?;
        if n > MAX_ENTRIES {
            return Err(ManifestError::Invalid(format!("{n} entries (limit {MAX_ENTRIES})")));
        }
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let kind = match d.u8("entry kind")? {
                0 => EntryKind::File,
                1 => EntryKind::Dir,
                k => return Err(WireError::Invalid(format!("entry kind {k}")).into()),
            };
            let mode = d.u32("mode")?;
            let size = d.u64("size")?;
            let path = d.str("path")?;
            entries.push(Entry { path, kind, mode, size, first_chunk: 0 });
        }
        let nd = d.count("digests", 16)?;
        let mut digests = Vec::with_capacity(nd);
        for _ in 0..nd {
            digests.push(d.u128("digest")?);
        }
        d.finish("manifest")?;
        if plan {
            if nd != 0 {
                return Err(ManifestError::Invalid("a plan carries no digests".into()));
            }
            // Size the digests from the entries, checking the count cannot overflow memory:
            // every chunk is at least one byte of some file, bounded by the sizes declared.
            let chunks = entries
                .iter()
                .try_fold(0u64, |acc, e: &Entry| acc.checked_add(chunks_of(e.size, chunk_size.max(1))))
                .ok_or_else(|| ManifestError::Invalid("chunk count overflows".into()))?;
            if chunks > MAX_PLAN_CHUNKS {
                return Err(ManifestError::Invalid(format!("{chunks} chunks (limit {MAX_PLAN_CHUNKS})")));
            }
            digests = vec![0; chunks as usize];
        }
        Self::new(chunk_size, entries, digests)
    }

    /// The manifest's own digest: xxh3-128 of its encoding.
    pub fn digest(&self) -> Digest {
        xxh3_128(&self.encode())
    }
}

fn file_type_name(meta: &fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_symlink() {
        "a symlink"
    } else if t.is_block_device() || t.is_char_device() {
        "a device file"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "this file type"
    }
}

fn walk(
    dir: &Path,
    rel: &str,
    entries: &mut Vec<Entry>,
    files: &mut Vec<(usize, PathBuf)>,
) -> Result<(), ManifestError> {
    let src_err = |path: &Path, source| ManifestError::Source { path: path.to_owned(), source };
    let mut children: Vec<_> = fs::read_dir(dir)
        .map_err(|e| src_err(dir, e))?
        .map(|r| r.map(|d| d.path()))
        .collect::<Result<_, _>>()
        .map_err(|e| src_err(dir, e))?;
    children.sort();
    for path in children {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| ManifestError::Invalid(format!("{} is not a UTF-8 name", path.display())))?;
        let child_rel = if rel.is_empty() { name.to_owned() } else { format!("{rel}/{name}") };
        let meta = fs::symlink_metadata(&path).map_err(|e| src_err(&path, e))?;
        if meta.is_dir() {
            entries.push(Entry {
                path: child_rel.clone(),
                kind: EntryKind::Dir,
                mode: meta.mode(),
                size: 0,
                first_chunk: 0,
            });
            walk(&path, &child_rel, entries, files)?;
        } else if meta.is_file() {
            files.push((entries.len(), path.clone()));
            entries.push(Entry {
                path: child_rel,
                kind: EntryKind::File,
                mode: meta.mode(),
                size: meta.len(),
                first_chunk: 0,
            });
        } else {
            return Err(ManifestError::Unsupported { path, what: file_type_name(&meta) });
        }
    }
    Ok(())
}

/// Hashes every chunk of every file, spreading chunks over the available cores.
fn hash_files(entries: &[Entry], files: &[(usize, PathBuf)], chunk_size: u32) -> Result<Vec<Digest>, ManifestError> {
    // Jobs: (file index into `files`, chunk index within the file). Large files split into many
    // jobs, so one big checkpoint file still uses every core.
    let mut jobs = Vec::new();
    for (fi, (ei, _)) in files.iter().enumerate() {
        for c in 0..chunks_of(entries[*ei].size, chunk_size) {
            jobs.push((fi, c));
        }
    }
    let total: usize = jobs.len();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(total.max(1));
    let next = AtomicUsize::new(0);
    let results: Vec<Result<Vec<(usize, Digest)>, ManifestError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    let mut buf = vec![0u8; chunk_size as usize];
                    let mut open: Option<(usize, File)> = None;
                    loop {
                        let j = next.fetch_add(1, Ordering::Relaxed);
                        if j >= total {
                            return Ok(out);
                        }
                        let (fi, c) = jobs[j];
                        let (ei, path) = &files[fi];
                        if open.as_ref().is_none_or(|(f, _)| *f != fi) {
                            let f = File::open(path)
                                .map_err(|e| ManifestError::Source { path: path.clone(), source: e })?;
                            open = Some((fi, f));
                        }
                        let file = &open.as_ref().expect("opened above").1;
                        let off = c * u64::from(chunk_size);
                        let len = (entries[*ei].size - off).min(u64::from(chunk_size)) as usize;
                        file.read_exact_at(&mut buf[..len], off).map_err(|e| ManifestError::Source {
                            path: path.clone(),
                            source: if e.kind() == std::io::ErrorKind::UnexpectedEof {
                                std::io::Error::other("file shrank while it was being read")
                            } else {
                                e
                            },
                        })?;
                        out.push((j, digest(&buf[..len])));
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("hash thread panicked")).collect()
    });
    let mut digests = vec![0u128; total];
    for r in results {
        for (j, d) in r? {
            digests[j] = d;
        }
    }
    Ok(digests)
}

/// Applies an entry's permission bits to a path.
pub fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    // Permission bits only: never setuid, setgid or sticky (manifests refuse them too).
    fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o777))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: EntryKind, size: u64) -> Entry {
        Entry { path: path.into(), kind, mode: 0o644, size, first_chunk: 0 }
    }

    #[test]
    fn chunk_lookup_skips_empty_entries() {
        let cs = MIN_CHUNK;
        let entries = vec![
            entry("a", EntryKind::File, 0),
            entry("d", EntryKind::Dir, 0),
            entry("d/b", EntryKind::File, u64::from(cs) * 2 + 1),
            entry("e", EntryKind::File, 0),
            entry("f", EntryKind::File, 5),
        ];
        let m = Manifest::new(cs, entries, (0..4).collect()).unwrap();
        assert_eq!(m.chunk_count(), 4);
        let c = m.chunk(2).unwrap();
        assert_eq!((c.entry, c.offset, c.len, c.digest), (2, u64::from(cs) * 2, 1, 2));
        let c = m.chunk(3).unwrap();
        assert_eq!((c.entry, c.offset, c.len), (4, 0, 5));
        assert!(m.chunk(4).is_none());
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn bad_paths_are_refused() {
        for p in ["", "/etc/passwd", "a/../b", "..", "a//b", "./a", "a\0b", "a/"] {
            let m = Manifest::new(MIN_CHUNK, vec![entry(p, EntryKind::File, 0)], vec![]);
            assert!(m.is_err(), "{p:?} accepted");
        }
        let dup = vec![entry("a", EntryKind::File, 0), entry("a", EntryKind::File, 0)];
        assert!(Manifest::new(MIN_CHUNK, dup, vec![]).is_err());
        let orphan = vec![entry("x/y", EntryKind::File, 0)];
        assert!(Manifest::new(MIN_CHUNK, orphan, vec![]).is_err());
    }

    #[test]
    fn a_plan_travels_without_digests_and_is_filled_in() {
        let entries = vec![entry("a", EntryKind::File, u64::from(MIN_CHUNK) + 1), entry("b", EntryKind::File, 3)];
        let full = Manifest::new(MIN_CHUNK, entries, vec![11, 22, 33]).unwrap();
        let mut plan = Manifest::decode_plan(&full.encode_plan()).unwrap();
        assert_eq!(plan.chunk_count(), 3);
        assert_ne!(plan.digest(), full.digest());
        for seq in 0..3 {
            plan.set_digest(seq, full.chunk(seq).unwrap().digest);
        }
        assert_eq!(plan, full);
        assert_eq!(plan.digest(), full.digest());
        // A stored manifest must carry its digests, and a plan must not.
        assert!(Manifest::decode(&full.encode_plan()).is_err());
        assert!(Manifest::decode_plan(&full.encode()).is_err());
    }

    #[test]
    fn a_plan_announcing_absurd_sizes_is_refused() {
        let mut enc = Enc::default();
        enc.u32(MIN_CHUNK).u64(1).u8(0).u32(0o644).u64(u64::MAX / 2).str("a").u64(0);
        assert!(Manifest::decode_plan(&enc.0).is_err());
    }

    #[test]
    fn a_plan_for_buffers_lists_parents_and_refuses_bad_names() {
        let (m, idx) = Manifest::plan_for_files(1 << 20, &[("a/b/w.bin", 3 << 20), ("a/x", 0), ("top", 1)]).unwrap();
        let paths: Vec<&str> = m.entries().iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["a", "a/b", "a/b/w.bin", "a/x", "top"]);
        assert_eq!(idx, [2, 3, 4]);
        assert_eq!(m.chunk_count(), 4);
        assert!(Manifest::plan_for_files(1 << 20, &[("a", 1), ("a", 2)]).is_err(), "duplicate");
        assert!(Manifest::plan_for_files(1 << 20, &[("a", 1), ("a/b", 2)]).is_err(), "file where a directory must be");
        assert!(Manifest::plan_for_files(1 << 20, &[("../x", 1)]).is_err());
        assert!(Manifest::plan_for_files(1 << 20, &[("/x", 1)]).is_err());
    }

    #[test]
    fn wrong_digest_count_is_refused() {
        let m = Manifest::new(MIN_CHUNK, vec![entry("a", EntryKind::File, 1)], vec![]);
        assert!(m.is_err());
    }
}

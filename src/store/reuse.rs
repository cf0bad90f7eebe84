//! Chunks of a push that the current version already holds, and copying them into staging.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::manifest::{EntryKind, Manifest};

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

/// What a node's current version can give a push ([`find_reuse`]).
#[derive(Debug, Default)]
pub struct Reusable {
    /// The chunks held, as `(start, len)` ranges of the push's chunk numbers.
    pub held: Vec<(u64, u64)>,
    /// The copies that fill them in.
    pub copies: Vec<Reuse>,
    /// Chunks not held whose path and index the current version has with the same length but
    /// other bytes: the bases a delta push may send them against.
    pub bases: Vec<BaseChunk>,
}

/// A chunk of the current version that a chunk of a delta push may be coded against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseChunk {
    /// The push's chunk number.
    pub seq: u64,
    /// The digest of the current version's chunk (its manifest's).
    pub digest: u128,
    /// The published file it is in.
    pub from: PathBuf,
    /// Its byte offset there (the same as the new chunk's).
    pub offset: u64,
}

/// Which chunks of the push described by `manifest` a node already holds in its current version
/// (`old`, published under `old_dir`): a chunk counts when the file at the same path has, at the
/// same chunk index, a chunk of the same length and digest (same chunk size). `wanted`: the
/// entries this node stores (None: all); `map`: their staging entry indices (None: the same).
/// Chunks for which `skip` is true are left out (held already some other way).
pub fn find_reuse(
    manifest: &Manifest,
    wanted: Option<&[u32]>,
    map: Option<&[Option<usize>]>,
    old: &Manifest,
    old_dir: &Path,
    skip: &dyn Fn(u64) -> bool,
) -> Reusable {
    let (mut held, mut copies, mut bases) = (Vec::new(), Vec::new(), Vec::new());
    if old.chunk_size() != manifest.chunk_size() {
        return Reusable::default();
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
            let q = new_r.start + i;
            let pair = (old_r.start + i < old_r.end && !skip(q))
                .then(|| manifest.chunk(q).zip(old.chunk(old_r.start + i)))
                .flatten()
                .filter(|(a, b)| a.len == b.len);
            let same = pair.is_some_and(|(a, b)| a.digest == b.digest);
            if let Some((a, b)) = pair.filter(|_| !same) {
                bases.push(BaseChunk { seq: q, digest: b.digest, from: old_dir.join(&entry.path), offset: a.offset });
            }
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
    Reusable { held, copies, bases }
}

/// Copies `len` bytes at `offset` from `src` to the same offset of `dst`: copy_file_range (a
/// reflink or an in-kernel copy where the filesystem can), else read and write.
pub(super) fn copy_range(src: &File, dst: &File, offset: u64, len: u64) -> io::Result<()> {
    let (mut done, mut kernel) = (0u64, true);
    let mut buf = Vec::new();
    while done < len {
        let want = (len - done).min(1 << 30) as usize;
        if kernel {
            match crate::sys::fs::copy_file_range(src, dst, offset + done, want) {
                Ok(n) if n > 0 => {
                    done += n as u64;
                    continue;
                }
                Ok(_) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the earlier version is shorter")),
                Err(e) => {
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

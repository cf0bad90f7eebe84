//! `shardcast verify`: re-hash a published version against its manifest.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::{fs, io};

use crate::error::VerifyError;
use crate::manifest::{EntryKind, Manifest, digest};

use super::{MANIFEST_EXT, read_current};

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

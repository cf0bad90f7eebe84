//! Free space (from `sys::fs`) and durable directory entries.

use std::fs::File;
use std::io;
use std::path::Path;

pub use crate::sys::fs::free_bytes;

pub(super) fn fsync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Syncs directories whose entries were renamed (best effort: the move itself succeeded, and a
/// move that is lost to a power loss leaves a partial or staging that is found again).
pub(super) fn sync_parents(dirs: &[&Path]) {
    for d in dirs {
        if let Err(e) = fsync_dir(d) {
            tracing::warn!("cannot sync {}: {e}", d.display());
        }
    }
}

//! Free space and durable directory entries.

use std::fs::File;
use std::io;
use std::path::Path;

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

pub(super) fn unsafe_zeroed_statvfs() -> libc::statvfs {
    // SAFETY: statvfs is a plain C struct of integers, for which all-zero bytes are valid.
    unsafe { std::mem::zeroed() }
}

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

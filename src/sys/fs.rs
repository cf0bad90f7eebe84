//! Filesystem calls std does not wrap: free space (`statvfs`) and in-kernel copies
//! (`copy_file_range`).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Bytes available to unprivileged writers on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: statvfs is a plain C struct of integers, for which all-zero bytes are valid.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs we own.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail * st.f_frsize)
}

/// One `copy_file_range(2)` of up to `len` bytes from `offset` of `src` to the same offset of
/// `dst`: the bytes copied (0 at the end of `src`), or the OS error.
pub(crate) fn copy_file_range(src: &File, dst: &File, offset: u64, len: usize) -> io::Result<usize> {
    let (mut off_in, mut off_out) = (offset as libc::loff_t, offset as libc::loff_t);
    // SAFETY: two descriptors the borrowed Files keep open, and offsets we own; no buffer is
    // passed (the kernel copies between the files).
    let n = unsafe { libc::copy_file_range(src.as_raw_fd(), &mut off_in, dst.as_raw_fd(), &mut off_out, len, 0) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

//! Stand-in for `verbs.rs` in a build without the `rdma` feature (no libibverbs to link): the
//! same API, where the device list is empty with the reason, and an [`Endpoint`] cannot exist
//! (the type has no values), so every hop negotiates TCP.

use std::fmt;
use std::io;
use std::os::fd::RawFd;

/// A verb failed (never, in this build).
#[derive(Debug, thiserror::Error)]
#[error("{verb}: {source}")]
pub struct VerbsError {
    /// The verb.
    pub verb: &'static str,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

/// Always "no RDMA" in this build.
pub fn device_names() -> Result<Vec<String>, String> {
    Err("this build of shardcast has no RDMA transport (built without the `rdma` feature)".into())
}

pub use super::types::{Access, PeerInfo, WcError, WorkCompletion};
pub use crate::sys::mem::Mapping;

impl fmt::Display for WcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "status {}", self.0)
    }
}

/// No value of this type exists in a build without RDMA.
#[derive(Debug)]
pub enum Endpoint {}

impl Endpoint {
    /// Always fails in this build.
    pub fn open(_: &str, _: u8, _: u8, _: &Mapping, _: u32, _: Access) -> Result<Self, VerbsError> {
        Err(VerbsError { verb: "ibv_open_device", source: io::Error::from(io::ErrorKind::Unsupported) })
    }
    /// Unreachable.
    pub fn local(&self) -> PeerInfo {
        match *self {}
    }
    /// Unreachable.
    pub fn device(&self) -> &str {
        match *self {}
    }
    /// Unreachable.
    pub fn connect(&mut self, _: &PeerInfo) -> Result<(), VerbsError> {
        match *self {}
    }
    /// Unreachable.
    ///
    /// # Safety
    /// None needed.
    pub unsafe fn post_write(
        &self,
        _: u64,
        _: *const u8,
        _: u32,
        _: u64,
        _: u32,
        _: Option<u32>,
    ) -> Result<(), VerbsError> {
        match *self {}
    }
    /// Unreachable.
    pub fn grant(&mut self, _: u16) -> Result<u32, VerbsError> {
        match *self {}
    }
    /// Unreachable.
    pub fn revoke(&mut self, _: u16) -> Result<(), VerbsError> {
        match *self {}
    }
    /// Unreachable.
    pub fn flush(&self) -> Result<(), VerbsError> {
        match *self {}
    }
    /// Unreachable.
    pub fn post_recv(&self, _: u64) -> Result<(), VerbsError> {
        match *self {}
    }
    /// Unreachable.
    pub fn event_fd(&self) -> RawFd {
        match *self {}
    }
    /// Unreachable.
    pub fn poll(&mut self, _: &mut Vec<WorkCompletion>) -> Result<(), VerbsError> {
        match *self {}
    }
}

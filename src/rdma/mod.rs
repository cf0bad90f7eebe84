//! The RDMA names the rest of the crate and its tests use: the verbs live in `sys::rdma` (the
//! only FFI), the per-hop negotiation in `hop::rdma`.

pub use crate::hop::rdma::{DnLink, RdmaConfig, UpLink, msg_of};
pub use crate::sys::rdma::{types, verbs};
pub use verbs::{Access, Endpoint, Mapping, PeerInfo, VerbsError, WorkCompletion};

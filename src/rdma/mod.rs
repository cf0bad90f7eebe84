//! The RDMA verbs bindings (libibverbs through rdma-sys, or a stand-in that finds no device when
//! the `rdma` feature is off). What a hop does with them is in `crate::hop::rdma`.

pub mod types;
#[cfg(feature = "rdma")]
pub mod verbs;
#[cfg(not(feature = "rdma"))]
#[path = "verbs_none.rs"]
pub mod verbs;

// The paths from before the hop had a module of its own (`shardcast::rdma::RdmaConfig`,
// `crate::rdma::UpLink`), until their callers move to `crate::hop::rdma`.
pub use crate::hop::rdma::{DnLink, RdmaConfig, UpLink};
pub use verbs::{Access, Endpoint, PeerInfo, VerbsError, WorkCompletion};

//! The RDMA verbs bindings: libibverbs through rdma-sys's types, the library loaded with
//! `dlopen` on first use (`verbs.rs`), or a stand-in that finds no device when the `rdma` feature
//! is off (`verbs_none.rs`). What a hop does with them is in `crate::hop::rdma`.

pub mod types;
#[cfg(feature = "rdma")]
pub mod verbs;
#[cfg(not(feature = "rdma"))]
#[path = "verbs_none.rs"]
pub mod verbs;

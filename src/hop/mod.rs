//! One hop: a connection between two nodes of the chain, from dial or accept to close.
//!
//! - `auth`, `tls`: who is at the other end (a cluster key, or mutual TLS), and the hop's
//!   session secret;
//! - `crypt`: what that secret protects (the handshake frames' MACs, sealed chunks);
//! - `policy`: which transport a push allows (`--transport auto|tcp|rdma`);
//! - `rdma`: the per-hop negotiation of an RDMA link and its two ends.

pub mod auth;
pub mod crypt;
pub mod policy;
pub mod rdma;
pub mod tls;

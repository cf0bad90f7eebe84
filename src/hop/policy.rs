//! Transport selection (`--transport auto|tcp|rdma`).
//!
//! Every hop has a TCP control connection. Chunks travel over TCP (io_uring, or plain sockets
//! where io_uring is refused) or, per hop, over RDMA verbs when the push allows it and both ends
//! can (see `rdma`): `auto` takes RDMA only where both ends have a hardware RNIC (soft-RoCE
//! and no device at all mean TCP, with the reason logged); `rdma` requires it on every hop
//! (that is how soft-RoCE is tested) and fails with the reason when a hop cannot; `tcp` never
//! tries.

use std::str::FromStr;

/// Which transport a push's hops use for chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// RDMA on hops whose both ends have a hardware RNIC, TCP otherwise.
    #[default]
    Auto,
    /// TCP.
    Tcp,
    /// RDMA verbs on every hop, or fail.
    Rdma,
}

impl FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "tcp" => Ok(Self::Tcp),
            "rdma" => Ok(Self::Rdma),
            other => Err(format!("unknown transport {other:?} (expected auto, tcp or rdma)")),
        }
    }
}

impl Transport {
    /// Wire code in HELLO.
    pub fn code(self) -> u8 {
        match self {
            Self::Tcp => 0,
            Self::Auto => 1,
            Self::Rdma => 2,
        }
    }

    /// From a wire code.
    pub fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(Self::Tcp),
            1 => Some(Self::Auto),
            2 => Some(Self::Rdma),
            _ => None,
        }
    }

    /// Checks up front what this node can do: `rdma` needs the `rdma` feature and an RDMA
    /// device (libibverbs sees none on a kernel without RDMA). `auto` and `tcp` always pass.
    pub fn resolve(self) -> Result<(), String> {
        if self != Self::Rdma {
            return Ok(());
        }
        if !cfg!(feature = "rdma") {
            return Err("--transport rdma: this build of shardcast has no RDMA transport (built without \
                        the `rdma` feature); use --transport tcp or auto"
                .into());
        }
        crate::rdma::verbs::device_names()
            .map(|_| ())
            .map_err(|why| format!("--transport rdma: no RDMA on this node: {why}; use --transport tcp or auto"))
    }

    /// Name for logs and reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Tcp => "tcp",
            Self::Rdma => "rdma",
        }
    }
}

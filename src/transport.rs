//! Transport selection (`--transport auto|tcp|rdma`).
//!
//! This build moves chunks over TCP only (io_uring, or plain sockets where io_uring is refused).
//! The RDMA transport (verbs RC queue pairs, RDMA WRITE WITH IMM into registered pool slots) is
//! planned behind this same choice; until it exists, `rdma` is refused with a message that says
//! so, and `auto` picks TCP and logs why.

use std::str::FromStr;

/// Which transport a node uses for chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// RDMA on a hardware RNIC, TCP otherwise.
    #[default]
    Auto,
    /// TCP.
    Tcp,
    /// RDMA verbs.
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
    /// Resolves the choice to what this build can do, logging the reason; `rdma` is an error.
    pub fn resolve(self) -> Result<(), String> {
        match self {
            Self::Tcp => Ok(()),
            Self::Auto => {
                static ONCE: std::sync::Once = std::sync::Once::new();
                ONCE.call_once(|| tracing::info!("transport auto: tcp (this build has no RDMA transport)"));
                Ok(())
            }
            Self::Rdma => Err("--transport rdma: this build of shardcast has no RDMA transport yet; \
                 use --transport tcp or auto"
                .into()),
        }
    }
}

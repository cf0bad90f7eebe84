//! Why the accepting side of a hop refused a peer before any push began.

use crate::error::{ErrorKind, NodeError};

/// A refused handshake on the accepting side: what the peer did wrong, and so what it is told.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    /// The peer closed the connection, or sent nothing within the handshake timeout, before a
    /// whole frame arrived. It is told nothing (it no longer listens).
    #[error("connection closed before a full frame: {0}")]
    Closed(#[source] std::io::Error),
    /// The bytes are not a shardcast frame, or one larger than the handshake allows.
    #[error("{0}")]
    BadFrame(#[source] crate::error::WireError),
    /// Mutual TLS failed (no certificate, one from another CA, a broken handshake): the peer
    /// hears it as a TLS alert, not a frame.
    #[error("{0}")]
    Tls(String),
    /// The peer did not prove that it holds a key this replica accepts, or authenticated the
    /// wrong way (a cluster key where TLS is required, none where one is required), or its
    /// HELLO does not authenticate under the connection's key.
    #[error("{0}")]
    Unauthorized(String),
}

impl HandshakeError {
    /// What the audit log records as the reason (None: nothing is recorded, the peer left).
    pub(crate) fn audit_reason(&self) -> Option<String> {
        match self {
            Self::Closed(_) => None,
            Self::BadFrame(e) => Some(format!("bad frame: {e}")),
            Self::Tls(why) | Self::Unauthorized(why) => Some(why.clone()),
        }
    }

    /// The error the peer is sent in a REJECT (None: it cannot read one).
    pub(crate) fn reply(&self) -> Option<NodeError> {
        match self {
            Self::Closed(_) | Self::Tls(_) => None,
            Self::BadFrame(e) => Some(NodeError::new(ErrorKind::Protocol, format!("refused: {e}"))),
            Self::Unauthorized(why) => Some(NodeError::new(ErrorKind::Unauthorized, why.clone())),
        }
    }
}

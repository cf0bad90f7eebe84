//! How a node proves who it is to its peers: nothing, a cluster key, or mutual TLS.
//!
//! The two ways are exclusive by construction: a node holds one [`Auth`], never both a key and
//! a certificate (the command line, the C API and the Python package each map their flags or
//! fields onto it and refuse both at once).

#![deny(unsafe_code)]

use std::sync::Arc;

use crate::auth::ClusterKey;
use crate::tls::TlsIdentity;

/// A node's authentication: every connection between nodes uses it, both ways.
#[derive(Debug, Clone, Default)]
// A key holds its HMAC key schedule inline (aws-lc-rs): the variant is large, but an Auth is
// one per options struct, set up once, never moved in a hot path.
#[allow(clippy::large_enum_variant)]
pub enum Auth {
    /// No authentication: anyone who can reach a replica may push to it.
    #[default]
    None,
    /// A cluster key (`--key-file`): both ends prove they hold it (HMAC challenge-response).
    Key(ClusterKey),
    /// Mutual TLS (`--tls-cert`, `--tls-key`, `--tls-ca`): both ends present a certificate
    /// that chains to the CA.
    Tls(Arc<TlsIdentity>),
}

impl Auth {
    /// The cluster key, when this node authenticates with one.
    pub fn key(&self) -> Option<&ClusterKey> {
        match self {
            Auth::Key(k) => Some(k),
            _ => None,
        }
    }

    /// The TLS identity, when this node authenticates with mutual TLS.
    pub fn tls(&self) -> Option<&TlsIdentity> {
        match self {
            Auth::Tls(id) => Some(id),
            _ => None,
        }
    }

    /// Whether this node does not authenticate at all (neither a key nor TLS).
    pub fn is_none(&self) -> bool {
        matches!(self, Auth::None)
    }
}

impl From<ClusterKey> for Auth {
    fn from(key: ClusterKey) -> Self {
        Auth::Key(key)
    }
}

impl From<TlsIdentity> for Auth {
    fn from(id: TlsIdentity) -> Self {
        Auth::Tls(Arc::new(id))
    }
}

impl From<Arc<TlsIdentity>> for Auth {
    fn from(id: Arc<TlsIdentity>) -> Self {
        Auth::Tls(id)
    }
}

//! Error types, one per operation, plus the [`NodeError`] that travels between nodes.
//!
//! A [`NodeError`] is what one node tells another (inside `REJECT` and `RESULT` frames): a kind a
//! program can match on and a message a person can read. The per-operation enums
//! ([`PushError`], [`ServeError`], [`VerifyError`], [`StoreError`], [`ManifestError`],
//! [`WireError`]) are what the library returns to its caller.

use std::io;
use std::path::PathBuf;

use serde::Serialize;

/// What went wrong, in a form a script can match on (`--json` prints it in snake case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The node could not be connected to.
    Unreachable,
    /// The version being pushed already exists on the node.
    VersionExists,
    /// Another push of the same name and version is in progress on the node.
    Busy,
    /// The node has no room for the shard set.
    DiskFull,
    /// A chunk's bytes did not match its digest.
    DigestMismatch,
    /// The connection to the node broke before the push finished.
    ConnectionLost,
    /// The peer sent something that is not shardcast's protocol.
    Protocol,
    /// A local I/O error (other than a full disk).
    Io,
    /// The manifest is malformed or unsafe (paths, sizes, counts).
    BadManifest,
    /// The source of a push could not be read, or changed while it was pushed.
    Source,
    /// No progress within the idle timeout.
    Stalled,
    /// The push was given up on (an upstream node went away, or it was cancelled).
    Aborted,
    /// The node does not support what was asked (a transport, a protocol version).
    Unsupported,
    /// Authentication failed: no key, a wrong key, or a peer that could not prove it.
    Unauthorized,
    /// The caller's arguments cannot be used (a flag's value, an empty chain): nothing was
    /// sent. The primary's own verdict; no replica reports it.
    InvalidArgument,
}

impl ErrorKind {
    /// The stable one-byte code used on the wire.
    pub fn code(self) -> u8 {
        match self {
            Self::Unreachable => 1,
            Self::VersionExists => 2,
            Self::Busy => 3,
            Self::DiskFull => 4,
            Self::DigestMismatch => 5,
            Self::ConnectionLost => 6,
            Self::Protocol => 7,
            Self::Io => 8,
            Self::BadManifest => 9,
            Self::Source => 10,
            Self::Stalled => 11,
            Self::Aborted => 12,
            Self::Unsupported => 13,
            Self::Unauthorized => 14,
            Self::InvalidArgument => 15,
        }
    }

    /// The inverse of [`ErrorKind::code`]; unknown codes become [`ErrorKind::Protocol`].
    pub fn from_code(code: u8) -> Self {
        match code {
            1 => Self::Unreachable,
            2 => Self::VersionExists,
            3 => Self::Busy,
            4 => Self::DiskFull,
            5 => Self::DigestMismatch,
            6 => Self::ConnectionLost,
            8 => Self::Io,
            9 => Self::BadManifest,
            10 => Self::Source,
            11 => Self::Stalled,
            12 => Self::Aborted,
            13 => Self::Unsupported,
            14 => Self::Unauthorized,
            15 => Self::InvalidArgument,
            _ => Self::Protocol,
        }
    }

    /// Classifies an I/O error: a full disk or quota is [`ErrorKind::DiskFull`].
    pub fn of_io(err: &io::Error) -> Self {
        match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => Self::DiskFull,
            _ => Self::Io,
        }
    }
}

/// An error one node reports about itself or a node after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{message}")]
pub struct NodeError {
    /// What went wrong.
    pub kind: ErrorKind,
    /// What a person reads: the cause and, where it helps, what to do.
    pub message: String,
}

impl NodeError {
    /// A new error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }

    /// An I/O error with what was being done.
    pub fn io(context: impl std::fmt::Display, err: &io::Error) -> Self {
        Self::new(ErrorKind::of_io(err), format!("{context}: {err}"))
    }
}

/// Errors decoding frames and payloads. Decoding never panics: every length is checked first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The first bytes are not shardcast's magic.
    #[error("not a shardcast peer (bad magic {0:02x?})")]
    BadMagic([u8; 4]),
    /// A protocol version this build does not speak.
    #[error(
        "unsupported protocol version {0} (this build speaks {v}): run the same shardcast release on every node",
        v = crate::wire::PROTO_VERSION
    )]
    BadVersion(u16),
    /// A frame kind this build does not know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A frame longer than its kind allows.
    #[error("{kind} frame of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// The frame kind.
        kind: &'static str,
        /// The announced length.
        len: u64,
        /// The bound for that kind.
        max: u64,
    },
    /// A payload that ends before its fields do.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// A payload with a field that is out of range.
    #[error("invalid {0}")]
    Invalid(String),
    /// A frame of a kind that is not expected at this point of the conversation.
    #[error("unexpected {got} frame (expected {expected})")]
    Unexpected {
        /// What arrived.
        got: &'static str,
        /// What the protocol expects here.
        expected: &'static str,
    },
}

/// Errors building, decoding or checking a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The source could not be read.
    #[error("source path {path}: {source}")]
    Source {
        /// The path that failed.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The source holds something shardcast does not push (a symlink, a device, a socket).
    #[error("source path {path}: {what} is not supported (only regular files and directories)")]
    Unsupported {
        /// The offending path.
        path: PathBuf,
        /// What it is.
        what: &'static str,
    },
    /// A path in the manifest is unsafe or malformed.
    #[error("bad path {path:?} in manifest: {why}")]
    BadPath {
        /// The path as given.
        path: String,
        /// Why it is refused.
        why: &'static str,
    },
    /// Any other malformation.
    #[error("bad manifest: {0}")]
    Invalid(String),
    /// The encoding did not decode.
    #[error("bad manifest encoding: {0}")]
    Wire(#[from] WireError),
    /// An entry whose mode has setuid, setgid or sticky bits: never published.
    #[error(
        "{path:?} has mode {mode:04o}: setuid, setgid and sticky bits are never published \
         (clear them in the source, e.g. `chmod ug-s,o-t`)"
    )]
    SpecialMode {
        /// The entry's path.
        path: String,
        /// Its mode bits.
        mode: u32,
    },
}

/// Errors of a replica's store (staging, publish, listing).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The version exists already: pushes never merge into a published version.
    #[error("version {version} of '{name}' already exists (push a new --version)")]
    VersionExists {
        /// Shard set name.
        name: String,
        /// The version.
        version: u64,
    },
    /// Another session is receiving this very version.
    #[error("version {version} of '{name}' is being received by another push")]
    Busy {
        /// Shard set name.
        name: String,
        /// The version.
        version: u64,
    },
    /// Accepting the push would put more bytes in staging than `--max-staging` allows.
    #[error(
        "staging limit: {receiving} bytes are being received, this push needs {needed} more, the limit is {limit} (serve --max-staging-mb); try again later"
    )]
    StagingLimit {
        /// Bytes being received by other pushes.
        receiving: u64,
        /// This push's bytes.
        needed: u64,
        /// The limit.
        limit: u64,
    },
    /// Not enough free space for the shard set.
    #[error(
        "not enough free space in {root}: the push needs {needed} bytes, {available} are free and {reserved} of them are reserved by pushes being received; free space or try again later"
    )]
    NoSpace {
        /// The replica root.
        root: PathBuf,
        /// Bytes the push needs.
        needed: u64,
        /// Bytes free.
        available: u64,
        /// Bytes of the free space that pushes being received still need.
        reserved: u64,
    },
    /// A name that is not a valid shard set name.
    #[error("invalid shard set name {0:?} (use letters, digits, '.', '_' and '-', not starting with '.')")]
    BadName(String),
    /// An I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

impl StoreError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io { context: context.into(), source }
    }

    /// The [`NodeError`] a replica reports for this error.
    pub fn to_node_error(&self) -> NodeError {
        let kind = match self {
            Self::VersionExists { .. } => ErrorKind::VersionExists,
            Self::Busy { .. } | Self::StagingLimit { .. } => ErrorKind::Busy,
            Self::NoSpace { .. } => ErrorKind::DiskFull,
            Self::BadName(_) => ErrorKind::BadManifest,
            Self::Io { source, .. } => ErrorKind::of_io(source),
        };
        NodeError::new(kind, self.to_string())
    }
}

/// Errors of `shardcast push` that stop it before every replica could report.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The source could not be read or described.
    #[error(transparent)]
    Source(#[from] ManifestError),
    /// Bad input from the caller (a name, a chunk size, an empty chain).
    #[error("{0}")]
    BadInput(String),
    /// A node refused or failed, and the push could not go on.
    #[error("replica {node}: {error}")]
    Node {
        /// The node's address as given in the chain.
        node: String,
        /// What it reported.
        error: NodeError,
    },
    /// A local failure of the primary (pool, io_uring, reading).
    #[error("{context}: {source}")]
    Local {
        /// What was being done.
        context: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The transport asked for is not available.
    #[error("{0}")]
    Unsupported(String),
}

impl PushError {
    /// The machine-readable kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Source(ManifestError::Source { .. } | ManifestError::Unsupported { .. }) => ErrorKind::Source,
            Self::Source(_) => ErrorKind::BadManifest,
            Self::BadInput(_) => ErrorKind::InvalidArgument,
            Self::Node { error, .. } => error.kind,
            Self::Local { source, .. } => ErrorKind::of_io(source),
            Self::Unsupported(_) => ErrorKind::Unsupported,
        }
    }

    /// The node the error is about, when it is about one.
    pub fn node(&self) -> Option<&str> {
        match self {
            Self::Node { node, .. } => Some(node),
            _ => None,
        }
    }

    /// True when the error is the caller's input (exit code 2), not a failure of the chain.
    pub fn is_input_error(&self) -> bool {
        matches!(self, Self::Source(_) | Self::BadInput(_))
    }
}

/// Errors starting or running `shardcast serve`.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The root could not be prepared.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The transport asked for is not available.
    #[error("{0}")]
    Unsupported(String),
    /// A `--rail` that is not an address of this host, or that cannot be listened on.
    #[error("{0}")]
    BadRail(String),
}

/// Errors of `shardcast verify`.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// No such shard set or version.
    #[error("{0}")]
    NotFound(String),
    /// The manifest could not be read or decoded.
    #[error("manifest {path}: {error}")]
    Manifest {
        /// The manifest path.
        path: PathBuf,
        /// What failed.
        error: String,
    },
    /// The data does not match the manifest.
    #[error("{path}: {what}")]
    Mismatch {
        /// The file that differs.
        path: String,
        /// How it differs.
        what: String,
    },
    /// An I/O error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

//! [`SessionConfig`]: everything a session is told before it runs, in one builder.

use super::*;

/// How a session runs: its tunables, and what the push and this node's hops add (a route, the
/// hops' keys, the async and repair modes, a server's metrics). Built by chained calls:
///
/// ```ignore
/// let cfg = SessionConfig::default().pool_bytes(64 << 20).piece_bytes(0).macs(None, secret);
/// ```
#[derive(Debug)]
pub(crate) struct SessionConfig {
    /// Bytes of pool to allocate for chunk slots.
    pub(super) pool_bytes: usize,
    /// Which executor.
    pub(super) io: IoChoice,
    /// A session that sees no completion for this long gives up.
    pub(super) idle_timeout: Duration,
    /// Whether to verify chunk digests on arrival (always on, but for benchmarks that measure
    /// what verification costs).
    pub(super) verify: bool,
    /// A relay forwards each chunk in pieces of this many bytes as they arrive (cut-through),
    /// instead of waiting for the whole chunk; 0 forwards whole chunks only (store-and-forward).
    pub(super) piece_bytes: u32,
    /// A downstream that takes nothing while chunks wait for it, for this long times the number
    /// of nodes after this one, is reported as stalled and the push goes on without it.
    pub(super) hop_timeout: Duration,
    /// How long a replica's final sync may take before the push fails here.
    pub(super) sync_timeout: Duration,
    pub(super) parts: Parts,
}

/// What a replica storing part of a routed push publishes (`Manifest::subset`).
pub(crate) use crate::manifest::Subset as OwnEntries;

/// The optional parts of a [`SessionConfig`], applied when the session is made.
#[derive(Debug, Default)]
pub(super) struct Parts {
    pub(super) early_report: bool,
    pub(super) stop_on_loss: bool,
    pub(super) open: Option<crate::crypt::Opener>,
    pub(super) seal: Option<crate::crypt::Sealer>,
    pub(super) up_secret: Option<crate::crypt::SessionSecret>,
    pub(super) dn_secret: Option<crate::crypt::SessionSecret>,
    pub(super) superseded: Option<std::sync::Arc<crate::store::Receiving>>,
    pub(super) prefill: Option<std::thread::JoinHandle<Result<(), crate::error::StoreError>>>,
    pub(super) route: Option<(Route, Option<OwnEntries>)>,
    pub(super) metrics: Option<crate::metrics::SessionMetrics>,
    /// Primary: how to compress chunks (mode, zstd level).
    pub(super) compress: Option<(crate::compress::Compress, Option<i32>)>,
    /// Replica: upstream may send compressed chunks.
    pub(super) decompress: bool,
    /// The hops' further lanes (1..R), each a connection with its own secret.
    pub(super) up_lanes: Vec<(RawFd, Option<crate::crypt::SessionSecret>)>,
    pub(super) dn_lanes: Vec<(RawFd, Option<crate::crypt::SessionSecret>)>,
    /// The RDMA queue pairs of those lanes, in the same order (None or missing: a TCP lane).
    pub(super) up_links: Vec<Option<UpLink>>,
    pub(super) dn_links: Vec<Option<DnLink>>,
    /// A delta push: on the primary, the chunks to send as XOR deltas and their bases; on a
    /// replica, the chunks it may take as deltas and its base of each.
    pub(super) deltas: Option<Vec<crate::store::BaseChunk>>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            pool_bytes: 64 << 20,
            io: IoChoice::from_env(),
            idle_timeout: Duration::from_secs(120),
            verify: true,
            piece_bytes: DEFAULT_PIECE_BYTES,
            hop_timeout: Duration::from_secs(10),
            sync_timeout: Duration::from_secs(600),
            parts: Parts::default(),
        }
    }
}

impl SessionConfig {
    /// Bytes of pool for chunk slots.
    pub(crate) fn pool_bytes(mut self, bytes: usize) -> Self {
        self.pool_bytes = bytes;
        self
    }

    /// Which executor.
    pub(crate) fn io(mut self, io: IoChoice) -> Self {
        self.io = io;
        self
    }

    /// How long a session waits without any completion before it gives up.
    pub(crate) fn idle_timeout(mut self, t: Duration) -> Self {
        self.idle_timeout = t;
        self
    }

    /// How long a replica's final sync may take before the push fails on this node.
    pub(crate) fn sync_timeout(mut self, t: Duration) -> Self {
        self.sync_timeout = t;
        self
    }

    /// How long a downstream may take nothing (times the nodes after this one) before the
    /// push goes on without it.
    pub(crate) fn hop_timeout(mut self, t: Duration) -> Self {
        self.hop_timeout = t;
        self
    }

    /// Whether to verify chunk digests on arrival (only benchmarks turn it off).
    pub(crate) fn verify(mut self, verify: bool) -> Self {
        self.verify = verify;
        self
    }

    /// Cut-through piece size for a relay (0: whole chunks only).
    pub(crate) fn piece_bytes(mut self, bytes: u32) -> Self {
        self.piece_bytes = bytes;
        self
    }

    /// Async push on the first replica: report upstream once published here (see
    /// `NodeMachine::set_report_early`).
    pub(crate) fn early_report(mut self, on: bool) -> Self {
        self.parts.early_report = on;
        self
    }

    /// A relay of a push the primary repairs: when a node after it dies, it stops too (see
    /// [`NodeMachine::set_stop_on_loss`]).
    pub(crate) fn stop_on_loss(mut self, on: bool) -> Self {
        self.parts.stop_on_loss = on;
        self
    }

    /// Encrypted hops (`--encrypt`): `open` decrypts the chunks from upstream, `seal`
    /// encrypts those sent downstream. Either hop then moves whole chunks (no cut-through: a
    /// chunk is checked before any of it is used), and sealing needs one chunk-sized buffer.
    pub(crate) fn crypt(mut self, open: Option<crate::crypt::Opener>, seal: Option<crate::crypt::Sealer>) -> Self {
        self.parts.open = open;
        self.parts.seal = seal;
        self
    }

    /// The further lanes of the hop upstream and of the hop downstream (`push --lanes R`):
    /// connected sockets after their handshake, with their secrets.
    pub(crate) fn lanes(
        mut self,
        up: Vec<(RawFd, Option<crate::crypt::SessionSecret>)>,
        dn: Vec<(RawFd, Option<crate::crypt::SessionSecret>)>,
    ) -> Self {
        self.parts.up_lanes = up;
        self.parts.dn_lanes = dn;
        self
    }

    /// The RDMA queue pairs of the further lanes (in the order of [`SessionConfig::lanes`]),
    /// each negotiated on its lane's connection; None: that lane runs TCP.
    pub(crate) fn lane_links(mut self, up: Vec<Option<UpLink>>, dn: Vec<Option<DnLink>>) -> Self {
        self.parts.up_links = up;
        self.parts.dn_links = dn;
        self
    }

    /// Authenticated hops: the RESULT this node sends upstream carries a MAC under `up`, and the
    /// one from downstream must carry one under `dn` (see `crypt::seal_frame`); so do the
    /// data-plane frames each way (see `crypt::FrameMacs`).
    pub(crate) fn macs(
        mut self,
        up: Option<crate::crypt::SessionSecret>,
        dn: Option<crate::crypt::SessionSecret>,
    ) -> Self {
        self.parts.up_secret = up;
        self.parts.dn_secret = dn;
        self
    }

    /// The flag that a newer push of the same version sets to make this session give up.
    pub(crate) fn superseded(mut self, flag: std::sync::Arc<crate::store::Receiving>) -> Self {
        self.parts.superseded = Some(flag);
        self
    }

    /// Chunks held from an earlier version are being copied into staging by `prefill`; the
    /// session waits for it before syncing, and fails the node if the copy failed.
    pub(crate) fn prefill(
        mut self,
        prefill: Option<std::thread::JoinHandle<Result<(), crate::error::StoreError>>>,
    ) -> Self {
        self.parts.prefill = prefill;
        self
    }

    /// Restricts this node to its route in a routed push, whose manifest carries every digest.
    /// `own`: on a replica that stores a subset, the staging entry of each manifest entry and
    /// the manifest it publishes.
    pub(crate) fn route(mut self, route: Option<Route>, own: Option<OwnEntries>) -> Self {
        self.parts.route = route.map(|r| (r, own));
        self
    }

    /// Primary: compresses chunks as `mode` says (`push --compress`), at zstd `level`.
    pub(crate) fn compress(mut self, mode: crate::compress::Compress, level: Option<i32>) -> Self {
        self.parts.compress = Some((mode, level));
        self
    }

    /// Replica of a push whose chunks may come compressed (HELLO's COMPRESS flag).
    pub(crate) fn decompress(mut self, on: bool) -> Self {
        self.parts.decompress = on;
        self
    }

    /// A delta push (`push --delta`): on the primary, the chunks it sends as XOR deltas against
    /// their bases; on a replica (HELLO's DELTA flag), the chunks it may take as deltas and its
    /// base of each (a delta for any other chunk it stores is refused).
    pub(crate) fn deltas(mut self, bases: Option<Vec<crate::store::BaseChunk>>) -> Self {
        self.parts.deltas = bases;
        self
    }

    /// Counts this session's bytes, chunks and pool use in a server's metrics.
    pub(crate) fn metrics(mut self, m: Option<crate::metrics::SessionMetrics>) -> Self {
        self.parts.metrics = m;
        self
    }
}

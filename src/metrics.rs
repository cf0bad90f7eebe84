//! Prometheus metrics of a replica server (`shardcast serve --metrics ADDR`), served as text
//! format at `http://ADDR/metrics` by a small HTTP responder on its own thread.
//!
//! Counters are incremented on the data path with one atomic add each (a session takes its
//! per-peer counters once, at its start).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A peer label: the address of the node at the other end of a hop.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    /// Downstream: "IP:PORT" as the chain names it (its listening address). Upstream: the
    /// connecting IP address alone, without its ephemeral port (one series per peer, not one
    /// per connection).
    pub peer: String,
}

/// A push's outcome label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// published, failed, aborted, upstream_lost.
    pub outcome: String,
}

/// A transport label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    /// tcp or rdma.
    pub transport: String,
    /// upstream or downstream.
    pub direction: String,
}

/// Every metric a server keeps.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Chunk bytes received, by upstream peer.
    pub bytes_in: Family<PeerLabel, Counter>,
    /// Chunk bytes forwarded, by downstream peer.
    pub bytes_out: Family<PeerLabel, Counter>,
    /// Chunks whose digest checked out.
    pub chunks_verified: Counter,
    /// Chunks whose bytes did not match their digest.
    pub digest_failures: Counter,
    /// Pushes, by outcome at this node.
    pub pushes: Family<OutcomeLabel, Counter>,
    /// Hop throughput of finished pushes, bytes per second received.
    pub hop_throughput: Histogram,
    /// Mean seconds per chunk received, per finished push (the hop's per-chunk latency).
    pub chunk_latency: Histogram,
    /// Pool slots in use, summed over running sessions.
    pub pool_slots_in_use: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Hops currently open, by transport and direction.
    pub hops: Family<TransportLabel, Gauge>,
    /// Sessions running.
    pub sessions: Gauge,
    /// Partial stagings kept for resumes (after expiry).
    pub partials: Gauge,
    /// Bytes the partial stagings take on disk.
    pub partial_bytes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered under the `shardcast_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("shardcast");
        let bytes_in = Family::<PeerLabel, Counter>::default();
        let bytes_out = Family::<PeerLabel, Counter>::default();
        let chunks_verified = Counter::default();
        let digest_failures = Counter::default();
        let pushes = Family::<OutcomeLabel, Counter>::default();
        // 1 MB/s .. ~137 GB/s
        let hop_throughput = Histogram::new(exponential_buckets(1e6, 2.0, 18));
        // 100 µs .. ~6.5 s
        let chunk_latency = Histogram::new(exponential_buckets(1e-4, 2.0, 17));
        let pool_slots_in_use = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        let hops = Family::<TransportLabel, Gauge>::default();
        let sessions = Gauge::default();
        let partials = Gauge::default();
        let partial_bytes = Gauge::default();
        registry.register("received_bytes", "Chunk bytes received from upstream, by peer", bytes_in.clone());
        registry.register("forwarded_bytes", "Chunk bytes sent downstream, by peer", bytes_out.clone());
        registry.register("chunks_verified", "Chunks whose xxh3-128 digest checked out", chunks_verified.clone());
        registry.register("digest_failures", "Chunks whose bytes did not match their digest", digest_failures.clone());
        registry.register("pushes", "Pushes handled by this node, by outcome here", pushes.clone());
        registry.register(
            "hop_throughput_bytes_per_second",
            "Bytes per second received per finished push",
            hop_throughput.clone(),
        );
        registry.register(
            "chunk_receive_seconds",
            "Mean time to receive one chunk, per finished push",
            chunk_latency.clone(),
        );
        registry.register(
            "pool_slots_in_use",
            "Buffer pool slots in use over running sessions",
            pool_slots_in_use.clone(),
        );
        registry.register("hops", "Open hops by transport and direction", hops.clone());
        registry.register("sessions", "Push sessions running", sessions.clone());
        registry.register("partials", "Partial stagings kept for resumes", partials.clone());
        registry.register("partial_bytes", "Bytes the partial stagings take on disk", partial_bytes.clone());
        Self {
            registry,
            bytes_in,
            bytes_out,
            chunks_verified,
            digest_failures,
            pushes,
            hop_throughput,
            chunk_latency,
            pool_slots_in_use,
            hops,
            sessions,
            partials,
            partial_bytes,
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }

    /// Counts a push's outcome.
    pub fn push_outcome(&self, outcome: &str) {
        self.pushes.get_or_create(&OutcomeLabel { outcome: outcome.into() }).inc();
    }

    /// The open-hop gauge for a transport and direction.
    pub fn hop(&self, transport: &str, direction: &str) -> Gauge {
        self.hops.get_or_create(&TransportLabel { transport: transport.into(), direction: direction.into() }).clone()
    }
}

/// The counters one session updates on its data path.
#[derive(Debug, Clone)]
pub struct SessionMetrics {
    /// All of the server's metrics (for the per-push histograms at the end).
    pub all: Arc<Metrics>,
    /// Bytes in from this session's upstream.
    pub bytes_in: Counter<u64, AtomicU64>,
    /// Bytes out to this session's downstream.
    pub bytes_out: Counter<u64, AtomicU64>,
}

impl SessionMetrics {
    /// Takes the per-peer counters for a session. `upstream` is the connecting address (its
    /// port, new for every connection, is left out of the label).
    pub fn new(all: &Arc<Metrics>, upstream: &str, downstream: &str) -> Self {
        Self {
            all: Arc::clone(all),
            bytes_in: all.bytes_in.get_or_create(&PeerLabel { peer: peer_host(upstream) }).clone(),
            bytes_out: all.bytes_out.get_or_create(&PeerLabel { peer: downstream.into() }).clone(),
        }
    }
}

/// The address of `peer` without its port ("10.0.0.1:41234" -> "10.0.0.1", "[::1]:5" -> "::1");
/// anything that is not a socket address is kept as it is.
pub fn peer_host(peer: &str) -> String {
    peer.parse::<SocketAddr>().map_or_else(|_| peer.to_owned(), |a| a.ip().to_string())
}

/// Serves `GET /metrics` on `listen` from a background thread; returns the bound address.
pub fn serve(listen: &str, metrics: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    let l = TcpListener::bind(listen)?;
    let addr = l.local_addr()?;
    std::thread::Builder::new().name("shardcast-metrics".into()).spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(5)));
            let mut first = String::new();
            let mut r = BufReader::new(&conn);
            if r.read_line(&mut first).is_err() {
                continue;
            }
            // Drain the request headers.
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let (status, ctype, body) = if first.starts_with("GET /metrics") {
                ("200 OK", "text/plain; version=0.0.4; charset=utf-8", metrics.render())
            } else {
                ("404 Not Found", "text/plain", "try /metrics\n".to_owned())
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    })?;
    Ok(addr)
}

//! Prometheus metrics of a replica server (`shardcast serve --metrics ADDR`), served as text
//! format at `http://ADDR/metrics` by hyper on a tokio runtime of its own thread.
//!
//! Counters are incremented on the data path with one atomic add each (a session takes its
//! per-peer counters once, at its start).

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
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

/// A lane label: direction (in, out) and lane index.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LaneLabel {
    /// in (from upstream) or out (to downstream).
    pub direction: String,
    /// The lane's index in its hop (0: the hop's first connection).
    pub lane: String,
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
    /// Chunk payload bytes received from upstream as they travelled (compressed or not), by
    /// upstream peer: next to `received_bytes`, what compression saved on the link.
    pub wire_bytes_in: Family<PeerLabel, Counter>,
    /// Chunks received and sent, by direction and lane (`push --lanes R`).
    pub lane_chunks: Family<LaneLabel, Counter>,
    /// Chunks whose digest checked out.
    pub chunks_verified: Counter,
    /// Chunks whose bytes did not match their digest.
    pub digest_failures: Counter,
    /// Chunks received as XOR deltas (`push --delta`), applied to this node's base and checked.
    pub delta_chunks: Counter,
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
        let wire_bytes_in = Family::<PeerLabel, Counter>::default();
        let lane_chunks = Family::<LaneLabel, Counter>::default();
        let chunks_verified = Counter::default();
        let digest_failures = Counter::default();
        let delta_chunks = Counter::default();
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
        registry.register(
            "received_wire_bytes",
            "Chunk payload bytes received from upstream as they travelled (compressed or not), by peer",
            wire_bytes_in.clone(),
        );
        registry.register("lane_chunks", "Chunks received (in) or sent (out), by hop lane", lane_chunks.clone());
        registry.register("chunks_verified", "Chunks whose xxh3-128 digest checked out", chunks_verified.clone());
        registry.register("digest_failures", "Chunks whose bytes did not match their digest", digest_failures.clone());
        registry.register(
            "delta_chunks",
            "Chunks received as XOR deltas, applied to this node's base and checked",
            delta_chunks.clone(),
        );
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
            wire_bytes_in,
            lane_chunks,
            chunks_verified,
            digest_failures,
            delta_chunks,
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
    /// Payload bytes in from upstream as they travelled (compressed or not).
    pub wire_in: Counter<u64, AtomicU64>,
}

impl SessionMetrics {
    /// Takes the per-peer counters for a session. `upstream` is the connecting address (its
    /// port, new for every connection, is left out of the label).
    pub fn new(all: &Arc<Metrics>, upstream: &str, downstream: &str) -> Self {
        Self {
            all: Arc::clone(all),
            bytes_in: all.bytes_in.get_or_create(&PeerLabel { peer: peer_host(upstream) }).clone(),
            wire_in: all.wire_bytes_in.get_or_create(&PeerLabel { peer: peer_host(upstream) }).clone(),
            bytes_out: all.bytes_out.get_or_create(&PeerLabel { peer: downstream.into() }).clone(),
        }
    }
}

impl SessionMetrics {
    /// The chunk counter of lane `lane` in `direction` (in, out).
    pub fn lane_chunks(&self, direction: &str, lane: usize) -> Counter<u64, AtomicU64> {
        let label = LaneLabel { direction: direction.into(), lane: lane.to_string() };
        self.all.lane_chunks.get_or_create(&label).clone()
    }
}

/// The address of `peer` without its port ("10.0.0.1:41234" -> "10.0.0.1", "[::1]:5" -> "::1");
/// anything that is not a socket address is kept as it is.
pub fn peer_host(peer: &str) -> String {
    peer.parse::<SocketAddr>().map_or_else(|_| peer.to_owned(), |a| a.ip().to_string())
}

/// Serves `GET /metrics` on `listen` (HTTP/1.1, hyper) from a tokio runtime on a background
/// thread: every connection is a task, so idle scrapers cost no thread. Returns the bound address.
pub fn serve(listen: &str, metrics: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    let l = TcpListener::bind(listen)?;
    let addr = l.local_addr()?;
    l.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("shardcast-metrics".into()).spawn(move || {
        runtime.block_on(async move {
            let l = match tokio::net::TcpListener::from_std(l) {
                Ok(l) => l,
                Err(e) => return tracing::error!("metrics endpoint on {addr}: {e}"),
            };
            loop {
                let conn = match l.accept().await {
                    Ok((conn, _)) => conn,
                    Err(e) => {
                        tracing::warn!("metrics endpoint: accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let metrics = Arc::clone(&metrics);
                tokio::spawn(async move {
                    let answer =
                        service_fn(move |req| std::future::ready(Ok::<_, Infallible>(respond(&req, &metrics))));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(std::time::Duration::from_secs(5))
                        .serve_connection(TokioIo::new(conn), answer)
                        .await;
                });
            }
        });
    })?;
    Ok(addr)
}

/// The text exposition for `GET /metrics`, a 404 for anything else.
fn respond(req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, ctype, body) = if req.method() == Method::GET && req.uri().path().starts_with("/metrics") {
        (StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", metrics.render())
    } else {
        (StatusCode::NOT_FOUND, "text/plain", "try /metrics\n".to_owned())
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    // One request per connection, as scrapers and `curl` expect of this endpoint.
    resp.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}

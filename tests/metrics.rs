//! `shardcast serve --metrics ADDR`: Prometheus text at /metrics, counting a real push.

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use util::*;

fn get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics port");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The value of the first sample line starting with `prefix`.
fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {prefix:?} in:\n{text}"))
}

#[test]
fn metrics_count_a_push() {
    let c = Cluster::builder().serve_arg("--metrics").serve_arg("127.0.0.1:0").start(2);
    let maddr = metrics_addr(&c, 0);
    let src = tempdir();
    write_random_file(&src.path().join("a.bin"), 3 * (1 << 20) + 1, 9);
    let out = c.push(src.path(), "m", 1, &["--chunk-size", "1M"]);
    c.assert_push_ok(&out);

    let resp = get(&maddr, "/metrics");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let bytes = (3 << 20) + 1;
    assert!(sample(&resp, "shardcast_received_bytes_total{") >= f64::from(bytes), "{resp}");
    assert!(
        sample(&resp, &format!("shardcast_forwarded_bytes_total{{peer=\"{}\"}}", c.addr(1))) >= f64::from(bytes),
        "{resp}"
    );
    assert_eq!(sample(&resp, "shardcast_chunks_verified_total"), 4.0, "{resp}");
    assert_eq!(sample(&resp, "shardcast_digest_failures_total"), 0.0, "{resp}");
    assert_eq!(sample(&resp, "shardcast_pushes_total{outcome=\"published\"}"), 1.0, "{resp}");
    assert_eq!(sample(&resp, "shardcast_sessions"), 0.0, "{resp}");
    assert_eq!(sample(&resp, "shardcast_pool_slots_in_use"), 0.0, "{resp}");
    assert_eq!(sample(&resp, "shardcast_hops{transport=\"tcp\",direction=\"upstream\"}"), 0.0, "{resp}");
    assert_eq!(sample(&resp, "shardcast_hop_throughput_bytes_per_second_count"), 1.0, "{resp}");
    assert!(get(&maddr, "/nope").starts_with("HTTP/1.1 404"));
}

/// The address `serve --metrics 127.0.0.1:0` of server `i` printed when it started.
fn metrics_addr(c: &Cluster, i: usize) -> String {
    let log = c.log(i);
    log.lines()
        .find_map(|l| l.split("metrics on http://").nth(1))
        .and_then(|r| r.split('/').next())
        .unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"))
        .to_owned()
}

/// The sample lines of metric `name` (one per label set).
fn series<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.starts_with(&format!("{name}{{"))).collect()
}

#[test]
fn a_hundred_pushes_from_one_peer_leave_one_series_per_metric() {
    // Every push comes from a new ephemeral port (the primary's, then the relay's onward
    // connection): labelled by address and port, each would add a series, without bound.
    let c = Cluster::builder().serve_arg("--metrics").serve_arg("127.0.0.1:0").start(2);
    let src = tempdir();
    write_random_file(&src.path().join("a.bin"), 4096, 3);
    for v in 1..=100 {
        c.assert_push_ok(&c.push(src.path(), "many", v, &[]));
    }
    for i in 0..2 {
        let resp = get(&metrics_addr(&c, i), "/metrics");
        let received = series(&resp, "shardcast_received_bytes_total");
        assert_eq!(
            received,
            [format!("shardcast_received_bytes_total{{peer=\"127.0.0.1\"}} {}", 100 * 4096)],
            "{resp}"
        );
        assert_eq!(series(&resp, "shardcast_pushes_total").len(), 1, "{resp}");
        assert_eq!(series(&resp, "shardcast_hops").len(), if i == 0 { 2 } else { 1 }, "{resp}");
    }
    let resp = get(&metrics_addr(&c, 0), "/metrics");
    assert_eq!(series(&resp, "shardcast_forwarded_bytes_total").len(), 1, "{resp}");
}

#[test]
fn the_no_verify_benchmark_switch_does_nothing_in_an_ordinary_build() {
    if !cfg!(debug_assertions) {
        // The relays' bit flip (SHARDCAST_TEST_FLIP_FORWARD) exists only in debug builds.
        skip(
            "metrics::the_no_verify_benchmark_switch_does_nothing_in_an_ordinary_build",
            "its fault injection exists only in debug builds (run without --release)",
        );
        return;
    }
    // A relay flips a bit of the digest of every 3rd chunk it forwards (a test-only fault of
    // debug builds); the tail runs with SHARDCAST_BENCH_NO_VERIFY=1, which only a build with the
    // `bench-switches` feature obeys: this one must still check every digest.
    let c = Cluster::builder()
        .serve_arg("--metrics")
        .serve_arg("127.0.0.1:0")
        .env("SHARDCAST_TEST_FLIP_FORWARD", "3")
        .env("SHARDCAST_BENCH_NO_VERIFY", "1")
        .start(2);
    assert!(!c.log(1).contains("VERIFICATION OFF"), "{}", c.logs());
    let src = tempdir();
    write_random_file(&src.path().join("a.bin"), 8 << 20, 4);
    let _ = c.push(src.path(), "nv", 1, &["--chunk-size", "1M"]);
    let resp = get(&metrics_addr(&c, 1), "/metrics");
    assert!(sample(&resp, "shardcast_digest_failures_total") >= 1.0, "{resp}\n{}", c.logs());
}

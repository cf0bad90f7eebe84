//! With `SHARDCAST_RELAY_BACKLOG_BYTES=2097152` a relay queues only a bounded backlog for
//! downstream: with its downstream frozen (SIGSTOP: the connection stays open, nothing is read),
//! it stops taking chunks from upstream once 2 MiB wait for the socket, instead of filling its
//! whole pool (64 MiB). Then the downstream thaws and the push completes with every byte in place.
//! (The bound is off by default: see `DEFAULT_RELAY_BACKLOG_BYTES`.)

mod util;

use std::time::{Duration, Instant};

use util::*;

const MIB: u64 = 1 << 20;

#[test]
fn a_relay_stops_taking_chunks_once_its_backlog_for_downstream_is_full() {
    // Relay (server 0) and tail (server 1); hop deadlines far beyond the test's waits.
    let mut c = Cluster::builder()
        .env("SHARDCAST_RELAY_BACKLOG_BYTES", "2097152")
        .serve_arg("--metrics")
        .serve_arg("127.0.0.1:0")
        .serve_arg("--hop-timeout")
        .serve_arg("60")
        .start(2);
    let m0 = metrics_addr(&c.log(0));
    let src = tempdir();
    let size = 160 * MIB;
    write_random_file(&src.path().join("ckpt.bin"), size, 11);
    let mut push = Running::spawn(&mut c.push_cmd(
        &c.addrs(),
        src.path(),
        "ck",
        1,
        &["--chunk-size", "1M", "--json", "--hop-timeout", "60"],
    ));
    let started = wait_until(Duration::from_secs(60), || received(&m0) >= 4 * MIB || push.try_wait().is_some());
    assert!(started && push.try_wait().is_none(), "the push ended before the tail could be frozen\n{}", c.logs());
    let tail = c.server(1).pid().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &tail]).status().unwrap().success());

    // The relay goes on until the socket to the tail and its backlog are full, then takes
    // nothing more: wait until its received count holds still for a second.
    let (mut last, mut since) = (received(&m0), Instant::now());
    let settled = wait_until(Duration::from_secs(30), || {
        let now = received(&m0);
        if now != last {
            (last, since) = (now, Instant::now());
        }
        since.elapsed() >= Duration::from_secs(1)
    });
    let (got, sent) = (received(&m0), metric_sum(&m0, "shardcast_forwarded_bytes_total{"));
    assert!(std::process::Command::new("kill").args(["-CONT", &tail]).status().unwrap().success());
    assert!(settled, "the relay kept receiving with its downstream frozen\n{}", c.logs());
    let backlog = got.saturating_sub(sent);
    // The bound, a chunk that was already arriving, and a piece in flight.
    assert!(
        backlog <= 4 * MIB,
        "the relay holds {backlog} bytes it has not forwarded (received {got}, forwarded {sent}): not bounded"
    );
    assert!(got < size, "the relay received everything ({got} bytes) while its downstream was frozen");

    assert!(push.wait_timeout(Duration::from_secs(120)).is_some(), "push hangs after the tail thawed\n{}", c.logs());
    let out = push.finish(Duration::from_secs(5));
    c.assert_push_ok(&out);
    for i in 0..2 {
        assert_tree_identical(src.path(), &c.root(i).join("ck").join("1"));
    }
}

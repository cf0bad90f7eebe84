//! `push --lanes R`: every hop of the chain is R TCP connections. Real `shardcast serve`
//! processes; the lanes' balance is read from `push --json` (the first hop) and each server's
//! `shardcast_lane_chunks_total` metrics (every hop).

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use shardcast::wire::{self, Kind, LaneJoin};
use util::*;

const MIB: u64 = 1 << 20;

/// The cluster key of the keyed lane tests.
const LANE_KEY: &str = "correct-horse-battery-staple-0123456789abcdef";

/// Chunks server `maddr` counted on lane `lane` in `direction` (in, out).
fn lane_chunks(maddr: &str, direction: &str, lane: usize) -> u64 {
    metric_sum(maddr, &format!("shardcast_lane_chunks_total{{direction=\"{direction}\",lane=\"{lane}\"}}"))
}

/// A source with a large file, small ones and an empty one (an empty chunk on some lane).
fn source(seed: u64) -> tempfile::TempDir {
    let src = tempdir();
    make_small_tree(src.path(), seed);
    write_random_file(&src.path().join("big.bin"), 48 * MIB + 12_345, seed + 10);
    src
}

fn push_through_three(lanes: usize) {
    let c = Cluster::builder().serve_arg("--metrics").serve_arg("127.0.0.1:0").start(3);
    let src = source(lanes as u64);
    let lanes_arg = lanes.to_string();
    let out = c.push(src.path(), "ck", 1, &["--chunk-size", "1M", "--json", "--lanes", &lanes_arg]);
    c.assert_push_ok(&out);
    c.assert_published(src.path(), "ck", 1);
    let report = parse_json(&out);
    let first: Vec<u64> = report["lane_chunks"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(first.len(), lanes, "one count per lane: {report}");
    assert!(first.iter().all(|&n| n > 0), "a lane of the first hop carried nothing: {first:?}");
    let total: u64 = first.iter().sum();
    assert_eq!(total, report["chunks"].as_u64().unwrap(), "every chunk went on exactly one lane");
    for i in 0..3 {
        let m = metrics_addr(&c.log(i));
        let inbound: Vec<u64> = (0..lanes).map(|k| lane_chunks(&m, "in", k)).collect();
        assert!(inbound.iter().all(|&n| n > 0), "server {i}: a lane in carried nothing: {inbound:?}");
        assert_eq!(inbound.iter().sum::<u64>(), total, "server {i}: chunks in over its lanes");
        if i < 2 {
            let out: Vec<u64> = (0..lanes).map(|k| lane_chunks(&m, "out", k)).collect();
            // A relay forwards on lane k what came on lane k.
            assert_eq!(out, inbound, "server {i}: lanes out differ from lanes in");
        }
    }
}

#[test]
fn two_lanes_through_a_chain_of_three_publish_identical_bytes_and_every_lane_carries_chunks() {
    push_through_three(2);
}

#[test]
fn three_lanes_through_a_chain_of_three_publish_identical_bytes_and_every_lane_carries_chunks() {
    push_through_three(3);
}

#[test]
fn two_lanes_with_a_cluster_key_authenticate_each_lane_and_publish_identical_bytes() {
    let key = tempdir();
    let c = keyed_cluster(2, &key_file(key.path(), "cluster.key", LANE_KEY));
    let src = source(7);
    let out = c.push(src.path(), "ck", 1, &["--chunk-size", "1M", "--json", "--lanes", "2"]);
    c.assert_push_ok(&out);
    c.assert_published(src.path(), "ck", 1);
}

/// A routed push over lanes: r0 holds version 1, r1 and r2 nothing. r0 stores only the one
/// changed chunk but relays every chunk on the lane it came on; each replica publishes the new
/// bytes, and r0 takes in no more than the routed push sends it.
#[test]
fn an_incremental_push_over_lanes_relays_chunks_the_relay_already_holds() {
    let c = Cluster::builder().serve_arg("--metrics").serve_arg("127.0.0.1:0").start(3);
    let m: Vec<String> = (0..3).map(|i| metrics_addr(&c.log(i))).collect();
    let src = tempdir();
    let w = src.path().join("w.bin");
    write_random_file(&w, 24 * MIB + 7, 11);
    c.assert_push_ok(&c.push_to(&c.addr(0), src.path(), "ck", 1, &["--chunk-size", "1M"]));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&w).unwrap();
        f.write_all_at(&random_bytes(100, 12), 5 * MIB + 10).unwrap();
    }
    let before: Vec<u64> = m.iter().map(|a| received(a)).collect();
    // r0's lane 0 counted version 1's chunks already.
    let lanes_before = |a: &str, d: &str| -> Vec<u64> { (0..2).map(|k| lane_chunks(a, d, k)).collect() };
    let (in0, out0) = (lanes_before(&m[0], "in"), lanes_before(&m[0], "out"));
    let out = c.push(src.path(), "ck", 2, &["--chunk-size", "1M", "--incremental", "--lanes", "2", "--json"]);
    c.assert_push_ok(&out);
    c.assert_published(src.path(), "ck", 2);
    let size = 24 * MIB + 7;
    for (i, a) in m.iter().enumerate() {
        assert_eq!(received(a) - before[i], size, "replica {i}: every chunk passes it (r1 and r2 need them all)");
    }
    for (i, a) in m.iter().enumerate() {
        let since = |d: &str, base: &[u64]| -> Vec<u64> {
            lanes_before(a, d).iter().enumerate().map(|(k, n)| n - base.get(k).copied().unwrap_or(0)).collect()
        };
        let (inbound, out) =
            if i == 0 { (since("in", &in0), since("out", &out0)) } else { (since("in", &[]), since("out", &[])) };
        assert!(inbound.iter().all(|&n| n > 0), "replica {i}: a lane in carried nothing: {inbound:?}");
        assert_eq!(inbound.iter().sum::<u64>(), 25, "replica {i}: every chunk came in once");
        if i < 2 {
            assert_eq!(out, inbound, "replica {i} forwards on lane k what came on lane k");
        }
    }
    let v = c.verify(0, "ck", &["--version", "1"]);
    assert_eq!(code(&v), 0, "version 1 must stay intact on r0: {}", show_output(&v));
}

#[test]
fn a_lane_with_a_wrong_token_is_refused_and_the_push_goes_on() {
    let c = Cluster::start(2);
    let src = source(5);
    let mut push = Running::spawn(&mut c.push_cmd(
        &c.addrs(),
        src.path(),
        "ck",
        1,
        &["--chunk-size", "1M", "--json", "--lanes", "2"],
    ));
    // A LANE naming no push (a guessed token), while the push runs, at both replicas.
    for i in 0..2 {
        let mut s = TcpStream::connect(c.addr(i)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let join = LaneJoin { token: [0x5a; wire::LANE_TOKEN_LEN], lane: 1 };
        wire::write_frame(&mut s, Kind::Lane, 0, &join.encode()).unwrap();
        let f = wire::read_frame(&mut s).unwrap_or_else(|e| panic!("no answer to LANE: {e}\n{}", c.logs()));
        assert_eq!(f.header.kind, Kind::Reject, "LANE with a wrong token got {}", f.header.kind.name());
        let reports = wire::decode_reports(&f.payload).unwrap();
        let why = format!("{:?}", reports[0].outcome);
        assert!(why.contains("Unauthorized") && why.contains("no push waiting"), "{why}");
    }
    assert!(push.wait_timeout(Duration::from_secs(120)).is_some(), "push hangs\n{}", c.logs());
    let out = push.finish(Duration::from_secs(5));
    c.assert_push_ok(&out);
    c.assert_published(src.path(), "ck", 1);
}

/// A proxy to `target` that cuts its `victim`th connection (0: the first) after `after` bytes
/// from the client: both directions are shut down. Returns its address and whether it cut.
fn cutting_proxy(target: String, victim: usize, after: u64) -> (String, Arc<AtomicBool>) {
    slow_or_cutting_proxy(target, victim, after, Duration::ZERO)
}

/// [`cutting_proxy`], and the victim's bytes from the client pass in 64 KiB pieces with
/// `pause` after each (a slow lane).
fn slow_or_cutting_proxy(target: String, victim: usize, after: u64, pause: Duration) -> (String, Arc<AtomicBool>) {
    let seen = Arc::new(AtomicUsize::new(0));
    let cut = Arc::new(AtomicBool::new(false));
    let cut2 = Arc::clone(&cut);
    let addr = proxy(target, move |_, client, server| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        let limit = if n == victim { after } else { u64::MAX };
        let pause = if n == victim { pause } else { Duration::ZERO };
        let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        // Back from the server: as it comes.
        std::thread::spawn(move || {
            let (mut from, mut to) = (s2, c2);
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
        let cut = Arc::clone(&cut2);
        std::thread::spawn(move || {
            let (mut from, mut to) = (client, server);
            let mut buf = vec![0u8; 64 << 10];
            let mut passed = 0u64;
            loop {
                let want = buf.len().min((limit - passed).min(buf.len() as u64) as usize);
                let got = match from.read(&mut buf[..want]) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => k,
                };
                if to.write_all(&buf[..got]).is_err() {
                    break;
                }
                passed += got as u64;
                std::thread::sleep(pause);
                if passed >= limit {
                    cut.store(true, Ordering::SeqCst);
                    let _ = from.shutdown(std::net::Shutdown::Both);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
    });
    (addr, cut)
}

#[test]
fn a_lane_cut_mid_push_fails_its_hop_and_the_repair_leaves_every_replica_identical() {
    let c = Cluster::start(3);
    let src = source(9);
    // The hop to the middle replica: its second connection (lane 1 of the first attempt) is
    // cut after 6 MiB.
    let (middle, cut) = cutting_proxy(c.addr(1), 1, 6 * MIB);
    let to = format!("{},{},{}", c.addr(0), middle, c.addr(2));
    let out = c.push_to(&to, src.path(), "ck", 1, &["--chunk-size", "1M", "--json", "--lanes", "2"]);
    assert!(cut.load(Ordering::SeqCst), "the proxy never cut the lane\n{}", show_output(&out));
    c.assert_push_ok(&out);
    c.assert_published(src.path(), "ck", 1);
}

/// Pushes `mib` MiB of random bytes (`seed`) from `src` in 1 MiB chunks over 2 lanes through
/// the first `replicas` of cluster `c`, the first hop's lane 1 (the proxy's second connection)
/// passing 64 KiB per `pause_ms` ms and lane 0 running at loopback speed, with `extra` push
/// arguments; checks every copy and returns the chunks per lane of the first hop.
fn push_with_a_slow_lane(
    c: &Cluster,
    replicas: usize,
    src: &Path,
    mib: u64,
    seed: u64,
    pause_ms: u64,
    extra: &[&str],
) -> Vec<u64> {
    write_random_file(&src.join("big.bin"), mib * MIB, seed);
    let (slow, _) = slow_or_cutting_proxy(c.addr(0), 1, u64::MAX, Duration::from_millis(pause_ms));
    let to: Vec<String> = std::iter::once(slow).chain((1..replicas).map(|i| c.addr(i))).collect();
    let mut args = vec!["--chunk-size", "1M", "--json", "--lanes", "2"];
    args.extend(extra);
    let out = c.push_to(&to.join(","), src, "ck", 1, &args);
    c.assert_push_ok(&out);
    c.assert_published(src, "ck", 1);
    first_hop_lanes(&out)
}

#[test]
fn the_primary_gives_a_slow_lane_fewer_chunks() {
    let c = Cluster::start(1);
    let src = tempdir();
    // Lane 1 passes ~6 MB/s.
    let lanes = push_with_a_slow_lane(&c, 1, src.path(), 32, 21, 10, &[]);
    // Round robin would give each lane 16 of the 32 chunks.
    assert!(lanes[1] * 3 < lanes[0], "the slow lane was not given fewer chunks: {lanes:?}");
}

#[test]
fn a_slow_lane_does_not_hold_up_the_fast_one_in_a_replicas_pool() {
    // The replica's pool: 4 slots of 1 MiB; lane 1 passes ~3 MB/s.
    let c = Cluster::builder().serve_arg("--pool-mb").serve_arg("4").start(1);
    let src = tempdir();
    let lanes = push_with_a_slow_lane(&c, 1, src.path(), 48, 23, 20, &[]);
    // A replica that wrote chunks only in order kept those that came ahead of one still on the
    // slow lane in its slots, the last of which it keeps for the lane that carries the missing
    // chunk: the fast lane ran at most 2 chunks ahead and the slow one took 10 of the 48 (5.0 and
    // 3.2 s). Written and freed as they arrive, the fast lane takes all but 4 (2.0 s).
    assert!(lanes[1] * 5 < lanes[0], "the slow lane held the fast one back: {lanes:?}");
}

#[test]
fn a_slow_lane_does_not_hold_up_the_fast_one_at_an_encrypted_relay() {
    // An encrypted push: the relay forwards whole sealed frames (no cut-through). Its pool: 4
    // slots of 1 MiB; lane 1 from the primary passes ~3 MB/s.
    let t = tempdir();
    let key = key_file(t.path(), "cluster.key", "a-slow-lane-at-an-encrypted-relay");
    let c = Cluster::builder()
        .env("SHARDCAST_KEY_FILE", key.to_str().unwrap())
        .serve_arg("--pool-mb")
        .serve_arg("4")
        .start(2);
    let lanes = push_with_a_slow_lane(&c, 2, &t.path().join("src"), 48, 29, 20, &["--encrypt"]);
    // The relay hands each frame to the lane it goes on as it is ready (the order it came in on
    // that lane), so the fast lane's frames do not wait in its slots for the slow lane's. Held
    // in chunk order they did: 10 of 48 chunks went on the slow lane, and the relay, its slots
    // full, kept its window shut until the primary's lane gave up and the chain was repaired.
    assert!(lanes[1] * 5 < lanes[0], "the slow lane held the fast one back at the relay: {lanes:?}");
}

/// A proxy to `target` whose every connection, once it passed `after` bytes from the client,
/// reads nothing more for `stall` (once): a replica behind it that is slow for a while (a disk
/// that stalls), whose sender then sees its window shut.
fn stalling_proxy(target: String, after: u64, stall: Duration) -> String {
    proxy(target, move |_, client, server| {
        let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        std::thread::spawn(move || {
            let (mut from, mut to) = (s2, c2);
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
        std::thread::spawn(move || {
            let (mut from, mut to) = (client, server);
            let mut buf = vec![0u8; 64 << 10];
            let (mut passed, mut stalled) = (0u64, false);
            loop {
                let got = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => k,
                };
                if to.write_all(&buf[..got]).is_err() {
                    break;
                }
                passed += got as u64;
                if passed >= after && !stalled {
                    stalled = true;
                    std::thread::sleep(stall);
                }
            }
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
    })
}

#[test]
fn a_replica_that_stops_reading_for_two_seconds_is_waited_for_not_cut_off() {
    // The tail stops taking anything for 2 s, a quarter of the way in, on both lanes. The relay's
    // lanes to it, then the primary's to the relay (its pool full), see a shut window for that
    // long. A lane is cut only when what it sent goes unacknowledged (a link down), not for
    // back-pressure: the kernel's TCP_USER_TIMEOUT cut both, and the chain was repaired.
    let c = Cluster::builder().serve_arg("--pool-mb").serve_arg("8").start(2);
    let src = tempdir();
    write_random_file(&src.path().join("big.bin"), 48 * MIB, 31);
    let tail = stalling_proxy(c.addr(1), 6 * MIB, Duration::from_secs(2));
    let to = format!("{},{tail}", c.addr(0));
    let out = c.push_to(&to, src.path(), "ck", 1, &["--chunk-size", "1M", "--json", "--lanes", "2"]);
    c.assert_push_ok(&out);
    c.assert_published(src.path(), "ck", 1);
    let report = parse_json(&out);
    assert_eq!(
        report["repairs"],
        0,
        "the chain was repaired around a replica that was only slow\n{}",
        show_output(&out)
    );
    assert!(report["seconds"].as_f64().unwrap() >= 2.0, "the proxy never stalled\n{}", show_output(&out));
}

/// Chunks per lane of the first hop, from `push --json`.
fn first_hop_lanes(out: &std::process::Output) -> Vec<u64> {
    let report = parse_json(out);
    report["lane_chunks"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect()
}

/// The (local, peer) IP addresses of each lane of the first hop, from `push --json`.
fn lane_ips(report: &serde_json::Value) -> Vec<(String, String)> {
    let ip = |v: &serde_json::Value| v.as_str().unwrap().parse::<std::net::SocketAddr>().unwrap().ip().to_string();
    report["lane_addrs"].as_array().unwrap().iter().map(|l| (ip(&l["local"]), ip(&l["peer"]))).collect()
}

#[test]
fn lanes_run_from_the_pushers_rails_to_the_replicas_rails_lane_k_on_rail_k_mod_r() {
    // Every replica: rails 127.0.0.2 and 127.0.0.3 (listening on 127.0.0.1); the pusher's:
    // 127.0.0.4 and 127.0.0.5 (the whole of 127/8 is this host's on Linux).
    let c = Cluster::builder()
        .serve_arg("--rail")
        .serve_arg("127.0.0.2")
        .serve_arg("--rail")
        .serve_arg("127.0.0.3")
        .start(2);
    let src = source(11);
    let rails = ["--rail", "127.0.0.4", "--rail", "127.0.0.5"];
    let mut args = vec!["--chunk-size", "1M", "--json", "--lanes", "3"];
    args.extend(rails);
    let out = c.push(src.path(), "ck", 1, &args);
    c.assert_push_ok(&out);
    c.assert_published(src.path(), "ck", 1);
    let report = parse_json(&out);
    let s = |a: &str, b: &str| (a.to_owned(), b.to_owned());
    // Lane 0 is the hop's first connection (to the address the chain names, from rail 0);
    // lane k >= 1 goes from the pusher's rail k mod 2 to the replica's rail k mod 2.
    assert_eq!(
        lane_ips(&report),
        vec![s("127.0.0.4", "127.0.0.1"), s("127.0.0.5", "127.0.0.3"), s("127.0.0.4", "127.0.0.2")],
        "{report}"
    );
    // The relay's lanes to the next replica, as its log names them.
    let next_port = c.addr(1).rsplit(':').next().unwrap().to_owned();
    let log = c.log(0);
    for (k, from, to) in [(1, "127.0.0.3", "127.0.0.3"), (2, "127.0.0.2", "127.0.0.2")] {
        let want = format!("lane {k} to {}: {from}:", c.addr(1));
        let line =
            log.lines().find(|l| l.contains(&want)).unwrap_or_else(|| panic!("no `{want}` in the relay's log\n{log}"));
        assert!(line.contains(&format!("-> {to}:{next_port}")), "lane {k} of the relay: {line}");
    }
}

#[test]
fn a_rail_that_is_not_an_address_of_this_host_stops_serve_at_its_start() {
    let root = tempdir();
    let out = run_timeout(
        shardcast()
            .args(["serve", "--listen", "127.0.0.1:0", "--rail", "127.0.0.2", "--rail", "192.0.2.1", "--root"])
            .arg(root.path()),
        Duration::from_secs(30),
    );
    assert_ne!(code(&out), 0, "{}", show_output(&out));
    let all = all_output(&out);
    assert!(all.contains("--rail 192.0.2.1") && all.contains("not an address of this host"), "{all}");
    assert!(!all.contains("listening on"), "{all}");
}

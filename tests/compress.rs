//! `push --compress`: real `shardcast serve` processes on loopback, chains of three, float
//! data like a model's weights (bf16 and fp32 of normally distributed values, as a trained
//! layer's are), random bytes, and a proxy that corrupts one compressed frame in transit.

mod util;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use util::*;

const MIB: usize = 1 << 20;

/// `n` weights drawn from N(0, std) with a fixed seed (Box-Muller over xorshift).
fn weights(n: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut x = seed | 1;
    let mut uniform = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u, v) = (uniform(), uniform());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32 * std
        })
        .collect()
}

/// A checkpoint-like directory: a bf16 tensor file and an fp32 one.
fn write_checkpoint(dir: &Path, seed: u64) {
    let w = weights(3 * MIB, 0.02, seed);
    let bf16: Vec<u8> = w.iter().flat_map(|f| ((f.to_bits() >> 16) as u16).to_le_bytes()).collect();
    std::fs::write(dir.join("model.bf16.bin"), bf16).unwrap();
    let fp32: Vec<u8> = w[..MIB + 12345].iter().flat_map(|f| f.to_le_bytes()).collect();
    std::fs::write(dir.join("model.fp32.bin"), fp32).unwrap();
}

fn metric_sum(maddr: &str, name: &str) -> u64 {
    let mut s = TcpStream::connect(maddr).expect("connect to the metrics port");
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn metrics_cluster(n: usize) -> Cluster {
    Cluster::builder().serve_arg("--metrics").serve_arg("127.0.0.1:0").start(n)
}

#[test]
fn float_checkpoints_through_three_replicas_in_each_mode() {
    let c = metrics_cluster(3);
    let src = tempdir();
    write_checkpoint(src.path(), 7);
    let maddrs: Vec<String> = (0..3).map(|i| metrics_addr(&c.log(i))).collect();
    let mut wire = std::collections::HashMap::new();
    for (v, mode) in [(1, "off"), (2, "zstd"), (3, "zstd-grouped"), (4, "auto")] {
        let before: Vec<(u64, u64)> = maddrs
            .iter()
            .map(|m| {
                (metric_sum(m, "shardcast_received_bytes_total"), metric_sum(m, "shardcast_received_wire_bytes_total"))
            })
            .collect();
        let out = c.push(src.path(), "ck", v, &["--chunk-size", "1M", "--compress", mode, "--json"]);
        c.assert_push_ok(&out);
        c.assert_published(src.path(), "ck", v);
        let j = parse_json(&out);
        let (raw, sent) = (j["sent_raw_bytes"].as_u64().unwrap(), j["sent_wire_bytes"].as_u64().unwrap());
        assert_eq!(raw, 10 * MIB as u64 + 4 * 12345, "{j}");
        wire.insert(mode, sent);
        // Every replica received the same bytes on the wire as the primary sent (relays forward
        // the compressed frames as they are), standing for all the raw bytes.
        for (i, m) in maddrs.iter().enumerate() {
            let got_raw = metric_sum(m, "shardcast_received_bytes_total") - before[i].0;
            let got_wire = metric_sum(m, "shardcast_received_wire_bytes_total") - before[i].1;
            assert_eq!((got_raw, got_wire), (raw, sent), "{mode}: replica {i}\n{}", c.logs());
        }
        match mode {
            "off" => assert_eq!(sent, raw),
            // Normally distributed weights: the exponent bytes compress, the mantissas barely.
            "zstd" | "zstd-grouped" => {
                assert!(sent < raw * 95 / 100, "{mode}: {sent} of {raw} bytes");
                assert_eq!(j["compressed_chunks"].as_u64(), Some(11), "{j}");
            }
            _ => {}
        }
    }
    // Grouping the bytes of each element beats plain zstd on floats.
    assert!(wire["zstd-grouped"] < wire["zstd"] * 95 / 100, "{wire:?}");
}

#[test]
fn random_bytes_go_raw() {
    let c = Cluster::start(2);
    let src = tempdir();
    write_random_file(&src.path().join("noise.bin"), 5 * MIB as u64 + 3, 11);
    let out = c.push(src.path(), "noise", 1, &["--chunk-size", "1M", "--compress", "zstd", "--json"]);
    c.assert_push_ok(&out);
    c.assert_published(src.path(), "noise", 1);
    let j = parse_json(&out);
    assert_eq!(j["compressed_chunks"].as_u64(), Some(0), "{j}");
    assert_eq!(j["sent_wire_bytes"], j["sent_raw_bytes"], "{j}");
}

/// A TCP proxy in front of `target` that parses the frames towards it and, on the first
/// connection, flips a byte in the middle of the payload of the first CHUNK whose flags have
/// a bit of `mask` (1: compressed, 8: a delta).
struct Corrupter {
    addr: String,
    flipped: Arc<AtomicUsize>,
}

impl Corrupter {
    fn start(target: String) -> Corrupter {
        Self::start_on(target, 1)
    }

    fn start_on(target: String, mask: u8) -> Corrupter {
        let flipped = Arc::new(AtomicUsize::new(0));
        let f = flipped.clone();
        let addr = proxy(target, move |first, client, server| {
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let tamper = first.then(|| f.clone());
            std::thread::spawn(move || frames(client, server, tamper, mask));
            std::thread::spawn(move || copy(s2, c2));
        });
        Corrupter { addr, flipped }
    }
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

/// Forwards frame by frame (header, then payload), flipping one payload byte of the first
/// CHUNK whose flags have a bit of `mask` when `tamper` is set.
fn frames(from: TcpStream, to: TcpStream, tamper: Option<Arc<AtomicUsize>>, mask: u8) {
    edit_frames(from, to, |h, payload| {
        if let Some(t) = &tamper
            && h[6] == 4
            && h[7] & mask != 0
            && t.load(Ordering::SeqCst) == 0
        {
            payload[payload.len() / 2] ^= 0x5a;
            t.store(1, Ordering::SeqCst);
        }
    });
}

/// Forwards frame by frame (header, then payload), letting `edit` change each on the way.
fn edit_frames(mut from: TcpStream, mut to: TcpStream, mut edit: impl FnMut(&[u8; 40], &mut [u8])) {
    loop {
        let mut h = [0u8; 40];
        if from.read_exact(&mut h).is_err() {
            break;
        }
        let len = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; len];
        if from.read_exact(&mut payload).is_err() {
            break;
        }
        edit(&h, &mut payload);
        if to.write_all(&h).and_then(|()| to.write_all(&payload)).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

#[test]
fn a_corrupted_compressed_frame_is_refused_and_sent_again() {
    // primary -> r0 -> proxy -> r1: the proxy corrupts the first compressed chunk r0 forwards.
    // r1 must refuse it (it decompresses to other bytes, or not at all) and get it again from
    // the primary's repair; nothing else may be published.
    let c = Cluster::start(2);
    let proxy = Corrupter::start(c.addr(1));
    let src = tempdir();
    write_checkpoint(src.path(), 3);
    let chain = format!("{},{}", c.addr(0), proxy.addr);
    let out =
        c.push_to(&chain, src.path(), "ck", 1, &["--chunk-size", "1M", "--compress", "zstd", "--transport", "tcp"]);
    assert_eq!(proxy.flipped.load(Ordering::SeqCst), 1, "no compressed frame passed the proxy\n{}", c.logs());
    c.assert_push_ok(&out);
    c.assert_published(src.path(), "ck", 1);
    let log = c.log(1);
    assert!(
        log.contains("compressed chunk refused") || log.contains("digest"),
        "r1 did not refuse the corrupted chunk:\n{}",
        c.logs()
    );
}

// XOR deltas (`push --delta --delta-base DIR`): the replicas hold v1, the primary pushes v2 as
// deltas against its copy of v1.

/// A checkpoint after a fine-tuning step: `v1`'s files with one weight in `every` nudged by a
/// step of its lowest mantissa bit, so that every chunk holds some change.
fn next_step(v1: &Path, v2: &Path, every: usize) {
    for f in ["model.bf16.bin", "model.fp32.bin"] {
        let mut b = std::fs::read(v1.join(f)).unwrap();
        for i in (0..b.len()).step_by(every) {
            // Little-endian: the byte at an even offset holds the lowest mantissa bits.
            b[i & !1] ^= 1;
        }
        std::fs::write(v2.join(f), b).unwrap();
    }
}

/// The CHUNK frames of a push's JSON: the delta count and the wire bytes against the raw ones.
fn delta_counts(j: &serde_json::Value) -> (u64, u64, u64) {
    let n = |k: &str| j[k].as_u64().unwrap_or_else(|| panic!("no {k} in {j}"));
    (n("delta_chunks"), n("sent_wire_bytes"), n("sent_raw_bytes"))
}

/// v1 everywhere, and v2 (one weight in 500 changed) in `src2`.
fn two_steps(c: &Cluster) -> (tempfile::TempDir, tempfile::TempDir) {
    let (v1, v2) = (tempdir(), tempdir());
    write_checkpoint(v1.path(), 5);
    next_step(v1.path(), v2.path(), 1000);
    let out = c.push(v1.path(), "ft", 1, &["--chunk-size", "1M"]);
    c.assert_push_ok(&out);
    (v1, v2)
}

fn delta_push(c: &Cluster, chain: &str, v1: &Path, v2: &Path, version: u64) -> Output {
    let base = v1.to_str().unwrap();
    c.push_to(chain, v2, "ft", version, &["--chunk-size", "1M", "--delta", "--delta-base", base, "--json"])
}

#[test]
fn deltas_through_three_replicas() {
    let c = metrics_cluster(3);
    let (v1, v2) = two_steps(&c);
    let maddrs: Vec<String> = (0..3).map(|i| metrics_addr(&c.log(i))).collect();
    let before: Vec<u64> = maddrs.iter().map(|m| metric_sum(m, "shardcast_received_wire_bytes_total")).collect();
    let out = delta_push(&c, &c.addrs(), v1.path(), v2.path(), 2);
    c.assert_push_ok(&out);
    c.assert_published(v2.path(), "ft", 2);
    let (deltas, wire, raw) = delta_counts(&parse_json(&out));
    // Every chunk changed and went as a delta: far fewer bytes than the chunks.
    assert_eq!((deltas, raw), (11, 10 * MIB as u64 + 4 * 12345), "{out:?}");
    assert!(wire < raw / 20, "{wire} bytes on the wire for {raw}");
    for (i, m) in maddrs.iter().enumerate() {
        assert_eq!(metric_sum(m, "shardcast_received_wire_bytes_total") - before[i], wire, "replica {i}");
        assert_eq!(util::metric_sum(m, "shardcast_delta_chunks_total "), 11, "replica {i}");
    }
}

#[test]
fn deltas_over_two_lanes() {
    // A delta push over lanes: each replica's ACCEPT carries its base digests and then the lane
    // token, and both must come apart again at the node before it.
    let c = metrics_cluster(3);
    let (v1, v2) = two_steps(&c);
    let base = v1.path().to_str().unwrap();
    let args = ["--chunk-size", "1M", "--delta", "--delta-base", base, "--lanes", "2", "--json"];
    let out = c.push(v2.path(), "ft", 2, &args);
    c.assert_push_ok(&out);
    c.assert_published(v2.path(), "ft", 2);
    let j = parse_json(&out);
    assert_eq!(delta_counts(&j).0, 11, "every chunk went as a delta: {out:?}");
    let lanes: Vec<u64> = j["lane_chunks"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(lanes.len(), 2, "{j}");
    assert!(lanes.iter().all(|&n| n > 0), "a lane carried nothing: {lanes:?}");
    for i in 0..3 {
        assert_eq!(util::metric_sum(&metrics_addr(&c.log(i)), "shardcast_delta_chunks_total "), 11, "replica {i}");
    }
}

#[test]
fn a_replica_with_another_base_gets_that_chunk_whole() {
    // r1's current version differs from v1 in one byte of the first chunk of model.bf16.bin:
    // it reports that chunk's other digest, so the chunk goes whole (to every node: each stores
    // it), the rest as deltas, and nothing is refused.
    let c = Cluster::start(3);
    let (v1, v2) = two_steps(&c);
    let other = tempdir();
    for f in ["model.bf16.bin", "model.fp32.bin"] {
        std::fs::copy(v1.path().join(f), other.path().join(f)).unwrap();
    }
    let mut b = std::fs::read(other.path().join("model.bf16.bin")).unwrap();
    b[4321] ^= 0x10;
    std::fs::write(other.path().join("model.bf16.bin"), b).unwrap();
    c.assert_push_ok(&c.push_to(&c.addr(1), other.path(), "ft", 2, &["--chunk-size", "1M"]));
    let out = delta_push(&c, &c.addrs(), v1.path(), v2.path(), 3);
    c.assert_push_ok(&out);
    c.assert_published(v2.path(), "ft", 3);
    assert_eq!(delta_counts(&parse_json(&out)).0, 10, "{out:?}");
    assert!(!c.logs().contains("refused"), "a delta went to a node with another base:\n{}", c.logs());
}

#[test]
fn a_base_that_differs_on_disk_is_refused_and_the_chunk_fetched_whole() {
    // r1's published v1 has one byte changed on disk (its manifest still says the old digest,
    // so it reports the primary's base): the delta of that chunk must be refused before it is
    // applied, and the repair sends the chunk whole.
    let c = Cluster::start(3);
    let (v1, v2) = two_steps(&c);
    let f = c.root(1).join("ft/1/model.bf16.bin");
    let mut perm = std::fs::metadata(&f).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    std::fs::set_permissions(&f, perm).unwrap();
    let mut b = std::fs::read(&f).unwrap();
    b[2 * MIB + 77] ^= 1;
    std::fs::write(&f, b).unwrap();
    let out = delta_push(&c, &c.addrs(), v1.path(), v2.path(), 2);
    c.assert_push_ok(&out);
    c.assert_published(v2.path(), "ft", 2);
    assert!(c.log(1).contains("base chunk no longer matches"), "r1 did not refuse the delta:\n{}", c.logs());
    assert_eq!(delta_counts(&parse_json(&out)).0, 11, "the first attempt sent every chunk as a delta: {out:?}");
}

#[test]
fn a_corrupted_delta_frame_is_refused_and_sent_again() {
    // primary -> r0 -> proxy -> r1: the proxy corrupts the first delta r0 forwards.
    let c = Cluster::start(2);
    let (v1, v2) = two_steps(&c);
    let proxy = Corrupter::start_on(c.addr(1), 8);
    let chain = format!("{},{}", c.addr(0), proxy.addr);
    let out = delta_push(&c, &chain, v1.path(), v2.path(), 2);
    assert_eq!(proxy.flipped.load(Ordering::SeqCst), 1, "no delta passed the proxy\n{}", c.logs());
    c.assert_push_ok(&out);
    c.assert_published(v2.path(), "ft", 2);
    assert!(c.log(1).contains("compressed chunk refused"), "r1 did not refuse the corrupted delta:\n{}", c.logs());
}

#[test]
fn a_relay_forwards_deltas_it_does_not_store() {
    // r0 already has v2's bytes as its current version (it stores none of them again and has
    // no base for them); r1 has v1: every chunk passes r0 as a delta for r1 only, and r0 must
    // forward it without trying to apply it.
    let c = Cluster::start(2);
    let (v1, v2) = two_steps(&c);
    c.assert_push_ok(&c.push_to(&c.addr(0), v2.path(), "ft", 2, &["--chunk-size", "1M"]));
    let out = delta_push(&c, &c.addrs(), v1.path(), v2.path(), 3);
    c.assert_push_ok(&out);
    c.assert_published(v2.path(), "ft", 3);
    assert_eq!(delta_counts(&parse_json(&out)).0, 11, "{out:?}");
    assert!(!c.logs().contains("refused"), "a relay refused a delta it only forwards:\n{}", c.logs());
}

/// Forwards frame by frame, clearing HELLO's COMPRESS flag (bit 2) on the way when `strip` is
/// set: the node behind it sees a push that announced deltas only.
fn strip_compress(from: TcpStream, to: TcpStream, strip: bool) {
    edit_frames(from, to, |h, payload| {
        if strip && h[6] == 1 {
            // HELLO: name (u32 length, bytes), version u64, mode u8, transport u8, keep u32, flags.
            let at = 4 + u32::from_le_bytes(payload[..4].try_into().unwrap()) as usize + 8 + 1 + 1 + 4;
            assert_ne!(payload[at] & 8, 0, "a delta push's HELLO says DELTA");
            payload[at] &= !4;
        }
    });
}

#[test]
fn a_push_that_announced_only_deltas_gets_no_compressed_chunk_accepted() {
    // primary -> r0 -> proxy -> r1: the proxy clears COMPRESS from the first HELLO to r1, so
    // r1 is told deltas only; the push compresses too, and the new file (no base) goes as
    // plain zstd frames. r1 must refuse those (not what HELLO announced); the repair, not
    // stripped, then publishes.
    let c = Cluster::start(2);
    let (v1, v2) = two_steps(&c);
    let w = weights(MIB, 0.02, 9);
    let extra: Vec<u8> = w.iter().flat_map(|f| ((f.to_bits() >> 16) as u16).to_le_bytes()).collect();
    std::fs::write(v2.path().join("new.bf16.bin"), extra).unwrap();
    let addr = proxy(c.addr(1), |first, client, server| {
        let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        std::thread::spawn(move || strip_compress(client, server, first));
        std::thread::spawn(move || copy(s2, c2));
    });
    let chain = format!("{},{addr}", c.addr(0));
    let base = v1.path().to_str().unwrap();
    let args = ["--chunk-size", "1M", "--delta", "--delta-base", base, "--compress", "zstd", "--json"];
    let out = c.push_to(&chain, v2.path(), "ft", 2, &args);
    c.assert_push_ok(&out);
    c.assert_published(v2.path(), "ft", 2);
    assert!(c.log(1).contains("only deltas"), "r1 took a compressed chunk it was not told of:\n{}", c.logs());
}

#[test]
fn a_push_from_memory_sends_deltas_against_its_base() {
    // The library's push from buffers with `delta_base` (the C ABI's and Python's): the base is
    // the previous version on disk, the new one in memory; every chunk goes as a delta.
    let c = Cluster::start(2);
    let (v1, v2) = two_steps(&c);
    let files: Vec<(String, shardcast::MemoryData)> = ["model.bf16.bin", "model.fp32.bin"]
        .iter()
        .map(|f| (f.to_string(), Arc::new(std::fs::read(v2.path().join(f)).unwrap()) as shardcast::MemoryData))
        .collect();
    let mut opts = shardcast::PushOptions::new("ft", 2, vec![c.addr(0), c.addr(1)]);
    opts.chunk_size = MIB as u32;
    opts.delta_base = Some(v1.path().to_path_buf());
    let report = shardcast::push_memory(files, &opts, None).unwrap();
    assert!(report.ok(), "{report:?}\n{}", c.logs());
    c.assert_published(v2.path(), "ft", 2);
    assert_eq!(report.coded.delta_chunks, 11, "{report:?}");
}

#[test]
fn many_chunks_coded_on_several_coder_threads_arrive_intact() {
    // 3 coder threads at the primary, 64 KiB chunks (161 of them): each chunk is copied to a
    // coder, coded there and copied back into its slot before it is sent; chunks finish out of
    // order. A chunk sent before its coding finished, or put in another chunk's slot, fails its
    // digest at r0 (refused, logged); every replica must publish the exact bytes at once.
    let c = Cluster::builder().env("SHARDCAST_CODERS", "3").start(3);
    let v1 = tempdir();
    write_checkpoint(v1.path(), 21);
    let chunks = 6 * MIB / (64 << 10) + (4 * MIB + 4 * 12345).div_ceil(64 << 10);
    for (v, mode) in [(1, "zstd"), (2, "zstd-grouped")] {
        let out = c.push(v1.path(), "many", v, &["--chunk-size", "64K", "--compress", mode, "--json"]);
        c.assert_push_ok(&out);
        c.assert_published(v1.path(), "many", v);
        let j = parse_json(&out);
        assert_eq!(j["compressed_chunks"].as_u64(), Some(chunks as u64), "{mode}: {j}");
    }
    // Deltas against v2 (the replicas' current version), coded on the coders too.
    let v3 = tempdir();
    next_step(v1.path(), v3.path(), 1000);
    let base = v1.path().to_str().unwrap();
    let args = ["--chunk-size", "64K", "--delta", "--delta-base", base, "--compress", "zstd", "--json"];
    let out = c.push(v3.path(), "many", 3, &args);
    c.assert_push_ok(&out);
    c.assert_published(v3.path(), "many", 3);
    assert_eq!(delta_counts(&parse_json(&out)).0, chunks as u64, "{out:?}");
    let logs = c.logs();
    assert!(!logs.contains("refused") && !logs.contains("digest"), "a chunk arrived wrong:\n{logs}");
}

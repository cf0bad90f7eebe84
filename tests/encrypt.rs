//! Chunk encryption (`--encrypt`): real `serve` and `push` processes, with a proxy on every
//! hop that records (or alters) the bytes as they pass. Encrypted pushes publish exact copies
//! and never show the source's bytes on the wire (the same proxies see them in a plain push,
//! which shows the check can fail); a byte changed in transit is refused, never published;
//! misconfigurations are refused with a message that says what to do.

mod util;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use util::*;

const SECRET: &str = "correct-horse-battery-staple-0123456789abcdef";

/// How a proxy alters the first connection it forwards.
#[derive(Clone, Copy)]
enum Tamper {
    None,
    /// Flip the byte at this offset of the stream towards the target.
    Forward(usize),
    /// Flip a payload byte of the first frame of this kind coming back from the target.
    BackFrame(u8),
}

/// A TCP proxy in front of `target`: every connection it accepts is forwarded both ways, and
/// what flows towards `target` is recorded; the first connection is altered as `tamper` says.
struct Proxy {
    addr: String,
    seen: Arc<Mutex<Vec<u8>>>,
    /// Connections it accepted.
    conns: Arc<AtomicUsize>,
}

impl Proxy {
    fn start(target: String, tamper: Tamper) -> Proxy {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let conns = Arc::new(AtomicUsize::new(0));
        let (rec, count) = (seen.clone(), conns.clone());
        let addr = proxy(target, move |first, client, server| {
            count.fetch_add(1, Ordering::SeqCst);
            let t = if first { tamper } else { Tamper::None };
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let rec = rec.clone();
            std::thread::spawn(move || pipe(client, server, Some(rec), t));
            std::thread::spawn(move || pipe(s2, c2, None, t));
        });
        Proxy { addr, seen, conns }
    }

    fn seen(&self) -> Vec<u8> {
        self.seen.lock().unwrap().clone()
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream, record: Option<Arc<Mutex<Vec<u8>>>>, tamper: Tamper) {
    let mut buf = vec![0u8; 64 << 10];
    let mut at = 0usize;
    let mut done = false;
    let v = shardcast::wire::PROTO_VERSION.to_le_bytes();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        match (tamper, &record) {
            (Tamper::Forward(f), Some(_)) if (at..at + n).contains(&f) => buf[f - at] ^= 0x20,
            (Tamper::BackFrame(kind), None) if !done => {
                let pat = [b'S', b'H', b'C', b'S', v[0], v[1], kind];
                if let Some(i) = buf[..n].windows(pat.len()).position(|w| w == pat)
                    && i + 42 < n
                {
                    buf[i + 42] ^= 0x20;
                    done = true;
                }
            }
            _ => {}
        }
        if let Some(rec) = &record {
            rec.lock().unwrap().extend_from_slice(&buf[..n]);
        }
        at += n;
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

/// How many of 64 windows of 32 bytes, spread over `src`, occur in `wire`.
fn windows_seen(src: &[u8], wire: &[u8]) -> usize {
    (0..64)
        .filter(|k| {
            let at = (src.len() - 32) * k / 64;
            let w = &src[at..at + 32];
            wire.windows(32).any(|x| x == w)
        })
        .count()
}

/// Both hops carried more than 6 MiB, and none of it shows `data` in clear.
fn assert_sealed_on_both_hops(data: &[u8], p0: &Proxy, p1: &Proxy) {
    for (hop, p) in [("primary to r0", p0), ("r0 to r1", p1)] {
        let wire = p.seen();
        assert!(wire.len() as u64 > 6 << 20, "{hop}: only {} bytes passed", wire.len());
        assert_eq!(windows_seen(data, &wire), 0, "{hop}: source bytes in clear on the wire");
    }
}

/// Two keyed replicas with a recording proxy in front of each: the chain is proxy0, proxy1,
/// so both hops (primary to r0, r0 to r1) pass a proxy.
fn proxied(c: &Cluster, first_hop: Tamper) -> (Proxy, Proxy) {
    (Proxy::start(c.addr(0), first_hop), Proxy::start(c.addr(1), Tamper::None))
}

#[test]
fn encrypted_pushes_hide_the_bytes_on_every_hop_and_publish_exact_copies() {
    let (_t, c, src) = keyed_source(2, SECRET, 5 << 20, 1);
    write_random_file(&src.join("sub/b.bin"), (1 << 20) + 12345, 2);
    let data = std::fs::read(src.join("a.bin")).unwrap();

    // The control: a plain push through the same proxies shows the bytes on both hops.
    let (p0, p1) = proxied(&c, Tamper::None);
    let to = format!("{},{}", p0.addr, p1.addr);
    let out = run(&mut c.push_cmd(&to, &src, "plain", 1, &["--chunk-size", "1MiB", "--json"]));
    c.assert_push_ok(&out);
    assert!(windows_seen(&data, &p0.seen()) > 60, "the proxy did not see a plain push's bytes");
    assert!(windows_seen(&data, &p1.seen()) > 60, "the second hop's proxy did not see them");

    let (p0, p1) = proxied(&c, Tamper::None);
    let to = format!("{},{}", p0.addr, p1.addr);
    let out = run(&mut c.push_cmd(&to, &src, "secret", 1, &["--chunk-size", "1MiB", "--encrypt", "--json"]));
    c.assert_push_ok(&out);
    c.assert_published(&src, "secret", 1);
    assert_sealed_on_both_hops(&data, &p0, &p1);
    // Every replica verifies what it published.
    for i in 0..2 {
        let v = c.verify(i, "secret", &[]);
        assert_eq!(code(&v), 0, "{}", show_output(&v));
    }
}

/// An encrypted push of 2 lanes per hop: each lane seals under its own handshake's secret, so
/// nothing passes any lane's connection in the clear (the proxies record every connection,
/// lanes included), every lane carries chunks, and both replicas publish exact copies.
#[test]
fn encrypted_lanes_each_seal_their_chunks_and_publish_exact_copies() {
    let (_t, c, src) = keyed_source(2, SECRET, 24 << 20, 4);
    let data = std::fs::read(src.join("a.bin")).unwrap();
    let (p0, p1) = proxied(&c, Tamper::None);
    let to = format!("{},{}", p0.addr, p1.addr);
    let args = ["--chunk-size", "1MiB", "--encrypt", "--lanes", "2", "--json"];
    let out = run(&mut c.push_cmd(&to, &src, "laned", 1, &args));
    c.assert_push_ok(&out);
    c.assert_published(&src, "laned", 1);
    assert_sealed_on_both_hops(&data, &p0, &p1);
    // Both lanes of each hop passed its proxy (lanes follow the address lane 0 dialed when the
    // replica announces no rails).
    for p in [&p0, &p1] {
        assert_eq!(p.conns.load(Ordering::SeqCst), 2, "lanes that bypassed a proxy were not looked at");
    }
    let report = parse_json(&out);
    let lanes: Vec<u64> = report["lane_chunks"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert!(lanes.len() == 2 && lanes.iter().all(|&n| n > 0), "a lane carried nothing: {lanes:?}");
    for i in 0..2 {
        let v = c.verify(i, "laned", &[]);
        assert_eq!(code(&v), 0, "{}", show_output(&v));
    }
}

/// A routed push under encryption: the relay holds most of the new version already (it copies
/// those chunks locally), and still relays every chunk to the replica after it, which has
/// nothing: sealed again on the second hop, exact on both.
#[test]
fn an_encrypted_incremental_push_relays_chunks_the_relay_does_not_store() {
    let t = tempdir();
    let key = key_file(t.path(), "cluster.key", SECRET);
    let c = keyed_cluster(2, &key);
    let src = t.path().join("src");
    write_random_file(&src.join("w.bin"), (6 << 20) + 3, 6);
    let out = run(&mut c.push_cmd(&c.addr(0), &src, "inc", 1, &["--chunk-size", "1MiB"]));
    c.assert_push_ok(&out);
    // Change one chunk in the middle.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(src.join("w.bin")).unwrap();
        f.write_all_at(&[0xA5; 4096], (3 << 20) + 17).unwrap();
    }
    let data = std::fs::read(src.join("w.bin")).unwrap();
    let (p0, p1) = proxied(&c, Tamper::None);
    let to = format!("{},{}", p0.addr, p1.addr);
    let extra = ["--chunk-size", "1MiB", "--incremental", "--encrypt", "--json"];
    let out = run(&mut c.push_cmd(&to, &src, "inc", 2, &extra));
    c.assert_push_ok(&out);
    c.assert_published(&src, "inc", 2);
    // Every chunk crossed both hops (the second replica had nothing), none in clear.
    assert_sealed_on_both_hops(&data, &p0, &p1);
}

#[test]
fn a_byte_changed_in_transit_is_refused_there_and_repaired_around() {
    let (_t, c, src) = keyed_source(2, SECRET, 4 << 20, 3);
    // 2.5 MiB into the first hop's stream: inside the third chunk's ciphertext.
    let (p0, p1) = proxied(&c, Tamper::Forward((5 << 20) / 2));
    let to = format!("{},{}", p0.addr, p1.addr);
    let out = run(&mut c.push_cmd(&to, &src, "tampered", 1, &["--chunk-size", "1MiB", "--encrypt", "--json"]));
    // Exit 3: some replicas published, not all.
    assert_eq!(code(&out), 3, "{}\n{}", show_output(&out), c.logs());
    let all = all_output(&out);
    assert!(all.contains("does not authenticate"), "{all}\n{}", c.logs());
    assert!(all.contains("unauthorized"), "{all}");
    assert!(!c.root(0).join("tampered").join("1").exists(), "r0 published a tampered push");
    // The replica after it never saw the altered byte: the repair feeds it from the primary,
    // and what it publishes is exact.
    c.assert_published_on(&[1], &src, "tampered", 1);
    // A good push right after, through the same proxies (they alter only their first connection).
    let out = run(&mut c.push_cmd(&to, &src, "tampered", 2, &["--chunk-size", "1MiB", "--encrypt", "--json"]));
    c.assert_push_ok(&out);
    c.assert_published(&src, "tampered", 2);
}

/// With a cluster key (no --encrypt), the HELLO (what is written where) and the RESULT (what was
/// published) carry a MAC: altered in transit, they are refused, never acted on.
#[test]
fn altered_hello_or_result_frames_are_refused() {
    let (_t, c, src) = keyed_source(2, SECRET, 2 << 20, 5);

    // A byte of the HELLO's payload (after the two AUTH frames: 93 and 73 bytes, and HELLO's
    // 40-byte header) changed on the first hop.
    let (p0, p1) = proxied(&c, Tamper::Forward(93 + 73 + 40 + 20));
    let to = format!("{},{}", p0.addr, p1.addr);
    let out = run(&mut c.push_cmd(&to, &src, "h", 1, &["--json"]));
    assert_eq!(code(&out), 1, "{}\n{}", show_output(&out), c.logs());
    assert!(all_output(&out).contains("HELLO does not authenticate"), "{}\n{}", show_output(&out), c.logs());
    assert!(!c.root(0).join("h").exists() && !c.root(1).join("h").exists());

    // A byte of the RESULT coming back to the primary changed: the primary does not believe it.
    let (p0, p1) = proxied(&c, Tamper::BackFrame(7));
    let to = format!("{},{}", p0.addr, p1.addr);
    let out = run(&mut c.push_cmd(&to, &src, "r", 1, &["--json", "--no-repair"]));
    assert_ne!(code(&out), 0, "{}\n{}", show_output(&out), c.logs());
    assert!(all_output(&out).contains("does not authenticate"), "{}", show_output(&out));
}

#[test]
fn misconfigured_encryption_is_refused_with_what_to_do() {
    let t = tempdir();
    let key = key_file(t.path(), "cluster.key", SECRET);
    let src = t.path().join("src");
    write_random_file(&src.join("a.bin"), 1 << 20, 4);

    // --encrypt with no key: a usage error before any connection.
    let c = Cluster::start(1);
    let out = run(&mut c.push_cmd(&c.addrs(), &src, "x", 1, &["--encrypt"]));
    assert_eq!(code(&out), 2, "{}", show_output(&out));
    assert!(all_output(&out).contains("--encrypt needs a cluster key"), "{}", show_output(&out));
    // --encrypt with --transport rdma: refused, it cannot be both.
    let out =
        run(c.push_cmd(&c.addrs(), &src, "x", 1, &["--encrypt", "--transport", "rdma"]).arg("--key-file").arg(&key));
    assert_ne!(code(&out), 0, "{}", show_output(&out));
    assert!(!c.root(0).join("x").exists());

    // A replica that requires encryption refuses a plain push, and takes an encrypted one.
    let c = Cluster::builder().env("SHARDCAST_KEY_FILE", key.to_str().unwrap()).serve_arg("--encrypt").start(1);
    let out = run(&mut c.push_cmd(&c.addrs(), &src, "y", 1, &["--json"]));
    assert_eq!(code(&out), 1, "{}", show_output(&out));
    assert!(all_output(&out).contains("accepts only encrypted pushes"), "{}", show_output(&out));
    assert!(!c.root(0).join("y").exists());
    let out = run(&mut c.push_cmd(&c.addrs(), &src, "y", 1, &["--encrypt", "--json"]));
    c.assert_push_ok(&out);
    c.assert_published(&src, "y", 1);
}

/// A proxy in front of `target` that rewrites, on the first connection towards the target, the
/// payload of CHUNK number `victim` AND its header's digest (so that they agree), and then END's
/// manifest digest to match: what someone on the path could do to an authenticated but
/// unencrypted hop if its frames carried no MAC. Frames after a chunk's payload that do not
/// start with the magic are taken as its MAC and passed on untouched. Later connections pass
/// as they are.
fn rewriting_proxy(target: String, victim: u64) -> String {
    use shardcast::wire::{HEADER_LEN, Hello, Kind, MAGIC};
    proxy(target, move |first, client, server| {
        let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        std::thread::spawn(move || pipe(s2, c2, None, Tamper::None));
        if !first {
            std::thread::spawn(move || pipe(client, server, None, Tamper::None));
            return;
        }
        std::thread::spawn(move || {
            let mut from = std::io::BufReader::with_capacity(1 << 20, client);
            let mut to = server;
            let mut manifest = None;
            let mut header = [0u8; HEADER_LEN];
            let mut raw_after = false;
            while !raw_after && from.read_exact(&mut header).is_ok() {
                let kind = header[6];
                let len = u32::from_le_bytes(header[8..12].try_into().unwrap()) as usize;
                let mut payload = vec![0u8; len];
                if from.read_exact(&mut payload).is_err() {
                    return;
                }
                if kind == Kind::Hello as u8 {
                    // The HELLO's MAC (32 bytes) follows its encoding.
                    let h = Hello::decode(&payload[..len - 32]).expect("a HELLO");
                    manifest = Some(h.manifest);
                } else if kind == Kind::Chunk as u8 {
                    let seq = u64::from_le_bytes(header[16..24].try_into().unwrap());
                    if seq == victim {
                        for b in &mut payload {
                            *b = !*b;
                        }
                        let d = shardcast::manifest::digest(&payload);
                        header[24..40].copy_from_slice(&d.to_le_bytes());
                    }
                    let d = u128::from_le_bytes(header[24..40].try_into().unwrap());
                    manifest.as_mut().expect("HELLO first").set_digest(seq, d);
                } else if kind == Kind::End as u8 {
                    let d = manifest.as_ref().expect("HELLO first").digest();
                    header[24..40].copy_from_slice(&d.to_le_bytes());
                    raw_after = true;
                }
                if to.write_all(&header).and_then(|()| to.write_all(&payload)).is_err() {
                    return;
                }
                // A MAC after a chunk: whatever does not start a frame.
                if kind == Kind::Chunk as u8 {
                    let Ok(next) = std::io::BufRead::fill_buf(&mut from) else { return };
                    if next.len() >= 4 && next[..4] != MAGIC {
                        let mut mac = [0u8; 16];
                        if from.read_exact(&mut mac).is_err() || to.write_all(&mac).is_err() {
                            return;
                        }
                    }
                }
            }
            // The rest (END's MAC, if any) as it comes.
            let rest = from.buffer().to_vec();
            if to.write_all(&rest).is_ok() {
                pipe(from.into_inner(), to, None, Tamper::None);
            }
        });
    })
}

/// Without --encrypt, a cluster key still makes the data authentic: a chunk and its digest
/// changed together on the path (and END's manifest digest to match) are refused as
/// `unauthorized` by the replica after the change, and no replica publishes other bytes.
#[test]
fn a_chunk_and_its_digest_changed_together_on_an_authenticated_hop_are_refused() {
    let (_t, c, src) = keyed_source(2, SECRET, 4 << 20, 9);
    let p0 = rewriting_proxy(c.addr(0), 2);
    let to = format!("{p0},{}", c.addr(1));
    let out = run(&mut c.push_cmd(&to, &src, "swapped", 1, &["--chunk-size", "1MiB", "--json", "--no-repair"]));
    let all = all_output(&out);
    assert!(all.contains("unauthorized") && all.contains("does not authenticate"), "{all}\n{}", c.logs());
    assert_ne!(code(&out), 0, "{all}");
    // Nothing wrong is published anywhere: a replica that published has the source's bytes.
    for i in 0..2 {
        let published = c.root(i).join("swapped/1");
        if published.exists() {
            assert_tree_identical(&src, &published);
        }
    }
    assert!(!c.root(0).join("swapped/1").exists(), "r0 published after refusing a chunk\n{}", c.logs());
    // A good push right after, through the same proxy (it alters only its first connection).
    let out = run(&mut c.push_cmd(&to, &src, "swapped", 2, &["--chunk-size", "1MiB", "--json"]));
    c.assert_push_ok(&out);
    c.assert_published(&src, "swapped", 2);
}

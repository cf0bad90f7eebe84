//! Hostile and broken peers: raw bytes sent to a server port. The server must close such
//! connections (after a REJECT when it can), never crash or hang, and keep serving real pushes.

mod util;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use util::*;

const HELLO: u8 = 1;
const REJECT: u8 = 3;
const STATUS_REQ: u8 = 8;
const STATUS_RESP: u8 = 9;

/// A 40-byte frame header as the wire format describes it.
fn header(magic: &[u8; 4], proto: u16, kind: u8, len: u32, seq: u64) -> [u8; 40] {
    let mut h = [0u8; 40];
    h[0..4].copy_from_slice(magic);
    h[4..6].copy_from_slice(&proto.to_le_bytes());
    h[6] = kind;
    h[7] = 0;
    h[8..12].copy_from_slice(&len.to_le_bytes());
    // 12..16 reserved, 16..24 seq, 24..40 digest: zero.
    h[16..24].copy_from_slice(&seq.to_le_bytes());
    h
}

fn good_header(kind: u8, len: u32) -> [u8; 40] {
    header(b"SHCS", shardcast::wire::PROTO_VERSION, kind, len, 0)
}

fn connect(c: &Cluster) -> TcpStream {
    let s = TcpStream::connect(c.addr(0)).expect("connect to server");
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Reads until the server closes the connection: EOF or a reset count as closed, a 5 s silence
/// does not. Returns what the server sent before closing.
fn read_until_closed(s: &mut TcpStream) -> Result<Vec<u8>, String> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.len() > 1 << 20 {
                    return Err(format!("server sent {} bytes and keeps going", got.len()));
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(format!("connection left open: no EOF within 5 s ({} bytes received)", got.len()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // Reset / aborted: the server closed it (with unread data in its buffer).
            Err(_) => return Ok(got),
        }
        if Instant::now() > deadline {
            return Err(format!("connection still open after 5 s ({} bytes received)", got.len()));
        }
    }
}

/// Whatever the server sent back before closing must be a REJECT frame.
fn assert_reject_or_nothing(resp: &[u8], what: &str) {
    if resp.is_empty() {
        return;
    }
    assert!(resp.len() >= 40, "{what}: server answered {} bytes, not a whole frame: {resp:02x?}", resp.len());
    assert_eq!(&resp[0..4], b"SHCS", "{what}: answer has a bad magic: {:02x?}", &resp[..40]);
    assert_eq!(resp[6], REJECT, "{what}: answer is kind {} not REJECT", resp[6]);
    let len = u32::from_le_bytes(resp[8..12].try_into().unwrap()) as usize;
    assert_eq!(resp.len(), 40 + len, "{what}: REJECT len {len} but {} bytes followed", resp.len() - 40);
    let reports = shardcast::wire::decode_reports(&resp[40..])
        .unwrap_or_else(|e| panic!("{what}: REJECT payload does not decode: {e}"));
    assert!(
        reports.iter().any(|r| matches!(&r.outcome, shardcast::wire::Outcome::Failed(e) if !e.message.is_empty())),
        "{what}: REJECT without a failed report: {reports:?}"
    );
}

static NEXT_VERSION: AtomicU64 = AtomicU64::new(1);

/// The server is alive, did not log a panic, and still takes a normal push.
fn assert_still_serving(c: &mut Cluster, what: &str) {
    // Give a crashing server a moment to actually exit.
    std::thread::sleep(Duration::from_millis(100));
    assert!(c.server(0).try_wait().is_none(), "{what}: server exited\n{}", c.logs());
    assert!(!c.log(0).contains("panicked"), "{what}: server panicked\n{}", c.logs());
    let t = tempdir();
    let d = t.path().join("src");
    make_small_tree(&d, 31);
    write_random_file(&d.join("two-chunks.bin"), (1 << 20) + 1, 32);
    // A fresh version each call: some tests check more than once on the same cluster.
    let v = NEXT_VERSION.fetch_add(1, Ordering::Relaxed);
    let out = c.push(&d, "after-garbage", v, &["--chunk-size", "1M"]);
    c.assert_push_ok(&out);
    c.assert_published(&d, "after-garbage", v);
    assert!(c.server(0).try_wait().is_none(), "{what}: server exited after the push\n{}", c.logs());
}

/// Sends `bytes` (optionally half-closing after), expects the server to close the connection.
fn send_expect_close(bytes: &[u8], half_close: bool, what: &str) {
    let mut c = Cluster::start(1);
    let mut s = connect(&c);
    // The server may close before reading everything: write errors are fine.
    let _ = s.write_all(bytes);
    if half_close {
        let _ = s.shutdown(Shutdown::Write);
    }
    match read_until_closed(&mut s) {
        Ok(resp) => assert_reject_or_nothing(&resp, what),
        Err(e) => panic!("{what}: {e}\n{}", c.logs()),
    }
    drop(s);
    assert_still_serving(&mut c, what);
}

#[test]
fn random_garbage() {
    let bytes = random_bytes(4096, 0xBAD);
    assert_ne!(&bytes[0..4], b"SHCS");
    send_expect_close(&bytes, false, "random garbage");
}

#[test]
fn bad_magic() {
    send_expect_close(&header(b"SHCX", 1, HELLO, 0, 0), false, "bad magic");
}

#[test]
fn bad_protocol_version() {
    send_expect_close(&header(b"SHCS", 99, HELLO, 0, 0), false, "proto 99");
}

#[test]
fn unknown_kind_200() {
    send_expect_close(&good_header(200, 0), false, "kind 200");
}

#[test]
fn unknown_kind_200_with_payload() {
    let mut b = good_header(200, 16).to_vec();
    b.extend_from_slice(&[0xAB; 16]);
    send_expect_close(&b, false, "kind 200 + payload");
}

#[test]
fn hello_len_u32_max() {
    // Must be refused from the header alone: no 4 GiB allocation, no waiting for the payload.
    send_expect_close(&good_header(HELLO, 0xFFFF_FFFF), false, "HELLO len 0xFFFF_FFFF");
}

#[test]
fn truncated_header() {
    let h = good_header(HELLO, 100);
    send_expect_close(&h[..10], true, "10-byte header then EOF");
}

#[test]
fn hello_truncated_payload() {
    let mut b = good_header(HELLO, 100).to_vec();
    b.extend_from_slice(&[1, 2, 3, 4, 5]);
    send_expect_close(&b, true, "HELLO announcing 100 bytes, 5 sent, then EOF");
}

#[test]
fn hello_with_garbage_payload() {
    let mut b = good_header(HELLO, 100).to_vec();
    b.extend_from_slice(&random_bytes(100, 7));
    send_expect_close(&b, false, "HELLO with 100 garbage payload bytes");
}

#[test]
fn chunk_without_hello() {
    let mut b = header(b"SHCS", shardcast::wire::PROTO_VERSION, 4, 8, 0).to_vec();
    b.extend_from_slice(&[9; 8]);
    send_expect_close(&b, false, "CHUNK before HELLO");
}

#[test]
fn connect_then_close_immediately() {
    let mut c = Cluster::start(1);
    for _ in 0..20 {
        drop(connect(&c));
    }
    assert_still_serving(&mut c, "connect and close");
}

/// A raw STATUS_REQ gets a STATUS_RESP: checks that this file's header encoding is the real one,
/// so the "bad" cases above are bad for the reason they claim.
#[test]
fn raw_status_request_is_answered() {
    let c = Cluster::start(1);
    let mut s = connect(&c);
    s.write_all(&good_header(STATUS_REQ, 0)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut h = [0u8; 40];
    s.read_exact(&mut h).unwrap_or_else(|e| panic!("no answer to STATUS_REQ: {e}\n{}", c.logs()));
    assert_eq!(&h[0..4], b"SHCS");
    assert_eq!(u16::from_le_bytes([h[4], h[5]]), shardcast::wire::PROTO_VERSION);
    assert_eq!(h[6], STATUS_RESP, "answer kind {}", h[6]);
}

/// Connections that say nothing, or stop mid-header, must not keep a push from going through.
#[test]
fn stalled_connections_do_not_block_pushes() {
    let mut c = Cluster::start(2);
    let silent: Vec<TcpStream> = (0..4).map(|_| connect(&c)).collect();
    let mut partial = connect(&c);
    partial.write_all(&good_header(HELLO, 100)[..20]).unwrap();
    let mut partial2 = TcpStream::connect(c.addr(1)).unwrap();
    partial2.write_all(&good_header(HELLO, 1000)).unwrap();
    assert_still_serving(&mut c, "stalled connections open");
    drop(silent);
    drop(partial);
    drop(partial2);
    assert_still_serving(&mut c, "stalled connections closed");
}

/// One peer opening connections and sending nothing takes at most its own share of sessions:
/// pushes from elsewhere go on, and the connections over its share are told why.
#[test]
fn one_silent_peer_cannot_take_every_session() {
    let mut c = Cluster::builder()
        .serve_arg("--max-sessions")
        .serve_arg("8")
        .serve_arg("--max-sessions-per-peer")
        .serve_arg("4")
        .serve_arg("--max-handshakes-per-peer")
        .serve_arg("4")
        .start(1);
    let other = std::net::Ipv4Addr::new(127, 0, 0, 2);
    let mut silent: Vec<TcpStream> = (0..12).map(|_| connect_from(other, &c.addr(0)).expect("connect")).collect();
    // Without the per-peer cap, these 12 would hold all 8 sessions and the push below would be
    // refused as busy; with it, connections 5 to 12 are refused at once.
    let mut refused = 0;
    for s in &mut silent[4..] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let f = shardcast::wire::read_frame(s).expect("a REJECT for a connection over the cap");
        assert_eq!(f.header.kind as u8, REJECT);
        let text = format!("{:?}", shardcast::wire::decode_reports(&f.payload).unwrap());
        assert!(text.contains("from your address") && text.contains("Busy"), "{text}");
        refused += 1;
    }
    assert_eq!(refused, 8);
    assert_still_serving(&mut c, "a silent peer holding its share of sessions");
    assert!(c.logs().contains("connections from your address already in their handshake"), "{}", c.logs());
}

/// Many hostile connections at once.
#[test]
fn many_garbage_connections_in_parallel() {
    let mut c = Cluster::start(1);
    let addr = c.addr(0);
    let handles: Vec<_> = (0..32u64)
        .map(|k| {
            let addr = addr.clone();
            std::thread::spawn(move || -> Result<(), String> {
                let mut s = TcpStream::connect(&addr).map_err(|e| e.to_string())?;
                s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
                let bytes = match k % 4 {
                    0 => random_bytes(1000 + k as usize, k),
                    1 => good_header(200, 0).to_vec(),
                    2 => good_header(HELLO, 0xFFFF_FFFF).to_vec(),
                    _ => header(b"XXXX", 1, HELLO, 0, 0).to_vec(),
                };
                let _ = s.write_all(&bytes);
                read_until_closed(&mut s).map(|_| ()).map_err(|e| format!("conn {k}: {e}"))
            })
        })
        .collect();
    let errs: Vec<String> = handles.into_iter().filter_map(|h| h.join().unwrap().err()).collect();
    assert!(errs.is_empty(), "{errs:?}\n{}", c.logs());
    assert_still_serving(&mut c, "32 parallel garbage connections");
}

// ------------------------------------------------------------------------------------------
// A rogue primary that speaks the protocol (via the library's own encoders) but sends a chunk
// whose bytes do not match the manifest.
// ------------------------------------------------------------------------------------------

use shardcast::manifest::{Manifest, digest};
use shardcast::wire::{self, Hello, Kind, Mode, Outcome};

/// How the rogue primary lies about chunk 1.
#[derive(Clone, Copy, Debug)]
enum Lie {
    /// Payload changed, header digest still the manifest's: the frame does not match itself.
    FrameDigest,
    /// Payload changed and the header digest recomputed to match it: only the manifest digest
    /// that END carries can tell.
    ManifestDigest,
}

fn rogue_push(lie: Lie) {
    let mut c = Cluster::start(2);
    let t = tempdir();
    let src = t.path().join("src");
    let data = random_bytes(3 * 65536 + 5, 77);
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("w.bin"), &data).unwrap();
    let manifest = Manifest::from_path(&src, 65536).expect("manifest");
    assert_eq!(manifest.chunk_count(), 4);
    let hello = Hello {
        name: "rogue".into(),
        version: 1,
        mode: Mode::Sync,
        transport: shardcast::transport::Transport::Tcp,
        keep: 0,
        flags: wire::HelloFlags::default(),
        you: c.addr(0),
        downstream: vec![c.addr(1)],
        manifest: manifest.clone(),
        wants: Vec::new(),
        grant: Default::default(),
        lanes: 1,
    };
    let mut s = connect(&c);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    wire::write_frame(&mut s, Kind::Hello, 0, &hello.encode()).unwrap();
    let f = wire::read_frame(&mut s).unwrap_or_else(|e| panic!("no answer to HELLO: {e}\n{}", c.logs()));
    assert_eq!(f.header.kind, Kind::Accept, "HELLO not accepted\n{}", c.logs());
    for seq in 0..manifest.chunk_count() {
        let ch = manifest.chunk(seq).unwrap();
        let mut payload = data[ch.offset as usize..ch.offset as usize + ch.len as usize].to_vec();
        let mut d = ch.digest;
        assert_eq!(d, digest(&payload));
        if seq == 1 {
            payload[100] ^= 0x40;
            if let Lie::ManifestDigest = lie {
                d = digest(&payload);
            }
        }
        let h = wire::Header { kind: Kind::Chunk, len: payload.len() as u32, seq, digest: d };
        // The replica may hang up as soon as it sees the bad chunk.
        if s.write_all(&h.to_bytes()).and_then(|_| s.write_all(&payload)).is_err() {
            break;
        }
    }
    // END announces the honest manifest's digest: a replica must notice that the chunks it got
    // do not add up to it.
    let end = wire::Header { kind: Kind::End, len: 0, seq: manifest.chunk_count(), digest: manifest.digest() };
    let _ = s.write_all(&end.to_bytes());
    // Read until a verdict or the end of the connection; ACKs may come first.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut reports = None;
    while Instant::now() < deadline {
        match wire::read_frame(&mut s) {
            Ok(f) if matches!(f.header.kind, Kind::Result | Kind::Reject) => {
                reports = Some(wire::decode_reports(&f.payload).expect("reports decode"));
                break;
            }
            Ok(_) => continue,
            Err(wire::ReadFrameError::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                panic!("{lie:?}: replica neither answered nor closed within 10 s\n{}", c.logs())
            }
            Err(_) => break,
        }
    }
    drop(s);
    if let Some(reports) = &reports {
        let r0 = reports.iter().find(|r| r.node == c.addr(0));
        match r0.map(|r| &r.outcome) {
            Some(Outcome::Failed(e)) => {
                assert_eq!(e.kind, shardcast::ErrorKind::DigestMismatch, "{lie:?}: wrong failure kind: {reports:?}")
            }
            other => panic!("{lie:?}: replica 0 reported {other:?}, expected a digest mismatch: {reports:?}"),
        }
        assert!(
            !reports.iter().any(|r| matches!(r.outcome, Outcome::Published)),
            "{lie:?}: a replica published corrupted data: {reports:?}"
        );
    }
    // Whatever was said on the wire: nobody exposes the corrupted version.
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..2 {
        let set = c.root(i).join("rogue");
        assert!(
            !set.join("1.manifest").exists() && std::fs::symlink_metadata(set.join("current")).is_err(),
            "{lie:?}: replica {i} published a version whose chunk 1 does not match its manifest\n{}",
            c.logs()
        );
    }
    assert!(
        c.log(0).contains("digest mismatch") || reports.is_some(),
        "{lie:?}: no trace of the mismatch\n{}",
        c.logs()
    );
    assert_still_serving(&mut c, "rogue primary");
}

#[test]
fn chunk_not_matching_its_frame_digest() {
    rogue_push(Lie::FrameDigest);
}

#[test]
fn chunk_not_matching_the_manifest_digest() {
    rogue_push(Lie::ManifestDigest);
}

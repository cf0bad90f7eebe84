//! Tests that speak the wire protocol by hand to real `shardcast serve` processes: what a relay
//! does with a chunk whose bytes do not match its digest, and with a peer that vanishes
//! mid-stream.

mod util;

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use shardcast::ErrorKind;
use shardcast::manifest::Manifest;
use shardcast::wire::{self, Header, Kind, Outcome};
use util::*;

const CHUNK: u32 = 64 << 10;

fn make_source(dir: &Path) -> Manifest {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let data: Vec<u8> = (0..(3 * CHUNK as usize + 100)).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(src.join("weights.bin"), &data).unwrap();
    Manifest::from_path(&src, CHUNK).unwrap()
}

fn chunk_bytes(manifest: &Manifest, dir: &Path, seq: u64) -> Vec<u8> {
    let c = manifest.chunk(seq).unwrap();
    let data = std::fs::read(dir.join("src/weights.bin")).unwrap();
    data[c.offset as usize..c.offset as usize + c.len as usize].to_vec()
}

/// Connects to the first node, sends HELLO for `cluster`'s chain and expects ACCEPT.
fn start_push(cluster: &Cluster, manifest: &Manifest, version: u64) -> TcpStream {
    let mut s = TcpStream::connect(cluster.addr(0)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let hello = plain_hello(
        "ckpt",
        version,
        &cluster.addr(0),
        (1..cluster.len()).map(|i| cluster.addr(i)).collect(),
        manifest.clone(),
    );
    wire::write_frame(&mut s, Kind::Hello, 0, &hello.encode()).unwrap();
    let f = wire::read_frame(&mut s).unwrap();
    assert_eq!(
        f.header.kind,
        Kind::Accept,
        "chain refused: {:?}\n{}",
        wire::decode_reports(&f.payload),
        cluster.logs()
    );
    s
}

fn send_chunk(s: &mut TcpStream, manifest: &Manifest, seq: u64, payload: &[u8]) {
    let c = manifest.chunk(seq).unwrap();
    let h = Header { kind: Kind::Chunk, len: payload.len() as u32, seq, digest: c.digest };
    let mut buf = h.to_bytes().to_vec();
    buf.extend_from_slice(payload);
    s.write_all(&buf).unwrap();
}

/// Reads frames until RESULT and returns its reports.
fn read_result(s: &mut TcpStream) -> Vec<wire::ReplicaReport> {
    loop {
        let f = wire::read_frame(s).expect("a RESULT frame");
        match f.header.kind {
            Kind::Ack => continue,
            Kind::Result => return wire::decode_reports(&f.payload).unwrap(),
            k => panic!("unexpected {k:?}"),
        }
    }
}

fn staging_empty(root: &Path) -> bool {
    std::fs::read_dir(root.join(".staging")).map(|mut d| d.next().is_none()).unwrap_or(true)
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn corrupt_chunk_is_refused_by_the_relay_and_nothing_is_published() {
    let dir = tempdir();
    let manifest = make_source(dir.path());
    let cluster = Cluster::start(2);
    let mut s = start_push(&cluster, &manifest, 1);
    send_chunk(&mut s, &manifest, 0, &chunk_bytes(&manifest, dir.path(), 0));
    let mut bad = chunk_bytes(&manifest, dir.path(), 1);
    bad[1234] ^= 0x40;
    send_chunk(&mut s, &manifest, 1, &bad);

    let reports = read_result(&mut s);
    assert_eq!(reports.len(), 2, "{reports:?}");
    assert_eq!(reports[0].node, cluster.addr(0));
    match &reports[0].outcome {
        Outcome::Failed(e) => {
            assert_eq!(e.kind, ErrorKind::DigestMismatch);
            assert!(e.message.contains("digest mismatch in chunk 1"), "{}", e.message);
        }
        o => panic!("relay should have failed, got {o:?}"),
    }
    assert!(matches!(&reports[1].outcome, Outcome::Failed(e) if e.kind == ErrorKind::Aborted), "{reports:?}");
    drop(s);

    for i in 0..2 {
        let root = cluster.root(i);
        wait_until("staging to be cleaned", Duration::from_secs(10), || staging_empty(&root));
        assert!(!root.join("ckpt/1.manifest").exists(), "node {i} published a corrupt push");
        assert!(!root.join("ckpt/current").exists(), "node {i} has a current version");
    }
}

#[test]
fn chunk_header_that_contradicts_the_manifest_is_refused_before_anything_moves() {
    // A CHUNK header whose length differs from the manifest's is refused by the first relay,
    // before it receives (or forwards) a byte of payload.
    let dir = tempdir();
    let manifest = make_source(dir.path());
    let cluster = Cluster::start(2);
    let mut s = start_push(&cluster, &manifest, 2);
    let c = manifest.chunk(0).unwrap();
    let h = Header { kind: Kind::Chunk, len: c.len - 1, seq: 0, digest: c.digest };
    s.write_all(&h.to_bytes()).unwrap();
    let reports = read_result(&mut s);
    match &reports[0].outcome {
        Outcome::Failed(e) => {
            assert_eq!(e.kind, ErrorKind::Protocol);
            assert!(e.message.contains("announces"), "{}", e.message);
        }
        o => panic!("relay should have refused the frame, got {o:?}"),
    }
    drop(s);
    for i in 0..2 {
        let root = cluster.root(i);
        wait_until("staging to be cleaned", Duration::from_secs(10), || staging_empty(&root));
    }
}

#[test]
fn upstream_vanishing_mid_chunk_leaves_nothing_and_the_server_keeps_serving() {
    let dir = tempdir();
    let manifest = make_source(dir.path());
    let cluster = Cluster::start(2);
    let mut s = start_push(&cluster, &manifest, 3);
    send_chunk(&mut s, &manifest, 0, &chunk_bytes(&manifest, dir.path(), 0));
    // Half a chunk, then the connection is gone.
    let c = manifest.chunk(1).unwrap();
    let h = Header { kind: Kind::Chunk, len: c.len, seq: 1, digest: c.digest };
    s.write_all(&h.to_bytes()).unwrap();
    s.write_all(&chunk_bytes(&manifest, dir.path(), 1)[..1000]).unwrap();
    drop(s);
    for i in 0..2 {
        let root = cluster.root(i);
        wait_until("staging to be cleaned", Duration::from_secs(10), || staging_empty(&root));
        assert!(!root.join("ckpt/3.manifest").exists());
    }
    // The same version can be pushed for real right after: the reservation was released.
    let out = cluster.push(&dir.path().join("src"), "ckpt", 3, &["--chunk-size", "64K"]);
    assert_eq!(code(&out), 0, "{}\n{}", show_output(&out), cluster.logs());
    for i in 0..2 {
        assert_eq!(
            std::fs::read(cluster.root(i).join("ckpt/3/weights.bin")).unwrap(),
            std::fs::read(dir.path().join("src/weights.bin")).unwrap()
        );
    }
}

#[test]
fn a_full_protocol_push_by_hand_publishes_on_every_node() {
    let dir = tempdir();
    let manifest = make_source(dir.path());
    let cluster = Cluster::start(3);
    let mut s = start_push(&cluster, &manifest, 4);
    for seq in 0..manifest.chunk_count() {
        send_chunk(&mut s, &manifest, seq, &chunk_bytes(&manifest, dir.path(), seq));
    }
    let end = Header { kind: Kind::End, len: 0, seq: manifest.chunk_count(), digest: manifest.digest() };
    s.write_all(&end.to_bytes()).unwrap();
    let mut acked = 0;
    let reports = loop {
        let f = wire::read_frame(&mut s).unwrap();
        match f.header.kind {
            Kind::Ack => {
                assert!(f.header.seq >= acked, "acks go backwards");
                acked = f.header.seq;
            }
            Kind::Result => break wire::decode_reports(&f.payload).unwrap(),
            k => panic!("unexpected {k:?}"),
        }
    };
    assert_eq!(acked, manifest.chunk_count(), "every chunk acknowledged before the result");
    assert_eq!(reports.len(), 3);
    for (i, r) in reports.iter().enumerate() {
        assert_eq!(r.node, cluster.addr(i));
        assert_eq!(r.outcome, Outcome::Published, "{reports:?}");
        assert!(cluster.root(i).join("ckpt/4.manifest").exists());
    }
}

#[test]
fn library_push_reports_progress_up_to_every_chunk_and_byte() {
    use std::sync::atomic::Ordering::Relaxed;
    let dir = tempdir();
    let manifest = make_source(dir.path());
    let cluster = Cluster::start(2);
    let progress = shardcast::Progress::default();
    let mut opts = shardcast::PushOptions::new("prog", 1, vec![cluster.addr(0), cluster.addr(1)]);
    opts.chunk_size = CHUNK;
    let r = shardcast::push(&dir.path().join("src"), &opts, Some(&progress)).unwrap();
    assert!(r.ok(), "{:?}\n{}", r.replicas, cluster.logs());
    assert_eq!(r.chunks, manifest.chunk_count());
    assert_eq!(progress.sent_chunks.load(Relaxed), r.chunks);
    assert_eq!(progress.acked_chunks.load(Relaxed), r.chunks);
    assert_eq!(progress.acked_bytes.load(Relaxed), r.bytes);
}

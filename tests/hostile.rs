//! What a hostile peer on the network was tried with (issue 19, and issue 14's pre-authentication
//! allocation): hand-made frames over raw TCP to real `shardcast serve` processes, and the pushes
//! that follow. Each test sends the hostile input for real and checks the refusal and its reason.

mod util;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use shardcast::manifest::{Entry, EntryKind, Manifest};
use shardcast::wire::{self, Header, Hello, Kind, Outcome, ReplicaReport};
use util::*;

/// A HELLO for `name@version` of `manifest`, to `you` and then `downstream`.
fn hello(you: &str, downstream: Vec<String>, manifest: Manifest, version: u64) -> Hello {
    plain_hello("ckpt", version, you, downstream, manifest)
}

/// A plan of one file of `size` bytes in `chunk` chunks.
fn one_file(chunk: u32, size: u64) -> Manifest {
    Manifest::plan_for_files(chunk, &[("weights.bin", size)]).unwrap().0
}

/// Sends one frame of `kind` with `payload` and returns the answer (within `wait`).
fn exchange(addr: &str, kind: Kind, payload: &[u8], wait: Duration) -> wire::Frame {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    wire::write_frame(&mut s, kind, 0, payload).unwrap();
    wire::read_frame(&mut s).unwrap_or_else(|e| panic!("no answer from {addr} within {wait:?}: {e}"))
}

/// Sends raw bytes (a header of our own making and whatever follows) and returns the answer.
fn exchange_raw(addr: &str, bytes: &[u8], wait: Duration) -> wire::Frame {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    s.write_all(bytes).unwrap();
    wire::read_frame(&mut s).unwrap_or_else(|e| panic!("no answer from {addr} within {wait:?}: {e}"))
}

/// The reports of a REJECT (panics on anything else).
fn rejected(f: &wire::Frame, logs: &str) -> Vec<ReplicaReport> {
    assert_eq!(f.header.kind, Kind::Reject, "expected a REJECT, got {}\n{logs}", f.header.kind.name());
    wire::decode_reports(&f.payload).unwrap()
}

/// The error of the first report.
fn first_error(reports: &[ReplicaReport]) -> shardcast::NodeError {
    match &reports.first().expect("a report").outcome {
        Outcome::Failed(e) => e.clone(),
        o => panic!("expected a failure, got {o:?}"),
    }
}

/// Nothing of `name` under the root, and nothing staged.
fn assert_nothing_staged(root: &Path, name: &str) {
    assert!(!root.join(name).exists(), "{} exists", root.join(name).display());
    let staged: Vec<String> = std::fs::read_dir(root)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    for dir in staged.iter().filter(|n| n.starts_with('.')) {
        let inner = list_names(&root.join(dir));
        assert!(inner.iter().all(|n| !n.starts_with(name)), "staged under {dir}: {inner:?}");
    }
}

fn small_tree(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    make_small_tree(&src, 19);
    src
}

// ---------------------------------------------------------------------------------------------
// 19.1: setuid, setgid and sticky bits
// ---------------------------------------------------------------------------------------------

/// A plan asking for a setuid file is refused at admission, naming the path and the mode, and
/// nothing is staged or published.
#[test]
fn setuid_plan_is_refused_and_nothing_is_staged() {
    let c = Cluster::start(1);
    let m = Manifest::new(
        64 << 10,
        vec![Entry { path: "sbin-id".into(), kind: EntryKind::File, mode: 0o755, size: 0, first_chunk: 0 }],
        vec![],
    )
    .unwrap();
    let plan_len = m.encode_plan().len();
    let mut payload = hello(&c.addr(0), vec![], m, 1).encode();
    // The entry's mode, by hand (the library's encoder masks nothing, but `Manifest::new` now
    // refuses such a mode): the manifest closes the payload; its last entry is kind (1), mode
    // (4), size (8), path (4 + 7), and the plan ends with an empty digest count (8).
    let mode_at = payload.len() - 8 - (4 + 7) - 8 - 4;
    assert!(payload.len() - plan_len < mode_at);
    assert_eq!(payload[mode_at..mode_at + 4], 0o755u32.to_le_bytes());
    payload[mode_at..mode_at + 4].copy_from_slice(&0o4755u32.to_le_bytes());
    let f = exchange(&c.addr(0), Kind::Hello, &payload, Duration::from_secs(30));
    let e = first_error(&rejected(&f, &c.logs()));
    assert!(e.message.contains("sbin-id") && e.message.contains("4755"), "{e:?}");
    assert!(e.message.contains("setuid"), "{e:?}");
    assert_nothing_staged(&c.root(0), "ckpt");
}

/// The pusher refuses a source with a setuid file, naming it and its mode, before connecting.
#[test]
fn pusher_refuses_a_setuid_source() {
    let c = Cluster::start(1);
    let dir = tempdir();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    write_random_file_mode(&src.join("tool"), 100, 1, 0o4755);
    let out = c.push(&src, "ckpt", 1, &[]);
    assert_ne!(code(&out), 0, "{}", show_output(&out));
    let text = all_output(&out);
    assert!(text.contains("tool") && text.contains("4755") && text.contains("setuid"), "{text}");
    assert_nothing_staged(&c.root(0), "ckpt");
}

// ---------------------------------------------------------------------------------------------
// 19.2: a huge version pinning `current`
// ---------------------------------------------------------------------------------------------

/// VERSION = 2^64-1 would pin `current` for good (it only moves forward): it is refused, and a
/// later real push moves `current`.
#[test]
fn a_huge_version_cannot_pin_current() {
    let c = Cluster::start(1);
    let dir = tempdir();
    let src = small_tree(dir.path());
    c.assert_push_ok(&c.push(&src, "ckpt", 1, &[]));
    let out = c.push(&src, "ckpt", u64::MAX, &[]);
    assert_ne!(code(&out), 0, "the hostile version was accepted\n{}", show_output(&out));
    let text = all_output(&out);
    assert!(text.contains("--max-version-ahead") && text.contains("current version 1"), "{text}");
    c.assert_push_ok(&c.push(&src, "ckpt", 2, &[]));
    assert_current(&c.root(0), "ckpt", 2);
}

/// Where huge versions are allowed (`--max-version-ahead 0`), a push of an older version than
/// `current` that reports "published" finds its version there: retention never removes the
/// version a push just published.
#[test]
fn a_version_reported_published_is_not_removed_by_its_own_retention() {
    let c = Cluster::builder().serve_arg("--max-version-ahead").serve_arg("0").start(1);
    let dir = tempdir();
    let src = small_tree(dir.path());
    c.assert_push_ok(&c.push(&src, "ckpt", u64::MAX, &[]));
    let out = c.push(&src, "ckpt", 2, &["--keep", "1"]);
    c.assert_push_ok(&out);
    let vdir = c.root(0).join("ckpt/2");
    assert!(vdir.is_dir(), "version 2 reported published but gone\n{}", c.logs());
    assert!(c.root(0).join("ckpt/2.manifest").is_file());
    assert_tree_identical(&src, &vdir);
}

// ---------------------------------------------------------------------------------------------
// 19.3: slow handshakes
// ---------------------------------------------------------------------------------------------

/// 64 connections trickling a HELLO header a byte at a time, from 4 addresses, reconnecting when
/// closed (as an attacker would): a legitimate push and a status request still succeed.
#[test]
fn slow_handshakes_from_four_addresses_leave_pushes_and_status_working() {
    let c = Cluster::start(1);
    let addr = c.addr(0);
    let stop = Arc::new(AtomicBool::new(false));
    let connected = Arc::new(AtomicUsize::new(0));
    let header = Header { kind: Kind::Hello, len: 100, seq: 0, digest: 0 }.to_bytes();
    let threads: Vec<_> = (0..64u8)
        .map(|i| {
            let (addr, stop, connected) = (addr.clone(), Arc::clone(&stop), Arc::clone(&connected));
            std::thread::spawn(move || {
                let src = Ipv4Addr::new(127, 0, 0, 2 + i % 4);
                let mut first = true;
                while !stop.load(Ordering::SeqCst) {
                    let Ok(mut s) = connect_from(src, &addr) else {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    };
                    if first {
                        connected.fetch_add(1, Ordering::SeqCst);
                        first = false;
                    }
                    for b in header.iter().cycle() {
                        if stop.load(Ordering::SeqCst) || s.write_all(&[*b]).is_err() {
                            break;
                        }
                        // A REJECT or a close ends this connection: open another.
                        s.set_nonblocking(true).unwrap();
                        let mut buf = [0u8; 64];
                        let closed = s.read(&mut buf).is_ok();
                        s.set_nonblocking(false).unwrap();
                        if closed {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        })
        .collect();
    assert!(wait_until(Duration::from_secs(30), || connected.load(Ordering::SeqCst) == 64));
    // Every slow connection has had time to be accepted (or refused) and to start trickling.
    std::thread::sleep(Duration::from_secs(1));
    let st = run_timeout(c.cmd().arg("status").arg(&addr).arg("--json"), Duration::from_secs(60));
    let dir = tempdir();
    let src = small_tree(dir.path());
    let out = c.push(&src, "ckpt", 1, &[]);
    // The slow connections are closed when their handshake takes too long in all.
    let reaped = wait_until(Duration::from_secs(30), || c.logs().contains("handshake not done within"));
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(code(&st), 0, "status refused under slow handshakes\n{}\n{}", show_output(&st), c.logs());
    c.assert_push_ok(&out);
    c.assert_published(&src, "ckpt", 1);
    assert!(reaped, "no slow handshake was closed\n{}", c.logs());
}

// ---------------------------------------------------------------------------------------------
// 19.4: onward handshakes and chain length
// ---------------------------------------------------------------------------------------------

/// A HELLO whose downstream entries all point at a listener that never answers is refused
/// within the onward handshake's bound, the silent node named as stalled.
#[test]
fn a_chain_of_silent_nodes_is_refused_and_the_silent_one_named() {
    let c = Cluster::builder().serve_arg("--handshake-timeout").serve_arg("1").start(1);
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let s_addr = silent.local_addr().unwrap().to_string();
    let h = hello(&c.addr(0), vec![s_addr.clone(); 4], one_file(64 << 10, 10), 1);
    // The bound is 1 s per node from the first replica to the tail (5 s); before it was 30 s
    // per node and more.
    let f = exchange(&c.addr(0), Kind::Hello, &h.encode(), Duration::from_secs(25));
    let reports = rejected(&f, &c.logs());
    assert_eq!(reports[0].node, s_addr, "{reports:?}");
    let e = first_error(&reports);
    assert_eq!(e.kind, shardcast::ErrorKind::Stalled, "{e:?}");
    assert!(e.message.contains("did not answer"), "{e:?}");
    assert_nothing_staged(&c.root(0), "ckpt");
}

/// A chain longer than `--max-chain` (default 16, shown in `--help`) is refused before anything
/// is dialed.
#[test]
fn a_chain_longer_than_max_chain_is_refused() {
    let c = Cluster::start(1);
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    silent.set_nonblocking(true).unwrap();
    let s_addr = silent.local_addr().unwrap().to_string();
    let h = hello(&c.addr(0), vec![s_addr; 100], one_file(64 << 10, 10), 1);
    let f = exchange(&c.addr(0), Kind::Hello, &h.encode(), Duration::from_secs(25));
    let e = first_error(&rejected(&f, &c.logs()));
    assert!(e.message.contains("chain of 101 nodes") && e.message.contains("--max-chain 16"), "{e:?}");
    assert!(silent.accept().is_err(), "the replica dialed a node of a chain it refused");
    let help = run(shardcast().arg("serve").arg("--help"));
    assert!(stdout_str(&help).contains("--max-chain") && stdout_str(&help).contains("16"), "{}", show_output(&help));
}

// ---------------------------------------------------------------------------------------------
// 19.5: the pool bound
// ---------------------------------------------------------------------------------------------

/// A 1-byte file in 64 MiB chunks against the default 64 MiB pool: refused, with both numbers,
/// instead of pinning 4 slots (256 MiB).
#[test]
fn a_chunk_size_the_pool_cannot_hold_is_refused_on_both_sides() {
    let c = Cluster::start(1);
    let h = hello(&c.addr(0), vec![], one_file(64 << 20, 1), 1);
    let f = exchange(&c.addr(0), Kind::Hello, &h.encode(), Duration::from_secs(30));
    let e = first_error(&rejected(&f, &c.logs()));
    assert!(e.message.contains("64 MiB") && e.message.contains("256 MiB") && e.message.contains("--pool-mb"), "{e:?}");
    assert_nothing_staged(&c.root(0), "ckpt");

    let dir = tempdir();
    let src = small_tree(dir.path());
    let out = c.push(&src, "ckpt", 1, &["--chunk-size", "64MiB", "--pool-mb", "16"]);
    assert_ne!(code(&out), 0, "{}", show_output(&out));
    let text = all_output(&out);
    assert!(text.contains("16 MiB") && text.contains("64 MiB") && text.contains("--pool-mb"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// 19.6: huge entry counts and manifests
// ---------------------------------------------------------------------------------------------

#[test]
fn too_many_entries_are_refused() {
    let c = Cluster::builder().serve_arg("--max-entries").serve_arg("1000").start(1);
    let names: Vec<String> = (0..1001).map(|i| format!("f{i}")).collect();
    let files: Vec<(&str, u64)> = names.iter().map(|n| (n.as_str(), 0)).collect();
    let m = Manifest::plan_for_files(64 << 10, &files).unwrap().0;
    let f = exchange(&c.addr(0), Kind::Hello, &hello(&c.addr(0), vec![], m, 1).encode(), Duration::from_secs(30));
    let e = first_error(&rejected(&f, &c.logs()));
    assert_eq!(e.kind, shardcast::ErrorKind::BadManifest);
    assert!(e.message.contains("1001 entries") && e.message.contains("--max-entries 1000"), "{e:?}");
    assert_nothing_staged(&c.root(0), "ckpt");
}

/// A HELLO larger than `--max-manifest-mb` is refused from its header, before its payload.
#[test]
fn a_manifest_larger_than_the_cap_is_refused_from_the_header() {
    let c = Cluster::builder().serve_arg("--max-manifest-mb").serve_arg("1").start(1);
    let hdr = Header { kind: Kind::Hello, len: 2 << 20, seq: 0, digest: 0 }.to_bytes();
    let f = exchange_raw(&c.addr(0), &hdr, Duration::from_secs(10));
    let e = first_error(&rejected(&f, &c.logs()));
    assert!(e.message.contains("exceeds the limit of 1048576"), "{e:?}");
}

// ---------------------------------------------------------------------------------------------
// 19.9: no key, no TLS, reachable from elsewhere
// ---------------------------------------------------------------------------------------------

#[test]
fn serving_without_a_key_beyond_loopback_warns_loudly() {
    let dir = tempdir();
    let mut cmd = shardcast();
    cmd.args(["serve", "--listen", "0.0.0.0:0", "--root"]).arg(dir.path().join("r"));
    let s = util::Server::start_with(cmd, &dir.path().join("r"));
    let log = s.log();
    assert!(log.contains("WARN") && log.contains("INSECURE") && log.contains("anyone who can reach"), "{log}");
    let c = Cluster::start(1);
    assert!(!c.log(0).contains("INSECURE"), "loopback only: no warning\n{}", c.log(0));
}

// ---------------------------------------------------------------------------------------------
// 19.10 and 14.5: minor leaks and pre-authentication bounds
// ---------------------------------------------------------------------------------------------

#[test]
fn protocol_version_refusal_names_the_version_spoken() {
    let c = Cluster::start(1);
    let mut hdr = Header::new(Kind::StatusReq).to_bytes();
    hdr[4..6].copy_from_slice(&99u16.to_le_bytes());
    let e = first_error(&rejected(&exchange_raw(&c.addr(0), &hdr, Duration::from_secs(10)), &c.logs()));
    assert!(e.message.contains(&format!("speaks {}", wire::PROTO_VERSION)), "{e:?}");
}

#[test]
fn header_flags_and_reserved_bytes_must_be_zero() {
    let c = Cluster::start(1);
    for at in [7usize, 12, 15] {
        let mut hdr = Header::new(Kind::StatusReq).to_bytes();
        hdr[at] = 1;
        let f = exchange_raw(&c.addr(0), &hdr, Duration::from_secs(10));
        let e = first_error(&rejected(&f, &c.logs()));
        assert!(e.message.contains("must be zero"), "byte {at}: {e:?}");
    }
}

const SECRET: &str = "correct-horse-battery-staple-0123456789abcdef";

fn keyed(dir: &Path) -> (Cluster, String) {
    use std::os::unix::fs::PermissionsExt;
    let key = dir.join("key");
    std::fs::write(&key, SECRET).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let c = Cluster::builder().serve_arg("--key-file").serve_arg(key.to_str().unwrap()).start(1);
    (c, shardcast::auth::ClusterKey::from_secret(SECRET.as_bytes()).id().to_owned())
}

/// A peer that has not proved it holds the key is not told the replica's key id (which lets it
/// test guesses offline), neither when it sends no AUTH nor when it offers another key.
#[test]
fn an_unauthenticated_peer_is_not_told_the_key_id() {
    let dir = tempdir();
    let (c, id) = keyed(dir.path());
    let e = first_error(&rejected(&exchange(&c.addr(0), Kind::StatusReq, &[], Duration::from_secs(10)), &c.logs()));
    assert!(e.message.contains("authentication required") && !e.message.contains(&id), "{e:?}");
    let mut auth = wire::Enc::default();
    auth.u8(1).str("0123456789abcdef");
    auth.0.extend_from_slice(&[7u8; 32]);
    let e = first_error(&rejected(&exchange(&c.addr(0), Kind::Auth, &auth.0, Duration::from_secs(10)), &c.logs()));
    assert!(e.message.contains("wrong cluster key") && !e.message.contains(&id), "{e:?}");
}

/// Before authentication a 40-byte header cannot make the replica allocate (or wait for) a large
/// payload: a HELLO header announcing 200 MiB is refused at once.
#[test]
fn before_authentication_frames_are_small() {
    let dir = tempdir();
    let (c, _) = keyed(dir.path());
    let hdr = Header { kind: Kind::Hello, len: 200 << 20, seq: 0, digest: 0 }.to_bytes();
    let e = first_error(&rejected(&exchange_raw(&c.addr(0), &hdr, Duration::from_secs(10)), &c.logs()));
    assert!(e.message.contains("exceeds the limit of 1024"), "{e:?}");
}

/// The `you` field is the peer's say-so: something that is not an address is refused, not
/// echoed into reports and logs.
#[test]
fn a_you_field_that_is_not_an_address_is_refused() {
    let c = Cluster::start(1);
    let evil = "r3:7071 published\nWARN everything is fine";
    let h = hello(evil, vec![], one_file(64 << 10, 10), 1);
    let reports = rejected(&exchange(&c.addr(0), Kind::Hello, &h.encode(), Duration::from_secs(10)), &c.logs());
    assert_eq!(reports[0].node, c.addr(0), "{reports:?}");
    let e = first_error(&reports);
    assert!(e.message.contains("not printable ASCII"), "{e:?}");
    assert_nothing_staged(&c.root(0), "ckpt");
}

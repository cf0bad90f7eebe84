//! RDMA transport tests: real `shardcast serve` processes moving chunks with RDMA WRITE WITH
//! IMM over soft-RoCE (rdma_rxe).
//!
//! They need an RDMA device, which this host's kernel does not have: `scripts/test.sh` runs
//! this file inside the qemu guest of `scripts/rxe-vm.sh`, which exports `RXEVM_DEV`/`RXEVM_IP`/
//! `RXEVM_GID` (rxe_v0 on one end of a veth pair) and `RXEVM_PEER_*` (rxe_v1 on the other end).
//! Replicas run on the first, the primary on the second, so RoCEv2 packets cross the veth.
//! Outside the guest every test prints why it skips and returns.

mod util;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use util::*;

const MIB: u64 = 1 << 20;

struct Rxe {
    dev: String,
    ip: String,
    gid: String,
    peer_dev: String,
    peer_gid: String,
}

fn rxe() -> Option<Rxe> {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let (Some(dev), Some(ip), Some(gid), Some(peer_dev), Some(peer_gid)) =
        (get("RXEVM_DEV"), get("RXEVM_IP"), get("RXEVM_GID"), get("RXEVM_PEER_DEV"), get("RXEVM_PEER_GID"))
    else {
        // libtest names each test's thread after the test.
        let test = std::thread::current().name().map(|n| format!("rdma::{n}")).unwrap_or_else(|| "rdma".into());
        skip(
            &test,
            "no soft-RoCE device here (RXEVM_* unset: this host's kernel has no RDMA); \
             scripts/test.sh runs these tests inside the scripts/rxe-vm.sh guest",
        );
        return None;
    };
    Some(Rxe { dev, ip, gid, peer_dev, peer_gid })
}

/// A replica on the rxe device, with extra serve arguments.
fn serve(r: &Rxe, root: &Path, extra: &[&str]) -> Server {
    let mut cmd = shardcast();
    cmd.args(["serve", "--listen", &format!("{}:0", r.ip), "--root"])
        .arg(root)
        .args(["--rdma-device", &r.dev, "--gid-index", &r.gid])
        .args(extra);
    Server::start_with(cmd, root)
}

/// A push from the peer rxe device through `servers`.
fn push(r: &Rxe, src: &Path, servers: &[&Server], name: &str, v: u64, extra: &[&str]) -> Command {
    let to: Vec<String> = servers.iter().map(|s| s.addr().to_string()).collect();
    let mut cmd = shardcast();
    cmd.arg("push")
        .arg(src)
        .args(["--name", name, "--version", &v.to_string(), "--to", &to.join(",")])
        .args(["--rdma-device", &r.peer_dev, "--gid-index", &r.peer_gid])
        .args(extra);
    cmd
}

fn logs(servers: &[&Server]) -> String {
    servers.iter().enumerate().map(|(i, s)| format!("--- serve {i} ({})\n{}", s.addr(), s.log())).collect()
}

/// Runs a push to its end; on timeout kills it and panics with the servers' logs.
fn finish(cmd: &mut Command, timeout: Duration, servers: &[&Server]) -> std::process::Output {
    let mut p = Running::spawn(cmd);
    if p.wait_timeout(timeout).is_none() {
        // Let the server logs into the panic message too.
        eprintln!("push did not finish within {timeout:?}; server logs:\n{}", logs(servers));
    }
    p.finish(Duration::from_secs(1))
}

fn published(s: &Server, src: &Path, name: &str, v: u64) {
    assert_tree_identical(src, &s.root().join(name).join(v.to_string()));
}

fn tree(dir: &Path, sizes: &[u64], seed: u64) {
    for (i, size) in sizes.iter().enumerate() {
        write_random_file(&dir.join(format!("f{i}.bin")), *size, seed + i as u64);
    }
}

/// The kernel log from a point on (`/dev/kmsg`, readable as root, as in the guest): what rxe
/// said while a test ran. rxe warns (`WARNING: ... __rxe_cleanup`, with `rxe_destroy_qp` in the
/// trace) when it destroys a queue pair that something still references, after waiting ~50 s
/// for the reference to go; a clean teardown logs nothing of the kind.
struct KernelLog(std::fs::File);

impl KernelLog {
    /// From now on; `None` (said on stderr) where the log cannot be read.
    fn from_now() -> Option<KernelLog> {
        use std::io::Seek as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open("/dev/kmsg");
        let mut f = match f {
            Ok(f) => f,
            Err(e) => {
                eprintln!("cannot read the kernel log (/dev/kmsg: {e}): rxe teardown warnings not checked");
                return None;
            }
        };
        f.seek(std::io::SeekFrom::End(0)).expect("seek to the end of /dev/kmsg");
        Some(KernelLog(f))
    }

    /// The records logged since [`KernelLog::from_now`] (or the last call) that come from rxe's
    /// object teardown.
    fn rxe_teardown_warnings(&mut self) -> Vec<String> {
        use std::io::Read as _;
        let mut found = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            match self.0.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let rec = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if ["__rxe_cleanup", "rxe_pool.c", "rxe_destroy_qp"].iter().any(|w| rec.contains(w)) {
                        found.push(rec);
                    }
                }
                // Records overwritten before they were read: go on with the next one.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("reading /dev/kmsg: {e}"),
            }
        }
        found
    }

    /// Panics when rxe warned about its teardown since the last look.
    fn assert_no_rxe_warning(log: &mut Option<KernelLog>, what: &str) {
        if let Some(k) = log {
            let w = k.rxe_teardown_warnings();
            assert!(
                w.is_empty(),
                "rxe warned while {what} (a queue pair destroyed while still referenced):\n{}",
                w.join("")
            );
        }
    }
}

/// One and two replicas, every hop over RDMA, files around the chunk size.
#[test]
fn rdma_one_and_two_replicas() {
    let Some(r) = rxe() else { return };
    let mut kernel = KernelLog::from_now();
    let t = tempdir();
    let src = t.path().join("src");
    tree(&src, &[0, 1, MIB - 1, MIB, 5 * MIB + 77], 10);
    for n in [1usize, 2] {
        let servers: Vec<Server> =
            (0..n).map(|i| serve(&r, &t.path().join(format!("n{n}-r{i}")), &["--transport", "rdma"])).collect();
        let refs: Vec<&Server> = servers.iter().collect();
        let mut cmd = push(&r, &src, &refs, "few", n as u64, &["--transport", "rdma", "--chunk-size", "1M"]);
        let out = finish(&mut cmd, Duration::from_secs(120), &refs);
        assert_eq!(code(&out), 0, "{n} replica(s)\n{}\n{}", show_output(&out), logs(&refs));
        for s in &servers {
            published(s, &src, "few", n as u64);
            assert!(s.log().contains("hop transport: rdma (receiving)"), "a hop did not use RDMA\n{}", s.log());
        }
        drop(servers);
        KernelLog::assert_no_rxe_warning(&mut kernel, &format!("{n} replica(s) ended their pushes and exited"));
    }
}

/// Four replicas: every hop RDMA (relays forward from the slot a chunk landed in), with small
/// pools, so that slots are granted, written, freed and granted again many times.
#[test]
fn rdma_chain_of_four_with_credit_cycling() {
    let Some(r) = rxe() else { return };
    let t = tempdir();
    let src = t.path().join("src");
    tree(&src, &[3 * MIB + 5, 2 * MIB, 17], 20);
    let servers: Vec<Server> =
        (0..4).map(|i| serve(&r, &t.path().join(format!("r{i}")), &["--pool-mb", "1"])).collect();
    let refs: Vec<&Server> = servers.iter().collect();
    // 256 KiB chunks, pools of 4 slots: ~21 chunks per hop through 4 grants.
    let mut cmd = push(&r, &src, &refs, "chain", 1, &["--transport", "rdma", "--chunk-size", "256K", "--pool-mb", "1"]);
    let out = finish(&mut cmd, Duration::from_secs(240), &refs);
    assert_eq!(code(&out), 0, "{}\n{}", show_output(&out), logs(&refs));
    for s in &servers {
        published(s, &src, "chain", 1);
        assert!(s.log().contains("hop transport: rdma (receiving)"), "{}", s.log());
    }
}

/// The first hop RDMA, the second TCP: the last replica serves with `--transport tcp`, the
/// push asks for `auto` and lets soft-RoCE count.
#[test]
fn rdma_then_tcp_mixed_chain() {
    let Some(r) = rxe() else { return };
    let t = tempdir();
    let src = t.path().join("src");
    tree(&src, &[2 * MIB + 1, 4096], 30);
    let a = serve(&r, &t.path().join("r0"), &["--rdma-allow-soft"]);
    let b = serve(&r, &t.path().join("r1"), &["--transport", "tcp"]);
    let mut cmd = push(&r, &src, &[&a, &b], "mixed", 1, &["--rdma-allow-soft", "--chunk-size", "1M"]);
    let out = finish(&mut cmd, Duration::from_secs(120), &[&a, &b]);
    assert_eq!(code(&out), 0, "{}\n{}", show_output(&out), logs(&[&a, &b]));
    published(&a, &src, "mixed", 1);
    published(&b, &src, "mixed", 1);
    assert!(a.log().contains("hop transport: rdma (receiving)"), "hop 1 not RDMA\n{}", a.log());
    assert!(a.log().contains("hop transport: tcp"), "hop 2 not TCP\n{}", a.log());

    // And `--transport rdma` refuses that chain, naming the node that cannot.
    let mut cmd = push(&r, &src, &[&a, &b], "mixed", 2, &["--transport", "rdma", "--chunk-size", "1M"]);
    let out = finish(&mut cmd, Duration::from_secs(60), &[&a, &b]);
    assert_ne!(code(&out), 0, "{}", show_output(&out));
    let all = all_output(&out);
    assert!(all.contains("RDMA unavailable") && all.contains(&b.addr().to_string()), "{}", show_output(&out));
    assert!(!b.root().join("mixed/2").exists(), "a refused push published on {}", b.addr());
}

/// The tail dies in the middle of an RDMA transfer: the push fails promptly and names it, and
/// nothing is published there.
#[test]
fn rdma_peer_disappears_mid_transfer() {
    let Some(r) = rxe() else { return };
    let t = tempdir();
    let src = t.path().join("src");
    // Big enough to take seconds over rxe under TCG.
    tree(&src, &[48 * MIB], 40);
    let a = serve(&r, &t.path().join("r0"), &[]);
    let mut b = serve(&r, &t.path().join("r1"), &[]);
    let mut cmd = push(&r, &src, &[&a, &b], "gone", 1, &["--transport", "rdma"]);
    kill_tail_mid_push(&mut cmd, &a, &mut b);
}

/// Runs the push `cmd` through `a` and then the tail `b`, kills `b` once its staging holds data,
/// and checks that the push fails promptly naming it and that `b` published nothing.
fn kill_tail_mid_push(cmd: &mut Command, a: &Server, b: &mut Server) {
    let mut kernel = KernelLog::from_now();
    let mut p = Running::spawn(cmd);
    let deadline = Instant::now() + Duration::from_secs(60);
    let staging = b.root().join(".staging");
    while walk_sizes(&staging) <= 2 * MIB {
        assert!(Instant::now() < deadline, "no data reached the tail in 60 s\n{}", logs(&[a, b]));
        assert!(p.try_wait().is_none(), "push ended before the kill\n{}", logs(&[a, b]));
        std::thread::sleep(Duration::from_millis(20));
    }
    b.kill();
    let out = p.finish(Duration::from_secs(120));
    assert_ne!(code(&out), 0, "{}", show_output(&out));
    assert!(all_output(&out).contains(&b.addr().to_string()), "the failed node is not named\n{}", show_output(&out));
    assert!(!b.root().join("gone/1").exists(), "the killed tail published");
    // The kernel freed the killed tail's queue pairs while its slots were granted.
    KernelLog::assert_no_rxe_warning(&mut kernel, "the tail was killed mid-transfer");
}

fn walk_sizes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .map(|e| {
            let m = e.metadata().ok();
            match m {
                Some(m) if m.is_dir() => walk_sizes(&e.path()),
                Some(m) => m.blocks() * 512,
                None => 0,
            }
        })
        .sum()
}

use std::os::unix::fs::MetadataExt;

/// A cluster key file (mode 0600, as `--key-file` requires).
fn key_file(dir: &Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("cluster.key");
    std::fs::write(&p, "rdma-hops-carry-macs-too-0123456789abcdef").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// A keyed replica on the rxe device that logs at debug level (where it says "peer
/// authenticated").
fn serve_keyed(r: &Rxe, root: &Path, key: &Path, extra: &[&str]) -> Server {
    let mut cmd = shardcast();
    cmd.args(["serve", "--listen", &format!("{}:0", r.ip), "--root"])
        .arg(root)
        .args(["--rdma-device", &r.dev, "--gid-index", &r.gid, "--key-file"])
        .arg(key)
        .args(extra)
        .env("SHARDCAST_LOG", "shardcast=debug");
    Server::start_with(cmd, root)
}

/// Issue 14: a keyed push down a chain of two over RDMA. Both hops authenticate with the
/// cluster key and move chunks by RDMA WRITE, each chunk's frame MAC written into the slot after
/// its payload (files of exactly the chunk size need the slot's room for it); both replicas
/// publish the source's bytes.
#[test]
fn rdma_keyed_chain_of_two_publishes_identical_bytes() {
    let Some(r) = rxe() else { return };
    let t = tempdir();
    let key = key_file(t.path());
    let src = t.path().join("src");
    tree(&src, &[0, 1, MIB - 1, MIB, 3 * MIB, 2 * MIB + 333], 50);
    let a = serve_keyed(&r, &t.path().join("r0"), &key, &[]);
    let b = serve_keyed(&r, &t.path().join("r1"), &key, &[]);
    let k = key.to_str().unwrap();
    let mut cmd =
        push(&r, &src, &[&a, &b], "keyed", 1, &["--transport", "rdma", "--chunk-size", "1M", "--key-file", k]);
    let out = finish(&mut cmd, Duration::from_secs(120), &[&a, &b]);
    assert_eq!(code(&out), 0, "{}\n{}", show_output(&out), logs(&[&a, &b]));
    for s in [&a, &b] {
        published(s, &src, "keyed", 1);
        let log = s.log();
        assert!(log.contains("peer authenticated"), "{} did not authenticate its upstream\n{log}", s.addr());
        assert!(log.contains("hop transport: rdma (receiving)"), "a hop into {} was not RDMA\n{log}", s.addr());
    }

    // The same replicas refuse a push without the key: the chain above really was keyed.
    let mut cmd = push(&r, &src, &[&a, &b], "keyed", 2, &["--transport", "rdma", "--chunk-size", "1M"]);
    cmd.env_remove("SHARDCAST_KEY_FILE");
    let out = finish(&mut cmd, Duration::from_secs(60), &[&a, &b]);
    assert_ne!(code(&out), 0, "{}", show_output(&out));
    assert!(!a.root().join("keyed/2").exists() && !b.root().join("keyed/2").exists(), "an unkeyed push published");
}

/// Issue 14, "Also": RDMA hops are not encrypted, so `--encrypt` never travels over RDMA.
/// `--encrypt --transport rdma` is refused before any connection (a usage error that says what
/// to do), and `--encrypt` under `auto` (with soft-RoCE allowed, where the same push without
/// `--encrypt` takes RDMA on both hops) moves every hop over TCP: never plaintext over RDMA.
#[test]
fn rdma_with_encrypt_is_refused_or_goes_over_tcp_never_plaintext() {
    let Some(r) = rxe() else { return };
    let t = tempdir();
    let key = key_file(t.path());
    let k = key.to_str().unwrap();
    let src = t.path().join("src");
    tree(&src, &[2 * MIB + 5, MIB], 60);
    let a = serve_keyed(&r, &t.path().join("r0"), &key, &["--rdma-allow-soft"]);
    let b = serve_keyed(&r, &t.path().join("r1"), &key, &["--rdma-allow-soft"]);
    let servers = [&a, &b];

    let mut cmd = push(
        &r,
        &src,
        &servers,
        "enc",
        1,
        &["--transport", "rdma", "--encrypt", "--chunk-size", "1M", "--key-file", k],
    );
    let out = finish(&mut cmd, Duration::from_secs(60), &servers);
    assert_eq!(code(&out), 2, "not a usage error\n{}", show_output(&out));
    assert!(all_output(&out).contains("--encrypt covers TCP hops only"), "{}", show_output(&out));
    for s in servers {
        assert!(!s.root().join("enc").exists(), "a refused push reached {}", s.addr());
        assert!(!s.log().contains("peer authenticated"), "the refused push connected to {}\n{}", s.addr(), s.log());
    }

    let auto = ["--transport", "auto", "--rdma-allow-soft", "--chunk-size", "1M", "--key-file", k];
    let mut cmd = push(&r, &src, &servers, "enc", 2, &auto);
    cmd.arg("--encrypt");
    let out = finish(&mut cmd, Duration::from_secs(120), &servers);
    assert_eq!(code(&out), 0, "{}\n{}", show_output(&out), logs(&servers));
    for s in servers {
        published(s, &src, "enc", 2);
        assert!(!s.log().contains("hop transport: rdma"), "an encrypted push used RDMA into {}\n{}", s.addr(), s.log());
    }

    // The control: the same push without --encrypt takes RDMA on both hops.
    let mut cmd = push(&r, &src, &servers, "enc", 3, &auto);
    let out = finish(&mut cmd, Duration::from_secs(120), &servers);
    assert_eq!(code(&out), 0, "{}\n{}", show_output(&out), logs(&servers));
    for s in servers {
        published(s, &src, "enc", 3);
        assert!(s.log().contains("hop transport: rdma (receiving)"), "{}", s.log());
    }
}

/// Issue 14.3: the sending end of a hop grants its peer nothing. A fake replica answers the
/// push's HELLO, takes its RDMA offer, connects a queue pair to the push's and, once the push
/// says its side is connected, RDMA-WRITEs into the push's pool: the offer advertises neither a
/// key nor an address any more (both used to be the pool's), and the push's queue pair refuses
/// the operation itself (it grants no remote write access: a remote invalid request error,
/// before any key is looked at). Before the fix the sender's whole pool was registered with
/// remote write access and its key and address sent downstream, and the write landed in the
/// sender's slots.
#[cfg(feature = "rdma")]
#[test]
fn rdma_a_peer_cannot_write_into_the_senders_pool() {
    use std::io::BufRead as _;
    use std::process::Stdio;

    use shardcast::rdma::{Access, Endpoint, Mapping, PeerInfo};
    use shardcast::wire::{self, Kind, TransportMsg};

    let Some(r) = rxe() else { return };
    let t = tempdir();
    let src = t.path().join("src");
    tree(&src, &[4 * MIB], 70);
    let l = std::net::TcpListener::bind(format!("{}:0", r.ip)).unwrap();
    let to = l.local_addr().unwrap().to_string();
    let mut cmd = shardcast();
    cmd.arg("push")
        .arg(&src)
        .args(["--name", "x", "--version", "1", "--to", &to, "--transport", "rdma", "--chunk-size", "1M"])
        .args(["--rdma-device", &r.peer_dev, "--gid-index", &r.peer_gid])
        .env("SHARDCAST_LOG", "shardcast=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _push = Kill(child);

    let (mut s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    assert_eq!(wire::read_frame(&mut s).unwrap().header.kind, Kind::Hello);
    wire::write_frame(&mut s, Kind::Accept, 0, &[]).unwrap();
    let offer = wire::read_frame(&mut s).unwrap();
    assert_eq!(offer.header.kind, Kind::Transport);
    let TransportMsg::Rdma { qpn, psn, gid, mtu, addr, .. } = TransportMsg::decode(&offer.payload).unwrap() else {
        panic!("the push offered TCP: {offer:?}")
    };
    assert_eq!(addr, 0, "the sender advertised its pool's address");

    // The fake's own registered memory: the endpoint keeps it mapped.
    let mem = Mapping::anon(MIB as usize).unwrap();
    let gid_index: u8 = r.gid.parse().unwrap();
    let mut ep = Endpoint::open(&r.dev, 1, gid_index, &mem, 16, Access::SendOnly).expect("open the fake's endpoint");
    ep.connect(&PeerInfo { qpn, psn, gid, mtu, addr }).expect("connect to the push's queue pair");
    let answer = shardcast::rdma::msg_of(&ep, MIB as u32, Vec::new());
    wire::write_frame(&mut s, Kind::Transport, 0, &answer.encode()).unwrap();
    // The push logs "hop transport: rdma" once its queue pair is connected to ours.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains("hop transport: rdma") => break,
            Ok(_) => {}
            Err(e) => panic!("the push never connected its RDMA side ({e})"),
        }
    }

    // IBV_WC_REM_INV_REQ_ERR (9): the responder's queue pair does not allow RDMA WRITE.
    match write_and_wait(&mut ep, &mem, 4096, 0x1000, 0x215, None) {
        Ok(()) => panic!("an RDMA WRITE landed in the sender's pool"),
        Err(e) => assert_eq!(e.0, 9, "expected the push's queue pair to refuse remote writes, got {e}"),
    }
}

/// A receiving endpoint closed while its slots are granted (as at the end of every push: the
/// replica holds credits the sender never used) frees its queue pair cleanly. A bound type-2
/// window holds a reference on the queue pair it was bound through; the endpoint used to
/// destroy the queue pair before its windows, and rxe then waited ~50 s in ibv_destroy_qp (the
/// replica's session thread stuck in the kernel, every RDMA test's server taking that long to
/// die) and warned in the kernel log.
#[cfg(feature = "rdma")]
#[test]
fn rdma_an_endpoint_closed_with_granted_slots_frees_its_queue_pair_cleanly() {
    use shardcast::rdma::{Access, Endpoint, Mapping};

    let Some(r) = rxe() else { return };
    let mut kernel = KernelLog::from_now();
    if kernel.is_none() {
        skip("rdma::rdma_an_endpoint_closed_with_granted_slots_frees_its_queue_pair_cleanly", "/dev/kmsg unreadable");
        return;
    }
    const SLOTS: u16 = 4;
    let mem = Mapping::anon(4 * MIB as usize).unwrap();
    let access = Access::Grants { slot_size: MIB as usize, slots: usize::from(SLOTS) };
    let mut rx = Endpoint::open(&r.dev, 1, r.gid.parse().unwrap(), &mem, 16, access).expect("open the receiver");
    let src = Mapping::anon(MIB as usize).unwrap();
    let mut tx = Endpoint::open(&r.peer_dev, 1, r.peer_gid.parse().unwrap(), &src, 16, Access::SendOnly)
        .expect("open the sender");
    rx.connect(&tx.local()).expect("connect the receiver");
    tx.connect(&rx.local()).expect("connect the sender");
    let keys: Vec<u32> = (0..SLOTS).map(|slot| rx.grant(slot).expect("grant")).collect();
    // One chunk lands in slot 0 (the window stays bound: only the replica's session revokes).
    rx.post_recv(1).expect("post a receive");
    write_and_wait(&mut tx, &src, 4096, rx.local().addr, keys[0], Some(0)).expect("a write into a granted slot");
    drop(rx);
    drop(tx);
    KernelLog::assert_no_rxe_warning(&mut kernel, "an endpoint with granted slots closed");
}

/// RDMA-WRITEs the first `len` bytes of `mem` (registered by `ep`) to `remote` with `rkey`
/// (WITH IMM `imm` when given) and waits for the write's completion.
#[cfg(feature = "rdma")]
fn write_and_wait(
    ep: &mut shardcast::rdma::Endpoint,
    mem: &shardcast::rdma::Mapping,
    len: u32,
    remote: u64,
    rkey: u32,
    imm: Option<u32>,
) -> Result<(), shardcast::rdma::types::WcError> {
    assert!(len as usize <= mem.len());
    // SAFETY: the source lies in `mem`, which `ep` registered and which nothing writes.
    unsafe { ep.post_write(7, mem.base(), len, remote, rkey, imm) }.expect("post the RDMA WRITE");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut done = Vec::new();
    while done.is_empty() {
        assert!(Instant::now() < deadline, "the RDMA WRITE never completed");
        ep.poll(&mut done).expect("poll");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(done[0].wr_id, 7);
    done[0].status
}

/// Issue 14.3, the receiving end: a credit lets the sender write into the one slot it names,
/// and only until a frame has landed there. A fake pusher speaks the protocol to a real replica
/// over RDMA and, with the keys of the replica's credits:
/// - writes into a granted slot with that slot's key (lands), then into that slot with the key
///   of another granted slot: remote access error (each key is a memory window bound over its
///   slot's region alone);
/// - on a second push, writes chunk 0 properly (WITH IMM), waits until the replica has handled
///   it (its next CREDIT or ACK), and writes into the same slot again with the same key: remote
///   access error (the window was invalidated when the chunk landed).
///
/// Each push then fails and nothing is published. Before the fix the replica registered its
/// whole pool as one region with remote write access and every credit opened all of it: both
/// refused writes landed.
#[cfg(feature = "rdma")]
#[test]
fn rdma_a_pusher_writes_only_into_the_slot_it_holds_while_it_holds_it() {
    use std::net::TcpStream;

    use shardcast::manifest::{Manifest, digest};
    use shardcast::rdma::{Access, Endpoint, Mapping, PeerInfo};
    use shardcast::wire::{self, Header, Kind, TransportMsg};

    let Some(r) = rxe() else { return };
    let t = tempdir();
    let server = serve(&r, &t.path().join("r"), &["--transport", "rdma", "--pool-mb", "8"]);
    const CHUNK: u32 = 1 << 20;
    let manifest = Manifest::plan_for_files(CHUNK, &[("weights.bin", 2 * u64::from(CHUNK))]).unwrap().0;
    let payload: Vec<u8> = (0..CHUNK).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let frame_len = wire::HEADER_LEN + CHUNK as usize;

    struct Hop {
        s: TcpStream,
        ep: Endpoint,
        mem: Mapping,
        addr: u64,
        slot_size: u64,
        credits: Vec<wire::Credit>,
    }
    // A push of `version` up to connected queue pairs; `mem` holds chunk 0's frame.
    let open = |version: u64| -> Hop {
        let mut s = TcpStream::connect(server.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut hello = plain_hello("ckpt", version, &server.addr().to_string(), vec![], manifest.clone());
        hello.transport = shardcast::transport::Transport::Rdma;
        wire::write_frame(&mut s, Kind::Hello, 0, &hello.encode()).unwrap();
        let f = wire::read_frame(&mut s).unwrap();
        assert_eq!(f.header.kind, Kind::Accept, "{f:?}\n{}", server.log());
        let mut mem = Mapping::anon(frame_len.next_multiple_of(4096)).unwrap();
        let bytes = mem.bytes_mut().expect("not shared yet");
        let h = Header { kind: Kind::Chunk, len: CHUNK, seq: 0, digest: digest(&payload) };
        bytes[..wire::HEADER_LEN].copy_from_slice(&h.to_bytes());
        bytes[wire::HEADER_LEN..frame_len].copy_from_slice(&payload);
        let gid_index: u8 = r.peer_gid.parse().unwrap();
        let mut ep = Endpoint::open(&r.peer_dev, 1, gid_index, &mem, 16, Access::SendOnly).expect("open");
        let offer = shardcast::rdma::msg_of(&ep, 0, Vec::new());
        wire::write_frame(&mut s, Kind::Transport, 0, &offer.encode()).unwrap();
        let f = wire::read_frame(&mut s).unwrap();
        assert_eq!(f.header.kind, Kind::Transport, "{f:?}\n{}", server.log());
        let TransportMsg::Rdma { qpn, psn, gid, mtu, addr, slot_size, credits, .. } =
            TransportMsg::decode(&f.payload).unwrap()
        else {
            panic!("the replica answered TCP: {f:?}\n{}", server.log())
        };
        assert!(credits.len() >= 2, "{credits:?}");
        ep.connect(&PeerInfo { qpn, psn, gid, mtu, addr }).expect("connect to the replica's queue pair");
        Hop { s, ep, mem, addr, slot_size: u64::from(slot_size), credits }
    };
    let at = |h: &Hop, slot: u16| h.addr + u64::from(slot) * h.slot_size;
    // IBV_WC_REM_ACCESS_ERR: the responder found no key that allows this write there.
    const REM_ACCESS_ERR: u32 = 10;

    // 1. Another granted slot's key does not open this slot.
    let mut h = open(1);
    let (c0, c1) = (h.credits[0], h.credits[1]);
    assert_ne!(c0.rkey, c1.rkey, "two credits with one key: {:?}", h.credits);
    let (to1, to0) = (at(&h, c1.slot), at(&h, c0.slot));
    write_and_wait(&mut h.ep, &h.mem, 4096, to1, c1.rkey, None).expect("a write with the slot's own key");
    match write_and_wait(&mut h.ep, &h.mem, 4096, to0, c1.rkey, None) {
        Ok(()) => panic!("slot {}'s key opened slot {}", c1.slot, c0.slot),
        Err(e) => assert_eq!(e.0, REM_ACCESS_ERR, "{e}"),
    }
    drop(h);

    // 2. A slot's key stops working once a frame has landed in it.
    let mut h = open(2);
    let c0 = h.credits[0];
    let to0 = at(&h, c0.slot);
    write_and_wait(&mut h.ep, &h.mem, frame_len as u32, to0, c0.rkey, Some(u32::from(c0.slot)))
        .expect("chunk 0 written into its granted slot");
    // The replica invalidates the slot's window before it reads the chunk; its next CREDIT or
    // ACK comes after.
    let f = wire::read_frame(&mut h.s).unwrap_or_else(|e| panic!("no CREDIT or ACK: {e}\n{}", server.log()));
    assert!(matches!(f.header.kind, Kind::Credit | Kind::Ack), "unexpected {}\n{}", f.header.kind.name(), server.log());
    match write_and_wait(&mut h.ep, &h.mem, 4096, to0, c0.rkey, None) {
        Ok(()) => panic!("a write with the key of a grant that had ended landed in slot {}", c0.slot),
        Err(e) => assert_eq!(e.0, REM_ACCESS_ERR, "{e}"),
    }
    drop(h);

    // Neither push published anything.
    for v in ["1", "2"] {
        assert!(!server.root().join("ckpt").join(v).exists(), "version {v} published\n{}", server.log());
    }
}

/// The second rail of the guest (rxe_w0 198.18.2.1 for replicas, rxe_w1 198.18.2.2 for the
/// pusher): (replica rails, pusher rails), each rail 0 first.
fn rails() -> Option<([String; 2], [String; 2])> {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let (Some(ip), Some(ip2), Some(peer), Some(peer2)) =
        (get("RXEVM_IP"), get("RXEVM_IP2"), get("RXEVM_PEER_IP"), get("RXEVM_PEER_IP2"))
    else {
        let test = std::thread::current().name().map(|n| format!("rdma::{n}")).unwrap_or_else(|| "rdma".into());
        skip(&test, "the guest has no second rail (RXEVM_IP2 unset: scripts/rxe-vm.sh --net veth builds it)");
        return None;
    };
    Some(([ip, ip2], [peer, peer2]))
}

/// A replica listening on rail 0 with both rails, no device named: each lane's queue pair goes
/// on the device whose GID is that lane's address.
fn serve_on_rails(rails: &[String; 2], root: &Path, extra: &[&str]) -> Server {
    let mut cmd = shardcast();
    cmd.args(["serve", "--listen", &format!("{}:0", rails[0]), "--rail", &rails[0], "--rail", &rails[1], "--root"])
        .arg(root)
        .args(extra);
    Server::start_with(cmd, root)
}

/// A push of `lanes` RDMA lanes from the pusher's two rails through `servers`.
fn push_on_rails(
    rails: &[String; 2],
    src: &Path,
    servers: &[&Server],
    name: &str,
    lanes: u8,
    extra: &[&str],
) -> Command {
    let to: Vec<String> = servers.iter().map(|s| s.addr().to_string()).collect();
    let mut cmd = shardcast();
    cmd.arg("push")
        .arg(src)
        .args(["--name", name, "--version", "1", "--to", &to.join(",")])
        .args(["--transport", "rdma", "--lanes", &lanes.to_string(), "--json"])
        .args(["--rail", &rails[0], "--rail", &rails[1]])
        .args(extra);
    cmd
}

/// `--rdma-device D0 --rdma-device D1 --gid-index G0 --gid-index G1` for the replicas' side
/// and for the pusher's side of the guest's two rails.
fn rail_devices() -> (Vec<String>, Vec<String>) {
    let get = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} unset in the guest"));
    let args = |dev: &str, gid: &str| {
        let (d, g) = ([get(dev), get(&format!("{dev}2"))], [get(gid), get(&format!("{gid}2"))]);
        let mut a = Vec::new();
        for x in &d {
            a.extend(["--rdma-device".to_string(), x.clone()]);
        }
        for x in &g {
            a.extend(["--gid-index".to_string(), x.clone()]);
        }
        a
    };
    (args("RXEVM_DEV", "RXEVM_GID"), args("RXEVM_PEER_DEV", "RXEVM_PEER_GID"))
}

/// Two RDMA lanes (one per rail), then three (rail 0 carries two queue pairs), over the guest's
/// two rails through the same chain of two replicas with small pools (8 slots shared by the
/// lanes' grants, granted, written and granted again many times). Each push: identical bytes on
/// both replicas, every lane of the first hop carried chunks and ran RDMA (`push --json`), and
/// each replica received on a queue pair per lane, on both rails' devices (its log names them);
/// the relay forwards lane k on its own lane k. The tail names its devices per rail
/// (`--rdma-device` twice), and so does the pusher for three lanes: with one device taken for
/// every lane, the tail would receive nothing on rail 1's.
#[test]
fn rdma_two_and_three_lanes_on_two_rails_through_two_replicas() {
    let Some(_) = rxe() else { return };
    let Some((replica_rails, pusher_rails)) = rails() else { return };
    let t = tempdir();
    // The tail names its devices and GID indexes, one per rail (`--rdma-device` and
    // `--gid-index` twice); the relay finds its own by the lanes' addresses.
    let (named, pusher_named) = rail_devices();
    let named: Vec<&str> = named.iter().map(String::as_str).collect();
    let servers: Vec<Server> = (0..2)
        .map(|i| {
            let mut extra = vec!["--pool-mb", "2"];
            if i == 1 {
                extra.extend(&named);
            }
            serve_on_rails(&replica_rails, &t.path().join(format!("r{i}")), &extra)
        })
        .collect();
    let refs: Vec<&Server> = servers.iter().collect();
    let mut seen = 0;
    for lanes in [2u8, 3] {
        let src = t.path().join(format!("src{lanes}"));
        tree(&src, &[6 * MIB + 3, 2 * MIB, 5], 60 + u64::from(lanes));
        let name = format!("lanes{lanes}");
        // The three-lane push names the pusher's devices per rail (lane 2 is on rail 0 again).
        let mut extra = vec!["--chunk-size", "256K", "--pool-mb", "2"];
        if lanes == 3 {
            extra.extend(pusher_named.iter().map(String::as_str));
        }
        let mut cmd = push_on_rails(&pusher_rails, &src, &refs, &name, lanes, &extra);
        let out = finish(&mut cmd, Duration::from_secs(150), &refs);
        assert_eq!(code(&out), 0, "{lanes} lanes\n{}\n{}", show_output(&out), logs(&refs));
        let report = parse_json(&out);
        let transports: Vec<&str> = report["lane_transports"]
            .as_array()
            .expect("lane_transports")
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(transports, vec!["rdma"; usize::from(lanes)], "every lane of the first hop runs RDMA\n{report}");
        let chunks: Vec<u64> = report["lane_chunks"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(chunks.len(), usize::from(lanes), "{report}");
        assert!(chunks.iter().all(|&c| c > 0), "a lane carried no chunk: {chunks:?}\n{report}");
        seen += usize::from(lanes);
        for s in &servers {
            published(s, &src, &name, 1);
            let log = s.log();
            let receiving: Vec<&str> = log.lines().filter(|l| l.contains("hop transport: rdma (receiving)")).collect();
            assert_eq!(receiving.len(), seen, "one RDMA queue pair per lane of each push\n{log}");
            // Lane 0 and the lanes on rail 0 on rxe_v0, those on rail 1 on rxe_w0.
            for dev in ["rxe_v0", "rxe_w0"] {
                assert!(receiving.iter().any(|l| l.contains(dev)), "no lane received on {dev}\n{log}");
            }
        }
    }
}

/// The primary spreads chunks over its RDMA lanes as they become ready, one per lane per round
/// (each lane that holds a credit), even when lane 0 alone holds credits enough for the whole
/// push: 16 chunks of 1 MiB into a 64 MiB pool (32 slots granted per lane). Drained lane by
/// lane, lane 0 took every chunk as it became ready and lane 1 carried none.
#[test]
fn rdma_lanes_share_the_chunks_when_one_lane_could_take_them_all() {
    let Some(_) = rxe() else { return };
    let Some((replica_rails, pusher_rails)) = rails() else { return };
    let t = tempdir();
    let server = serve_on_rails(&replica_rails, &t.path().join("r0"), &["--pool-mb", "64"]);
    let src = t.path().join("src");
    tree(&src, &[16 * MIB], 90);
    let extra = ["--chunk-size", "1M", "--pool-mb", "64"];
    let mut cmd = push_on_rails(&pusher_rails, &src, &[&server], "spread", 2, &extra);
    let out = finish(&mut cmd, Duration::from_secs(120), &[&server]);
    assert_eq!(code(&out), 0, "{}\n{}", show_output(&out), server.log());
    let report = parse_json(&out);
    let chunks: Vec<u64> = report["lane_chunks"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(chunks.iter().sum::<u64>(), 16, "{report}");
    assert!(chunks.iter().all(|&c| c >= 4), "the lanes did not share the chunks: {chunks:?}\n{report}");
    published(&server, &src, "spread", 1);
}

/// The tail dies in the middle of a two-lane RDMA push: the push fails naming it, and
/// nothing is published there.
#[test]
fn rdma_lanes_peer_disappears_mid_transfer() {
    let Some(_) = rxe() else { return };
    let Some((replica_rails, pusher_rails)) = rails() else { return };
    let t = tempdir();
    let src = t.path().join("src");
    tree(&src, &[32 * MIB], 80);
    let a = serve_on_rails(&replica_rails, &t.path().join("r0"), &[]);
    let mut b = serve_on_rails(&replica_rails, &t.path().join("r1"), &[]);
    let mut cmd = push_on_rails(&pusher_rails, &src, &[&a, &b], "gone", 2, &[]);
    kill_tail_mid_push(&mut cmd, &a, &mut b);
    // The push's first session into the relay (its log span, `push{name=.. peer=..}`) received
    // on two RDMA lanes. The primary may then repair the chain around the dead tail: that
    // second session into the relay logs its own lanes under its own span.
    let log = a.log();
    let first = log.lines().find(|l| l.contains("receiving bytes=")).expect("the relay received the push");
    let span = &first[first.find("push{").expect("a push span")..first.find("}:").expect("a push span")];
    let lanes = log.lines().filter(|l| l.contains(span) && l.contains("hop transport: rdma (receiving)")).count();
    assert_eq!(lanes, 2, "the relay did not receive on two RDMA lanes ({span})\n{log}");
}

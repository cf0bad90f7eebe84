//! Disk space a replica holds for others: free space reserved by the pushes it is receiving,
//! and the partial stagings it keeps for resumes (expired by age and by total size).

mod util;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use shardcast::manifest::Manifest;
use shardcast::wire::{self, Kind};
use util::*;

const MIB: u64 = 1 << 20;

/// A tmpfs of `mib` MiB mounted on a new temp dir (None when this is not root or mount fails:
/// the test says it was skipped).
fn small_fs(mib: u64) -> Option<(tempfile::TempDir, Unmount)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip("space", "not running as root: cannot mount a small tmpfs");
        return None;
    }
    let mnt = tempdir();
    let o =
        Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"]).arg(mnt.path()).output();
    match o {
        Ok(o) if o.status.success() => {
            let guard = Unmount(mnt.path().to_path_buf());
            Some((mnt, guard))
        }
        Ok(o) => {
            skip("space", &format!("mount tmpfs failed: {}", String::from_utf8_lossy(&o.stderr).trim()));
            None
        }
        Err(e) => {
            skip("space", &format!("cannot run mount: {e}"));
            None
        }
    }
}

/// Opens a push of one `size`-byte file by hand and leaves it accepted, sending no chunk: the
/// replica holds the session (and what it reserved) until the connection closes.
fn hold_a_push(addr: &str, name: &str, size: u64) -> TcpStream {
    let manifest = Manifest::plan_for_files(1 << 20, &[("held.bin", size)]).unwrap().0;
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let hello = plain_hello(name, 1, addr, Vec::new(), manifest);
    wire::write_frame(&mut s, Kind::Hello, 0, &hello.encode()).unwrap();
    let f = wire::read_frame(&mut s).unwrap();
    assert_eq!(f.header.kind, Kind::Accept, "the held push was refused: {:?}", wire::decode_reports(&f.payload));
    s
}

#[test]
fn a_push_that_does_not_fit_beside_the_pushes_being_received_is_refused_up_front() {
    let Some((mnt, _unmount)) = small_fs(64) else { return };
    let root = mnt.path().join("root");
    let c = Cluster::builder().root(0, &root).start(1);
    let t = tempdir();
    let f = t.path().join("forty.bin");
    write_random_file(&f, 40 * MIB, 7);
    // 40 MiB being received (nothing written yet), 64 MiB free: a second 40 MiB push does not
    // fit beside it.
    let held = hold_a_push(&c.addr(0), "first", 40 * MIB);
    let out = c.push(&f, "second", 1, &[]);
    assert_eq!(code(&out), 1, "the second push was accepted\n{}\n{}", show_output(&out), c.logs());
    assert_error_line(&out, &["not enough free space", "reserved by pushes being received", &c.addr(0)]);
    assert!(!root.join("second/1.manifest").exists(), "the refused push published");
    // Once the first push is gone its reservation is too, and the same push fits.
    drop(held);
    let mut ok = None;
    assert!(
        wait_until(Duration::from_secs(30), || {
            let out = c.push(&f, "second", 1, &[]);
            let done = code(&out) == 0;
            ok = Some(out);
            done
        }),
        "the push never fitted after the held one ended\n{}\n{}",
        show_output(ok.as_ref().unwrap()),
        c.logs()
    );
    c.assert_published(&f, "second", 1);
}

/// A partial staging as a push that did not finish leaves it: a journal and a data file of
/// `mib` MiB of real blocks, last changed `age` ago.
fn make_partial(root: &Path, key: &str, mib: u64, age: Duration) -> PathBuf {
    let dir = root.join(".partial").join(key);
    std::fs::create_dir_all(dir.join("data")).unwrap();
    write_random_file(&dir.join("data/model.bin"), mib * MIB, 3);
    std::fs::write(dir.join("journal"), b"SCJOURN1\0\0\0\0\0\0\0\0").unwrap();
    let when = std::time::SystemTime::now() - age;
    for p in [dir.join("journal"), dir.clone()] {
        std::fs::File::open(&p).unwrap().set_modified(when).unwrap();
    }
    dir
}

/// A gauge's value in a server's metrics.
fn gauge(maddr: &str, name: &str) -> u64 {
    let mut s = TcpStream::connect(maddr).expect("connect to the metrics port");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    std::io::Write::write_all(&mut s, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut s, &mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in the metrics:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

const HOUR: Duration = Duration::from_secs(3600);

#[test]
fn partials_expire_by_age_at_start_and_at_each_push_and_are_counted() {
    let root = tempdir();
    let old = make_partial(root.path(), "old@1", 1, 30 * HOUR);
    let fresh = make_partial(root.path(), "fresh@1", 2, Duration::ZERO);
    let metrics = ["--metrics".to_string(), "127.0.0.1:0".to_string()];
    let server = Server::start(root.path(), &metrics, &[]);
    // Default age limit 24 h: the 30 h old one goes at start, the fresh one stays.
    assert!(!old.exists(), "a partial 30 h old survived the start\n{}", server.log());
    assert!(fresh.exists(), "a fresh partial was removed\n{}", server.log());
    let m = metrics_addr(&server.log());
    assert_eq!(gauge(&m, "shardcast_partials"), 1);
    let bytes = gauge(&m, "shardcast_partial_bytes");
    assert!((2 * MIB..3 * MIB).contains(&bytes), "partial bytes {bytes}, the fresh one holds 2 MiB");
    // One that grows old while the server runs goes at the next push.
    let stale = make_partial(root.path(), "stale@1", 1, 25 * HOUR);
    let src = tempdir();
    make_small_tree(src.path(), 4);
    let mut push = shardcast();
    push.arg("push").arg(src.path()).args(["--name", "other", "--version", "1", "--to"]);
    let out = run(push.arg(server.addr().to_string()));
    assert_eq!(code(&out), 0, "{}", show_output(&out));
    assert!(!stale.exists(), "a partial 25 h old survived a push\n{}", server.log());
    assert!(fresh.exists());
    assert_eq!(gauge(&m, "shardcast_partials"), 1);
}

#[test]
fn partials_beyond_the_size_cap_are_removed_oldest_first() {
    let root = tempdir();
    let oldest = make_partial(root.path(), "a@1", 2, 3 * HOUR);
    let middle = make_partial(root.path(), "b@1", 2, 2 * HOUR);
    let newest = make_partial(root.path(), "c@1", 2, HOUR);
    let args = ["--partial-max-mb", "5", "--partial-max-age-hours", "0", "--metrics", "127.0.0.1:0"].map(String::from);
    let server = Server::start(root.path(), &args, &[]);
    assert!(!oldest.exists(), "6 MiB of partials with a 5 MiB cap: the oldest stayed\n{}", server.log());
    assert!(middle.exists() && newest.exists(), "a newer partial was removed\n{}", server.log());
    assert_eq!(gauge(&metrics_addr(&server.log()), "shardcast_partials"), 2);
}

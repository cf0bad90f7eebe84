//! Disk space a replica holds for others: free space reserved by the pushes it is receiving.

mod util;

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use shardcast::manifest::Manifest;
use shardcast::wire::{self, Hello, Kind, Mode};
use util::*;

const MIB: u64 = 1 << 20;

/// The stderr has an `error:` line that contains every needle (case-sensitive).
fn assert_error_line(out: &std::process::Output, needles: &[&str]) {
    let lines = error_lines(out);
    assert!(
        lines.iter().any(|l| needles.iter().all(|n| l.contains(n))),
        "expected an `error:` line containing {needles:?}; got {lines:?}\n{}",
        show_output(out)
    );
}

struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.0).status().map(|s| s.success()).unwrap_or(false);
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// A tmpfs of `mib` MiB mounted on a new temp dir (None when this is not root or mount fails:
/// the test says it was skipped).
fn small_fs(mib: u64) -> Option<(tempfile::TempDir, Unmount)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: not running as root");
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
            eprintln!("skipped: mount tmpfs failed: {}", String::from_utf8_lossy(&o.stderr).trim());
            None
        }
        Err(e) => {
            eprintln!("skipped: cannot run mount: {e}");
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
    let hello = Hello {
        name: name.into(),
        version: 1,
        mode: Mode::Sync,
        transport: shardcast::transport::Transport::Tcp,
        keep: 0,
        flags: wire::HelloFlags::default(),
        you: addr.into(),
        downstream: Vec::new(),
        manifest,
        wants: Vec::new(),
    };
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

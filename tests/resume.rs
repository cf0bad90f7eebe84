//! Resume: a replica journals the chunks it has written durably; a push that failed there (its
//! process killed mid-push, then restarted) is repeated with `--incremental` and only what is
//! missing travels again.

mod util;

use std::time::Duration;

use util::*;

const MIB: u64 = 1 << 20;

#[test]
fn a_replica_killed_mid_push_resumes_after_a_restart() {
    let root = tempdir();
    let metrics = ["--metrics".to_string(), "127.0.0.1:0".to_string()];
    let mut first = Server::start(root.path(), &metrics, &[]);
    let src = tempdir();
    let size = 768 * MIB;
    write_random_file(&src.path().join("ckpt.bin"), size, 11);
    let push = |addr: &str| {
        let mut c = shardcast();
        c.arg("push").arg(src.path()).args([
            "--name",
            "big",
            "--version",
            "7",
            "--to",
            addr,
            "--chunk-size",
            "1M",
            "--incremental",
            "--json",
        ]);
        c
    };

    // Kill the replica once about half has arrived.
    let m1 = metrics_addr(&first.log());
    let mut p = Running::spawn(&mut push(&first.addr().to_string()));
    let half = wait_until(Duration::from_secs(60), || received(&m1) >= size / 2 || p.try_wait().is_some());
    let at_kill = received(&m1);
    assert!(half && p.try_wait().is_none(), "the push ended before the replica could be killed");
    first.kill();
    let out = p.finish(Duration::from_secs(60));
    assert_ne!(code(&out), 0, "the push cannot succeed without its replica\n{}", show_output(&out));
    assert!(!root.path().join("big/7").exists(), "a killed push published something");

    // The restarted replica keeps what it had journaled, and the repeated push sends the rest.
    let second = Server::start(root.path(), &metrics, &[]);
    assert!(root.path().join(".partial/big@7/journal").is_file(), "no partial kept\n{}", second.log());
    let m2 = metrics_addr(&second.log());
    let out = run_timeout(&mut push(&second.addr().to_string()), Duration::from_secs(120));
    assert_eq!(code(&out), 0, "{}\n{}", show_output(&out), second.log());
    assert!(second.log().contains("resuming a partial staging"), "{}", second.log());
    let resent = received(&m2);
    // At most what had not arrived, plus what was in flight: one pool (64 MiB) and one journal
    // batch (32 chunks) that were not durable yet.
    let bound = size - at_kill + 64 * MIB + 32 * MIB;
    eprintln!("killed at {} MiB received; resent {} MiB (bound {} MiB)", at_kill >> 20, resent >> 20, bound >> 20);
    assert!(resent <= bound, "resent {resent} bytes, more than the missing part plus a pool ({bound})");
    assert!(resent < size, "everything was sent again");
    assert_tree_identical(src.path(), &root.path().join("big/7"));
    let v = verify(root.path(), "big", &[]);
    assert_eq!(code(&v), 0, "{}", show_output(&v));
    assert!(!root.path().join(".partial/big@7").exists(), "the partial was not taken over");
}

#[test]
fn an_ordinary_push_does_not_trust_a_partial() {
    // Without digests up front a partial cannot be checked: it is dropped and everything sent.
    let c = Cluster::builder().serve_arg("--metrics").serve_arg("127.0.0.1:0").start(1);
    let src = tempdir();
    write_random_file(&src.path().join("a.bin"), 3 * MIB, 1);
    let partial = c.root(0).join(".partial/x@1");
    std::fs::create_dir_all(partial.join("data")).unwrap();
    std::fs::write(partial.join("journal"), b"SCJOURN1garbage").unwrap();
    let out = c.push(src.path(), "x", 1, &["--chunk-size", "1M"]);
    c.assert_push_ok(&out);
    c.assert_published(src.path(), "x", 1);
    assert!(!partial.exists());
    assert_eq!(received(&metrics_addr(&c.log(0))), 3 * MIB);
}

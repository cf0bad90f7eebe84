//! Resume: a replica journals the chunks it has written durably; a push that failed there (its
//! process killed mid-push, then restarted) is repeated with `--incremental` and only what is
//! missing travels again.

mod lazyfs;
mod util;

use std::path::Path;
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
    // At most what had not arrived, plus what was in flight: one pool (64 MiB) and two journal
    // batches (32 chunks each) that were not durable yet: the one the journal thread is syncing
    // and the one filling behind it.
    let bound = size - at_kill + 64 * MIB + 2 * 32 * MIB;
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

/// The journal records of a partial staging: (entry, chunk index, digest).
fn journal_records(path: &std::path::Path) -> Vec<(u32, u64, u128)> {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"SCJOURN1", "not a journal: {}", path.display());
    let n = u64::from_le_bytes(bytes[8..16].try_into().unwrap()) as usize;
    bytes[16 + n..]
        .chunks_exact(28)
        .map(|r| {
            (
                u32::from_le_bytes(r[..4].try_into().unwrap()),
                u64::from_le_bytes(r[4..12].try_into().unwrap()),
                u128::from_le_bytes(r[12..].try_into().unwrap()),
            )
        })
        .collect()
}

#[test]
fn a_resume_does_not_trust_journaled_chunks_whose_bytes_changed() {
    // After a power loss a journaled file can come back as zeros; a resume must read the bytes
    // back and receive again what does not match its journaled digest.
    let root = tempdir();
    let metrics = ["--metrics".to_string(), "127.0.0.1:0".to_string()];
    let server = Server::start(root.path(), &metrics, &[]);
    let src = tempdir();
    let size = 512 * MIB;
    write_random_file(&src.path().join("ckpt.bin"), size, 12);
    let push = || {
        let mut c = shardcast();
        c.arg("push").arg(src.path()).args(["--name", "big", "--version", "3", "--to"]).arg(server.addr().to_string());
        c.args(["--chunk-size", "1M", "--incremental", "--json"]);
        c
    };
    // The pusher dies part-way: the replica keeps what it journaled as a partial.
    let m = metrics_addr(&server.log());
    let mut p = Running::spawn(&mut push());
    let part = wait_until(Duration::from_secs(60), || received(&m) >= 64 * MIB || p.try_wait().is_some());
    assert!(part && p.try_wait().is_none(), "the push ended before it could be killed");
    drop(p);
    let journal = root.path().join(".partial/big@3/journal");
    assert!(
        wait_until(Duration::from_secs(30), || journal.is_file()),
        "no partial kept after the pusher died\n{}",
        server.log()
    );
    let records = journal_records(&journal);
    assert!(records.len() >= 2, "too few journaled chunks: {}", records.len());
    // Two journaled chunks lose their bytes: one zeroed (a file recreated after a power loss),
    // one with a flipped byte.
    let data = root.path().join(".partial/big@3/data/ckpt.bin");
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&data).unwrap();
    let (_, zeroed, _) = records[0];
    let (_, flipped, _) = records[records.len() - 1];
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![0u8; MIB as usize], zeroed * MIB).unwrap();
    let mut b = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, flipped * MIB + 77).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[b[0] ^ 0x20], flipped * MIB + 77).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let before = received(&m);
    let out = run_timeout(&mut push(), Duration::from_secs(120));
    assert_eq!(code(&out), 0, "{}\n{}", show_output(&out), server.log());
    assert!(server.log().contains("resuming a partial staging"), "{}", server.log());
    assert_tree_identical(src.path(), &root.path().join("big/3"));
    let v = verify(root.path(), "big", &[]);
    assert_eq!(code(&v), 0, "{}", show_output(&v));
    // The damaged chunks travelled again; the rest of the journaled ones did not.
    let resent = received(&m) - before;
    assert!(resent >= size - (records.len() as u64 - 2) * MIB, "resent {resent}: the damaged chunks were not received");
    assert!(resent < size, "everything was sent again");
}

/// A replica whose upstream dies while its staging writes are still in flight (its disk
/// stalled) journals those chunks once the writes complete: they were verified before they were
/// written, and the resume (a repaired chain's next attempt, above all) must not send them again.
/// Before the fix the session drained those writes and forgot them: no partial was kept, and the
/// repeated push sent everything.
///
/// The replica's pool (8 MiB) is half the file, so with the disk stalled the pusher runs out of
/// credits and cannot have sent END when it is killed: the replica cannot finish (an earlier
/// form of this test fitted the whole file in the pool, and the replica sometimes had END and
/// published before it noticed its upstream gone; that case is the next test).
#[test]
fn writes_in_flight_when_the_upstream_dies_are_journaled() {
    const TEST: &str = "resume::writes_in_flight_when_the_upstream_dies_are_journaled";
    let Some((work, (_session, fs))) = lazy_mount(TEST) else { return };
    let mnt = work.path().join("mnt");
    let extra = ["--metrics", "127.0.0.1:0", "--pool-mb", "8"].map(String::from);
    let server = Server::start(&mnt, &extra, &[]);
    let m = metrics_addr(&server.log());
    let src = tempdir();
    let size = 16 * MIB;
    write_random_file(&src.path().join("ckpt.bin"), size, 12);
    let push = || {
        let mut c = shardcast();
        c.arg("push").arg(src.path()).args(["--name", "w", "--version", "3", "--to"]);
        c.arg(server.addr().to_string()).args(["--chunk-size", "1M", "--incremental", "--json"]);
        c
    };

    fs.hold_writes(true);
    let mut p = Running::spawn(&mut push());
    // Chunks in the pool, their writes held: at most the pool's worth, so no END.
    let arrived = wait_until(Duration::from_secs(60), || received(&m) >= 4 * MIB || p.try_wait().is_some());
    assert!(arrived && p.try_wait().is_none(), "no chunks arrived while the disk stalled\n{}", server.log());
    drop(p); // SIGKILL: the pusher dies mid-push.
    // The session sees its upstream gone; its writes finish once the disk moves again.
    fs.hold_writes(false);
    let journal = mnt.join(".partial/w@3/journal");
    let kept = wait_until(Duration::from_secs(60), || {
        journal.is_file() && server.log().contains("push abandoned, nothing published")
    });
    assert!(kept, "no partial kept after the upstream died with writes in flight\n{}", server.log());
    let held = journal_records(&journal).len() as u64;
    assert!((4..16).contains(&held), "{held} chunks journaled, of the 4 to 8 that arrived\n{}", server.log());
    assert!(!mnt.join("w/3").exists(), "published without END");

    let before = received(&m);
    let out = run_timeout(&mut push(), Duration::from_secs(120));
    assert_eq!(code(&out), 0, "{}\n{}", show_output(&out), server.log());
    let resent = received(&m) - before;
    assert_eq!(resent, size - held * MIB, "the {held} journaled chunks were sent again\n{}", server.log());
    assert_tree_identical(src.path(), &mnt.join("w/3"));
}

/// A replica that published and then lost its upstream before its RESULT went there (the
/// connection from the primary reset while the next replica's disk stalled) keeps the version,
/// and says so: its audit log records `published`, its metrics count a published push, and its
/// log does not claim that nothing was published. Before the fix the end of the session was
/// told as "push abandoned, nothing published" and audited as `upstream_lost`, with the version
/// on disk.
///
/// The primary reaches r1 through a proxy that resets r1's side (SO_LINGER 0) once r1 has
/// published, so that r1's RESULT cannot go anywhere. (Killing the primary instead left it to
/// chance: a killed process's socket closes with a FIN when nothing was unread, and r1's RESULT
/// then went into its send buffer without an error.)
#[test]
fn a_replica_that_published_before_its_upstream_died_reports_published() {
    use std::os::fd::AsRawFd;
    const TEST: &str = "resume::a_replica_that_published_before_its_upstream_died_reports_published";
    let Some((work, (_session, fs))) = lazy_mount(TEST) else { return };
    let (r1_root, audit) = (work.path().join("r1"), work.path().join("audit.jsonl"));
    std::fs::create_dir_all(&r1_root).unwrap();
    let r1_args = ["--metrics", "127.0.0.1:0", "--audit-log", audit.to_str().unwrap()].map(String::from);
    let r1 = Server::start(&r1_root, &r1_args, &[]);
    let r2 = Server::start(&work.path().join("mnt"), &[], &[]);
    let src = tempdir();
    write_random_file(&src.path().join("ckpt.bin"), 4 * MIB, 13);

    // The proxy's connections (primary side, r1 side) and its two copying threads.
    type Link = (std::net::TcpStream, std::net::TcpStream, Vec<std::thread::JoinHandle<()>>);
    let link: std::sync::Arc<std::sync::Mutex<Option<Link>>> = Default::default();
    let slot = std::sync::Arc::clone(&link);
    let via = proxy(r1.addr().to_string(), move |first, client, server| {
        let copy = |from: &std::net::TcpStream, to: &std::net::TcpStream| {
            let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from, &mut to);
            })
        };
        let threads = vec![copy(&client, &server), copy(&server, &client)];
        if first {
            *slot.lock().unwrap() = Some((client, server, threads));
        }
    });

    // r2's disk stalls: r1 publishes, then waits for r2's result (a sync push).
    fs.hold_writes(true);
    let mut push = shardcast();
    push.arg("push").arg(src.path()).args(["--name", "p", "--version", "1", "--chunk-size", "1M", "--to"]);
    push.arg(format!("{via},{}", r2.addr()));
    let mut p = Running::spawn(&mut push);
    let published = wait_until(Duration::from_secs(60), || r1.log().contains("published name=p version=1"));
    assert!(published && p.try_wait().is_none(), "r1 did not publish while r2 stalled\n{}", r1.log());
    // The primary goes (so that it cannot repair the chain through the proxy), then r1's
    // connection from upstream is reset: linger 0, both sides shut so that the copying
    // threads end and drop their handles, and the last close sends the RST.
    drop(p);
    let (client, server, threads) = link.lock().unwrap().take().expect("the proxy carried the push");
    let off = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket descriptor, and a linger struct of the size given.
    let rc = unsafe {
        libc::setsockopt(
            server.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const off).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    for s in [&client, &server] {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    threads.into_iter().for_each(|t| t.join().unwrap());
    drop((client, server));
    fs.hold_writes(false);

    let lines = || -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect()
    };
    assert!(wait_until(Duration::from_secs(60), || !lines().is_empty()), "no audit record\n{}", r1.log());
    let l = lines();
    assert_eq!(l[0]["outcome"], "published", "{l:?}\n{}", r1.log());
    assert!(l[0]["reason"].as_str().is_some_and(|r| r.contains("upstream left")), "{l:?}\n{}", r1.log());
    assert!(!r1.log().contains("nothing published"), "{}", r1.log());
    let m = metrics_addr(&r1.log());
    assert_eq!(metric_sum(&m, "shardcast_pushes_total{outcome=\"published\"}"), 1, "{}", r1.log());
    assert_eq!(metric_sum(&m, "shardcast_pushes_total{outcome=\"upstream_lost\"}"), 0, "{}", r1.log());
    assert_tree_identical(src.path(), &r1_root.join("p/1"));
    let v = verify(&r1_root, "p", &[]);
    assert_eq!(code(&v), 0, "{}", show_output(&v));
}

/// A relay (r1, root in `work`) and a tail (r2, root the lazyfs mount) with 1 s idle timeouts,
/// and a push of 4 MiB (`seed`) of `name` to them with `extra` arguments (with `key`, a cluster
/// key everywhere; `tail`: more arguments for the tail's serve), under way once the tail's
/// final sync waits for its held fsyncs. Returns (r1's root, r1, r2, the source, the push).
fn push_until_the_tail_syncs(
    work: &Path,
    fs: &lazyfs::Handle,
    name: &str,
    seed: u64,
    (extra, key, tail): (&[&str], Option<&Path>, &[&str]),
) -> (std::path::PathBuf, Server, Server, tempfile::TempDir, Running) {
    let idle = ["--idle-timeout", "1"].map(String::from);
    let env: Vec<(String, String)> =
        key.map(|k| ("SHARDCAST_KEY_FILE".to_owned(), k.to_str().unwrap().to_owned())).into_iter().collect();
    let r1_root = work.join("r1");
    std::fs::create_dir_all(&r1_root).unwrap();
    let r1 = Server::start(&r1_root, &idle, &env);
    let tail: Vec<String> = idle.iter().cloned().chain(tail.iter().map(|a| a.to_string())).collect();
    let r2 = Server::start(&work.join("mnt"), &tail, &env);
    let src = tempdir();
    write_random_file(&src.path().join("ckpt.bin"), 4 * MIB, seed);
    fs.hold_fsyncs(true);
    let mut push = shardcast();
    push.arg("push").arg(src.path()).args(["--name", name, "--version", "1", "--chunk-size", "1M"]);
    push.args(["--idle-timeout", "1", "--json"]).args(extra);
    push.arg("--to").arg(format!("{},{}", r1.addr(), r2.addr())).envs(env);
    let mut p = Running::spawn(&mut push);
    let syncing = wait_until(Duration::from_secs(60), || fs.fsyncs_waited() > 0 || p.try_wait().is_some());
    assert!(syncing && p.try_wait().is_none(), "the tail never synced\n{}\n{}", r1.log(), r2.log());
    (r1_root, r1, r2, src, p)
}

/// The tail's final sync (its disk slow to flush) lasts 3 s, three times every node's idle
/// timeout: the nodes before it wait for its result instead of giving up on it. The syncing
/// node tells upstream it is alive (its last ACK again) while its sync runs on a thread, and the
/// relay does the same while it waits; before, the tail's session thread sat in fsync, sent
/// nothing, and the relay and the primary each reported `no progress for 1 s`. With a cluster
/// key and encryption: the keepalives carry their MACs like any ACK.
#[test]
fn a_replica_whose_final_sync_outlasts_the_idle_timeout_is_waited_for() {
    const TEST: &str = "resume::a_replica_whose_final_sync_outlasts_the_idle_timeout_is_waited_for";
    let Some((work, (_session, fs))) = lazy_mount(TEST) else { return };
    let key = key_file(work.path(), "cluster.key", "keepalives-carry-their-macs-0123456789");
    let (r1_root, r1, r2, src, mut p) =
        push_until_the_tail_syncs(work.path(), &fs, "s", 14, (&["--encrypt"], Some(&key), &[]));
    std::thread::sleep(Duration::from_secs(3));
    fs.hold_fsyncs(false);
    assert!(p.wait_timeout(Duration::from_secs(60)).is_some(), "push hangs\n{}\n{}", r1.log(), r2.log());
    let out = p.finish(Duration::from_secs(5));
    assert_eq!(code(&out), 0, "{}\n{}\n{}", show_output(&out), r1.log(), r2.log());
    assert_eq!(parse_json(&out)["repairs"], 0, "{}", show_output(&out));
    assert_tree_identical(src.path(), &r1_root.join("s/1"));
    assert_tree_identical(src.path(), &work.path().join("mnt/s/1"));
}

/// The sibling: a tail that hangs while it syncs (SIGSTOP: its connections stay open, it sends
/// nothing) is still given up on after the idle timeout. The keepalives come from a live session
/// loop only, and the relay's own keepalives upstream do not count as progress for its deadline.
#[test]
fn a_replica_that_hangs_in_its_final_sync_is_still_given_up_on() {
    const TEST: &str = "resume::a_replica_that_hangs_in_its_final_sync_is_still_given_up_on";
    let Some((work, (_session, fs))) = lazy_mount(TEST) else { return };
    let (r1_root, r1, r2, src, mut p) =
        push_until_the_tail_syncs(work.path(), &fs, "h", 15, (&["--no-repair"], None, &[]));
    let pid = r2.pid().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let ended = p.wait_timeout(Duration::from_secs(30)).is_some();
    let _ = std::process::Command::new("kill").args(["-CONT", &pid]).status();
    fs.hold_fsyncs(false);
    assert!(ended, "the push waits for ever on a hung replica\n{}\n{}", r1.log(), r2.log());
    relay_published_and_tail_stalled(p, src.path(), &r1_root.join("h/1"), &r2);
}

/// The push `p` ended with the relay published (its copy at `copy` equal to `src`) and the tail
/// failed as `stalled`; returns the tail's error message.
fn relay_published_and_tail_stalled(p: Running, src: &Path, copy: &Path, tail: &Server) -> String {
    let out = p.finish(Duration::from_secs(5));
    let j = parse_json(&out);
    let reps = j["replicas"].as_array().unwrap_or_else(|| panic!("no replicas in {j}\n{}", tail.log()));
    let status: Vec<&str> = reps.iter().map(|r| r["status"].as_str().unwrap_or("?")).collect();
    assert_eq!(status, ["published", "failed"], "{j}\n{}", tail.log());
    assert_eq!(reps[1]["error"]["kind"].as_str(), Some("stalled"), "{j}");
    assert_tree_identical(src, copy);
    reps[1]["error"]["message"].as_str().unwrap_or("").to_owned()
}

/// A tail whose disk never finishes its final sync (held past its `--sync-timeout` of 1 s) fails
/// the push there, saying so, instead of keeping the chain waiting on its keepalives for ever:
/// the relay before it stays published and the push ends.
#[test]
fn a_replica_whose_disk_hangs_in_its_final_sync_fails_after_the_sync_timeout() {
    const TEST: &str = "resume::a_replica_whose_disk_hangs_in_its_final_sync_fails_after_the_sync_timeout";
    let Some((work, (_session, fs))) = lazy_mount(TEST) else { return };
    let (r1_root, r1, r2, src, mut p) =
        push_until_the_tail_syncs(work.path(), &fs, "d", 17, (&["--no-repair"], None, &["--sync-timeout", "1"]));
    let ended = p.wait_timeout(Duration::from_secs(30)).is_some();
    fs.hold_fsyncs(false);
    assert!(ended, "the push waits for ever on a hung disk\n{}\n{}", r1.log(), r2.log());
    let why = relay_published_and_tail_stalled(p, src.path(), &r1_root.join("d/1"), &r2);
    assert!(why.contains("did not finish syncing") && why.contains("--sync-timeout"), "{why}");
}

/// A resuming push (a repair, or a repeat) of a version that an earlier session is publishing
/// at that moment, with the same manifest: the replica waits for that session and answers that
/// it holds the version. Before, the resuming push passed the "already held" check before the
/// manifest was written, then found the version published once the earlier session let go, and
/// was refused `version_exists`: a repair that met a replica finishing its publish failed.
#[test]
fn a_resuming_push_meeting_the_same_version_being_published_finds_it_held() {
    const TEST: &str = "resume::a_resuming_push_meeting_the_same_version_being_published_finds_it_held";
    let Some((work, (_session, fs))) = lazy_mount(TEST) else { return };
    let server = Server::start(&work.path().join("mnt"), &[], &[]);
    let src = tempdir();
    write_random_file(&src.path().join("ckpt.bin"), 2 * MIB, 16);
    let push = |extra: &[&str]| {
        let mut c = shardcast();
        c.arg("push").arg(src.path()).args(["--name", "q", "--version", "1", "--chunk-size", "1M", "--json"]);
        c.args(extra).arg("--to").arg(server.addr().to_string());
        c
    };
    // The first push stops in its publish: its data moved into q/1, its manifest not written.
    fs.hold_fsyncs_of_dir(Some("q"));
    let mut first = Running::spawn(&mut push(&[]));
    let publishing = wait_until(Duration::from_secs(60), || fs.fsyncs_waited() > 0 || first.try_wait().is_some());
    assert!(publishing && first.try_wait().is_none(), "the first push never published\n{}", server.log());
    let mut second = Running::spawn(&mut push(&["--incremental"]));
    std::thread::sleep(Duration::from_millis(500));
    fs.hold_fsyncs_of_dir(None);
    for (which, p) in [("first", &mut first), ("second", &mut second)] {
        assert!(p.wait_timeout(Duration::from_secs(60)).is_some(), "the {which} push hangs\n{}", server.log());
    }
    let out = first.finish(Duration::from_secs(5));
    assert_eq!(code(&out), 0, "{}\n{}", show_output(&out), server.log());
    let out = second.finish(Duration::from_secs(5));
    assert_eq!(code(&out), 0, "the resuming push failed\n{}\n{}", show_output(&out), server.log());
    let j = parse_json(&out);
    assert_eq!(j["replicas"][0]["already_held"], true, "{j}");
    assert_tree_identical(src.path(), &work.path().join("mnt/q/1"));
}

/// Mounts the FUSE filesystem at `<tempdir>/mnt`, or prints why this test is skipped.
fn lazy_mount(test: &str) -> Option<(tempfile::TempDir, (fuser::BackgroundSession, lazyfs::Handle))> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip(test, "mounting a FUSE filesystem with mount(2) needs root");
        return None;
    }
    if !Path::new("/dev/fuse").exists() {
        skip(test, "/dev/fuse is missing (no FUSE in this kernel or container)");
        return None;
    }
    let work = tempdir();
    let mnt = work.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    match lazyfs::mount(&mnt) {
        Ok(m) => Some((work, m)),
        Err(e) => {
            skip(test, &format!("cannot mount a FUSE filesystem here: {e}"));
            None
        }
    }
}

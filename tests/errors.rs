//! Every failure the CLI contract lists, provoked for real, with its exit code and message.

mod util;

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use util::*;

const MIB: u64 = 1 << 20;

/// No replica exposes NAME@V (no version dir, no manifest, no `current`).
fn assert_not_published(c: &Cluster, idx: &[usize], name: &str, v: u64) {
    for &i in idx {
        let set = c.root(i).join(name);
        assert!(!set.join(v.to_string()).exists(), "replica {i} has {name}/{v}: {:?}", names_or_empty(&set));
        assert!(!set.join(format!("{v}.manifest")).exists(), "replica {i} has {name}/{v}.manifest");
        assert!(fs::symlink_metadata(set.join("current")).is_err(), "replica {i} has {name}/current");
    }
}

fn names_or_empty(dir: &Path) -> Vec<String> {
    if dir.is_dir() { list_names(dir) } else { Vec::new() }
}

fn small_src() -> (tempfile::TempDir, PathBuf) {
    let t = tempdir();
    let d = t.path().join("src");
    make_small_tree(&d, 77);
    (t, d)
}

// ------------------------------------------------------------------------------------------
// unreachable / connection refused
// ------------------------------------------------------------------------------------------

#[test]
fn unreachable_single_replica() {
    let (_t, src) = small_src();
    let dead = dead_addr();
    let out = run(shardcast().args(["push"]).arg(&src).args(["--name", "x", "--version", "1", "--to", &dead]));
    assert_eq!(code(&out), 1, "{}", show_output(&out));
    assert_error_line(&out, &[&dead, "unreachable"]);
}

#[test]
fn unreachable_reports_connection_refused_and_json() {
    let (_t, src) = small_src();
    let dead = dead_addr();
    let out =
        run(shardcast().args(["push"]).arg(&src).args(["--name", "x", "--version", "1", "--to", &dead, "--json"]));
    assert_eq!(code(&out), 1, "{}", show_output(&out));
    let err = stderr_str(&out).to_lowercase();
    assert!(err.contains("connection refused"), "cause not named\n{}", show_output(&out));
    let j = parse_json(&out);
    assert_eq!(j["ok"], serde_json::Value::Bool(false), "{j}");
    assert_eq!(j["error"]["kind"].as_str(), Some("unreachable"), "{j}");
    assert_eq!(j["error"]["node"].as_str(), Some(dead.as_str()), "{j}");
    assert!(j["error"]["message"].as_str().is_some_and(|m| m.contains(&dead)), "{j}");
}

/// The first replica is up, the one after it is not: the relay's connect is refused and the
/// error travels back naming the dead node. With `--no-repair` (and no `--min-replicas`) that
/// fails the push and nothing is published anywhere; by default the chain is formed again
/// without the dead node (tests/dead_start.rs).
#[test]
fn downstream_connection_refused() {
    let c = Cluster::start(2);
    let (_t, src) = small_src();
    let dead = dead_addr();
    let to = format!("{},{},{}", c.addr(0), dead, c.addr(1));
    let out = c.push_to(&to, &src, "chain", 1, &["--json", "--no-repair"]);
    assert_eq!(code(&out), 1, "{}\n{}", show_output(&out), c.logs());
    assert_error_line(&out, &[&dead]);
    let all = all_output(&out).to_lowercase();
    assert!(all.contains("unreachable") || all.contains("refused"), "cause not named\n{}", show_output(&out));
    let j = parse_json(&out);
    assert_eq!(j["ok"], serde_json::Value::Bool(false), "{j}");
    assert!(j.to_string().contains(&dead), "JSON does not name {dead}: {j}");
    assert_not_published(&c, &[0, 1], "chain", 1);
    // Both servers still take a push afterwards (another version: retrying the same one at
    // once is `retry_right_after_downstream_refusal`).
    let out = c.push(&src, "chain", 2, &[]);
    c.assert_push_ok(&out);
    c.assert_published(&src, "chain", 2);
}

#[test]
fn unreachable_last_replica() {
    let c = Cluster::start(1);
    let (_t, src) = small_src();
    let dead = dead_addr();
    let to = format!("{},{}", c.addr(0), dead);
    let out = c.push_to(&to, &src, "tail", 1, &["--no-repair"]);
    assert_eq!(code(&out), 1, "{}\n{}", show_output(&out), c.logs());
    assert_error_line(&out, &[&dead, "unreachable"]);
    assert_not_published(&c, &[0], "tail", 1);
}

// ------------------------------------------------------------------------------------------
// version exists
// ------------------------------------------------------------------------------------------

#[test]
fn version_exists() {
    let c = Cluster::start(1);
    let t = tempdir();
    let v1 = t.path().join("one");
    make_small_tree(&v1, 1);
    let out = c.push(&v1, "ckpt", 100, &[]);
    c.assert_push_ok(&out);
    let other = t.path().join("two");
    make_small_tree(&other, 2);
    let out = c.push(&other, "ckpt", 100, &[]);
    assert_eq!(code(&out), 1, "{}\n{}", show_output(&out), c.logs());
    assert_error_line(&out, &["already exists", &c.addr(0)]);
    // The first version's bytes are untouched and still current.
    c.assert_published(&v1, "ckpt", 100);
    // JSON form.
    let out = c.push(&other, "ckpt", 100, &["--json"]);
    assert_eq!(code(&out), 1, "{}", show_output(&out));
    let j = parse_json(&out);
    assert_eq!(j["ok"], serde_json::Value::Bool(false), "{j}");
    assert_eq!(j["error"]["kind"].as_str(), Some("version_exists"), "{j}");
    assert_eq!(j["error"]["node"].as_str(), Some(c.addr(0).as_str()), "{j}");
    c.assert_published(&v1, "ckpt", 100);
}

/// Only the second replica of the chain holds the version: the refusal must name that node, and
/// the first replica must not publish either.
#[test]
fn version_exists_downstream_names_that_node() {
    let c = Cluster::start(2);
    let t = tempdir();
    let v1 = t.path().join("one");
    make_small_tree(&v1, 3);
    let out = c.push_to(&c.addr(1), &v1, "ckpt", 5, &[]);
    c.assert_push_ok(&out);
    let other = t.path().join("two");
    make_small_tree(&other, 4);
    let out = c.push(&other, "ckpt", 5, &[]);
    assert_eq!(code(&out), 1, "{}\n{}", show_output(&out), c.logs());
    assert_error_line(&out, &["already exists", &c.addr(1)]);
    assert_not_published(&c, &[0], "ckpt", 5);
    c.assert_published_on(&[1], &v1, "ckpt", 5);
}

// ------------------------------------------------------------------------------------------
// usage / bad input (exit 2)
// ------------------------------------------------------------------------------------------

#[test]
fn source_missing() {
    let c = Cluster::start(1);
    let t = tempdir();
    let missing = t.path().join("does-not-exist");
    let out = c.push(&missing, "ckpt", 1, &[]);
    assert_eq!(code(&out), 2, "{}", show_output(&out));
    let p = missing.display().to_string();
    assert_error_line(&out, &["source", &p, "No such file or directory"]);
    assert!(list_names(&c.root(0)).iter().all(|n| n.starts_with('.')), "{:?}", list_names(&c.root(0)));
}

#[test]
fn bad_names_are_usage_errors() {
    let c = Cluster::start(1);
    let (_t, src) = small_src();
    let long = "a".repeat(129);
    for bad in [".hidden", "a/b", "", "sp ace", "..", long.as_str()] {
        let out = c.push(&src, bad, 1, &[]);
        assert_eq!(code(&out), 2, "name {bad:?}\n{}", show_output(&out));
        assert!(!error_lines(&out).is_empty() || !stderr_str(&out).is_empty(), "no message for {bad:?}");
    }
    // Nothing got created outside the root's hidden dirs.
    assert!(list_names(&c.root(0)).iter().all(|n| n.starts_with('.')), "{:?}", list_names(&c.root(0)));
    // 128 chars with all allowed classes is fine.
    let ok = format!("A-z_0.9{}", "b".repeat(121));
    assert_eq!(ok.len(), 128);
    let out = c.push(&src, &ok, 1, &[]);
    c.assert_push_ok(&out);
}

#[test]
fn bad_flags_are_usage_errors() {
    let (_t, src) = small_src();
    let dead = dead_addr();
    let cases: Vec<Vec<String>> = vec![
        vec!["push".into(), src.display().to_string(), "--name".into(), "x".into(), "--to".into(), dead.clone()],
        vec![
            "push".into(),
            src.display().to_string(),
            "--name".into(),
            "x".into(),
            "--version".into(),
            "notanumber".into(),
            "--to".into(),
            dead.clone(),
        ],
        vec![
            "push".into(),
            src.display().to_string(),
            "--name".into(),
            "x".into(),
            "--version".into(),
            "1".into(),
            "--to".into(),
            dead.clone(),
            "--chunk-size".into(),
            "lots".into(),
        ],
        vec!["push".into(), src.display().to_string(), "--bogus-flag".into()],
        vec!["verify".into()],
    ];
    for args in cases {
        let out = run(shardcast().args(&args));
        assert_eq!(code(&out), 2, "args {args:?}\n{}", show_output(&out));
    }
}

/// A flag's value the push cannot use (checked after parsing: a rail that is not this host's
/// address, a chunk bigger than the pool allows) is the caller's input: exit 2, and `--json` says `invalid_argument`,
/// not `bad_manifest` (the manifest is fine).
#[test]
fn bad_flag_values_report_invalid_argument() {
    let (_t, src) = small_src();
    let dead = dead_addr();
    for extra in [&["--rail", "192.0.2.77"][..], &["--chunk-size", "64M", "--pool-mb", "8"][..]] {
        let out = run(shardcast()
            .args(["push"])
            .arg(&src)
            .args(["--name", "x", "--version", "1", "--to", &dead, "--json"])
            .args(extra));
        assert_eq!(code(&out), 2, "{extra:?}\n{}", show_output(&out));
        let j = parse_json(&out);
        assert_eq!(j["error"]["kind"].as_str(), Some("invalid_argument"), "{extra:?}: {j}");
    }
}

// ------------------------------------------------------------------------------------------
// a middle replica dies mid-push
// ------------------------------------------------------------------------------------------

#[test]
fn middle_replica_killed_mid_push() {
    let mut c = Cluster::start(3);
    let t = tempdir();
    let f = t.path().join("huge.bin");
    write_random_file(&f, 512 * MIB, 4242);
    let mut push = Running::spawn(&mut c.push_cmd(&c.addrs(), &f, "victim", 1, &["--json"]));
    let staging = c.root(1).join(".staging");
    // Kill as soon as data lands in the middle node's staging dir (at most 10 s of waiting, in
    // case the build is slow to get going).
    let saw_data = wait_until(Duration::from_secs(10), || bytes_under(&staging) > 0 || push.try_wait().is_some());
    if let Some(st) = push.try_wait() {
        let out = push.finish(Duration::from_secs(1));
        panic!(
            "push finished ({st}) before the middle replica could be killed (saw staging data: {saw_data})\n{}\n{}",
            show_output(&out),
            c.logs()
        );
    }
    let killed_at = Instant::now();
    c.kill(1);
    let dead = c.addr(1);
    if push.wait_timeout(Duration::from_secs(60)).is_none() {
        panic!("push still running 60 s after {dead} was killed (saw staging data: {saw_data})\n{}", c.logs());
    }
    let out = push.finish(Duration::from_secs(5));
    let took = killed_at.elapsed();
    let rc = code(&out);
    assert!(rc == 1 || rc == 3, "exit {rc} (want 1 or 3) after killing {dead}\n{}\n{}", show_output(&out), c.logs());
    let all = all_output(&out);
    assert!(all.contains(&dead), "output does not name the killed node {dead}\n{}\n{}", show_output(&out), c.logs());
    let j = parse_json(&out);
    assert_eq!(j["ok"], serde_json::Value::Bool(false), "{j}");
    let published: Vec<String> = j["replicas"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|r| r["status"].as_str() == Some("published"))
                .filter_map(|r| r["node"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    assert!(!published.contains(&dead), "killed node reported published: {j}");
    if let Some(reps) = j["replicas"].as_array() {
        if let Some(e) = reps.iter().find(|r| r["node"].as_str() == Some(dead.as_str())) {
            assert_eq!(e["status"].as_str(), Some("failed"), "{j}");
            assert!(e["error"]["kind"].as_str().is_some(), "failed entry without error kind: {j}");
        }
    }
    assert_eq!(rc == 3, !published.is_empty(), "exit {rc} inconsistent with published replicas {published:?}: {j}");
    // No replica exposes a partial version.
    for i in 0..3 {
        let root = c.root(i);
        let set = root.join("victim");
        let cur = set.join("current");
        let has_manifest = set.join("1.manifest").exists();
        if fs::symlink_metadata(&cur).is_ok() || has_manifest {
            let v = verify(&root, "victim", &["--version", "1"]);
            assert_eq!(code(&v), 0, "replica {i} exposes version 1 but it does not verify\n{}", show_output(&v));
            assert_file_identical(&f, &set.join("1/huge.bin"));
        }
        if set.join("1").exists() && i != 1 {
            assert!(has_manifest, "replica {i}: victim/1 exists without its manifest");
        }
        let node = c.addr(i);
        if published.contains(&node) {
            assert_current(&root, "victim", 1);
        }
    }
    eprintln!("push exited {rc} {took:?} after the kill; published on {published:?}");
    // The survivors keep serving.
    assert!(c.alive(0) && c.alive(2), "a surviving replica died\n{}", c.logs());
    let small = t.path().join("after");
    make_small_tree(&small, 5);
    let out = c.push_to(&c.addr_list(&[0, 2]), &small, "after", 1, &[]);
    c.assert_push_ok(&out);
    c.assert_published_on(&[0, 2], &small, "after", 1);
}

// ------------------------------------------------------------------------------------------
// disk full
// ------------------------------------------------------------------------------------------

#[test]
fn not_enough_disk_space() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("errors::not_enough_disk_space", "not running as root: mounting a tmpfs needs it");
    }
    let mnt = tempdir();
    let st = Command::new("mount").args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"]).arg(mnt.path()).output();
    match st {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            let why = format!("mount tmpfs failed: {}", String::from_utf8_lossy(&o.stderr).trim());
            return skip("errors::not_enough_disk_space", &why);
        }
        Err(e) => {
            return skip("errors::not_enough_disk_space", &format!("cannot run mount: {e}"));
        }
    }
    // Drop order: cluster (servers killed), then unmount, then the temp dir.
    let _guard = Unmount(mnt.path().to_path_buf());
    let root = mnt.path().join("root");
    let c = Cluster::builder().root(0, &root).start(1);
    let t = tempdir();
    let f = t.path().join("big.bin");
    write_random_file(&f, 64 * MIB, 55);
    let out = c.push(&f, "full", 1, &[]);
    assert_eq!(code(&out), 1, "{}\n{}", show_output(&out), c.logs());
    assert_error_line(&out, &["not enough free space", &c.addr(0)]);
    let out = c.push(&f, "full", 1, &["--json"]);
    assert_eq!(code(&out), 1, "{}", show_output(&out));
    let j = parse_json(&out);
    assert_eq!(j["ok"], serde_json::Value::Bool(false), "{j}");
    assert!(j.to_string().contains("disk_full"), "no disk_full kind: {j}");
    assert_not_published(&c, &[0], "full", 1);
    // Nothing was left behind in staging, and the server still answers.
    // (No "a small push fits afterwards" check: the server keeps a 16 MiB free-space margin, so
    // on a 16 MiB tmpfs every push is refused.)
    assert!(bytes_under(&root) < MIB, "{} bytes left under the root after a refused push", bytes_under(&root));
    let st = c.status_json(0);
    assert!(status_set(&st, "full").is_none(), "status lists the refused set: {st}");
    let mut c = c;
    assert!(c.alive(0), "server died after refusing\n{}", c.logs());
}

// ------------------------------------------------------------------------------------------
// verify
// ------------------------------------------------------------------------------------------

fn pushed_one() -> (Cluster, tempfile::TempDir, PathBuf) {
    let c = Cluster::start(1);
    let t = tempdir();
    let d = t.path().join("src");
    make_small_tree(&d, 88);
    let out = c.push(&d, "ver", 1, &[]);
    c.assert_push_ok(&out);
    let v = c.verify(0, "ver", &[]);
    assert_eq!(code(&v), 0, "{}", show_output(&v));
    (c, t, d)
}

#[test]
fn verify_detects_flipped_byte() {
    let (c, _t, _d) = pushed_one();
    let p = c.root(0).join("ver/1/sub/b.bin");
    let mut f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    f.seek(SeekFrom::Start(123_456)).unwrap();
    let mut b = [0u8; 1];
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(123_456)).unwrap();
    f.write_all(&[b[0] ^ 0x01]).unwrap();
    drop(f);
    let out = c.verify(0, "ver", &[]);
    assert_eq!(code(&out), 1, "{}", show_output(&out));
    assert!(all_output(&out).contains("sub/b.bin"), "message does not name the file\n{}", show_output(&out));
    let out = c.verify(0, "ver", &["--version", "1", "--json"]);
    assert_eq!(code(&out), 1, "{}", show_output(&out));
}

#[test]
fn verify_detects_missing_and_extra_files() {
    let (c, _t, _d) = pushed_one();
    fs::remove_file(c.root(0).join("ver/1/sub/deeper/run.sh")).unwrap();
    let out = c.verify(0, "ver", &[]);
    assert_eq!(code(&out), 1, "{}", show_output(&out));
    assert!(all_output(&out).contains("run.sh"), "{}", show_output(&out));

    let (c, _t, _d) = pushed_one();
    fs::write(c.root(0).join("ver/1/intruder.txt"), b"x").unwrap();
    let out = c.verify(0, "ver", &[]);
    assert_eq!(code(&out), 1, "{}", show_output(&out));
    assert!(all_output(&out).contains("intruder.txt"), "{}", show_output(&out));

    let (c, _t, _d) = pushed_one();
    // A file that grew.
    let p = c.root(0).join("ver/1/a.bin");
    let mut f = OpenOptions::new().append(true).open(&p).unwrap();
    f.write_all(b"tail").unwrap();
    drop(f);
    let out = c.verify(0, "ver", &[]);
    assert_eq!(code(&out), 1, "{}", show_output(&out));
    assert!(all_output(&out).contains("a.bin"), "{}", show_output(&out));
}

#[test]
fn verify_usage_errors() {
    let (c, _t, _d) = pushed_one();
    // Unknown set / version: not "verified".
    let out = c.verify(0, "nosuchset", &[]);
    assert_ne!(code(&out), 0, "{}", show_output(&out));
    let out = c.verify(0, "ver", &["--version", "99"]);
    assert_ne!(code(&out), 0, "{}", show_output(&out));
    let out = run(shardcast().args(["verify", "--root"]).arg(c.root(0)));
    assert_eq!(code(&out), 2, "{}", show_output(&out));
}

/// A push refused because a downstream node is down must leave nothing reserved on the nodes
/// that did answer: retrying the same version at once (without the dead node) succeeds, and does
/// not get "being received by another push".
#[test]
fn retry_right_after_downstream_refusal() {
    let c = Cluster::start(1);
    let (_t, src) = small_src();
    for v in 1..=10u64 {
        let dead = dead_addr();
        let out = c.push_to(&format!("{},{dead}", c.addr(0)), &src, "retry", v, &["--no-repair"]);
        assert_eq!(code(&out), 1, "v{v}\n{}\n{}", show_output(&out), c.logs());
        let out = c.push_to(&c.addr(0), &src, "retry", v, &[]);
        assert_eq!(code(&out), 0, "immediate retry of v{v} failed\n{}\n{}", show_output(&out), c.logs());
    }
    c.assert_published(&src, "retry", 10);
}

// ------------------------------------------------------------------------------------------
// --transport rdma where there is no RDMA
// ------------------------------------------------------------------------------------------

#[test]
fn transport_rdma_is_refused_plainly_and_tcp_works() {
    let (_t, src) = small_src();
    let c = Cluster::start(1);
    let out = run(c.cmd().args(["push"]).arg(&src).args([
        "--name",
        "t",
        "--version",
        "1",
        "--to",
        &c.addrs(),
        "--transport",
        "rdma",
    ]));
    // This host's kernel has no RDMA (the RDMA tests run in a soft-RoCE guest): refused up
    // front, with the reason.
    assert_eq!(code(&out), 2, "{}", show_output(&out));
    assert_error_line(&out, &["--transport rdma", "no RDMA"]);
    assert_not_published(&c, &[0], "t", 1);

    let root = tempdir();
    let out = run_timeout(
        shardcast().args(["serve", "--listen", "127.0.0.1:0", "--transport", "rdma", "--root"]).arg(root.path()),
        Duration::from_secs(20),
    );
    assert_eq!(code(&out), 2, "{}", show_output(&out));
    assert_error_line(&out, &["--transport rdma", "no RDMA"]);

    for t in ["tcp", "auto"] {
        let v = if t == "tcp" { 2 } else { 3 };
        let out = c.push(&src, "t", v, &["--transport", t]);
        assert_eq!(code(&out), 0, "{}", show_output(&out));
    }
}

/// Two replicas whose first cannot open a staging (its `.staging` is a file), with `partial`
/// a partial of `ckpt@1` there; pushes `ckpt@1` through both (`extra` flags) and checks that
/// the push fails naming that relay, with nothing published there. Returns the cluster and
/// the source, for what comes after.
fn push_through_a_relay_that_cannot_stage(partial: bool, extra: &[&str]) -> (Cluster, tempfile::TempDir, PathBuf) {
    let c = Cluster::start(2);
    let staging = c.root(0).join(".staging");
    let _ = fs::remove_dir_all(&staging);
    fs::write(&staging, b"not a directory").unwrap();
    if partial {
        // Empty: it cannot be resumed, only found, which makes the relay take it over.
        fs::create_dir_all(c.root(0).join(".partial/ckpt@1")).unwrap();
    }
    let (t, src) = small_src();
    let out = c.push(&src, "ckpt", 1, extra);
    assert_ne!(code(&out), 0, "{}\n{}", show_output(&out), c.logs());
    assert_error_line(&out, &[&c.addr(0), ".staging"]);
    assert_not_published(&c, &[0], "ckpt", 1);
    (c, t, src)
}

/// A relay that cannot open its staging reports itself, and the node after it is left holding
/// nothing: a plain push opens the staging before it dials on, so the same version goes to
/// that node straight away.
#[test]
fn a_relay_that_cannot_stage_is_named_and_the_node_after_it_is_left_free() {
    let (c, _t, src) = push_through_a_relay_that_cannot_stage(false, &[]);
    assert!(!c.log(1).contains("receiving"), "the relay dialed on before it could stage\n{}", c.logs());
    let out = c.push_to(&c.addr(1), &src, "ckpt", 1, &[]);
    c.assert_push_ok(&out);
}

/// The same failure when the relay resumes a partial: it dials on while it takes the partial
/// over, so the next node has accepted when the relay finds it cannot stage. The relay still
/// names itself, drops the next node's answer, and that node frees the version: a routed push
/// (what a repair sends) of it goes through at once, and no partial is left behind.
#[test]
fn a_relay_that_cannot_take_its_partial_over_is_named_and_the_next_node_lets_go() {
    let (c, _t, src) = push_through_a_relay_that_cannot_stage(true, &["--incremental"]);
    assert!(c.log(1).contains("receiving"), "the relay did not dial on while it opened\n{}", c.logs());
    let out = c.push_to(&c.addr(1), &src, "ckpt", 1, &["--incremental"]);
    c.assert_push_ok(&out);
    let partials = c.root(1).join(".partial");
    assert!(names_or_empty(&partials).is_empty(), "{:?}\n{}", names_or_empty(&partials), c.logs());
}

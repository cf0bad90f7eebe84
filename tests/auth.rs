//! Authentication with a cluster key (`--key-file`): real `serve` and `push` processes; a wrong
//! key, no key, a fake replica and a replayed handshake are refused before anything is staged,
//! the key never shows in output, and a good push right after still works.

mod util;

use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use shardcast::wire::{self, Kind};
use util::*;

const SECRET_A: &str = "correct-horse-battery-staple-0123456789abcdef";
const SECRET_B: &str = "another-cluster-entirely-0123456789abcdef0000";

/// A push with `key` on the command line (over the environment's), or with no key at all.
fn push_with(c: &Cluster, src: &Path, name: &str, key: Option<&Path>) -> std::process::Output {
    let mut cmd = c.push_cmd(&c.addrs(), src, name, 1, &["--json"]);
    match key {
        Some(k) => cmd.arg("--key-file").arg(k),
        None => cmd.env_remove("SHARDCAST_KEY_FILE"),
    };
    run(&mut cmd)
}

fn assert_refused(c: &Cluster, out: &std::process::Output, name: &str, needle: &str) {
    assert_eq!(code(out), 1, "{}\n{}", show_output(out), c.logs());
    let all = all_output(out);
    assert!(all.contains("unauthorized"), "no unauthorized kind:\n{all}");
    assert!(all.contains(needle), "expected {needle:?} in:\n{all}");
    for i in 0..c.len() {
        assert!(!c.root(i).join(name).exists(), "replica {i} staged or published {name}");
        assert!(bytes_under(&c.root(i).join(".staging")) == 0, "replica {i} has staging data");
    }
}

#[test]
fn wrong_or_missing_keys_are_refused_and_a_good_push_works_after() {
    let t = tempdir();
    let a = key_file(t.path(), "a.key", SECRET_A);
    let b = key_file(t.path(), "b.key", SECRET_B);
    let c = keyed_cluster(2, &a);
    let src = t.path().join("src");
    write_random_file(&src.join("w.bin"), 3 << 20, 1);

    let out = push_with(&c, &src, "wrong", Some(&b));
    assert_refused(&c, &out, "wrong", "wrong cluster key");
    let out = push_with(&c, &src, "none", None);
    assert_refused(&c, &out, "none", "authentication required");
    // The key never shows: not in the push's output, not in the servers' logs.
    for text in [all_output(&out), c.logs()] {
        assert!(!text.contains(SECRET_A) && !text.contains(SECRET_B), "a key leaked:\n{text}");
    }
    // A good push right after, through both hops (the relay authenticates to the tail too).
    let out = push_with(&c, &src, "good", Some(&a));
    c.assert_push_ok(&out);
    c.assert_published(&src, "good", 1);
    // status needs the key too.
    let st = run(shardcast().arg("status").arg(c.addr(0)).env_remove("SHARDCAST_KEY_FILE"));
    assert_ne!(code(&st), 0, "status without the key answered\n{}", show_output(&st));
    let st = run(shardcast().arg("status").arg(c.addr(0)).env_remove("SHARDCAST_KEY_FILE").arg("--key-file").arg(&a));
    assert_eq!(code(&st), 0, "{}", show_output(&st));
}

#[test]
fn a_key_on_one_side_only_is_refused_with_a_clear_message() {
    let t = tempdir();
    let a = key_file(t.path(), "a.key", SECRET_A);
    let c = Cluster::start(1);
    let src = t.path().join("src");
    write_random_file(&src.join("w.bin"), 1 << 20, 2);
    let out = push_with(&c, &src, "x", Some(&a));
    assert_refused(&c, &out, "x", "has no cluster key");
}

#[test]
fn a_key_file_others_can_read_or_too_short_is_a_usage_error() {
    let t = tempdir();
    let loose = t.path().join("loose.key");
    std::fs::write(&loose, SECRET_A).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let short = key_file(t.path(), "short.key", "tooshort");
    for (k, needle) in [(&loose, "chmod 600"), (&short, "at least 32")] {
        let out = run(shardcast()
            .args(["serve", "--listen", "127.0.0.1:0", "--root"])
            .arg(t.path().join("r"))
            .arg("--key-file")
            .arg(k));
        assert_eq!(code(&out), 2, "{}", show_output(&out));
        assert!(stderr_str(&out).contains(needle), "{}", show_output(&out));
    }
}

/// A fake replica that knows the protocol but not the key: the primary must not send it HELLO.
#[test]
fn a_fake_replica_cannot_make_the_primary_talk() {
    let t = tempdir();
    let a = key_file(t.path(), "a.key", SECRET_A);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let f = wire::read_frame(&mut s).unwrap();
        assert_eq!(f.header.kind, Kind::Auth);
        // A challenge with a made-up proof.
        let mut p = vec![2u8];
        p.extend_from_slice(&[9u8; 64]);
        wire::write_frame(&mut s, Kind::Auth, 0, &p).unwrap();
        // Whatever comes next must not be a HELLO.
        match wire::read_frame(&mut s) {
            Ok(f) => f.header.kind != Kind::Hello,
            Err(_) => true,
        }
    });
    let src = t.path().join("src");
    write_random_file(&src.join("w.bin"), 1 << 20, 3);
    let out = run(shardcast()
        .arg("push")
        .arg(&src)
        .args(["--name", "x", "--version", "1", "--to", &addr, "--key-file"])
        .arg(&a));
    assert_eq!(code(&out), 1, "{}", show_output(&out));
    assert!(all_output(&out).contains("does not hold cluster key"), "{}", show_output(&out));
    assert!(fake.join().unwrap(), "the primary sent HELLO to a replica that failed authentication");
}

/// A recorded good handshake, replayed: the server's new nonce makes the old proof worthless.
#[test]
fn a_replayed_handshake_is_refused() {
    let t = tempdir();
    let a = key_file(t.path(), "a.key", SECRET_A);
    let c = keyed_cluster(1, &a);
    // A recording proxy between a real push and the replica.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = l.local_addr().unwrap().to_string();
    let target = c.addr(0);
    let recorder = std::thread::spawn(move || {
        let (mut client, _) = l.accept().unwrap();
        let mut server = TcpStream::connect(&target).unwrap();
        let mut sent = Vec::new();
        // Client's AUTH hello, server's challenge, client's proof: record the client's two.
        for step in 0..3 {
            let (from, to) = if step == 1 { (&mut server, &mut client) } else { (&mut client, &mut server) };
            let f = wire::read_frame(from).unwrap();
            wire::write_frame(to, f.header.kind, f.header.seq, &f.payload).unwrap();
            if step != 1 {
                sent.push(f);
            }
        }
        drop((client, server));
        sent
    });
    let src = t.path().join("src");
    write_random_file(&src.join("w.bin"), 1 << 20, 4);
    let _ = run(shardcast()
        .arg("push")
        .arg(&src)
        .args(["--name", "x", "--version", "1", "--to", &proxy, "--key-file"])
        .arg(&a));
    let recorded = recorder.join().unwrap();
    // Replay both client frames on a fresh connection.
    let mut s = TcpStream::connect(c.addr(0)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    wire::write_frame(&mut s, Kind::Auth, 0, &recorded[0].payload).unwrap();
    let challenge = wire::read_frame(&mut s).unwrap();
    assert_eq!(challenge.header.kind, Kind::Auth);
    wire::write_frame(&mut s, Kind::Auth, 0, &recorded[1].payload).unwrap();
    let answer = wire::read_frame(&mut s).unwrap();
    assert_eq!(answer.header.kind, Kind::Reject, "a replayed proof was accepted");
    let _ = s.flush();
    // The server logs the refusal (its log is read by a thread: give it a moment).
    assert!(wait_until(Duration::from_secs(10), || c.logs().contains("wrong proof")), "{}", c.logs());
    assert!(!c.root(0).join("x").exists());
}

#[test]
fn the_audit_log_records_pushes_and_refusals() {
    let t = tempdir();
    let a = key_file(t.path(), "a.key", SECRET_A);
    let b = key_file(t.path(), "b.key", SECRET_B);
    let log = t.path().join("audit.jsonl");
    let c = Cluster::builder()
        .env("SHARDCAST_KEY_FILE", a.to_str().unwrap())
        .serve_arg("--audit-log")
        .serve_arg(log.to_str().unwrap())
        .start(1);
    let src = t.path().join("src");
    write_random_file(&src.join("w.bin"), 1 << 20, 5);
    assert_eq!(code(&push_with(&c, &src, "aud", Some(&b))), 1);
    c.assert_push_ok(&push_with(&c, &src, "aud", Some(&a)));
    // The same version twice: the plain push is refused (version exists), the primary asks
    // again routed, and the replica answers that it already holds it (idempotent push).
    assert_eq!(code(&push_with(&c, &src, "aud", Some(&a))), 0, "the same version twice");
    let lines = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    };
    assert!(wait_until(Duration::from_secs(10), || lines().len() >= 4), "{:?}", lines());
    let l = lines();
    let key_id = shardcast::auth::ClusterKey::from_secret(SECRET_A.as_bytes()).id().to_owned();
    assert_eq!(l[0]["outcome"], "refused", "{l:?}");
    assert!(l[0]["reason"].as_str().unwrap_or("").contains("wrong cluster key"), "{l:?}");
    assert!(l[0]["key_id"].is_null(), "{l:?}");
    assert_eq!(l[1]["outcome"], "published", "{l:?}");
    assert_eq!(l[1]["key_id"], key_id.as_str(), "{l:?}");
    assert_eq!(
        (l[1]["name"].as_str(), l[1]["version"].as_u64(), l[1]["bytes"].as_u64()),
        (Some("aud"), Some(1), Some(1 << 20))
    );
    assert!(l[1]["peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")), "{l:?}");
    assert_eq!(l[2]["outcome"], "refused", "{l:?}");
    assert!(l[2]["reason"].as_str().unwrap_or("").contains("already"), "{l:?}");
    assert_eq!(l[3]["outcome"], "already held", "{l:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains(SECRET_A) && !text.contains(SECRET_B), "a key in the audit log");
}

#[test]
fn acl_keys_push_only_their_names_and_may_be_kept_from_moving_current() {
    let t = tempdir();
    let admin = key_file(t.path(), "admin.key", SECRET_A);
    let trainer = key_file(t.path(), "trainer.key", SECRET_B);
    let stranger = key_file(t.path(), "stranger.key", "a-third-key-nobody-listed-0123456789abcdefgh");
    let acl = "[[key]]\nfile = \"trainer.key\"\nnames = [\"ckpt-\"]\nreplace_current = false\n";
    let c = acl_cluster(1, &admin, t.path(), acl);
    let src = t.path().join("src");
    write_random_file(&src.join("w.bin"), 1 << 20, 6);
    let push = |name: &str, v: u64, key: &Path| {
        let mut cmd = c.push_cmd(&c.addrs(), &src, name, v, &["--json"]);
        cmd.arg("--key-file").arg(key);
        run(&mut cmd)
    };
    // The trainer's key: its names only.
    let out = push("other", 1, &trainer);
    assert_eq!(code(&out), 1, "{}", show_output(&out));
    assert!(all_output(&out).contains("may not push 'other'"), "{}", show_output(&out));
    assert!(!c.root(0).join("other").exists());
    // Its versions are published beside `current`, never as it.
    c.assert_push_ok(&push("ckpt-a", 1, &trainer));
    assert!(c.root(0).join("ckpt-a/1.manifest").exists());
    assert!(std::fs::symlink_metadata(c.root(0).join("ckpt-a/current")).is_err(), "the trainer's push became current");
    c.assert_push_ok(&push("ckpt-a", 2, &admin));
    assert_current(&c.root(0), "ckpt-a", 2);
    c.assert_push_ok(&push("ckpt-a", 3, &trainer));
    assert_current(&c.root(0), "ckpt-a", 2);
    assert_tree_identical(&src, &c.root(0).join("ckpt-a/3"));
    // A key in neither place.
    let out = push("ckpt-b", 1, &stranger);
    assert_eq!(code(&out), 1);
    assert!(all_output(&out).contains("wrong cluster key"), "{}", show_output(&out));
}

/// A limited key's push relayed by nodes whose own key is unlimited: its limits travel in the
/// authenticated HELLO and hold at r2 and r3 too (each also applies its own ACL to the key the
/// push started with), so a relay never lends the pusher its own rights.
#[test]
fn acl_limits_hold_at_every_replica_of_the_chain() {
    let t = tempdir();
    let (d1, d2) = (t.path().join("acl1"), t.path().join("acl2"));
    std::fs::create_dir_all(&d1).unwrap();
    std::fs::create_dir_all(&d2).unwrap();
    let admin = key_file(t.path(), "admin.key", SECRET_A);
    let trainer = key_file(t.path(), "trainer.key", SECRET_B);
    for d in [&d1, &d2] {
        key_file(d, "trainer.key", SECRET_B);
    }
    // r1 lets the trainer push "other" and prune, but not move `current`; r2 and r3 let it move
    // `current` (only r1's limit, carried in HELLO, keeps it from doing so there), but not push
    // "other" nor prune.
    let acl1 =
        "[[key]]\nfile = \"trainer.key\"\nnames = [\"ckpt-\", \"other\"]\nreplace_current = false\nprune = true\n";
    let acl2 = "[[key]]\nfile = \"trainer.key\"\nnames = [\"ckpt-\"]\nreplace_current = true\n";
    let (c1, c23) = (acl_cluster(1, &admin, &d1, acl1), acl_cluster(2, &admin, &d2, acl2));
    let roots = [c1.root(0), c23.root(0), c23.root(1)];
    let to = format!("{},{}", c1.addr(0), c23.addrs());
    let logs = || format!("{}{}", c1.logs(), c23.logs());
    let src = t.path().join("src");
    write_random_file(&src.join("w.bin"), 1 << 20, 7);
    let push = |name: &str, v: u64, key: &Path, extra: &[&str]| {
        let mut cmd = c1.push_cmd(&to, &src, name, v, &["--json"]);
        cmd.args(extra).arg("--key-file").arg(key);
        run(&mut cmd)
    };

    // The admin's version is current everywhere; the trainer's is published beside it, on
    // every replica.
    let out = push("ckpt-a", 1, &admin, &[]);
    assert_eq!(code(&out), 0, "{}\n{}", show_output(&out), logs());
    let out = push("ckpt-a", 2, &trainer, &[]);
    assert_eq!(code(&out), 0, "{}\n{}", show_output(&out), logs());
    for (i, root) in roots.iter().enumerate() {
        assert!(root.join("ckpt-a/2.manifest").exists(), "replica {i} did not publish ckpt-a@2");
        assert_tree_identical(&src, &root.join("ckpt-a/2"));
        assert_current(root, "ckpt-a", 1);
    }

    // A name r2 and r3 do not allow the trainer: refused there, published nowhere.
    let out = push("other", 1, &trainer, &[]);
    assert_eq!(code(&out), 1, "{}\n{}", show_output(&out), logs());
    let all = all_output(&out);
    assert!(all.contains("unauthorized") && all.contains("may not push 'other'"), "{all}");
    for (i, root) in roots.iter().enumerate() {
        assert!(!root.join("other/1.manifest").exists(), "replica {i} published a name the trainer may not push");
    }

    // Pruning through HELLO's keep: refused at r2, nothing pruned or published anywhere.
    let out = push("ckpt-a", 3, &trainer, &["--keep", "1"]);
    assert_eq!(code(&out), 1, "{}\n{}", show_output(&out), logs());
    let all = all_output(&out);
    assert!(all.contains("unauthorized") && all.contains("may not prune"), "{all}");
    for (i, root) in roots.iter().enumerate() {
        assert!(root.join("ckpt-a/2.manifest").exists(), "replica {i} pruned ckpt-a@2 for a limited key");
        assert!(!root.join("ckpt-a/3.manifest").exists(), "replica {i} published ckpt-a@3");
        assert_current(root, "ckpt-a", 1);
    }
}

//! End-to-end pushes against real `shardcast serve` processes on loopback.

mod util;

use std::fs;
use std::path::Path;

use util::*;

const MIB: u64 = 1 << 20;

/// Push `src` as NAME@V to the whole cluster and check every promise of a successful push.
fn push_and_check(c: &Cluster, src: &Path, name: &str, v: u64, extra: &[&str]) {
    let out = c.push(src, name, v, extra);
    c.assert_push_ok(&out);
    c.assert_published(src, name, v);
}

#[test]
fn dir_to_one_replica() {
    let c = Cluster::start(1);
    let src = tempdir();
    make_small_tree(src.path(), 1);
    push_and_check(&c, src.path(), "ckpt", 1, &[]);
}

#[test]
fn dir_to_two_replicas() {
    let c = Cluster::start(2);
    let src = tempdir();
    make_small_tree(src.path(), 2);
    push_and_check(&c, src.path(), "ckpt", 7, &[]);
}

#[test]
fn dir_to_four_replicas() {
    let c = Cluster::start(4);
    let src = tempdir();
    make_small_tree(src.path(), 3);
    // A few chunks per file so the pipeline actually has frames in flight on every hop.
    write_random_file(&src.path().join("multi.bin"), 5 * MIB + 123, 33);
    push_and_check(&c, src.path(), "model-a", 42, &["--chunk-size", "1M"]);
}

#[test]
fn human_summary_names_every_replica() {
    let c = Cluster::start(2);
    let src = tempdir();
    make_small_tree(src.path(), 4);
    let out = c.push(src.path(), "ckpt", 1, &[]);
    c.assert_push_ok(&out);
    let so = stdout_str(&out);
    for i in 0..2 {
        let line = so.lines().find(|l| l.contains(&c.addr(i)));
        let line = line.unwrap_or_else(|| panic!("summary has no line for {}\n{}", c.addr(i), show_output(&out)));
        assert!(line.contains("published"), "replica line without 'published': {line:?}\n{}", show_output(&out));
    }
    c.assert_published(src.path(), "ckpt", 1);
}

#[test]
fn single_file_lands_under_its_name() {
    let c = Cluster::start(2);
    let src = tempdir();
    let f = src.path().join("weights.safetensors");
    write_random_file_mode(&f, 3 * MIB + 17, 5, 0o640);
    push_and_check(&c, &f, "single", 3, &["--chunk-size", "1M"]);
    assert!(c.root(1).join("single/3/weights.safetensors").is_file());
}

#[test]
fn single_empty_file() {
    let c = Cluster::start(2);
    let src = tempdir();
    let f = src.path().join("empty.bin");
    write_random_file(&f, 0, 0);
    push_and_check(&c, &f, "emptyfile", 1, &[]);
}

#[test]
fn empty_directory() {
    let c = Cluster::start(2);
    let src = tempdir();
    let d = src.path().join("nothing");
    fs::create_dir(&d).unwrap();
    push_and_check(&c, &d, "emptydir", 1, &[]);
}

#[test]
fn chunk_boundary_sizes() {
    let c = Cluster::start(2);
    let src = tempdir();
    let d = src.path().join("tree");
    for (i, size) in [0u64, 1, MIB - 1, MIB, MIB + 1].into_iter().enumerate() {
        write_random_file(&d.join(format!("f{size}.bin")), size, 100 + i as u64);
    }
    // Same sizes again inside a subdir so chunk seq numbers keep running across dirs.
    for (i, size) in [MIB + 1, 1, MIB].into_iter().enumerate() {
        write_random_file(&d.join(format!("sub/g{size}.bin")), size, 200 + i as u64);
    }
    push_and_check(&c, &d, "bounds", 1, &["--chunk-size", "1M"]);
}

#[test]
fn chunk_boundary_sizes_as_single_files() {
    let c = Cluster::start(2);
    let src = tempdir();
    for (i, size) in [1u64, MIB - 1, MIB, MIB + 1].into_iter().enumerate() {
        let f = src.path().join(format!("one{size}.bin"));
        write_random_file(&f, size, 300 + i as u64);
        push_and_check(&c, &f, &format!("s{size}"), 1, &["--chunk-size", "1M"]);
    }
}

#[test]
fn chunk_size_spellings() {
    let c = Cluster::start(1);
    let src = tempdir();
    let d = src.path().join("tree");
    write_random_file(&d.join("x.bin"), 2 * MIB + 5, 400);
    for (v, cs) in [(1u64, "1048576"), (2, "512K"), (3, "1MiB"), (4, "4M")] {
        let out = c.push(&d, "spell", v, &["--chunk-size", cs]);
        assert_eq!(code(&out), 0, "--chunk-size {cs}\n{}\n{}", show_output(&out), c.logs());
        assert_tree_identical(&d, &c.root(0).join(format!("spell/{v}")));
    }
}

/// 1,000 small files in nested dirs, empty dirs, mixed file modes, a private dir.
#[test]
fn thousand_small_files_nested_modes() {
    let c = Cluster::start(2);
    let src = tempdir();
    let d = src.path().join("tree");
    let mut rng = XorShift::new(500);
    let modes = [0o600, 0o755, 0o644];
    for i in 0..1000u64 {
        let path = d.join(format!("d{}/e{}/f{i:04}.dat", i % 10, (i / 10) % 10));
        let size = match i % 50 {
            0 => 0,
            1 => 1,
            _ => rng.below(8192),
        };
        write_random_file_mode(&path, size, 1000 + i, modes[(i % 3) as usize]);
    }
    fs::create_dir_all(d.join("empty")).unwrap();
    fs::create_dir_all(d.join("d3/e4/void/deeper_void")).unwrap();
    fs::create_dir_all(d.join("private")).unwrap();
    write_random_file_mode(&d.join("private/secret.key"), 32, 9, 0o600);
    set_mode(&d.join("private"), 0o700);
    assert_eq!(scan_tree(&d).values().filter(|e| e.kind == Kind::File).count(), 1001);
    push_and_check(&c, &d, "many", 1, &[]);
}

#[test]
fn odd_file_names() {
    let c = Cluster::start(2);
    let src = tempdir();
    let d = src.path().join("tree");
    for (i, n) in ["with space.bin", "ünïcödé-名前.txt", "-dash", "a.b.c", ".hidden", "x=y,z"].iter().enumerate()
    {
        write_random_file(&d.join(n), 100 + i as u64, 600 + i as u64);
    }
    write_random_file(&d.join("dir with space/inner file"), 10, 7);
    push_and_check(&c, &d, "odd", 1, &[]);
}

#[test]
fn large_256mib_file() {
    let c = Cluster::start(2);
    let src = tempdir();
    let d = src.path().join("big");
    write_random_file(&d.join("model.bin"), 256 * MIB, 700);
    write_random_file(&d.join("config.json"), 700, 701);
    push_and_check(&c, &d, "big", 1, &[]);
}

#[test]
fn json_output_on_success() {
    let c = Cluster::start(3);
    let src = tempdir();
    let d = src.path().join("flat");
    // 1 + 1 + 2 chunks of 1 MiB.
    write_random_file(&d.join("a"), 1, 800);
    write_random_file(&d.join("b"), MIB, 801);
    write_random_file(&d.join("c"), MIB + 1, 802);
    let out = c.push(&d, "jsonset", 9, &["--json", "--chunk-size", "1M"]);
    c.assert_push_ok(&out);
    let j = parse_json(&out);
    let ctx = show_output(&out);
    assert_eq!(j["ok"], serde_json::Value::Bool(true), "{ctx}");
    assert_eq!(j["name"].as_str(), Some("jsonset"), "{ctx}");
    assert_eq!(json_u64(&j["version"]), Some(9), "{ctx}");
    assert_eq!(j["bytes"].as_u64(), Some(2 * MIB + 2), "{ctx}");
    assert_eq!(j["files"].as_u64(), Some(3), "{ctx}");
    assert_eq!(j["chunks"].as_u64(), Some(4), "{ctx}");
    assert!(j["seconds"].as_f64().is_some_and(|s| s >= 0.0), "seconds: {ctx}");
    assert!(j["gbps"].as_f64().is_some_and(|g| g >= 0.0), "gbps: {ctx}");
    let reps = j["replicas"].as_array().unwrap_or_else(|| panic!("no replicas array: {ctx}"));
    assert_eq!(reps.len(), 3, "one entry per replica: {ctx}");
    for i in 0..3 {
        let addr = c.addr(i);
        let e = reps
            .iter()
            .find(|r| r["node"].as_str() == Some(addr.as_str()))
            .unwrap_or_else(|| panic!("no entry for {addr}: {ctx}"));
        assert_eq!(e["status"].as_str(), Some("published"), "{addr}: {ctx}");
    }
    c.assert_published(&d, "jsonset", 9);
}

#[test]
fn status_json_lists_sets_and_versions() {
    let c = Cluster::start(1);
    let src = tempdir();
    make_small_tree(&src.path().join("a"), 10);
    make_small_tree(&src.path().join("b"), 11);
    for (name, v) in [("alpha", 5u64), ("alpha", 6), ("beta", 1)] {
        let d = if name == "alpha" { src.path().join("a") } else { src.path().join("b") };
        let out = c.push(&d, name, v, &[]);
        c.assert_push_ok(&out);
    }
    let st = c.status_json(0);
    assert_eq!(st["node"].as_str(), Some(c.addr(0).as_str()), "{st}");
    let alpha = status_set(&st, "alpha").unwrap_or_else(|| panic!("no alpha: {st}"));
    assert_eq!(set_versions(alpha), vec![5, 6], "{st}");
    assert_eq!(json_u64(&alpha["current"]), Some(6), "{st}");
    let beta = status_set(&st, "beta").unwrap_or_else(|| panic!("no beta: {st}"));
    assert_eq!(set_versions(beta), vec![1], "{st}");
    assert_eq!(json_u64(&beta["current"]), Some(1), "{st}");
    // The human form names both sets too.
    let out = run(c.cmd().arg("status").arg(c.addr(0)));
    assert_eq!(code(&out), 0, "{}", show_output(&out));
    let so = stdout_str(&out);
    assert!(so.contains("alpha") && so.contains("beta"), "{}", show_output(&out));
}

#[test]
fn retention_keeps_newest_two() {
    let c = Cluster::start(2);
    let src = tempdir();
    for v in 1..=3u64 {
        let d = src.path().join(format!("v{v}"));
        make_small_tree(&d, 20 + v);
        let out = c.push(&d, "ret", v, &[]);
        c.assert_push_ok(&out);
        c.assert_published(&d, "ret", v);
    }
    for i in 0..2 {
        let set = c.root(i).join("ret");
        // Retention runs right after a replica has reported, off the push's critical path.
        wait_for_removal(&set.join("1.manifest"));
        wait_for_removal(&set.join("1"));
        assert!(!set.join("1").exists(), "replica {i}: version 1 still there: {:?}", list_names(&set));
        assert!(!set.join("1.manifest").exists(), "replica {i}: 1.manifest still there: {:?}", list_names(&set));
        assert!(set.join("2").is_dir() && set.join("2.manifest").is_file(), "replica {i}: {:?}", list_names(&set));
        assert_current(&c.root(i), "ret", 3);
        let st = c.status_json(i);
        let s = status_set(&st, "ret").unwrap_or_else(|| panic!("{st}"));
        assert_eq!(set_versions(s), vec![2, 3], "{st}");
        assert_eq!(json_u64(&s["current"]), Some(3), "{st}");
        // The older kept version still verifies.
        let out = c.verify(i, "ret", &["--version", "2"]);
        assert_eq!(code(&out), 0, "{}", show_output(&out));
    }
    assert_tree_identical(&src.path().join("v2"), &c.root(0).join("ret/2"));
}

#[test]
fn retention_honours_keep_flag() {
    let c = Cluster::builder().serve_arg("--keep").serve_arg("1").start(1);
    let src = tempdir();
    for v in [10u64, 20] {
        let d = src.path().join(format!("v{v}"));
        make_small_tree(&d, v);
        let out = c.push(&d, "k1", v, &[]);
        c.assert_push_ok(&out);
    }
    let set = c.root(0).join("k1");
    wait_for_removal(&set.join("10"));
    assert!(!set.join("10").exists(), "{:?}", list_names(&set));
    assert_current(&c.root(0), "k1", 20);
    assert_tree_identical(&src.path().join("v20"), &set.join("20"));
}

/// Waits up to 10 s for `path` to disappear (retention runs after the replica has reported).
fn wait_for_removal(path: &std::path::Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while path.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The same scenarios with `SHARDCAST_IO=plain` on serve and push: the plain-socket data path.
#[test]
fn plain_io_path() {
    let c = Cluster::builder().env("SHARDCAST_IO", "plain").start(3);
    let src = tempdir();
    let d = src.path().join("tree");
    for (i, size) in [0u64, 1, MIB - 1, MIB, MIB + 1, 9 * MIB + 3].into_iter().enumerate() {
        write_random_file(&d.join(format!("f{i}.bin")), size, 900 + i as u64);
    }
    make_small_tree(&d.join("small"), 950);
    push_and_check(&c, &d, "plain", 1, &["--chunk-size", "1M"]);
    // A single file and a second version (retention path) over the plain path too.
    let f = src.path().join("lonely.bin");
    write_random_file(&f, 2 * MIB + 1, 960);
    push_and_check(&c, &f, "plain-file", 1, &["--chunk-size", "1M"]);
    push_and_check(&c, &d, "plain", 2, &["--json"]);
    // The servers really took the plain path: when they log which data path they use, it must
    // not be io_uring.
    for i in 0..c.len() {
        let log = c.log(i);
        assert!(
            !log.lines().any(|l| l.contains("data path") && l.contains("io_uring")),
            "server {i} used io_uring despite SHARDCAST_IO=plain\n{log}"
        );
    }
}

/// Relays forward chunks piece by piece as they arrive (cut-through) or whole (piece size 0):
/// pieces that do not divide the chunk, pieces larger than the chunk and store-and-forward all
/// deliver the same bytes through a 4-node chain, on io_uring and on the plain path.
#[test]
fn cut_through_piece_sizes() {
    let src = tempdir();
    let d = src.path().join("tree");
    for (i, size) in [1u64, MIB - 1, MIB, 3 * MIB + 12345].into_iter().enumerate() {
        write_random_file(&d.join(format!("f{i}.bin")), size, 1200 + i as u64);
    }
    for (io, piece) in [("auto", "100000"), ("auto", "0"), ("auto", "8388608"), ("plain", "65537")] {
        let c = Cluster::builder().env("SHARDCAST_IO", io).env("SHARDCAST_PIECE_BYTES", piece).start(4);
        push_and_check(&c, &d, "pieces", 1, &["--chunk-size", "1M"]);
    }
}

#[test]
fn pushes_to_different_names_concurrently() {
    let c = Cluster::start(2);
    let src = tempdir();
    let dirs: Vec<_> = (0..4u64)
        .map(|k| {
            let d = src.path().join(format!("t{k}"));
            make_small_tree(&d, 1100 + k);
            write_random_file(&d.join("big.bin"), 3 * MIB + k, 1200 + k);
            d
        })
        .collect();
    let running: Vec<_> = dirs
        .iter()
        .enumerate()
        .map(|(k, d)| Running::spawn(&mut c.push_cmd(&c.addrs(), d, &format!("conc{k}"), 1, &["--chunk-size", "1M"])))
        .collect();
    for r in running {
        let out = r.finish(CMD_TIMEOUT);
        c.assert_push_ok(&out);
    }
    for (k, d) in dirs.iter().enumerate() {
        c.assert_published(d, &format!("conc{k}"), 1);
    }
}

/// `SHARDCAST_ZEROCOPY=1`: relays forward with io_uring SEND_ZC from the registered pool, and a
/// slot is reused only after the kernel's notification. Bytes must come out identical.
#[test]
fn zero_copy_sends() {
    let c = Cluster::builder().env("SHARDCAST_ZEROCOPY", "1").start(3);
    let src = tempdir();
    let d = src.path().join("tree");
    for (i, size) in [1u64, MIB - 1, MIB + 1, 17 * MIB + 5].into_iter().enumerate() {
        write_random_file(&d.join(format!("f{i}.bin")), size, 700 + i as u64);
    }
    push_and_check(&c, &d, "zc", 1, &["--chunk-size", "1M"]);
    // Each server says once which data path it runs; when that is io_uring with SEND_ZC support,
    // SEND_ZC must be in use. Only a kernel without io_uring or without SEND_ZC skips the check,
    // and says so; a missing line fails.
    let mut why_not = None;
    for i in 0..c.len() {
        let log = c.log(i);
        let line = log
            .lines()
            .find(|l| l.contains("data path: "))
            .unwrap_or_else(|| panic!("server {i} never said which data path it uses\n{log}"));
        if line.contains("data path: io_uring") && !line.contains("SEND_ZC=no") {
            assert!(line.contains("SEND_ZC=yes, in use"), "server {i} did not use SEND_ZC: {line}");
        } else if line.contains("data path: io_uring") {
            why_not = Some("this kernel's io_uring has no SEND_ZC".to_string());
        } else {
            assert!(line.contains("io_uring setup refused"), "server {i}: unexpected data path: {line}");
            why_not = Some(format!("io_uring is not available here: {}", line.trim()));
        }
    }
    if let Some(reason) = why_not {
        skip("push::zero_copy_sends (the SEND_ZC check)", &reason);
    }
}

/// `serve` maps and pins the pool of the default chunk size as it starts, so that its first
/// push does not wait for the pages to fault in: that push takes the pool from the cache and
/// maps none (before, the first push of every `serve` paid 55-165 ms for it on this VM, on
/// every replica of the chain).
#[test]
fn the_first_push_finds_its_pool_ready() {
    let root = tempdir();
    let env = [("SHARDCAST_LOG".to_string(), "shardcast=debug".to_string())];
    let server = Server::start(root.path(), &[], &env);
    assert!(
        wait_until(std::time::Duration::from_secs(30), || server.log().contains("buffer pool ready")),
        "no pool mapped ahead\n{}",
        server.log()
    );
    let src = tempdir();
    write_random_file(&src.path().join("a.bin"), 9 * MIB, 4);
    let mut push = shardcast();
    push.arg("push").arg(src.path()).args(["--name", "warm", "--version", "1", "--to"]);
    let out = run(push.arg(server.addr().to_string()));
    assert_eq!(code(&out), 0, "{}\n{}", show_output(&out), server.log());
    assert_tree_identical(src.path(), &root.path().join("warm/1"));
    assert!(!server.log().contains("mapped a new buffer pool"), "{}", server.log());
}

//! Self-tests of the helpers in `util`: the comparison must catch every kind of difference and
//! say where, or the end-to-end tests could pass on wrong data.

mod util;

use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use util::*;

/// The panic message of `f`, which must panic.
fn panic_message(f: impl FnOnce()) -> String {
    let err = catch_unwind(AssertUnwindSafe(f)).expect_err("expected a panic");
    err.downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

fn two_copies() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let t = tempdir();
    let a = t.path().join("a");
    let b = t.path().join("b");
    for d in [&a, &b] {
        make_small_tree(d, 1);
    }
    assert_tree_identical(&a, &b);
    (t, a, b)
}

fn flip(p: &Path, off: usize) {
    let mut v = fs::read(p).unwrap();
    v[off] ^= 0x80;
    fs::write(p, v).unwrap();
}

#[test]
fn detects_flipped_byte_with_offset() {
    let (_t, a, b) = two_copies();
    flip(&b.join("sub/b.bin"), 123_457);
    let m = panic_message(|| assert_tree_identical(&a, &b));
    assert!(m.contains("sub/b.bin") && m.contains("offset 123457"), "{m}");
}

#[test]
fn detects_mode_size_missing_extra_and_empty_dirs() {
    let (_t, a, b) = two_copies();
    set_mode(&b.join("a.bin"), 0o600);
    let m = panic_message(|| assert_tree_identical(&a, &b));
    assert!(m.contains("mode differs: a.bin"), "{m}");

    let (_t, a, b) = two_copies();
    fs::write(b.join("sub/deeper/run.sh"), b"short").unwrap();
    let m = panic_message(|| assert_tree_identical(&a, &b));
    assert!(m.contains("size differs: sub/deeper/run.sh"), "{m}");

    let (_t, a, b) = two_copies();
    fs::remove_dir(b.join("emptydir")).unwrap();
    let m = panic_message(|| assert_tree_identical(&a, &b));
    assert!(m.contains("only in source: emptydir"), "{m}");

    let (_t, a, b) = two_copies();
    fs::write(b.join("extra"), b"").unwrap();
    let m = panic_message(|| assert_tree_identical(&a, &b));
    assert!(m.contains("only in replica: extra"), "{m}");

    let (_t, a, b) = two_copies();
    set_mode(&b.join("sub"), 0o700);
    let m = panic_message(|| assert_tree_identical(&a, &b));
    assert!(m.contains("mode differs: sub/"), "{m}");

    let (_t, a, b) = two_copies();
    fs::remove_file(b.join("empty.bin")).unwrap();
    fs::create_dir(b.join("empty.bin")).unwrap();
    let m = panic_message(|| assert_tree_identical(&a, &b));
    assert!(m.contains("kind differs: empty.bin"), "{m}");
}

#[test]
fn single_file_comparison() {
    let t = tempdir();
    let a = t.path().join("x");
    let b = t.path().join("y");
    write_random_file(&a, 3 << 20, 9);
    write_random_file(&b, 3 << 20, 9);
    assert_file_identical(&a, &b);
    flip(&b, (2 << 20) + 5);
    let m = panic_message(|| assert_file_identical(&a, &b));
    assert!(m.contains(&format!("offset {}", (2 << 20) + 5)), "{m}");
}

#[test]
fn xorshift_is_deterministic_and_not_constant() {
    assert_eq!(random_bytes(1000, 5), random_bytes(1000, 5));
    assert_ne!(random_bytes(1000, 5), random_bytes(1000, 6));
    let v = random_bytes(1 << 16, 1);
    let zeros = v.iter().filter(|&&b| b == 0).count();
    assert!(zeros < 1000, "{zeros} zero bytes in 64 KiB");
    // Odd sizes fill the tail too.
    let w = random_bytes(13, 3);
    assert_ne!(&w[8..], &[0u8; 5]);
}

#[test]
fn parses_listening_lines() {
    let a = parse_listening("2026-01-01T00:00:00Z  INFO listening on 127.0.0.1:43403 (root /x, keep 2)");
    assert_eq!(a, Some("127.0.0.1:43403".parse().unwrap()));
    let b = parse_listening(&strip_ansi("\u{1b}[32m INFO\u{1b}[0m listening on 127.0.0.1:9 root=/y"));
    assert_eq!(b, Some("127.0.0.1:9".parse().unwrap()));
    assert_eq!(parse_listening("starting up"), None);
}

#[test]
fn cluster_kill_and_dead_addr() {
    let mut c = Cluster::start(2);
    assert!(c.alive(0) && c.alive(1));
    assert_ne!(c.addr(0), c.addr(1));
    assert_eq!(c.addrs(), format!("{},{}", c.addr(0), c.addr(1)));
    c.kill(1);
    assert!(!c.alive(1));
    assert!(std::net::TcpStream::connect(c.addr(1)).is_err());
    assert!(std::net::TcpStream::connect(dead_addr()).is_err());
    assert!(c.root(0).is_dir(), "serve creates its root");
}

//! A replica writes only inside its root: a shard set directory that is a symlink to somewhere
//! else (planted, or left by an accident) is refused, and nothing lands outside the root.

mod util;

use util::*;

#[test]
fn a_symlinked_set_directory_is_refused() {
    let c = Cluster::start(1);
    let outside = tempdir();
    std::os::unix::fs::symlink(outside.path(), c.root(0).join("evil")).unwrap();
    let src = tempdir();
    write_random_file(&src.path().join("w.bin"), 4096, 1);
    let out = c.push(src.path(), "evil", 1, &["--json"]);
    assert_eq!(code(&out), 1, "{}\n{}", show_output(&out), c.logs());
    assert!(all_output(&out).contains("not a directory of the root"), "{}", show_output(&out));
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0, "something was written outside the root");
    // A good push right after.
    let out = c.push(src.path(), "good", 1, &[]);
    c.assert_push_ok(&out);
    c.assert_published(src.path(), "good", 1);
}

#[test]
fn the_staging_limit_refuses_a_push_that_would_go_over() {
    let c = Cluster::builder().serve_arg("--max-staging-mb").serve_arg("8").start(1);
    let src = tempdir();
    write_random_file(&src.path().join("big.bin"), 16 << 20, 1);
    let out = c.push(src.path(), "big", 1, &["--json"]);
    assert_eq!(code(&out), 1, "{}", show_output(&out));
    let all = all_output(&out);
    assert!(all.contains("staging limit") && all.contains("busy"), "{all}");
    assert!(!c.root(0).join("big").exists());
    let small = tempdir();
    write_random_file(&small.path().join("s.bin"), 4 << 20, 2);
    let out = c.push(small.path(), "small", 1, &[]);
    c.assert_push_ok(&out);
    c.assert_published(small.path(), "small", 1);
}

/// A HELLO whose manifest lists `paths` (files of 1 byte; "dir:" prefix for a directory),
/// encoded by hand: the library refuses to build such manifests.
fn hello_with_paths(you: &str, paths: &[&str]) -> Vec<u8> {
    let mut e = shardcast::wire::Enc::default();
    // name, version, mode, transport, keep, flags, you, no downstream, no wants; then the plan.
    e.str("bad").u64(1).u8(0).u8(shardcast::transport::Transport::Tcp.code()).u32(0).u8(0).str(you).u64(0).u64(0);
    // Protocol 5: the grant (no origin key, no limits).
    e.str("").u8(0);
    e.u32(1 << 20).u64(paths.len() as u64);
    for p in paths {
        let (kind, path, size) = match p.strip_prefix("dir:") {
            Some(d) => (1u8, d, 0u64),
            None => (0u8, *p, 1u64),
        };
        e.u8(kind).u32(0o644).u64(size);
        // The string by hand: exactly the bytes given, NULs included.
        e.u32(path.len() as u32);
        e.0.extend_from_slice(path.as_bytes());
    }
    e.u64(0);
    e.0
}

#[test]
fn manifests_with_bad_paths_are_refused_whole_before_anything_is_staged() {
    let mut c = Cluster::start(1);
    let cases: [(&[&str], &str); 7] = [
        (&["/etc/passwd"], "absolute"),
        (&["a/../../x"], "'..'"),
        (&[""], "empty"),
        (&["a\0b"], "NUL"),
        (&["x", "x"], "duplicate"),
        (&["a//b"], "empty component"),
        // A parent that was never listed as a directory: a file can't stand where one is needed.
        (&["nodir/x"], "parent directory"),
    ];
    for (paths, why) in cases {
        let mut s = std::net::TcpStream::connect(c.addr(0)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        shardcast::wire::write_frame(&mut s, shardcast::wire::Kind::Hello, 0, &hello_with_paths(&c.addr(0), paths))
            .unwrap();
        let f = shardcast::wire::read_frame(&mut s).unwrap();
        assert_eq!(f.header.kind, shardcast::wire::Kind::Reject, "{paths:?} was not refused");
        let reports = shardcast::wire::decode_reports(&f.payload).unwrap();
        let text = format!("{reports:?}");
        assert!(text.contains(why) && text.contains("BadManifest"), "{paths:?}: {text}");
        assert_eq!(bytes_under(&c.root(0).join(".staging")), 0);
        assert!(!c.root(0).join("bad").exists(), "{paths:?} staged something");
    }
    assert!(c.alive(0));
    let src = tempdir();
    write_random_file(&src.path().join("w.bin"), 4096, 3);
    c.assert_push_ok(&c.push(src.path(), "good", 1, &[]));
}

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

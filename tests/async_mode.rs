//! `push --mode async`: the push returns once the first replica has published; the replicas
//! after it are reported as behind and complete on their own.

mod util;

use std::time::Duration;

use util::*;

const MIB: u64 = 1 << 20;

#[test]
fn async_push_returns_while_the_tail_is_stopped_and_the_tail_publishes_after() {
    // The tail is stopped (SIGSTOP) as soon as it has accepted, before any chunk reaches it.
    // The data fits in the first replicas' pools (64 MiB each), so the first replica receives
    // everything and publishes; an async push must return then, with the tail still stopped and
    // unpublished. A sync push would wait for the tail (hop timeout 300 s: it is not given up).
    let mut c = Cluster::builder().serve_arg("--hop-timeout").serve_arg("300").start(3);
    let src = tempdir();
    write_random_file(&src.path().join("ckpt.bin"), 40 * MIB + 7, 4);
    let tail = c.server(2).pid().to_string();
    let mut push = Running::spawn(&mut c.push_cmd(
        &c.addrs(),
        src.path(),
        "ck",
        1,
        &["--mode", "async", "--chunk-size", "1M", "--transport", "tcp", "--json"],
    ));
    // Stop the tail the moment it has accepted (it logs "receiving" right after ACCEPT).
    let accepted = wait_until_busy(Duration::from_secs(30), || c.log(2).contains("receiving"));
    let stopped = std::process::Command::new("kill").args(["-STOP", &tail]).status().unwrap().success();
    assert!(accepted && stopped, "the tail never accepted\n{}", c.logs());
    let returned = push.wait_timeout(Duration::from_secs(60)).is_some();
    let tail_published_early = c.root(2).join("ck/1.manifest").exists();
    if !returned {
        let _ = std::process::Command::new("kill").args(["-CONT", &tail]).status();
        panic!("the async push did not return while the tail was stopped\n{}", c.logs());
    }
    let out = push.finish(Duration::from_secs(5));
    assert!(!tail_published_early, "the tail published before it was stopped: the test proves nothing");
    assert_eq!(code(&out), 0, "{}\n{}", show_output(&out), c.logs());
    let j = parse_json(&out);
    let status: Vec<&str> =
        j["replicas"].as_array().unwrap().iter().map(|r| r["status"].as_str().unwrap_or("?")).collect();
    assert_eq!(status, ["published", "behind", "behind"], "{j}");
    assert_current(&c.root(0), "ck", 1);
    assert!(!c.root(2).join("ck/1.manifest").exists(), "a stopped tail published");
    // Let it go on: it gets the rest from the replica before it and publishes by itself.
    assert!(std::process::Command::new("kill").args(["-CONT", &tail]).status().unwrap().success());
    let done = wait_until(Duration::from_secs(60), || c.root(2).join("ck/1.manifest").exists());
    assert!(done, "the tail never published after SIGCONT\n{}", c.logs());
    c.assert_published(src.path(), "ck", 1);
}

/// Polls `f` without sleeping (for a moment that passes in milliseconds).
fn wait_until_busy(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::yield_now();
    }
    false
}

//! `push --mode async`: the push returns once the first replica has published; the replicas
//! after it are reported as behind and complete on their own; `status` shows their progress.

mod util;

use std::time::Duration;

use util::*;

const MIB: u64 = 1 << 20;

#[test]
fn async_push_returns_after_the_first_replica_and_the_chain_completes() {
    let c = Cluster::start(3);
    let src = tempdir();
    write_random_file(&src.path().join("ckpt.bin"), 256 * MIB, 3);
    let out = c.push(src.path(), "ck", 1, &["--mode", "async", "--chunk-size", "1M", "--json"]);
    assert_eq!(code(&out), 0, "{}\n{}", show_output(&out), c.logs());
    let j = parse_json(&out);
    let status: Vec<&str> =
        j["replicas"].as_array().unwrap().iter().map(|r| r["status"].as_str().unwrap_or("?")).collect();
    assert_eq!(status[0], "published", "{j}");
    assert!(status[1..].iter().all(|s| *s == "published" || *s == "behind"), "{j}");
    // The first replica holds the version durably when the push returns.
    assert_current(&c.root(0), "ck", 1);
    let v = c.verify(0, "ck", &[]);
    assert_eq!(code(&v), 0, "{}", show_output(&v));
    // The others get there on their own; status shows a version in progress or published.
    for i in 1..3 {
        let mut seen_receiving = false;
        let done = wait_until(Duration::from_secs(60), || {
            let st = c.status_json(i);
            let set = st["sets"].as_array().and_then(|a| a.iter().find(|s| s["name"] == "ck")).cloned();
            seen_receiving |= set.as_ref().is_some_and(|s| s["receiving"].as_array().is_some_and(|r| !r.is_empty()));
            set.is_some_and(|s| s["current"] == 1)
        });
        assert!(done, "replica {i} never published after an async push\n{}", c.logs());
        eprintln!("replica {i}: status showed it receiving: {seen_receiving}");
    }
    c.assert_published(src.path(), "ck", 1);
}

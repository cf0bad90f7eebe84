//! A replica that is down when the push starts: the chain is closed around it (no data sent
//! twice), the others publish, the dead one is reported `unreachable`, and the exit code follows
//! `--min-replicas`.

mod util;

use tempfile::TempDir;
use util::*;

const MIB: u64 = 1 << 20;

/// Pushes 4 replicas with replica `dead` killed beforehand; returns the push's output.
fn push_with_dead(dead: usize, extra: &[&str]) -> (Cluster, TempDir, std::process::Output) {
    let mut c = Cluster::start(4);
    c.kill(dead);
    let src = tempdir();
    write_random_file(&src.path().join("ckpt.bin"), 9 * MIB + 3, 21);
    std::fs::create_dir_all(src.path().join("sub")).unwrap();
    write_random_file(&src.path().join("sub/opt.bin"), MIB, 22);
    let mut args = vec!["--chunk-size", "1M", "--json"];
    args.extend(extra);
    let out = c.push(src.path(), "ck", 1, &args);
    (c, src, out)
}

fn check_reports(c: &Cluster, dead: usize, out: &std::process::Output) {
    let j = parse_json(out);
    let reps = j["replicas"].as_array().unwrap_or_else(|| panic!("no replicas in {j}\n{}", c.logs()));
    assert_eq!(reps.len(), 4, "{j}");
    for (i, r) in reps.iter().enumerate() {
        assert_eq!(r["node"].as_str(), Some(c.addr(i).as_str()), "chain order kept: {j}");
        if i == dead {
            assert_eq!(r["status"].as_str(), Some("failed"), "{j}");
            assert_eq!(r["error"]["kind"].as_str(), Some("unreachable"), "{j}");
        } else {
            assert_eq!(r["status"].as_str(), Some("published"), "{j}\n{}", c.logs());
        }
    }
}

fn live(dead: usize) -> Vec<usize> {
    (0..4).filter(|&i| i != dead).collect()
}

#[test]
fn a_dead_first_replica_is_left_out_and_min_replicas_3_succeeds() {
    let (c, src, out) = push_with_dead(0, &["--min-replicas", "3"]);
    assert_eq!(code(&out), 0, "{}\n{}", show_output(&out), c.logs());
    check_reports(&c, 0, &out);
    c.assert_published_on(&live(0), src.path(), "ck", 1);
}

#[test]
fn a_dead_middle_replica_is_left_out_and_min_replicas_3_succeeds() {
    let (c, src, out) = push_with_dead(2, &["--min-replicas", "3"]);
    assert_eq!(code(&out), 0, "{}\n{}", show_output(&out), c.logs());
    check_reports(&c, 2, &out);
    c.assert_published_on(&live(2), src.path(), "ck", 1);
    // Closed around at once: the relay before it refused, nothing streamed to anyone twice.
    assert!(!c.log(1).contains("resum"), "a node resumed: data went twice\n{}", c.logs());
}

#[test]
fn a_dead_last_replica_with_min_replicas_4_fails_but_three_publish() {
    let (c, src, out) = push_with_dead(3, &["--min-replicas", "4"]);
    assert_ne!(code(&out), 0, "{}", show_output(&out));
    check_reports(&c, 3, &out);
    c.assert_published_on(&live(3), src.path(), "ck", 1);
}

#[test]
fn a_dead_middle_replica_by_default_fails_the_push_but_the_others_publish() {
    // Repair on, no --min-replicas: every replica is required, so the exit is "partial".
    let (c, src, out) = push_with_dead(1, &[]);
    assert_eq!(code(&out), 3, "{}", show_output(&out));
    check_reports(&c, 1, &out);
    c.assert_published_on(&live(1), src.path(), "ck", 1);
}

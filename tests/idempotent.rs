//! Pushes are idempotent: a replica that already published NAME@VERSION with the same manifest
//! reports it published ("already held"), takes no data, and the chain goes on to the replicas
//! that lack it; one that holds other bytes under that version still refuses (`version_exists`).

mod util;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use util::*;

const MIB: u64 = 1 << 20;

fn source(dir: &Path, seed: u64) {
    write_random_file(&dir.join("model.bin"), 5 * MIB + seed, seed);
    write_random_file(&dir.join("optim/state.bin"), 70_000, seed + 1);
}

/// (inode, mtime in ns, ctime in ns) of every entry under a replica's version and its manifest.
fn stamps(root: &Path, name: &str, version: u64) -> BTreeMap<String, (u64, i64, i64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.join(name).join(version.to_string())];
    stack.push(root.join(name).join(format!("{version}.manifest")));
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        let t = (m.ino(), m.mtime() * 1_000_000_000 + m.mtime_nsec(), m.ctime() * 1_000_000_000 + m.ctime_nsec());
        out.insert(p.strip_prefix(root).unwrap().display().to_string(), t);
        if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out
}

fn statuses(out: &std::process::Output) -> (Vec<String>, Vec<bool>) {
    let j = parse_json(out);
    let reps = j["replicas"].as_array().unwrap_or_else(|| panic!("no replicas in {j}"));
    (
        reps.iter().map(|r| r["status"].as_str().unwrap_or("?").to_owned()).collect(),
        reps.iter().map(|r| r["already_held"].as_bool() == Some(true)).collect(),
    )
}

/// Pushes v1 to replica `holder` only, then to all three with `holder` at `holder`'s place in
/// the chain; `extra` for the second push.
fn again_to_all(holder: usize, extra: &[&str]) {
    let c = Cluster::start(3);
    let src = tempdir();
    source(src.path(), 3);
    c.assert_push_ok(&c.push_to(&c.addr(holder), src.path(), "ck", 1, &[]));
    let before = stamps(&c.root(holder), "ck", 1);
    let mut args = vec!["--json"];
    args.extend(extra);
    let out = c.push(src.path(), "ck", 1, &args);
    assert_eq!(code(&out), 0, "{}\n{}", show_output(&out), c.logs());
    let (status, held) = statuses(&out);
    assert_eq!(status, ["published"; 3], "{}", show_output(&out));
    let want: Vec<bool> = (0..3).map(|i| i == holder).collect();
    assert_eq!(held, want, "{}", show_output(&out));
    c.assert_published(src.path(), "ck", 1);
    assert_eq!(stamps(&c.root(holder), "ck", 1), before, "the holder's files were touched");
    assert!(c.log(holder).contains("already held"), "{}", c.logs());
}

#[test]
fn a_replica_holding_the_version_first_in_the_chain_is_left_out() {
    again_to_all(0, &[]);
}

#[test]
fn a_replica_holding_the_version_in_the_middle_is_left_out() {
    again_to_all(1, &[]);
}

#[test]
fn an_incremental_push_to_a_holder_in_the_middle_is_left_out() {
    again_to_all(1, &["--incremental"]);
}

#[test]
fn a_push_of_the_same_version_to_every_holder_publishes_without_data() {
    let c = Cluster::start(2);
    let src = tempdir();
    source(src.path(), 4);
    c.assert_push_ok(&c.push(src.path(), "ck", 1, &[]));
    let before = [stamps(&c.root(0), "ck", 1), stamps(&c.root(1), "ck", 1)];
    let out = c.push(src.path(), "ck", 1, &["--json"]);
    assert_eq!(code(&out), 0, "{}\n{}", show_output(&out), c.logs());
    assert_eq!(statuses(&out), (vec!["published".to_owned(); 2], vec![true; 2]), "{}", show_output(&out));
    assert_eq!([stamps(&c.root(0), "ck", 1), stamps(&c.root(1), "ck", 1)], before);
}

#[test]
fn other_bytes_under_a_published_version_are_still_refused() {
    let c = Cluster::start(2);
    let (a, b) = (tempdir(), tempdir());
    source(a.path(), 5);
    source(b.path(), 6); // other bytes, other sizes
    let same_size = tempdir();
    write_random_file(&same_size.path().join("model.bin"), 5 * MIB + 5, 99);
    write_random_file(&same_size.path().join("optim/state.bin"), 70_000, 100);
    c.assert_push_ok(&c.push_to(&c.addr(1), a.path(), "ck", 1, &[]));
    let before = stamps(&c.root(1), "ck", 1);
    for (other, extra) in [(b.path(), &[][..]), (same_size.path(), &[][..]), (same_size.path(), &["--incremental"][..])]
    {
        let mut args = vec!["--json"];
        args.extend(extra);
        let out = c.push(other, "ck", 1, &args);
        assert_eq!(code(&out), 1, "{}", show_output(&out));
        let j = parse_json(&out);
        assert_eq!(j["error"]["kind"].as_str(), Some("version_exists"), "{j}");
        assert_eq!(j["error"]["node"].as_str(), Some(c.addr(1).as_str()), "{j}");
        assert!(!c.root(0).join("ck/1.manifest").exists(), "published despite the refusal");
    }
    assert_eq!(stamps(&c.root(1), "ck", 1), before);
    assert_tree_identical(a.path(), &c.root(1).join("ck/1"));
}

#[test]
fn a_stage_plan_run_again_leaves_out_the_nodes_that_hold_their_part() {
    // Staged once to the middle node only, then to all three: the middle one holds exactly its
    // part already (same manifest), takes no data, and the others get theirs.
    let c = Cluster::start(3);
    let src = tempdir();
    write_random_file(&src.path().join("a.bin"), (2 << 20) + 5, 1);
    write_random_file(&src.path().join("b.bin"), (1 << 20) + 7, 2);
    let plan = |nodes: &[(usize, &str)]| {
        let mut t = String::from("name = \"train\"\nversion = 3\nsource = \".\"\nchunk_size = \"1MiB\"\n");
        for (i, f) in nodes {
            t.push_str(&format!("\n[[node]]\naddr = \"{}\"\nfiles = [\"{f}\"]\n", c.addr(*i)));
        }
        let p = src.path().join(format!("plan{}.toml", nodes.len()));
        std::fs::write(&p, t).unwrap();
        p
    };
    let stage = |p: &Path| {
        run_timeout(shardcast().args(["stage", "--json", "--plan"]).arg(p), std::time::Duration::from_secs(60))
    };
    let out = stage(&plan(&[(1, "b.bin")]));
    assert_eq!(code(&out), 0, "{}", show_output(&out));
    let before = stamps(&c.root(1), "train", 3);
    let out = stage(&plan(&[(0, "a.bin"), (1, "b.bin"), (2, "a.bin")]));
    assert_eq!(code(&out), 0, "{}\n{}", show_output(&out), c.logs());
    assert_eq!(statuses(&out), (vec!["published".to_owned(); 3], vec![false, true, false]), "{}", show_output(&out));
    assert_eq!(stamps(&c.root(1), "train", 3), before, "the holder's files were touched");
    for (i, f) in [(0, "a.bin"), (1, "b.bin"), (2, "a.bin")] {
        assert_file_identical(&src.path().join(f), &c.root(i).join("train/3").join(f));
    }
}

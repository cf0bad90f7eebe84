//! Have-sets: a replica says which chunks its current version already holds, and only the
//! others travel to it (`push --incremental`, and `stage` across epochs). Byte counts come from
//! each replica's Prometheus counters; contents are checked byte for byte and with `verify`.

mod util;

use std::path::Path;

use util::*;

const MIB: u64 = 1 << 20;

fn metrics_cluster(n: usize) -> (Cluster, Vec<String>) {
    let c = Cluster::builder().serve_arg("--metrics").serve_arg("127.0.0.1:0").start(n);
    let m = (0..n).map(|i| metrics_addr(&c.log(i))).collect();
    (c, m)
}

/// Overwrites `len` bytes at `offset` of `path` with other random bytes.
fn scribble(path: &Path, offset: u64, len: usize, seed: u64) {
    use std::os::unix::fs::FileExt;
    let bytes = random_bytes(len, seed);
    std::fs::OpenOptions::new().write(true).open(path).unwrap().write_all_at(&bytes, offset).unwrap();
}

#[test]
fn an_incremental_push_moves_only_changed_chunks() {
    let (c, m) = metrics_cluster(2);
    let src = tempdir();
    write_random_file(&src.path().join("model.bin"), 10 * MIB, 1);
    write_random_file(&src.path().join("opt/state.bin"), 2 * MIB, 2);
    let out = c.push(src.path(), "ck", 1, &["--chunk-size", "1M"]);
    c.assert_push_ok(&out);
    let before: Vec<u64> = m.iter().map(|a| received(a)).collect();

    // Step 2: one chunk of the model changed, the optimizer state grew by half a chunk, and a
    // new file appeared.
    scribble(&src.path().join("model.bin"), 3 * MIB + 100, 1000, 7);
    std::fs::OpenOptions::new()
        .append(true)
        .open(src.path().join("opt/state.bin"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, &vec![5u8; (MIB / 2) as usize]))
        .unwrap();
    write_random_file(&src.path().join("new.bin"), MIB, 3);
    let out = c.push(src.path(), "ck", 2, &["--chunk-size", "1M", "--incremental", "--json"]);
    c.assert_push_ok(&out);
    let changed = MIB + MIB / 2 + MIB;
    assert_eq!(parse_json(&out)["bytes"], changed, "{}", show_output(&out));
    for (i, a) in m.iter().enumerate() {
        assert_eq!(received(a) - before[i], changed, "replica {i} received more than what changed");
    }
    c.assert_published(src.path(), "ck", 2);
    for i in 0..2 {
        let v = c.verify(i, "ck", &["--version", "1"]);
        assert_eq!(code(&v), 0, "version 1 must stay intact on replica {i}: {}", show_output(&v));
    }
}

#[test]
fn a_replica_without_the_old_version_gets_everything_through_one_that_has_it() {
    let (c, m) = metrics_cluster(2);
    let src = tempdir();
    write_random_file(&src.path().join("w.bin"), 6 * MIB + 3, 1);
    // Only the first replica has version 1.
    let out = c.push_to(&c.addr(0), src.path(), "ck", 1, &["--chunk-size", "1M"]);
    c.assert_push_ok(&out);
    scribble(&src.path().join("w.bin"), 0, 10, 9);
    let before: Vec<u64> = m.iter().map(|a| received(a)).collect();
    let out = c.push(src.path(), "ck", 2, &["--chunk-size", "1M", "--incremental"]);
    c.assert_push_ok(&out);
    // The first replica relays every chunk (the second needs them all) but stores only one.
    let size = 6 * MIB + 3;
    assert_eq!(received(&m[0]) - before[0], size);
    assert_eq!(received(&m[1]) - before[1], size);
    c.assert_published(src.path(), "ck", 2);
}

#[test]
fn staging_the_next_epoch_skips_shards_a_node_already_has() {
    let (c, m) = metrics_cluster(2);
    let src = tempdir();
    for (i, f) in ["a", "b", "c", "d"].iter().enumerate() {
        write_random_file(&src.path().join(format!("{f}.tar")), 2 * MIB + i as u64, i as u64);
    }
    let stage = |epoch: u64, n0: &[&str], n1: &[&str]| {
        let list = |v: &[&str]| v.iter().map(|f| format!("\"{f}.tar\"")).collect::<Vec<_>>().join(", ");
        let plan = src.path().join(format!("plan{epoch}.toml"));
        std::fs::write(
            &plan,
            format!(
                "name = \"ds\"\nversion = {epoch}\nsource = \".\"\nchunk_size = \"1MiB\"\n\
                 [[node]]\naddr = \"{}\"\nfiles = [{}]\n[[node]]\naddr = \"{}\"\nfiles = [{}]\n",
                c.addr(0),
                list(n0),
                c.addr(1),
                list(n1)
            ),
        )
        .unwrap();
        let out = run(shardcast().args(["stage", "--plan"]).arg(&plan));
        assert_eq!(code(&out), 0, "{}\n{}", show_output(&out), c.logs());
    };
    stage(1, &["a", "b"], &["b", "c"]);
    let before: Vec<u64> = m.iter().map(|a| received(a)).collect();
    stage(2, &["b", "c"], &["c", "d"]);
    let size = |f: &str| std::fs::metadata(src.path().join(format!("{f}.tar"))).unwrap().len();
    // Node 0 lacks c (and relays d for node 1); node 1 lacks only d.
    assert_eq!(received(&m[0]) - before[0], size("c") + size("d"));
    assert_eq!(received(&m[1]) - before[1], size("d"));
    for (i, files) in [["b", "c"], ["c", "d"]].iter().enumerate() {
        let dir = c.root(i).join("ds/2");
        let mut names: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, files.map(|f| format!("{f}.tar")));
        for f in files {
            let name = format!("{f}.tar");
            assert!(std::fs::read(dir.join(&name)).unwrap() == std::fs::read(src.path().join(&name)).unwrap());
        }
        let v = c.verify(i, "ds", &[]);
        assert_eq!(code(&v), 0, "{}", show_output(&v));
    }
}

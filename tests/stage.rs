//! `shardcast stage --plan`: each node ends up with exactly the files the plan assigns it, and
//! each chunk travels down the chain only as far as the last node that wants it.

mod util;

use std::path::Path;
use std::time::Duration;

use util::*;

fn files_under(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_str().unwrap().to_owned());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn each_node_gets_its_shards_and_chunks_go_only_as_far_as_needed() {
    let c = Cluster::builder().serve_arg("--metrics").serve_arg("127.0.0.1:0").start(3);
    let src = tempdir();
    let (a, b, cc, unused) = ((3 << 20) + 5, (2 << 20) + 7, 1 << 20, 4 << 20);
    write_random_file(&src.path().join("a.bin"), a, 1);
    write_random_file(&src.path().join("b.bin"), b, 2);
    write_random_file(&src.path().join("sub/c.bin"), cc, 3);
    write_random_file(&src.path().join("unused.bin"), unused, 4);
    let plan = src.path().join("plan.toml");
    std::fs::write(
        &plan,
        format!(
            r#"
name = "train"
version = 3
source = "."
chunk_size = "1MiB"

[[node]]
addr = "{}"
files = ["a.bin", "b.bin"]

[[node]]
addr = "{}"
files = ["b.bin", "sub/c.bin"]

[[node]]
addr = "{}"
files = ["sub/c.bin"]
"#,
            c.addr(0),
            c.addr(1),
            c.addr(2)
        ),
    )
    .unwrap();
    let out = run_timeout(shardcast().args(["stage", "--json", "--plan"]).arg(&plan), Duration::from_secs(60));
    assert_eq!(code(&out), 0, "{}", show_output(&out));
    let j = parse_json(&out);
    assert_eq!(j["ok"], true, "{j}");

    let want: [&[&str]; 3] = [&["a.bin", "b.bin"], &["b.bin", "sub/c.bin"], &["sub/c.bin"]];
    for (i, files) in want.iter().enumerate() {
        let published = c.root(i).join("train/3");
        assert_eq!(files_under(&published), *files, "node {i} holds exactly its files");
        for f in *files {
            assert!(
                std::fs::read(src.path().join(f)).unwrap() == std::fs::read(published.join(f)).unwrap(),
                "node {i}: {f} differs"
            );
        }
        let v = run_timeout(shardcast().args(["verify", "train", "--root"]).arg(c.root(i)), Duration::from_secs(30));
        assert_eq!(code(&v), 0, "node {i} does not verify: {}", show_output(&v));
    }
    // Node 0 receives a, b and (to relay) c; node 1 b and c; node 2 only c. unused.bin moves nowhere.
    let got: Vec<u64> = (0..3).map(|i| received(&metrics_addr(&c.log(i)))).collect();
    assert_eq!(got, [a + b + cc, b + cc, cc]);
}

#[test]
fn bad_plans_are_refused_with_the_reason() {
    let c = Cluster::start(1);
    let src = tempdir();
    write_random_file(&src.path().join("a.bin"), 100, 1);
    let cases = [
        ("name = \"x\"\nversion = 1\nsource = \".\"\n", "no [[node]]"),
        (
            &*format!(
                "name = \"x\"\nversion = 1\nsource = \".\"\n[[node]]\naddr = \"{}\"\nfiles = [\"../etc/passwd\"]\n",
                c.addr(0)
            ),
            "'..'",
        ),
        (
            &*format!(
                "name = \"x\"\nversion = 1\nsource = \".\"\n[[node]]\naddr = \"{}\"\nfiles = [\"missing.bin\"]\n",
                c.addr(0)
            ),
            "missing.bin",
        ),
        (
            &*format!(
                "name = \"x\"\nversion = 1\nsource = \".\"\ncolour = 1\n[[node]]\naddr = \"{}\"\nfiles = []\n",
                c.addr(0)
            ),
            "colour",
        ),
        (
            &*format!(
                "name = \"x\"\nversion = 1\nsource = \".\"\n[[node]]\naddr = \"{0}\"\nfiles = []\n[[node]]\naddr = \"{0}\"\nfiles = []\n",
                c.addr(0)
            ),
            "twice",
        ),
    ];
    for (text, why) in cases {
        let plan = src.path().join("plan.toml");
        std::fs::write(&plan, text).unwrap();
        let out = run_timeout(shardcast().args(["stage", "--plan"]).arg(&plan), Duration::from_secs(30));
        assert_ne!(code(&out), 0, "{text}");
        assert!(stderr_str(&out).contains(why), "expected {why:?} for\n{text}\n{}", show_output(&out));
    }
    assert!(!c.root(0).join("x").exists() || files_under(&c.root(0).join("x")).is_empty());
}

//! `--config FILE` and environment variables for `serve` and `push` flags: precedence command
//! line > environment > file > default, typos refused, a push whose chain comes from the file.

mod util;

use std::time::Duration;

use util::*;

/// The `keep N` a serve started with `args`/`env` reports in its `listening on` line.
fn keep_reported(args: &[&str], env: &[(&str, &str)]) -> String {
    let root = tempdir();
    let mut cmd = shardcast();
    cmd.args(args).env_remove("SHARDCAST_SERVE_KEEP");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut s = Server::start_with(cmd, root.path());
    let log = s.log();
    s.kill();
    let line = log.lines().find(|l| l.contains("listening on")).expect("listening line").to_owned();
    line.split("keep ").nth(1).and_then(|r| r.split(',').next()).expect("keep in the line").to_owned()
}

#[test]
fn command_line_beats_environment_beats_file() {
    let t = tempdir();
    let cfg = t.path().join("shardcast.toml");
    let root = t.path().join("r");
    std::fs::write(
        &cfg,
        format!("[serve]\nlisten = \"127.0.0.1:0\"\nroot = {:?}\nkeep = 5\n", root.display().to_string()),
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    assert_eq!(keep_reported(&["--config", c, "serve"], &[]), "5", "file");
    assert_eq!(keep_reported(&["--config", c, "serve"], &[("SHARDCAST_SERVE_KEEP", "7")]), "7", "env over file");
    assert_eq!(
        keep_reported(&["--config", c, "serve", "--keep", "9"], &[("SHARDCAST_SERVE_KEEP", "7")]),
        "9",
        "command line over env"
    );
    assert_eq!(keep_reported(&["serve"], &[("SHARDCAST_CONFIG", c)]), "5", "SHARDCAST_CONFIG names the file");
}

#[test]
fn unknown_keys_and_tables_are_errors() {
    let t = tempdir();
    for (body, want) in [
        ("[serve]\nkepp = 1\n", "[serve] has no setting `kepp`"),
        ("[srve]\nkeep = 1\n", "unknown table [srve]"),
        ("[serve\n", "config file"),
    ] {
        let cfg = t.path().join("bad.toml");
        std::fs::write(&cfg, body).unwrap();
        let out = run_timeout(
            shardcast().args(["--config", cfg.to_str().unwrap(), "serve", "--root", "/nonexistent"]),
            Duration::from_secs(10),
        );
        assert_eq!(code(&out), 2, "{body:?}\n{}", show_output(&out));
        assert!(stderr_str(&out).contains(want), "{body:?}: expected {want:?}\n{}", show_output(&out));
    }
}

#[test]
fn push_takes_its_chain_and_chunk_size_from_the_file() {
    let c = Cluster::start(2);
    let src = tempdir();
    make_small_tree(src.path(), 77);
    let cfg = src.path().join("push.toml");
    std::fs::write(
        &cfg,
        format!("[push]\nto = [{:?}, {:?}]\nchunk_size = \"64K\"\njson = true\n", c.addr(0), c.addr(1)),
    )
    .unwrap();
    let out = run_timeout(
        shardcast().args(["--config", cfg.to_str().unwrap(), "push"]).arg(src.path()).args([
            "--name",
            "fromfile",
            "--version",
            "1",
        ]),
        Duration::from_secs(60),
    );
    c.assert_push_ok(&out);
    let j = parse_json(&out);
    assert!(j["chunks"].as_u64().unwrap() > 1, "64K chunks from the file: {j}");
    c.assert_published(src.path(), "fromfile", 1);
}

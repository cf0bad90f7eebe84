//! The default build runs on a node without rdma-core: libibverbs is loaded at run time, never
//! linked, and nothing links hwloc, libudev or libnl.
//!
//! The node without the libraries is this host in a private mount namespace (`unshare -m`) where
//! every file of libibverbs, librdmacm, libhwloc, libudev and libnl is covered by /dev/null, so
//! the dynamic loader cannot load them. Needs root (CAP_SYS_ADMIN) for the mount namespace:
//! where it cannot be made, the test prints why it skips.

mod util;

use std::process::Command;

use util::*;

/// Libraries the default build must not need at load time.
const UNWANTED: [&str; 6] = ["libibverbs", "librdmacm", "libhwloc", "libudev", "libnl-3", "libnl-route-3"];

/// Runs its arguments where those libraries cannot be loaded (inside `unshare -m`).
const HIDE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/hide-rdma-libs.sh");

fn hidden() -> Option<Vec<&'static str>> {
    let probe = Command::new("unshare").args(["-m", HIDE, "true"]).output();
    match probe {
        Ok(o) if o.status.success() => Some(vec!["unshare", "-m", HIDE]),
        Ok(o) => {
            let why = format!("cannot hide the libraries (unshare -m + mount): {}", String::from_utf8_lossy(&o.stderr));
            util::skip("no_rdma_libs::without_rdma_libraries", why.trim());
            None
        }
        Err(e) => {
            util::skip("no_rdma_libs::without_rdma_libraries", &format!("no unshare here: {e}"));
            None
        }
    }
}

#[test]
fn the_binary_does_not_link_rdma_or_numa_libraries() {
    let out = run(Command::new("readelf").args(["-d", BIN]));
    assert_eq!(code(&out), 0, "{}", show_output(&out));
    let needed: Vec<String> =
        stdout_str(&out).lines().filter(|l| l.contains("(NEEDED)")).map(|l| l.trim().to_owned()).collect();
    assert!(!needed.is_empty(), "readelf shows no NEEDED entries at all:\n{}", stdout_str(&out));
    let bad: Vec<&String> = needed.iter().filter(|l| UNWANTED.iter().any(|u| l.contains(&format!("[{u}.")))).collect();
    assert!(bad.is_empty(), "{BIN} links {bad:?}; all NEEDED: {needed:#?}");
}

#[test]
fn without_rdma_libraries_auto_pushes_over_tcp_and_rdma_names_the_package() {
    let Some(wrapper) = hidden() else { return };
    let t = tempdir();
    let src = t.path().join("src");
    write_random_file(&src.join("a.bin"), 3 << 20, 1);
    write_random_file(&src.join("d/b.bin"), 100_000, 2);
    let root = t.path().join("replica");

    let mut serve = shardcast_via(&wrapper);
    serve.args(["serve", "--listen", "127.0.0.1:0", "--root"]).arg(&root).env("SHARDCAST_LOG", "shardcast=debug");
    let server = Server::start_with(serve, &root);
    let to = server.addr().to_string();
    let push = |v: u64, transport: &str, log: Option<&str>| {
        let mut cmd = shardcast_via(&wrapper);
        cmd.arg("push").arg(&src).args(["--name", "t", "--version", &v.to_string(), "--to", &to]);
        cmd.args(["--transport", transport]);
        if let Some(l) = log {
            cmd.env("SHARDCAST_LOG", l);
        }
        run(&mut cmd)
    };

    // auto: TCP, and the missing library said once, at debug level.
    let out = push(1, "auto", Some("shardcast=debug"));
    assert_eq!(code(&out), 0, "{}\nserver:\n{}", show_output(&out), server.log());
    assert_tree_identical(&src, &root.join("t/1"));
    let err = stderr_str(&out);
    let said = err.lines().filter(|l| l.contains("cannot load libibverbs.so.1")).collect::<Vec<_>>();
    assert_eq!(said.len(), 1, "the missing library is said once: {said:#?}\n{}", show_output(&out));
    assert!(said[0].contains("DEBUG"), "at debug level: {}", said[0]);
    assert!(said[0].contains("ibverbs-providers"), "names the package: {}", said[0]);

    // auto at the default level: silent.
    let out = push(2, "auto", None);
    assert_eq!(code(&out), 0, "{}", show_output(&out));
    assert_tree_identical(&src, &root.join("t/2"));
    assert!(!stderr_str(&out).contains("libibverbs"), "auto is silent about RDMA:\n{}", show_output(&out));

    // rdma: refused, naming the library and the package.
    for (what, out) in [
        ("push", push(3, "rdma", None)),
        (
            "serve",
            run(shardcast_via(&wrapper)
                .args(["serve", "--listen", "127.0.0.1:0", "--transport", "rdma", "--root"])
                .arg(t.path().join("other"))),
        ),
    ] {
        assert_eq!(code(&out), 2, "{what}: {}", show_output(&out));
        let lines = error_lines(&out);
        assert!(
            lines.iter().any(|l| [
                "--transport rdma",
                "cannot load libibverbs.so.1",
                "libibverbs1",
                "ibverbs-providers"
            ]
            .iter()
            .all(|n| l.contains(n))),
            "{what}: expected an error naming the library and the package; got {lines:#?}\n{}",
            show_output(&out)
        );
    }
    assert!(!root.join("t/3").exists(), "the refused push published nothing");
}

//! Mutual TLS (`--tls-cert`, `--tls-key`, `--tls-ca`): a test CA made with the openssl CLI, real
//! `serve`, `push` and `status` processes. Pushes between nodes with certificates from the CA
//! publish (encrypted ones too); a certificate from another CA, no TLS at all, or a cluster key
//! are refused before anything is staged, with a message that says what is missing.

mod util;

use std::path::{Path, PathBuf};
use std::process::Command;

use util::*;

/// A CA, and a certificate from it valid for 127.0.0.1 as a server and as a client.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out =
        Command::new("openssl").current_dir(dir).args(args).output().expect("openssl (scripts/deps.sh installs it)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn make_pki(dir: &Path, name: &str) -> Pki {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend(["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=shardcast test CA"]);
    openssl(&d, &a);
    let mut a = vec!["req"];
    a.extend(ec);
    a.extend(["-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=node"]);
    openssl(&d, &a);
    std::fs::write(
        d.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        &d,
        &[
            "x509",
            "-req",
            "-in",
            "node.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "node.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
    Pki { ca: d.join("ca.pem"), cert: d.join("node.pem"), key: d.join("node.key") }
}

fn tls_cluster(n: usize, pki: &Pki) -> Cluster {
    Cluster::builder()
        .env("SHARDCAST_TLS_CERT", pki.cert.to_str().unwrap())
        .env("SHARDCAST_TLS_KEY", pki.key.to_str().unwrap())
        .env("SHARDCAST_TLS_CA", pki.ca.to_str().unwrap())
        .start(n)
}

fn assert_nothing_staged(c: &Cluster, name: &str) {
    for i in 0..c.len() {
        assert!(!c.root(i).join(name).exists(), "replica {i} staged or published {name}");
        assert_eq!(bytes_under(&c.root(i).join(".staging")), 0, "replica {i} has staging data");
    }
}

#[test]
fn nodes_with_certificates_from_the_ca_push_plain_and_encrypted() {
    let t = tempdir();
    let pki = make_pki(t.path(), "site");
    let c = tls_cluster(2, &pki);
    let src = t.path().join("src");
    write_random_file(&src.join("a.bin"), 3 << 20, 1);
    write_random_file(&src.join("d/b.bin"), 70_000, 2);
    let out = c.push(&src, "ck", 1, &["--json"]);
    c.assert_push_ok(&out);
    c.assert_published(&src, "ck", 1);
    let out = c.push(&src, "ck", 2, &["--encrypt", "--json"]);
    c.assert_push_ok(&out);
    c.assert_published(&src, "ck", 2);
    // status authenticates the same way.
    let st = c.status_json(1);
    assert!(st.to_string().contains("\"ck\""), "{st}");
}

#[test]
fn peers_without_a_certificate_from_the_ca_are_refused() {
    let t = tempdir();
    let site = make_pki(t.path(), "site");
    let other = make_pki(t.path(), "other");
    let c = tls_cluster(2, &site);
    let src = t.path().join("src");
    write_random_file(&src.join("a.bin"), 1 << 20, 3);

    // A certificate from another CA: the handshake fails on both sides.
    let out = run(c
        .push_cmd(&c.addrs(), &src, "x", 1, &["--json"])
        .env("SHARDCAST_TLS_CERT", &other.cert)
        .env("SHARDCAST_TLS_KEY", &other.key)
        .env("SHARDCAST_TLS_CA", &other.ca));
    assert_eq!(code(&out), 1, "{}\n{}", show_output(&out), c.logs());
    let all = all_output(&out);
    assert!(all.contains("mutual TLS failed") && all.contains("unauthorized"), "{all}");
    assert_nothing_staged(&c, "x");

    // No TLS at all: told in plain words.
    let out = run(c
        .push_cmd(&c.addrs(), &src, "y", 1, &["--json"])
        .env_remove("SHARDCAST_TLS_CERT")
        .env_remove("SHARDCAST_TLS_KEY")
        .env_remove("SHARDCAST_TLS_CA"));
    assert_eq!(code(&out), 1, "{}", show_output(&out));
    assert!(all_output(&out).contains("requires mutual TLS"), "{}", show_output(&out));
    assert_nothing_staged(&c, "y");

    // A cluster key and TLS at once: a usage error.
    let key = t.path().join("k");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef-key").unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let out = run(c.push_cmd(&c.addrs(), &src, "z", 1, &[]).arg("--key-file").arg(&key));
    assert_eq!(code(&out), 2, "{}", show_output(&out));
    assert!(all_output(&out).contains("two ways to authenticate"), "{}", show_output(&out));

    // The servers still serve: a good push right after.
    let out = c.push(&src, "good", 1, &[]);
    c.assert_push_ok(&out);
    c.assert_published(&src, "good", 1);
    assert!(c.logs().contains("mutual TLS failed"), "{}", c.logs());
}

/// A node holds one way to authenticate: `serve` with TLS and an ACL (which lists cluster keys)
/// is a usage error, and so is `serve` with TLS and a key file, before anything listens.
#[test]
fn serve_refuses_tls_with_an_acl_or_a_key_file() {
    let t = tempdir();
    let pki = make_pki(t.path(), "site");
    let key = t.path().join("k");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef-key").unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let acl = t.path().join("acl.toml");
    std::fs::write(&acl, "[[key]]\nfile = \"k\"\nnames = [\"ckpt-\"]\n").unwrap();
    let serve = |extra: &[&std::ffi::OsStr]| {
        let mut cmd = shardcast();
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--root"]).arg(t.path().join("root"));
        cmd.arg("--tls-cert").arg(&pki.cert).arg("--tls-key").arg(&pki.key).arg("--tls-ca").arg(&pki.ca);
        run(cmd.args(extra))
    };
    let out = serve(&["--acl".as_ref(), acl.as_os_str()]);
    assert_eq!(code(&out), 2, "{}", show_output(&out));
    assert!(all_output(&out).contains("--acl lists cluster keys"), "{}", show_output(&out));
    let out = serve(&["--key-file".as_ref(), key.as_os_str()]);
    assert_eq!(code(&out), 2, "{}", show_output(&out));
    assert!(all_output(&out).contains("two ways to authenticate"), "{}", show_output(&out));
    assert!(!all_output(&out).contains("listening on"), "{}", show_output(&out));
}

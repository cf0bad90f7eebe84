//! The emulated cluster of `scripts/cluster.sh`: a primary and 3 replicas, each in its own network
//! namespace, each node's egress shaped with tc. One push goes down the chain through it; every
//! replica's bytes are compared with the source, the shapers' counters show that the data took
//! the path p -> r1 -> r2 -> r3 at the shaped rate, and the cluster is torn down leaving nothing.
//! With two rails (`--rails 2`), each rail is a switch of its own, and a push over rail 1's
//! addresses crosses rail 1's links only; `rail-down` cuts one rail of one node.
//!
//! Skipped, with the reason printed, only where network namespaces cannot be created: not root,
//! no `ip`, or `ip netns add` refused. The cluster is named `sct` (namespaces `sct-br`, `sct-p`,
//! `sct-r1`…), apart from the benchmark's `sc`, so the two never tear each other down.

mod util;

use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use util::*;

/// SC_CLUSTER of the test's cluster.
const PREFIX: &str = "sct";
const REPLICAS: usize = 3;
/// Egress rate of every node, in Mbit/s (tc: decimal units).
const RATE_MBIT: u64 = 500;
const PORT: u16 = 7071;
const MIB: u64 = 1 << 20;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join("cluster.sh")
}

/// `scripts/cluster.sh ARGS...` for the test's cluster.
fn cluster_sh(args: &[&str]) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(script()).args(args).env("SC_CLUSTER", PREFIX).stdin(Stdio::null());
    run_timeout(&mut cmd, Duration::from_secs(120))
}

fn ip(args: &[&str]) -> Output {
    run_timeout(Command::new("ip").args(args), Duration::from_secs(30))
}

/// The test cluster's namespaces that exist right now.
fn our_namespaces() -> Vec<String> {
    let out = ip(&["netns", "list"]);
    let pre = format!("{PREFIX}-");
    stdout_str(&out)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&pre))
        .map(str::to_string)
        .collect()
}

/// Why this machine cannot run the test, if it cannot. The probe is the name the bridge
/// namespace will get, so an interrupted probe is removed by the next `down` like the rest.
fn netns_unavailable() -> Option<String> {
    let probe = format!("{PREFIX}-br");
    let _ = Command::new("ip").args(["netns", "del", &probe]).stderr(Stdio::null()).status();
    match Command::new("ip").args(["netns", "add", &probe]).stdin(Stdio::null()).output() {
        Err(e) => Some(format!("cannot run `ip` ({e}); iproute2 comes with scripts/deps.sh")),
        Ok(o) if !o.status.success() => {
            Some(format!("`ip netns add` failed: {}", String::from_utf8_lossy(&o.stderr).trim()))
        }
        Ok(_) => {
            let o = ip(&["netns", "del", &probe]);
            assert!(o.status.success(), "ip netns del {probe} failed\n{}", show_output(&o));
            None
        }
    }
}

/// Serialises concurrent runs of this test (two `cargo test` at once would share the names).
/// Held until dropped.
struct Lock {
    _file: File,
}

impl Lock {
    fn take() -> Lock {
        let path = std::env::temp_dir().join(format!("shardcast-cluster-test-{PREFIX}.lock"));
        let f = File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        // SAFETY: flock on a file descriptor we own.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock {}: {}", path.display(), std::io::Error::last_os_error());
        Lock { _file: f }
    }
}

/// The test's lock when network namespaces can be made here; else None, the skip printed and
/// counted under NAME.
fn netns_or_skip(name: &str) -> Option<Lock> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip(name, "not running as root: network namespaces need CAP_SYS_ADMIN");
        return None;
    }
    let lock = Lock::take();
    match netns_unavailable() {
        Some(why) => {
            skip(name, &why);
            None
        }
        None => Some(lock),
    }
}

/// A running cluster: its servers die and its namespaces go when it is dropped, whether the test
/// passed or panicked.
struct NetCluster {
    // Declared first: the servers are killed before the namespaces go.
    servers: Vec<Server>,
    addrs: Vec<String>,
    dir: tempfile::TempDir,
}

impl NetCluster {
    fn up(n: usize, rate_mbit: u64) -> NetCluster {
        Self::up_with(n, rate_mbit, &[])
    }

    fn up_with(n: usize, rate_mbit: u64, serve_args: &[&str]) -> NetCluster {
        Self::up_rail(n, rate_mbit, &[], 0, serve_args)
    }

    /// `cluster.sh up N --rate RATE --mtu 1500 UP_ARGS…`, every replica serving on its address
    /// on rail RAIL (`@railK` in SERVE_ARGS stands for the node's own address on rail K).
    fn up_rail(n: usize, rate_mbit: u64, up_args: &[&str], rail: usize, serve_args: &[&str]) -> NetCluster {
        let (n_arg, rate) = (n.to_string(), format!("{rate_mbit}mbit"));
        let mut args = vec!["up", n_arg.as_str(), "--rate", rate.as_str(), "--mtu", "1500"];
        args.extend_from_slice(up_args);
        let out = cluster_sh(&args);
        assert!(out.status.success(), "cluster.sh up failed\n{}", show_output(&out));
        let dir = tempdir();
        let mut c = NetCluster { servers: Vec::new(), addrs: Vec::new(), dir };
        for k in 1..=n {
            let node = format!("r{k}");
            let out = cluster_sh(&["addr", &node, &rail.to_string()]);
            assert!(out.status.success(), "cluster.sh addr {node}\n{}", show_output(&out));
            let addr = format!("{}:{PORT}", stdout_str(&out).trim());
            let root = c.dir.path().join(&node);
            let ns = format!("{PREFIX}-{node}");
            let mut cmd = shardcast_via(&["ip", "netns", "exec", &ns]);
            // `@railK` in SERVE_ARGS: this node's address on rail K.
            let args = serve_args.iter().map(|a| match a.strip_prefix("@rail") {
                Some(k) => stdout_str(&cluster_sh(&["addr", &node, k])).trim().to_owned(),
                None => a.to_string(),
            });
            cmd.arg("serve").arg("--listen").arg(&addr).arg("--root").arg(&root).args(args);
            let srv = Server::start_with(cmd, &root);
            assert_eq!(srv.addr().to_string(), addr, "r{k} listens on the wrong address");
            c.servers.push(srv);
            c.addrs.push(addr);
        }
        c
    }

    fn root(&self, k: usize) -> PathBuf {
        self.servers[k - 1].root().to_path_buf()
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for (i, srv) in self.servers.iter().enumerate() {
            let _ = writeln!(s, "=== r{} ({}) stderr ===\n{}", i + 1, srv.addr(), srv.log());
        }
        s
    }

    /// `shardcast push SRC --name NAME --version V --to r1,…,rN --json EXTRA…` from the primary's
    /// namespace.
    fn push(&self, src: &Path, name: &str, version: u64, extra: &[&str]) -> Output {
        run(&mut self.push_cmd(src, name, version, extra))
    }

    fn push_cmd(&self, src: &Path, name: &str, version: u64, extra: &[&str]) -> Command {
        let ns = format!("{PREFIX}-p");
        let mut cmd = shardcast_via(&["ip", "netns", "exec", &ns]);
        cmd.arg("push")
            .arg(src)
            .args(["--name", name, "--version", &version.to_string(), "--to", &self.addrs.join(","), "--json"])
            .args(extra);
        cmd
    }

    /// Bytes the root qdisc on NODE's link has sent since `up`.
    fn shaper_bytes(node: &str) -> u64 {
        let ns = format!("{PREFIX}-{node}");
        let out = run_timeout(
            Command::new("tc").args(["-n", &ns, "-s", "-j", "qdisc", "show", "dev", "scv0"]),
            Duration::from_secs(30),
        );
        assert!(out.status.success(), "tc -s qdisc show in {ns}\n{}", show_output(&out));
        let v: serde_json::Value = serde_json::from_str(stdout_str(&out).trim())
            .unwrap_or_else(|e| panic!("tc -j output is not JSON ({e})\n{}", show_output(&out)));
        let root = v
            .as_array()
            .and_then(|qs| qs.iter().find(|q| q.get("root").and_then(|r| r.as_bool()) == Some(true)))
            .unwrap_or_else(|| panic!("{ns}: no root qdisc on scv0: {v}"));
        root.get("bytes").and_then(|b| b.as_u64()).unwrap_or_else(|| panic!("{ns}: qdisc without bytes: {root}"))
    }

    fn down(&mut self) {
        self.servers.clear();
        let out = cluster_sh(&["down"]);
        assert!(out.status.success(), "cluster.sh down failed\n{}", show_output(&out));
    }
}

impl Drop for NetCluster {
    fn drop(&mut self) {
        self.servers.clear();
        let _ = cluster_sh(&["down"]);
    }
}

#[test]
fn chain_through_shaped_namespaces() {
    // Straight to stderr: libtest captures eprintln! of passing tests.
    let skip = |why: &str| skip("cluster::chain_through_shaped_namespaces", why);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("not running as root: network namespaces need CAP_SYS_ADMIN");
    }
    // Before the probe: the probe uses a name of the cluster's.
    let _lock = Lock::take();
    if let Some(why) = netns_unavailable() {
        return skip(&why);
    }
    let mut c = NetCluster::up(REPLICAS, RATE_MBIT);

    // A small mixed tree plus one file of many chunks, so that every hop forwards while it
    // receives.
    let src = tempdir();
    make_small_tree(src.path(), 31);
    write_random_file(&src.path().join("shard-0.bin"), 24 * MIB + 12_345, 32);
    let bytes = total_bytes(src.path());

    let out = c.push(src.path(), "ckpt", 1, &["--chunk-size", "1MiB"]);
    if code(&out) != 0 {
        panic!("push through the cluster failed\n{}\n{}", show_output(&out), c.logs());
    }
    let j = parse_json(&out);
    assert_eq!(j["ok"], true, "{j}");
    assert_eq!(j["bytes"].as_u64(), Some(bytes), "{j}");
    let reps = j["replicas"].as_array().unwrap_or_else(|| panic!("no replicas array: {j}"));
    assert_eq!(reps.len(), REPLICAS, "{j}");
    for (i, r) in reps.iter().enumerate() {
        assert_eq!(r["status"], "published", "replica {i}: {j}");
        assert_eq!(r["node"].as_str(), Some(c.addrs[i].as_str()), "chain order: {j}");
    }

    // Every replica holds the tree byte for byte, and its own verify agrees.
    for k in 1..=REPLICAS {
        let root = c.root(k);
        assert_tree_identical(src.path(), &root.join("ckpt").join("1"));
        assert_current(&root, "ckpt", 1);
        let v = verify(&root, "ckpt", &[]);
        assert_eq!(code(&v), 0, "r{k}: verify failed\n{}", show_output(&v));
    }

    // The data crossed the shaped links p -> r1 -> r2 -> r3: each of p, r1, r2 sent at least the
    // payload through its shaper, r3 (the tail) only acknowledgements and its report.
    let sent: Vec<(String, u64)> =
        ["p", "r1", "r2", "r3"].iter().map(|n| (n.to_string(), NetCluster::shaper_bytes(n))).collect();
    for (node, b) in &sent[..3] {
        assert!(*b >= bytes, "{node}'s shaper sent {b} bytes, less than the {bytes} pushed: {sent:?}");
    }
    assert!(sent[3].1 < bytes / 10, "the tail sent {} bytes: {sent:?}", sent[3].1);

    // ... at no more than the shaped rate: loopback would be an order of magnitude faster. The
    // shaper's bucket (128 KiB) is the only head start it gives.
    let seconds = j["seconds"].as_f64().unwrap_or_else(|| panic!("no seconds: {j}"));
    let floor = 0.9 * (bytes * 8) as f64 / (RATE_MBIT * 1_000_000) as f64;
    assert!(
        seconds >= floor,
        "pushed {bytes} bytes in {seconds:.3} s: faster than {RATE_MBIT} Mbit/s allows ({floor:.3} s)"
    );

    // Teardown leaves nothing: no namespace of ours, and nothing of ours on the host's links.
    c.down();
    drop(c);
    let left = our_namespaces();
    assert!(left.is_empty(), "namespaces left after down: {left:?}");
    let links = stdout_str(&ip(&["-o", "link", "show"]));
    assert!(!links.contains("scv"), "a cluster link leaked into the host namespace:\n{links}");
}

#[test]
fn a_link_taken_down_mid_push_is_repaired_around() {
    let skip = |why: &str| skip("cluster::a_link_taken_down_mid_push_is_repaired_around", why);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("not running as root: network namespaces need CAP_SYS_ADMIN");
    }
    let _lock = Lock::take();
    if let Some(why) = netns_unavailable() {
        return skip(&why);
    }
    // 2 s hop deadlines (r1 waits 2 x 2 s: two replicas after it).
    let c = NetCluster::up_with(REPLICAS, RATE_MBIT, &["--hop-timeout", "2"]);
    let src = tempdir();
    let size = 96 * MIB;
    write_random_file(&src.path().join("ckpt.bin"), size, 41);
    let mut push =
        Running::spawn(&mut c.push_cmd(src.path(), "ck", 1, &["--chunk-size", "1MiB", "--hop-timeout", "2"]));
    // r2's link goes down once about half has reached it.
    let staging = c.root(2).join(".staging");
    let half = wait_until(Duration::from_secs(60), || bytes_under(&staging) >= size / 2 || push.try_wait().is_some());
    assert!(half && push.try_wait().is_none(), "the push ended before the link could be cut\n{}", c.logs());
    let out = ip(&["-n", &format!("{PREFIX}-r2"), "link", "set", "scv0", "down"]);
    assert!(out.status.success(), "ip link set down\n{}", show_output(&out));
    assert!(push.wait_timeout(Duration::from_secs(90)).is_some(), "push hangs after the link went down\n{}", c.logs());
    let out = push.finish(Duration::from_secs(5));
    let j = parse_json(&out);
    let reps = j["replicas"].as_array().unwrap_or_else(|| panic!("no replicas: {j}\n{}", c.logs()));
    let status: Vec<&str> = reps.iter().map(|r| r["status"].as_str().unwrap_or("?")).collect();
    assert_eq!(status, ["published", "failed", "published"], "{j}\n{}", c.logs());
    assert_eq!(reps[1]["node"].as_str(), Some(c.addrs[1].as_str()), "{j}");
    for k in [1, 3] {
        assert_tree_identical(src.path(), &c.root(k).join("ck").join("1"));
        let v = verify(&c.root(k), "ck", &[]);
        assert_eq!(code(&v), 0, "r{k}: {}", show_output(&v));
    }
    assert!(!c.root(2).join("ck/1.manifest").exists(), "r2 published without its link");
}

/// `ip -s link` byte counters (tx, rx) of DEV in NODE's namespace.
fn link_bytes(node: &str, dev: &str) -> (u64, u64) {
    let ns = format!("{PREFIX}-{node}");
    let out = ip(&["-n", &ns, "-j", "-s", "link", "show", "dev", dev]);
    assert!(out.status.success(), "ip -s link show {dev} in {ns}\n{}", show_output(&out));
    let v: serde_json::Value = serde_json::from_str(stdout_str(&out).trim())
        .unwrap_or_else(|e| panic!("ip -j output is not JSON ({e})\n{}", show_output(&out)));
    let stats = &v[0]["stats64"];
    let get = |dir: &str| stats[dir]["bytes"].as_u64().unwrap_or_else(|| panic!("{ns} {dev}: no {dir} bytes: {v}"));
    (get("tx"), get("rx"))
}

/// Whether a TCP connection from NODE's namespace to ADDR (host:port) is set up within 2 s.
fn connects(node: &str, addr: &str) -> bool {
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    let ns = format!("{PREFIX}-{node}");
    let code = format!("import socket; socket.create_connection(('{host}', {port}), timeout=2).close()");
    let out =
        run_timeout(Command::new("ip").args(["netns", "exec", &ns, "python3", "-c", &code]), Duration::from_secs(30));
    out.status.success()
}

#[test]
fn two_rails_each_reach_only_their_own_rail() {
    let skip = |why: &str| skip("cluster::two_rails_each_reach_only_their_own_rail", why);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("not running as root: network namespaces need CAP_SYS_ADMIN");
    }
    let _lock = Lock::take();
    if let Some(why) = netns_unavailable() {
        return skip(&why);
    }
    // Two rails, both directions shaped, rail 1 slower (a slow NIC); the replicas serve on rail 1.
    let c =
        NetCluster::up_rail(REPLICAS, RATE_MBIT, &["--rails", "2", "--rail-rate", "1=400mbit", "--ingress"], 1, &[]);

    // Every node has one address per rail, each in its rail's subnet.
    let nodes = stdout_str(&cluster_sh(&["nodes"])).to_string();
    let lines: Vec<Vec<&str>> = nodes.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(lines.len(), REPLICAS + 1, "{nodes}");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l.len(), 4, "NODE NS ADDR0 ADDR1: {nodes}");
        assert_eq!(l[2], format!("10.77.0.{}", 10 + i), "{nodes}");
        assert_eq!(l[3], format!("10.77.1.{}", 10 + i), "{nodes}");
    }
    for k in 1..=REPLICAS {
        assert_eq!(c.addrs[k - 1], format!("10.77.1.{}:{PORT}", 10 + k), "serving on rail 1");
    }

    // One switch per rail: rail K's port of every node is on bridge K, and nowhere else.
    let out = ip(&["-n", &format!("{PREFIX}-br"), "-j", "link", "show"]);
    let links: serde_json::Value = serde_json::from_str(stdout_str(&out).trim()).expect("ip -j link");
    let master = |port: &str| -> String {
        let l = links.as_array().unwrap().iter().find(|l| l["ifname"] == port);
        l.and_then(|l| l["master"].as_str()).unwrap_or_else(|| panic!("no bridge port {port}: {links}")).to_string()
    };
    for node in ["p", "r1", "r2", "r3"] {
        assert_eq!(master(&format!("scv{node}")), "scvbr", "{node} rail 0");
        assert_eq!(master(&format!("scv{node}k1")), "scvbr1", "{node} rail 1");
    }
    // Both directions shaped: the bridge-side ports have the rail's shaper too.
    for (port, rate) in [("scvr1", "500Mbit"), ("scvr1k1", "400Mbit")] {
        let out = run_timeout(
            Command::new("tc").args(["-n", &format!("{PREFIX}-br"), "class", "show", "dev", port]),
            Duration::from_secs(30),
        );
        assert!(stdout_str(&out).contains(&format!("rate {rate}")), "{port}: {}", show_output(&out));
    }

    // A push over rail 1's addresses.
    let before: Vec<_> = ["p", "r1", "r2"].iter().map(|n| (link_bytes(n, "scv0").0, link_bytes(n, "scv1").0)).collect();
    let src = tempdir();
    write_random_file(&src.path().join("shard.bin"), 16 * MIB + 4321, 7);
    let bytes = total_bytes(src.path());
    let out = c.push(src.path(), "rails", 1, &["--chunk-size", "1MiB"]);
    if code(&out) != 0 {
        panic!("push over rail 1 failed\n{}\n{}", show_output(&out), c.logs());
    }
    let j = parse_json(&out);
    let reps = j["replicas"].as_array().unwrap_or_else(|| panic!("no replicas: {j}"));
    assert!(reps.iter().all(|r| r["status"] == "published"), "{j}");
    for k in 1..=REPLICAS {
        assert_tree_identical(src.path(), &c.root(k).join("rails").join("1"));
    }
    // The data went over rail 1 only: p, r1 and r2 each sent it on rail 1, next to nothing on 0.
    for (i, node) in ["p", "r1", "r2"].iter().enumerate() {
        let (r0, r1) = (link_bytes(node, "scv0").0 - before[i].0, link_bytes(node, "scv1").0 - before[i].1);
        assert!(r1 >= bytes, "{node} sent {r1} bytes on rail 1, less than the {bytes} pushed");
        assert!(r0 < MIB, "{node} sent {r0} bytes on rail 0 during a push over rail 1");
    }

    // rail-down cuts exactly that rail: r2's rail-1 address is unreachable, its rail-0 link still
    // carries traffic; rail-up brings it back.
    assert!(connects("p", &c.addrs[1]), "p cannot reach r2 on rail 1");
    let down = cluster_sh(&["rail-down", "r2", "1"]);
    assert!(down.status.success(), "{}", show_output(&down));
    assert!(!connects("p", &c.addrs[1]), "p reaches r2 on rail 1 with r2's rail 1 down");
    let rx0 = link_bytes("r2", "scv0").1;
    // Nothing listens on rail 0 (refused), but the SYN arrives there.
    let _ = connects("p", &format!("10.77.0.12:{PORT}"));
    assert!(link_bytes("r2", "scv0").1 > rx0, "r2's rail 0 received nothing while its rail 1 was down");
    let up = cluster_sh(&["rail-up", "r2", "1"]);
    assert!(up.status.success(), "{}", show_output(&up));
    assert!(connects("p", &c.addrs[1]), "p cannot reach r2 on rail 1 after rail-up");
}

/// A push of 96 MiB over two lanes on two rails of 200 Mbit/s (every replica announces both,
/// the chain names rail 0), with rail `rail` taken down on every node once about half reached
/// the last replica. Checks that every replica published identical bytes that pass `verify`;
/// returns the cluster and the push's output.
fn push_across_a_rail_cut(rail: &str, seed: u64) -> (NetCluster, std::process::Output) {
    let c = NetCluster::up_rail(REPLICAS, 200, &["--rails", "2"], 0, &["--rail", "@rail0", "--rail", "@rail1"]);
    let src = tempdir();
    let size = 96 * MIB;
    write_random_file(&src.path().join("ckpt.bin"), size, seed);
    let mut args = vec!["--chunk-size", "1MiB", "--lanes", "2"];
    args.extend(["--rail", "10.77.0.10", "--rail", "10.77.1.10"]);
    let mut push = Running::spawn(&mut c.push_cmd(src.path(), "ck", 1, &args));
    let staging = c.root(REPLICAS).join(".staging");
    let half = wait_until(Duration::from_secs(60), || bytes_under(&staging) >= size / 2 || push.try_wait().is_some());
    assert!(half && push.try_wait().is_none(), "the push ended before the rail could be cut\n{}", c.logs());
    for node in ["p", "r1", "r2", "r3"] {
        let out = cluster_sh(&["rail-down", node, rail]);
        assert!(out.status.success(), "rail-down {node} {rail}\n{}", show_output(&out));
    }
    assert!(
        push.wait_timeout(Duration::from_secs(120)).is_some(),
        "push hangs after rail {rail} went down\n{}",
        c.logs()
    );
    let out = push.finish(Duration::from_secs(5));
    let j = parse_json(&out);
    let reps = j["replicas"].as_array().unwrap_or_else(|| panic!("no replicas: {j}\n{}", c.logs()));
    assert!(reps.iter().all(|r| r["status"] == "published"), "{j}\n{}\n{}", show_output(&out), c.logs());
    assert_eq!(code(&out), 0, "{}", show_output(&out));
    // A lane on the rail that went down was found dead by what it sent going unacknowledged (not
    // by the hop's 10 s stall deadline), and the chain was repaired over the other rail.
    assert!(j["repairs"].as_u64().is_some_and(|n| n >= 1), "no repair: {j}\n{}", c.logs());
    let said = format!("{}\n{}", stderr_str(&out), c.logs());
    assert!(said.contains("nothing it sent was acknowledged for 500 ms"), "no lane found dead\n{said}");
    for k in 1..=REPLICAS {
        assert_tree_identical(src.path(), &c.root(k).join("ck").join("1"));
        let v = verify(&c.root(k), "ck", &[]);
        assert_eq!(code(&v), 0, "r{k}: {}", show_output(&v));
    }
    (c, out)
}

#[test]
fn a_rail_taken_down_mid_push_leaves_every_lane_on_the_other_rail_and_every_replica_identical() {
    let Some(_lock) = netns_or_skip("cluster::a_rail_taken_down_mid_push_leaves_every_lane_on_the_other_rail") else {
        return;
    };
    let (c, _) = push_across_a_rail_cut("1", 43);
    // The repair's lanes all ran on rail 0: r1's relay log says so for its lane 1 to r2.
    let log = c.servers[0].log();
    assert!(log.contains("rail 1 at 10.77.1.12:7071"), "r1 never found r2's rail 1 down\n{log}");
}

/// Rail 0 carries each hop's first connection (the control frames). When it goes down on every
/// node mid-push, the repair reaches each node over the other rail it announced, and the push
/// completes on every replica (without that, every node counted as unreachable).
#[test]
fn rail_0_taken_down_mid_push_moves_the_chain_to_rail_1_and_every_replica_publishes() {
    let Some(_lock) = netns_or_skip("cluster::rail_0_taken_down_mid_push_moves_the_chain_to_rail_1") else {
        return;
    };
    let (c, out) = push_across_a_rail_cut("0", 47);
    // The repair's hops went over rail 1: the primary says so for r1, r1's relay for r2.
    let err = stderr_str(&out);
    assert!(err.contains("goes over its rail 1 (10.77.1.11:7071)"), "the primary did not move to r1's rail 1\n{err}");
    let log = c.servers[0].log();
    assert!(log.contains("goes over its rail 1 (10.77.1.12:7071)"), "r1 did not move to r2's rail 1\n{log}");
}

//! Shared helpers for the integration tests, in the spirit of ripgrep's `tests/util.rs`:
//! real `shardcast serve` processes on loopback, a runner that never hangs, data generators and a
//! tree comparison that explains what differs.
//!
//! Every process started here is killed when its owner is dropped (and, as a backstop, gets
//! SIGKILL if the test thread that spawned it goes away), every temp dir is removed on drop.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Path of the binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_shardcast");

/// How long a server may take to print its `listening on` line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Default bound for one CLI invocation (push, status, verify).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(180);

/// A fresh temp dir with a recognisable prefix; removed on drop.
pub fn tempdir() -> TempDir {
    tempfile::Builder::new().prefix("shardcast-test-").tempdir().expect("create temp dir")
}

/// A `Command` for the binary under test with a clean, predictable environment.
pub fn shardcast() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env("NO_COLOR", "1").stdin(Stdio::null());
    // Backstop against orphans if the test thread dies without running destructors.
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            Ok(())
        });
    }
    cmd
}

fn describe(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            let _ = write!(s, "{}={} ", k.to_string_lossy(), v.to_string_lossy());
        }
    }
    s.push_str(&cmd.get_program().to_string_lossy());
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Running commands with a deadline
// ---------------------------------------------------------------------------------------------

/// A child process whose stdout and stderr are drained by threads (so it never blocks on a full
/// pipe). Killed on drop if still running.
pub struct Running {
    child: Child,
    desc: String,
    out: Option<JoinHandle<Vec<u8>>>,
    err: Option<JoinHandle<Vec<u8>>>,
    started: Instant,
}

fn drain<R: Read + Send + 'static>(mut r: R) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

impl Running {
    pub fn spawn(cmd: &mut Command) -> Running {
        let desc = describe(cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn `{desc}`: {e}"));
        let out = drain(child.stdout.take().unwrap());
        let err = drain(child.stderr.take().unwrap());
        Running { child, desc, out: Some(out), err: Some(err), started: Instant::now() }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// `Some(status)` once the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits up to `timeout`; `None` (process still running) on timeout.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn collect(&mut self, status: ExitStatus) -> Output {
        let stdout = self.out.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default();
        let stderr = self.err.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default();
        Output { status, stdout, stderr }
    }

    /// Waits up to `timeout` for the process to finish. On timeout kills it and panics with
    /// whatever it printed.
    pub fn finish(mut self, timeout: Duration) -> Output {
        match self.wait_timeout(timeout) {
            Some(st) => self.collect(st),
            None => {
                let _ = self.child.kill();
                let st = self.child.wait().expect("wait after kill");
                let out = self.collect(st);
                panic!("`{}` did not finish within {:?}; killed it.\n{}", self.desc, timeout, show_output(&out));
            }
        }
    }

    pub fn description(&self) -> &str {
        &self.desc
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `cmd` to completion, at most `timeout` (panics and kills it past that).
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    Running::spawn(cmd).finish(timeout)
}

/// Runs `cmd` to completion with the default deadline.
pub fn run(cmd: &mut Command) -> Output {
    run_timeout(cmd, CMD_TIMEOUT)
}

pub fn stdout_str(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr_str(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// stdout and stderr together, for "the message names X" checks.
pub fn all_output(out: &Output) -> String {
    format!("{}\n{}", stdout_str(out), stderr_str(out))
}

pub fn show_output(out: &Output) -> String {
    format!(
        "status: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}\n--------------",
        out.status,
        stdout_str(out),
        stderr_str(out)
    )
}

/// Exit code, or -SIGNAL when killed by a signal.
pub fn code(out: &Output) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    out.status.code().unwrap_or_else(|| -out.status.signal().unwrap_or(0))
}

/// The `error: ...` lines of stderr.
pub fn error_lines(out: &Output) -> Vec<String> {
    stderr_str(out).lines().map(strip_ansi).filter(|l| l.trim_start().starts_with("error:")).collect()
}

/// Removes ANSI escape sequences (CSI ... letter).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c2 in chars.by_ref() {
                    if c2.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Parses stdout as exactly one JSON object.
pub fn parse_json(out: &Output) -> serde_json::Value {
    let s = stdout_str(out);
    match serde_json::from_str::<serde_json::Value>(s.trim()) {
        Ok(v) if v.is_object() => v,
        Ok(v) => panic!("stdout is JSON but not an object: {v}\n{}", show_output(out)),
        Err(e) => panic!("stdout is not a single JSON object ({e})\n{}", show_output(out)),
    }
}

// ---------------------------------------------------------------------------------------------
// Servers and clusters
// ---------------------------------------------------------------------------------------------

/// One `shardcast serve` process.
pub struct Server {
    child: Child,
    addr: SocketAddr,
    root: PathBuf,
    log: Arc<Mutex<Vec<u8>>>,
    drainer: Option<JoinHandle<()>>,
}

impl Server {
    /// Starts `shardcast serve --listen 127.0.0.1:0 --root ROOT EXTRA...` and waits for its
    /// `listening on` line.
    pub fn start(root: &Path, extra: &[String], env: &[(String, String)]) -> Server {
        let mut cmd = shardcast();
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--root")
            .arg(root)
            .args(extra)
            .envs(env.iter().map(|(k, v)| (k, v)));
        Server::start_with(cmd, root)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Everything the server wrote to stderr so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned()
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        if let Some(h) = self.drainer.take() {
            let _ = h.join();
        }
    }
}

/// A `Command` that runs the binary under test through `wrapper` (e.g. `["ip", "netns", "exec",
/// NS]`: the wrapper must exec it, so that the child's PID is the binary's), with the same
/// environment and orphan backstop as [`shardcast`].
pub fn shardcast_via(wrapper: &[&str]) -> Command {
    let (prog, rest) = wrapper.split_first().expect("shardcast_via: empty wrapper");
    let mut cmd = Command::new(prog);
    cmd.args(rest).arg(BIN).env("NO_COLOR", "1").stdin(Stdio::null());
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec. The death
    // signal survives the exec of a wrapper that is not set-user-ID.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            Ok(())
        });
    }
    cmd
}

impl Server {
    /// Starts a `shardcast serve` that the caller built (e.g. with [`shardcast_via`] and its own
    /// `--listen ADDR --root ROOT …`), and waits for its `listening on` line. `root` is what
    /// [`Server::root`] reports.
    pub fn start_with(mut cmd: Command, root: &Path) -> Server {
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let desc = describe(&cmd);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn `{desc}`: {e}"));
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<SocketAddr>();
        let log2 = Arc::clone(&log);
        // Reads stderr line by line for the whole life of the child: announces the port once,
        // keeps everything in `log` for failure messages, and keeps the pipe from filling up.
        let drainer = thread::spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut tx = Some(tx);
            let mut line = Vec::new();
            loop {
                line.clear();
                match r.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                log2.lock().unwrap().extend_from_slice(&line);
                if tx.is_some() {
                    let text = strip_ansi(&String::from_utf8_lossy(&line));
                    if let Some(addr) = parse_listening(&text) {
                        let _ = tx.take().unwrap().send(addr);
                    }
                }
            }
        });
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let addr = loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(a) => break a,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let st = child.wait().ok();
                    let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
                    panic!("`{desc}` exited ({st:?}) before printing `listening on`; stderr:\n{text}");
                }
            }
            if let Ok(Some(st)) = child.try_wait() {
                thread::sleep(Duration::from_millis(100));
                if let Ok(a) = rx.try_recv() {
                    break a;
                }
                let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
                panic!("`{desc}` exited ({st}) before printing `listening on`; stderr:\n{text}");
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
                panic!("`{desc}` printed no `listening on` line within {STARTUP_TIMEOUT:?}; stderr so far:\n{text}");
            }
        };
        Server { child, addr, root: root.to_path_buf(), log, drainer: Some(drainer) }
    }
}

/// A TCP connection to `dst` from the local address `src` (another loopback address stands in
/// for another host).
pub fn connect_from(src: std::net::Ipv4Addr, dst: &str) -> std::io::Result<std::net::TcpStream> {
    use std::os::fd::FromRawFd;
    let dst: std::net::SocketAddrV4 = dst.parse().expect("an IPv4 address");
    let sockaddr = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor this function owns, with sockaddr_in values
    // that live across each call; the descriptor goes to a TcpStream, which closes it.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let s = std::net::TcpStream::from_raw_fd(fd);
        let a = sockaddr(src, 0);
        if libc::bind(fd, (&raw const a).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let d = sockaddr(*dst.ip(), dst.port());
        if libc::connect(fd, (&raw const d).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(s)
    }
}

/// Finds `listening on <addr>` in a log line and parses the address.
pub fn parse_listening(line: &str) -> Option<SocketAddr> {
    let idx = line.find("listening on ")?;
    let rest = &line[idx + "listening on ".len()..];
    rest.split(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == '=' || c == ',')
        .filter(|t| !t.is_empty())
        .take(4)
        .find_map(|t| t.trim_end_matches(['.', ';', ')']).parse::<SocketAddr>().ok())
}

/// Options for a cluster.
#[derive(Default, Clone)]
pub struct ClusterBuilder {
    env: Vec<(String, String)>,
    serve_args: Vec<String>,
    roots: Vec<Option<PathBuf>>,
}

impl ClusterBuilder {
    /// Environment variable set on every serve process and on every command the cluster runs
    /// (push, status, verify).
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_string(), v.to_string()));
        self
    }

    /// Extra arguments for every `serve`.
    pub fn serve_arg(mut self, a: &str) -> Self {
        self.serve_args.push(a.to_string());
        self
    }

    /// Use `root` as the root of server `i` instead of a fresh temp dir.
    pub fn root(mut self, i: usize, root: &Path) -> Self {
        if self.roots.len() <= i {
            self.roots.resize(i + 1, None);
        }
        self.roots[i] = Some(root.to_path_buf());
        self
    }

    pub fn start(self, n: usize) -> Cluster {
        let dir = tempdir();
        let mut servers = Vec::with_capacity(n);
        for i in 0..n {
            let root = match self.roots.get(i).cloned().flatten() {
                Some(r) => r,
                None => dir.path().join(format!("r{i}")),
            };
            servers.push(Server::start(&root, &self.serve_args, &self.env));
        }
        Cluster { servers, env: self.env, _dir: dir }
    }
}

/// `n` replica servers on loopback, each with its own root under one temp dir.
pub struct Cluster {
    // Declared first so the servers are killed before their roots are removed.
    servers: Vec<Server>,
    env: Vec<(String, String)>,
    _dir: TempDir,
}

impl Cluster {
    pub fn start(n: usize) -> Cluster {
        Cluster::builder().start(n)
    }

    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    pub fn len(&self) -> usize {
        self.servers.len()
    }

    pub fn addr(&self, i: usize) -> String {
        self.servers[i].addr().to_string()
    }

    /// Comma-joined list of every server address, in chain order.
    pub fn addrs(&self) -> String {
        self.addr_list(&(0..self.len()).collect::<Vec<_>>())
    }

    /// Comma-joined list of the given servers' addresses.
    pub fn addr_list(&self, idx: &[usize]) -> String {
        idx.iter().map(|&i| self.addr(i)).collect::<Vec<_>>().join(",")
    }

    pub fn root(&self, i: usize) -> PathBuf {
        self.servers[i].root().to_path_buf()
    }

    pub fn server(&mut self, i: usize) -> &mut Server {
        &mut self.servers[i]
    }

    pub fn alive(&mut self, i: usize) -> bool {
        self.servers[i].alive()
    }

    /// SIGKILL server `i`.
    pub fn kill(&mut self, i: usize) {
        self.servers[i].kill();
    }

    pub fn log(&self, i: usize) -> String {
        self.servers[i].log()
    }

    /// All server logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for (i, srv) in self.servers.iter().enumerate() {
            let log = srv.log();
            // Keep messages readable: the last 8 KiB of each log.
            let tail = if log.len() > 8192 {
                let mut start = log.len() - 8192;
                while !log.is_char_boundary(start) {
                    start += 1;
                }
                format!("[...]{}", &log[start..])
            } else {
                log
            };
            let _ = writeln!(s, "=== server {i} ({}) stderr ===\n{tail}", srv.addr());
        }
        s
    }

    /// A `shardcast` command carrying the cluster's environment.
    pub fn cmd(&self) -> Command {
        let mut c = shardcast();
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// `shardcast push SRC --name NAME --version V --to <all addrs> EXTRA...`
    pub fn push(&self, src: &Path, name: &str, version: u64, extra: &[&str]) -> Output {
        self.push_to(&self.addrs(), src, name, version, extra)
    }

    /// Same as `push`, to an explicit `--to` list.
    pub fn push_to(&self, to: &str, src: &Path, name: &str, version: u64, extra: &[&str]) -> Output {
        run(&mut self.push_cmd(to, src, name, version, extra))
    }

    pub fn push_cmd(&self, to: &str, src: &Path, name: &str, version: u64, extra: &[&str]) -> Command {
        let mut c = self.cmd();
        c.arg("push")
            .arg(src)
            .arg("--name")
            .arg(name)
            .arg("--version")
            .arg(version.to_string())
            .arg("--to")
            .arg(to)
            .args(extra);
        c
    }

    /// `shardcast status ADDR --json`, parsed.
    pub fn status_json(&self, i: usize) -> serde_json::Value {
        let out = run_timeout(self.cmd().arg("status").arg(self.addr(i)).arg("--json"), Duration::from_secs(60));
        assert_eq!(code(&out), 0, "status {} failed\n{}\n{}", self.addr(i), show_output(&out), self.logs());
        parse_json(&out)
    }

    /// `shardcast verify --root ROOT(i) NAME EXTRA...`
    pub fn verify(&self, i: usize, name: &str, extra: &[&str]) -> Output {
        verify(&self.root(i), name, extra)
    }

    /// Panics (with push output and server logs) unless the push exited 0.
    pub fn assert_push_ok(&self, out: &Output) {
        if code(out) != 0 {
            panic!("push expected to succeed\n{}\n{}", show_output(out), self.logs());
        }
    }

    /// Everything a successful push promises, on every server of the cluster.
    pub fn assert_published(&self, src: &Path, name: &str, version: u64) {
        let idx: Vec<usize> = (0..self.len()).collect();
        self.assert_published_on(&idx, src, name, version);
    }

    /// Everything a successful push promises, on the given servers: the tree byte for byte,
    /// the manifest, `current -> V`, `verify` exits 0, `status --json` lists the version.
    pub fn assert_published_on(&self, idx: &[usize], src: &Path, name: &str, version: u64) {
        for &i in idx {
            let root = self.root(i);
            let vdir = root.join(name).join(version.to_string());
            let ctx = format!("replica {i} ({}) root {}", self.addr(i), root.display());
            assert!(vdir.is_dir(), "{ctx}: {} is not a directory\n{}", vdir.display(), self.logs());
            let src_meta = fs::metadata(src).unwrap();
            if src_meta.is_dir() {
                assert_tree_identical(src, &vdir);
            } else {
                let fname = src.file_name().unwrap();
                let names = list_names(&vdir);
                assert_eq!(
                    names,
                    vec![fname.to_string_lossy().into_owned()],
                    "{ctx}: a single-file push must land as NAME/V/<file name>"
                );
                assert_file_identical(src, &vdir.join(fname));
            }
            let manifest = root.join(name).join(format!("{version}.manifest"));
            assert!(manifest.is_file(), "{ctx}: {} missing", manifest.display());
            assert_current(&root, name, version);
            let out = verify(&root, name, &[]);
            assert_eq!(code(&out), 0, "{ctx}: verify failed\n{}", show_output(&out));
            let st = self.status_json(i);
            let set = status_set(&st, name).unwrap_or_else(|| panic!("{ctx}: status has no set {name:?}: {st}"));
            let versions = set_versions(set);
            assert!(versions.contains(&version), "{ctx}: status does not list version {version}: {st}");
        }
    }
}

/// The set called `name` in a `status --json` object.
pub fn status_set<'a>(st: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    st.get("sets")?.as_array()?.iter().find(|s| s.get("name").and_then(|n| n.as_str()) == Some(name))
}

/// Sorted versions of a status set.
pub fn set_versions(set: &serde_json::Value) -> Vec<u64> {
    let mut v: Vec<u64> = set
        .get("versions")
        .and_then(|v| v.as_array())
        .unwrap_or_else(|| panic!("set without versions array: {set}"))
        .iter()
        .map(|x| json_u64(x).unwrap_or_else(|| panic!("version is not a u64: {x}")))
        .collect();
    v.sort_unstable();
    v
}

/// A u64 given as a JSON number or a decimal string.
pub fn json_u64(v: &serde_json::Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// `ROOT/NAME/current` is a symlink whose target is `V`.
pub fn assert_current(root: &Path, name: &str, version: u64) {
    let cur = root.join(name).join("current");
    let meta = fs::symlink_metadata(&cur).unwrap_or_else(|e| panic!("{}: {e}", cur.display()));
    assert!(meta.file_type().is_symlink(), "{} is not a symlink", cur.display());
    let target = fs::read_link(&cur).unwrap();
    assert_eq!(target, PathBuf::from(version.to_string()), "{} points to the wrong place", cur.display());
    assert!(cur.is_dir(), "{} -> {} does not resolve to a directory", cur.display(), target.display());
}

/// `shardcast verify --root ROOT NAME EXTRA...`
pub fn verify(root: &Path, name: &str, extra: &[&str]) -> Output {
    run_timeout(shardcast().arg("verify").arg("--root").arg(root).arg(name).args(extra), Duration::from_secs(120))
}

/// A loopback address nothing listens on (bound, then released).
pub fn dead_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a.to_string()
}

/// Polls `f` every 10 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------------

/// xorshift64* stream: deterministic, fast, no crates.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        // Mix the seed so small seeds give unrelated streams; never zero.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        XorShift((z ^ (z >> 31)) | 1)
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let b = self.next_u64().to_le_bytes();
            let n = rest.len();
            rest.copy_from_slice(&b[..n]);
        }
    }
}

/// `size` pseudo-random bytes.
pub fn random_bytes(size: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; size];
    XorShift::new(seed).fill(&mut v);
    v
}

/// Writes `size` deterministic pseudo-random bytes to `path` (in 1 MiB blocks), creating
/// parent dirs.
pub fn write_random_file(path: &Path, size: u64, seed: u64) {
    if let Some(p) = path.parent() {
        fs::create_dir_all(p).unwrap();
    }
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut rng = XorShift::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
}

/// `write_random_file` then chmod.
pub fn write_random_file_mode(path: &Path, size: u64, seed: u64, mode: u32) {
    write_random_file(path, size, seed);
    set_mode(path, mode);
}

pub fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {:o} {}: {e}", mode, path.display()));
}

/// Sum of regular file sizes under `dir` (or the size of a file).
pub fn total_bytes(p: &Path) -> u64 {
    scan_tree(p).values().filter(|e| e.kind == Kind::File).map(|e| e.size).sum::<u64>()
        + if p.is_file() { fs::metadata(p).unwrap().len() } else { 0 }
}

/// Names in a directory, sorted.
pub fn list_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Bytes allocated to regular files under `dir` (0 when missing).
pub fn bytes_under(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                // Allocated bytes, not the length: staged files are created at full length
                // (sparse) before any data arrives.
                total += std::os::unix::fs::MetadataExt::blocks(&m) * 512;
            }
        }
    }
    total
}

// ---------------------------------------------------------------------------------------------
// Tree comparison
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub kind: Kind,
    pub mode: u32,
    pub size: u64,
}

/// Every entry below `root` (not `root` itself), keyed by relative path.
pub fn scan_tree(root: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut map = BTreeMap::new();
    if !root.is_dir() {
        return map;
    }
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let rd = fs::read_dir(&dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()));
        for e in rd {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            let m = fs::symlink_metadata(e.path()).unwrap();
            let ft = m.file_type();
            let kind = if ft.is_symlink() {
                Kind::Symlink
            } else if ft.is_dir() {
                Kind::Dir
            } else if ft.is_file() {
                Kind::File
            } else {
                Kind::Other
            };
            if kind == Kind::Dir {
                stack.push(r.clone());
            }
            map.insert(r, Entry { kind, mode: m.mode() & 0o7777, size: m.len() });
        }
    }
    map
}

/// First offset at which two files differ: `None` when identical. Reads in 1 MiB blocks.
pub fn first_difference(a: &Path, b: &Path) -> Option<(u64, Option<u8>, Option<u8>)> {
    let mut fa = BufReader::with_capacity(1 << 20, File::open(a).unwrap());
    let mut fb = BufReader::with_capacity(1 << 20, File::open(b).unwrap());
    let mut off = 0u64;
    loop {
        let ba = fa.fill_buf().unwrap();
        let bb = fb.fill_buf().unwrap();
        if ba.is_empty() && bb.is_empty() {
            return None;
        }
        if ba.is_empty() || bb.is_empty() {
            return Some((off, ba.first().copied(), bb.first().copied()));
        }
        let n = ba.len().min(bb.len());
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap();
            return Some((off + i as u64, Some(ba[i]), Some(bb[i])));
        }
        fa.consume(n);
        fb.consume(n);
        off += n as u64;
    }
}

fn byte_str(b: Option<u8>) -> String {
    b.map(|b| format!("0x{b:02x}")).unwrap_or_else(|| "EOF".to_string())
}

/// Differences between two regular files (size, mode, bytes).
fn file_diffs(rel: &str, a: &Path, b: &Path, out: &mut Vec<String>) {
    let ma = fs::metadata(a).unwrap();
    let mb = fs::metadata(b).unwrap();
    if ma.len() != mb.len() {
        out.push(format!("size differs: {rel}: source {} bytes, replica {} bytes", ma.len(), mb.len()));
    }
    if ma.mode() & 0o7777 != mb.mode() & 0o7777 {
        out.push(format!("mode differs: {rel}: source {:o}, replica {:o}", ma.mode() & 0o7777, mb.mode() & 0o7777));
    }
    if let Some((off, x, y)) = first_difference(a, b) {
        out.push(format!(
            "content differs: {rel}: first difference at offset {off} (source {}, replica {})",
            byte_str(x),
            byte_str(y)
        ));
    }
}

fn fail_with(what: &str, a: &Path, b: &Path, diffs: &[String]) -> ! {
    let mut msg =
        format!("{what} differ: source {} vs replica {} ({} difference(s)):\n", a.display(), b.display(), diffs.len());
    for d in diffs.iter().take(40) {
        let _ = writeln!(msg, "  {d}");
    }
    if diffs.len() > 40 {
        let _ = writeln!(msg, "  ... and {} more", diffs.len() - 40);
    }
    panic!("{msg}");
}

/// Two regular files have the same size, mode and bytes.
pub fn assert_file_identical(src: &Path, replica: &Path) {
    assert!(replica.is_file(), "replica file {} missing", replica.display());
    let mut diffs = Vec::new();
    file_diffs(&src.file_name().unwrap_or(OsStr::new("")).to_string_lossy(), src, replica, &mut diffs);
    if !diffs.is_empty() {
        fail_with("files", src, replica, &diffs);
    }
}

/// The trees below `src` and `replica` hold the same paths (files, dirs including empty ones),
/// with the same kinds, permission modes, sizes and bytes.
pub fn assert_tree_identical(src: &Path, replica: &Path) {
    assert!(replica.is_dir(), "replica dir {} missing", replica.display());
    let a = scan_tree(src);
    let b = scan_tree(replica);
    let mut diffs = Vec::new();
    for (rel, ea) in &a {
        let r = rel.display().to_string();
        match b.get(rel) {
            None => diffs.push(format!("only in source: {r} ({:?})", ea.kind)),
            Some(eb) if eb.kind != ea.kind => {
                diffs.push(format!("kind differs: {r}: source {:?}, replica {:?}", ea.kind, eb.kind))
            }
            Some(eb) => match ea.kind {
                Kind::File => file_diffs(&r, &src.join(rel), &replica.join(rel), &mut diffs),
                Kind::Dir if ea.mode != eb.mode => {
                    diffs.push(format!("mode differs: {r}/: source {:o}, replica {:o}", ea.mode, eb.mode))
                }
                _ => {}
            },
        }
    }
    for (rel, eb) in &b {
        if !a.contains_key(rel) {
            diffs.push(format!("only in replica: {} ({:?})", rel.display(), eb.kind));
        }
    }
    if !diffs.is_empty() {
        fail_with("trees", src, replica, &diffs);
    }
}

/// A small mixed tree: a few files of various sizes, a nested dir, an empty dir.
pub fn make_small_tree(dir: &Path, seed: u64) {
    fs::create_dir_all(dir).unwrap();
    write_random_file_mode(&dir.join("a.bin"), 10_000, seed, 0o644);
    write_random_file_mode(&dir.join("empty.bin"), 0, seed + 1, 0o644);
    write_random_file_mode(&dir.join("sub/b.bin"), 300_000, seed + 2, 0o600);
    write_random_file_mode(&dir.join("sub/deeper/run.sh"), 77, seed + 3, 0o755);
    fs::create_dir_all(dir.join("emptydir")).unwrap();
}

/// The metrics address a `serve --metrics 127.0.0.1:0` logged.
#[allow(dead_code)]
pub fn metrics_addr(log: &str) -> String {
    log.lines()
        .find_map(|l| l.split("metrics on http://").nth(1))
        .and_then(|r| r.split('/').next())
        .unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"))
        .to_owned()
}

/// Bytes of chunk payload a node received (summed over its upstream peers).
#[allow(dead_code)]
pub fn received(maddr: &str) -> u64 {
    metric_sum(maddr, "shardcast_received_bytes_total{")
}

/// The sum of the metric lines that start with `prefix` at `http://MADDR/metrics`.
#[allow(dead_code)]
pub fn metric_sum(maddr: &str, prefix: &str) -> u64 {
    let mut s = std::net::TcpStream::connect(maddr).expect("connect to the metrics port");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    std::io::Write::write_fmt(&mut s, format_args!("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")).unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut s, &mut text).unwrap();
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The stderr has an `error:` line that contains every needle (case-sensitive).
pub fn assert_error_line(out: &Output, needles: &[&str]) {
    let lines = error_lines(out);
    assert!(
        lines.iter().any(|l| needles.iter().all(|n| l.contains(n))),
        "expected an `error:` line containing {needles:?}; got {lines:?}\n{}",
        show_output(out)
    );
}

/// Unmounts its mount point when dropped (lazily when it is busy).
pub struct Unmount(pub PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.0).status().map(|s| s.success()).unwrap_or(false);
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Skips
// ---------------------------------------------------------------------------------------------

/// Skips the calling test for `reason`: prints it, and appends `TEST: REASON` to the file named
/// by `SHARDCAST_SKIP_LOG` (scripts/test.sh sets it, counts the lines and lists them at the end
/// of the run: cargo captures a passing test's output, so a printed reason alone is never seen).
/// Every skip in tests/ goes through here; the caller returns right after.
pub fn skip(test: &str, reason: &str) {
    eprintln!("SKIPPED {test}: {reason}");
    if let Some(path) = std::env::var_os("SHARDCAST_SKIP_LOG")
        && let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(path)
    {
        // One write(2) per line: tests skip in parallel, and O_APPEND keeps a single write whole
        // (writeln! may split a line into several writes that interleave with another test's).
        let line = format!("{test}: {reason}\n");
        let _ = std::io::Write::write_all(&mut f, line.as_bytes());
    }
}

/// An ordinary (plain, sync, TCP) HELLO for `name@version` of `manifest`, to `you` and then
/// `downstream`: the one place tests build a HELLO by hand, so a new HELLO field is added once.
#[allow(dead_code)]
pub fn plain_hello(
    name: &str,
    version: u64,
    you: &str,
    downstream: Vec<String>,
    manifest: shardcast::manifest::Manifest,
) -> shardcast::wire::Hello {
    shardcast::wire::Hello {
        name: name.into(),
        version,
        mode: shardcast::wire::Mode::Sync,
        transport: shardcast::transport::Transport::Tcp,
        keep: 0,
        flags: shardcast::wire::HelloFlags::default(),
        you: you.into(),
        downstream,
        manifest,
        wants: Vec::new(),
        grant: Default::default(),
        lanes: 1,
    }
}

/// A TCP proxy on a free loopback port in front of `target`: for each connection it accepts it
/// connects to `target` and hands both streams to `serve(first, client, server)` (`first`: the
/// proxy's first connection), which forwards what passes, or tampers with it. Returns its address.
#[allow(dead_code)]
pub fn proxy(
    target: String,
    serve: impl Fn(bool, std::net::TcpStream, std::net::TcpStream) + Send + 'static,
) -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    thread::spawn(move || {
        let mut first = true;
        for client in l.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = std::net::TcpStream::connect(&target) else { return };
            serve(std::mem::take(&mut first), client, server);
        }
    });
    addr
}

/// Writes a cluster key file `name` holding `secret` into `dir`, readable by its owner only (as
/// `serve` and `push` require).
pub fn key_file(dir: &Path, name: &str, secret: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, secret).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// `n` replicas with the key at `key` (through the environment, which the cluster's own
/// commands share: `status`, the checks of `assert_published`).
pub fn keyed_cluster(n: usize, key: &Path) -> Cluster {
    Cluster::builder().env("SHARDCAST_KEY_FILE", key.to_str().unwrap()).start(n)
}

/// A temporary directory holding the cluster key `secret` (`cluster.key`) and a source
/// `src/a.bin` of `size` random bytes (`seed`), and `n` replicas keyed with it.
#[allow(dead_code)]
pub fn keyed_source(n: usize, secret: &str, size: u64, seed: u64) -> (TempDir, Cluster, PathBuf) {
    let t = tempdir();
    let c = keyed_cluster(n, &key_file(t.path(), "cluster.key", secret));
    let src = t.path().join("src");
    write_random_file(&src.join("a.bin"), size, seed);
    (t, c, src)
}

/// `n` replicas with the key at `key` and the access list `acl` (the TOML of `serve --acl`,
/// written to `acl.toml` in `dir`, where its `file = ...` key files are looked up).
#[allow(dead_code)]
pub fn acl_cluster(n: usize, key: &Path, dir: &Path, acl: &str) -> Cluster {
    let path = dir.join("acl.toml");
    fs::write(&path, acl).unwrap();
    Cluster::builder()
        .env("SHARDCAST_KEY_FILE", key.to_str().unwrap())
        .serve_arg("--acl")
        .serve_arg(path.to_str().unwrap())
        .start(n)
}

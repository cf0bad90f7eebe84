//! Crash consistency under power loss. Killing a process loses nothing the kernel already has;
//! a power cut loses everything that was not synced. The replica's root here is a lazyfs mount
//! (tests/lazyfs: a FUSE filesystem that keeps what was made durable by fsync/fdatasync of a
//! file or fsyncdir of a directory, and drops the rest on command; its model is documented at the
//! top of that file). A real `shardcast serve` child process runs with `--root` inside it.
//!
//! For every crash point k (the k-th mutating operation the filesystem sees during a push: chunk
//! writes, journal appends and fsyncs, staging mkdirs, publish's renames, the `current` flip):
//! the power goes off at k, the replica is SIGKILLed, the unsynced state is dropped, and then,
//! every time:
//! 1. a reader of NAME/current sees the old version or the complete new one; every version with
//!    a manifest passes `shardcast verify` and equals its source byte for byte;
//! 2. the restarted replica takes the same push again (`--incremental`: a resume) and publishes
//!    exactly the source (verify + byte comparison): resume never publishes other bytes;
//! 3. a push that reported success survives a power cut right after it;
//! 4. the next version pushes and publishes correctly on the same root.
//!
//! Crash points run in the CI form: every operation of a first push into an empty root, every
//! operation of a second version's push over a published one (which reuses unchanged chunks),
//! and a second power cut during the resume for half of them. `SHARDCAST_CRASH_LONG=1` runs
//! more data and a second cut after every point. The test prints a summary (points, violations
//! by kind) and fails on any violation. It needs root and /dev/fuse, else it is skipped (counted
//! through `util::skip`).

mod lazyfs;
mod util;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::Duration;

use util::*;

const TEST: &str = "crash::power_cuts_during_push_and_publish_never_expose_wrong_bytes";
const NAME: &str = "ckpt";

/// The source tree of version `v`: some files change between versions, some keep chunks (so the
/// next version reuses them), one appears at version 2.
fn make_source(dir: &Path, v: u64, scale: u64) {
    let a_len = 200_000 * scale as usize;
    let mut a = random_bytes(a_len, 1);
    let region = (v as usize * 20_000) % (a_len - 20_000);
    a[region..region + 20_000].copy_from_slice(&random_bytes(20_000, 100 + v));
    fs::create_dir_all(dir.join("sub")).unwrap();
    fs::write(dir.join("a.bin"), &a).unwrap();
    set_mode(&dir.join("a.bin"), 0o644);
    write_random_file_mode(&dir.join("sub/b.bin"), 150_000 * scale, 10 + v, 0o600);
    write_random_file_mode(&dir.join("c.bin"), 40_000, 3, 0o644);
    if v >= 2 {
        write_random_file_mode(&dir.join("sub/d.bin"), 60_000 * scale, 20 + v, 0o640);
    }
    fs::create_dir_all(dir.join("emptydir")).unwrap();
}

fn push_cmd(src: &Path, v: u64, addr: &str) -> Command {
    let mut c = shardcast();
    c.arg("push").arg(src).args([
        "--name",
        NAME,
        "--version",
        &v.to_string(),
        "--to",
        addr,
        "--chunk-size",
        "8K",
        "--incremental",
        "--json",
    ]);
    c
}

/// Differences between a source tree and a published one (kinds, modes, sizes, bytes).
fn tree_diff(src: &Path, replica: &Path) -> Vec<String> {
    if !replica.is_dir() {
        return vec![format!("{} is not a directory", replica.display())];
    }
    let (a, b) = (scan_tree(src), scan_tree(replica));
    let mut out = Vec::new();
    for (rel, ea) in &a {
        match b.get(rel) {
            None => out.push(format!("missing: {}", rel.display())),
            Some(eb) if eb.kind != ea.kind || eb.mode != ea.mode || eb.size != ea.size => out.push(format!(
                "{}: source {:?} {:o} {} bytes, replica {:?} {:o} {} bytes",
                rel.display(),
                ea.kind,
                ea.mode,
                ea.size,
                eb.kind,
                eb.mode,
                eb.size
            )),
            Some(_) if ea.kind == Kind::File => {
                if let Some((off, _, _)) = first_difference(&src.join(rel), &replica.join(rel)) {
                    out.push(format!("{}: bytes differ from offset {off}", rel.display()));
                }
            }
            Some(_) => {}
        }
    }
    for rel in b.keys() {
        if !a.contains_key(rel) {
            out.push(format!("extra: {}", rel.display()));
        }
    }
    out
}

struct Ctx {
    mnt: PathBuf,
    fs: lazyfs::Handle,
    /// Source tree of each version.
    src: BTreeMap<u64, PathBuf>,
    points: u64,
    resume_cuts: u64,
    already_published: u64,
    /// Violations by kind and scenario.
    violations: BTreeMap<String, Vec<String>>,
    scenario: &'static str,
}

impl Ctx {
    fn violation(&mut self, kind: &'static str, at: &str, what: String) {
        let list = self.violations.entry(format!("{kind} ({})", self.scenario)).or_default();
        if list.len() < 5 {
            eprintln!("VIOLATION {kind} at {at}: {what}");
        }
        list.push(format!("{at}: {what}"));
    }

    fn start(&self) -> Server {
        Server::start(&self.mnt, &[], &[])
    }

    /// `verify` and a byte comparison of published version `v`.
    fn check_version(&self, v: u64) -> Result<(), String> {
        let out = verify(&self.mnt, NAME, &["--version", &v.to_string()]);
        if code(&out) != 0 {
            return Err(format!("verify {NAME}@{v} failed: {}", all_output(&out).trim()));
        }
        let Some(src) = self.src.get(&v) else { return Err(format!("{NAME}@{v} was never pushed")) };
        let diffs = tree_diff(src, &self.mnt.join(NAME).join(v.to_string()));
        if diffs.is_empty() { Ok(()) } else { Err(format!("{NAME}@{v} differs from its source: {}", diffs.join("; "))) }
    }

    fn current(&self) -> Option<u64> {
        fs::read_link(self.mnt.join(NAME).join("current"))
            .ok()
            .map(|t| t.to_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("current -> {}", t.display())))
    }

    /// What a reader sees right after power comes back: `current` is `old` or the complete
    /// `new`, and every version with a manifest is whole.
    fn check_after_cut(&mut self, at: &str, old: Option<u64>, new: u64) {
        let set = self.mnt.join(NAME);
        let mut published: Vec<u64> = fs::read_dir(&set)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".manifest")?.parse().ok())
            .collect();
        published.sort_unstable();
        for &v in &published {
            if let Err(e) = self.check_version(v) {
                self.violation("published-version-damaged", at, e);
            }
        }
        let cur = self.current();
        match (cur, old) {
            (None, Some(o)) => self.violation("current-lost", at, format!("{NAME}/current is gone (was {o})")),
            (Some(c), _) if Some(c) != old && c != new => {
                self.violation("current-wrong", at, format!("{NAME}/current -> {c}, neither {old:?} nor {new}"))
            }
            (Some(c), _) if !published.contains(&c) => {
                self.violation("current-unpublished", at, format!("{NAME}/current -> {c}, which has no manifest"))
            }
            _ => {}
        }
    }

    /// Runs a push of `v` with the power cut at operation `cut` (None: no cut). Returns whether
    /// the power was cut and the push's exit code. The replica is dead after a cut.
    fn push_with_cut(&mut self, server: &mut Server, v: u64, cut: Option<u64>) -> (bool, i32, String) {
        let src = self.src[&v].clone();
        self.fs.arm(cut);
        let mut p = Running::spawn(&mut push_cmd(&src, v, &server.addr().to_string()));
        loop {
            if self.fs.is_off() || p.try_wait().is_some() {
                break;
            }
            thread::sleep(Duration::from_millis(2));
        }
        self.fs.disarm();
        let off = self.fs.is_off();
        if off {
            server.kill();
        }
        let out = p.finish(Duration::from_secs(120));
        if off {
            // The process is reaped; give late FUSE releases a moment, then power on.
            thread::sleep(Duration::from_millis(20));
            self.fs.power_on();
        }
        (off, code(&out), all_output(&out))
    }

    /// After the power came back at crash point `at`: restart, resume `v`, check, cut right after
    /// the acknowledged push, check, then push `v + 1`.
    fn recover(&mut self, at: &str, v: u64, second_cut: Option<u64>) {
        let mut server = self.start();
        let was_published = self.mnt.join(NAME).join(format!("{v}.manifest")).exists();
        let (off, rc, out) = self.push_with_cut(&mut server, v, second_cut);
        let (rc, out) = if off {
            self.resume_cuts += 1;
            let at2 = format!("{at}, then cut again during the resume at op {}", second_cut.unwrap_or(0));
            self.check_after_cut(&at2, self.current(), v);
            server = self.start();
            let (off, rc, out) = self.push_with_cut(&mut server, v, None);
            assert!(!off);
            (rc, out)
        } else {
            (rc, out)
        };
        let published_before = was_published || self.mnt.join(NAME).join(format!("{v}.manifest")).exists();
        if rc != 0 {
            if published_before && out.contains("exist") {
                self.already_published += 1;
            } else {
                self.violation("resume-failed", at, format!("the repeated push of {v} exited {rc}: {}", out.trim()));
                return;
            }
        }
        if let Err(e) = self.check_version(v) {
            self.violation("resume-published-wrong-bytes", at, e);
        }
        if self.current() != Some(v) {
            self.violation("resume-current", at, format!("after the repeated push, current is {:?}", self.current()));
        }
        // A push that reported success survives a power cut.
        self.fs.cut_now();
        server.kill();
        self.fs.power_on();
        let lost = match (self.current(), self.check_version(v)) {
            (Some(c), Ok(())) if c == v => None,
            (c, Ok(())) => Some(format!("current is {c:?}")),
            (c, Err(e)) => Some(format!("current is {c:?}; {e}")),
        };
        if let Some(what) = lost {
            self.violation(
                "acknowledged-push-lost",
                at,
                format!("power cut right after the push of {v} returned: {what}"),
            );
        }
        // The next version on the same root.
        let mut server = self.start();
        let (_, rc, out) = self.push_with_cut(&mut server, v + 1, None);
        if rc != 0 {
            self.violation("next-version-failed", at, format!("push of {} exited {rc}: {}", v + 1, out.trim()));
        } else if let Err(e) = self.check_version(v + 1) {
            self.violation("next-version-wrong", at, e);
        }
        server.kill();
    }

    /// Every crash point of a push of `v` over `base` (a snapshot where `old` is current).
    fn scenario(&mut self, label: &'static str, base: &lazyfs::Snapshot, old: Option<u64>, v: u64, long: bool) {
        self.scenario = label;
        // How many mutating operations the push takes without a cut.
        self.fs.restore(base);
        let mut server = self.start();
        let (off, rc, out) = self.push_with_cut(&mut server, v, None);
        assert!(!off && rc == 0, "{label}: the push without a cut failed: {out}\n{}", server.log());
        let n = self.fs.ops();
        server.kill();
        eprintln!("{label}: the push takes {n} mutating operations");
        assert!(n >= 50, "{label}: only {n} operations: the filesystem does not see the push");
        for k in 1..=n {
            self.fs.restore(base);
            let mut server = self.start();
            let (off, rc, _) = self.push_with_cut(&mut server, v, Some(k));
            let at = format!("{label}, cut at op {k}/{n}: {}", self.fs.cut_op());
            if !off {
                server.kill();
                continue;
            }
            self.points += 1;
            self.check_after_cut(&at, old, v);
            if rc == 0 && self.current() != Some(v) {
                self.violation(
                    "acknowledged-push-lost",
                    &at,
                    format!("the push exited 0, current is {:?}", self.current()),
                );
            }
            let second = (long || k % 2 == 0).then(|| (k * 7919) % n + 1);
            self.recover(&at, v, second);
        }
    }
}

#[test]
fn power_cuts_during_push_and_publish_never_expose_wrong_bytes() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip(TEST, "mounting a FUSE filesystem with mount(2) needs root");
    }
    if !Path::new("/dev/fuse").exists() {
        return skip(TEST, "/dev/fuse is missing (no FUSE in this kernel or container)");
    }
    let long = std::env::var("SHARDCAST_CRASH_LONG").is_ok_and(|v| v == "1");
    let scale = if long { 4 } else { 1 };
    let work = tempdir();
    let mnt = work.path().join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let (session, handle) = match lazyfs::mount(&mnt) {
        Ok(m) => m,
        Err(e) => return skip(TEST, &format!("cannot mount a FUSE filesystem here: {e}")),
    };
    let mut src = BTreeMap::new();
    for v in 1..=3 {
        let d = work.path().join(format!("src{v}"));
        make_source(&d, v, scale);
        src.insert(v, d);
    }
    let mut ctx = Ctx {
        mnt: mnt.clone(),
        fs: handle.clone(),
        src,
        points: 0,
        resume_cuts: 0,
        already_published: 0,
        violations: BTreeMap::new(),
        scenario: "",
    };

    // Scenario 1: the first push into an empty root.
    let empty = handle.snapshot();
    ctx.scenario("first push (v1 into an empty root)", &empty, None, 1, long);

    // Scenario 2: v2 over a published v1 (made durable as by a clean shutdown).
    handle.restore(&empty);
    let mut server = ctx.start();
    let (_, rc, out) = ctx.push_with_cut(&mut server, 1, None);
    assert_eq!(rc, 0, "{out}");
    server.kill();
    handle.commit_all();
    let with_v1 = handle.snapshot();
    ctx.scenario("second version (v2 over v1)", &with_v1, Some(1), 2, long);

    let total: usize = ctx.violations.values().map(Vec::len).sum();
    let mut summary = format!(
        "crash summary: {} crash points ({} with a second cut during the resume), {} violations; {} repeated \
         pushes refused because the version was already published",
        ctx.points + ctx.resume_cuts,
        ctx.resume_cuts,
        total,
        ctx.already_published
    );
    for (kind, list) in &ctx.violations {
        summary.push_str(&format!("\n  {kind}: {}", list.len()));
        for l in list.iter().take(3) {
            summary.push_str(&format!("\n    e.g. {l}"));
        }
    }
    eprintln!("{summary}");
    println!("{summary}");
    drop(session);
    assert!(ctx.points + ctx.resume_cuts >= 200, "only {} crash points ran\n{summary}", ctx.points + ctx.resume_cuts);
    assert_eq!(total, 0, "{summary}");
}

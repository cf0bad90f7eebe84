//! `shardcast mirror --watch DIR`: push each checkpoint a training job completes in DIR as the
//! next version of a shard set, with no change to the training script.
//!
//! A checkpoint is an entry of DIR (directory or file) whose name ends in its step number
//! (`step-1200`, `checkpoint_00100`, `model.3.pt` → 1200, 100, 3); the number is the version.
//! It counts as complete when
//! - `marker` is set (e.g. `COMPLETE`, `.done`): the entry is a directory holding that file
//!   (the marker-file convention); or
//! - otherwise: it is not a temporary name (leading `.`, or ending in `.tmp`, `.partial`,
//!   `.incomplete`, `~`) and its size, file count and newest mtime did not change between two
//!   polls (the write-then-rename convention makes it appear complete at once; a slow writer
//!   that writes in place is caught by the second look).
//!
//! Only versions newer than the newest one already done are pushed, oldest first. A step is
//! done once the push's rule is met (`--min-replicas`, else every replica; the first one in
//! async mode): when mirroring starts, the newest version published on that many replicas.
//! A step that fails or publishes on too few replicas is retried at the next poll, before any
//! later step (pushes are idempotent: the replicas that already hold it take no data); a step
//! that a replica holds with other bytes (`version_exists`) cannot be completed and is skipped.
//! Retention: `--keep K` travels with each push, so every replica keeps the last K mirrored
//! checkpoints of the name (their own `serve --keep` when it is not given).
//!
//! Watching: DIR and everything under it is watched with inotify (the `notify` crate), so a
//! look follows a change at once instead of at the next poll: a renamed-in checkpoint or a
//! marker file is pushed as soon as the directory has been quiet for a moment (`SETTLE`, or
//! the interval when shorter), and the stability check's second look comes that moment after
//! the first (inotify reports every write, so a quiet directory is what two equal polls stood
//! for). Nothing is read between checkpoints. The interval still bounds the wait (a missed or
//! overflowed event), and a step to retry waits a whole interval as before. Where no watch can
//! be set up (a filesystem without inotify, such as some network filesystems, or no watches
//! left) the loop polls every interval, as it always did.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, SystemTime};

use crate::push::{PushOptions, push};

/// What to watch and where to push.
#[derive(Debug, Clone)]
pub struct MirrorOptions {
    /// The directory the training job writes checkpoints into.
    pub watch: PathBuf,
    /// Marker file that says a checkpoint directory is complete (None: stability check).
    pub marker: Option<String>,
    /// Time between polls.
    pub interval: Duration,
    /// The push to run for each checkpoint (its version is replaced by the step number).
    pub push: PushOptions,
    /// Send each checkpoint as XOR deltas against the previous one pushed (`mirror --delta`):
    /// it is still on disk here, so it is the push's `delta_base`.
    pub delta: bool,
}

/// The checkpoint of step `step` under `watch` (the base of the next delta push).
fn path_of(watch: &Path, step: u64) -> Option<PathBuf> {
    std::fs::read_dir(watch).ok()?.flatten().find_map(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        (!temporary(&name) && step_of(&name) == Some(step)).then(|| e.path())
    })
}

/// The step number at the end of a checkpoint's name (before an extension), if any.
pub fn step_of(name: &str) -> Option<u64> {
    // The last dot-separated part that ends in digits: "model.3.pt" -> "3", "ckpt-7.tmp" -> "ckpt-7".
    name.rsplit('.').find_map(|part| {
        let digits = part.len() - part.trim_end_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 { None } else { part[part.len() - digits..].parse().ok() }
    })
}

fn temporary(name: &str) -> bool {
    name.starts_with('.')
        || name.ends_with('~')
        || [".tmp", ".partial", ".incomplete"].iter().any(|s| name.ends_with(s))
}

/// Size, file count and newest mtime of a tree (None when it vanished mid-walk).
fn signature(path: &Path) -> Option<(u64, u64, SystemTime)> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    let mut sig = (0u64, 0u64, meta.modified().ok()?);
    if meta.is_dir() {
        for e in std::fs::read_dir(path).ok()? {
            let (s, n, m) = signature(&e.ok()?.path())?;
            sig = (sig.0 + s, sig.1 + n, sig.2.max(m));
        }
    } else {
        sig = (meta.len(), 1, sig.2);
    }
    Some(sig)
}

/// Polls `opts.watch` and pushes completed checkpoints; returns after one pass when `once`
/// (two looks, `interval` apart, so the stability check can pass), else never.
/// `on_push` hears every attempt: the step and the outcome line.
pub fn run(opts: &MirrorOptions, once: bool, mut on_push: impl FnMut(u64, &str)) {
    // `--once` looks twice, an interval apart: nothing to watch for.
    let watch = if once { None } else { Watch::start(&opts.watch) };
    let settle = opts.interval.min(SETTLE);
    let mut pushed = newest_done(opts);
    let mut base = pushed.and_then(|p| path_of(&opts.watch, p));
    let mut seen: HashMap<String, (u64, u64, SystemTime)> = HashMap::new();
    let mut conflicts: std::collections::HashSet<u64> = std::collections::HashSet::new();
    let mut looks = 0;
    loop {
        let mut ready: Vec<(u64, PathBuf)> = Vec::new();
        // A candidate seen for the first time or changed since the last look (stability check).
        let mut unsettled = false;
        if let Ok(rd) = std::fs::read_dir(&opts.watch) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(step) = step_of(&name).filter(|s| pushed.is_none_or(|p| *s > p) && !conflicts.contains(s))
                else {
                    continue;
                };
                if temporary(&name) {
                    continue;
                }
                let path = e.path();
                let complete = match &opts.marker {
                    Some(m) => path.join(m).is_file(),
                    None => match signature(&path) {
                        Some(sig) => {
                            let stable = seen.insert(name.clone(), sig) == Some(sig);
                            unsettled |= !stable;
                            stable
                        }
                        None => false,
                    },
                };
                if complete {
                    ready.push((step, path));
                }
            }
        }
        ready.sort();
        let mut retrying = false;
        for (step, path) in ready {
            let mut po = opts.push.clone();
            po.version = step;
            po.delta_base = base.clone().filter(|_| opts.delta);
            let (line, retry) = match push(&path, &po, None) {
                Ok(r) if r.ok() => {
                    pushed = Some(step);
                    base = Some(path.clone());
                    let held = if r.already_held.is_empty() {
                        String::new()
                    } else {
                        format!(" ({} already held it)", r.already_held.len())
                    };
                    (
                        format!(
                            "{}@{step}: published on {} replica(s){held}, {:.2} s",
                            po.name,
                            r.published(),
                            r.seconds
                        ),
                        false,
                    )
                }
                Ok(r) => (
                    format!(
                        "{}@{step}: published on {} of {} replicas; retrying at the next poll",
                        po.name,
                        r.published(),
                        r.replicas.len()
                    ),
                    true,
                ),
                Err(e) if e.kind() == crate::ErrorKind::VersionExists => {
                    conflicts.insert(step);
                    (format!("{}@{step}: a replica holds other bytes as this version, skipped ({e})", po.name), false)
                }
                Err(e) => (format!("{}@{step}: {e}; retrying at the next poll", po.name), true),
            };
            on_push(step, &line);
            // Steps complete in order: a later one waits until this one meets the rule.
            if retry {
                retrying = true;
                break;
            }
        }
        looks += 1;
        if once && looks >= 2 {
            return;
        }
        match &watch {
            // A step to retry waits its interval, as when polling: a failing replica is not
            // asked again at every write the training job makes.
            Some(w) if !retrying => w.wait(opts.interval, settle, unsettled),
            _ => std::thread::sleep(opts.interval),
        }
    }
}

/// How long the watched directory must be quiet (no inotify event) before the loop looks,
/// at most: a checkpoint that stopped changing for this long is as complete as one that did
/// not change between two polls.
const SETTLE: Duration = Duration::from_millis(500);

/// An inotify watch on the checkpoint directory and everything under it.
struct Watch {
    // Kept for its drop: the watch ends with it.
    _watcher: notify::RecommendedWatcher,
    events: Receiver<notify::Result<notify::Event>>,
}

impl Watch {
    /// The watch, or None (said at debug level) where it cannot be set up: the loop then polls.
    fn start(dir: &Path) -> Option<Self> {
        use notify::Watcher;
        let (tx, events) = channel();
        let watcher = notify::recommended_watcher(tx).and_then(|mut w| {
            w.watch(dir, notify::RecursiveMode::Recursive)?;
            Ok(w)
        });
        match watcher {
            Ok(w) => {
                tracing::debug!("watching {} with inotify", dir.display());
                Some(Self { _watcher: w, events })
            }
            Err(e) => {
                tracing::debug!("cannot watch {} ({e}): polling it instead", dir.display());
                None
            }
        }
    }

    /// Returns when the directory has been quiet for `settle` after a change (at once if a
    /// change came while the last look ran), or after `settle` when `unsettled` (the second
    /// look of the stability check), or after `interval` when nothing happened.
    fn wait(&self, interval: Duration, settle: Duration, unsettled: bool) {
        let mut changed = unsettled;
        while let Ok(ev) = self.events.try_recv() {
            changed |= is_change(&ev);
        }
        let start = std::time::Instant::now();
        while !changed {
            let left = interval.saturating_sub(start.elapsed());
            match self.events.recv_timeout(left) {
                Ok(ev) => changed = is_change(&ev),
                Err(RecvTimeoutError::Timeout) => return,
                // The watcher's thread ended: poll from here on.
                Err(RecvTimeoutError::Disconnected) => return std::thread::sleep(interval),
            }
        }
        // Until nothing more happened for `settle` (a checkpoint being written in place keeps
        // this waiting; the interval still bounds it).
        let deadline = std::time::Instant::now() + interval;
        while std::time::Instant::now() < deadline {
            match self.events.recv_timeout(settle) {
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => return,
                Err(RecvTimeoutError::Disconnected) => return std::thread::sleep(settle),
            }
        }
    }
}

/// Whether an event says something under the directory changed. Reads (our own looks and
/// pushes open and read the checkpoints) do not count; an error (such as an overflowed event
/// queue) does, so that the loop looks.
fn is_change(ev: &notify::Result<notify::Event>) -> bool {
    ev.as_ref().map_or(true, |e| !matches!(e.kind, notify::EventKind::Access(_)))
}

/// The newest version of the shard set published on as many replicas as a push must reach
/// (None when none, or unknown). A replica that cannot be asked counts as holding nothing.
fn newest_done(opts: &MirrorOptions) -> Option<u64> {
    let p = &opts.push;
    let need = p.min_replicas.unwrap_or(if p.mode == crate::wire::Mode::Async { 1 } else { p.to.len() }).max(1);
    let mut holders: std::collections::BTreeMap<u64, usize> = std::collections::BTreeMap::new();
    for node in &p.to {
        let Ok(sets) = crate::server::status(node, p.connect_timeout, p.auth.key(), p.auth.tls()) else {
            continue;
        };
        for v in sets.into_iter().filter(|s| s.name == p.name).flat_map(|s| s.versions) {
            *holders.entry(v).or_default() += 1;
        }
    }
    holders.into_iter().rev().find(|&(_, n)| n >= need).map(|(v, _)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_numbers_from_names() {
        assert_eq!(step_of("step-1200"), Some(1200));
        assert_eq!(step_of("checkpoint_00100"), Some(100));
        assert_eq!(step_of("model.3.pt"), Some(3));
        assert_eq!(step_of("ckpt-7.tmp"), Some(7));
        assert_eq!(step_of("latest"), None);
        assert!(temporary("ckpt-7.tmp") && temporary(".ckpt-7") && !temporary("ckpt-7"));
    }
}

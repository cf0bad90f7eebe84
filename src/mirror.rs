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
//! Only versions newer than the newest one already pushed (or published on the first replica
//! when mirroring starts) are pushed, oldest first; a failed push is retried at the next poll.
//! Retention: `--keep K` travels with each push, so every replica keeps the last K mirrored
//! checkpoints of the name (their own `serve --keep` when it is not given).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
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
    let mut pushed = newest_published(opts);
    let mut seen: HashMap<String, (u64, u64, SystemTime)> = HashMap::new();
    let mut looks = 0;
    loop {
        let mut ready: Vec<(u64, PathBuf)> = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&opts.watch) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(step) = step_of(&name).filter(|s| pushed.is_none_or(|p| *s > p)) else { continue };
                if temporary(&name) {
                    continue;
                }
                let path = e.path();
                let complete = match &opts.marker {
                    Some(m) => path.join(m).is_file(),
                    None => match signature(&path) {
                        Some(sig) => seen.insert(name.clone(), sig) == Some(sig),
                        None => false,
                    },
                };
                if complete {
                    ready.push((step, path));
                }
            }
        }
        ready.sort();
        for (step, path) in ready {
            let mut po = opts.push.clone();
            po.version = step;
            let line = match push(&path, &po, None) {
                Ok(r) if r.ok() => {
                    pushed = Some(step);
                    format!("{}@{step}: published on {} replica(s), {:.2} s", po.name, r.published(), r.seconds)
                }
                Ok(r) => format!(
                    "{}@{step}: published on {} of {} replicas; retrying",
                    po.name,
                    r.published(),
                    r.replicas.len()
                ),
                Err(e) if e.kind() == crate::ErrorKind::VersionExists => {
                    pushed = Some(step);
                    format!("{}@{step}: already there ({e})", po.name)
                }
                Err(e) => format!("{}@{step}: {e}; retrying at the next poll", po.name),
            };
            on_push(step, &line);
        }
        looks += 1;
        if once && looks >= 2 {
            return;
        }
        std::thread::sleep(opts.interval);
    }
}

/// The newest version of the shard set on the first replica (None when none, or unknown).
fn newest_published(opts: &MirrorOptions) -> Option<u64> {
    let first = opts.push.to.first()?;
    let sets =
        crate::server::status(first, opts.push.connect_timeout, opts.push.key.as_ref(), opts.push.tls.as_deref())
            .ok()?;
    sets.into_iter().find(|s| s.name == opts.push.name).and_then(|s| s.versions.into_iter().max())
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

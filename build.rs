//! Puts the git commit into `shardcast --version`.
//!
//! `SHARDCAST_GIT_COMMIT` from the environment wins (scripts/build-release.sh sets it, with
//! `-dirty` when the tree has uncommitted changes); otherwise `git rev-parse` of the source tree,
//! and "unknown" where there is no git (a source tarball).

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SHARDCAST_GIT_COMMIT");
    let commit = match std::env::var("SHARDCAST_GIT_COMMIT") {
        Ok(c) if !c.is_empty() => c,
        _ => {
            // Rebuild when HEAD moves: HEAD itself (switching branches) and the branch's ref
            // (a commit). Only files that exist: cargo reruns every time for a missing one.
            for name in ["HEAD", &git(&["symbolic-ref", "-q", "HEAD"]).unwrap_or_default()] {
                if let Some(p) = git(&["rev-parse", "--git-path", name]).filter(|_| !name.is_empty()) {
                    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(p);
                    if p.is_file() {
                        println!("cargo:rerun-if-changed={}", p.display());
                    }
                }
            }
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into())
        }
    };
    println!("cargo:rustc-env=SHARDCAST_GIT_COMMIT={commit}");
}

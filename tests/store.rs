//! The replica store through its real API, on real files: races between sessions of one name
//! (publishing, resuming) and what a store does with its partial stagings.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use shardcast::error::StoreError;
use shardcast::manifest::Manifest;
use shardcast::store::{Store, verify};

/// A one-file version (the file is empty: these tests are about the store's directories).
fn small_manifest() -> Manifest {
    Manifest::plan_for_files(1 << 20, &[("a/model.bin", 0)]).expect("plan").0
}

fn current(root: &Path, name: &str) -> Option<u64> {
    std::fs::read_link(root.join(name).join("current")).ok()?.to_str()?.parse().ok()
}

#[test]
fn a_resuming_push_never_removes_a_version_published_while_it_waited() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 4).unwrap();
    let m = small_manifest();
    let mut first = store.begin("ckpt", 5, &m).unwrap();
    first.sync().unwrap();
    // A resuming session of the same version supersedes the first: it asks the first to give
    // up, then waits until the first lets go of the version.
    let resumer = {
        let (store, m) = (Arc::clone(&store), m.clone());
        std::thread::spawn(move || store.begin_resuming("ckpt", 5, &m, true).map(drop))
    };
    // The resumer has looked for the version (not there yet) and is waiting: it set the flag.
    let flag = first.receiving();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !flag.cancel.load(Ordering::Relaxed) {
        assert!(std::time::Instant::now() < deadline, "the resuming session never asked the first to give up");
        std::thread::sleep(Duration::from_millis(1));
    }
    // The first session publishes during that wait.
    first.publish(&m).unwrap();
    let resumed = resumer.join().unwrap();
    assert!(
        matches!(resumed, Err(StoreError::VersionExists { ref name, version: 5 }) if name == "ckpt"),
        "the resuming session did not see the version published while it waited: {resumed:?}"
    );
    assert!(dir.path().join("ckpt/5").is_dir(), "the published data of ckpt@5 was removed");
    let v = verify(store.root(), "ckpt", Some(5));
    assert!(v.is_ok(), "ckpt@5 no longer verifies: {v:?}");
    assert_eq!(current(store.root(), "ckpt"), Some(5));
}

#[test]
fn concurrent_publishes_of_one_name_move_current_to_the_highest() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1000).unwrap();
    let m = small_manifest();
    const ROUNDS: usize = 40;
    const VERSIONS: u64 = 16;
    for round in 0..ROUNDS {
        let name = format!("set{round}");
        // Every version staged and synced, then all published at once.
        let stagings: Vec<_> = (1..=VERSIONS)
            .map(|v| {
                let mut s = store.begin(&name, v, &m).unwrap();
                s.sync().unwrap();
                s
            })
            .collect();
        let barrier = Arc::new(Barrier::new(stagings.len()));
        let threads: Vec<_> = stagings
            .into_iter()
            .map(|s| {
                let (barrier, m) = (Arc::clone(&barrier), m.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    s.publish(&m)
                })
            })
            .collect();
        for (i, t) in threads.into_iter().enumerate() {
            let r = t.join().unwrap();
            assert!(r.is_ok(), "round {round}: the publish of version {} failed: {r:?}", i + 1);
        }
        assert_eq!(current(store.root(), &name), Some(VERSIONS), "round {round}: current is not the highest version");
        for v in 1..=VERSIONS {
            assert!(store.exists(&name, v), "round {round}: version {v} missing");
        }
    }
}

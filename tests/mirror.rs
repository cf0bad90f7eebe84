//! `shardcast mirror`: checkpoints a job completes in a directory get pushed, as their step.

mod util;

use std::path::Path;
use std::time::{Duration, Instant};

use util::*;

fn wait_for(path: &Path, secs: u64, why: &str) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{why}: {} did not appear in {secs} s", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn checkpoint(dir: &Path, seed: u64) {
    write_random_file(&dir.join("model.bin"), (1 << 20) + seed, seed);
    write_random_file(&dir.join("optim/state.bin"), 4096, seed + 1);
}

#[test]
fn write_then_rename_checkpoints_are_pushed_as_their_step() {
    let c = Cluster::start(2);
    let t = tempdir();
    let watch = t.path().join("ckpts");
    std::fs::create_dir(&watch).unwrap();
    let mut m = Running::spawn(
        shardcast()
            .args(["mirror", "--name", "job", "--interval-ms", "100", "--to", &c.addrs()])
            .arg("--watch")
            .arg(&watch),
    );
    for step in [10u64, 20] {
        let tmp = watch.join(format!("step-{step}.tmp"));
        checkpoint(&tmp, step);
        std::fs::rename(&tmp, watch.join(format!("step-{step}"))).unwrap();
        for i in 0..2 {
            wait_for(&c.root(i).join("job").join(step.to_string()).join("model.bin"), 30, "mirror push");
        }
    }
    // A checkpoint still being written (temporary name) is not pushed.
    checkpoint(&watch.join("step-30.tmp"), 30);
    std::thread::sleep(Duration::from_millis(600));
    assert!(m.try_wait().is_none(), "mirror exited");
    drop(m);
    for i in 0..2 {
        assert_tree_identical(&watch.join("step-10"), &c.root(i).join("job/10"));
    }
    c.assert_published_on(&[0, 1], &watch.join("step-20"), "job", 20);
    assert!(!c.root(0).join("job/30").exists(), "a temporary checkpoint was pushed");
}

#[test]
fn marker_file_convention_with_once() {
    let c = Cluster::start(1);
    let t = tempdir();
    let watch = t.path().join("ckpts");
    checkpoint(&watch.join("ckpt_5"), 5);
    checkpoint(&watch.join("ckpt_6"), 6);
    std::fs::write(watch.join("ckpt_6/COMPLETE"), b"").unwrap();
    let out = run_timeout(
        shardcast()
            .args([
                "mirror",
                "--once",
                "--marker",
                "COMPLETE",
                "--interval-ms",
                "50",
                "--name",
                "m",
                "--to",
                &c.addrs(),
            ])
            .arg("--watch")
            .arg(&watch),
        Duration::from_secs(60),
    );
    assert_eq!(code(&out), 0, "{}", show_output(&out));
    assert!(stdout_str(&out).contains("m@6: published"), "{}", show_output(&out));
    c.assert_published_on(&[0], &watch.join("ckpt_6"), "m", 6);
    assert!(!c.root(0).join("m/5").exists(), "a checkpoint without its marker was pushed");
}

#[test]
fn keep_travels_with_each_push_and_prunes_old_checkpoints() {
    let c = Cluster::start(2); // replicas keep 2 by default
    let t = tempdir();
    let watch = t.path().join("ckpts");
    let versions = |i: usize| {
        let mut v: Vec<u64> = std::fs::read_dir(c.root(i).join("k"))
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().to_str()?.parse().ok())
            .collect();
        v.sort_unstable();
        v
    };
    let round = |step: u64, keep: &str| {
        checkpoint(&watch.join(format!("step-{step}")), step);
        let out = run_timeout(
            shardcast()
                .args(["mirror", "--once", "--interval-ms", "20", "--name", "k", "--keep", keep, "--to", &c.addrs()])
                .arg("--watch")
                .arg(&watch),
            Duration::from_secs(60),
        );
        assert_eq!(code(&out), 0, "{}", show_output(&out));
        assert!(stdout_str(&out).contains(&format!("k@{step}: published")), "{}", show_output(&out));
    };
    for step in 1..=4 {
        round(step, "3");
    }
    // Retention runs after a replica has reported (off the push's critical path): give it time.
    let settled = |i: usize, want: &[u64]| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while versions(i) != want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        versions(i)
    };
    for i in 0..2 {
        assert_eq!(settled(i, &[2, 3, 4]), [2, 3, 4], "replica {i} keeps the last 3 (more than its own default of 2)");
    }
    round(5, "1");
    for i in 0..2 {
        assert_eq!(settled(i, &[5]), [5], "replica {i} keeps only the newest");
        assert_tree_identical(&watch.join("step-5"), &c.root(i).join("k/5"));
    }
}

#[test]
fn a_partly_failed_step_is_completed_on_the_replicas_that_lack_it() {
    // Step 7 reached the first replica only (a push that failed part way, then mirror was
    // restarted). The step is not done: mirror pushes it again; the first replica already holds
    // it (takes no data, its files untouched), the second gets it.
    let c = Cluster::start(2);
    let t = tempdir();
    let watch = t.path().join("ckpts");
    checkpoint(&watch.join("step-7"), 7);
    c.assert_push_ok(&c.push_to(&c.addr(0), &watch.join("step-7"), "job", 7, &[]));
    let model = c.root(0).join("job/7/model.bin");
    let before = std::fs::metadata(&model).unwrap();
    let out = run_timeout(
        shardcast()
            .args(["mirror", "--once", "--interval-ms", "50", "--name", "job", "--to", &c.addrs()])
            .arg("--watch")
            .arg(&watch),
        Duration::from_secs(60),
    );
    assert_eq!(code(&out), 0, "{}", show_output(&out));
    assert!(stdout_str(&out).contains("job@7: published on 2 replica(s) (1 already held it)"), "{}", show_output(&out));
    c.assert_published_on(&[0, 1], &watch.join("step-7"), "job", 7);
    let after = std::fs::metadata(&model).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((before.ino(), before.mtime(), before.mtime_nsec()), (after.ino(), after.mtime(), after.mtime_nsec()));
}

/// With an hour between polls, a checkpoint renamed into place after the mirror started is
/// pushed within the test's lifetime only through the inotify watch (a polling mirror would
/// take its second look an hour later).
#[test]
fn inotify_sees_a_checkpoint_long_before_the_next_poll() {
    let c = Cluster::start(1);
    let t = tempdir();
    let watch = t.path().join("ckpts");
    std::fs::create_dir(&watch).unwrap();
    let log = t.path().join("mirror.log");
    let mut m = shardcast()
        .args(["mirror", "--name", "w", "--interval-ms", "3600000", "--to", &c.addrs()])
        .arg("--watch")
        .arg(&watch)
        .env("SHARDCAST_LOG", "shardcast=debug")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn mirror");
    // The watch is set up before the first look.
    let watching =
        wait_until(Duration::from_secs(30), || std::fs::read_to_string(&log).is_ok_and(|l| l.contains("with inotify")));
    assert!(watching, "the mirror did not watch with inotify:\n{}", std::fs::read_to_string(&log).unwrap());
    let tmp = watch.join("step-3.tmp");
    checkpoint(&tmp, 3);
    std::fs::rename(&tmp, watch.join("step-3")).unwrap();
    wait_for(&c.root(0).join("w/3/model.bin"), 60, "mirror push after an inotify event");
    let _ = m.kill();
    let _ = m.wait();
    c.assert_published_on(&[0], &watch.join("step-3"), "w", 3);
}

#[test]
fn delta_sends_each_step_against_the_previous_one() {
    // `mirror --delta`: step 2 differs from step 1 in a few bytes of every chunk; it goes as
    // XOR deltas against step 1 (still in the watched directory), which every replica applies.
    let c = Cluster::builder().serve_arg("--metrics").serve_arg("127.0.0.1:0").start(2);
    let t = tempdir();
    let watch = t.path().join("ckpts");
    let round = |step: u64| {
        let out = run_timeout(
            shardcast()
                .args(["mirror", "--once", "--interval-ms", "20", "--name", "d", "--delta", "--chunk-size", "1M"])
                .args(["--to", &c.addrs(), "--watch"])
                .arg(&watch),
            Duration::from_secs(60),
        );
        assert_eq!(code(&out), 0, "{}", show_output(&out));
        assert!(stdout_str(&out).contains(&format!("d@{step}: published")), "{}", show_output(&out));
    };
    checkpoint(&watch.join("step-1"), 3);
    round(1);
    let step2 = watch.join("step-2");
    std::fs::create_dir_all(step2.join("optim")).unwrap();
    std::fs::copy(watch.join("step-1/optim/state.bin"), step2.join("optim/state.bin")).unwrap();
    let mut b = std::fs::read(watch.join("step-1/model.bin")).unwrap();
    for i in (0..b.len()).step_by(100_000) {
        b[i] ^= 0x40;
    }
    std::fs::write(step2.join("model.bin"), b).unwrap();
    round(2);
    for i in 0..2 {
        assert_tree_identical(&step2, &c.root(i).join("d/2"));
        // model.bin's first chunk changed (its 3-byte tail and optim/state.bin did not: held).
        assert_eq!(metric_sum(&metrics_addr(&c.log(i)), "shardcast_delta_chunks_total "), 1, "replica {i}");
    }
}

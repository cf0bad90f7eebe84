//! One loopback hop: a push of a 256 MiB file from tmpfs to one in-process replica on tmpfs.
//!
//! `cargo bench --bench hop`. The replica and the primary run in this process (the server on
//! its own threads), over real TCP sockets on 127.0.0.1 and the same io_uring data path as the
//! CLI. `scripts/bench-hop.sh` measures the same hop with separate processes next to iperf3.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use shardcast::push::{PushOptions, push};
use shardcast::server::{ServeOptions, Server};

const SIZE: usize = 256 << 20;

fn tmpfs_dir() -> tempfile::TempDir {
    let base = if Path::new("/dev/shm").is_dir() { "/dev/shm" } else { "/tmp" };
    tempfile::Builder::new().prefix("shardcast-bench").tempdir_in(base).expect("tempdir")
}

fn hop(c: &mut Criterion) {
    let dir = tmpfs_dir();
    let src = dir.path().join("shard.bin");
    let mut data = vec![0u8; SIZE];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for b in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
    std::fs::write(&src, &data).expect("write source");
    drop(data);

    let mut group = c.benchmark_group("hop");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(SIZE as u64));
    for verify in [true, false] {
        let mut opts =
            ServeOptions::new("127.0.0.1:0", dir.path().join(if verify { "r-verify" } else { "r-noverify" }));
        opts.keep = 1;
        opts.verify = verify;
        let server = Server::bind(opts).expect("bind").spawn();
        let version = AtomicU64::new(1);
        let name = if verify { "loopback 256MiB" } else { "loopback 256MiB, no verify" };
        group.bench_function(name, |b| {
            b.iter(|| {
                let v = version.fetch_add(1, Ordering::Relaxed);
                let opts = PushOptions::new("bench", v, vec![server.addr().to_string()]);
                let r = push(&src, &opts, None).expect("push");
                assert!(r.ok(), "{:?}", r.replicas);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, hop);
criterion_main!(benches);

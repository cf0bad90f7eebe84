//! Per-chunk hashing: what verifying a chunk's xxh3-128 costs at each hop.
//!
//! `cargo bench --bench hash`. Compare the GiB/s here with the hop throughput of
//! `benches/hop.rs` / `scripts/bench-hop.sh`: the ratio is the share of a hop that hashing costs
//! when done inline on the session thread.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

fn chunk_hash(c: &mut Criterion) {
    let mut g = c.benchmark_group("xxh3_128");
    for size in [1usize << 20, 4 << 20, 16 << 20] {
        let buf: Vec<u8> = (0..size).map(|i| (i as u32).wrapping_mul(2_654_435_761) as u8).collect();
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("{} MiB", size >> 20), |b| b.iter(|| shardcast::manifest::digest(black_box(&buf))));
    }
    g.finish();
}

criterion_group!(benches, chunk_hash);
criterion_main!(benches);

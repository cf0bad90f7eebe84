//! What coding a chunk costs (issue 17): byte-grouping, compressing, and a delta's coding at the
//! primary and decoding at a replica, per 4 MiB chunk.
//!
//! `cargo bench --bench coding`. Data: two consecutive bf16 checkpoints when
//! `SHARDCAST_BENCH_BASE` and `SHARDCAST_BENCH_NEW` name them (e.g.
//! `scripts/gen-checkpoints.py`'s `finetune/bf16/step-000021/model.safetensors` and `…22…`; a
//! chunk from the middle of each), else a smooth bf16-like array and a copy with one element in
//! 30 changed (what a fine-tuning step looks like at this grain). A replica of a delta push does
//! `decode_delta` once per chunk; compare its GiB/s with the link's and the page-cache copy's.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use shardcast::compress::{Coder, Compress, Decoder, coded_capacity, group, ungroup};
use std::hint::black_box;

const CHUNK: usize = 4 << 20;

fn chunk_of(path: &str) -> Vec<u8> {
    let all = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert!(all.len() >= CHUNK, "{path}: shorter than one chunk");
    let start = (all.len() / 2 - CHUNK / 2) & !3;
    all[start..start + CHUNK].to_vec()
}

fn data() -> (Vec<u8>, Vec<u8>) {
    if let (Ok(b), Ok(n)) = (std::env::var("SHARDCAST_BENCH_BASE"), std::env::var("SHARDCAST_BENCH_NEW")) {
        return (chunk_of(&b), chunk_of(&n));
    }
    let base: Vec<u8> = (0..CHUNK / 2)
        .flat_map(|i| {
            let x = ((i as f32) * 0.001).sin() * 0.02;
            ((x.to_bits() >> 16) as u16).to_le_bytes()
        })
        .collect();
    let mut new = base.clone();
    for e in new.chunks_exact_mut(2).step_by(30) {
        e[0] ^= 1;
    }
    (base, new)
}

fn coding(c: &mut Criterion) {
    let (base, new) = data();
    let mut g = c.benchmark_group("coding");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    g.sample_size(20);
    let mut out = vec![0u8; CHUNK];
    for w in [2usize, 4] {
        g.bench_function(format!("group w{w}"), |b| b.iter(|| group(black_box(&new), w, &mut out)));
        g.bench_function(format!("ungroup w{w}"), |b| b.iter(|| ungroup(black_box(&new), w, &mut out)));
    }
    let mut coder = Coder::new(None, CHUNK as u32).expect("zstd");
    let mut coded = vec![0u8; coded_capacity(CHUNK as u32)];
    let (coding, n) = coder.compress(Compress::ZstdGrouped, &new, &mut coded).expect("shrinks");
    let mut dec = Decoder::new(CHUNK as u32).expect("zstd");
    g.bench_function("compress zstd-grouped", |b| {
        b.iter(|| coder.compress(Compress::ZstdGrouped, black_box(&new), &mut out).map(|x| x.1))
    });
    g.bench_function("decode zstd-grouped", |b| {
        b.iter(|| dec.decode(1, coding, black_box(&coded[..n])).map(<[u8]>::len))
    });
    let mut raw = new.clone();
    let digest = shardcast::manifest::digest(&base);
    let (dcoding, dn) = coder.delta(&mut raw, &base, digest, &mut coded).expect("delta shrinks");
    let head = shardcast::wire::Coding::BASE_LEN as usize;
    g.bench_function("delta code", |b| {
        b.iter(|| coder.delta(black_box(&mut raw), &base, digest, &mut out).map(|x| x.1))
    });
    // zstd's faster levels (`push --compress-level`): how much speed a delta's bytes buy.
    for level in [1, -1, -4] {
        let mut fast = Coder::new(Some(level), CHUNK as u32).expect("zstd");
        let size = fast.delta(&mut raw, &base, digest, &mut out).map_or(CHUNK, |x| x.1);
        eprintln!("delta at zstd level {level}: {size} bytes for {CHUNK} ({:.2} x)", CHUNK as f64 / size as f64);
        g.bench_function(format!("delta code level {level}"), |b| {
            b.iter(|| fast.delta(black_box(&mut raw), &base, digest, &mut out).map(|x| x.1))
        });
    }
    g.bench_function("delta decode", |b| {
        b.iter(|| dec.decode_delta(1, dcoding, black_box(&coded[head..dn]), &base).map(<[u8]>::len))
    });
    assert_eq!(dec.decode_delta(1, dcoding, &coded[head..dn], &base).expect("decodes"), &new[..]);
    g.finish();
}

criterion_group!(benches, coding);
criterion_main!(benches);

//! Manifests and plans: `Manifest::decode` (a stored manifest, read back by `verify`) and
//! `Manifest::decode_plan` (the plan a peer's HELLO carries). What decodes must hold only safe
//! paths and survive encode/decode unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardcast::manifest::Manifest;

#[global_allocator]
static ALLOC: shardcast_fuzz::CappedAlloc = shardcast_fuzz::CappedAlloc;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::decode(data) {
        shardcast_fuzz::check_manifest(&m);
        // Not byte for byte: decoding masks the mode to its permission bits.
        assert_eq!(Manifest::decode(&m.encode()).expect("an encoded manifest decodes"), m);
        // Its plan is the same manifest with digests zero.
        let plan = Manifest::decode_plan(&m.encode_plan()).expect("an encoded plan decodes");
        assert_eq!(
            (plan.chunk_size(), plan.entries(), plan.chunk_count()),
            (m.chunk_size(), m.entries(), m.chunk_count())
        );
    }
    if let Ok(p) = Manifest::decode_plan(data) {
        shardcast_fuzz::check_manifest(&p);
        let again = Manifest::decode_plan(&p.encode_plan()).expect("an encoded plan decodes");
        shardcast_fuzz::assert_same_plan(&again, &p);
    }
});

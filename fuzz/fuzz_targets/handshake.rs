//! HELLO, the first frame a replica reads from any peer: its payload decoder, which carries the
//! chain, the retention, the routed push's wants and the manifest. What decodes must survive encode/decode unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardcast::wire::Hello;

#[global_allocator]
static ALLOC: shardcast_fuzz::CappedAlloc = shardcast_fuzz::CappedAlloc;

fuzz_target!(|data: &[u8]| {
    let Ok(hello) = Hello::decode(data) else { return };
    shardcast_fuzz::check_manifest(&hello.manifest);
    let again = Hello::decode(&hello.encode()).expect("an encoded HELLO decodes");
    assert_eq!(
        (&again.name, again.version, again.mode, again.transport, again.keep, &again.you, &again.downstream, &again.wants),
        (&hello.name, hello.version, hello.mode, hello.transport, hello.keep, &hello.you, &hello.downstream, &hello.wants),
        "HELLO changed through encode/decode"
    );
    shardcast_fuzz::assert_same_plan(&again.manifest, &hello.manifest);
});

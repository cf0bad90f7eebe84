//! HELLO, the first frame a replica reads from any peer: its payload decoder, which carries the
//! chain, the retention, the routed push's wants and the manifest, and the admission checks a
//! replica runs on it (`server::admit`: chain length, entry count, pool bound, node names). What decodes must survive encode/decode unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardcast::wire::Hello;

#[global_allocator]
static ALLOC: shardcast_fuzz::CappedAlloc = shardcast_fuzz::CappedAlloc;

/// The admission checks a replica runs on every HELLO it decodes (its default limits).
fn limits() -> &'static shardcast::ServeOptions {
    static OPTS: std::sync::OnceLock<shardcast::ServeOptions> = std::sync::OnceLock::new();
    OPTS.get_or_init(|| shardcast::ServeOptions::new("127.0.0.1:0", "/nonexistent"))
}

fuzz_target!(|data: &[u8]| {
    let Ok(hello) = Hello::decode(data) else { return };
    shardcast_fuzz::check_manifest(&hello.manifest);
    assert!(hello.manifest.entries().iter().all(|e| e.mode & !0o777 == 0), "a setuid/setgid/sticky mode decoded");
    if shardcast::server::admit(&hello, limits()).is_ok() {
        assert!(hello.downstream.len() < limits().limits.max_chain);
        assert!(hello.manifest.entries().len() <= limits().limits.max_entries);
        assert!(shardcast::check_budget(limits().pool_bytes, hello.manifest.chunk_size()).is_ok());
    }
    let again = Hello::decode(&hello.encode()).expect("an encoded HELLO decodes");
    assert_eq!(
        (&again.name, again.version, again.mode, again.transport, again.keep, &again.you, &again.downstream, &again.wants),
        (&hello.name, hello.version, hello.mode, hello.transport, hello.keep, &hello.you, &hello.downstream, &hello.wants),
        "HELLO changed through encode/decode"
    );
    shardcast_fuzz::assert_same_plan(&again.manifest, &hello.manifest);
});

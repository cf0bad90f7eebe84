//! The checked-in header is what cbindgen generates from `src/lib.rs` now.
//! `SHARDCAST_BLESS=1 cargo test -p shardcast-ffi --test header` rewrites it.

#[test]
fn header_is_current() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let cfg = cbindgen::Config::from_file(format!("{dir}/cbindgen.toml")).expect("ffi/cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(cfg)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut generated);
    let path = format!("{dir}/include/shardcast.h");
    if std::env::var_os("SHARDCAST_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write the header");
        return;
    }
    let current = std::fs::read(&path).unwrap_or_default();
    assert!(
        current == generated,
        "ffi/include/shardcast.h is stale: it differs from what cbindgen generates from ffi/src/lib.rs.\n\
         Regenerate it with: SHARDCAST_BLESS=1 cargo test -p shardcast-ffi --test header"
    );
}

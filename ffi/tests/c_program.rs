//! Builds `ffi/examples/push_demo.c` against the generated header and the cdylib, runs it
//! against an in-process server, and checks the bytes that arrived.

use std::path::{Path, PathBuf};
use std::process::Command;

fn target_debug() -> PathBuf {
    // .../target/debug/deps/c_program-HASH -> .../target/debug
    let exe = std::env::current_exe().expect("test exe path");
    exe.parent().and_then(Path::parent).expect("target/debug").to_path_buf()
}

/// Builds the C program against the cdylib. Cargo builds every crate type of the library
/// together, into `target/debug/deps`: that `.so` is as new as the library this test links.
/// (Not `target/debug/libshardcast_ffi.so`: only `cargo build` copies it there, so under `cargo
/// test` it can be a stale one from an earlier build, and a clean clone has none; building it
/// with `cargo build -p shardcast-ffi` from inside `cargo test --workspace` resolves other
/// features for a few shared crates and compiles every dependency again, ~4 min in CI.)
fn build_demo(out: &Path) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = target_debug().join("deps");
    assert!(lib.join("libshardcast_ffi.so").is_file(), "no libshardcast_ffi.so in {}", lib.display());
    let exe = out.join("push_demo");
    let cc = Command::new("cc")
        .arg(dir.join("examples/push_demo.c"))
        .arg("-Wall")
        .arg("-Werror")
        .arg("-I")
        .arg(dir.join("include"))
        .arg("-L")
        .arg(&lib)
        .arg("-lshardcast_ffi")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("run cc (build-essential)");
    assert!(cc.status.success(), "cc failed:\n{}", String::from_utf8_lossy(&cc.stderr));
    exe
}

fn run(exe: &Path, args: &[&Path]) -> (bool, String) {
    // cargo puts target/debug on LD_LIBRARY_PATH, ahead of the program's runpath: a stale
    // library there would be the one loaded.
    let out = Command::new(exe).args(args).env_remove("LD_LIBRARY_PATH").output().expect("run push_demo");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn random_file(path: &Path, len: usize, seed: u64) {
    let mut x = seed | 1;
    let bytes: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn c_program_pushes_cancels_and_reports_errors() {
    let t = tempfile::tempdir().unwrap();
    let exe = build_demo(t.path());

    // A push through the C ABI: bytes arrive, the result names the replica.
    let src = t.path().join("src");
    random_file(&src.join("a.bin"), 3 * (1 << 20) + 17, 1);
    random_file(&src.join("sub/b.bin"), 4096, 2);
    let root = t.path().join("root");
    let (ok, text) = run(&exe, &[Path::new("push"), &src, &root]);
    assert!(ok, "push mode failed:\n{text}");
    assert!(text.contains("status=0") && text.contains("repairs=0") && text.contains("OK"), "{text}");
    for f in ["a.bin", "sub/b.bin"] {
        assert_eq!(std::fs::read(src.join(f)).unwrap(), std::fs::read(root.join("demo/1").join(f)).unwrap(), "{f}");
    }

    // Buffers from memory: published as files, byte for byte.
    let root_b = t.path().join("root_b");
    let (ok, text) = run(&exe, &[Path::new("buffers"), Path::new("-"), &root_b]);
    assert!(ok, "buffers mode failed:\n{text}");
    let want: Vec<u8> = (0..(3usize << 20) + 5).map(|i| (31 * i + 7) as u8).collect();
    assert!(std::fs::read(root_b.join("demo/1/weights/layer0.bin")).unwrap() == want, "weights differ");
    assert_eq!(std::fs::read(root_b.join("demo/1/meta.json")).unwrap(), b"{\"step\": 1}\n");

    // Cancel once chunks move: SC_ERR_CANCELLED, nothing published.
    let big = t.path().join("big");
    random_file(&big.join("big.bin"), 512 << 20, 3);
    let root2 = t.path().join("root2");
    let (ok, text) = run(&exe, &[Path::new("cancel"), &big, &root2]);
    assert!(ok, "cancel mode failed:\n{text}");
    assert!(!root2.join("demo/1").exists(), "a cancelled push was published:\n{text}");

    // Nothing listening: SC_ERR_UNREACHABLE with a message that names the address.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = l.local_addr().unwrap().to_string();
    drop(l);
    let (ok, text) = run(&exe, &[Path::new("unreachable"), &src, Path::new(&dead)]);
    assert!(ok, "unreachable mode failed:\n{text}");
    assert!(text.contains(&dead), "the error does not name {dead}:\n{text}");
}

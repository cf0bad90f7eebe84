//! `shardcast demo`: a local demo cluster of real `shardcast serve` processes on loopback.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use shardcast::push::{PushOptions, push};
use shardcast::wire::Outcome;

use super::args::DemoArgs;
use super::{EXIT_FAILED, Global, output};

/// Runs `shardcast demo` and returns its exit code.
pub(crate) fn run_cmd(mut args: DemoArgs, g: &Global) -> u8 {
    output::init_logging(&g.log_format, "warn");
    args.replicas = args.replicas.max(1);
    match run(args) {
        Ok(_) => 0,
        Err(e) => output::fail(EXIT_FAILED, format!("{e:#}")),
    }
}

/// Kills the replica processes when the demo ends, however it ends.
struct Replicas(Vec<Child>);

impl Drop for Replicas {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A fast deterministic generator (splitmix64): incompressible-looking bytes at GB/s.
fn fill(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
}

fn write_file(path: &Path, size: u64, seed: u64) -> Result<()> {
    let mut f = fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut state = seed;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        fill(&mut buf[..n], &mut state);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// A synthetic checkpoint: four large weight shards holding ~90 % of `size`, and many small
/// files (optimizer state, config, tokenizer), an empty file and an empty directory.
fn make_checkpoint(dir: &Path, size: u64) -> Result<usize> {
    fs::create_dir_all(dir.join("optimizer"))?;
    fs::create_dir_all(dir.join("extra/empty"))?;
    let small_count = 200u64;
    let small_total = size / 10;
    let small = (small_total / small_count).max(1);
    let large = (size - small * small_count) / 4;
    let mut files = 0;
    for i in 0..4u64 {
        write_file(&dir.join(format!("model-{:05}-of-00004.safetensors", i + 1)), large, i + 1)?;
        files += 1;
    }
    for i in 0..small_count {
        write_file(&dir.join(format!("optimizer/state-{i:04}.bin")), small + i, 1000 + i)?;
        files += 1;
    }
    fs::write(dir.join("config.json"), b"{\"model\": \"demo\", \"step\": 1}\n")?;
    fs::write(dir.join("extra/EMPTY"), b"")?;
    Ok(files + 2)
}

fn same_bytes(a: &Path, b: &Path) -> Result<bool> {
    let (mut fa, mut fb) = (fs::File::open(a)?, fs::File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

/// Compares every file and directory of `src` with `dst`; returns the first difference.
fn compare_tree(src: &Path, dst: &Path) -> Result<Option<String>> {
    let mut stack = vec![PathBuf::new()];
    let mut count = 0;
    while let Some(rel) = stack.pop() {
        let (s, d) = (src.join(&rel), dst.join(&rel));
        let mut names: Vec<_> = fs::read_dir(&s)?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
        let mut dnames: Vec<_> = fs::read_dir(&d)?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
        names.sort();
        dnames.sort();
        if names != dnames {
            return Ok(Some(format!("{}: entries differ", rel.display())));
        }
        for n in names {
            let r = rel.join(&n);
            let meta = fs::symlink_metadata(src.join(&r))?;
            if meta.is_dir() {
                stack.push(r);
            } else {
                count += 1;
                if !same_bytes(&src.join(&r), &dst.join(&r))? {
                    return Ok(Some(format!("{}: bytes differ", r.display())));
                }
            }
        }
    }
    let _ = count;
    Ok(None)
}

fn start_replica(exe: &Path, root: &Path) -> Result<(Child, String)> {
    let mut child = Command::new(exe)
        .args(["serve", "--listen", "127.0.0.1:0", "--root"])
        .arg(root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start `shardcast serve`")?;
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && let Some(i) = line.find("listening on ") {
                let addr = line[i + 13..].split_whitespace().next().unwrap_or("").to_owned();
                let _ = tx.send(addr);
                sent = true;
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(20)).context("replica did not report its address")?;
    Ok((child, addr))
}

fn run(args: DemoArgs) -> Result<bool> {
    let exe = std::env::current_exe().context("cannot find the shardcast binary")?;
    let tmp;
    let base = match &args.dir {
        Some(d) => {
            fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            // tmpfs when it has room for the source and every replica: the demo then shows
            // the engine, not the disk (pass --dir to measure a disk).
            let need = args.size.saturating_mul(args.replicas as u64 + 1) + (256 << 20);
            let shm = Path::new("/dev/shm");
            let builder = tempfile::Builder::new().prefix("shardcast-demo").to_owned();
            tmp = if shardcast::store::free_bytes(shm).is_ok_and(|free| free >= need) {
                builder.tempdir_in(shm)?
            } else {
                builder.tempdir()?
            };
            tmp.path().to_owned()
        }
    };
    let src = base.join("ckpt");
    let _ = fs::remove_dir_all(&src);
    println!(
        "shardcast demo: generating a {:.2} GiB synthetic checkpoint in {}",
        args.size as f64 / (1u64 << 30) as f64,
        src.display()
    );
    let t = Instant::now();
    let files = make_checkpoint(&src, args.size)?;
    println!("  {files} files in {:.1} s", t.elapsed().as_secs_f64());

    let mut replicas = Replicas(Vec::new());
    let mut addrs = Vec::new();
    let mut roots = Vec::new();
    for i in 0..args.replicas {
        let root = base.join(format!("replica-{}", i + 1));
        let _ = fs::remove_dir_all(&root);
        let (child, addr) = start_replica(&exe, &root)?;
        replicas.0.push(child);
        println!("  replica {} listening on {addr}, root {}", i + 1, root.display());
        addrs.push(addr);
        roots.push(root);
    }
    let mut opts = PushOptions::new("ckpt", 1, addrs.clone());
    opts.chunk_size = args.chunk_size;
    println!("pushing ckpt@1 down the chain {}", addrs.join(" -> "));
    let report = push(&src, &opts, None).context("push failed")?;
    println!(
        "pushed {} bytes ({} files, {} chunks) in {:.2} s: {:.2} GB/s ({:.2} s of it scanning the source)",
        report.bytes,
        report.files,
        report.chunks,
        report.seconds,
        report.rate() / 1e9,
        report.manifest_seconds
    );
    let mut all_ok = report.ok();
    for (r, root) in report.replicas.iter().zip(&roots) {
        let status = match &r.outcome {
            Outcome::Published => "published".to_owned(),
            Outcome::Failed(e) => format!("FAILED: {e}"),
            Outcome::Behind => "behind".to_owned(),
        };
        let check = if r.outcome == Outcome::Published {
            match compare_tree(&src, &root.join("ckpt/1"))? {
                None => "bytes identical to the source".to_owned(),
                Some(diff) => {
                    all_ok = false;
                    format!("DIFFERS: {diff}")
                }
            }
        } else {
            String::new()
        };
        println!("  {:<22} {status:<10} {check}", r.node);
    }
    if !all_ok {
        bail!("the demo push did not reach every replica intact");
    }
    println!("ok: every replica holds ckpt@1 byte for byte");
    Ok(true)
}

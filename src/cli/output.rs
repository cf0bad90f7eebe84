//! What the binary prints: logging setup, errors, the progress bar, push reports.

use std::time::Duration;

use serde_json::json;
use shardcast::Progress;
use shardcast::PushError;
use shardcast::push::{PushOptions, PushReport};
use shardcast::wire::Outcome;

use super::{EXIT_FAILED, EXIT_PARTIAL, EXIT_USAGE};

/// Sets up tracing on stderr (`SHARDCAST_LOG` or `RUST_LOG` filters, else `default`), as text
/// or JSON lines.
pub(crate) fn init_logging(format: &str, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHARDCAST_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.with_target(false).init();
    }
}

/// Prints `error: MSG` on stderr and returns `code`, the exit code.
pub(crate) fn fail(code: u8, msg: impl std::fmt::Display) -> u8 {
    eprintln!("error: {msg}");
    code
}

/// A push's report as the JSON object `push --json` prints.
fn report_json(r: &PushReport) -> serde_json::Value {
    let replicas: Vec<_> = r
        .replicas
        .iter()
        .map(|rep| match &rep.outcome {
            Outcome::Published if r.already_held.contains(&rep.node) => {
                json!({ "node": rep.node, "status": "published", "already_held": true })
            }
            Outcome::Published => json!({ "node": rep.node, "status": "published" }),
            Outcome::Behind => json!({ "node": rep.node, "status": "behind" }),
            Outcome::Failed(e) => {
                json!({ "node": rep.node, "status": "failed", "error": { "kind": e.kind, "message": e.message } })
            }
        })
        .collect();
    json!({
        "name": r.name, "version": r.version, "bytes": r.bytes, "files": r.files, "chunks": r.chunks,
        "seconds": r.seconds, "manifest_seconds": r.manifest_seconds, "gbps": r.rate() / 1e9,
        "ok": r.ok(), "published": r.published(), "required": r.required.min(r.replicas.len()),
        "replicas": replicas,
        "sent_raw_bytes": r.coded.raw, "sent_wire_bytes": r.coded.wire,
        "compressed_chunks": r.coded.compressed_chunks,
        "lane_chunks": r.lane_chunks,
        "lane_transports": r.lane_transports,
        "repairs": r.repairs,
        "lane_addrs": r.lane_addrs.iter().map(|(local, peer)| serde_json::json!({"local": local, "peer": peer})).collect::<Vec<_>>(),
        "delta_chunks": r.coded.delta_chunks, "delta_wire_bytes": r.coded.delta_wire,
    })
}

/// Draws a one-line progress bar on stderr until `done`: bytes written on every replica, the
/// first hop's bytes, rate and ETA. Only on a terminal (the caller checks).
pub(crate) fn draw_progress(p: &Progress, replicas: usize, done: &std::sync::atomic::AtomicBool) {
    use std::io::Write;
    use std::sync::atomic::Ordering::Relaxed;
    let start = std::time::Instant::now();
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let mut drawn = false;
    while !done.load(Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
        let (total, acked) = (p.total_bytes.load(Relaxed), p.acked_bytes.load(Relaxed));
        if total == 0 || !p.streaming.load(Relaxed) {
            continue;
        }
        let secs = start.elapsed().as_secs_f64();
        let rate = acked as f64 / secs.max(1e-3);
        let frac = acked as f64 / total as f64;
        let width = 30;
        let filled = ((frac * width as f64) as usize).min(width);
        let eta = if rate > 0.0 { format!("{:.0}s", (total - acked) as f64 / rate) } else { "?".into() };
        let sent = p.sent_chunks.load(Relaxed);
        let chunks = p.total_chunks.load(Relaxed).max(1);
        let line = format!(
            "\r[{}{}] {:>3.0}%  {:.2}/{:.2} GiB on all {replicas} replica(s)  {:.2} GB/s  ETA {eta}  (first hop: {}/{} chunks)",
            "#".repeat(filled),
            "-".repeat(width - filled),
            frac * 100.0,
            gib(acked),
            gib(total),
            rate / 1e9,
            sent,
            chunks,
        );
        let mut e = std::io::stderr().lock();
        let _ = write!(e, "{line}\x1b[K");
        let _ = e.flush();
        drawn = true;
    }
    if drawn {
        let _ = write!(std::io::stderr(), "\r\x1b[K");
    }
}

/// Prints a push's outcome (its report, or the error that stopped it; text or JSON on stdout,
/// each failure on stderr) and returns the exit code.
pub(crate) fn print_push_result(opts: &PushOptions, result: Result<PushReport, PushError>, json: bool) -> u8 {
    match result {
        Ok(r) => print_report(&r, json),
        Err(e) => print_push_error(opts, &e, json),
    }
}

/// A report that ran to the end of the chain: 0 when enough replicas published, 3 when some
/// did, 1 when none did.
fn print_report(r: &PushReport, json: bool) -> u8 {
    if json {
        println!("{}", report_json(r));
    } else {
        println!(
            "{}@{}: {} bytes in {} files, {:.2} s, {:.2} GB/s",
            r.name,
            r.version,
            r.bytes,
            r.files,
            r.seconds,
            r.rate() / 1e9
        );
        if r.coded.compressed_chunks > 0 {
            println!(
                "  compressed: {} of {} chunk bytes on the wire ({:.3} x), {} chunks compressed",
                r.coded.wire,
                r.coded.raw,
                r.coded.wire as f64 / r.coded.raw.max(1) as f64,
                r.coded.compressed_chunks
            );
        }
        if r.coded.delta_chunks > 0 {
            println!(
                "  deltas: {} chunks as XOR deltas, {} bytes on the wire",
                r.coded.delta_chunks, r.coded.delta_wire
            );
        }
        for rep in &r.replicas {
            match &rep.outcome {
                Outcome::Published if r.already_held.contains(&rep.node) => {
                    println!("  {:<22} published (already held: took no data)", rep.node)
                }
                Outcome::Published => println!("  {:<22} published", rep.node),
                Outcome::Behind => {
                    println!("  {:<22} behind: still receiving (`shardcast status {}`)", rep.node, rep.node)
                }
                Outcome::Failed(e) => println!("  {:<22} failed: {e}", rep.node),
            }
        }
    }
    for rep in &r.replicas {
        if let Outcome::Failed(e) = &rep.outcome {
            eprintln!("error: replica {}: {e}", rep.node);
        }
    }
    if r.ok() {
        0
    } else if r.published() > 0 {
        EXIT_PARTIAL
    } else {
        EXIT_FAILED
    }
}

/// A push that stopped before its reports: 2 for bad input, else 1.
fn print_push_error(opts: &PushOptions, e: &PushError, json: bool) -> u8 {
    if json {
        println!(
            "{}",
            json!({
                "name": opts.name, "version": opts.version, "ok": false,
                "error": { "node": e.node(), "kind": e.kind(), "message": e.to_string() },
            })
        );
    }
    eprintln!("error: {e}");
    if e.is_input_error() || matches!(e, PushError::Unsupported(_)) { EXIT_USAGE } else { EXIT_FAILED }
}

//! `shardcast push`: a directory or file as NAME@VERSION down a chain of replicas.

use std::time::Duration;

use shardcast::IoChoice;
use shardcast::Progress;
use shardcast::PushError;
use shardcast::push::{PushOptions, PushReport};
use shardcast::wire::Mode;

use super::Global;
use super::args::PushArgs;
use super::output;

/// Runs `shardcast push` and returns its exit code.
pub(crate) fn run(a: PushArgs, g: &Global) -> u8 {
    output::init_logging(&g.log_format, "warn");
    let mut opts = PushOptions::new(a.name, a.version, a.to);
    opts.auth = g.auth.clone();
    opts.encrypt = g.encrypt;
    opts.chunk_size = a.chunk_size;
    opts.mode = if a.mode == "async" { Mode::Async } else { Mode::Sync };
    opts.transport = a.transport;
    opts.rdma = a.rdma.config();
    opts.pool_bytes = a.pool_mb.max(1) << 20;
    opts.io = IoChoice::from_env();
    opts.connect_timeout = Duration::from_secs(a.connect_timeout.max(1));
    opts.idle_timeout = Duration::from_secs(a.idle_timeout.max(1));
    opts.hop_timeout = Duration::from_secs(a.hop_timeout.max(1));
    opts.keep = a.keep.unwrap_or(0);
    opts.incremental = a.incremental;
    opts.min_replicas = a.min_replicas.map(|m| m as usize);
    opts.repair = !a.no_repair;
    opts.compress = a.compress;
    opts.compress_level = a.compress_level;
    opts.lanes = a.lanes;
    opts.rails = a.rails;
    opts.delta_base = a.delta_base.filter(|_| a.delta);
    let source = a.source;
    with_progress(&opts, a.json, |o, p| shardcast::push(&source, o, p))
}

/// Runs a push (plain or staged) with a progress bar on a terminal, prints its report and
/// returns the exit code.
pub(crate) fn with_progress(
    opts: &PushOptions,
    json: bool,
    push: impl FnOnce(&PushOptions, Option<&Progress>) -> Result<PushReport, PushError>,
) -> u8 {
    use std::io::IsTerminal;
    let show = !json && std::io::stderr().is_terminal();
    let progress = Progress::default();
    let done = std::sync::atomic::AtomicBool::new(false);
    let result = std::thread::scope(|s| {
        if show {
            s.spawn(|| output::draw_progress(&progress, opts.to.len(), &done));
        }
        let r = push(opts, show.then_some(&progress));
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        r
    });
    output::print_push_result(opts, result, json)
}

//! `shardcast mirror`: watch a checkpoint directory, push each completed checkpoint.

use std::time::Duration;

use shardcast::mirror::MirrorOptions;
use shardcast::push::PushOptions;

use super::args::MirrorArgs;
use super::{EXIT_USAGE, Global, output};

/// Runs `shardcast mirror` (until killed, or once with `--once`) and returns its exit code.
pub(crate) fn run(a: MirrorArgs, g: &Global) -> u8 {
    output::init_logging(&g.log_format, "warn");
    let mut push = PushOptions::new(a.name, 0, a.to);
    push.auth = g.auth.clone();
    push.encrypt = g.encrypt;
    push.chunk_size = a.chunk_size;
    push.transport = a.transport;
    push.keep = a.keep.unwrap_or(0);
    push.incremental = a.incremental;
    push.compress = a.compress;
    if !a.watch.is_dir() {
        return output::fail(EXIT_USAGE, format!("--watch {}: not a directory", a.watch.display()));
    }
    let opts = MirrorOptions {
        watch: a.watch,
        marker: a.marker,
        interval: Duration::from_millis(a.interval_ms.max(10)),
        push,
        delta: a.delta,
    };
    shardcast::mirror::run(&opts, a.once, |_, line| println!("{line}"));
    0
}

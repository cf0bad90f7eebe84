//! `shardcast stage`: an epoch's dataset shards, each node exactly the files a plan assigns it.

use std::time::Duration;

use shardcast::push::PushOptions;
use shardcast::stage::Plan;

use super::args::StageArgs;
use super::{EXIT_USAGE, Global, output};

/// Runs `shardcast stage` and returns its exit code.
pub(crate) fn run(a: StageArgs, g: &Global) -> u8 {
    output::init_logging(&g.log_format, "warn");
    let plan = match Plan::load(&a.plan) {
        Ok(p) => p,
        Err(e) => return output::fail(EXIT_USAGE, e),
    };
    let mut opts = PushOptions::new(plan.name.clone(), plan.version, plan.chain());
    opts.auth = g.auth.clone();
    opts.encrypt = g.encrypt;
    opts.transport = a.transport;
    opts.rdma = a.rdma.config();
    opts.connect_timeout = Duration::from_secs(a.connect_timeout.max(1));
    opts.keep = a.keep.unwrap_or(0);
    super::push::with_progress(&opts, a.json, |o, p| shardcast::stage::stage(&plan, o, p))
}

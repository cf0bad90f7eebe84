//! `shardcast status NODE`: the shard sets and versions a replica holds, and what it receives.

use std::time::Duration;

use serde_json::json;

use super::args::StatusArgs;
use super::{EXIT_FAILED, Global, output};

/// Runs `shardcast status` and returns its exit code.
pub(crate) fn run(a: StatusArgs, g: &Global) -> u8 {
    output::init_logging(&g.log_format, "warn");
    let addr = a.addr;
    match shardcast::server::status(&addr, Duration::from_secs(10), g.auth.key(), g.auth.tls()) {
        Ok(sets) => {
            if a.json {
                println!("{}", json!({ "node": addr, "sets": sets }));
            } else if sets.is_empty() {
                println!("{addr}: no shard sets");
            } else {
                println!("{addr}:");
                for s in sets {
                    let cur = s.current.map_or("-".into(), |c| c.to_string());
                    let vs: Vec<String> = s.versions.iter().map(u64::to_string).collect();
                    println!("  {:<24} current {cur:<10} versions {}", s.name, vs.join(", "));
                    for (v, done, total) in &s.receiving {
                        let pct = if *total > 0 { 100.0 * *done as f64 / *total as f64 } else { 100.0 };
                        println!(
                            "  {:<24} receiving {v}: {:.1} of {:.1} MiB ({pct:.0} %)",
                            "",
                            *done as f64 / 1048576.0,
                            *total as f64 / 1048576.0
                        );
                    }
                }
            }
            0
        }
        Err(e) => {
            if a.json {
                println!("{}", json!({ "node": addr, "error": { "kind": e.kind, "message": e.message } }));
            }
            output::fail(EXIT_FAILED, e)
        }
    }
}

//! `shardcast serve`: run a replica until killed.

use std::sync::Arc;
use std::time::Duration;

use shardcast::Auth;
use shardcast::metrics::Metrics;
use shardcast::server::{ServeOptions, Server};

use super::args::ServeArgs;
use super::{EXIT_FAILED, EXIT_USAGE, Global, output};

/// Runs `shardcast serve` and returns its exit code (only when it cannot start).
pub(crate) fn run(a: ServeArgs, g: &Global) -> u8 {
    output::init_logging(&g.log_format, "info");
    let (keep, pool_mb) = (a.keep, a.pool_mb);
    let metrics = a.metrics.clone();
    let mut opts = match options(a, g) {
        Ok(o) => o,
        Err(code) => return code,
    };
    if let Some(addr) = metrics {
        let m = Arc::new(Metrics::new());
        match shardcast::metrics::serve(&addr, Arc::clone(&m)) {
            Ok(bound) => tracing::info!("metrics on http://{bound}/metrics"),
            Err(e) => return output::fail(EXIT_FAILED, format!("cannot serve metrics on {addr}: {e}")),
        }
        opts.metrics = Some(m);
    }
    let root = opts.root.clone();
    // Pinned pools: one per concurrent push, a few at a time in practice.
    if let Err(why) = shardcast::check_memlock(pool_mb << 20, 2) {
        tracing::warn!("{why}");
    }
    let open_to_anyone = opts.auth.is_none() && opts.acl.is_empty();
    match Server::bind(opts) {
        Ok(server) => {
            // Without a key or TLS nothing is authenticated: say so loudly where others can
            // reach the replica (loopback is this host's business).
            if open_to_anyone && !server.local_addr().ip().is_loopback() {
                tracing::warn!(
                    "INSECURE: no --key-file or --tls-cert: anyone who can reach {} can push to this \
                     replica (write under {}) and, as a replica after it, lie about what was published; \
                     give every node a cluster key (--key-file) or mutual TLS",
                    server.local_addr(),
                    root.display()
                );
            }
            let pinned = shardcast::memlock_limit().map_or("unknown".into(), |l| {
                if l == u64::MAX { "unlimited".into() } else { format!("{} KiB", l >> 10) }
            });
            tracing::info!(
                "listening on {} (root {}, keep {keep}, pool {pool_mb} MiB per push, memlock limit {pinned}{})",
                server.local_addr(),
                root.display(),
                if shardcast::server::bench_no_verify() { ", DIGEST VERIFICATION OFF (benchmark)" } else { "" }
            );
            server.run();
            0
        }
        Err(e) => {
            let code = if matches!(e, shardcast::ServeError::Unsupported(_) | shardcast::ServeError::BadRail(_)) {
                EXIT_USAGE
            } else {
                EXIT_FAILED
            };
            output::fail(code, e)
        }
    }
}

/// The library's options from the flags, with the ACL and the audit log loaded; a usage
/// error (printed) as the exit code.
fn options(a: ServeArgs, g: &Global) -> Result<ServeOptions, u8> {
    let mut opts = ServeOptions::new(a.listen, a.root);
    opts.auth = g.auth.clone();
    opts.require_encrypt = g.encrypt;
    opts.limits.max_staging = a.max_staging_mb << 20;
    opts.limits.partial_max_age =
        (a.partial_max_age_hours > 0).then(|| Duration::from_secs(a.partial_max_age_hours * 3600));
    opts.limits.partial_max_bytes = a.partial_max_mb << 20;
    if a.acl.is_some() && matches!(g.auth, Auth::Tls(_)) {
        return Err(output::fail(
            EXIT_USAGE,
            "--acl lists cluster keys, and this replica authenticates with mutual TLS (every \
             certificate from --tls-ca may push): use one or the other",
        ));
    }
    if let Some(path) = a.acl {
        opts.acl = shardcast::auth::load_acl(&path).map_err(|e| output::fail(EXIT_USAGE, e))?;
    }
    if let Some(path) = a.audit_log {
        let log = shardcast::audit::AuditLog::open(&path)
            .map_err(|e| output::fail(EXIT_USAGE, format!("cannot open the audit log {}: {e}", path.display())))?;
        opts.audit = Some(log);
    }
    opts.keep = a.keep;
    opts.rails = a.rails;
    opts.pool_bytes = a.pool_mb << 20;
    opts.transport = a.transport;
    opts.rdma = a.rdma.config();
    opts.limits.idle_timeout = Duration::from_secs(a.idle_timeout.max(1));
    opts.limits.sync_timeout = Duration::from_secs(a.sync_timeout.max(1));
    opts.limits.hop_timeout = Duration::from_secs(a.hop_timeout.max(1));
    opts.limits.max_sessions = a.max_sessions.max(1);
    opts.limits.max_per_peer = a.max_sessions_per_peer.max(1);
    opts.limits.handshake_timeout = Duration::from_secs(a.handshake_timeout.max(1));
    opts.limits.max_handshakes = a.max_handshakes.max(1);
    opts.limits.max_handshakes_per_peer = a.max_handshakes_per_peer.max(1);
    opts.limits.max_chain = a.max_chain.max(1);
    opts.limits.max_entries = a.max_entries;
    opts.limits.max_manifest = a.max_manifest_mb.clamp(1, shardcast::wire::MAX_HELLO >> 20) << 20;
    opts.limits.max_version_ahead = a.max_version_ahead;
    Ok(opts)
}

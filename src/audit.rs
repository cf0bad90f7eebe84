//! The audit log of a replica (`serve --audit-log FILE`): one JSON object per line for every
//! push it took part in or refused, and every connection it refused: time, peer address, the
//! key id the peer authenticated with, name, version, bytes, outcome and reason.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::json;

/// An append-only JSON-lines file.
#[derive(Debug)]
pub struct AuditLog {
    file: Mutex<File>,
}

impl AuditLog {
    /// Opens (creating, mode 600) `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<Arc<Self>> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
        Ok(Arc::new(Self { file: Mutex::new(file) }))
    }

    /// Appends one record (a line is written whole: one `write` under the lock) and syncs it
    /// (`fdatasync`) before returning, so a refusal or push recorded is on disk before the
    /// replica goes on: a crash right after loses no line (records are rare: one per push or
    /// refused connection).
    pub fn record(&self, r: &Record<'_>) {
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        let mut line = json!({
            "time": time, "peer": r.peer, "key_id": r.key_id, "name": r.name, "version": r.version,
            "bytes": r.bytes, "outcome": r.outcome, "reason": r.reason,
        })
        .to_string();
        line.push('\n');
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = f.write_all(line.as_bytes()).and_then(|()| f.sync_data()) {
            tracing::warn!("cannot write the audit log: {e}");
        }
    }
}

/// One audit record.
#[derive(Debug, Default, Clone)]
pub struct Record<'a> {
    /// The peer's address.
    pub peer: &'a str,
    /// The key id it authenticated with (None: no key in use).
    pub key_id: Option<&'a str>,
    /// Shard set name (None: refused before HELLO).
    pub name: Option<&'a str>,
    /// Version.
    pub version: Option<u64>,
    /// Bytes of the version on this node.
    pub bytes: u64,
    /// `published`, `failed`, `aborted`, `upstream_lost`, `refused`, `status`.
    pub outcome: &'a str,
    /// Why, when it did not publish.
    pub reason: Option<String>,
}

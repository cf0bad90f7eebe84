//! Authentication of every hop with a shared cluster key (`--key-file`).
//!
//! Before anything else on a connection (HELLO, STATUS_REQ), when the dialing side has a key:
//! ```text
//! client -> server  AUTH{1, key id, client nonce}
//! server -> client  AUTH{2, server nonce, HMAC(key, "shardcast server" | cn | sn)}
//! client -> server  AUTH{3, HMAC(key, "shardcast client" | cn | sn)}
//! ```
//! HMAC-SHA256 (aws-lc-rs). Both sides prove they hold the key, each over a nonce the other chose, so
//! neither a replayed handshake (the server's nonce is new) nor a fake replica (it cannot make
//! the server proof) gets through; the proofs are compared in constant time. The key id (the
//! first 8 bytes of SHA-256 of the key, hex) names a key in messages and the audit log; the key
//! itself never appears anywhere but in memory. A replica with a key refuses a peer without one
//! (and vice versa) with a message saying so, before anything is staged.

use std::io;
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use aws_lc_rs::hmac;

use crate::error::{ErrorKind, NodeError};
use crate::wire::{self, Dec, Enc, Kind};

const NONCE: usize = 32;
const STEP_HELLO: u8 = 1;
const STEP_CHALLENGE: u8 = 2;
const STEP_PROOF: u8 = 3;

/// A cluster key loaded from its file.
#[derive(Clone)]
pub struct ClusterKey {
    key: hmac::Key,
    id: String,
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key: only its id.
        write!(f, "ClusterKey({})", self.id)
    }
}

impl ClusterKey {
    /// Reads a key file: at least 32 bytes of secret (surrounding whitespace ignored), readable
    /// by its owner only.
    pub fn load(path: &Path) -> Result<Self, String> {
        use std::os::unix::fs::PermissionsExt;
        let shown = path.display();
        let meta = std::fs::metadata(path).map_err(|e| format!("cannot read the key file {shown}: {e}"))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(format!(
                "the key file {shown} is readable by others (mode {:o}): chmod 600 it",
                meta.permissions().mode() & 0o777
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read the key file {shown}: {e}"))?;
        let secret = bytes.trim_ascii();
        if secret.len() < 32 {
            return Err(format!(
                "the key file {shown} holds {} bytes; a cluster key needs at least 32 (e.g. `head -c 32 /dev/urandom | base64 > FILE`)",
                secret.len()
            ));
        }
        Ok(Self::from_secret(secret))
    }

    /// A key from its secret bytes.
    pub fn from_secret(secret: &[u8]) -> Self {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, secret);
        let id = digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
        Self { key: hmac::Key::new(hmac::HMAC_SHA256, secret), id }
    }

    /// The key's public id (names it in messages and the audit log).
    pub fn id(&self) -> &str {
        &self.id
    }

    fn proof(&self, who: &[u8], cn: &[u8], sn: &[u8]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(who);
        ctx.update(cn);
        ctx.update(sn);
        ctx.sign()
    }

    /// The secret of the connection whose handshake exchanged `cn` and `sn`: both ends compute
    /// it, nobody without the key can, and no other connection has it (the nonces are new).
    fn session(&self, cn: &[u8], sn: &[u8]) -> crate::crypt::SessionSecret {
        let tag = self.proof(b"shardcast session", cn, sn);
        crate::crypt::SessionSecret(tag.as_ref().try_into().expect("HMAC-SHA256 is 32 bytes"))
    }

    fn verify(&self, who: &[u8], cn: &[u8], sn: &[u8], tag: &[u8]) -> bool {
        let mut msg = Vec::with_capacity(who.len() + cn.len() + sn.len());
        msg.extend_from_slice(who);
        msg.extend_from_slice(cn);
        msg.extend_from_slice(sn);
        hmac::verify(&self.key, &msg, tag).is_ok()
    }
}

/// A fresh nonce from the kernel's generator. Not aws-lc's: its generator seeds itself with CPU
/// jitter entropy on first use, which costs a push process tens of milliseconds of CPU before
/// its first frame (and stalls behind the pool's `mlock` for its scratch memory): most of what
/// a cluster key cost on the loopback hop (BENCHMARKS, "authenticated frames").
fn nonce() -> io::Result<[u8; NONCE]> {
    let mut n = [0u8; NONCE];
    getrandom::fill(&mut n).map_err(|e| io::Error::other(format!("no randomness for a nonce: {e}")))?;
    Ok(n)
}

fn refused(node: &str, why: impl Into<String>) -> NodeError {
    NodeError::new(ErrorKind::Unauthorized, format!("{node}: {}", why.into()))
}

/// The dialing side: proves the key to `node` and checks that `node` holds it too. Returns the
/// connection's session secret (the key of encrypted chunks).
pub fn client(
    conn: &mut TcpStream,
    node: &str,
    key: &ClusterKey,
    timeout: Duration,
) -> Result<crate::crypt::SessionSecret, NodeError> {
    let lost = |e: &dyn std::fmt::Display| {
        NodeError::new(ErrorKind::ConnectionLost, format!("connection to {node} lost during authentication: {e}"))
    };
    conn.set_read_timeout(Some(timeout)).map_err(|e| lost(&e))?;
    let cn = nonce().map_err(|e| lost(&e))?;
    let mut e = Enc::default();
    e.u8(STEP_HELLO).str(key.id());
    e.0.extend_from_slice(&cn);
    wire::write_frame(conn, Kind::Auth, 0, &e.0).map_err(|e| lost(&e))?;
    // The peer is not authenticated yet: its answer is an AUTH or a REJECT, nothing larger.
    let frame = wire::read_frame_max(conn, wire::MAX_REPORTS).map_err(|e| lost(&e))?;
    match frame.header.kind {
        Kind::Auth => {}
        Kind::Reject => {
            let why = wire::decode_reports(&frame.payload)
                .ok()
                .and_then(|r| r.into_iter().next())
                .and_then(|r| match r.outcome {
                    wire::Outcome::Failed(e) => Some(e.message),
                    _ => None,
                })
                .unwrap_or_else(|| "refused".into());
            return Err(refused(node, why));
        }
        k => return Err(refused(node, format!("answered authentication with {}", k.name()))),
    }
    let p = &frame.payload;
    if p.len() != 1 + NONCE + 32 || p[0] != STEP_CHALLENGE {
        return Err(refused(node, "sent a malformed authentication challenge"));
    }
    let (sn, server_tag) = (&p[1..1 + NONCE], &p[1 + NONCE..]);
    if !key.verify(b"shardcast server", &cn, sn, server_tag) {
        return Err(refused(
            node,
            format!("does not hold cluster key {} (its proof is wrong): not talking to it", key.id()),
        ));
    }
    let tag = key.proof(b"shardcast client", &cn, sn);
    let mut out = vec![STEP_PROOF];
    out.extend_from_slice(tag.as_ref());
    wire::write_frame(conn, Kind::Auth, 0, &out).map_err(|e| lost(&e))?;
    conn.set_read_timeout(None).map_err(|e| lost(&e))?;
    Ok(key.session(&cn, sn))
}

/// The accepting side, after the peer's first frame was `AUTH{1, …}` (its payload): finds the
/// peer's key among `keys` by its id, answers the challenge and checks the peer's proof.
/// Returns the peer's key id and the connection's session secret.
pub fn server(
    conn: &mut TcpStream,
    first: &[u8],
    keys: &[&ClusterKey],
    timeout: Duration,
) -> Result<(String, crate::crypt::SessionSecret), String> {
    let mut d = Dec::new(first);
    let step = d.u8("step").map_err(|e| e.to_string())?;
    let their_id = d.str("key id").map_err(|e| e.to_string())?;
    let cn = &first[first.len() - d.remaining()..];
    if step != STEP_HELLO || cn.len() != NONCE {
        return Err("malformed authentication".into());
    }
    let Some(key) = keys.iter().find(|k| k.id() == their_id) else {
        // The ids of this replica's keys go to its own log only, never to a peer that has not
        // proved it holds one of them.
        let ours: Vec<&str> = keys.iter().map(|k| k.id()).collect();
        tracing::warn!("a peer offered cluster key {their_id}; this replica has {}", ours.join(", "));
        return Err(format!("wrong cluster key: the peer's key {their_id} is not one this replica accepts"));
    };
    let sn = nonce().map_err(|e| e.to_string())?;
    let tag = key.proof(b"shardcast server", cn, &sn);
    let mut out = vec![STEP_CHALLENGE];
    out.extend_from_slice(&sn);
    out.extend_from_slice(tag.as_ref());
    wire::write_frame(conn, Kind::Auth, 0, &out).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let frame = wire::read_frame_max(conn, 1 + 32).map_err(|e| format!("no proof from the peer: {e}"))?;
    let p = &frame.payload;
    if frame.header.kind != Kind::Auth || p.len() != 1 + 32 || p[0] != STEP_PROOF {
        return Err("malformed authentication proof".into());
    }
    if !key.verify(b"shardcast client", cn, &sn, &p[1..]) {
        return Err("wrong proof: the peer does not hold the cluster key (or replayed an old handshake)".into());
    }
    Ok((their_id, key.session(cn, &sn)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_the_key_and_both_nonces() {
        let k = ClusterKey::from_secret(&[7u8; 32]);
        let other = ClusterKey::from_secret(&[8u8; 32]);
        let (cn, sn) = ([1u8; 32], [2u8; 32]);
        let t = k.proof(b"shardcast client", &cn, &sn);
        assert!(k.verify(b"shardcast client", &cn, &sn, t.as_ref()));
        assert!(!k.verify(b"shardcast server", &cn, &sn, t.as_ref()), "a client proof is not a server proof");
        assert!(!k.verify(b"shardcast client", &cn, &[3u8; 32], t.as_ref()), "a new server nonce needs a new proof");
        assert!(!other.verify(b"shardcast client", &cn, &sn, t.as_ref()));
        assert_ne!(k.id(), other.id());
        assert_eq!(format!("{k:?}"), format!("ClusterKey({})", k.id()));
    }
}

/// Which names a key may push, whether its pushes may move `current`, and whether they may
/// prune versions (`serve --acl FILE`). The limits travel with the push down the chain (see
/// [`crate::wire::Grant`]), so they hold at every node, not only the first.
#[derive(Debug, Clone)]
pub struct AclEntry {
    /// The key.
    pub key: ClusterKey,
    /// Name prefixes it may push (an empty prefix: any name).
    pub names: Vec<String>,
    /// Whether a version it pushes may become `current` (else it is published beside it).
    pub replace_current: bool,
    /// Whether its pushes may prune versions (HELLO's `keep`, `push --keep`).
    pub prune: bool,
}

impl AclEntry {
    /// Whether this key may push `name`.
    pub fn allows(&self, name: &str) -> bool {
        self.names.iter().any(|p| name.starts_with(p.as_str()))
    }

    /// The limits this entry puts on a push.
    pub fn limits(&self) -> crate::wire::Limits {
        crate::wire::Limits { names: self.names.clone(), replace_current: self.replace_current, prune: self.prune }
    }
}

/// Reads an ACL file:
/// ```toml
/// [[key]]
/// file = "/etc/shardcast/trainer.key"   # a key file, as for --key-file
/// names = ["ckpt-", "llm-"]             # name prefixes it may push ("" = any)
/// replace_current = true                # may its versions become `current`? (default true)
/// prune = false                         # may its pushes prune versions (push --keep)? (default false)
/// ```
pub fn load_acl(path: &Path) -> Result<Vec<AclEntry>, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        key: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Entry {
        file: std::path::PathBuf,
        names: Vec<String>,
        #[serde(default = "yes")]
        replace_current: bool,
        #[serde(default)]
        prune: bool,
    }
    fn yes() -> bool {
        true
    }
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read the ACL {shown}: {e}"))?;
    let f: File = toml::from_str(&text).map_err(|e| format!("ACL {shown}: {}", e.message()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    f.key
        .into_iter()
        .map(|e| {
            let file = if e.file.is_relative() { base.join(&e.file) } else { e.file };
            Ok(AclEntry {
                key: ClusterKey::load(&file)?,
                names: e.names,
                replace_current: e.replace_current,
                prune: e.prune,
            })
        })
        .collect()
}

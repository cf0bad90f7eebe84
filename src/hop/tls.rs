//! Mutual TLS as the authentication of a connection, for sites with a PKI (`--tls-cert`,
//! `--tls-key`, `--tls-ca`): the alternative to the cluster key of `auth.rs`.
//!
//! A connection starts with a TLS 1.3 handshake (rustls, aws-lc-rs provider) in which both sides
//! present a certificate chained to the site's CA; the dialing side also checks that the
//! replica's certificate is valid for the host it dialed (a name or an IP address SAN). Once the
//! replica has checked the peer's certificate it sends one short message over TLS, so that the
//! dialing side knows it was accepted. Both sides then take a 32-byte session secret from the TLS
//! exporter (RFC 8446 §7.5), which `--encrypt` derives its chunk key from exactly as it does from
//! the cluster key's handshake, and the connection goes on in shardcast's own frames. TLS is the
//! authenticated key exchange; the data path (io_uring, RDMA) stays as it is. The replica sends
//! no session tickets, so nothing of TLS follows the ready message on the wire.
//!
//! A peer is named in logs and the audit log by `cert:` and 8 bytes of the SHA-256 of its
//! certificate.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

use crate::crypt::SessionSecret;
use crate::error::{ErrorKind, NodeError};

/// What the replica sends over TLS once it accepted the peer's certificate.
const READY: &[u8; 16] = b"shardcast ready\n";
/// The exporter label of the session secret.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-shardcast-session";

/// This node's certificate and key and the CA it trusts, as both a TLS server (replicas) and a
/// TLS client (primaries, relays, `status`).
pub struct TlsIdentity {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    id: String,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsIdentity({})", self.id)
    }
}

impl TlsIdentity {
    /// Loads the certificate chain (PEM, this node's certificate first), its private key (PEM)
    /// and the CA certificates (PEM) peers must chain to.
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Self, String> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
        if certs.is_empty() {
            return Err(format!("--tls-cert {}: no certificate in the file", cert.display()));
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
        let mut roots = RootCertStore::empty();
        let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?;
        for c in cas {
            roots.add(c).map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("--tls-ca {}: no CA certificate in the file", ca.display()));
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
        // Nothing of TLS may follow the ready message: the connection goes on in plain frames.
        server.send_tls13_tickets = 0;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs.clone(), key)
            .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
        client.resumption = rustls::client::Resumption::disabled();
        Ok(Self { server: Arc::new(server), client: Arc::new(client), id: cert_id(&certs[0]) })
    }

    /// This node's own certificate id.
    pub fn id(&self) -> &str {
        &self.id
    }
}

fn cert_id(cert: &CertificateDer<'_>) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert.as_ref());
    let hex: String = d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("cert:{hex}")
}

fn secret_of(conn: &rustls::ConnectionCommon<impl Sized>) -> Result<SessionSecret, rustls::Error> {
    conn.export_keying_material([0u8; 32], EXPORTER_LABEL, None).map(SessionSecret)
}

/// The dialing side: TLS handshake with `node` (its certificate must be valid for the host in
/// `node`), then waits for the replica's ready message. Returns the session secret.
pub fn client(
    tcp: &mut TcpStream,
    node: &str,
    id: &TlsIdentity,
    timeout: Duration,
) -> Result<SessionSecret, NodeError> {
    let refused = |why: String| NodeError::new(ErrorKind::Unauthorized, format!("{node}: mutual TLS failed: {why}"));
    let host = host_of(node);
    let name =
        ServerName::try_from(host.to_owned()).map_err(|e| refused(format!("{host:?} is not a host name: {e}")))?;
    let mut conn = ClientConnection::new(id.client.clone(), name).map_err(|e| refused(e.to_string()))?;
    tcp.set_read_timeout(Some(timeout)).map_err(|e| refused(e.to_string()))?;
    let hint = "does it run with --tls-cert, --tls-key and --tls-ca, and is its certificate valid for this address \
                and from the same CA?";
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(tcp) {
            return Err(refused(format!("{e} ({hint})")));
        }
    }
    // The handshake is complete once the server's Finished arrived; ours may still be queued.
    while conn.wants_write() {
        conn.write_tls(tcp).map_err(|e| refused(e.to_string()))?;
    }
    // The replica checks this node's certificate after the handshake: its ready message (or an
    // alert) says how that went.
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while got.len() < READY.len() {
        match conn.reader().read(&mut buf) {
            Ok(0) => {
                return Err(refused("the replica closed the connection (it refused this node's certificate)".into()));
            }
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let n = conn.read_tls(tcp).map_err(|e| refused(format!("waiting for the replica's answer: {e}")))?;
                if n == 0 {
                    return Err(refused(
                        "the replica closed the connection (it refused this node's certificate)".into(),
                    ));
                }
                conn.process_new_packets().map_err(|e| refused(format!("the replica refused this node: {e}")))?;
            }
            Err(e) => return Err(refused(e.to_string())),
        }
    }
    if got != READY {
        return Err(refused("the replica answered with something else than shardcast's ready message".into()));
    }
    let secret = secret_of(&conn).map_err(|e| refused(e.to_string()))?;
    tcp.set_read_timeout(None).map_err(|e| refused(e.to_string()))?;
    Ok(secret)
}

/// The accepting side: TLS handshake, the peer's certificate checked against the CA, the ready
/// message sent. Returns the peer's certificate id and the session secret, or why it was refused.
pub fn server(tcp: &mut TcpStream, id: &TlsIdentity, timeout: Duration) -> Result<(String, SessionSecret), String> {
    let mut conn = ServerConnection::new(id.server.clone()).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(tcp) {
            // Let the peer hear why (a TLS alert), if it still listens.
            let _ = conn.write_tls(tcp);
            return Err(format!("mutual TLS failed: {e}"));
        }
    }
    let peer = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(cert_id)
        .ok_or_else(|| "mutual TLS failed: the peer presented no certificate".to_owned())?;
    let secret = secret_of(&conn).map_err(|e| e.to_string())?;
    conn.writer().write_all(READY).map_err(|e| e.to_string())?;
    while conn.wants_write() {
        conn.write_tls(tcp).map_err(|e| e.to_string())?;
    }
    tcp.flush().map_err(|e| e.to_string())?;
    Ok((peer, secret))
}

/// The host part of `host:port` or `[v6]:port`.
fn host_of(node: &str) -> &str {
    let host = node.rsplit_once(':').map_or(node, |(h, _)| h);
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn hosts_of_addresses() {
        assert_eq!(host_of("10.0.0.1:7071"), "10.0.0.1");
        assert_eq!(host_of("node-3.cluster:7071"), "node-3.cluster");
        assert_eq!(host_of("[fd00::1]:7071"), "fd00::1");
        assert_eq!(host_of("node"), "node");
    }
}

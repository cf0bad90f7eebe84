//! `--key-file` or `--tls-cert`, `--tls-key`, `--tls-ca` into the library's [`Auth`]: one way
//! to authenticate, never both.

use shardcast::Auth;
use shardcast::auth::ClusterKey;
use shardcast::tls::TlsIdentity;

use super::args::Cli;

/// Loads the key file or the TLS identity the flags name (clap has checked that the three TLS
/// flags come together). Both a key and TLS is a usage error.
pub(crate) fn from_flags(cli: &Cli) -> Result<Auth, String> {
    let key = cli.key_file.as_deref().map(ClusterKey::load).transpose()?;
    match (&cli.tls_cert, &cli.tls_key, &cli.tls_ca, key) {
        (Some(cert), Some(tls_key), Some(ca), None) => Ok(Auth::from(TlsIdentity::load(cert, tls_key, ca)?)),
        (Some(_), ..) => Err("--key-file and --tls-cert are two ways to authenticate: give one of them".into()),
        (None, _, _, Some(key)) => Ok(Auth::Key(key)),
        (None, _, _, None) => Ok(Auth::None),
    }
}

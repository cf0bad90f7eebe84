//! `shardcast verify`: re-hash a published version against its manifest.

use serde_json::json;
use shardcast::VerifyError;

use super::args::VerifyArgs;
use super::{EXIT_FAILED, EXIT_USAGE, Global, output};

/// Runs `shardcast verify` and returns its exit code (2 when the version is not there).
pub(crate) fn run(a: VerifyArgs, g: &Global) -> u8 {
    output::init_logging(&g.log_format, "warn");
    match shardcast::store::verify(&a.root, &a.name, a.version) {
        Ok(s) => {
            if a.json {
                println!("{}", json!({ "ok": true, "summary": s }));
            } else {
                println!(
                    "{}@{}: {} files, {} bytes, {} chunks verified",
                    s.name, s.version, s.files, s.bytes, s.chunks
                );
            }
            0
        }
        Err(e) => {
            if a.json {
                println!("{}", json!({ "ok": false, "error": e.to_string() }));
            }
            let code = match e {
                VerifyError::NotFound(_) => EXIT_USAGE,
                _ => EXIT_FAILED,
            };
            output::fail(code, e)
        }
    }
}

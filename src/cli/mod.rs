//! The `shardcast` binary over the library: each file has one job.
//!
//! - `args`: the flags of every subcommand (clap definitions, defaults, help texts).
//! - `config`: the config file, turned into the flags' defaults before clap parses.
//! - `auth`: `--key-file` or `--tls-*` into the library's [`Auth`].
//! - `serve`, `push`, `stage`, `mirror`, `status`, `verify`, `demo`: one subcommand each,
//!   turning its flags into the library's options and calling it.
//! - `output`: logging, the progress bar, push reports (text or JSON) and errors.
//!
//! Exit codes (documented in the README):
//! 0 success; 1 the push failed (a replica refused, was unreachable, failed or was lost; or
//! `verify` found a difference); 2 usage error or bad input (flags, source path, names);
//! 3 some replicas published but not all.

pub(crate) mod args;
mod auth;
pub(crate) mod config;
mod demo;
mod mirror;
mod output;
mod push;
mod serve;
mod stage;
mod status;
mod verify;

use shardcast::Auth;

use self::args::{Cli, Cmd};

/// The push failed, or `verify` found a difference.
pub(crate) const EXIT_FAILED: u8 = 1;
/// A usage error or bad input (flags, source path, names).
pub(crate) const EXIT_USAGE: u8 = 2;
/// Some replicas published but not all.
pub(crate) const EXIT_PARTIAL: u8 = 3;

/// What every subcommand takes from the global flags.
pub(crate) struct Global {
    /// `--log-format`: text or json.
    pub(crate) log_format: String,
    /// `--key-file` or `--tls-cert`/`--tls-key`/`--tls-ca`, loaded.
    pub(crate) auth: Auth,
    /// `--encrypt`.
    pub(crate) encrypt: bool,
}

/// Runs the parsed command line and returns its exit code.
pub(crate) fn run(cli: Cli) -> u8 {
    let auth = match auth::from_flags(&cli) {
        Ok(a) => a,
        Err(e) => return output::fail(EXIT_USAGE, e),
    };
    let global = Global { log_format: cli.log_format, auth, encrypt: cli.encrypt };
    match cli.cmd {
        Cmd::Serve(a) => serve::run(a, &global),
        Cmd::Push(a) => push::run(a, &global),
        Cmd::Stage(a) => stage::run(a, &global),
        Cmd::Status(a) => status::run(a, &global),
        Cmd::Verify(a) => verify::run(a, &global),
        Cmd::Mirror(a) => mirror::run(a, &global),
        Cmd::Demo(a) => demo::run_cmd(a, &global),
    }
}

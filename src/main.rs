//! The `shardcast` command line: parses flags, calls the library, maps outcomes to exit codes.
//!
//! A thin binary over the library: the flags, the config file, one file per subcommand and the
//! output are in `cli/`; exit codes are documented there and in the README.

#![deny(unsafe_code)]

use std::process::ExitCode;

use clap::FromArgMatches;

mod cli;

fn main() -> ExitCode {
    let cmd = match cli::config::command() {
        Ok(cmd) => cmd,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(cli::EXIT_USAGE);
        }
    };
    let args = cli::args::Cli::from_arg_matches(&cmd.get_matches()).unwrap_or_else(|e| e.exit());
    shardcast::raise_nofile_limit();
    ExitCode::from(cli::run(args))
}

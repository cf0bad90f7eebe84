//! The `shardcast` command line: parses flags, calls the library, maps outcomes to exit codes.
//!
//! A thin binary over the library: the flags, the config file, one file per subcommand and the
//! output are in `cli/`; exit codes are documented there and in the README.

#![deny(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    if let Err(e) = cli::config::apply_config_file() {
        eprintln!("error: {e}");
        return ExitCode::from(cli::EXIT_USAGE);
    }
    let args = cli::args::Cli::parse();
    shardcast::raise_nofile_limit();
    ExitCode::from(cli::run(args))
}

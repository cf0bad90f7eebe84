//! The config file (`--config FILE` or `SHARDCAST_CONFIG`) merged into the environment, so
//! that clap resolves every flag as command line > environment > file > built-in default.

use std::path::PathBuf;

use clap::CommandFactory;

use super::args::Cli;

/// Applies `--config FILE` (or `SHARDCAST_CONFIG`): each key of the invoked command's table
/// becomes the value of that flag's environment variable, unless the environment already sets
/// it. clap then resolves command line > environment (> file) > default. Every key of every
/// table is checked against the flags, so a typo is an error rather than silently ignored.
pub(crate) fn apply_config_file() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut path = std::env::var_os("SHARDCAST_CONFIG").map(PathBuf::from);
    let mut sub = None;
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if let Some(v) = a.strip_prefix("--config=") {
            path = Some(PathBuf::from(v));
        } else if a == "--config" {
            path = args.get(i + 1).map(PathBuf::from);
            i += 1;
        } else if a == "--log-format" {
            i += 1;
        } else if !a.starts_with('-') && sub.is_none() {
            sub = Some(a.clone());
        }
        i += 1;
    }
    let Some(path) = path else { return Ok(()) };
    let shown = path.display();
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read the config file {shown}: {e}"))?;
    let table: toml::Table = text.parse().map_err(|e| format!("config file {shown}: {e}"))?;
    let cmd = Cli::command();
    for (section, value) in table {
        let Some(subcmd) = cmd.find_subcommand(&section).filter(|_| section == "serve" || section == "push") else {
            return Err(format!("config file {shown}: unknown table [{section}] (expected [serve] or [push])"));
        };
        let toml::Value::Table(entries) = value else {
            return Err(format!("config file {shown}: `{section}` must be a table ([{section}])"));
        };
        for (key, v) in entries {
            let arg = subcmd.get_arguments().find(|a| a.get_id().as_str() == key);
            let Some(env) = arg.and_then(|a| a.get_env()) else {
                return Err(format!("config file {shown}: [{section}] has no setting `{key}`"));
            };
            let text = match v {
                toml::Value::String(s) => s,
                toml::Value::Integer(n) => n.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Array(items) => items
                    .iter()
                    .map(|x| x.as_str().map(str::to_owned).unwrap_or_else(|| x.to_string()))
                    .collect::<Vec<_>>()
                    .join(","),
                other => return Err(format!("config file {shown}: [{section}] {key}: unsupported value {other}")),
            };
            if sub.as_deref() == Some(section.as_str()) && std::env::var_os(env).is_none() {
                // The binary's one `unsafe` (set_var is unsafe in edition 2024).
                // SAFETY: called first thing in main, before any other thread exists.
                #[allow(unsafe_code)]
                unsafe {
                    std::env::set_var(env, text)
                };
            }
        }
    }
    Ok(())
}

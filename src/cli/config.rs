//! The config file (`--config FILE` or `SHARDCAST_CONFIG`) turned into the flags' defaults, so
//! that clap resolves every flag as command line > environment > file > built-in default.

use std::path::PathBuf;

use clap::CommandFactory;

use super::args::Cli;

/// The command line's definition with `--config FILE` (or `SHARDCAST_CONFIG`) applied: each key
/// of the invoked command's table becomes that flag's default value (a flag the file sets is
/// no longer required). clap then resolves command line > environment > file > built-in
/// default. Every key of every table is checked against the flags, so a typo is an error
/// rather than silently ignored. Nothing is written to the process environment.
pub(crate) fn command() -> Result<clap::Command, String> {
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
    let mut cmd = Cli::command();
    let Some(path) = path else { return Ok(cmd) };
    let shown = path.display();
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read the config file {shown}: {e}"))?;
    let table: toml::Table = text.parse().map_err(|e| format!("config file {shown}: {e}"))?;
    let mut defaults = Vec::new();
    for (section, value) in table {
        let Some(subcmd) = cmd.find_subcommand(&section).filter(|_| section == "serve" || section == "push") else {
            return Err(format!("config file {shown}: unknown table [{section}] (expected [serve] or [push])"));
        };
        let toml::Value::Table(entries) = value else {
            return Err(format!("config file {shown}: `{section}` must be a table ([{section}])"));
        };
        for (key, v) in entries {
            // The settable flags are the ones with an environment variable.
            if !subcmd.get_arguments().any(|a| a.get_id().as_str() == key && a.get_env().is_some()) {
                return Err(format!("config file {shown}: [{section}] has no setting `{key}`"));
            }
            let values = match v {
                toml::Value::String(s) => vec![s],
                toml::Value::Integer(n) => vec![n.to_string()],
                toml::Value::Float(f) => vec![f.to_string()],
                toml::Value::Boolean(b) => vec![b.to_string()],
                toml::Value::Array(items) => {
                    items.iter().map(|x| x.as_str().map(str::to_owned).unwrap_or_else(|| x.to_string())).collect()
                }
                other => return Err(format!("config file {shown}: [{section}] {key}: unsupported value {other}")),
            };
            if sub.as_deref() == Some(section.as_str()) {
                defaults.push((section.clone(), key, values));
            }
        }
    }
    for (section, key, values) in defaults {
        // clap keeps defaults as `&'static str`: the file's values live as long as the process.
        let values: Vec<&'static str> = values.into_iter().map(|v| &*Box::leak(v.into_boxed_str())).collect();
        cmd = cmd.mut_subcommand(section, |s| s.mut_arg(key, |a| a.required(false).default_values(values)));
    }
    Ok(cmd)
}

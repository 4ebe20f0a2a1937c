//! `hull` as a runc-compatible OCI runtime: the commands and flags engines (conmon,
//! containerd's runc shim, CRI-O, Docker) call runc with. Each container gets its own
//! microVM; a monitor process on the host stands for the container's init (see
//! `monitor`), and `<root>/<id>/` keeps its state between calls (see `state`).

pub(crate) mod bundle;
mod commands;
pub(crate) mod hooks;
mod host_cgroup;
pub mod state;

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::config::Config;

/// Where container state lives without `--root`: beside, never above, the sandboxes.
pub fn default_root(config: &Config) -> PathBuf {
    config.run_root.join("state")
}

/// The sandbox directory of container `id` under state root `root` (for tests and tools).
pub fn sandbox_dir(config: &Config, root: &std::path::Path, id: &str) -> PathBuf {
    commands::sandbox_root(&config.run_root).join(commands::sandbox_name(&root.join(id)))
}

/// Global options, as runc has them.
#[derive(Debug, Clone)]
pub struct Global {
    pub root: PathBuf,
    pub log: Option<PathBuf>,
    pub log_json: bool,
    pub systemd_cgroup: bool,
    pub config: Config,
}

/// The commands this module answers.
pub const COMMANDS: &[&str] = &[
    "create", "start", "run", "state", "kill", "delete", "exec", "ps", "list", "pause", "resume",
    "update", "events", "features", "spec",
];

pub const USAGE: &str =
    "runc-compatible commands (global options: --root DIR, --log FILE, --log-format text|json,
--debug, --systemd-cgroup):
  create [--bundle DIR] [--pid-file F] [--console-socket S] ID
  start ID                run [--bundle DIR] [--detach] [--pid-file F] ID
  state ID                kill [--all] ID [SIGNAL]
  delete [--force] ID     exec [--process F | CMD...] [-t] [-d] [--pid-file F] ID
  ps [--format json] ID   list [--format json] [-q]
  pause ID / resume ID    update [--resources F|-] [--memory N] [--cpu-quota N] ... ID
  events [--stats] ID     features / spec [--bundle DIR]";

/// A flag a command takes: its names (without dashes) and whether it takes a value.
pub struct Flag {
    pub names: &'static [&'static str],
    pub value: bool,
}

pub const fn flag(names: &'static [&'static str], value: bool) -> Flag {
    Flag { names, value }
}

/// Parsed flags: by first name; then the positional arguments.
#[derive(Debug, Default)]
pub struct Parsed {
    values: HashMap<&'static str, Vec<String>>,
    pub args: Vec<String>,
}

impl Parsed {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values
            .get(name)
            .and_then(|v| v.last())
            .map(|s| s.as_str())
    }

    pub fn all(&self, name: &str) -> Vec<String> {
        self.values.get(name).cloned().unwrap_or_default()
    }

    pub fn is_set(&self, name: &str) -> bool {
        matches!(self.get(name), Some(v) if v != "false")
    }

    /// The one positional argument that must be the container id.
    pub fn id(&self, cmd: &str) -> Result<&str> {
        match self.args.first() {
            Some(id) => Ok(id),
            None => bail!("{cmd}: no container id given"),
        }
    }
}

/// Parses flags the way runc's CLI library does: `-f`, `--f`, `--f=v`, `--f v`; flags
/// stop at the first positional argument (or `--`).
pub fn parse_flags(cmd: &str, args: &[String], flags: &[Flag]) -> Result<Parsed> {
    let mut p = Parsed::default();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if a == "--" {
            p.args.extend(args[i + 1..].iter().cloned());
            break;
        }
        if !a.starts_with('-') || a == "-" {
            p.args.extend(args[i..].iter().cloned());
            break;
        }
        let body = a.trim_start_matches('-');
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (body, None),
        };
        let Some(f) = flags.iter().find(|f| f.names.contains(&name)) else {
            bail!("{cmd}: unknown flag {a}");
        };
        let value = if f.value {
            match inline {
                Some(v) => v,
                None => {
                    i += 1;
                    args.get(i)
                        .cloned()
                        .ok_or_else(|| anyhow::anyhow!("{cmd}: flag {a} needs a value"))?
                }
            }
        } else {
            inline.unwrap_or_else(|| "true".to_string())
        };
        p.values.entry(f.names[0]).or_default().push(value);
        i += 1;
    }
    Ok(p)
}

/// Writes an error where the engine looks for it: the `--log` file (as runc: one JSON
/// object per line with --log-format json) and stderr.
pub fn report_error(g: &Global, e: &anyhow::Error) {
    let msg = format!("{e:#}");
    eprintln!("hull: {msg}");
    let Some(log) = &g.log else { return };
    let line = if g.log_json {
        serde_json::json!({"level": "error", "msg": msg, "time": state::rfc3339_now()}).to_string()
    } else {
        format!(
            "time=\"{}\" level=error msg={:?}",
            state::rfc3339_now(),
            msg
        )
    };
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        let _ = writeln!(f, "{line}");
    }
}

/// Runs one runc-style command; returns the exit status.
pub fn run(g: &Global, cmd: &str, args: &[String]) -> Result<i32> {
    commands::dispatch(g, cmd, args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flags_as_runc_parses_them() {
        let flags = [
            flag(&["bundle", "b"], true),
            flag(&["detach", "d"], false),
            flag(&["env", "e"], true),
        ];
        let p = parse_flags(
            "exec",
            &v(&[
                "-b", "/x", "--detach", "-e=A=1", "--env", "B=2", "id", "sh", "-c", "x",
            ]),
            &flags,
        )
        .unwrap();
        assert_eq!(p.get("bundle"), Some("/x"));
        assert!(p.is_set("detach"));
        assert_eq!(p.all("env"), v(&["A=1", "B=2"]));
        assert_eq!(p.args, v(&["id", "sh", "-c", "x"]));
        assert!(parse_flags("x", &v(&["--nope"]), &flags)
            .unwrap_err()
            .to_string()
            .contains("unknown flag --nope"));
        assert!(parse_flags("x", &v(&["--bundle"]), &flags).is_err());
        let p = parse_flags("x", &v(&["--detach=false", "id"]), &flags).unwrap();
        assert!(!p.is_set("detach"));
    }
}

//! `hull`: Hull's command line. `hull do` runs a command in a container in its own
//! microVM; the other commands are runc's (create, start, exec, ...), so that engines can
//! use `hull` where they would use runc.

use std::path::PathBuf;
use std::process::ExitCode;

use hull_shim::cli::runc::{self, Global};
use hull_shim::cli::{do_cmd, runc::flag, runc::parse_flags};
use hull_shim::config::Config;

const USAGE: &str = "usage: hull [GLOBAL OPTIONS] COMMAND [ARGS]

Commands:
  do        run a command in a container in its own microVM (hull do --help)
  version   print the version (also --version)
  and runc's commands, for engines (Podman, containerd's runc shim, ...):

Global options: --config FILE (default /etc/hull/config.toml), --root DIR (container
state, default /run/hull/state), --log FILE, --log-format text|json, --debug.
Logging: HULL_LOG=info|debug (default: warn).";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let globals = [
        flag(&["config"], true),
        flag(&["root"], true),
        flag(&["log"], true),
        flag(&["log-format"], true),
        flag(&["debug"], false),
        flag(&["systemd-cgroup"], false),
        flag(&["criu"], true),
        flag(&["rootless"], true),
        flag(&["version", "v"], false),
        flag(&["help", "h"], false),
    ];
    let parsed = match parse_flags("hull", &args, &globals) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("hull: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut level = std::env::var("HULL_LOG").unwrap_or_else(|_| "warn".into());
    if parsed.is_set("debug") {
        level = "debug".into();
    }
    let log = parsed.get("log").map(PathBuf::from);
    let filter = tracing_subscriber::EnvFilter::new(format!("hull_shim={level},hull={level}"));
    let log_file = log.as_ref().and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
    });
    let cmd = parsed.args.first().cloned();
    // Engines read the container's stderr: runtime logs go to --log where one is given.
    match (log_file, cmd.as_deref()) {
        (Some(f), Some(c)) if c != "do" => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::sync::Mutex::new(f))
            .with_ansi(false)
            .init(),
        _ => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_target(false)
            .without_time()
            .init(),
    }
    if parsed.is_set("version") {
        print_version();
        return ExitCode::SUCCESS;
    }
    if parsed.is_set("help") {
        println!("{USAGE}\n\n{}", runc::USAGE);
        return ExitCode::SUCCESS;
    }
    let Some(cmd) = cmd else {
        eprintln!("{USAGE}\n\n{}", runc::USAGE);
        return ExitCode::from(2);
    };
    let rest = &parsed.args[1..];
    let config = match Config::load(parsed.get("config").map(std::path::Path::new)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hull: {e}");
            return ExitCode::from(if cmd == "do" { 125 } else { 1 });
        }
    };
    match cmd.as_str() {
        "do" => match do_cmd::parse_args(rest).and_then(|o| do_cmd::run(&config, o)) {
            Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
            Err(e) => {
                eprintln!("hull: {e:#}");
                // As `docker run`: 125 when the runtime itself failed.
                ExitCode::from(125)
            }
        },
        "version" => {
            print_version();
            ExitCode::SUCCESS
        }
        "help" => {
            println!("{USAGE}\n\n{}", runc::USAGE);
            ExitCode::SUCCESS
        }
        c if runc::COMMANDS.contains(&c) => {
            let g = Global {
                root: parsed
                    .get("root")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| runc::default_root(&config)),
                log,
                log_json: parsed.get("log-format") == Some("json"),
                systemd_cgroup: parsed.is_set("systemd-cgroup"),
                config,
            };
            match runc::run(&g, c, rest) {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => {
                    runc::report_error(&g, &e);
                    ExitCode::from(1)
                }
            }
        }
        other => {
            eprintln!(
                "hull: unknown command {other:?}\n{USAGE}\n\n{}",
                runc::USAGE
            );
            ExitCode::from(2)
        }
    }
}

fn print_version() {
    println!(
        "hull version {}\nspec: 1.2.0\nagent protocol: {}",
        env!("CARGO_PKG_VERSION"),
        hull_protocol::PROTOCOL_VERSION
    );
}

//! `hull`: Hull's command line. `hull do` runs a command in a container in its own
//! microVM; the other subcommands are reserved for runc's command line (a later issue).

use std::path::PathBuf;
use std::process::ExitCode;

use hull_shim::cli::do_cmd;
use hull_shim::config::Config;

const USAGE: &str = "usage: hull [--config FILE] [--debug] COMMAND

Commands:
  do        run a command in a container in its own microVM (hull do --help)
  version   print the version

Logging: HULL_LOG=info|debug (default: warn).";

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut config_path: Option<PathBuf> = None;
    let mut level = std::env::var("HULL_LOG").unwrap_or_else(|_| "warn".into());
    while let Some(first) = args.first().cloned() {
        if first == "--config" && args.len() > 1 {
            config_path = Some(PathBuf::from(args[1].clone()));
            args.drain(..2);
        } else if let Some(p) = first.strip_prefix("--config=") {
            config_path = Some(PathBuf::from(p));
            args.remove(0);
        } else if first == "--debug" {
            level = "debug".into();
            args.remove(0);
        } else {
            break;
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(format!(
            "hull_shim={level},hull={level}"
        )))
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
    let Some(cmd) = args.first().cloned() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let result = match cmd.as_str() {
        "do" => Config::load(config_path.as_deref())
            .map_err(anyhow::Error::from)
            .and_then(|c| do_cmd::parse_args(&args[1..]).and_then(|o| do_cmd::run(&c, o))),
        "version" | "--version" | "-v" => {
            println!("hull version {}", env!("CARGO_PKG_VERSION"));
            Ok(0)
        }
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(0)
        }
        other => Err(anyhow::anyhow!("unknown command {other:?}\n{USAGE}")),
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("hull: {e:#}");
            // As `docker run`: 125 when the runtime itself failed.
            ExitCode::from(125)
        }
    }
}

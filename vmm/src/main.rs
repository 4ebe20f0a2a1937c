//! `hull-vmm --config vm.json`: boots one microVM and exits when it ends.
//!
//! Exit status: 0 the guest reset or powered off; 1 the VMM failed; 2 bad arguments or
//! config (nothing was started); 3 the guest crashed (triple fault, failed entry,
//! emulation failure); 4 stopped by SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use hull_vmm::{ExitReason, Vm, VmConfig};

const USAGE: &str = "usage: hull-vmm --config VM.json [--no-seccomp]\n\
    Boots the microVM VM.json describes (see the README) and exits when it ends:\n\
    0 reset/poweroff, 1 VMM error, 2 bad arguments or config, 3 guest crash, 4 signal.";

struct Args {
    config: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut config = None;
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--config") => {
                config = Some(PathBuf::from(args.next().ok_or("--config needs a file")?))
            }
            Some("--no-seccomp") => {
                eprintln!(
                    "hull-vmm: --no-seccomp: running without seccomp filters (debugging only)"
                );
                hull_vmm::seccomp::disable();
            }
            Some("--help" | "-h") => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            Some("--version" | "-V") => {
                println!("hull-vmm {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    Ok(Args {
        config: config.ok_or("--config is required")?,
    })
}

fn main() -> ExitCode {
    // A plain level (HULL_LOG=error|warn|info|debug|trace): an env filter's pattern
    // engine would be paged in for nothing, and the VMM's resident size is a figure.
    let level = std::env::var("HULL_LOG")
        .ok()
        .and_then(|l| l.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::WARN);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .init();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("hull-vmm: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let config = match VmConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hull-vmm: {e}");
            return ExitCode::from(2);
        }
    };
    match run(config) {
        Ok(reason) => {
            match &reason {
                ExitReason::Reset | ExitReason::Poweroff => {
                    tracing::info!("guest ended: {reason:?}")
                }
                ExitReason::Crash(why) => eprintln!("hull-vmm: guest crashed: {why}"),
                ExitReason::Error(why) => eprintln!("hull-vmm: {why}"),
                ExitReason::Signal(n) => tracing::info!("stopped by signal {n}"),
            }
            ExitCode::from(reason.exit_code() as u8)
        }
        Err(e) => {
            eprintln!("hull-vmm: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Raises the soft open-file limit to the hard one: each vsock connection holds a socket.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the rlimit we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn run(config: VmConfig) -> anyhow::Result<ExitReason> {
    raise_fd_limit();
    let timing = std::env::var_os("HULL_VMM_TIMING").is_some();
    let vm = Vm::build(config).context("building the VM")?;
    let hook: Option<hull_vmm::vm::FirstRunHook> = timing.then(|| {
        Box::new(|| eprintln!("hull-vmm: first KVM_RUN {}", timestamp()))
            as hull_vmm::vm::FirstRunHook
    });
    Ok(vm.run(hook)?)
}

/// `monotonic_ns=N cpu_us=M`: CLOCK_MONOTONIC (comparable with the launcher's clock) and
/// the CPU time this process has used so far.
fn timestamp() -> String {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    // SAFETY: getrusage writes into the rusage we own; all-zero is a valid rusage.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let cpu_us = (usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) * 1_000_000
        + (usage.ru_utime.tv_usec + usage.ru_stime.tv_usec);
    format!(
        "monotonic_ns={} cpu_us={cpu_us}",
        ts.tv_sec * 1_000_000_000 + ts.tv_nsec
    )
}

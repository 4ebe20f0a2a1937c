//! hull-agent: PID 1 of Hull's guest.
//!
//! As PID 1 it mounts what the guest needs, serves the agent API (ttrpc over vsock) and
//! reaps every child. Re-executed as `hull-agent container-init` it is the first process
//! of a container: it builds the container's view inside fresh namespaces, waits for the
//! start call, then execs the OCI process (the same split as runc's `runc init`).

mod boot;
mod container;
mod reaper;
mod service;
mod vsock;

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args();
    let _argv0 = args.next();
    match args.next().as_deref() {
        Some(container::init::ARG) => container::init::run(),
        Some(container::exec::ARG) => container::exec::run(),
        _ => {
            if std::process::id() != 1 {
                eprintln!(
                    "hull-agent: must run as PID 1 of a Hull guest (it is the initramfs's /init)"
                );
                return ExitCode::from(2);
            }
            boot::run_as_init()
        }
    }
}

//! An extra process in a running container (`hull-agent container-exec`): joins the
//! container init's namespaces, then forks the process itself as a child of the agent
//! (CLONE_PARENT), which reaps and reports it like any container process.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use oci_spec::runtime::Process;

use super::init::{apply_process, finish, open_terminal, prepare, take_control_fd};
use super::{recv_msg, send_msg};

/// The argument that makes hull-agent the exec helper.
pub const ARG: &str = "container-exec";

/// Namespaces joined, the mount namespace last (it changes what /proc paths mean).
const NAMESPACES: [&str; 7] = ["ipc", "uts", "net", "cgroup", "pid", "time", "mnt"];

pub fn run() -> ExitCode {
    let ctl = take_control_fd();
    match join_and_fork(ctl.as_raw_fd()) {
        Ok(Some(child_setup)) => {
            // In the forked process: becomes the exec'd process.
            finish(ctl.as_raw_fd(), child_setup)
        }
        // The helper: its job ended with the fork.
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = send_msg(ctl.as_raw_fd(), format!("error: {e:#}").as_bytes(), None);
            ExitCode::from(1)
        }
    }
}

/// `Some(setup result)` in the new process, `None` in the helper.
#[allow(clippy::type_complexity)]
fn join_and_fork(ctl: RawFd) -> Result<Option<Result<super::init::Prepared>>> {
    let (pid, _) = recv_msg(ctl)?;
    let pid: u32 = std::str::from_utf8(&pid)?.parse().context("the init pid")?;
    let (terminal, _) = recv_msg(ctl)?;
    let terminal = terminal == b"terminal";
    let (process, _) = recv_msg(ctl)?;
    let process: Process = serde_json::from_slice(&process).context("parsing the exec process")?;
    let (seccomp, _) = recv_msg(ctl)?;
    let seccomp: Option<oci_spec::runtime::LinuxSeccomp> =
        serde_json::from_slice(&seccomp).context("parsing the container's seccomp profile")?;
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        bail!("the exec process has no args: give a command to run");
    }
    let files: Vec<(&str, File)> = NAMESPACES
        .iter()
        .map(|ns| {
            let path = format!("/proc/{pid}/ns/{ns}");
            File::open(&path)
                .map(|f| (*ns, f))
                .with_context(|| format!("opening {path}"))
        })
        .collect::<Result<_>>()?;
    // The user namespace last: we still have the guest's capabilities for the others.
    // Not when it is ours already (the container has none): setns refuses that.
    let user = File::open(format!("/proc/{pid}/ns/user")).context("opening the user namespace")?;
    let same_user = std::fs::metadata(format!("/proc/{pid}/ns/user"))
        .and_then(|a| std::fs::metadata("/proc/self/ns/user").map(|b| (a, b)))
        .map(|(a, b)| {
            use std::os::unix::fs::MetadataExt;
            a.ino() == b.ino() && a.dev() == b.dev()
        })
        .context("comparing user namespaces")?;
    for (ns, f) in &files {
        nix::sched::setns(f.as_raw_fd(), nix::sched::CloneFlags::empty())
            .with_context(|| format!("joining the container's {ns} namespace"))?;
    }
    // Raising a hard limit needs the guest's CAP_SYS_RESOURCE: before the user namespace
    // (the process inherits them; setting them again inside changes nothing).
    super::init::set_rlimits(0, &process)?;
    if !same_user {
        nix::sched::setns(user.as_raw_fd(), nix::sched::CloneFlags::CLONE_NEWUSER)
            .context("joining the container's user namespace")?;
    }
    // SAFETY: fork-like clone; the child continues in this single-threaded helper.
    let child = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong,
            0,
            0,
            0,
            0,
        )
    };
    if child < 0 {
        bail!(
            "forking into the container: {}",
            std::io::Error::last_os_error()
        );
    }
    if child == 0 {
        let setup = (|| {
            if terminal {
                open_terminal(ctl)?;
            }
            let late = apply_process(&process, seccomp.as_ref())?;
            prepare(&process, late)
        })();
        return Ok(Some(setup));
    }
    send_msg(ctl, format!("pid {child}").as_bytes(), None)?;
    Ok(None)
}

/// Parses the helper's `pid N` message.
pub fn parse_pid(msg: &[u8]) -> Option<i32> {
    OsStr::from_bytes(msg)
        .to_str()?
        .strip_prefix("pid ")?
        .parse()
        .ok()
}

//! The container's first process (`hull-agent container-init`), already inside the
//! container's new namespaces: builds the container's view of the world from the OCI
//! spec, reports ready, waits for start, and execs the OCI process.
//!
//! Written by hand rather than on youki's libcontainer: libcontainer brings its own
//! process model (it forks and syncs its own intermediate processes, and wants cgroup
//! managers and a state directory), which fights an agent that already is PID 1 and
//! reaper; what is needed here is the small, well-trodden sequence below.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::{SigSet, SigmaskHow};
use nix::unistd::{Gid, Uid};
use oci_spec::runtime::{LinuxSeccomp, Process, Spec};

use super::{caps, mounts, recv_msg, seccomp, send_msg};

/// The argument that makes hull-agent the container init.
pub const ARG: &str = "container-init";

/// The control socket's descriptor number in the processes `spawn_helper` starts.
const CONTROL_FD: RawFd = 3;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Takes the control socket the agent left on fd 3, close-on-exec so that it does not
/// leak into the container's process (and its closing tells the agent the exec happened).
pub(super) fn take_control_fd() -> OwnedFd {
    // SAFETY: the agent put the control socket on fd 3 for us and nothing else owns it.
    let ctl = unsafe { OwnedFd::from_raw_fd(CONTROL_FD) };
    let _ = nix::fcntl::fcntl(
        CONTROL_FD,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    ctl
}

pub fn run() -> ExitCode {
    let ctl = take_control_fd();
    let prepared = setup(ctl.as_raw_fd());
    finish(ctl.as_raw_fd(), prepared)
}

/// Reports ready (or the setup error), waits for start, execs. Shared with exec'd processes.
pub(super) fn finish(ctl: RawFd, prepared: Result<Prepared>) -> ExitCode {
    let prepared = match prepared {
        Ok(p) => p,
        Err(e) => {
            let _ = send_msg(ctl, format!("error: {e:#}").as_bytes(), None);
            return ExitCode::from(1);
        }
    };
    if send_msg(ctl, b"ready", None).is_err() {
        return ExitCode::from(1);
    }
    match recv_msg(ctl) {
        Ok((msg, _)) if msg == b"start" => {}
        // The container was removed before it started.
        _ => return ExitCode::SUCCESS,
    }
    for h in &prepared.start_hooks {
        if let Err(e) = run_hook("startContainer", h, &prepared.hook_state) {
            let _ = send_msg(ctl, format!("{e:#}").as_bytes(), None);
            return ExitCode::from(1);
        }
    }
    let (code, message) = exec(&prepared);
    let _ = send_msg(ctl, message.as_bytes(), None);
    ExitCode::from(code)
}

pub(super) struct Prepared {
    args: Vec<CString>,
    env: Vec<CString>,
    path_var: String,
    /// A seccomp filter to install just before exec (with no_new_privs; without it the
    /// filter went in while the process still had CAP_SYS_ADMIN).
    seccomp: Option<seccomp::Program>,
    /// startContainer hooks (the container's init only), run once start comes.
    start_hooks: Vec<oci_spec::runtime::Hook>,
    hook_state: Vec<u8>,
}

fn setup(ctl: RawFd) -> Result<Prepared> {
    let (rootfs, _) = recv_msg(ctl)?;
    let rootfs = PathBuf::from(OsStr::from_bytes(&rootfs));
    let (terminal, _) = recv_msg(ctl)?;
    let terminal = terminal == b"terminal";
    let (spec, _) = recv_msg(ctl)?;
    let spec: Spec = serde_json::from_slice(&spec).context("parsing the OCI spec")?;
    let (id, _) = recv_msg(ctl)?;
    let id = String::from_utf8_lossy(&id).into_owned();
    // Container hooks run in the container's namespaces: its init's pid is the one it
    // has there (1 with a pid namespace), as runc tells them.
    let pid = std::process::id();
    let hook_state = |status: &str| {
        let mut annotations = spec.annotations().clone().unwrap_or_default();
        let bundle = annotations.remove(BUNDLE_ANNOTATION).unwrap_or_default();
        serde_json::json!({
            "ociVersion": spec.version(),
            "id": id,
            "status": status,
            "pid": pid,
            "bundle": bundle,
            "annotations": annotations,
        })
    };
    let process = spec.process().as_ref().context("the spec has no process")?;
    let linux = spec.linux().clone().unwrap_or_default();
    // The agent has moved this process into the container's cgroup: a cgroup namespace
    // made now is rooted there. Always one: the guest's cgroup tree is the VM's business.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP)
        .context("creating the cgroup namespace")?;
    time_namespace(&linux)?;

    // Nothing done in here may reach the agent's mount namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making / private")?;
    mount(
        Some(&rootfs),
        &rootfs,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .with_context(|| format!("bind mounting the rootfs {}", rootfs.display()))?;
    let mut dev_is_tmpfs = false;
    for m in spec.mounts().as_deref().unwrap_or_default() {
        mounts::mount_one(&rootfs, m)?;
        if m.destination() == Path::new("/dev") && m.typ().as_deref() == Some("tmpfs") {
            dev_is_tmpfs = true;
        }
    }
    if dev_is_tmpfs {
        mounts::create_devices(&rootfs, linux.devices().as_deref().unwrap_or_default())?;
    }
    // Empty means unset (as runc has it).
    if let Some(hostname) = spec.hostname().as_deref().filter(|h| !h.is_empty()) {
        nix::unistd::sethostname(hostname)
            .with_context(|| format!("setting hostname {hostname:?}"))?;
    }
    if let Some(domain) = spec.domainname().as_deref().filter(|d| !d.is_empty()) {
        // SAFETY: setdomainname reads `len` bytes of a live string.
        if unsafe { libc::setdomainname(domain.as_ptr().cast(), domain.len()) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("setting domainname {domain:?}"));
        }
    }
    if let Some(p) = linux.personality() {
        set_personality(p)?;
    }
    pivot_root(&rootfs)?;
    // createContainer hooks: in the container's namespaces. Their paths resolve in the
    // container's root (the guest's own root holds nothing but the agent).
    let hooks = spec.hooks().clone().unwrap_or_default();
    run_hooks(
        "createContainer",
        hooks.create_container().as_deref().unwrap_or_default(),
        &hook_state("creating"),
    )?;
    // As runc: a working directory that is not there is made (before / turns read-only).
    std::fs::create_dir_all(process.cwd())
        .with_context(|| format!("creating working directory {}", process.cwd().display()))?;
    if spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false)
    {
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .context("making the rootfs read-only")?;
    }
    // runc's order: sysctls, read-only paths (/proc/sys among them), then masks (a mask
    // may sit inside a read-only path).
    for (key, value) in linux.sysctl().clone().unwrap_or_default() {
        let file = Path::new("/proc/sys").join(key.replace('.', "/"));
        std::fs::write(&file, &value).with_context(|| format!("setting sysctl {key}={value}"))?;
    }
    for path in linux.readonly_paths().as_deref().unwrap_or_default() {
        readonly_path(Path::new(path))?;
    }
    for path in linux.masked_paths().as_deref().unwrap_or_default() {
        mask_path(Path::new(path))?;
    }
    if terminal {
        open_terminal(ctl)?;
    }
    let late = apply_process(process, linux.seccomp().as_ref())?;
    let mut prepared = prepare(process, late)?;
    prepared.start_hooks = hooks.start_container().clone().unwrap_or_default();
    prepared.hook_state = serde_json::to_vec(&hook_state("created"))?;
    Ok(prepared)
}

/// A time namespace with the spec's clock offsets, if it asks for one. The offsets are
/// written at once, while nothing is in it yet (hooks are children: they would enter).
fn time_namespace(linux: &oci_spec::runtime::Linux) -> Result<()> {
    let wanted = linux
        .namespaces()
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Time);
    let offsets = linux.time_offsets().clone().unwrap_or_default();
    if !wanted {
        if !offsets.is_empty() {
            bail!("timeOffsets are set but the spec asks for no time namespace: add one");
        }
        return Ok(());
    }
    // SAFETY: unshare takes a flag word and touches no memory of ours.
    if unsafe { libc::unshare(libc::CLONE_NEWTIME) } != 0 {
        return Err(std::io::Error::last_os_error()).context("creating the time namespace");
    }
    let mut text = String::new();
    for (clock, o) in &offsets {
        if clock != "monotonic" && clock != "boottime" {
            bail!("timeOffsets: clock {clock:?} cannot be offset: use monotonic or boottime");
        }
        text += &format!(
            "{clock} {} {}\n",
            o.secs().unwrap_or(0),
            o.nanosecs().unwrap_or(0)
        );
    }
    if !text.is_empty() {
        std::fs::write("/proc/self/timens_offsets", &text)
            .with_context(|| format!("setting the time namespace's offsets ({})", text.trim()))?;
    }
    // unshare put only our future children in it, and exec does not move us: enter it
    // (this process is single-threaded, as setns into a time namespace requires).
    let ns = std::fs::File::open("/proc/self/ns/time_for_children")
        .context("opening the new time namespace")?;
    nix::sched::setns(ns.as_raw_fd(), nix::sched::CloneFlags::empty())
        .context("entering the time namespace")?;
    Ok(())
}

/// linux.personality: the execution domain (it lasts across exec). Flags are not defined
/// by the runtime spec yet; any given are refused rather than ignored.
fn set_personality(p: &oci_spec::runtime::LinuxPersonality) -> Result<()> {
    if let Some(flags) = p.flags().as_ref().filter(|f| !f.is_empty()) {
        bail!("linux.personality.flags {flags:?} are not supported: leave them out");
    }
    let domain = match p.domain() {
        oci_spec::runtime::LinuxPersonalityDomain::PerLinux => 0x0000,
        oci_spec::runtime::LinuxPersonalityDomain::PerLinux32 => 0x0008,
    };
    // SAFETY: personality takes a flag word and touches no memory of ours.
    if unsafe { libc::personality(domain) } < 0 {
        return Err(std::io::Error::last_os_error()).context("setting the personality");
    }
    Ok(())
}

/// The annotation the host puts the bundle path in (hooks' state names it).
const BUNDLE_ANNOTATION: &str = "io.github.hull.bundle";

/// Runs `hooks` in order with `state` on their stdin; the first failure is the error.
fn run_hooks(
    kind: &str,
    hooks: &[oci_spec::runtime::Hook],
    state: &serde_json::Value,
) -> Result<()> {
    let state = serde_json::to_vec(state)?;
    for h in hooks {
        run_hook(kind, h, &state)?;
    }
    Ok(())
}

fn run_hook(kind: &str, h: &oci_spec::runtime::Hook, state: &[u8]) -> Result<()> {
    hull_protocol::hooks::run(
        &h.path().to_string_lossy(),
        h.args().as_deref().unwrap_or_default(),
        h.env().as_deref().unwrap_or_default(),
        h.timeout(),
        state,
    )
    .map_err(|e| anyhow::anyhow!("{kind} {e}"))
}

/// The process's argv, env and PATH as exec needs them.
pub(super) fn prepare(process: &Process, seccomp: Option<seccomp::Program>) -> Result<Prepared> {
    let args = process.args().clone().unwrap_or_default();
    let mut env = process.env().clone().unwrap_or_default();
    // As runc: HOME comes from the user's /etc/passwd entry when the spec leaves it out.
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", home_of(process.user().uid())));
    }
    let path_var = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH)
        .to_string();
    let cstrings = |v: Vec<String>, what: &str| -> Result<Vec<CString>> {
        v.into_iter()
            .map(|s| CString::new(s).with_context(|| format!("a NUL byte in process {what}")))
            .collect()
    };
    // As runc: a command that is not there fails create, not start.
    if let Some(name) = args.first() {
        if resolve(name, &path_var).is_none() {
            bail!("{}", not_found(name));
        }
    }
    Ok(Prepared {
        args: cstrings(args, "args")?,
        env: cstrings(env, "env")?,
        path_var,
        seccomp,
        start_hooks: Vec::new(),
        hook_state: Vec::new(),
    })
}

/// The home directory of `uid` in the container's /etc/passwd, or `/`.
fn home_of(uid: u32) -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 6 && f[2].parse() == Ok(uid))
        .map(|f| f[5].to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "/".into())
}

fn pivot_root(rootfs: &Path) -> Result<()> {
    nix::unistd::chdir(rootfs).with_context(|| format!("entering {}", rootfs.display()))?;
    // pivot_root(".", "."): the old root ends up stacked under the new one, then is
    // detached; no directory for it is needed in the rootfs.
    nix::unistd::pivot_root(".", ".").context("pivot_root into the rootfs")?;
    umount2(".", MntFlags::MNT_DETACH).context("detaching the old root")?;
    nix::unistd::chdir("/").context("chdir /")?;
    Ok(())
}

fn mask_path(path: &Path) -> Result<()> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(_) => return Ok(()),
    };
    if meta.is_dir() {
        mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        )
    } else {
        mount(
            Some("/dev/null"),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    }
    .with_context(|| format!("masking {}", path.display()))
}

fn readonly_path(path: &Path) -> Result<()> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    mount(
        Some(path),
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .and_then(|_| {
        // A bind remount must keep the locked flags of the mount it copies; as runc, keep
        // exactly those and add read-only.
        use nix::sys::statvfs::{statvfs, FsFlags};
        let had = statvfs(path).map(|s| s.flags()).unwrap_or(FsFlags::empty());
        let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        for (st, ms) in [
            (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
            (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
            (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        ] {
            if had.contains(st) {
                flags |= ms;
            }
        }
        mount(None::<&str>, path, None::<&str>, flags, None::<&str>)
    })
    .with_context(|| format!("making {} read-only", path.display()))
}

/// Opens a pty in the container's own devpts, hands the master to the agent and makes the
/// slave this process's controlling terminal and stdio.
pub(super) fn open_terminal(ctl: RawFd) -> Result<()> {
    use nix::fcntl::OFlag;
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .context("opening /dev/ptmx")?;
    nix::pty::grantpt(&master).context("grantpt")?;
    nix::pty::unlockpt(&master).context("unlockpt")?;
    let name = nix::pty::ptsname_r(&master).context("ptsname")?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&name)
        .with_context(|| format!("opening {name}"))?;
    send_msg(ctl, b"pty", Some(master.as_raw_fd()))?;
    nix::unistd::setsid().context("setsid")?;
    // SAFETY: TIOCSCTTY takes an integer argument.
    if unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) } != 0 {
        return Err(std::io::Error::last_os_error())
            .context("making the pty the controlling terminal");
    }
    for fd in 0..3 {
        nix::unistd::dup2(slave.as_raw_fd(), fd).context("wiring the pty to stdio")?;
    }
    Ok(())
}

/// rlimits, oom score, seccomp, user, capabilities, no_new_privs, umask, cwd: in runc's
/// order. Returns the seccomp filter still to install when no_new_privs defers it to
/// just before exec.
pub(super) fn apply_process(
    process: &Process,
    seccomp: Option<&LinuxSeccomp>,
) -> Result<Option<seccomp::Program>> {
    let filter = seccomp
        .map(seccomp::compile)
        .transpose()
        .map_err(|e| e.context("the spec's seccomp profile"))?;
    let nnp = process.no_new_privileges().unwrap_or(false);
    set_rlimits(0, process)?;
    if let Some(score) = process.oom_score_adj() {
        std::fs::write("/proc/self/oom_score_adj", score.to_string())
            .context("setting oom_score_adj")?;
    }
    // Without no_new_privs only a process with CAP_SYS_ADMIN may install a filter: do it
    // before the user and capabilities change (as runc does).
    let filter = match filter {
        Some(f) if !nnp => {
            f.install()?;
            None
        }
        f => f,
    };
    let sets = caps::Sets::from_spec(process.capabilities().as_ref())?;
    sets.apply_bounding()?;

    let user = process.user();
    // Keep the permitted set across setuid; the capset below decides what stays.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
    let groups: Vec<Gid> = user
        .additional_gids()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(Gid::from_raw)
        .collect();
    nix::unistd::setgroups(&groups).context("setting additional groups")?;
    nix::unistd::setgid(Gid::from_raw(user.gid()))
        .with_context(|| format!("setgid {}", user.gid()))?;
    nix::unistd::setuid(Uid::from_raw(user.uid()))
        .with_context(|| format!("setuid {}", user.uid()))?;
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
    sets.apply()?;
    if nnp {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setting no_new_privs");
        }
    }
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(
        user.umask().unwrap_or(0o022),
    ));
    let cwd = process.cwd();
    nix::unistd::chdir(cwd)
        .with_context(|| format!("cannot enter working directory {}", cwd.display()))?;
    Ok(filter)
}

/// Sets the spec's rlimits on `pid` (0: this process). The agent sets them on a process
/// in its own user namespace from outside: in there it could not raise a hard limit above
/// what it inherited (that takes CAP_SYS_RESOURCE in the guest's namespace).
pub(super) fn set_rlimits(pid: i32, process: &Process) -> Result<()> {
    for r in process.rlimits().as_deref().unwrap_or_default() {
        let name = serde_json::to_value(r.typ())?;
        let resource = rlimit_resource(name.as_str().unwrap_or_default())?;
        let limit = libc::rlimit {
            rlim_cur: r.soft(),
            rlim_max: r.hard(),
        };
        // SAFETY: prlimit reads a valid rlimit that lives across the call and writes
        // nothing (old is null).
        if unsafe { libc::prlimit(pid, resource, &limit, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("setting {name}"));
        }
    }
    Ok(())
}

// glibc and musl disagree on the type of setrlimit's resource argument.
#[cfg(target_env = "gnu")]
type Resource = libc::__rlimit_resource_t;
#[cfg(not(target_env = "gnu"))]
type Resource = libc::c_int;

fn rlimit_resource(name: &str) -> Result<Resource> {
    Ok(match name {
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        other => bail!("unknown rlimit {other}"),
    })
}

/// Where execvp would find `name`: itself when it has a '/', else the first regular file
/// (or, failing that, anything) of that name on `path_var`.
fn resolve(name: &str, path_var: &str) -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = if name.contains('/') {
        vec![PathBuf::from(name)]
    } else {
        path_var
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| Path::new(d).join(name))
            .collect()
    };
    let found = candidates
        .iter()
        .find(|c| c.is_file())
        .or_else(|| candidates.iter().find(|c| c.exists()));
    found.cloned()
}

/// runc's words, which engines match to answer 127.
fn not_found(name: &str) -> String {
    format!("exec: {name:?}: executable file not found in $PATH")
}

/// Finds the executable as execvp would, then execs it. Returns only on failure: the exit
/// code (127 not found, 126 not runnable, as shells and `docker run` use) and a message.
fn exec(p: &Prepared) -> (u8, String) {
    let Some(argv0) = p.args.first() else {
        return (127, "no command".to_string());
    };
    let name = argv0.to_string_lossy().into_owned();
    let Some(path) = resolve(&name, &p.path_var) else {
        return (127, not_found(&name));
    };
    let Ok(cpath) = CString::new(path.as_os_str().as_bytes()) else {
        return (127, format!("cannot run {name:?}: bad path"));
    };
    let mut argv: Vec<*const libc::c_char> = p.args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = p.env.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    // The agent blocks SIGCHLD in all its threads; the container starts with no mask.
    let _ =
        nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    if let Some(filter) = &p.seccomp {
        if let Err(e) = filter.install() {
            return (1, format!("{e:#}"));
        }
    }
    // SAFETY: argv and envp are NUL-terminated arrays of pointers to live C strings.
    unsafe { libc::execve(cpath.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    let err = std::io::Error::last_os_error();
    let code = if err.raw_os_error() == Some(libc::ENOENT) {
        127
    } else {
        126
    };
    (code, format!("cannot run {}: {err}", path.display()))
}

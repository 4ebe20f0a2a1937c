//! Containers as the agent keeps them: create (clone into new namespaces and re-exec as
//! the container init), start, signal, wait, remove.

pub mod caps;
pub mod cgroup;
pub mod devices;
pub mod exec;
pub mod init;
pub mod mounts;
pub mod seccomp;
mod tty;

use std::collections::HashMap;
use std::ffi::CString;
use std::io::{IoSlice, IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use hull_protocol::GUEST_SHARE_DIR;
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use crate::reaper::{self, Exit};
use crate::vsock;

/// The largest message on the control socket (the spec is one).
pub const MAX_MESSAGE: usize = 192 * 1024;

/// Host vsock ports for a process's stdio (0: not wired).
#[derive(Debug, Default, Clone, Copy)]
pub struct StdioPorts {
    pub stdin: u32,
    pub stdout: u32,
    pub stderr: u32,
    pub terminal: bool,
}

/// A process the agent started in a container: its init or an exec'd one.
struct Proc {
    pid: i32,
    /// The agent's end of the control socket with the process; gone once started.
    control: Mutex<Option<OwnedFd>>,
    tty: Option<tty::Relay>,
}

struct Container {
    init: Arc<Proc>,
    /// The spec's seccomp profile (JSON, `null` when none): exec'd processes get it too.
    seccomp: Vec<u8>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
    cgroup: cgroup::Cgroup,
}

#[derive(Default)]
pub struct Manager {
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

fn check_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-+".contains(&b))
        && !id.starts_with('.');
    if !ok {
        bail!("container id {id:?} is not valid: use 1-128 letters, digits, '_', '.', '-', '+'");
    }
    Ok(())
}

/// The rootfs the spec names, inside the share.
fn rootfs_path(spec: &Spec) -> Result<PathBuf> {
    let root = spec.root().as_ref().context("the spec has no root")?;
    let rel = root.path();
    if rel.is_absolute() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        bail!(
            "root.path {} must be relative to the share, without '..'",
            rel.display()
        );
    }
    let path = Path::new(GUEST_SHARE_DIR).join(rel);
    if !path.is_dir() {
        bail!("rootfs {} is not a directory in the guest", path.display());
    }
    Ok(path)
}

fn clone_flags(spec: &Spec) -> Result<libc::c_int> {
    let mut flags = 0;
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default();
    for ns in namespaces {
        if let Some(path) = ns.path() {
            bail!(
                "joining an existing {:?} namespace ({}) is not supported yet",
                ns.typ(),
                path.display()
            );
        }
        flags |= match ns.typ() {
            LinuxNamespaceType::Mount => libc::CLONE_NEWNS,
            LinuxNamespaceType::Pid => libc::CLONE_NEWPID,
            LinuxNamespaceType::Uts => libc::CLONE_NEWUTS,
            LinuxNamespaceType::Ipc => libc::CLONE_NEWIPC,
            LinuxNamespaceType::Network => libc::CLONE_NEWNET,
            // The init unshares it once the agent has moved it into its cgroup, so that
            // the namespace's root is the container's cgroup (as runc does).
            LinuxNamespaceType::Cgroup => 0,
            // Unshared by the init too: clone() cannot take CLONE_NEWTIME.
            LinuxNamespaceType::Time => 0,
            LinuxNamespaceType::User => libc::CLONE_NEWUSER,
        };
    }
    if flags & libc::CLONE_NEWNS == 0 {
        bail!("the spec must ask for a mount namespace: the container's rootfs is built in one");
    }
    // As runc: naming the host would rename the guest, which every container shares.
    let named = |n: &Option<String>| n.as_deref().is_some_and(|n| !n.is_empty());
    if flags & libc::CLONE_NEWUTS == 0 && (named(spec.hostname()) || named(spec.domainname())) {
        bail!("hostname/domainname need a UTS namespace: add one to linux.namespaces");
    }
    Ok(flags)
}

/// Sends one message (and optionally one fd) on a SEQPACKET control socket.
pub fn send_msg(fd: RawFd, msg: &[u8], pass: Option<RawFd>) -> Result<()> {
    let fds = pass.map(|f| [f]);
    let cmsgs: Vec<ControlMessage> = fds
        .as_ref()
        .map(|f| ControlMessage::ScmRights(f))
        .into_iter()
        .collect();
    sendmsg::<()>(fd, &[IoSlice::new(msg)], &cmsgs, MsgFlags::empty(), None)
        .context("control socket send")?;
    Ok(())
}

/// Receives one message (empty at EOF) and the fd it carried, if any.
pub fn recv_msg(fd: RawFd) -> Result<(Vec<u8>, Option<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .context("control socket receive")?;
    let mut passed = None;
    for c in msg.cmsgs() {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for f in fds {
                // SAFETY: the kernel just installed this descriptor for us.
                let owned = unsafe { OwnedFd::from_raw_fd(f) };
                if passed.is_none() {
                    passed = Some(owned);
                }
            }
        }
    }
    if msg.flags.contains(MsgFlags::MSG_TRUNC) {
        bail!("control message longer than {MAX_MESSAGE} bytes");
    }
    let n = msg.bytes;
    buf.truncate(n);
    Ok((buf, passed))
}

fn open_stdio(port: u32) -> Result<OwnedFd> {
    if port == 0 {
        return Ok(std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?
            .into());
    }
    vsock::connect_host(port).with_context(|| format!("connecting stdio to host port {port}"))
}

impl Manager {
    fn get(&self, id: &str) -> Result<Arc<Container>> {
        self.containers
            .lock()
            .map_err(|_| anyhow!("container table poisoned"))?
            .get(id)
            .cloned()
            .ok_or_else(|| anyhow!("no container {id:?} in this sandbox"))
    }

    pub fn create(&self, id: &str, spec_json: &[u8], stdio: StdioPorts) -> Result<i32> {
        check_id(id)?;
        if self.get(id).is_ok() {
            bail!("container {id:?} already exists in this sandbox");
        }
        if spec_json.len() > MAX_MESSAGE {
            bail!(
                "the OCI spec is {} bytes; at most {MAX_MESSAGE} are accepted",
                spec_json.len()
            );
        }
        let spec: Spec = serde_json::from_slice(spec_json).context("parsing the OCI spec")?;
        let process = spec.process().as_ref().context("the spec has no process")?;
        if process.args().as_ref().is_none_or(|a| a.is_empty()) {
            bail!("the spec's process has no args: give a command to run");
        }
        let rootfs = rootfs_path(&spec)?;
        let flags = clone_flags(&spec)?;
        let maps = id_maps(&spec, flags)?;
        let seccomp =
            serde_json::to_vec(&spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()))?;
        let terminal = process.terminal().unwrap_or(false);
        if terminal != stdio.terminal {
            bail!("process.terminal and the stdio request disagree");
        }

        let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
        let cgroup = cgroup::Cgroup::create(id, resources)?;
        let spawned = open_process_stdio(&stdio).and_then(|(stdio_fds, tty_stream)| {
            let (pid, ours) = spawn_helper(flags, init::ARG, stdio_fds, maps.as_ref())?;
            // In a user namespace the process could not raise its own hard limits.
            let rlimits = match maps {
                Some(_) => init::set_rlimits(pid, process),
                None => Ok(()),
            };
            let result = rlimits.and_then(|()| cgroup.add(pid)).and_then(|()| {
                self.handshake(
                    ours.as_raw_fd(),
                    &[
                        rootfs.as_os_str().as_encoded_bytes(),
                        terminal_flag(terminal),
                        spec_json,
                        id.as_bytes(),
                    ],
                    None,
                )
            });
            Ok((
                pid,
                finish_spawn(pid, ours, result.map(|(_, m)| m), tty_stream)?,
            ))
        });
        let (pid, proc_) = match spawned {
            Ok(p) => p,
            Err(e) => {
                cgroup.remove();
                return Err(e);
            }
        };
        let container = Arc::new(Container {
            init: Arc::new(proc_),
            seccomp,
            execs: Mutex::new(HashMap::new()),
            cgroup,
        });
        self.containers
            .lock()
            .map_err(|_| anyhow!("container table poisoned"))?
            .insert(id.to_string(), container);
        Ok(pid)
    }

    /// Starts `process` (OCI process JSON) in the running container `id`.
    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        stdio: StdioPorts,
    ) -> Result<i32> {
        check_id(exec_id)?;
        let c = self.get(id)?;
        if reaper::try_exit(c.init.pid).is_some() {
            bail!("container {id:?} is not running");
        }
        if c.execs
            .lock()
            .map_err(|_| anyhow!("poisoned"))?
            .contains_key(exec_id)
        {
            bail!("exec {exec_id:?} already exists in container {id:?}");
        }
        if process_json.len() > MAX_MESSAGE {
            bail!(
                "the exec process is {} bytes; at most {MAX_MESSAGE} are accepted",
                process_json.len()
            );
        }
        let process: oci_spec::runtime::Process =
            serde_json::from_slice(process_json).context("parsing the exec process")?;
        let terminal = process.terminal().unwrap_or(false);
        if terminal != stdio.terminal {
            bail!("process.terminal and the stdio request disagree");
        }
        let (stdio_fds, tty_stream) = open_process_stdio(&stdio)?;
        // The host's end of this stream closes when the process that stands for the exec
        // on the host goes: then the exec goes too (engines SIGKILL that process).
        let watched = match (&tty_stream, stdio.stdout) {
            (Some(tty), _) => Some(tty.try_clone()?),
            (None, 0) => None,
            (None, _) => Some(stdio_fds[1].try_clone()?),
        };
        let (helper, ours) = spawn_helper(0, exec::ARG, stdio_fds, None)?;
        let pid_msg = c.init.pid.to_string();
        let result = self.handshake(
            ours.as_raw_fd(),
            &[
                pid_msg.as_bytes(),
                terminal_flag(terminal),
                process_json,
                &c.seccomp,
            ],
            Some(helper),
        );
        // The helper's own exit does not matter; the exec'd process is the agent's child.
        reaper::wait(helper);
        reaper::forget(helper);
        let (pid, master) = match result {
            Ok((Some(pid), master)) => (pid, master),
            Ok((None, _)) => bail!("the exec helper did not report a pid"),
            Err(e) => return Err(e),
        };
        let master = c.cgroup.add(pid).map(|()| master);
        let proc_ = Arc::new(finish_spawn(pid, ours, master, tty_stream)?);
        c.execs
            .lock()
            .map_err(|_| anyhow!("poisoned"))?
            .insert(exec_id.to_string(), proc_.clone());
        // Opened while the process waits for start: it cannot have been reaped yet.
        let exited = pidfd_open(pid);
        if let Err(e) = start_proc(&proc_) {
            let _ = reaper::wait(pid);
            return Err(e);
        }
        match (watched, exited) {
            (Some(fd), Ok(pidfd)) => kill_on_hangup(fd, pidfd, pid),
            (Some(_), Err(e)) => eprintln!("hull-agent: cannot watch exec {pid}: {e}"),
            _ => {}
        }
        Ok(pid)
    }

    /// Sends the helper its messages and waits until the process is ready (or failed).
    /// For an exec, also returns the pid the helper reported (then tracked).
    fn handshake(
        &self,
        ctl: RawFd,
        msgs: &[&[u8]],
        exec_helper: Option<i32>,
    ) -> Result<(Option<i32>, Option<OwnedFd>)> {
        for m in msgs {
            send_msg(ctl, m, None)?;
        }
        let mut master = None;
        let mut pid = None;
        loop {
            let (msg, fd) = recv_msg(ctl)?;
            match msg.as_slice() {
                b"ready" => return Ok((pid, master)),
                b"pty" => master = fd,
                b"" => bail!("the container process died while setting up"),
                m if exec_helper.is_some() && pid.is_none() && m.starts_with(b"pid ") => {
                    let p = exec::parse_pid(m).context("a malformed pid from the exec helper")?;
                    reaper::track(p);
                    pid = Some(p);
                }
                other => {
                    if let Some(p) = pid {
                        reaper::wait(p);
                        reaper::forget(p);
                    }
                    bail!(
                        "{}",
                        String::from_utf8_lossy(other).trim_start_matches("error: ")
                    )
                }
            }
        }
    }

    pub fn start(&self, id: &str) -> Result<()> {
        start_proc(&self.get(id)?.init)
    }

    fn proc_of(&self, id: &str, exec_id: &str) -> Result<Arc<Proc>> {
        let c = self.get(id)?;
        if exec_id.is_empty() {
            return Ok(c.init.clone());
        }
        let execs = c.execs.lock().map_err(|_| anyhow!("poisoned"))?;
        execs
            .get(exec_id)
            .cloned()
            .ok_or_else(|| anyhow!("no exec {exec_id:?} in container {id:?}"))
    }

    pub fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let pid = self.proc_of(id, exec_id)?.pid;
        let sig =
            Signal::try_from(signal as i32).map_err(|_| anyhow!("signal {signal} is not valid"))?;
        if all {
            return self.get(id)?.cgroup.signal_all(sig);
        }
        if reaper::try_exit(pid).is_some() {
            return Ok(());
        }
        kill(Pid::from_raw(pid), sig).with_context(|| format!("sending {sig} to {id}"))?;
        Ok(())
    }

    pub fn wait(&self, id: &str, exec_id: &str) -> Result<Exit> {
        let c = self.proc_of(id, exec_id)?;
        let pid = c.pid;
        let exit = reaper::wait(pid).ok_or_else(|| anyhow!("container {id:?} is not tracked"))?;
        if let Some(tty) = &c.tty {
            tty.drain();
        }
        Ok(exit)
    }

    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        let c = self.proc_of(id, exec_id)?;
        if let Some(tty) = &c.tty {
            tty.send_eof()?;
        }
        Ok(())
    }

    pub fn resize_pty(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        let c = self.proc_of(id, exec_id)?;
        match &c.tty {
            Some(tty) => tty.resize(rows, cols),
            None => bail!("container {id:?} has no terminal"),
        }
    }

    /// The container's processes: guest pid and command line.
    pub fn processes(&self, id: &str) -> Result<Vec<(i32, String)>> {
        let c = self.get(id)?;
        Ok(c.cgroup
            .pids()?
            .into_iter()
            .map(|pid| {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmd = String::from_utf8_lossy(&cmd)
                    .trim_end_matches('\0')
                    .replace('\0', " ");
                (pid, cmd)
            })
            .collect())
    }

    pub fn pause(&self, id: &str, paused: bool) -> Result<()> {
        let c = self.get(id)?;
        if paused && reaper::try_exit(c.init.pid).is_some() {
            bail!("container {id:?} is not running");
        }
        c.cgroup.freeze(paused)
    }

    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        let c = self.get(id)?;
        let r: oci_spec::runtime::LinuxResources =
            serde_json::from_slice(resources_json).context("parsing linux.resources")?;
        c.cgroup.apply(&r)
    }

    pub fn stats(&self, id: &str) -> Result<HashMap<String, u64>> {
        Ok(self.get(id)?.cgroup.stats())
    }

    pub fn remove(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        if c.cgroup.frozen() {
            let _ = c.cgroup.freeze(false);
        }
        let execs: Vec<Arc<Proc>> = c
            .execs
            .lock()
            .map(|e| e.values().cloned().collect())
            .unwrap_or_default();
        // Killing the init kills its pid namespace, execs included; reap them all.
        for p in std::iter::once(&c.init).chain(execs.iter()) {
            if reaper::try_exit(p.pid).is_none() {
                let _ = kill(Pid::from_raw(p.pid), Signal::SIGKILL);
            }
        }
        for p in std::iter::once(&c.init).chain(execs.iter()) {
            reaper::wait(p.pid);
            reaper::forget(p.pid);
        }
        c.cgroup.remove();
        self.containers
            .lock()
            .map_err(|_| anyhow!("container table poisoned"))?
            .remove(id);
        Ok(())
    }

    pub fn remove_all(&self) {
        let ids: Vec<String> = match self.containers.lock() {
            Ok(t) => t.keys().cloned().collect(),
            Err(_) => return,
        };
        for id in ids {
            let _ = self.remove(&id);
        }
        let _ = std::io::stderr().flush();
    }
}

/// A descriptor that becomes readable when process `pid` exits.
fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// SIGKILLs `pid` once the host closes the stream `fd` (its stdout or terminal), unless
/// it has exited by then (`pidfd` readable: then the stream is let go at once, so the host
/// sees its EOF). Only the hang-up is polled: data on a terminal stream is the relay's.
fn kill_on_hangup(fd: OwnedFd, pidfd: OwnedFd, pid: i32) {
    let spawned = std::thread::Builder::new()
        .name(format!("hangup-{pid}"))
        .spawn(move || loop {
            let mut pfds = [
                libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLRDHUP,
                    revents: 0,
                },
                libc::pollfd {
                    fd: pidfd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two pollfds we own, for descriptors we own (nix 0.26 lacks POLLRDHUP).
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, -1) };
            if n > 0 {
                if pfds[1].revents == 0 && reaper::kill_if_running(pid, Signal::SIGKILL) {
                    eprintln!("hull-agent: the host side of exec {pid} went away; killed it");
                }
                return;
            }
            if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return;
            }
        });
    if let Err(e) = spawned {
        eprintln!("hull-agent: cannot watch exec {pid}: {e}");
    }
}

fn terminal_flag(terminal: bool) -> &'static [u8] {
    if terminal {
        b"terminal"
    } else {
        b"no-terminal"
    }
}

/// The process's stdio: the vsock streams, or /dev/null where its setup puts a pty (then
/// the one terminal stream is returned for the relay).
fn open_process_stdio(stdio: &StdioPorts) -> Result<([OwnedFd; 3], Option<OwnedFd>)> {
    if stdio.terminal {
        let null = open_stdio(0)?;
        Ok((
            [null.try_clone()?, null.try_clone()?, null],
            Some(open_stdio(stdio.stdout)?),
        ))
    } else {
        Ok((
            [
                open_stdio(stdio.stdin)?,
                open_stdio(stdio.stdout)?,
                open_stdio(stdio.stderr)?,
            ],
            None,
        ))
    }
}

/// uid_map and gid_map contents for a container with a user namespace.
struct IdMaps {
    uid: String,
    gid: String,
}

/// The spec's id mappings, when it asks for a user namespace (which then needs them).
fn id_maps(spec: &Spec, flags: libc::c_int) -> Result<Option<IdMaps>> {
    let linux = spec.linux().clone().unwrap_or_default();
    let lines = |m: &Option<Vec<oci_spec::runtime::LinuxIdMapping>>| {
        m.as_deref()
            .unwrap_or_default()
            .iter()
            .map(|m| format!("{} {} {}\n", m.container_id(), m.host_id(), m.size()))
            .collect::<String>()
    };
    let (uid, gid) = (lines(linux.uid_mappings()), lines(linux.gid_mappings()));
    if flags & libc::CLONE_NEWUSER == 0 {
        if !uid.is_empty() || !gid.is_empty() {
            bail!(
                "uidMappings/gidMappings are set but the spec asks for no user namespace: add one"
            );
        }
        return Ok(None);
    }
    if uid.is_empty() || gid.is_empty() {
        bail!("the spec asks for a user namespace but gives no uidMappings/gidMappings: add both");
    }
    Ok(Some(IdMaps { uid, gid }))
}

/// Clones a child (into new namespaces per `flags`) that re-execs hull-agent as `arg`,
/// with `stdio` on fds 0-2 and the control socket on fd 3. Returns its pid (tracked) and
/// the agent's end of the control socket.
fn spawn_helper(
    flags: libc::c_int,
    arg: &str,
    stdio: [OwnedFd; 3],
    maps: Option<&IdMaps>,
) -> Result<(i32, OwnedFd)> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .context("creating the control socket")?;
    // SAFETY: socketpair just returned these descriptors and nothing else owns them.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(ours), OwnedFd::from_raw_fd(theirs)) };
    let exe = CString::new("/proc/self/exe")?;
    let argv0 = CString::new("hull-agent")?;
    let argv1 = CString::new(arg)?;
    let argv = [argv0.as_ptr(), argv1.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null::<libc::c_char>()];
    let fds = [
        stdio[0].as_raw_fd(),
        stdio[1].as_raw_fd(),
        stdio[2].as_raw_fd(),
        theirs.as_raw_fd(),
    ];
    // With a user namespace the child waits (before exec, which would drop its
    // capabilities while its ids are unmapped) until its id maps are written.
    let (gate_r, gate_w) = match maps {
        Some(_) => {
            let (r, w) =
                nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating a pipe")?;
            // SAFETY: pipe2 just returned these descriptors and nothing else owns them.
            unsafe { (Some(OwnedFd::from_raw_fd(r)), Some(OwnedFd::from_raw_fd(w))) }
        }
        None => (None, None),
    };
    let gate = (
        gate_r.as_ref().map_or(-1, |f| f.as_raw_fd()),
        gate_w.as_ref().map_or(-1, |f| f.as_raw_fd()),
    );
    let pid = reaper::spawn_tracked(|| {
        // SAFETY: a fork-like clone (no CLONE_VM, no new stack). The child runs only
        // async-signal-safe calls (close, read, set*id, dup2, fcntl, execve, _exit) on memory
        // prepared above.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone,
                (flags | libc::SIGCHLD) as libc::c_ulong,
                0,
                0,
                0,
                0,
            )
        };
        if pid == 0 {
            // SAFETY: as above; the child never returns from this block.
            unsafe {
                if gate.0 >= 0 {
                    libc::close(gate.1);
                    let mut byte = 0u8;
                    if libc::read(gate.0, (&mut byte as *mut u8).cast(), 1) != 1 {
                        libc::_exit(122);
                    }
                    // Become the namespace's root before exec, or exec would drop the
                    // capabilities of an unmapped id.
                    // Raw system calls: libc's wrappers would signal threads this
                    // copy of the agent does not have.
                    if libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
                        || libc::syscall(libc::SYS_setresgid, 0, 0, 0) != 0
                        || libc::syscall(libc::SYS_setresuid, 0, 0, 0) != 0
                    {
                        libc::_exit(123);
                    }
                }
                for (target, fd) in fds.iter().enumerate() {
                    let target = target as RawFd;
                    if *fd == target {
                        libc::fcntl(target, libc::F_SETFD, 0);
                    } else if libc::dup2(*fd, target) < 0 {
                        libc::_exit(120);
                    }
                }
                libc::execve(exe.as_ptr(), argv.as_ptr(), envp.as_ptr());
                libc::_exit(121);
            }
        }
        if pid < 0 {
            return Err(anyhow!("clone: {}", std::io::Error::last_os_error()));
        }
        Ok(pid as i32)
    })?;
    drop((stdio, theirs));
    if let (Some(maps), Some(w)) = (maps, gate_w) {
        let written = std::fs::write(format!("/proc/{pid}/uid_map"), &maps.uid)
            .with_context(|| format!("writing uid_map {:?}", maps.uid.trim()))
            .and_then(|()| {
                std::fs::write(format!("/proc/{pid}/gid_map"), &maps.gid)
                    .with_context(|| format!("writing gid_map {:?}", maps.gid.trim()))
            });
        let released = written.and_then(|()| {
            nix::unistd::write(w.as_raw_fd(), b"1")
                .map(drop)
                .context("releasing the container process")
        });
        if let Err(e) = released {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            reaper::wait(pid);
            reaper::forget(pid);
            return Err(e);
        }
    }
    Ok((pid, ours))
}

/// Turns a handshake's outcome (the pty master, if any) into a `Proc`, killing the process
/// on failure.
fn finish_spawn(
    pid: i32,
    ctl: OwnedFd,
    result: Result<Option<OwnedFd>>,
    tty_stream: Option<OwnedFd>,
) -> Result<Proc> {
    let master = match result {
        Ok(master) => master,
        Err(e) => {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            // The handshake's error says why; how the process then died adds nothing.
            reaper::wait(pid);
            reaper::forget(pid);
            return Err(e);
        }
    };
    let tty = match (master, tty_stream) {
        (Some(master), Some(stream)) => Some(tty::Relay::start(master, stream)?),
        _ => None,
    };
    Ok(Proc {
        pid,
        control: Mutex::new(Some(ctl)),
        tty,
    })
}

/// Lets a ready process exec; an answer before EOF is the exec's failure.
fn start_proc(p: &Proc) -> Result<()> {
    let ctl = p
        .control
        .lock()
        .map_err(|_| anyhow!("process poisoned"))?
        .take()
        .ok_or_else(|| anyhow!("the process was already started"))?;
    send_msg(ctl.as_raw_fd(), b"start", None)?;
    // The process's end is close-on-exec: EOF means the exec happened.
    let (msg, _) = recv_msg(ctl.as_raw_fd())?;
    if !msg.is_empty() {
        bail!("{}", String::from_utf8_lossy(&msg));
    }
    Ok(())
}

//! A sandbox: one microVM with its helpers (virtiofsd, the vsock backend), its directory
//! `<run_root>/<id>/`, and the agent inside. Dropping it tears everything down.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::agent_client::{AgentClient, AgentError};
use crate::config::Config;
use crate::hypervisor::qemu::{become_subreaper, die_with_parent, kill_group};
use crate::hypervisor::{Hypervisor, HypervisorError, VmConfig};
use crate::vsock::HybridVsock;

#[derive(Debug, Error)]
pub enum SandboxError {
    #[error("guest {what} {path} not found: run the README's set-up, or set `{key}` in {config}")]
    MissingGuestFile {
        what: &'static str,
        key: &'static str,
        path: PathBuf,
        config: &'static str,
    },
    #[error("sandbox id {0:?} is not valid: use 1-64 letters, digits, '_', '.', '-'")]
    BadId(String),
    #[error("a sandbox named {0:?} already exists ({1})")]
    Exists(String, PathBuf),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error("{0}")]
    Helper(String),
    #[error("the VM did not come up: {reason}; last console lines:\n{console}")]
    Boot { reason: String, console: String },
    #[error(transparent)]
    Agent(#[from] AgentError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
    let what = what.into();
    move |source| SandboxError::Io { what, source }
}

/// Size and name of a sandbox.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub id: String,
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// When each boot phase ended, for `hull bench` and the logs.
#[derive(Debug, Clone, Default)]
pub struct BootTimes {
    pub vmm_started: Duration,
    pub agent_ready: Duration,
}

pub struct Sandbox {
    id: String,
    dir: PathBuf,
    config: Config,
    spec: SandboxSpec,
    vmm: Box<dyn Hypervisor>,
    helpers: Vec<(&'static str, Child)>,
    vsock: HybridVsock,
    agent: Option<AgentClient>,
    ready: Option<UnixStream>,
    binds: Vec<PathBuf>,
    next_port: AtomicU32,
    pub times: BootTimes,
}

fn check_id(id: &str) -> Result<(), SandboxError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SandboxError::BadId(id.to_string()))
    }
}

impl Sandbox {
    /// Checks the guest files and makes the sandbox directory; boots nothing yet.
    pub fn new(config: &Config, spec: SandboxSpec) -> Result<Sandbox, SandboxError> {
        check_id(&spec.id)?;
        for (what, key, path) in [
            ("kernel", "kernel", &config.kernel),
            ("initramfs", "initramfs", &config.initramfs),
        ] {
            if !path.is_file() {
                return Err(SandboxError::MissingGuestFile {
                    what,
                    key,
                    path: path.clone(),
                    config: crate::config::DEFAULT_CONFIG,
                });
            }
        }
        std::fs::create_dir_all(&config.run_root)
            .map_err(io(format!("creating {}", config.run_root.display())))?;
        let dir = config.run_root.join(&spec.id);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(SandboxError::Exists(spec.id.clone(), dir));
            }
            Err(e) => return Err(io(format!("creating {}", dir.display()))(e)),
        }
        let vsock = HybridVsock::new(&dir.join("vsock.sock"));
        let sandbox = Sandbox {
            id: spec.id.clone(),
            dir: dir.clone(),
            config: config.clone(),
            vmm: crate::hypervisor::select(config),
            helpers: Vec::new(),
            vsock,
            agent: None,
            ready: None,
            binds: Vec::new(),
            next_port: AtomicU32::new(hull_protocol::FIRST_STDIO_PORT),
            times: BootTimes::default(),
            spec,
        };
        std::fs::create_dir(sandbox.shared_dir()).map_err(io("creating the shared directory"))?;
        Ok(sandbox)
    }

    /// `new`, after removing what an owner that died left under the same id.
    pub fn replacing_stale(config: &Config, spec: SandboxSpec) -> Result<Sandbox, SandboxError> {
        let stale = config.run_root.join(&spec.id);
        if stale.exists() {
            tracing::warn!("removing the stale sandbox {}", stale.display());
            remove_stale(&stale);
        }
        Sandbox::new(config, spec)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The hybrid vsock whose port sockets live in the sandbox directory.
    pub fn vsock(&self) -> &HybridVsock {
        &self.vsock
    }

    /// The directory virtiofsd exports to the guest.
    pub fn shared_dir(&self) -> PathBuf {
        self.dir.join("shared")
    }

    /// The VMM's pid, once started.
    pub fn vmm_pid(&self) -> Option<u32> {
        self.vmm.pid()
    }

    pub fn describe_backend(&self) -> String {
        self.vmm.describe()
    }

    /// Bind-mounts host directory or file `source` at `shared/<rel>`, so the guest sees it.
    pub fn bind_into_share(&mut self, source: &Path, rel: &Path) -> Result<PathBuf, SandboxError> {
        let target = self.shared_dir().join(rel);
        let meta = std::fs::metadata(source)
            .map_err(io(format!("bind mount source {}", source.display())))?;
        if meta.is_dir() {
            std::fs::create_dir_all(&target)
                .map_err(io(format!("creating {}", target.display())))?;
        } else {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(io(format!("creating {}", parent.display())))?;
            }
            File::create(&target).map_err(io(format!("creating {}", target.display())))?;
        }
        nix::mount::mount(
            Some(source),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| {
            io(format!(
                "bind mounting {} into the sandbox",
                source.display()
            ))(e.into())
        })?;
        self.binds.push(target.clone());
        Ok(target)
    }

    /// Undoes `bind_into_share` (a container of the pod is gone).
    pub fn unbind(&mut self, target: &Path) {
        if let Err(e) = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH) {
            tracing::error!("unmounting {}: {e}", target.display());
        }
        self.binds.retain(|t| t != target);
    }

    /// Makes the share a mount of its own with shared propagation, before the VM boots:
    /// binds made under it later (a pod's next container) then reach virtiofsd, whose
    /// sandbox sees the share as a slave.
    pub fn share_propagates(&mut self) -> Result<(), SandboxError> {
        let shared = self.shared_dir();
        nix::mount::mount(
            Some(&shared),
            &shared,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| io("bind mounting the share onto itself")(e.into()))?;
        self.binds.insert(0, shared.clone());
        nix::mount::mount(
            None::<&str>,
            &shared,
            None::<&str>,
            nix::mount::MsFlags::MS_SHARED,
            None::<&str>,
        )
        .map_err(|e| io("making the share a shared mount")(e.into()))
    }

    /// A fresh host vsock port for a stdio stream, and its listener.
    pub fn listen_port(&self) -> Result<(u32, UnixListener), SandboxError> {
        let port = self.next_port.fetch_add(1, Ordering::Relaxed);
        let l = self
            .vsock
            .listen(port)
            .map_err(io(format!("listening on vsock port {port}")))?;
        Ok((port, l))
    }

    /// Whether the VMM process has ended (crashed, killed, or the guest reset).
    pub fn vmm_exited(&mut self) -> bool {
        matches!(self.vmm.try_wait(), Ok(Some(_)) | Err(_))
    }

    fn spawn_helper(
        &mut self,
        name: &'static str,
        program: &Path,
        args: &[String],
    ) -> Result<(), SandboxError> {
        let log = File::create(self.dir.join(format!("{name}.log")))
            .map_err(io(format!("creating {name}.log")))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io("log"))?)
            .stderr(log);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(|e| {
            SandboxError::Helper(format!(
                "cannot start {name} ({}): {e}; is it installed? (the README's set-up installs it)",
                program.display()
            ))
        })?;
        self.helpers.push((name, child));
        Ok(())
    }

    /// Waits until `path` exists (a helper's socket), or the helper dies.
    fn wait_for_socket(&mut self, name: &str, path: &Path) -> Result<(), SandboxError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !path.exists() {
            for (n, child) in self.helpers.iter_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    let log = std::fs::read_to_string(self.dir.join(format!("{n}.log")))
                        .unwrap_or_default();
                    return Err(SandboxError::Helper(format!(
                        "{n} exited ({status}) before it was ready: {}",
                        log.trim()
                    )));
                }
            }
            if Instant::now() > deadline {
                return Err(SandboxError::Helper(format!(
                    "{name} did not create {} in 10 s",
                    path.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// Starts the helpers and the VM and waits for the agent.
    pub fn boot(&mut self) -> Result<(), SandboxError> {
        let t0 = Instant::now();
        become_subreaper();
        let fs_socket = self.dir.join("virtiofsd.sock");
        let vsock_backend = self.dir.join("vhost-vsock.sock");
        let shared = self.shared_dir();
        let virtiofsd = self.config.virtiofsd.clone();
        self.spawn_helper(
            "virtiofsd",
            &virtiofsd,
            &[
                format!("--socket-path={}", fs_socket.display()),
                format!("--shared-dir={}", shared.display()),
                "--sandbox=namespace".into(),
                "--cache=auto".into(),
                "--log-level=error".into(),
            ],
        )?;
        if !self.vmm.serves_vsock() {
            let vhost_vsock = self.config.vhost_vsock.clone();
            self.spawn_helper(
                "vhost-device-vsock",
                &vhost_vsock,
                &[
                    "--guest-cid=3".into(),
                    format!("--socket={}", vsock_backend.display()),
                    format!("--uds-path={}", self.vsock.uds().display()),
                ],
            )?;
        }
        let ready = self
            .vsock
            .listen(hull_protocol::HOST_READY_PORT)
            .map_err(io("listening for the agent's ready call"))?;
        self.wait_for_socket("virtiofsd", &fs_socket)?;
        if !self.vmm.serves_vsock() {
            self.wait_for_socket("vhost-device-vsock", &vsock_backend)?;
        }

        let vm = VmConfig {
            vcpus: self.spec.vcpus,
            memory_mib: self.spec.memory_mib,
            kernel: self.config.kernel.clone(),
            initramfs: self.config.initramfs.clone(),
            cmdline: "console=ttyS0 reboot=k panic=-1 quiet 8250.nr_uarts=1 rdinit=/init".into(),
            fs_socket,
            share_tag: hull_protocol::SHARE_TAG.into(),
            vsock_backend,
            vsock_uds: self.vsock.uds().to_path_buf(),
            console_log: self.dir.join("console.log"),
            log: self.dir.join("vmm.log"),
        };
        self.vmm.start(&vm)?;
        self.times.vmm_started = t0.elapsed();
        tracing::info!(sandbox = %self.id, "{}", self.vmm.describe());

        let stream = self.wait_ready(&ready)?;
        self.ready = Some(stream);
        self.times.agent_ready = t0.elapsed();
        self.agent = Some(AgentClient::connect(&self.vsock)?);
        Ok(())
    }

    /// The last console lines, and what the VMM itself said (a config it refused, say).
    fn console_tail(&self) -> String {
        let tail = |name: &str, n: usize| {
            let text = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        };
        let vmm = tail("vmm.log", 5);
        let console = tail("console.log", 15);
        if vmm.trim().is_empty() {
            console
        } else {
            format!("{console}\n(VMM log) {vmm}")
        }
    }

    fn wait_ready(&mut self, listener: &UnixListener) -> Result<UnixStream, SandboxError> {
        let deadline = Instant::now() + Duration::from_secs(self.config.boot_timeout_secs);
        let fail = |s: &Sandbox, reason: String| SandboxError::Boot {
            reason,
            console: s.console_tail(),
        };
        loop {
            let mut pfd = [nix::poll::PollFd::new(
                listener.as_raw_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let n = nix::poll::poll(&mut pfd, 20).unwrap_or(0);
            if n > 0 {
                let (mut stream, _) = listener
                    .accept()
                    .map_err(io("accepting the agent's ready call"))?;
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .map_err(io("ready socket"))?;
                let mut buf = [0u8; 64];
                let want = hull_protocol::READY_LINE.len();
                let mut got = 0;
                while got < want {
                    match stream.read(&mut buf[got..want]) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => got += k,
                    }
                }
                if &buf[..got] != hull_protocol::READY_LINE.as_bytes() {
                    return Err(fail(
                        self,
                        format!(
                            "the agent said {:?} instead of ready",
                            String::from_utf8_lossy(&buf[..got])
                        ),
                    ));
                }
                return Ok(stream);
            }
            if let Ok(Some(status)) = self.vmm.try_wait() {
                return Err(fail(
                    self,
                    format!("the VMM exited ({status}) before the agent was ready"),
                ));
            }
            if Instant::now() > deadline {
                return Err(fail(
                    self,
                    format!(
                        "no word from the agent in {} s",
                        self.config.boot_timeout_secs
                    ),
                ));
            }
        }
    }

    pub fn agent(&self) -> Result<&AgentClient, SandboxError> {
        self.agent
            .as_ref()
            .ok_or_else(|| SandboxError::Helper("the sandbox is not booted".into()))
    }

    /// Asks the agent to stop every container and sync, then tears the VM down. The guest
    /// would reset itself after that; killing the VMM once the agent has answered saves the
    /// guest's slow reboot path and loses nothing (the share is written through).
    pub fn shutdown(mut self) {
        if let Some(agent) = self.agent.take() {
            agent.shutdown();
            tracing::debug!(sandbox = %self.id, "the agent has shut down");
        }
        // Drop does the rest.
    }

    fn cleanup(&mut self) {
        self.agent = None;
        self.ready = None;
        self.vmm.stop();
        for (_, child) in self.helpers.iter_mut() {
            kill_group(child);
        }
        tracing::debug!(sandbox = %self.id, "the VMM and helpers are gone");
        for target in self.binds.drain(..).rev() {
            if let Err(e) = nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH) {
                tracing::error!("unmounting {}: {e}", target.display());
            }
        }
        // Never delete through a mount: a bind-mounted rootfs is the user's data.
        let mounted = mounts_under(&self.dir);
        if !mounted.is_empty() {
            tracing::error!(
                "not removing {}: still mounted there: {}",
                self.dir.display(),
                mounted
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::error!("removing {}: {e}", self.dir.display());
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Mount points at or below `dir`, from /proc/self/mountinfo.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Processes whose command line names a path under `dir` (the VMM and helpers of that
/// sandbox: its directory name is unique), so that a recycled pid is never killed.
pub fn processes_of(dir: &Path) -> Vec<i32> {
    let mut needle = dir.as_os_str().as_encoded_bytes().to_vec();
    needle.push(b'/');
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle.as_slice()))
        })
        .collect()
}

/// Removes what a dead owner left of the sandbox at `dir`: its VMM and helpers, mounts,
/// the directory.
pub fn remove_stale(dir: &Path) {
    for pid in processes_of(dir) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_of(dir).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if !dir.exists() {
        return;
    }
    let mut mounts = mounts_under(dir);
    mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    for m in mounts {
        if let Err(e) = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
            tracing::error!("unmounting {}: {e}", m.display());
        }
    }
    if mounts_under(dir).is_empty() {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            tracing::error!("removing {}: {e}", dir.display());
        }
    } else {
        tracing::error!("not removing {}: still mounted", dir.display());
    }
}

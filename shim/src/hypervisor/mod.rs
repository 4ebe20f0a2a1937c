//! The seam between the sandbox and whatever runs the VM: hull-vmm (our own VMM, where
//! the host has hardware virtualization) or QEMU (elsewhere, or by choice).

pub mod accel;
pub mod hull_vmm;
pub mod qemu;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use crate::config::Config;

/// What a backend needs to boot a sandbox's VM. Both backends give the guest the same
/// machine: serial console, virtio-mmio vsock (hybrid, through `vsock_backend`) and
/// virtio-fs (tag `share_tag`, through `fs_socket`).
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub cmdline: String,
    /// vhost-user socket of virtiofsd.
    pub fs_socket: PathBuf,
    pub share_tag: String,
    /// vhost-user socket of the vsock backend (vhost-device-vsock), for a VMM that does
    /// not serve vsock itself.
    pub vsock_backend: PathBuf,
    /// The hybrid vsock socket the host side uses (`CONNECT <port>`, `<uds>_<port>`).
    pub vsock_uds: PathBuf,
    pub console_log: PathBuf,
    /// The backend's own log (its stderr).
    pub log: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error(
        "cannot start {program}: {source}; is it installed? (the README's set-up installs it)"
    )]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub trait Hypervisor: Send {
    /// Starts the VM; returns once the VMM process runs (not once the guest booted).
    fn start(&mut self, vm: &VmConfig) -> Result<(), HypervisorError>;
    /// The VMM process (both backends run one the same way).
    fn process(&self) -> &VmmProcess;
    fn process_mut(&mut self) -> &mut VmmProcess;
    /// The VMM's pid, once started.
    fn pid(&self) -> Option<u32> {
        self.process().pid()
    }
    /// The VMM's exit status if it has exited.
    fn try_wait(&mut self) -> Result<Option<ExitStatus>, HypervisorError> {
        self.process_mut().try_wait()
    }
    /// Waits for the VMM to exit.
    fn wait(&mut self) -> Result<ExitStatus, HypervisorError> {
        self.process_mut().wait()
    }
    /// Kills the VMM (if still running) and reaps it.
    fn stop(&mut self) {
        self.process_mut().stop()
    }
    /// One line for people: backend and acceleration, and why.
    fn describe(&self) -> String;
    /// Whether the VMM serves vsock itself (no vhost-device-vsock needed).
    fn serves_vsock(&self) -> bool {
        false
    }
}

/// The backend for this host and config: hull-vmm where /dev/kvm can run a stock guest
/// (hardware virtualization), QEMU elsewhere (TCG) — or what `hypervisor` says.
pub fn select(config: &Config) -> Box<dyn Hypervisor> {
    let (accel, why) = accel::detect(&config.accel);
    match config.hypervisor.as_str() {
        "qemu" => Box::new(qemu::Qemu::new(&config.qemu, accel, why)),
        "hull-vmm" => Box::new(hull_vmm::HullVmm::new(
            &config.hull_vmm,
            "hull-vmm as configured".into(),
        )),
        _ if accel == accel::Accel::Kvm && found(&config.hull_vmm) => {
            Box::new(hull_vmm::HullVmm::new(&config.hull_vmm, why))
        }
        _ if accel == accel::Accel::Kvm => Box::new(qemu::Qemu::new(
            &config.qemu,
            accel,
            format!(
                "{why} (hull-vmm not found at {})",
                config.hull_vmm.display()
            ),
        )),
        _ => Box::new(qemu::Qemu::new(&config.qemu, accel, why)),
    }
}

/// Whether `program` is a file, or a name found on PATH.
fn found(program: &Path) -> bool {
    if program.components().count() > 1 {
        return program.is_file();
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .any(|dir| dir.join(program).is_file())
}

/// A VMM process, as both backends run it: its own process group, gone with its parent,
/// output to the VM's log.
#[derive(Default)]
pub struct VmmProcess {
    child: Option<Child>,
}

impl VmmProcess {
    pub fn spawn(
        &mut self,
        program: &Path,
        args: &[String],
        log: &Path,
    ) -> Result<(), HypervisorError> {
        let log = File::create(log)?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        qemu::die_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(|source| HypervisorError::Spawn {
            program: program.display().to_string(),
            source,
        })?;
        tracing::debug!(pid = child.id(), program = %program.display(), "VMM started");
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, HypervisorError> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => Ok(None),
        }
    }

    pub fn wait(&mut self) -> Result<ExitStatus, HypervisorError> {
        match self.child.as_mut() {
            Some(c) => Ok(c.wait()?),
            None => Err(std::io::Error::other("the VMM was not started").into()),
        }
    }

    pub fn stop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            // Already reaped: its pid (and group id) may be someone else's by now.
            if matches!(c.try_wait(), Ok(Some(_))) {
                return;
            }
            qemu::kill_group(c);
        }
    }
}

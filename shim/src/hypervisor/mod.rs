//! The seam between the sandbox and whatever runs the VM: hull-vmm (issue 3) or QEMU.

pub mod accel;
pub mod qemu;

use std::path::PathBuf;
use std::process::ExitStatus;

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
    /// vhost-user socket of the vsock backend (vhost-device-vsock).
    pub vsock_backend: PathBuf,
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
    /// The VMM's pid, once started.
    fn pid(&self) -> Option<u32>;
    /// The VMM's exit status if it has exited.
    fn try_wait(&mut self) -> Result<Option<ExitStatus>, HypervisorError>;
    /// Waits for the VMM to exit.
    fn wait(&mut self) -> Result<ExitStatus, HypervisorError>;
    /// Kills the VMM (if still running) and reaps it.
    fn stop(&mut self);
    /// One line for people: backend and acceleration, and why.
    fn describe(&self) -> String;
}

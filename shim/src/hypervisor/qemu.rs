//! QEMU `microvm` as a backend: virtio-mmio devices only, no PCI, no ACPI, no firmware.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use super::accel::Accel;
use super::{Hypervisor, HypervisorError, VmConfig, VmmProcess};

pub struct Qemu {
    program: std::path::PathBuf,
    accel: Accel,
    why: String,
    process: VmmProcess,
}

impl Qemu {
    /// QEMU with `accel` (see `accel::detect`), `why` saying how it was chosen.
    pub fn new(program: &std::path::Path, accel: Accel, why: String) -> Qemu {
        Qemu {
            program: program.to_path_buf(),
            accel,
            why,
            process: VmmProcess::default(),
        }
    }

    /// The arguments for `vm`, without the program name.
    pub fn args(&self, vm: &VmConfig) -> Vec<String> {
        let mem = format!("{}M", vm.memory_mib);
        let (accel, cpu) = match self.accel {
            // -cpu host aborts on QEMU 7.2 over some hosts (MSR 0x10a); leave that MSR out.
            Accel::Kvm => ("kvm", "host,-arch-capabilities"),
            Accel::Tcg => ("tcg", "max"),
        };
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        // acpi=off matters: only then does microvm put the virtio_mmio.device= entries on
        // the kernel command line.
        push(&[
            "-M",
            "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off,memory-backend=mem",
        ]);
        push(&[
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
        ]);
        push(&["-m", &mem, "-smp", &vm.vcpus.to_string()]);
        push(&["-accel", accel, "-cpu", cpu]);
        // Nothing on stdio: no display, no monitor, serial to a file.
        push(&[
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]);
        push(&["-serial", &format!("file:{}", vm.console_log.display())]);
        push(&["-kernel", &vm.kernel.display().to_string()]);
        push(&["-initrd", &vm.initramfs.display().to_string()]);
        push(&["-append", &vm.cmdline]);
        push(&[
            "-chardev",
            &format!("socket,id=fs0,path={}", vm.fs_socket.display()),
        ]);
        push(&[
            "-device",
            &format!("vhost-user-fs-device,chardev=fs0,tag={}", vm.share_tag),
        ]);
        push(&[
            "-chardev",
            &format!("socket,id=vsock0,path={}", vm.vsock_backend.display()),
        ]);
        push(&["-device", "vhost-user-vsock-device,chardev=vsock0"]);
        a
    }
}

/// Makes a helper process die with the process that started it, in a process group of its
/// own (so that `kill_group` also reaches what it forks, as virtiofsd's sandbox does).
pub(crate) fn die_with_parent(cmd: &mut Command) {
    cmd.process_group(0);
    // SAFETY: the closure runs between fork and exec and calls only prctl.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            Ok(())
        });
    }
}

impl Hypervisor for Qemu {
    fn start(&mut self, vm: &VmConfig) -> Result<(), HypervisorError> {
        self.process.spawn(&self.program, &self.args(vm), &vm.log)
    }

    fn process(&self) -> &VmmProcess {
        &self.process
    }

    fn process_mut(&mut self) -> &mut VmmProcess {
        &mut self.process
    }

    fn describe(&self) -> String {
        format!("QEMU microvm with {}", self.why)
    }
}

/// Makes this process the reaper of its descendants' orphans: helpers that fork (virtiofsd
/// in its namespace sandbox) leave children that must not wait for PID 1 to reap them.
pub(crate) fn become_subreaper() {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        tracing::warn!(
            "PR_SET_CHILD_SUBREAPER: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Kills the process group led by `child` and waits (up to 2 s) until none of it is left.
pub(crate) fn kill_group(child: &mut Child) {
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
    for _ in 0..400 {
        // Reap what is ours of the group: a helper's own children are re-parented to us
        // (see `become_subreaper`), and reaping them at once frees their sockets.
        while let Ok(
            nix::sys::wait::WaitStatus::Exited(..) | nix::sys::wait::WaitStatus::Signaled(..),
        ) = nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(-pgid.as_raw()),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        ) {}
        if nix::sys::signal::killpg(pgid, None).is_err() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    tracing::warn!("processes of group {pgid} outlived SIGKILL for 2 s");
}

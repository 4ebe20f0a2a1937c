//! hull-vmm as a backend: our own KVM VMM, serving vsock in-process (hybrid Unix socket)
//! and virtio-fs through virtiofsd. It reads the VM from a JSON file written next to the
//! VM's log; see vmm/src/config.rs for the fields.

use std::path::{Path, PathBuf};

use super::{Hypervisor, HypervisorError, VmConfig, VmmProcess};

/// The guest's vsock context id (the same as with QEMU and vhost-device-vsock).
pub const GUEST_CID: u64 = 3;

pub struct HullVmm {
    program: PathBuf,
    why: String,
    process: VmmProcess,
}

impl HullVmm {
    pub fn new(program: &Path, why: String) -> HullVmm {
        HullVmm {
            program: program.to_path_buf(),
            why,
            process: VmmProcess::default(),
        }
    }

    /// The VM config hull-vmm reads.
    pub fn config_json(vm: &VmConfig) -> serde_json::Value {
        serde_json::json!({
            "vcpus": vm.vcpus,
            "memory_mib": vm.memory_mib,
            "kernel": vm.kernel,
            "initramfs": vm.initramfs,
            "cmdline": vm.cmdline,
            "serial": {"output": vm.console_log},
            "vsock": {"cid": GUEST_CID, "uds": vm.vsock_uds},
            "fs": [{"tag": vm.share_tag, "socket": vm.fs_socket}],
        })
    }
}

impl Hypervisor for HullVmm {
    fn start(&mut self, vm: &VmConfig) -> Result<(), HypervisorError> {
        let path = vm.log.parent().unwrap_or(Path::new(".")).join("vm.json");
        let json =
            serde_json::to_vec_pretty(&Self::config_json(vm)).map_err(std::io::Error::other)?;
        std::fs::write(&path, json)?;
        let args = ["--config".to_string(), path.display().to_string()];
        self.process.spawn(&self.program, &args, &vm.log)
    }

    fn process(&self) -> &VmmProcess {
        &self.process
    }

    fn process_mut(&mut self) -> &mut VmmProcess {
        &mut self.process
    }

    fn describe(&self) -> String {
        format!("hull-vmm with {}", self.why)
    }

    fn serves_vsock(&self) -> bool {
        true
    }
}

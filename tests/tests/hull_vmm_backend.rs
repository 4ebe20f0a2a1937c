//! The shim's hull-vmm backend: the VM config the sandbox hands it, written as hull-vmm's
//! JSON and started through the backend's own code, boots hull-vmm with vsock and
//! virtio-fs wired as the sandbox wires them. The guest is the project's probe (a stock
//! Linux guest cannot boot on the PVM /dev/kvm of our build machines); the full stack on
//! hull-vmm runs wherever hardware virtualization is.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hull_shim::hypervisor::hull_vmm::HullVmm;
use hull_shim::hypervisor::{Hypervisor, VmConfig};
use hull_tests::*;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn the_sandbox_vm_config_boots_hull_vmm_with_vsock_and_virtio_fs() {
    let dir = TempDir::new("hull-vmm-backend");
    let d = dir.path();
    let probe = d.join("probe.elf");
    let built = std::process::Command::new("sh")
        .arg(workspace().join("vmm/probe/build.sh"))
        .arg(&probe)
        .status()
        .unwrap();
    assert!(built.success());
    let initramfs = d.join("initramfs.cpio");
    std::fs::write(&initramfs, vec![0u8; 4096]).unwrap();
    let share = d.join("shared");
    std::fs::create_dir(&share).unwrap();
    let fs_socket = d.join("virtiofsd.sock");
    let mut virtiofsd = std::process::Command::new("virtiofsd")
        .arg(format!("--socket-path={}", fs_socket.display()))
        .arg(format!("--shared-dir={}", share.display()))
        .args(["--sandbox=none", "--log-level=error"])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("virtiofsd (the set-up installs it)");
    assert!(
        eventually(10, || fs_socket.exists()),
        "virtiofsd made no socket"
    );
    let uds = d.join("vsock.sock");
    let listener = UnixListener::bind(format!("{}_1024", uds.display())).unwrap();
    let host = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(b"ready?").unwrap();
        let mut back = [0u8; 6];
        s.read_exact(&mut back).unwrap();
        back == *b"ready?"
    });
    let vm = VmConfig {
        vcpus: 1,
        memory_mib: 64,
        kernel: probe,
        initramfs,
        cmdline: "probe.fs=1 probe.vsock_port=1024".into(),
        fs_socket,
        share_tag: hull_protocol::SHARE_TAG.into(),
        vsock_backend: d.join("unused-vhost-vsock.sock"),
        vsock_uds: uds.clone(),
        console_log: d.join("console.log"),
        log: d.join("vmm.log"),
    };
    let vmm_bin = workspace().join("target/release/hull-vmm");
    assert!(
        vmm_bin.exists(),
        "{} missing: scripts/test.sh builds it",
        vmm_bin.display()
    );
    let mut backend = HullVmm::new(&vmm_bin, "test".into());
    assert!(backend.serves_vsock());
    backend.start(&vm).unwrap();
    let status = backend.wait().unwrap();
    let console = std::fs::read_to_string(&vm.console_log).unwrap_or_default();
    let log = std::fs::read_to_string(&vm.log).unwrap_or_default();
    assert!(
        status.success(),
        "hull-vmm: {status}; log: {log}\nconsole: {console}"
    );
    assert!(host.join().unwrap(), "vsock echo differed");
    assert!(
        console.contains(&format!(
            "HULL-PROBE fs tag={} queues=1",
            hull_protocol::SHARE_TAG
        )),
        "{console}"
    );
    assert!(
        console.contains("HULL-PROBE fuse init error=0 major=7"),
        "{console}"
    );
    assert!(
        console.contains("HULL-PROBE vsock connected cid=3 port=1024"),
        "{console}"
    );
    assert!(!console.contains("FAIL"), "{console}");
    // hull-vmm read the JSON the backend wrote beside the log, and removed its socket.
    assert!(d.join("vm.json").exists());
    assert!(!uds.exists(), "vsock socket left behind");
    assert!(
        eventually(10, || virtiofsd.try_wait().unwrap().is_some()),
        "virtiofsd outlived the VM"
    );
}

#[test]
fn this_host_gets_the_backend_its_kvm_can_run() {
    let config = hull_shim::config::Config::default();
    let backend = hull_shim::hypervisor::select(&config);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let hw = cpuinfo.split_whitespace().any(|f| f == "vmx" || f == "svm")
        && !Path::new("/sys/module/kvm_pvm").exists()
        && Path::new("/dev/kvm").exists();
    let describe = backend.describe();
    if hw {
        assert!(describe.starts_with("hull-vmm"), "{describe}");
        assert!(backend.serves_vsock());
    } else {
        assert!(describe.starts_with("QEMU microvm with TCG"), "{describe}");
        assert!(!backend.serves_vsock());
    }
    let mut forced = config.clone();
    forced.hypervisor = "qemu".into();
    assert!(hull_shim::hypervisor::select(&forced)
        .describe()
        .starts_with("QEMU"));
    forced.hypervisor = "hull-vmm".into();
    assert!(hull_shim::hypervisor::select(&forced)
        .describe()
        .starts_with("hull-vmm"));
}

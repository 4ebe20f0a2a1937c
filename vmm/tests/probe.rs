//! hull-vmm booting the project's probe guest (vmm/probe/) through the same 64-bit entry
//! path Linux uses: real KVM exits, ioeventfds and irqfds on whatever /dev/kvm this
//! machine has (PVM included). The probe reports on COM1; the tests check what the host
//! side sees.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

mod common;
use common::*;

/// Builds the probe once per test binary.
fn probe() -> PathBuf {
    static PROBE: OnceLock<PathBuf> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            let out = std::env::temp_dir().join(format!("hull-probe-{}.elf", std::process::id()));
            let status = std::process::Command::new("sh")
                .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/probe/build.sh"))
                .arg(&out)
                .status()
                .expect("running vmm/probe/build.sh");
            assert!(status.success(), "building the probe guest failed");
            out
        })
        .clone()
}

fn probe_lines(console: &str) -> Vec<&str> {
    console
        .lines()
        .filter(|l| l.starts_with("HULL-PROBE"))
        .collect()
}

#[test]
fn probe_checks_the_zero_page_and_cmdline_then_resets() {
    let dir = TestDir::new("probe-boot");
    let config = dir.config(&VmSpec {
        kernel: probe(),
        cmdline: "console=ttyS0 hull.test=zero-page".into(),
        memory_mib: 64,
        ..Default::default()
    });
    let mut vmm = Vmm::start(&config);
    assert_eq!(
        vmm.wait(Duration::from_secs(30)),
        Some(0),
        "{}",
        vmm.stderr()
    );
    let console = std::fs::read_to_string(dir.console()).unwrap();
    assert_eq!(
        probe_lines(&console),
        [
            "HULL-PROBE start",
            "HULL-PROBE bootparams ok loader=0xff",
            "HULL-PROBE cmdline console=ttyS0 hull.test=zero-page",
            "HULL-PROBE e820 0x0 0x9fc00 1",
            "HULL-PROBE e820 0x9fc00 0x60400 2",
            "HULL-PROBE e820 0x100000 0x3f00000 1",
            "HULL-PROBE done",
        ],
        "{console}"
    );
}

#[test]
fn probe_echoes_bytes_over_vsock_to_a_host_unix_socket() {
    let dir = TestDir::new("probe-vsock");
    let uds = dir.path("v.sock");
    let listener = UnixListener::bind(format!("{}_1234", uds.display())).unwrap();
    let host = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let writer = {
            let mut stream = stream.try_clone().unwrap();
            let data = data.clone();
            std::thread::spawn(move || stream.write_all(&data).unwrap())
        };
        let mut echoed = vec![0u8; data.len()];
        stream.read_exact(&mut echoed).unwrap();
        writer.join().unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        echoed == data
    });
    let config = dir.config(&VmSpec {
        kernel: probe(),
        cmdline: "console=ttyS0 probe.vsock_port=1234".into(),
        memory_mib: 64,
        vcpus: 2,
        extra: Some(serde_json::json!({"vsock": {"cid": 7, "uds": uds}})),
        ..Default::default()
    });
    let mut vmm = Vmm::start(&config);
    assert_eq!(
        vmm.wait(Duration::from_secs(120)),
        Some(0),
        "{}",
        vmm.stderr()
    );
    assert!(host.join().unwrap(), "the bytes came back changed");
    let console = std::fs::read_to_string(dir.console()).unwrap();
    let lines = probe_lines(&console);
    assert!(
        lines.contains(&"HULL-PROBE cmdline console=ttyS0 probe.vsock_port=1234 virtio_mmio.device=4K@0xd0000000:5"),
        "{console}"
    );
    assert!(
        lines.contains(&"HULL-PROBE virtio 0xd0000000 id=19 version=2"),
        "{console}"
    );
    assert!(
        lines.contains(&"HULL-PROBE vsock connected cid=7 port=1234"),
        "{console}"
    );
    assert!(
        lines.contains(&"HULL-PROBE vsock echoed 100000"),
        "{console}"
    );
    assert!(!console.contains("FAIL"), "{console}");
    // The VMM removed its socket on the way out.
    assert!(!uds.exists());
}

#[test]
fn a_guest_connection_to_a_closed_host_port_is_refused() {
    let dir = TestDir::new("probe-refused");
    let uds = dir.path("v.sock");
    let config = dir.config(&VmSpec {
        kernel: probe(),
        cmdline: "probe.vsock_port=4321".into(),
        memory_mib: 64,
        extra: Some(serde_json::json!({"vsock": {"cid": 3, "uds": uds}})),
        ..Default::default()
    });
    let mut vmm = Vmm::start(&config);
    assert_eq!(vmm.wait(Duration::from_secs(30)), Some(0));
    let console = std::fs::read_to_string(dir.console()).unwrap();
    assert!(
        console.contains("HULL-PROBE FAIL vsock connection to host port 4321 refused (RST)"),
        "{console}"
    );
}

#[test]
fn a_halted_guest_stops_cleanly_on_sigterm() {
    let dir = TestDir::new("probe-halt");
    let uds = dir.path("v.sock");
    let config = dir.config(&VmSpec {
        kernel: probe(),
        cmdline: "probe.end=halt".into(),
        memory_mib: 64,
        vcpus: 2,
        extra: Some(serde_json::json!({"vsock": {"cid": 3, "uds": uds}})),
        ..Default::default()
    });
    let mut vmm = Vmm::start(&config);
    vmm.wait_console(&dir.console(), Duration::from_secs(30), |c| {
        c.contains("HULL-PROBE done")
    });
    assert!(uds.exists());
    // Every thread (main, two vCPUs, the vsock device thread) runs under its filter
    // (KVM's own kernel workers show up among the tasks too: they are not ours).
    let mut threads: Vec<(String, bool)> =
        std::fs::read_dir(format!("/proc/{}/task", vmm.child.id()))
            .unwrap()
            .map(|t| std::fs::read_to_string(t.unwrap().path().join("status")).unwrap())
            .map(|status| {
                let name = status
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim_start_matches("Name:\t")
                    .to_string();
                (name, status.contains("\nSeccomp:\t2\n"))
            })
            .filter(|(name, _)| !name.starts_with("kvm"))
            .collect();
    threads.sort();
    let expected = ["hull-vmm", "vcpu0", "vcpu1", "vsock"].map(|n| (n.to_string(), true));
    assert_eq!(threads, expected);
    assert_eq!(vmm.terminate(), Some(4));
    assert!(!uds.exists(), "vsock socket left behind");
}

/// virtiofsd from the set-up (cargo install), found on PATH or in ~/.cargo/bin.
fn virtiofsd() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .chain([home.join(".cargo/bin")])
        .map(|d| d.join("virtiofsd"))
        .find(|p| p.is_file())
        .expect("virtiofsd is not installed: run scripts/setup.sh")
}

/// virtiofsd serving `<dir>/share` on `<dir>/fs.sock`, once its socket is there.
fn start_virtiofsd(dir: &TestDir) -> (std::process::Child, PathBuf) {
    let share = dir.path("share");
    std::fs::create_dir(&share).unwrap();
    let socket = dir.path("fs.sock");
    let child = std::process::Command::new(virtiofsd())
        .arg(format!("--socket-path={}", socket.display()))
        .arg(format!("--shared-dir={}", share.display()))
        .args(["--sandbox=none", "--cache=auto"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "virtiofsd made no socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, socket)
}

#[test]
fn probe_gets_a_fuse_init_reply_from_virtiofsd_over_vhost_user() {
    let dir = TestDir::new("probe-fs");
    let (mut virtiofsd, socket) = start_virtiofsd(&dir);
    let config = dir.config(&VmSpec {
        kernel: probe(),
        cmdline: "probe.fs=1".into(),
        memory_mib: 64,
        extra: Some(serde_json::json!({"fs": [{"tag": "probe-share", "socket": socket}]})),
        ..Default::default()
    });
    let mut vmm = Vmm::start(&config);
    assert_eq!(
        vmm.wait(Duration::from_secs(30)),
        Some(0),
        "{}",
        vmm.stderr()
    );
    let console = std::fs::read_to_string(dir.console()).unwrap();
    let lines = probe_lines(&console);
    assert!(
        lines.contains(&"HULL-PROBE virtio 0xd0000000 id=26 version=2"),
        "{console}"
    );
    assert!(
        lines.contains(&"HULL-PROBE fs tag=probe-share queues=1"),
        "{console}"
    );
    assert!(
        lines.iter().any(
            |l| l.starts_with("HULL-PROBE fuse init error=0 major=7 minor=")
                && l.ends_with("len=80")
        ),
        "{console}"
    );
    // The VMM hung up; virtiofsd ends with it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if virtiofsd.try_wait().unwrap().is_some() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = virtiofsd.kill();
            panic!("virtiofsd still running after the VMM exited");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_virtio_fs_backend_that_dies_ends_the_vm_with_an_error() {
    let dir = TestDir::new("probe-fs-dies");
    let (mut virtiofsd, socket) = start_virtiofsd(&dir);
    let config = dir.config(&VmSpec {
        kernel: probe(),
        cmdline: "probe.fs=1 probe.end=halt".into(),
        memory_mib: 64,
        extra: Some(serde_json::json!({"fs": [{"tag": "t", "socket": socket}]})),
        ..Default::default()
    });
    let mut vmm = Vmm::start(&config);
    vmm.wait_console(&dir.console(), Duration::from_secs(30), |c| {
        c.contains("HULL-PROBE done")
    });
    virtiofsd.kill().unwrap();
    virtiofsd.wait().unwrap();
    assert_eq!(vmm.wait(Duration::from_secs(10)), Some(1));
    let err = vmm.stderr();
    assert!(
        err.contains("virtio-fs backend") && err.contains("hung up"),
        "{err}"
    );
}

#[test]
fn a_vhost_user_socket_nobody_serves_fails_before_the_guest_runs() {
    let dir = TestDir::new("probe-fs-dead");
    let socket = dir.path("fs.sock");
    drop(UnixListener::bind(&socket).unwrap()); // a socket file with no listener
    let config = dir.config(&VmSpec {
        kernel: probe(),
        memory_mib: 64,
        extra: Some(serde_json::json!({"fs": [{"tag": "t", "socket": socket}]})),
        ..Default::default()
    });
    let mut vmm = Vmm::start(&config);
    assert_eq!(vmm.wait(Duration::from_secs(30)), Some(1));
    let err = vmm.stderr();
    assert!(
        err.contains("cannot connect to the vhost-user backend") && err.contains("fs.sock"),
        "{err}"
    );
    assert!(!std::fs::read_to_string(dir.console())
        .unwrap_or_default()
        .contains("HULL-PROBE"));
}

#[test]
fn a_triple_fault_is_reported_as_a_crash() {
    let dir = TestDir::new("probe-triple");
    let config = dir.config(&VmSpec {
        kernel: probe(),
        cmdline: "probe.end=triple-fault".into(),
        memory_mib: 64,
        ..Default::default()
    });
    let mut vmm = Vmm::start(&config);
    assert_eq!(vmm.wait(Duration::from_secs(30)), Some(3));
    let err = vmm.stderr();
    // Hardware KVM reports KVM_EXIT_SHUTDOWN; PVM fails in its instruction emulator.
    assert!(
        err.contains("guest crashed")
            && (err.contains("triple-faulted") || err.contains("KVM internal error")),
        "{err}"
    );
}

//! hull-vmm booting the project's guest kernel.
//!
//! On our build machines /dev/kvm is PVM (no vmx/svm): a stock Linux guest gets through
//! its early boot (banner, command line, e820, MP table) and then crawls, so the early
//! boot is checked everywhere and the full boot only where hardware virtualization is.

use std::path::PathBuf;
use std::time::Duration;

mod common;
use common::*;

#[test]
fn linux_early_boot_shows_the_banner_our_cmdline_and_e820() {
    let dir = TestDir::new("linux-early");
    let cmdline = "console=ttyS0 earlyprintk=serial reboot=k panic=1 hull.test=early-boot";
    let config = dir.config(&VmSpec {
        kernel: kernel(),
        cmdline: cmdline.into(),
        memory_mib: 256,
        vcpus: 2,
        ..Default::default()
    });
    let mut vmm = Vmm::start(&config);
    let console = vmm.wait_console(&dir.console(), Duration::from_secs(120), |c| {
        c.contains("smpboot: Allowing 2 CPUs")
    });
    assert!(console.contains("Linux version 6."), "{console}");
    assert!(
        console.contains(&format!("Command line: {cmdline}")),
        "{console}"
    );
    assert!(
        console.contains("BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable"),
        "{console}"
    );
    assert!(
        console.contains("MPTABLE: Product ID: HULL-VMM"),
        "{console}"
    );
    assert!(console.contains("Hypervisor detected: KVM"), "{console}");
    // SIGTERM stops it cleanly: exit status 4, no process left.
    assert_eq!(vmm.terminate(), Some(4));
}

#[test]
fn linux_full_boot_reaches_init_where_hardware_virtualization_exists() {
    if let Some(why) = no_hardware_virtualization() {
        println!("skipped: {why}");
        return;
    }
    let dir = TestDir::new("linux-full");
    let config = dir.config(&VmSpec {
        kernel: kernel(),
        initramfs: Some(PathBuf::from(
            std::env::var_os("HULL_INITRAMFS").unwrap_or("/var/lib/hull/initramfs.cpio".into()),
        )),
        cmdline: "console=ttyS0 reboot=k panic=1".into(),
        memory_mib: 256,
        vcpus: 2,
        ..Default::default()
    });
    let mut vmm = Vmm::start(&config);
    let console = vmm.wait_console(&dir.console(), Duration::from_secs(60), |c| {
        c.contains("Run /init as init process")
    });
    assert!(
        console.contains("smp: Brought up 1 node, 2 CPUs"),
        "{console}"
    );
    assert_eq!(vmm.terminate(), Some(4));
}

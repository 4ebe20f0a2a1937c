//! Whether this host's /dev/kvm can boot a stock Linux guest.

use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// Picks KVM only where it can run a stock guest: /dev/kvm is there, the CPU has vmx or
/// svm, and KVM is not PVM (software shadow paging, on which a stock guest cannot boot).
pub fn detect(requested: &str) -> (Accel, String) {
    match requested {
        "kvm" => return (Accel::Kvm, "KVM as configured".to_string()),
        "tcg" => return (Accel::Tcg, "TCG as configured".to_string()),
        _ => {}
    }
    if !Path::new("/dev/kvm").exists() {
        return (Accel::Tcg, "TCG: /dev/kvm is absent".to_string());
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return (
            Accel::Tcg,
            "TCG: /dev/kvm is PVM (kvm_pvm loaded), which cannot boot a stock Linux guest"
                .to_string(),
        );
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !hw {
        return (
            Accel::Tcg,
            "TCG: the CPU has no vmx/svm, so /dev/kvm cannot boot a stock Linux guest".to_string(),
        );
    }
    (
        Accel::Kvm,
        "KVM: /dev/kvm with hardware virtualization".to_string(),
    )
}

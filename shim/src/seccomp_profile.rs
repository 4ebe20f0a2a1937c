//! The seccomp profile `hull do` gives containers unless told otherwise: the policy of
//! Docker's and Podman's default profile for a container with the default capabilities —
//! deny (EPERM) by default, allow what ordinary programs use, and keep out what reaches
//! kernel state that namespaces do not isolate (keyrings, modules, kexec, clocks, mounts
//! and new namespaces, tracing other processes' memory, BPF, perf, io_uring, swap,
//! accounting, reboot).
//!
//! Hull adds one rule for its own shape: no AF_VSOCK sockets. vsock is not namespaced,
//! and in a Hull guest it leads to the host, so a container must not open one.

use serde_json::{json, Value};

/// Calls the profile does not allow (those the guest kernel does not know are not allowed
/// either: the profile is an allowlist).
const DENIED: &[&str] = &[
    // Kernel keyrings are not namespaced.
    "add_key",
    "keyctl",
    "request_key",
    // Modules, kexec, reboot, swap, accounting.
    "create_module",
    "delete_module",
    "finit_module",
    "init_module",
    "get_kernel_syms",
    "query_module",
    "kexec_file_load",
    "kexec_load",
    "reboot",
    "swapoff",
    "swapon",
    "acct",
    // Clocks are not namespaced (time namespaces shift only monotonic/boottime).
    "adjtimex",
    "clock_adjtime",
    "clock_settime",
    "settimeofday",
    // Mounts and namespaces (CAP_SYS_ADMIN's business).
    "mount",
    "mount_setattr",
    "move_mount",
    "open_tree",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "umount2",
    "pivot_root",
    "setns",
    "unshare",
    "quotactl",
    "quotactl_fd",
    "fanotify_init",
    "lookup_dcookie",
    "name_to_handle_at",
    "open_by_handle_at",
    // Other processes' memory and kernel comparison (CAP_SYS_PTRACE's business).
    "kcmp",
    "pidfd_getfd",
    "process_madvise",
    "userfaultfd",
    // NUMA policy (CAP_SYS_NICE), raw I/O (CAP_SYS_RAWIO), tty hangup, syslog.
    "get_mempolicy",
    "mbind",
    "migrate_pages",
    "move_pages",
    "set_mempolicy",
    "set_mempolicy_home_node",
    "ioperm",
    "iopl",
    "vhangup",
    "syslog",
    // BPF, perf, io_uring: large kernel attack surface.
    "bpf",
    "perf_event_open",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    // Obsolete.
    "_sysctl",
    "nfsservctl",
    "sysfs",
    "uselib",
    "ustat",
    // Allowed only with the conditions below.
    "clone",
    "clone3",
    "personality",
    "socket",
];

/// CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER |
/// CLONE_NEWPID | CLONE_NEWNET: clone may not make namespaces.
const CLONE_NAMESPACE_FLAGS: u64 = 0x7e02_0000;

/// personality(2) values programs use: PER_LINUX, PER_LINUX32 (and with
/// UNAME26), and the query 0xffffffff.
const PERSONALITIES: [u64; 5] = [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

const AF_VSOCK: u64 = 40;

/// The profile, as the OCI spec's `linux.seccomp`.
pub fn default_profile() -> Value {
    let allowed: Vec<&str> = hull_protocol::syscalls::X86_64
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !DENIED.contains(name))
        .collect();
    let mut syscalls = vec![json!({"names": allowed, "action": "SCMP_ACT_ALLOW"})];
    for p in PERSONALITIES {
        syscalls.push(json!({"names": ["personality"], "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": p, "op": "SCMP_CMP_EQ"}]}));
    }
    syscalls.push(json!({"names": ["clone"], "action": "SCMP_ACT_ALLOW",
        "args": [{"index": 0, "value": CLONE_NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]}));
    // ENOSYS, so that libc falls back to clone, whose flags the filter can see.
    syscalls.push(json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}));
    syscalls.push(json!({"names": ["socket"], "action": "SCMP_ACT_ALLOW",
        "args": [{"index": 0, "value": AF_VSOCK, "op": "SCMP_CMP_NE"}]}));
    json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": syscalls,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_profile_parses_as_oci_and_names_known_calls() {
        let p: oci_spec::runtime::LinuxSeccomp =
            serde_json::from_value(super::default_profile()).unwrap();
        let allowed = &p.syscalls().as_ref().unwrap()[0];
        assert!(allowed.names().iter().any(|n| n == "read"));
        assert!(!allowed
            .names()
            .iter()
            .any(|n| n == "mount" || n == "keyctl"));
        for name in super::DENIED {
            assert!(
                hull_protocol::syscalls::number(name).is_some(),
                "{name} is not a call the guest kernel knows"
            );
        }
    }
}

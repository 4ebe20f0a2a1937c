//! The hull agent API, shared by the host side (`shim`) and the guest agent.
//!
//! Generated from `proto/agent.proto` by ttrpc-codegen; this file adds the constants both
//! sides must agree on.

#[allow(
    clippy::all,
    unused_qualifications,
    missing_docs,
    nonstandard_style,
    unused,
    clippy::undocumented_unsafe_blocks
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

#[allow(
    clippy::all,
    unused_qualifications,
    missing_docs,
    nonstandard_style,
    unused,
    clippy::undocumented_unsafe_blocks
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

/// System call numbers by name, for seccomp profiles (built by the host, compiled to BPF by
/// the agent).
pub mod syscalls;

/// Running OCI hooks (host-side ones in the shim, container ones in the agent).
pub mod hooks;

/// Bumped whenever a change to the API is not backward compatible.
pub const PROTOCOL_VERSION: u32 = 2;

/// Guest vsock port the agent serves the ttrpc API on.
pub const AGENT_PORT: u32 = 1024;

/// Host vsock port the agent connects to once it is ready to serve; it writes
/// [`READY_LINE`] and keeps the connection open until it shuts down.
pub const HOST_READY_PORT: u32 = 1023;

/// What the agent writes on the ready connection.
pub const READY_LINE: &str = "hull-agent ready 2\n";

/// The virtio-fs tag the host exports the sandbox's shared directory under.
pub const SHARE_TAG: &str = "hullshare";

/// Where the agent mounts the share in the guest; container rootfs paths are relative to it.
pub const GUEST_SHARE_DIR: &str = "/run/hull/share";

/// First host vsock port handed out for stdio streams.
pub const FIRST_STDIO_PORT: u32 = 2000;

/// Linux capabilities by number (the index), with the names the OCI spec uses: what the
/// guest kernel knows.
pub const CAPABILITIES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

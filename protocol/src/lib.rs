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

/// Bumped whenever a change to the API is not backward compatible.
pub const PROTOCOL_VERSION: u32 = 1;

/// Guest vsock port the agent serves the ttrpc API on.
pub const AGENT_PORT: u32 = 1024;

/// Host vsock port the agent connects to once it is ready to serve; it writes
/// [`READY_LINE`] and keeps the connection open until it shuts down.
pub const HOST_READY_PORT: u32 = 1023;

/// What the agent writes on the ready connection.
pub const READY_LINE: &str = "hull-agent ready 1\n";

/// The virtio-fs tag the host exports the sandbox's shared directory under.
pub const SHARE_TAG: &str = "hullshare";

/// Where the agent mounts the share in the guest; container rootfs paths are relative to it.
pub const GUEST_SHARE_DIR: &str = "/run/hull/share";

/// First host vsock port handed out for stdio streams.
pub const FIRST_STDIO_PORT: u32 = 2000;

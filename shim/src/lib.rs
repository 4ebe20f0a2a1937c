//! Hull's host side: the sandbox lifecycle, hypervisor backends, the agent client, and the
//! engine front ends (`hull do`, the runc-compatible CLI, containerd's shim v2).

pub mod agent_client;
pub mod cli;
pub mod config;
pub mod hypervisor;
pub mod image;
pub mod sandbox;
pub mod seccomp_profile;
pub mod shimv2;
pub mod spec;
pub mod user;
pub mod vsock;

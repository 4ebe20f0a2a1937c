//! Hull's host side: the sandbox lifecycle, hypervisor backends, the agent client, and the
//! engine front ends (`hull do`; the runc-compatible CLI and the containerd shim come later).

pub mod agent_client;
pub mod cli;
pub mod config;
pub mod hypervisor;
pub mod image;
pub mod sandbox;
pub mod seccomp_profile;
pub mod spec;
pub mod user;
pub mod vsock;

//! hull-vmm: Hull's own KVM microVM monitor on the rust-vmm crates.
//!
//! Not built yet (issue 3). Until it is, the shim runs every sandbox on the QEMU backend;
//! this crate exists so the workspace has its final shape.

//! hull-vmm: Hull's own KVM microVM monitor on the rust-vmm crates.
//!
//! One process per VM: guest memory in a shared memfd, an in-kernel irqchip and PIT, a
//! 16550 console, the i8042 reset line, and virtio-mmio devices; the kernel is entered
//! through the Linux x86_64 64-bit boot protocol. `vm::Vm` is the library entry point;
//! the `hull-vmm` binary reads a JSON [`config::VmConfig`].

pub mod arch;
pub mod config;
pub mod devices;
pub mod memory;
pub mod seccomp;
pub mod vcpu;
pub mod vm;

pub use config::VmConfig;
pub use vcpu::ExitReason;
pub use vm::Vm;

//! Device models and the buses the vCPU threads dispatch port and MMIO exits through.

pub mod bus;
pub mod legacy;
pub mod thread;
pub mod virtio;

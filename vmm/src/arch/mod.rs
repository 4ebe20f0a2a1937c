//! x86_64: where things go in guest memory, the zero page, and the boot vCPU state.

pub mod boot;
pub mod cpu;
pub mod layout;
pub mod mptable;

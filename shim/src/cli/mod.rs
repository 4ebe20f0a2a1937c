//! Command-line front ends.

pub mod do_cmd;
pub(crate) mod monitor;
pub mod runc;
mod stdio;

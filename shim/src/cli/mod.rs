//! Command-line front ends.

pub mod do_cmd;
mod stdio;

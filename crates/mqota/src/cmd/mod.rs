//! The subcommands, one module each.
pub mod flash;
pub mod image;
pub mod partitions;
pub mod sim;

//! The subcommands, one module each.
pub mod access;
pub mod ca;
pub mod demo;
pub mod deploy;
pub mod flash;
pub mod fleet;
pub mod image;
pub mod keys;
pub mod logs;
pub mod partitions;
pub mod serve;
pub mod settings;
pub mod sim;
pub mod term;
pub mod users;

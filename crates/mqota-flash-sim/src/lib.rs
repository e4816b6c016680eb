#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod bootloader;
mod cells;
pub mod nor;
pub mod sweep;

pub use bootloader::{BootConfig, BootError, BootOutcome, Booted, Bootloader};
pub use nor::{FileStore, Memory, RawMut, SimError, SimFlash, SingleWrite, Stats, Timing};

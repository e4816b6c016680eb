#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod nor;

pub use nor::{FileStore, Memory, SimError, SimFlash, Stats, Timing};

#![doc = include_str!("../README.md")]
#![no_std]
#![deny(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

#[macro_use]
mod fmt;

pub mod backoff;
pub mod bootguard;
pub mod broker_url;
pub mod engine;
pub mod fetch;
pub mod image;
pub mod journal;
pub mod layout;
#[cfg(feature = "mock-flash")]
pub mod mock_flash;
pub mod otadata;
pub mod partition;
pub mod protocol;
pub mod signature;
pub mod version;

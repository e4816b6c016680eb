#![doc = include_str!("../README.md")]
#![no_std]
#![deny(missing_docs)]

pub mod config;
pub mod flash;
pub mod platform;
pub mod watchdog;
pub mod wifi;

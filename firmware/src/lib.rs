#![doc = include_str!("../README.md")]
#![no_std]
#![deny(missing_docs)]

#[cfg(not(any(
    feature = "esp32c3",
    feature = "esp32c6",
    feature = "esp32",
    feature = "esp32s3"
)))]
compile_error!("enable one chip feature: esp32c3, esp32c6, esp32 or esp32s3");

#[cfg(any(
    all(
        feature = "esp32c3",
        any(feature = "esp32c6", feature = "esp32", feature = "esp32s3")
    ),
    all(feature = "esp32c6", any(feature = "esp32", feature = "esp32s3")),
    all(feature = "esp32", feature = "esp32s3"),
))]
compile_error!("the chip features exclude each other: enable exactly one");

pub mod config;
pub mod device;
pub mod flash;
pub mod link;
pub mod platform;
pub mod watchdog;
pub mod wifi;

pub use device::{boot_guard, run, spawn, task, GuardSetupError, Guarded};

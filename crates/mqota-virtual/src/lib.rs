//! The virtual device: mqota's device runtime running on the host.
//!
//! For now only the network adapter that lets the `no_std` runtime talk
//! through tokio, and (feature `testing`) helpers that start real peers for
//! tests.
#![deny(missing_docs)]

pub mod net;
#[cfg(feature = "testing")]
pub mod testing;

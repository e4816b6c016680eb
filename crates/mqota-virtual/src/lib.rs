//! The virtual device: mqota's device runtime running on the host.
//!
//! [`device`] runs one virtual device (see its docs); [`fleet`] runs many on
//! a thread of their own; [`net`] is the network
//! adapter that lets the `no_std` runtime talk through tokio; with the
//! `testing` feature, [`testing`] starts real peers (Mosquitto, an HTTP
//! server) for tests.
#![deny(missing_docs)]

// The devices' clock and timers: embassy-time's driver on the host.
use mqota_host_time as _;

pub mod device;
pub mod fleet;
pub mod net;
#[cfg(feature = "testing")]
pub mod testing;

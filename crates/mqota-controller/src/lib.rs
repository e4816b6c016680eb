#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod access;
pub mod accounts;
pub mod broker;
pub mod ca;
pub mod catalogue;
pub mod dashboard;
pub mod fleet;
pub mod homeassistant;
pub mod http;
pub mod lease;
pub mod logs;
pub mod machine;
pub mod remote;
pub mod rollout;
pub mod server;
pub mod signer;
pub mod store;
pub mod tls;
pub mod url;

/// Seconds since the Unix epoch, the timestamps kept in the store.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

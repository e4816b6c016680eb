#![doc = include_str!("../README.md")]
#![no_std]
#![deny(missing_docs)]

#[cfg(test)]
extern crate std;
// The unit tests' clock: embassy-time's driver on the host.
#[cfg(test)]
use mqota_host_time as _;

#[macro_use]
mod fmt;

mod conn;
pub mod device;
pub mod fieldlog;
pub mod http;
pub mod mqtt;
pub mod net;
pub mod platform;
pub mod tls;
pub mod trust;

pub use conn::MQTT_TX_BUFFER;
pub use device::{
    early_boot, early_boot_with_table, run, DeviceConfig, EarlyBootError, RunningFirmware,
    PROGRESS_QUEUE,
};
pub use fieldlog::{log, FieldLog, LogError, LogStore};
pub use http::{
    Abort, BodySink, ContentRange, DownloadError, Downloader, RedirectError, ResponseInfo,
    BODY_CHUNK, HTTP_RX_BUFFER, MAX_REDIRECTS,
};
/// Retry pacing lives in the core, shared with the update engine.
pub use mqota_core::backoff::{self, Backoff, Jitter, XorShift32};
/// Levels and boot reasons of the field log, from the core's protocol.
pub use mqota_core::protocol::{BootReason, LogLevel};
pub use mqtt::{
    Connected, Delivery, Message, MqttBuffers, MqttConfig, MqttError, MqttSession, QoS,
    INBOX_DEPTH, MAX_INCOMING_PAYLOAD, MAX_INFLIGHT, MAX_QOS1_PAYLOAD, MAX_SUBSCRIPTIONS,
    MAX_TOPIC_LEN, MQTT_RX_BUFFER,
};
pub use net::{ConnectError, Connector, NetConnector, NetStream, StreamError};
pub use platform::{Link, Platform};
pub use tls::{
    der_from_pem_or_der, CredentialError, TlsBuffers, TlsFailure, TlsIdentity, TlsSetup, TLS_RAM,
};

//! The MQTT protocol between mqota devices and the controller.
//!
//! Both ends compile this module: the device with `serde-json-core` (no
//! allocation, fixed buffers), the controller with `serde_json` on the very
//! same types, so a field name or a phase spelled here is spelled the same
//! everywhere. `docs/PROTOCOL.md` is the prose version with examples.
//!
//! # Topics
//!
//! `prefix` is configurable and defaults to [`DEFAULT_PREFIX`]; `id` is the
//! device id.
//!
//! | topic | direction | QoS | retained | payload |
//! |---|---|---|---|---|
//! | `{prefix}/ota/start` | controller → every device | 1 | no | command ([`parse_command`]) |
//! | `{prefix}/{id}/ota/start` | controller → one device | 1 | no | command |
//! | `{prefix}/{id}/ota/cancel` | controller → one device | 1 | no | empty or `{"job": ...}` |
//! | `{prefix}/{id}/ota/rollback` | controller → one device | 1 | no | empty or `{"job": ...}` |
//! | `{prefix}/{id}/progress` | device → controller | 0 | no | [`Progress`] |
//! | `{prefix}/progress` | devices → old tooling | 0 | no | a copy of each [`Progress`] (switchable off) |
//! | `{prefix}/{id}/status` | device → controller | 1 | yes | [`Status`]: the device's last real state |
//! | `{prefix}/{id}/availability` | device → controller | 1 | yes | [`ONLINE`] / [`OFFLINE`]; the MQTT will is `offline` |
//! | `{prefix}/{id}/logs/get` | controller → one device | 1 | no | [`LogsGet`] |
//! | `{prefix}/{id}/logs` | device → controller | 0 | no | [`LogsChunk`]s answering a `logs/get` |
//!
//! # Bounds
//!
//! Every string a device keeps has a fixed capacity; the constants below are
//! the contract. A command that exceeds one is refused with
//! [`ErrorCode::BadCommand`] rather than truncated, because a truncated URL or
//! job id would silently name something else.

mod command;
pub mod envelope;
mod events;
mod logs;
mod topics;

pub use command::{
    parse_command, parse_signed_command, BadCommand, Command, CommandOutcome, Job, JobId,
};
pub use events::{
    truncated, EncodeError, ErrorCode, LastResult, Phase, Progress, Status, UnknownName,
    MAX_PROGRESS_JSON, MAX_STATUS_JSON,
};
pub use logs::{
    BootReason, LogLevel, LogRecord, LogsChunk, LogsGet, DEFAULT_LOGS_MAX, LOGS_PER_CHUNK,
    MAX_LOGS_CHUNK_JSON, MAX_LOGS_PER_GET, MAX_LOGS_REQUEST_ID, MAX_LOG_MSG,
};
pub use topics::{parse_device_topic, DeviceTopic, TopicError, TopicKind, Topics, OFFLINE, ONLINE};

/// Topic prefix used when the configuration names none.
pub const DEFAULT_PREFIX: &str = "device";
/// Largest command payload accepted, in bytes; larger ones are refused unread.
pub const MAX_COMMAND_LEN: usize = 1024;
/// Longest firmware URL, in bytes.
pub const MAX_URL_LEN: usize = 256;
/// Longest job id, in bytes.
pub const MAX_JOB_ID_LEN: usize = 40;
/// Longest version string in a command, in bytes.
pub const MAX_VERSION_LEN: usize = 32;
/// Longest device id, in bytes.
pub const MAX_DEVICE_ID_LEN: usize = 32;
/// Longest topic this module builds, in bytes.
pub const MAX_TOPIC_LEN: usize = 128;
/// Longest topic prefix: what is left of [`MAX_TOPIC_LEN`] after the longest
/// per-device suffix, `/{id}/ota/rollback` with a [`MAX_DEVICE_ID_LEN`] id.
pub const MAX_PREFIX_LEN: usize = MAX_TOPIC_LEN - 1 - MAX_DEVICE_ID_LEN - "/ota/rollback".len();
/// Most device ids a command's `devices` list may name.
pub const MAX_DEVICES: usize = 64;
/// Largest firmware size a command may announce: 16 MiB, the largest flash
/// chip of the ESP32 family, so anything bigger cannot be an app image.
pub const MAX_FIRMWARE_SIZE: u32 = 16 * 1024 * 1024;
/// Longest free-text `message` in a progress event, in bytes.
pub const MAX_MESSAGE_LEN: usize = 96;

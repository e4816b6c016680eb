//! The device log over MQTT: the records a device keeps in its `log`
//! partition, the request that asks for them (`{prefix}/{id}/logs/get`) and
//! the chunks that answer it (`{prefix}/{id}/logs`).
//!
//! Records are numbered by the device, one number after another across
//! boots, so a reader asks "everything from record `since` on" and can tell
//! from the numbers which records the ring has already overwritten. Each
//! answer is cut into chunks of at most [`LOGS_PER_CHUNK`] records, numbered
//! by `seq` from 0, the final one marked `last`, so a reader can tell when a
//! chunk (sent at QoS 0, like progress) went missing.

use core::fmt;

use heapless::{String, Vec};
use serde::{Deserialize, Serialize};

use super::events::{json_str, name, U32_DIGITS};
use super::MAX_DEVICE_ID_LEN;

/// Longest message of one log record, in bytes; longer ones are cut at a
/// character boundary.
pub const MAX_LOG_MSG: usize = 64;
/// Records in one `{prefix}/{id}/logs` chunk at most.
pub const LOGS_PER_CHUNK: usize = 8;
/// Records one request returns when it names no `max`.
pub const DEFAULT_LOGS_MAX: u16 = 64;
/// Records one request returns at most, whatever its `max`.
pub const MAX_LOGS_PER_GET: u16 = 512;
/// Longest request id echoed in the answer, in bytes.
pub const MAX_LOGS_REQUEST_ID: usize = 16;

/// How bad a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[serde(rename_all = "snake_case")]
pub enum LogLevel {
    /// Something failed.
    Error,
    /// Something went wrong but the device carried on.
    Warn,
    /// Worth knowing.
    Info,
    /// Detail.
    Debug,
}

impl LogLevel {
    /// Every level, worst first.
    pub const ALL: [LogLevel; 4] = [
        LogLevel::Error,
        LogLevel::Warn,
        LogLevel::Info,
        LogLevel::Debug,
    ];

    /// The name used on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
        }
    }

    /// The level's one-byte code in a stored record.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// The level of a stored code; unknown codes read as `Debug`.
    pub const fn from_code(code: u8) -> Self {
        match code {
            0 => LogLevel::Error,
            1 => LogLevel::Warn,
            2 => LogLevel::Info,
            _ => LogLevel::Debug,
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the running firmware started, as the chip (or the virtual device's
/// fault injection) reports it; carried in the status as `boot_reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[serde(rename_all = "snake_case")]
pub enum BootReason {
    /// Power was applied (or the chip was reset from its reset pin).
    PowerOn,
    /// The firmware restarted itself (an update, a rollback, a command).
    SoftwareReset,
    /// A watchdog reset the chip.
    Watchdog,
    /// The firmware panicked (or hit an exception) and was reset.
    Panic,
    /// The supply voltage dropped too low.
    Brownout,
    /// Woke from deep sleep.
    DeepSleep,
    /// The chip gave a reason this version does not name.
    Unknown,
}

impl BootReason {
    /// Every reason.
    pub const ALL: [BootReason; 7] = [
        BootReason::PowerOn,
        BootReason::SoftwareReset,
        BootReason::Watchdog,
        BootReason::Panic,
        BootReason::Brownout,
        BootReason::DeepSleep,
        BootReason::Unknown,
    ];

    /// The name used on the wire and in the log.
    pub const fn as_str(self) -> &'static str {
        match self {
            BootReason::PowerOn => "power_on",
            BootReason::SoftwareReset => "software_reset",
            BootReason::Watchdog => "watchdog",
            BootReason::Panic => "panic",
            BootReason::Brownout => "brownout",
            BootReason::DeepSleep => "deep_sleep",
            BootReason::Unknown => "unknown",
        }
    }
}

impl fmt::Display for BootReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One record of the device log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// The record's number: one more than the record before it, across boots.
    pub n: u32,
    /// The boot it was written in (the device counts its boots from 1).
    pub boot: u32,
    /// Milliseconds since that boot.
    pub ms: u32,
    /// How bad it is.
    pub level: LogLevel,
    /// What happened, one line.
    pub msg: String<MAX_LOG_MSG>,
}

/// A request for records, read from `{prefix}/{id}/logs/get`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LogsGet {
    /// Only records numbered `since` or later (default 0: the oldest kept).
    #[serde(default)]
    pub since: Option<u32>,
    /// Only records of boot `boot` or later.
    #[serde(default)]
    pub boot: Option<u32>,
    /// At most this many records, the oldest that match first (default
    /// [`DEFAULT_LOGS_MAX`], never more than [`MAX_LOGS_PER_GET`]).
    #[serde(default)]
    pub max: Option<u16>,
    /// Echoed in every chunk of the answer, so concurrent readers can tell
    /// their answers apart.
    #[serde(default)]
    pub id: Option<String<MAX_LOGS_REQUEST_ID>>,
}

impl LogsGet {
    /// Reads a request leniently: anything that is not a JSON object with
    /// these fields (empty, text, a field of the wrong type) is "everything,
    /// default count". Unknown fields are ignored.
    pub fn parse(payload: &[u8]) -> Self {
        serde_json_core::from_slice::<LogsGet>(payload)
            .map(|(g, _)| g)
            .unwrap_or_default()
    }

    /// How many records this request may return.
    pub fn limit(&self) -> u16 {
        self.max
            .unwrap_or(DEFAULT_LOGS_MAX)
            .clamp(1, MAX_LOGS_PER_GET)
    }

    /// Whether `r` is one the request asks for.
    pub fn wants(&self, r: &LogRecord) -> bool {
        r.n >= self.since.unwrap_or(0) && r.boot >= self.boot.unwrap_or(0)
    }
}

/// One chunk of an answer, published on `{prefix}/{id}/logs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsChunk {
    /// The publishing device.
    pub device: String<MAX_DEVICE_ID_LEN>,
    /// The request's `id`, if it had one.
    pub id: Option<String<MAX_LOGS_REQUEST_ID>>,
    /// This chunk's place in the answer, from 0.
    pub seq: u16,
    /// Whether this is the answer's final chunk.
    pub last: bool,
    /// The number of the newest record the device holds (`None`: none, or
    /// the log is unusable).
    pub newest: Option<u32>,
    /// The device's current boot number (absent from older devices).
    #[serde(default)]
    pub boot: Option<u32>,
    /// Milliseconds since the current boot when the chunk was sent (absent
    /// from older devices): with the time it arrived, a reader makes the
    /// current boot's record times absolute.
    #[serde(default)]
    pub uptime_ms: Option<u32>,
    /// The records, oldest first.
    pub records: Vec<LogRecord, LOGS_PER_CHUNK>,
}

impl LogsChunk {
    /// Writes the chunk as JSON into `buf`, returning the length. A buffer of
    /// [`MAX_LOGS_CHUNK_JSON`] bytes always suffices.
    pub fn to_json(&self, buf: &mut [u8]) -> Result<usize, super::EncodeError> {
        serde_json_core::to_slice(self, buf).map_err(|_| super::EncodeError::BufferTooSmall)
    }
}

const LEVEL_NAMES: [&str; LogLevel::ALL.len()] = {
    let mut names = [""; LogLevel::ALL.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = LogLevel::ALL[i].as_str();
        i += 1;
    }
    names
};

/// JSON length of the worst record.
const MAX_RECORD_JSON: usize = r#"{"n":,"boot":,"ms":,"level":,"msg":}"#.len()
    + 3 * U32_DIGITS
    + name(&LEVEL_NAMES)
    + json_str(MAX_LOG_MSG);

/// A buffer this long always holds [`LogsChunk::to_json`]'s output.
pub const MAX_LOGS_CHUNK_JSON: usize =
    r#"{"device":,"id":,"seq":,"last":,"newest":,"boot":,"uptime_ms":,"records":[]}"#.len()
        + json_str(MAX_DEVICE_ID_LEN)
        + json_str(MAX_LOGS_REQUEST_ID)
        + "65535".len()
        + "false".len()
        + U32_DIGITS
        + U32_DIGITS
        + U32_DIGITS
        + LOGS_PER_CHUNK * MAX_RECORD_JSON
        + (LOGS_PER_CHUNK - 1);

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    fn full<const N: usize>(c: char) -> String<N> {
        let mut s = String::new();
        while s.push(c).is_ok() {}
        s
    }

    #[test]
    fn max_logs_chunk_json_is_exactly_the_worst_case() {
        let mut records = Vec::new();
        for _ in 0..LOGS_PER_CHUNK {
            records
                .push(LogRecord {
                    n: u32::MAX,
                    boot: u32::MAX,
                    ms: u32::MAX,
                    level: LogLevel::Error,
                    msg: full('\u{1}'),
                })
                .unwrap();
        }
        let chunk = LogsChunk {
            device: full('\u{2}'),
            id: Some(full('\u{3}')),
            seq: u16::MAX,
            last: false,
            newest: Some(u32::MAX),
            boot: Some(u32::MAX),
            uptime_ms: Some(u32::MAX),
            records,
        };
        let mut buf = std::vec![0u8; MAX_LOGS_CHUNK_JSON];
        let n = chunk.to_json(&mut buf).unwrap();
        assert_eq!(n, MAX_LOGS_CHUNK_JSON);
        let back: LogsChunk = serde_json::from_slice(&buf[..n]).unwrap();
        assert_eq!(back, chunk);
        const { assert!(MAX_LOGS_CHUNK_JSON <= 4096, "a chunk is a few KiB at most") };
    }

    #[test]
    fn a_request_is_read_leniently() {
        assert_eq!(LogsGet::parse(b""), LogsGet::default());
        assert_eq!(LogsGet::parse(b"please"), LogsGet::default());
        assert_eq!(LogsGet::parse(br#"{"since":"x"}"#), LogsGet::default());
        let g = LogsGet::parse(br#"{"since":5,"boot":2,"max":9000,"id":"r1","x":[1]}"#);
        assert_eq!(g.since, Some(5));
        assert_eq!(g.boot, Some(2));
        assert_eq!(g.limit(), MAX_LOGS_PER_GET);
        assert_eq!(g.id.as_deref(), Some("r1"));
        assert_eq!(LogsGet::default().limit(), DEFAULT_LOGS_MAX);
        assert_eq!(LogsGet::parse(br#"{"max":0}"#).limit(), 1);
    }

    #[test]
    fn wire_names_match_serde() {
        for l in LogLevel::ALL {
            assert_eq!(
                serde_json::to_string(&l).unwrap(),
                std::format!("\"{}\"", l.as_str())
            );
            assert_eq!(LogLevel::from_code(l.code()), l);
        }
        for r in BootReason::ALL {
            assert_eq!(
                serde_json::to_string(&r).unwrap(),
                std::format!("\"{}\"", r.as_str())
            );
        }
    }
}

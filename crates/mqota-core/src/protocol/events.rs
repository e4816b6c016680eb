//! What devices publish: progress events, the retained status, and the
//! vocabulary they share (phases and error codes).
//!
//! Optional fields (`job`, `total`, `error`, `message`, `slot`, `last`) are
//! always written, as `null` when unknown, so a reader sees every field on
//! every event; readers (the derived `Deserialize`) also accept them missing.

use core::fmt;
use core::str::FromStr;

use heapless::String;
use serde::{Deserialize, Serialize};

use super::{BootReason, JobId, MAX_DEVICE_ID_LEN, MAX_JOB_ID_LEN, MAX_MESSAGE_LEN};

/// Where an update stands, as published in [`Progress::phase`].
///
/// A successful update goes `accepted → downloading (many) → verifying →
/// rebooting`, and after the reboot the new firmware publishes `confirming →
/// done`. The [terminal](Phase::is_terminal) phases end a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The command was read and the update starts.
    Accepted,
    /// Firmware bytes are arriving and being written; repeated as they come.
    Downloading,
    /// The whole image is written and is being checked.
    Verifying,
    /// The image is good and the new slot is selected; the device restarts.
    Rebooting,
    /// The new firmware is running on trial and checking its health.
    Confirming,
    /// The new firmware confirmed itself. Terminal.
    Done,
    /// The update stopped; [`Progress::error`] says why. Terminal.
    Failed,
    /// The new firmware was abandoned and the previous one runs again, or a
    /// rollback command was carried out. Terminal.
    RolledBack,
    /// A cancel command stopped the update. Terminal.
    Cancelled,
}

impl Phase {
    /// Every phase, in the order of a successful update, then the other
    /// endings.
    pub const ALL: [Phase; 9] = [
        Phase::Accepted,
        Phase::Downloading,
        Phase::Verifying,
        Phase::Rebooting,
        Phase::Confirming,
        Phase::Done,
        Phase::Failed,
        Phase::RolledBack,
        Phase::Cancelled,
    ];

    /// The name on the wire, in logs and on the dashboard.
    pub const fn as_str(self) -> &'static str {
        match self {
            Phase::Accepted => "accepted",
            Phase::Downloading => "downloading",
            Phase::Verifying => "verifying",
            Phase::Rebooting => "rebooting",
            Phase::Confirming => "confirming",
            Phase::Done => "done",
            Phase::Failed => "failed",
            Phase::RolledBack => "rolled_back",
            Phase::Cancelled => "cancelled",
        }
    }

    /// Whether the job is over: `done`, `failed`, `rolled_back`, `cancelled`.
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            Phase::Done | Phase::Failed | Phase::RolledBack | Phase::Cancelled
        )
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no [`Phase`] or [`ErrorCode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct UnknownName;

impl fmt::Display for UnknownName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("unknown name")
    }
}

#[cfg(feature = "std")]
impl std::error::Error for UnknownName {}

impl FromStr for Phase {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Phase::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or(UnknownName)
    }
}

/// Why a job ended badly, as published in [`Progress::error`] and
/// [`LastResult::error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// A command payload could not be read or breaks a documented bound; the
    /// message names what is wrong. Sent with `failed` instead of starting;
    /// whatever the device was doing carries on.
    BadCommand,
    /// A start or rollback command arrived while an update is in flight. The
    /// running update carries on; the new command is dropped.
    Busy,
    /// The firmware server answered with a status other than 200 (or 206 for
    /// a resumed range request); the message carries the status.
    HttpStatus,
    /// DNS, connecting, or reading from the firmware server failed, or the
    /// connection closed before the image was complete, after any retries.
    Network,
    /// The job did not finish within its `timeout_s` (or the device's
    /// default), or the server sent nothing for too long.
    Timeout,
    /// The image does not fit the OTA slot: announced by `size` or
    /// `Content-Length`, or found while streaming. Nothing was booted.
    TooLarge,
    /// The number of bytes received differs from the command's `size` or the
    /// server's `Content-Length`.
    SizeMismatch,
    /// The bytes are not a valid ESP-IDF app image: wrong magic byte, broken
    /// segment table, checksum or appended SHA-256 wrong.
    BadImage,
    /// The image header names another chip than the one the device runs on.
    WrongChip,
    /// The SHA-256 of the image differs from the command's `sha256`.
    HashMismatch,
    /// Erasing, writing or reading back the OTA slot, or writing the OTA data
    /// partition, failed.
    Flash,
    /// The new firmware booted but did not pass its health check (for
    /// example, never reached the broker) within the trial; the device went
    /// back to the previous firmware, which reports it with `rolled_back`.
    HealthCheckFailed,
    /// The new firmware never got far enough to run its health check (it
    /// crashed or reset during the trial, or the bootloader refused it); the
    /// previous firmware runs again and reports it with `rolled_back`.
    BootFailed,
    /// A cancel command stopped the update; sent with phase `cancelled`.
    Cancelled,
    /// A rollback command arrived but the other slot holds no valid image
    /// (never written, erased, or marked invalid); nothing changed.
    NoPreviousImage,
    /// A start command names a job this device already finished (the
    /// journal or this boot remembers it): a replayed or repeated command.
    /// Nothing else happens; to run the same image again, send a new job id.
    DuplicateJob,
    /// A signature check failed: the image carries no block from a trusted
    /// key or its signature does not verify, or (on a device with a job key)
    /// the command is unsigned, its signature does not verify, or it is
    /// signed for another device or topic. Nothing was installed.
    BadSignature,
    /// The image is older than what the device may run: its `secure_version`
    /// is below the device's floor (never overridable), or its version is
    /// lower than the running one (unless the job sets `allow_downgrade`);
    /// or a rollback would boot an image below the floor.
    Downgrade,
    /// The image belongs to another `project_name` than the running firmware
    /// (unless the job sets `allow_other_project`).
    WrongProject,
    /// A signed command whose sequence number is not above the last one this
    /// device accepted: a recorded command played again. Nothing happened.
    Replayed,
}

impl ErrorCode {
    /// Every error code.
    pub const ALL: [ErrorCode; 20] = [
        ErrorCode::BadCommand,
        ErrorCode::Busy,
        ErrorCode::HttpStatus,
        ErrorCode::Network,
        ErrorCode::Timeout,
        ErrorCode::TooLarge,
        ErrorCode::SizeMismatch,
        ErrorCode::BadImage,
        ErrorCode::WrongChip,
        ErrorCode::HashMismatch,
        ErrorCode::Flash,
        ErrorCode::HealthCheckFailed,
        ErrorCode::BootFailed,
        ErrorCode::Cancelled,
        ErrorCode::NoPreviousImage,
        ErrorCode::DuplicateJob,
        ErrorCode::BadSignature,
        ErrorCode::Downgrade,
        ErrorCode::WrongProject,
        ErrorCode::Replayed,
    ];

    /// The name on the wire, in logs and on the dashboard.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadCommand => "bad_command",
            ErrorCode::Busy => "busy",
            ErrorCode::HttpStatus => "http_status",
            ErrorCode::Network => "network",
            ErrorCode::Timeout => "timeout",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::SizeMismatch => "size_mismatch",
            ErrorCode::BadImage => "bad_image",
            ErrorCode::WrongChip => "wrong_chip",
            ErrorCode::HashMismatch => "hash_mismatch",
            ErrorCode::Flash => "flash",
            ErrorCode::HealthCheckFailed => "health_check_failed",
            ErrorCode::BootFailed => "boot_failed",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::NoPreviousImage => "no_previous_image",
            ErrorCode::DuplicateJob => "duplicate_job",
            ErrorCode::BadSignature => "bad_signature",
            ErrorCode::Downgrade => "downgrade",
            ErrorCode::WrongProject => "wrong_project",
            ErrorCode::Replayed => "replayed",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ErrorCode {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ErrorCode::ALL
            .into_iter()
            .find(|e| e.as_str() == s)
            .ok_or(UnknownName)
    }
}

/// A progress event, published (QoS 0, not retained) on `{prefix}/progress`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The publishing device.
    pub device: String<MAX_DEVICE_ID_LEN>,
    /// The command's `job`, if it had one.
    pub job: Option<JobId>,
    /// Where the update stands.
    pub phase: Phase,
    /// Firmware bytes received so far.
    pub bytes: u32,
    /// Size of the image, once known (command `size`, or `Content-Length`).
    pub total: Option<u32>,
    /// `bytes` as a percentage of `total`, 0 while `total` is unknown.
    pub percent: u8,
    /// Why, for `failed`, `rolled_back` and `cancelled`.
    pub error: Option<ErrorCode>,
    /// One line for a human, e.g. the HTTP status or what a bad command got
    /// wrong.
    pub message: Option<String<MAX_MESSAGE_LEN>>,
}

/// Copies as much of `s` as fits into a fixed-capacity string, cutting at a
/// character boundary: for device ids, versions and messages that go into
/// protocol payloads.
pub fn truncated<const N: usize>(s: &str) -> String<N> {
    let mut end = s.len().min(N);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::new();
    // Cannot fail: `end <= N`.
    let _ = out.push_str(&s[..end]);
    out
}

impl Progress {
    /// An event of `phase` for device `device_id`, with no bytes, error or
    /// message yet.
    pub fn new(device_id: &str, job: Option<JobId>, phase: Phase) -> Self {
        Progress {
            device: truncated(device_id),
            job,
            phase,
            bytes: 0,
            total: None,
            percent: 0,
            error: None,
            message: None,
        }
    }

    /// Sets `bytes` and `total`, and `percent` from them (capped at 100).
    pub fn with_bytes(mut self, bytes: u32, total: Option<u32>) -> Self {
        self.bytes = bytes;
        self.total = total;
        self.percent = match total {
            Some(t) if t > 0 => (u64::from(bytes) * 100 / u64::from(t)).min(100) as u8,
            _ => 0,
        };
        self
    }

    /// Sets `error` and `message`; a message longer than
    /// [`MAX_MESSAGE_LEN`] is cut at a character boundary.
    pub fn with_error(mut self, error: ErrorCode, message: Option<&str>) -> Self {
        self.error = Some(error);
        self.message = message.map(truncated);
        self
    }

    /// Writes the event as JSON into `buf`, returning the length. A buffer of
    /// [`MAX_PROGRESS_JSON`] bytes always suffices.
    pub fn to_json(&self, buf: &mut [u8]) -> Result<usize, EncodeError> {
        serde_json_core::to_slice(self, buf).map_err(|_| EncodeError::BufferTooSmall)
    }
}

/// The device's retained status, published (QoS 1, retained) on
/// `{prefix}/{id}/status`: the last real state of the device. Whether it is
/// connected is a topic of its own, `{prefix}/{id}/availability`, which also
/// carries the MQTT will, so a will never overwrites this document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The publishing device.
    pub device: String<MAX_DEVICE_ID_LEN>,
    /// Chip name, e.g. `esp32c3`.
    pub chip: String<16>,
    /// `project_name` of the running image's `esp_app_desc_t`.
    pub project: String<32>,
    /// `version` of the running image's `esp_app_desc_t`.
    pub version: String<32>,
    /// The OTA slot running (0 for `ota_0`), `None` when booted from factory.
    pub slot: Option<u8>,
    /// The OTA data state of the running image: `valid`, `pending_verify`,
    /// `new`, `undefined`, ...
    pub state: String<16>,
    /// How the most recent job ended, if the device remembers one.
    pub last: Option<LastResult>,
    /// Whether the device can fetch `https://` firmware URLs (it was built
    /// with TLS). Devices that predate the field do not send it: read as
    /// `false`, and a controller offers them only `http://` URLs.
    #[serde(default)]
    pub https: bool,
    /// Why the running firmware started (`power_on`, `software_reset`,
    /// `watchdog`, `panic`, ...). Absent in the status of older devices.
    #[serde(default)]
    pub boot_reason: Option<BootReason>,
    /// The number of the newest record in the device log when the status
    /// was published (`None`: no record, or no usable log). Absent in the
    /// status of older devices.
    #[serde(default)]
    pub log_newest: Option<u32>,
    /// Whether the device activates only images signed by a key it trusts
    /// (Secure Boot V2 signature blocks; it refuses others with
    /// `bad_signature`). `false`: it was built without trusted keys and
    /// takes unsigned images. Devices that predate the field read as `false`.
    #[serde(default)]
    pub signed_only: bool,
    /// `secure_version` of the running image's `esp_app_desc_t`: the
    /// device refuses images below it (`downgrade`). Absent (0) in the
    /// status of older devices.
    #[serde(default)]
    pub secure_version: u32,
    /// Whether the device takes only commands signed by its job key
    /// (refusing others with `bad_signature`). Older devices read as `false`.
    #[serde(default)]
    pub signed_jobs: bool,
    /// The highest sequence number of a signed command the device accepted
    /// (it refuses any not above it with `replayed`); `None` before the first.
    #[serde(default)]
    pub job_seq: Option<u64>,
}

/// How the most recent job ended, as kept in [`Status::last`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastResult {
    /// The job's id, if it had one.
    pub job: Option<JobId>,
    /// Its terminal phase.
    pub result: Phase,
    /// Why it ended badly, if it did.
    pub error: Option<ErrorCode>,
}

impl Status {
    /// Writes the status as JSON into `buf`, returning the length. A buffer
    /// of [`MAX_STATUS_JSON`] bytes always suffices.
    pub fn to_json(&self, buf: &mut [u8]) -> Result<usize, EncodeError> {
        serde_json_core::to_slice(self, buf).map_err(|_| EncodeError::BufferTooSmall)
    }
}

/// Why [`Progress::to_json`] or [`Status::to_json`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum EncodeError {
    /// The buffer is too small: pass one of [`MAX_PROGRESS_JSON`] or
    /// [`MAX_STATUS_JSON`] bytes, which always suffice.
    BufferTooSmall,
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JSON buffer too small")
    }
}

#[cfg(feature = "std")]
impl std::error::Error for EncodeError {}

/// Worst-case JSON length of a string field of `n` bytes: quotes, and every
/// byte a control character written as `\u00XX`.
pub(super) const fn json_str(n: usize) -> usize {
    2 + 6 * n
}

/// JSON length of the longest of `names` (which need no escaping), quoted.
pub(super) const fn name(names: &[&str]) -> usize {
    2 + longest(names)
}

const fn longest(names: &[&str]) -> usize {
    let mut max = 0;
    let mut i = 0;
    while i < names.len() {
        if names[i].len() > max {
            max = names[i].len();
        }
        i += 1;
    }
    max
}

const PHASE_NAMES: [&str; Phase::ALL.len()] = {
    let mut names = [""; Phase::ALL.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = Phase::ALL[i].as_str();
        i += 1;
    }
    names
};

const ERROR_NAMES: [&str; ErrorCode::ALL.len()] = {
    let mut names = [""; ErrorCode::ALL.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = ErrorCode::ALL[i].as_str();
        i += 1;
    }
    names
};

/// Length of `"4294967295"`, the longest `u32`.
pub(super) const U32_DIGITS: usize = 10;

/// A buffer this long always holds [`Progress::to_json`]'s output.
pub const MAX_PROGRESS_JSON: usize =
    r#"{"device":,"job":,"phase":,"bytes":,"total":,"percent":,"error":,"message":}"#.len()
        + json_str(MAX_DEVICE_ID_LEN)
        + json_str(MAX_JOB_ID_LEN)
        + name(&PHASE_NAMES)
        + U32_DIGITS
        + U32_DIGITS
        + "100".len()
        + name(&ERROR_NAMES)
        + json_str(MAX_MESSAGE_LEN);

/// A buffer this long always holds [`Status::to_json`]'s output.
pub const MAX_STATUS_JSON: usize =
    r#"{"device":,"chip":,"project":,"version":,"slot":,"state":,"last":{"job":,"result":,"error":},"https":,"boot_reason":,"log_newest":,"signed_only":,"secure_version":,"signed_jobs":,"job_seq":}"#
        .len()
        + json_str(MAX_DEVICE_ID_LEN)
        + json_str(16)
        + json_str(32)
        + json_str(32)
        + "null".len()
        + json_str(16)
        + json_str(MAX_JOB_ID_LEN)
        + name(&PHASE_NAMES)
        + name(&ERROR_NAMES)
        + "false".len()
        + name(&BOOT_REASON_NAMES)
        + U32_DIGITS
        + "false".len()
        + U32_DIGITS
        + "false".len()
        + "18446744073709551615".len();

const BOOT_REASON_NAMES: [&str; BootReason::ALL.len()] = {
    let mut names = [""; BootReason::ALL.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = BootReason::ALL[i].as_str();
        i += 1;
    }
    names
};

#[cfg(test)]
mod tests {
    extern crate std;
    use crate::protocol::Topics;
    use std::string::String as StdString;
    use std::{format, vec};

    use super::*;

    fn s<const N: usize>(v: &str) -> String<N> {
        String::try_from(v).unwrap()
    }

    fn full<const N: usize>(c: char) -> String<N> {
        let mut out = String::new();
        while out.push(c).is_ok() {}
        out
    }

    fn sample_progress() -> Progress {
        Progress {
            device: s("c3-a1b2c3"),
            job: Some(s("job-7")),
            phase: Phase::Downloading,
            bytes: 65536,
            total: Some(262144),
            percent: 25,
            error: None,
            message: None,
        }
    }

    fn sample_status() -> Status {
        Status {
            device: s("c3-a1b2c3"),
            chip: s("esp32c3"),
            project: s("blinky"),
            version: s("1.2.0"),
            slot: Some(1),
            state: s("pending_verify"),
            last: Some(LastResult {
                job: Some(s("job-7")),
                result: Phase::RolledBack,
                error: Some(ErrorCode::HealthCheckFailed),
            }),
            https: false,
            boot_reason: Some(BootReason::Watchdog),
            log_newest: Some(41),
            signed_only: true,
            secure_version: 2,
            signed_jobs: true,
            job_seq: Some(1_765_000_000_000_000),
        }
    }

    #[test]
    fn names_on_the_wire_are_the_serde_names_and_parse_back() {
        for phase in Phase::ALL {
            assert_eq!(
                serde_json::to_string(&phase).unwrap(),
                format!("\"{}\"", phase.as_str())
            );
            assert_eq!(phase.as_str().parse::<Phase>(), Ok(phase));
        }
        for code in ErrorCode::ALL {
            assert_eq!(
                serde_json::to_string(&code).unwrap(),
                format!("\"{}\"", code.as_str())
            );
            assert_eq!(code.as_str().parse::<ErrorCode>(), Ok(code));
        }
        assert_eq!("rolledback".parse::<Phase>(), Err(UnknownName));
        assert_eq!("Busy".parse::<ErrorCode>(), Err(UnknownName));
    }

    #[test]
    fn only_done_failed_rolled_back_and_cancelled_end_a_job() {
        let terminal: vec::Vec<Phase> =
            Phase::ALL.into_iter().filter(|p| p.is_terminal()).collect();
        assert_eq!(
            terminal,
            [
                Phase::Done,
                Phase::Failed,
                Phase::RolledBack,
                Phase::Cancelled
            ]
        );
    }

    #[test]
    fn progress_writes_every_field_with_null_for_the_unknown() {
        let mut p = sample_progress();
        p.job = None;
        p.total = None;
        let mut buf = [0u8; MAX_PROGRESS_JSON];
        let n = p.to_json(&mut buf).unwrap();
        assert_eq!(
            core::str::from_utf8(&buf[..n]).unwrap(),
            r#"{"device":"c3-a1b2c3","job":null,"phase":"downloading","bytes":65536,"total":null,"percent":25,"error":null,"message":null}"#
        );
    }

    #[test]
    fn progress_written_by_the_device_reads_back_with_serde_json_and_the_other_way() {
        let mut p = sample_progress();
        p.phase = Phase::Failed;
        p.error = Some(ErrorCode::HttpStatus);
        p.message = Some(s("HTTP 404 \"Not Found\"\n"));
        let mut buf = [0u8; MAX_PROGRESS_JSON];
        let n = p.to_json(&mut buf).unwrap();
        let back: Progress = serde_json::from_slice(&buf[..n]).unwrap();
        assert_eq!(back, p);

        let text = serde_json::to_string(&p).unwrap();
        let mut unescape = [0u8; MAX_MESSAGE_LEN];
        let (again, _) =
            serde_json_core::from_str_escaped::<Progress>(&text, &mut unescape).unwrap();
        assert_eq!(again, p);
    }

    #[test]
    fn a_reader_accepts_progress_with_the_optional_fields_left_out() {
        let p: Progress =
            serde_json::from_str(r#"{"device":"d","phase":"accepted","bytes":0,"percent":0}"#)
                .unwrap();
        assert_eq!(p.job, None);
        assert_eq!(p.total, None);
        assert_eq!(p.error, None);
        assert_eq!(p.message, None);
        assert_eq!(p.phase, Phase::Accepted);
    }

    #[test]
    fn status_round_trips_through_both_json_libraries() {
        for status in [
            sample_status(),
            Status {
                slot: None,
                last: None,
                boot_reason: None,
                log_newest: None,
                ..sample_status()
            },
        ] {
            let mut buf = [0u8; MAX_STATUS_JSON];
            let n = status.to_json(&mut buf).unwrap();
            let back: Status = serde_json::from_slice(&buf[..n]).unwrap();
            assert_eq!(back, status);
            let text = serde_json::to_string(&status).unwrap();
            let (again, _) = serde_json_core::from_str::<Status>(&text).unwrap();
            assert_eq!(again, status);
        }
        let mut buf = [0u8; MAX_STATUS_JSON];
        let n = sample_status().to_json(&mut buf).unwrap();
        assert_eq!(
            core::str::from_utf8(&buf[..n]).unwrap(),
            r#"{"device":"c3-a1b2c3","chip":"esp32c3","project":"blinky","version":"1.2.0","slot":1,"state":"pending_verify","last":{"job":"job-7","result":"rolled_back","error":"health_check_failed"},"https":false,"boot_reason":"watchdog","log_newest":41,"signed_only":true,"secure_version":2,"signed_jobs":true,"job_seq":1765000000000000}"#
        );
    }

    #[test]
    fn a_status_without_https_reads_as_false() {
        let old = r#"{"device":"d","online":true,"chip":"esp32c3","project":"p","version":"1.0.0","slot":0,"state":"valid","last":null}"#;
        let status: Status = serde_json::from_str(old).unwrap();
        assert!(!status.https);
        assert!(!status.signed_only);
        let (status, _) = serde_json_core::from_str::<Status>(old).unwrap();
        assert!(!status.https);
        assert!(!status.signed_only);
        let with = old.replace("null}", r#"null,"https":true}"#);
        let (status, _) = serde_json_core::from_str::<Status>(&with).unwrap();
        assert!(status.https);
    }

    #[test]
    fn max_progress_json_is_exactly_the_worst_case() {
        // Control characters are the worst case: each byte becomes `\u00XX`.
        let p = Progress {
            device: full('\u{1}'),
            job: Some(full('\u{1f}')),
            phase: Phase::RolledBack,
            bytes: u32::MAX,
            total: Some(u32::MAX),
            percent: 100,
            error: Some(ErrorCode::HealthCheckFailed),
            message: Some(full('\u{0}')),
        };
        let mut buf = [0u8; MAX_PROGRESS_JSON];
        let n = p.to_json(&mut buf).unwrap();
        assert_eq!(n, MAX_PROGRESS_JSON);
        let back: Progress = serde_json::from_slice(&buf[..n]).unwrap();
        assert_eq!(back, p);
        assert_eq!(
            p.to_json(&mut [0u8; MAX_PROGRESS_JSON - 1]),
            Err(EncodeError::BufferTooSmall)
        );
    }

    #[test]
    fn max_status_json_is_exactly_the_worst_case() {
        let status = Status {
            device: full('\u{2}'),
            chip: full('\u{3}'),
            project: full('\u{4}'),
            version: full('\u{5}'),
            slot: None,
            state: full('\u{6}'),
            last: Some(LastResult {
                job: Some(full('\u{7}')),
                result: Phase::Downloading,
                error: Some(ErrorCode::HealthCheckFailed),
            }),
            https: false,
            boot_reason: Some(BootReason::SoftwareReset),
            log_newest: Some(u32::MAX),
            signed_only: false,
            secure_version: u32::MAX,
            signed_jobs: false,
            job_seq: Some(u64::MAX),
        };
        let mut buf = [0u8; MAX_STATUS_JSON];
        let n = status.to_json(&mut buf).unwrap();
        assert_eq!(n, MAX_STATUS_JSON);
        let back: Status = serde_json::from_slice(&buf[..n]).unwrap();
        assert_eq!(back, status);
    }

    #[test]
    fn percent_follows_bytes_over_total_and_is_zero_while_total_is_unknown() {
        let t = Topics::new("device", "d1").unwrap();
        let p = Progress::new(t.device_id(), None, Phase::Downloading);
        assert_eq!(p.clone().with_bytes(50, Some(200)).percent, 25);
        assert_eq!(p.clone().with_bytes(199, Some(200)).percent, 99);
        assert_eq!(p.clone().with_bytes(u32::MAX, Some(u32::MAX)).percent, 100);
        assert_eq!(p.clone().with_bytes(300, Some(200)).percent, 100);
        assert_eq!(p.clone().with_bytes(300, Some(0)).percent, 0);
        assert_eq!(p.with_bytes(300, None).percent, 0);
    }

    #[test]
    fn a_long_message_is_cut_at_a_character_boundary() {
        let t = Topics::new("device", "d1").unwrap();
        // 47 two-byte characters plus a three-byte one cross the 96-byte limit.
        let long: StdString = "é".repeat(47) + "€€";
        let p = Progress::new(t.device_id(), None, Phase::Failed)
            .with_error(ErrorCode::Network, Some(&long));
        let msg = p.message.unwrap();
        assert_eq!(msg.len(), 94);
        assert!(long.starts_with(msg.as_str()));
        assert_eq!(p.device, "d1");
    }
}

//! The device: the seed design's three parts — link control, the MQTT client
//! and the OTA handler — run as one loop over the core's engine and boot guard.
//!
//! The same code runs on the chip (embassy-net, esp-storage) and in the
//! virtual device (tokio sockets, the simulated flash). The board supplies
//! [`Platform`](crate::platform::Platform) and
//! [`Link`](crate::platform::Link); everything else is here or in
//! `mqota-core`.
//!
//! # One boot, front to back
//!
//! 1. [`early_boot`], before anything that could fail: read the partition
//!    table, describe the running image, run the boot guard. On
//!    [`Verdict::Reboot`](mqota_core::bootguard::Verdict::Reboot) the caller
//!    resets at once.
//! 2. [`run`]: bring up the link and the broker (the last will sets the
//!    retained `{prefix}/{id}/availability` to `offline`), subscribe to the
//!    command topics without retained replay, publish `online` and the
//!    retained status.
//! 3. On a trial boot: the health check — broker reached and topics
//!    subscribed within [`DeviceConfig::health_timeout`], then the platform's
//!    own hook. Pass: confirm, publish `confirming` and `done`. Fail: roll
//!    back and reboot; the old firmware reports `rolled_back`.
//! 4. Publish any outcome the boot guard found (once), resume an interrupted
//!    download, then serve commands.
//!
//! # A download and the broker at the same time
//!
//! While the body streams into the engine (and through it into flash), the
//! MQTT side keeps running in the same task: it publishes the progress the
//! engine produced (QoS 0, so a publish costs one socket write and never
//! waits for an ack), answers `busy` to other start and rollback commands,
//! keeps the session alive, and rejoins a broker that went away. A `cancel`
//! ends the download at once, even when the server is silent. Progress waits
//! in a bounded queue ([`PROGRESS_QUEUE`]); when it is full the oldest
//! `downloading` event is dropped, then the oldest refusal of another
//! command; the job's own phase changes never are.
//!
//! # Commands that must never run
//!
//! A command the broker delivers with the retain flag is dropped unread:
//! a retained rollback or start would otherwise run again on every
//! reconnect and every boot. The subscriptions already ask the broker not to
//! replay retained messages (MQTT 5 retain handling 2); the flag check is
//! for brokers that ignore the option. A start naming a job this device has
//! already finished is answered `duplicate_job` and nothing else
//! ([`mqota_core::engine::decide`] decides what every command means, idle or
//! downloading).//!
//! # Where the parts live
//!
//! | module | what |
//! |---|---|
//! | `boot` | [`early_boot`] and the trial of a new image |
//! | `run` | [`run`]: the loop over the broker and the engine |
//! | `download` | one fetch: the body into the engine beside the MQTT side; the progress queue |
//! | `command` | reading a command message (retained, signed, addressed) |
//! | `uplink` | the way to the broker: session, link and reconnect pacing as one value |

use embassy_time::{Duration, Instant};
use mqota_core::protocol::envelope::JobTrust;
use mqota_core::signature::TrustPolicy;

mod boot;
mod command;
mod download;
mod run;
mod uplink;

#[cfg(test)]
mod tests;

pub use boot::{early_boot, early_boot_with_table, EarlyBootError, RunningFirmware};
pub use download::PROGRESS_QUEUE;
pub use run::run;

/// What the board tells the runtime; [`DeviceConfig::new`] gives defaults.
///
/// The one place those defaults live: the firmware and the virtual device
/// start from [`DeviceConfig::new`] and override only what they were given.
///
/// Its `Debug` output shows whether a password is set, never the password.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceConfig<'a> {
    /// Broker host name or address.
    pub broker_host: &'a str,
    /// Broker port.
    pub broker_port: u16,
    /// Reach the broker over TLS (`mqtts://`); the connector given to
    /// [`run`] must then have TLS.
    pub broker_tls: bool,
    /// MQTT user name, if the broker wants a login.
    pub username: Option<&'a str>,
    /// MQTT password, if the broker wants a login.
    pub password: Option<&'a [u8]>,
    /// Topic prefix (`device` by default).
    pub prefix: &'a str,
    /// A trial boot must reach the broker and subscribe within this time.
    pub health_timeout: Duration,
    /// Overall deadline of an update unless the job sets `timeout_s`.
    pub update_timeout: Duration,
    /// A download that delivers nothing for this long is retried.
    pub stall_timeout: Duration,
    /// At most one `downloading` event per this interval.
    pub progress_interval: Duration,
    /// MQTT keep-alive in seconds.
    pub keep_alive_secs: u16,
    /// Seed for reconnect jitter (use something device-specific, e.g. the MAC).
    pub seed: u32,
    /// Also publish every progress event on the shared `{prefix}/progress`
    /// (besides `{prefix}/{id}/progress`), for tooling that listens there.
    pub progress_copy: bool,
    /// Which signing keys updates must carry; none: unsigned images are
    /// taken (and the status says `"signed_only": false`).
    pub trust: TrustPolicy,
    /// The key commands must be signed with; none: unsigned commands are
    /// taken (and the status says `"signed_jobs": false`).
    pub job_trust: Option<JobTrust>,
}

impl<'a> DeviceConfig<'a> {
    /// Defaults: prefix `device`, 60 s health check, 10 min update deadline,
    /// 15 s stall timeout, progress at most every 250 ms, keep-alive 30 s.
    /// A `const fn`, so build-time configuration can read the defaults.
    pub const fn new(broker_host: &'a str, broker_port: u16) -> Self {
        Self {
            broker_host,
            broker_port,
            broker_tls: false,
            username: None,
            password: None,
            prefix: mqota_core::protocol::DEFAULT_PREFIX,
            health_timeout: Duration::from_secs(60),
            update_timeout: Duration::from_secs(600),
            stall_timeout: Duration::from_secs(15),
            progress_interval: Duration::from_millis(250),
            keep_alive_secs: 30,
            seed: 0x6d71_6f74,
            progress_copy: true,
            trust: TrustPolicy::none(),
            job_trust: None,
        }
    }
}

impl core::fmt::Debug for DeviceConfig<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DeviceConfig")
            .field("broker_host", &self.broker_host)
            .field("broker_port", &self.broker_port)
            .field("broker_tls", &self.broker_tls)
            .field("username", &self.username)
            .field("password", &self.password.map(|_| "<redacted>"))
            .field("prefix", &self.prefix)
            .field("health_timeout", &self.health_timeout)
            .field("update_timeout", &self.update_timeout)
            .field("stall_timeout", &self.stall_timeout)
            .field("progress_interval", &self.progress_interval)
            .field("keep_alive_secs", &self.keep_alive_secs)
            .field("seed", &self.seed)
            .field("progress_copy", &self.progress_copy)
            .field("trust", &self.trust)
            .field("job_trust", &self.job_trust)
            .finish()
    }
}
fn now_ms() -> u64 {
    Instant::now().as_millis()
}

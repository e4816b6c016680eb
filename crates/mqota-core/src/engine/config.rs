//! What the engine is told once, when it is made: the device, the running
//! image, the deadlines, the retry pacing and the trust policy.

use super::Millis;
use crate::image::Chip;
use crate::protocol::{truncated, MAX_DEVICE_ID_LEN};
use crate::signature::TrustPolicy;
use heapless::String;

/// Tunables of the engine. [`EngineConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// This device's id, named in every progress event.
    pub device: String<MAX_DEVICE_ID_LEN>,
    /// The chip images must be built for.
    pub chip: Chip,
    /// Version of the running firmware (from its app descriptor).
    pub running_version: String<32>,
    /// Project name of the running firmware (from its app descriptor). An
    /// image of another project is refused (`wrong_project`) unless the job
    /// allows it; empty: no project check.
    pub running_project: String<32>,
    /// The lowest `secure_version` the device may run: images below it are
    /// refused (`downgrade`), whatever the job says. The runtime keeps it in
    /// flash and raises it when an image is confirmed.
    pub secure_floor: u32,
    /// Overall deadline of an update, unless the job sets `timeout_s`.
    pub timeout_ms: Millis,
    /// A fetch that delivers no bytes for this long is treated as a failed
    /// connection and retried.
    pub stall_timeout_ms: Millis,
    /// How many times a transient failure is retried before the job fails.
    pub max_retries: u8,
    /// Shortest retry delay. Each delay is drawn at random between this and
    /// three times the one before
    /// ([`Jitter::Decorrelated`](crate::backoff::Jitter::Decorrelated)),
    /// capped at [`EngineConfig::retry_max_ms`].
    pub retry_base_ms: Millis,
    /// Cap of the retry delay.
    pub retry_max_ms: Millis,
    /// Seed of the generator the retry jitter is drawn from. Give every
    /// device its own (the runtime uses its device seed), so a fleet whose
    /// server failed does not retry in lockstep.
    pub seed: u32,
    /// At most one `downloading` event per this many milliseconds (and at most
    /// one per whole percent). Phase changes are always sent.
    pub progress_interval_ms: Millis,
    /// Which signing keys the device trusts. With keys, an image is
    /// activated only if a block of its signature sector verifies
    /// ([`signature::check`](crate::signature::check)); otherwise the job
    /// fails with `bad_signature`.
    pub trust: TrustPolicy,
}

impl EngineConfig {
    /// Defaults: 10 minute deadline, 15 s stall timeout, 5 retries jittered
    /// between 1 s and 16 s, progress at most every 250 ms, a fixed seed.
    pub fn new(device: &str, chip: Chip, running_version: &str) -> Self {
        Self {
            device: truncated(device),
            chip,
            running_version: truncated(running_version),
            running_project: String::new(),
            secure_floor: 0,
            timeout_ms: 600_000,
            stall_timeout_ms: 15_000,
            max_retries: 5,
            retry_base_ms: 1_000,
            retry_max_ms: 16_000,
            seed: 0x6d71_6f74,
            progress_interval_ms: 250,
            trust: TrustPolicy::default(),
        }
    }
}

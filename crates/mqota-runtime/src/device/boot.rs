//! Boot and trial: what runs before the loop. [`early_boot`] reads the
//! partition table, describes the running image and runs the boot guard;
//! [`Device::trial`] decides whether a freshly installed image stays.

use embassy_time::{with_timeout, Duration, Instant};
use embedded_storage::nor_flash::{MultiwriteNorFlash, NorFlash};
use heapless::String;
use mqota_core::bootguard::{self, Boot, TrialResult};
use mqota_core::engine::{Engine, Layout};
use mqota_core::image::{self, Chip};
use mqota_core::partition::{PartitionTable, TABLE_OFFSET};
use mqota_core::protocol::{truncated, LogLevel, Phase, Progress};

use super::now_ms;
use super::run::Device;
use super::uplink::Uplink;
use crate::net::Connector;
use crate::platform::{Link, Platform};

/// The running firmware, as [`early_boot`] found it.
#[derive(Debug, Clone)]
pub struct RunningFirmware {
    /// Where the slots and otadata are, and which slot runs.
    pub layout: Layout,
    /// What the boot guard decided.
    pub boot: Boot,
    /// The chip the running image is built for.
    pub chip: Chip,
    /// Version of the running image (from its app descriptor).
    pub version: String<32>,
    /// Project name of the running image.
    pub project: String<32>,
    /// `secure_version` of the running image.
    pub secure_version: u32,
}

/// Why [`early_boot`] could not describe the running firmware. The device
/// cannot take updates; report it on the console and keep running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EarlyBootError {
    /// The partition table is missing or broken.
    PartitionTable,
    /// The table has no otadata or fewer than two OTA slots, or none at the
    /// running index.
    NoOtaLayout,
    /// The running slot does not hold a valid image (it is running, so the
    /// flash read failed or the slot lookup is wrong).
    RunningImage,
    /// The boot guard could not read or write flash.
    Guard,
}

/// Runs as early as possible at every boot: reads the partition table,
/// describes the running image and runs the boot guard. `running` is the
/// index of the OTA slot the bootloader started (`ota_0` is 0), as the chip
/// glue finds it. On [`Verdict::Reboot`](bootguard::Verdict::Reboot) reset at
/// once; otherwise hand the result to [`run`](super::run).
///
/// Glue that has already read the table (to find the booted slot) passes it
/// to [`early_boot_with_table`] instead, so the table is read once.
pub fn early_boot<F: NorFlash>(
    flash: &mut F,
    running: usize,
) -> Result<RunningFirmware, EarlyBootError> {
    let table = PartitionTable::read_from(flash, TABLE_OFFSET)
        .map_err(|_| EarlyBootError::PartitionTable)?;
    early_boot_with_table(flash, &table, running)
}

/// [`early_boot`] over a partition table the caller already read and parsed
/// (with [`PartitionTable::from_bytes`] or [`PartitionTable::read_from`]).
pub fn early_boot_with_table<F: NorFlash>(
    flash: &mut F,
    table: &PartitionTable,
    running: usize,
) -> Result<RunningFirmware, EarlyBootError> {
    let layout = Layout::from_table(table, running).ok_or(EarlyBootError::NoOtaLayout)?;
    let slot = layout.slots[running];
    let info = image::validate_flash(flash, slot.offset, slot.size)
        .map_err(|_| EarlyBootError::RunningImage)?;
    let boot = bootguard::on_boot(flash, &layout).map_err(|_| EarlyBootError::Guard)?;
    Ok(RunningFirmware {
        layout,
        boot,
        chip: info.chip,
        version: info.app.version.clone(),
        project: info.app.project_name.clone(),
        secure_version: info.app.secure_version,
    })
}

impl Device<'_> {
    /// The trial of a new image: reach the broker and subscribe within
    /// `health_timeout`, then the platform's hook in what time is left.
    /// Pass: the image is confirmed and `done` published. Fail: roll back and
    /// reboot (never returns); the old firmware reports `rolled_back`.
    pub(super) async fn trial<C, L, P, F>(
        &mut self,
        up: &mut Uplink<'_, '_, C, L>,
        platform: &mut P,
        flash: &mut F,
        engine: &mut Engine,
        booted: &RunningFirmware,
        health_timeout: Duration,
    ) where
        C: Connector,
        L: Link,
        P: Platform,
        F: MultiwriteNorFlash,
    {
        let job = booted.boot.trial_job.clone();
        let deadline = Instant::now() + health_timeout;
        let reached = with_timeout(health_timeout, self.bring_up(up, true))
            .await
            .unwrap_or(false);
        let mut healthy = reached;
        if reached {
            let mut confirming =
                Progress::new(self.topics.device_id(), job.clone(), Phase::Confirming);
            // The download reached 100 before the reboot; percent never goes down.
            confirming.percent = 100;
            self.publish(&mut up.session, confirming).await;
            let left = deadline.saturating_duration_since(Instant::now());
            healthy = with_timeout(left, platform.health_check())
                .await
                .unwrap_or(false);
        }
        match bootguard::end_trial(flash, &booted.layout, healthy) {
            Ok(TrialResult::Confirmed(report)) => {
                info!("trial passed: image confirmed");
                self.log
                    .note(now_ms(), LogLevel::Info, "trial passed: image confirmed");
                platform.confirmed();
                if self
                    .trust
                    .raise_floor(flash, booted.secure_version)
                    .await
                    .is_err()
                {
                    warn!("could not raise the secure_version floor");
                }
                engine.set_secure_floor(self.trust.floor());
                self.status.state = truncated("valid");
                self.report(&mut up.session, &report).await;
                let _ = bootguard::mark_reported(flash, &report);
            }
            Ok(TrialResult::RolledBack) => {
                warn!("trial failed: rolling back");
                let why = if reached {
                    "trial failed: health check failed, rolling back"
                } else {
                    "trial failed: broker not reached in time, rolling back"
                };
                self.log.note(now_ms(), LogLevel::Error, why);
                self.log.flush(flash, now_ms()).await;
                self.go_offline(&mut up.session).await;
                platform.reboot().await;
            }
            // The flash failed: the trial stays unfinished, and the next boot
            // treats it as one that died (rolled back, `boot_failed`).
            Err(_) => warn!("could not record the trial's verdict"),
        }
    }
}

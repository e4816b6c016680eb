//! Glues the chip's identity and reset to the device runtime's
//! [`mqota_runtime::Platform`]: the device id from the factory MAC in eFuse,
//! a software reset, the trial watchdog (disarmed when the
//! runtime confirms the image) and an optional application health check.

use core::fmt::Write as _;

use esp_hal::efuse::{self, InterfaceMacAddress};
use mqota_runtime::Platform;

use crate::{config::FirmwareConfig, watchdog::TrialWatchdog};

/// Longest device id: `mqota-` plus 12 hex digits fits, and so does any
/// `MQOTA_DEVICE_ID` up to this length (a longer one is cut).
pub const DEVICE_ID_MAX: usize = 32;

/// A device id, used as the MQTT client id and as a topic level.
pub type DeviceId = heapless::String<DEVICE_ID_MAX>;

/// The station MAC address, as burnt into eFuse at the factory.
pub fn station_mac() -> [u8; 6] {
    let mac = efuse::interface_mac_address(InterfaceMacAddress::Station);
    let mut bytes = [0u8; 6];
    bytes.copy_from_slice(mac.as_bytes());
    bytes
}

/// The configured device id, or `mqota-` followed by the station MAC in
/// lower-case hex (stable across reflashing, unique per chip).
pub fn device_id(config: &FirmwareConfig) -> DeviceId {
    let mut id = DeviceId::new();
    match config.device_id {
        Some(fixed) => {
            for c in fixed.chars() {
                if id.push(c).is_err() {
                    break;
                }
            }
        }
        None => {
            // Cannot overflow: 6 + 12 characters < DEVICE_ID_MAX.
            let _ = id.push_str("mqota-");
            for byte in station_mac() {
                let _ = write!(id, "{byte:02x}");
            }
        }
    }
    id
}

/// Restarts the chip (digital system reset, the same as ESP-IDF's
/// `esp_restart`); the second-stage bootloader then picks the slot that
/// otadata selects.
pub fn reset() -> ! {
    esp_hal::system::software_reset()
}

/// A seed for the runtime's reconnect jitter that differs between devices
/// (FNV-1a over the station MAC), so a fleet does not reconnect in step.
pub fn jitter_seed() -> u32 {
    station_mac().iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// An application's own check that a freshly updated image works, run once
/// in a trial boot after the broker is reached. `false` rolls the update back.
pub type HealthCheck = fn() -> bool;

/// The chip as the runtime sees it.
pub struct EspPlatform {
    device_id: DeviceId,
    watchdog: TrialWatchdog,
    health_check: Option<HealthCheck>,
}

impl EspPlatform {
    /// The chip with its id and the trial watchdog the boot guard armed.
    pub fn new(device_id: DeviceId, watchdog: TrialWatchdog) -> Self {
        Self {
            device_id,
            watchdog,
            health_check: None,
        }
    }

    /// Adds an application health check to the trial (the default has none
    /// and passes once the broker is reached). A check that needs to await
    /// something belongs in your own [`Platform`] implementation, run with
    /// `mqota_runtime::run` directly.
    pub fn with_health_check(mut self, check: HealthCheck) -> Self {
        self.health_check = Some(check);
        self
    }

    /// The trial watchdog, for the boot guard to disarm.
    pub fn watchdog(&mut self) -> &mut TrialWatchdog {
        &mut self.watchdog
    }
}

impl Platform for EspPlatform {
    async fn reboot(&mut self) -> ! {
        // Give the UART a moment to drain the last log lines before the reset.
        embassy_time::Timer::after_millis(50).await;
        reset()
    }

    fn device_id(&self) -> &str {
        &self.device_id
    }

    async fn health_check(&mut self) -> bool {
        self.health_check.is_none_or(|check| check())
    }

    fn confirmed(&mut self) {
        self.watchdog.disarm();
    }

    fn boot_reason(&self) -> mqota_runtime::BootReason {
        boot_reason()
    }
}

/// The chip's reset reason in the field log's terms. The values are the
/// `SocResetReason` codes the ESP32-C3 and -C6 share. A panic resets
/// through a software reset, so on the chip it reads `software_reset`.
fn boot_reason() -> mqota_runtime::BootReason {
    use mqota_runtime::BootReason;
    match esp_hal::system::reset_reason().map(|r| r as u32) {
        Some(0x01) => BootReason::PowerOn,
        Some(0x03 | 0x0C) => BootReason::SoftwareReset,
        Some(0x05) => BootReason::DeepSleep,
        Some(0x07 | 0x08 | 0x09 | 0x0B | 0x0D | 0x10 | 0x11 | 0x12) => BootReason::Watchdog,
        Some(0x0F) => BootReason::Brownout,
        _ => BootReason::Unknown,
    }
}

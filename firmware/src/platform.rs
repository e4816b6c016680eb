//! Glues the chip's identity and reset to the device runtime's
//! [`mqota_runtime::Platform`]: the device id from the factory MAC in eFuse,
//! the booted slot, a software reset, and the trial watchdog.

use core::fmt::Write as _;

use esp_hal::efuse::{self, InterfaceMacAddress};
use mqota_runtime::{Platform, Slot};

use crate::{config::Config, watchdog::TrialWatchdog};

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
pub fn device_id(config: &Config) -> DeviceId {
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

/// The chip as the runtime sees it.
pub struct EspPlatform {
    device_id: DeviceId,
    slot: Slot,
    watchdog: TrialWatchdog,
}

impl EspPlatform {
    /// `slot` comes from [`crate::flash::booted_slot`], read once at boot:
    /// it cannot change until the next reset.
    pub fn new(device_id: DeviceId, slot: Slot, watchdog: TrialWatchdog) -> Self {
        Self {
            device_id,
            slot,
            watchdog,
        }
    }

    /// The trial watchdog, for the boot guard to feed or disarm.
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

    fn running_slot(&self) -> Slot {
        self.slot
    }

    fn device_id(&self) -> &str {
        &self.device_id
    }
}

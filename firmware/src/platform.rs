//! Glues the chip's identity and reset to the device runtime: the device id
//! from the factory MAC in eFuse, and a software reset.

use core::fmt::Write as _;

use esp_hal::efuse::{self, InterfaceMacAddress};

use crate::config::Config;

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

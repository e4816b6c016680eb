//! Glues build-time environment variables to the firmware's settings.
//!
//! The values are read with `option_env!` while the firmware is compiled, so a
//! device carries its credentials in the image and needs no provisioning step.
//! Cargo rebuilds the firmware when one of these variables changes.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `MQOTA_WIFI_SSID` | (empty: WiFi stays off) | network to join |
//! | `MQOTA_WIFI_PASSWORD` | (empty: open network) | WPA2 passphrase |
//! | `MQOTA_BROKER_URL` | `mqtt://broker:1883` | MQTT broker |
//! | `MQOTA_BROKER_USER` | (none) | MQTT user name |
//! | `MQOTA_BROKER_PASSWORD` | (none) | MQTT password |
//! | `MQOTA_DEVICE_ID` | `mqota-` + station MAC in hex | client id and topic segment |
//! | `MQOTA_TOPIC_PREFIX` | `device` | first topic level (`device/ota/start`) |
//! | `MQOTA_KEEP_ALIVE_SECS` | `30` | MQTT keep-alive; never 0, brokers refuse it |
//! | `MQOTA_CONNECT_TIMEOUT_SECS` | `20` | one WiFi association plus DHCP |
//! | `MQOTA_DOWNLOAD_STALL_SECS` | `30` | download aborted after this long without data |
//! | `MQOTA_TRIAL_TIMEOUT_SECS` | `120` | a trial boot must confirm itself within this |
//!
//! A malformed number is a compile error, not a surprise on the device.

/// Picks the build-time value of an environment variable or a default.
macro_rules! env_or {
    ($name:literal, $default:expr) => {
        match option_env!($name) {
            Some(value) => value,
            None => $default,
        }
    };
}

/// Settings baked into the firmware image.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// WiFi network name; empty means "do not start WiFi".
    pub wifi_ssid: &'static str,
    /// WiFi passphrase; empty means an open network.
    pub wifi_password: &'static str,
    /// Broker URL, `mqtt://host[:port]`.
    pub broker_url: &'static str,
    /// MQTT user name, if the broker wants one.
    pub broker_user: Option<&'static str>,
    /// MQTT password, if the broker wants one.
    pub broker_password: Option<&'static str>,
    /// Fixed device id; `None` derives it from the MAC (see [`crate::platform::device_id`]).
    pub device_id: Option<&'static str>,
    /// First topic level.
    pub topic_prefix: &'static str,
    /// MQTT keep-alive in seconds.
    pub keep_alive_secs: u16,
    /// Time allowed for one WiFi association plus DHCP, in seconds.
    pub connect_timeout_secs: u32,
    /// Download stall timeout in seconds.
    pub download_stall_secs: u32,
    /// Trial-boot deadline in seconds, enforced by the watchdog.
    pub trial_timeout_secs: u32,
}

/// The configuration this image was built with.
pub const BUILD: Config = Config {
    wifi_ssid: env_or!("MQOTA_WIFI_SSID", ""),
    wifi_password: env_or!("MQOTA_WIFI_PASSWORD", ""),
    broker_url: env_or!("MQOTA_BROKER_URL", "mqtt://broker:1883"),
    broker_user: option_env!("MQOTA_BROKER_USER"),
    broker_password: option_env!("MQOTA_BROKER_PASSWORD"),
    device_id: option_env!("MQOTA_DEVICE_ID"),
    topic_prefix: env_or!("MQOTA_TOPIC_PREFIX", "device"),
    keep_alive_secs: non_zero_u16(parse_u32(env_or!("MQOTA_KEEP_ALIVE_SECS", "30"))),
    connect_timeout_secs: parse_u32(env_or!("MQOTA_CONNECT_TIMEOUT_SECS", "20")),
    download_stall_secs: parse_u32(env_or!("MQOTA_DOWNLOAD_STALL_SECS", "30")),
    trial_timeout_secs: parse_u32(env_or!("MQOTA_TRIAL_TIMEOUT_SECS", "120")),
};

/// Decimal parser usable in a `const`, so a bad value fails the build.
const fn parse_u32(text: &str) -> u32 {
    let bytes = text.as_bytes();
    assert!(!bytes.is_empty(), "empty number in an MQOTA_* variable");
    let mut value: u32 = 0;
    let mut i = 0;
    while i < bytes.len() {
        let digit = bytes[i];
        assert!(
            digit.is_ascii_digit(),
            "MQOTA_* numbers are decimal digits only"
        );
        value = match value.checked_mul(10) {
            Some(v) => v,
            None => panic!("MQOTA_* number too large"),
        };
        value = match value.checked_add((digit - b'0') as u32) {
            Some(v) => v,
            None => panic!("MQOTA_* number too large"),
        };
        i += 1;
    }
    value
}

/// A keep-alive of 0 means "never" to MQTT, and some brokers refuse the CONNECT.
const fn non_zero_u16(value: u32) -> u16 {
    assert!(
        value > 0 && value <= u16::MAX as u32,
        "MQOTA_KEEP_ALIVE_SECS must be 1..=65535"
    );
    value as u16
}

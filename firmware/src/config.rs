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
//! | `MQOTA_BROKER_URL` | `mqtt://broker:1883` | MQTT broker, `mqtt[s]://[user[:password]@]host[:port]` (`mqtts`: TLS, port 8883) |
//! | `MQOTA_TLS_CA` | (empty: no TLS) | the fleet CA certificate, PEM: the one trust anchor for `mqtts://` and `https://` |
//! | `MQOTA_TLS_CERT` / `MQOTA_TLS_KEY` | (empty: no client certificate) | the device's certificate (CN = device id) and P-256 key, PEM; both or neither |
//! | `MQOTA_BROKER_USER` | the URL's user | MQTT user name (overrides the URL's) |
//! | `MQOTA_BROKER_PASSWORD` | the URL's password | MQTT password (overrides the URL's) |
//! | `MQOTA_DEVICE_ID` | `mqota-` + station MAC in hex | client id and topic segment |
//! | `MQOTA_TOPIC_PREFIX` | runtime default (`device`) | first topic level (`device/ota/start`) |
//! | `MQOTA_KEEP_ALIVE_SECS` | runtime default (30) | MQTT keep-alive; never 0, brokers refuse it |
//! | `MQOTA_PROGRESS_COPY` | runtime default (`1`) | `0`: progress only on `{prefix}/{id}/progress`, no copy on `{prefix}/progress` |
//! | `MQOTA_CONNECT_TIMEOUT_SECS` | `20` | one WiFi association plus DHCP |
//! | `MQOTA_DOWNLOAD_STALL_SECS` | runtime default (15) | download retried after this long without data |
//! | `MQOTA_HEALTH_TIMEOUT_SECS` | runtime default (60) | a trial boot must reach the broker within this |
//! | `MQOTA_UPDATE_TIMEOUT_SECS` | runtime default (600) | overall deadline of an update without its own `timeout_s` |
//! | `MQOTA_TRIAL_TIMEOUT_SECS` | `120` | the watchdog resets a trial boot that has not confirmed by then |
//! | `MQOTA_TRUSTED_KEYS` | (empty: unsigned images accepted) | up to 3 signing-key digests (64 hex digits each, comma-separated; `mqota keys digest`); with any, only images signed by one of them are activated |
//! | `MQOTA_JOB_KEY` | (empty: unsigned commands accepted) | the job key, 128 hex digits (`mqota keys job-key`); with it, only commands signed by it, for this device, with a fresh sequence number are run |
//!
//! "Runtime default" is [`DeviceConfig::new`]'s value, read here in a
//! `const`: the device runtime is the one place those defaults live, shared
//! with the virtual device, so the firmware keeps no copy that could drift.
//!
//! A malformed number or broker URL is a compile error, not a surprise on
//! the device. The URL is split by the core's host-tested
//! [`parse_broker_url_tls`], evaluated in a `const`.

/// Picks the build-time value of an environment variable or a default.
macro_rules! env_or {
    ($name:literal, $default:expr) => {
        match option_env!($name) {
            Some(value) => value,
            None => $default,
        }
    };
}

use mqota_core::broker_url::{parse_broker_url_tls, BrokerUrlParts};
use mqota_core::protocol::envelope::JobKey;
use mqota_core::signature::{parse_key_list, KeyDigest, MAX_BLOCKS};
use mqota_runtime::DeviceConfig;

/// The runtime's defaults, for every setting the build leaves unset.
const DEFAULTS: DeviceConfig<'static> = DeviceConfig::new("", 0);

/// Settings baked into the firmware image. `Debug` never shows the WiFi or
/// MQTT password.
#[derive(Clone, Copy)]
pub struct FirmwareConfig {
    /// WiFi network name; empty means "do not start WiFi".
    pub wifi_ssid: &'static str,
    /// WiFi passphrase; empty means an open network.
    pub wifi_password: &'static str,
    /// The broker: host, port and the URL's credentials.
    pub broker: BrokerUrlParts<'static>,
    /// The URL was `mqtts://`: MQTT over TLS.
    pub broker_tls: bool,
    /// The fleet CA (PEM) pinned for `mqtts://` and `https://`; `None`: no
    /// TLS (the status says `"https": false`).
    pub tls_ca: Option<&'static str>,
    /// The device's client certificate (PEM), presented when a server asks.
    pub tls_cert: Option<&'static str>,
    /// The device's P-256 private key (PEM) for that certificate.
    pub tls_key: Option<&'static str>,
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
    /// Copy progress events to the shared `{prefix}/progress`.
    pub progress_copy: bool,
    /// Time allowed for one WiFi association plus DHCP, in seconds.
    pub connect_timeout_secs: u32,
    /// Download stall timeout in seconds.
    pub download_stall_secs: u32,
    /// Time a trial boot has to reach the broker (and pass the health
    /// check), in seconds; shorter than the trial timeout.
    pub health_timeout_secs: u32,
    /// Overall update deadline in seconds, for jobs that set none.
    pub update_timeout_secs: u32,
    /// Trial-boot deadline in seconds, enforced by the watchdog.
    pub trial_timeout_secs: u32,
    /// Digests of the keys updates must be signed by; empty: any valid image.
    pub trusted_keys: &'static [KeyDigest],
    /// The key commands must be signed with; `None`: unsigned commands.
    pub job_key: Option<JobKey>,
}

impl core::fmt::Debug for FirmwareConfig {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let hidden = |set: bool| if set { "<redacted>" } else { "" };
        f.debug_struct("FirmwareConfig")
            .field("wifi_ssid", &self.wifi_ssid)
            .field("wifi_password", &hidden(!self.wifi_password.is_empty()))
            .field("broker", &self.broker)
            .field("broker_tls", &self.broker_tls)
            .field("tls_ca", &self.tls_ca.is_some())
            .field("tls_cert", &self.tls_cert.is_some())
            .field("tls_key", &self.tls_key.map(|_| "<redacted>"))
            .field("broker_user", &self.broker_user)
            .field(
                "broker_password",
                &self.broker_password.map(|_| "<redacted>"),
            )
            .field("device_id", &self.device_id)
            .field("topic_prefix", &self.topic_prefix)
            .field("keep_alive_secs", &self.keep_alive_secs)
            .field("progress_copy", &self.progress_copy)
            .field("connect_timeout_secs", &self.connect_timeout_secs)
            .field("download_stall_secs", &self.download_stall_secs)
            .field("health_timeout_secs", &self.health_timeout_secs)
            .field("update_timeout_secs", &self.update_timeout_secs)
            .field("trial_timeout_secs", &self.trial_timeout_secs)
            .field("trusted_keys", &self.trusted_keys.len())
            .field("job_key", &self.job_key.is_some())
            .finish()
    }
}

const TRUSTED: ([KeyDigest; MAX_BLOCKS], usize) =
    match parse_key_list(env_or!("MQOTA_TRUSTED_KEYS", "")) {
        Some(keys) => keys,
        None => {
            panic!("MQOTA_TRUSTED_KEYS must be up to 3 comma-separated 64-hex-digit key digests")
        }
    };

const JOB_KEY: Option<JobKey> = match env_or!("MQOTA_JOB_KEY", "").as_bytes() {
    [] => None,
    _ => match JobKey::from_hex(env_or!("MQOTA_JOB_KEY", "")) {
        Some(key) => Some(key),
        None => panic!("MQOTA_JOB_KEY must be 128 hex digits (mqota keys job-key KEY.pem)"),
    },
};

const BROKER_TLS: (BrokerUrlParts<'static>, bool) =
    broker(env_or!("MQOTA_BROKER_URL", "mqtt://broker:1883"));
const BROKER: BrokerUrlParts<'static> = BROKER_TLS.0;

/// A PEM variable: unset or empty is `None`.
const fn pem(value: Option<&'static str>) -> Option<&'static str> {
    match value {
        Some(v) if !v.is_empty() => Some(v),
        _ => None,
    }
}

const TLS_CA: Option<&'static str> = pem(option_env!("MQOTA_TLS_CA"));
const TLS_CERT: Option<&'static str> = pem(option_env!("MQOTA_TLS_CERT"));
const TLS_KEY: Option<&'static str> = pem(option_env!("MQOTA_TLS_KEY"));

/// What the TLS variables allow, checked while compiling.
const fn tls_checked(broker_tls: bool) -> bool {
    assert!(
        TLS_CERT.is_some() == TLS_KEY.is_some(),
        "MQOTA_TLS_CERT and MQOTA_TLS_KEY go together"
    );
    if cfg!(feature = "plaintext") {
        assert!(
            !broker_tls,
            "an mqtts:// MQOTA_BROKER_URL needs TLS: build without the `plaintext` feature"
        );
        assert!(
            TLS_CA.is_none() && TLS_CERT.is_none(),
            "MQOTA_TLS_* given to a `plaintext` build, which has no TLS"
        );
    } else {
        assert!(
            !broker_tls || TLS_CA.is_some(),
            "an mqtts:// MQOTA_BROKER_URL needs MQOTA_TLS_CA (the fleet CA, PEM)"
        );
    }
    broker_tls
}

/// The configuration this image was built with.
pub const BUILD: FirmwareConfig = FirmwareConfig {
    wifi_ssid: env_or!("MQOTA_WIFI_SSID", ""),
    wifi_password: env_or!("MQOTA_WIFI_PASSWORD", ""),
    broker: BROKER,
    broker_tls: tls_checked(BROKER_TLS.1),
    tls_ca: TLS_CA,
    tls_cert: TLS_CERT,
    tls_key: TLS_KEY,
    broker_user: match option_env!("MQOTA_BROKER_USER") {
        Some(user) => Some(user),
        None => BROKER.username,
    },
    broker_password: match option_env!("MQOTA_BROKER_PASSWORD") {
        Some(password) => Some(password),
        None => BROKER.password,
    },
    device_id: option_env!("MQOTA_DEVICE_ID"),
    topic_prefix: env_or!("MQOTA_TOPIC_PREFIX", DEFAULTS.prefix),
    keep_alive_secs: match option_env!("MQOTA_KEEP_ALIVE_SECS") {
        Some(secs) => non_zero_u16(parse_u32(secs)),
        None => DEFAULTS.keep_alive_secs,
    },
    progress_copy: match option_env!("MQOTA_PROGRESS_COPY") {
        Some(flag) => parse_flag(flag),
        None => DEFAULTS.progress_copy,
    },
    connect_timeout_secs: parse_u32(env_or!("MQOTA_CONNECT_TIMEOUT_SECS", "20")),
    download_stall_secs: secs_or(
        option_env!("MQOTA_DOWNLOAD_STALL_SECS"),
        DEFAULTS.stall_timeout,
    ),
    health_timeout_secs: HEALTH_TIMEOUT_SECS,
    update_timeout_secs: secs_or(
        option_env!("MQOTA_UPDATE_TIMEOUT_SECS"),
        DEFAULTS.update_timeout,
    ),
    trial_timeout_secs: trial_timeout(
        parse_u32(env_or!("MQOTA_TRIAL_TIMEOUT_SECS", "120")),
        HEALTH_TIMEOUT_SECS,
    ),
    trusted_keys: TRUSTED.0.split_at(TRUSTED.1).0,
    job_key: JOB_KEY,
};

const HEALTH_TIMEOUT_SECS: u32 = secs_or(
    option_env!("MQOTA_HEALTH_TIMEOUT_SECS"),
    DEFAULTS.health_timeout,
);

/// A number of seconds from the build environment, or the runtime's default.
const fn secs_or(value: Option<&str>, default: embassy_time::Duration) -> u32 {
    match value {
        Some(text) => parse_u32(text),
        None => {
            let secs = default.as_secs();
            assert!(secs <= u32::MAX as u64, "runtime default out of range");
            secs as u32
        }
    }
}

/// The broker URL and whether it is `mqtts://`, checked while compiling.
const fn broker(url: &'static str) -> (BrokerUrlParts<'static>, bool) {
    let (broker, tls) = match parse_broker_url_tls(url) {
        Ok(parsed) => parsed,
        Err(_) => panic!("MQOTA_BROKER_URL must look like mqtt[s]://[user[:password]@]host[:port]"),
    };
    // The IP stack is built IPv4-only (smaller), and embassy-net's TCP client
    // panics when asked to connect to an IPv6 address.
    let mut i = 0;
    while i < broker.host.len() {
        assert!(
            broker.host.as_bytes()[i] != b':',
            "MQOTA_BROKER_URL: IPv6 brokers need embassy-net's proto-ipv6; use a name or IPv4"
        );
        i += 1;
    }
    (broker, tls)
}

/// The watchdog must leave the runtime's health check time to finish (and
/// to roll back cleanly when it fails), and the RWDT's counter must hold it.
const fn trial_timeout(trial: u32, health: u32) -> u32 {
    assert!(
        trial > health + 10,
        "MQOTA_TRIAL_TIMEOUT_SECS must exceed MQOTA_HEALTH_TIMEOUT_SECS by more than 10 s"
    );
    assert!(trial <= 3600, "MQOTA_TRIAL_TIMEOUT_SECS is at most 3600");
    trial
}

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

/// `0` or `1`, checked while compiling.
const fn parse_flag(text: &str) -> bool {
    match parse_u32(text) {
        0 => false,
        1 => true,
        _ => panic!("MQOTA_PROGRESS_COPY must be 0 or 1"),
    }
}

/// A keep-alive of 0 means "never" to MQTT, and some brokers refuse the CONNECT.
const fn non_zero_u16(value: u32) -> u16 {
    assert!(
        value > 0 && value <= u16::MAX as u32,
        "MQOTA_KEEP_ALIVE_SECS must be 1..=65535"
    );
    value as u16
}

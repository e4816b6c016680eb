//! Glues the boot guard and the device runtime to the chip: the two calls an
//! application makes, [`boot_guard`] first thing in `main` and [`run`] (or
//! the ready-made [`task`], via [`spawn`]) once the network stack exists.
//!
//! Nothing here decides anything: [`mqota_runtime::early_boot_with_table`] and
//! [`mqota_runtime::run`] do, the same code the virtual device runs on the
//! host. This module only reads the partition table (once: the booted slot
//! and the runtime's layout come from the same read), resets or arms the
//! watchdog as the guard says, and builds the connector the runtime talks
//! through: embassy-net's TCP client and DNS resolver, with TLS (the fleet
//! CA, the device's certificate, the chip's TRNG) unless the firmware is
//! built `plaintext`.

use embassy_executor::{SpawnError, Spawner};
use embassy_net::{
    dns::DnsSocket,
    tcp::client::{TcpClient, TcpClientState},
    Stack,
};
use embassy_time::Duration;
use esp_hal::{peripherals::RTC_TIMER, time::Duration as HalDuration};
use log::{info, warn};
use mqota_core::bootguard::Verdict;
use mqota_core::protocol::envelope::JobTrust;
use mqota_core::signature::{SoftVerifier, TrustPolicy};
use mqota_runtime::{early_boot_with_table, DeviceConfig, EarlyBootError, Link, RunningFirmware};

use crate::{
    config::FirmwareConfig,
    flash::{self, FlashStorage, SlotError},
    link::StackLink,
    platform::{self, EspPlatform},
    watchdog::TrialWatchdog,
};

/// TCP connections the runtime opens at once: the MQTT session and one download.
pub const TCP_CONNECTIONS: usize = 2;
/// Transmit buffer per TCP connection (MQTT packets and HTTP requests are small).
pub const TCP_TX_BUFFER: usize = 1024;
/// Receive buffer per TCP connection: the TCP window of a download.
pub const TCP_RX_BUFFER: usize = 4096;

/// The boot guard has run: what the device task needs to carry on.
pub struct Guarded {
    booted: RunningFirmware,
    platform: EspPlatform,
}

impl Guarded {
    /// What the boot guard found (verdict, running version, slot layout).
    pub fn booted(&self) -> &RunningFirmware {
        &self.booted
    }

    /// The platform handed to the runtime, e.g. to add a health check with
    /// [`EspPlatform::with_health_check`].
    pub fn map_platform(self, f: impl FnOnce(EspPlatform) -> EspPlatform) -> Self {
        Self {
            booted: self.booted,
            platform: f(self.platform),
        }
    }
}

/// Why the boot guard could not run. The firmware itself is fine; it just
/// cannot take updates: log it, keep the application running, reflash with
/// `cargo xtask flash` (which writes mqota's partition table).
#[derive(Debug)]
#[non_exhaustive]
pub enum GuardSetupError {
    /// The booted partition could not be looked up.
    Slot(SlotError),
    /// Running from a factory app, not an `ota_N` slot: mqota updates only
    /// an OTA layout.
    NotAnOtaSlot,
    /// The runtime could not read the partition table, the running image or
    /// otadata.
    Boot(EarlyBootError),
}

/// Runs the boot guard. Call it right after `esp_hal::init`, before anything
/// a broken update could hang in: a trial boot is only protected by the
/// watchdog from here on.
///
/// When the guard decides the other slot must run (a trial that died and
/// was rolled back), this resets the chip and does not return. On a trial
/// boot it arms the RTC watchdog with `config.trial_timeout_secs`; the
/// runtime disarms it when the image is confirmed.
pub fn boot_guard(
    flash: &mut FlashStorage<'static>,
    rtc_timer: RTC_TIMER<'static>,
    config: &FirmwareConfig,
) -> Result<Guarded, GuardSetupError> {
    let mut watchdog = TrialWatchdog::new(rtc_timer);
    let partitions = flash::read_partitions(flash).map_err(GuardSetupError::Slot)?;
    let slot = partitions
        .booted
        .ota_index()
        .ok_or(GuardSetupError::NotAnOtaSlot)?;
    let booted = early_boot_with_table(flash, &partitions.table, usize::from(slot))
        .map_err(GuardSetupError::Boot)?;
    match booted.boot.verdict {
        Verdict::Reboot => {
            warn!("boot guard: switching slots, resetting");
            platform::reset()
        }
        Verdict::Trial => {
            warn!(
                "boot guard: trial boot of {}, watchdog {} s",
                booted.version, config.trial_timeout_secs
            );
            watchdog.arm(HalDuration::from_secs(u64::from(config.trial_timeout_secs)));
        }
        _ => {}
    }
    let platform = EspPlatform::new(platform::device_id(config), watchdog);
    Ok(Guarded { booted, platform })
}

/// The runtime's settings from the firmware's.
pub fn device_config(config: &'static FirmwareConfig) -> DeviceConfig<'static> {
    let mut device = DeviceConfig::new(config.broker.host, config.broker.port);
    device.username = config.broker_user;
    device.password = config.broker_password.map(str::as_bytes);
    device.prefix = config.topic_prefix;
    device.keep_alive_secs = config.keep_alive_secs;
    device.progress_copy = config.progress_copy;
    device.health_timeout = Duration::from_secs(u64::from(config.health_timeout_secs));
    device.update_timeout = Duration::from_secs(u64::from(config.update_timeout_secs));
    device.stall_timeout = Duration::from_secs(u64::from(config.download_stall_secs));
    device.seed = platform::jitter_seed();
    if !config.trusted_keys.is_empty() {
        // Software RSA/ECDSA for now (RSA-3072 needs about 22 KiB of heap
        // for a moment); the chip's RSA and SHA accelerators can replace it
        // through the same trait.
        device.trust = TrustPolicy::new(config.trusted_keys, SoftVerifier::INSTANCE);
    }
    // Commands are ES256: the same software P-256 as ECDSA image blocks.
    device.job_trust = config
        .job_key
        .map(|key| JobTrust::new(key, SoftVerifier::INSTANCE));
    device
}

/// The whole device over `stack`: MQTT session, commands, downloads into
/// `flash`, the trial of a fresh update. `link` keeps the network up; use
/// [`crate::wifi::WifiLink`] when mqota owns the radio, [`StackLink`] when
/// the application does.
pub async fn run(
    config: &'static FirmwareConfig,
    guarded: Guarded,
    stack: Stack<'static>,
    link: &mut impl Link,
    mut flash: FlashStorage<'static>,
) -> ! {
    let Guarded {
        booted,
        mut platform,
    } = guarded;
    info!(
        "mqota: {} {} on {}, broker {}:{}",
        booted.project,
        booted.version,
        mqota_runtime::Platform::device_id(&platform),
        config.broker.host,
        config.broker.port
    );
    let device = device_config(config);
    let state = TcpClientState::<TCP_CONNECTIONS, TCP_TX_BUFFER, TCP_RX_BUFFER>::new();
    let tcp = TcpClient::new(stack, &state);
    let dns = DnsSocket::new(stack);
    #[cfg(feature = "plaintext")]
    let net = {
        warn!("plaintext build: no TLS (status https: false)");
        mqota_runtime::NetConnector::plain(&tcp, &dns)
    };
    #[cfg(not(feature = "plaintext"))]
    let mut pem = tls::PemBuffers::new();
    #[cfg(not(feature = "plaintext"))]
    let identity = tls::identity(config, &mut pem);
    #[cfg(not(feature = "plaintext"))]
    let net = mqota_runtime::NetConnector::new(&tcp, &dns, tls::setup(identity.as_ref()));
    mqota_runtime::run(&device, booted, &mut platform, link, &net, &mut flash).await
}

/// The TLS material compiled in, turned into what the runtime takes.
#[cfg(not(feature = "plaintext"))]
mod tls {
    use esp_hal::rng::Trng;
    use log::{info, warn};
    use mqota_runtime::tls::NoClock;
    use mqota_runtime::{der_from_pem_or_der, TlsBuffers, TlsIdentity, TlsSetup};
    use static_cell::ConstStaticCell;

    use crate::config::FirmwareConfig;

    /// The record buffers of both TLS sessions (`mqota_runtime::TLS_RAM`
    /// with the sessions' state), in `.bss`, not on a stack.
    static BUFFERS: ConstStaticCell<TlsBuffers> = ConstStaticCell::new(TlsBuffers::new());

    /// Bytes for the DER of the CA, the certificate and the key: a P-256
    /// certificate is about 500 bytes, its PKCS#8 key 138.
    const CERT_DER: usize = 2048;
    const KEY_DER: usize = 512;

    /// Where the PEM variables are decoded to, once, at start-up.
    pub struct PemBuffers {
        ca: [u8; CERT_DER],
        cert: [u8; CERT_DER],
        key: [u8; KEY_DER],
    }

    impl PemBuffers {
        pub fn new() -> Self {
            Self {
                ca: [0; CERT_DER],
                cert: [0; CERT_DER],
                key: [0; KEY_DER],
            }
        }
    }

    /// The fleet CA and the device's certificate and key from `config`;
    /// `None` (TLS off, logged) without a CA or when one does not decode.
    pub fn identity<'a>(
        config: &'static FirmwareConfig,
        pem: &'a mut PemBuffers,
    ) -> Option<TlsIdentity<'a>> {
        let Some(ca) = config.tls_ca else {
            warn!("built without MQOTA_TLS_CA: no TLS (status https: false)");
            return None;
        };
        let ca = match der_from_pem_or_der(ca.as_bytes(), &mut pem.ca) {
            Ok(der) => der,
            Err(e) => {
                warn!("MQOTA_TLS_CA unusable ({e:?}): no TLS");
                return None;
            }
        };
        let identity = TlsIdentity::new(ca).ok()?;
        let (Some(cert), Some(key)) = (config.tls_cert, config.tls_key) else {
            info!("tls: fleet CA pinned, no client certificate");
            return Some(identity);
        };
        let client = der_from_pem_or_der(cert.as_bytes(), &mut pem.cert).and_then(|cert| {
            der_from_pem_or_der(key.as_bytes(), &mut pem.key)
                .and_then(|key| identity.clone().with_client(cert, key))
        });
        match client {
            Ok(identity) => {
                info!("tls: fleet CA pinned, client certificate presented");
                Some(identity)
            }
            Err(e) => {
                warn!("MQOTA_TLS_CERT/KEY unusable ({e:?}): TLS without a client certificate");
                Some(identity)
            }
        }
    }

    /// TLS with the chip's TRNG (its entropy comes from the radio, which is
    /// up by now). Without a TRNG there is no TLS: a handshake on guessable
    /// randomness would protect nothing.
    pub fn setup<'a>(identity: Option<&'a TlsIdentity<'a>>) -> Option<TlsSetup<'a, Trng, NoClock>> {
        let identity = identity?;
        match Trng::try_new() {
            Ok(rng) => Some(TlsSetup::new(identity, BUFFERS.take(), rng)),
            Err(_) => {
                warn!("no TRNG entropy source: no TLS");
                None
            }
        }
    }
}

/// mqota as one task of an application that owns the network: the stack is
/// the application's, and so is keeping it connected.
#[embassy_executor::task]
pub async fn task(
    config: &'static FirmwareConfig,
    guarded: Guarded,
    stack: Stack<'static>,
    flash: FlashStorage<'static>,
) -> ! {
    let mut link = StackLink::new(
        stack,
        Duration::from_secs(u64::from(config.connect_timeout_secs)),
    );
    run(config, guarded, stack, &mut link, flash).await
}

/// Spawns [`task`]: the one call an esp-hal application with its own
/// embassy-net stack makes after [`boot_guard`].
pub fn spawn(
    spawner: &Spawner,
    config: &'static FirmwareConfig,
    guarded: Guarded,
    stack: Stack<'static>,
    flash: FlashStorage<'static>,
) -> Result<(), SpawnError> {
    spawner.spawn(task(config, guarded, stack, flash)?);
    Ok(())
}

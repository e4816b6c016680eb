//! The mqota firmware: chip bring-up, then the device runtime.
//!
//! Everything that decides anything (sessions, downloads, the update engine,
//! the boot guard) lives in the host-tested crates; this file only wires the
//! chip's parts to them, in the order the boot needs.

#![no_std]
#![no_main]

use embassy_executor::Spawner;
use embassy_net::StackResources;
use embassy_time::{Duration, Timer};
use esp_backtrace as _;
use esp_hal::{clock::CpuClock, rng::Rng, timer::timg::TimerGroup};
use log::{error, info, warn};
use mqota_firmware::{
    config::{self, Config},
    flash,
    platform::{self, EspPlatform},
    watchdog::TrialWatchdog,
    wifi::{self, WifiLink, SOCKETS},
};
use mqota_runtime::{Backoff, Jitter, Link, Platform};
use static_cell::StaticCell;

// Project name and version come from Cargo.toml ("mqota-firmware", the crate
// version); the update engine reads them back from the image it downloads.
esp_bootloader_esp_idf::esp_app_desc!();

#[esp_rtos::main]
async fn main(spawner: Spawner) -> ! {
    esp_println::logger::init_logger_from_env();
    let peripherals = esp_hal::init(esp_hal::Config::default().with_cpu_clock(CpuClock::max()));
    let config = config::BUILD;

    // ---- BOOT GUARD HOOK: keep this the first thing after esp_hal::init. ----
    // The guard (mqota-core) reads otadata through `flash`, decides
    // confirmed / trial / roll back, and on a trial boot arms `watchdog` with
    // `config.trial_timeout_secs`; a rollback ends in `platform::reset()`.
    // Nothing before this line may depend on the new image being healthy.
    let mut flash = flash::storage(peripherals.FLASH);
    let mut watchdog = TrialWatchdog::new(peripherals.RTC_TIMER);
    boot_guard_hook(&mut flash, &mut watchdog);
    // ---- end of BOOT GUARD HOOK ----

    // The radio blobs allocate; the reclaimed bootloader RAM is free by now.
    esp_alloc::heap_allocator!(#[esp_hal::ram(reclaimed)] size: 64 * 1024);
    esp_alloc::heap_allocator!(size: 36 * 1024);

    let timg0 = TimerGroup::new(peripherals.TIMG0);
    esp_rtos::start(timg0.timer0, peripherals.FROM_CPU_INTR0);

    let device_id = platform::device_id(&config);
    info!(
        "mqota-firmware {} on {}",
        env!("CARGO_PKG_VERSION"),
        device_id
    );
    let slot = match flash::booted_slot(&mut flash) {
        Ok(booted) => {
            info!(
                "running from {:?} at {:#x} ({} KiB)",
                booted.kind,
                booted.offset,
                booted.size / 1024
            );
            booted.slot()
        }
        Err(e) => {
            warn!("running slot unknown: {e:?}");
            None
        }
    };
    let Some(slot) = slot else {
        error!("not running from ota_0/ota_1: flash with `cargo xtask flash` (partitions.csv)");
        park().await
    };
    let platform = EspPlatform::new(device_id, slot, watchdog);

    if config.wifi_ssid.is_empty() {
        error!("built without MQOTA_WIFI_SSID: no network, no updates");
        park().await
    }

    static RESOURCES: StaticCell<StackResources<SOCKETS>> = StaticCell::new();
    let rng = Rng::new();
    let seed = (u64::from(rng.random()) << 32) | u64::from(rng.random());
    let (link, runner) = match WifiLink::new(
        peripherals.WIFI,
        &config,
        RESOURCES.init(StackResources::new()),
        seed,
    ) {
        Ok(parts) => parts,
        Err(e) => {
            error!("wifi: {e:?}");
            park().await
        }
    };
    spawner.spawn(wifi::net_task(runner).expect("net_task spawned once"));
    spawner.spawn(device_task(link, platform, config).expect("device_task spawned once"));

    park().await
}

/// Placeholder for mqota-core's boot guard; see the hook in `main`.
fn boot_guard_hook(_flash: &mut flash::FlashStorage<'static>, watchdog: &mut TrialWatchdog) {
    // Until the guard lands no boot is treated as a trial, so the watchdog stays off.
    watchdog.disarm();
}

/// The device runtime's task.
///
/// DEVICE RUNTIME HOOK: once mqota-runtime's main loop exists, this becomes
/// one call handing it `link`, `link.stack()` (for `TcpClient`/`DnsSocket`),
/// `platform`, the flash and `config`. Until then it only keeps the link up,
/// paced by the runtime's backoff, so the network path can be tried on hardware.
#[embassy_executor::task]
async fn device_task(mut link: WifiLink, platform: EspPlatform, config: Config) {
    info!(
        "{} in {:?}: broker {} (prefix {}), runtime loop not wired yet",
        platform.device_id(),
        platform.running_slot(),
        config.broker_url,
        config.topic_prefix
    );
    let rng = Rng::new();
    let mut backoff = Backoff::new(
        Duration::from_secs(1),
        Duration::from_secs(60),
        Jitter::Full,
    );
    let mut first = true;
    loop {
        let attempt = if first {
            link.connect().await
        } else {
            link.reconnect().await
        };
        match attempt {
            Ok(()) => {
                first = false;
                backoff.reset();
                info!("link up");
                link.wait_for_disconnect().await;
            }
            Err(e) => {
                let delay = backoff.next_delay(rng.random());
                warn!("wifi: {e:?}, next attempt in {} ms", delay.as_millis());
                Timer::after(delay).await;
            }
        }
    }
}

/// Idles forever; the executor keeps running the spawned tasks.
async fn park() -> ! {
    loop {
        embassy_time::Timer::after_secs(3600).await;
    }
}

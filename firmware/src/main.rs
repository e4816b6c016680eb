//! The mqota firmware: chip bring-up, then the device runtime.
//!
//! Everything that decides anything (sessions, downloads, the update engine,
//! the boot guard) lives in the host-tested crates; this file only wires the
//! chip's parts to them, in the order the boot needs.

#![no_std]
#![no_main]

use embassy_executor::Spawner;
use embassy_net::StackResources;
use esp_backtrace as _;
use esp_hal::{clock::CpuClock, rng::Rng, timer::timg::TimerGroup};
use log::{error, info, warn};
use mqota_firmware::{
    config::{self, Config},
    flash, platform,
    watchdog::TrialWatchdog,
    wifi::{self, WifiLink, SOCKETS},
};
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
    let watchdog = TrialWatchdog::new(peripherals.RTC_TIMER);
    boot_guard_hook(&mut flash, &watchdog);
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
    match flash::booted_slot(&mut flash) {
        Ok(slot) => info!(
            "running from {:?} at {:#x} ({} KiB)",
            slot.kind,
            slot.offset,
            slot.size / 1024
        ),
        Err(e) => warn!("running slot unknown: {e:?}"),
    }

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
    spawner.spawn(device_task(link, config).expect("device_task spawned once"));

    park().await
}

/// Placeholder for mqota-core's boot guard; see the hook in `main`.
fn boot_guard_hook(_flash: &mut flash::FlashStorage<'static>, watchdog: &TrialWatchdog) {
    // Until the guard lands no boot is treated as a trial, so the watchdog stays off.
    debug_assert!(!watchdog.is_armed());
}

/// The device runtime's task.
///
/// DEVICE RUNTIME HOOK: once mqota-runtime's main loop exists, this becomes
/// one call handing it `link`, `link.stack()`, the flash and the watchdog.
/// Until then it only keeps the link up, so the network path can be tried
/// on hardware.
#[embassy_executor::task]
async fn device_task(mut link: WifiLink, config: Config) {
    info!(
        "broker {} (prefix {}), runtime not wired yet",
        config.broker_url, config.topic_prefix
    );
    loop {
        if let Err(e) = link.reconnect().await {
            error!("wifi: {e:?}; giving up");
            return;
        }
        info!("link up");
        link.wait_for_disconnect().await;
    }
}

/// Idles forever; the executor keeps running the spawned tasks.
async fn park() -> ! {
    loop {
        embassy_time::Timer::after_secs(3600).await;
    }
}

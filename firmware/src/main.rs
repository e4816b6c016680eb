//! The mqota firmware: the boot guard, chip bring-up, then the device runtime.
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
use log::{error, info};
use mqota_firmware::{
    config::{self, FirmwareConfig},
    flash::{self, FlashStorage},
    wifi::{self, WifiLink, SOCKETS},
};
use static_cell::StaticCell;

// Project name and version come from Cargo.toml ("mqota-firmware", the crate
// version); the update engine reads them back from the image it downloads.
esp_bootloader_esp_idf::esp_app_desc!();

/// The settings compiled into this image (see `config`).
static CONFIG: FirmwareConfig = config::BUILD;

#[esp_rtos::main]
async fn main(spawner: Spawner) -> ! {
    esp_println::logger::init_logger_from_env();
    let peripherals = esp_hal::init(esp_hal::Config::default().with_cpu_clock(CpuClock::max()));

    // The boot guard comes first: a trial boot is protected by the watchdog
    // only from here on, so nothing a new image could hang in may precede it.
    #[cfg_attr(feature = "size-baseline", allow(unused_mut))]
    let mut flash = flash::storage(peripherals.FLASH);
    #[cfg(not(feature = "size-baseline"))]
    let guarded = mqota_firmware::boot_guard(&mut flash, peripherals.RTC_TIMER, &CONFIG);

    // The radio blobs allocate; the reclaimed bootloader RAM is free by now.
    esp_alloc::heap_allocator!(#[esp_hal::ram(reclaimed)] size: 64 * 1024);
    esp_alloc::heap_allocator!(size: 36 * 1024);
    let timg0 = TimerGroup::new(peripherals.TIMG0);
    esp_rtos::start(timg0.timer0, peripherals.FROM_CPU_INTR0);
    info!("mqota-firmware {}", env!("CARGO_PKG_VERSION"));

    #[cfg(not(feature = "size-baseline"))]
    let guarded = match guarded {
        Ok(guarded) => guarded,
        Err(e) => {
            error!("boot guard: {e:?}; no updates (flash with `cargo xtask flash`)");
            park().await
        }
    };
    if CONFIG.wifi_ssid.is_empty() {
        error!("built without MQOTA_WIFI_SSID: no network, no updates");
        park().await
    }

    static RESOURCES: StaticCell<StackResources<SOCKETS>> = StaticCell::new();
    let rng = Rng::new();
    let seed = (u64::from(rng.random()) << 32) | u64::from(rng.random());
    let (link, runner) = match WifiLink::new(
        peripherals.WIFI,
        &CONFIG,
        RESOURCES.init(StackResources::new()),
        seed,
    ) {
        Ok(parts) => parts,
        Err(e) => {
            // On a trial boot the watchdog turns this into a rollback.
            error!("wifi: {e:?}");
            park().await
        }
    };
    spawner.spawn(wifi::net_task(runner).expect("net_task spawned once"));
    #[cfg(not(feature = "size-baseline"))]
    spawner.spawn(device_task(link, guarded, flash).expect("device_task spawned once"));
    #[cfg(feature = "size-baseline")]
    spawner.spawn(baseline::link_task(link, flash).expect("link_task spawned once"));
    park().await
}

/// mqota over mqota's own WiFi link.
#[cfg(not(feature = "size-baseline"))]
#[embassy_executor::task]
async fn device_task(
    mut link: WifiLink,
    guarded: mqota_firmware::Guarded,
    flash: FlashStorage<'static>,
) -> ! {
    let stack = link.stack();
    mqota_firmware::run(&CONFIG, guarded, stack, &mut link, flash).await
}

/// The same firmware without mqota (no boot guard, no runtime): it only
/// keeps WiFi and DHCP up. Built by `cargo xtask firmware` to tell mqota's
/// share of the image from the WiFi and network stack's.
#[cfg(feature = "size-baseline")]
mod baseline {
    use super::*;
    use embassy_time::Timer;
    use mqota_runtime::Link;

    #[embassy_executor::task]
    pub async fn link_task(mut link: WifiLink, _flash: FlashStorage<'static>) -> ! {
        loop {
            if link.reconnect().await.is_ok() {
                link.wait_for_disconnect().await;
            }
            Timer::after_secs(5).await;
        }
    }
}

/// Idles forever; the executor keeps running the spawned tasks.
async fn park() -> ! {
    loop {
        embassy_time::Timer::after_secs(3600).await;
    }
}

//! An esp-hal application that owns its WiFi and network stack and adds
//! mqota as one task: `boot_guard` first, `spawn` once the stack exists.
//!
//! ```sh
//! cd firmware
//! MQOTA_WIFI_SSID=lab MQOTA_WIFI_PASSWORD=secret MQOTA_BROKER_URL=mqtt://user:pw@192.168.1.10 \
//!   cargo build --release --example own_app --features esp32c3
//! ```

#![no_std]
#![no_main]

use embassy_executor::Spawner;
use embassy_net::{Runner, Stack, StackResources};
use embassy_time::Timer;
use esp_backtrace as _;
use esp_hal::{clock::CpuClock, rng::Rng, timer::timg::TimerGroup};
use esp_radio::wifi::{
    sta::StationConfig, AuthenticationMethodConfig, Config as WifiConfig, ControllerConfig,
    Interface, WifiController,
};
use log::{error, info};
use mqota_firmware::config::{self, FirmwareConfig};
use static_cell::StaticCell;

esp_bootloader_esp_idf::esp_app_desc!();

/// The build-time settings, with this application's own topic prefix.
static CONFIG: FirmwareConfig = FirmwareConfig {
    topic_prefix: "plant",
    ..config::BUILD
};

/// This application's idea of healthy, checked before an update is kept.
fn sensors_ok() -> bool {
    true
}

#[esp_rtos::main]
async fn main(spawner: Spawner) -> ! {
    esp_println::logger::init_logger_from_env();
    let peripherals = esp_hal::init(esp_hal::Config::default().with_cpu_clock(CpuClock::max()));

    // mqota's boot guard before the application's own start-up.
    let mut flash = mqota_firmware::flash::storage(peripherals.FLASH);
    let guarded = mqota_firmware::boot_guard(&mut flash, peripherals.RTC_TIMER, &CONFIG)
        .map(|g| g.map_platform(|p| p.with_health_check(sensors_ok)));

    esp_alloc::heap_allocator!(#[esp_hal::ram(reclaimed)] size: 64 * 1024);
    esp_alloc::heap_allocator!(size: 36 * 1024);
    let timg0 = TimerGroup::new(peripherals.TIMG0);
    esp_rtos::start(timg0.timer0, peripherals.FROM_CPU_INTR0);

    // The application's own WiFi station and stack.
    let station = StationConfig::default()
        .with_ssid(CONFIG.wifi_ssid.try_into().expect("SSID fits"))
        .with_authentication(AuthenticationMethodConfig::Wpa2Personal(
            CONFIG.wifi_password.try_into().expect("password fits"),
        ));
    let controller = WifiController::new(
        peripherals.WIFI,
        ControllerConfig::default().with_initial_config(WifiConfig::Station(station)),
    )
    .expect("radio starts");
    static RESOURCES: StaticCell<StackResources<4>> = StaticCell::new();
    let rng = Rng::new();
    let seed = (u64::from(rng.random()) << 32) | u64::from(rng.random());
    let (stack, runner) = embassy_net::new(
        Interface::station(),
        embassy_net::Config::dhcpv4(Default::default()),
        RESOURCES.init(StackResources::new()),
        seed,
    );
    spawner.spawn(net_task(runner).expect("spawned once"));
    spawner.spawn(wifi_task(controller).expect("spawned once"));

    // mqota: one call.
    match guarded {
        Ok(guarded) => mqota_firmware::spawn(&spawner, &CONFIG, guarded, stack, flash)
            .expect("mqota spawned once"),
        Err(e) => error!("mqota off: {e:?}"),
    }

    app(stack).await
}

/// The application itself.
async fn app(stack: Stack<'static>) -> ! {
    loop {
        if let Some(v4) = stack.config_v4() {
            info!("app: alive at {}", v4.address);
        }
        Timer::after_secs(60).await;
    }
}

#[embassy_executor::task]
async fn net_task(mut runner: Runner<'static, Interface>) -> ! {
    runner.run().await
}

/// Keeps the station associated; mqota only waits for the stack.
#[embassy_executor::task]
async fn wifi_task(mut controller: WifiController<'static>) -> ! {
    loop {
        if !controller.is_connected() && controller.connect_async().await.is_err() {
            Timer::after_secs(5).await;
            continue;
        }
        let _ = controller.wait_for_disconnect_async().await;
    }
}

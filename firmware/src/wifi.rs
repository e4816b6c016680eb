//! Glues esp-radio's WiFi station and embassy-net (DHCPv4, DNS, TCP) into the
//! runtime's link control, [`mqota_runtime::Link`]: `connect`, `reconnect`,
//! `is_connected`. Retry pacing is the runtime's (`mqota_runtime::Backoff`),
//! so every method here is a single attempt.
//!
//! The network stack itself is driven by [`net_task`], which the caller spawns;
//! sockets, `TcpClient` and `DnsSocket` are then made from the returned `Stack`.

use embassy_net::{Config as NetConfig, Runner, Stack, StackResources};
use embassy_time::{with_timeout, Duration};
use esp_hal::peripherals::WIFI;
use esp_radio::wifi::{
    sta::StationConfig, AuthenticationMethodConfig, Config as WifiConfig, ControllerConfig,
    Interface, WifiController,
};
use log::{info, warn};
use mqota_runtime::Link;

use crate::config::FirmwareConfig;

/// Sockets the stack can hold: DHCP, DNS, the MQTT connection, one HTTP download.
pub const SOCKETS: usize = 4;

/// Why the link is not up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkError {
    /// SSID or password is too long for WiFi: fix `MQOTA_WIFI_*` and rebuild.
    InvalidCredentials,
    /// The radio driver refused to start: report it; a reset may help.
    Radio,
    /// The access point did not accept us (absent, wrong password): retry later.
    Association,
    /// Associated, but no DHCP lease within the timeout: retry later.
    NoAddress,
}

/// A WiFi station with its IP stack.
pub struct WifiLink {
    controller: WifiController<'static>,
    stack: Stack<'static>,
    timeout: Duration,
}

impl WifiLink {
    /// Configures the station and creates the IP stack (DHCPv4). Spawn
    /// [`net_task`] with the returned runner before calling [`connect`](Self::connect).
    pub fn new(
        wifi: WIFI<'static>,
        config: &FirmwareConfig,
        resources: &'static mut StackResources<SOCKETS>,
        seed: u64,
    ) -> Result<(Self, Runner<'static, Interface>), LinkError> {
        let ssid = config
            .wifi_ssid
            .try_into()
            .map_err(|_| LinkError::InvalidCredentials)?;
        let auth = if config.wifi_password.is_empty() {
            AuthenticationMethodConfig::Open
        } else {
            let password = config
                .wifi_password
                .try_into()
                .map_err(|_| LinkError::InvalidCredentials)?;
            AuthenticationMethodConfig::Wpa2Personal(password)
        };
        let station = StationConfig::default()
            .with_ssid(ssid)
            .with_authentication(auth);
        let controller = WifiController::new(
            wifi,
            ControllerConfig::default().with_initial_config(WifiConfig::Station(station)),
        )
        .map_err(|e| {
            warn!("wifi: driver did not start: {e:?}");
            LinkError::Radio
        })?;
        let (stack, runner) = embassy_net::new(
            Interface::station(),
            NetConfig::dhcpv4(Default::default()),
            resources,
            seed,
        );
        let timeout = Duration::from_secs(u64::from(config.connect_timeout_secs));
        Ok((
            Self {
                controller,
                stack,
                timeout,
            },
            runner,
        ))
    }

    /// The IP stack, for sockets, `TcpClient` and `DnsSocket`.
    pub fn stack(&self) -> Stack<'static> {
        self.stack
    }

    /// Resolves when the access point drops us (at once if not associated).
    pub async fn wait_for_disconnect(&self) {
        if let Ok(info) = self.controller.wait_for_disconnect_async().await {
            warn!("wifi: disconnected: {:?}", info.reason);
        }
    }
}

impl Link for WifiLink {
    type Error = LinkError;

    /// Associates (unless already associated) and waits for a DHCP lease,
    /// each within the configured connect timeout.
    async fn connect(&mut self) -> Result<(), LinkError> {
        if !self.controller.is_connected() {
            match with_timeout(self.timeout, self.controller.connect_async()).await {
                Ok(Ok(info)) => info!("wifi: associated on channel {}", info.channel),
                Ok(Err(e)) => {
                    warn!("wifi: association failed: {e:?}");
                    return Err(LinkError::Association);
                }
                Err(_) => return Err(LinkError::Association),
            }
        }
        with_timeout(self.timeout, self.stack.wait_config_up())
            .await
            .map_err(|_| LinkError::NoAddress)?;
        if let Some(v4) = self.stack.config_v4() {
            info!("wifi: address {}", v4.address);
        }
        Ok(())
    }

    /// Drops a half-dead association (the driver may still believe in it)
    /// and makes one fresh attempt.
    async fn reconnect(&mut self) -> Result<(), LinkError> {
        // NotConnected is the usual answer here and not a failure.
        let _ = self.controller.disconnect_async().await;
        self.connect().await
    }

    /// Associated and holding a DHCP lease.
    fn is_connected(&self) -> bool {
        self.controller.is_connected() && self.stack.is_config_up()
    }
}

/// Drives the IP stack; spawn exactly one per [`WifiLink`].
#[embassy_executor::task]
pub async fn net_task(mut runner: Runner<'static, Interface>) -> ! {
    runner.run().await
}

//! What only the board knows: the radio link and the chip's reset and identity.
//!
//! The chip glue implements these two traits (around a hundred lines per
//! concern); the virtual device implements them over host facilities. The
//! runtime never names a concrete board.

/// Control of the network link underneath TCP (WiFi on the ESP32 boards).
///
/// The MQTT session asks [`Link::is_connected`] between packets; when it turns
/// false the session drops its TCP connection, calls [`Link::connect`] (the
/// first time the link is needed) or [`Link::reconnect`] (after a loss) and
/// joins the broker once the link is up.
#[allow(async_fn_in_trait)]
pub trait Link {
    /// Why the link could not be brought up.
    type Error: core::fmt::Debug;

    /// Bring the link up for the first time (associate, obtain an address).
    async fn connect(&mut self) -> Result<(), Self::Error>;

    /// Bring a lost link back. Called after [`Link::is_connected`] turned
    /// false; the caller paces repeated failures with its backoff.
    async fn reconnect(&mut self) -> Result<(), Self::Error>;

    /// Whether the link is currently up. Must be cheap: it is polled.
    fn is_connected(&self) -> bool;
}

/// The chip's identity and power control.
#[allow(async_fn_in_trait)]
pub trait Platform {
    /// Restart the chip. The bootloader then picks the slot that otadata
    /// selects. Never completes: a simulated device signals its harness and
    /// stays pending until the harness drops the task.
    async fn reboot(&mut self) -> !;

    /// A stable identifier of this device (e.g. derived from the WiFi MAC),
    /// used as MQTT client id and in topic names.
    fn device_id(&self) -> &str;

    /// An application-specific self-check run after an update before the new
    /// image is confirmed. The default has nothing to check and passes.
    async fn health_check(&mut self) -> bool {
        true
    }

    /// Why the chip started this time (the chip's reset reason; the virtual
    /// device's fault injection). Written to the field log and the status.
    fn boot_reason(&self) -> mqota_core::protocol::BootReason {
        mqota_core::protocol::BootReason::Unknown
    }

    /// The trial passed and the image is confirmed: the board can stand down
    /// whatever guards a trial boot (e.g. disarm the trial watchdog).
    fn confirmed(&mut self) {}
}

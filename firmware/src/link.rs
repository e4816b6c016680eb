//! Glues a network the application owns to the runtime's
//! [`mqota_runtime::Link`]: mqota only watches the embassy-net stack and
//! waits for it, while the application keeps its radio (or cable) connected.

use embassy_net::Stack;
use embassy_time::{with_timeout, Duration};
use mqota_runtime::Link;

/// Why the application's network is not usable yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StackLinkError {
    /// No link with an IPv4 configuration within the timeout. The runtime
    /// retries with backoff; if it persists, check the application's network
    /// bring-up.
    NotUp,
}

/// The application's embassy-net stack as the runtime's link.
pub struct StackLink {
    stack: Stack<'static>,
    timeout: Duration,
}

impl StackLink {
    /// `timeout` bounds one wait for the stack to come up; the runtime paces
    /// the retries.
    pub fn new(stack: Stack<'static>, timeout: Duration) -> Self {
        Self { stack, timeout }
    }
}

impl Link for StackLink {
    type Error = StackLinkError;

    async fn connect(&mut self) -> Result<(), StackLinkError> {
        with_timeout(self.timeout, self.stack.wait_config_up())
            .await
            .map_err(|_| StackLinkError::NotUp)
    }

    /// Reconnecting is the application's business; this waits for it.
    async fn reconnect(&mut self) -> Result<(), StackLinkError> {
        self.connect().await
    }

    fn is_connected(&self) -> bool {
        self.stack.is_link_up() && self.stack.is_config_up()
    }
}

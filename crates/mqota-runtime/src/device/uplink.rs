//! The way to the broker as one value: the MQTT session, the link under it,
//! and the pacing of reconnects (backoff and its random jitter). The loop,
//! the trial and a download all reach the broker through it.

use embassy_time::Duration;
use mqota_core::backoff::{Backoff, Jitter, XorShift32};
use mqota_core::protocol::{Progress, Topics, MAX_PROGRESS_JSON};

use crate::mqtt::{MqttError, MqttSession, QoS};
use crate::net::Connector;
use crate::platform::Link;

/// The command topics the device subscribes to.
pub(super) type Subscriptions<'t> = [&'t str; 5];

/// The session, the link it runs over, the reconnect pacing, and the topics
/// to subscribe to once connected.
pub(super) struct Uplink<'u, 's, C: Connector, L> {
    /// The MQTT session; publishing goes straight through it.
    pub(super) session: MqttSession<'s, C>,
    link: &'u mut L,
    /// Reconnect pacing: exponential, with full jitter.
    backoff: Backoff,
    /// Draws the jitter.
    rng: XorShift32,
    subs: Subscriptions<'u>,
}

impl<'u, 's, C: Connector, L: Link> Uplink<'u, 's, C, L> {
    /// Reconnects start at 500 ms and back off to 30 s; `seed` starts the
    /// jitter.
    pub(super) fn new(
        session: MqttSession<'s, C>,
        link: &'u mut L,
        subs: Subscriptions<'u>,
        seed: u32,
    ) -> Self {
        Self {
            session,
            link,
            backoff: Backoff::new(500, 30_000, Jitter::Full),
            rng: XorShift32::new(seed),
            subs,
        }
    }

    /// Whether the link (WiFi) is up.
    pub(super) fn link_is_connected(&self) -> bool {
        self.link.is_connected()
    }

    /// Brings the link and the session up, waiting out the backoff between
    /// tries; see [`MqttSession::maintain`].
    pub(super) async fn maintain(&mut self) -> Result<(), MqttError> {
        let rng = &mut self.rng;
        self.session
            .maintain(self.link, &mut self.backoff, &mut || rng.next_u32())
            .await
    }

    /// Subscribes to the command topics.
    pub(super) async fn subscribe(&mut self) -> Result<(), MqttError> {
        self.session.subscribe(&self.subs).await
    }

    /// How long to wait before the next try, from the same backoff as the
    /// reconnects.
    pub(super) fn retry_delay(&mut self) -> Duration {
        Duration::from_millis(self.backoff.next_delay(self.rng.next_u32()))
    }
}

/// Publishes a progress event at QoS 0 on `{prefix}/{id}/progress`, and a
/// copy on `{prefix}/progress` when `copy`: progress must never wait on the
/// broker. A lost event is superseded by the next; results also land in the
/// retained status.
pub(super) async fn publish_progress<C: Connector>(
    session: &mut MqttSession<'_, C>,
    topics: &Topics,
    p: &Progress,
    copy: bool,
) {
    let mut buf = [0u8; MAX_PROGRESS_JSON];
    if let Ok(n) = p.to_json(&mut buf) {
        let _ = session
            .publish(&topics.device_progress(), &buf[..n], QoS::AtMostOnce, false)
            .await;
        if copy {
            let _ = session
                .publish(&topics.progress(), &buf[..n], QoS::AtMostOnce, false)
                .await;
        }
    }
}

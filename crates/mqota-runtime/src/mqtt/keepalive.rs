//! The keep-alive rule, apart from I/O: when to send a PINGREQ and when a
//! missing PINGRESP means the connection is dead. Time is an input, so the
//! rule is tested with a fake clock (below) rather than by waiting; the
//! session ([`super::MqttSession`]) asks [`KeepAliveTimer::poll`] in its read
//! loop and performs what it says, as rumqttc's `state.rs` is driven by its
//! event loop.
//!
//! The rule: after half the negotiated keep-alive passed without the device
//! sending anything, send a PINGREQ; if its PINGRESP has not come within the
//! other half, the connection is dead. The broker's own limit is 1.5 times
//! the keep-alive, so it never drops a device that follows this.

use embassy_time::{Duration, Instant};

/// What the session does next about keep-alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeepAliveDue {
    /// Nothing until this instant (wake up then and ask again).
    Until(Instant),
    /// Send a PINGREQ now, then call [`KeepAliveTimer::pinged`].
    Ping,
    /// The PINGRESP did not come in time: drop the connection.
    Dead,
}

/// Keep-alive state of one connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeepAliveTimer {
    half: Duration,
    last_tx: Instant,
    ping_sent: Option<Instant>,
}

impl KeepAliveTimer {
    /// For a keep-alive of `secs` seconds (at least 1), nothing sent yet.
    pub(crate) fn new(secs: u16, now: Instant) -> Self {
        Self {
            half: Duration::from_millis(u64::from(secs.max(1)) * 500),
            last_tx: now,
            ping_sent: None,
        }
    }

    /// A new connection is up at `now`: nothing is owed.
    pub(crate) fn connected(&mut self, now: Instant) {
        self.last_tx = now;
        self.ping_sent = None;
    }

    /// A packet went out at `now`: the broker heard from us.
    pub(crate) fn sent(&mut self, now: Instant) {
        self.last_tx = now;
    }

    /// A PINGREQ went out at `now`.
    pub(crate) fn pinged(&mut self, now: Instant) {
        self.last_tx = now;
        self.ping_sent = Some(now);
    }

    /// The PINGRESP arrived.
    pub(crate) fn pong(&mut self) {
        self.ping_sent = None;
    }

    /// The connection is gone: a PINGREQ in flight is owed no answer.
    pub(crate) fn disconnected(&mut self) {
        self.ping_sent = None;
    }

    /// What is due at `now`.
    pub(crate) fn poll(&self, now: Instant) -> KeepAliveDue {
        match self.ping_sent {
            Some(sent) if now >= sent + self.half => KeepAliveDue::Dead,
            Some(sent) => KeepAliveDue::Until(sent + self.half),
            None if now >= self.last_tx + self.half => KeepAliveDue::Ping,
            None => KeepAliveDue::Until(self.last_tx + self.half),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Instant {
        Instant::from_millis(ms)
    }

    #[test]
    fn a_quiet_connection_pings_after_half_the_keep_alive() {
        let mut k = KeepAliveTimer::new(10, at(0));
        assert_eq!(k.poll(at(4_999)), KeepAliveDue::Until(at(5_000)));
        assert_eq!(k.poll(at(5_000)), KeepAliveDue::Ping);
        k.pinged(at(5_000));
        assert_eq!(k.poll(at(5_001)), KeepAliveDue::Until(at(10_000)));
    }

    #[test]
    fn traffic_pushes_the_ping_out() {
        let mut k = KeepAliveTimer::new(10, at(0));
        k.sent(at(4_000));
        assert_eq!(k.poll(at(5_000)), KeepAliveDue::Until(at(9_000)));
        assert_eq!(k.poll(at(9_000)), KeepAliveDue::Ping);
    }

    #[test]
    fn a_missing_pong_within_the_other_half_is_a_dead_connection() {
        let mut k = KeepAliveTimer::new(10, at(0));
        k.pinged(at(5_000));
        // Traffic of our own does not prove the broker is alive.
        k.sent(at(7_000));
        assert_eq!(k.poll(at(9_999)), KeepAliveDue::Until(at(10_000)));
        assert_eq!(k.poll(at(10_000)), KeepAliveDue::Dead);
    }

    #[test]
    fn a_pong_clears_the_debt_and_the_next_ping_follows_the_last_send() {
        let mut k = KeepAliveTimer::new(10, at(0));
        k.pinged(at(5_000));
        k.pong();
        assert_eq!(k.poll(at(9_000)), KeepAliveDue::Until(at(10_000)));
        assert_eq!(k.poll(at(10_000)), KeepAliveDue::Ping);
    }

    #[test]
    fn a_new_connection_owes_nothing() {
        let mut k = KeepAliveTimer::new(10, at(0));
        k.pinged(at(5_000));
        k.disconnected();
        k.connected(at(20_000));
        assert_eq!(k.poll(at(20_000)), KeepAliveDue::Until(at(25_000)));
    }

    #[test]
    fn a_zero_keep_alive_is_treated_as_one_second() {
        let k = KeepAliveTimer::new(0, at(0));
        assert_eq!(k.poll(at(499)), KeepAliveDue::Until(at(500)));
        assert_eq!(k.poll(at(500)), KeepAliveDue::Ping);
    }
}

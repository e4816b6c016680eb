//! The in-flight queue, apart from I/O: the QoS 1 publications whose PUBACK
//! has not come, kept (at most [`MAX_INFLIGHT`]) so they can go out again
//! after a reconnect. Time is an input, so the ack deadline is tested with a
//! fake clock (below) rather than by waiting; the session
//! ([`super::MqttSession`]) records what it sent and what the broker
//! acknowledged, and asks the queue what to resend, as rumqttc's `state.rs`
//! keeps its outgoing publishes apart from the event loop that writes them.
//!
//! The rules:
//! * a copy is made before the publish goes out, so a message that does not
//!   fit is refused without touching the connection;
//! * a PUBACK (or a refusal) for a packet identifier forgets that entry;
//! * after a reconnect the entries go out again oldest first (MQTT's ordering
//!   rule for resends), under their old packet identifier (DUP) when the
//!   broker kept the session, as new messages when it did not;
//! * each entry's PUBACK is awaited until the ack timeout after it was last
//!   sent.
//!
//! The queue is generic over the packet identifier so it is tested without
//! the MQTT client's types.

use embassy_time::{Duration, Instant};
use heapless::{String, Vec};

use super::{MqttError, MAX_INFLIGHT, MAX_QOS1_PAYLOAD, MAX_TOPIC_LEN};

/// A QoS 1 publication kept until its PUBACK arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outgoing<P> {
    /// Its packet identifier on the current connection; `None` until sent.
    pub(crate) pid: Option<P>,
    /// The topic it was published to.
    pub(crate) topic: String<MAX_TOPIC_LEN>,
    /// Its payload.
    pub(crate) payload: Vec<u8, MAX_QOS1_PAYLOAD>,
    /// Published with the retain flag.
    pub(crate) retain: bool,
    /// When it last went out.
    sent: Instant,
}

impl<P> Outgoing<P> {
    /// A copy of a publication about to be sent; `TooLong` when the topic or
    /// payload does not fit the queue.
    pub(crate) fn copy(topic: &str, payload: &[u8], retain: bool) -> Result<Self, MqttError> {
        Ok(Self {
            pid: None,
            topic: String::try_from(topic).map_err(|_| MqttError::TooLong)?,
            payload: Vec::from_slice(payload).map_err(|_| MqttError::TooLong)?,
            retain,
            sent: Instant::from_ticks(0),
        })
    }
}

/// How the entry at an index goes out again after a reconnect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Resend<P> {
    /// The packet identifier to resend under (a DUP); `None`: a new message.
    pub(crate) pid: Option<P>,
    /// The topic.
    pub(crate) topic: String<MAX_TOPIC_LEN>,
    /// The payload.
    pub(crate) payload: Vec<u8, MAX_QOS1_PAYLOAD>,
    /// The retain flag.
    pub(crate) retain: bool,
}

/// The QoS 1 publications awaiting their PUBACK, oldest first.
#[derive(Debug)]
pub(crate) struct Inflight<P> {
    entries: Vec<Outgoing<P>, MAX_INFLIGHT>,
    ack_timeout: Duration,
}

impl<P: Copy + PartialEq> Inflight<P> {
    /// Empty; a PUBACK is awaited `ack_timeout` after a publish went out.
    pub(crate) fn new(ack_timeout: Duration) -> Self {
        Self {
            entries: Vec::new(),
            ack_timeout,
        }
    }

    /// How many await their PUBACK.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// No room for another QoS 1 publish until a PUBACK arrives.
    pub(crate) fn is_full(&self) -> bool {
        self.entries.is_full()
    }

    /// `copy` went out at `now` under `pid`. `Busy` (and not kept) when the
    /// queue is full: the caller makes room first.
    pub(crate) fn sent(
        &mut self,
        mut copy: Outgoing<P>,
        pid: P,
        now: Instant,
    ) -> Result<(), MqttError> {
        copy.pid = Some(pid);
        copy.sent = now;
        self.entries.push(copy).map_err(|_| MqttError::Busy)
    }

    /// Until when the PUBACK for `pid` is awaited; `None` when nothing with
    /// that identifier is in flight.
    pub(crate) fn ack_deadline(&self, pid: P) -> Option<Instant> {
        self.entries
            .iter()
            .find(|o| o.pid == Some(pid))
            .map(|o| o.sent + self.ack_timeout)
    }

    /// The broker answered `pid` (PUBACK, or a refusal: either way it will
    /// never be sent again). Returns whether it was in flight.
    pub(crate) fn acknowledged(&mut self, pid: P) -> bool {
        match self.entries.iter().position(|o| o.pid == Some(pid)) {
            Some(i) => {
                self.entries.remove(i);
                true
            }
            None => false,
        }
    }

    /// How the entry at `index` (0 is the oldest) goes out again after a
    /// reconnect: under its old identifier when the broker kept the session
    /// (`session_present`), as a new message otherwise (the broker never saw
    /// these identifiers). `None` past the end.
    pub(crate) fn resend(&self, index: usize, session_present: bool) -> Option<Resend<P>> {
        let o = self.entries.get(index)?;
        Some(Resend {
            pid: if session_present { o.pid } else { None },
            topic: o.topic.clone(),
            payload: o.payload.clone(),
            retain: o.retain,
        })
    }

    /// The entry at `index` went out again at `now`, under `pid`.
    pub(crate) fn resent(&mut self, index: usize, pid: Option<P>, now: Instant) {
        if let Some(o) = self.entries.get_mut(index) {
            o.pid = pid;
            o.sent = now;
        }
    }

    /// The client refused to resend the entry at `index`: nothing will
    /// retry it.
    pub(crate) fn drop_at(&mut self, index: usize) {
        if index < self.entries.len() {
            self.entries.remove(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::ToOwned;

    const ACK: Duration = Duration::from_secs(5);

    fn at(ms: u64) -> Instant {
        Instant::from_millis(ms)
    }

    fn copy(topic: &str, payload: &[u8]) -> Outgoing<u16> {
        Outgoing::copy(topic, payload, true).unwrap()
    }

    #[test]
    fn a_pubacks_deadline_runs_from_when_its_publish_went_out() {
        let mut q = Inflight::new(ACK);
        q.sent(copy("a", b"1"), 7, at(1_000)).unwrap();
        q.sent(copy("b", b"2"), 8, at(3_000)).unwrap();
        assert_eq!(q.ack_deadline(7), Some(at(6_000)));
        assert_eq!(q.ack_deadline(8), Some(at(8_000)));
        assert_eq!(q.ack_deadline(9), None);
    }

    #[test]
    fn the_queue_holds_max_inflight_and_refuses_one_more() {
        let mut q = Inflight::new(ACK);
        for pid in 0..MAX_INFLIGHT as u16 {
            assert!(!q.is_full());
            q.sent(copy("t", b"x"), pid + 1, at(0)).unwrap();
        }
        assert!(q.is_full());
        assert_eq!(q.sent(copy("late", b"y"), 99, at(0)), Err(MqttError::Busy));
        assert_eq!(q.len(), MAX_INFLIGHT);
        assert_eq!(q.ack_deadline(99), None, "the refused one is not kept");
    }

    #[test]
    fn a_puback_forgets_only_its_own_publication() {
        let mut q = Inflight::new(ACK);
        q.sent(copy("a", b"1"), 1, at(0)).unwrap();
        q.sent(copy("b", b"2"), 2, at(0)).unwrap();
        assert!(!q.acknowledged(3), "an unknown identifier changes nothing");
        assert_eq!(q.len(), 2);
        assert!(q.acknowledged(1));
        assert_eq!(q.len(), 1);
        assert_eq!(q.resend(0, true).unwrap().topic.as_str(), "b");
        assert!(!q.acknowledged(1), "the same PUBACK twice is nothing new");
    }

    #[test]
    fn reconnection_resends_oldest_first_as_dup_only_when_the_broker_kept_the_session() {
        let mut q = Inflight::new(ACK);
        q.sent(copy("first", b"1"), 10, at(0)).unwrap();
        q.sent(copy("second", b"2"), 11, at(100)).unwrap();
        let kept: std::vec::Vec<_> = (0..)
            .map_while(|i| q.resend(i, true))
            .map(|r| (r.topic.as_str().to_owned(), r.pid))
            .collect();
        assert_eq!(
            kept,
            [
                ("first".to_owned(), Some(10)),
                ("second".to_owned(), Some(11))
            ]
        );
        let fresh: std::vec::Vec<_> = (0..).map_while(|i| q.resend(i, false)).collect();
        assert_eq!(fresh.len(), 2);
        assert!(fresh.iter().all(|r| r.pid.is_none() && r.retain));
        assert_eq!(fresh[1].payload.as_slice(), b"2");
    }

    #[test]
    fn a_resend_restarts_the_ack_deadline_under_the_new_identifier() {
        let mut q = Inflight::new(ACK);
        q.sent(copy("a", b"1"), 1, at(0)).unwrap();
        q.resent(0, Some(4), at(60_000));
        assert_eq!(q.ack_deadline(1), None);
        assert_eq!(q.ack_deadline(4), Some(at(65_000)));
        assert!(q.acknowledged(4));
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn a_refused_resend_is_dropped_and_the_rest_keep_their_order() {
        let mut q = Inflight::new(ACK);
        q.sent(copy("a", b"1"), 1, at(0)).unwrap();
        q.sent(copy("b", b"2"), 2, at(0)).unwrap();
        q.drop_at(0);
        q.drop_at(5);
        assert_eq!(q.len(), 1);
        assert_eq!(q.resend(0, true).unwrap().topic.as_str(), "b");
    }

    #[test]
    fn a_publication_too_large_to_keep_is_refused_before_it_is_sent() {
        let long_topic = "t".repeat(MAX_TOPIC_LEN + 1);
        assert_eq!(
            Outgoing::<u16>::copy(&long_topic, b"x", false),
            Err(MqttError::TooLong)
        );
        assert_eq!(
            Outgoing::<u16>::copy("t", &[0; MAX_QOS1_PAYLOAD + 1], false),
            Err(MqttError::TooLong)
        );
        assert!(Outgoing::<u16>::copy("t", &[0; MAX_QOS1_PAYLOAD], false).is_ok());
    }
}

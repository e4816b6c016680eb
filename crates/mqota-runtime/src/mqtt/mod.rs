//! The device's MQTT session: one persistent MQTT v5 session kept alive across
//! broker restarts and link losses.
//!
//! Built on rust-mqtt 0.6, which deliberately leaves reconnects, keep-alive
//! and retries to its user; this module is that user.
//!
//! # Session model
//!
//! * CONNECT with clean start off and a session expiry, so the broker keeps
//!   subscriptions and queued QoS 1 messages while the device is away.
//! * A last will on an availability topic, QoS 1, retained, with a payload the caller
//!   supplies (typically "offline"): the broker publishes it when the TCP
//!   connection dies without a DISCONNECT.
//! * A non-zero keep-alive; the session sends PINGREQ after half of it passed
//!   without traffic and gives up on the connection when the PINGRESP does
//!   not arrive within the other half (the rule, apart from I/O and tested
//!   with a fake clock: `keepalive.rs`).
//! * Subscriptions are remembered and sent again when the broker answers a
//!   reconnect without the old session (it restarted without persistence).
//! * QoS 1 publications whose PUBACK has not arrived are kept (bounded, see
//!   [`MAX_INFLIGHT`]) and sent again after a reconnect: as a DUP resend when
//!   the broker kept the session, as a new message when it did not (the
//!   queue, apart from I/O and tested with a fake clock: `inflight.rs`).
//!
//! # Incoming messages
//!
//! Mosquitto may deliver a PUBLISH before the SUBACK or PUBACK the session is
//! waiting for. Every place that reads from the broker therefore copies
//! incoming PUBLISH packets into a small bounded inbox ([`INBOX_DEPTH`]);
//! [`MqttSession::poll`], [`MqttSession::try_recv`] and
//! [`MqttSession::next_message`] hand them out in arrival order.
//!
//! # Bounded waiting
//!
//! No call waits unboundedly on the broker: connecting, writing a packet and
//! reading the body of a packet are bounded by [`MqttConfig::io_timeout`];
//! waiting for SUBACK/PUBACK by [`MqttConfig::ack_timeout`]. Progress reports
//! during a download should use [`QoS::AtMostOnce`]: that publish returns as
//! soon as the packet is written, so it never holds the flash pipeline for
//! longer than one socket write. QoS 1 publish returns
//! [`Delivery::InFlight`] when the PUBACK is late instead of waiting on.
//!
//! # Cancellation
//!
//! Every method may be cancelled (dropped) at any await point. Cancelling
//! while a packet is half read or half written leaves the connection in an
//! unknown state; the session notices on the next call, drops that connection
//! and reports [`MqttError::ConnectionLost`], so the caller reconnects.
//! Messages are never corrupted by a cancellation.

use core::num::NonZero;

use embassy_futures::select::{select, Either};
use embassy_time::{with_timeout, Duration, Instant, Timer};
use heapless::{Deque, String, Vec};
use rust_mqtt::buffer::BumpBuffer;
use rust_mqtt::client::event::Event;
use rust_mqtt::client::options::{
    ConnectOptions, DisconnectOptions, PublicationOptions, RetainHandling, SubscriptionOptions,
    TopicReference, WillOptions,
};
use rust_mqtt::client::{Client, MqttError as ClientError};
use rust_mqtt::config::{KeepAlive, SessionExpiryInterval};
use rust_mqtt::types::{MqttBinary, MqttString, PacketIdentifier, TopicFilter, TopicName};
use rust_mqtt::Bytes;

use crate::conn::{KillSwitch, MqttConn};
use crate::net::{ConnectError, Connector};
use crate::platform::Link;
use crate::tls::TlsFailure;
use inflight::{Inflight, Outgoing};
use keepalive::{KeepAliveDue, KeepAliveTimer};
use mqota_core::backoff::Backoff;

/// Bytes of the receive arena: the largest MQTT packet the device accepts.
/// The broker is told this limit in CONNECT and does not send larger packets.
pub const MQTT_RX_BUFFER: usize = 2048;
/// Longest topic name the session stores (subscriptions, incoming messages,
/// QoS 1 copies kept for resending).
pub const MAX_TOPIC_LEN: usize = 128;
/// Largest payload of an incoming message kept in the inbox. Larger messages
/// are dropped and counted ([`MqttSession::dropped_messages`]).
pub const MAX_INCOMING_PAYLOAD: usize = 1536;
/// Incoming messages buffered until the caller takes them. When full, further
/// messages are dropped and counted.
pub const INBOX_DEPTH: usize = 4;
/// Topic filters the session remembers (and re-subscribes after a reconnect).
pub const MAX_SUBSCRIPTIONS: usize = 8;
/// QoS 1 publications that may await their PUBACK at the same time. A copy of
/// each is kept for resending after a reconnect.
pub const MAX_INFLIGHT: usize = 2;
/// Largest payload of a QoS 1 publication (its copy is kept until the PUBACK).
/// QoS 0 publications are limited only by the broker.
pub const MAX_QOS1_PAYLOAD: usize = 512;

// How many incoming QoS 1 handshakes rust-mqtt tracks at once. They are
// acknowledged as soon as the packet is read, so a handful is plenty.
const RECEIVE_MAXIMUM: usize = 4;
// rust-mqtt recommends room for at least one user property to detect a
// protocol error it would otherwise miss.
const MAX_USER_PROPERTIES: usize = 1;

type MqttClient<'a, C> = Client<
    'a,
    'a,
    MqttConn<'a, C>,
    BumpBuffer<'a>,
    MAX_SUBSCRIPTIONS,
    RECEIVE_MAXIMUM,
    MAX_INFLIGHT,
    0,
    MAX_USER_PROPERTIES,
    0,
    0,
>;

/// Memory the session borrows for its whole life: the receive arena and the
/// switch the session uses to cut its own connection.
///
/// ```text
/// let mut rx = [0u8; MQTT_RX_BUFFER];
/// let mut buffers = MqttBuffers::new(&mut rx);
/// let mut session = MqttSession::new(&tcp, &dns, &mut buffers, config);
/// ```
pub struct MqttBuffers<'a> {
    rx: BumpBuffer<'a>,
    kill: KillSwitch,
}

impl<'a> MqttBuffers<'a> {
    /// Wraps the receive arena.
    pub fn new(rx: &'a mut [u8; MQTT_RX_BUFFER]) -> Self {
        Self {
            rx: BumpBuffer::new(rx),
            kill: KillSwitch::new(),
        }
    }
}

/// Quality of service of a publication. QoS 2 is not offered: the OTA
/// protocol is idempotent, so at-least-once suffices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum QoS {
    /// Fire and forget. Use for progress reports.
    AtMostOnce,
    /// Acknowledged by the broker; resent after a reconnect until it is.
    AtLeastOnce,
}

/// What [`MqttSession::publish`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Delivery {
    /// QoS 0: the packet was written to the connection.
    Sent,
    /// QoS 1: the broker acknowledged it.
    Acknowledged,
    /// QoS 1: the PUBACK did not arrive within the ack timeout. The message
    /// stays in flight and is resent after a reconnect; do not publish it again.
    InFlight,
}

/// Errors of the MQTT session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum MqttError {
    /// There is no connection to the broker. Call [`MqttSession::maintain`]
    /// (or [`MqttSession::connect`]).
    NotConnected,
    /// The connection broke (broker gone, link down, keep-alive unanswered,
    /// an interrupted read). The session has dropped it; reconnect with
    /// backoff via [`MqttSession::maintain`].
    ConnectionLost,
    /// Resolving the broker's name or opening TCP to it failed. Retry after
    /// backoff; [`MqttSession::maintain`] does.
    Network,
    /// The broker did not answer in time (CONNACK, SUBACK). The connection
    /// has been dropped; retry after backoff.
    Timeout,
    /// The TLS session to the broker failed or was refused (untrusted
    /// broker certificate, wrong name, this device's certificate refused).
    /// Retrying after backoff is harmless, but only a change of
    /// configuration helps; report it.
    Tls(TlsFailure),
    /// The broker URL is `mqtts://` and this device has no TLS
    /// configuration. Configure it; do not retry.
    TlsUnavailable,
    /// The broker refused the CONNECT with this MQTT v5 reason code (e.g.
    /// 0x87 not authorized). Retrying helps only if the broker's
    /// configuration changes; report it.
    Refused(u8),
    /// The broker answered a SUBSCRIBE or PUBLISH with this failure reason
    /// code. The connection is still up; report it, do not retry blindly.
    Rejected(u8),
    /// All [`MAX_INFLIGHT`] QoS 1 slots still await their PUBACK. Keep polling
    /// and try again later, or publish with QoS 0.
    Busy,
    /// A topic is not valid MQTT syntax (or a filter was given where a name
    /// is needed). A programming or configuration error: do not retry.
    InvalidTopic,
    /// A topic or payload exceeds the documented bounds ([`MAX_TOPIC_LEN`],
    /// [`MAX_QOS1_PAYLOAD`], [`MAX_SUBSCRIPTIONS`]). Do not retry.
    TooLong,
    /// The broker violated the protocol (the connection has been dropped;
    /// report it, the next [`MqttSession::maintain`] reconnects) or the
    /// client library refused an operation the broker does not support (the
    /// connection stays up; report it).
    Protocol,
}

/// Tunables of the session. [`MqttConfig::new`] fills sensible defaults.
/// Its `Debug` output never shows the password.
#[derive(Clone)]
pub struct MqttConfig<'a> {
    /// Broker host name or IP literal.
    pub host: &'a str,
    /// Broker TCP port.
    pub port: u16,
    /// Connect over TLS (`mqtts://`): the broker must present a certificate
    /// from the pinned fleet CA for [`MqttConfig::host`].
    pub tls: bool,
    /// MQTT client identifier; also the key of the persistent session.
    pub client_id: &'a str,
    /// Topic of the last will (the device's retained availability topic).
    pub will_topic: &'a str,
    /// Payload of the last will: `offline`.
    pub will_payload: &'a [u8],
    /// User name sent in CONNECT, for brokers that want a login.
    pub username: Option<&'a str>,
    /// Password sent in CONNECT. MQTT v5 allows a password without a user
    /// name; most brokers still want both.
    pub password: Option<&'a [u8]>,
    /// Keep-alive in seconds; zero is raised to one (a zero keep-alive is
    /// refused by some brokers and would hide dead connections).
    pub keep_alive_secs: u16,
    /// How long the broker keeps the session after the connection is lost.
    pub session_expiry_secs: u32,
    /// Bound on one network step: DNS plus TCP connect plus CONNACK, writing
    /// one packet, reading the body of one packet.
    pub io_timeout: Duration,
    /// Bound on waiting for a SUBACK or PUBACK.
    pub ack_timeout: Duration,
    /// How often [`MqttSession::next_message`] checks [`Link::is_connected`]
    /// while no message arrives.
    pub link_check_interval: Duration,
    /// Whether subscriptions ask the broker for retained messages. `false`
    /// (the default) subscribes with MQTT 5 retain handling 2, "do not
    /// send": a device subscribes only to command topics, and a retained
    /// command must never be replayed to it.
    pub replay_retained: bool,
}

impl<'a> MqttConfig<'a> {
    /// A configuration with keep-alive 30 s, session expiry 1 h, I/O timeout
    /// 10 s, ack timeout 5 s and a link check every second.
    pub fn new(
        host: &'a str,
        port: u16,
        client_id: &'a str,
        will_topic: &'a str,
        will_payload: &'a [u8],
    ) -> Self {
        Self {
            host,
            port,
            tls: false,
            client_id,
            will_topic,
            will_payload,
            username: None,
            password: None,
            keep_alive_secs: 30,
            session_expiry_secs: 3600,
            io_timeout: Duration::from_secs(10),
            ack_timeout: Duration::from_secs(5),
            link_check_interval: Duration::from_secs(1),
            replay_retained: false,
        }
    }
}

impl core::fmt::Debug for MqttConfig<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MqttConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("client_id", &self.client_id)
            .field("will_topic", &self.will_topic)
            .field("will_payload", &self.will_payload)
            .field("username", &self.username)
            .field("password", &self.password.map(|_| "<redacted>"))
            .field("keep_alive_secs", &self.keep_alive_secs)
            .field("session_expiry_secs", &self.session_expiry_secs)
            .field("io_timeout", &self.io_timeout)
            .field("ack_timeout", &self.ack_timeout)
            .field("link_check_interval", &self.link_check_interval)
            .field("replay_retained", &self.replay_retained)
            .finish()
    }
}

/// A message received on a subscribed topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The topic it was published to.
    pub topic: String<MAX_TOPIC_LEN>,
    /// The application payload.
    pub payload: Vec<u8, MAX_INCOMING_PAYLOAD>,
    /// Whether the broker delivered it from its retained store.
    pub retain: bool,
}

/// What the session learnt from [`MqttSession::connect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Connected {
    /// The broker still had this client's session (subscriptions and queued
    /// messages survived). When false the session re-subscribed itself.
    pub session_present: bool,
}

/// Acknowledgements observed while reading from the broker.
#[derive(Clone, Copy)]
enum Observed {
    Message,
    Suback(PacketIdentifier, u8),
    Puback(PacketIdentifier, Result<(), u8>),
    Other,
}

/// One MQTT v5 session with a broker, generic over the TCP stack.
pub struct MqttSession<'a, C: Connector + 'a> {
    net: &'a C,
    config: MqttConfig<'a>,
    kill: &'a KillSwitch,
    client: MqttClient<'a, C::Stream<'a>>,
    // The client holds a transport (healthy or failed) that must be aborted
    // before the next connect.
    has_net: bool,
    up: bool,
    // The link has been up at least once: a later loss is brought back with
    // `Link::reconnect`, the first bring-up is `Link::connect`.
    link_was_up: bool,
    // A non-cancel-safe client call was in progress; if this is still set at
    // the next call, that call was cancelled and the stream is out of step.
    busy: bool,
    keep_alive: KeepAliveTimer,
    inbox: Deque<Message, INBOX_DEPTH>,
    dropped: u32,
    subscriptions: Vec<String<MAX_TOPIC_LEN>, MAX_SUBSCRIPTIONS>,
    inflight: Inflight<PacketIdentifier>,
}

impl<'a, C: Connector + 'a> MqttSession<'a, C> {
    /// A disconnected session. Nothing touches the network until
    /// [`MqttSession::connect`] or [`MqttSession::maintain`].
    pub fn new(net: &'a C, buffers: &'a mut MqttBuffers<'a>, mut config: MqttConfig<'a>) -> Self {
        config.keep_alive_secs = config.keep_alive_secs.max(1);
        let keep_alive = KeepAliveTimer::new(config.keep_alive_secs, Instant::now());
        let inflight = Inflight::new(config.ack_timeout);
        let MqttBuffers { rx, kill } = buffers;
        Self {
            net,
            config,
            kill,
            client: Client::new(rx),
            has_net: false,
            up: false,
            link_was_up: false,
            busy: false,
            keep_alive,
            inbox: Deque::new(),
            dropped: 0,
            subscriptions: Vec::new(),
            inflight,
        }
    }

    /// Whether a connection to the broker is up (as far as the session knows).
    pub fn is_connected(&self) -> bool {
        self.up && !self.busy
    }

    /// Incoming messages dropped because the inbox was full or the payload
    /// exceeded [`MAX_INCOMING_PAYLOAD`].
    pub fn dropped_messages(&self) -> u32 {
        self.dropped
    }

    /// QoS 1 publications still awaiting their PUBACK.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// The topic filters the session keeps subscribed.
    pub fn subscriptions(&self) -> &[String<MAX_TOPIC_LEN>] {
        &self.subscriptions
    }

    /// One connection attempt: resolve, TCP connect, CONNECT with will and
    /// persistent session, then restore subscriptions and in-flight QoS 1
    /// messages. An existing connection is dropped first.
    pub async fn connect(&mut self) -> Result<Connected, MqttError> {
        self.drop_connection().await;
        self.kill.rearm();

        let will_topic = topic_name(self.config.will_topic)?;
        let will_payload =
            MqttBinary::try_from(self.config.will_payload).map_err(|_| MqttError::TooLong)?;
        let client_id =
            MqttString::from_str(self.config.client_id).map_err(|_| MqttError::TooLong)?;
        let keep_alive = NonZero::new(self.config.keep_alive_secs).unwrap_or(NonZero::<u16>::MIN);
        let expiry = match NonZero::new(self.config.session_expiry_secs) {
            Some(s) => SessionExpiryInterval::Seconds(s),
            None => SessionExpiryInterval::EndOnDisconnect,
        };
        let mut options = ConnectOptions::new()
            .keep_alive(KeepAlive::Seconds(keep_alive))
            .session_expiry_interval(expiry)
            .maximum_packet_size(NonZero::new(MQTT_RX_BUFFER as u32).unwrap_or(NonZero::<u32>::MAX))
            .will(
                WillOptions::new(will_topic, will_payload)
                    .at_least_once()
                    .retain(),
            );
        if let Some(user) = self.config.username {
            options =
                options.user_name(MqttString::from_str(user).map_err(|_| MqttError::TooLong)?);
        }
        if let Some(password) = self.config.password {
            options =
                options.password(MqttBinary::try_from(password).map_err(|_| MqttError::TooLong)?);
        }

        let io_timeout = self.config.io_timeout;
        let stack: &'a C = self.net;
        let stream = match with_timeout(
            io_timeout,
            stack.connect(self.config.host, self.config.port, self.config.tls),
        )
        .await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(ConnectError::Tls(f))) => return Err(MqttError::Tls(f)),
            Ok(Err(ConnectError::TlsUnavailable)) => return Err(MqttError::TlsUnavailable),
            _ => {
                debug!("mqtt: connect failed");
                return Err(MqttError::Network);
            }
        };
        let _ = stack.take_tls_failure();

        self.has_net = true;
        self.busy = true;
        let result = with_timeout(
            io_timeout,
            self.client
                .connect(MqttConn::new(stream, self.kill), &options, Some(client_id)),
        )
        .await;
        self.busy = false;
        let outcome = match result {
            Ok(Ok(connected)) => Ok(connected.session_present),
            Ok(Err(ClientError::Disconnect { reason, .. })) => {
                Err(MqttError::Refused(reason.value()))
            }
            // A server that refuses the client's certificate says so only
            // after the handshake, in an alert the first read meets.
            Ok(Err(ClientError::Network(_))) => Err(match stack.take_tls_failure() {
                Some(f) => MqttError::Tls(f),
                None => MqttError::Network,
            }),
            Ok(Err(_)) => Err(MqttError::Protocol),
            Err(_) => Err(MqttError::Timeout),
        };
        self.reset_arena();
        let session_present = match outcome {
            Ok(present) => present,
            Err(e) => {
                warn!("mqtt: connect failed");
                self.drop_connection().await;
                return Err(e);
            }
        };

        info!("mqtt: connected (session present: {})", session_present);
        self.up = true;
        self.keep_alive.connected(Instant::now());

        if !session_present {
            self.resubscribe().await?;
        }
        self.resend_inflight(session_present).await?;
        Ok(Connected { session_present })
    }

    /// Subscribes to each topic filter (QoS 1) and waits, bounded by the ack
    /// timeout, for every SUBACK. The filters are remembered and subscribed
    /// again whenever the broker lost the session. Filters already
    /// subscribed are skipped.
    pub async fn subscribe(&mut self, filters: &[&str]) -> Result<(), MqttError> {
        let mut fresh: Vec<String<MAX_TOPIC_LEN>, MAX_SUBSCRIPTIONS> = Vec::new();
        for filter in filters {
            let owned = bounded_string(filter)?;
            let checked = MqttString::from_str(filter).map_err(|_| MqttError::TooLong)?;
            TopicFilter::new(checked).ok_or(MqttError::InvalidTopic)?;
            if self.subscriptions.contains(&owned) || fresh.contains(&owned) {
                continue;
            }
            fresh.push(owned).map_err(|_| MqttError::TooLong)?;
        }
        if self.subscriptions.len() + fresh.len() > MAX_SUBSCRIPTIONS {
            return Err(MqttError::TooLong);
        }
        for f in &fresh {
            // Cannot fail: capacity was checked above.
            let _ = self.subscriptions.push(f.clone());
        }
        if !self.up {
            // Sent on the next connect.
            return Ok(());
        }
        self.send_subscriptions(&fresh).await
    }

    async fn resubscribe(&mut self) -> Result<(), MqttError> {
        let all = self.subscriptions.clone();
        self.send_subscriptions(&all).await
    }

    async fn send_subscriptions(
        &mut self,
        filters: &[String<MAX_TOPIC_LEN>],
    ) -> Result<(), MqttError> {
        self.check_busy().await?;
        let mut pending: Vec<PacketIdentifier, MAX_SUBSCRIPTIONS> = Vec::new();
        for filter in filters {
            let string = MqttString::from_str(filter.as_str()).map_err(|_| MqttError::TooLong)?;
            let filter = TopicFilter::new(string).ok_or(MqttError::InvalidTopic)?;
            // Every topic the device subscribes to carries commands, and a
            // command must never be replayed from the retained store: unless
            // told otherwise, ask the broker not to send retained messages
            // at all (retain handling 2). The device also drops any that
            // arrive anyway.
            let options = SubscriptionOptions::new().at_least_once();
            let options = if self.config.replay_retained {
                options
            } else {
                options.retain_handling(RetainHandling::NeverSend)
            };
            self.busy = true;
            let sent = with_timeout(
                self.config.io_timeout,
                self.client.subscribe(filter, &options),
            )
            .await;
            self.busy = false;
            let pid = match sent {
                Ok(Ok(pid)) => pid,
                Ok(Err(e)) if e.is_recoverable() => return Err(error_kind(&e)),
                Ok(Err(e)) => return Err(self.fail(error_kind(&e)).await),
                Err(_) => return Err(self.fail(MqttError::ConnectionLost).await),
            };
            self.keep_alive.sent(Instant::now());
            let _ = pending.push(pid);
        }
        let deadline = Instant::now() + self.config.ack_timeout;
        let mut rejected = None;
        while !pending.is_empty() {
            match self.pump(deadline).await? {
                None => return Err(self.fail(MqttError::Timeout).await),
                Some(Observed::Suback(pid, code)) => {
                    if let Some(i) = pending.iter().position(|p| *p == pid) {
                        pending.swap_remove(i);
                        // Granted QoS 0..=2 are success codes; >= 0x80 failures.
                        if code >= 0x80 {
                            rejected = Some(code);
                        }
                    }
                }
                Some(_) => {}
            }
        }
        match rejected {
            Some(code) => Err(MqttError::Rejected(code)),
            None => Ok(()),
        }
    }

    /// Publishes `payload` to `topic`.
    ///
    /// QoS 0 returns [`Delivery::Sent`] once the packet is written (bounded by
    /// the I/O timeout). QoS 1 waits at most the ack timeout for the PUBACK;
    /// a late PUBACK yields [`Delivery::InFlight`] and the message is resent
    /// after a reconnect. Messages arriving meanwhile go to the inbox.
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        qos: QoS,
        retain: bool,
    ) -> Result<Delivery, MqttError> {
        self.check_busy().await?;
        if !self.up {
            return Err(MqttError::NotConnected);
        }
        let name = topic_name(topic)?;
        match qos {
            QoS::AtMostOnce => {
                self.send_publish(name, payload, QoS::AtMostOnce, retain, None)
                    .await?;
                Ok(Delivery::Sent)
            }
            QoS::AtLeastOnce => {
                if self.inflight.is_full() {
                    // A PUBACK may be sitting in the socket: give it the ack
                    // timeout to arrive before refusing.
                    let deadline = Instant::now() + self.config.ack_timeout;
                    while self.inflight.is_full() {
                        if self.pump(deadline).await?.is_none() {
                            return Err(MqttError::Busy);
                        }
                    }
                }
                let copy = Outgoing::copy(topic, payload, retain)?;
                let pid = self
                    .send_publish(name, payload, QoS::AtLeastOnce, retain, None)
                    .await?;
                let Some(pid) = pid else {
                    return Err(self.fail(MqttError::Protocol).await);
                };
                // Cannot fail: the loop above made room.
                let _ = self.inflight.sent(copy, pid, Instant::now());
                self.await_puback(pid).await
            }
        }
    }

    async fn await_puback(&mut self, pid: PacketIdentifier) -> Result<Delivery, MqttError> {
        let deadline = self
            .inflight
            .ack_deadline(pid)
            .unwrap_or_else(|| Instant::now() + self.config.ack_timeout);
        loop {
            match self.pump(deadline).await? {
                None => return Ok(Delivery::InFlight),
                Some(Observed::Puback(p, result)) if p == pid => {
                    return result
                        .map(|()| Delivery::Acknowledged)
                        .map_err(MqttError::Rejected);
                }
                Some(_) => {}
            }
        }
    }

    async fn send_publish(
        &mut self,
        name: TopicName<'_>,
        payload: &[u8],
        qos: QoS,
        retain: bool,
        resend: Option<PacketIdentifier>,
    ) -> Result<Option<PacketIdentifier>, MqttError> {
        let mut options = PublicationOptions::new(TopicReference::Name(name));
        if qos == QoS::AtLeastOnce {
            options = options.at_least_once();
        }
        if retain {
            options = options.retain();
        }
        self.busy = true;
        let sent = match resend {
            None => {
                with_timeout(
                    self.config.io_timeout,
                    self.client.publish(&options, Bytes::from(payload)),
                )
                .await
            }
            Some(pid) => with_timeout(
                self.config.io_timeout,
                self.client.republish(pid, &options, Bytes::from(payload)),
            )
            .await
            .map(|r| r.map(|()| Some(pid))),
        };
        self.busy = false;
        match sent {
            Ok(Ok(pid)) => {
                self.keep_alive.sent(Instant::now());
                Ok(pid)
            }
            Ok(Err(e)) if e.is_recoverable() => Err(error_kind(&e)),
            Ok(Err(e)) => Err(self.fail(error_kind(&e)).await),
            Err(_) => Err(self.fail(MqttError::ConnectionLost).await),
        }
    }

    async fn resend_inflight(&mut self, session_present: bool) -> Result<(), MqttError> {
        // Oldest first, as MQTT's ordering rules for resends require.
        let mut i = 0;
        while let Some(r) = self.inflight.resend(i, session_present) {
            let name = topic_name(&r.topic)?;
            match self
                .send_publish(name, &r.payload, QoS::AtLeastOnce, r.retain, r.pid)
                .await
            {
                Ok(new_pid) => {
                    self.inflight.resent(i, new_pid, Instant::now());
                    i += 1;
                }
                Err(e @ (MqttError::ConnectionLost | MqttError::NotConnected)) => return Err(e),
                Err(_) => {
                    // The client refused the resend (e.g. the broker had
                    // completed the handshake after all); nothing to retry.
                    self.inflight.drop_at(i);
                }
            }
        }
        Ok(())
    }

    /// The next buffered message, without touching the network.
    pub fn try_recv(&mut self) -> Option<Message> {
        self.inbox.pop_front()
    }

    /// Waits for the next message until `until`, answering keep-alive
    /// meanwhile. `Ok(None)` means the deadline passed.
    pub async fn poll(&mut self, until: Instant) -> Result<Option<Message>, MqttError> {
        loop {
            if let Some(m) = self.inbox.pop_front() {
                return Ok(Some(m));
            }
            if self.pump(until).await?.is_none() {
                return Ok(None);
            }
        }
    }

    /// The next message, keeping the session up whatever happens: rejoins
    /// the broker after it went away, brings the link back when
    /// [`Link::is_connected`] turns false, paces retries with `backoff`
    /// (`random` supplies one random value per retry).
    ///
    /// Fails only on configuration errors that no retry can fix.
    pub async fn next_message<L: Link>(
        &mut self,
        link: &mut L,
        backoff: &mut Backoff,
        random: &mut impl FnMut() -> u32,
    ) -> Result<Message, MqttError> {
        loop {
            if let Some(m) = self.inbox.pop_front() {
                return Ok(m);
            }
            self.maintain(link, backoff, random).await?;
            let until = Instant::now() + self.config.link_check_interval;
            if let Ok(Some(m)) = self.poll(until).await {
                return Ok(m);
            }
            // A deadline or a lost connection: loop to check the link and
            // reconnect as needed.
        }
    }

    /// Makes sure the link and the broker connection are up, retrying with
    /// `backoff` until they are. Returns at once when both already are.
    ///
    /// Fails only on configuration errors that no retry can fix
    /// ([`MqttError::InvalidTopic`], [`MqttError::TooLong`]).
    pub async fn maintain<L: Link>(
        &mut self,
        link: &mut L,
        backoff: &mut Backoff,
        random: &mut impl FnMut() -> u32,
    ) -> Result<(), MqttError> {
        loop {
            if !link.is_connected() {
                if self.up || self.has_net {
                    info!("mqtt: link down, dropping the connection");
                    self.drop_connection().await;
                }
                let brought_up = if self.link_was_up {
                    link.reconnect().await
                } else {
                    link.connect().await
                };
                if brought_up.is_err() {
                    warn!("mqtt: link reconnect failed");
                    Timer::after(Duration::from_millis(backoff.next_delay(random()))).await;
                    continue;
                }
            }
            self.link_was_up = true;
            if self.busy {
                self.drop_connection().await;
            }
            if self.up {
                return Ok(());
            }
            match self.connect().await {
                Ok(_) => {
                    backoff.reset();
                    return Ok(());
                }
                Err(e @ (MqttError::InvalidTopic | MqttError::TooLong)) => return Err(e),
                Err(_) => Timer::after(Duration::from_millis(backoff.next_delay(random()))).await,
            }
        }
    }

    /// Closes the session politely: DISCONNECT, so the broker does not
    /// publish the will. Use before a planned reboot after publishing the
    /// final status yourself.
    pub async fn disconnect(&mut self) {
        if self.up && !self.busy {
            self.busy = true;
            let done = with_timeout(
                self.config.io_timeout,
                self.client.disconnect(&DisconnectOptions::new()),
            )
            .await;
            self.busy = false;
            if let Ok(Ok(conn)) = done {
                drop(conn);
                self.has_net = false;
                self.up = false;
                return;
            }
        }
        self.drop_connection().await;
    }

    /// Drops the connection abruptly, without DISCONNECT: the broker
    /// publishes the will. The session state survives for the next connect.
    pub async fn drop_connection(&mut self) {
        self.up = false;
        self.busy = false;
        self.keep_alive.disconnected();
        if !self.has_net {
            return;
        }
        self.kill.kill();
        // If rust-mqtt still thinks the transport is healthy, this write hits
        // the kill switch and marks it failed; if it already failed, the call
        // is refused without side effects. Either way `abort` may follow.
        let _ = self.client.ping().await;
        if let Ok(conn) = self.client.abort().await {
            drop(conn);
        }
        self.has_net = false;
        self.reset_arena();
    }

    async fn fail(&mut self, e: MqttError) -> MqttError {
        warn!("mqtt: connection lost");
        self.drop_connection().await;
        e
    }

    async fn check_busy(&mut self) -> Result<(), MqttError> {
        if self.busy {
            return Err(self.fail(MqttError::ConnectionLost).await);
        }
        Ok(())
    }

    /// Reads one packet (or sends a keep-alive ping) before `until`.
    /// `Ok(None)`: the deadline passed while waiting for a packet header,
    /// the one place where stopping is clean.
    async fn pump(&mut self, until: Instant) -> Result<Option<Observed>, MqttError> {
        self.check_busy().await?;
        if !self.up {
            return Err(MqttError::NotConnected);
        }
        loop {
            let now = Instant::now();
            let keepalive_due = match self.keep_alive.poll(now) {
                KeepAliveDue::Until(at) => at,
                KeepAliveDue::Dead => {
                    warn!("mqtt: no PINGRESP");
                    return Err(self.fail(MqttError::ConnectionLost).await);
                }
                KeepAliveDue::Ping => {
                    self.busy = true;
                    let pinged = with_timeout(self.config.io_timeout, self.client.ping()).await;
                    self.busy = false;
                    match pinged {
                        Ok(Ok(())) => {
                            self.keep_alive.pinged(now);
                            continue;
                        }
                        _ => return Err(self.fail(MqttError::ConnectionLost).await),
                    }
                }
            };
            if now >= until {
                return Ok(None);
            }
            let wake = keepalive_due.min(until);
            // Only the header read is cancel-safe in rust-mqtt, so the timer
            // races it and nothing else. (A header split across TCP segments
            // and cut by the timer leaves its first bytes in the client; the
            // next header read continues it on the same stream, as it must.)
            let header = match select(self.client.poll_header(), Timer::at(wake)).await {
                Either::First(Ok(h)) => h,
                Either::First(Err(_)) => return Err(self.fail(MqttError::ConnectionLost).await),
                Either::Second(()) => continue,
            };
            self.busy = true;
            let body = with_timeout(self.config.io_timeout, self.client.poll_body(header)).await;
            self.busy = false;
            let observed = match body {
                Ok(Ok(event)) => self.observe(event),
                Ok(Err(e)) => {
                    let kind = error_kind(&e);
                    drop(e);
                    return Err(self.fail(kind).await);
                }
                Err(_) => return Err(self.fail(MqttError::ConnectionLost).await),
            };
            self.reset_arena();
            return Ok(Some(observed));
        }
    }

    fn observe(&mut self, event: Event<'a, 0, MAX_USER_PROPERTIES>) -> Observed {
        match event {
            Event::Publish(p) => {
                let topic = p.topic.name().map(|n| {
                    let s: &MqttString<'_> = n.as_ref();
                    String::<MAX_TOPIC_LEN>::try_from(s.as_str())
                });
                let payload = Vec::<u8, MAX_INCOMING_PAYLOAD>::from_slice(p.message.as_bytes());
                match (topic, payload) {
                    (Some(Ok(topic)), Ok(payload)) => {
                        let message = Message {
                            topic,
                            payload,
                            retain: p.retain,
                        };
                        if self.inbox.push_back(message).is_err() {
                            warn!("mqtt: inbox full, message dropped");
                            self.dropped = self.dropped.saturating_add(1);
                        }
                    }
                    _ => {
                        warn!("mqtt: incoming message too large, dropped");
                        self.dropped = self.dropped.saturating_add(1);
                    }
                }
                Observed::Message
            }
            Event::Suback(s) => Observed::Suback(s.packet_identifier, s.reason_code.value()),
            Event::PublishAcknowledged(a) => {
                self.inflight.acknowledged(a.packet_identifier);
                Observed::Puback(a.packet_identifier, Ok(()))
            }
            Event::PublishRejected(r) => {
                self.inflight.acknowledged(r.packet_identifier);
                Observed::Puback(r.packet_identifier, Err(r.reason_code.value()))
            }
            Event::Pingresp => {
                self.keep_alive.pong();
                Observed::Other
            }
            _ => Observed::Other,
        }
    }

    fn reset_arena(&mut self) {
        // SAFETY: every value rust-mqtt hands out that borrows the arena
        // (events, errors, CONNACK details) is consumed and dropped before
        // this is called: messages are copied into the inbox and the client
        // keeps no references into the arena itself (documented by
        // `BufferProvider`). So no live reference can alias the reused bytes.
        unsafe { self.client.buffer_mut().reset() }
    }
}

fn bounded_string(s: &str) -> Result<String<MAX_TOPIC_LEN>, MqttError> {
    String::try_from(s).map_err(|_| MqttError::TooLong)
}

fn topic_name(topic: &str) -> Result<TopicName<'_>, MqttError> {
    if topic.len() > MAX_TOPIC_LEN {
        return Err(MqttError::TooLong);
    }
    let string = MqttString::from_str(topic).map_err(|_| MqttError::TooLong)?;
    TopicName::new(string).ok_or(MqttError::InvalidTopic)
}

fn error_kind<const P: usize>(e: &ClientError<'_, P>) -> MqttError {
    match e {
        ClientError::Network(_) | ClientError::RecoveryRequired => MqttError::ConnectionLost,
        ClientError::Disconnect { reason, .. } => {
            debug!("mqtt: broker sent DISCONNECT {}", reason.value());
            MqttError::ConnectionLost
        }
        ClientError::AllPacketIdentifiersUsed
        | ClientError::SessionBuffer
        | ClientError::SendQuotaExceeded => MqttError::Busy,
        ClientError::PacketMaximumLengthExceeded | ClientError::ServerMaximumPacketSizeExceeded => {
            MqttError::TooLong
        }
        _ => MqttError::Protocol,
    }
}

mod inflight;
mod keepalive;
#[cfg(test)]
mod tests;

//! The runtime's MQTT session against a real Mosquitto, over tokio sockets.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration as StdDuration;

use embassy_time::{Duration, Instant};
use mqota_runtime::{
    Backoff, Delivery, Jitter, Link, Message, MqttBuffers, MqttConfig, MqttSession, QoS,
    XorShift32, MQTT_RX_BUFFER,
};
use mqota_virtual::net::TokioNet;
use mqota_virtual::testing::{wait_until_async, Mosquitto};
use tokio::sync::mpsc;

const STATUS: &str = "mqota/dev-1/status";
const CMD: &str = "mqota/dev-1/cmd";

fn config(port: u16) -> MqttConfig<'static> {
    let mut c = MqttConfig::new("127.0.0.1", port, "dev-1", STATUS, b"offline");
    c.keep_alive_secs = 5;
    c.io_timeout = Duration::from_secs(2);
    c.ack_timeout = Duration::from_secs(2);
    c.link_check_interval = Duration::from_millis(100);
    c
}

/// A link whose state the test flips.
#[derive(Clone, Default)]
struct FakeLink {
    down: Rc<Cell<bool>>,
    reconnects: Rc<Cell<u32>>,
}

impl Link for FakeLink {
    type Error = ();
    async fn connect(&mut self) -> Result<(), ()> {
        self.down.set(false);
        Ok(())
    }
    async fn reconnect(&mut self) -> Result<(), ()> {
        self.reconnects.set(self.reconnects.get() + 1);
        self.down.set(false);
        Ok(())
    }
    fn is_connected(&self) -> bool {
        !self.down.get()
    }
}

/// Runs a device-like client task: subscribe to CMD, then forward every
/// message it receives, forever, through `next_message`.
fn spawn_client(port: u16, link: FakeLink) -> mpsc::UnboundedReceiver<Message> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::task::spawn_local(async move {
        let net = TokioNet::plain();
        let mut arena = [0u8; MQTT_RX_BUFFER];
        let mut buffers = MqttBuffers::new(&mut arena);
        let mut session = MqttSession::new(&net, &mut buffers, config(port));
        session
            .subscribe(&[CMD])
            .await
            .expect("remember subscription");
        let mut link = link;
        let mut backoff = Backoff::new(50, 500, Jitter::Full);
        let mut rng = XorShift32::new(1);
        let mut random = move || rng.next_u32();
        loop {
            let m = session
                .next_message(&mut link, &mut backoff, &mut random)
                .await
                .expect("no configuration error");
            if tx.send(m).is_err() {
                return;
            }
        }
    });
    rx
}

/// Publishes `payload` to CMD every 200 ms until the client reports it.
async fn deliver(broker: &Mosquitto, rx: &mut mpsc::UnboundedReceiver<Message>, payload: &[u8]) {
    let deadline = tokio::time::Instant::now() + StdDuration::from_secs(20);
    loop {
        broker.publish(CMD, payload, false).await;
        match tokio::time::timeout(StdDuration::from_millis(200), rx.recv()).await {
            Ok(Some(m)) if m.payload.as_slice() == payload => return,
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => panic!("client task ended"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "client never received {payload:?}"
        );
    }
}

#[tokio::test]
async fn a_subscribed_message_arrives_and_publications_reach_other_clients() {
    let broker = Mosquitto::start();
    let net = TokioNet::plain();
    let mut arena = [0u8; MQTT_RX_BUFFER];
    let mut buffers = MqttBuffers::new(&mut arena);
    let mut session = MqttSession::new(&net, &mut buffers, config(broker.port()));

    let connected = session.connect().await.expect("connect");
    assert!(!connected.session_present);
    session
        .subscribe(&[CMD, "mqota/all/cmd"])
        .await
        .expect("subscribe");
    assert_eq!(session.subscriptions().len(), 2);

    broker.publish(CMD, b"{\"op\":\"update\"}", false).await;
    let until = Instant::now() + Duration::from_secs(5);
    let m = session.poll(until).await.expect("poll").expect("a message");
    assert_eq!(m.topic.as_str(), CMD);
    assert_eq!(m.payload.as_slice(), b"{\"op\":\"update\"}");
    assert!(!m.retain);

    let delivery = session
        .publish(STATUS, b"online", QoS::AtLeastOnce, true)
        .await
        .expect("publish status");
    assert_eq!(delivery, Delivery::Acknowledged);
    assert_eq!(session.inflight(), 0);
    let seen = broker.collect(STATUS, 1, StdDuration::from_secs(5)).await;
    assert_eq!(seen.len(), 1);
    assert!(seen[0].retained);
    assert_eq!(seen[0].payload, b"online");

    let progress = broker
        .subscriber("mqota/dev-1/progress", 1, StdDuration::from_secs(5))
        .await;
    let delivery = session
        .publish("mqota/dev-1/progress", b"42", QoS::AtMostOnce, false)
        .await
        .expect("publish progress");
    assert_eq!(delivery, Delivery::Sent);
    let seen = progress.wait().await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].payload, b"42");
    assert!(!seen[0].retained);
}

#[tokio::test]
async fn a_retained_message_is_not_replayed_to_a_default_session() {
    let broker = Mosquitto::start();
    broker.publish(CMD, b"retained-cmd", true).await;
    let net = TokioNet::plain();
    let mut arena = [0u8; MQTT_RX_BUFFER];
    let mut buffers = MqttBuffers::new(&mut arena);
    let mut session = MqttSession::new(&net, &mut buffers, config(broker.port()));
    session.connect().await.expect("connect");
    session.subscribe(&[CMD]).await.expect("subscribe");
    // A fresh message after the subscription: the first thing delivered.
    broker.publish(CMD, b"fresh", false).await;
    let m = session
        .poll(Instant::now() + Duration::from_secs(5))
        .await
        .expect("poll")
        .expect("the fresh command");
    assert_eq!(
        m.payload.as_slice(),
        b"fresh",
        "the retained one was not sent"
    );
    assert!(!m.retain);
}

#[tokio::test]
async fn a_message_published_before_the_suback_is_not_lost() {
    let broker = Mosquitto::start();
    // Retained: the broker sends it right after the SUBACK, often in the same
    // TCP segment, while the session is still waiting for further SUBACKs.
    broker.publish(CMD, b"retained-cmd", true).await;
    let net = TokioNet::plain();
    let mut arena = [0u8; MQTT_RX_BUFFER];
    let mut buffers = MqttBuffers::new(&mut arena);
    // This session wants retained messages (a device's does not).
    let mut cfg = config(broker.port());
    cfg.replay_retained = true;
    let mut session = MqttSession::new(&net, &mut buffers, cfg);
    session.connect().await.expect("connect");
    session
        .subscribe(&[CMD, "mqota/a", "mqota/b", "mqota/c"])
        .await
        .expect("subscribe");
    let m = session
        .poll(Instant::now() + Duration::from_secs(5))
        .await
        .expect("poll")
        .expect("the retained command");
    assert_eq!(m.payload.as_slice(), b"retained-cmd");
    assert!(m.retain);
}

#[tokio::test]
async fn the_will_is_published_retained_when_the_connection_drops_abruptly() {
    let broker = Mosquitto::start();
    let net = TokioNet::plain();
    let mut arena = [0u8; MQTT_RX_BUFFER];
    let mut buffers = MqttBuffers::new(&mut arena);
    let mut session = MqttSession::new(&net, &mut buffers, config(broker.port()));
    session.connect().await.expect("connect");
    session
        .publish(STATUS, b"online", QoS::AtLeastOnce, true)
        .await
        .expect("status");

    session.drop_connection().await;
    assert!(!session.is_connected());

    // The broker replaces the retained "online" with the will.
    let read = || broker.collect(STATUS, 1, StdDuration::from_secs(2));
    let seen = wait_until_async(
        "the will",
        StdDuration::from_secs(10),
        StdDuration::ZERO,
        read,
        |seen| seen.first().map(|r| r.payload.as_slice()) == Some(b"offline"),
    )
    .await;
    assert!(seen[0].retained);
}

#[tokio::test]
async fn a_polite_disconnect_does_not_publish_the_will() {
    let broker = Mosquitto::start();
    let net = TokioNet::plain();
    let mut arena = [0u8; MQTT_RX_BUFFER];
    let mut buffers = MqttBuffers::new(&mut arena);
    let mut session = MqttSession::new(&net, &mut buffers, config(broker.port()));
    session.connect().await.expect("connect");
    session
        .publish(STATUS, b"rebooting", QoS::AtLeastOnce, true)
        .await
        .expect("status");
    session.disconnect().await;
    assert!(!session.is_connected());
    // A will would be retained in place of the status if the broker had
    // already seen the close, or arrive live after it if not: ask for two
    // messages and get only the status, within a window a will (published
    // the moment the connection ends) cannot miss.
    let seen = broker.collect(STATUS, 2, StdDuration::from_secs(2)).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].payload, b"rebooting");
}

#[tokio::test]
async fn the_session_rejoins_a_restarted_broker_without_restarting_the_client_task() {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let mut broker = Mosquitto::start();
            let mut rx = spawn_client(broker.port(), FakeLink::default());
            deliver(&broker, &mut rx, b"before").await;

            broker.kill();
            tokio::time::sleep(StdDuration::from_millis(700)).await;
            broker.restart();

            // The restarted broker has no session (persistence false): the
            // client must subscribe again by itself to receive this.
            deliver(&broker, &mut rx, b"after").await;
        })
        .await;
}

#[tokio::test]
async fn a_link_drop_triggers_link_reconnect_and_mqtt_follows() {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let broker = Mosquitto::start();
            let link = FakeLink::default();
            let mut rx = spawn_client(broker.port(), link.clone());
            deliver(&broker, &mut rx, b"before").await;
            assert_eq!(link.reconnects.get(), 0);

            link.down.set(true);
            let (within, every) = (StdDuration::from_secs(5), StdDuration::from_millis(20));
            let calls = || std::future::ready(link.reconnects.get());
            wait_until_async("reconnect() called", within, every, calls, |n| *n > 0).await;
            assert_eq!(link.reconnects.get(), 1);

            // The old MQTT connection was cut without DISCONNECT ...
            let seen = broker.collect(STATUS, 1, StdDuration::from_secs(5)).await;
            assert_eq!(
                seen.first().map(|r| r.payload.as_slice()),
                Some(&b"offline"[..])
            );
            // ... and a new one carries messages again.
            deliver(&broker, &mut rx, b"after").await;
        })
        .await;
}

#[tokio::test]
async fn keep_alive_pings_hold_an_idle_connection_open() {
    let broker = Mosquitto::start();
    let net = TokioNet::plain();
    let mut arena = [0u8; MQTT_RX_BUFFER];
    let mut buffers = MqttBuffers::new(&mut arena);
    let mut cfg = config(broker.port());
    // Mosquitto drops a client silent for 1.5 keep-alives (3 s here) but
    // checks coarsely, so idle long enough that it surely would have.
    cfg.keep_alive_secs = 2;
    let mut session = MqttSession::new(&net, &mut buffers, cfg);
    session.connect().await.expect("connect");

    let idle = session
        .poll(Instant::now() + Duration::from_secs(9))
        .await
        .expect("still connected after 4.5 keep-alives");
    assert!(idle.is_none());
    assert!(session.is_connected());
    let delivery = session
        .publish(STATUS, b"alive", QoS::AtLeastOnce, false)
        .await
        .expect("publish on the kept connection");
    assert_eq!(delivery, Delivery::Acknowledged);
}

//! The embedded broker (rumqttd) against the device's own MQTT client
//! (rust-mqtt through mqota-runtime's `MqttSession`) and the controller's
//! (rumqttc v5).

use std::net::SocketAddr;
use std::time::Duration as StdDuration;

use embassy_time::{Duration, Instant};
use mqota_controller::broker::EmbeddedBroker;
use mqota_runtime::{Delivery, MqttBuffers, MqttConfig, MqttSession, QoS, MQTT_RX_BUFFER};
use mqota_virtual::net::TokioNet;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};

const STATUS: &str = "device/dev-1/status";
const CMD: &str = "device/dev-1/ota/start";

fn broker() -> EmbeddedBroker {
    EmbeddedBroker::start(SocketAddr::from(([127, 0, 0, 1], 0))).expect("embedded broker")
}

fn device_config(port: u16) -> MqttConfig<'static> {
    let mut c = MqttConfig::new("127.0.0.1", port, "dev-1", STATUS, b"offline");
    // rumqttd refuses keep-alive 0 (rust-mqtt's default).
    c.keep_alive_secs = 5;
    c.io_timeout = Duration::from_secs(2);
    c.ack_timeout = Duration::from_secs(2);
    c
}

/// A rumqttc client subscribed to `filter`, with its event loop.
async fn controller(port: u16, id: &str, filter: &str) -> (AsyncClient, EventLoop) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(StdDuration::from_secs(5));
    let (client, mut ev) = AsyncClient::new(o, 16);
    client
        .subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(StdDuration::from_secs(5), ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => return (client, ev),
            Ok(Ok(_)) => {}
            other => panic!("controller could not subscribe: {other:?}"),
        }
    }
}

/// The next PUBLISH within `within`: (topic, payload, retain).
async fn next_publish(ev: &mut EventLoop, within: StdDuration) -> Option<(String, Vec<u8>, bool)> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                return Some((
                    String::from_utf8_lossy(&p.topic).into_owned(),
                    p.payload.to_vec(),
                    p.retain,
                ))
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("controller connection failed: {e}"),
            Err(_) => return None,
        }
    }
}

#[tokio::test]
async fn a_retained_device_status_reaches_a_controller_that_subscribes_later() {
    let broker = broker();
    let port = broker.addr().port();
    let net = TokioNet::plain();
    let mut arena = [0u8; MQTT_RX_BUFFER];
    let mut buffers = MqttBuffers::new(&mut arena);
    let mut session = MqttSession::new(&net, &mut buffers, device_config(port));
    session.connect().await.expect("device connects to rumqttd");
    let d = session
        .publish(STATUS, b"{\"online\":true}", QoS::AtLeastOnce, true)
        .await
        .expect("publish status");
    assert_eq!(d, Delivery::Acknowledged, "QoS 1 publish is acknowledged");

    let (_c, mut ev) = controller(port, "ctl-late", "device/+/status").await;
    let (topic, payload, retain) = next_publish(&mut ev, StdDuration::from_secs(5))
        .await
        .expect("the retained status");
    assert_eq!(topic, STATUS);
    assert_eq!(payload, b"{\"online\":true}");
    assert!(retain, "delivered from the retained store");
}

#[tokio::test]
async fn the_device_will_is_published_retained_when_it_drops_abruptly() {
    let broker = broker();
    let port = broker.addr().port();
    let net = TokioNet::plain();
    let mut arena = [0u8; MQTT_RX_BUFFER];
    let mut buffers = MqttBuffers::new(&mut arena);
    let mut session = MqttSession::new(&net, &mut buffers, device_config(port));
    session.connect().await.expect("connect");
    session
        .publish(STATUS, b"online", QoS::AtLeastOnce, true)
        .await
        .expect("status");
    let (_c, mut ev) = controller(port, "ctl-will", STATUS).await;
    let (_, first, _) = next_publish(&mut ev, StdDuration::from_secs(5))
        .await
        .expect("retained online");
    assert_eq!(first, b"online");

    session.drop_connection().await;
    let (_, will, _) = next_publish(&mut ev, StdDuration::from_secs(10))
        .await
        .expect("the will after an abrupt drop");
    assert_eq!(will, b"offline");

    // And it replaced the retained status for controllers that come later.
    let (_c2, mut ev2) = controller(port, "ctl-will-2", STATUS).await;
    let (_, later, retain) = next_publish(&mut ev2, StdDuration::from_secs(5))
        .await
        .expect("retained will");
    assert_eq!(later, b"offline");
    assert!(retain);
}

#[tokio::test]
async fn a_qos1_command_from_the_controller_reaches_the_device_and_its_answer_comes_back() {
    let broker = broker();
    let port = broker.addr().port();
    let net = TokioNet::plain();
    let mut arena = [0u8; MQTT_RX_BUFFER];
    let mut buffers = MqttBuffers::new(&mut arena);
    let mut session = MqttSession::new(&net, &mut buffers, device_config(port));
    session.connect().await.expect("connect");
    session.subscribe(&[CMD]).await.expect("subscribe");

    let (client, mut ev) = controller(port, "ctl-rt", "device/progress").await;
    client
        .publish(
            CMD,
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            b"http://h/fw.bin".to_vec(),
        )
        .await
        .unwrap();
    // Drive the controller's loop until its PUBLISH is acknowledged.
    let mut acked = false;
    while !acked {
        match tokio::time::timeout(StdDuration::from_secs(5), ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked = true,
            Ok(Ok(_)) => {}
            other => panic!("no PUBACK from rumqttd: {other:?}"),
        }
    }

    let m = session
        .poll(Instant::now() + Duration::from_secs(5))
        .await
        .expect("poll")
        .expect("the command");
    assert_eq!(m.topic.as_str(), CMD);
    assert_eq!(m.payload.as_slice(), b"http://h/fw.bin");

    let d = session
        .publish("device/progress", b"accepted", QoS::AtLeastOnce, false)
        .await
        .expect("answer");
    assert_eq!(d, Delivery::Acknowledged);
    let (topic, payload, retain) = next_publish(&mut ev, StdDuration::from_secs(5))
        .await
        .expect("the device's answer");
    assert_eq!(topic, "device/progress");
    assert_eq!(payload, b"accepted");
    assert!(!retain);
}

#[test]
fn a_second_broker_on_a_taken_port_is_refused_with_bind() {
    let first = broker();
    let err = EmbeddedBroker::start(first.addr()).expect_err("port is taken");
    assert!(matches!(
        err,
        mqota_controller::broker::BrokerError::Bind { .. }
    ));
}

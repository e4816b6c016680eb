//! The controller sees the whole fleet however large the retained replay:
//! thousands of retained statuses and availabilities, published straight to
//! the broker by one fast client, against stock Mosquitto (whose
//! `max_queued_messages 1000` cut a QoS 1 replay) and the embedded broker
//! (rumqttd, which cut it at 100).

use std::time::{Duration, Instant};

use mqota_controller::broker::EmbeddedBroker;
use mqota_controller::fleet::Fleet;
use mqota_controller::url::BrokerUrl;
use mqota_virtual::testing::Mosquitto;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

/// How many devices; `MQOTA_SCALE_DEVICES` overrides it.
fn fleet_size() -> usize {
    std::env::var("MQOTA_SCALE_DEVICES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000)
}

fn status(id: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "device": id, "chip": "esp32c3", "project": "fleet", "version": "1.0.0",
        "slot": 0, "state": "valid", "last": null
    }))
    .unwrap()
}

/// Publishes a retained status and `online` for `n` devices `s-00000`...,
/// at QoS 1 as devices do (so a QoS 1 subscription would be served at QoS 1
/// and capped), and returns once the broker acknowledged all of them.
async fn publish_fleet(port: u16, n: usize) {
    let mut o = MqttOptions::new("fleet-publisher", "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_outgoing_inflight_upper_limit(1000);
    let (client, mut ev) = AsyncClient::new(o, 1024);
    let acked = tokio::spawn(async move {
        let mut left = 2 * n;
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    left -= 1;
                    if left == 0 {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("publisher lost the broker: {e}"),
            }
        }
    });
    for i in 0..n {
        let id = format!("s-{i:05}");
        client
            .publish(
                format!("device/{id}/status"),
                QoS::AtLeastOnce,
                true,
                status(&id),
            )
            .await
            .unwrap();
        client
            .publish(
                format!("device/{id}/availability"),
                QoS::AtLeastOnce,
                true,
                "online",
            )
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(60), acked)
        .await
        .expect("the broker acknowledged the marker")
        .unwrap();
    let _ = client.disconnect().await;
}

async fn sees_everyone(port: u16, n: usize) {
    let url: BrokerUrl = format!("mqtt://127.0.0.1:{port}").parse().unwrap();
    let t = Instant::now();
    let fleet = Fleet::connect(&url, "device", "ctl-scale").await.unwrap();
    let settled = fleet
        .settle(Duration::from_millis(500), Duration::from_secs(60))
        .await;
    let devices = fleet.devices();
    let with_status = devices.iter().filter(|d| d.status.is_some()).count();
    let online = devices.iter().filter(|d| d.online).count();
    eprintln!(
        "saw {with_status} statuses and {online} online of {n} in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert!(settled, "the replay never ended");
    assert_eq!(with_status, n, "statuses seen");
    assert_eq!(online, n, "availabilities seen");
    assert!(fleet.gaps(&[]).is_empty(), "{:?}", fleet.gaps(&[]));
    // The store's record names a device the broker no longer has.
    let gaps = fleet.gaps(&["gone-1".to_owned()]);
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert!(gaps[0].contains("gone-1"), "{gaps:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_fleet_is_seen_through_stock_mosquitto() {
    let broker = Mosquitto::start();
    let n = fleet_size();
    let t = Instant::now();
    publish_fleet(broker.port(), n).await;
    eprintln!(
        "published {n} devices in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    sees_everyone(broker.port(), n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_fleet_is_seen_through_the_embedded_broker() {
    let broker = EmbeddedBroker::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = broker.url().rsplit(':').next().unwrap().parse().unwrap();
    let n = fleet_size();
    let t = Instant::now();
    publish_fleet(port, n).await;
    eprintln!(
        "published {n} devices in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    sees_everyone(port, n).await;
}

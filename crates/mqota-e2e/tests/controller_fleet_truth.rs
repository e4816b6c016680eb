//! The controller believes only per-device topics whose payload names the
//! device of the topic: forged progress on the shared `device/progress`, a
//! progress or status that claims to be another device's, and a bogus
//! availability change nothing. Against a real Mosquitto, forged with
//! `mosquitto_pub`.

use std::time::Duration;

use mqota_controller::fleet::Fleet;
use mqota_controller::url::BrokerUrl;
use mqota_core::protocol::Phase;
use mqota_virtual::testing::{publish_to, wait_until_async, Mosquitto};

fn progress(device: &str, phase: &str, percent: u8) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "device": device, "job": "j", "phase": phase, "bytes": 0, "total": null,
        "percent": percent, "error": null, "message": null
    }))
    .unwrap()
}

fn status(device: &str, version: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "device": device, "chip": "esp32c3", "project": "p", "version": version,
        "slot": 0, "state": "valid", "last": null
    }))
    .unwrap()
}

async fn wait(fleet: &Fleet, what: &str, check: impl Fn(&Fleet) -> bool) {
    let (within, every) = (Duration::from_secs(10), Duration::from_millis(20));
    let read = || std::future::ready(check(fleet));
    wait_until_async(what, within, every, read, |ok| *ok).await;
}

#[tokio::test]
async fn forged_progress_statuses_and_availability_are_not_believed() {
    let broker = Mosquitto::start();
    let port = broker.port();
    let url: BrokerUrl = format!("mqtt://127.0.0.1:{port}").parse().unwrap();
    let fleet = Fleet::connect(&url, "device", "ctl-truth").await.unwrap();

    // The real device v1: online, on 1.0.0, downloading at 30 %.
    publish_to(port, "device/v1/status", &status("v1", "1.0.0"), true).await;
    publish_to(port, "device/v1/availability", b"online", true).await;
    publish_to(
        port,
        "device/v1/progress",
        &progress("v1", "downloading", 30),
        false,
    )
    .await;
    wait(&fleet, "saw v1 downloading", |f| {
        f.device("v1").is_some_and(|d| {
            d.online
                && d.status.as_ref().is_some_and(|s| s.version == "1.0.0")
                && d.progress.as_ref().is_some_and(|p| p.percent == 30)
        })
    })
    .await;

    // The attacks: `done` on the shared copy, `done` and a new version
    // claimed for v1 on another device's topics, and garbage availability.
    publish_to(port, "device/progress", &progress("v1", "done", 100), false).await;
    publish_to(
        port,
        "device/v2/progress",
        &progress("v1", "done", 100),
        false,
    )
    .await;
    publish_to(port, "device/v2/status", &status("v1", "9.9.9"), true).await;
    publish_to(port, "device/v1/availability", b"maybe", false).await;
    // A marker after them, from the real device, proves they were processed.
    publish_to(
        port,
        "device/v1/progress",
        &progress("v1", "downloading", 31),
        false,
    )
    .await;
    wait(&fleet, "saw the marker", |f| {
        f.device("v1")
            .and_then(|d| d.progress)
            .is_some_and(|p| p.percent == 31)
    })
    .await;

    let v1 = fleet.device("v1").unwrap();
    assert_eq!(v1.progress.unwrap().phase, Phase::Downloading);
    assert_eq!(v1.status.unwrap().version, "1.0.0");
    assert!(v1.online);
    // v2's topics carried only lies about v1: v2 has no status or progress.
    let v2 = fleet.device("v2");
    assert!(
        v2.as_ref()
            .is_none_or(|d| d.status.is_none() && d.progress.is_none()),
        "{v2:?}"
    );

    // The will: offline is believed.
    publish_to(port, "device/v1/availability", b"offline", true).await;
    wait(&fleet, "saw v1 offline", |f| {
        f.device("v1").is_some_and(|d| !d.online)
    })
    .await;
}

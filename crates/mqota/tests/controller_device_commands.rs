//! `POST /api/devices/commands`, which the page's "roll back" and "cancel"
//! buttons use: over real HTTP against `mqota serve` (embedded broker) with a
//! virtual device. A good command reaches the device, which answers on its
//! own topics; every bad one is refused with its status code and sends
//! nothing.

mod controller_support;

use std::time::Duration;

use controller_support::{device_config, get_json, on_own_runtime, start_devices, Serve};
use mqota_virtual::testing::wait_until;
use serde_json::{json, Value};

/// POSTs `body` (as `content_type`) to serve; returns the status and JSON.
fn post(serve: &Serve, content_type: &str, body: String) -> (u16, Value) {
    let url = format!("{}/api/devices/commands", serve.http);
    let content_type = content_type.to_owned();
    on_own_runtime(async move {
        let r = reqwest::Client::new()
            .post(url)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    })
}

/// Polls `/api/fleet` until device `id` satisfies `ok`, for at most 60 s.
fn wait_device(serve: &Serve, id: &str, what: &str, ok: impl Fn(&Value) -> bool) {
    let read = || {
        let fleet = get_json(&format!("{}/api/fleet", serve.http));
        fleet
            .as_array()
            .and_then(|a| a.iter().find(|d| d["id"] == id).cloned())
    };
    let (within, every) = (Duration::from_secs(60), Duration::from_millis(200));
    wait_until(&format!("{id} {what}"), within, every, read, |found| {
        found.as_ref().is_some_and(&ok)
    });
}

#[test]
fn device_commands_reach_online_devices_and_every_bad_request_is_refused() {
    let fw = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start(fw.path(), data.path(), None);
    let port: u16 = serve.broker.rsplit(':').next().unwrap().parse().unwrap();
    let devices = start_devices(vec![device_config("dc-1", port)]);
    wait_device(&serve, "dc-1", "came online", |d| d["online"] == true);

    let body =
        |command: &str, ids: &[&str]| json!({"command": command, "devices": ids}).to_string();
    // Not JSON: a cross-site form cannot send it.
    let (code, v) = post(&serve, "text/plain", body("rollback", &["dc-1"]));
    assert_eq!(code, 415, "{v}");
    let (code, v) = post(&serve, "application/json", body("reboot", &["dc-1"]));
    assert_eq!(code, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("rollback or cancel"),
        "{v}"
    );
    let (code, v) = post(&serve, "application/json", body("rollback", &[]));
    assert_eq!(code, 400, "{v}");
    let (code, v) = post(
        &serve,
        "application/json",
        body("rollback", &["dc-1", "ghost"]),
    );
    assert_eq!(code, 404, "{v}");
    assert!(v["error"].as_str().unwrap().contains("ghost"), "{v}");

    // A rollback with nothing to go back to: sent, and the device answers
    // on its own topics that it has no previous image.
    let (code, v) = post(&serve, "application/json", body("rollback", &["dc-1"]));
    assert_eq!(code, 202, "{v}");
    assert_eq!(v["sent"], json!(["dc-1"]));
    let job = v["job"]
        .as_str()
        .expect("a rollback names its job")
        .to_owned();
    wait_device(&serve, "dc-1", "answered the rollback", |d| {
        let answer = |p: &Value| {
            p["job"] == job.as_str() && p["phase"] == "failed" && p["error"] == "no_previous_image"
        };
        answer(&d["progress"]) || d["ended"].as_array().is_some_and(|e| e.iter().any(answer))
    });

    // Offline: refused, nothing sent.
    drop(devices);
    wait_device(&serve, "dc-1", "went offline", |d| d["online"] == false);
    let (code, v) = post(&serve, "application/json", body("cancel", &["dc-1"]));
    assert_eq!(code, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("offline"), "{v}");
}

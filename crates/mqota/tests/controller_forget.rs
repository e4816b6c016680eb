//! The fleet's record stays bounded and true: ids heard only in progress
//! events never become devices, ids that announced only an availability are
//! forgotten after `--ghost-expiry`, `mqota forget` and `DELETE
//! /api/devices/{id}` remove a device that is gone (store and broker), and
//! a device's history is paged and kept to `--history-max-entries`. Real
//! Mosquitto and `mqota serve` as a process; devices are played by
//! publishing their retained messages.

mod controller_support;

use std::time::Duration;

use controller_support::{get_json, image, mqota, on_own_runtime, Serve};
use mqota_virtual::testing::{publish_to, wait_until, Mosquitto};

fn status(id: &str, version: &str) -> Vec<u8> {
    serde_json::json!({
        "device": id, "chip": "esp32c3", "project": "mqota-virtual",
        "version": version, "slot": 0, "state": "valid", "last": null,
    })
    .to_string()
    .into_bytes()
}

/// Sends `method` to `url`; returns the status, a header and the JSON body.
fn call(method: &str, url: &str, header: &str) -> (u16, Option<String>, serde_json::Value) {
    let (method, url, header) = (method.to_owned(), url.to_owned(), header.to_owned());
    on_own_runtime(async move {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let resp = reqwest::Client::new().request(m, url).send().await.unwrap();
        let code = resp.status().as_u16();
        let h = resp
            .headers()
            .get(&header)
            .map(|v| v.to_str().unwrap().to_owned());
        (
            code,
            h,
            resp.json().await.unwrap_or(serde_json::Value::Null),
        )
    })
}

/// Waits up to 30 s for `check`.
fn until(what: &str, check: impl Fn() -> bool) {
    let (within, every) = (Duration::from_secs(30), Duration::from_millis(200));
    wait_until(what, within, every, check, |ok| *ok);
}

/// The ids of a list (`/api/fleet`) or of a page of one (`/api/devices`,
/// whose one page holds every device of these tests).
fn ids(list: &serde_json::Value) -> Vec<String> {
    assert!(list.get("next").is_none_or(|n| n.is_null()), "one page");
    list.get("devices")
        .unwrap_or(list)
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Whether the broker holds a retained message on `topic`.
fn retained(rt: &tokio::runtime::Runtime, broker: &Mosquitto, topic: &str) -> bool {
    !rt.block_on(broker.collect(topic, 1, Duration::from_millis(800)))
        .is_empty()
}

#[test]
fn ghosts_and_progress_only_ids_never_stay_gone_devices_are_forgotten_and_history_is_bounded() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let broker = Mosquitto::start();
    let port = broker.port();
    let broker_url = format!("mqtt://127.0.0.1:{port}");
    let fw = tempfile::tempdir().unwrap();
    std::fs::write(fw.path().join("app-1.1.0.bin"), image("1.1.0", 64 * 1024)).unwrap();
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap().to_owned();
    let pub_ = |topic: &str, payload: &[u8], retain: bool| {
        rt.block_on(publish_to(port, topic, payload, retain));
    };
    // gone-1 and gone-2: offline for good; live-1: online.
    for id in ["gone-1", "gone-2", "live-1"] {
        pub_(&format!("device/{id}/status"), &status(id, "1.0.0"), true);
        let avail: &[u8] = if id == "live-1" {
            b"online"
        } else {
            b"offline"
        };
        pub_(&format!("device/{id}/availability"), avail, true);
    }
    let serve = Serve::start_with(
        fw.path(),
        data.path(),
        Some(&broker_url),
        "127.0.0.1:0",
        &["--ghost-expiry", "6", "--history-max-entries", "3"],
    );
    let api = |path: &str| get_json(&format!("{}{path}", serve.http));
    until("serve recorded the three devices", || {
        ids(&api("/api/devices")).len() == 3
    });
    // A ghost: an availability, never a status. It is in the picture (for
    // 6 to 9 s: the sweep runs every 3 s) and named as a gap.
    pub_("device/ghost-1/availability", b"online", true);
    until("the ghost is in the picture", || {
        ids(&api("/api/fleet")).contains(&"ghost-1".to_owned())
    });

    // Progress events under an id with no status: no device, no history.
    let failed = serde_json::json!({"device": "prog-1", "job": "j", "phase": "failed",
                                    "percent": 0, "error": "busy"});
    pub_(
        "device/prog-1/progress",
        failed.to_string().as_bytes(),
        false,
    );
    // gone-1 changes state five times (the statuses differ by version).
    for v in ["1.0.1", "1.0.2", "1.0.3", "1.0.4", "1.0.5"] {
        pub_("device/gone-1/status", &status("gone-1", v), true);
    }
    until("gone-1's five changes are in its history", || {
        api("/api/devices/gone-1/history").as_array().unwrap().len() == 6
    });
    let fleet = api("/api/fleet");
    assert!(!ids(&fleet).contains(&"prog-1".to_owned()), "{fleet:#}");
    assert!(!ids(&api("/api/devices")).contains(&"prog-1".to_owned()));
    assert_eq!(api("/api/devices/prog-1/history"), serde_json::json!([]));
    let (ok, out, err) = mqota(&["status", "--json", "--broker", &broker_url]);
    assert!(ok && !out.contains("prog-1"), "{out}\n{err}");

    // The history, a page at a time, newest page first, each oldest first.
    let url = format!("{}/api/devices/gone-1/history", serve.http);
    let versions = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| e["data"]["version"].as_str().unwrap().to_owned())
            .collect()
    };
    let (code, before, page) = call("GET", &format!("{url}?limit=4"), "x-mqota-history-before");
    assert_eq!(code, 200, "{page:#}");
    assert_eq!(versions(&page), ["1.0.2", "1.0.3", "1.0.4", "1.0.5"]);
    let before = before.expect("an older page is announced");
    let (_, last, page) = call(
        "GET",
        &format!("{url}?limit=4&before={before}"),
        "x-mqota-history-before",
    );
    assert_eq!(versions(&page), ["1.0.0", "1.0.1"]);
    assert_eq!(last, None, "no page before the first");
    let (code, _, body) = call("GET", &format!("{url}?limit=0"), "x");
    assert_eq!(code, 400, "{body:#}");

    // The ghost's time is up: gone from the picture and from the broker's
    // retained messages.
    until("the ghost was forgotten", || {
        !ids(&api("/api/fleet")).contains(&"ghost-1".to_owned())
    });
    until("its retained availability was cleared", || {
        !retained(&rt, &broker, "device/ghost-1/availability")
    });
    let (_, gaps, _) = call(
        "GET",
        &format!("{}/api/fleet", serve.http),
        "x-mqota-fleet-gaps",
    );
    assert!(
        !gaps.unwrap_or_default().contains("ghost-1"),
        "the ghost is still a gap"
    );
    // Real devices, even offline ones, are no ghosts.
    assert!(retained(&rt, &broker, "device/gone-2/availability"));
    assert!(ids(&api("/api/fleet")).contains(&"gone-2".to_owned()));

    // Forgetting: an online device is refused, over the CLI and the API,
    // and so is an id nobody knows.
    let (ok, _, err) = mqota(&[
        "forget",
        "live-1",
        "--broker",
        &broker_url,
        "--data-dir",
        &data_dir,
    ]);
    assert!(!ok && err.contains("device live-1 is online"), "{err}");
    let (code, _, body) = call("DELETE", &format!("{}/api/devices/live-1", serve.http), "x");
    assert_eq!(code, 409, "{body:#}");
    let (code, _, body) = call("DELETE", &format!("{}/api/devices/nope", serve.http), "x");
    assert_eq!(code, 404, "{body:#}");
    // A device that is gone: the CLI removes its record, history and
    // retained messages...
    let (ok, out, err) = mqota(&[
        "forget",
        "gone-1",
        "--broker",
        &broker_url,
        "--data-dir",
        &data_dir,
    ]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("forgot gone-1: its record and history in the store, its retained status and availability on the broker"), "{out}");
    assert!(!retained(&rt, &broker, "device/gone-1/status"));
    assert!(!retained(&rt, &broker, "device/gone-1/availability"));
    until("serve no longer shows gone-1", || {
        !ids(&api("/api/devices")).contains(&"gone-1".to_owned())
            && !ids(&api("/api/fleet")).contains(&"gone-1".to_owned())
    });
    assert_eq!(api("/api/devices/gone-1/history"), serde_json::json!([]));
    let (ok, _, err) = mqota(&[
        "forget",
        "gone-1",
        "--broker",
        &broker_url,
        "--data-dir",
        &data_dir,
    ]);
    assert!(!ok && err.contains("\"gone-1\" is not known"), "{err}");
    // ...and so does the API.
    let (code, _, body) = call("DELETE", &format!("{}/api/devices/gone-2", serve.http), "x");
    assert_eq!(code, 200, "{body:#}");
    assert_eq!(body["store"], true, "{body:#}");
    assert!(!retained(&rt, &broker, "device/gone-2/status"));
    let devices = ids(&api("/api/devices"));
    assert_eq!(devices, ["live-1"], "only the live device is left");
    let (ok, out, _) = mqota(&["status", "--json", "--broker", &broker_url]);
    assert!(
        ok && !out.contains("gone-") && out.contains("live-1"),
        "{out}"
    );

    // History retention, applied by serve at start: live-1 changes five
    // times; a restarted serve keeps its newest three.
    for v in ["1.0.1", "1.0.2", "1.0.3", "1.0.4", "1.0.5"] {
        pub_("device/live-1/status", &status("live-1", v), true);
    }
    until("live-1's changes are recorded", || {
        api("/api/devices/live-1/history").as_array().unwrap().len() == 6
    });
    drop(serve);
    let serve = Serve::start_with(
        fw.path(),
        data.path(),
        Some(&broker_url),
        "127.0.0.1:0",
        &["--history-max-entries", "3"],
    );
    until("the history was kept to its newest three", || {
        let h = get_json(&format!("{}/api/devices/live-1/history", serve.http));
        versions(&h) == ["1.0.3", "1.0.4", "1.0.5"]
    });
    drop(serve);
    drop(broker);
}

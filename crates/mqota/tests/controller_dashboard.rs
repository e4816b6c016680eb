//! The web page of `mqota serve` and `POST /api/deployments`, against serve
//! as a process (embedded broker) and virtual devices (the real device
//! runtime on simulated flash) running in this test.

mod controller_support;

use std::time::Duration;

use controller_support::{device_config, image, start_devices, Serve};
use mqota_virtual::testing::wait_until_async;
use reqwest::{header, StatusCode};
use serde_json::{json, Value};

fn firmware_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("app-1.1.0.bin"), image("1.1.0", 64 * 1024)).unwrap();
    dir
}

async fn get_json(url: &str) -> Value {
    let r = reqwest::get(url).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{url}");
    r.json().await.unwrap()
}

/// Polls `url` until `check` holds, for at most 60 s.
async fn wait_for(url: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let (within, every) = (Duration::from_secs(60), Duration::from_millis(250));
    wait_until_async(what, within, every, || get_json(url), |v| check(v)).await
}

async fn post(serve: &Serve, body: &str) -> (StatusCode, String) {
    let r = reqwest::Client::new()
        .post(format!("{}/api/deployments", serve.http))
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    (r.status(), r.text().await.unwrap())
}

#[tokio::test]
async fn the_page_at_the_root_is_html_with_the_deploy_form_and_loads_only_its_own_script() {
    let fw = firmware_dir();
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start(fw.path(), data.path(), None);

    let r = reqwest::get(format!("{}/", serve.http)).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let csp = r.headers()[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    let page = r.text().await.unwrap();
    for part in [
        "<form id=\"deploy\"",
        "id=\"d-firmware\"",
        "id=\"d-canary\"",
        "id=\"d-batch\"",
        "id=\"d-max-failures\"",
        "id=\"d-auto-rollback\"",
        "id=\"fleet-gaps\"",
        "<script src=\"/dashboard.js\">",
    ] {
        assert!(page.contains(part), "the page lacks {part}");
    }
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "the page loads nothing from elsewhere"
    );

    let r = reqwest::get(format!("{}/dashboard.js", serve.http))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));
    let script = r.text().await.unwrap();
    for api in ["/api/fleet", "/api/firmware", "/api/deployments"] {
        assert!(script.contains(api), "the script never asks {api}");
    }
    assert!(
        !script.contains("innerHTML"),
        "data reaches the page as text only"
    );

    // The JSON API is still there beside the page.
    let list = get_json(&format!("{}/api/firmware", serve.http)).await;
    assert_eq!(list[0]["name"], "app-1.1.0.bin");
    assert_eq!(
        get_json(&format!("{}/api/fleet", serve.http)).await,
        json!([])
    );
}

#[tokio::test]
async fn a_deployment_request_that_cannot_be_carried_out_is_a_400_with_a_one_line_error() {
    let fw = firmware_dir();
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start(fw.path(), data.path(), None);

    let cases = [
        ("not json", "bad deployment request"),
        (r#"{"all": true}"#, "missing field `firmware`"),
        (r#"{"firmware": "app-1.1.0.bin"}"#, "say which devices"),
        (
            r#"{"firmware": "app-1.1.0.bin", "all": true, "to": ["a"]}"#,
            "only one of",
        ),
        (
            r#"{"firmware": "app-1.1.0.bin", "all": true, "canery": 1}"#,
            "canery",
        ),
        (
            r#"{"firmware": "app-1.1.0.bin", "all": true, "batch": "150%"}"#,
            "batch",
        ),
        (
            r#"{"firmware": "app-1.1.0.bin", "where": "colour=red"}"#,
            "colour",
        ),
        (
            r#"{"firmware": "nope.bin", "all": true}"#,
            "has no \\\"nope.bin\\\"",
        ),
        // Nothing is online in this fleet.
        (
            r#"{"firmware": "app-1.1.0.bin", "all": true}"#,
            "no device to update",
        ),
        (
            r#"{"firmware": "app-1.1.0.bin", "to": ["ghost"]}"#,
            "\\\"ghost\\\" is not known",
        ),
    ];
    for (body, says) in cases {
        let (status, text) = post(&serve, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {text}");
        assert!(
            !text.trim_end().contains('\n'),
            "{body}: not one line: {text}"
        );
        let v: Value = serde_json::from_str(&text).unwrap();
        let e = v["error"].as_str().unwrap();
        assert!(!e.contains('\n'), "{e}");
        assert!(text.contains(says), "{body}: {text} does not say {says}");
    }

    // A form post from another site is not JSON and is refused as such.
    let r = reqwest::Client::new()
        .post(format!("{}/api/deployments", serve.http))
        .header(header::CONTENT_TYPE, "text/plain")
        .body(r#"{"firmware": "app-1.1.0.bin", "all": true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    assert_eq!(
        get_json(&format!("{}/api/deployments", serve.http)).await,
        json!([]),
        "no refused request left a deployment behind"
    );
}

#[tokio::test]
async fn a_deployment_posted_to_serve_runs_there_and_updates_three_virtual_devices() {
    let fw = firmware_dir();
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start(fw.path(), data.path(), None);
    let port: u16 = serve.broker.rsplit(':').next().unwrap().parse().unwrap();
    let ids = ["dash-a", "dash-b", "dash-c"];
    let devices = start_devices(ids.iter().map(|id| device_config(id, port)).collect());
    let fleet_url = format!("{}/api/fleet", serve.http);
    wait_for(&fleet_url, "saw three devices online on 1.0.0", |v| {
        v.as_array().unwrap().len() == 3
            && v.as_array()
                .unwrap()
                .iter()
                .all(|d| d["online"] == true && d["status"]["version"] == "1.0.0")
    })
    .await;

    let (status, text) = post(
        &serve,
        r#"{"firmware": "app-1.1.0.bin", "all": true, "canary": 1, "batch": 1,
            "max_failures": "0", "auto_rollback": true, "timeout": 60}"#,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    let created: Value = serde_json::from_str(&text).unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["version"], "1.1.0");
    assert_eq!(created["stages"], 3, "canary 1, then batches of 1");
    assert_eq!(created["devices"], json!(ids));
    assert_eq!(created["current"], json!([]));

    let dep = wait_for(
        &format!("{}/api/deployments/{id}", serve.http),
        "finished",
        |d| d["state"] != "running",
    )
    .await;
    assert_eq!(dep["state"], "succeeded", "{dep:#}");
    assert_eq!(dep["firmware"], "app-1.1.0.bin");
    assert_eq!(dep["options"]["auto_rollback"], true);
    let results: Vec<(&str, &str, u64)> = dep["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["device"].as_str().unwrap(),
                d["state"].as_str().unwrap(),
                d["stage"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        results,
        [
            ("dash-a", "done", 0),
            ("dash-b", "done", 1),
            ("dash-c", "done", 2)
        ]
    );
    // The same rows in the list the page polls.
    let all = get_json(&format!("{}/api/deployments", serve.http)).await;
    assert_eq!(all[0]["id"], id.as_str());

    let fleet = wait_for(&fleet_url, "saw every device on 1.1.0", |v| {
        v.as_array()
            .unwrap()
            .iter()
            .all(|d| d["status"]["version"] == "1.1.0" && d["status"]["last"]["job"] == id.as_str())
    })
    .await;
    for d in fleet.as_array().unwrap() {
        assert_eq!(d["status"]["last"]["result"], "done", "{d:#}");
        assert_eq!(d["progress"]["job"], id.as_str(), "{d:#}");
    }
    // The devices themselves booted the new image.
    for (dev, boots) in devices.stop() {
        let last = boots.last().unwrap_or_else(|| panic!("{dev} never booted"));
        assert_eq!(last.version.as_deref(), Some("1.1.0"), "{dev}: {boots:?}");
    }
}

#[tokio::test]
async fn the_event_stream_starts_with_a_snapshot_and_is_guarded_like_the_page() {
    let fw = firmware_dir();
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start(fw.path(), data.path(), None);
    let url = format!("{}/api/events", serve.http);

    // DNS rebinding: another name for this address is refused, as for `/`.
    let client = reqwest::Client::new();
    for (name, value) in [
        (header::HOST, "rebind.example:8080"),
        (header::ORIGIN, "http://rebind.example"),
    ] {
        let r = client
            .get(&url)
            .header(name.clone(), value)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{name}: {value}");
    }

    let mut r = client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut text = String::new();
    while !text.contains("\n\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), r.chunk())
            .await
            .expect("the snapshot comes at once")
            .unwrap()
            .expect("the stream stays open");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let first = text.split("\n\n").next().unwrap();
    assert!(first.contains("event: snapshot"), "{first}");
    assert!(first.contains("id: 1"), "{first}");
    let data = first
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .unwrap_or_else(|| panic!("no data in {first}"));
    let v: Value = serde_json::from_str(data).unwrap();
    assert_eq!(v["seq"], 1);
    assert_eq!(v["devices"], json!([]));
    assert_eq!(v["deployments"], json!([]));
}

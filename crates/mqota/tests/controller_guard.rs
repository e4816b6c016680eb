//! `mqota serve` says when the broker is unreachable and refuses to deploy
//! then (503), the CLI fails with the reason; and the page and API refuse
//! requests by a host name other than an IP address, localhost or an
//! allowed name (DNS rebinding), while firmware downloads are not guarded.

mod controller_support;

use std::time::Duration;

use controller_support::{mqota, Serve};
use mqota_virtual::testing::{publish_to, wait_until_async, Mosquitto};

async fn get(url: &str, host: Option<&str>, origin: Option<&str>) -> reqwest::Response {
    let mut req = reqwest::Client::new().get(url);
    if let Some(h) = host {
        req = req.header("host", h);
    }
    if let Some(o) = origin {
        req = req.header("origin", o);
    }
    req.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_host_names_are_refused_and_an_unreachable_broker_is_said_and_blocks_deploys() {
    let mut broker = Mosquitto::start();
    let port = broker.port();
    let url = format!("mqtt://127.0.0.1:{port}");
    let status = serde_json::json!({
        "device": "g1", "chip": "esp32c3", "project": "p", "version": "1.0.0",
        "slot": 0, "state": "valid", "last": null
    });
    publish_to(
        port,
        "device/g1/status",
        status.to_string().as_bytes(),
        true,
    )
    .await;
    publish_to(port, "device/g1/availability", b"online", true).await;
    let fw = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let serve = {
        let (fw, data, url) = (fw.path().to_owned(), data.path().to_owned(), url.clone());
        tokio::task::spawn_blocking(move || Serve::start(&fw, &data, Some(&url)))
            .await
            .unwrap()
    };
    let fleet_url = format!("{}/api/fleet", serve.http);

    // DNS rebinding: another name for this server is refused.
    let r = get(&fleet_url, Some("evil.example:8080"), None).await;
    assert_eq!(r.status(), 403);
    let body = r.text().await.unwrap();
    assert!(body.contains("--allow-host evil.example"), "{body}");
    let r = get(&fleet_url, None, Some("http://evil.example")).await;
    assert_eq!(r.status(), 403, "a foreign Origin");
    let r = get(&fleet_url, Some("localhost"), Some("http://localhost:1234")).await;
    assert_eq!(r.status(), 200);
    let r = get(
        &format!("{}/firmware/none.bin", serve.http),
        Some("ota.example"),
        None,
    )
    .await;
    assert_eq!(r.status(), 404, "downloads are not guarded");

    // Connected: complete picture.
    let fleet = fleet_url.as_str();
    let read = move || async move {
        let r = get(fleet, None, None).await;
        let complete = r.headers()["x-mqota-fleet-complete"]
            .to_str()
            .unwrap()
            .to_owned();
        let list: serde_json::Value = r.json().await.unwrap();
        (complete, list)
    };
    let (within, every) = (Duration::from_secs(20), Duration::from_millis(100));
    wait_until_async("complete", within, every, read, |(complete, list)| {
        complete == "true" && list.as_array().unwrap().len() == 1
    })
    .await;

    // The broker goes away: the API says so, and deploys are refused.
    broker.kill();
    let read = move || async move {
        let r = get(fleet, None, None).await;
        let gaps = r
            .headers()
            .get("x-mqota-fleet-gaps")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (gaps, r.headers()["x-mqota-fleet-complete"].clone())
    };
    let (within, every) = (Duration::from_secs(30), Duration::from_millis(100));
    let (_, complete) = wait_until_async(
        "the API saying the broker is down",
        within,
        every,
        read,
        |(gaps, _)| gaps.contains("the broker is unreachable"),
    )
    .await;
    assert_eq!(complete, "false");
    let r = reqwest::Client::new()
        .post(format!("{}/api/deployments", serve.http))
        .header("content-type", "application/json")
        .body(r#"{"firmware": "app.bin", "all": true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body = r.text().await.unwrap();
    assert!(body.contains("the broker is unreachable"), "{body}");

    // The CLI: a non-zero exit naming the broker.
    let cli_data = tempfile::tempdir().unwrap();
    let cli_data = cli_data.path().to_str().unwrap().to_owned();
    let (ok, _, err) = tokio::task::spawn_blocking(move || {
        mqota(&[
            "deploy",
            "http://127.0.0.1:9/x.bin",
            "--all",
            "--data-dir",
            &cli_data,
            "--broker",
            &url,
        ])
    })
    .await
    .unwrap();
    assert!(!ok, "deploy must fail without a broker");
    assert!(err.contains("cannot connect to the broker"), "{err}");
}

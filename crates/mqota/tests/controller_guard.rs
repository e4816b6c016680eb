//! `mqota serve` says when the broker is unreachable and refuses to deploy
//! then (503), the CLI fails with the reason; and the page and API refuse
//! requests by a host name other than an IP address, localhost or an
//! allowed name (DNS rebinding), while firmware downloads are not guarded.

mod controller_support;

use std::time::{Duration, Instant};

use controller_support::{mqota, Serve};
use mqota_virtual::testing::{publish_to, Mosquitto};

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
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = get(&fleet_url, None, None).await;
        let complete = r.headers()["x-mqota-fleet-complete"]
            .to_str()
            .unwrap()
            .to_owned();
        let list: serde_json::Value = r.json().await.unwrap();
        if complete == "true" && list.as_array().unwrap().len() == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never complete: {complete} {list}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The broker goes away: the API says so, and deploys are refused.
    broker.kill();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = get(&fleet_url, None, None).await;
        let gaps = r
            .headers()
            .get("x-mqota-fleet-gaps")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        if gaps.contains("the broker is unreachable") {
            assert_eq!(r.headers()["x-mqota-fleet-complete"], "false");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the API never said the broker is down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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

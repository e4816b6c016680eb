//! `mqota status --json`, `GET /api/fleet`, `GET /api/devices` and `mqota
//! deploy --all` see every device of a large fleet, against stock Mosquitto
//! and the embedded broker, also right after `serve` restarts. The devices
//! are retained statuses and availabilities published by one fast client,
//! exactly what a broker replays for real devices. `MQOTA_SCALE_DEVICES`
//! sets the fleet size (default 10,000).

mod controller_support;

use std::time::{Duration, Instant};

use controller_support::{get_json, image, mqota, on_own_runtime, publish_fleet, Serve};
use mqota_virtual::testing::{wait_until, FileServer, Mosquitto};

fn fleet_size() -> usize {
    std::env::var("MQOTA_SCALE_DEVICES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000)
}

fn port_of(broker: &str) -> u16 {
    broker.rsplit(':').next().unwrap().parse().unwrap()
}

/// `status --json` and `deploy --all --dry-run` see all `n` devices.
fn cli_sees_everyone(broker: &str, data: &std::path::Path, firmware_url: &str, n: usize) {
    let t = Instant::now();
    let (ok, out, err) = mqota(&["status", "--json", "--broker", broker]);
    assert!(ok, "status failed: {err}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    eprintln!(
        "status --json: {} of {n} devices in {:.1} s",
        list.len(),
        t.elapsed().as_secs_f64()
    );
    assert_eq!(list.len(), n, "status --json; stderr: {err}");
    assert!(list.iter().all(|d| d["online"] == true));
    assert!(!err.contains("warning"), "{err}");

    let t = Instant::now();
    let data = data.to_str().unwrap();
    let (ok, out, err) = mqota(&[
        "deploy",
        firmware_url,
        "--all",
        "--dry-run",
        "--broker",
        broker,
        "--data-dir",
        data,
        // The image comes from this test's own server on loopback.
        "--allow-remote-firmware",
        "127.0.0.1",
    ]);
    assert!(ok, "deploy --dry-run failed: {err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("dry run:"))
        .unwrap_or_else(|| panic!("no dry-run line: {out}"));
    eprintln!(
        "deploy --all --dry-run in {:.1} s: {}",
        t.elapsed().as_secs_f64(),
        &line[..line.len().min(80)]
    );
    assert!(
        line.contains(&format!("would go to {n} devices")),
        "{}",
        &line[..line.len().min(200)]
    );
    assert!(
        line.ends_with(&format!(" and {} more", n - 20)),
        "a fleet's ids are not one endless line: {}",
        &line[..line.len().min(200)]
    );
}

/// Walks `GET /api/devices` by its `next` cursor; returns the ids listed.
fn api_devices(http: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut url = format!("{http}/api/devices");
    loop {
        let page = get_json(&url);
        ids.extend(
            page["devices"]
                .as_array()
                .unwrap_or_else(|| panic!("not a page: {page}"))
                .iter()
                .map(|d| d["id"].as_str().unwrap().to_owned()),
        );
        match page["next"].as_str() {
            Some(next) => url = format!("{http}/api/devices?after={next}"),
            None => return ids,
        }
    }
}

/// Polls `GET /api/devices` until it lists all `n` devices, each once.
fn api_devices_lists_everyone(http: &str, n: usize) {
    let (within, every) = (Duration::from_secs(60), Duration::from_millis(200));
    let ids = wait_until(
        &format!("all {n} in /api/devices (the number listed)"),
        within,
        every,
        || api_devices(http),
        |ids| ids.len() == n,
    );
    let unique: std::collections::BTreeSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), n, "a device listed twice");
}

/// `GET /api/fleet`'s completeness header and its gaps.
fn fleet_completeness(http: &str) -> (String, String) {
    let url = format!("{http}/api/fleet");
    on_own_runtime(async move {
        let r = reqwest::get(url).await.unwrap();
        let h = |name| {
            r.headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        };
        (h("x-mqota-fleet-complete"), h("x-mqota-fleet-gaps"))
    })
}

/// Polls `GET /api/fleet` until it lists `n` devices with a status.
fn api_sees_everyone(http: &str, n: usize) {
    let seen = || {
        let fleet = get_json(&format!("{http}/api/fleet"));
        fleet
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| !d["status"].is_null() && d["online"] == true)
            .count()
    };
    let (within, every) = (Duration::from_secs(60), Duration::from_millis(200));
    wait_until(
        &format!("all {n} in /api/fleet (the number listed)"),
        within,
        every,
        seen,
        |&seen| seen == n,
    );
}

#[test]
fn a_large_fleet_is_seen_whole_through_stock_mosquitto() {
    let n = fleet_size();
    let broker = Mosquitto::start();
    publish_fleet(broker.port(), n);
    let url = format!("mqtt://127.0.0.1:{}", broker.port());
    let fw = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let files = rt.block_on(FileServer::start(&[(
        "app-1.1.0.bin",
        &image("1.1.0", 64 * 1024),
    )]));
    cli_sees_everyone(&url, data.path(), &files.url("app-1.1.0.bin"), n);
    let mut serve = Serve::start(fw.path(), data.path(), Some(&url));
    api_sees_everyone(&serve.http, n);
    api_devices_lists_everyone(&serve.http, n);

    // Right after a restart the store lists everyone at once, and the
    // broker's replay brings the live picture back whole.
    serve.kill();
    let serve = Serve::start(fw.path(), data.path(), Some(&url));
    let listed = api_devices(&serve.http).len();
    assert_eq!(listed, n, "/api/devices right after the restart");
    api_sees_everyone(&serve.http, n);
    assert_eq!(fleet_completeness(&serve.http).0, "true");
    cli_sees_everyone(&url, data.path(), &files.url("app-1.1.0.bin"), n);
}

#[test]
fn a_large_fleet_is_seen_whole_through_the_embedded_broker() {
    let n = fleet_size();
    let fw = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start(fw.path(), data.path(), None);
    publish_fleet(port_of(&serve.broker), n);
    api_sees_everyone(&serve.http, n);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let files = rt.block_on(FileServer::start(&[(
        "app-1.1.0.bin",
        &image("1.1.0", 64 * 1024),
    )]));
    let cli_data = tempfile::tempdir().unwrap();
    cli_sees_everyone(
        &serve.broker,
        cli_data.path(),
        &files.url("app-1.1.0.bin"),
        n,
    );
    api_devices_lists_everyone(&serve.http, n);

    // A restarted serve starts an empty broker: the store still lists every
    // device at once, and /api/fleet says it is missing them rather than
    // showing an empty fleet as whole; once the devices are back (they
    // publish their statuses again on reconnecting), everyone is seen.
    let mut serve = serve;
    serve.kill();
    let serve = Serve::start(fw.path(), data.path(), None);
    assert_eq!(api_devices(&serve.http).len(), n, "right after the restart");
    let (complete, gaps) = fleet_completeness(&serve.http);
    assert_eq!(complete, "false", "{gaps}");
    assert!(
        gaps.contains(&format!("{n} device(s) in the store")),
        "{gaps}"
    );
    publish_fleet(port_of(&serve.broker), n);
    api_sees_everyone(&serve.http, n);
    assert_eq!(fleet_completeness(&serve.http).0, "true");
    cli_sees_everyone(
        &serve.broker,
        cli_data.path(),
        &files.url("app-1.1.0.bin"),
        n,
    );
}

//! Why a job failed, from the device's own field log: `mqota serve` and
//! `mqota deploy --wait` as processes against a real Mosquitto, a virtual
//! device (the real device runtime) that installs an image whose health
//! check fails and rolls back. The controller reads the device's last log
//! records when the rollback is reported, keeps them with the result, and
//! both the summary and `GET /api/deployments/{id}` say why. The page's
//! `GET /api/devices/{id}/log` reads the same log on demand.

mod controller_support;

use std::time::{Duration, Instant};

use controller_support::{
    device_config, get_json, image, mqota, on_own_runtime, start_devices, status_json, Serve,
};
use mqota_virtual::testing::{wait_until, Mosquitto};

/// What the device runtime logs when a trial's health check fails.
const WHY: &str = "trial failed: health check failed, rolling back";

#[test]
fn a_rolled_back_job_keeps_the_devices_last_log_records_and_the_summary_and_api_say_why() {
    let broker = Mosquitto::start();
    let url = format!("mqtt://127.0.0.1:{}", broker.port());
    let fw = tempfile::tempdir().unwrap();
    std::fs::write(
        fw.path().join("app-1.2.0+unhealthy.bin"),
        image("1.2.0+unhealthy", 64 * 1024),
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap().to_owned();
    let serve = Serve::start(fw.path(), data.path(), Some(&url));
    let devices = start_devices(vec![device_config("fl-a", broker.port())]);
    let (within, every) = (Duration::from_secs(60), Duration::from_millis(200));
    wait_until(
        "fl-a online",
        within,
        every,
        || status_json(&url),
        |s| {
            s.iter()
                .any(|d| d["device"] == "fl-a" && d["online"] == true)
        },
    );

    let started = Instant::now();
    let (ok, out, err) = mqota(&[
        "deploy",
        "app-1.2.0+unhealthy.bin",
        "--to",
        "fl-a",
        "--timeout",
        "60",
        "--wait",
        "--server",
        &serve.http,
        "--broker",
        &url,
        "--data-dir",
        &data_dir,
    ]);
    let took = started.elapsed();
    assert!(!ok, "an unhealthy rollout must fail:\n{out}\n{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("fl-a "))
        .unwrap_or_else(|| panic!("no summary line for fl-a:\n{out}\n{err}"));
    assert!(
        line.contains(&format!("rolled_back    health_check_failed — {WHY}")),
        "the summary does not say why from the log: {line:?}\n{out}\n{err}"
    );
    eprintln!("deploy --wait with the log read took {took:.1?}:\n{out}");

    // The API shows the same, with the records themselves.
    let id = out
        .split_whitespace()
        .skip_while(|w| *w != "deployment")
        .nth(1)
        .unwrap_or_else(|| panic!("no deployment id in {out}"))
        .to_owned();
    let d = get_json(&format!("{}/api/deployments/{id}", serve.http));
    let dev = &d["devices"][0];
    assert_eq!(dev["state"], "rolled_back", "{d:#}");
    assert_eq!(dev["error"], "health_check_failed", "{d:#}");
    assert_eq!(dev["log"]["line"], WHY, "{d:#}");
    assert_eq!(dev["log"]["error"], serde_json::Value::Null, "{d:#}");
    let records = dev["log"]["records"].as_array().unwrap();
    assert!(
        records.len() <= mqota_controller::rollout::LOG_RECORDS as usize,
        "{d:#}"
    );
    // The newest records: the trial's failure, the boot back into the old
    // image, and the rollback's report.
    let msgs: Vec<&str> = records.iter().map(|r| r["msg"].as_str().unwrap()).collect();
    let at = |text: &str| msgs.iter().position(|m| m.contains(text));
    let (trial, report) = (
        at(WHY).unwrap_or_else(|| panic!("{msgs:#?}")),
        at(&format!("job {id}: rolled_back health_check_failed"))
            .unwrap_or_else(|| panic!("{msgs:#?}")),
    );
    assert!(trial < report, "{msgs:#?}");
    let numbers: Vec<u64> = records.iter().map(|r| r["n"].as_u64().unwrap()).collect();
    assert!(
        numbers.windows(2).all(|w| w[1] == w[0] + 1),
        "one run of records, oldest first: {numbers:?}"
    );

    // The page's reading of a log: now, from the device; refused with the
    // reason for a device that is not there or not connected.
    let get = |path: &str| {
        let url = format!("{}{path}", serve.http);
        on_own_runtime(async move {
            let r = reqwest::get(url).await.unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        })
    };
    let (status, v) = get("/api/devices/fl-a/log?max=5");
    assert_eq!(status, 200, "{v:#}");
    let records = v["records"].as_array().unwrap();
    assert_eq!(records.len(), 5, "{v:#}");
    assert_eq!(records[4]["n"], v["newest"], "the newest five: {v:#}");
    let (status, v) = get("/api/devices/nobody/log");
    assert_eq!(status, 404, "{v:#}");
    drop(devices);
    let (within, every) = (Duration::from_secs(30), Duration::from_millis(200));
    let read = || get("/api/devices/fl-a/log");
    let (_, v) = wait_until("refused as offline", within, every, read, |(status, _)| {
        *status == 409
    });
    assert!(
        v["error"].as_str().unwrap().contains("fl-a is offline"),
        "{v:#}"
    );
}

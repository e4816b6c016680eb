//! Rollouts with `mqota serve` (embedded broker), `mqota deploy` and
//! `mqota status` as processes, against 20 virtual devices (the real device
//! runtime on simulated flash) running in this test.

mod controller_support;

use std::time::Duration;

use controller_support::{
    device_config, get_json, image, mqota, start_devices, status_json, Serve,
};
use mqota_virtual::testing::wait_until;

/// `n` devices whose flash files live in `dir`, so they keep their state
/// across a restart: a reboot of the whole fleet.
fn fleet(n: usize, port: u16, dir: &std::path::Path) -> Vec<mqota_virtual::device::VirtualConfig> {
    (0..n)
        .map(|i| {
            let id = format!("dev-{i:02}");
            let mut c = device_config(&id, port);
            c.flash = Some(dir.join(format!("{id}.flash")));
            c
        })
        .collect()
}

/// Waits until `n` devices are online and `check` holds for every one.
fn wait_fleet(broker: &str, n: usize, what: &str, check: impl Fn(&serde_json::Value) -> bool) {
    let (within, every) = (Duration::from_secs(60), Duration::from_millis(500));
    wait_until(
        &format!("the fleet {what}"),
        within,
        every,
        || status_json(broker),
        |s| s.iter().filter(|d| d["online"] == true && check(d)).count() == n,
    );
}

fn versions(broker: &str) -> Vec<String> {
    status_json(broker)
        .iter()
        .map(|d| d["version"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_staged_rollout_updates_twenty_devices_and_an_unhealthy_one_stops_after_the_canary_and_rolls_back(
) {
    let fw = tempfile::tempdir().unwrap();
    std::fs::write(fw.path().join("app-1.1.0.bin"), image("1.1.0", 96 * 1024)).unwrap();
    std::fs::write(
        fw.path().join("app-1.2.0+unhealthy.bin"),
        image("1.2.0+unhealthy", 96 * 1024),
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let flash = tempfile::tempdir().unwrap();
    let serve = Serve::start(fw.path(), data.path(), None);
    let port: u16 = serve.broker.rsplit(':').next().unwrap().parse().unwrap();
    let data_dir = data.path().to_str().unwrap().to_owned();
    let devices = start_devices(fleet(20, port, flash.path()));
    wait_fleet(&serve.broker, 20, "came online on 1.0.0", |d| {
        d["version"] == "1.0.0"
    });

    // 1. A healthy image, canary 2 then batches of half the fleet.
    let (ok, out, err) = mqota(&[
        "deploy",
        "app-1.1.0.bin",
        "--all",
        "--canary",
        "2",
        "--batch",
        "50%",
        "--timeout",
        "60",
        "--wait",
        "--server",
        &serve.http,
        "--broker",
        &serve.broker,
        "--data-dir",
        &data_dir,
    ]);
    assert!(ok, "deploy failed:\n{out}\n{err}");
    assert!(out.contains("to 20 devices in 3 stages"), "{out}");
    assert!(out.contains("succeeded — 20 done"), "{out}");
    wait_fleet(&serve.broker, 20, "reached 1.1.0", |d| {
        d["version"] == "1.1.0"
    });

    // serve recorded the deployment, each device's result and the history.
    let deps = get_json(&format!("{}/api/deployments", serve.http));
    let deps = deps.as_array().unwrap();
    assert_eq!(deps.len(), 1);
    assert_eq!(deps[0]["state"], "succeeded");
    let stages: Vec<u64> = deps[0]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["stage"].as_u64().unwrap())
        .collect();
    assert_eq!(stages.iter().filter(|s| **s == 0).count(), 2);
    assert_eq!(stages.iter().filter(|s| **s == 1).count(), 10);
    assert_eq!(stages.iter().filter(|s| **s == 2).count(), 8);

    // 2. An image whose health check fails: both canaries roll back by
    // themselves, the rollout stops, nobody else is sent the job.
    let (ok, out, err) = mqota(&[
        "deploy",
        "app-1.2.0+unhealthy.bin",
        "--all",
        "--canary",
        "2",
        "--batch",
        "50%",
        "--max-failures",
        "10%",
        "--auto-rollback",
        "--timeout",
        "60",
        "--wait",
        "--server",
        &serve.http,
        "--broker",
        &serve.broker,
        "--data-dir",
        &data_dir,
    ]);
    assert!(!ok, "an unhealthy rollout must fail:\n{out}");
    assert!(err.contains("failed"), "{err}");
    assert!(out.contains("2 rolled_back, 18 skipped"), "{out}");
    wait_fleet(&serve.broker, 20, "stayed on 1.1.0", |d| {
        d["version"] == "1.1.0"
    });

    // 3. The whole fleet reboots (same flash files): status still shows
    // what they run.
    drop(devices);
    let _devices = start_devices(fleet(20, port, flash.path()));
    wait_fleet(&serve.broker, 20, "came back on 1.1.0", |d| {
        d["version"] == "1.1.0"
    });
    assert!(versions(&serve.broker).iter().all(|v| v == "1.1.0"));
}

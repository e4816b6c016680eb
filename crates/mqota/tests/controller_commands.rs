//! The small fleet commands as an operator runs them: `status --json`,
//! `watch`, `rollback`, `cancel`, the broker from the environment or the
//! config file, and `serve`'s device list across a restart. Real Mosquitto,
//! virtual devices (the real device runtime), the built binary.

mod controller_support;

use std::process::Command;
use std::time::{Duration, Instant};

use controller_support::{
    device_config, get_json, image, mqota, start_devices, status_json, Serve, MQOTA,
};
use mqota_virtual::testing::{
    free_port, observe_on, publish_to, wait_until, Fault, FaultServer, Mosquitto,
};
use sha2::Digest;

fn device<'a>(list: &'a [serde_json::Value], id: &str) -> Option<&'a serde_json::Value> {
    list.iter().find(|d| d["device"] == id)
}

/// Polls `status --json` until `check` holds for the list.
fn wait_status(
    broker: &str,
    what: &str,
    check: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let (within, every) = (Duration::from_secs(60), Duration::from_millis(300));
    wait_until(what, within, every, || status_json(broker), |s| check(s))
}

fn online_on(list: &[serde_json::Value], id: &str, version: &str) -> bool {
    device(list, id).is_some_and(|d| d["online"] == true && d["version"] == version)
}

#[test]
fn status_watch_and_rollback_show_and_undo_an_update_and_serve_remembers_the_fleet_after_a_restart()
{
    let mut broker = Mosquitto::start();
    let broker_url = format!("mqtt://127.0.0.1:{}", broker.port());
    let fw = tempfile::tempdir().unwrap();
    std::fs::write(fw.path().join("app-1.1.0.bin"), image("1.1.0", 64 * 1024)).unwrap();
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap().to_owned();
    let mut serve = Serve::start(fw.path(), data.path(), Some(&broker_url));
    let devices = start_devices(vec![
        device_config("cmd-0", broker.port()),
        device_config("cmd-1", broker.port()),
    ]);

    // status --json: the whole fleet, each with its version and chip.
    let list = wait_status(&broker_url, "came online", |s| {
        s.len() == 2 && online_on(s, "cmd-0", "1.0.0") && online_on(s, "cmd-1", "1.0.0")
    });
    for d in &list {
        assert_eq!(d["chip"], "esp32c3", "{d}");
        assert!(d["slot"].is_number(), "{d}");
    }

    // watch --seconds 1: a table with every device, then it ends by itself.
    let started = Instant::now();
    let (ok, out, err) = mqota(&["watch", "--seconds", "1", "--broker", &broker_url]);
    assert!(ok, "watch failed: {err}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "watch must stop"
    );
    // Into a pipe, watch prints its frames one after another, without
    // screen-clearing codes: the last frame is the last table.
    assert!(
        !out.contains('\x1b'),
        "no escape codes into a pipe: {out:?}"
    );
    let table = &out[out.rfind("\nID ").map_or(0, |i| i + 1)..];
    assert!(table.starts_with("ID "), "{table}");
    for id in ["cmd-0", "cmd-1"] {
        let row = table
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("no row for {id}: {table}"));
        assert!(row.contains("yes") && row.contains("1.0.0"), "{row}");
    }
    assert!(table.contains("2 devices"), "{table}");

    // Update one device, then roll it back by hand.
    let (ok, out, err) = mqota(&[
        "deploy",
        "app-1.1.0.bin",
        "--to",
        "cmd-0",
        "--timeout",
        "60",
        "--wait",
        "--server",
        &serve.http,
        "--broker",
        &broker_url,
        "--data-dir",
        &data_dir,
    ]);
    assert!(ok, "deploy failed:\n{out}\n{err}");
    wait_status(&broker_url, "ran 1.1.0", |s| online_on(s, "cmd-0", "1.1.0"));

    // Refused before anything is sent: a device nobody knows.
    let (ok, _, err) = mqota(&["rollback", "nobody", "--broker", &broker_url]);
    assert!(!ok, "a rollback to an unknown device must fail");
    assert!(err.contains("\"nobody\" is not known"), "{err}");
    // A cancel with no update in flight gets no answer: said, and non-zero.
    let (ok, _, err) = mqota(&["cancel", "cmd-1", "--timeout", "1", "--broker", &broker_url]);
    assert!(!ok, "an unanswered cancel must fail");
    assert!(
        err.contains("no answer to the cancel within 1 s from: cmd-1"),
        "{err}"
    );

    // A refusal is printed and fails: cmd-1 has no other image to go back to.
    let (ok, out, err) = mqota(&["rollback", "cmd-1", "--broker", &broker_url]);
    assert!(!ok, "a refused rollback must fail");
    assert!(out.contains("cmd-1: failed (no_previous_image)"), "{out}");
    assert!(err.contains("rollback refused"), "{err}");

    // The rollback waits for the device's answer and prints it.
    let (ok, out, err) = mqota(&["rollback", "cmd-0", "--broker", &broker_url]);
    assert!(ok, "rollback failed: {err}");
    assert!(out.contains("sent rollback to cmd-0"), "{out}");
    assert!(out.contains("cmd-0: rolled_back"), "{out}");
    let list = wait_status(&broker_url, "rolled back", |s| {
        online_on(s, "cmd-0", "1.0.0")
            && device(s, "cmd-0").unwrap()["last"]["result"] == "rolled_back"
    });
    assert!(
        online_on(&list, "cmd-1", "1.0.0"),
        "the other one untouched"
    );

    // serve recorded the fleet; restarted against a broker that lost every
    // retained status, it still lists the devices from its database.
    wait_api_devices(&serve.http, |d| {
        d.len() == 2
            && d.iter()
                .any(|x| x["id"] == "cmd-0" && x["status"]["version"] == "1.0.0")
    });
    drop(devices);
    wait_status(&broker_url, "went offline", |s| {
        device(s, "cmd-0").is_some_and(|d| d["online"] == false)
    });
    let (ok, _, err) = mqota(&["rollback", "cmd-0", "--broker", &broker_url]);
    assert!(!ok, "a rollback to an offline device must fail");
    assert!(err.contains("\"cmd-0\" is offline"), "{err}");
    serve.kill();
    broker.restart();
    let serve = Serve::start(fw.path(), data.path(), Some(&broker_url));
    assert!(
        status_json(&broker_url).is_empty(),
        "the broker forgot them"
    );
    let listed = get_json(&format!("{}/api/devices", serve.http));
    assert!(listed["next"].is_null(), "one page: {listed:#}");
    let listed = listed["devices"].as_array().unwrap();
    let ids: Vec<&str> = listed.iter().map(|x| x["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["cmd-0", "cmd-1"], "{listed:#?}");
    assert!(listed.iter().all(|x| x["status"]["version"] == "1.0.0"));
}

fn wait_api_devices(http: &str, check: impl Fn(&[serde_json::Value]) -> bool) {
    let (within, every) = (Duration::from_secs(30), Duration::from_millis(200));
    let read = || get_json(&format!("{http}/api/devices"));
    wait_until("recorded by serve", within, every, read, |v| {
        check(v["devices"].as_array().unwrap())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_slow_download_which_ends_cancelled() {
    let broker = Mosquitto::start();
    let port = broker.port();
    let broker_url = format!("mqtt://127.0.0.1:{port}");
    let img = image("1.1.0", 128 * 1024);
    // 16 KiB/s: the download would take eight seconds.
    let server = FaultServer::start(img.clone(), Fault::Throttle(16 * 1024)).await;
    let _devices = start_devices(vec![device_config("slow", port)]);
    let b = broker_url.clone();
    tokio::task::spawn_blocking(move || {
        wait_status(&b, "came online", |s| online_on(s, "slow", "1.0.0"))
    })
    .await
    .unwrap();

    let progress = observe_on(port, "device/progress").await;
    let job = serde_json::json!({
        "url": server.url(),
        "version": "1.1.0",
        "sha256": hex::encode(sha2::Sha256::digest(&img)),
        "size": img.len(),
        "job": "slow-1",
    });
    publish_to(
        port,
        "device/slow/ota/start",
        job.to_string().as_bytes(),
        false,
    )
    .await;
    let phase_of = |r: &mqota_virtual::testing::Received| {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        (
            v["phase"].as_str().unwrap_or_default().to_owned(),
            v["job"].as_str().unwrap_or_default().to_owned(),
        )
    };
    assert!(
        progress
            .wait_until(Duration::from_secs(20), |seen| seen
                .iter()
                .any(|r| phase_of(r) == ("downloading".into(), "slow-1".into())))
            .await,
        "the download never started: {:?}",
        progress.all()
    );

    let b = broker_url.clone();
    let (ok, out, err) =
        tokio::task::spawn_blocking(move || mqota(&["cancel", "slow", "--broker", &b]))
            .await
            .unwrap();
    assert!(ok, "cancel failed: {err}");
    assert!(out.contains("sent cancel to slow"), "{out}");
    assert!(
        out.contains("slow: cancelled"),
        "the answer is printed: {out}"
    );
    assert!(
        progress
            .wait_until(Duration::from_secs(10), |seen| seen
                .iter()
                .any(|r| phase_of(r) == ("cancelled".into(), "slow-1".into())))
            .await,
        "no cancelled event: {:?}",
        progress.all()
    );
    assert!(
        server.bytes_sent() < img.len() as u64,
        "cancelled before the end of the download"
    );
    let b = broker_url.clone();
    let list = tokio::task::spawn_blocking(move || {
        wait_status(&b, "recorded the cancel", |s| {
            device(s, "slow").is_some_and(|d| d["last"]["result"] == "cancelled")
        })
    })
    .await
    .unwrap();
    let d = device(&list, "slow").unwrap();
    assert_eq!(d["version"], "1.0.0", "still on the old version: {d}");
    assert_eq!(d["last"]["job"], "slow-1");
}

/// `mqota status --json` with only these variables (and no `--broker`).
fn status_with_env(vars: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(MQOTA)
        .args(["status", "--json"])
        .env_remove("MQOTA_BROKER")
        .env_remove("MQOTA_CONFIG")
        .envs(vars.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_one_line_error(ok: bool, out: &str, err: &str, mentions: &str) {
    assert!(!ok, "must fail: {out}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains(mentions), "{err}");
}

#[test]
fn the_broker_comes_from_the_environment_or_the_config_file_and_a_bad_one_is_a_one_line_error() {
    let broker = Mosquitto::start();
    let good = format!("mqtt://127.0.0.1:{}", broker.port());
    let dead = format!("mqtt://127.0.0.1:{}", free_port());
    let _devices = start_devices(vec![device_config("env-0", broker.port())]);
    wait_status(&good, "came online", |s| online_on(s, "env-0", "1.0.0"));
    let lists_the_device = |(ok, out, err): (bool, String, String)| {
        assert!(ok, "status failed: {err}");
        let list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        assert!(online_on(&list, "env-0", "1.0.0"), "{list:#?}");
    };

    let dir = tempfile::tempdir().unwrap();
    let good_file = dir.path().join("good.toml");
    std::fs::write(&good_file, format!("broker = \"{good}\"\n")).unwrap();
    let dead_file = dir.path().join("dead.toml");
    std::fs::write(&dead_file, format!("broker = \"{dead}\"\n")).unwrap();
    let good_file = good_file.to_str().unwrap();
    let dead_file = dead_file.to_str().unwrap();

    // The environment alone.
    lists_the_device(status_with_env(&[
        ("MQOTA_BROKER", &good),
        ("MQOTA_CONFIG", "/dev/null"),
    ]));
    // The config file alone.
    lists_the_device(status_with_env(&[("MQOTA_CONFIG", good_file)]));
    // The environment beats the config file...
    lists_the_device(status_with_env(&[
        ("MQOTA_BROKER", &good),
        ("MQOTA_CONFIG", dead_file),
    ]));
    // ... and the config file is really read: its dead broker is tried.
    let (ok, out, err) = status_with_env(&[("MQOTA_CONFIG", dead_file)]);
    assert_one_line_error(ok, &out, &err, "cannot connect to the broker");

    // Malformed URLs, from the command line or the environment.
    for bad in ["http://127.0.0.1:1883", "mqtt://127.0.0.1:notaport"] {
        let (ok, out, err) = mqota(&["status", "--broker", bad]);
        assert_one_line_error(ok, &out, &err, "--broker");
        let (ok, out, err) =
            status_with_env(&[("MQOTA_BROKER", bad), ("MQOTA_CONFIG", "/dev/null")]);
        assert_one_line_error(ok, &out, &err, "--broker");
    }
    // A malformed URL in the config file is blamed on the config file.
    let bad_file = dir.path().join("bad-url.toml");
    std::fs::write(&bad_file, "broker = \"http://127.0.0.1:1883\"\n").unwrap();
    let (ok, out, err) = status_with_env(&[("MQOTA_CONFIG", bad_file.to_str().unwrap())]);
    assert_one_line_error(ok, &out, &err, "broker in the config file");
    // A config file that does not parse names itself.
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "broker = \n").unwrap();
    let (ok, out, err) = status_with_env(&[("MQOTA_CONFIG", broken.to_str().unwrap())]);
    assert_one_line_error(ok, &out, &err, "broken.toml");
}

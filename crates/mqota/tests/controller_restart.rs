//! A controller stopped mid-rollout: serve and deploy are killed and started
//! again; the deployment and its results are still known and the rollout
//! finishes with `deploy --resume`.

mod controller_support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use controller_support::{
    count, device_config, get_json, image, mqota, start_devices, wait_deployment, wait_status,
    Serve, MQOTA,
};
use mqota_virtual::testing::Mosquitto;

#[test]
fn a_controller_restarted_mid_rollout_still_knows_the_rollout_and_finishes_it() {
    let broker = Mosquitto::start();
    let broker_url = format!("mqtt://127.0.0.1:{}", broker.port());
    let fw = tempfile::tempdir().unwrap();
    std::fs::write(fw.path().join("app-1.1.0.bin"), image("1.1.0", 256 * 1024)).unwrap();
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap().to_owned();
    let mut serve = Serve::start(fw.path(), data.path(), Some(&broker_url));

    let port = broker.port();
    let devices = start_devices(
        (0..6)
            .map(|i| {
                let mut c = device_config(&format!("r-{i}"), port);
                c.health_timeout = Duration::from_secs(5);
                c
            })
            .collect(),
    );
    wait_status(
        &broker_url,
        "the devices listed",
        Duration::from_secs(30),
        |s| s.len() == 6,
    );

    // One device per stage, so the rollout is surely unfinished when the
    // first result is in.
    let mut deploy = Command::new(MQOTA)
        .args([
            "deploy",
            "app-1.1.0.bin",
            "--all",
            "--canary",
            "1",
            "--batch",
            "1",
            "--wait",
            "--server",
            &serve.http,
            "--broker",
            &broker_url,
            "--data-dir",
            &data_dir,
        ])
        .env("MQOTA_CONFIG", "/dev/null")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let canary = wait_deployment(
        &serve.http,
        "the canary done",
        Duration::from_secs(60),
        |d| count(d, "done") >= 1,
    );
    let id = canary["id"].as_str().unwrap().to_owned();
    // The controller dies without a word, and so does serve.
    deploy.kill().unwrap();
    deploy.wait().unwrap();
    serve.kill();

    let http = serve.http.trim_start_matches("http://").to_owned();
    let serve = Serve::start_at(fw.path(), data.path(), Some(&broker_url), &http);
    let d = get_json(&format!("{}/api/deployments/{id}", serve.http));
    assert_eq!(d["state"], "running", "{d:#}");
    let done_before: Vec<String> = d["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["state"] == "done")
        .map(|x| x["device"].as_str().unwrap().to_owned())
        .collect();
    assert!(!done_before.is_empty() && done_before.len() < 6, "{d:#}");
    assert_eq!(d["devices"].as_array().unwrap().len(), 6);

    // The killed deploy's claim on the deployment holds until its lease
    // (10 s) lapses: until then a resume is refused, naming it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (ok, out, err) = loop {
        let (ok, out, err) = mqota(&[
            "deploy",
            "--resume",
            &id,
            "--wait",
            "--broker",
            &broker_url,
            "--data-dir",
            &data_dir,
        ]);
        if ok || !err.contains("is being run by deploy pid") || Instant::now() > deadline {
            break (ok, out, err);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(ok, "resume failed:\n{out}\n{err}");
    assert!(out.contains("succeeded — 6 done"), "{out}");
    let d = get_json(&format!("{}/api/deployments/{id}", serve.http));
    assert_eq!(d["state"], "succeeded");
    let fw_list = get_json(&format!("{}/api/firmware", serve.http));
    assert_eq!(fw_list[0]["name"], "app-1.1.0.bin");

    drop(devices);
}

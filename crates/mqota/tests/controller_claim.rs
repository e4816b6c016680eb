//! One deployment, one runner: while a `mqota deploy` process runs a
//! deployment, neither a second `deploy --resume` nor `serve`'s API may run
//! it too, and no second deployment may take its devices; once that process
//! is killed, its claim lapses after its lease and another process takes
//! the deployment over and finishes it. Real Mosquitto, `mqota serve` and
//! `mqota deploy` as processes, virtual devices downloading from a throttled
//! HTTP server (so the rollout is surely still going while the test acts).

mod controller_support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use controller_support::{
    count, device_config, get_json, image, mqota, post_json, start_devices, wait_deployment,
    wait_status, Serve, MQOTA,
};
use mqota_virtual::testing::{Fault, FaultServer, Mosquitto};

#[test]
fn a_deployment_has_one_runner_and_a_dead_runners_claim_is_taken_over_after_its_lease() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let broker = Mosquitto::start();
    let broker_url = format!("mqtt://127.0.0.1:{}", broker.port());
    let fw = tempfile::tempdir().unwrap();
    let img = image("1.1.0", 128 * 1024);
    std::fs::write(fw.path().join("app-1.1.0.bin"), &img).unwrap();
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap().to_owned();
    let serve = Serve::start(fw.path(), data.path(), Some(&broker_url));
    // 128 KiB at 8 KiB/s: each download takes about 16 s.
    let slow = rt.block_on(FaultServer::start(img, Fault::Throttle(8 * 1024)));
    let port = broker.port();
    let ids = ["cl-0", "cl-1", "cl-2", "cl-3"];
    let devices = start_devices(ids.iter().map(|id| device_config(id, port)).collect());
    wait_status(
        &broker_url,
        "the devices online",
        Duration::from_secs(30),
        |s| s.iter().filter(|d| d["online"] == true).count() == ids.len(),
    );

    // The first runner: three devices in one stage, a lease of 8 s.
    let mut first = Command::new(MQOTA)
        .args(["deploy", &slow.url(), "--to", "cl-0,cl-1,cl-2", "--wait"])
        .args(["--allow-remote-firmware", "127.0.0.1", "--timeout", "120"])
        .args(["--runner-lease", "8", "--broker", &broker_url])
        .args(["--server", &serve.http, "--data-dir", &data_dir])
        .env("MQOTA_CONFIG", "/dev/null")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let holder = format!("deploy pid {}", first.id());
    let sent = wait_deployment(&serve.http, "the jobs out", Duration::from_secs(30), |d| {
        count(d, "sent") == 3
    });
    let id = sent["id"].as_str().unwrap().to_owned();
    let being_run = format!("deployment {id} is being run by {holder}");

    // A second process is refused, naming who runs it.
    let resume = || {
        mqota(&[
            "deploy",
            "--resume",
            &id,
            "--broker",
            &broker_url,
            "--data-dir",
            &data_dir,
        ])
    };
    let (ok, out, err) = resume();
    assert!(!ok, "a second runner started:\n{out}\n{err}");
    assert!(err.contains(&being_run), "{err}");
    // So is serve, asked over its API.
    let (code, body) = post_json(&format!("{}/api/deployments/{id}/resume", serve.http), None);
    assert_eq!(code, 409, "{body:#}");
    assert!(
        body["error"].as_str().unwrap_or("").contains(&being_run),
        "{body:#}"
    );

    // A device of the running deployment cannot be targeted by a second
    // one, from the CLI or the API; the error names the running deployment.
    let in_it = format!("cl-1 in running deployment {id}");
    let (ok, out, err) = mqota(&[
        "deploy",
        "app-1.1.0.bin",
        "--to",
        "cl-1,cl-3",
        "--wait",
        "--server",
        &serve.http,
        "--broker",
        &broker_url,
        "--data-dir",
        &data_dir,
    ]);
    assert!(!ok, "a second deployment took a busy device:\n{out}\n{err}");
    assert!(err.contains(&in_it), "{err}");
    let (code, body) = post_json(
        &format!("{}/api/deployments", serve.http),
        Some(serde_json::json!({"firmware": "app-1.1.0.bin", "to": ["cl-3", "cl-1"]})),
    );
    assert_eq!(code, 400, "{body:#}");
    assert!(
        body["error"].as_str().unwrap_or("").contains(&in_it),
        "{body:#}"
    );
    let deps = get_json(&format!("{}/api/deployments", serve.http));
    assert_eq!(deps.as_array().unwrap().len(), 1, "{deps:#}");

    // The runner dies without a word: its claim stays until the lease
    // lapses, and only then does another process take over.
    first.kill().unwrap();
    let killed_at = Instant::now();
    first.wait().unwrap();
    let (ok, _, err) = resume();
    assert!(!ok && err.contains(&being_run), "{err}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let (out, err) = loop {
        let (ok, out, err) = resume();
        if ok {
            break (out, err);
        }
        assert!(
            err.contains(&being_run) && Instant::now() < deadline,
            "the claim was never taken over:\n{out}\n{err}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(
        killed_at.elapsed() >= Duration::from_secs(2),
        "taken over before the dead runner's lease (8 s, renewed every 2 s) lapsed"
    );
    assert!(
        out.contains(&format!("resuming deployment {id}")),
        "{out}\n{err}"
    );
    let d = get_json(&format!("{}/api/deployments/{id}", serve.http));
    assert_eq!(d["state"], "succeeded", "{d:#}");
    assert_eq!(count(&d, "done"), 3, "{d:#}");
    // Every device installed the image once: no job was sent twice.
    let boots = devices.stop();
    for (dev, b) in &boots {
        let v: Vec<_> = b.iter().filter_map(|r| r.version.as_deref()).collect();
        let new = v.iter().filter(|x| **x == "1.1.0").count();
        assert_eq!(new, usize::from(dev != "cl-3"), "{dev}: {v:?}");
    }
    drop(serve);
    drop(broker);
}

#[test]
fn a_deploy_interrupted_with_ctrl_c_lets_the_next_runner_in_at_once() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let broker = Mosquitto::start();
    let broker_url = format!("mqtt://127.0.0.1:{}", broker.port());
    let fw = tempfile::tempdir().unwrap();
    let img = image("1.1.0", 64 * 1024);
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap().to_owned();
    let serve = Serve::start(fw.path(), data.path(), Some(&broker_url));
    // 64 KiB at 8 KiB/s: about 8 s of download.
    let slow = rt.block_on(FaultServer::start(img, Fault::Throttle(8 * 1024)));
    let devices = start_devices(vec![device_config("int-0", broker.port())]);
    wait_status(
        &broker_url,
        "the device online",
        Duration::from_secs(30),
        |s| s.iter().any(|d| d["online"] == true),
    );
    // A long lease: only a release lets the resume in quickly.
    let deploy = Command::new(MQOTA)
        .args(["deploy", &slow.url(), "--to", "int-0", "--wait"])
        .args([
            "--allow-remote-firmware",
            "127.0.0.1",
            "--runner-lease",
            "600",
        ])
        .args(["--broker", &broker_url, "--data-dir", &data_dir])
        .env("MQOTA_CONFIG", "/dev/null")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sent = wait_deployment(&serve.http, "the job out", Duration::from_secs(30), |d| {
        count(d, "sent") == 1
    });
    let id = sent["id"].as_str().unwrap().to_owned();
    let kill = Command::new("kill")
        .args(["-INT", &deploy.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = deploy.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("interrupted: deployment {id} is left running")),
        "{err}"
    );
    // At once, although the lease was 600 s.
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
    assert!(ok, "{out}\n{err}");
    let d = get_json(&format!("{}/api/deployments/{id}", serve.http));
    assert_eq!(d["state"], "succeeded", "{d:#}");
    drop(devices);
    drop(serve);
    drop(broker);
}

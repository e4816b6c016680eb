//! An operator pauses, resumes and stops rollouts, and a `serve` killed
//! mid-rollout resumes what it was running: real Mosquitto, `mqota serve`
//! and `mqota deploy` as processes, virtual devices in this test.

mod controller_support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use controller_support::{
    count, device_config, get_json, image, mqota, post_json, start_devices, wait_deployment,
    wait_status, Serve, MQOTA,
};
use mqota_virtual::fleet::VirtualFleet;
use mqota_virtual::testing::Mosquitto;

struct Setup {
    broker: Mosquitto,
    broker_url: String,
    fw: tempfile::TempDir,
    data: tempfile::TempDir,
    serve: Serve,
    devices: VirtualFleet,
}

fn setup(n: usize) -> Setup {
    let broker = Mosquitto::start();
    let broker_url = format!("mqtt://127.0.0.1:{}", broker.port());
    let fw = tempfile::tempdir().unwrap();
    std::fs::write(fw.path().join("app-1.1.0.bin"), image("1.1.0", 256 * 1024)).unwrap();
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start(fw.path(), data.path(), Some(&broker_url));
    let port = broker.port();
    let devices = start_devices(
        (0..n)
            .map(|i| device_config(&format!("op-{i}"), port))
            .collect(),
    );
    wait_status(
        &broker_url,
        "the devices online",
        Duration::from_secs(30),
        |s| s.iter().filter(|d| d["online"] == true).count() == n,
    );
    Setup {
        broker,
        broker_url,
        fw,
        data,
        serve,
        devices,
    }
}

impl Setup {
    fn data_dir(&self) -> &str {
        self.data.path().to_str().unwrap()
    }

    /// `deploy --all --canary 1 --batch 1 --wait` in the background: one
    /// device per stage, so it is surely unfinished after the first result.
    fn deploy_wait(&self) -> Child {
        Command::new(MQOTA)
            .args([
                "deploy",
                "app-1.1.0.bin",
                "--all",
                "--canary",
                "1",
                "--batch",
                "1",
            ])
            .args([
                "--wait",
                "--server",
                &self.serve.http,
                "--broker",
                &self.broker_url,
            ])
            .args(["--data-dir", self.data_dir()])
            .env("MQOTA_CONFIG", "/dev/null")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn deployment(&self, id: &str) -> serde_json::Value {
        get_json(&format!("{}/api/deployments/{id}", self.serve.http))
    }

    /// Waits for the only deployment to satisfy `check`; returns it.
    fn wait_deployment(
        &self,
        what: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let what = format!("the deployment {what}");
        wait_deployment(&self.serve.http, &what, Duration::from_secs(90), check)
    }
}

/// Waits for `child` to exit; returns (success, stdout, stderr).
fn wait_exit(mut child: Child, what: &str) -> (bool, String, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            return (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} never exited");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_pause_from_the_cli_ends_a_deploy_wait_elsewhere_and_a_resume_over_the_api_finishes_it() {
    let s = setup(6);
    let deploy = s.deploy_wait();
    // Paused as soon as the canary's job is out: devices are quick, and
    // later stages must still be pending when the pause is written.
    let d = s.wait_deployment("sent its canary", |d| {
        count(d, "sent") + count(d, "done") >= 1
    });
    let id = d["id"].as_str().unwrap().to_owned();

    let (ok, out, err) = mqota(&["deploy", "--pause", &id, "--data-dir", s.data_dir()]);
    assert!(ok, "pause failed:\n{out}\n{err}");
    assert!(out.contains(&format!("deployment {id} paused")), "{out}");

    // The deploy --wait in the other process notices, lets the job in
    // flight finish and ends, saying how to carry on.
    let (ok, out, err) = wait_exit(deploy, "deploy --wait");
    assert!(!ok, "a paused deployment is no success:\n{out}\n{err}");
    assert!(
        err.contains("is paused; carry on with `mqota deploy --resume"),
        "{err}"
    );
    let d = s.deployment(&id);
    assert_eq!(d["state"], "paused", "{d:#}");
    assert_eq!(count(&d, "sent"), 0, "{d:#}");
    assert!(count(&d, "pending") >= 1, "{d:#}");

    let (ok, _, err) = mqota(&["deploy", "--pause", &id, "--data-dir", s.data_dir()]);
    assert!(!ok && err.contains("is paused: cannot pause"), "{err}");

    let (code, d) = post_json(
        &format!("{}/api/deployments/{id}/resume", s.serve.http),
        None,
    );
    assert_eq!(code, 200, "{d:#}");
    assert_eq!(d["state"], "running", "{d:#}");
    let d = s.wait_deployment("succeeded", |d| d["state"] == "succeeded");
    assert_eq!(count(&d, "done"), 6, "{d:#}");
    drop(s.devices);
    drop(s.broker);
}

#[test]
fn a_stop_ends_the_deployment_stopped_skipping_the_rest_and_is_final() {
    let s = setup(6);
    let deploy = s.deploy_wait();
    let d = s.wait_deployment("sent its canary", |d| {
        count(d, "sent") + count(d, "done") >= 1
    });
    let id = d["id"].as_str().unwrap().to_owned();

    let (ok, out, err) = mqota(&["deploy", "--stop", &id, "--data-dir", s.data_dir()]);
    assert!(ok, "stop failed:\n{out}\n{err}");
    assert!(out.contains(&format!("deployment {id} stopped")), "{out}");

    let (ok, out, err) = wait_exit(deploy, "deploy --wait");
    assert!(!ok, "{out}\n{err}");
    assert!(err.contains("stopped by the operator"), "{err}");
    assert!(
        !err.contains("failed"),
        "stopped is its own end, not a failure: {err}"
    );
    let d = s.deployment(&id);
    assert_eq!(d["state"], "stopped", "{d:#}");
    assert_eq!(d["reason"], "stopped by the operator", "{d:#}");
    assert_eq!(count(&d, "pending") + count(&d, "sent"), 0, "{d:#}");
    assert!(count(&d, "skipped") >= 2, "{d:#}");

    // Final: neither the API nor the CLI brings it back.
    let (code, body) = post_json(
        &format!("{}/api/deployments/{id}/resume", s.serve.http),
        None,
    );
    assert_eq!(code, 409, "{body:#}");
    let (ok, _, err) = mqota(&[
        "deploy",
        "--resume",
        &id,
        "--broker",
        &s.broker_url,
        "--data-dir",
        s.data_dir(),
    ]);
    assert!(!ok && err.contains("is stopped: cannot resume"), "{err}");
    let (code, _) = post_json(&format!("{}/api/deployments/nope/stop", s.serve.http), None);
    assert_eq!(code, 404);
    drop(s.devices);
    drop(s.broker);
}

#[test]
fn a_serve_killed_mid_rollout_resumes_the_rollouts_it_was_running_at_start() {
    let mut s = setup(6);
    let (code, body) = post_json(
        &format!("{}/api/deployments", s.serve.http),
        Some(
            serde_json::json!({"firmware": "app-1.1.0.bin", "all": true, "canary": 1, "batch": "1"}),
        ),
    );
    assert_eq!(code, 201, "{body:#}");
    let id = body["id"].as_str().unwrap().to_owned();
    s.wait_deployment("had a device done", |d| count(d, "done") >= 1);
    s.serve.kill();
    let d = s.deployment_from_store(&id);
    assert_eq!(d, "running");

    let http = s.serve.http.trim_start_matches("http://").to_owned();
    s.serve = Serve::start_at(s.fw.path(), s.data.path(), Some(&s.broker_url), &http);
    // Nobody but the new serve runs it.
    let d = s.wait_deployment("succeeded", |d| d["state"] == "succeeded");
    assert_eq!(count(&d, "done"), 6, "{d:#}");
    assert_eq!(d["id"], id.as_str());
    drop(s.devices);
    drop(s.broker);
}

impl Setup {
    /// The deployment's state as `mqota deploy` would see it, with serve down.
    fn deployment_from_store(&self, id: &str) -> String {
        let store = mqota_controller::store::Store::open(self.data.path()).unwrap();
        store.deployment(id).unwrap().state.as_str().to_owned()
    }
}

//! A rollout believes only what the device itself says on its own topics,
//! and success only from its retained status: forged `failed` events (on the
//! shared progress copy, on another device's topic) neither stop a rollout
//! nor trigger `--auto-rollback`; a progress `done` alone does not finish a
//! device; the retained status showing the new version with `last.job` equal
//! to the job does. Against a real Mosquitto, forged with `mosquitto_pub`.

use std::sync::Arc;
use std::time::Duration;

use mqota_controller::fleet::Fleet;
use mqota_controller::rollout::{self, Firmware, RolloutOptions, Selection, Silent};
use mqota_controller::store::{Deployment, DeploymentState, DeviceState, Store};
use mqota_controller::url::BrokerUrl;
use mqota_virtual::testing::{observe_on, publish_to, wait_until_async, Mosquitto};

fn progress(device: &str, job: &str, phase: &str, error: Option<&str>) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "device": device, "job": job, "phase": phase, "bytes": 0, "total": null,
        "percent": if phase == "done" { 100 } else { 10 }, "error": error, "message": null
    }))
    .unwrap()
}

fn status(device: &str, version: &str, last: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "device": device, "chip": "esp32c3", "project": "fleet", "version": version,
        "slot": 0, "state": "valid", "last": last
    }))
    .unwrap()
}

/// Device `id` as the broker keeps it: a retained status on 1.0.0 with no
/// job behind it, and a retained `online`.
async fn online_on_1_0_0(port: u16, id: &str) {
    let topic = |leaf: &str| format!("device/{id}/{leaf}");
    let fresh = status(id, "1.0.0", serde_json::Value::Null);
    publish_to(port, &topic("status"), &fresh, true).await;
    publish_to(port, &topic("availability"), b"online", true).await;
}

/// The image every rollout here deploys: 1.1.0 for the devices' chip and
/// project, at a URL nobody serves (the devices' answers are forged).
fn firmware() -> Firmware {
    Firmware {
        name: "app.bin".into(),
        url: "http://127.0.0.1:9/app.bin".into(),
        version: "1.1.0".into(),
        sha256: "00".repeat(32),
        size: 4096,
        chip: Some("esp32c3".into()),
        project: Some("fleet".into()),
        signers: None,
    }
}

async fn until(what: &str, check: impl Fn() -> bool) {
    let (within, every) = (Duration::from_secs(10), Duration::from_millis(20));
    wait_until_async(
        what,
        within,
        every,
        || std::future::ready(check()),
        |ok| *ok,
    )
    .await;
}

/// Creates the deployment, runs it on this LocalSet and returns its id and
/// its task once the first device's job has been sent.
async fn start_and_send(
    fleet: &Arc<Fleet>,
    store: &Arc<Store>,
    firmware: &Firmware,
    selection: &Selection,
    options: &RolloutOptions,
) -> (
    String,
    tokio::task::JoinHandle<Result<Deployment, rollout::RolloutError>>,
) {
    let (dep, _) = rollout::create(store, &fleet.devices(), firmware, selection, options).unwrap();
    let job = dep.id.clone();
    let run = {
        let (fleet, store, job) = (fleet.clone(), store.clone(), job.clone());
        tokio::task::spawn_local(
            async move { rollout::run(&fleet, &store, &job, &mut Silent).await },
        )
    };
    until("the job was sent", || {
        store.deployment(&job).unwrap().devices[0].state == DeviceState::Sent
    })
    .await;
    (job, run)
}

/// Runs a test on a LocalSet: `rollout::run` holds a `dyn Observer`, which
/// is not `Send`, so it runs there, as serve runs it on its runner.
async fn on_local_set(test: impl std::future::Future<Output = ()>) {
    tokio::task::LocalSet::new().run_until(test).await;
}

#[tokio::test]
async fn forged_failures_and_a_bare_done_do_not_decide_a_rollout() {
    on_local_set(forged_failures()).await;
}

async fn forged_failures() {
    let broker = Mosquitto::start();
    let port = broker.port();
    let url: BrokerUrl = format!("mqtt://127.0.0.1:{port}").parse().unwrap();
    for id in ["v1", "v2"] {
        online_on_1_0_0(port, id).await;
    }
    let fleet = Arc::new(
        Fleet::connect(&url, "device", "ctl-rollout-truth")
            .await
            .unwrap(),
    );
    until("saw both devices", || {
        fleet
            .devices()
            .iter()
            .filter(|d| d.online && d.status.is_some())
            .count()
            == 2
    })
    .await;
    let rollbacks = observe_on(port, "device/+/ota/rollback").await;

    let data = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(data.path()).unwrap());
    let firmware = firmware();
    let options = RolloutOptions {
        auto_rollback: true,
        timeout_s: 60,
        ..RolloutOptions::default()
    };
    let selection = Selection::Ids(vec!["v1".into()]);
    let (job, run) = start_and_send(&fleet, &store, &firmware, &selection, &options).await;

    // Forged failures for v1's job: on the shared copy, on v2's topic, and a
    // retained status on v2's topic claiming v1 failed.
    let failed = progress("v1", &job, "failed", Some("http_status"));
    publish_to(port, "device/progress", &failed, false).await;
    publish_to(port, "device/v2/progress", &failed, false).await;
    let forged_last = serde_json::json!({"job": job, "result": "failed", "error": "http_status"});
    publish_to(
        port,
        "device/v2/status",
        &status("v1", "1.0.0", forged_last),
        true,
    )
    .await;
    // v1's own `done` event, without the status to back it.
    publish_to(
        port,
        "device/v1/progress",
        &progress("v1", &job, "done", None),
        false,
    )
    .await;
    // A marker from v1 after all of them proves they were processed.
    publish_to(
        port,
        "device/v1/progress",
        &progress("v1", "marker", "downloading", None),
        false,
    )
    .await;
    until("saw the marker", || {
        fleet
            .device("v1")
            .and_then(|d| d.progress)
            .is_some_and(|p| p.job.as_deref() == Some("marker"))
    })
    .await;
    // Give the rollout's own poll (every 250 ms) a few turns to misread them.
    let d = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            let d = store.deployment(&job).unwrap();
            if d.devices[0].state != DeviceState::Sent {
                return d;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        d.is_err(),
        "the rollout decided on lies or a bare done: {d:?}"
    );
    assert_eq!(
        store.deployment(&job).unwrap().state,
        DeploymentState::Running
    );

    // The retained status with the new version and last.job = the job: done.
    let last = serde_json::json!({"job": job, "result": "done", "error": null});
    publish_to(port, "device/v1/status", &status("v1", "1.1.0", last), true).await;
    let dep = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the rollout ended")
        .unwrap()
        .unwrap();
    assert_eq!(dep.state, DeploymentState::Succeeded, "{dep:?}");
    assert_eq!(dep.devices[0].state, DeviceState::Done);
    assert!(rollbacks.all().is_empty(), "no rollback may be sent");
}

#[tokio::test]
async fn the_device_own_failed_event_ends_its_job_even_after_later_events() {
    on_local_set(own_failure()).await;
}

async fn own_failure() {
    let broker = Mosquitto::start();
    let port = broker.port();
    let url: BrokerUrl = format!("mqtt://127.0.0.1:{port}").parse().unwrap();
    online_on_1_0_0(port, "v1").await;
    let fleet = Arc::new(
        Fleet::connect(&url, "device", "ctl-rollout-failed")
            .await
            .unwrap(),
    );
    until("saw v1", || fleet.device("v1").is_some_and(|d| d.online)).await;
    let data = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(data.path()).unwrap());
    let firmware = Firmware {
        chip: None,
        project: None,
        ..firmware()
    };
    let options = RolloutOptions {
        timeout_s: 60,
        ..RolloutOptions::default()
    };
    let (job, run) = start_and_send(&fleet, &store, &firmware, &Selection::All, &options).await;
    // The device fails the job, then at once says something else (a busy
    // answer to another command): the failure is not lost.
    publish_to(
        port,
        "device/v1/progress",
        &progress("v1", &job, "failed", Some("http_status")),
        false,
    )
    .await;
    publish_to(
        port,
        "device/v1/progress",
        &progress("v1", "other", "failed", Some("busy")),
        false,
    )
    .await;
    let dep = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the rollout ended")
        .unwrap()
        .unwrap();
    assert_eq!(dep.state, DeploymentState::Failed, "{dep:?}");
    assert_eq!(dep.devices[0].state, DeviceState::Failed);
    assert_eq!(dep.devices[0].error.as_deref(), Some("http_status"));
}

/// A TCP relay between the controller and the broker that can stop reading
/// from the broker (`stall`), as a controller too busy to read does. Its
/// broker-side socket has a small receive buffer, so the broker's own queue
/// for the controller fills after a few hundred KiB rather than megabytes.
struct StallingRelay {
    port: u16,
    stalled: tokio::sync::watch::Sender<bool>,
}

impl StallingRelay {
    async fn start(broker: u16) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stalled, watch) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.set_recv_buffer_size(4096).unwrap();
                let upstream = socket
                    .connect(([127, 0, 0, 1], broker).into())
                    .await
                    .unwrap();
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_broker, mut to_broker) = upstream.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_client, &mut to_broker).await;
                });
                let mut watch = watch.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    loop {
                        if watch.wait_for(|s| !*s).await.is_err() {
                            return;
                        }
                        match from_broker.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if to_client.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        Self { port, stalled }
    }

    fn stall(&self, on: bool) {
        self.stalled.send_replace(on);
    }
}

/// Publishes `count` QoS 0 progress messages for a device nobody deploys to,
/// in one `mosquitto_pub -l` (one line, one message).
async fn flood(port: u16, count: usize) {
    use tokio::io::AsyncWriteExt;
    let line = format!("{}\n", "x".repeat(300));
    let mut child = tokio::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-t", "device/flood/progress", "-q", "0", "-l"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_pub (apt-get install mosquitto-clients)");
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(line.repeat(count).as_bytes())
        .await
        .unwrap();
    drop(stdin);
    assert!(child.wait().await.unwrap().success());
}

// A controller that could not keep up during a burst, so that the broker
// dropped the one status that ends a device's job, still sees the job end:
// the rollout asks again for the status of a device silent too long.
#[tokio::test]
async fn a_final_status_the_broker_dropped_for_a_slow_controller_is_read_again() {
    on_local_set(dropped_status()).await;
}

async fn dropped_status() {
    // Stock Mosquitto but for a small per-client queue, so that a stalled
    // controller has messages dropped after a short flood.
    let dir = tempfile::tempdir().unwrap();
    let port = mqota_virtual::testing::free_port();
    let config = dir.path().join("mosquitto.conf");
    std::fs::write(
        &config,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 10\n"
        ),
    )
    .unwrap();
    let broker = Mosquitto::start_with_config(&config, port);
    online_on_1_0_0(port, "v1").await;

    let relay = StallingRelay::start(port).await;
    let url: BrokerUrl = format!("mqtt://127.0.0.1:{}", relay.port).parse().unwrap();
    let fleet = Arc::new(Fleet::connect(&url, "device", "ctl-slow").await.unwrap());
    until("saw v1", || fleet.device("v1").is_some_and(|d| d.online)).await;

    let data = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(data.path()).unwrap());
    let firmware = firmware();
    let options = RolloutOptions {
        timeout_s: 120,
        ..RolloutOptions::default()
    };
    let selection = Selection::Ids(vec!["v1".into()]);
    let (job, run) = start_and_send(&fleet, &store, &firmware, &selection, &options).await;

    // The controller stops reading; a burst fills the broker's queue for it.
    relay.stall(true);
    flood(port, 20_000).await;
    let dropping = "Outgoing messages are being dropped for client ctl-slow";
    wait_until_async(
        "the broker dropping messages for the stalled controller",
        Duration::from_secs(20),
        Duration::from_millis(50),
        || std::future::ready(broker.log().contains(dropping)),
        |yes| *yes,
    )
    .await;
    // v1's job ends now, and the status saying so is dropped for it.
    let last = serde_json::json!({"job": job, "result": "done", "error": null});
    publish_to(port, "device/v1/status", &status("v1", "1.1.0", last), true).await;
    // The controller reads again; the status it missed reaches it only by
    // asking (without the rollout's re-read this waits out the timeout).
    relay.stall(false);
    let dep = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the rollout ended well before the job's 120 s timeout")
        .unwrap()
        .unwrap();
    assert_eq!(dep.state, DeploymentState::Succeeded, "{dep:?}");
    assert_eq!(dep.devices[0].state, DeviceState::Done);
}

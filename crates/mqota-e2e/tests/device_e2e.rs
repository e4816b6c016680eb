//! End to end: virtual devices (the real device runtime on the simulated
//! flash and bootloader) against a real Mosquitto and real HTTP servers.
//! Every test starts its own broker and server.

use std::time::Duration;

use mqota_core::image::{Chip, ImageBuilder};
use mqota_core::protocol::{ErrorCode, Phase, Progress, Status};
use mqota_flash_sim::BootConfig;
use mqota_virtual::device::{run_device, Handle, VirtualConfig};
use mqota_virtual::testing::{
    Fault, FaultServer, FileServer, Location, Mosquitto, Received, Redirect, TopicRecorder,
};
use sha2::Digest;
use tokio::task::LocalSet;

fn image(version: &str, size: u32) -> Vec<u8> {
    image_for(Chip::Esp32c3, version, size)
}

fn image_for(chip: Chip, version: &str, size: u32) -> Vec<u8> {
    ImageBuilder::new(chip)
        .version(version)
        .project("mqota-virtual")
        .size(size)
        .build()
        .unwrap()
}

fn config(broker: &impl Port, id: &str) -> VirtualConfig {
    let mut c = VirtualConfig::new(id, "127.0.0.1", broker.port());
    c.health_timeout = Duration::from_secs(10);
    c.stall_timeout = Duration::from_secs(2);
    c.progress_interval = Duration::from_millis(20);
    c.watchdog = Duration::from_millis(500);
    c.update_timeout = Duration::from_secs(60);
    c
}

/// What the tests need of a broker: where it listens.
trait Port {
    fn port(&self) -> u16;
}

impl Port for Mosquitto {
    fn port(&self) -> u16 {
        Mosquitto::port(self)
    }
}

/// The scenarios run against Mosquitto and against the broker embedded in
/// `mqota` (rumqttd); the clients on the test's side are Mosquitto's
/// command-line tools either way.
enum TestBroker {
    Mosquitto(Mosquitto),
    Embedded(mqota_controller::broker::EmbeddedBroker),
}

impl TestBroker {
    fn mosquitto() -> Self {
        TestBroker::Mosquitto(Mosquitto::start())
    }
    fn embedded() -> Self {
        TestBroker::Embedded(
            mqota_controller::broker::EmbeddedBroker::start("127.0.0.1:0".parse().unwrap())
                .expect("embedded broker starts"),
        )
    }
    async fn publish(&self, topic: &str, payload: &[u8], retain: bool) {
        mqota_virtual::testing::publish_to(self.port(), topic, payload, retain).await
    }
    async fn observe(&self, filter: &str) -> TopicRecorder {
        mqota_virtual::testing::observe_on(self.port(), filter).await
    }
}

impl Port for TestBroker {
    fn port(&self) -> u16 {
        match self {
            TestBroker::Mosquitto(m) => m.port(),
            TestBroker::Embedded(b) => b.addr().port(),
        }
    }
}

/// One test per broker for each scenario.
macro_rules! on_both_brokers {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "current_thread")]
            async fn mosquitto() {
                super::$name(super::TestBroker::mosquitto()).await
            }
            #[tokio::test(flavor = "current_thread")]
            async fn embedded_rumqttd() {
                super::$name(super::TestBroker::embedded()).await
            }
        }
    )*};
}

/// A device `id` online on 1.0.0 and in the middle of downloading 1.1.0
/// (300,000 bytes) from a server sending 50 kB/s, as job `job`.
async fn downloading_slowly(
    broker: &TestBroker,
    obs: &TopicRecorder,
    id: &str,
    job_id: &str,
) -> (Handle, FaultServer) {
    let slow = FaultServer::start(image("1.1.0", 300_000), Fault::Throttle(50_000)).await;
    let dev = start(config(broker, id));
    online(obs, id, "1.0.0").await;
    broker
        .publish(
            &format!("device/{id}/ota/start"),
            &job(&slow.url(), serde_json::json!({ "job": job_id })),
            false,
        )
        .await;
    assert!(
        obs.wait_until(Duration::from_secs(10), |s| ended_with(
            s,
            id,
            Phase::Downloading
        ))
        .await,
        "{id} never started downloading"
    );
    (dev, slow)
}

fn start(cfg: VirtualConfig) -> Handle {
    let handle = Handle::new();
    let h = handle.clone();
    tokio::task::spawn_local(async move {
        run_device(cfg, h).await.expect("device runs");
    });
    handle
}

/// The progress events of `id` on its own topic, `device/{id}/progress`.
fn progress_of(seen: &[Received], id: &str) -> Vec<Progress> {
    progress_on(seen, &format!("device/{id}/progress"), id)
}

/// The progress events naming `id` on `topic`.
fn progress_on(seen: &[Received], topic: &str, id: &str) -> Vec<Progress> {
    seen.iter()
        .filter(|r| r.topic == topic)
        .filter_map(|r| serde_json::from_slice::<Progress>(&r.payload).ok())
        .filter(|p| p.device.as_str() == id)
        .collect()
}

/// The latest availability of `id`: `Some(true)` for `online`.
fn availability_of(seen: &[Received], id: &str) -> Option<bool> {
    seen.iter()
        .rev()
        .find(|r| r.topic == format!("device/{id}/availability"))
        .map(|r| r.payload == b"online")
}

fn status_of(seen: &[Received], id: &str) -> Option<Status> {
    seen.iter()
        .rev()
        .find(|r| r.topic == format!("device/{id}/status"))
        .and_then(|r| serde_json::from_slice(&r.payload).ok())
}

fn is_online_on(seen: &[Received], id: &str, version: &str) -> bool {
    availability_of(seen, id) == Some(true)
        && status_of(seen, id).is_some_and(|s| s.version.as_str() == version)
}

fn ended_with(seen: &[Received], id: &str, phase: Phase) -> bool {
    progress_of(seen, id).iter().any(|p| p.phase == phase)
}

async fn online(obs: &TopicRecorder, id: &str, version: &str) {
    assert!(
        obs.wait_until(Duration::from_secs(20), |s| is_online_on(s, id, version))
            .await,
        "{id} never came online on {version}: {:?}",
        status_of(&obs.all(), id)
    );
}

fn job(url: &str, fields: serde_json::Value) -> Vec<u8> {
    let mut j = serde_json::json!({ "url": url });
    j.as_object_mut()
        .unwrap()
        .extend(fields.as_object().unwrap().clone());
    serde_json::to_vec(&j).unwrap()
}

async fn local<F: std::future::Future<Output = ()>>(f: F) {
    LocalSet::new().run_until(f).await
}

async fn a_bare_url_on_the_broadcast_topic_updates_the_device(broker: TestBroker) {
    local(async {
        let obs = broker.observe("device/#").await;
        let v2 = image("1.1.0", 300_000);
        let http = FileServer::start(&[("fw.bin", &v2)]).await;
        let dev = start(config(&broker, "dev-a"));
        online(&obs, "dev-a", "1.0.0").await;

        broker
            .publish("device/ota/start", http.url("fw.bin").as_bytes(), false)
            .await;
        online(&obs, "dev-a", "1.1.0").await;
        assert!(
            obs.wait_until(Duration::from_secs(10), |s| ended_with(
                s,
                "dev-a",
                Phase::Done
            ))
            .await
        );

        let events = progress_of(&obs.all(), "dev-a");
        let phases: Vec<Phase> = events.iter().map(|p| p.phase).collect();
        assert_eq!(phases.first(), Some(&Phase::Accepted), "{phases:?}");
        for want in [
            Phase::Downloading,
            Phase::Verifying,
            Phase::Rebooting,
            Phase::Confirming,
            Phase::Done,
        ] {
            assert!(phases.contains(&want), "{want:?} missing from {phases:?}");
        }
        let percents: Vec<u8> = events.iter().map(|p| p.percent).collect();
        assert!(
            percents.windows(2).all(|w| w[0] <= w[1]),
            "percent went down: {percents:?}"
        );
        assert_eq!(percents.last(), Some(&100));
        let status = status_of(&obs.all(), "dev-a").unwrap();
        assert_eq!(status.slot, Some(1));
        assert_eq!(status.state.as_str(), "valid");
        assert_eq!(status.last.unwrap().result, Phase::Done);
        // The device rebooted once into the new slot.
        let boots = dev.boots();
        assert_eq!(boots.last().unwrap().version.as_deref(), Some("1.1.0"));
        dev.stop();
    })
    .await;
}

async fn a_json_job_with_sha256_and_size_succeeds_and_a_wrong_sha256_fails(broker: TestBroker) {
    local(async {
        let obs = broker.observe("device/#").await;
        let v2 = image("1.1.0", 200_000);
        let http = FileServer::start(&[("fw.bin", &v2)]).await;
        let dev = start(config(&broker, "dev-j"));
        online(&obs, "dev-j", "1.0.0").await;

        let bad = job(&http.url("fw.bin"), serde_json::json!({"job": "j-bad", "sha256": "00".repeat(32), "size": v2.len()}));
        broker.publish("device/dev-j/ota/start", &bad, false).await;
        assert!(obs.wait_until(Duration::from_secs(20), |s| ended_with(s, "dev-j", Phase::Failed)).await);
        let failed = progress_of(&obs.all(), "dev-j").into_iter().find(|p| p.phase == Phase::Failed).unwrap();
        assert_eq!(failed.error, Some(ErrorCode::HashMismatch));
        assert_eq!(failed.job.as_deref(), Some("j-bad"));
        assert!(is_online_on(&obs.all(), "dev-j", "1.0.0"));

        let sha = hex::encode(sha2::Sha256::digest(&v2));
        let good = job(&http.url("fw.bin"), serde_json::json!({"job": "j-good", "sha256": sha, "size": v2.len(), "version": "1.1.0"}));
        broker.publish("device/dev-j/ota/start", &good, false).await;
        online(&obs, "dev-j", "1.1.0").await;
        assert!(obs.wait_until(Duration::from_secs(10), |s| progress_of(s, "dev-j").iter().any(|p| p.phase == Phase::Done && p.job.as_deref() == Some("j-good"))).await);
        dev.stop();
    })
    .await;
}

async fn a_broadcast_job_with_devices_updates_only_the_listed_ones(broker: TestBroker) {
    local(async {
        let obs = broker.observe("device/#").await;
        let v2 = image("1.1.0", 100_000);
        let http = FileServer::start(&[("fw.bin", &v2)]).await;
        let devs: Vec<Handle> = ["b-1", "b-2", "b-3"]
            .iter()
            .map(|id| start(config(&broker, id)))
            .collect();
        for id in ["b-1", "b-2", "b-3"] {
            online(&obs, id, "1.0.0").await;
        }
        let j = job(
            &http.url("fw.bin"),
            serde_json::json!({"job": "some", "devices": ["b-1", "b-3"]}),
        );
        broker.publish("device/ota/start", &j, false).await;
        online(&obs, "b-1", "1.1.0").await;
        online(&obs, "b-3", "1.1.0").await;
        // A marker: b-2 answers a log request only after it has read every
        // command published before it (one publisher, one subscriber: the
        // broker keeps their order), the job included.
        broker
            .publish("device/b-2/logs/get", br#"{"id":"marker"}"#, false)
            .await;
        assert!(
            obs.wait_until(Duration::from_secs(10), |s| s
                .iter()
                .any(|m| m.topic == "device/b-2/logs"
                    && String::from_utf8_lossy(&m.payload).contains("\"marker\"")))
                .await,
            "b-2 never answered the marker"
        );
        assert!(is_online_on(&obs.all(), "b-2", "1.0.0"));
        assert!(
            progress_of(&obs.all(), "b-2").is_empty(),
            "b-2 must stay silent"
        );
        devs.iter().for_each(Handle::stop);
    })
    .await;
}

/// Each failure: its own error, the old firmware keeps running, the next
/// command works.
async fn every_failed_download_reports_its_own_error_and_keeps_the_old_firmware(
    broker: TestBroker,
) {
    local(async {
        let obs = broker.observe("device/#").await;
        let good = image("1.1.0", 100_000);
        let good_http = FileServer::start(&[("fw.bin", &good)]).await;
        let mut truncated = image("1.1.0", 100_000);
        truncated.truncate(70_000);
        let huge = image("1.1.0", 0x1e0000 - 16 * 1024 + 16 * 1024);
        let refused = format!(
            "http://127.0.0.1:{}/fw.bin",
            mqota_virtual::testing::free_port()
        );
        let cases: Vec<(&str, String, Option<FaultServer>, ErrorCode)> = vec![
            (
                "404",
                String::new(),
                Some(FaultServer::start(good.clone(), Fault::NotFound).await),
                ErrorCode::HttpStatus,
            ),
            ("refused", refused, None, ErrorCode::Network),
            (
                "wrong chip",
                String::new(),
                Some(
                    FaultServer::start(image_for(Chip::Esp32c6, "1.1.0", 100_000), Fault::None)
                        .await,
                ),
                ErrorCode::WrongChip,
            ),
            (
                "larger than the slot",
                String::new(),
                Some(FaultServer::start(huge, Fault::None).await),
                ErrorCode::TooLarge,
            ),
            (
                "endless",
                String::new(),
                Some(FaultServer::start(good.clone(), Fault::Endless).await),
                ErrorCode::SizeMismatch,
            ),
            (
                "truncated",
                String::new(),
                Some(FaultServer::start(truncated, Fault::None).await),
                ErrorCode::BadImage,
            ),
        ];
        let mut cfg = config(&broker, "dev-f");
        cfg.update_timeout = Duration::from_secs(30);
        let dev = start(cfg);
        online(&obs, "dev-f", "1.0.0").await;
        for (i, (name, url, server, code)) in cases.iter().enumerate() {
            let url = server
                .as_ref()
                .map(|s| s.url())
                .unwrap_or_else(|| url.clone());
            let id = format!("f-{i}");
            // A short deadline: the refused connection is retried until then.
            broker
                .publish(
                    "device/dev-f/ota/start",
                    &job(&url, serde_json::json!({"job": id, "timeout_s": 6})),
                    false,
                )
                .await;
            let got = obs
                .wait_until(Duration::from_secs(45), |s| {
                    progress_of(s, "dev-f")
                        .iter()
                        .any(|p| p.job.as_deref() == Some(&id) && p.phase == Phase::Failed)
                })
                .await;
            assert!(
                got,
                "{name}: no failure reported: {:?}",
                progress_of(&obs.all(), "dev-f").last()
            );
            let failed = progress_of(&obs.all(), "dev-f")
                .into_iter()
                .find(|p| p.job.as_deref() == Some(&id) && p.phase == Phase::Failed)
                .unwrap();
            assert_eq!(failed.error, Some(*code), "{name}: {failed:?}");
            assert!(is_online_on(&obs.all(), "dev-f", "1.0.0"), "{name}");
        }
        broker
            .publish(
                "device/dev-f/ota/start",
                &job(
                    &good_http.url("fw.bin"),
                    serde_json::json!({"job": "after"}),
                ),
                false,
            )
            .await;
        online(&obs, "dev-f", "1.1.0").await;
        dev.stop();
    })
    .await;
}

async fn a_connection_dropped_at_half_resumes_with_range_without_fetching_the_first_half_again(
    broker: TestBroker,
) {
    local(async {
        let obs = broker.observe("device/#").await;
        let v2 = image("1.1.0", 400_000);
        let http = FaultServer::start(v2.clone(), Fault::DropOnceAt(50)).await;
        let dev = start(config(&broker, "dev-r"));
        online(&obs, "dev-r", "1.0.0").await;
        broker
            .publish("device/dev-r/ota/start", http.url().as_bytes(), false)
            .await;
        online(&obs, "dev-r", "1.1.0").await;
        let starts = http.range_starts();
        assert_eq!(starts.len(), 2, "{starts:?}");
        assert!(starts[1] >= 190_000, "resumed from {}", starts[1]);
        // At most one page (4 KiB) fetched twice.
        assert!(
            http.bytes_sent() <= v2.len() as u64 + 4096,
            "sent {}",
            http.bytes_sent()
        );
        dev.stop();
    })
    .await;
}

async fn a_stalled_server_ends_the_update_with_timeout_within_the_configured_time(
    broker: TestBroker,
) {
    local(async {
        let obs = broker.observe("device/#").await;
        let http = FaultServer::start(image("1.1.0", 300_000), Fault::StallAfter(50_000)).await;
        let dev = start(config(&broker, "dev-s"));
        online(&obs, "dev-s", "1.0.0").await;
        let t0 = std::time::Instant::now();
        broker
            .publish(
                "device/dev-s/ota/start",
                &job(&http.url(), serde_json::json!({"timeout_s": 8})),
                false,
            )
            .await;
        assert!(
            obs.wait_until(Duration::from_secs(20), |s| ended_with(
                s,
                "dev-s",
                Phase::Failed
            ))
            .await
        );
        let took = t0.elapsed();
        let failed = progress_of(&obs.all(), "dev-s")
            .into_iter()
            .find(|p| p.phase == Phase::Failed)
            .unwrap();
        assert_eq!(failed.error, Some(ErrorCode::Timeout));
        assert!(
            took < Duration::from_secs(10),
            "took {took:?} for an 8 s timeout"
        );
        assert!(is_online_on(&obs.all(), "dev-s", "1.0.0"));
        dev.stop();
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_broker_restarted_during_a_download_does_not_stop_the_update() {
    local(async {
        let mut broker = Mosquitto::start();
        let obs = broker.observe("device/#").await;
        let v2 = image("1.1.0", 300_000);
        // About three seconds of download.
        let http = FaultServer::start(v2, Fault::Throttle(100_000)).await;
        let dev = start(config(&broker, "dev-b"));
        online(&obs, "dev-b", "1.0.0").await;
        broker
            .publish(
                "device/dev-b/ota/start",
                &job(&http.url(), serde_json::json!({"job": "through-restart"})),
                false,
            )
            .await;
        assert!(
            obs.wait_until(Duration::from_secs(10), |s| ended_with(
                s,
                "dev-b",
                Phase::Downloading
            ))
            .await
        );
        drop(obs);
        broker.kill();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        broker.restart();
        let obs = broker.observe("device/#").await;
        // Mosquitto runs without persistence here: the retained status comes
        // back only because the device publishes it again.
        online(&obs, "dev-b", "1.1.0").await;
        assert!(
            obs.wait_until(Duration::from_secs(10), |s| status_of(s, "dev-b")
                .is_some_and(|st| st.last.is_some()))
                .await,
            "the result reaches the retained status"
        );
        let status = status_of(&obs.all(), "dev-b").unwrap();
        let last = status.last.unwrap();
        assert_eq!(
            (last.job.as_deref(), last.result),
            (Some("through-restart"), Phase::Done)
        );
        dev.stop();
    })
    .await;
}

/// Bad firmware, under both bootloader builds: the device ends on the old
/// version and reports why, with the original job id.
async fn unhealthy_crashing_and_hanging_images_are_rolled_back_under_both_bootloaders(
    broker: TestBroker,
) {
    local(async {
        let obs = broker.observe("device/#").await;
        let mut files = Vec::new();
        for kind in ["unhealthy", "crash", "hang"] {
            files.push((
                format!("{kind}.bin"),
                image(&format!("1.1.0+{kind}"), 100_000),
            ));
        }
        let refs: Vec<(&str, &[u8])> = files
            .iter()
            .map(|(n, b)| (n.as_str(), b.as_slice()))
            .collect();
        let http = FileServer::start(&refs).await;
        let mut devs = Vec::new();
        let mut cases = Vec::new();
        for (bl, name) in [
            (BootConfig::Stock, "stock"),
            (BootConfig::Rollback, "rollback"),
        ] {
            for (kind, code) in [
                ("unhealthy", ErrorCode::HealthCheckFailed),
                ("crash", ErrorCode::BootFailed),
                ("hang", ErrorCode::BootFailed),
            ] {
                let id = format!("{kind}-{name}");
                let mut cfg = config(&broker, &id);
                cfg.bootloader = bl;
                devs.push(start(cfg));
                cases.push((id, kind, code));
            }
        }
        for (id, _, _) in &cases {
            online(&obs, id, "1.0.0").await;
        }
        for (id, kind, _) in &cases {
            let j = job(
                &http.url(&format!("{kind}.bin")),
                serde_json::json!({"job": format!("job-{id}")}),
            );
            broker
                .publish(&format!("device/{id}/ota/start"), &j, false)
                .await;
        }
        for (id, _, code) in &cases {
            let want = format!("job-{id}");
            let rolled = obs
                .wait_until(Duration::from_secs(40), |s| {
                    progress_of(s, id)
                        .iter()
                        .any(|p| p.phase == Phase::RolledBack && p.job.as_deref() == Some(&want))
                })
                .await;
            assert!(
                rolled,
                "{id}: no rollback reported: {:?}",
                progress_of(&obs.all(), id)
            );
            let p = progress_of(&obs.all(), id)
                .into_iter()
                .find(|p| p.phase == Phase::RolledBack)
                .unwrap();
            assert_eq!(p.error, Some(*code), "{id}");
            online(&obs, id, "1.0.0").await;
            let last = status_of(&obs.all(), id).unwrap().last.unwrap();
            assert_eq!(
                (last.result, last.error),
                (Phase::RolledBack, Some(*code)),
                "{id}"
            );
            assert!(
                !progress_of(&obs.all(), id)
                    .iter()
                    .any(|p| p.phase == Phase::Done),
                "{id} must never report done"
            );
        }
        devs.iter().for_each(Handle::stop);
    })
    .await;
}

async fn cancel_stops_a_download_a_second_start_is_busy_and_rollback_returns_to_the_old_image(
    broker: TestBroker,
) {
    local(async {
        let obs = broker.observe("device/#").await;
        let v2 = image("1.1.0", 300_000);
        let slow = FaultServer::start(v2.clone(), Fault::Throttle(50_000)).await;
        let fast = FileServer::start(&[("fw.bin", &v2)]).await;
        let dev = start(config(&broker, "dev-c"));
        online(&obs, "dev-c", "1.0.0").await;

        // Rollback with nothing before: refused.
        broker
            .publish("device/dev-c/ota/rollback", b"", false)
            .await;
        assert!(
            obs.wait_until(Duration::from_secs(5), |s| progress_of(s, "dev-c")
                .iter()
                .any(|p| p.error == Some(ErrorCode::NoPreviousImage)))
                .await
        );

        broker
            .publish(
                "device/dev-c/ota/start",
                &job(&slow.url(), serde_json::json!({"job": "slow"})),
                false,
            )
            .await;
        assert!(
            obs.wait_until(Duration::from_secs(10), |s| ended_with(
                s,
                "dev-c",
                Phase::Downloading
            ))
            .await
        );
        // The same start again, as a broker redelivers it after a
        // reconnect: it is the job in flight, not a second one, so no
        // refusal; then another job's start, refused `busy`. Both go to the
        // same topic in order, so once the refusal is in, the redelivered
        // copy has been read too.
        broker
            .publish(
                "device/dev-c/ota/start",
                &job(&slow.url(), serde_json::json!({"job": "slow"})),
                false,
            )
            .await;
        broker
            .publish(
                "device/dev-c/ota/start",
                &job(&fast.url("fw.bin"), serde_json::json!({"job": "second"})),
                false,
            )
            .await;
        assert!(
            obs.wait_until(Duration::from_secs(5), |s| progress_of(s, "dev-c")
                .iter()
                .any(
                    |p| p.job.as_deref() == Some("second") && p.error == Some(ErrorCode::Busy)
                ))
            .await
        );
        let refused: Vec<_> = progress_of(&obs.all(), "dev-c")
            .into_iter()
            .filter(|p| p.job.as_deref() == Some("slow") && p.error.is_some())
            .collect();
        assert!(
            refused.is_empty(),
            "the redelivered start was refused: {refused:?}"
        );
        broker.publish("device/dev-c/ota/cancel", b"", false).await;
        assert!(
            obs.wait_until(Duration::from_secs(5), |s| ended_with(
                s,
                "dev-c",
                Phase::Cancelled
            ))
            .await
        );
        let sent_at_cancel = slow.bytes_sent();
        // The device closed the download: the server's next write to it
        // failed and ended the connection, with at most the throttled
        // pieces (5,000 bytes) in flight around the close sent after.
        assert!(
            obs.wait_until(Duration::from_secs(5), |_| slow.open_connections() == 0)
                .await,
            "the download's connection stayed open after the cancel"
        );
        assert!(
            slow.bytes_sent() <= sent_at_cancel + 10_000,
            "the download stopped"
        );
        assert!(is_online_on(&obs.all(), "dev-c", "1.0.0"));

        broker
            .publish(
                "device/dev-c/ota/start",
                &job(&fast.url("fw.bin"), serde_json::json!({"job": "real"})),
                false,
            )
            .await;
        online(&obs, "dev-c", "1.1.0").await;
        broker
            .publish("device/dev-c/ota/rollback", br#"{"job":"back"}"#, false)
            .await;
        online(&obs, "dev-c", "1.0.0").await;
        let status = status_of(&obs.all(), "dev-c").unwrap();
        assert_eq!(status.slot, Some(0));
        assert_eq!(status.last.unwrap().result, Phase::RolledBack);
        dev.stop();
    })
    .await;
}

async fn power_cuts_at_random_points_leave_old_or_new_firmware_and_a_repeated_command_completes(
    broker: TestBroker,
) {
    local(async {
        let obs = broker.observe("device/#").await;
        let v2 = image("1.1.0", 200_000);
        let http = FileServer::start(&[("fw.bin", &v2)]).await;
        // A fixed list of "random" cut points (bytes programmed or erased after
        // the command), spread over download, activation and the trial.
        let mut seed = 0x2545_f491u64;
        for round in 0..5 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let cut = seed % 700_000;
            let id = format!("cut-{round}");
            let dev = start(config(&broker, &id));
            online(&obs, &id, "1.0.0").await;
            dev.cut_power_after_bytes(cut);
            broker
                .publish(
                    &format!("device/{id}/ota/start"),
                    http.url("fw.bin").as_bytes(),
                    false,
                )
                .await;
            // Wait for the device to settle on some version after the cut.
            let settled = obs
                .wait_until(Duration::from_secs(30), |s| {
                    dev.boots().len() > 1
                        && availability_of(s, &id) == Some(true)
                        && (is_online_on(s, &id, "1.1.0")
                            || progress_of(s, &id).iter().any(|p| p.phase.is_terminal()))
                })
                .await;
            assert!(
                settled,
                "{id} (cut after {cut} bytes) never settled: {:?}",
                dev.boots()
            );
            for b in dev.boots() {
                assert!(
                    matches!(b.version.as_deref(), Some("1.0.0" | "1.1.0")),
                    "{id} (cut after {cut} bytes) booted {b:?}"
                );
            }
            if !is_online_on(&obs.all(), &id, "1.1.0") {
                broker
                    .publish(
                        &format!("device/{id}/ota/start"),
                        http.url("fw.bin").as_bytes(),
                        false,
                    )
                    .await;
            }
            online(&obs, &id, "1.1.0").await;
            dev.stop();
        }
    })
    .await;
}

async fn garbage_on_the_command_topics_is_answered_bad_command_and_the_device_carries_on(
    broker: TestBroker,
) {
    local(async {
        let obs = broker.observe("device/#").await;
        let v2 = image("1.1.0", 100_000);
        let http = FileServer::start(&[("fw.bin", &v2)]).await;
        let dev = start(config(&broker, "dev-g"));
        online(&obs, "dev-g", "1.0.0").await;
        let mut junk: Vec<Vec<u8>> = vec![
            b"{\"url\":".to_vec(),
            b"ftp://host/fw.bin".to_vec(),
            b"{\"url\":\"http://h/fw.bin\",\"size\":0}".to_vec(),
            b"{\"url\":\"http://h/fw.bin\",\"sha256\":\"xyz\"}".to_vec(),
            vec![0xff, 0xfe, 0x00, 0x80],
            vec![b'x'; 1400],
        ];
        let mut x = 7u32;
        junk.push(
            (0..300)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    (x >> 16) as u8
                })
                .collect(),
        );
        for payload in &junk {
            broker
                .publish("device/dev-g/ota/start", payload, false)
                .await;
        }
        // A payload far beyond the device's packet limit: the broker does not
        // even deliver it. Then random bytes on the other command topics.
        // (The embedded broker refuses payloads over 64 KiB and drops the
        // publisher; Mosquitto takes it. Either way the device never sees it.)
        mqota_virtual::testing::try_publish_to(
            broker.port(),
            "device/ota/start",
            &vec![b'y'; 100_000],
            false,
        )
        .await;
        broker
            .publish("device/dev-g/ota/cancel", &junk[6], false)
            .await;
        let n = junk.len();
        assert!(
            obs.wait_until(Duration::from_secs(10), |s| progress_of(s, "dev-g")
                .iter()
                .filter(|p| p.error == Some(ErrorCode::BadCommand))
                .count()
                >= n)
                .await,
            "{:?}",
            progress_of(&obs.all(), "dev-g")
        );
        for p in progress_of(&obs.all(), "dev-g") {
            assert!(p.message.is_some(), "a reason is given: {p:?}");
        }
        broker
            .publish(
                "device/dev-g/ota/start",
                http.url("fw.bin").as_bytes(),
                false,
            )
            .await;
        online(&obs, "dev-g", "1.1.0").await;
        dev.stop();
    })
    .await;
}

async fn a_dropped_wifi_link_marks_the_device_offline_and_it_rejoins_by_itself(broker: TestBroker) {
    local(async {
        let obs = broker.observe("device/#").await;
        let mut cfg = config(&broker, "dev-w");
        cfg.keep_alive_secs = 2;
        let dev = start(cfg);
        online(&obs, "dev-w", "1.0.0").await;
        dev.drop_link();
        let offline = obs
            .wait_until(Duration::from_secs(10), |s| {
                availability_of(s, "dev-w") == Some(false)
            })
            .await;
        assert!(offline, "the will marks the device offline");
        // The will went to the availability topic: the retained status still
        // tells the device's last real state.
        let kept = status_of(&obs.all(), "dev-w").expect("a status");
        assert_eq!(kept.version.as_str(), "1.0.0");
        assert_eq!(kept.state.as_str(), "valid");
        tokio::time::sleep(Duration::from_secs(1)).await;
        dev.restore_link();
        online(&obs, "dev-w", "1.0.0").await;
        assert_eq!(dev.boots().len(), 1, "no reboot needed");
        dev.stop();
    })
    .await;
}

async fn fifty_devices_update_at_once_from_one_broker_and_one_server(broker: TestBroker) {
    local(async {
        let obs = broker.observe("device/#").await;
        let v2 = image("1.1.0", 256 * 1024);
        let http = FileServer::start(&[("fw.bin", &v2)]).await;
        let ids: Vec<String> = (1..=50).map(|k| format!("fleet-{k}")).collect();
        let devs: Vec<Handle> = ids.iter().map(|id| start(config(&broker, id))).collect();
        assert!(
            obs.wait_until(Duration::from_secs(60), |s| ids
                .iter()
                .all(|id| is_online_on(s, id, "1.0.0")))
                .await,
            "not all 50 came online"
        );
        let t0 = std::time::Instant::now();
        broker
            .publish("device/ota/start", http.url("fw.bin").as_bytes(), false)
            .await;
        let all = obs
            .wait_until(Duration::from_secs(120), |s| {
                ids.iter().all(|id| {
                    availability_of(s, id) == Some(true)
                        && status_of(s, id).is_some_and(|st| {
                            st.version.as_str() == "1.1.0"
                                && st.last.as_ref().is_some_and(|l| l.result == Phase::Done)
                        })
                })
            })
            .await;
        let behind: Vec<&String> = ids
            .iter()
            .filter(|id| !is_online_on(&obs.all(), id, "1.1.0"))
            .collect();
        assert!(all, "not updated: {behind:?}");
        eprintln!("50 devices updated in {:?}", t0.elapsed());
        devs.iter().for_each(Handle::stop);
    })
    .await;
}

/// The status messages of `id`, in the order the broker delivered them.
fn statuses_of(seen: &[Received], id: &str) -> Vec<Status> {
    seen.iter()
        .filter(|r| r.topic == format!("device/{id}/status"))
        .filter_map(|r| serde_json::from_slice(&r.payload).ok())
        .collect()
}

/// Whether, in delivery order, `id` said `offline` after its last status
/// on `from` and before its next status on `to`: the reboot left no stale
/// `online` behind.
fn offline_between(seen: &[Received], id: &str, from: &str, to: &str) -> bool {
    let status = format!("device/{id}/status");
    let availability = format!("device/{id}/availability");
    let version_at = |r: &Received| {
        (r.topic == status)
            .then(|| serde_json::from_slice::<Status>(&r.payload).ok())
            .flatten()
            .map(|s| s.version.to_string())
    };
    let Some(last_old) = seen
        .iter()
        .rposition(|r| version_at(r).as_deref() == Some(from))
    else {
        return false;
    };
    let Some(first_new) = seen[last_old..]
        .iter()
        .position(|r| version_at(r).as_deref() == Some(to))
        .map(|i| last_old + i)
    else {
        return false;
    };
    seen[last_old..first_new]
        .iter()
        .any(|r| r.topic == availability && r.payload == b"offline")
}

async fn a_device_that_reboots_says_offline_and_keeps_its_last_status(broker: TestBroker) {
    local(async {
        let obs = broker.observe("device/#").await;
        let v2 = image("1.1.0", 300_000);
        let http = FileServer::start(&[("fw.bin", &v2)]).await;
        let dev = start(config(&broker, "dev-o"));
        online(&obs, "dev-o", "1.0.0").await;

        // Rebooting into an update.
        broker
            .publish(
                "device/dev-o/ota/start",
                &job(&http.url("fw.bin"), serde_json::json!({"job": "up"})),
                false,
            )
            .await;
        online(&obs, "dev-o", "1.1.0").await;
        assert!(
            offline_between(&obs.all(), "dev-o", "1.0.0", "1.1.0"),
            "no offline while rebooting into the update"
        );

        // Rebooting for a rollback command: offline, and the result kept.
        broker
            .publish("device/dev-o/ota/rollback", br#"{"job":"back"}"#, false)
            .await;
        assert!(
            obs.wait_until(Duration::from_secs(20), |s| {
                let seen = statuses_of(s, "dev-o");
                let back = seen
                    .iter()
                    .rposition(|st| st.version.as_str() == "1.1.0")
                    .is_some_and(|i| i + 1 < seen.len());
                back && is_online_on(s, "dev-o", "1.0.0")
            })
            .await
        );
        assert!(
            offline_between(&obs.all(), "dev-o", "1.1.0", "1.0.0"),
            "no offline while rebooting for the rollback"
        );
        let now = status_of(&obs.all(), "dev-o").unwrap();
        assert_eq!(now.last.as_ref().unwrap().result, Phase::RolledBack);

        // A device that vanishes: the will says offline, and a client that
        // arrives later still reads the last real state from the retained
        // status (not a will frozen at connect time).
        dev.stop();
        assert!(
            obs.wait_until(Duration::from_secs(60), |s| availability_of(s, "dev-o")
                == Some(false))
                .await
        );
        let late = broker.observe("device/dev-o/+").await;
        assert!(
            late.wait_until(Duration::from_secs(10), |s| {
                availability_of(s, "dev-o") == Some(false)
                    && status_of(s, "dev-o").is_some_and(|st| {
                        st.version.as_str() == "1.0.0"
                            && st.last.as_ref().map(|l| l.result) == Some(Phase::RolledBack)
                    })
            })
            .await,
            "retained: {:?}",
            late.all()
        );
    })
    .await;
}

async fn a_cancel_naming_another_job_does_not_disturb_the_download(broker: TestBroker) {
    local(async {
        let obs = broker.observe("device/#").await;
        let (dev, slow) = downloading_slowly(&broker, &obs, "dev-k", "mine").await;
        broker
            .publish("device/dev-k/ota/cancel", br#"{"job":"other"}"#, false)
            .await;
        let at_cancel = slow.bytes_sent();
        assert!(
            obs.wait_until(Duration::from_secs(10), |_| slow.bytes_sent()
                >= at_cancel + 20_000)
                .await,
            "the download did not keep streaming: {} then {}",
            at_cancel,
            slow.bytes_sent()
        );
        online(&obs, "dev-k", "1.1.0").await;
        assert!(!ended_with(&obs.all(), "dev-k", Phase::Cancelled));
        assert_eq!(slow.range_starts(), vec![0], "one fetch, never resumed");
        dev.stop();
    })
    .await;
}

async fn a_download_resumed_after_a_power_cut_runs_with_the_device_online(broker: TestBroker) {
    local(async {
        let obs = broker.observe("device/#").await;
        let (dev, slow) = downloading_slowly(&broker, &obs, "dev-p", "cut").await;
        assert!(
            obs.wait_until(Duration::from_secs(10), |_| slow.bytes_sent() > 60_000)
                .await
        );
        let before_cut = obs.all().len();
        dev.cut_power();
        // The resumed download takes seconds; the device says it is online
        // (and listens to commands) while it runs, not only after it.
        assert!(
            obs.wait_until(Duration::from_secs(4), |s| {
                statuses_of(&s[before_cut.min(s.len())..], "dev-p")
                    .iter()
                    .any(|st| st.version.as_str() == "1.0.0")
                    && availability_of(&s[before_cut.min(s.len())..], "dev-p") == Some(true)
            })
            .await,
            "not online while resuming: {:?}",
            statuses_of(&obs.all()[before_cut..], "dev-p")
        );
        assert!(dev.boots().len() >= 2);
        assert!(
            !is_online_on(&obs.all(), "dev-p", "1.1.0"),
            "still resuming"
        );
        assert!(slow.range_starts().iter().any(|&r| r > 0));
        online(&obs, "dev-p", "1.1.0").await;
        dev.stop();
    })
    .await;
}

/// How many times `id` has said `online` so far: one per connection.
fn online_count(seen: &[Received], id: &str) -> usize {
    let topic = format!("device/{id}/availability");
    seen.iter()
        .filter(|r| r.topic == topic && r.payload == b"online")
        .count()
}

/// Waits until `id` said `online` more than `before` times and its status is
/// on `version`.
async fn online_again(obs: &TopicRecorder, id: &str, before: usize, version: &str) {
    assert!(
        obs.wait_until(Duration::from_secs(30), |s| online_count(s, id) > before
            && is_online_on(s, id, version))
            .await,
        "{id} did not come back online on {version}"
    );
}

async fn retained_commands_never_run_and_a_fresh_command_still_does(broker: TestBroker) {
    local(async {
        let obs = broker.observe("device/#").await;
        let bad = image("1.2.0+unhealthy", 100_000);
        let good = image("1.1.0", 100_000);
        let http = FileServer::start(&[("bad.bin", &bad), ("good.bin", &good)]).await;
        // Left retained on every command topic before the device ever
        // connects: what a careless `mosquitto_pub -r` does.
        broker
            .publish("device/dev-r/ota/rollback", b"go", true)
            .await;
        broker
            .publish(
                "device/dev-r/ota/start",
                &job(&http.url("bad.bin"), serde_json::json!({"job": "loop"})),
                true,
            )
            .await;
        broker
            .publish("device/ota/start", http.url("bad.bin").as_bytes(), true)
            .await;
        let mut cfg = config(&broker, "dev-r");
        cfg.keep_alive_secs = 2;
        let dev = start(cfg);
        online(&obs, "dev-r", "1.0.0").await;
        let ops = dev.flash_ops();
        let boots = dev.boots().len();

        // For 30 s, give the broker every chance to replay them: new
        // connections after dropped links, and cold boots after power cuts.
        let window = std::time::Instant::now();
        let mut cuts = 0;
        let mut round = 0;
        while window.elapsed() < Duration::from_secs(30) {
            let before = online_count(&obs.all(), "dev-r");
            if round % 2 == 0 {
                dev.cut_power();
                cuts += 1;
            } else {
                dev.drop_link();
                assert!(
                    obs.wait_until(Duration::from_secs(15), |s| availability_of(s, "dev-r")
                        == Some(false))
                        .await
                );
                dev.restore_link();
            }
            online_again(&obs, "dev-r", before, "1.0.0").await;
            round += 1;
        }
        eprintln!(
            "retained commands over {:?}: {round} reconnects ({cuts} power cuts), {} flash ops",
            window.elapsed(),
            dev.flash_ops() - ops
        );
        assert_eq!(dev.flash_ops(), ops, "no flash write or erase in 30 s");
        assert_eq!(
            dev.boots().len(),
            boots + cuts,
            "only the power cuts rebooted it"
        );
        let seen = obs.all();
        assert!(
            progress_of(&seen, "dev-r").is_empty(),
            "no command ran or was answered: {:?}",
            progress_of(&seen, "dev-r")
        );

        // Fresh, unretained commands still work.
        broker
            .publish(
                "device/dev-r/ota/start",
                &job(&http.url("good.bin"), serde_json::json!({"job": "fresh"})),
                false,
            )
            .await;
        online(&obs, "dev-r", "1.1.0").await;
        let before = online_count(&obs.all(), "dev-r");
        broker
            .publish("device/dev-r/ota/rollback", b"", false)
            .await;
        online_again(&obs, "dev-r", before, "1.0.0").await;
        dev.stop();
    })
    .await;
}

async fn a_start_naming_a_finished_job_is_refused_duplicate_job_even_after_a_reboot(
    broker: TestBroker,
) {
    local(async {
        let obs = broker.observe("device/#").await;
        let good = image("1.1.0", 100_000);
        let http = FileServer::start(&[("good.bin", &good)]).await;
        let dev = start(config(&broker, "dev-d"));
        online(&obs, "dev-d", "1.0.0").await;
        let command = job(&http.url("good.bin"), serde_json::json!({"job": "once"}));
        broker
            .publish("device/dev-d/ota/start", &command, false)
            .await;
        online(&obs, "dev-d", "1.1.0").await;
        let ops = dev.flash_ops();
        let boots = dev.boots().len();
        let refused = |s: &[Received], n: usize| {
            progress_of(s, "dev-d")
                .iter()
                .filter(|p| {
                    p.job.as_deref() == Some("once")
                        && p.phase == Phase::Failed
                        && p.error == Some(ErrorCode::DuplicateJob)
                })
                .count()
                >= n
        };
        // The same job again, at once: refused and nothing else.
        broker
            .publish("device/dev-d/ota/start", &command, false)
            .await;
        assert!(
            obs.wait_until(Duration::from_secs(10), |s| refused(s, 1))
                .await
        );
        // And after a power cut: the journal remembers the job.
        let before = online_count(&obs.all(), "dev-d");
        dev.cut_power();
        online_again(&obs, "dev-d", before, "1.1.0").await;
        broker
            .publish("device/dev-d/ota/start", &command, false)
            .await;
        assert!(
            obs.wait_until(Duration::from_secs(10), |s| refused(s, 2))
                .await
        );
        assert_eq!(dev.flash_ops(), ops, "nothing written for a duplicate");
        assert_eq!(
            dev.boots().len(),
            boots + 1,
            "only the power cut rebooted it"
        );
        let accepted = progress_of(&obs.all(), "dev-d")
            .iter()
            .filter(|p| p.phase == Phase::Accepted)
            .count();
        assert_eq!(accepted, 1, "the job was accepted once");
        // The refusal is not a result: the status still says `done`.
        let st = status_of(&obs.all(), "dev-d").unwrap();
        assert_eq!(st.last.as_ref().map(|l| l.result), Some(Phase::Done));
        dev.stop();
    })
    .await;
}

async fn progress_goes_to_the_device_topic_with_a_shared_copy_that_can_be_switched_off(
    broker: TestBroker,
) {
    local(async {
        let obs = broker.observe("device/#").await;
        let good = image("1.1.0", 100_000);
        let http = FileServer::start(&[("good.bin", &good)]).await;
        let with_copy = start(config(&broker, "dev-c"));
        let mut cfg = config(&broker, "dev-n");
        cfg.progress_copy = false;
        let without = start(cfg);
        online(&obs, "dev-c", "1.0.0").await;
        online(&obs, "dev-n", "1.0.0").await;
        broker
            .publish(
                "device/ota/start",
                &job(&http.url("good.bin"), serde_json::json!({"job": "both"})),
                false,
            )
            .await;
        for id in ["dev-c", "dev-n"] {
            online(&obs, id, "1.1.0").await;
            assert!(
                obs.wait_until(Duration::from_secs(10), |s| ended_with(s, id, Phase::Done))
                    .await
            );
        }
        let seen = obs.all();
        let own: Vec<Phase> = progress_of(&seen, "dev-c")
            .iter()
            .map(|p| p.phase)
            .collect();
        let copy: Vec<Phase> = progress_on(&seen, "device/progress", "dev-c")
            .iter()
            .map(|p| p.phase)
            .collect();
        assert!(own.contains(&Phase::Accepted) && own.contains(&Phase::Done));
        assert_eq!(copy, own, "the shared copy carries the same events");
        assert!(!progress_of(&seen, "dev-n").is_empty());
        assert!(
            progress_on(&seen, "device/progress", "dev-n").is_empty(),
            "switched off"
        );
        with_copy.stop();
        without.stop();
    })
    .await;
}

on_both_brokers!(
    a_bare_url_on_the_broadcast_topic_updates_the_device,
    a_json_job_with_sha256_and_size_succeeds_and_a_wrong_sha256_fails,
    a_broadcast_job_with_devices_updates_only_the_listed_ones,
    every_failed_download_reports_its_own_error_and_keeps_the_old_firmware,
    a_connection_dropped_at_half_resumes_with_range_without_fetching_the_first_half_again,
    a_stalled_server_ends_the_update_with_timeout_within_the_configured_time,
    unhealthy_crashing_and_hanging_images_are_rolled_back_under_both_bootloaders,
    cancel_stops_a_download_a_second_start_is_busy_and_rollback_returns_to_the_old_image,
    power_cuts_at_random_points_leave_old_or_new_firmware_and_a_repeated_command_completes,
    garbage_on_the_command_topics_is_answered_bad_command_and_the_device_carries_on,
    a_dropped_wifi_link_marks_the_device_offline_and_it_rejoins_by_itself,
    fifty_devices_update_at_once_from_one_broker_and_one_server,
    a_device_that_reboots_says_offline_and_keeps_its_last_status,
    a_cancel_naming_another_job_does_not_disturb_the_download,
    a_download_resumed_after_a_power_cut_runs_with_the_device_online,
    retained_commands_never_run_and_a_fresh_command_still_does,
    a_start_naming_a_finished_job_is_refused_duplicate_job_even_after_a_reboot,
    progress_goes_to_the_device_topic_with_a_shared_copy_that_can_be_switched_off,
);

/// An RSA-3072 Secure Boot V2 key made for the test.
fn rsa_key() -> mqota_core::signature::sign::Key {
    mqota_core::signature::sign::Key::RsaPrivate(
        rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 3072).unwrap(),
    )
}

/// `len` bytes of the device's `ota_0` slot, read from its flash file.
fn ota0_bytes(flash: &std::path::Path, len: usize) -> Vec<u8> {
    use mqota_core::partition::{PartitionTable, DEFAULT_4MB_CSV};
    let table = PartitionTable::from_csv(DEFAULT_4MB_CSV).unwrap();
    let at = table.ota_slots().next().unwrap().offset as usize;
    std::fs::read(flash).unwrap()[at..at + len].to_vec()
}

async fn a_device_trusting_a_key_refuses_every_image_its_key_did_not_sign_and_takes_the_next_good_one(
    broker: TestBroker,
) {
    use mqota_core::signature::sign::sign_file;
    use mqota_core::signature::{CRC_OFFSET, SECTOR_LEN};
    local(async {
        let (trusted, stranger) = (rsa_key(), rsa_key());
        let v2 = image("1.1.0", 150_000);
        let good = sign_file(&v2, &trusted).unwrap();
        let mut flipped = good.clone();
        flipped[5_000] ^= 0x01;
        let mut bad_crc = good.clone();
        bad_crc[good.len() - SECTOR_LEN + CRC_OFFSET] ^= 0xFF;
        let unknown = sign_file(&v2, &stranger).unwrap();
        let http = FileServer::start(&[
            ("good.bin", &good),
            ("flipped.bin", &flipped),
            ("bad-crc.bin", &bad_crc),
            ("unknown.bin", &unknown),
            ("unsigned.bin", &v2),
        ])
        .await;
        let obs = broker.observe("device/#").await;
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(&broker, "dev-s");
        cfg.trusted_keys = vec![trusted.digest()];
        cfg.flash = Some(dir.path().join("dev-s.flash"));
        let flash = cfg.flash.clone().unwrap();
        let dev = start(cfg);
        let open = start(config(&broker, "dev-o"));
        online(&obs, "dev-s", "1.0.0").await;
        online(&obs, "dev-o", "1.0.0").await;
        assert!(status_of(&obs.all(), "dev-s").unwrap().signed_only);
        assert!(!status_of(&obs.all(), "dev-o").unwrap().signed_only);
        let running = ota0_bytes(&flash, 128 * 1024);

        for (file, why) in [
            ("flipped.bin", "signature does not verify"),
            ("bad-crc.bin", "signature block CRC is wrong"),
            ("unknown.bin", "unknown key"),
            ("unsigned.bin", "no signature"),
        ] {
            broker
                .publish(
                    "device/dev-s/ota/start",
                    &job(&http.url(file), serde_json::json!({ "job": file })),
                    false,
                )
                .await;
            let failed = failure_of(&obs, "dev-s", file).await;
            assert_eq!(failed.error, Some(ErrorCode::BadSignature), "{file}");
            assert_eq!(failed.message.as_deref(), Some(why), "{file}");
        }
        assert_eq!(dev.boots().len(), 1, "no refused image was ever booted");
        assert!(is_online_on(&obs.all(), "dev-s", "1.0.0"));
        assert_eq!(
            ota0_bytes(&flash, 128 * 1024),
            running,
            "the running slot is untouched"
        );

        broker
            .publish(
                "device/dev-s/ota/start",
                &job(&http.url("good.bin"), serde_json::json!({ "job": "good" })),
                false,
            )
            .await;
        online(&obs, "dev-s", "1.1.0").await;
        assert!(
            obs.wait_until(Duration::from_secs(10), |s| progress_of(s, "dev-s")
                .iter()
                .any(|p| p.phase == Phase::Done && p.job.as_deref() == Some("good")))
                .await
        );
        // A device without keys takes an unsigned image, as its status said.
        broker
            .publish(
                "device/dev-o/ota/start",
                &job(&http.url("unsigned.bin"), serde_json::json!({ "job": "u" })),
                false,
            )
            .await;
        online(&obs, "dev-o", "1.1.0").await;
        dev.stop();
        open.stop();
    })
    .await;
}

fn espsecure(args: &[&str]) {
    let out = std::process::Command::new("espsecure")
        .args(args)
        .output()
        .expect("espsecure is installed (pip install esptool)");
    assert!(
        out.status.success(),
        "espsecure {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Golden: keys and signatures made by espsecure itself, the image signed by
/// an old and a new key (rotation), the device trusting only the new key's
/// digest as `espsecure digest-sbv2-public-key` wrote it.
#[tokio::test(flavor = "current_thread")]
async fn an_image_signed_by_espsecure_with_two_keys_updates_a_device_trusting_only_the_new_one() {
    let broker = TestBroker::mosquitto();
    local(async {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
        std::fs::write(p("v2.bin"), image("1.1.0", 150_000)).unwrap();
        for k in ["old", "new"] {
            espsecure(&[
                "generate-signing-key",
                "--version",
                "2",
                "--scheme",
                "rsa3072",
                &p(&format!("{k}.pem")),
            ]);
        }
        espsecure(&[
            "sign-data",
            "--version",
            "2",
            "--keyfile",
            &p("old.pem"),
            "--output",
            &p("once.bin"),
            &p("v2.bin"),
        ]);
        espsecure(&[
            "sign-data",
            "--version",
            "2",
            "--keyfile",
            &p("new.pem"),
            "--append-signatures",
            "--output",
            &p("both.bin"),
            &p("once.bin"),
        ]);
        espsecure(&[
            "digest-sbv2-public-key",
            "--keyfile",
            &p("new.pem"),
            "--output",
            &p("new.digest"),
        ]);
        let digest: [u8; 32] = std::fs::read(p("new.digest")).unwrap().try_into().unwrap();
        let both = std::fs::read(p("both.bin")).unwrap();
        let http = FileServer::start(&[("both.bin", &both)]).await;
        let obs = broker.observe("device/#").await;
        let mut cfg = config(&broker, "dev-g");
        cfg.trusted_keys = vec![digest];
        let dev = start(cfg);
        online(&obs, "dev-g", "1.0.0").await;
        broker
            .publish(
                "device/dev-g/ota/start",
                http.url("both.bin").as_bytes(),
                false,
            )
            .await;
        online(&obs, "dev-g", "1.1.0").await;
        dev.stop();
    })
    .await;
}

/// Golden: an ECDSA P-256 key and signature made by espsecure, on an
/// ESP32-C6 (whose ROM checks ECDSA), trusting espsecure's digest.
#[tokio::test(flavor = "current_thread")]
async fn an_image_signed_by_espsecure_with_an_ecdsa_key_updates_a_c6_trusting_it() {
    let broker = TestBroker::mosquitto();
    local(async {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
        std::fs::write(p("v2.bin"), image_for(Chip::Esp32c6, "1.1.0", 150_000)).unwrap();
        espsecure(&[
            "generate-signing-key",
            "--version",
            "2",
            "--scheme",
            "ecdsa256",
            &p("ec.pem"),
        ]);
        espsecure(&[
            "sign-data",
            "--version",
            "2",
            "--keyfile",
            &p("ec.pem"),
            "--output",
            &p("signed.bin"),
            &p("v2.bin"),
        ]);
        espsecure(&[
            "digest-sbv2-public-key",
            "--keyfile",
            &p("ec.pem"),
            "--output",
            &p("ec.digest"),
        ]);
        let digest: [u8; 32] = std::fs::read(p("ec.digest")).unwrap().try_into().unwrap();
        let signed = std::fs::read(p("signed.bin")).unwrap();
        let http = FileServer::start(&[("signed.bin", &signed)]).await;
        let obs = broker.observe("device/#").await;
        let mut cfg = config(&broker, "dev-c6");
        cfg.chip = Chip::Esp32c6;
        cfg.trusted_keys = vec![digest];
        let dev = start(cfg);
        online(&obs, "dev-c6", "1.0.0").await;
        broker
            .publish(
                "device/dev-c6/ota/start",
                http.url("signed.bin").as_bytes(),
                false,
            )
            .await;
        online(&obs, "dev-c6", "1.1.0").await;
        dev.stop();
    })
    .await;
}

on_both_brokers!(
    a_device_trusting_a_key_refuses_every_image_its_key_did_not_sign_and_takes_the_next_good_one
);

/// The `failed` event of job `job` on device `id`, once it arrived.
async fn failure_of(obs: &TopicRecorder, id: &str, job: &str) -> Progress {
    assert!(
        obs.wait_until(Duration::from_secs(20), |s| progress_of(s, id)
            .iter()
            .any(|p| p.job.as_deref() == Some(job) && p.phase == Phase::Failed))
            .await,
        "{job}: no failure reported: {:?}",
        progress_of(&obs.all(), id).last()
    );
    progress_of(&obs.all(), id)
        .into_iter()
        .find(|p| p.job.as_deref() == Some(job) && p.phase == Phase::Failed)
        .unwrap()
}

async fn a_redirected_download_updates_and_its_resume_asks_the_final_location_for_the_rest(
    broker: TestBroker,
) {
    local(async {
        let obs = broker.observe("device/#").await;
        let v2 = image("1.1.0", 400_000);
        let http = FaultServer::start_redirecting(
            v2.clone(),
            Fault::DropOnceAt(50),
            Some(Redirect::Chain {
                status: 302,
                hops: 2,
                location: Location::Relative,
            }),
        )
        .await;
        let dev = start(config(&broker, "dev-rd"));
        online(&obs, "dev-rd", "1.0.0").await;
        broker
            .publish("device/dev-rd/ota/start", http.url().as_bytes(), false)
            .await;
        online(&obs, "dev-rd", "1.1.0").await;

        let requests = http.requests();
        let paths: Vec<&str> = requests.iter().map(|r| r.path.as_str()).collect();
        // The retry starts again from the job's URL and follows the redirects.
        assert_eq!(
            paths,
            [
                "/fw.bin",
                "/hop/1/fw.bin",
                "/final/fw.bin",
                "/fw.bin",
                "/hop/1/fw.bin",
                "/final/fw.bin"
            ],
            "{requests:?}"
        );
        let resumed_from = requests[5].range_start;
        assert!(resumed_from >= 190_000, "{requests:?}");
        assert!(
            requests[3..].iter().all(|r| r.range_start == resumed_from),
            "every hop of the resume carries its Range: {requests:?}"
        );
        assert!(http.bytes_sent() <= v2.len() as u64 + 4096);
        dev.stop();
    })
    .await;
}

/// Failures a retry cannot cure end the job at once, with the reason in
/// `message`: the server sees no second attempt.
async fn redirect_loops_too_many_redirects_404_and_a_bad_length_fail_at_once(broker: TestBroker) {
    local(async {
        let obs = broker.observe("device/#").await;
        let v2 = image("1.1.0", 100_000);
        let chain = |hops| {
            Some(Redirect::Chain {
                status: 307,
                hops,
                location: Location::Absolute,
            })
        };
        let cases = [
            (
                "six redirects",
                FaultServer::start_redirecting(v2.clone(), Fault::None, chain(6)).await,
                "too many redirects",
                6,
            ),
            (
                "a loop",
                FaultServer::start_redirecting(v2.clone(), Fault::None, Some(Redirect::Loop)).await,
                "too many redirects",
                6,
            ),
            (
                "404",
                FaultServer::start(v2.clone(), Fault::NotFound).await,
                "HTTP 404",
                1,
            ),
            (
                "404 behind a redirect",
                FaultServer::start_redirecting(v2.clone(), Fault::NotFound, chain(1)).await,
                "HTTP 404",
                2,
            ),
            (
                "negative Content-Length",
                FaultServer::start(v2.clone(), Fault::NegativeLength).await,
                "bad Content-Length",
                1,
            ),
        ];
        let dev = start(config(&broker, "dev-nr"));
        online(&obs, "dev-nr", "1.0.0").await;
        for (i, (name, server, message, requests)) in cases.iter().enumerate() {
            let id = format!("nr-{i}");
            let t0 = std::time::Instant::now();
            broker
                .publish(
                    "device/dev-nr/ota/start",
                    &job(&server.url(), serde_json::json!({ "job": id })),
                    false,
                )
                .await;
            let failed = failure_of(&obs, "dev-nr", &id).await;
            assert_eq!(failed.error, Some(ErrorCode::HttpStatus), "{name}");
            assert_eq!(failed.message.as_deref(), Some(*message), "{name}");
            // A retry would wait at least a second and ask again.
            assert!(t0.elapsed() < Duration::from_secs(5), "{name}");
            assert_eq!(
                server.requests().len(),
                *requests,
                "{name}: {:?}",
                server.requests()
            );
            assert!(is_online_on(&obs.all(), "dev-nr", "1.0.0"), "{name}");
        }
        dev.stop();
    })
    .await;
}

async fn an_https_job_is_refused_with_bad_command_and_no_flash_write(broker: TestBroker) {
    local(async {
        let obs = broker.observe("device/#").await;
        let dir = tempfile::tempdir().unwrap();
        let flash = dir.path().join("flash.bin");
        let mut cfg = config(&broker, "dev-tls");
        cfg.flash = Some(flash.clone());
        let dev = start(cfg);
        online(&obs, "dev-tls", "1.0.0").await;
        let status = status_of(&obs.all(), "dev-tls").unwrap();
        assert!(!status.https, "the status says https is off");
        // Everything but the field log, which the device writes as it goes.
        let outside_log = |bytes: Vec<u8>| {
            use mqota_core::partition::{PartitionTable, TABLE_MAX_LEN, TABLE_OFFSET};
            let table = PartitionTable::from_bytes(
                &bytes[TABLE_OFFSET as usize..TABLE_OFFSET as usize + TABLE_MAX_LEN],
            )
            .unwrap();
            let log = table.find("log").unwrap();
            let (start, end) = (log.offset as usize, (log.offset + log.size) as usize);
            [&bytes[..start], &bytes[end..]].concat()
        };
        let before = outside_log(std::fs::read(&flash).unwrap());

        broker
            .publish(
                "device/dev-tls/ota/start",
                &job(
                    "https://fw.example/fw.bin",
                    serde_json::json!({ "job": "tls" }),
                ),
                false,
            )
            .await;
        let failed = failure_of(&obs, "dev-tls", "tls").await;
        assert_eq!(failed.error, Some(ErrorCode::BadCommand));
        assert_eq!(
            failed.message.as_deref(),
            Some("https is not enabled on this device")
        );
        let events: Vec<Phase> = progress_of(&obs.all(), "dev-tls")
            .iter()
            .filter(|p| p.job.as_deref() == Some("tls"))
            .map(|p| p.phase)
            .collect();
        assert_eq!(events, [Phase::Failed], "refused, never accepted");
        assert!(
            outside_log(std::fs::read(&flash).unwrap()) == before,
            "the flash was written"
        );
        assert!(is_online_on(&obs.all(), "dev-tls", "1.0.0"));
        dev.stop();
    })
    .await;
}

/// Answers a server gives while it recovers are retried until it serves.
async fn http_503_408_and_429_are_retried_until_the_server_recovers(broker: TestBroker) {
    local(async {
        let obs = broker.observe("device/#").await;
        let dev = start(config(&broker, "dev-503"));
        online(&obs, "dev-503", "1.0.0").await;
        for (minor, status) in [503, 408, 429].into_iter().enumerate() {
            let v = format!("1.{}.0", minor + 1);
            let http = FaultServer::start(image(&v, 100_000), Fault::StatusFirst(status, 2)).await;
            broker
                .publish("device/dev-503/ota/start", http.url().as_bytes(), false)
                .await;
            online(&obs, "dev-503", &v).await;
            assert_eq!(
                http.range_starts(),
                [0, 0, 0],
                "{status}: two refusals, then the download"
            );
        }
        dev.stop();
    })
    .await;
}

on_both_brokers!(
    a_redirected_download_updates_and_its_resume_asks_the_final_location_for_the_rest,
    http_503_408_and_429_are_retried_until_the_server_recovers,
    redirect_loops_too_many_redirects_404_and_a_bad_length_fail_at_once,
    an_https_job_is_refused_with_bad_command_and_no_flash_write,
);

// ---- trust: signed commands, sequence numbers, no downgrades ----

fn job_signing_key() -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::random(&mut rand_core::OsRng)
}

/// `fields` as a signed command for `device` on the topic `op`.
fn signed(
    key: &p256::ecdsa::SigningKey,
    op: &str,
    seq: u64,
    device: &str,
    fields: serde_json::Value,
) -> Vec<u8> {
    let mut cmd = serde_json::json!({ "op": op, "seq": seq, "device": device });
    cmd.as_object_mut()
        .unwrap()
        .extend(fields.as_object().unwrap().clone());
    mqota_core::protocol::envelope::seal(&serde_json::to_vec(&cmd).unwrap(), key).into_bytes()
}

/// Waits for a `failed` event of `id` with `error`, whatever its job, that
/// was not there among the first `skip` events.
async fn refused_after(obs: &TopicRecorder, id: &str, skip: usize, error: ErrorCode) -> Progress {
    let found = |s: &[Received]| {
        progress_of(s, id)
            .into_iter()
            .skip(skip)
            .find(|p| p.phase == Phase::Failed && p.error == Some(error))
    };
    assert!(
        obs.wait_until(Duration::from_secs(20), |s| found(s).is_some())
            .await,
        "{id}: no {error:?} refusal: {:?}",
        progress_of(&obs.all(), id).last()
    );
    found(&obs.all()).unwrap()
}

async fn a_device_with_a_job_key_runs_only_fresh_commands_signed_for_it(broker: TestBroker) {
    local(async {
        let key = job_signing_key();
        let v2 = image("1.1.0", 120_000);
        let v3 = image("1.2.0", 120_000);
        let http = FileServer::start(&[("v2.bin", &v2), ("v3.bin", &v3)]).await;
        let obs = broker.observe("device/#").await;
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(&broker, "dev-j");
        cfg.job_key = Some(mqota_core::protocol::envelope::job_key_of(
            key.verifying_key(),
        ));
        cfg.flash = Some(dir.path().join("dev-j.flash"));
        // A genuine signed command left retained on the broker before the
        // device connects: never run, never answered, on any connect.
        let retained = signed(
            &key,
            "start",
            5,
            "dev-j",
            serde_json::json!({ "url": http.url("v2.bin"), "job": "j-retained" }),
        );
        broker
            .publish("device/dev-j/ota/start", &retained, true)
            .await;
        let dev = start(cfg);
        online(&obs, "dev-j", "1.0.0").await;
        let status = status_of(&obs.all(), "dev-j").unwrap();
        assert!(status.signed_jobs);
        assert_eq!(status.job_seq, None);
        let start_topic = "device/dev-j/ota/start";
        let v2_job = serde_json::json!({ "url": http.url("v2.bin"), "job": "j-v2" });

        // Refused, each with its own reason, and nothing installed.
        let forged = signed(&job_signing_key(), "start", 10, "dev-j", v2_job.clone());
        let elsewhere = signed(&key, "start", 11, "dev-other", v2_job.clone());
        let wrong_topic = signed(&key, "rollback", 12, "dev-j", serde_json::json!({}));
        for (payload, why) in [
            (http.url("v2.bin").into_bytes(), "command is not signed"),
            (
                job(&http.url("v2.bin"), serde_json::json!({})),
                "command is not signed",
            ),
            (forged, "command signature does not verify"),
            (elsewhere, "command is signed for another device"),
            (wrong_topic, "command is signed for another topic (op)"),
        ] {
            let before = progress_of(&obs.all(), "dev-j").len();
            broker.publish(start_topic, &payload, false).await;
            let p = refused_after(&obs, "dev-j", before, ErrorCode::BadSignature).await;
            assert_eq!(p.message.as_deref(), Some(why));
        }
        assert_eq!(dev.boots().len(), 1);

        // The genuine one runs; a recording of it played again does nothing,
        // also after the reboot into the new image.
        let good = signed(&key, "start", 30, "dev-j", v2_job.clone());
        broker.publish(start_topic, &good, false).await;
        online(&obs, "dev-j", "1.1.0").await;
        assert!(
            obs.wait_until(Duration::from_secs(10), |s| status_of(s, "dev-j")
                .is_some_and(|st| st.job_seq == Some(30)))
                .await,
            "the status shows the last accepted sequence number: {:?}",
            statuses_of(&obs.all(), "dev-j")
        );
        let before = progress_of(&obs.all(), "dev-j").len();
        broker.publish(start_topic, &good, false).await;
        let p = refused_after(&obs, "dev-j", before, ErrorCode::Replayed).await;
        assert_eq!(p.job.as_deref(), Some("j-v2"));
        // So is an older sequence number on a new job.
        let older = signed(
            &key,
            "start",
            25,
            "dev-j",
            serde_json::json!({ "url": http.url("v3.bin"), "job": "j-old" }),
        );
        let before = progress_of(&obs.all(), "dev-j").len();
        broker.publish(start_topic, &older, false).await;
        refused_after(&obs, "dev-j", before, ErrorCode::Replayed).await;

        // A signed rollback runs once; played again it is refused.
        let rollback = signed(
            &key,
            "rollback",
            40,
            "dev-j",
            serde_json::json!({ "job": "rb" }),
        );
        broker
            .publish("device/dev-j/ota/rollback", &rollback, false)
            .await;
        online(&obs, "dev-j", "1.0.0").await;
        let before = progress_of(&obs.all(), "dev-j").len();
        broker
            .publish("device/dev-j/ota/rollback", &rollback, false)
            .await;
        refused_after(&obs, "dev-j", before, ErrorCode::Replayed).await;
        assert!(is_online_on(&obs.all(), "dev-j", "1.0.0"));

        // And the next genuine job succeeds.
        let next = signed(
            &key,
            "start",
            50,
            "dev-j",
            serde_json::json!({ "url": http.url("v3.bin"), "job": "j-v3" }),
        );
        broker.publish(start_topic, &next, false).await;
        online(&obs, "dev-j", "1.2.0").await;
        let seen = progress_of(&obs.all(), "dev-j");
        let accepted = |job: &str| {
            seen.iter()
                .filter(|p| p.job.as_deref() == Some(job) && p.phase == Phase::Accepted)
                .count()
        };
        assert_eq!(accepted("j-v2"), 1, "the replayed start never ran");
        assert_eq!(accepted("j-retained"), 0, "the retained start never ran");
        assert!(!seen.iter().any(|p| p.job.as_deref() == Some("j-retained")));
        dev.stop();
    })
    .await;
}

on_both_brokers!(a_device_with_a_job_key_runs_only_fresh_commands_signed_for_it);

fn built(version: &str, project: &str, secure_version: u32) -> Vec<u8> {
    ImageBuilder::new(Chip::Esp32c3)
        .version(version)
        .project(project)
        .secure_version(secure_version)
        .size(100_000)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn older_versions_other_projects_and_lower_secure_versions_are_refused_before_any_flash_write(
) {
    local(async {
        let broker = TestBroker::mosquitto();
        let files = [
            ("older.bin", built("0.9.0", "mqota-virtual", 2)),
            ("other.bin", built("1.1.0", "someone-else", 2)),
            ("below.bin", built("1.1.0", "mqota-virtual", 1)),
            ("raise.bin", built("1.2.0", "mqota-virtual", 3)),
        ];
        let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
        let http = FileServer::start(&refs).await;
        let obs = broker.observe("device/#").await;
        let mut cfg = config(&broker, "dev-d");
        cfg.initial_secure_version = 2;
        let dev = start(cfg);
        online(&obs, "dev-d", "1.0.0").await;
        assert_eq!(status_of(&obs.all(), "dev-d").unwrap().secure_version, 2);
        for (file, code, why) in [
            ("older.bin", ErrorCode::Downgrade, "image version is older than the running one"),
            ("other.bin", ErrorCode::WrongProject, "image belongs to another project"),
            ("below.bin", ErrorCode::Downgrade, "image secure_version is below the device's floor"),
        ] {
            let ops = dev.flash_ops();
            broker
                .publish("device/dev-d/ota/start", &job(&http.url(file), serde_json::json!({ "job": file })), false)
                .await;
            let failed = failure_of(&obs, "dev-d", file).await;
            assert_eq!((failed.error, failed.message.as_deref()), (Some(code), Some(why)), "{file}");
            assert_eq!(dev.flash_ops(), ops, "{file}: nothing erased or written");
        }
        // The job may allow an older version, but not a lower secure_version.
        broker
            .publish(
                "device/dev-d/ota/start",
                &job(&http.url("below.bin"), serde_json::json!({ "job": "below-2", "allow_downgrade": true, "allow_other_project": true })),
                false,
            )
            .await;
        assert_eq!(failure_of(&obs, "dev-d", "below-2").await.error, Some(ErrorCode::Downgrade));
        broker
            .publish(
                "device/dev-d/ota/start",
                &job(&http.url("older.bin"), serde_json::json!({ "job": "older-2", "allow_downgrade": true })),
                false,
            )
            .await;
        online(&obs, "dev-d", "0.9.0").await;
        // An image with a higher secure_version raises the floor once
        // confirmed: a rollback to the image below it is refused.
        broker
            .publish(
                "device/dev-d/ota/start",
                &job(&http.url("raise.bin"), serde_json::json!({ "job": "raise" })),
                false,
            )
            .await;
        online(&obs, "dev-d", "1.2.0").await;
        broker
            .publish("device/dev-d/ota/rollback", br#"{"job":"rb"}"#, false)
            .await;
        let failed = failure_of(&obs, "dev-d", "rb").await;
        assert_eq!(failed.error, Some(ErrorCode::Downgrade));
        assert_eq!(
            failed.message.as_deref(),
            Some("previous image's secure_version is below the device's floor")
        );
        assert!(is_online_on(&obs.all(), "dev-d", "1.2.0"));
        dev.stop();
    })
    .await;
}

/// A job signed by PyJWT (an independent JOSE implementation) with a key in
/// PEM is accepted; a command sealed here verifies in PyJWT.
#[tokio::test(flavor = "current_thread")]
async fn a_job_signed_by_pyjwt_updates_the_device_and_pyjwt_verifies_ours() {
    use p256::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _, LineEnding};
    local(async {
        let broker = TestBroker::mosquitto();
        let key = job_signing_key();
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("job.pem");
        let public = dir.path().join("job.pub.pem");
        std::fs::write(&pem, key.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes()).unwrap();
        std::fs::write(&public, key.verifying_key().to_public_key_pem(LineEnding::LF).unwrap()).unwrap();
        let v2 = image("1.1.0", 100_000);
        let http = FileServer::start(&[("v2.bin", &v2)]).await;
        let payload = serde_json::json!({
            "op": "start", "seq": 1, "device": "dev-p", "url": http.url("v2.bin"), "job": "py"
        });
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import sys, json, jwt; print(jwt.encode(json.loads(sys.argv[2]), open(sys.argv[1]).read(), algorithm='ES256'))",
                pem.to_str().unwrap(),
                &payload.to_string(),
            ])
            .output()
            .expect("python3 runs (PyJWT and cryptography from PyPI are prerequisites)");
        assert!(out.status.success(), "PyJWT: {}", String::from_utf8_lossy(&out.stderr));
        let token = String::from_utf8(out.stdout).unwrap();

        let obs = broker.observe("device/#").await;
        let mut cfg = config(&broker, "dev-p");
        cfg.job_key = Some(mqota_core::protocol::envelope::job_key_of(key.verifying_key()));
        let dev = start(cfg);
        online(&obs, "dev-p", "1.0.0").await;
        broker.publish("device/dev-p/ota/start", token.trim().as_bytes(), false).await;
        online(&obs, "dev-p", "1.1.0").await;
        dev.stop();

        let ours = signed(&key, "cancel", 7, "dev-p", serde_json::json!({ "job": "x" }));
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import sys, json, jwt; print(json.dumps(jwt.decode(sys.argv[2], open(sys.argv[1]).read(), algorithms=['ES256'])))",
                public.to_str().unwrap(),
                std::str::from_utf8(&ours).unwrap(),
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "PyJWT refused ours: {}", String::from_utf8_lossy(&out.stderr));
        let claims: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(claims["op"], "cancel");
        assert_eq!(claims["seq"], 7);
        assert_eq!(claims["device"], "dev-p");
    })
    .await;
}

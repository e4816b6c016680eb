//! End to end, the field log: virtual devices against Mosquitto fail jobs
//! in four ways (a 404, a stalled download, an unhealthy image, a crashing
//! image), are power-cycled twice, and their log, read over MQTT with the
//! controller's reader, still says why each job failed.

use std::time::Duration;

use mqota_controller::logs::{fetch_logs, Fetched};
use mqota_controller::url::BrokerUrl;
use mqota_core::image::{Chip, ImageBuilder};
use mqota_core::protocol::{BootReason, LogsGet, Status};
use mqota_flash_sim::BootConfig;
use mqota_virtual::device::{run_device, Handle, VirtualConfig};
use mqota_virtual::testing::{Fault, FaultServer, FileServer, Mosquitto, Received, TopicRecorder};
use tokio::task::LocalSet;

fn image(version: &str, size: u32) -> Vec<u8> {
    ImageBuilder::new(Chip::Esp32c3)
        .version(version)
        .project("mqota-virtual")
        .size(size)
        .build()
        .unwrap()
}

fn config(broker: &Mosquitto, id: &str) -> VirtualConfig {
    let mut c = VirtualConfig::new(id, "127.0.0.1", broker.port());
    c.health_timeout = Duration::from_secs(10);
    c.stall_timeout = Duration::from_secs(2);
    c.progress_interval = Duration::from_millis(20);
    c.watchdog = Duration::from_millis(500);
    c.update_timeout = Duration::from_secs(60);
    c
}

fn start(cfg: VirtualConfig) -> Handle {
    let handle = Handle::new();
    let h = handle.clone();
    tokio::task::spawn_local(async move {
        run_device(cfg, h).await.expect("device runs");
    });
    handle
}

fn status_of(seen: &[Received], id: &str) -> Option<Status> {
    seen.iter()
        .rev()
        .find(|r| r.topic == format!("device/{id}/status"))
        .and_then(|r| serde_json::from_slice(&r.payload).ok())
}

fn online_count(seen: &[Received], id: &str) -> usize {
    seen.iter()
        .filter(|r| r.topic == format!("device/{id}/availability") && r.payload == b"online")
        .count()
}

async fn logs(broker: &Mosquitto, id: &str) -> Fetched {
    let url: BrokerUrl = format!("mqtt://127.0.0.1:{}", broker.port())
        .parse()
        .unwrap();
    fetch_logs(
        &url,
        "device",
        id,
        &LogsGet::default(),
        Duration::from_secs(5),
    )
    .await
    .unwrap_or_else(|e| panic!("{id}: {e}"))
}

fn text(f: &Fetched) -> String {
    f.records
        .iter()
        .map(|r| format!("#{} boot {} {} {}", r.n, r.boot, r.level, r.msg))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Asks for the log until `pred` holds for it (the device writes what it
/// went through within its wear budget, a little after it happened).
async fn log_until(
    broker: &Mosquitto,
    id: &str,
    what: &str,
    pred: impl Fn(&Fetched, &str) -> bool,
) {
    let end = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let f = logs(broker, id).await;
        let t = text(&f);
        if pred(&f, &t) {
            return;
        }
        assert!(
            std::time::Instant::now() < end,
            "{id}: the log never showed {what}:\n{t}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn online_again(obs: &TopicRecorder, id: &str, before: usize) {
    assert!(
        obs.wait_until(Duration::from_secs(30), |s| online_count(s, id) > before)
            .await,
        "{id} did not come back online"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn failed_jobs_leave_their_reason_in_the_log_across_two_power_cycles() {
    LocalSet::new()
        .run_until(async {
            let broker = Mosquitto::start();
            let obs = broker.observe("device/#").await;
            let files = [
                ("unhealthy.bin", image("1.1.0+unhealthy", 100_000)),
                ("crash.bin", image("1.1.0+crash", 100_000)),
            ];
            let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
            let http = FileServer::start(&refs).await;
            let stall =
                FaultServer::start(image("1.1.0", 300_000), Fault::StallAfter(50_000)).await;

            // (device, job url, extra job fields, what its log must say)
            let cases: Vec<(&str, String, serde_json::Value, Vec<&str>)> = vec![
                (
                    "log-404",
                    http.url("missing.bin"),
                    serde_json::json!({}),
                    vec!["job j-log-404: failed http_status HTTP 404"],
                ),
                (
                    "log-stall",
                    stall.url(),
                    serde_json::json!({"timeout_s": 6}),
                    vec!["job j-log-stall: failed timeout"],
                ),
                (
                    "log-unhealthy",
                    http.url("unhealthy.bin"),
                    serde_json::json!({}),
                    vec![
                        "trial failed: health check failed",
                        "job j-log-unhealthy: rolled_back health_check_failed",
                    ],
                ),
                (
                    "log-crash",
                    http.url("crash.bin"),
                    serde_json::json!({}),
                    vec!["job j-log-crash: rolled_back boot_failed"],
                ),
            ];
            let mut devs = Vec::new();
            for (id, ..) in &cases {
                devs.push(start(config(&broker, id)));
            }
            for (id, ..) in &cases {
                online_again(&obs, id, 0).await;
            }
            for (id, url, fields, _) in &cases {
                let mut j = serde_json::json!({"url": url, "job": format!("j-{id}")});
                j.as_object_mut()
                    .unwrap()
                    .extend(fields.as_object().unwrap().clone());
                broker
                    .publish(
                        &format!("device/{id}/ota/start"),
                        &serde_json::to_vec(&j).unwrap(),
                        false,
                    )
                    .await;
            }
            for (id, _, _, wants) in &cases {
                log_until(&broker, id, "the failure", |_, t| {
                    wants.iter().all(|w| t.contains(w))
                })
                .await;
            }
            // Two power cycles each.
            for (i, dev) in devs.iter().enumerate() {
                let id = cases[i].0;
                for _ in 0..2 {
                    let before = online_count(&obs.all(), id);
                    dev.cut_power();
                    online_again(&obs, id, before).await;
                }
            }
            for (id, _, _, wants) in &cases {
                // Both boots after the cuts are in the log, and so is the
                // reason of the failure before them.
                log_until(&broker, id, "two power-on boots", |_, t| {
                    t.matches("power_on").count() >= 3
                })
                .await;
                let f = logs(&broker, id).await;
                let t = text(&f);
                for w in wants {
                    assert!(t.contains(w), "{id}: {w:?} missing after two reboots:\n{t}");
                }
                assert_eq!(f.lost_chunks, 0);
                let numbers: Vec<u32> = f.records.iter().map(|r| r.n).collect();
                assert!(
                    numbers.windows(2).all(|w| w[1] == w[0] + 1),
                    "{id}: {numbers:?}"
                );
                let boots: Vec<u32> = f.records.iter().map(|r| r.boot).collect();
                assert!(boots.windows(2).all(|w| w[1] >= w[0]), "{id}: {boots:?}");
                // The status says why this boot happened and how far the log goes.
                assert!(
                    obs.wait_until(Duration::from_secs(10), |s| status_of(s, id)
                        .is_some_and(|st| st.boot_reason == Some(BootReason::PowerOn)
                            && st.log_newest.is_some()))
                        .await,
                    "{id}: {:?}",
                    status_of(&obs.all(), id)
                );
            }
            devs.iter().for_each(Handle::stop);
        })
        .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_retained_logs_get_is_dropped_and_chunks_are_numbered() {
    LocalSet::new()
        .run_until(async {
            let broker = Mosquitto::start();
            let obs = broker.observe("device/#").await;
            // A retained request waiting before the device subscribes.
            broker
                .publish("device/log-r/logs/get", br#"{"id":"retained"}"#, true)
                .await;
            let dev = start(config(&broker, "log-r"));
            online_again(&obs, "log-r", 0).await;
            // Several boots give more records than one chunk holds (each
            // cut waits until the boot's records are in flash).
            for k in 1..=5 {
                log_until(&broker, "log-r", "this boot's records", |_, t| {
                    t.matches("broker connected").count() >= k
                })
                .await;
                let before = online_count(&obs.all(), "log-r");
                dev.cut_power();
                online_again(&obs, "log-r", before).await;
            }
            log_until(&broker, "log-r", "more than a chunk", |f, _| {
                f.records.len() > 8
            })
            .await;
            broker
                .publish(
                    "device/log-r/logs/get",
                    br#"{"id":"fresh","max":100}"#,
                    false,
                )
                .await;
            assert!(
                obs.wait_until(Duration::from_secs(10), |s| s.iter().any(|r| {
                    r.topic == "device/log-r/logs"
                        && String::from_utf8_lossy(&r.payload).contains("\"fresh\"")
                        && String::from_utf8_lossy(&r.payload).contains("\"last\":true")
                }))
                .await
            );
            let chunks: Vec<serde_json::Value> = obs
                .all()
                .iter()
                .filter(|r| r.topic == "device/log-r/logs")
                .filter_map(|r| serde_json::from_slice(&r.payload).ok())
                .collect();
            assert!(
                !chunks.iter().any(|c| c["id"] == "retained"),
                "a retained request was answered"
            );
            let fresh: Vec<&serde_json::Value> =
                chunks.iter().filter(|c| c["id"] == "fresh").collect();
            assert!(fresh.len() >= 2, "{fresh:?}");
            for (i, c) in fresh.iter().enumerate() {
                assert_eq!(c["seq"], i as u64);
                assert_eq!(c["last"], i + 1 == fresh.len());
            }
            dev.stop();
        })
        .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_dropped_wifi_link_and_its_return_are_in_the_log() {
    LocalSet::new()
        .run_until(async {
            let broker = Mosquitto::start();
            let obs = broker.observe("device/#").await;
            let dev = start(config(&broker, "log-w"));
            online_again(&obs, "log-w", 0).await;
            log_until(&broker, "log-w", "the first connection", |_, t| {
                t.contains("broker connected")
            })
            .await;
            let before = online_count(&obs.all(), "log-w");
            dev.drop_link();
            // The broker notices through the will once the keep-alive lapses;
            // the device notices at its next packet.
            assert!(
                obs.wait_until(Duration::from_secs(90), |s| s
                    .iter()
                    .rev()
                    .find(|r| r.topic == "device/log-w/availability")
                    .is_some_and(|r| r.payload == b"offline"))
                    .await
            );
            dev.restore_link();
            online_again(&obs, "log-w", before).await;
            log_until(&broker, "log-w", "the loss and the return", |_, t| {
                t.contains("WiFi link lost") && t.matches("broker connected").count() >= 2
            })
            .await;
            // The log's writes are counted apart from the update path's.
            assert!(dev.log_flash_ops() > 0);
            dev.stop();
        })
        .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_logs_get_during_a_download_is_answered_when_it_ends_and_the_update_goes_on() {
    LocalSet::new()
        .run_until(async {
            let broker = Mosquitto::start();
            let obs = broker.observe("device/#").await;
            // About three seconds of download.
            let slow = FaultServer::start(image("1.1.0", 300_000), Fault::Throttle(100_000)).await;
            let dev = start(config(&broker, "log-dl"));
            online_again(&obs, "log-dl", 0).await;
            let j = serde_json::json!({"url": slow.url(), "job": "j-dl"});
            broker
                .publish(
                    "device/log-dl/ota/start",
                    &serde_json::to_vec(&j).unwrap(),
                    false,
                )
                .await;
            let downloading = |s: &[Received]| {
                s.iter().any(|r| {
                    r.topic == "device/log-dl/progress"
                        && String::from_utf8_lossy(&r.payload).contains("\"downloading\"")
                })
            };
            assert!(obs.wait_until(Duration::from_secs(10), downloading).await);
            broker
                .publish("device/log-dl/logs/get", br#"{"id":"mid"}"#, false)
                .await;
            let answered = |s: &[Received]| {
                s.iter().any(|r| {
                    r.topic == "device/log-dl/logs"
                        && String::from_utf8_lossy(&r.payload).contains("\"mid\"")
                })
            };
            assert!(obs.wait_until(Duration::from_secs(30), answered).await);
            // The update was not disturbed: the new image runs and says done.
            assert!(
                obs.wait_until(Duration::from_secs(30), |s| status_of(s, "log-dl")
                    .is_some_and(|st| {
                        st.version.as_str() == "1.1.0"
                            && st
                                .last
                                .as_ref()
                                .is_some_and(|l| l.result == mqota_core::protocol::Phase::Done)
                    }))
                .await
            );
            log_until(&broker, "log-dl", "the whole update", |_, t| {
                t.contains("job j-dl: accepted")
                    && t.contains("job j-dl: verifying")
                    && t.contains("job j-dl: rebooting")
                    && t.contains("trial passed")
                    && t.contains("job j-dl: done")
            })
            .await;
            dev.stop();
        })
        .await;
}

/// Under the rollback bootloader the old firmware runs right after the bad
/// one died, so its boot record names how the bad one died.
#[tokio::test(flavor = "current_thread")]
async fn the_boot_after_a_crash_or_a_hang_says_panic_or_watchdog() {
    LocalSet::new()
        .run_until(async {
            let broker = Mosquitto::start();
            let obs = broker.observe("device/#").await;
            let files = [
                ("crash.bin", image("1.1.0+crash", 100_000)),
                ("hang.bin", image("1.1.0+hang", 100_000)),
            ];
            let refs: Vec<(&str, &[u8])> =
                files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
            let http = FileServer::start(&refs).await;
            let cases = [("log-crash-rb", "crash", "panic"), ("log-hang-rb", "hang", "watchdog")];
            let mut devs = Vec::new();
            for (id, ..) in cases {
                let mut cfg = config(&broker, id);
                cfg.bootloader = BootConfig::Rollback;
                devs.push(start(cfg));
            }
            for (id, kind, _) in cases {
                online_again(&obs, id, 0).await;
                let j = serde_json::json!({"url": http.url(&format!("{kind}.bin")), "job": format!("j-{id}")});
                broker
                    .publish(
                        &format!("device/{id}/ota/start"),
                        &serde_json::to_vec(&j).unwrap(),
                        false,
                    )
                    .await;
            }
            for (id, _, reason) in cases {
                let job = format!("job j-{id}: rolled_back boot_failed");
                let boot = format!(": {reason}, ");
                log_until(&broker, id, "the death and the rollback", |_, t| {
                    t.contains(&job) && t.contains(&boot)
                })
                .await;
            }
            devs.iter().for_each(Handle::stop);
        })
        .await;
}

//! `mqota serve --home-assistant` against a real Mosquitto, with virtual
//! devices, and an MQTT 3.1.1 client (rumqttc's v4 client, the protocol
//! level Home Assistant connects with) playing Home Assistant: it subscribes
//! to discovery and state, announces itself on `homeassistant/status`, and
//! presses Install by publishing the discovery's `payload_install` on its
//! `command_topic`.

mod controller_support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use controller_support::{device_config, get_json, image, start_devices, Serve};
use mqota_virtual::testing::{Fault, FaultServer, Mosquitto};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

/// One message as Home Assistant would receive it.
#[derive(Debug, Clone)]
struct Msg {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
}

impl Msg {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).unwrap_or(Value::Null)
    }
}

/// A Home Assistant stand-in: MQTT 3.1.1, records everything it receives.
struct HomeAssistant {
    client: AsyncClient,
    seen: Arc<Mutex<Vec<Msg>>>,
    subacks: Arc<Mutex<usize>>,
    task: tokio::task::JoinHandle<()>,
}

impl HomeAssistant {
    async fn connect(port: u16, id: &str, filters: &[&str]) -> Self {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(10));
        let (client, mut ev) = AsyncClient::new(o, 64);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let subacks = Arc::new(Mutex::new(0));
        let (sink, acks) = (seen.clone(), subacks.clone());
        let task = tokio::spawn(async move {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => sink.lock().unwrap().push(Msg {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                        retain: p.retain,
                    }),
                    Ok(Event::Incoming(Packet::SubAck(_))) => *acks.lock().unwrap() += 1,
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        let ha = Self {
            client,
            seen,
            subacks,
            task,
        };
        for f in filters {
            ha.client.subscribe(*f, QoS::AtLeastOnce).await.unwrap();
        }
        assert!(
            ha.wait(Duration::from_secs(10), |_| *ha.subacks.lock().unwrap()
                == filters.len())
                .await,
            "the broker acknowledged the subscriptions"
        );
        ha
    }

    fn all(&self) -> Vec<Msg> {
        self.seen.lock().unwrap().clone()
    }

    fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }

    async fn wait(&self, timeout: Duration, pred: impl Fn(&[Msg]) -> bool) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if pred(&self.all()) {
                return true;
            }
            if Instant::now() > end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn publish(&self, topic: &str, payload: &str) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
            .await
            .unwrap();
    }

    /// Clears the retained message of `topic`.
    async fn clear_retained(&self, topic: &str) {
        self.client
            .publish(topic, QoS::AtLeastOnce, true, Vec::new())
            .await
            .unwrap();
    }
}

impl Drop for HomeAssistant {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Discovery configs by topic (the last one of each).
fn configs(msgs: &[Msg]) -> BTreeMap<String, Value> {
    msgs.iter()
        .filter(|m| m.topic.starts_with("homeassistant/update/") && m.topic.ends_with("/config"))
        .map(|m| (m.topic.clone(), m.json()))
        .collect()
}

/// Every state published on `topic`, in order.
fn states(msgs: &[Msg], topic: &str) -> Vec<Value> {
    msgs.iter()
        .filter(|m| m.topic == topic)
        .map(Msg::json)
        .collect()
}

/// `GET /api/deployments` once `pred` holds for it (at most 30 s).
async fn deployments_when(serve: &Serve, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let end = Instant::now() + WAIT;
    loop {
        let list = get_json(&format!("{}/api/deployments", serve.http));
        let list = list.as_array().cloned().unwrap_or_default();
        if pred(&list) {
            return list;
        }
        assert!(Instant::now() < end, "deployments: {list:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

const IDS: [&str; 3] = ["ha-1", "ha-2", "ha-3"];
const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn home_assistant_sees_every_device_follows_an_update_and_installs_the_newest_image() {
    let broker = Mosquitto::start();
    let url = format!("mqtt://127.0.0.1:{}", broker.port());
    let fw = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    // The newest image of the devices' chip and project is 1.1.0; the
    // others must not be offered.
    std::fs::write(fw.path().join("app-1.0.5.bin"), image("1.0.5", 64 * 1024)).unwrap();
    let newest = image("1.1.0", 1024 * 1024);
    std::fs::write(fw.path().join("app-1.1.0.bin"), &newest).unwrap();
    // Devices download through a slow link (serve's --public-url, as a
    // proxy or CDN in front of it would be), so the download takes seconds
    // and its progress shows in Home Assistant.
    let slow_link = FaultServer::start(newest, Fault::Throttle(256 * 1024)).await;
    let public_url = slow_link.url().trim_end_matches("/fw.bin").to_owned();
    let devices = start_devices(
        IDS.iter()
            .map(|id| device_config(id, broker.port()))
            .collect(),
    );
    let watcher = HomeAssistant::connect(broker.port(), "watch-status", &["device/+/status"]).await;
    assert!(
        watcher
            .wait(WAIT, |m| m
                .iter()
                .map(|x| &x.topic)
                .collect::<BTreeSet<_>>()
                .len()
                == 3)
            .await,
        "the virtual devices publish their status"
    );

    // Home Assistant is up before serve: it sees the discovery as it is
    // published.
    let ha = HomeAssistant::connect(
        broker.port(),
        "home-assistant",
        &["homeassistant/#", "mqota/homeassistant/#"],
    )
    .await;
    let serve = Serve::start_with(
        fw.path(),
        data.path(),
        Some(&url),
        "127.0.0.1:0",
        &["--home-assistant", "--public-url", &public_url],
    );
    assert!(
        ha.wait(WAIT, |m| configs(m).len() == 3).await,
        "one discovery per device: {:?}",
        configs(&ha.all()).keys().collect::<Vec<_>>()
    );
    let discovered = configs(&ha.all());
    let mut names = BTreeSet::new();
    for (topic, d) in &discovered {
        let name = d["device"]["name"].as_str().unwrap().to_owned();
        assert_eq!(topic, &format!("homeassistant/update/mqota/{name}/config"));
        assert_eq!(d["device"]["model"], "esp32c3");
        assert_eq!(d["device"]["sw_version"], "mqota-virtual 1.0.0");
        assert_eq!(d["payload_install"], "install");
        assert_eq!(
            d["availability"][0]["topic"],
            format!("device/{name}/availability")
        );
        names.insert(name);
    }
    assert_eq!(names, IDS.iter().map(|s| s.to_string()).collect());
    let state_topic = |id: &str| {
        discovered[&format!("homeassistant/update/mqota/{id}/config")]["state_topic"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let command_topic = |id: &str| {
        discovered[&format!("homeassistant/update/mqota/{id}/config")]["command_topic"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(
        ha.wait(WAIT, |m| IDS
            .iter()
            .all(|id| !states(m, &state_topic(id)).is_empty()))
            .await,
        "a state per device"
    );
    let first = states(&ha.all(), &state_topic("ha-1"))[0].clone();
    assert_eq!(first["installed_version"], "1.0.0");
    assert_eq!(first["latest_version"], "1.1.0", "{first}");
    assert_eq!(first["in_progress"], false);
    assert_eq!(first["update_percentage"], Value::Null);

    // A Home Assistant that starts now gets each discovery once, retained:
    // everything retained arrives before the marker published after its
    // subscription.
    let late = HomeAssistant::connect(
        broker.port(),
        "home-assistant-restarted",
        &["homeassistant/update/+/+/config", "test/marker"],
    )
    .await;
    late.publish("test/marker", "x").await;
    assert!(
        late.wait(WAIT, |m| m.iter().any(|x| x.topic == "test/marker"))
            .await
    );
    let before_marker: Vec<Msg> = late
        .all()
        .into_iter()
        .take_while(|m| m.topic != "test/marker")
        .collect();
    assert_eq!(before_marker.len(), 3, "{before_marker:?}");
    assert!(before_marker.iter().all(|m| m.retain));
    assert_eq!(
        before_marker
            .iter()
            .map(|m| &m.topic)
            .collect::<BTreeSet<_>>(),
        discovered.keys().collect::<BTreeSet<_>>()
    );

    // Home Assistant announces itself: every device is announced again.
    ha.clear();
    late.publish("homeassistant/status", "online").await;
    assert!(
        ha.wait(WAIT, |m| configs(m).len() == 3).await,
        "discovery again after the birth message: {:?}",
        ha.all().iter().map(|m| &m.topic).collect::<Vec<_>>()
    );

    // Install on ha-1: a deployment through the normal rollout path, with
    // progress in the state, ending on the newest version.
    ha.clear();
    late.publish(&command_topic("ha-1"), "install").await;
    let done = ha
        .wait(Duration::from_secs(90), |m| {
            states(m, &state_topic("ha-1"))
                .iter()
                .any(|s| s["installed_version"] == "1.1.0" && s["in_progress"] == false)
        })
        .await;
    let seen = states(&ha.all(), &state_topic("ha-1"));
    assert!(done, "ha-1 reached 1.1.0: {seen:#?}");
    let progress: Vec<&Value> = seen
        .iter()
        .filter(|s| s["in_progress"] == true)
        .map(|s| &s["update_percentage"])
        .collect();
    assert!(
        progress
            .iter()
            .any(|p| p.as_u64().is_some_and(|n| n > 0 && n < 100)),
        "a percentage between 0 and 100 during the download: {progress:?}"
    );
    assert!(
        progress
            .iter()
            .all(|p| p.is_null() || p.as_u64().is_some_and(|n| n <= 100)),
        "{progress:?}"
    );
    eprintln!("update_percentage seen during the update: {progress:?}");
    let last = seen.last().unwrap();
    assert_eq!(last["latest_version"], "1.1.0");
    assert_eq!(last["update_percentage"], Value::Null);
    // The device's own retained status says it too, and the discovery
    // carries the new version.
    assert!(
        watcher
            .wait(WAIT, |m| m.iter().any(
                |x| x.topic == "device/ha-1/status" && x.json()["version"] == "1.1.0"
            ))
            .await
    );
    assert!(
        ha.wait(WAIT, |m| configs(m)
            .get("homeassistant/update/mqota/ha-1/config")
            .is_some_and(
                |d| d["device"]["sw_version"] == "mqota-virtual 1.1.0"
            ))
        .await
    );
    let deployments =
        deployments_when(&serve, |d| d.len() == 1 && d[0]["state"] == "succeeded").await;
    assert_eq!(deployments[0]["version"], "1.1.0");
    assert_eq!(deployments[0]["devices"][0]["device"], "ha-1");
    assert_eq!(deployments[0]["devices"].as_array().unwrap().len(), 1);

    // Pressed again: already on it, refused, no deployment.
    ha.clear();
    late.publish(&command_topic("ha-1"), "install").await;
    assert!(
        ha.wait(WAIT, |m| states(m, &state_topic("ha-1")).iter().any(|s| s
            ["release_summary"]
            .as_str()
            .is_some_and(
                |t| t.contains("Install refused") && t.contains("newest")
            )))
        .await,
        "{:#?}",
        states(&ha.all(), &state_topic("ha-1"))
    );
    // Pressed twice on ha-2: the second press finds it busy.
    late.publish(&command_topic("ha-2"), "install").await;
    late.publish(&command_topic("ha-2"), "install").await;
    assert!(
        ha.wait(WAIT, |m| states(m, &state_topic("ha-2")).iter().any(|s| s
            ["release_summary"]
            .as_str()
            .is_some_and(
                |t| t.contains("Install refused") && t.contains("busy")
            )))
        .await,
        "{:#?}",
        states(&ha.all(), &state_topic("ha-2"))
    );
    assert!(
        ha.wait(Duration::from_secs(90), |m| states(m, &state_topic("ha-2"))
            .iter()
            .any(
                |s| s["installed_version"] == "1.1.0" && s["in_progress"] == false
            ))
        .await
    );
    let deployments = deployments_when(&serve, |d| {
        d.len() == 2 && d.iter().all(|x| x["state"] == "succeeded")
    })
    .await;
    let per_device: Vec<&str> = deployments
        .iter()
        .map(|d| d["devices"][0]["device"].as_str().unwrap())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(per_device, ["ha-1", "ha-2"]);

    // A device whose retained status is cleared loses its entity: an empty
    // retained config removes it from Home Assistant.
    ha.clear();
    late.clear_retained("device/ha-3/status").await;
    assert!(
        ha.wait(WAIT, |m| m.iter().any(|x| x.topic
            == "homeassistant/update/mqota/ha-3/config"
            && x.payload.is_empty()))
            .await,
        "{:?}",
        ha.all().iter().map(|m| &m.topic).collect::<Vec<_>>()
    );
    drop(serve);
    devices.stop();
}

/// A broker restarted without persistence forgets every retained message:
/// the bridge announces every device again when it reconnects, so Home
/// Assistant (re)starting afterwards still finds the entities.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_broker_restart_the_discovery_is_retained_again() {
    let mut broker = Mosquitto::start();
    let url = format!("mqtt://127.0.0.1:{}", broker.port());
    let fw = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    std::fs::write(fw.path().join("app-1.1.0.bin"), image("1.1.0", 64 * 1024)).unwrap();
    let _devices = start_devices(vec![device_config("hb-1", broker.port())]);
    let _serve = Serve::start_with(
        fw.path(),
        data.path(),
        Some(&url),
        "127.0.0.1:0",
        &["--home-assistant"],
    );
    let config = "homeassistant/update/mqota/hb-1/config";
    let retained = |m: &[Msg]| m.iter().any(|x| x.topic == config && x.retain);
    let ha = HomeAssistant::connect(broker.port(), "ha-before", &["homeassistant/#"]).await;
    assert!(
        ha.wait(WAIT, |m| m.iter().any(|x| x.topic == config)).await,
        "discovery before the restart"
    );
    drop(ha);

    // Empty after the restart: a retained config from now on is the
    // bridge's doing.
    broker.restart();
    let deadline = Instant::now() + WAIT;
    loop {
        let ha = HomeAssistant::connect(broker.port(), "ha-after", &["homeassistant/#"]).await;
        if ha.wait(Duration::from_secs(2), retained).await {
            let d = configs(&ha.all())[config].clone();
            assert_eq!(d["device"]["name"], "hb-1");
            assert_eq!(d["payload_install"], "install");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no retained discovery after the restart"
        );
    }
}

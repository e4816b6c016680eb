//! Shared by the controller tests: run `mqota serve` and other subcommands
//! as real processes.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use mqota_core::image::{Chip, ImageBuilder};
use mqota_virtual::testing::wait_until;

pub const MQOTA: &str = env!("CARGO_BIN_EXE_mqota");

/// The project the virtual devices run (`mqota-virtual` provisions it):
/// deploy checks that an image is of the project a device runs.
pub const PROJECT: &str = "mqota-virtual";

pub fn image(version: &str, size: u32) -> Vec<u8> {
    ImageBuilder::new(Chip::Esp32c3)
        .version(version)
        .project(PROJECT)
        .size(size)
        .build()
        .unwrap()
}

/// `mqota serve` running; killed on drop.
pub struct Serve {
    child: Child,
    /// `http://ADDR`, or `https://ADDR` with `--tls-cert`.
    pub http: String,
    pub broker: String,
    /// serve's stdout, the lines after those `start` read.
    pub lines: mpsc::Receiver<String>,
    /// `mqtts://ADDR` of the embedded broker's TLS listener, if any.
    pub mqtts: Option<String>,
    /// What serve printed on stdout until it was up.
    pub printed: Vec<String>,
}

impl Serve {
    /// Starts serve with the embedded broker (`broker: None`) or against one.
    pub fn start(fw: &Path, data: &Path, broker: Option<&str>) -> Self {
        Self::start_at(fw, data, broker, "127.0.0.1:0")
    }

    /// As [`Serve::start`], with HTTP on `http` (a restarted server keeps
    /// the address the deployed URLs name).
    pub fn start_at(fw: &Path, data: &Path, broker: Option<&str>, http: &str) -> Self {
        Self::start_with(fw, data, broker, http, &[])
    }

    /// As [`Serve::start_at`], with more arguments (e.g. `--home-assistant`,
    /// `--tls-cert …`); with `--mqtts-listen` among them, waits for the TLS
    /// listener too.
    pub fn start_with(
        fw: &Path,
        data: &Path,
        broker: Option<&str>,
        http: &str,
        extra: &[&str],
    ) -> Self {
        let mut cmd = Command::new(MQOTA);
        cmd.arg("serve")
            .arg("--firmware-dir")
            .arg(fw)
            .arg("--data-dir")
            .arg(data)
            .args(["--http", http, "--mqtt-listen", "127.0.0.1:0"])
            // Tests serve firmware URLs from their own HTTP servers on
            // loopback (see controller_browser.rs's slow_firmware).
            .args(["--allow-remote-firmware", "127.0.0.1"])
            .env_remove("MQOTA_BROKER")
            .env("MQOTA_CONFIG", "/dev/null")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(b) = broker {
            cmd.args(["--broker", b]);
        }
        cmd.args(extra);
        let want_mqtts = extra.contains(&"--mqtts-listen");
        let mut child = cmd.spawn().expect("mqota serve");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    // Keep draining so serve never blocks on a full pipe.
                    continue;
                }
            }
        });
        let mut http = None;
        let mut broker_url = broker.map(str::to_owned);
        let mut mqtts = None;
        let mut printed = Vec::new();
        while http.is_none() || broker_url.is_none() || (want_mqtts && mqtts.is_none()) {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("serve prints where it listens");
            if let Some(a) = line
                .strip_prefix("http listening on ")
                .or_else(|| line.strip_prefix("https listening on "))
            {
                http = Some(a.trim().to_owned());
            }
            if let Some(a) = line.strip_prefix("mqtt broker listening on ") {
                broker_url = Some(a.trim().to_owned());
            }
            if let Some(a) = line.strip_prefix("mqtts broker listening on ") {
                mqtts = Some(a.trim().to_owned());
            }
            printed.push(line);
        }
        // Serve prints its HTTP address before it follows the fleet; the
        // API answers from the first request on, which is all tests need.
        Self {
            child,
            http: http.unwrap(),
            broker: broker_url.unwrap(),
            lines: rx,
            mqtts,
            printed,
        }
    }

    /// Waits (at most 20 s) for a line of serve's output that `pred`
    /// accepts, and returns it.
    pub fn wait_line(&self, pred: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if pred(&line) => return line,
                Ok(_) => {}
                Err(e) => panic!("serve never printed the line looked for: {e}"),
            }
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `mqota ARGS` with a clean environment; returns (success, stdout, stderr).
pub fn mqota(args: &[&str]) -> (bool, String, String) {
    mqota_env(args, &[])
}

/// [`mqota`] with these environment variables set.
pub fn mqota_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(MQOTA)
        .args(args)
        .envs(env.iter().copied())
        .env_remove("MQOTA_TOKEN")
        .env("MQOTA_CONFIG", "/dev/null")
        .env_remove("MQOTA_BROKER")
        .output()
        .expect("run mqota");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub use mqota_virtual::fleet::VirtualFleet;

/// A virtual device for these tests: the defaults, with timeouts short enough
/// for a test and keep-alive pings often enough to notice a dead broker.
pub fn device_config(id: &str, port: u16) -> mqota_virtual::device::VirtualConfig {
    let mut c = mqota_virtual::device::VirtualConfig::new(id, "127.0.0.1", port);
    c.health_timeout = Duration::from_secs(3);
    c.stall_timeout = Duration::from_secs(5);
    c.progress_interval = Duration::from_millis(100);
    c.watchdog = Duration::from_millis(500);
    c.update_timeout = Duration::from_secs(60);
    c.keep_alive_secs = 10;
    c
}

/// Starts one virtual device per configuration on a thread of their own
/// (stopped when dropped; [`VirtualFleet::stop`] returns each device's boots).
pub fn start_devices(configs: Vec<mqota_virtual::device::VirtualConfig>) -> VirtualFleet {
    VirtualFleet::start(configs).expect("the virtual devices' thread starts")
}

/// `mqota status --json` against `broker`, parsed.
pub fn status_json(broker: &str) -> Vec<serde_json::Value> {
    status_json_with(&["--broker", broker])
}

/// [`status_json`] with the settings of data directory `data` (its
/// credentials, its fleet CA and controller certificate for `mqtts://`).
pub fn status_json_in(broker: &str, data: &Path) -> Vec<serde_json::Value> {
    status_json_with(&["--broker", broker, "--data-dir", data.to_str().unwrap()])
}

fn status_json_with(args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["status", "--json"];
    all.extend_from_slice(args);
    let (ok, out, err) = mqota(&all);
    assert!(ok, "status {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}: {out}"))
}

/// Polls `mqota status --json --broker BROKER` every 200 ms until `check`
/// accepts the devices it lists (a run that fails lists none) and returns
/// them; fails after `within` with `never {what}`.
pub fn wait_status(
    broker: &str,
    what: &str,
    within: Duration,
    check: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let read = || {
        let (ok, out, _) = mqota(&["status", "--json", "--broker", broker]);
        let list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap_or_default();
        if ok {
            list
        } else {
            Vec::new()
        }
    };
    wait_until(what, within, Duration::from_millis(200), read, |s| check(s))
}

/// How many devices of a deployment (as `GET /api/deployments` lists it)
/// are in `state`.
pub fn count(deployment: &serde_json::Value, state: &str) -> usize {
    deployment["devices"]
        .as_array()
        .expect("a deployment lists its devices")
        .iter()
        .filter(|x| x["state"] == state)
        .count()
}

/// Polls serve's `GET /api/deployments` at `http` every 100 ms until
/// `check` accepts the newest deployment, and returns it; fails after
/// `within` with `never {what}`.
pub fn wait_deployment(
    http: &str,
    what: &str,
    within: Duration,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let read = || get_json(&format!("{http}/api/deployments"));
    let deps = wait_until(what, within, Duration::from_millis(100), read, |deps| {
        deps.as_array().and_then(|a| a.first()).is_some_and(&check)
    });
    deps[0].clone()
}

/// GETs `url` and parses the JSON body, from a synchronous test (a runtime of
/// its own on a thread, so it also works inside another runtime).
pub fn get_json(url: &str) -> serde_json::Value {
    let url = url.to_owned();
    on_own_runtime(async { reqwest::get(url).await.unwrap().json().await.unwrap() })
}

/// POSTs to `url` with an optional JSON body, from a synchronous test;
/// returns the status and the JSON answer (`null` if it is none).
pub fn post_json(url: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
    let url = url.to_owned();
    on_own_runtime(async move {
        let mut req = reqwest::Client::new().post(url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(serde_json::Value::Null))
    })
}

/// Runs `task` on a runtime of its own on a thread of its own, so that a
/// synchronous test can await, also from inside another runtime.
pub fn on_own_runtime<T: Send + 'static>(
    task: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(task)
    })
    .join()
    .unwrap()
}

/// Publishes, at QoS 1 as devices do, a retained status (1.0.0) and
/// `online` for `n` devices (`s-00000`, `s-00001`, …); returns once the
/// broker acknowledged them all. Blocks: it runs a runtime of its own.
pub fn publish_fleet(port: u16, n: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    rt.block_on(async {
        let mut o = MqttOptions::new("fleet-publisher", "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_outgoing_inflight_upper_limit(1000);
        let (client, mut ev) = AsyncClient::new(o, 1024);
        let acked = tokio::spawn(async move {
            let mut left = 2 * n;
            while left > 0 {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => left -= 1,
                    Ok(_) => {}
                    Err(e) => panic!("publisher lost the broker: {e}"),
                }
            }
        });
        for i in 0..n {
            let id = format!("s-{i:05}");
            let status = serde_json::to_vec(&serde_json::json!({
                "device": id, "chip": "esp32c3", "project": PROJECT, "version": "1.0.0",
                "slot": 0, "state": "valid", "last": null
            }))
            .unwrap();
            let topic = format!("device/{id}/status");
            client
                .publish(topic, QoS::AtLeastOnce, true, status)
                .await
                .unwrap();
            let topic = format!("device/{id}/availability");
            client
                .publish(topic, QoS::AtLeastOnce, true, "online")
                .await
                .unwrap();
        }
        tokio::time::timeout(Duration::from_secs(60), acked)
            .await
            .expect("the broker acknowledged every status")
            .unwrap();
        let _ = client.disconnect().await;
    });
}

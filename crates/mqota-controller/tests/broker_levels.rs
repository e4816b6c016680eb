//! The embedded broker serves MQTT 3.1.1 and MQTT 5 on one port: real
//! clients at both levels (`mosquitto_pub`/`mosquitto_sub` at `-V mqttv311`
//! and `-V mqttv5`, Python's paho-mqtt at MQTTv311 and MQTTv5) exchange
//! live, retained and will messages across levels, and what is not an
//! MQTT 3.1.1 or 5 CONNECT is turned away without harming the broker.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mqota_controller::broker::EmbeddedBroker;

const V311: &str = "mqttv311";
const V5: &str = "mqttv5";
const DEADLINE: Duration = Duration::from_secs(10);

fn broker() -> EmbeddedBroker {
    EmbeddedBroker::start(SocketAddr::from(([127, 0, 0, 1], 0))).expect("embedded broker")
}

/// A running `mosquitto_sub -d` whose output lines are collected: debug
/// lines ("Client … received SUBACK") tell when it is subscribed, message
/// lines are "MSG retained topic payload".
struct Sub {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    level: &'static str,
}

impl Sub {
    /// Subscribes to `filter` at `level`; returns once the SUBACK is in.
    fn start(port: u16, level: &'static str, filter: &str, extra: &[&str]) -> Self {
        // Line-buffered, or the debug lines sit in stdio's buffer.
        let mut child = Command::new("stdbuf")
            .args([
                "-oL",
                "mosquitto_sub",
                "-d",
                "-V",
                level,
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .args(["-q", "1", "-t", filter, "-F", "MSG %r %t %p"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("stdbuf (coreutils) running mosquitto_sub");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for out in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let sink = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(line);
                }
            });
        }
        let sub = Self {
            child,
            lines,
            level,
        };
        assert!(
            sub.wait_for(|l| l.contains("received SUBACK")),
            "mosquitto_sub -V {level} did not subscribe: {:?}",
            sub.lines()
        );
        sub
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits up to [`DEADLINE`] for a line matching `pred`.
    fn wait_for(&self, pred: impl Fn(&str) -> bool) -> bool {
        let end = Instant::now() + DEADLINE;
        while Instant::now() < end {
            if self.lines().iter().any(|l| pred(l)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Asserts that the message arrives (with this retain flag) in time.
    fn expect(&self, topic: &str, payload: &str, retained: bool) {
        let want = format!("MSG {} {topic} {payload}", u8::from(retained));
        assert!(
            self.wait_for(|l| l == want),
            "mosquitto_sub -V {} did not get {want:?}: {:?}",
            self.level,
            self.lines()
        );
    }

    /// Kills the process (no DISCONNECT: its connection just drops).
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `mosquitto_pub` at `level` (QoS 1); returns its exit status and stderr.
fn try_publish(port: u16, level: &str, topic: &str, payload: &str, retain: bool) -> (bool, String) {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args(["-V", level, "-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-q", "1", "-t", topic, "-m", payload]);
    if retain {
        cmd.arg("-r");
    }
    let out = cmd
        .output()
        .expect("mosquitto_pub (apt-get install mosquitto-clients)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn publish(port: u16, level: &str, topic: &str, payload: &str, retain: bool) {
    let (ok, stderr) = try_publish(port, level, topic, payload, retain);
    assert!(ok, "mosquitto_pub -V {level} to {topic} failed: {stderr}");
}

/// A live message crosses from each level to the other.
fn assert_both_directions(port: u16, topic: &str) {
    for (from, to) in [(V311, V5), (V5, V311)] {
        let sub = Sub::start(port, to, topic, &[]);
        let payload = format!("from-{from}");
        publish(port, from, topic, &payload, false);
        sub.expect(topic, &payload, false);
    }
}

#[test]
fn a_message_published_at_one_level_reaches_a_subscriber_at_the_other() {
    let broker = broker();
    assert_both_directions(broker.addr().port(), "levels/live");
}

#[test]
fn a_retained_message_is_replayed_to_a_later_subscriber_at_the_other_level() {
    let broker = broker();
    let port = broker.addr().port();
    for (from, to) in [(V311, V5), (V5, V311)] {
        let topic = format!("levels/retained/{from}");
        let payload = format!("kept-{from}");
        publish(port, from, &topic, &payload, true);
        Sub::start(port, to, &topic, &[]).expect(&topic, &payload, true);
    }
}

#[test]
fn the_will_of_a_killed_311_client_reaches_a_v5_subscriber() {
    let broker = broker();
    let port = broker.addr().port();
    let watcher = Sub::start(port, V5, "levels/will/#", &[]);
    let mut doomed = Sub::start(
        port,
        V311,
        "levels/unused",
        &[
            "-i",
            "doomed-311",
            "--will-topic",
            "levels/will/doomed",
            "--will-payload",
            "gone",
            "--will-qos",
            "1",
            "--will-retain",
        ],
    );
    doomed.kill();
    watcher.expect("levels/will/doomed", "gone", false);
    // Retained too, for subscribers that come later (at either level).
    Sub::start(port, V311, "levels/will/doomed", &[]).expect("levels/will/doomed", "gone", true);
}

#[test]
fn mqtt_31_is_refused_as_an_unacceptable_protocol_version() {
    let broker = broker();
    let port = broker.addr().port();
    let (ok, stderr) = try_publish(port, "mqttv31", "levels/old", "x", false);
    assert!(!ok, "an MQTT 3.1 client must be refused");
    assert!(
        stderr.to_lowercase().contains("protocol version"),
        "mosquitto_pub should say why: {stderr}"
    );
    assert_both_directions(port, "levels/after-31");
}

/// Sends `bytes` as the start of a connection and returns what comes back
/// before the broker closes it (panics if it stays open past the deadline).
fn answer_to(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(bytes).expect("send");
    let mut back = Vec::new();
    match s.read_to_end(&mut back) {
        Ok(_) => back,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => back,
        Err(e) => panic!("the broker kept {bytes:02x?} open: {e} (got {back:02x?})"),
    }
}

#[test]
fn garbage_a_non_connect_and_unknown_levels_are_closed_and_the_broker_keeps_serving() {
    let broker = broker();
    let port = broker.addr().port();

    assert_eq!(answer_to(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), b"");
    // PINGREQ before CONNECT.
    assert_eq!(answer_to(port, &[0xc0, 0x00]), b"");
    // A remaining length that never ends.
    assert_eq!(answer_to(port, &[0x10, 0xff, 0xff, 0xff, 0xff]), b"");
    // CONNECT with an unknown protocol name.
    assert_eq!(
        answer_to(port, b"\x10\x0c\x00\x04MQTX\x04\x02\x00\x3c"),
        b""
    );
    // CONNECT for protocol level 9: CONNACK "unacceptable protocol version".
    assert_eq!(
        answer_to(port, b"\x10\x10\x00\x04MQTT\x09\x02\x00\x3c\x00\x04abcd"),
        [0x20, 0x02, 0x00, 0x01]
    );
    // A client that goes away halfway through its CONNECT.
    let mut half = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    half.write_all(b"\x10\x10\x00\x04MQ")
        .expect("half a CONNECT");
    drop(half);

    assert_both_directions(port, "levels/after-garbage");
}

#[test]
fn paho_mqtt_at_311_and_5_exchanges_live_and_retained_messages() {
    let broker = broker();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/paho_levels.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(broker.addr().port().to_string())
        .output()
        .expect("python3 (apt-get install python3)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script} failed ({}):\n{stdout}{stderr}",
        out.status
    );
    assert_eq!(stdout.lines().filter(|l| l.ends_with(" ok")).count(), 2);
}

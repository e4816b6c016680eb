//! Logins and topic rules on both doors, against real peers: Mosquitto
//! started with what `mqota broker mosquitto-conf` wrote, and the embedded
//! broker of `mqota serve`. Devices get their logins from `mqota device add`;
//! the attackers are rumqttc clients (an MQTT implementation of its own,
//! neither the device's rust-mqtt nor the broker), one of them holding a
//! real device login (`dev-x`) and trying to act as another device.

mod controller_support;

use std::path::Path;
use std::time::{Duration, Instant};

use controller_support::{device_config, image, mqota, start_devices, status_json_in, Serve};
use mqota_virtual::device::{Password, VirtualConfig};
use mqota_virtual::testing::{free_port, wait_until, Mosquitto};
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, DisconnectReasonCode, Packet, PubAckReason, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, StateError};

/// `mqota device add ID`: the password is in the 0600 file and nowhere in
/// the command's output.
fn add_device(data: &Path, id: &str) -> String {
    let (ok, out, err) = mqota(&["device", "add", id, "--data-dir", data.to_str().unwrap()]);
    assert!(ok, "device add {id}: {err}");
    let file = data.join("credentials").join(format!("{id}.password"));
    let password = std::fs::read_to_string(&file).unwrap().trim().to_owned();
    assert!(password.len() >= 32);
    assert!(
        !out.contains(&password) && !err.contains(&password),
        "password printed"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", file.display());
    }
    password
}

fn device(id: &str, port: u16, password: &str) -> VirtualConfig {
    let mut c = device_config(id, port);
    c.username = Some(id.to_owned());
    c.password = Some(Password::new(password));
    c
}

fn options(client_id: &str, port: u16, login: Option<(&str, &str)>) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    if let Some((u, p)) = login {
        o.set_credentials(u, p);
    }
    o
}

/// Polls until the CONNACK (or a refusal); `Ok` once connected.
async fn connect(el: &mut EventLoop) -> Result<(), ConnectionError> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), el.poll())
            .await
            .expect("no CONNACK within 10 s")?
        {
            Event::Incoming(Packet::ConnAck(_)) => return Ok(()),
            _ => continue,
        }
    }
}

/// What became of a request the broker may refuse.
#[derive(Debug, PartialEq)]
enum Answer {
    /// PUBACK or SUBACK with this refusal (Mosquitto keeps the connection).
    Refused,
    /// PUBACK / SUBACK success.
    Granted,
    /// DISCONNECT 0x87 from the broker (the embedded broker's answer).
    DisconnectedNotAuthorized,
    /// The connection ended without a word.
    Closed,
}

async fn answer(el: &mut EventLoop) -> Answer {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "no answer within 10 s");
        match tokio::time::timeout(Duration::from_secs(10), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(a)))) => {
                return match a.reason {
                    // Mosquitto says the latter when nobody subscribes.
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Answer::Granted,
                    _ => Answer::Refused,
                };
            }
            Ok(Ok(Event::Incoming(Packet::SubAck(a)))) => {
                return if a
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_)))
                {
                    Answer::Granted
                } else {
                    Answer::Refused
                };
            }
            Ok(Ok(Event::Incoming(Packet::Disconnect(d)))) => {
                assert_eq!(d.reason_code, DisconnectReasonCode::NotAuthorized);
                return Answer::DisconnectedNotAuthorized;
            }
            Ok(Ok(_)) => continue,
            // rumqttc reports the broker's DISCONNECT as an error.
            Ok(Err(ConnectionError::MqttState(StateError::ServerDisconnect {
                reason_code,
                ..
            }))) => {
                assert_eq!(reason_code, DisconnectReasonCode::NotAuthorized);
                return Answer::DisconnectedNotAuthorized;
            }
            Ok(Err(_)) => return Answer::Closed,
            Err(_) => panic!("no answer within 10 s"),
        }
    }
}

/// dev-x, logged in, publishes `payload` on `topic`: the broker's answer.
async fn publish_as_dev_x(
    port: u16,
    pw_x: &str,
    topic: &str,
    retain: bool,
    payload: &[u8],
) -> Answer {
    let (c, mut el) = AsyncClient::new(options("dev-x", port, Some(("dev-x", pw_x))), 10);
    connect(&mut el).await.expect("dev-x connects");
    c.publish(topic, QoS::AtLeastOnce, retain, payload.to_vec())
        .await
        .unwrap();
    answer(&mut el).await
}

/// How `door` refuses a device what its ACL does not allow: Mosquitto
/// answers the packet with a refusal, the embedded broker disconnects.
fn assert_refused(door: Door, a: Answer) {
    match door {
        Door::Mosquitto => assert_eq!(a, Answer::Refused),
        Door::Embedded => assert_eq!(a, Answer::DisconnectedNotAuthorized),
    }
}

/// The retained payload on `topic`, read with the controller's login.
async fn retained(port: u16, controller_pw: &str, topic: &str) -> Vec<u8> {
    retained_with(
        options(
            &format!("check-{}", std::process::id()),
            port,
            Some(("controller", controller_pw)),
        ),
        topic,
    )
    .await
}

/// The retained payload on `topic`, read by a client with options `o`.
async fn retained_with(o: MqttOptions, topic: &str) -> Vec<u8> {
    let (c, mut el) = AsyncClient::new(o, 10);
    connect(&mut el).await.expect("the controller connects");
    c.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), el.poll())
            .await
            .expect("retained message within 10 s")
            .unwrap();
        if let Event::Incoming(Packet::Publish(p)) = ev {
            let _ = c.disconnect().await;
            return p.payload.to_vec();
        }
    }
}

fn wait_status(broker: &str, data: &Path, what: &str, ok: impl Fn(&[serde_json::Value]) -> bool) {
    let (within, every) = (Duration::from_secs(60), Duration::from_millis(300));
    wait_until(
        what,
        within,
        every,
        || status_json_in(broker, data),
        |s| ok(s),
    );
}

/// What an operator does after `mosquitto-conf` (the README says so): a
/// Mosquitto started as root drops to its own user before it reads the
/// password and ACL files, so they (and here the temporary directory) must be
/// that user's.
fn give_to_mosquitto(dir: &Path) {
    let root = std::process::Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&root.stdout).trim() != "0" {
        return;
    }
    let ok = std::process::Command::new("chown")
        .arg("mosquitto")
        .arg(dir)
        .arg(dir.join("passwords"))
        .arg(dir.join("acl"))
        .status()
        .unwrap()
        .success();
    assert!(ok, "chown mosquitto");
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Door {
    Embedded,
    Mosquitto,
}

fn locked_down_fleet(door: Door) {
    let fw = tempfile::tempdir().unwrap();
    std::fs::write(fw.path().join("app-1.1.0.bin"), image("1.1.0", 64 * 1024)).unwrap();
    let data = tempfile::tempdir().unwrap();
    let d = data.path();
    let pw_a = add_device(d, "dev-a");
    let pw_b = add_device(d, "dev-b");
    let pw_x = add_device(d, "dev-x");

    let mosquitto_dir = tempfile::tempdir().unwrap();
    let (_mosquitto, serve) = match door {
        Door::Embedded => (None, Serve::start(fw.path(), d, None)),
        Door::Mosquitto => {
            let port = free_port();
            let (ok, _, err) = mqota(&[
                "broker",
                "mosquitto-conf",
                "--out",
                mosquitto_dir.path().to_str().unwrap(),
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
                d.to_str().unwrap(),
            ]);
            assert!(ok, "mosquitto-conf: {err}");
            let conf = mosquitto_dir.path().join("mosquitto.conf");
            give_to_mosquitto(mosquitto_dir.path());
            let m = Mosquitto::start_with_config(&conf, port);
            let url = format!("mqtt://127.0.0.1:{port}");
            (Some(m), Serve::start(fw.path(), d, Some(&url)))
        }
    };
    let broker = serve.broker.clone();
    let api = controller_support::get_json(&format!("{}/api/broker", serve.http));
    match door {
        Door::Embedded => {
            assert_eq!(api["anonymous"], false, "{api}");
            assert_eq!(api["topic_rules"], true, "{api}");
        }
        Door::Mosquitto => assert_eq!(api["broker"], "external", "{api}"),
    }
    let port: u16 = broker.rsplit(':').next().unwrap().parse().unwrap();
    let controller_pw = std::fs::read_to_string(d.join("credentials/controller.password"))
        .unwrap()
        .trim()
        .to_owned();

    // dev-a runs in this test; dev-b is `mqota sim --credentials DIR`, the
    // way a fleet of simulated devices finds its logins.
    let devices = start_devices(vec![device("dev-a", port, &pw_a)]);
    let sim = std::process::Command::new(controller_support::MQOTA)
        .args(["sim", "--broker", &broker, "--id", "dev-b", "--credentials"])
        .arg(d.join("credentials"))
        .env("MQOTA_CONFIG", "/dev/null")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let sim = KillOnDrop(sim);
    wait_status(&broker, d, "saw dev-a and dev-b online", |s| {
        s.iter().filter(|v| v["online"] == true).count() == 2
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let b_status = retained(port, &controller_pw, "device/dev-b/status").await;
        assert!(String::from_utf8_lossy(&b_status).contains("\"dev-b\""));

        // Anonymous, unknown user, wrong password: refused at CONNECT.
        for (what, login) in [
            ("anonymous", None),
            ("an unknown user", Some(("nobody", pw_x.as_str()))),
            ("a wrong password", Some(("dev-x", "not-the-password"))),
            ("another device's password", Some(("dev-x", pw_a.as_str()))),
        ] {
            let (_c, mut el) = AsyncClient::new(options("dev-x", port, login), 10);
            match connect(&mut el).await {
                Err(ConnectionError::ConnectionRefused(code)) => {
                    if door == Door::Embedded {
                        let want = if login.is_none() {
                            ConnectReturnCode::NotAuthorized
                        } else {
                            ConnectReturnCode::BadUserNamePassword
                        };
                        assert_eq!(code, want, "{what}");
                    }
                }
                other => panic!("{door:?}: {what} was not refused: {other:?}"),
            }
        }
        // The same at MQTT 3.1.1.
        {
            let mut o = rumqttc::MqttOptions::new("dev-x", "127.0.0.1", port);
            o.set_keep_alive(Duration::from_secs(5));
            let (_c, mut el) = rumqttc::AsyncClient::new(o, 10);
            let r = tokio::time::timeout(Duration::from_secs(10), el.poll())
                .await
                .unwrap();
            assert!(
                matches!(r, Err(rumqttc::ConnectionError::ConnectionRefused(_))),
                "{door:?}: anonymous 3.1.1 client: {r:?}"
            );
        }

        // dev-x with its own password but dev-b's client id (to take over
        // dev-b's session), and dev-x with a will on dev-b's availability.
        if door == Door::Embedded {
            let (_c, mut el) = AsyncClient::new(options("dev-b", port, Some(("dev-x", &pw_x))), 10);
            match connect(&mut el).await {
                Err(ConnectionError::ConnectionRefused(code)) => {
                    assert_eq!(code, ConnectReturnCode::ClientIdentifierNotValid)
                }
                other => panic!("another device's client id was let in: {other:?}"),
            }
        }
        {
            let mut o = options("dev-x", port, Some(("dev-x", &pw_x)));
            o.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
                "device/dev-b/availability",
                "offline",
                QoS::AtLeastOnce,
                true,
                None,
            ));
            let (_c, mut el) = AsyncClient::new(o, 10);
            match connect(&mut el).await {
                Err(ConnectionError::ConnectionRefused(code)) => {
                    assert_eq!(code, ConnectReturnCode::NotAuthorized)
                }
                // Mosquitto takes the CONNECT and checks the will when it
                // would publish it: dropping the connection must not make
                // dev-b look offline.
                Ok(()) if door == Door::Mosquitto => drop(el),
                other => panic!("a will on another device's topic was let in: {other:?}"),
            }
        }

        // The same forgery at MQTT 3.1.1, which has no way to say no:
        // Mosquitto acknowledges and drops it, the embedded broker closes
        // the connection. Either way dev-b's status stays.
        {
            let mut o = rumqttc::MqttOptions::new("dev-x", "127.0.0.1", port);
            o.set_keep_alive(Duration::from_secs(5));
            o.set_credentials("dev-x", pw_x.as_str());
            let (c, mut el) = rumqttc::AsyncClient::new(o, 10);
            c.publish(
                "device/dev-b/status",
                rumqttc::QoS::AtLeastOnce,
                true,
                br#"{"device":"dev-b","version":"3.1.1"}"#.to_vec(),
            )
            .await
            .unwrap();
            let mut connected = false;
            let outcome = loop {
                match tokio::time::timeout(Duration::from_secs(10), el.poll())
                    .await
                    .expect("an answer within 10 s")
                {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => connected = true,
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => break "acked",
                    Ok(_) => continue,
                    Err(e) => {
                        assert!(connected, "{door:?}: dev-x not let in at 3.1.1: {e}");
                        break "closed";
                    }
                }
            };
            let want = match door {
                Door::Mosquitto => "acked",
                Door::Embedded => "closed",
            };
            assert_eq!(outcome, want, "{door:?} at 3.1.1");
            assert_eq!(
                retained(port, &controller_pw, "device/dev-b/status").await,
                b_status,
                "{door:?}: dev-b's retained status changed at 3.1.1"
            );
        }

        // dev-x, logged in, forges dev-b's retained status.
        let forged = br#"{"device":"dev-b","version":"6.6.6"}"#;
        let a = publish_as_dev_x(port, &pw_x, "device/dev-b/status", true, forged).await;
        assert_refused(door, a);
        assert_eq!(
            retained(port, &controller_pw, "device/dev-b/status").await,
            b_status,
            "{door:?}: dev-b's retained status changed"
        );

        // dev-x sends a command to itself (only the controller may).
        let a = publish_as_dev_x(port, &pw_x, "device/dev-x/ota/rollback", false, b"{}").await;
        assert_refused(door, a);

        // dev-x subscribes to dev-b's commands, then to its own; the
        // controller sends dev-b a cancel and then dev-x one. dev-x must see
        // its own and never dev-b's (on the embedded broker it is
        // disconnected at the first SUBSCRIBE).
        let (c, mut el) = AsyncClient::new(options("dev-x", port, Some(("dev-x", &pw_x))), 10);
        connect(&mut el).await.expect("dev-x connects");
        c.subscribe("device/dev-b/ota/cancel", QoS::AtLeastOnce)
            .await
            .unwrap();
        let a = answer(&mut el).await;
        match door {
            Door::Mosquitto => {
                c.subscribe("device/dev-x/ota/cancel", QoS::AtLeastOnce)
                    .await
                    .unwrap();
                assert_eq!(answer(&mut el).await, Answer::Granted);
                let (ctl, mut ctl_el) = AsyncClient::new(
                    options("ctl-test", port, Some(("controller", &controller_pw))),
                    10,
                );
                connect(&mut ctl_el).await.unwrap();
                for topic in ["device/dev-b/ota/cancel", "device/dev-x/ota/cancel"] {
                    ctl.publish(topic, QoS::AtLeastOnce, false, br#"{"job":"j"}"#.to_vec())
                        .await
                        .unwrap();
                    assert_eq!(answer(&mut ctl_el).await, Answer::Granted);
                }
                let first = loop {
                    match tokio::time::timeout(Duration::from_secs(10), el.poll())
                        .await
                        .expect("dev-x's own cancel arrives")
                        .unwrap()
                    {
                        Event::Incoming(Packet::Publish(p)) => break p.topic,
                        _ => continue,
                    }
                };
                assert_eq!(&first[..], b"device/dev-x/ota/cancel");
                // Mosquitto 2.0.11 grants the SUBSCRIBE (its SUBACK says
                // success) and checks the ACL on every message it would
                // deliver, which is what the lines above prove.
                assert!(matches!(a, Answer::Granted | Answer::Refused), "{a:?}");
            }
            Door::Embedded => assert_eq!(a, Answer::DisconnectedNotAuthorized),
        }
    });

    // The devices with their own logins update end to end through the
    // controller, which uses its own login from the data directory.
    let (ok, out, err) = mqota(&[
        "deploy",
        "app-1.1.0.bin",
        "--to",
        "dev-a",
        "--timeout",
        "60",
        "--wait",
        "--server",
        &serve.http,
        "--broker",
        &broker,
        "--data-dir",
        d.to_str().unwrap(),
    ]);
    assert!(ok, "{door:?}: deploy failed: {out}\n{err}");
    wait_status(&broker, d, "saw dev-a on 1.1.0", |s| {
        s.iter()
            .any(|v| v["device"] == "dev-a" && v["version"] == "1.1.0" && v["online"] == true)
    });
    // No forged status or will reached dev-b: on 1.0.0 and online.
    let s = status_json_in(&broker, d);
    assert!(
        s.iter()
            .any(|v| v["device"] == "dev-b" && v["version"] == "1.0.0" && v["online"] == true),
        "{door:?}: {s:#?}"
    );
    for text in [&out, &err] {
        for pw in [&pw_a, &pw_b, &pw_x, &controller_pw] {
            assert!(!text.contains(pw.as_str()), "a password was printed");
        }
    }
    drop(devices);
    let mut sim = sim;
    let out = sim.wait_with_output_ref();
    assert!(!out.contains(&pw_b), "sim printed its password");
}

/// A child process killed when dropped (a failing test leaves none behind).
struct KillOnDrop(std::process::Child);

impl KillOnDrop {
    /// Kills it (if still running) and returns its stderr.
    fn wait_with_output_ref(&mut self) -> String {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let mut err = String::new();
        if let Some(mut e) = self.0.stderr.take() {
            use std::io::Read as _;
            let _ = e.read_to_string(&mut err);
        }
        err
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn mosquitto_with_the_written_conf_refuses_strangers_and_holds_devices_to_their_topics() {
    locked_down_fleet(Door::Mosquitto);
}

#[test]
fn the_embedded_broker_refuses_strangers_and_disconnects_a_device_leaving_its_topics() {
    locked_down_fleet(Door::Embedded);
}

#[test]
fn device_logins_are_listed_without_passwords_made_once_and_removed() {
    let data = tempfile::tempdir().unwrap();
    let d = data.path();
    let dir = d.to_str().unwrap();
    let pw = add_device(d, "dev-1");
    let (ok, _, err) = mqota(&["device", "add", "dev-1", "--data-dir", dir]);
    assert!(!ok && err.contains("already has MQTT credentials"), "{err}");
    let (ok, _, err) = mqota(&["device", "add", "controller", "--data-dir", dir]);
    assert!(!ok && err.contains("controller's user name"), "{err}");
    let (ok, _, err) = mqota(&["device", "add", "a/b", "--data-dir", dir]);
    assert!(!ok && err.contains("bad device id"), "{err}");
    let (ok, out, err) = mqota(&["device", "add", "dev-2", "--print", "--data-dir", dir]);
    assert!(ok, "{err}");
    let printed = out.trim();
    let file = std::fs::read_to_string(d.join("credentials/dev-2.password")).unwrap();
    assert_eq!(
        printed,
        file.trim(),
        "--print prints the password in the file"
    );

    let (ok, out, _) = mqota(&["device", "list", "--data-dir", dir]);
    assert!(ok);
    assert!(
        out.contains("dev-1\tdevice") && out.contains("dev-2\tdevice"),
        "{out}"
    );
    assert!(
        !out.contains(&pw) && !out.contains('$'),
        "list shows a secret: {out}"
    );

    let (ok, _, err) = mqota(&["device", "remove", "dev-1", "--data-dir", dir]);
    assert!(ok, "{err}");
    assert!(!d.join("credentials/dev-1.password").exists());
    let (ok, _, err) = mqota(&["device", "remove", "dev-1", "--data-dir", dir]);
    assert!(!ok && err.contains("has no MQTT credentials"), "{err}");
    let (_, out, _) = mqota(&["device", "list", "--data-dir", dir]);
    assert!(!out.contains("dev-1"), "{out}");
}

#[test]
fn without_device_logins_on_loopback_the_embedded_door_is_open_and_says_so() {
    let fw = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start(fw.path(), data.path(), None);
    let api = controller_support::get_json(&format!("{}/api/broker", serve.http));
    assert_eq!(api["anonymous"], true, "{api}");
    assert_eq!(api["topic_rules"], false, "{api}");
    assert!(api["why"].as_str().unwrap().contains("no device"), "{api}");
}

// ---------------------------------------------------------------------------
// Certificates: `mqota ca`, Mosquitto in certificate mode, the embedded
// broker's TLS listener, serve over HTTPS.

/// The fleet of the TLS tests: a CA made by `mqota ca init` in `data`, a
/// server certificate for `localhost` only (so 127.0.0.1 is "the wrong
/// name"), device certificates for dev-a, dev-b and dev-x, and dev-x's
/// twin from another CA.
struct CertFleet {
    data: tempfile::TempDir,
    other: tempfile::TempDir,
    /// Everything `mqota` printed while making them.
    printed: String,
}

impl CertFleet {
    fn new() -> Self {
        let data = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let mut printed = String::new();
        let mut run = |args: &[&str]| {
            let (ok, out, err) = mqota(args);
            assert!(ok, "{args:?}: {err}");
            printed.push_str(&out);
            printed.push_str(&err);
            out
        };
        let d = data.path().to_str().unwrap();
        run(&["ca", "init", "--data-dir", d]);
        run(&[
            "ca",
            "issue",
            "server",
            "--host",
            "localhost",
            "--data-dir",
            d,
        ]);
        for id in ["dev-a", "dev-b", "dev-x"] {
            run(&["ca", "issue", "device", id, "--data-dir", d]);
        }
        let o = other.path().to_str().unwrap();
        run(&["ca", "init", "--data-dir", o]);
        run(&["ca", "issue", "device", "dev-x", "--data-dir", o]);
        Self {
            data,
            other,
            printed,
        }
    }

    fn d(&self) -> &Path {
        self.data.path()
    }

    fn ca(&self) -> std::path::PathBuf {
        self.d().join("ca/ca.pem")
    }

    /// A device's certificate and key (`other`: from the other CA).
    fn device(&self, id: &str, other: bool) -> mqota_controller::tls::ClientCert {
        let root = if other { self.other.path() } else { self.d() };
        mqota_controller::tls::ClientCert {
            cert: root.join(format!("ca/devices/{id}.pem")),
            key: root.join(format!("ca/devices/{id}.key")),
        }
    }

    fn controller(&self) -> mqota_controller::tls::ClientCert {
        mqota_controller::tls::ClientCert {
            cert: self.d().join("ca/controller.pem"),
            key: self.d().join("ca/controller.key"),
        }
    }

    /// Every private key file the CAs wrote.
    fn keys(&self) -> Vec<std::path::PathBuf> {
        let mut keys = Vec::new();
        for root in [self.d(), self.other.path()] {
            for dir in ["ca", "ca/devices", "ca/servers"] {
                let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
                    continue;
                };
                for e in entries {
                    let p = e.unwrap().path();
                    if p.extension().is_some_and(|x| x == "key") {
                        keys.push(p);
                    }
                }
            }
        }
        keys
    }

    /// Asserts that no line of any private key's PEM body is in `text`.
    fn assert_no_key_material(&self, text: &str) {
        for k in self.keys() {
            let pem = std::fs::read_to_string(&k).unwrap();
            for line in pem.lines().filter(|l| !l.starts_with("-----")) {
                assert!(
                    !text.contains(line),
                    "key material of {} was printed",
                    k.display()
                );
            }
        }
    }
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// MQTT 5 options over TLS to `host:port`, pinning `ca`, presenting `cert`.
fn tls_options(
    client_id: &str,
    host: &str,
    port: u16,
    ca: &Path,
    cert: Option<&mqota_controller::tls::ClientCert>,
) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, host, port);
    o.set_keep_alive(Duration::from_secs(5));
    let config = mqota_controller::tls::mqtt_client(ca, cert).unwrap();
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(config),
    ));
    o
}

/// `mosquitto_pub` over TLS with a client certificate (MQTT 3.1.1, QoS 1).
fn mosquitto_pub_tls(
    port: u16,
    ca: &Path,
    cert: &mqota_controller::tls::ClientCert,
    id: &str,
    topic: &str,
    payload: &str,
) -> std::process::Output {
    std::process::Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", &port.to_string(), "-q", "1", "-r"])
        .args(["-i", id, "-t", topic, "-m", payload])
        .arg("--cafile")
        .arg(ca)
        .arg("--cert")
        .arg(&cert.cert)
        .arg("--key")
        .arg(&cert.key)
        .output()
        .expect("mosquitto_pub (apt-get install mosquitto-clients)")
}

#[test]
fn the_fleet_ca_is_made_once_and_issues_certificates_openssl_accepts_for_their_purpose() {
    let f = CertFleet::new();
    let d = f.d().to_str().unwrap();
    for k in f.keys() {
        assert_eq!(mode(&k), 0o600, "{}", k.display());
    }
    f.assert_no_key_material(&f.printed);

    // A second init leaves the CA as it was.
    let key_before = std::fs::read(f.d().join("ca/ca.key")).unwrap();
    let (ok, _, err) = mqota(&["ca", "init", "--data-dir", d]);
    assert!(!ok && err.contains("exists already"), "{err}");
    assert_eq!(std::fs::read(f.d().join("ca/ca.key")).unwrap(), key_before);
    // A device certificate is not replaced by accident.
    let (ok, _, err) = mqota(&["ca", "issue", "device", "dev-a", "--data-dir", d]);
    assert!(!ok && err.contains("--force"), "{err}");
    let (ok, _, err) = mqota(&["ca", "issue", "device", "a/b", "--data-dir", d]);
    assert!(!ok && err.contains("bad device id"), "{err}");
    let empty = tempfile::tempdir().unwrap();
    let (ok, _, err) = mqota(&[
        "ca",
        "issue",
        "device",
        "dev-1",
        "--data-dir",
        empty.path().to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("mqota ca init"), "{err}");

    // What a firmware build needs, as shell lines that read the files.
    let (ok, out, err) = mqota(&["ca", "issue", "device", "dev-c", "--data-dir", d]);
    assert!(ok, "{err}");
    let key = f.d().join("ca/devices/dev-c.key");
    assert!(out.contains("export MQOTA_DEVICE_ID=dev-c\n"), "{out}");
    assert!(
        out.contains(&format!(
            "export MQOTA_TLS_KEY=\"$(cat {})\"",
            key.display()
        )),
        "{out}"
    );
    assert!(out.contains("export MQOTA_TLS_CA=") && out.contains("export MQOTA_TLS_CERT="));
    // The lines work in a shell and give the PEM texts.
    let sh = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{out}\nprintf %s \"$MQOTA_TLS_KEY\""))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&sh.stdout).trim(),
        std::fs::read_to_string(&key).unwrap().trim()
    );
    f.assert_no_key_material(&(out + &err));

    // OpenSSL: chains, subjects and purposes.
    let openssl = |args: &[&str]| {
        let o = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl");
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
        )
    };
    let ca = f.ca();
    let ca = ca.to_str().unwrap();
    let dev = f.device("dev-a", false).cert;
    let dev = dev.to_str().unwrap();
    let server = f.d().join("ca/servers/localhost.pem");
    let server = server.to_str().unwrap();
    let (ok, out) = openssl(&["verify", "-CAfile", ca, "-purpose", "sslclient", dev]);
    assert!(ok, "{out}");
    let (ok, out) = openssl(&["verify", "-CAfile", ca, "-purpose", "sslserver", server]);
    assert!(ok, "{out}");
    // Each leaf is good for its own purpose only.
    let (ok, _) = openssl(&["verify", "-CAfile", ca, "-purpose", "sslserver", dev]);
    assert!(!ok, "a device certificate passes as a server's");
    let (ok, _) = openssl(&["verify", "-CAfile", ca, "-purpose", "sslclient", server]);
    assert!(!ok, "a server certificate passes as a client's");
    // Another CA's certificate does not chain to this one.
    let foreign = f.device("dev-x", true).cert;
    let (ok, _) = openssl(&["verify", "-CAfile", ca, foreign.to_str().unwrap()]);
    assert!(!ok);
    let (_, text) = openssl(&["x509", "-in", dev, "-noout", "-subject", "-text"]);
    assert!(
        text.contains("CN = dev-a") || text.contains("CN=dev-a"),
        "{text}"
    );
    assert!(
        text.contains("prime256v1") || text.contains("P-256"),
        "{text}"
    );
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    let (_, text) = openssl(&["x509", "-in", ca, "-noout", "-text"]);
    assert!(
        text.contains("CA:TRUE") && text.contains("pathlen:0"),
        "{text}"
    );
    let (_, text) = openssl(&["x509", "-in", server, "-noout", "-text"]);
    assert!(text.contains("DNS:localhost"), "{text}");
}

/// What both doors must do with certificates: the right device certificate
/// gets in (rumqttc and mosquitto_pub); another CA's, none at all, and a
/// server reached by a name its certificate does not hold are refused; a
/// device publishing on another's status is refused and the status stays.
async fn certificate_door(door: Door, port: u16, f: &CertFleet) {
    let ca = f.ca();
    // Devices publish their own retained status.
    for id in ["dev-a", "dev-b"] {
        let (c, mut el) = AsyncClient::new(
            tls_options(id, "localhost", port, &ca, Some(&f.device(id, false))),
            10,
        );
        connect(&mut el)
            .await
            .unwrap_or_else(|e| panic!("{door:?}: {id} with its certificate: {e:?}"));
        c.publish(
            format!("device/{id}/status"),
            QoS::AtLeastOnce,
            true,
            serde_json::to_vec(&serde_json::json!({
                "device": id, "chip": "esp32c3", "project": "fleet", "version": "1.0.0",
                "slot": 0, "state": "valid", "last": null
            }))
            .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(answer(&mut el).await, Answer::Granted, "{door:?}: {id}");
        let _ = c.disconnect().await;
    }
    let controller = tls_options("ctl-check", "localhost", port, &ca, Some(&f.controller()));
    let b_status = retained_with(controller.clone(), "device/dev-b/status").await;
    assert!(String::from_utf8_lossy(&b_status).contains("dev-b"));

    // An independent client with the same files.
    let out = mosquitto_pub_tls(
        port,
        &ca,
        &f.device("dev-a", false),
        "dev-a",
        "device/dev-a/status",
        &serde_json::json!({
            "device": "dev-a", "chip": "esp32c3", "project": "fleet", "version": "1.0.1",
            "slot": 0, "state": "valid", "last": null
        })
        .to_string(),
    );
    assert!(
        out.status.success(),
        "{door:?}: mosquitto_pub with dev-a's certificate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a_status = retained_with(controller.clone(), "device/dev-a/status").await;
    assert!(String::from_utf8_lossy(&a_status).contains("1.0.1"));

    // Another CA's certificate (same CN as a real device).
    let (_c, mut el) = AsyncClient::new(
        tls_options(
            "dev-x",
            "localhost",
            port,
            &ca,
            Some(&f.device("dev-x", true)),
        ),
        10,
    );
    let r = connect(&mut el).await;
    assert!(
        matches!(
            r,
            Err(ConnectionError::Tls(_) | ConnectionError::Io(_) | ConnectionError::MqttState(_))
        ),
        "{door:?}: another CA's certificate: {r:?}"
    );
    // No certificate, no login.
    let (_c, mut el) = AsyncClient::new(tls_options("dev-x", "localhost", port, &ca, None), 10);
    match connect(&mut el).await {
        // The embedded broker takes TLS without a certificate (password
        // logins), then refuses the anonymous CONNECT.
        Err(ConnectionError::ConnectionRefused(code)) if door == Door::Embedded => {
            assert_eq!(code, ConnectReturnCode::NotAuthorized)
        }
        // Mosquitto requires the certificate in the handshake.
        Err(ConnectionError::Tls(_) | ConnectionError::Io(_) | ConnectionError::MqttState(_))
            if door == Door::Mosquitto => {}
        other => panic!("{door:?}: an anonymous TLS client: {other:?}"),
    }
    // A broker reached by a name its certificate does not hold.
    let (_c, mut el) = AsyncClient::new(
        tls_options(
            "dev-a",
            "127.0.0.1",
            port,
            &ca,
            Some(&f.device("dev-a", false)),
        ),
        10,
    );
    match connect(&mut el).await {
        Err(ConnectionError::Tls(e)) => {
            assert!(format!("{e:?}").contains("NotValidForName"), "{e:?}")
        }
        other => panic!("{door:?}: a certificate for another name was accepted: {other:?}"),
    }
    // Plain MQTT on the TLS port.
    let (_c, mut el) = AsyncClient::new(options("dev-a", port, None), 10);
    assert!(connect(&mut el).await.is_err(), "{door:?}: plain MQTT");

    // dev-a, with its own certificate, forges dev-b's retained status;
    // and (embedded broker) connects under dev-b's client id.
    let (c, mut el) = AsyncClient::new(
        tls_options(
            "dev-a",
            "localhost",
            port,
            &ca,
            Some(&f.device("dev-a", false)),
        ),
        10,
    );
    connect(&mut el).await.expect("dev-a connects");
    c.publish(
        "device/dev-b/status",
        QoS::AtLeastOnce,
        true,
        br#"{"device":"dev-b","version":"6.6.6"}"#.to_vec(),
    )
    .await
    .unwrap();
    let a = answer(&mut el).await;
    match door {
        Door::Mosquitto => assert_eq!(a, Answer::Refused),
        Door::Embedded => assert_eq!(a, Answer::DisconnectedNotAuthorized),
    }
    // The same at MQTT 3.1.1, which cannot say no: Mosquitto drops the
    // message, the embedded broker the connection; the status below stays
    // either way.
    mosquitto_pub_tls(
        port,
        &ca,
        &f.device("dev-a", false),
        "dev-a",
        "device/dev-b/status",
        r#"{"device":"dev-b","version":"7.7.7"}"#,
    );
    if door == Door::Embedded {
        let (_c, mut el) = AsyncClient::new(
            tls_options(
                "dev-b",
                "localhost",
                port,
                &ca,
                Some(&f.device("dev-a", false)),
            ),
            10,
        );
        match connect(&mut el).await {
            Err(ConnectionError::ConnectionRefused(code)) => {
                assert_eq!(code, ConnectReturnCode::ClientIdentifierNotValid)
            }
            other => panic!("dev-a's certificate under dev-b's client id: {other:?}"),
        }
    }
    assert_eq!(
        retained_with(controller, "device/dev-b/status").await,
        b_status,
        "{door:?}: dev-b's retained status changed"
    );
}

/// [`certificate_door`] through `door` on `port`; then the controller's own
/// client, through the CLI, sees both devices, and the CLI refuses a wrong
/// name and a missing CA.
fn through_the_door(door: Door, port: u16, f: &CertFleet) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(certificate_door(door, port, f));
    let s = status_over_tls(f, &format!("mqtts://localhost:{port}"));
    for (id, version) in [("dev-a", "1.0.1"), ("dev-b", "1.0.0")] {
        assert!(
            s.iter()
                .any(|v| v["device"] == id && v["version"] == version),
            "{id} on {version}: {s:#?}"
        );
    }
    cli_refuses_wrong_name_and_missing_ca(f, port);
}

/// `mqota status` over `mqtts://`, with the controller's certificate and
/// the fleet CA from the data directory.
fn status_over_tls(f: &CertFleet, broker: &str) -> Vec<serde_json::Value> {
    let (ok, out, err) = mqota(&[
        "status",
        "--json",
        "--broker",
        broker,
        "--data-dir",
        f.d().to_str().unwrap(),
    ]);
    assert!(ok, "status over {broker}: {err}");
    f.assert_no_key_material(&(out.clone() + &err));
    serde_json::from_str(&out).unwrap()
}

fn cli_refuses_wrong_name_and_missing_ca(f: &CertFleet, port: u16) {
    let (ok, _, err) = mqota(&[
        "status",
        "--broker",
        &format!("mqtts://127.0.0.1:{port}"),
        "--data-dir",
        f.d().to_str().unwrap(),
    ]);
    assert!(!ok, "status over a certificate for another name");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    let empty = tempfile::tempdir().unwrap();
    let (ok, _, err) = mqota(&[
        "status",
        "--broker",
        &format!("mqtts://localhost:{port}"),
        "--data-dir",
        empty.path().to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("--ca"), "{err}");
}

#[test]
fn mosquitto_in_certificate_mode_lets_in_only_the_fleet_and_holds_devices_to_their_topics() {
    let f = CertFleet::new();
    let d = f.d().to_str().unwrap();
    let port = free_port();
    let conf_dir = tempfile::tempdir().unwrap();
    let (ok, out, err) = mqota(&[
        "broker",
        "mosquitto-conf",
        "--tls",
        "--tls-cert",
        f.d().join("ca/servers/localhost.pem").to_str().unwrap(),
        "--tls-key",
        f.d().join("ca/servers/localhost.key").to_str().unwrap(),
        "--out",
        conf_dir.path().to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
        d,
    ]);
    assert!(ok, "mosquitto-conf --tls: {err}");
    f.assert_no_key_material(&(out + &err));
    let conf = std::fs::read_to_string(conf_dir.path().join("mosquitto.conf")).unwrap();
    for line in [
        "require_certificate true",
        "use_identity_as_username true",
        "allow_anonymous false",
    ] {
        assert!(conf.lines().any(|l| l == line), "{line}: {conf}");
    }
    let acl = std::fs::read_to_string(conf_dir.path().join("acl")).unwrap();
    assert!(acl.contains("pattern write device/%u/status") && !acl.contains("%c"));
    assert_eq!(mode(&conf_dir.path().join("server.key")), 0o600);
    // As the README says: the files are Mosquitto's user's.
    let root = std::process::Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&root.stdout).trim() == "0" {
        let ok = std::process::Command::new("chown")
            .arg("-R")
            .arg("mosquitto")
            .arg(conf_dir.path())
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
    let _m = Mosquitto::start_with_config(&conf_dir.path().join("mosquitto.conf"), port);

    through_the_door(Door::Mosquitto, port, &f);
}

#[test]
fn the_embedded_brokers_tls_listener_takes_certificates_as_logins_and_serve_speaks_https() {
    let f = CertFleet::new();
    let fw = tempfile::tempdir().unwrap();
    std::fs::write(fw.path().join("app-1.1.0.bin"), image("1.1.0", 64 * 1024)).unwrap();
    let cert = f.d().join("ca/servers/localhost.pem");
    let key = f.d().join("ca/servers/localhost.key");
    let serve = Serve::start_with(
        fw.path(),
        f.d(),
        None,
        "127.0.0.1:0",
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--mqtts-listen",
            "127.0.0.1:0",
        ],
    );
    f.assert_no_key_material(&serve.printed.join("\n"));
    let mqtts = serve
        .mqtts
        .clone()
        .expect("serve printed its mqtts listener");
    let port: u16 = mqtts.rsplit(':').next().unwrap().parse().unwrap();

    through_the_door(Door::Embedded, port, &f);

    // HTTPS: curl with the fleet CA gets the API and firmware URLs that say
    // https; without the CA (system roots), or in plain HTTP, it gets
    // nothing.
    assert!(serve.http.starts_with("https://"), "{}", serve.http);
    let http_port = serve.http.rsplit(':').next().unwrap();
    let curl = |args: &[&str]| {
        let o = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "10"])
            .args(args)
            .output()
            .expect("curl");
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    let base = format!("https://localhost:{http_port}");
    let ca = f.ca();
    let (code, body) = curl(&[
        "--cacert",
        ca.to_str().unwrap(),
        &format!("{base}/api/broker"),
    ]);
    assert_eq!(code, Some(0), "{body}");
    let door: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(door["anonymous"], false, "{door}");
    let (code, body) = curl(&[
        "--cacert",
        ca.to_str().unwrap(),
        &format!("{base}/api/firmware"),
    ]);
    assert_eq!(code, Some(0));
    assert!(
        body.contains(&format!("\"url\":\"{base}/firmware/app-1.1.0.bin\"")),
        "{body}"
    );
    let (code, _) = curl(&[
        "--cacert",
        ca.to_str().unwrap(),
        "-o",
        "/dev/null",
        &format!("{base}/firmware/app-1.1.0.bin"),
    ]);
    assert_eq!(code, Some(0), "firmware over HTTPS");
    let (code, _) = curl(&[&format!("{base}/api/broker")]);
    assert_ne!(code, Some(0), "trusted without the fleet CA");
    let (code, _) = curl(&[&format!("http://localhost:{http_port}/api/broker")]);
    assert_ne!(code, Some(0), "plain HTTP answered");
    let (code, _) = curl(&[
        "--cacert",
        ca.to_str().unwrap(),
        &format!("https://127.0.0.1:{http_port}/api/broker"),
    ]);
    assert_ne!(code, Some(0), "a certificate for another name was accepted");

    // `deploy --server https://…` reads serve's catalogue through the fleet
    // CA of the data directory; with another CA it refuses to.
    let deploy = |extra: &[&str]| {
        let mut args = vec![
            "deploy",
            "app-1.1.0.bin",
            "--to",
            "dev-a",
            "--dry-run",
            "--include-offline",
            "--allow-other-project",
            "--server",
            &base,
            "--broker",
            &serve.broker,
            "--data-dir",
            f.d().to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        mqota(&args)
    };
    // The catalogue was read, and the URL it gave is serve's https one;
    // dev-a's (hand-made) status does not say it speaks HTTPS, so deploy
    // leaves it out, naming the URL.
    let (ok, out, err) = deploy(&[]);
    assert!(!ok, "{out}");
    assert!(
        err.contains(&format!(
            "the firmware URL {base}/firmware/app-1.1.0.bin is https, and https is not enabled on dev-a"
        )),
        "{err}"
    );
    let other_ca = f.other.path().join("ca/ca.pem");
    let (ok, _, err) = deploy(&["--ca", other_ca.to_str().unwrap()]);
    assert!(!ok, "a server of another CA was trusted");
    assert!(err.contains("/api/firmware"), "{err}");
}

/// Without `--data-dir` or a config file, the data directory is the user's
/// (`$HOME/.local/share/mqota`, or under `XDG_DATA_HOME`); the config file
/// is read from the user's config directory and can name another.
#[test]
fn the_data_and_config_directories_default_to_the_users_own() {
    let home = tempfile::tempdir().unwrap();
    let run = |id: &str, xdg: Option<&Path>| {
        let mut c = std::process::Command::new(controller_support::MQOTA);
        c.args(["device", "add", id])
            .env("HOME", home.path())
            .env_remove("MQOTA_CONFIG")
            .env_remove("MQOTA_DATA_DIR")
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_DATA_HOME");
        if let Some(x) = xdg {
            c.env("XDG_DATA_HOME", x);
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run("dev-a", None);
    assert!(home
        .path()
        .join(".local/share/mqota/credentials/dev-a.password")
        .is_file());
    let xdg = home.path().join("xdg-data");
    run("dev-b", Some(&xdg));
    assert!(xdg.join("mqota/credentials/dev-b.password").is_file());
    // The config file in ~/.config/mqota names the data directory.
    let elsewhere = home.path().join("from-config");
    std::fs::create_dir_all(home.path().join(".config/mqota")).unwrap();
    std::fs::write(
        home.path().join(".config/mqota/config.toml"),
        format!("data_dir = {:?}\n", elsewhere.to_str().unwrap()),
    )
    .unwrap();
    run("dev-c", None);
    assert!(elsewhere.join("credentials/dev-c.password").is_file());
}

//! Logins and topic rules on both doors, against real peers: Mosquitto
//! started with what `mqota broker mosquitto-conf` wrote, and the embedded
//! broker of `mqota serve`. Devices get their logins from `mqota device add`;
//! the attackers are rumqttc clients (an MQTT implementation of its own,
//! neither the device's rust-mqtt nor the broker), one of them holding a
//! real device login (`dev-x`) and trying to act as another device.

mod controller_support;

use std::path::Path;
use std::time::{Duration, Instant};

use controller_support::{device_config, image, mqota, start_devices, Serve};
use mqota_virtual::device::{Password, VirtualConfig};
use mqota_virtual::testing::{free_port, Mosquitto};
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
                    PubAckReason::Success => Answer::Granted,
                    _ => Answer::Refused,
                }
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

/// The retained payload on `topic`, read with the controller's login.
async fn retained(port: u16, controller_pw: &str, topic: &str) -> Vec<u8> {
    let (c, mut el) = AsyncClient::new(
        options(
            &format!("check-{}", std::process::id()),
            port,
            Some(("controller", controller_pw)),
        ),
        10,
    );
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

fn status(broker: &str, data: &Path) -> Vec<serde_json::Value> {
    let (ok, out, err) = mqota(&[
        "status",
        "--json",
        "--broker",
        broker,
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(ok, "status failed: {err}");
    serde_json::from_str(&out).unwrap()
}

fn wait_status(broker: &str, data: &Path, what: &str, ok: impl Fn(&[serde_json::Value]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(broker, data);
        if ok(&s) {
            return;
        }
        assert!(Instant::now() < deadline, "never {what}: {s:#?}");
        std::thread::sleep(Duration::from_millis(300));
    }
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
        let (c, mut el) = AsyncClient::new(options("dev-x", port, Some(("dev-x", &pw_x))), 10);
        connect(&mut el).await.expect("dev-x connects");
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
        assert_eq!(
            retained(port, &controller_pw, "device/dev-b/status").await,
            b_status,
            "{door:?}: dev-b's retained status changed"
        );

        // dev-x sends a command to itself (only the controller may).
        let (c, mut el) = AsyncClient::new(options("dev-x", port, Some(("dev-x", &pw_x))), 10);
        connect(&mut el).await.expect("dev-x connects");
        c.publish(
            "device/dev-x/ota/rollback",
            QoS::AtLeastOnce,
            false,
            b"{}".to_vec(),
        )
        .await
        .unwrap();
        let a = answer(&mut el).await;
        match door {
            Door::Mosquitto => assert_eq!(a, Answer::Refused),
            Door::Embedded => assert_eq!(a, Answer::DisconnectedNotAuthorized),
        }

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
    let s = status(&broker, d);
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

//! The set-up of docs/SECURE-FLEET.md, end to end with the real binary: a
//! fleet CA; `serve` over HTTPS, with the embedded broker's TLS listener or
//! with Mosquitto run from the files `mqota broker mosquitto-conf --tls`
//! wrote; and a virtual device running the firmware's own TLS code
//! (embedded-tls) with its own certificate, updated over `mqtts://` with an
//! `https://` download. A device holding another CA's certificate never gets
//! in.

mod controller_support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use controller_support::{image, mqota, status_json_in, Serve, MQOTA};
use mqota_virtual::testing::wait_until;

/// `mqota sim` for one device over `mqtts://localhost:PORT` with the
/// certificates of `ca_dir` (a data directory's `ca/`); killed on drop.
struct Sim(Option<Child>);

impl Sim {
    fn start(id: &str, port: u16, ca: &Path, ca_dir: &Path) -> Self {
        let child = Command::new(MQOTA)
            .arg("sim")
            .args(["--broker", &format!("mqtts://localhost:{port}")])
            .args(["--id", id])
            .arg("--tls-ca")
            .arg(ca)
            .arg("--tls-cert")
            .arg(ca_dir.join(format!("devices/{id}.pem")))
            .arg("--tls-key")
            .arg(ca_dir.join(format!("devices/{id}.key")))
            .env_remove("MQOTA_BROKER")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mqota sim");
        Self(Some(child))
    }

    /// Stops it and returns what it printed.
    fn stop(mut self) -> String {
        let mut child = self.0.take().expect("running");
        let _ = child.kill();
        let out = child.wait_with_output().expect("mqota sim output");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `status` until `ok` holds for the device `id`, for at most 60 s.
fn wait_for(
    broker: &str,
    data: &Path,
    id: &str,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) {
    let (within, every) = (Duration::from_secs(60), Duration::from_millis(250));
    wait_until(
        &format!("{id} {what}"),
        within,
        every,
        || status_json_in(broker, data),
        |s| s.iter().any(|d| d["device"] == id && ok(d)),
    );
}

#[derive(Clone, Copy, Debug)]
enum Door {
    /// `serve --mqtts-listen`.
    Embedded,
    /// Mosquitto in certificate mode, configured by `mqota`.
    Mosquitto,
}

#[test]
fn through_the_embedded_brokers_tls_listener_a_fleet_device_updates_and_a_stranger_never_gets_in() {
    secure_update(Door::Embedded);
}

#[test]
fn through_mosquitto_in_certificate_mode_a_fleet_device_updates_and_a_stranger_never_gets_in() {
    secure_update(Door::Mosquitto);
}

/// Mosquitto started from `mqota broker mosquitto-conf --tls`, on `port`.
fn mosquitto(d: &Path, port: u16, conf_dir: &Path) -> mqota_virtual::testing::Mosquitto {
    let (ok, out, err) = mqota(&[
        "broker",
        "mosquitto-conf",
        "--tls",
        "--tls-cert",
        d.join("ca/servers/localhost.pem").to_str().unwrap(),
        "--tls-key",
        d.join("ca/servers/localhost.key").to_str().unwrap(),
        "--out",
        conf_dir.to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
        d.to_str().unwrap(),
    ]);
    assert!(ok, "mosquitto-conf --tls: {out}{err}");
    // As the README says: the files are Mosquitto's user's (it drops root).
    let root = Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&root.stdout).trim() == "0" {
        let ok = Command::new("chown")
            .arg("-R")
            .arg("mosquitto")
            .arg(conf_dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "chown mosquitto");
    }
    mqota_virtual::testing::Mosquitto::start_with_config(&conf_dir.join("mosquitto.conf"), port)
}

fn secure_update(door: Door) {
    let data = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let d = data.path();
    let run = |args: &[&str]| {
        let (ok, out, err) = mqota(args);
        assert!(ok, "{args:?}: {err}");
        out + &err
    };
    let mut printed = run(&["ca", "init", "--data-dir", d.to_str().unwrap()]);
    printed += &run(&[
        "ca",
        "issue",
        "server",
        "--host",
        "localhost",
        "--data-dir",
        d.to_str().unwrap(),
    ]);
    printed += &run(&[
        "ca",
        "issue",
        "device",
        "dev-tls",
        "--data-dir",
        d.to_str().unwrap(),
    ]);
    // A stranger: a certificate for a fleet id, from another CA.
    let o = other.path().to_str().unwrap();
    printed += &run(&["ca", "init", "--data-dir", o]);
    printed += &run(&["ca", "issue", "device", "dev-stranger", "--data-dir", o]);

    let fw = tempfile::tempdir().unwrap();
    std::fs::write(fw.path().join("app-1.1.0.bin"), image("1.1.0", 300 * 1024)).unwrap();
    // The device checks DNS names only: serve's firmware URLs must name
    // `localhost`, which its certificate carries.
    let http_port = mqota_virtual::testing::free_port();
    let public = format!("https://localhost:{http_port}");
    let cert = d.join("ca/servers/localhost.pem");
    let key = d.join("ca/servers/localhost.key");
    let conf_dir = tempfile::tempdir().unwrap();
    let mut args = vec![
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--public-url",
        &public,
    ];
    let http = format!("127.0.0.1:{http_port}");
    let (serve, port, _mosquitto) = match door {
        Door::Embedded => {
            args.extend(["--mqtts-listen", "127.0.0.1:0"]);
            let serve = Serve::start_with(fw.path(), d, None, &http, &args);
            let mqtts = serve
                .mqtts
                .clone()
                .expect("serve printed its mqtts listener");
            let port: u16 = mqtts.rsplit(':').next().unwrap().parse().unwrap();
            (serve, port, None)
        }
        Door::Mosquitto => {
            let port = mqota_virtual::testing::free_port();
            let m = mosquitto(d, port, conf_dir.path());
            let url = format!("mqtts://localhost:{port}");
            let serve = Serve::start_with(fw.path(), d, Some(&url), &http, &args);
            (serve, port, Some(m))
        }
    };
    let broker = format!("mqtts://localhost:{port}");

    let ca = d.join("ca/ca.pem");
    let device = Sim::start("dev-tls", port, &ca, &d.join("ca"));
    // The stranger trusts our CA (so it would accept the broker) but holds
    // a certificate our broker does not.
    let stranger = Sim::start("dev-stranger", port, &ca, &other.path().join("ca"));
    wait_for(
        &broker,
        d,
        "dev-tls",
        "came online over mqtts with https",
        |s| s["online"] == true && s["https"] == true && s["version"] == "1.0.0",
    );

    let (ok, out, err) = mqota(&[
        "deploy",
        "app-1.1.0.bin",
        "--to",
        "dev-tls",
        "--wait",
        "--timeout",
        "120",
        "--server",
        &public,
        "--broker",
        &broker,
        "--data-dir",
        d.to_str().unwrap(),
    ]);
    assert!(ok, "deploy over TLS failed:\n{out}\n{err}");
    printed += &out;
    printed += &err;
    wait_for(&broker, d, "dev-tls", "reported 1.1.0", |s| {
        s["version"] == "1.1.0" && s["online"] == true
    });

    // The stranger never reached the broker: no status, no availability.
    let s = status_json_in(&broker, d);
    assert!(
        !s.iter().any(|x| x["device"] == "dev-stranger"),
        "a device with another CA's certificate got in: {s:#?}"
    );
    let stranger_log = stranger.stop();
    printed += &device.stop();
    printed += &stranger_log;
    printed += &serve.printed.join("\n");

    // No key material in anything any command printed.
    for key in [
        d.join("ca/ca.key"),
        d.join("ca/devices/dev-tls.key"),
        d.join("ca/servers/localhost.key"),
    ] {
        let pem = std::fs::read_to_string(&key).unwrap();
        let body = pem.lines().nth(1).expect("a PEM body line");
        assert!(
            !printed.contains(body),
            "{} appeared in the output",
            key.display()
        );
    }
    assert!(
        !printed.contains("PRIVATE KEY"),
        "a private key was printed"
    );
}

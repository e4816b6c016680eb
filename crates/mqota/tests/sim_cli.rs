//! `mqota sim` refuses bad input before any virtual device starts: one line
//! on stderr naming the value and the rule, a non-zero exit, no connection to
//! the broker and no flash file written.

mod cli_support;

use cli_support::failure;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use mqota_core::partition::{PartitionTable, TABLE_OFFSET};
use mqota_virtual::device::FLASH_SIZE;

/// A broker address that records connection attempts: after `mqota sim`
/// exited, any device that tried to connect is waiting in the backlog.
struct Broker(TcpListener);

impl Broker {
    fn new() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        Broker(l)
    }

    fn url(&self) -> String {
        format!("mqtt://{}", self.0.local_addr().unwrap())
    }

    fn assert_untouched(&self) {
        match self.0.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("a device connected to the broker: {other:?}"),
        }
    }
}

/// Runs `mqota sim ARGS` against `broker`. A sim that accepted its input
/// runs until Ctrl-C; that is this test failing, so it is stopped (by its
/// pid) and reported instead of hanging the test run.
fn sim(broker: &Broker, args: &[&str]) -> Output {
    let url = broker.url();
    let mut all = vec!["--broker", url.as_str()];
    all.extend_from_slice(args);
    sim_with(&all)
}

/// The one error line of a refused run; the broker saw nothing.
fn refused(broker: &Broker, args: &[&str]) -> String {
    let err = failure(&sim(broker, args));
    broker.assert_untouched();
    err
}

#[test]
fn ids_that_are_not_one_topic_level_of_at_most_32_bytes_are_refused() {
    let broker = Broker::new();
    let long = "d".repeat(33);
    for id in ["a/b", "dev+1", "#", long.as_str()] {
        let err = refused(&broker, &["--id", id]);
        assert!(err.contains(&format!("bad --id {id:?}")), "{err}");
        assert!(err.contains("one topic level"), "{err}");
        assert!(err.contains("at most 32 bytes"), "{err}");
    }
}

#[test]
fn ids_made_with_devices_n_must_fit_too() {
    let broker = Broker::new();
    // 30 bytes: `-1` .. `-9` fit, `-10` is 33 bytes.
    let id = "d".repeat(30);
    let err = refused(&broker, &["--id", &id, "--devices", "10"]);
    assert!(err.contains(&format!("bad device id \"{id}-10\"")), "{err}");
    assert!(err.contains("--devices 10"), "{err}");
    assert!(err.contains("at most 32 bytes"), "{err}");
}

#[test]
fn first_and_step_number_the_devices_and_their_ids_must_fit_too() {
    let broker = Broker::new();
    // 28 bytes: ids `-9` and `-999` fit; the third device, `-1989`, does not.
    let id = "d".repeat(28);
    let args = [
        "--id",
        &id,
        "--devices",
        "3",
        "--first",
        "9",
        "--step",
        "990",
    ];
    let err = refused(&broker, &args);
    assert!(
        err.contains(&format!("bad device id \"{id}-1989\"")),
        "{err}"
    );
    let err = refused(&broker, &["--devices", "3", "--step", "0"]);
    assert!(err.contains("--step must be at least 1"), "{err}");
    let err = refused(&broker, &["--devices", "3", "--first", "4294967295"]);
    assert!(err.contains("numbers devices past"), "{err}");
}

#[test]
fn prefixes_no_device_could_use_are_refused() {
    let broker = Broker::new();
    let long = "p".repeat(mqota_core::protocol::MAX_PREFIX_LEN + 1);
    for prefix in [
        "",
        "a//b",
        "/device",
        "device/",
        "dev/+",
        "#",
        long.as_str(),
    ] {
        let err = refused(&broker, &["--prefix", prefix]);
        assert!(err.contains(&format!("bad --prefix {prefix:?}")), "{err}");
        assert!(err.contains("topic prefix"), "{err}");
    }
}

#[test]
fn a_version_longer_than_an_app_descriptor_holds_is_refused() {
    let broker = Broker::new();
    let dir = tempfile::tempdir().unwrap();
    let flash = dir.path().join("dev.flash");
    let version = "1.0.0-".to_owned() + &"x".repeat(27);
    assert_eq!(version.len(), 33);
    let err = refused(
        &broker,
        &["--version", &version, "--flash", flash.to_str().unwrap()],
    );
    assert!(err.contains(&format!("bad --version {version:?}")), "{err}");
    assert!(err.contains("at most 31 bytes"), "{err}");
    assert!(!flash.exists(), "a flash file was created");
}

fn flash_file(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn a_flash_file_of_the_wrong_size_is_refused_and_left_alone() {
    let broker = Broker::new();
    let dir = tempfile::tempdir().unwrap();
    let path = flash_file(dir.path(), "small.flash", &[0xFF; 1000]);
    let err = refused(&broker, &["--flash", path.to_str().unwrap()]);
    assert!(err.contains("small.flash"), "{err}");
    assert!(err.contains("1000 bytes"), "{err}");
    assert!(err.contains(&format!("{FLASH_SIZE} bytes")), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), [0xFF; 1000]);
}

#[test]
fn a_flash_file_without_a_usable_partition_table_is_refused() {
    let broker = Broker::new();
    let dir = tempfile::tempdir().unwrap();
    let blank = flash_file(dir.path(), "blank.flash", &vec![0xFF; FLASH_SIZE]);
    let err = refused(&broker, &["--flash", blank.to_str().unwrap()]);
    assert!(err.contains("blank.flash"), "{err}");
    assert!(err.contains("partition table"), "{err}");

    // A valid table, but nothing to update into.
    let table = PartitionTable::from_csv(
        "nvs, data, nvs, 0x9000, 0x6000,\nfactory, app, factory, 0x10000, 1M,\n",
    )
    .unwrap();
    let mut bytes = vec![0xFF; FLASH_SIZE];
    let at = TABLE_OFFSET as usize;
    let table = table.to_bytes();
    bytes[at..at + table.len()].copy_from_slice(&table);
    let factory = flash_file(dir.path(), "factory.flash", &bytes);
    let err = refused(&broker, &["--flash", factory.to_str().unwrap()]);
    assert!(err.contains("factory.flash"), "{err}");
    assert!(err.contains("two OTA slots"), "{err}");
    assert_eq!(std::fs::read(&factory).unwrap(), bytes);
}

#[test]
fn with_devices_n_every_existing_flash_file_is_checked_before_any_starts() {
    let broker = Broker::new();
    let dir = tempfile::tempdir().unwrap();
    flash_file(dir.path(), "sim-2.flash", &[0u8; 4096]);
    let err = refused(
        &broker,
        &["--devices", "3", "--flash", dir.path().to_str().unwrap()],
    );
    assert!(err.contains("sim-2.flash"), "{err}");
    assert!(!dir.path().join("sim-1.flash").exists());
}

#[test]
fn trust_takes_up_to_three_key_digests_and_nothing_else() {
    let broker = Broker::new();
    let digest = "ab".repeat(32);
    let err = refused(
        &broker,
        &[
            "--trust", &digest, "--trust", &digest, "--trust", &digest, "--trust", &digest,
        ],
    );
    assert!(err.contains("at most 3 keys"), "{err}");
    for bad in ["ab", "zz".repeat(32).as_str(), "a-key.pem"] {
        let out = sim(&broker, &["--trust", bad]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not a key digest"), "{err}");
        broker.assert_untouched();
    }
}

/// Runs `mqota sim ARGS` (which name their own `--broker`) until it exits
/// or 30 s pass.
fn sim_with(args: &[&str]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_mqota"))
        .arg("sim")
        .args(args)
        .env_remove("MQOTA_BROKER")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mqota");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(out) => out.expect("wait for mqota"),
        Err(_) => {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("mqota sim {args:?} started instead of refusing its input");
        }
    }
}

#[test]
fn an_mqtts_broker_without_a_fleet_ca_is_refused() {
    let broker = Broker::new();
    let url = format!("mqtts://{}", broker.0.local_addr().unwrap());
    let err = failure(&sim_with(&["--broker", &url, "--id", "dev-1"]));
    assert!(err.contains("--tls-ca"), "{err}");
    broker.assert_untouched();
}

#[test]
fn a_client_certificate_without_its_key_is_refused() {
    let broker = Broker::new();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "x").unwrap();
    let out = sim_with(&[
        "--broker",
        &broker.url(),
        "--tls-ca",
        ca.to_str().unwrap(),
        "--tls-cert",
        ca.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-key"));
    broker.assert_untouched();
}

/// The real binary, a TLS Mosquitto that requires client certificates, and
/// certificates from a fleet CA: the device comes online over `mqtts://`
/// and says `https: true`; its key file stays out of every line it prints.
#[tokio::test(flavor = "multi_thread")]
async fn sim_devices_reach_an_mqtts_broker_with_per_device_certificates() {
    use mqota_virtual::testing::{Mosquitto, TestPki};
    let pki = TestPki::new("fleet CA");
    let broker = Mosquitto::start_tls(&pki, &pki.server("localhost"));
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    std::fs::write(path("ca.pem"), &pki.ca_pem).unwrap();
    for id in ["dev-s-1", "dev-s-2"] {
        let issued = pki.client(id);
        std::fs::write(path(&format!("{id}.crt")), &issued.cert_pem).unwrap();
        std::fs::write(path(&format!("{id}.key")), &issued.key_pem).unwrap();
    }
    let obs = broker.observe("device/+/status").await;
    let url = format!("mqtts://localhost:{}", broker.tls_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_mqota"))
        .arg("sim")
        .args(["--broker", &url, "--id", "dev-s", "--devices", "2"])
        .args(["--tls-ca", path("ca.pem").to_str().unwrap()])
        .args(["--tls-cert", path("{id}.crt").to_str().unwrap()])
        .args(["--tls-key", path("{id}.key").to_str().unwrap()])
        .env_remove("MQOTA_BROKER")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mqota");
    let online = obs
        .wait_until(Duration::from_secs(30), |seen| {
            ["dev-s-1", "dev-s-2"].iter().all(|id| {
                seen.iter().any(|r| {
                    r.topic == format!("device/{id}/status")
                        && serde_json::from_slice::<serde_json::Value>(&r.payload)
                            .is_ok_and(|s| s["https"] == serde_json::Value::Bool(true))
                })
            })
        })
        .await;
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let printed =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(online, "devices never came online over mqtts: {printed}");
    assert!(printed.contains("mqtts://localhost"), "{printed}");
    let key = std::fs::read_to_string(path("dev-s-1.key")).unwrap();
    let body = key.lines().nth(1).unwrap();
    assert!(!printed.contains("PRIVATE KEY") && !printed.contains(body));
}

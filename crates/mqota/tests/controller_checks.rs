//! `mqota deploy` checks before it sends anything: an offline `--to` device
//! is refused unless `--include-offline`, `--all` skips offline devices and
//! says how many, an older image is refused unless `--allow-downgrade`, and
//! an image of another project unless `--allow-other-project`. Against a
//! real Mosquitto with retained statuses, the images on a file server, with
//! `--dry-run` so nothing is stored or sent.

mod controller_support;

use controller_support::mqota;
use mqota_core::image::{Chip, ImageBuilder};
use mqota_virtual::testing::{publish_to, FileServer, Mosquitto};

fn status(id: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "device": id, "chip": "esp32c3", "project": "fleet", "version": "1.0.0",
        "slot": 0, "state": "valid", "last": null
    }))
    .unwrap()
}

fn image(project: &str, version: &str) -> Vec<u8> {
    ImageBuilder::new(Chip::Esp32c3)
        .version(version)
        .project(project)
        .size(16 * 1024)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_refuses_offline_older_and_foreign_targets_unless_told() {
    let broker = Mosquitto::start();
    let port = broker.port();
    for (id, availability) in [("on", "online"), ("off", "offline")] {
        publish_to(port, &format!("device/{id}/status"), &status(id), true).await;
        let topic = format!("device/{id}/availability");
        publish_to(port, &topic, availability.as_bytes(), true).await;
    }
    let files = FileServer::start(&[
        ("new.bin", &image("fleet", "1.1.0")),
        ("old.bin", &image("fleet", "0.9.0")),
        ("foreign.bin", &image("other", "1.1.0")),
    ])
    .await;
    let data = tempfile::tempdir().unwrap();
    let broker_url = format!("mqtt://127.0.0.1:{port}");
    let data = data.path().to_str().unwrap().to_owned();
    let deploy = move |fw: &str, extra: &[&str]| {
        let mut args = vec![
            "deploy",
            fw,
            "--dry-run",
            "--broker",
            &broker_url,
            "--data-dir",
            &data,
            // The images come from this test's own server on loopback.
            "--allow-remote-firmware",
            "127.0.0.1",
        ];
        args.extend_from_slice(extra);
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        std::thread::spawn(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            mqota(&args)
        })
        .join()
        .unwrap()
    };
    let new = files.url("new.bin");

    let (ok, _, err) = deploy(&new, &["--to", "off"]);
    assert!(!ok, "an offline --to device must be refused");
    assert!(
        err.contains("offline: off") && err.contains("--include-offline"),
        "{err}"
    );
    let (ok, out, err) = deploy(&new, &["--to", "off", "--include-offline"]);
    assert!(ok, "{err}");
    assert!(out.contains("would go to 1 device"), "{out}");

    let (ok, out, err) = deploy(&new, &["--all"]);
    assert!(ok, "{err}");
    assert!(out.contains("1 offline device(s) skipped"), "{out}");
    assert!(out.contains("would go to 1 device in 1 stage: on"), "{out}");

    let old = files.url("old.bin");
    let (ok, _, err) = deploy(&old, &["--to", "on"]);
    assert!(!ok, "a downgrade must be refused");
    assert!(err.contains("--allow-downgrade"), "{err}");
    let (ok, out, err) = deploy(&old, &["--to", "on", "--allow-downgrade"]);
    assert!(ok, "{err}");
    assert!(out.contains("would go to 1 device"), "{out}");

    let foreign = files.url("foreign.bin");
    let (ok, _, err) = deploy(&foreign, &["--to", "on"]);
    assert!(!ok, "another project must be refused");
    assert!(err.contains("--allow-other-project"), "{err}");
    let (ok, _, err) = deploy(&foreign, &["--to", "on", "--allow-other-project"]);
    assert!(ok, "{err}");
}

//! `mqota logs` as an operator runs it: a virtual device (the real device
//! runtime) fails a job against a real Mosquitto, and the built binary prints
//! why from the device's field log, as text, as JSON, and from a record on.

mod controller_support;

use std::time::Duration;

use controller_support::{device_config, image, mqota, start_devices};
use mqota_virtual::testing::{publish_to, wait_until, Fault, FaultServer, Mosquitto};

/// Runs `mqota logs ARGS` until its output satisfies `check`.
fn logs_until(args: &[&str], what: &str, check: impl Fn(&str) -> bool) -> String {
    let (within, every) = (Duration::from_secs(60), Duration::from_millis(300));
    let (_, out, _) = wait_until(
        what,
        within,
        every,
        || mqota(args),
        |(ok, out, _)| *ok && check(out),
    );
    out
}

#[test]
fn logs_prints_why_a_job_failed_as_text_and_json_and_from_a_record_on() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let broker = Mosquitto::start();
    let url = format!("mqtt://127.0.0.1:{}", broker.port());
    let server = rt.block_on(FaultServer::start(image("1.1.0", 4096), Fault::NotFound));
    let _devices = start_devices(vec![device_config("cli-log", broker.port())]);

    let base = ["logs", "cli-log", "--broker", url.as_str()];
    logs_until(&base, "showed the boot", |o| o.contains("boot 1: power_on"));
    let job = serde_json::json!({"url": server.url(), "job": "cli-404"}).to_string();
    rt.block_on(publish_to(
        broker.port(),
        "device/cli-log/ota/start",
        job.as_bytes(),
        false,
    ));
    let text = logs_until(&base, "showed the failure", |o| {
        o.contains("job cli-404: failed http_status HTTP 404")
    });
    let first = text.lines().next().unwrap();
    assert!(first.starts_with("#0 "), "{text}");
    // The device never rebooted: its records are of the boot the
    // controller sees, so they carry this machine's UTC time.
    let year = humantime::format_rfc3339(std::time::SystemTime::now()).to_string()[..4].to_owned();
    assert!(
        first.contains(&format!(" {year}-")) && first.contains("Z "),
        "{text}"
    );

    // --json: one record per line.
    let mut json_args = base.to_vec();
    json_args.push("--json");
    let (ok, out, err) = mqota(&json_args);
    assert!(ok, "{err}");
    let records: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let failed = records
        .iter()
        .find(|r| r["msg"].as_str().unwrap().contains("HTTP 404"))
        .unwrap();
    assert_eq!(failed["level"], "error");
    assert_eq!(failed["boot"], 1);

    // --since: only that record and later ones.
    let n = failed["n"].as_u64().unwrap().to_string();
    let mut since = json_args.clone();
    since.extend(["--since", n.as_str()]);
    let (ok, out, err) = mqota(&since);
    assert!(ok, "{err}");
    let first: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(first["n"], failed["n"]);

    // A device that does not answer is one line of error.
    let (ok, _, err) = mqota(&["logs", "nobody", "--broker", &url, "--wait", "1"]);
    assert!(!ok);
    assert!(err.contains("did not answer"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

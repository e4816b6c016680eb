//! `mqota demo` as a newcomer runs it: the built binary, its summary read
//! back, and what it must leave behind (nothing).

use std::process::Command;
use std::time::{Duration, Instant};

const MQOTA: &str = env!("CARGO_BIN_EXE_mqota");

fn demo(args: &[&str]) -> (bool, String, String, Duration) {
    let t = Instant::now();
    let out = Command::new(MQOTA)
        .arg("demo")
        .args(args)
        .env("MQOTA_CONFIG", "/dev/null")
        .env_remove("MQOTA_BROKER")
        .output()
        .expect("run mqota demo");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        t.elapsed(),
    )
}

#[test]
fn the_demo_updates_five_devices_refuses_a_forged_image_then_each_rolls_the_unhealthy_image_back_and_cleans_up(
) {
    let (ok, out, err, took) = demo(&["--devices", "5"]);
    assert!(ok, "demo failed:\n{out}\n{err}");
    assert!(took < Duration::from_secs(60), "took {took:?}");

    let header = out
        .lines()
        .position(|l| l.starts_with("DEVICE "))
        .unwrap_or_else(|| panic!("no summary table:\n{out}"));
    let rows: Vec<Vec<&str>> = out.lines().collect::<Vec<_>>()[header + 1..]
        .iter()
        .take_while(|l| l.starts_with("demo-"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    let ids: Vec<&str> = rows.iter().map(|r| r[0]).collect();
    assert_eq!(
        ids,
        ["demo-01", "demo-02", "demo-03", "demo-04", "demo-05"],
        "{out}"
    );
    for r in &rows {
        // DEVICE BEFORE AFTER-1.1.0 AFTER-1.2.0 RESULT(2 words) BOOTS...
        assert_eq!(
            &r[1..6],
            ["1.0.0", "1.1.0", "1.1.0", "rolled", "back"],
            "{out}"
        );
        let boots = r[6..].join(" ");
        assert_eq!(
            boots, "1.0.0 > 1.1.0 > 1.2.0+unhealthy > 1.1.0",
            "each device really booted the bad image on trial and then the old one: {out}"
        );
    }
    // Said in plain words as it happens, once per device.
    assert_eq!(
        out.matches("failed its health check, so the device rolled itself back to 1.1.0")
            .count(),
        5,
        "{out}"
    );
    assert!(out.contains("demo passed in"), "{out}");
    // The devices are locked down: a forged image is refused on the device.
    assert!(
        out.contains("demo-01 refused it: bad_signature (unknown key); it still runs 1.1.0"),
        "{out}"
    );

    // Nothing left behind: the working directory it named is gone.
    let work = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("working in "))
        .and_then(|l| l.split(' ').next())
        .unwrap_or_else(|| panic!("the demo names its directory:\n{out}"));
    assert!(
        !std::path::Path::new(work).exists(),
        "{work} was not removed"
    );
}

#[test]
fn a_demo_without_devices_is_refused_with_one_line() {
    let (ok, out, err, _) = demo(&["--devices", "0"]);
    assert!(!ok, "{out}");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.starts_with("error: --devices must be"), "{err:?}");
    assert!(out.is_empty(), "nothing is started: {out:?}");
}

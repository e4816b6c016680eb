//! What devices say reaches the operator's terminal escaped: a status
//! published to a real Mosquitto with escape sequences and bidi overrides
//! in its id, project and version, read back by the real `mqota status`
//! and `mqota watch`.

mod controller_support;

use std::process::Command;

use controller_support::mqota;
use mqota_virtual::testing::Mosquitto;

fn assert_plain(out: &str) {
    assert!(
        !out.chars()
            .any(|c| (c.is_control() && c != '\n') || c == '\u{202e}'),
        "a control or bidi character reached the terminal: {out:?}"
    );
}

#[test]
fn control_characters_and_bidi_overrides_from_a_device_are_printed_escaped() {
    let broker = Mosquitto::start();
    let url = format!("mqtt://127.0.0.1:{}", broker.port());
    let id = "ev\u{202e}li";
    let status = serde_json::json!({
        "device": id, "chip": "esp32c3", "project": "p\u{1b}[2J\u{1b}]0;owned\u{7}",
        "version": "1.0.0\u{9b}31m", "slot": 0, "state": "valid", "last": null,
    });
    let ok = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port().to_string(),
            "-q",
            "1",
            "-r",
        ])
        .args([
            "-t",
            &format!("device/{id}/status"),
            "-m",
            &status.to_string(),
        ])
        .status()
        .unwrap()
        .success();
    assert!(ok, "mosquitto_pub failed");

    let (ok, out, err) = mqota(&["status", "--broker", &url]);
    assert!(ok, "{err}");
    assert_plain(&out);
    assert!(out.contains("ev\\u{202e}li"), "{out}");
    assert!(out.contains("p\\u{1b}[2J\\u{1b}]0;owned\\u{7}"), "{out}");
    assert!(out.contains("1.0.0\\u{9b}31m"), "{out}");
    assert!(out.lines().any(|l| l == "1 device"), "{out}");

    // watch into a pipe: the same escaping, and no screen-clearing codes.
    let (ok, out, err) = mqota(&["watch", "--seconds", "1", "--broker", &url]);
    assert!(ok, "{err}");
    assert_plain(&out);
    assert!(out.contains("ev\\u{202e}li"), "{out}");
    assert!(out.contains("1 device — Ctrl-C to stop"), "{out}");
}

//! Arbitrary bytes as a command payload on each command topic: parsing never
//! panics; an accepted command keeps every documented bound; a refusal is one
//! short line that fits the progress event answering it; and where
//! `serde_json` can read the payload too, both readers agree on every field
//! the device keeps.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqota_core::protocol::{
    parse_command, Command, CommandOutcome, Progress, TopicKind, Topics, MAX_COMMAND_LEN,
    MAX_FIRMWARE_SIZE, MAX_MESSAGE_LEN, MAX_PROGRESS_JSON,
};
use serde_json::Value;

const ME: &str = "dev1";

fuzz_target!(|data: &[u8]| {
    let topics = Topics::new("device", ME).unwrap();
    for kind in [TopicKind::Start, TopicKind::Cancel, TopicKind::Rollback] {
        match parse_command(kind, data, ME) {
            Ok(outcome) => {
                assert!(data.len() <= MAX_COMMAND_LEN);
                check_accepted(kind, data, outcome);
            }
            Err(bad) => {
                assert!(!bad.reason.is_empty());
                assert!(bad.reason.len() <= MAX_MESSAGE_LEN);
                assert!(!bad.reason.contains('\n'));
                let event: Progress = bad.to_progress(&topics);
                let mut buf = [0u8; MAX_PROGRESS_JSON];
                let n = event.to_json(&mut buf).unwrap();
                let back: Progress = serde_json::from_slice(&buf[..n]).unwrap();
                assert_eq!(back, event);
            }
        }
    }
});

/// The payload as serde_json reads it, if it is a JSON object.
fn as_object(data: &[u8]) -> Option<serde_json::Map<String, Value>> {
    match serde_json::from_slice::<Value>(data).ok()? {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

/// `map[key]` as an optional string (`null` and absent alike).
fn opt_str<'a>(map: &'a serde_json::Map<String, Value>, key: &str) -> Option<&'a str> {
    map.get(key).and_then(Value::as_str)
}

fn check_accepted(kind: TopicKind, data: &[u8], outcome: CommandOutcome) {
    let text = std::str::from_utf8(data).map(str::trim);
    let is_json = text.is_ok_and(|t| t.starts_with('{'));
    match (kind, outcome) {
        (_, CommandOutcome::NotForMe) => {
            assert!(is_json);
            if let Some(map) = as_object(data) {
                // Addressed elsewhere: a `device` naming another, or a
                // `devices` list without this one.
                let other_device = opt_str(&map, "device").is_some_and(|d| d != ME);
                let unlisted = map
                    .get("devices")
                    .and_then(Value::as_array)
                    .is_some_and(|l| l.iter().all(|d| d.as_str() != Some(ME)));
                assert!(other_device || unlisted, "{map:?}");
            }
        }
        (TopicKind::Start, CommandOutcome::Command(Command::Start(job))) => {
            let url = job.url.as_str();
            assert!(url.bytes().all(|b| b.is_ascii_graphic()), "{url:?}");
            let lower = url.to_ascii_lowercase();
            assert!(
                lower.starts_with("http://") || lower.starts_with("https://"),
                "{url:?}"
            );
            assert!(job
                .size
                .is_none_or(|s| (1..=MAX_FIRMWARE_SIZE).contains(&s)));
            assert!(job.timeout_s.is_none_or(|t| t >= 1));
            if !is_json {
                assert_eq!(Ok(url), text);
                assert_eq!(
                    (
                        &job.version,
                        job.sha256,
                        job.size,
                        &job.job,
                        job.timeout_s,
                        job.force
                    ),
                    (&None, None, None, &None, None, false)
                );
            } else if let Some(map) = as_object(data) {
                assert_eq!(opt_str(&map, "url"), Some(url));
                assert_eq!(opt_str(&map, "version"), job.version.as_deref());
                assert_eq!(opt_str(&map, "job"), job.job.as_deref());
                assert_eq!(
                    opt_str(&map, "sha256").map(str::to_ascii_lowercase),
                    job.sha256.map(hex::encode)
                );
                assert_eq!(
                    map.get("size").and_then(Value::as_u64),
                    job.size.map(u64::from)
                );
                assert_eq!(
                    map.get("timeout_s").and_then(Value::as_u64),
                    job.timeout_s.map(u64::from)
                );
                assert_eq!(
                    map.get("force").and_then(Value::as_bool).unwrap_or(false),
                    job.force
                );
                if let Some(devices) = map.get("devices").and_then(Value::as_array) {
                    assert!(devices.iter().any(|d| d.as_str() == Some(ME)));
                }
            }
        }
        (TopicKind::Cancel, CommandOutcome::Command(Command::Cancel { job }))
        | (TopicKind::Rollback, CommandOutcome::Command(Command::Rollback { job })) => {
            if !is_json {
                assert_eq!(job, None);
            } else if let Some(map) = as_object(data) {
                assert_eq!(opt_str(&map, "job"), job.as_deref());
            }
        }
        (kind, outcome) => panic!("{kind:?} gave {outcome:?}"),
    }
}

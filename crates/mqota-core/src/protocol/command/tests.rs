extern crate std;

use std::collections::BTreeSet;
use std::format;
use std::string::String as StdString;
use std::vec;
use std::vec::Vec;

use super::super::{MAX_COMMAND_LEN, MAX_JOB_ID_LEN, MAX_URL_LEN, MAX_VERSION_LEN};
use super::*;

const ME: &str = "dev1";
const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

fn sha_bytes() -> [u8; 32] {
    let mut out = [0u8; 32];
    hex::decode_to_slice(SHA, &mut out).unwrap();
    out
}

fn start(payload: &str) -> Result<CommandOutcome, BadCommand> {
    parse_command(TopicKind::Start, payload.as_bytes(), ME)
}

fn job(url: &str) -> Job {
    Job {
        url: String::try_from(url).unwrap(),
        version: None,
        sha256: None,
        size: None,
        job: None,
        timeout_s: None,
        force: false,
        allow_downgrade: false,
        allow_other_project: false,
    }
}

fn s<const N: usize>(v: &str) -> String<N> {
    String::try_from(v).unwrap()
}

fn started(j: Job) -> Result<CommandOutcome, BadCommand> {
    Ok(CommandOutcome::Command(Command::Start(j)))
}

#[test]
fn accepted_start_commands_read_as_documented() {
    let long_url = format!("http://h/{}", "a".repeat(MAX_URL_LEN - "http://h/".len()));
    let max_job = "j".repeat(MAX_JOB_ID_LEN);
    let max_version = "v".repeat(MAX_VERSION_LEN);
    let sixty_four: Vec<StdString> = (0..64).map(|i| format!("\"d{i}\"")).collect();
    let many_with_me = format!(
        r#"{{"url":"http://h/f","devices":[{},"dev1"]}}"#,
        sixty_four[..63].join(",")
    );
    let cases: Vec<(StdString, Job)> = vec![
        // The original design's bare URL, trimmed.
        (
            "http://192.168.1.10:8000/fw.bin".into(),
            job("http://192.168.1.10:8000/fw.bin"),
        ),
        (
            " \r\n\thttps://example.com/fw.bin \n".into(),
            job("https://example.com/fw.bin"),
        ),
        ("HTTP://Host/x".into(), job("HTTP://Host/x")),
        (
            "http://[::1]:8080/fw.bin".into(),
            job("http://[::1]:8080/fw.bin"),
        ),
        (
            "http://user:pw@h:1/fw.bin".into(),
            job("http://user:pw@h:1/fw.bin"),
        ),
        ("http://h?build=7".into(), job("http://h?build=7")),
        ("http://h:65535".into(), job("http://h:65535")),
        (long_url.clone(), job(&long_url)),
        // JSON, url only.
        (
            r#"{"url":"http://h/fw.bin"}"#.into(),
            job("http://h/fw.bin"),
        ),
        // Escapes are resolved; `\/` is what some encoders write.
        (
            r#"{"url":"http:\/\/h\/f\u0077.bin"}"#.into(),
            job("http://h/fw.bin"),
        ),
        (r#"{"\u0075rl":"http://h/"}"#.into(), job("http://h/")),
        // Every field.
        (
            format!(
                r#" {{"url":"https://h/fw.bin","version":"1.2.3","sha256":"{SHA}","size":123456,"job":"job-7","timeout_s":300,"devices":["dev0","dev1"],"force":true}} "#
            ),
            Job {
                version: Some(s("1.2.3")),
                sha256: Some(sha_bytes()),
                size: Some(123456),
                job: Some(s("job-7")),
                timeout_s: Some(300),
                force: true,
                allow_downgrade: false,
                allow_other_project: false,
                ..job("https://h/fw.bin")
            },
        ),
        // Upper-case hex, null optionals, unknown fields of every shape.
        (
            format!(
                r#"{{"note":"x\"y","url":"http://h/","extra":{{"a":[1,{{"b":null}}]}},"sha256":"{}","version":null,"size":null,"job":null,"timeout_s":null,"devices":null,"force":null,"n":-1.5e3,"t":true}}"#,
                SHA.to_uppercase()
            ),
            Job {
                sha256: Some(sha_bytes()),
                ..job("http://h/")
            },
        ),
        (
            r#"{"url":"http://h/","force":false,"size":1}"#.into(),
            Job {
                size: Some(1),
                ..job("http://h/")
            },
        ),
        // The bounds themselves are accepted.
        (
            format!(
                r#"{{"url":"{long_url}","job":"{max_job}","version":"{max_version}","size":16777216,"timeout_s":4294967295}}"#
            ),
            Job {
                job: Some(s(&max_job)),
                version: Some(s(&max_version)),
                size: Some(16 * 1024 * 1024),
                timeout_s: Some(u32::MAX),
                ..job(&long_url)
            },
        ),
        (many_with_me, job("http://h/f")),
        // A device id that needed unescaping still matches.
        (
            r#"{"url":"http://h/f","devices":["dev\u0031"]}"#.into(),
            job("http://h/f"),
        ),
    ];
    for (payload, expected) in cases {
        assert_eq!(start(&payload), started(expected), "{payload}");
    }
}

#[test]
fn a_job_whose_devices_list_does_not_name_this_device_is_not_for_me() {
    for payload in [
        r#"{"url":"http://h/f","devices":["dev2","dev10","DEV1","dev"]}"#,
        r#"{"url":"http://h/f","devices":[]}"#,
        // Devices not addressed stay silent even about a bad field.
        r#"{"url":"ftp://h/f","size":0,"devices":["dev2"]}"#,
        r#"{"devices":["dev2"]}"#,
    ] {
        assert_eq!(start(payload), Ok(CommandOutcome::NotForMe), "{payload}");
    }
}

#[test]
fn cancel_and_rollback_payloads_are_read_leniently() {
    let forty = "j".repeat(MAX_JOB_ID_LEN);
    let forty_json = format!(r#"{{"job":"{forty}"}}"#);
    let cases: Vec<(&[u8], Option<&str>)> = vec![
        (b"", None),
        (b"  \n", None),
        (b"cancel", None),
        (b"null", None),
        (b"\xff\xfe", None),
        (b"{}", None),
        (b" { } ", None),
        (br#"{"job":null}"#, None),
        (br#"{"job":"j-1"}"#, Some("j-1")),
        (
            br#"{"why":{"deep":[1,2]},"job":"j\u002d2","url":5}"#,
            Some("j-2"),
        ),
        (forty_json.as_bytes(), Some(&forty)),
    ];
    for (payload, expected) in cases {
        let expected = expected.map(s::<MAX_JOB_ID_LEN>);
        assert_eq!(
            parse_command(TopicKind::Cancel, payload, ME),
            Ok(CommandOutcome::Command(Command::Cancel {
                job: expected.clone()
            })),
            "{payload:?}"
        );
        assert_eq!(
            parse_command(TopicKind::Rollback, payload, ME),
            Ok(CommandOutcome::Command(Command::Rollback { job: expected })),
            "{payload:?}"
        );
    }
}

/// Every rejected form, with the reason it must give.
fn rejected_start_cases() -> Vec<(Vec<u8>, &'static str)> {
    let over_url = format!(
        "http://h/{}",
        "a".repeat(MAX_URL_LEN + 1 - "http://h/".len())
    );
    let ids = |n: usize| -> StdString {
        (0..n)
            .map(|i| format!("\"d{i}\""))
            .collect::<Vec<_>>()
            .join(",")
    };
    let text: Vec<(StdString, &'static str)> = vec![
        ("".into(), reason::EMPTY),
        (" \n\t ".into(), reason::EMPTY),
        ("{".into(), reason::NOT_JSON),
        (r#"{"url":"http://h/"} x"#.into(), reason::NOT_JSON),
        // A missing colon surfaces while reading the value, so it names the field.
        (r#"{"url" "http://h/"}"#.into(), reason::URL_NOT_STRING),
        (r#"{"url":"http://h/",}"#.into(), reason::NOT_JSON),
        (r#"{url:"http://h/"}"#.into(), reason::NOT_JSON),
        (r#"{"url":"http://h/""#.into(), reason::NOT_JSON),
        (
            r#"{"url":"http://h/","x":[[[[[[[[1]]]]]]]]}"#.into(),
            reason::TOO_DEEP,
        ),
        (
            r#"{"url":"http://h/","url":"http://evil/"}"#.into(),
            reason::DUPLICATE,
        ),
        (
            format!(r#"{{"url":"http://h/","sha256":"{SHA}","sha256":null}}"#),
            reason::DUPLICATE,
        ),
        // An escaped key is the same key.
        (
            r#"{"url":"http://h/","u\u0072l":"http://evil/"}"#.into(),
            reason::DUPLICATE,
        ),
        ("{}".into(), reason::URL_MISSING),
        (r#"{"url":null}"#.into(), reason::URL_MISSING),
        (r#"{"URL":"http://h/"}"#.into(), reason::URL_MISSING),
        (r#"{"url":5}"#.into(), reason::URL_NOT_STRING),
        (r#"{"url":["http://h/"]}"#.into(), reason::URL_NOT_STRING),
        (r#"{"url":"http://h/\q"}"#.into(), reason::URL_NOT_STRING),
        (r#"{"url":"http://h/\u12"}"#.into(), reason::URL_NOT_STRING),
        (over_url.clone(), reason::URL_TOO_LONG),
        (format!(r#"{{"url":"{over_url}"}}"#), reason::URL_TOO_LONG),
        ("http://h/a b.bin".into(), reason::URL_BAD_CHARS),
        (r#"{"url":"http://h/a\nb"}"#.into(), reason::URL_BAD_CHARS),
        ("http://hé/fw.bin".into(), reason::URL_BAD_CHARS),
        ("ftp://h/fw.bin".into(), reason::URL_NOT_HTTP),
        ("h:8000/fw.bin".into(), reason::URL_NOT_HTTP),
        ("httpx://h/fw.bin".into(), reason::URL_NOT_HTTP),
        ("[\"http://h/\"]".into(), reason::URL_NOT_HTTP),
        (r#"{"url":"mqtt://h/x"}"#.into(), reason::URL_NOT_HTTP),
        ("http://".into(), reason::URL_NO_HOST),
        ("http:///fw.bin".into(), reason::URL_NO_HOST),
        ("http://:80/fw.bin".into(), reason::URL_NO_HOST),
        ("http://user@/fw.bin".into(), reason::URL_NO_HOST),
        ("http://[]/fw.bin".into(), reason::URL_NO_HOST),
        ("http://[::1/fw.bin".into(), reason::URL_NO_HOST),
        ("http://h:/fw.bin".into(), reason::URL_BAD_PORT),
        ("http://h:0/fw.bin".into(), reason::URL_BAD_PORT),
        ("http://h:65536/fw.bin".into(), reason::URL_BAD_PORT),
        ("http://h:8o80/fw.bin".into(), reason::URL_BAD_PORT),
        ("http://h:+80/fw.bin".into(), reason::URL_BAD_PORT),
        ("http://[::1]x/fw.bin".into(), reason::URL_BAD_PORT),
        (
            r#"{"url":"http://h/","version":1}"#.into(),
            reason::VERSION_NOT_STRING,
        ),
        (
            format!(
                r#"{{"url":"http://h/","version":"{}"}}"#,
                "v".repeat(MAX_VERSION_LEN + 1)
            ),
            reason::VERSION_TOO_LONG,
        ),
        (
            format!(r#"{{"url":"http://h/","sha256":"{}"}}"#, &SHA[1..]),
            reason::SHA256_BAD,
        ),
        (
            format!(r#"{{"url":"http://h/","sha256":"{SHA}0"}}"#),
            reason::SHA256_BAD,
        ),
        (
            format!(r#"{{"url":"http://h/","sha256":"g{}"}}"#, &SHA[1..]),
            reason::SHA256_BAD,
        ),
        (
            r#"{"url":"http://h/","sha256":12}"#.into(),
            reason::SHA256_BAD,
        ),
        (
            r#"{"url":"http://h/","size":-1}"#.into(),
            reason::SIZE_NOT_INT,
        ),
        (
            r#"{"url":"http://h/","size":1.5}"#.into(),
            reason::SIZE_NOT_INT,
        ),
        (
            r#"{"url":"http://h/","size":1e3}"#.into(),
            reason::SIZE_NOT_INT,
        ),
        (
            r#"{"url":"http://h/","size":"100"}"#.into(),
            reason::SIZE_NOT_INT,
        ),
        (
            r#"{"url":"http://h/","size":4294967296}"#.into(),
            reason::SIZE_NOT_INT,
        ),
        (r#"{"url":"http://h/","size":0}"#.into(), reason::SIZE_ZERO),
        (
            r#"{"url":"http://h/","size":16777217}"#.into(),
            reason::SIZE_TOO_BIG,
        ),
        (
            r#"{"url":"http://h/","job":7}"#.into(),
            reason::JOB_NOT_STRING,
        ),
        (
            format!(
                r#"{{"url":"http://h/","job":"{}"}}"#,
                "j".repeat(MAX_JOB_ID_LEN + 1)
            ),
            reason::JOB_TOO_LONG,
        ),
        (
            r#"{"url":"http://h/","timeout_s":-5}"#.into(),
            reason::TIMEOUT_NOT_INT,
        ),
        (
            r#"{"url":"http://h/","timeout_s":2.5,"job":"j"}"#.into(),
            reason::TIMEOUT_NOT_INT,
        ),
        (
            r#"{"url":"http://h/","timeout_s":0}"#.into(),
            reason::TIMEOUT_ZERO,
        ),
        (
            r#"{"url":"http://h/","force":"yes"}"#.into(),
            reason::FORCE_NOT_BOOL,
        ),
        (
            r#"{"url":"http://h/","force":1}"#.into(),
            reason::FORCE_NOT_BOOL,
        ),
        (
            r#"{"url":"http://h/","allow_downgrade":"yes"}"#.into(),
            reason::ALLOW_DOWNGRADE_NOT_BOOL,
        ),
        (
            r#"{"url":"http://h/","allow_other_project":1}"#.into(),
            reason::ALLOW_OTHER_PROJECT_NOT_BOOL,
        ),
        (
            r#"{"url":"http://h/","device":7}"#.into(),
            reason::DEVICE_NOT_STRING,
        ),
        (
            r#"{"url":"http://h/","seq":-1}"#.into(),
            reason::SEQ_NOT_INT,
        ),
        (
            r#"{"url":"http://h/","seq":1.5,"job":"j"}"#.into(),
            reason::SEQ_NOT_INT,
        ),
        (
            r#"{"url":"http://h/","op":["start"]}"#.into(),
            reason::OP_NOT_STRING,
        ),
        (
            r#"{"url":"http://h/","devices":"dev1"}"#.into(),
            reason::DEVICES_NOT_LIST,
        ),
        (
            r#"{"url":"http://h/","devices":["dev1",2]}"#.into(),
            reason::DEVICES_NOT_LIST,
        ),
        (
            r#"{"url":"http://h/","devices":{"dev1":true}}"#.into(),
            reason::DEVICES_NOT_LIST,
        ),
        (
            format!(r#"{{"url":"http://h/","devices":["dev1",{}]}}"#, ids(64)),
            reason::DEVICES_TOO_MANY,
        ),
        (
            format!(
                r#"{{"url":"http://h/","devices":["dev1","{}"]}}"#,
                "d".repeat(MAX_DEVICE_ID_LEN + 1)
            ),
            reason::DEVICE_ID_TOO_LONG,
        ),
    ];
    let mut cases: Vec<(Vec<u8>, &'static str)> = text
        .into_iter()
        .map(|(payload, reason)| (payload.into_bytes(), reason))
        .collect();
    cases.push((b"http://h/\xff".to_vec(), reason::NOT_UTF8));
    let mut huge = b"http://h/".to_vec();
    huge.resize(MAX_COMMAND_LEN + 1, b'a');
    cases.push((huge, reason::TOO_LONG));
    cases
}

#[test]
fn each_rejected_start_command_names_what_is_wrong() {
    for (payload, expected) in rejected_start_cases() {
        let got = parse_command(TopicKind::Start, &payload, ME);
        assert_eq!(
            got.as_ref().map_err(|e| e.reason),
            Err(expected),
            "{}",
            StdString::from_utf8_lossy(&payload)
        );
    }
}

#[test]
fn every_reason_is_reachable_and_documented_in_protocol_md() {
    let produced: BTreeSet<&str> = rejected_start_cases().into_iter().map(|c| c.1).collect();
    let protocol_md = include_str!("../../../../../docs/PROTOCOL.md");
    for reason in reason::ALL {
        assert!(produced.contains(reason), "no test reaches {reason:?}");
        assert!(
            protocol_md.contains(&format!("`{reason}`")),
            "PROTOCOL.md does not list {reason:?}"
        );
    }
    assert_eq!(produced.len(), reason::ALL.len());
}

#[test]
fn a_refused_start_command_still_names_its_job_when_it_can_be_read() {
    let cases = [
        (r#"{"job":"j-1"}"#, Some("j-1")),
        (r#"{"job":"j-2","url":"ftp://h/"}"#, Some("j-2")),
        // The structural failure comes first; a second pass finds the job.
        (r#"{"url":5,"job":"j-3"}"#, Some("j-3")),
        (r#"{"size":-1,"job":"j-4"}"#, Some("j-4")),
        (
            r#"{"url":"http://h/","url":"x","job":"j\u002d5"}"#,
            Some("j-5"),
        ),
        (r#"{"job":"j-6","url":"http://h/"} trailing"#, Some("j-6")),
        // Unreadable: the job itself is the problem, or the JSON is broken.
        (r#"{"url":"ftp://h/","job":7}"#, None),
        (r#"{"job":"j-8","url":"http://h/""#, None),
        ("ftp://h/", None),
    ];
    for (payload, expected) in cases {
        let err = start(payload).unwrap_err();
        assert_eq!(err.job, expected.map(s::<MAX_JOB_ID_LEN>), "{payload}");
    }
}

#[test]
fn rejected_cancel_and_rollback_payloads_name_what_is_wrong() {
    let mut huge = Vec::new();
    huge.resize(MAX_COMMAND_LEN + 1, b' ');
    let long_job = format!(r#"{{"job":"{}"}}"#, "j".repeat(MAX_JOB_ID_LEN + 1));
    let cases: Vec<(&[u8], &str)> = vec![
        (&huge, reason::TOO_LONG),
        (b"{", reason::NOT_JSON),
        (br#"{"job":"j"} x"#, reason::NOT_JSON),
        (br#"{"job":7}"#, reason::JOB_NOT_STRING),
        (br#"{"job":"\x"}"#, reason::JOB_NOT_STRING),
        (long_job.as_bytes(), reason::JOB_TOO_LONG),
        (br#"{"job":"a","job":"b"}"#, reason::DUPLICATE),
        (b"{\"x\":[[[[[[[[[]]]]]]]]]}", reason::TOO_DEEP),
    ];
    for (payload, expected) in cases {
        for kind in [TopicKind::Cancel, TopicKind::Rollback] {
            assert_eq!(
                parse_command(kind, payload, ME).map_err(|e| e.reason),
                Err(expected),
                "{kind:?} {}",
                StdString::from_utf8_lossy(payload)
            );
        }
    }
}

#[test]
fn brackets_inside_strings_do_not_count_towards_the_depth_limit() {
    let payload = r#"{"url":"http://h/[[[[[[[[[[","note":"{{{{{{{{{{\"[[[[[[[["}"#;
    assert_eq!(start(payload), started(job("http://h/[[[[[[[[[[")));
}

#[test]
fn a_bad_command_answer_is_a_failed_bad_command_progress_event() {
    let topics = Topics::new("device", ME).unwrap();
    let err = start(r#"{"job":"j-1","url":"ftp://h/"}"#).unwrap_err();
    let p = err.to_progress(&topics);
    assert_eq!(p.device, ME);
    assert_eq!(p.job, Some(s("j-1")));
    assert_eq!(p.phase, Phase::Failed);
    assert_eq!(p.error, Some(ErrorCode::BadCommand));
    assert_eq!(p.message.as_deref(), Some(reason::URL_NOT_HTTP));
}

#[test]
fn the_downgrade_permissions_are_read_from_a_job() {
    let payload = r#"{"url":"http://h/f","allow_downgrade":true,"allow_other_project":true}"#;
    let Ok(CommandOutcome::Command(Command::Start(job))) =
        parse_command(TopicKind::Start, payload.as_bytes(), ME)
    else {
        panic!("not a start");
    };
    assert!(job.allow_downgrade && job.allow_other_project && !job.force);
}

#[test]
fn an_unsigned_command_naming_another_device_is_not_for_me() {
    let payload = r#"{"url":"http://h/f","device":"someone-else"}"#;
    assert_eq!(
        parse_command(TopicKind::Start, payload.as_bytes(), ME),
        Ok(CommandOutcome::NotForMe)
    );
    let payload = format!(r#"{{"url":"http://h/f","device":"{ME}"}}"#);
    assert!(matches!(
        parse_command(TopicKind::Start, payload.as_bytes(), ME),
        Ok(CommandOutcome::Command(Command::Start(_)))
    ));
}

#[test]
fn a_signed_command_binds_its_topic_its_device_and_a_sequence_number() {
    use crate::protocol::parse_signed_command as signed;
    let ok = format!(r#"{{"op":"start","seq":7,"device":"{ME}","url":"http://h/f","job":"j"}}"#);
    let (outcome, seq) = signed(TopicKind::Start, ok.as_bytes(), ME).unwrap();
    assert_eq!(seq, 7);
    assert!(matches!(
        outcome,
        CommandOutcome::Command(Command::Start(_))
    ));

    let listed = format!(r#"{{"op":"rollback","seq":8,"devices":["a","{ME}"],"job":"r"}}"#);
    let (outcome, seq) = signed(TopicKind::Rollback, listed.as_bytes(), ME).unwrap();
    assert_eq!(seq, 8);
    assert_eq!(
        outcome,
        CommandOutcome::Command(Command::Rollback {
            job: Some(JobId::try_from("r").unwrap())
        })
    );
    let not_listed = r#"{"op":"start","seq":9,"devices":["a"],"url":"http://h/f"}"#;
    assert_eq!(
        signed(TopicKind::Start, not_listed.as_bytes(), ME).map(|o| o.0),
        Ok(CommandOutcome::NotForMe)
    );

    let refused = |kind, text: &str| {
        let e = signed(kind, text.as_bytes(), ME).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadSignature, "{text}");
        e.reason
    };
    // A signed cancel cannot be replayed onto the rollback topic.
    let cancel = format!(r#"{{"op":"cancel","seq":10,"device":"{ME}","job":"j"}}"#);
    assert_eq!(
        refused(TopicKind::Rollback, &cancel),
        super::signed::WRONG_OP
    );
    let other = r#"{"op":"start","seq":11,"device":"someone-else","url":"http://h/f","job":"j"}"#;
    assert_eq!(
        refused(TopicKind::Start, other),
        super::signed::OTHER_DEVICE
    );
    let no_seq = format!(r#"{{"op":"start","device":"{ME}","url":"http://h/f"}}"#);
    assert_eq!(refused(TopicKind::Start, &no_seq), super::signed::NO_SEQ);
    let nobody = r#"{"op":"start","seq":12,"url":"http://h/f"}"#;
    assert_eq!(refused(TopicKind::Start, nobody), super::signed::NO_DEVICE);
    assert_eq!(
        refused(TopicKind::Cancel, "cancel"),
        super::signed::NOT_OBJECT
    );
    // The job id of a refused command is kept for the answer.
    let e = signed(TopicKind::Start, other.as_bytes(), ME).unwrap_err();
    assert_eq!(e.job.as_deref(), Some("j"));
}

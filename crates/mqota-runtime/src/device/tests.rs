//! The device's unit tests: reading commands and the progress queue.
//! Everything that needs a broker runs in `mqota-e2e` (`device_e2e`).

use core::cell::RefCell;

use heapless::Deque;
use mqota_core::fetch::HTTPS_NOT_ENABLED;
use mqota_core::protocol::envelope::{self, JobTrust};
use mqota_core::protocol::{truncated, Command, ErrorCode, Phase, Progress, Topics};

use super::command::{read_command, Incoming};
use super::download::{queue, PROGRESS_QUEUE};
use super::DeviceConfig;
use crate::mqtt::{Message, MqttConfig};
use crate::trust::TrustState;

#[test]
fn debug_output_shows_the_user_name_but_never_the_password() {
    extern crate std;
    let mut c = DeviceConfig::new("broker.lan", 1883);
    c.username = Some("dev-1");
    c.password = Some(b"s3cret-pw");
    let device = std::format!("{c:?}");
    let mut m = MqttConfig::new("broker.lan", 1883, "dev-1", "t", b"offline");
    m.password = c.password;
    let mqtt = std::format!("{m:?}");
    for text in [device, mqtt] {
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
    }
}

fn message(topic: &str, payload: &[u8], retain: bool) -> Message {
    Message {
        topic: truncated(topic),
        payload: heapless::Vec::from_slice(payload).unwrap(),
        retain,
    }
}

#[test]
fn a_command_delivered_retained_is_dropped_unread_and_unanswered() {
    let topics = Topics::new("device", "d").unwrap();
    let url = b"http://10.0.0.1/fw.bin";
    for (topic, payload) in [
        ("device/ota/start", &url[..]),
        ("device/d/ota/start", &url[..]),
        ("device/d/ota/rollback", &b"go"[..]),
        ("device/d/ota/cancel", &b""[..]),
        // Even a malformed one: no `bad_command` answer for it.
        ("device/d/ota/start", &b"{"[..]),
    ] {
        assert!(
            matches!(
                read_command(
                    &message(topic, payload, true),
                    &topics,
                    None,
                    &TrustState::in_ram(),
                    false
                ),
                Incoming::Ignored
            ),
            "{topic}"
        );
        assert!(
            !matches!(
                read_command(
                    &message(topic, payload, false),
                    &topics,
                    None,
                    &TrustState::in_ram(),
                    false
                ),
                Incoming::Ignored
            ),
            "{topic} unretained is read"
        );
    }
}

#[test]
fn an_https_job_is_refused_bad_command_while_tls_is_off_and_read_with_it() {
    let topics = Topics::new("device", "d").unwrap();
    let msg = message("device/d/ota/start", b"https://fw.example/fw.bin", false);
    match read_command(&msg, &topics, None, &TrustState::in_ram(), false) {
        Incoming::Bad(p) => {
            assert_eq!(p.error, Some(ErrorCode::BadCommand));
            assert_eq!(p.message.as_deref(), Some(HTTPS_NOT_ENABLED));
        }
        _ => panic!("an https job is refused without TLS"),
    }
    assert!(matches!(
        read_command(&msg, &topics, None, &TrustState::in_ram(), true),
        Incoming::Command(..)
    ));
}

fn job_key() -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::from_slice(&[7; 32]).unwrap()
}

fn job_trust() -> JobTrust {
    JobTrust::new(
        envelope::job_key_of(job_key().verifying_key()),
        mqota_core::signature::SoftVerifier::INSTANCE,
    )
}

fn sealed(json: &str) -> std::string::String {
    envelope::seal(json.as_bytes(), &job_key())
}

fn refusal(i: Incoming) -> (ErrorCode, std::string::String) {
    match i {
        Incoming::Bad(p) => (p.error.unwrap(), p.message.unwrap().as_str().into()),
        _ => panic!("not refused"),
    }
}

#[test]
fn with_a_job_key_only_fresh_commands_signed_for_this_device_and_topic_are_read() {
    let topics = Topics::new("device", "d").unwrap();
    let trust = job_trust();
    let fresh = TrustState::in_ram();
    let read = |topic: &str, payload: &str, state: &TrustState, retain: bool| {
        read_command(
            &message(topic, payload.as_bytes(), retain),
            &topics,
            Some(&trust),
            state,
            false,
        )
    };
    let start = sealed(r#"{"op":"start","seq":5,"device":"d","url":"http://h/f","job":"j"}"#);
    match read("device/d/ota/start", &start, &fresh, false) {
        Incoming::Command(Command::Start(job), Some(5)) => {
            assert_eq!(job.job.as_deref(), Some("j"))
        }
        _ => panic!("a good signed start is read"),
    }
    // Unsigned, bare URL or JSON: refused.
    for unsigned in ["http://h/f", r#"{"url":"http://h/f"}"#] {
        assert_eq!(
            refusal(read("device/d/ota/start", unsigned, &fresh, false)),
            (ErrorCode::BadSignature, "command is not signed".into())
        );
    }
    // The same bytes after a higher number was accepted: replayed.
    let mut later = TrustState::in_ram();
    let mut flash = mqota_flash_sim::SimFlash::new(0x1000);
    embassy_futures::block_on(later.accept_seq(&mut flash, 5)).unwrap();
    let (code, _) = refusal(read("device/d/ota/start", &start, &later, false));
    assert_eq!(code, ErrorCode::Replayed);
    // Signed for another device, or for another topic.
    let other = sealed(r#"{"op":"start","seq":6,"device":"e","url":"http://h/f"}"#);
    assert_eq!(
        refusal(read("device/d/ota/start", &other, &fresh, false)).0,
        ErrorCode::BadSignature
    );
    let cancel = sealed(r#"{"op":"cancel","seq":7,"device":"d"}"#);
    assert_eq!(
        refusal(read("device/d/ota/rollback", &cancel, &fresh, false)).0,
        ErrorCode::BadSignature
    );
    // Signed by another key.
    let forged = envelope::seal(
        br#"{"op":"start","seq":8,"device":"d","url":"http://h/f"}"#,
        &p256::ecdsa::SigningKey::from_slice(&[8; 32]).unwrap(),
    );
    assert_eq!(
        refusal(read("device/d/ota/start", &forged, &fresh, false)),
        (
            ErrorCode::BadSignature,
            "command signature does not verify".into()
        )
    );
    // Retained: dropped unread, signed or not.
    assert!(matches!(
        read("device/d/ota/start", &start, &fresh, true),
        Incoming::Ignored
    ));
}

fn ev(phase: Phase, error: Option<ErrorCode>) -> Progress {
    let topics = Topics::new("device", "d").unwrap();
    let mut p = Progress::new(topics.device_id(), None, phase);
    p.error = error;
    p
}

fn phases(
    q: &RefCell<Deque<Progress, PROGRESS_QUEUE>>,
) -> std::vec::Vec<(Phase, Option<ErrorCode>)> {
    q.borrow().iter().map(|p| (p.phase, p.error)).collect()
}

#[test]
fn a_full_queue_drops_the_oldest_downloading_event_before_anything_else() {
    let q = RefCell::new(Deque::new());
    queue(&q, ev(Phase::Accepted, None));
    for _ in 0..PROGRESS_QUEUE - 1 {
        queue(&q, ev(Phase::Downloading, None));
    }
    queue(&q, ev(Phase::Verifying, None));
    let got = phases(&q);
    assert_eq!(got.len(), PROGRESS_QUEUE);
    assert_eq!(got.first(), Some(&(Phase::Accepted, None)));
    assert_eq!(got.last(), Some(&(Phase::Verifying, None)));
}

#[test]
fn a_flood_of_refusals_cannot_push_out_the_jobs_own_events() {
    let q = RefCell::new(Deque::new());
    queue(&q, ev(Phase::Accepted, None));
    for _ in 0..PROGRESS_QUEUE * 3 {
        queue(&q, ev(Phase::Failed, Some(ErrorCode::BadCommand)));
    }
    queue(&q, ev(Phase::Cancelled, Some(ErrorCode::Cancelled)));
    let got = phases(&q);
    assert_eq!(got.len(), PROGRESS_QUEUE);
    assert_eq!(got.first(), Some(&(Phase::Accepted, None)));
    assert_eq!(
        got.last(),
        Some(&(Phase::Cancelled, Some(ErrorCode::Cancelled)))
    );
}

//! The signed-command path a device with a job key runs on every message:
//! arbitrary bytes through `envelope::open` and, when they open, through
//! `parse_signed_command`. Never panics; only envelopes sealed with the
//! trusted key open; a sealed fuzz input opens to exactly its bytes, and the
//! same envelope with any one byte changed is refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqota_core::protocol::envelope::{job_key_of, open, seal, JobTrust};
use mqota_core::protocol::{parse_signed_command, TopicKind, MAX_COMMAND_LEN, MAX_MESSAGE_LEN};
use mqota_core::signature::SoftVerifier;
use p256::ecdsa::SigningKey;

const ME: &str = "dev1";

fuzz_target!(|data: &[u8]| {
    let key = SigningKey::from_slice(&[0x42; 32]).unwrap();
    let trust = JobTrust::new(job_key_of(key.verifying_key()), SoftVerifier::INSTANCE);
    let mut inner = [0u8; MAX_COMMAND_LEN];

    // Arbitrary bytes: at best a refusal, never a panic; nothing forged opens.
    if let Ok(opened) = open(data, &trust, &mut inner) {
        panic!("unsigned bytes opened: {opened:?}");
    }

    // The input sealed with the trusted key opens to itself, and is read
    // without panicking on every topic.
    if data.len() <= MAX_COMMAND_LEN {
        let sealed = seal(data, &key);
        let opened = open(sealed.as_bytes(), &trust, &mut inner).expect("a sealed input opens");
        assert_eq!(opened, data);
        for kind in [TopicKind::Start, TopicKind::Cancel, TopicKind::Rollback] {
            if let Err(bad) = parse_signed_command(kind, opened, ME) {
                assert!(!bad.reason.is_empty() && bad.reason.len() <= MAX_MESSAGE_LEN);
            }
        }
        // One changed byte anywhere: refused.
        if let Some(&first) = data.first() {
            let mut bytes = sealed.into_bytes();
            let at = first as usize % bytes.len();
            bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
            assert!(open(&bytes, &trust, &mut inner).is_err(), "changed at {at}");
        }
    }
});

//! Arbitrary bytes as a Secure Boot V2 signature sector (the first 32 bytes
//! are the padded image's digest, the rest the sector, 0xFF-filled or cut to
//! 4 KiB): parsing never panics, never yields more than three blocks, and an
//! accepted image always has a block of a trusted key with a correct CRC and
//! the image's digest; the check always answers the same way twice.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqota_core::image::Chip;
use mqota_core::signature::{
    blocks, check, Refusal, SoftVerifier, TrustPolicy, MAX_BLOCKS, SECTOR_LEN,
};

fuzz_target!(|data: &[u8]| {
    let mut digest = [0u8; 32];
    let n = data.len().min(32);
    digest[..n].copy_from_slice(&data[..n]);
    let mut sector = [0xFFu8; SECTOR_LEN];
    let rest = &data[n..];
    let m = rest.len().min(SECTOR_LEN);
    sector[..m].copy_from_slice(&rest[..m]);

    let parsed: Vec<_> = blocks(&sector).collect();
    assert!(parsed.len() <= MAX_BLOCKS);

    // Nothing trusted: everything passes.
    assert_eq!(
        check(&TrustPolicy::none(), Chip::Esp32c6, Some(&sector), &digest),
        Ok(())
    );

    // Trust every key the sector names, so the CRC, digest and signature
    // paths all run.
    let keys: Vec<_> = parsed.iter().flatten().map(|b| b.key_digest()).collect();
    let policy = if keys.is_empty() {
        TrustPolicy::new(&[[0u8; 32]], SoftVerifier::INSTANCE)
    } else {
        TrustPolicy::new(&keys, SoftVerifier::INSTANCE)
    };
    for chip in [Chip::Esp32c3, Chip::Esp32c6] {
        let verdict = check(&policy, chip, Some(&sector), &digest);
        assert_eq!(verdict, check(&policy, chip, Some(&sector), &digest));
        match verdict {
            Ok(()) => assert!(parsed
                .iter()
                .flatten()
                .any(|b| b.scheme().supported_on(chip)
                    && policy.keys().contains(&b.key_digest())
                    && b.crc_valid()
                    && b.image_digest() == digest)),
            Err(Refusal::NoSignature) => assert!(parsed.is_empty()),
            Err(_) => assert!(!parsed.is_empty()),
        }
    }
    assert_eq!(
        check(&policy, Chip::Esp32c3, None, &digest),
        Err(Refusal::NoSignature)
    );
});

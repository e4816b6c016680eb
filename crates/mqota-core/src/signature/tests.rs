extern crate std;

use super::*;

const RSA_SIGNED: &[u8] = include_bytes!("../../../../testdata/signatures/sample-esp32c3.rsa.bin");
const ROTATED: &[u8] =
    include_bytes!("../../../../testdata/signatures/sample-esp32c3.rsa-rsa2.bin");
const ECDSA_SIGNED: &[u8] =
    include_bytes!("../../../../testdata/signatures/esp32c6-espflash.ecdsa.bin");

fn digest(text: &str) -> KeyDigest {
    let mut d = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut d).unwrap();
    d
}

fn rsa_key() -> KeyDigest {
    digest(include_str!("../../../../testdata/signatures/rsa.digest"))
}
fn rsa2_key() -> KeyDigest {
    digest(include_str!("../../../../testdata/signatures/rsa2.digest"))
}
fn ec_key() -> KeyDigest {
    digest(include_str!("../../../../testdata/signatures/ec.digest"))
}

fn sector(file: &[u8]) -> &[u8; SECTOR_LEN] {
    file[file.len() - SECTOR_LEN..].try_into().unwrap()
}

fn padded_digest(file: &[u8]) -> [u8; 32] {
    Sha256::digest(&file[..file.len() - SECTOR_LEN]).into()
}

/// A verifier that must never be asked.
struct Never;
impl SignatureVerifier for Never {
    fn verify_rsa3072_pss(&self, _: &[u8; 384], _: u32, _: &[u8; 32], _: &[u8; 384]) -> bool {
        unreachable!()
    }
    fn verify_ecdsa_p256(
        &self,
        _: &[u8; 32],
        _: &[u8; 32],
        _: &[u8; 32],
        _: &[u8; 32],
        _: &[u8; 32],
    ) -> bool {
        unreachable!()
    }
}

#[test]
fn espsecure_blocks_parse_with_its_key_digests_and_crcs() {
    let b: std::vec::Vec<_> = blocks(sector(ROTATED)).map(Result::unwrap).collect();
    assert_eq!(b.len(), 2);
    assert!(b
        .iter()
        .all(|b| b.scheme() == Scheme::Rsa3072 && b.crc_valid()));
    assert_eq!(b[0].key_digest(), rsa_key());
    assert_eq!(b[1].key_digest(), rsa2_key());
    assert_eq!(b[0].image_digest(), padded_digest(ROTATED));
    let e: std::vec::Vec<_> = blocks(sector(ECDSA_SIGNED)).map(Result::unwrap).collect();
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].scheme(), Scheme::EcdsaP256);
    assert_eq!(e[0].key_digest(), ec_key());
    assert!(e[0].crc_valid());
}

#[test]
fn key_lists_read_like_the_build_variable_is_written() {
    let (a, b) = (rsa_key(), ec_key());
    let text = std::format!("{} , {}", hex::encode(a), hex::encode_upper(b));
    let (keys, n) = parse_key_list(&text).unwrap();
    assert_eq!((n, keys[0], keys[1]), (2, a, b));
    assert_eq!(parse_key_list("").unwrap().1, 0);
    assert_eq!(parse_key_list("  ").unwrap().1, 0);
    let one = hex::encode(a);
    assert_eq!(parse_key_list(&one).unwrap().1, 1);
    for bad in [
        std::format!("{one},"),
        std::format!(",{one}"),
        std::format!("{one},{one},{one},{one}"),
        one[..63].into(),
        std::format!("{one}0"),
        std::format!("{}g", &one[..63]),
        std::format!("{one};{one}"),
    ] {
        assert_eq!(parse_key_list(&bad), None, "{bad:?}");
    }
}

#[test]
fn a_policy_without_keys_accepts_anything() {
    assert_eq!(
        check(&TrustPolicy::default(), Chip::Esp32c3, None, &[0; 32]),
        Ok(())
    );
}

#[test]
fn a_policy_with_keys_but_no_verifier_refuses() {
    let mut policy = TrustPolicy::new(&[rsa_key()], &Never);
    policy.verifier = None;
    let s = sector(RSA_SIGNED);
    assert_eq!(
        check(&policy, Chip::Esp32c3, Some(s), &padded_digest(RSA_SIGNED)),
        Err(Refusal::NoVerifier)
    );
}

#[test]
fn an_empty_sector_is_no_signature() {
    let policy = TrustPolicy::new(&[rsa_key()], &Never);
    let empty = [0xFF; SECTOR_LEN];
    assert_eq!(
        check(&policy, Chip::Esp32c3, Some(&empty), &[0; 32]),
        Err(Refusal::NoSignature)
    );
    assert_eq!(
        check(&policy, Chip::Esp32c3, None, &[0; 32]),
        Err(Refusal::NoSignature)
    );
}

#[cfg(feature = "soft-verify")]
mod soft {
    use super::*;

    fn trusting(keys: &[KeyDigest]) -> TrustPolicy {
        TrustPolicy::new(keys, SoftVerifier::INSTANCE)
    }

    #[test]
    fn an_espsecure_rsa_signature_verifies() {
        let d = padded_digest(RSA_SIGNED);
        assert_eq!(
            check(
                &trusting(&[rsa_key()]),
                Chip::Esp32c3,
                Some(sector(RSA_SIGNED)),
                &d
            ),
            Ok(())
        );
    }

    #[test]
    fn an_espsecure_ecdsa_signature_verifies_on_c6_but_not_on_c3() {
        let d = padded_digest(ECDSA_SIGNED);
        let p = trusting(&[ec_key()]);
        assert_eq!(
            check(&p, Chip::Esp32c6, Some(sector(ECDSA_SIGNED)), &d),
            Ok(())
        );
        assert_eq!(
            check(&p, Chip::Esp32c3, Some(sector(ECDSA_SIGNED)), &d),
            Err(Refusal::UnknownKey)
        );
    }

    #[test]
    fn a_rotated_image_passes_with_either_key_alone() {
        let d = padded_digest(ROTATED);
        let s = sector(ROTATED);
        assert_eq!(
            check(&trusting(&[rsa_key()]), Chip::Esp32c3, Some(s), &d),
            Ok(())
        );
        assert_eq!(
            check(&trusting(&[rsa2_key()]), Chip::Esp32c3, Some(s), &d),
            Ok(())
        );
        assert_eq!(
            check(&trusting(&[ec_key()]), Chip::Esp32c3, Some(s), &d),
            Err(Refusal::UnknownKey)
        );
    }

    #[test]
    fn other_image_bytes_do_not_verify() {
        let mut d = padded_digest(RSA_SIGNED);
        d[0] ^= 1;
        assert_eq!(
            check(
                &trusting(&[rsa_key()]),
                Chip::Esp32c3,
                Some(sector(RSA_SIGNED)),
                &d
            ),
            Err(Refusal::DoesNotVerify)
        );
    }

    #[test]
    fn a_changed_signature_with_a_fixed_crc_does_not_verify() {
        let mut s = *sector(RSA_SIGNED);
        s[900] ^= 0x40;
        let crc = block_crc(s[..BLOCK_LEN].try_into().unwrap());
        s[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            check(
                &trusting(&[rsa_key()]),
                Chip::Esp32c3,
                Some(&s),
                &padded_digest(RSA_SIGNED)
            ),
            Err(Refusal::DoesNotVerify)
        );
    }

    #[test]
    fn a_bad_crc_is_a_corrupt_block() {
        let mut s = *sector(RSA_SIGNED);
        s[CRC_OFFSET] ^= 1;
        assert_eq!(
            check(
                &trusting(&[rsa_key()]),
                Chip::Esp32c3,
                Some(&s),
                &padded_digest(RSA_SIGNED)
            ),
            Err(Refusal::CorruptBlock)
        );
    }
}

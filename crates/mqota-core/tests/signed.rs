//! Signed images through the update engine: a device trusting keys activates
//! only images with a block that verifies, and keeps its firmware otherwise.

mod common;

use common::*;
use mqota_core::engine::{Engine, EngineConfig};
use mqota_core::image::{self, Chip};
use mqota_core::otadata::Otadata;
use mqota_core::protocol::{ErrorCode, Phase};
use mqota_core::signature::sign::{sign_file, Key};
use mqota_core::signature::{
    self, blocks, KeyDigest, Refusal, Scheme, SoftVerifier, TrustPolicy, CRC_OFFSET, SECTOR_LEN,
};
use std::sync::OnceLock;

const URL: &str = "http://fw.example/fw.bin";

fn rsa_key(which: usize) -> &'static Key {
    static KEYS: [OnceLock<Key>; 2] = [OnceLock::new(), OnceLock::new()];
    KEYS[which].get_or_init(|| {
        let k = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 3072).unwrap();
        Key::RsaPrivate(k)
    })
}

fn trusting(keys: &[KeyDigest]) -> Rig {
    let mut d = device();
    let mut cfg = EngineConfig::new("dev-1", Chip::Esp32c3, "1.0.0");
    cfg.progress_interval_ms = 0;
    cfg.trust = TrustPolicy::new(keys, SoftVerifier::INSTANCE);
    d.engine = Engine::new(cfg, d.layout.clone());
    d
}

fn v2() -> Vec<u8> {
    image(Chip::Esp32c3, "1.1.0", 100_000)
}

/// Serves `file` and asserts the job failed with `bad_signature` and `why`,
/// the running slot and otadata untouched.
fn assert_refused(d: &mut Rig, file: &[u8], why: Refusal) {
    let slot0 = d.slot_bytes(0, 200_000);
    let ota = Otadata::read(&mut d.flash, d.layout.otadata).unwrap();
    let a = d.engine.begin_ota(&mut d.flash, d.now, URL);
    d.apply(a);
    d.serve(file);
    assert_eq!(d.failed_with(), Some(ErrorCode::BadSignature));
    assert_eq!(d.last().message.as_deref(), Some(why.reason()));
    assert!(!d.rebooted);
    assert_eq!(d.slot_bytes(0, 200_000), slot0);
    assert_eq!(Otadata::read(&mut d.flash, d.layout.otadata).unwrap(), ota);
}

fn assert_activated(d: &mut Rig, file: &[u8]) {
    let a = d.engine.begin_ota(&mut d.flash, d.now, URL);
    d.apply(a);
    d.serve(file);
    assert_eq!(d.failed_with(), None, "{:?}", d.last());
    assert_eq!(d.phases().last(), Some(&Phase::Rebooting));
    assert_eq!(d.slot_bytes(1, file.len()), file);
}

#[test]
fn a_signed_image_is_activated_by_a_device_trusting_its_key() {
    let key = rsa_key(0);
    let signed = sign_file(&v2(), key).unwrap();
    assert_activated(&mut trusting(&[key.digest()]), &signed);
}

#[test]
fn a_device_without_keys_takes_signed_and_unsigned_images() {
    let signed = sign_file(&v2(), rsa_key(0)).unwrap();
    assert_activated(&mut device(), &signed);
    assert_activated(&mut device(), &v2());
}

#[test]
fn an_unsigned_image_is_refused_with_no_signature() {
    assert_refused(
        &mut trusting(&[rsa_key(0).digest()]),
        &v2(),
        Refusal::NoSignature,
    );
}

#[test]
fn an_image_signed_by_another_key_is_refused_as_unknown_key() {
    let signed = sign_file(&v2(), rsa_key(1)).unwrap();
    assert_refused(
        &mut trusting(&[rsa_key(0).digest()]),
        &signed,
        Refusal::UnknownKey,
    );
}

#[test]
fn a_flipped_image_byte_is_a_bad_signature_before_anything_else() {
    let key = rsa_key(0);
    let mut signed = sign_file(&v2(), key).unwrap();
    // Breaks the image checksum and appended hash too: the signature speaks first.
    signed[1000] ^= 0x01;
    assert_refused(
        &mut trusting(&[key.digest()]),
        &signed,
        Refusal::DoesNotVerify,
    );
}

#[test]
fn a_block_whose_digest_differs_from_the_flash_does_not_verify() {
    // Sign one image, put its sector behind another of the same length:
    // the image is valid, the signature is not for it.
    let key = rsa_key(0);
    let a = sign_file(&v2(), key).unwrap();
    let other = sign_file(&image(Chip::Esp32c3, "1.2.0", 100_000), key).unwrap();
    assert_eq!(a.len(), other.len());
    let mut mixed = other.clone();
    let at = mixed.len() - SECTOR_LEN;
    mixed[at..].copy_from_slice(&a[at..]);
    assert_refused(
        &mut trusting(&[key.digest()]),
        &mixed,
        Refusal::DoesNotVerify,
    );
}

#[test]
fn a_block_with_a_bad_crc_is_refused() {
    let key = rsa_key(0);
    let mut signed = sign_file(&v2(), key).unwrap();
    let at = signed.len() - SECTOR_LEN + CRC_OFFSET;
    signed[at] ^= 0xFF;
    assert_refused(
        &mut trusting(&[key.digest()]),
        &signed,
        Refusal::CorruptBlock,
    );
}

#[test]
fn an_image_signed_by_the_old_and_the_new_key_passes_a_device_trusting_only_the_new() {
    let (old, new) = (rsa_key(0), rsa_key(1));
    let both = sign_file(&sign_file(&v2(), old).unwrap(), new).unwrap();
    let sector: &[u8; SECTOR_LEN] = both[both.len() - SECTOR_LEN..].try_into().unwrap();
    assert_eq!(blocks(sector).count(), 2);
    assert_activated(&mut trusting(&[new.digest()]), &both);
}

#[test]
fn signing_twice_with_one_key_is_refused() {
    let key = rsa_key(0);
    let once = sign_file(&v2(), key).unwrap();
    assert!(sign_file(&once, key).is_err());
}

#[test]
fn an_ecdsa_signature_made_here_verifies_and_its_digest_matches_the_block() {
    let key = Key::EcdsaPrivate(p256::ecdsa::SigningKey::random(&mut rand_core::OsRng));
    let img = image(Chip::Esp32c6, "1.1.0", 50_000);
    let signed = sign_file(&img, &key).unwrap();
    let info = image::validate_bytes(&signed).unwrap();
    let sector: &[u8; SECTOR_LEN] = signed[signed.len() - SECTOR_LEN..].try_into().unwrap();
    let b = blocks(sector).next().unwrap().unwrap();
    assert_eq!(b.scheme(), Scheme::EcdsaP256);
    assert_eq!(b.key_digest(), key.digest());
    let policy = TrustPolicy::new(&[key.digest()], SoftVerifier::INSTANCE);
    assert_eq!(
        signature::check(
            &policy,
            Chip::Esp32c6,
            Some(sector),
            &info.padded_sha256.unwrap()
        ),
        Ok(())
    );
}

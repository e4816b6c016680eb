//! Host side: reading signing keys and writing signature blocks the way
//! `espsecure sign-data --version 2` does, so either tool's output verifies
//! with the other's.

use super::{
    block_crc, blocks, KeyDigest, Scheme, BLOCK_LEN, BLOCK_MAGIC, CRC_OFFSET, CURVE_P256,
    MAX_BLOCKS, SECTOR_LEN, VERSION_ECDSA, VERSION_RSA,
};
use crate::image::{self, ImageError, SIGNATURE_ALIGN};
use p256::ecdsa::signature::hazmat::PrehashSigner;
use p256::pkcs8::{DecodePrivateKey as _, DecodePublicKey as _};
use rsa::pkcs1::{DecodeRsaPrivateKey as _, DecodeRsaPublicKey as _};
use rsa::traits::PublicKeyParts as _;
use rsa::{BigUint, Pss, RsaPrivateKey, RsaPublicKey};
use sha2::{Digest, Sha256};
use std::vec::Vec;

/// Why a key or a file cannot be used. Nothing in here ever quotes key
/// material.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SignError {
    /// The PEM text is no RSA-3072 or P-256 key this reads (PKCS#8, PKCS#1,
    /// SEC1, SPKI). Fix the key file.
    BadKey(&'static str),
    /// A public key where a private one is needed.
    NotPrivate,
    /// The file is not a valid app image. Rebuild it.
    Image(ImageError),
    /// The sector already holds three blocks.
    SectorFull,
    /// The key already signed this file.
    AlreadySigned,
}

impl core::fmt::Display for SignError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SignError::BadKey(why) => write!(f, "not a usable signing key: {why}"),
            SignError::NotPrivate => {
                f.write_str("this is a public key; signing needs the private key")
            }
            SignError::Image(e) => write!(f, "not a valid app image: {e}"),
            SignError::SectorFull => f.write_str("the signature sector already holds 3 blocks"),
            SignError::AlreadySigned => f.write_str("this key already signed the image"),
        }
    }
}

impl std::error::Error for SignError {}

/// A Secure Boot V2 key, private or public.
// Few keys live at once; boxing the RSA key buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
#[non_exhaustive]
pub enum Key {
    /// RSA-3072 private key.
    RsaPrivate(RsaPrivateKey),
    /// RSA-3072 public key.
    RsaPublic(RsaPublicKey),
    /// P-256 private key.
    EcdsaPrivate(p256::ecdsa::SigningKey),
    /// P-256 public key.
    EcdsaPublic(p256::ecdsa::VerifyingKey),
}

impl core::fmt::Debug for Key {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // Never the key itself.
        f.debug_struct("Key")
            .field("scheme", &self.scheme())
            .field("private", &self.is_private())
            .finish()
    }
}

impl Key {
    /// Reads a PEM key: PKCS#8 or SPKI of either scheme, PKCS#1 RSA, or SEC1
    /// EC — what `espsecure generate-signing-key`, `openssl` and
    /// `mqota keys new` write.
    pub fn from_pem(text: &str) -> Result<Key, SignError> {
        let key = if let Ok(k) = RsaPrivateKey::from_pkcs8_pem(text) {
            Key::RsaPrivate(k)
        } else if let Ok(k) = RsaPrivateKey::from_pkcs1_pem(text) {
            Key::RsaPrivate(k)
        } else if let Ok(k) = RsaPublicKey::from_public_key_pem(text) {
            Key::RsaPublic(k)
        } else if let Ok(k) = RsaPublicKey::from_pkcs1_pem(text) {
            Key::RsaPublic(k)
        } else if let Ok(k) = p256::SecretKey::from_pkcs8_pem(text) {
            Key::EcdsaPrivate(k.into())
        } else if let Ok(k) = p256::SecretKey::from_sec1_pem(text) {
            Key::EcdsaPrivate(k.into())
        } else if let Ok(k) = p256::PublicKey::from_public_key_pem(text) {
            Key::EcdsaPublic(k.into())
        } else {
            return Err(SignError::BadKey(
                "expected an RSA-3072 or ECDSA P-256 key in PEM",
            ));
        };
        if let Key::RsaPrivate(_) | Key::RsaPublic(_) = &key {
            if key.rsa_public().is_some_and(|k| k.size() != 384) {
                return Err(SignError::BadKey("RSA keys must be 3072 bits"));
            }
        }
        Ok(key)
    }

    /// The key's scheme.
    pub fn scheme(&self) -> Scheme {
        match self {
            Key::RsaPrivate(_) | Key::RsaPublic(_) => Scheme::Rsa3072,
            Key::EcdsaPrivate(_) | Key::EcdsaPublic(_) => Scheme::EcdsaP256,
        }
    }

    /// Whether this key can sign.
    pub fn is_private(&self) -> bool {
        matches!(self, Key::RsaPrivate(_) | Key::EcdsaPrivate(_))
    }

    fn rsa_public(&self) -> Option<RsaPublicKey> {
        match self {
            Key::RsaPrivate(k) => Some(k.to_public_key()),
            Key::RsaPublic(k) => Some(k.clone()),
            _ => None,
        }
    }

    fn ec_public(&self) -> Option<p256::ecdsa::VerifyingKey> {
        match self {
            Key::EcdsaPrivate(k) => Some(*k.verifying_key()),
            Key::EcdsaPublic(k) => Some(*k),
            _ => None,
        }
    }

    /// The key material exactly as a block carries it (bytes 36..812 of an
    /// RSA block, 36..101 of an ECDSA block).
    pub fn material(&self) -> Vec<u8> {
        let mut m = Vec::new();
        if let Some(k) = self.rsa_public() {
            m.extend_from_slice(&le_fixed(k.n(), 384));
            let e = low_u32(k.e());
            m.extend_from_slice(&e.to_le_bytes());
            // R = 2^6144 mod n and M' = -n^-1 mod 2^32, for the ROM's
            // Montgomery multiplication.
            let r = (BigUint::from(1u8) << 6144) % k.n();
            m.extend_from_slice(&le_fixed(&r, 384));
            let n0 = low_u32(k.n());
            let mut inv: u32 = 1;
            for _ in 0..5 {
                inv = inv.wrapping_mul(2u32.wrapping_sub(n0.wrapping_mul(inv)));
            }
            m.extend_from_slice(&inv.wrapping_neg().to_le_bytes());
        } else if let Some(k) = self.ec_public() {
            let point = k.to_encoded_point(false);
            m.push(CURVE_P256);
            let mut x: [u8; 32] = (*point.x().expect("uncompressed")).into();
            let mut y: [u8; 32] = (*point.y().expect("uncompressed")).into();
            x.reverse();
            y.reverse();
            m.extend_from_slice(&x);
            m.extend_from_slice(&y);
        }
        m
    }

    /// The key digest a device trusts: what `espsecure
    /// digest-sbv2-public-key` writes.
    pub fn digest(&self) -> KeyDigest {
        Sha256::digest(self.material()).into()
    }

    /// A signature block over `padded_digest` (the SHA-256 of the image
    /// padded to 4 KiB).
    pub fn block(&self, padded_digest: &[u8; 32]) -> Result<[u8; BLOCK_LEN], SignError> {
        let mut b = [0u8; BLOCK_LEN];
        b[0] = BLOCK_MAGIC;
        b[4..36].copy_from_slice(padded_digest);
        let material = self.material();
        b[36..36 + material.len()].copy_from_slice(&material);
        match self {
            Key::RsaPrivate(k) => {
                b[1] = VERSION_RSA;
                let mut sig = k
                    .sign_with_rng(
                        &mut rand_core::OsRng,
                        Pss::new_with_salt::<Sha256>(32),
                        padded_digest,
                    )
                    .map_err(|_| SignError::BadKey("RSA signing failed"))?;
                sig.reverse();
                b[812..812 + 384].copy_from_slice(&sig);
            }
            Key::EcdsaPrivate(k) => {
                b[1] = VERSION_ECDSA;
                let sig: p256::ecdsa::Signature = k
                    .sign_prehash(padded_digest)
                    .map_err(|_| SignError::BadKey("ECDSA signing failed"))?;
                let (r, s) = sig.split_bytes();
                let (mut r, mut s): ([u8; 32], [u8; 32]) = (r.into(), s.into());
                r.reverse();
                s.reverse();
                b[101..133].copy_from_slice(&r);
                b[133..165].copy_from_slice(&s);
            }
            _ => return Err(SignError::NotPrivate),
        }
        let crc = block_crc(&b);
        b[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
        Ok(b)
    }
}

/// The low 32 bits of a number.
fn low_u32(n: &BigUint) -> u32 {
    let b = le_fixed(n, 4);
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// A number as exactly `len` little-endian bytes.
fn le_fixed(n: &BigUint, len: usize) -> Vec<u8> {
    let mut v = n.to_bytes_le();
    v.resize(len.max(v.len()), 0);
    v
}

/// Signs an app image file: pads a bare image with 0xFF to 4 KiB and appends
/// a signature sector, or adds a block to the sector a signed file already
/// has (key rotation: run once per key, at most three).
pub fn sign_file(file: &[u8], key: &Key) -> Result<Vec<u8>, SignError> {
    if !key.is_private() {
        return Err(SignError::NotPrivate);
    }
    let info = image::validate_bytes(file).map_err(SignError::Image)?;
    let padded_len = info.len.next_multiple_of(SIGNATURE_ALIGN) as usize;
    let mut out = file[..info.len as usize].to_vec();
    out.resize(padded_len, 0xFF);
    let mut sector = [0xFF; SECTOR_LEN];
    if info.file_len > info.len {
        sector.copy_from_slice(&file[padded_len..]);
    }
    let digest: [u8; 32] = Sha256::digest(&out).into();
    let mine = key.digest();
    let mut used = 0;
    for b in blocks(&sector) {
        if b.is_ok_and(|b| b.key_digest() == mine) {
            return Err(SignError::AlreadySigned);
        }
        used += 1;
    }
    if used == MAX_BLOCKS {
        return Err(SignError::SectorFull);
    }
    let block = key.block(&digest)?;
    sector[used * BLOCK_LEN..(used + 1) * BLOCK_LEN].copy_from_slice(&block);
    out.extend_from_slice(&sector);
    Ok(out)
}

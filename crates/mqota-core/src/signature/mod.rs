//! ESP-IDF Secure Boot V2 signatures: the signature sector after an image,
//! its blocks, the public-key digests a device trusts, and the check a device
//! runs before it activates a downloaded image.
//!
//! The format is ESP-IDF's own (`ets_secure_boot_sig_block_t` in
//! `esp_rom/include/*/rom/secure_boot.h`, written by `espsecure sign-data
//! --version 2`), so keys, signed images and the vendor tools carry over.
//! No maintained `no_std` crate parses it; the layout is small and fixed.
//!
//! An image is padded with 0xFF to a multiple of 4 KiB and followed by one
//! 4 KiB sector holding up to [`MAX_BLOCKS`] blocks of [`BLOCK_LEN`] bytes;
//! the rest of the sector is 0xFF.
//!
//! | offset | size | RSA-3072 block (version 2) | ECDSA block (version 3) |
//! |---|---|---|---|
//! | 0 | 1 | magic 0xE7 | magic 0xE7 |
//! | 1 | 1 | version 2 | version 3 |
//! | 2 | 2 | zero | zero |
//! | 4 | 32 | SHA-256 of the padded image | SHA-256 of the padded image |
//! | 36 | 384 | modulus n, little-endian | curve id (1 byte, 2 = P-256) |
//! | 37 | 64 | | X ‖ Y, each 32 bytes little-endian |
//! | 101 | 64 | | r ‖ s, each 32 bytes little-endian |
//! | 420 | 4 | exponent e | |
//! | 424 | 384 | R = 2^6144 mod n (for the ROM's Montgomery code) | |
//! | 808 | 4 | M' = −n⁻¹ mod 2^32 | |
//! | 812 | 384 | RSA-PSS signature (SHA-256, MGF1, salt 32), byte-reversed | |
//! | 1196 | 4 | CRC-32 of bytes 0..1196 | CRC-32 of bytes 0..1196 |
//! | 1200 | 16 | zero | zero |
//!
//! A key's digest — what the eFuse key blocks hold and `espsecure
//! digest-sbv2-public-key` prints — is the SHA-256 of the key material:
//! bytes 36..812 of an RSA block, bytes 36..101 of an ECDSA block.
//!
//! The arithmetic comes through [`SignatureVerifier`], so a chip can plug in
//! its RSA and ECC accelerators; the `soft-verify` feature provides
//! `SoftVerifier` from the `rsa` and `p256` crates (RSA needs an allocator).

use crate::image::Chip;
use crc::{Crc, CRC_32_ISO_HDLC};
use sha2::{Digest, Sha256};

#[cfg(feature = "soft-verify")]
mod soft;
#[cfg(feature = "soft-verify")]
pub use soft::SoftVerifier;
#[cfg(feature = "sign")]
pub mod sign;

/// Length of the signature sector.
pub const SECTOR_LEN: usize = 4096;
/// Length of one signature block (`ets_secure_boot_sig_block_t`).
pub const BLOCK_LEN: usize = 1216;
/// At most this many blocks in a sector, and trusted keys on a device
/// (`SECURE_BOOT_NUM_BLOCKS`).
pub const MAX_BLOCKS: usize = 3;
/// First byte of every block (`ETS_SECURE_BOOT_V2_SIGNATURE_BLOCK_MAGIC`).
pub const BLOCK_MAGIC: u8 = 0xE7;
/// Block version of RSA-3072-PSS blocks.
pub const VERSION_RSA: u8 = 2;
/// Block version of ECDSA blocks.
pub const VERSION_ECDSA: u8 = 3;
/// Curve id of P-256 in an ECDSA block (`ECDSA_CURVE_P256`).
pub const CURVE_P256: u8 = 2;
/// Offset of the CRC-32 in a block; it covers every byte before it.
pub const CRC_OFFSET: usize = 1196;

const DIGEST_AT: usize = 4;
const KEY_AT: usize = 36;
const RSA_KEY_END: usize = 812;
const RSA_E_AT: usize = 420;
const RSA_SIG_AT: usize = 812;
const EC_POINT_AT: usize = 37;
const EC_KEY_END: usize = 101;
const EC_SIG_AT: usize = 101;

/// The SHA-256 of a public key's material: what a device trusts.
pub type KeyDigest = [u8; 32];

const CRC32: Crc<u32> = Crc::<u32>::new(&CRC_32_ISO_HDLC);

/// The signature scheme of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Scheme {
    /// RSA-3072 with PSS padding (block version 2), every chip.
    Rsa3072,
    /// ECDSA over NIST P-256 (block version 3), only chips that support it.
    EcdsaP256,
}

impl Scheme {
    /// The name `mqota` and `espsecure` use for it.
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Rsa3072 => "rsa3072",
            Scheme::EcdsaP256 => "ecdsa256",
        }
    }

    /// Whether the bootloader ROM of `chip` verifies this scheme
    /// (ESP-IDF's `SOC_SECURE_BOOT_V2_ECC`): ECDSA needs C2, C5, C6, H2 or P4.
    pub fn supported_on(self, chip: Chip) -> bool {
        match self {
            Scheme::Rsa3072 => true,
            Scheme::EcdsaP256 => matches!(
                chip,
                Chip::Esp32c2 | Chip::Esp32c5 | Chip::Esp32c6 | Chip::Esp32h2 | Chip::Esp32p4
            ),
        }
    }
}

/// Why a slot of the sector holds no usable block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BlockError {
    /// Magic right, version neither 2 nor 3, or an ECDSA curve other than
    /// P-256: a format this device cannot check. Skip the block.
    Unsupported {
        /// The block's version byte.
        version: u8,
    },
}

/// One signature block, borrowed from the sector.
#[derive(Clone, Copy)]
pub struct Block<'a> {
    bytes: &'a [u8; BLOCK_LEN],
    scheme: Scheme,
}

impl core::fmt::Debug for Block<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Block")
            .field("scheme", &self.scheme)
            .field("crc_valid", &self.crc_valid())
            .finish_non_exhaustive()
    }
}

impl<'a> Block<'a> {
    /// Reads the block in `bytes`: `None` when the magic is missing (an empty
    /// slot: the sector is 0xFF there).
    pub fn parse(bytes: &'a [u8; BLOCK_LEN]) -> Option<Result<Self, BlockError>> {
        if bytes[0] != BLOCK_MAGIC {
            return None;
        }
        let version = bytes[1];
        let scheme = match version {
            VERSION_RSA => Scheme::Rsa3072,
            VERSION_ECDSA if bytes[KEY_AT] == CURVE_P256 => Scheme::EcdsaP256,
            _ => return Some(Err(BlockError::Unsupported { version })),
        };
        Some(Ok(Self { bytes, scheme }))
    }

    /// The raw 1,216 bytes.
    pub fn bytes(&self) -> &'a [u8; BLOCK_LEN] {
        self.bytes
    }

    /// The block's scheme.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The SHA-256 of the padded image this block claims to sign.
    pub fn image_digest(&self) -> [u8; 32] {
        self.bytes[DIGEST_AT..DIGEST_AT + 32].try_into().unwrap()
    }

    /// The public key material the key digest is taken over.
    pub fn key_material(&self) -> &'a [u8] {
        match self.scheme {
            Scheme::Rsa3072 => &self.bytes[KEY_AT..RSA_KEY_END],
            Scheme::EcdsaP256 => &self.bytes[KEY_AT..EC_KEY_END],
        }
    }

    /// The digest of the block's public key.
    pub fn key_digest(&self) -> KeyDigest {
        Sha256::digest(self.key_material()).into()
    }

    /// The CRC-32 stored in the block.
    pub fn stored_crc(&self) -> u32 {
        u32::from_le_bytes(self.bytes[CRC_OFFSET..CRC_OFFSET + 4].try_into().unwrap())
    }

    /// Whether the stored CRC-32 matches bytes 0..1196.
    pub fn crc_valid(&self) -> bool {
        CRC32.checksum(&self.bytes[..CRC_OFFSET]) == self.stored_crc()
    }

    /// Checks the signature over `image_digest` with `verifier` (not the
    /// CRC, not the digest match: see [`check`]).
    pub fn signature_verifies(&self, verifier: &dyn SignatureVerifier) -> bool {
        let b = self.bytes;
        let digest = self.image_digest();
        match self.scheme {
            Scheme::Rsa3072 => verifier.verify_rsa3072_pss(
                b[KEY_AT..KEY_AT + 384].try_into().unwrap(),
                u32::from_le_bytes(b[RSA_E_AT..RSA_E_AT + 4].try_into().unwrap()),
                &digest,
                b[RSA_SIG_AT..RSA_SIG_AT + 384].try_into().unwrap(),
            ),
            Scheme::EcdsaP256 => verifier.verify_ecdsa_p256(
                b[EC_POINT_AT..EC_POINT_AT + 32].try_into().unwrap(),
                b[EC_POINT_AT + 32..EC_POINT_AT + 64].try_into().unwrap(),
                &digest,
                b[EC_SIG_AT..EC_SIG_AT + 32].try_into().unwrap(),
                b[EC_SIG_AT + 32..EC_SIG_AT + 64].try_into().unwrap(),
            ),
        }
    }
}

/// The blocks of a signature sector, in order, stopping at the first empty
/// slot as the ROM does.
pub fn blocks(sector: &[u8; SECTOR_LEN]) -> impl Iterator<Item = Result<Block<'_>, BlockError>> {
    sector
        .chunks_exact(BLOCK_LEN)
        .take(MAX_BLOCKS)
        .map_while(|c| Block::parse(c.try_into().unwrap()))
}

/// The CRC-32 a block's bytes 0..1196 must carry, for tools that write blocks.
pub fn block_crc(block: &[u8; BLOCK_LEN]) -> u32 {
    CRC32.checksum(&block[..CRC_OFFSET])
}

/// Signature arithmetic, so a chip can use its accelerators. Every input is
/// in the block's byte order (little-endian); each call answers only whether
/// the signature is valid for `digest`, a SHA-256 that is signed as is
/// (prehashed).
pub trait SignatureVerifier: Sync {
    /// RSA-3072 PSS (SHA-256, MGF1-SHA-256, salt 32) over `digest`.
    fn verify_rsa3072_pss(
        &self,
        modulus_le: &[u8; 384],
        exponent: u32,
        digest: &[u8; 32],
        signature_le: &[u8; 384],
    ) -> bool;

    /// ECDSA P-256 over `digest` with public point (x, y) and signature (r, s).
    fn verify_ecdsa_p256(
        &self,
        x_le: &[u8; 32],
        y_le: &[u8; 32],
        digest: &[u8; 32],
        r_le: &[u8; 32],
        s_le: &[u8; 32],
    ) -> bool;
}

/// What a device trusts. With no keys it accepts unsigned images (and says
/// so: `signed_only: false` in its status); with keys it accepts only images
/// signed by one of them.
///
/// Plain arrays, no destructor: a `DeviceConfig` holding one stays usable
/// in a `const`.
#[derive(Clone, Copy, Default)]
pub struct TrustPolicy {
    keys: [KeyDigest; MAX_BLOCKS],
    len: u8,
    verifier: Option<&'static dyn SignatureVerifier>,
}

impl core::fmt::Debug for TrustPolicy {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TrustPolicy")
            .field("keys", &self.len)
            .field("verifier", &self.verifier.is_some())
            .finish()
    }
}

impl PartialEq for TrustPolicy {
    fn eq(&self, other: &Self) -> bool {
        let same_verifier = match (self.verifier, other.verifier) {
            (Some(a), Some(b)) => core::ptr::addr_eq(a, b),
            (a, b) => a.is_none() && b.is_none(),
        };
        self.keys() == other.keys() && same_verifier
    }
}

impl Eq for TrustPolicy {}

impl TrustPolicy {
    /// Trusts no key: unsigned images are accepted. A `const fn`, for
    /// build-time configuration.
    pub const fn none() -> Self {
        Self {
            keys: [[0; 32]; MAX_BLOCKS],
            len: 0,
            verifier: None,
        }
    }

    /// A policy trusting `keys` (more than [`MAX_BLOCKS`] are cut off), checked by `verifier`.
    pub fn new(keys: &[KeyDigest], verifier: &'static dyn SignatureVerifier) -> Self {
        let mut p = Self::none();
        let len = keys.len().min(MAX_BLOCKS);
        p.keys[..len].copy_from_slice(&keys[..len]);
        p.len = len as u8;
        p.verifier = Some(verifier);
        p
    }

    /// The trusted key digests.
    pub fn keys(&self) -> &[KeyDigest] {
        &self.keys[..self.len as usize]
    }

    /// The arithmetic, if one was given.
    pub fn verifier(&self) -> Option<&'static dyn SignatureVerifier> {
        self.verifier
    }

    /// Whether only signed images are accepted: true once any key is trusted.
    pub fn signed_only(&self) -> bool {
        self.len > 0
    }
}

/// Reads up to [`MAX_BLOCKS`] key digests written as 64 hex digits each,
/// separated by commas (spaces around them allowed; empty text is no key).
/// A `const fn`, so firmware can take its trusted keys from a build-time
/// variable and fail the build on a typo. Returns the digests and how many
/// were given, or `None` for malformed text or more than three keys.
pub const fn parse_key_list(text: &str) -> Option<([KeyDigest; MAX_BLOCKS], usize)> {
    let b = text.as_bytes();
    let mut keys = [[0u8; 32]; MAX_BLOCKS];
    let mut count = 0;
    let mut i = 0;
    loop {
        while i < b.len() && b[i] == b' ' {
            i += 1;
        }
        if i == b.len() {
            // Empty text, or a trailing comma after a key.
            return if count == 0 || b[b.len() - 1] != b',' {
                Some((keys, count))
            } else {
                None
            };
        }
        if count == MAX_BLOCKS || i + 64 > b.len() {
            return None;
        }
        let mut j = 0;
        while j < 32 {
            let (Some(hi), Some(lo)) = (hex_digit(b[i + 2 * j]), hex_digit(b[i + 2 * j + 1]))
            else {
                return None;
            };
            keys[count][j] = hi << 4 | lo;
            j += 1;
        }
        count += 1;
        i += 64;
        while i < b.len() && b[i] == b' ' {
            i += 1;
        }
        if i == b.len() {
            return Some((keys, count));
        }
        if b[i] != b',' {
            return None;
        }
        i += 1;
    }
}

const fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Why an image was refused; the engine fails the job with `bad_signature`
/// and [`Refusal::reason`] as its message. In every case the image is not
/// activated: report, do not retry the same file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// No signature sector, or no block in it.
    NoSignature,
    /// No block carries a trusted key usable on this chip.
    UnknownKey,
    /// A trusted key's block has a wrong CRC-32.
    CorruptBlock,
    /// A trusted key's block signs other bytes than those in flash, or its
    /// signature is wrong.
    DoesNotVerify,
    /// Keys are trusted but no verifier was configured: a build mistake.
    NoVerifier,
}

impl Refusal {
    /// The one-line reason sent with `bad_signature`.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::NoSignature => "no signature",
            Refusal::UnknownKey => "unknown key",
            Refusal::CorruptBlock => "signature block CRC is wrong",
            Refusal::DoesNotVerify => "signature does not verify",
            Refusal::NoVerifier => "no signature verifier configured",
        }
    }
}

impl core::fmt::Display for Refusal {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.reason())
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Refusal {}

/// The check before activation, as `esp_secure_boot_verify_sbv2_signature_block`
/// runs it: some block must carry a trusted key usable on `chip`, a correct
/// CRC, the digest of the padded image in flash (`padded_digest`) and a
/// signature that verifies. Blocks of other keys are skipped, so an image
/// signed by an old and a new key passes on a device trusting either.
///
/// `sector` is `None` when the file has no signature sector. A policy
/// without keys accepts everything.
pub fn check(
    policy: &TrustPolicy,
    chip: Chip,
    sector: Option<&[u8; SECTOR_LEN]>,
    padded_digest: &[u8; 32],
) -> Result<(), Refusal> {
    if !policy.signed_only() {
        return Ok(());
    }
    let Some(verifier) = policy.verifier() else {
        return Err(Refusal::NoVerifier);
    };
    let Some(sector) = sector else {
        return Err(Refusal::NoSignature);
    };
    let mut worst = Refusal::NoSignature;
    for block in blocks(sector) {
        let Ok(block) = block else {
            worst = worst_of(worst, Refusal::UnknownKey);
            continue;
        };
        if !block.scheme().supported_on(chip) || !policy.keys().contains(&block.key_digest()) {
            worst = worst_of(worst, Refusal::UnknownKey);
            continue;
        }
        if !block.crc_valid() {
            worst = worst_of(worst, Refusal::CorruptBlock);
            continue;
        }
        if block.image_digest() != *padded_digest || !block.signature_verifies(verifier) {
            worst = worst_of(worst, Refusal::DoesNotVerify);
            continue;
        }
        return Ok(());
    }
    Err(worst)
}

/// The refusal that says most: a trusted block that fails beats an unknown key.
fn worst_of(a: Refusal, b: Refusal) -> Refusal {
    let rank = |r: Refusal| match r {
        Refusal::NoSignature => 0,
        Refusal::UnknownKey => 1,
        Refusal::CorruptBlock => 2,
        Refusal::DoesNotVerify => 3,
        Refusal::NoVerifier => 4,
    };
    if rank(b) > rank(a) {
        b
    } else {
        a
    }
}

#[cfg(test)]
mod tests;

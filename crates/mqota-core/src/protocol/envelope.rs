//! Signed commands: a JSON command wrapped in a JWS (RFC 7515) in compact
//! serialization, signed with ECDSA P-256 and SHA-256 (`ES256`, RFC 7518).
//!
//! ```text
//! BASE64URL(header) "." BASE64URL(command JSON) "." BASE64URL(r ‖ s)
//! ```
//!
//! The header must say `"alg":"ES256"` (other header fields are ignored);
//! the signature is over the ASCII bytes `header "." payload` exactly as
//! they arrive, so nothing is canonicalised: the device checks the bytes it
//! then reads. The command inside is read by
//! [`parse_signed_command`](super::parse_signed_command), which also binds it
//! to this device (`device` / `devices`), to its topic (`op`) and to a
//! sequence number (`seq`).
//!
//! # Why JWS with ES256
//!
//! It is a standard any JOSE library produces and checks (the tests sign
//! with Python's PyJWT), so a fleet owner can sign jobs with their own
//! tools or an HSM. ES256 is P-256 ECDSA, which the device already verifies
//! for ESP-IDF Secure Boot V2 ECDSA blocks through
//! [`SignatureVerifier::verify_ecdsa_p256`]: the firmware links no second
//! signature scheme for jobs, and a chip with an ECC accelerator can use it
//! for both. Ed25519 would be faster in software but adds its own curve
//! code to every image.
//!
//! # Why this parser
//!
//! The envelope is two dots and three base64url strings; `base64ct`
//! (RustCrypto's, constant-time, no allocation) decodes them into fixed
//! buffers and `serde-json-core` reads the header. No `no_std`, heap-free
//! JOSE crate exists to do the rest.

use base64ct::{Base64UrlUnpadded, Encoding};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::MAX_COMMAND_LEN;
use crate::signature::SignatureVerifier;

/// Largest signed command accepted, envelope included: a
/// [`MAX_COMMAND_LEN`] command grows by a third in base64url, plus the
/// header and the 86-character signature.
pub const MAX_SIGNED_COMMAND_LEN: usize = 1536;

/// Longest decoded header accepted.
const MAX_HEADER_LEN: usize = 256;

/// Why a signed command was refused (`bad_signature`). `docs/PROTOCOL.md`
/// lists them.
pub mod refusal {
    /// A device with a job key received a command that is not an envelope.
    pub const NOT_SIGNED: &str = "command is not signed";
    /// Not three base64url parts, or a part that does not decode.
    pub const MALFORMED: &str = "signed command is malformed";
    /// Longer than [`super::MAX_SIGNED_COMMAND_LEN`].
    pub const TOO_LONG: &str = "signed command is longer than 1536 bytes";
    /// The header names another algorithm than ES256.
    pub const ALGORITHM: &str = "signed command is not ES256";
    /// The signature is not the job key's over these bytes.
    pub const DOES_NOT_VERIFY: &str = "command signature does not verify";
}

/// A job-signing public key: a P-256 point.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct JobKey {
    x_le: [u8; 32],
    y_le: [u8; 32],
}

impl core::fmt::Debug for JobKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("JobKey(P-256)")
    }
}

impl JobKey {
    /// The key from its coordinates X ‖ Y, each 32 bytes big-endian (an
    /// uncompressed SEC1 point without its leading 0x04).
    pub const fn from_xy(xy: &[u8; 64]) -> Self {
        let mut x_le = [0u8; 32];
        let mut y_le = [0u8; 32];
        let mut i = 0;
        while i < 32 {
            x_le[i] = xy[31 - i];
            y_le[i] = xy[63 - i];
            i += 1;
        }
        Self { x_le, y_le }
    }

    /// The key from 128 hex digits (X ‖ Y, big-endian), as `mqota keys
    /// job-key` prints it. A `const fn`, so firmware can take the key from a
    /// build-time variable and fail the build on a typo. `None` for anything
    /// else.
    pub const fn from_hex(text: &str) -> Option<Self> {
        let b = text.as_bytes();
        if b.len() != 128 {
            return None;
        }
        let mut xy = [0u8; 64];
        let mut i = 0;
        while i < 64 {
            let (Some(hi), Some(lo)) = (hex_digit(b[2 * i]), hex_digit(b[2 * i + 1])) else {
                return None;
            };
            xy[i] = hi << 4 | lo;
            i += 1;
        }
        Some(Self::from_xy(&xy))
    }

    /// X ‖ Y, big-endian.
    pub fn xy(&self) -> [u8; 64] {
        let mut xy = [0u8; 64];
        for i in 0..32 {
            xy[i] = self.x_le[31 - i];
            xy[32 + i] = self.y_le[31 - i];
        }
        xy
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

/// The job key a device trusts and the arithmetic that checks it.
#[derive(Clone, Copy)]
pub struct JobTrust {
    key: JobKey,
    verifier: &'static dyn SignatureVerifier,
}

impl core::fmt::Debug for JobTrust {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("JobTrust").field("key", &self.key).finish()
    }
}

/// Equal when the keys are and the verifier is the same object.
impl PartialEq for JobTrust {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key && core::ptr::addr_eq(self.verifier, other.verifier)
    }
}

impl Eq for JobTrust {}

impl JobTrust {
    /// Trust `key`, checked by `verifier`.
    pub const fn new(key: JobKey, verifier: &'static dyn SignatureVerifier) -> Self {
        Self { key, verifier }
    }

    /// The trusted key.
    pub fn key(&self) -> &JobKey {
        &self.key
    }
}

#[derive(Deserialize)]
struct Header<'a> {
    #[serde(borrow)]
    alg: &'a str,
}

/// Whether `payload` has the shape of an envelope: base64url characters and
/// exactly two dots (a bare URL or a JSON object never has).
pub fn is_envelope(payload: &[u8]) -> bool {
    let text = payload.trim_ascii();
    !text.is_empty()
        && text.iter().filter(|&&b| b == b'.').count() == 2
        && text
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Checks the envelope `payload` against `trust` and decodes the command
/// inside into `out`. The signature is checked before the command is read.
pub fn open<'b>(
    payload: &[u8],
    trust: &JobTrust,
    out: &'b mut [u8; MAX_COMMAND_LEN],
) -> Result<&'b [u8], &'static str> {
    let text = payload.trim_ascii();
    if text.len() > MAX_SIGNED_COMMAND_LEN {
        return Err(refusal::TOO_LONG);
    }
    if !is_envelope(text) {
        return Err(refusal::NOT_SIGNED);
    }
    let mut parts = text.split(|&b| b == b'.');
    let (Some(h), Some(p), Some(sig)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(refusal::MALFORMED);
    };
    let mut header = [0u8; MAX_HEADER_LEN];
    let header = decode(h, &mut header)?;
    let alg = serde_json_core::from_slice::<Header<'_>>(header)
        .map_err(|_| refusal::MALFORMED)?
        .0
        .alg;
    if alg != "ES256" {
        return Err(refusal::ALGORITHM);
    }
    let mut rs = [0u8; 64];
    if decode(sig, &mut rs)?.len() != 64 {
        return Err(refusal::MALFORMED);
    }
    let signed_len = h.len() + 1 + p.len();
    let digest: [u8; 32] = Sha256::digest(&text[..signed_len]).into();
    let mut r_le: [u8; 32] = rs[..32].try_into().expect("32 bytes");
    let mut s_le: [u8; 32] = rs[32..].try_into().expect("32 bytes");
    r_le.reverse();
    s_le.reverse();
    let ok =
        trust
            .verifier
            .verify_ecdsa_p256(&trust.key.x_le, &trust.key.y_le, &digest, &r_le, &s_le);
    if !ok {
        return Err(refusal::DOES_NOT_VERIFY);
    }
    decode(p, out)
}

fn decode<'o>(part: &[u8], out: &'o mut [u8]) -> Result<&'o [u8], &'static str> {
    Base64UrlUnpadded::decode(part, out).map_err(|_| refusal::MALFORMED)
}

/// Wraps `command` (a JSON object with `op`, `seq` and `device` or
/// `devices`) in an envelope signed with `key`: what the controller
/// publishes to a device with a job key.
#[cfg(feature = "sign")]
pub fn seal(command: &[u8], key: &p256::ecdsa::SigningKey) -> alloc::string::String {
    use p256::ecdsa::signature::hazmat::PrehashSigner;
    let mut text = Base64UrlUnpadded::encode_string(br#"{"alg":"ES256"}"#);
    text.push('.');
    text.push_str(&Base64UrlUnpadded::encode_string(command));
    let digest = Sha256::digest(text.as_bytes());
    let sig: p256::ecdsa::Signature = key.sign_prehash(&digest).expect("a 32-byte prehash signs");
    text.push('.');
    text.push_str(&Base64UrlUnpadded::encode_string(&sig.to_bytes()));
    text
}

/// The public key of a signing key, as a device trusts it.
#[cfg(feature = "sign")]
pub fn job_key_of(key: &p256::ecdsa::VerifyingKey) -> JobKey {
    let point = key.to_encoded_point(false);
    let mut xy = [0u8; 64];
    xy.copy_from_slice(&point.as_bytes()[1..]);
    JobKey::from_xy(&xy)
}

#[cfg(all(test, feature = "sign"))]
mod tests {
    use super::*;
    use crate::signature::SoftVerifier;
    use p256::ecdsa::SigningKey;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_slice(&[seed; 32]).unwrap()
    }

    fn trust(k: &SigningKey) -> JobTrust {
        JobTrust::new(job_key_of(k.verifying_key()), SoftVerifier::INSTANCE)
    }

    #[test]
    fn a_sealed_command_opens_with_its_key_and_only_with_it() {
        let cmd = br#"{"op":"start","seq":1,"device":"d","url":"http://h/f"}"#;
        let env = seal(cmd, &key(1));
        assert!(is_envelope(env.as_bytes()));
        let mut out = [0u8; MAX_COMMAND_LEN];
        assert_eq!(
            open(env.as_bytes(), &trust(&key(1)), &mut out),
            Ok(&cmd[..])
        );
        assert_eq!(
            open(env.as_bytes(), &trust(&key(2)), &mut out),
            Err(refusal::DOES_NOT_VERIFY)
        );
    }

    #[test]
    fn any_changed_byte_is_refused() {
        let env = seal(br#"{"op":"start","seq":1,"device":"d"}"#, &key(3));
        let t = trust(&key(3));
        let mut out = [0u8; MAX_COMMAND_LEN];
        for i in 0..env.len() {
            let mut b = env.clone().into_bytes();
            b[i] = if b[i] == b'A' { b'B' } else { b'A' };
            assert!(open(&b, &t, &mut out).is_err(), "byte {i} changed");
        }
    }

    #[test]
    fn other_shapes_and_algorithms_are_refused_with_their_reason() {
        let t = trust(&key(4));
        let mut out = [0u8; MAX_COMMAND_LEN];
        assert_eq!(
            open(b"http://h/fw.bin", &t, &mut out),
            Err(refusal::NOT_SIGNED)
        );
        assert_eq!(open(b"{\"url\":1}", &t, &mut out), Err(refusal::NOT_SIGNED));
        assert_eq!(open(b"a.b.c", &t, &mut out), Err(refusal::MALFORMED));
        let none = alloc::format!(
            "{}.{}.",
            Base64UrlUnpadded::encode_string(br#"{"alg":"none"}"#),
            Base64UrlUnpadded::encode_string(b"{}")
        );
        assert_eq!(open(none.as_bytes(), &t, &mut out), Err(refusal::ALGORITHM));
        let long = alloc::vec![b'a'; MAX_SIGNED_COMMAND_LEN + 1];
        assert_eq!(open(&long, &t, &mut out), Err(refusal::TOO_LONG));
    }

    #[test]
    fn keys_read_from_hex_round_trip() {
        let k = job_key_of(key(5).verifying_key());
        let hex: alloc::string::String = k.xy().iter().map(|b| alloc::format!("{b:02x}")).collect();
        assert_eq!(JobKey::from_hex(&hex), Some(k));
        assert_eq!(JobKey::from_hex(&hex[1..]), None);
    }
}

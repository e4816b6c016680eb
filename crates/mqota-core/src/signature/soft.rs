//! [`SoftVerifier`]: the signature arithmetic in software, from the `rsa`
//! (needs an allocator: about 22 KiB peak for RSA-3072) and `p256` (no heap)
//! crates. For the host, and for a chip until its accelerators are wired.

use super::SignatureVerifier;
use alloc::vec::Vec;
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::EncodedPoint;
use rsa::{BigUint, Pss, RsaPublicKey};

/// Software RSA-3072-PSS and ECDSA P-256 verification.
#[derive(Debug, Clone, Copy, Default)]
pub struct SoftVerifier;

impl SoftVerifier {
    /// A verifier to hand to a [`TrustPolicy`](super::TrustPolicy).
    pub const INSTANCE: &'static SoftVerifier = &SoftVerifier;
}

/// The block stores big numbers little-endian; the crates want big-endian.
fn reversed<const N: usize>(le: &[u8; N]) -> [u8; N] {
    let mut be = *le;
    be.reverse();
    be
}

impl SignatureVerifier for SoftVerifier {
    fn verify_rsa3072_pss(
        &self,
        modulus_le: &[u8; 384],
        exponent: u32,
        digest: &[u8; 32],
        signature_le: &[u8; 384],
    ) -> bool {
        let n = BigUint::from_bytes_le(modulus_le);
        let e = BigUint::from(exponent);
        let Ok(key) = RsaPublicKey::new(n, e) else {
            return false;
        };
        let sig: Vec<u8> = reversed(signature_le).to_vec();
        key.verify(Pss::new_with_salt::<sha2::Sha256>(32), digest, &sig)
            .is_ok()
    }

    fn verify_ecdsa_p256(
        &self,
        x_le: &[u8; 32],
        y_le: &[u8; 32],
        digest: &[u8; 32],
        r_le: &[u8; 32],
        s_le: &[u8; 32],
    ) -> bool {
        let point = EncodedPoint::from_affine_coordinates(
            &reversed(x_le).into(),
            &reversed(y_le).into(),
            false,
        );
        let Ok(key) = VerifyingKey::from_encoded_point(&point) else {
            return false;
        };
        let Ok(sig) = Signature::from_scalars(reversed(r_le), reversed(s_le)) else {
            return false;
        };
        key.verify_prehash(digest, &sig).is_ok()
    }
}

//! `mqota keys new|digest|job-key`: signing keys. Secure Boot V2 keys
//! (RSA-3072, ECDSA P-256) sign images; an ECDSA P-256 key also signs jobs
//! (ES256 envelopes, see `docs/PROTOCOL.md`). Ed25519 keys can be made but
//! no device takes them yet. Private keys are written with mode 0600 and
//! never printed.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use mqota_core::signature::sign::Key;
use mqota_core::signature::KeyDigest;
use sha2::{Digest as _, Sha256};

/// Signing keys.
#[derive(clap::Subcommand)]
pub enum KeysCommand {
    /// Make a key pair: the private key in OUTPUT (mode 0600), the public
    /// key beside it as `NAME.pub.pem`. Prints the public key's digest.
    New {
        /// rsa3072 or ecdsa-p256 (Secure Boot V2 image signing), or
        /// ed25519 (job signing).
        #[arg(long, value_enum)]
        scheme: SchemeArg,
        /// Where to write the private key (PEM, PKCS#8). Never overwritten.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Print the digest a device trusts for a key (private or public PEM,
    /// also from `espsecure generate-signing-key`): for Secure Boot V2 keys
    /// what `espsecure digest-sbv2-public-key` writes, in hex.
    Digest {
        /// The key.
        key: PathBuf,
    },
    /// Print the job key a device must trust for a P-256 key (private or
    /// public PEM), as the firmware build takes it: `MQOTA_JOB_KEY=` and
    /// 128 hex digits (the point's X and Y).
    JobKey {
        /// The key.
        key: PathBuf,
    },
}

/// The schemes `mqota keys new` makes.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum SchemeArg {
    /// RSA-3072 with PSS signatures (Secure Boot V2 block version 2; every chip).
    Rsa3072,
    /// ECDSA over P-256 (Secure Boot V2 block version 3; ESP32-C6, not C3).
    EcdsaP256,
    /// Ed25519 (no Secure Boot V2 block and no device takes it for jobs
    /// yet: job keys are ECDSA P-256).
    Ed25519,
}

impl KeysCommand {
    /// Runs the subcommand.
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            KeysCommand::New { scheme, output } => new(scheme, &output),
            KeysCommand::Digest { key } => {
                println!("{}", hex::encode(digest_of_file(&key)?));
                Ok(())
            }
            KeysCommand::JobKey { key } => {
                let k = read_job_public_key(&key)?;
                println!("MQOTA_JOB_KEY={}", hex::encode(k.xy()));
                Ok(())
            }
        }
    }
}

/// Reads a 64-hex-digit key digest (a clap value parser).
pub fn parse_digest(s: &str) -> Result<KeyDigest, String> {
    let mut d = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut d).map_err(|_| {
        format!("not a key digest: {s:?} (64 hex digits, from `mqota keys digest`)")
    })?;
    Ok(d)
}

/// `KEY.pem` → `KEY.pub.pem`; any other name gets `.pub.pem` appended.
pub fn public_path(private: &Path) -> PathBuf {
    let s = private.as_os_str().to_string_lossy();
    match s.strip_suffix(".pem") {
        Some(stem) => PathBuf::from(format!("{stem}.pub.pem")),
        None => PathBuf::from(format!("{s}.pub.pem")),
    }
}

/// A key file read as text; the error names the file, never its content.
pub fn read_pem(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// An Ed25519 public key from a PEM file (private PKCS#8 or SPKI), if it is one.
fn ed25519_public(text: &str) -> Option<ed25519_dalek::VerifyingKey> {
    use ed25519_dalek::pkcs8::{DecodePrivateKey as _, DecodePublicKey as _};
    if let Ok(k) = ed25519_dalek::SigningKey::from_pkcs8_pem(text) {
        return Some(k.verifying_key());
    }
    ed25519_dalek::VerifyingKey::from_public_key_pem(text).ok()
}

/// The digest of the key in `path`: the Secure Boot V2 key digest, or for
/// Ed25519 the SHA-256 of the 32-byte public key.
pub fn digest_of_file(path: &Path) -> anyhow::Result<KeyDigest> {
    let text = read_pem(path)?;
    if let Ok(k) = Key::from_pem(&text) {
        return Ok(k.digest());
    }
    if let Some(k) = ed25519_public(&text) {
        return Ok(Sha256::digest(k.as_bytes()).into());
    }
    bail!(
        "{}: not an RSA-3072, ECDSA P-256 or Ed25519 key in PEM",
        path.display()
    )
}

/// Why a key file is no job key.
fn not_a_job_key(path: &Path, text: &str) -> anyhow::Error {
    if ed25519_public(text).is_some() {
        anyhow::anyhow!(
            "{}: an Ed25519 key; jobs are signed with ECDSA P-256 (ES256): make one with `mqota keys new --scheme ecdsa-p256`",
            path.display()
        )
    } else {
        anyhow::anyhow!("{}: not an ECDSA P-256 key in PEM", path.display())
    }
}

/// The private job key in `path` (PKCS#8 or SEC1 PEM, P-256), to sign
/// commands with.
pub fn read_job_signing_key(path: &Path) -> anyhow::Result<p256::ecdsa::SigningKey> {
    use p256::pkcs8::{DecodePrivateKey as _, DecodePublicKey as _};
    let text = read_pem(path)?;
    if let Ok(k) = p256::SecretKey::from_pkcs8_pem(&text) {
        return Ok(k.into());
    }
    if let Ok(k) = p256::SecretKey::from_sec1_pem(&text) {
        return Ok(k.into());
    }
    if p256::PublicKey::from_public_key_pem(&text).is_ok() {
        bail!(
            "{}: a public key; signing needs the private key",
            path.display()
        );
    }
    Err(not_a_job_key(path, &text))
}

/// The public job key of the key in `path` (private or public PEM, P-256).
pub fn read_job_public_key(path: &Path) -> anyhow::Result<mqota_core::protocol::envelope::JobKey> {
    use p256::pkcs8::DecodePublicKey as _;
    let text = read_pem(path)?;
    let public: p256::ecdsa::VerifyingKey = match p256::PublicKey::from_public_key_pem(&text) {
        Ok(k) => k.into(),
        Err(_) => *read_job_signing_key(path)?.verifying_key(),
    };
    Ok(mqota_core::protocol::envelope::job_key_of(&public))
}

/// Reads a Secure Boot V2 key, refusing Ed25519 with the reason.
pub fn read_sbv2_key(path: &Path) -> anyhow::Result<Key> {
    let text = read_pem(path)?;
    match Key::from_pem(&text) {
        Ok(k) => Ok(k),
        Err(_) if ed25519_public(&text).is_some() => bail!(
            "{}: an Ed25519 key cannot sign images (Secure Boot V2 has only RSA-3072 and ECDSA P-256 blocks)",
            path.display()
        ),
        Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
    }
}

fn new(scheme: SchemeArg, output: &Path) -> anyhow::Result<()> {
    use p256::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _, LineEnding};
    let mut rng = rand_core::OsRng;
    let (private, public) = match scheme {
        SchemeArg::Rsa3072 => {
            let k = rsa::RsaPrivateKey::new(&mut rng, 3072).context("generating the RSA key")?;
            let public = k.to_public_key();
            (
                k.to_pkcs8_pem(LineEnding::LF).context("encoding the key")?,
                public
                    .to_public_key_pem(LineEnding::LF)
                    .context("encoding the public key")?,
            )
        }
        SchemeArg::EcdsaP256 => {
            let k = p256::SecretKey::random(&mut rng);
            (
                k.to_pkcs8_pem(LineEnding::LF).context("encoding the key")?,
                k.public_key()
                    .to_public_key_pem(LineEnding::LF)
                    .context("encoding the public key")?,
            )
        }
        SchemeArg::Ed25519 => {
            let k = ed25519_dalek::SigningKey::generate(&mut rng);
            (
                k.to_pkcs8_pem(LineEnding::LF).context("encoding the key")?,
                k.verifying_key()
                    .to_public_key_pem(LineEnding::LF)
                    .context("encoding the public key")?,
            )
        }
    };
    let public_file = public_path(output);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(output)
        .with_context(|| {
            format!(
                "creating {} (an existing key is never overwritten)",
                output.display()
            )
        })?;
    f.write_all(private.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", output.display()))?;
    std::fs::write(&public_file, public.as_bytes())
        .with_context(|| format!("writing {}", public_file.display()))?;
    println!("private key  {} (mode 0600)", output.display());
    println!("public key   {}", public_file.display());
    println!(
        "digest       {}",
        hex::encode(digest_of_file(&public_file)?)
    );
    Ok(())
}

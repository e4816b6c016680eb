//! The fleet CA: a private P-256 certificate authority kept in the data
//! directory, and the certificates it issues (rcgen).
//!
//! One CA signs everything the fleet's TLS needs, and every party pins it
//! instead of trusting the system's roots:
//!
//! | file (under `DATA_DIR/ca/`) | what | who uses it |
//! |---|---|---|
//! | `ca.pem` | the CA certificate (`CN=mqota fleet CA`, 20 years, `pathLen 0`) | every device, Mosquitto's `cafile`, the controller (`--ca`) |
//! | `ca.key` | its private key (mode 0600) | only `mqota ca issue` |
//! | `controller.pem`, `.key` | client certificate `CN=controller` (client auth), made by `ca init` | the controller's MQTT client, where brokers require certificates |
//! | `devices/ID.pem`, `.key` | client certificate `CN=ID` (client auth) | device `ID`'s firmware build |
//! | `servers/HOST.pem`, `.key` | server certificate for the names and addresses given (server auth) | Mosquitto's `certfile`/`keyfile`, `mqota serve --tls-cert/--tls-key` |
//!
//! Keys are P-256 (ECDSA with SHA-256) because that is what a device can
//! check and sign with cheaply: embedded-tls' `rustpki` verifier and its
//! built-in client-certificate signer speak P-256, and the device already
//! verifies P-256 for signed images and jobs. Leaf certificates carry one
//! extended key usage each (client or server auth), so a device's
//! certificate cannot serve as a broker's and a stolen broker certificate
//! cannot log in as a device.
//!
//! Private keys are written once, with mode 0600 from the moment the file
//! exists, and never printed; [`init`] refuses to overwrite a CA (a new CA
//! would orphan every certificate issued so far).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};

/// The CA certificate's common name.
pub const CA_COMMON_NAME: &str = "mqota fleet CA";

/// How long the CA certificate is valid.
pub const CA_DAYS: u32 = 20 * 365;

/// How long an issued certificate is valid unless told otherwise. Devices
/// often have no clock at the TLS handshake (embedded-tls checks dates only
/// when given one), so a short lifetime would protect little and strand
/// devices in the field; revocation is by removing the device's identity.
pub const DEFAULT_LEAF_DAYS: u32 = 10 * 365;

/// What kind of certificate to issue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leaf {
    /// A client certificate with `CN` = the id (a device id, or
    /// [`crate::access::CONTROLLER_USER`]): client auth only.
    Client(String),
    /// A server certificate for these host names and IP addresses (the
    /// first is also the CN): server auth only.
    Server(Vec<String>),
}

/// Where the CA keeps its files: `DATA_DIR/ca`.
#[derive(Debug, Clone)]
pub struct CaDir {
    dir: PathBuf,
}

/// A certificate and key pair as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PKCS#8 PEM, mode 0600).
    pub key: PathBuf,
}

/// Why the CA could not do what was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// `ca init` found a CA already: keep it (every certificate hangs on it),
    /// or move `DATA_DIR/ca` away by hand to start over.
    #[error("a fleet CA exists already in {0}; it is kept (a new one would invalidate every certificate it issued)")]
    Exists(PathBuf),
    /// No CA yet: run `mqota ca init`.
    #[error("no fleet CA in {0}: run `mqota ca init` first")]
    Missing(PathBuf),
    /// A certificate of that name exists: pass `--force` to replace it.
    #[error("{0} exists already (--force replaces it)")]
    LeafExists(PathBuf),
    /// The name is not usable as a certificate subject or file name.
    #[error("bad name {0:?}: {1}")]
    BadName(String, &'static str),
    /// A file could not be read or written: see the cause.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// rcgen refused (a malformed CA file, say): see the cause.
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
}

impl CaDir {
    /// The CA of the data directory `data_dir`.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("ca"),
        }
    }

    /// The directory itself.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate (what everyone pins).
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The CA's private key.
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }

    /// Whether `ca init` has run.
    pub fn exists(&self) -> bool {
        self.ca_cert().is_file() && self.ca_key().is_file()
    }

    /// The controller's client certificate and key.
    pub fn controller(&self) -> Issued {
        self.files(&self.dir, crate::access::CONTROLLER_USER)
    }

    /// Where a leaf's files go: `devices/ID.*`, `servers/HOST.*`, and the
    /// controller's next to the CA.
    pub fn leaf_files(&self, leaf: &Leaf) -> Issued {
        match leaf {
            Leaf::Client(id) if id == crate::access::CONTROLLER_USER => self.controller(),
            Leaf::Client(id) => self.files(&self.dir.join("devices"), id),
            Leaf::Server(hosts) => {
                let first = hosts.first().map_or("server", String::as_str);
                // `::1` and the like as a file name.
                self.files(&self.dir.join("servers"), &first.replace(':', "_"))
            }
        }
    }

    fn files(&self, dir: &Path, stem: &str) -> Issued {
        Issued {
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        }
    }
}

/// Makes the CA in `ca` (and the controller's client certificate); refuses
/// when one exists.
pub fn init(ca: &CaDir) -> Result<Issued, CaError> {
    if ca.ca_cert().exists() || ca.ca_key().exists() {
        return Err(CaError::Exists(ca.dir.clone()));
    }
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "mqota");
    // Only leaves below it: a stolen device key cannot mint certificates.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, CA_DAYS);
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key)?;
    // The key first: a CA certificate without its key is useless, a key
    // without its certificate is found by the check above and kept.
    write_new(&ca.ca_key(), key.serialize_pem().as_bytes(), true)?;
    write_new(&ca.ca_cert(), cert.pem().as_bytes(), false)?;
    issue(
        ca,
        &Leaf::Client(crate::access::CONTROLLER_USER.to_owned()),
        DEFAULT_LEAF_DAYS,
        false,
    )
}

/// Issues `leaf`, valid for `days`, signed by the CA in `ca`; refuses to
/// replace existing files unless `force`.
pub fn issue(ca: &CaDir, leaf: &Leaf, days: u32, force: bool) -> Result<Issued, CaError> {
    if !ca.exists() {
        return Err(CaError::Missing(ca.dir.clone()));
    }
    let files = ca.leaf_files(leaf);
    if !force && (files.cert.exists() || files.key.exists()) {
        return Err(CaError::LeafExists(files.cert));
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    match leaf {
        Leaf::Client(id) => {
            check_client_id(id)?;
            params.distinguished_name.push(DnType::CommonName, id);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        Leaf::Server(hosts) => {
            let Some(first) = hosts.first() else {
                return Err(CaError::BadName(
                    String::new(),
                    "a server certificate needs at least one --host",
                ));
            };
            for h in hosts {
                params.subject_alt_names.push(san(h)?);
            }
            params.distinguished_name.push(DnType::CommonName, first);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        }
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, days);
    params.serial_number = Some(random_serial());

    let ca_key_pem = read(&ca.ca_key())?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)?;
    let ca_cert_pem = read(&ca.ca_cert())?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert_pem, ca_key)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &issuer)?;
    if force {
        for f in [&files.cert, &files.key] {
            match std::fs::remove_file(f) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(CaError::File {
                        path: f.clone(),
                        source: e,
                    })
                }
                _ => {}
            }
        }
    }
    write_new(&files.key, key.serialize_pem().as_bytes(), true)?;
    write_new(&files.cert, cert.pem().as_bytes(), false)?;
    Ok(files)
}

/// A client certificate's CN is a device id or the controller's name: one
/// topic level, as the ACL's `%u` needs (Mosquitto refuses the
/// substitution for names with `+`, `#` or `/`), and a plain file name.
fn check_client_id(id: &str) -> Result<(), CaError> {
    if id.is_empty() || id.len() > mqota_core::protocol::MAX_DEVICE_ID_LEN {
        return Err(CaError::BadName(
            id.to_owned(),
            "a device id is 1 to 32 bytes",
        ));
    }
    if id
        .chars()
        .any(|c| matches!(c, '/' | '+' | '#' | '\\') || c.is_control() || c.is_whitespace())
        || id.starts_with('.')
    {
        return Err(CaError::BadName(
            id.to_owned(),
            "a device id has no '/', '+', '#', '\\', spaces or control characters and does not start with '.'",
        ));
    }
    Ok(())
}

/// A subject alternative name: an IP address, or a DNS name (letters,
/// digits, `-`, `.`, and a leading `*.`).
fn san(host: &str) -> Result<SanType, CaError> {
    if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let name = host.strip_prefix("*.").unwrap_or(host);
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !ok {
        return Err(CaError::BadName(
            host.to_owned(),
            "a host is an IP address or a DNS name (letters, digits, '-', '.')",
        ));
    }
    Ok(SanType::DnsName(host.try_into()?))
}

/// From an hour ago (a device or broker whose clock is a little behind
/// still accepts it) for `days`.
fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

/// 16 random bytes, first bit clear (a positive DER integer).
fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    b[0] &= 0x7f;
    b[0] |= 0x01;
    SerialNumber::from_slice(&b)
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::File {
        path: path.to_owned(),
        source,
    })
}

/// Writes a new file (never replacing one); `private` files get mode 0600
/// from the start. A directory it creates gets mode 0700.
fn write_new(path: &Path, bytes: &[u8], private: bool) -> Result<(), CaError> {
    use std::io::Write as _;
    let err = |source| CaError::File {
        path: path.to_owned(),
        source,
    };
    crate::access::create_private_parent(path).map_err(err)?;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, if private { 0o600 } else { 0o644 });
    let mut f = o.open(path).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_cannot_be_a_topic_level_or_a_file_are_refused() {
        for bad in ["", "a/b", "+", "dev#1", "../x", ".hidden", "a b", "x\u{1b}"] {
            assert!(check_client_id(bad).is_err(), "{bad:?}");
        }
        assert!(check_client_id(&"x".repeat(33)).is_err());
        assert!(check_client_id("dev-1").is_ok());
        assert!(matches!(san("10.0.0.2"), Ok(SanType::IpAddress(_))));
        assert!(matches!(san("[::1]"), Ok(SanType::IpAddress(_))));
        assert!(matches!(san("broker.lan"), Ok(SanType::DnsName(_))));
        assert!(matches!(san("*.lan"), Ok(SanType::DnsName(_))));
        for bad in ["", "a..b", "bad_name", "x/y"] {
            assert!(san(bad).is_err(), "{bad:?}");
        }
    }
}

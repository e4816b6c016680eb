//! TLS on the host: rustls configurations for the three places the
//! controller speaks TLS, all pinned to the fleet CA ([`crate::ca`]) rather
//! than the system's roots.
//!
//! | where | configuration | peer checked by |
//! |---|---|---|
//! | `mqota serve --tls-cert --tls-key` (page, API, firmware) | [`http_server`] | nobody: browsers and devices check the server |
//! | the embedded broker's TLS listener | [`broker_server`] | a client certificate is optional; if one is presented it must chain to the fleet CA, and its CN is the client's identity |
//! | the controller's MQTT client (`mqtts://`) | [`mqtt_client`] | the broker's certificate must chain to the given CA and name the host of the URL; a client certificate is presented when configured |
//!
//! ring is the one crypto provider (rustls' default, aws-lc-rs, needs cmake
//! and a C build); TLS 1.2 stays on for Mosquitto builds and clients that
//! lack 1.3. Errors name the file and what is wrong with it, never any of
//! its bytes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Why a TLS configuration could not be built. Each names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file holds no PEM certificate.
    #[error("{0}: no PEM certificate in it")]
    NoCertificate(PathBuf),
    /// The file holds no PEM private key (PKCS#8, SEC1 or PKCS#1).
    #[error("{0}: no PEM private key in it")]
    NoKey(PathBuf),
    /// rustls refused the certificates or key (a key that does not match
    /// its certificate, an unsupported algorithm, a CA that does not parse).
    #[error("{what}: {source}")]
    Rustls {
        /// Which files.
        what: String,
        /// What rustls said.
        source: rustls::Error,
    },
}

/// The crypto provider every configuration here uses.
///
/// rustls 0.23.48 marks ring's provider deprecated because it has no
/// post-quantum key exchange. Kept on purpose: the peers here are the
/// fleet's devices (embedded-tls: P-256 key share only), Mosquitto and
/// browsers on a local network, and the alternative, aws-lc-rs, needs
/// cmake and a C build on every machine that builds mqota.
#[allow(deprecated)]
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut bytes.as_slice())
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

/// The first private key in a PEM file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    match rustls_pemfile::private_key(&mut bytes.as_slice()) {
        Ok(Some(k)) => Ok(k),
        _ => Err(TlsError::NoKey(path.to_owned())),
    }
}

/// The trust anchors of a CA file.
fn roots(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in read_certs(ca)? {
        roots.add(c).map_err(|source| TlsError::Rustls {
            what: ca.display().to_string(),
            source,
        })?;
    }
    Ok(roots)
}

fn rustls_err<'a>(files: &'a [&'a Path]) -> impl Fn(rustls::Error) -> TlsError + 'a {
    move |source| TlsError::Rustls {
        what: files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        source,
    }
}

/// HTTPS for `serve`: the certificate chain in `cert`, its key in `key`;
/// HTTP/1.1 only, as the server speaks.
pub fn http_server(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(rustls_err(&[cert, key]))?
        .with_no_client_auth()
        .with_single_cert(read_certs(cert)?, read_key(key)?)
        .map_err(rustls_err(&[cert, key]))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The embedded broker's TLS listener: serves `cert`/`key`, and accepts a
/// client certificate only if it chains to `client_ca` (clients without one
/// log in with a password, as on the plain listener).
pub fn broker_server(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(client_ca)?), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Rustls {
                what: client_ca.display().to_string(),
                source: rustls::Error::General(e.to_string()),
            })?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(rustls_err(&[cert, key]))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(read_certs(cert)?, read_key(key)?)
        .map_err(rustls_err(&[cert, key]))?;
    Ok(Arc::new(config))
}

/// A client certificate and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

/// The controller's MQTT client over TLS: the broker must present a
/// certificate that chains to `ca` and names the host it was reached by;
/// `client` is presented when the broker asks for one.
pub fn mqtt_client(ca: &Path, client: Option<&ClientCert>) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(rustls_err(&[ca]))?
        .with_root_certificates(roots(ca)?);
    let config = match client {
        Some(c) => builder
            .with_client_auth_cert(read_certs(&c.cert)?, read_key(&c.key)?)
            .map_err(rustls_err(&[&c.cert, &c.key]))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// HTTPS client side (`deploy --server https://…`, firmware URLs): the
/// server must chain to `ca` and name the host; no client certificate.
pub fn https_client(ca: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(rustls_err(&[ca]))?
        .with_root_certificates(roots(ca)?)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The subject CN of a DER certificate, if it has exactly one that is
/// UTF-8. (The broker asks only after rustls verified the chain.)
pub fn common_name(cert: &[u8]) -> Option<String> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    let mut cns = x509.subject().iter_common_name();
    let cn = cns.next()?.as_str().ok()?.to_owned();
    if cns.next().is_some() {
        return None;
    }
    Some(cn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_file_is_named_and_nothing_of_it_is_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k.pem");
        std::fs::write(&f, "not a key, secret-ish text\n").unwrap();
        let e = read_key(&f).unwrap_err().to_string();
        assert!(e.contains("k.pem") && !e.contains("secret-ish"), "{e}");
        let e = read_certs(&f).unwrap_err().to_string();
        assert!(
            e.contains("no PEM certificate") && !e.contains("secret-ish"),
            "{e}"
        );
        assert!(read_certs(&dir.path().join("none.pem")).is_err());
    }

    #[test]
    fn the_common_name_of_an_issued_certificate_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::ca::CaDir::new(dir.path());
        crate::ca::init(&ca).unwrap();
        let dev =
            crate::ca::issue(&ca, &crate::ca::Leaf::Client("dev-7".into()), 30, false).unwrap();
        let der = read_certs(&dev.cert).unwrap();
        assert_eq!(common_name(&der[0]).as_deref(), Some("dev-7"));
        // The configurations build from what the CA wrote.
        let server = crate::ca::issue(
            &ca,
            &crate::ca::Leaf::Server(vec!["localhost".into(), "127.0.0.1".into()]),
            30,
            false,
        )
        .unwrap();
        http_server(&server.cert, &server.key).unwrap();
        broker_server(&server.cert, &server.key, &ca.ca_cert()).unwrap();
        mqtt_client(
            &ca.ca_cert(),
            Some(&ClientCert {
                cert: dev.cert,
                key: dev.key,
            }),
        )
        .unwrap();
        // A key that is not the certificate's is refused.
        assert!(http_server(&server.cert, &ca.controller().key).is_err());
    }
}

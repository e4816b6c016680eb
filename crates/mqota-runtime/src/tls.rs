//! TLS for the device's connections: embedded-tls 0.19 (TLS 1.3, no heap)
//! with its `rustpki` verifier.
//!
//! # What the device checks and presents
//!
//! * The server's chain must lead to ONE pinned trust anchor, the fleet CA
//!   ([`TlsIdentity::new`]); the system's roots play no part.
//! * The server's certificate must name the host the device connects to
//!   (a DNS name in its subject alternative names or common name; IP
//!   address SANs are not read, so a broker reached by address needs a
//!   DNS name for it).
//! * Dates are checked when the board has a clock ([`TlsClock`]); without
//!   one ([`NoClock`]) they are not, because an ESP32 without network time
//!   does not know the date.
//! * When configured, the device presents its client certificate
//!   (CN = device id, from the fleet CA) and signs the handshake with its
//!   P-256 key ([`TlsIdentity::with_client`]).
//!
//! Only the cipher suite TLS_AES_128_GCM_SHA256 and the P-256 key share are
//! offered, which every TLS 1.3 server must accept.
//!
//! # Memory
//!
//! Each session needs a record read buffer that holds the largest TLS
//! record, [`TLS_READ_BUFFER`] bytes, and a write buffer of
//! [`TLS_WRITE_BUFFER`] bytes. They live in [`TlsBuffers`] (a `static` on
//! the chip), one pair per session, [`TLS_SESSIONS`] pairs: the MQTT session
//! and a download. [`TLS_RAM`] is the total, and what the README states.
//!
//! # Why embedded-tls and not mbedtls-rs
//!
//! embedded-tls needs no heap and no C, verifies P-256 chains, and its
//! client certificates go through a signer, so the device key can later
//! move into the chip's key store. It speaks TLS 1.3 only: the fleet's own
//! broker and `mqota serve` do; a server that speaks only TLS 1.2 is
//! refused with [`TlsFailure::Handshake`].

use core::cell::{Cell, RefCell, UnsafeCell};
use core::marker::PhantomData;

use embedded_io::ErrorKind;
use embedded_io_async::{Read, Write};
use embedded_tls::alert::AlertDescription;
use embedded_tls::pki::CertVerifier;
use embedded_tls::{
    Aes128GcmSha256, Certificate, CryptoProvider, SignatureScheme, TlsConfig, TlsConnection,
    TlsContext, TlsError, TlsVerifier,
};
pub use embedded_tls::{NoClock, TlsClock};
use p256::ecdsa::{DerSignature, SigningKey};
use p256::pkcs8::DecodePrivateKey;

use crate::net::{ConnectError, StreamError};

/// Bytes of a session's record read buffer: the largest TLS record
/// (16,384 bytes of data plus 256 of expansion).
pub const TLS_READ_BUFFER: usize = 16_640;
/// Bytes of a session's record write buffer (at least 4 KiB: the client's
/// certificate and its signature go out in one record).
pub const TLS_WRITE_BUFFER: usize = 4_096;
/// Sessions open at once: the MQTT session and one download.
pub const TLS_SESSIONS: usize = 2;
/// Bytes of the server certificate kept between its check and the check of
/// its handshake signature. A server certificate larger than this fails
/// the handshake.
pub const MAX_SERVER_CERT: usize = 2_048;
/// Bytes of the session state besides the buffers (keys, transcript,
/// record state), upper bound: 1,320 measured on a 64-bit host, less on
/// the 32-bit chips; a unit test holds it to the real size.
pub const TLS_STATE: usize = 1_536;
/// RAM both TLS sessions take: buffers and state, [`TLS_SESSIONS`] ×
/// ([`TLS_READ_BUFFER`] + [`TLS_WRITE_BUFFER`] + [`TLS_STATE`]).
pub const TLS_RAM: usize = TLS_SESSIONS * (TLS_READ_BUFFER + TLS_WRITE_BUFFER + TLS_STATE);
// The budget: both sessions within 48 KiB, or the build fails.
const _: () = assert!(TLS_RAM <= 48 * 1024, "both TLS sessions must fit 48 KiB");

/// Why a TLS connection failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum TlsFailure {
    /// The server's certificate was not issued (through its chain) by the
    /// pinned fleet CA, does not name the host, is outside its dates, or its
    /// handshake signature is wrong: the server is not who the device
    /// wanted. Do not trust it; retrying is pointless until the server or
    /// the device's CA changes.
    ServerNotTrusted,
    /// The server asked for a client certificate and this device has none
    /// (a broker with `require_certificate`). Configure the device's
    /// certificate and key.
    ClientCertificateRequired,
    /// The server asked for the device's certificate, got it, and ended the
    /// connection: it does not trust it (another CA, revoked, expired).
    /// Give the device a certificate from the fleet CA.
    ClientRefused,
    /// The handshake failed otherwise (a TLS 1.2-only server, no common
    /// cipher suite, a malformed message, another alert). Report it.
    Handshake,
    /// The device's own key could not be used to sign. Configuration error.
    ClientKey,
}

impl TlsFailure {
    /// A short description for logs and reports; never contains
    /// certificate or key bytes.
    pub fn as_str(&self) -> &'static str {
        match self {
            TlsFailure::ServerNotTrusted => {
                "server certificate not trusted (not from the fleet CA, wrong host name, or expired)"
            }
            TlsFailure::ClientCertificateRequired => {
                "server requires a client certificate and the device has none"
            }
            TlsFailure::ClientRefused => "server refused the device's client certificate",
            TlsFailure::Handshake => "TLS handshake failed",
            TlsFailure::ClientKey => "device key unusable",
        }
    }

    /// What `e` means; `asked` is whether the server asked for the
    /// device's certificate (`Some(presented)`) during the handshake.
    fn of(e: &TlsError, asked: Option<bool>) -> Option<Self> {
        // A server that refuses the client's certificate sends an alert and
        // closes; embedded-tls reports the alert without its description
        // (`InternalError`), or the close as an I/O error. After the
        // server asked for the certificate, either means the refusal.
        let refused = match asked {
            Some(true) => Some(TlsFailure::ClientRefused),
            Some(false) => Some(TlsFailure::ClientCertificateRequired),
            None => None,
        };
        Some(match e {
            TlsError::Io(_) | TlsError::ConnectionClosed | TlsError::IoError => return refused,
            TlsError::InternalError if refused.is_some() => return refused,
            TlsError::InvalidCertificate
            | TlsError::InvalidCertificateEntry
            | TlsError::InvalidSignature
            | TlsError::InvalidSignatureScheme => TlsFailure::ServerNotTrusted,
            // An alert the server sent during the handshake about the
            // device's certificate.
            TlsError::HandshakeAborted(
                _,
                AlertDescription::BadCertificate
                | AlertDescription::UnknownCa
                | AlertDescription::CertificateRequired
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateUnknown
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateRevoked
                | AlertDescription::AccessDenied,
            ) => refused.unwrap_or(TlsFailure::ClientRefused),
            TlsError::InvalidPrivateKey => TlsFailure::ClientKey,
            _ => TlsFailure::Handshake,
        })
    }
}

/// Why a certificate, key or CA given to [`TlsIdentity`] is unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum CredentialError {
    /// PEM armour that does not decode, or that does not fit the buffer.
    Pem,
    /// The key is neither a PKCS#8 nor a SEC1 P-256 private key.
    Key,
    /// Empty input.
    Empty,
}

/// The fleet CA the device pins, and its own certificate and key.
///
/// Its `Debug` output never shows the key.
#[derive(Clone)]
pub struct TlsIdentity<'a> {
    ca: &'a [u8],
    client: Option<(&'a [u8], SigningKey)>,
}

impl core::fmt::Debug for TlsIdentity<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("ca_bytes", &self.ca.len())
            .field(
                "client_cert_bytes",
                &self.client.as_ref().map(|(c, _)| c.len()),
            )
            .field("client_key", &self.client.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl<'a> TlsIdentity<'a> {
    /// Pins `ca_der` (one DER certificate) as the only trust anchor.
    pub fn new(ca_der: &'a [u8]) -> Result<Self, CredentialError> {
        if ca_der.is_empty() {
            return Err(CredentialError::Empty);
        }
        Ok(Self {
            ca: ca_der,
            client: None,
        })
    }

    /// Adds the device's client certificate (DER) and its P-256 private key
    /// (PKCS#8 or SEC1 DER). The key is parsed here, once.
    pub fn with_client(
        mut self,
        cert_der: &'a [u8],
        key_der: &[u8],
    ) -> Result<Self, CredentialError> {
        if cert_der.is_empty() || key_der.is_empty() {
            return Err(CredentialError::Empty);
        }
        let key = SigningKey::from_pkcs8_der(key_der)
            .or_else(|_| p256::SecretKey::from_sec1_der(key_der).map(SigningKey::from))
            .map_err(|_| CredentialError::Key)?;
        self.client = Some((cert_der, key));
        Ok(self)
    }

    /// Whether a client certificate is presented.
    pub fn has_client(&self) -> bool {
        self.client.is_some()
    }
}

/// DER of `input`: PEM armour (`-----BEGIN ...`) is decoded into `out`,
/// anything else is taken as DER already. Certificates and keys given at
/// build time or in files may be either.
pub fn der_from_pem_or_der<'b>(
    input: &'b [u8],
    out: &'b mut [u8],
) -> Result<&'b [u8], CredentialError> {
    let trimmed = trim_ascii_start(input);
    if trimmed.is_empty() {
        return Err(CredentialError::Empty);
    }
    if !trimmed.starts_with(b"-----BEGIN") {
        return Ok(input);
    }
    // Only the first PEM block counts (a certificate file may carry a chain;
    // the device pins one anchor).
    let end = find_block_end(trimmed).ok_or(CredentialError::Pem)?;
    pem_rfc7468::decode(&trimmed[..end], out)
        .map(|(_, der)| der)
        .map_err(|_| CredentialError::Pem)
}

fn trim_ascii_start(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|c| c.is_ascii_whitespace()).count();
    &b[n..]
}

/// The end of the first `-----END ...-----` line in `pem`.
fn find_block_end(pem: &[u8]) -> Option<usize> {
    let at = pem.windows(8).position(|w| w == b"-----END")?;
    let rest = &pem[at + 8..];
    let close = rest.windows(5).position(|w| w == b"-----")?;
    Some(at + 8 + close + 5)
}

/// The record buffers of [`TLS_SESSIONS`] sessions. Put it in a `static`
/// (through a `StaticCell` on the chip) or keep it beside the device on
/// the host; the connector lends one pair to each open session.
pub struct TlsBuffers {
    slots: [BufferPair; TLS_SESSIONS],
}

struct BufferPair {
    taken: Cell<bool>,
    /// The TCP stream under the session stands inside a TLS record (see
    /// [`Counted`]).
    in_record: Cell<bool>,
    read: UnsafeCell<[u8; TLS_READ_BUFFER]>,
    write: UnsafeCell<[u8; TLS_WRITE_BUFFER]>,
}

impl BufferPair {
    const fn new() -> Self {
        Self {
            taken: Cell::new(false),
            in_record: Cell::new(false),
            read: UnsafeCell::new([0; TLS_READ_BUFFER]),
            write: UnsafeCell::new([0; TLS_WRITE_BUFFER]),
        }
    }
}

impl Default for TlsBuffers {
    fn default() -> Self {
        Self::new()
    }
}

impl TlsBuffers {
    /// Buffers for [`TLS_SESSIONS`] sessions, all free.
    pub const fn new() -> Self {
        Self {
            slots: [BufferPair::new(), BufferPair::new()],
        }
    }

    /// Lends a free pair, or `None` when every session is open.
    // The pair's `UnsafeCell`s make `&self` enough, as in a pool.
    #[allow(clippy::type_complexity, clippy::mut_from_ref)]
    fn lend(&self) -> Option<(Lease<'_>, &Cell<bool>, &mut [u8], &mut [u8])> {
        let slot = self.slots.iter().find(|s| !s.taken.get())?;
        slot.taken.set(true);
        slot.in_record.set(false);
        // SAFETY: `taken` was false, so no other reference to this pair
        // exists; it stays true until the `Lease` is dropped, and the only
        // holder of the two references ([`TlsStream`]) drops its TLS
        // connection (which holds them) before its lease. `TlsBuffers` is
        // not `Sync`, so `taken` cannot race.
        let (read, write) = unsafe { (&mut *slot.read.get(), &mut *slot.write.get()) };
        Some((Lease(&slot.taken), &slot.in_record, read, write))
    }
}

/// Gives a pair of [`TlsBuffers`] back when dropped.
struct Lease<'m>(&'m Cell<bool>);

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

/// What [`crate::net::NetConnector`] needs for TLS: the identity, the
/// buffers, and the board's random generator (the chip's RNG, the host's
/// OS generator); `K` is the board's clock.
pub struct TlsSetup<'a, R, K: TlsClock = NoClock> {
    identity: &'a TlsIdentity<'a>,
    buffers: &'a TlsBuffers,
    rng: RefCell<R>,
    _clock: PhantomData<K>,
}

impl<'a, R: rand_core::RngCore + rand_core::CryptoRng, K: TlsClock> TlsSetup<'a, R, K> {
    /// TLS with `identity`, the record buffers `buffers` and the generator `rng`.
    pub fn new(identity: &'a TlsIdentity<'a>, buffers: &'a TlsBuffers, rng: R) -> Self {
        Self {
            identity,
            buffers,
            rng: RefCell::new(rng),
            _clock: PhantomData,
        }
    }

    /// Runs the handshake over `tcp` with the server `host`.
    pub(crate) async fn open<'m, C: Read + Write + 'm>(
        &'m self,
        tcp: C,
        host: &str,
        failure: &'m Cell<Option<TlsFailure>>,
    ) -> Result<TlsStream<'m, C, K>, ConnectError> {
        let (lease, in_record, read, write) = self.buffers.lend().ok_or(ConnectError::TlsBusy)?;
        let mut conn = TlsConnection::new(
            Counted {
                inner: tcp,
                header: [0; 5],
                have: 0,
                body_left: 0,
                in_record,
            },
            read,
            write,
        );
        let config = TlsConfig::new().with_server_name(host);
        let asked = Cell::new(None);
        let provider = Provider::<R, K> {
            rng: &self.rng,
            verifier: CertVerifier::new(Certificate::X509(self.identity.ca)),
            client: self.identity.client.as_ref(),
            asked: &asked,
        };
        match conn.open(TlsContext::new(&config, provider)).await {
            Ok(()) => Ok(TlsStream {
                conn,
                in_record,
                reading: false,
                asked: asked.get(),
                received: false,
                failure,
                _lease: lease,
                _clock: PhantomData,
            }),
            Err(e) => Err(match TlsFailure::of(&e, asked.get()) {
                Some(f) => ConnectError::Tls(f),
                None => ConnectError::Network(match e {
                    TlsError::Io(kind) => kind,
                    _ => ErrorKind::ConnectionAborted,
                }),
            }),
        }
    }
}

/// The TCP stream under a TLS session, following the record framing of
/// the bytes taken from it (5-byte header with the length, then the body).
///
/// embedded-tls keeps a record's header in a local while it reads the
/// record's body: a read cancelled in between (the MQTT session races its
/// header read against a timer) would leave the stream out of step. The
/// framing tells [`TlsStream::read`] whether a cancelled read stopped
/// between records (harmless: the common case, a timer while the broker
/// was silent) or inside one (the session ends cleanly instead of
/// decrypting garbage).
struct Counted<'m, C> {
    inner: C,
    header: [u8; 5],
    have: usize,
    body_left: usize,
    in_record: &'m Cell<bool>,
}

impl<C> Counted<'_, C> {
    fn follow(&mut self, data: &[u8]) {
        let mut rest = data;
        while !rest.is_empty() {
            if self.body_left > 0 {
                let k = self.body_left.min(rest.len());
                self.body_left -= k;
                rest = &rest[k..];
            } else {
                self.header[self.have] = rest[0];
                self.have += 1;
                rest = &rest[1..];
                if self.have == self.header.len() {
                    self.body_left =
                        usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                    self.have = 0;
                }
            }
        }
        self.in_record.set(self.have > 0 || self.body_left > 0);
    }
}

impl<C: Read + Write> embedded_io_async::ErrorType for Counted<'_, C> {
    type Error = C::Error;
}

impl<C: Read + Write> Read for Counted<'_, C> {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, C::Error> {
        let n = self.inner.read(buf).await?;
        self.follow(&buf[..n]);
        Ok(n)
    }
}

impl<C: Read + Write> Write for Counted<'_, C> {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, C::Error> {
        self.inner.write(buf).await
    }
    async fn flush(&mut self) -> Result<(), C::Error> {
        self.inner.flush().await
    }
}

/// An open TLS session over the TCP stream `C`.
pub struct TlsStream<'m, C: Read + Write + 'm, K: TlsClock> {
    // Declared before the lease: fields drop in order, so the connection
    // (which borrows the leased buffers) is gone before they are given back.
    conn: TlsConnection<'m, Counted<'m, C>, Aes128GcmSha256>,
    in_record: &'m Cell<bool>,
    /// A read is in progress; still set on entry means it was cancelled.
    reading: bool,
    /// Whether the server asked for the device's certificate, and whether
    /// one was presented.
    asked: Option<bool>,
    /// Whether any application data came from the server.
    received: bool,
    failure: &'m Cell<Option<TlsFailure>>,
    _lease: Lease<'m>,
    _clock: PhantomData<K>,
}

impl<C: Read + Write, K: TlsClock> TlsStream<'_, C, K> {
    /// Records what `e` means (see [`Connector::take_tls_failure`]).
    /// Until the server sent data, a close after it asked for the device's
    /// certificate is its refusal.
    ///
    /// [`Connector::take_tls_failure`]: crate::net::Connector::take_tls_failure
    fn note(&self, e: &TlsError) {
        let asked = if self.received { None } else { self.asked };
        if let Some(f) = TlsFailure::of(e, asked) {
            warn!("tls: {}", f.as_str());
            self.failure.set(Some(f));
        }
    }

    fn fail(&self, e: TlsError) -> StreamError {
        self.note(&e);
        match e {
            TlsError::Io(kind) => StreamError(kind),
            _ => StreamError(ErrorKind::ConnectionAborted),
        }
    }

    pub(crate) async fn read(&mut self, buf: &mut [u8]) -> Result<usize, StreamError> {
        if self.reading && self.in_record.get() {
            // A read was cancelled in the middle of a record: the session
            // is out of step for good.
            return Err(StreamError(ErrorKind::ConnectionAborted));
        }
        self.reading = true;
        let result = self.conn.read(buf).await;
        self.reading = false;
        match result {
            Ok(n) => {
                self.received |= n > 0;
                Ok(n)
            }
            // The peer's close_notify: the end of the stream.
            Err(TlsError::ConnectionClosed) => {
                self.note(&TlsError::ConnectionClosed);
                Ok(0)
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    pub(crate) async fn write(&mut self, buf: &[u8]) -> Result<usize, StreamError> {
        match self.conn.write(buf).await {
            Ok(n) => Ok(n),
            Err(e) => Err(self.fail(e)),
        }
    }

    pub(crate) async fn flush(&mut self) -> Result<(), StreamError> {
        match self.conn.flush().await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fail(e)),
        }
    }
}

/// The handshake's randomness, verifier and signer.
struct Provider<'p, R, K: TlsClock> {
    rng: &'p RefCell<R>,
    verifier: CertVerifier<'p, Aes128GcmSha256, K, MAX_SERVER_CERT>,
    client: Option<&'p (&'p [u8], SigningKey)>,
    /// Set when the server asks for the client's certificate: whether one
    /// was presented.
    asked: &'p Cell<Option<bool>>,
}

/// The board's generator, borrowed for one call at a time: the MQTT and the
/// download handshakes may run interleaved in the same task.
struct SharedRng<'p, R>(&'p RefCell<R>);

impl<R: rand_core::RngCore> rand_core::RngCore for SharedRng<'_, R> {
    fn next_u32(&mut self) -> u32 {
        self.0.borrow_mut().next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.0.borrow_mut().next_u64()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.borrow_mut().fill_bytes(dest)
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.0.borrow_mut().try_fill_bytes(dest)
    }
}

impl<R: rand_core::CryptoRng> rand_core::CryptoRng for SharedRng<'_, R> {}

impl<R, K> CryptoProvider for Provider<'_, R, K>
where
    R: rand_core::RngCore + rand_core::CryptoRng,
    K: TlsClock,
{
    type CipherSuite = Aes128GcmSha256;
    type Signature = DerSignature;

    fn rng(&mut self) -> impl embedded_tls::CryptoRngCore {
        SharedRng(self.rng)
    }

    fn verifier(&mut self) -> Result<&mut impl TlsVerifier<Aes128GcmSha256>, TlsError> {
        Ok(&mut self.verifier)
    }

    fn signer(
        &mut self,
    ) -> Result<
        (
            impl p256::ecdsa::signature::SignerMut<DerSignature>,
            SignatureScheme,
        ),
        TlsError,
    > {
        let (_, key) = self.client.ok_or(TlsError::InvalidPrivateKey)?;
        Ok((key.clone(), SignatureScheme::EcdsaSecp256r1Sha256))
    }

    fn client_cert(&mut self) -> Option<Certificate<impl AsRef<[u8]>>> {
        // embedded-tls asks only when the server sent a CertificateRequest.
        self.asked.set(Some(self.client.is_some()));
        self.client.map(|(cert, _)| Certificate::X509(*cert))
    }
}

/// A random generator that cannot exist: the type of a connector without
/// TLS, which never draws randomness.
pub enum NoRng {}

impl rand_core::RngCore for NoRng {
    fn next_u32(&mut self) -> u32 {
        match *self {}
    }
    fn next_u64(&mut self) -> u64 {
        match *self {}
    }
    fn fill_bytes(&mut self, _: &mut [u8]) {
        match *self {}
    }
    fn try_fill_bytes(&mut self, _: &mut [u8]) -> Result<(), rand_core::Error> {
        match *self {}
    }
}

impl rand_core::CryptoRng for NoRng {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stated_ram_covers_both_sessions_within_48_kb() {
        // The connection's own state, besides the borrowed buffers: the
        // TCP stream type here is a stand-in of the size of a socket handle.
        struct Sock;
        impl embedded_io_async::ErrorType for Sock {
            type Error = core::convert::Infallible;
        }
        impl Read for Sock {
            async fn read(&mut self, _: &mut [u8]) -> Result<usize, Self::Error> {
                Ok(0)
            }
        }
        impl Write for Sock {
            async fn write(&mut self, b: &[u8]) -> Result<usize, Self::Error> {
                Ok(b.len())
            }
            async fn flush(&mut self) -> Result<(), Self::Error> {
                Ok(())
            }
        }
        let state =
            core::mem::size_of::<TlsConnection<'static, Counted<'static, Sock>, Aes128GcmSha256>>();
        assert!(state <= TLS_STATE, "TLS state is {state} bytes");
        // The buffers themselves, plus a few bytes of bookkeeping per pair.
        let overhead = core::mem::size_of::<TlsBuffers>()
            - TLS_SESSIONS * (TLS_READ_BUFFER + TLS_WRITE_BUFFER);
        assert!(overhead <= TLS_SESSIONS * 16, "{overhead}");
        assert!(state + 16 <= TLS_STATE);
    }

    #[test]
    fn pem_is_decoded_and_der_passes_through() {
        let der = [0x30u8, 0x03, 0x02, 0x01, 0x05];
        let mut out = [0u8; 64];
        assert_eq!(der_from_pem_or_der(&der, &mut out), Ok(&der[..]));
        let pem = b"\n-----BEGIN CERTIFICATE-----\nMAMCAQU=\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n";
        let mut out = [0u8; 64];
        assert_eq!(der_from_pem_or_der(pem, &mut out), Ok(&der[..]));
        let mut out = [0u8; 64];
        assert_eq!(
            der_from_pem_or_der(
                b"-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n",
                &mut out
            ),
            Err(CredentialError::Pem)
        );
        assert_eq!(
            der_from_pem_or_der(b"  ", &mut out),
            Err(CredentialError::Empty)
        );
    }

    #[test]
    fn a_key_that_is_not_p256_is_refused_and_debug_hides_the_key() {
        let id = TlsIdentity::new(&[0x30, 0]).expect("ca");
        assert_eq!(
            id.clone().with_client(&[0x30, 0], &[1, 2, 3]).err(),
            Some(CredentialError::Key)
        );
        let key = p256::SecretKey::from_bytes(&[7u8; 32].into()).expect("scalar");
        let sec1 = key.to_sec1_der().expect("sec1");
        let id = id.with_client(&[0x30, 0], &sec1).expect("sec1 key");
        assert!(id.has_client());
        let shown = std::format!("{id:?}");
        assert!(shown.contains("<redacted>"), "{shown}");
        assert!(!shown.contains("[7"), "{shown}");
    }
}

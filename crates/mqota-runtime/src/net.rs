//! Where the device's connections come from: a [`Connector`] opens a stream
//! to `host:port`, plain or TLS, and the MQTT session and the downloader use
//! whatever it yields through `embedded-io-async` alone.
//!
//! TLS is a wrapper around the TCP stream, not a part of MQTT or HTTP: the
//! session asks for a secure stream when its broker URL was `mqtts://`, the
//! downloader when the job's URL is `https://`, and neither knows which TLS
//! crate made it. [`NetConnector`] is the one implementation: TCP and DNS
//! from `embedded-nal-async` (embassy-net on the chip, tokio in the virtual
//! device) and TLS from [`crate::tls`], so both run the same TLS code with
//! their own randomness and clock.

use core::cell::Cell;
use core::net::{IpAddr, SocketAddr};

use embedded_io::ErrorKind;
use embedded_io_async::{ErrorType, Read, Write};
use embedded_nal_async::{AddrType, Dns, TcpConnect};

use crate::tls::{NoClock, NoRng, TlsClock, TlsFailure, TlsSetup, TlsStream};

/// Opens the device's connections.
#[allow(async_fn_in_trait)]
pub trait Connector {
    /// A connection: bytes in, bytes out, TLS or not.
    type Stream<'m>: Read + Write
    where
        Self: 'm;

    /// Whether secure connections can be opened (a fleet CA is configured).
    /// The device reports it as `https` in its status and refuses
    /// `https://` jobs at once when it is false.
    fn tls(&self) -> bool;

    /// Resolves `host`, opens TCP to `host:port` and, with `secure`, runs
    /// the TLS handshake: the server must present a certificate from the
    /// pinned CA for `host`.
    async fn connect<'m>(
        &'m self,
        host: &str,
        port: u16,
        secure: bool,
    ) -> Result<Self::Stream<'m>, ConnectError>;

    /// Why the last secure connection failed after its handshake had
    /// passed, once: in TLS 1.3 a server refuses the client's certificate
    /// only after the client finished, so the refusal arrives as an alert
    /// on the first read. Taking it clears it.
    fn take_tls_failure(&self) -> Option<TlsFailure> {
        None
    }
}

/// Why [`Connector::connect`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ConnectError {
    /// The host name did not resolve. Retry after backoff.
    Dns,
    /// TCP could not be opened (refused, unreachable, link down). Retry
    /// after backoff.
    Network(ErrorKind),
    /// A secure connection was asked for and this device has no TLS
    /// configuration (no fleet CA). Do not retry; configure the device.
    TlsUnavailable,
    /// Both TLS sessions (MQTT and download) are already open. Retry
    /// after the other connection closed.
    TlsBusy,
    /// The TLS handshake failed or was refused. See [`TlsFailure`] for
    /// which failures a retry can fix.
    Tls(TlsFailure),
}

/// The error of a [`NetStream`]: only the kind survives, so that no
/// certificate detail or key material can leak through a log of it. A TLS
/// failure is kept by the connector ([`Connector::take_tls_failure`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct StreamError(pub ErrorKind);

impl core::fmt::Display for StreamError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl core::error::Error for StreamError {}

impl embedded_io::Error for StreamError {
    fn kind(&self) -> ErrorKind {
        self.0
    }
}

/// A connection of [`NetConnector`]: the TCP stream itself, or the TCP
/// stream inside a TLS session.
// The TLS variant's state (about 1.3 KB) lives inline: boxing it would need
// a heap, and the runtime has none.
#[allow(clippy::large_enum_variant)]
pub enum NetStream<'m, C: Read + Write + 'm, K: TlsClock> {
    /// Plain TCP (`mqtt://`, `http://`).
    Plain(C),
    /// TLS over TCP (`mqtts://`, `https://`).
    Tls(TlsStream<'m, C, K>),
}

impl<C: Read + Write, K: TlsClock> ErrorType for NetStream<'_, C, K> {
    type Error = StreamError;
}

impl<C: Read + Write, K: TlsClock> Read for NetStream<'_, C, K> {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, StreamError> {
        match self {
            NetStream::Plain(c) => c
                .read(buf)
                .await
                .map_err(|e| StreamError(embedded_io::Error::kind(&e))),
            NetStream::Tls(t) => t.read(buf).await,
        }
    }
}

impl<C: Read + Write, K: TlsClock> Write for NetStream<'_, C, K> {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, StreamError> {
        match self {
            NetStream::Plain(c) => c
                .write(buf)
                .await
                .map_err(|e| StreamError(embedded_io::Error::kind(&e))),
            NetStream::Tls(t) => t.write(buf).await,
        }
    }

    async fn flush(&mut self) -> Result<(), StreamError> {
        match self {
            NetStream::Plain(c) => c
                .flush()
                .await
                .map_err(|e| StreamError(embedded_io::Error::kind(&e))),
            NetStream::Tls(t) => t.flush().await,
        }
    }
}

/// [`Connector`] over an `embedded-nal-async` TCP stack and resolver, with
/// TLS when it is given a [`TlsSetup`].
///
/// `R` is the random generator of the TLS handshakes and `K` the clock its
/// certificate checks use; a plain connector has neither.
pub struct NetConnector<'a, T, D, R = NoRng, K = NoClock>
where
    T: TcpConnect,
    D: Dns,
    K: TlsClock,
{
    tcp: &'a T,
    dns: &'a D,
    tls: Option<TlsSetup<'a, R, K>>,
    failure: Cell<Option<TlsFailure>>,
}

impl<'a, T: TcpConnect, D: Dns> NetConnector<'a, T, D> {
    /// A connector without TLS: secure connections fail with
    /// [`ConnectError::TlsUnavailable`].
    pub fn plain(tcp: &'a T, dns: &'a D) -> Self {
        Self {
            tcp,
            dns,
            tls: None,
            failure: Cell::new(None),
        }
    }
}

impl<'a, T, D, R, K> NetConnector<'a, T, D, R, K>
where
    T: TcpConnect,
    D: Dns,
    R: rand_core::RngCore + rand_core::CryptoRng,
    K: TlsClock,
{
    /// A connector that opens plain and TLS connections.
    pub fn with_tls(tcp: &'a T, dns: &'a D, tls: TlsSetup<'a, R, K>) -> Self {
        Self::new(tcp, dns, Some(tls))
    }

    /// A connector with TLS when `tls` is given, plain otherwise; one type
    /// for a board that decides at start-up.
    pub fn new(tcp: &'a T, dns: &'a D, tls: Option<TlsSetup<'a, R, K>>) -> Self {
        Self {
            tcp,
            dns,
            tls,
            failure: Cell::new(None),
        }
    }
}

impl<T, D, R, K> Connector for NetConnector<'_, T, D, R, K>
where
    T: TcpConnect,
    D: Dns,
    R: rand_core::RngCore + rand_core::CryptoRng,
    K: TlsClock,
{
    type Stream<'m>
        = NetStream<'m, T::Connection<'m>, K>
    where
        Self: 'm;

    fn tls(&self) -> bool {
        self.tls.is_some()
    }

    async fn connect<'m>(
        &'m self,
        host: &str,
        port: u16,
        secure: bool,
    ) -> Result<Self::Stream<'m>, ConnectError> {
        let tls = match (secure, &self.tls) {
            (false, _) => None,
            (true, Some(tls)) => Some(tls),
            (true, None) => return Err(ConnectError::TlsUnavailable),
        };
        let ip = match host.parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) => self
                .dns
                .get_host_by_name(host, AddrType::Either)
                .await
                .map_err(|_| ConnectError::Dns)?,
        };
        let tcp = self
            .tcp
            .connect(SocketAddr::new(ip, port))
            .await
            .map_err(|e| ConnectError::Network(embedded_io::Error::kind(&e)))?;
        match tls {
            None => Ok(NetStream::Plain(tcp)),
            Some(tls) => {
                self.failure.set(None);
                tls.open(tcp, host, &self.failure)
                    .await
                    .map(NetStream::Tls)
                    .inspect_err(|e| {
                        if let ConnectError::Tls(f) = e {
                            warn!("tls: handshake with {} failed: {}", host, f.as_str());
                        }
                    })
            }
        }
    }

    fn take_tls_failure(&self) -> Option<TlsFailure> {
        self.failure.take()
    }
}

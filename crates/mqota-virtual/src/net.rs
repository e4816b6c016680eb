//! `embedded-nal-async` over tokio: [`TokioNet`] implements `TcpConnect` and
//! `Dns`, so the runtime's MQTT session and downloader run unchanged on the
//! host.
//!
//! Written here rather than taken from `std-embedded-nal-async` because that
//! crate runs its sockets on async-io's reactor; keeping everything on tokio
//! lets tests mix the runtime with tokio-based peers and timeouts freely.

use core::net::{IpAddr, SocketAddr};

use embedded_io_adapters::tokio_1::FromTokio;
use embedded_nal_async::{AddrType, Dns, TcpConnect};
use tokio::net::TcpStream;

/// The host's TCP stack and resolver, as seen by the runtime.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioNet;

impl TokioNet {
    /// The runtime's connector over the host's network, without TLS.
    pub fn plain() -> mqota_runtime::NetConnector<'static, TokioNet, TokioNet> {
        mqota_runtime::NetConnector::plain(&TokioNet, &TokioNet)
    }
}

impl TcpConnect for TokioNet {
    type Error = std::io::Error;
    type Connection<'a>
        = FromTokio<TcpStream>
    where
        Self: 'a;

    async fn connect<'a>(
        &'a self,
        remote: SocketAddr,
    ) -> Result<Self::Connection<'a>, Self::Error> {
        let stream = TcpStream::connect(remote).await?;
        // MQTT packets are small and latency matters more than throughput.
        stream.set_nodelay(true)?;
        Ok(FromTokio::new(stream))
    }
}

impl Dns for TokioNet {
    type Error = std::io::Error;

    async fn get_host_by_name(
        &self,
        host: &str,
        addr_type: AddrType,
    ) -> Result<IpAddr, Self::Error> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(ip);
        }
        let wanted = |ip: &IpAddr| match addr_type {
            AddrType::IPv4 => ip.is_ipv4(),
            AddrType::IPv6 => ip.is_ipv6(),
            AddrType::Either => true,
        };
        tokio::net::lookup_host((host, 0))
            .await?
            .map(|a| a.ip())
            .find(wanted)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no address of the requested family",
                )
            })
    }

    async fn get_host_by_address(
        &self,
        _addr: IpAddr,
        _result: &mut [u8],
    ) -> Result<usize, Self::Error> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "reverse lookup is not needed by the runtime",
        ))
    }
}

/// The network of one virtual device: [`TokioNet`] behind the device's power
/// rail and WiFi link. Connections refuse to open while the link is down or
/// the power is off, and a connection dies when the power goes or the link
/// drops after it was opened, as a real radio's would.
#[derive(Debug, Clone)]
pub struct VirtualNet {
    handle: crate::device::Handle,
}

impl VirtualNet {
    /// The network of the device controlled by `handle`.
    pub fn new(handle: crate::device::Handle) -> Self {
        Self { handle }
    }

    fn check(&self, epoch: Option<u64>) -> Result<(), std::io::Error> {
        let (up, now) = self.handle.link();
        if !self.handle.powered() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "power is off",
            ));
        }
        if !up || epoch.is_some_and(|e| e != now) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "WiFi link lost",
            ));
        }
        Ok(())
    }
}

/// A TCP connection of a virtual device.
pub struct VirtualConn {
    inner: FromTokio<TcpStream>,
    net: VirtualNet,
    epoch: u64,
}

impl embedded_io_async::ErrorType for VirtualConn {
    type Error = std::io::Error;
}

impl embedded_io_async::Read for VirtualConn {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        self.net.check(Some(self.epoch))?;
        // Also wake up when the link or power goes while waiting for data
        // (the handle says when, rather than a timer asking every so often:
        // thousands of idle devices in a process would spend their CPU on
        // it).
        loop {
            tokio::select! {
                r = embedded_io_async::Read::read(&mut self.inner, buf) => {
                    self.net.check(Some(self.epoch))?;
                    return r;
                }
                () = self.net.handle.changed() => {
                    self.net.check(Some(self.epoch))?;
                }
            }
        }
    }
}

impl embedded_io_async::Write for VirtualConn {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        self.net.check(Some(self.epoch))?;
        embedded_io_async::Write::write(&mut self.inner, buf).await
    }
    async fn flush(&mut self) -> Result<(), Self::Error> {
        self.net.check(Some(self.epoch))?;
        embedded_io_async::Write::flush(&mut self.inner).await
    }
}

impl TcpConnect for VirtualNet {
    type Error = std::io::Error;
    type Connection<'a>
        = VirtualConn
    where
        Self: 'a;

    async fn connect<'a>(
        &'a self,
        remote: SocketAddr,
    ) -> Result<Self::Connection<'a>, Self::Error> {
        self.check(None)?;
        let epoch = self.handle.link().1;
        let inner = TokioNet.connect(remote).await?;
        Ok(VirtualConn {
            inner,
            net: self.clone(),
            epoch,
        })
    }
}

impl Dns for VirtualNet {
    type Error = std::io::Error;

    async fn get_host_by_name(
        &self,
        host: &str,
        addr_type: AddrType,
    ) -> Result<IpAddr, Self::Error> {
        self.check(None)?;
        TokioNet.get_host_by_name(host, addr_type).await
    }

    async fn get_host_by_address(
        &self,
        addr: IpAddr,
        result: &mut [u8],
    ) -> Result<usize, Self::Error> {
        TokioNet.get_host_by_address(addr, result).await
    }
}

/// The TLS material of a virtual device: the fleet CA it pins and,
/// optionally, its client certificate and P-256 key, all as DER. Its
/// `Debug` output never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The fleet CA certificate (DER).
    pub ca_der: Vec<u8>,
    /// The device's certificate (DER).
    pub client_cert_der: Option<Vec<u8>>,
    /// The device's private key (PKCS#8 or SEC1 DER).
    pub client_key_der: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsFiles")
            .field("ca_der", &format_args!("{} bytes", self.ca_der.len()))
            .field(
                "client_cert_der",
                &self.client_cert_der.as_ref().map(|c| c.len()),
            )
            .field(
                "client_key_der",
                &self.client_key_der.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl TlsFiles {
    /// From PEM or DER bytes (the first PEM block of each). The client
    /// certificate and key come together or not at all.
    pub fn from_pem_or_der(
        ca: &[u8],
        client: Option<(&[u8], &[u8])>,
    ) -> Result<Self, mqota_runtime::CredentialError> {
        let der = |input: &[u8]| {
            let mut out = vec![0u8; input.len()];
            mqota_runtime::der_from_pem_or_der(input, &mut out).map(<[u8]>::to_vec)
        };
        let (client_cert_der, client_key_der) = match client {
            Some((cert, key)) => (Some(der(cert)?), Some(der(key)?)),
            None => (None, None),
        };
        let files = Self {
            ca_der: der(ca)?,
            client_cert_der,
            client_key_der,
        };
        // Refuse an unusable key now, not at the first handshake.
        files.identity()?;
        Ok(files)
    }

    /// Reads the CA and, if given, the certificate and key from files.
    pub fn load(
        ca: &std::path::Path,
        client: Option<(&std::path::Path, &std::path::Path)>,
    ) -> std::io::Result<Self> {
        let read = |p: &std::path::Path| {
            std::fs::read(p)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))
        };
        let ca = read(ca)?;
        let client = match client {
            Some((c, k)) => Some((read(c)?, read(k)?)),
            None => None,
        };
        Self::from_pem_or_der(
            &ca,
            client.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())),
        )
        .map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("TLS certificate or key unusable: {e:?}"),
            )
        })
    }

    /// The runtime's view of this material.
    pub fn identity(
        &self,
    ) -> Result<mqota_runtime::TlsIdentity<'_>, mqota_runtime::CredentialError> {
        let id = mqota_runtime::TlsIdentity::new(&self.ca_der)?;
        match (&self.client_cert_der, &self.client_key_der) {
            (Some(cert), Some(key)) => id.with_client(cert, key),
            _ => Ok(id),
        }
    }
}

/// The host's clock for certificate dates: the virtual device checks them,
/// as a chip with network time would.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock;

impl mqota_runtime::tls::TlsClock for SystemClock {
    fn now() -> Option<u64> {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs())
    }
}

/// The connector a virtual device hands the runtime: its network, and TLS
/// with the host's OS generator and clock when it has TLS material.
pub type VirtualConnector<'a> =
    mqota_runtime::NetConnector<'a, VirtualNet, VirtualNet, rand_core::OsRng, SystemClock>;

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
        // Also wake up when the link or power goes while waiting for data.
        loop {
            tokio::select! {
                r = embedded_io_async::Read::read(&mut self.inner, buf) => {
                    self.net.check(Some(self.epoch))?;
                    return r;
                }
                _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {
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

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

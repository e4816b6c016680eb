//! Firmware downloads over HTTP, streamed chunk by chunk into a sink.
//!
//! Built on reqwless 0.14, generic over the same `TcpConnect` + `Dns` as the
//! MQTT session. TLS is not enabled yet; reqwless wraps the very same
//! connection in embedded-tls when built with its `embedded-tls` feature, so
//! [`Downloader::from_client`] accepts a client configured that way later.
//!
//! A download can resume: with `range_start > 0` the request carries
//! `Range: bytes=N-`. A server that honours it answers `206 Partial Content`
//! with a `Content-Range`; one that ignores it answers `200` with the whole
//! file. [`ResponseInfo::range_honoured`] tells the sink which happened, so
//! it can restart its pipeline from byte 0 instead of appending.

use core::fmt::Write as _;

use embassy_time::{with_timeout, Duration};
use embedded_io_async::Read;
use embedded_nal_async::{Dns, TcpConnect};
use heapless::String;
use reqwless::client::HttpClient;
use reqwless::request::{Method, RequestBuilder};

/// Bytes for the response status line and headers. reqwless keeps using the
/// same buffer to read ahead in the body afterwards. A response whose headers
/// do not fit fails with [`DownloadError::Protocol`].
pub const HTTP_RX_BUFFER: usize = 2048;
/// Largest slice handed to [`BodySink::chunk`] at once.
pub const BODY_CHUNK: usize = 1024;

/// The sink refused further data. The sink keeps its own reason; the
/// download ends with [`DownloadError::Aborted`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Abort;

/// A parsed `Content-Range: bytes START-END/TOTAL` header (`END` inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ContentRange {
    /// Offset of the first byte in the body.
    pub start: u64,
    /// Offset of the last byte in the body (inclusive).
    pub end: u64,
    /// Size of the whole file, when the server knows it (`*` otherwise).
    pub total: Option<u64>,
}

/// What the server answered, handed to [`BodySink::begin`] before any body byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ResponseInfo {
    /// HTTP status code (200 or 206; other codes end in [`DownloadError::Status`]).
    pub status: u16,
    /// Length of this body (not of the whole file for 206), if announced.
    pub content_length: Option<u64>,
    /// The parsed `Content-Range`, present on 206 answers.
    pub content_range: Option<ContentRange>,
    /// True when the body starts at the requested offset: a 206 for a range
    /// request, or any success for a request from byte 0. False when the
    /// server ignored `Range` and sends the whole file from byte 0.
    pub range_honoured: bool,
}

impl ResponseInfo {
    /// Offset in the file of the first body byte.
    pub fn body_offset(&self) -> u64 {
        self.content_range.map_or(0, |r| r.start)
    }

    /// Size of the whole file, if the answer reveals it.
    pub fn total_size(&self) -> Option<u64> {
        match self.content_range {
            Some(r) => r.total,
            None => self.content_length,
        }
    }
}

/// Where a download's body goes (the flash pipeline on the device, a hasher
/// or a file on the host).
#[allow(async_fn_in_trait)]
pub trait BodySink {
    /// Called once with the response head, before any body byte. Returning
    /// [`Abort`] ends the download without reading the body.
    async fn begin(&mut self, info: &ResponseInfo) -> Result<(), Abort>;

    /// Called with each piece of the body, in order, at most [`BODY_CHUNK`]
    /// bytes at a time.
    async fn chunk(&mut self, data: &[u8]) -> Result<(), Abort>;
}

/// Why a download ended early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DownloadError {
    /// The server answered with this non-success status (e.g. 404: the URL
    /// is wrong, report it; 5xx: the server is unwell, retry later; 416: the
    /// resume offset is past the end, restart from 0).
    Status(u16),
    /// The host name did not resolve. Retry after backoff.
    Dns,
    /// Connecting or transferring failed (refused, reset, closed early).
    /// Retry after backoff, resuming from the bytes already received.
    Network(embedded_io::ErrorKind),
    /// No progress for the downloader's I/O timeout. Retry like `Network`.
    Timeout,
    /// The sink returned [`Abort`]. The sink knows why.
    Aborted,
    /// The URL could not be parsed or uses an unsupported scheme. Do not retry.
    InvalidUrl,
    /// The response was malformed: headers too large for
    /// [`HTTP_RX_BUFFER`], an unparsable header, a 206 for a different range
    /// than requested. Report it; retrying rarely helps.
    Protocol,
}

#[cfg(feature = "defmt")]
impl defmt::Format for DownloadError {
    fn format(&self, f: defmt::Formatter) {
        defmt::write!(f, "{}", defmt::Debug2Format(self))
    }
}

/// An HTTP downloader with its bounded buffers.
pub struct Downloader<'a, T: TcpConnect + 'a, D: Dns + 'a> {
    client: HttpClient<'a, T, D>,
    rx: [u8; HTTP_RX_BUFFER],
    chunk: [u8; BODY_CHUNK],
    io_timeout: Duration,
}

impl<'a, T: TcpConnect + 'a, D: Dns + 'a> Downloader<'a, T, D> {
    /// A plain-HTTP downloader; every network step (connect, request,
    /// each body read) is bounded by 10 s.
    pub fn new(tcp: &'a T, dns: &'a D) -> Self {
        Self::from_client(HttpClient::new(tcp, dns))
    }

    /// A downloader over a prepared reqwless client (e.g. one built with
    /// TLS once that feature is enabled).
    pub fn from_client(client: HttpClient<'a, T, D>) -> Self {
        Self {
            client,
            rx: [0; HTTP_RX_BUFFER],
            chunk: [0; BODY_CHUNK],
            io_timeout: Duration::from_secs(10),
        }
    }

    /// Changes the bound on each network step.
    pub fn with_io_timeout(mut self, timeout: Duration) -> Self {
        self.io_timeout = timeout;
        self
    }

    /// GETs `url`, from byte `range_start` on, streaming the body into
    /// `sink`. Returns the number of body bytes delivered.
    pub async fn download<S: BodySink>(
        &mut self,
        url: &str,
        range_start: u64,
        sink: &mut S,
    ) -> Result<u64, DownloadError> {
        let timeout = self.io_timeout;
        let mut range: String<32> = String::new();
        // Cannot fail: "bytes=" plus 20 digits and '-' fit in 32 bytes.
        let _ = write!(range, "bytes={range_start}-");
        let range_header = [("Range", range.as_str())];
        let headers: &[(&str, &str)] = if range_start > 0 { &range_header } else { &[] };

        let mut request = with_timeout(timeout, self.client.request(Method::GET, url))
            .await
            .map_err(|_| DownloadError::Timeout)?
            .map_err(map_error)?
            .headers(headers);
        let response = with_timeout(timeout, request.send(&mut self.rx))
            .await
            .map_err(|_| DownloadError::Timeout)?
            .map_err(map_error)?;

        let status = response.status.0;
        if !(200..300).contains(&status) {
            debug!("http: status {}", status);
            return Err(DownloadError::Status(status));
        }
        let mut content_range = None;
        for (name, value) in response.headers() {
            if name.eq_ignore_ascii_case("content-range") {
                let value = core::str::from_utf8(value).map_err(|_| DownloadError::Protocol)?;
                content_range = Some(parse_content_range(value).ok_or(DownloadError::Protocol)?);
            }
        }
        let partial = status == 206;
        if partial && content_range.map(|r| r.start) != Some(range_start) {
            return Err(DownloadError::Protocol);
        }
        let info = ResponseInfo {
            status,
            content_length: response.content_length.map(|l| l as u64),
            content_range: if partial { content_range } else { None },
            range_honoured: partial || range_start == 0,
        };
        sink.begin(&info)
            .await
            .map_err(|Abort| DownloadError::Aborted)?;

        let mut reader = response.body().reader();
        let mut delivered = 0u64;
        loop {
            let n = with_timeout(timeout, reader.read(&mut self.chunk))
                .await
                .map_err(|_| DownloadError::Timeout)?
                .map_err(map_error)?;
            if n == 0 {
                break;
            }
            sink.chunk(&self.chunk[..n])
                .await
                .map_err(|Abort| DownloadError::Aborted)?;
            delivered += n as u64;
        }
        if let Some(expected) = info.content_length {
            if delivered != expected {
                return Err(DownloadError::Network(
                    embedded_io::ErrorKind::ConnectionAborted,
                ));
            }
        }
        Ok(delivered)
    }
}

fn map_error(e: reqwless::Error) -> DownloadError {
    use reqwless::Error as E;
    match e {
        E::Dns => DownloadError::Dns,
        E::Network(kind) => DownloadError::Network(kind),
        E::ConnectionAborted => DownloadError::Network(embedded_io::ErrorKind::ConnectionAborted),
        E::InvalidUrl(_) => DownloadError::InvalidUrl,
        _ => DownloadError::Protocol,
    }
}

/// Parses `bytes START-END/TOTAL` (TOTAL may be `*`), as in RFC 9110 §14.4.
pub fn parse_content_range(value: &str) -> Option<ContentRange> {
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.trim().split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse::<u64>().ok()?),
    };
    if end < start || total.is_some_and(|t| end >= t) {
        return None;
    }
    Some(ContentRange { start, end, total })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_complete_content_range_is_parsed() {
        assert_eq!(
            parse_content_range("bytes 100-199/1000"),
            Some(ContentRange {
                start: 100,
                end: 199,
                total: Some(1000)
            })
        );
    }

    #[test]
    fn an_unknown_total_is_none() {
        assert_eq!(
            parse_content_range("bytes 0-0/*"),
            Some(ContentRange {
                start: 0,
                end: 0,
                total: None
            })
        );
    }

    #[test]
    fn malformed_or_inconsistent_ranges_are_refused() {
        for bad in [
            "",
            "bytes",
            "items 0-1/2",
            "bytes 5-4/10",
            "bytes 0-10/10",
            "bytes */10",
            "bytes a-b/c",
            "bytes 1-2",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad:?}");
        }
    }
}

//! Firmware downloads over HTTP, streamed chunk by chunk into a sink.
//!
//! Built on reqwless 0.14 over the same [`Connector`] as the MQTT session:
//! the connector opens the stream (TLS for `https://`, with the pinned fleet
//! CA and the URL's host name checked) and reqwless speaks HTTP over it
//! (`HttpConnection::Plain`, whatever the stream is), so plain and secure
//! downloads are one code path, `Range` resume and redirects included.
//!
//! A download can resume: with `range_start > 0` the request carries
//! `Range: bytes=N-`. A server that honours it answers `206 Partial Content`
//! with a `Content-Range`; one that ignores it answers `200` with the whole
//! file. [`ResponseInfo::range_honoured`] tells the sink which happened, so
//! it can restart its pipeline from byte 0 instead of appending.
//!
//! Redirects are followed here, so the sink and the engine only ever see the
//! final answer: 301, 302, 303, 307 and 308, at most [`MAX_REDIRECTS`] in a
//! row, with a relative `Location` resolved against the URL that answered.
//! The current URL lives in a bounded buffer of
//! [`MAX_URL_LEN`] bytes, like a job's
//! URL. Every hop carries the same `Range`, so a resumed download asks the
//! final location for the rest; a retry starts again from the job's URL,
//! because the targets of GitHub release assets and S3 presigned URLs
//! expire. A redirect from `https` to `http` is refused, as is one to a
//! scheme this build cannot fetch.
//!
//! A connector without TLS ([`Connector::tls`] false) cannot fetch
//! `https://`: such a URL ends at once with
//! [`DownloadError::UnsupportedScheme`].

use core::fmt::Write as _;

use embassy_time::{with_timeout, Duration};
use embedded_io_async::Read;
use heapless::String;
use mqota_core::fetch::is_https;
use mqota_core::protocol::MAX_URL_LEN;
use nourl::{Url, UrlScheme};
use reqwless::client::HttpConnection;
use reqwless::request::{Request, RequestBuilder};

use crate::net::{ConnectError, Connector};
use crate::tls::TlsFailure;

/// Redirects followed in a row before a download fails with
/// [`RedirectError::TooMany`].
pub const MAX_REDIRECTS: u8 = 5;

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
    /// The URL could not be parsed or is longer than a job's URL may be.
    /// Do not retry.
    InvalidUrl,
    /// The URL's scheme is not one this device fetches (`https://` without
    /// TLS, see [`Connector::tls`], or neither http nor https). Do not retry.
    UnsupportedScheme,
    /// The TLS session to the server failed or was refused (its certificate
    /// is not from the fleet CA or not for the URL's host, or the server
    /// refused this device's certificate). Do not retry; report it.
    Tls(TlsFailure),
    /// The response was malformed: headers too large for
    /// [`HTTP_RX_BUFFER`], an unparsable header, a 206 for a different range
    /// than requested. Report it; retrying rarely helps.
    Protocol,
    /// The `Content-Length` header is not a non-negative number this device
    /// can hold. Do not retry.
    BadContentLength,
    /// A redirect could not be followed. Do not retry.
    Redirect(RedirectError),
}

/// Why a redirect was not followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum RedirectError {
    /// More than [`MAX_REDIRECTS`] redirects in a row (a loop ends here too).
    TooMany,
    /// A redirect from `https://` to `http://`.
    Insecure,
    /// A redirect to a scheme this device cannot fetch (`https://` without
    /// TLS, or neither http nor https).
    UnsupportedScheme,
    /// No `Location`, or one that cannot be resolved or is longer than
    /// [`MAX_URL_LEN`] bytes.
    BadLocation,
}

#[cfg(feature = "defmt")]
impl defmt::Format for DownloadError {
    fn format(&self, f: defmt::Formatter) {
        defmt::write!(f, "{}", defmt::Debug2Format(self))
    }
}

/// An HTTP downloader with its bounded buffers.
pub struct Downloader<'a, C: Connector + 'a> {
    net: &'a C,
    rx: [u8; HTTP_RX_BUFFER],
    chunk: [u8; BODY_CHUNK],
    io_timeout: Duration,
}

impl<'a, C: Connector + 'a> Downloader<'a, C> {
    /// A downloader over `net`; every network step (connect with its TLS
    /// handshake, request, each body read) is bounded by 10 s.
    pub fn new(net: &'a C) -> Self {
        Self {
            net,
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

    /// GETs `url`, from byte `range_start` on, following redirects, and
    /// streams the final answer's body into `sink`. Returns the number of
    /// body bytes delivered.
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

        let mut current: String<MAX_URL_LEN> = String::new();
        current
            .push_str(url)
            .map_err(|_| DownloadError::InvalidUrl)?;
        let tls = self.net.tls();
        if !scheme_supported(&current, tls) {
            return Err(DownloadError::UnsupportedScheme);
        }
        let net = self.net;
        let mut hops = 0u8;
        loop {
            let parsed = Url::parse(&current).map_err(|_| DownloadError::InvalidUrl)?;
            let secure = parsed.scheme() == UrlScheme::HTTPS;
            let stream = match with_timeout(
                timeout,
                net.connect(parsed.host(), parsed.port_or_default(), secure),
            )
            .await
            {
                Err(_) => return Err(DownloadError::Timeout),
                Ok(Err(e)) => return Err(connect_error(e)),
                Ok(Ok(s)) => s,
            };
            let mut conn = HttpConnection::Plain(stream);
            let request = Request::get(parsed.path())
                .host(parsed.host())
                .headers(headers)
                .build();
            // Zeroed, so the head of a response reqwless refused can be
            // examined afterwards without stale bytes of an earlier one.
            self.rx.fill(0);
            let response = match with_timeout(timeout, conn.send(request, &mut self.rx)).await {
                Err(_) => return Err(DownloadError::Timeout),
                Ok(Err(reqwless::Error::Codec)) => return Err(refused_head(&self.rx)),
                Ok(Err(e)) => {
                    return Err(net
                        .take_tls_failure()
                        .map_or(map_error(e), DownloadError::Tls))
                }
                Ok(Ok(r)) => r,
            };
            let status = response.status.0;
            if !is_redirect(status) {
                return Self::deliver(response, range_start, timeout, &mut self.chunk, sink).await;
            }
            hops += 1;
            if hops > MAX_REDIRECTS {
                debug!("http: more than {} redirects", MAX_REDIRECTS);
                return Err(DownloadError::Redirect(RedirectError::TooMany));
            }
            let mut next: String<MAX_URL_LEN> = String::new();
            let location = response
                .headers()
                .find(|(name, _)| name.eq_ignore_ascii_case("location"))
                .and_then(|(_, value)| core::str::from_utf8(value).ok())
                .ok_or(DownloadError::Redirect(RedirectError::BadLocation))?;
            resolve_location(&current, location, &mut next)
                .ok_or(DownloadError::Redirect(RedirectError::BadLocation))?;
            drop(response);
            check_redirect_with(&current, &next, tls)?;
            debug!("http: {} redirect, hop {}", status, hops);
            current = next;
        }
    }

    /// Streams the body of a final (non-redirect) answer into `sink`.
    async fn deliver<S: BodySink, R: Read>(
        response: reqwless::response::Response<'_, '_, R>,
        range_start: u64,
        timeout: Duration,
        chunk: &mut [u8; BODY_CHUNK],
        sink: &mut S,
    ) -> Result<u64, DownloadError> {
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
            let n = with_timeout(timeout, reader.read(chunk))
                .await
                .map_err(|_| DownloadError::Timeout)?
                .map_err(map_error)?;
            if n == 0 {
                break;
            }
            sink.chunk(&chunk[..n])
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

/// The statuses that send the client elsewhere with the same GET.
fn is_redirect(status: u16) -> bool {
    matches!(status, 301 | 302 | 303 | 307 | 308)
}

/// Whether a device with (`tls`) or without TLS fetches `url`'s scheme.
fn scheme_supported(url: &str, tls: bool) -> bool {
    let http = url
        .get(..7)
        .is_some_and(|s| s.eq_ignore_ascii_case("http://"));
    http || (tls && is_https(url))
}

/// Refuses a redirect from `from` to `to` that would drop TLS or that a
/// device with (`tls`) or without TLS cannot fetch.
pub fn check_redirect_with(from: &str, to: &str, tls: bool) -> Result<(), DownloadError> {
    if is_https(from) && !is_https(to) {
        return Err(DownloadError::Redirect(RedirectError::Insecure));
    }
    if !scheme_supported(to, tls) {
        return Err(DownloadError::Redirect(RedirectError::UnsupportedScheme));
    }
    Ok(())
}

fn connect_error(e: ConnectError) -> DownloadError {
    match e {
        ConnectError::Dns => DownloadError::Dns,
        ConnectError::Network(kind) => DownloadError::Network(kind),
        ConnectError::TlsUnavailable => DownloadError::UnsupportedScheme,
        // The other session's handshake finishes soon; worth a retry.
        ConnectError::TlsBusy => DownloadError::Network(embedded_io::ErrorKind::OutOfMemory),
        ConnectError::Tls(f) => DownloadError::Tls(f),
    }
}

/// Why reqwless refused a response head it received: re-reads the head left
/// in `rx` to tell a bad `Content-Length` (permanent) from other garbage.
fn refused_head(rx: &[u8]) -> DownloadError {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut head = httparse::Response::new(&mut headers);
    if let Ok(httparse::Status::Complete(_)) = head.parse(rx) {
        let bad_length = head.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("content-length")
                && !core::str::from_utf8(h.value)
                    .ok()
                    .map(str::trim)
                    .is_some_and(|v| {
                        !v.is_empty()
                            && v.bytes().all(|b| b.is_ascii_digit())
                            && v.parse::<usize>().is_ok()
                    })
        });
        if bad_length {
            return DownloadError::BadContentLength;
        }
    }
    DownloadError::Protocol
}

/// Resolves a redirect's `Location` against the URL that answered, into
/// `out` (RFC 3986 §5.2, without the fragment): an absolute URL is taken as
/// it is, `//host/path` keeps the scheme, `/path` the scheme and host,
/// `?query` the path too, and a relative path is merged with the base's
/// directory; `.` and `..` segments are removed. `None` if `location` is
/// empty, `base` is not `scheme://...`, or the result does not fit `out`.
pub fn resolve_location<const N: usize>(
    base: &str,
    location: &str,
    out: &mut String<N>,
) -> Option<()> {
    out.clear();
    let location = location.trim();
    let location = location.split('#').next().unwrap_or("");
    if location.is_empty() {
        return None;
    }
    if has_scheme(location) {
        return out.push_str(location).ok();
    }
    let scheme_end = base.find("://")?;
    let after = &base[scheme_end + 3..];
    let authority_len = after.find(['/', '?', '#']).unwrap_or(after.len());
    let authority = &after[..authority_len];
    let rest = &after[authority_len..];
    let base_path = &rest[..rest.find(['?', '#']).unwrap_or(rest.len())];
    if let Some(net_path) = location.strip_prefix("//") {
        out.push_str(&base[..scheme_end + 3]).ok()?;
        return out.push_str(net_path).ok();
    }
    out.push_str(&base[..scheme_end + 3]).ok()?;
    out.push_str(authority).ok()?;
    let (path, query) = match location.find('?') {
        Some(q) => (&location[..q], &location[q..]),
        None => (location, ""),
    };
    if path.is_empty() {
        // Only a query: the base's path with the new query.
        out.push_str(if base_path.is_empty() { "/" } else { base_path })
            .ok()?;
    } else if path.starts_with('/') {
        push_path(out, "", path)?;
    } else {
        // The base's directory: its path up to the last '/'.
        let dir = match base_path.rfind('/') {
            Some(i) => &base_path[..=i],
            None => "/",
        };
        push_path(out, dir, path)?;
    }
    out.push_str(query).ok()
}

/// Whether `s` starts with `scheme://` (RFC 3986 scheme characters).
fn has_scheme(s: &str) -> bool {
    match s.find("://") {
        Some(i) if i > 0 => {
            let scheme = &s[..i];
            scheme.as_bytes()[0].is_ascii_alphabetic()
                && scheme
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
        }
        _ => false,
    }
}

/// Appends the path `dir` + `rel` to `out` with its dot segments removed;
/// `dir` is empty or starts and ends with '/', and `rel` starts with '/'
/// when `dir` is empty.
fn push_path<const N: usize>(out: &mut String<N>, dir: &str, rel: &str) -> Option<()> {
    let mut merged: String<N> = String::new();
    merged.push_str(dir).ok()?;
    merged.push_str(rel).ok()?;
    let root = out.len();
    let path = merged.strip_prefix('/').unwrap_or(&merged);
    let count = path.split('/').count();
    for (i, seg) in path.split('/').enumerate() {
        match seg {
            "." => {}
            ".." => {
                let cut = out[root..].rfind('/').map_or(root, |j| root + j);
                out.truncate(cut);
            }
            _ => {
                out.push('/').ok()?;
                out.push_str(seg).ok()?;
                continue;
            }
        }
        // A path ending in `.` or `..` names a directory.
        if i + 1 == count {
            out.push('/').ok()?;
        }
    }
    if out.len() == root {
        out.push('/').ok()?;
    }
    Some(())
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

    fn resolved(base: &str, location: &str) -> Option<std::string::String> {
        let mut out: String<MAX_URL_LEN> = String::new();
        resolve_location(base, location, &mut out).map(|()| out.as_str().into())
    }

    #[test]
    fn locations_resolve_against_the_url_that_answered() {
        let base = "http://h:8080/a/b/fw.bin?sig=1";
        for (location, want) in [
            ("http://other/x.bin", "http://other/x.bin"),
            ("HTTPS://other/x.bin", "HTTPS://other/x.bin"),
            ("//cdn.example/x.bin", "http://cdn.example/x.bin"),
            ("/x.bin", "http://h:8080/x.bin"),
            ("/x/../y/./z.bin", "http://h:8080/y/z.bin"),
            ("c.bin", "http://h:8080/a/b/c.bin"),
            ("./c.bin", "http://h:8080/a/b/c.bin"),
            ("../c.bin", "http://h:8080/a/c.bin"),
            ("../../../../c.bin", "http://h:8080/c.bin"),
            ("..", "http://h:8080/a/"),
            ("d/", "http://h:8080/a/b/d/"),
            ("?sig=2", "http://h:8080/a/b/fw.bin?sig=2"),
            ("c.bin?x=../y", "http://h:8080/a/b/c.bin?x=../y"),
            ("c.bin#frag", "http://h:8080/a/b/c.bin"),
            ("  /x.bin  ", "http://h:8080/x.bin"),
        ] {
            assert_eq!(
                resolved(base, location).as_deref(),
                Some(want),
                "{location}"
            );
        }
        assert_eq!(
            resolved("http://h", "x.bin").as_deref(),
            Some("http://h/x.bin")
        );
        assert_eq!(
            resolved("http://h?q", "x.bin").as_deref(),
            Some("http://h/x.bin")
        );
    }

    #[test]
    fn unusable_locations_resolve_to_none() {
        assert_eq!(resolved("http://h/a", ""), None);
        assert_eq!(resolved("http://h/a", "   "), None);
        assert_eq!(resolved("no-scheme", "x.bin"), None);
        let long = "x".repeat(MAX_URL_LEN);
        assert_eq!(resolved("http://h/a", &long), None);
    }

    #[test]
    fn a_redirect_from_https_to_http_is_refused() {
        for tls in [false, true] {
            assert_eq!(
                check_redirect_with("https://a/fw.bin", "http://b/fw.bin", tls),
                Err(DownloadError::Redirect(RedirectError::Insecure))
            );
            assert_eq!(
                check_redirect_with("http://a/fw.bin", "http://b/fw.bin", tls),
                Ok(())
            );
            assert_eq!(
                check_redirect_with("http://a/fw.bin", "ftp://b/fw.bin", tls),
                Err(DownloadError::Redirect(RedirectError::UnsupportedScheme))
            );
        }
        // Without TLS the device cannot follow one to https; with it, it does.
        assert_eq!(
            check_redirect_with("http://a/fw.bin", "https://b/fw.bin", false),
            Err(DownloadError::Redirect(RedirectError::UnsupportedScheme))
        );
        assert_eq!(
            check_redirect_with("https://a/fw.bin", "https://b/fw.bin", true),
            Ok(())
        );
    }

    #[test]
    fn a_refused_head_with_a_bad_content_length_is_told_apart() {
        let mut rx = [0u8; 256];
        for (head, want) in [
            (
                &b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n"[..],
                DownloadError::BadContentLength,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
                DownloadError::BadContentLength,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                DownloadError::BadContentLength,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
                DownloadError::Protocol,
            ),
            (b"garbage\r\n\r\n", DownloadError::Protocol),
        ] {
            rx.fill(0);
            rx[..head.len()].copy_from_slice(head);
            assert_eq!(refused_head(&rx), want, "{:?}", core::str::from_utf8(head));
        }
    }
}

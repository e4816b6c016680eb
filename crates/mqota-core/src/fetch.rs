//! What can go wrong fetching a firmware image, and which of it is worth
//! retrying: the one place that decides.
//!
//! The runtime's HTTP layer reports every way a fetch ends badly as a
//! [`FetchError`] (an HTTP status that is neither 200 nor 206 after any
//! redirects, a connection that failed, a URL the device cannot use); the
//! [engine](crate::engine) asks it for its error code, its message and
//! whether another attempt could end differently.
//!
//! | failure | code | retried |
//! |---|---|---|
//! | HTTP 408, 429, 5xx | `http_status` | yes |
//! | any other HTTP status (4xx, a 3xx that is not followed) | `http_status` | no |
//! | DNS, connect, reset, closed early, malformed response | `network` | yes |
//! | bad or negative `Content-Length` | `http_status` | no |
//! | redirect loop or more than five redirects, https → http, no usable `Location` | `http_status` | no |
//! | the job's URL cannot be used (unparsable, `https` without TLS, other scheme) | `bad_command` | no |
//!
//! A transient failure is retried after a jittered exponential
//! [backoff](crate::backoff) until the job's retries or its deadline run
//! out; a permanent one ends the job at once.

use core::fmt::Write as _;

use heapless::String;

use crate::protocol::{truncated, ErrorCode, MAX_MESSAGE_LEN};

/// The message of a job refused because its URL is `https://` and the
/// device was built without TLS.
pub const HTTPS_NOT_ENABLED: &str = "https is not enabled on this device";

/// Why a fetch of the firmware ended without a usable response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum FetchError {
    /// The server answered with this status (after following any redirects),
    /// and it is neither 200 nor the 206 a resumed request asks for.
    Status(u16),
    /// The server's host name did not resolve.
    Dns,
    /// Connecting, sending or receiving failed, or the connection closed
    /// before the body was complete.
    Connection,
    /// The response could not be read as HTTP (garbled status line, headers
    /// larger than the device's buffer, a 206 for another range).
    BadResponse,
    /// The `Content-Length` header is not a non-negative number.
    BadContentLength,
    /// More than five redirects in a row, or a redirect loop.
    TooManyRedirects,
    /// A redirect from `https://` to `http://`: refused, it would drop the
    /// transport's protection in the middle of a job.
    InsecureRedirect,
    /// A redirect to `https://` on a device built without TLS, or to
    /// another scheme.
    RedirectUnsupported,
    /// A redirect without a `Location`, or one that cannot be resolved or is
    /// longer than a job's URL may be.
    BadRedirect,
    /// The job's URL uses `https://` and the device was built without TLS.
    HttpsNotEnabled,
    /// The job's URL cannot be used by this device (unparsable, another
    /// scheme, a host the HTTP client refuses).
    BadUrl,
    /// The TLS session to the download server failed or was refused: the
    /// server's certificate is not from the fleet CA the device pins or not
    /// for the URL's host, or the server refused the device's certificate.
    /// The text says which (the device's own words, no certificate bytes).
    /// Reported with the code `network` and not retried: another attempt
    /// meets the same certificate.
    Tls(&'static str),
}

impl FetchError {
    /// Whether another attempt could end differently: true for HTTP 408, 429
    /// and 5xx, for network failures and malformed responses; false for
    /// everything a retry cannot change.
    pub fn is_transient(&self) -> bool {
        match *self {
            FetchError::Status(status) => status_is_transient(status),
            FetchError::Dns | FetchError::Connection | FetchError::BadResponse => true,
            FetchError::BadContentLength
            | FetchError::TooManyRedirects
            | FetchError::InsecureRedirect
            | FetchError::RedirectUnsupported
            | FetchError::BadRedirect
            | FetchError::HttpsNotEnabled
            | FetchError::BadUrl
            | FetchError::Tls(_) => false,
        }
    }

    /// The error code a job that ends with this failure reports.
    pub fn code(&self) -> ErrorCode {
        match self {
            FetchError::Dns
            | FetchError::Connection
            | FetchError::BadResponse
            | FetchError::Tls(_) => ErrorCode::Network,
            FetchError::HttpsNotEnabled | FetchError::BadUrl => ErrorCode::BadCommand,
            FetchError::Status(_)
            | FetchError::BadContentLength
            | FetchError::TooManyRedirects
            | FetchError::InsecureRedirect
            | FetchError::RedirectUnsupported
            | FetchError::BadRedirect => ErrorCode::HttpStatus,
        }
    }

    /// The one line for the operator (`message` of the `failed` event):
    /// `HTTP 404` for a status, a short sentence otherwise.
    pub fn message(&self) -> String<MAX_MESSAGE_LEN> {
        let fixed = match self {
            FetchError::Status(status) => {
                let mut m = String::new();
                // "HTTP " and at most five digits always fit.
                let _ = write!(m, "HTTP {status}");
                return m;
            }
            FetchError::Dns => "DNS lookup failed",
            FetchError::Connection => "connection failed",
            FetchError::BadResponse => "malformed HTTP response",
            FetchError::BadContentLength => "bad Content-Length",
            FetchError::TooManyRedirects => "too many redirects",
            FetchError::InsecureRedirect => "redirect from https to http refused",
            FetchError::RedirectUnsupported => "redirect to a scheme this device cannot fetch",
            FetchError::BadRedirect => "redirect without a usable Location",
            FetchError::HttpsNotEnabled => HTTPS_NOT_ENABLED,
            FetchError::BadUrl => "URL not usable on this device",
            FetchError::Tls(why) => {
                let mut m = String::new();
                // Longer reasons are cut at the message bound.
                let _ = write!(m, "TLS: {why}");
                return m;
            }
        };
        truncated(fixed)
    }
}

/// Whether an HTTP status is worth retrying: 408 Request Timeout, 429 Too
/// Many Requests and every 5xx. Every other status a firmware fetch can end
/// with (404, 403, 410, ...) says the same on the next attempt.
pub fn status_is_transient(status: u16) -> bool {
    matches!(status, 408 | 429 | 500..=599)
}

/// Whether `url` starts with `https://` (the scheme in any case).
pub fn is_https(url: &str) -> bool {
    url.get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_retried_only_when_the_server_may_recover() {
        for s in [408, 429, 500, 502, 503, 504, 599] {
            assert!(FetchError::Status(s).is_transient(), "{s}");
        }
        for s in [300, 304, 400, 401, 403, 404, 410, 416, 451, 600] {
            assert!(!FetchError::Status(s).is_transient(), "{s}");
        }
    }

    #[test]
    fn a_status_says_its_code_in_the_message() {
        assert_eq!(FetchError::Status(404).message().as_str(), "HTTP 404");
        assert_eq!(FetchError::Status(503).message().as_str(), "HTTP 503");
        assert_eq!(FetchError::Status(404).code(), ErrorCode::HttpStatus);
    }

    #[test]
    fn url_problems_are_permanent_bad_commands() {
        for e in [FetchError::HttpsNotEnabled, FetchError::BadUrl] {
            assert!(!e.is_transient());
            assert_eq!(e.code(), ErrorCode::BadCommand);
        }
        assert_eq!(
            FetchError::HttpsNotEnabled.message().as_str(),
            "https is not enabled on this device"
        );
    }

    #[test]
    fn https_is_recognised_in_any_case() {
        assert!(is_https("https://a/b"));
        assert!(is_https("HTTPS://a/b"));
        assert!(!is_https("http://a/b"));
        assert!(!is_https("https:/"));
    }
}

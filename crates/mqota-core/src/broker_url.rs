//! Broker addresses as the whole project writes them:
//! `mqtt://[user[:password]@]host[:port]`.
//!
//! The one parser of this form: the firmware's build-time configuration, the
//! virtual device, the CLI and the controller all read a URL through
//! [`parse_broker_url`], so no two of them can read one URL two ways.
//! `no_std` and allocation-free; the parts borrow from the URL.

/// The port MQTT brokers listen on without TLS.
pub const DEFAULT_MQTT_PORT: u16 = 1883;
/// The port MQTT brokers listen on with TLS (`mqtts://`).
pub const DEFAULT_MQTTS_PORT: u16 = 8883;

/// The parts of a broker URL (`mqtt://[user[:password]@]host[:port]`),
/// borrowed from it: what the firmware's configuration holds. The host side
/// keeps an owned URL with its TLS settings, `mqota_controller::url::BrokerUrl`,
/// built from these parts.
///
/// The parts borrow from the URL, so a URL compiled into the firmware is
/// parsed once, at build time, by [`parse_broker_url`] in a `const`.
/// Credentials are taken literally (no percent-decoding): the password runs
/// from the first `:` to the last `@`, so it may hold both characters.
/// `Debug` shows whether there is a password, never the password.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct BrokerUrlParts<'a> {
    /// Host name or IP address (IPv6 without its brackets).
    pub host: &'a str,
    /// TCP port; [`DEFAULT_MQTT_PORT`] when the URL has none.
    pub port: u16,
    /// User name, if the URL has one.
    pub username: Option<&'a str>,
    /// Password, if the URL has one.
    pub password: Option<&'a str>,
}

impl core::fmt::Debug for BrokerUrlParts<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("BrokerUrlParts")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password.map(|_| "<redacted>"))
            .finish()
    }
}

/// Why a broker URL was refused. Fix the URL; nothing else helps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum BrokerUrlError {
    /// Not `mqtt://` (or `tcp://`): write it like `mqtt://192.168.1.10:1883`.
    Scheme,
    /// `mqtts://` given to [`parse_broker_url`], whose caller has no TLS;
    /// callers that do parse with [`parse_broker_url_tls`].
    TlsUnsupported,
    /// Nothing where the host belongs.
    NoHost,
    /// The port is not a decimal number in 1..=65535.
    Port,
}

/// Splits a broker URL into host, port and credentials; see [`BrokerUrlParts`].
/// A `const fn`, so that firmware configuration fails the build, not the
/// device, when the URL is malformed.
pub const fn parse_broker_url(url: &str) -> Result<BrokerUrlParts<'_>, BrokerUrlError> {
    let s = url.trim_ascii().as_bytes();
    let rest = match strip_prefix_ci(s, b"mqtt://") {
        Some(r) => r,
        None => match strip_prefix_ci(s, b"tcp://") {
            Some(r) => r,
            None => match strip_prefix_ci(s, b"mqtts://") {
                Some(_) => return Err(BrokerUrlError::TlsUnsupported),
                None => return Err(BrokerUrlError::Scheme),
            },
        },
    };
    parse_authority(rest, DEFAULT_MQTT_PORT)
}

/// Like [`parse_broker_url`], for a device that speaks TLS: also takes
/// `mqtts://` (port [`DEFAULT_MQTTS_PORT`] unless given) and says whether
/// the URL asked for TLS.
pub const fn parse_broker_url_tls(url: &str) -> Result<(BrokerUrlParts<'_>, bool), BrokerUrlError> {
    let s = url.trim_ascii().as_bytes();
    match strip_prefix_ci(s, b"mqtts://") {
        Some(rest) => match parse_authority(rest, DEFAULT_MQTTS_PORT) {
            Ok(u) => Ok((u, true)),
            Err(e) => Err(e),
        },
        None => match parse_broker_url(url) {
            Ok(u) => Ok((u, false)),
            Err(e) => Err(e),
        },
    }
}

/// `[user[:password]@]host[:port][/]`, after the scheme.
const fn parse_authority(
    rest: &[u8],
    default_port: u16,
) -> Result<BrokerUrlParts<'_>, BrokerUrlError> {
    let mut rest = rest;
    while let [head @ .., b'/'] = rest {
        rest = head;
    }
    let (username, password, hostport) = match rfind(rest, b'@') {
        None => (None, None, rest),
        Some(at) => {
            let (userinfo, tail) = rest.split_at(at);
            let (_, hostport) = tail.split_at(1);
            match find(userinfo, b':') {
                None => (Some(text(userinfo)), None, hostport),
                Some(colon) => {
                    let (user, tail) = userinfo.split_at(colon);
                    let (_, password) = tail.split_at(1);
                    (Some(text(user)), Some(text(password)), hostport)
                }
            }
        }
    };
    let (host, port) = match hostport {
        [b'[', v6 @ ..] => {
            let Some(end) = find(v6, b']') else {
                return Err(BrokerUrlError::NoHost);
            };
            let (host, tail) = v6.split_at(end);
            let port = match tail {
                [_] => default_port,
                [_, b':', port @ ..] => match parse_port(port) {
                    Some(p) => p,
                    None => return Err(BrokerUrlError::Port),
                },
                _ => return Err(BrokerUrlError::Port),
            };
            (host, port)
        }
        _ => match rfind(hostport, b':') {
            None => (hostport, default_port),
            Some(colon) => {
                let (host, tail) = hostport.split_at(colon);
                let (_, port) = tail.split_at(1);
                match parse_port(port) {
                    Some(p) => (host, p),
                    None => return Err(BrokerUrlError::Port),
                }
            }
        },
    };
    if host.is_empty() {
        return Err(BrokerUrlError::NoHost);
    }
    Ok(BrokerUrlParts {
        host: text(host),
        port,
        username,
        password,
    })
}

const fn strip_prefix_ci<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    if s.len() < prefix.len() {
        return None;
    }
    let mut i = 0;
    while i < prefix.len() {
        if s[i].to_ascii_lowercase() != prefix[i] {
            return None;
        }
        i += 1;
    }
    Some(s.split_at(prefix.len()).1)
}

const fn find(s: &[u8], byte: u8) -> Option<usize> {
    let mut i = 0;
    while i < s.len() {
        if s[i] == byte {
            return Some(i);
        }
        i += 1;
    }
    None
}

const fn rfind(s: &[u8], byte: u8) -> Option<usize> {
    let mut i = s.len();
    while i > 0 {
        i -= 1;
        if s[i] == byte {
            return Some(i);
        }
    }
    None
}

const fn parse_port(digits: &[u8]) -> Option<u16> {
    if digits.is_empty() || digits.len() > 5 {
        return None;
    }
    let mut value: u32 = 0;
    let mut i = 0;
    while i < digits.len() {
        if !digits[i].is_ascii_digit() {
            return None;
        }
        value = value * 10 + (digits[i] - b'0') as u32;
        i += 1;
    }
    if value == 0 || value > u16::MAX as u32 {
        None
    } else {
        Some(value as u16)
    }
}

/// The pieces are cut next to ASCII delimiters of a `&str`, so they are
/// always UTF-8; the fallback only keeps the function total.
const fn text(bytes: &[u8]) -> &str {
    match core::str::from_utf8(bytes) {
        Ok(s) => s,
        Err(_) => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_password() {
        extern crate std;
        let u = parse_broker_url("mqtt://dev-1:hunter2@broker.lan").unwrap();
        let text = std::format!("{u:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("dev-1"), "{text}");
    }

    #[test]
    fn credentials_host_and_port_are_split() {
        let u = parse_broker_url("mqtt://alice:s3cr:et@x@broker.lan:1884/").unwrap();
        assert_eq!(u.username, Some("alice"));
        assert_eq!(u.password, Some("s3cr:et@x"));
        assert_eq!((u.host, u.port), ("broker.lan", 1884));
        let u = parse_broker_url("mqtt://bob@10.0.0.2").unwrap();
        assert_eq!((u.username, u.password), (Some("bob"), None));
    }

    #[test]
    fn the_port_defaults_to_1883_and_ipv6_hosts_lose_their_brackets() {
        let u = parse_broker_url("  MQTT://[fd00::1]  ").unwrap();
        assert_eq!((u.host, u.port), ("fd00::1", DEFAULT_MQTT_PORT));
        let u = parse_broker_url("tcp://[::1]:1999").unwrap();
        assert_eq!((u.host, u.port, u.username), ("::1", 1999, None));
    }

    #[test]
    fn other_schemes_tls_bad_ports_and_missing_hosts_are_refused() {
        let err = |u| parse_broker_url(u).unwrap_err();
        assert_eq!(err("mqtts://h"), BrokerUrlError::TlsUnsupported);
        assert_eq!(err("http://h:80"), BrokerUrlError::Scheme);
        assert_eq!(err("broker:1883"), BrokerUrlError::Scheme);
        assert_eq!(err("mqtt://h:0"), BrokerUrlError::Port);
        assert_eq!(err("mqtt://h:65536"), BrokerUrlError::Port);
        assert_eq!(err("mqtt://h:"), BrokerUrlError::Port);
        assert_eq!(err("mqtt://h:18x3"), BrokerUrlError::Port);
        assert_eq!(err("mqtt://[::1]1883"), BrokerUrlError::Port);
        assert_eq!(err("mqtt://:1883"), BrokerUrlError::NoHost);
        assert_eq!(err("mqtt://u:p@"), BrokerUrlError::NoHost);
        assert_eq!(err("mqtt://[::1"), BrokerUrlError::NoHost);
    }

    #[test]
    fn a_url_is_parsed_at_compile_time_in_a_const() {
        const URL: BrokerUrlParts<'static> = match parse_broker_url("mqtt://u:p@h:2000") {
            Ok(u) => u,
            Err(_) => panic!("bad URL"),
        };
        assert_eq!(
            URL,
            BrokerUrlParts {
                host: "h",
                port: 2000,
                username: Some("u"),
                password: Some("p")
            }
        );
    }

    #[test]
    fn mqtts_is_taken_by_the_tls_parser_on_8883_unless_a_port_is_given() {
        let (u, tls) = parse_broker_url_tls("mqtts://dev:pw@broker.lan").unwrap();
        assert!(tls);
        assert_eq!(
            (u.host, u.port, u.username),
            ("broker.lan", 8883, Some("dev"))
        );
        let (u, tls) = parse_broker_url_tls("MQTTS://[::1]:9000").unwrap();
        assert!(tls);
        assert_eq!((u.host, u.port), ("::1", 9000));
        let (u, tls) = parse_broker_url_tls("mqtt://broker.lan").unwrap();
        assert!(!tls);
        assert_eq!(u.port, 1883);
        assert_eq!(
            parse_broker_url("mqtts://broker.lan"),
            Err(BrokerUrlError::TlsUnsupported)
        );
        assert_eq!(
            parse_broker_url_tls("http://h"),
            Err(BrokerUrlError::Scheme)
        );
    }
}

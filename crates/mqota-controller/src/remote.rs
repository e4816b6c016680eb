//! Fetching a firmware image by URL (`deploy URL`, `POST /api/deployments`
//! with a URL) without letting the URL turn the controller against its own
//! network or its memory:
//!
//! - the body is streamed and cut at [`MAX_FIRMWARE_SIZE`] (no image a
//!   device accepts is larger), so an endless body costs 16 MiB at most;
//! - at most [`MAX_REDIRECTS`] redirects are followed;
//! - loopback, private, link-local (and other non-public) addresses are
//!   refused unless the operator named the host ([`RemoteFirmware::allow`],
//!   `--allow-remote-firmware`): checked on the URL's own IP literal, on
//!   every redirect's, and on every address a name resolves to, in the
//!   resolver itself, so a name cannot resolve to a public address for the
//!   check and a private one for the connection;
//! - an error never quotes what was fetched, only its status and size;
//! - `https://` is trusted only through the fleet CA
//!   ([`RemoteFirmware::with_tls`]), never the system's roots, so a `serve`
//!   over HTTPS can be read by `deploy --server https://…`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mqota_core::protocol::MAX_FIRMWARE_SIZE;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Redirects followed before a fetch is refused.
pub const MAX_REDIRECTS: usize = 5;

/// Which hosts a firmware URL may point at besides public addresses.
#[derive(Debug, Clone, Default)]
pub struct RemoteFirmware {
    /// Hosts allowed on any port.
    allowed: Arc<Vec<String>>,
    /// Host and port pairs allowed.
    origins: Arc<Vec<(String, u16)>>,
    /// How `https://` servers are checked; `None`: no `https://`.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl RemoteFirmware {
    /// Public addresses only, plus `hosts` (names or IP addresses, without
    /// port, case-insensitive).
    pub fn allow<I: IntoIterator<Item = S>, S: AsRef<str>>(hosts: I) -> Self {
        Self {
            allowed: Arc::new(
                hosts
                    .into_iter()
                    .map(|h| normal_host(h.as_ref()))
                    .filter(|h| !h.is_empty())
                    .collect(),
            ),
            origins: Arc::default(),
            tls: None,
        }
    }

    /// The same, reading `https://` URLs with `config` (e.g.
    /// [`crate::tls::https_client`]: the fleet CA pinned).
    pub fn with_tls(self, config: Arc<rustls::ClientConfig>) -> Self {
        Self {
            tls: Some(config),
            ..self
        }
    }

    /// An HTTP client with this policy's TLS configuration (if any).
    pub(crate) fn client_builder(&self) -> reqwest::ClientBuilder {
        let b = reqwest::Client::builder();
        match &self.tls {
            Some(c) => b.use_preconfigured_tls((**c).clone()),
            // Built-in roots are empty (`rustls-tls-manual-roots`): every
            // `https://` URL fails on its certificate.
            None => b,
        }
    }

    /// The same, plus the host and port of `url` (e.g. the firmware server
    /// the operator pointed `--server` at, or `serve`'s own base URL): that
    /// one port only, so allowing `serve`'s own `127.0.0.1:8080` does not
    /// open every loopback service.
    pub fn and_origin_of(self, url: &str) -> Self {
        let Ok(u) = reqwest::Url::parse(url) else {
            return self;
        };
        let (Some(h), Some(port)) = (u.host_str(), u.port_or_known_default()) else {
            return self;
        };
        let mut origins = (*self.origins).clone();
        origins.push((normal_host(h), port));
        Self {
            origins: Arc::new(origins),
            ..self
        }
    }

    /// Whether a name may resolve to any address: it is allowed, or one
    /// port of it is (the port is checked on the URL, [`Self::refuse`]).
    fn allows_name(&self, host: &str) -> bool {
        let host = normal_host(host);
        self.allowed.contains(&host) || self.origins.iter().any(|(h, _)| *h == host)
    }

    /// Why `url` may not be fetched, if it may not (checked before any
    /// connection, and again on each redirect).
    fn refuse(&self, url: &reqwest::Url) -> Option<String> {
        let host = url.host_str()?;
        let normal = normal_host(host);
        if self.allowed.contains(&normal) {
            return None;
        }
        let port = url.port_or_known_default();
        let origin_hosts: Vec<&(String, u16)> =
            self.origins.iter().filter(|(h, _)| *h == normal).collect();
        if origin_hosts.iter().any(|(_, p)| Some(*p) == port) {
            return None;
        }
        let private = match normal.parse::<IpAddr>() {
            Ok(ip) => !is_public(ip),
            // A name with only another port allowed: that port only.
            Err(_) => !origin_hosts.is_empty(),
        };
        private.then(|| not_public(host))
    }

    /// Fetches `url`: the whole body, at most [`MAX_FIRMWARE_SIZE`] bytes.
    /// The error is a reason to show the operator, without any byte of the
    /// body.
    pub async fn fetch(&self, url: &str) -> Result<Vec<u8>, String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
        if let Some(why) = self.refuse(&parsed) {
            return Err(why);
        }
        let policy = self.clone();
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > MAX_REDIRECTS {
                return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
            }
            match policy.refuse(attempt.url()) {
                Some(why) => attempt.error(why),
                None => attempt.follow(),
            }
        });
        let client = self
            .client_builder()
            .timeout(Duration::from_secs(60))
            .redirect(redirects)
            .dns_resolver(Arc::new(PublicOnly(self.clone())))
            .build()
            .map_err(|e| e.to_string())?;
        let mut resp = client.get(parsed).send().await.map_err(|e| chain(&e))?;
        if !resp.status().is_success() {
            return Err(format!("the server answered {}", resp.status()));
        }
        let max = MAX_FIRMWARE_SIZE as u64;
        if resp.content_length().is_some_and(|n| n > max) {
            return Err(format!(
                "the server announces {} bytes, more than the {max} an image may have",
                resp.content_length().unwrap_or_default()
            ));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| chain(&e))? {
            if body.len() as u64 + chunk.len() as u64 > max {
                return Err(format!(
                    "more than the {max} bytes an image may have; stopped reading"
                ));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// An error with its causes (reqwest's own `Display` stops at the first),
/// which name the refused address or the redirect limit.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cause = c.source();
    }
    out
}

fn not_public(host: &str) -> String {
    format!(
        "{host} is a loopback, private or link-local address; \
         allow it with --allow-remote-firmware {host}"
    )
}

fn normal_host(h: &str) -> String {
    h.trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

/// Whether `ip` is an address of the public internet: not loopback,
/// private (RFC 1918, unique-local), link-local, unspecified, shared
/// (100.64/10), broadcast, multicast or documentation space, also when an
/// IPv4 address hides in an IPv6 one.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80)
        }
    }
}

/// The system resolver, keeping only public addresses for names not
/// allowed.
struct PublicOnly(RemoteFirmware);

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        let allowed = self.0.allows_name(&host);
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| allowed || is_public(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(not_public(&host).into());
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["1.1.1.1", "93.184.216.34", "2606:4700::1111"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }
}

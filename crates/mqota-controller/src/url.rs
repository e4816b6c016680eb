//! Broker addresses: `mqtt://[user[:password]@]host[:port]` and
//! `mqtts://…` (TLS, port 8883 unless given).
//!
//! Parsed by the core's [`parse_broker_url_tls`], the one parser of this URL
//! form in the project (the devices use it too, and its result,
//! [`BrokerUrlParts`](mqota_core::broker_url::BrokerUrlParts), is what this
//! type owns); this module only owns the strings and says what is wrong in
//! words an operator reads. How a `mqtts://` connection checks the broker
//! (the pinned CA, the client certificate) is not part of a URL and is set
//! with [`BrokerUrl::with_tls`] (see [`crate::tls::mqtt_client`]).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use mqota_core::broker_url::parse_broker_url_tls;
pub use mqota_core::broker_url::{DEFAULT_MQTTS_PORT, DEFAULT_MQTT_PORT};

/// A broker URL on the host side: where the broker is, how to log in, and
/// (for `mqtts://`) how to check it; the owned counterpart of the core's
/// borrowed [`BrokerUrlParts`](mqota_core::broker_url::BrokerUrlParts).
#[derive(Clone)]
pub struct BrokerUrl {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// User name, if the URL has one.
    pub username: Option<String>,
    /// Password, if the URL has one.
    pub password: Option<String>,
    /// `mqtts://`: the connection is TLS.
    pub secure: bool,
    /// How a `mqtts://` connection checks the broker and which client
    /// certificate it presents; `None` until [`BrokerUrl::with_tls`] (a
    /// secure URL without it trusts nobody, so every connection fails).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl PartialEq for BrokerUrl {
    /// Same address, login and scheme, and the same TLS configuration
    /// object (configurations are compared by identity).
    fn eq(&self, other: &Self) -> bool {
        self.host == other.host
            && self.port == other.port
            && self.username == other.username
            && self.password == other.password
            && self.secure == other.secure
            && match (&self.tls, &other.tls) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
    }
}

impl Eq for BrokerUrl {}

/// Why a broker URL was refused. Fix the URL and try again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerUrlError {
    /// Not `mqtt://` or `mqtts://`: give a URL like `mqtt://127.0.0.1:1883`.
    #[error("broker URL must start with mqtt:// or mqtts:// (got {0:?})")]
    Scheme(String),
    /// Nothing between `://` and the port.
    #[error("broker URL has no host")]
    NoHost,
    /// The port is not a number in 1..=65535.
    #[error("broker URL has a bad port: {0:?}")]
    Port(String),
}

impl BrokerUrl {
    /// The controller's MQTT 5 session options for this broker: keep-alive
    /// 30 s, a clean start, the URL's login, and incoming packets up to
    /// 1 MiB (rumqttc's default cap of 10 KiB would drop the link over one
    /// odd retained message under the same prefix).
    pub fn mqtt_options(&self, client_id: impl Into<String>) -> rumqttc::v5::MqttOptions {
        let mut o = rumqttc::v5::MqttOptions::new(client_id, self.host.clone(), self.port);
        o.set_keep_alive(std::time::Duration::from_secs(30));
        o.set_clean_start(true);
        o.set_max_packet_size(Some(1024 * 1024));
        if let Some(u) = &self.username {
            o.set_credentials(u.clone(), self.password.clone().unwrap_or_default());
        }
        if self.secure {
            // No configuration given: an empty trust store, so the
            // connection fails on the broker's certificate rather than
            // trusting anything.
            let config = self.tls.clone().unwrap_or_else(|| {
                Arc::new(
                    rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                        .with_safe_default_protocol_versions()
                        .expect("ring supports the default versions")
                        .with_root_certificates(rustls::RootCertStore::empty())
                        .with_no_client_auth(),
                )
            });
            o.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(config),
            ));
        }
        o
    }

    /// This URL with `config` for its TLS connection (used when it is
    /// `mqtts://`).
    pub fn with_tls(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }
}

impl FromStr for BrokerUrl {
    type Err = BrokerUrlError;

    /// The same parser the device runtime (and the firmware's build-time
    /// configuration) uses, so the controller and the devices can never read
    /// one URL two ways.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        use mqota_core::broker_url::BrokerUrlError as E;
        let trimmed = s.trim();
        let (u, secure) = parse_broker_url_tls(s).map_err(|e| match e {
            E::NoHost => BrokerUrlError::NoHost,
            E::Port => BrokerUrlError::Port(trimmed.to_owned()),
            _ => BrokerUrlError::Scheme(trimmed.to_owned()),
        })?;
        Ok(BrokerUrl {
            host: u.host.to_owned(),
            port: u.port,
            username: u.username.map(str::to_owned),
            password: u.password.map(str::to_owned),
            secure,
            tls: None,
        })
    }
}

impl fmt::Display for BrokerUrl {
    /// Never prints the password, so the URL can go into logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.secure { "mqtts://" } else { "mqtt://" })?;
        if let Some(u) = &self.username {
            write!(f, "{u}@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_host_and_port_are_split() {
        let u: BrokerUrl = "mqtt://alice:s3cr:et@broker.lan:1884".parse().unwrap();
        assert_eq!(u.username.as_deref(), Some("alice"));
        assert_eq!(u.password.as_deref(), Some("s3cr:et"));
        assert_eq!(u.host, "broker.lan");
        assert_eq!(u.port, 1884);
    }

    #[test]
    fn the_port_defaults_to_1883_and_ipv6_hosts_keep_their_colons() {
        let u: BrokerUrl = "MQTT://[::1]".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 1883));
        let u: BrokerUrl = "mqtt://host".parse().unwrap();
        assert_eq!(u.port, DEFAULT_MQTT_PORT);
    }

    #[test]
    fn display_hides_the_password() {
        let u: BrokerUrl = "mqtt://bob:pw@h:1".parse().unwrap();
        assert_eq!(u.to_string(), "mqtt://bob@h:1");
    }

    #[test]
    fn mqtts_is_tls_on_8883_unless_a_port_is_given() {
        let u: BrokerUrl = "MQTTS://dev:pw@broker.lan".parse().unwrap();
        assert!(u.secure);
        assert_eq!(
            (u.host.as_str(), u.port),
            ("broker.lan", DEFAULT_MQTTS_PORT)
        );
        assert_eq!(u.to_string(), "mqtts://dev@broker.lan:8883");
        let u: BrokerUrl = "mqtts://[::1]:1883/".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port, u.secure), ("::1", 1883, true));
        let u: BrokerUrl = "mqtts://u:p:x@h:9".parse().unwrap();
        assert_eq!((u.port, u.password.as_deref()), (9, Some("p:x")));
        let u: BrokerUrl = "mqtt://h".parse().unwrap();
        assert!(!u.secure);
        assert_eq!(u.port, DEFAULT_MQTT_PORT);
        assert!(matches!(
            "mqtts://h:0".parse::<BrokerUrl>(),
            Err(BrokerUrlError::Port(_))
        ));
    }

    #[test]
    fn other_schemes_and_bad_ports_are_refused() {
        assert!(matches!(
            "http://h".parse::<BrokerUrl>(),
            Err(BrokerUrlError::Scheme(_))
        ));
        assert!(matches!(
            "mqtt://h:0".parse::<BrokerUrl>(),
            Err(BrokerUrlError::Port(_))
        ));
        assert_eq!(
            "mqtt://:1883".parse::<BrokerUrl>(),
            Err(BrokerUrlError::NoHost)
        );
    }

    #[test]
    fn the_controller_reads_every_url_as_the_devices_do() {
        let urls = [
            "mqtt://alice:s3cr:et@x@broker.lan:1884/",
            "mqtt://bob@10.0.0.2",
            "  MQTT://[fd00::1]  ",
            "tcp://[::1]:1999",
            "mqtt://h",
            "mqtts://h",
            "http://h:80",
            "mqtt://h:65536",
            "mqtt://[::1]1883",
            "mqtt://u:p@",
        ];
        for url in urls {
            let device = mqota_core::broker_url::parse_broker_url(url);
            let controller = url.parse::<BrokerUrl>();
            match (device, controller) {
                (Ok(d), Ok(c)) => {
                    assert_eq!(c.host, d.host, "{url}");
                    assert_eq!(c.port, d.port, "{url}");
                    assert_eq!(c.username.as_deref(), d.username, "{url}");
                    assert_eq!(c.password.as_deref(), d.password, "{url}");
                }
                (Err(_), Err(_)) => {}
                // TLS is the controller's before it is the devices': the
                // rest of the URL is still read as the devices read it.
                (Err(_), Ok(c)) if url.starts_with("mqtts://") => {
                    let plain = url.replacen("mqtts", "mqtt", 1);
                    let d = mqota_core::broker_url::parse_broker_url(&plain).unwrap();
                    assert!(c.secure, "{url}");
                    assert_eq!(
                        (c.host.as_str(), c.username.as_deref()),
                        (d.host, d.username)
                    );
                }
                (d, c) => panic!("{url}: devices read {d:?}, the controller {c:?}"),
            }
        }
    }
}

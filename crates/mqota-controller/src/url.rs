//! Broker addresses: `mqtt://[user[:password]@]host[:port]`.
//!
//! Parsed by the core's [`parse_broker_url`], the one parser of this URL form
//! in the project (the devices use it too); this module only owns the strings
//! and says what is wrong in words an operator reads. `mqtts://` is recognised so the error can
//! say TLS is not built in yet.

use std::fmt;
use std::str::FromStr;

use mqota_core::broker_url::parse_broker_url;
pub use mqota_core::broker_url::DEFAULT_MQTT_PORT;

/// Where the broker is and how to log in.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// User name, if the URL has one.
    pub username: Option<String>,
    /// Password, if the URL has one.
    pub password: Option<String>,
}

/// Why a broker URL was refused. Fix the URL and try again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerUrlError {
    /// Not `mqtt://`: give a URL like `mqtt://127.0.0.1:1883`.
    #[error("broker URL must start with mqtt:// (got {0:?})")]
    Scheme(String),
    /// `mqtts://` needs TLS, which this build does not have: use `mqtt://`
    /// or a TLS-terminating proxy.
    #[error("mqtts:// is not supported yet; use mqtt://")]
    TlsUnsupported,
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
        o
    }
}

impl FromStr for BrokerUrl {
    type Err = BrokerUrlError;

    /// The same parser the device runtime (and the firmware's build-time
    /// configuration) uses, so the controller and the devices can never read
    /// one URL two ways.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        use mqota_core::broker_url::BrokerUrlError as E;
        let u = parse_broker_url(s).map_err(|e| match e {
            E::Scheme => BrokerUrlError::Scheme(s.trim().to_owned()),
            E::TlsUnsupported => BrokerUrlError::TlsUnsupported,
            E::NoHost => BrokerUrlError::NoHost,
            _ => BrokerUrlError::Port(s.trim().to_owned()),
        })?;
        Ok(BrokerUrl {
            host: u.host.to_owned(),
            port: u.port,
            username: u.username.map(str::to_owned),
            password: u.password.map(str::to_owned),
        })
    }
}

impl fmt::Display for BrokerUrl {
    /// Never prints the password, so the URL can go into logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("mqtt://")?;
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
    fn other_schemes_tls_and_bad_ports_are_refused() {
        assert_eq!(
            "mqtts://h".parse::<BrokerUrl>(),
            Err(BrokerUrlError::TlsUnsupported)
        );
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
                (d, c) => panic!("{url}: devices read {d:?}, the controller {c:?}"),
            }
        }
    }
}

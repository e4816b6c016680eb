//! The embedded broker: rumqttd with one MQTT v5 listener, inside the
//! process, so `mqota serve` runs a whole setup on one machine with nothing
//! else installed.
//!
//! rumqttd was checked against the device's client (rust-mqtt, MQTT v5):
//! retained status, the last will on an abrupt drop and QoS 1 round trips all
//! work (see `tests/embedded_broker.rs`). Two things it does not offer shape
//! this module: it binds its listener on its own thread and only logs a bind
//! failure, so [`EmbeddedBroker::start`] checks the address first and then
//! waits until the port accepts connections; and it cannot be stopped, so the
//! broker lives as long as the process.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};

/// A running embedded broker.
#[derive(Debug)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
}

/// Why the embedded broker did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The address cannot be bound (in use, or not local): choose another
    /// `--mqtt-listen` or stop whatever listens there.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The broker thread started but never accepted a connection: see its
    /// log lines (`-v`) and report.
    #[error("the embedded broker did not come up on {0}")]
    NotListening(SocketAddr),
}

impl EmbeddedBroker {
    /// Starts the broker on `addr`; port 0 picks a free port. Returns once
    /// the listener accepts connections.
    pub fn start(addr: SocketAddr) -> Result<Self, BrokerError> {
        // rumqttd cannot report the port it bound, so pick a concrete one
        // here; the window between this probe and rumqttd's bind is tiny.
        let probe = TcpListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })?;
        let addr = probe
            .local_addr()
            .map_err(|source| BrokerError::Bind { addr, source })?;
        drop(probe);

        let mut broker = rumqttd::Broker::new(config(addr));
        std::thread::Builder::new()
            .name("mqota-broker".into())
            .spawn(move || {
                if let Err(e) = broker.start() {
                    tracing::error!("embedded broker stopped: {e}");
                }
            })
            .map_err(|source| BrokerError::Bind { addr, source })?;

        let probe_addr = if addr.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], addr.port()))
        } else {
            addr
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&probe_addr, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                return Err(BrokerError::NotListening(addr));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Self { addr })
    }

    /// Where the broker listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// An `mqtt://` URL for clients on this machine.
    pub fn url(&self) -> String {
        let host = if self.addr.ip().is_unspecified() {
            "127.0.0.1".to_owned()
        } else {
            self.addr.ip().to_string()
        };
        format!("mqtt://{host}:{}", self.addr.port())
    }
}

fn config(addr: SocketAddr) -> Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        // Commands are at most 1 KiB and statuses smaller; this only bounds
        // what a misbehaving client can make the broker buffer.
        max_payload_size: 64 * 1024,
        max_inflight_count: 256,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "mqota-v5".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    Config {
        id: 0,
        router: RouterConfig {
            // A fleet of a few thousand devices plus controllers.
            max_connections: 20_000,
            max_outgoing_packet_count: 1000,
            max_segment_size: 16 * 1024 * 1024,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v5: Some(HashMap::from([("1".to_owned(), server)])),
        ..Default::default()
    }
}

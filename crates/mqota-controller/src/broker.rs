//! The embedded broker: rumqttd inside the process, serving MQTT 3.1.1 and
//! MQTT 5 on one port, so `mqota serve` runs a whole setup on one machine
//! with nothing else installed and any MQTT client (`mosquitto_pub`, Home
//! Assistant, paho, the devices) can talk to it.
//!
//! # How both protocol levels share one port
//!
//! A rumqttd listener speaks exactly one protocol level (its "v4" listeners
//! take 3.1.1, its "v5" listeners take 5). So the broker runs one listener of
//! each kind on loopback ports chosen at start, both attached to the same
//! router: retained messages, wills and subscriptions are shared, a message
//! published at 3.1.1 reaches a v5 subscriber and the other way round. The
//! public port belongs to a small *front door* in this module: for each
//! connection it reads the beginning of the first packet, just far enough to
//! see the CONNECT's protocol name and level, and then splices the TCP stream
//! unchanged (bytes already read first) to the matching inner listener:
//!
//! | first packet | what happens |
//! |---|---|
//! | CONNECT, `MQTT`, level 4 (3.1.1) | spliced to the v4 listener |
//! | CONNECT, `MQTT`, level 5 | spliced to the v5 listener |
//! | CONNECT, `MQIsdp`, level 3 (MQTT 3.1), or `MQTT` with any other level | CONNACK return code 1 ("unacceptable protocol version"), then closed; rumqttd has no 3.1 decoder |
//! | anything else (not a CONNECT, a malformed header, nothing within 10 s) | closed |
//!
//! Each spliced connection is one task copying both ways. A client that
//! closes or fails has its inner connection closed too, so rumqttd sees an
//! abrupt drop as an abrupt drop and publishes the will (a DISCONNECT sent
//! before closing still reaches rumqttd first); when rumqttd closes a
//! connection (keep-alive expired, protocol error), the client's is closed
//! at once.
//!
//! # Why this and not another broker
//!
//! rumqttd was checked against the device's client (rust-mqtt, MQTT v5) and
//! the controller's (rumqttc v5): retained status, the last will on an abrupt
//! drop and QoS 1 round trips all work (see `tests/embedded_broker.rs`; the
//! other levels in `tests/broker_levels.rs`). The alternative considered was
//! rmqtt (0.24), a broker library that serves 3.1, 3.1.1 and 5 itself and has
//! ACL plugins. It is not used for now: it is a much larger dependency (its
//! own server framework, plugin system and network crates behind features),
//! its minimum Rust version (1.94) sits at the edge of the toolchain used
//! here, and swapping brokers would throw away the behaviour tested above for
//! one missing feature. The front door costs one extra loopback hop per
//! connection (a copy through a socket pair on this machine; negligible next
//! to the network the devices are on) and one more thread.
//!
//! rumqttd has no per-topic access control. The front door is where it will
//! go: it already sees every CONNECT before rumqttd does (client id, user
//! name) and could read the packets that follow. Two things to know for that
//! work: rumqttd sees every client as coming from 127.0.0.1, and the inner
//! listeners are reachable by anyone on this machine, so the ACL work must
//! also keep local users from bypassing the front door.
//!
//! Two other rumqttd limits shape this module: it binds its listeners on its
//! own threads and only logs a bind failure, so [`EmbeddedBroker::start`]
//! binds the public port itself and waits until the inner ports accept
//! connections; and it cannot be stopped, so the broker lives as long as the
//! process.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a client has to send the start of its CONNECT (the same bound
/// rumqttd puts on the whole CONNECT).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The 3.1.1 CONNACK refusing the protocol level (return code 1); MQTT 3.1
/// clients read the same bytes the same way.
const CONNACK_UNACCEPTABLE_PROTOCOL: [u8; 4] = [0x20, 0x02, 0x00, 0x01];

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
    /// A rumqttd listener (on the loopback address given) never accepted a
    /// connection: see its log lines (`-v`) and report.
    #[error("the embedded broker did not come up on {0}")]
    NotListening(SocketAddr),
}

impl EmbeddedBroker {
    /// Starts the broker on `addr`; port 0 picks a free port. Returns once
    /// MQTT 3.1.1 and MQTT 5 clients can connect there.
    pub fn start(addr: SocketAddr) -> Result<Self, BrokerError> {
        let bind_err = |source| BrokerError::Bind { addr, source };
        let front = TcpListener::bind(addr).map_err(bind_err)?;
        let public = front.local_addr().map_err(bind_err)?;
        front.set_nonblocking(true).map_err(bind_err)?;

        // rumqttd cannot report the ports it bound, so pick concrete ones
        // here; the window between this probe and rumqttd's bind is tiny.
        let v4 = free_loopback_port().map_err(bind_err)?;
        let v5 = free_loopback_port().map_err(bind_err)?;

        let mut broker = rumqttd::Broker::new(config(v4, v5));
        std::thread::Builder::new()
            .name("mqota-broker".into())
            .spawn(move || {
                if let Err(e) = broker.start() {
                    tracing::error!("embedded broker stopped: {e}");
                }
            })
            .map_err(bind_err)?;

        let deadline = Instant::now() + Duration::from_secs(10);
        for inner in [v4, v5] {
            while TcpStream::connect_timeout(&inner, Duration::from_millis(200)).is_err() {
                if Instant::now() > deadline {
                    return Err(BrokerError::NotListening(inner));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(bind_err)?;
        std::thread::Builder::new()
            .name("mqota-broker-front".into())
            .spawn(move || runtime.block_on(front_door(front, Inner { v4, v5 })))
            .map_err(bind_err)?;
        // The public socket is bound and listening already: connections
        // made from here on wait in its backlog until the front door runs.
        Ok(Self { addr: public })
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

fn free_loopback_port() -> std::io::Result<SocketAddr> {
    TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?.local_addr()
}

/// The rumqttd listeners behind the front door.
#[derive(Debug, Clone, Copy)]
struct Inner {
    v4: SocketAddr,
    v5: SocketAddr,
}

async fn front_door(listener: TcpListener, inner: Inner) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("embedded broker: cannot accept connections: {e}");
            return;
        }
    };
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                tokio::spawn(serve_client(client, peer, inner));
            }
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin.
                tracing::warn!("embedded broker: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_client(mut client: tokio::net::TcpStream, peer: SocketAddr, inner: Inner) {
    let mut head = Vec::with_capacity(64);
    let verdict = match tokio::time::timeout(CONNECT_TIMEOUT, read_head(&mut client, &mut head))
        .await
    {
        Ok(Ok(Some(v))) => v,
        // Gone before saying anything useful, or a read error.
        Ok(Ok(None)) | Ok(Err(_)) => return,
        Err(_) => {
            tracing::debug!("mqtt client {peer}: no CONNECT within {CONNECT_TIMEOUT:?}, closed");
            return;
        }
    };
    let target = match verdict {
        Verdict::V311 => inner.v4,
        Verdict::V5 => inner.v5,
        Verdict::Unsupported(level) => {
            tracing::info!(
                "mqtt client {peer}: protocol level {level} refused (this broker serves 3.1.1 and 5)"
            );
            let _ = client.write_all(&CONNACK_UNACCEPTABLE_PROTOCOL).await;
            let _ = client.shutdown().await;
            return;
        }
        Verdict::Garbage(why) => {
            tracing::debug!("mqtt client {peer}: {why}, closed");
            return;
        }
        Verdict::NeedMore => unreachable!("read_head returns a decision"),
    };
    let mut upstream = match tokio::net::TcpStream::connect(target).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("embedded broker: inner listener {target} refused {peer}: {e}");
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    if upstream.write_all(&head).await.is_err() {
        return;
    }
    splice(client, upstream).await;
}

/// Copies both ways until one side is done; returning drops (closes) both.
///
/// When the client ends cleanly (end of stream), rumqttd gets the end of
/// stream after every byte before it (a DISCONNECT stays a DISCONNECT) and
/// gets a moment to close its side. When the client's connection fails, or
/// rumqttd closes (a keep-alive timeout for a client that vanished without a
/// word, say), both are closed at once, so neither side lingers.
async fn splice(mut client: tokio::net::TcpStream, mut upstream: tokio::net::TcpStream) {
    let (mut client_rx, mut client_tx) = client.split();
    let (mut upstream_rx, mut upstream_tx) = upstream.split();
    let up = async {
        let r = tokio::io::copy(&mut client_rx, &mut upstream_tx).await;
        if r.is_ok() {
            let _ = upstream_tx.shutdown().await;
        }
        r
    };
    let down = tokio::io::copy(&mut upstream_rx, &mut client_tx);
    tokio::pin!(up, down);
    tokio::select! {
        _ = &mut down => {}
        r = &mut up => {
            if r.is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(5), &mut down).await;
            }
        }
    }
}

/// Reads until the protocol level is known. `None`: the client closed first.
async fn read_head(
    client: &mut tokio::net::TcpStream,
    head: &mut Vec<u8>,
) -> std::io::Result<Option<Verdict>> {
    let mut buf = [0u8; 64];
    loop {
        let n = client.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&buf[..n]);
        match classify(head) {
            Verdict::NeedMore => {}
            v => return Ok(Some(v)),
        }
    }
}

/// What the start of a connection says about where it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Not enough bytes to tell yet.
    NeedMore,
    /// A CONNECT for MQTT 3.1.1.
    V311,
    /// A CONNECT for MQTT 5.
    V5,
    /// A well-formed CONNECT start for a level not served (3 is MQTT 3.1).
    Unsupported(u8),
    /// Not an MQTT CONNECT.
    Garbage(&'static str),
}

/// Looks at the fixed header and the variable header up to the protocol
/// level byte of what should be a CONNECT packet.
fn classify(head: &[u8]) -> Verdict {
    let Some(&first) = head.first() else {
        return Verdict::NeedMore;
    };
    if first != 0x10 {
        return Verdict::Garbage("first packet is not a CONNECT");
    }
    // Remaining length: a variable byte integer of at most four bytes.
    let mut remaining: usize = 0;
    let mut at = 1;
    loop {
        let Some(&b) = head.get(at) else {
            return Verdict::NeedMore;
        };
        remaining |= usize::from(b & 0x7f) << (7 * (at - 1));
        at += 1;
        if b & 0x80 == 0 {
            break;
        }
        if at == 5 {
            return Verdict::Garbage("malformed remaining length");
        }
    }
    let Some(len) = head.get(at..at + 2) else {
        return Verdict::NeedMore;
    };
    let name_len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    if name_len != 4 && name_len != 6 {
        return Verdict::Garbage("unknown protocol name");
    }
    let name_at = at + 2;
    let Some(name) = head.get(name_at..name_at + name_len) else {
        return Verdict::NeedMore;
    };
    let Some(&level) = head.get(name_at + name_len) else {
        return Verdict::NeedMore;
    };
    // Name, level, connect flags and keep-alive at least.
    if remaining < 2 + name_len + 1 + 1 + 2 {
        return Verdict::Garbage("CONNECT too short");
    }
    match (name, level) {
        (b"MQTT", 4) => Verdict::V311,
        (b"MQTT", 5) => Verdict::V5,
        (b"MQTT", l) | (b"MQIsdp", l) => Verdict::Unsupported(l),
        _ => Verdict::Garbage("unknown protocol name"),
    }
}

fn config(v4: SocketAddr, v5: SocketAddr) -> Config {
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
    let server = |name: &str, listen| ServerSettings {
        name: name.into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: connections.clone(),
    };
    Config {
        id: 0,
        router: RouterConfig {
            // A fleet of a few thousand devices plus controllers.
            max_connections: 20_000,
            // rumqttd hands a new QoS 0 subscription at most this many
            // retained messages (a QoS 1 one at most its 100 in-flight
            // slots) and drops the rest silently: the controller's
            // subscriptions are QoS 0, and this is far above any fleet's
            // statuses plus availabilities.
            max_outgoing_packet_count: 1_000_000,
            max_segment_size: 16 * 1024 * 1024,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_owned(), server("mqota-v311", v4))])),
        v5: Some(HashMap::from([("1".to_owned(), server("mqota-v5", v5))])),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::{classify, Verdict};

    /// A CONNECT start: fixed header with `remaining`, then name and level.
    fn connect(remaining: u8, name: &[u8], level: u8) -> Vec<u8> {
        let mut v = vec![0x10, remaining, 0, name.len() as u8];
        v.extend_from_slice(name);
        v.push(level);
        v
    }

    #[test]
    fn levels_4_and_5_are_routed_and_3_is_refused() {
        assert_eq!(classify(&connect(12, b"MQTT", 4)), Verdict::V311);
        assert_eq!(classify(&connect(12, b"MQTT", 5)), Verdict::V5);
        assert_eq!(
            classify(&connect(14, b"MQIsdp", 3)),
            Verdict::Unsupported(3)
        );
        assert_eq!(classify(&connect(12, b"MQTT", 9)), Verdict::Unsupported(9));
    }

    #[test]
    fn every_prefix_of_a_connect_asks_for_more() {
        let full = connect(12, b"MQTT", 4);
        for n in 0..full.len() {
            assert_eq!(classify(&full[..n]), Verdict::NeedMore, "prefix {n}");
        }
    }

    #[test]
    fn a_multi_byte_remaining_length_is_read() {
        let mut v = vec![0x10, 0x80 | 0x05, 0x01, 0, 4];
        v.extend_from_slice(b"MQTT");
        v.push(5);
        assert_eq!(classify(&v), Verdict::V5);
    }

    #[test]
    fn what_is_not_a_connect_is_garbage() {
        assert!(matches!(classify(b"GET / HTTP/1.1"), Verdict::Garbage(_)));
        assert!(matches!(classify(&[0xc0, 0x00]), Verdict::Garbage(_)));
        assert!(matches!(
            classify(&[0x10, 0xff, 0xff, 0xff, 0xff]),
            Verdict::Garbage(_)
        ));
        assert!(matches!(
            classify(&connect(12, b"MQTX", 4)),
            Verdict::Garbage(_)
        ));
        assert!(matches!(
            classify(&connect(7, b"MQTT", 4)),
            Verdict::Garbage(_)
        ));
        assert!(matches!(
            classify(&[0x10, 0x0c, 0x00, 0x02]),
            Verdict::Garbage(_)
        ));
    }
}

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
//! drop and QoS 1 round trips all work (see `mqota-e2e`'s `tests/controller_embedded_broker.rs`; the
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
//! # Logins and topics
//!
//! rumqttd has no per-topic access control, so the front door does it. With
//! [`Access::Login`], the door reads the whole CONNECT (with rumqttd's own
//! parser, so the door and the broker can never read one packet two ways)
//! and checks the user name and password against the store's identities
//! ([`crate::access`]) before a single byte reaches rumqttd:
//!
//! | CONNECT | 3.1.1 CONNACK | 5 CONNACK |
//! |---|---|---|
//! | no user name | 5 not authorized | 0x87 not authorized |
//! | unknown user name, wrong password | 4 bad user name or password | 0x86 bad user name or password |
//! | a device whose client id is not its device id | 2 identifier rejected | 0x85 client identifier not valid |
//! | a will on a topic the client may not publish on | 5 not authorized | 0x87 not authorized |
//!
//! A device's id is its user name and must also be its client id: rumqttd
//! keeps sessions by client id, and a device connecting under another's
//! client id would otherwise take over that session and its subscriptions.
//! After the CONNECT, the door reads every packet a device sends and checks
//! each PUBLISH (topic aliases of MQTT 5 followed) and SUBSCRIBE against
//! [`Acl`]: one outside it, or anything that does not parse, ends the
//! connection (MQTT 5 clients first get a DISCONNECT with reason 0x87, "not
//! authorized", sent between two of the broker's packets), and rumqttd sees
//! an abrupt drop, so the device's will says it is offline. Packets of the
//! controller are spliced unread, as are all packets when the door is
//! [`Access::Open`] (anonymous clients may then do anything: `serve` says so
//! when it starts).
//!
//! # TLS
//!
//! With a TLS listener ([`TlsListener`], `mqota serve --mqtts-listen`) the
//! door also accepts `mqtts://` on a second public port: it terminates TLS
//! itself (tokio-rustls, [`crate::tls::broker_server`]) and treats what
//! comes out exactly like a plain connection. A client certificate is
//! optional; when one is presented it must chain to the fleet CA (or the
//! handshake fails), and then it *is* the login, as Mosquitto's
//! `use_identity_as_username` makes it: its CN names the client
//! ([`crate::access::CONTROLLER_USER`] is the controller, any other CN a
//! device, whose client id must be that CN), the CONNECT's user name and
//! password are not looked at, and the same [`Acl`] applies. A client
//! without a certificate logs in with a password as on the plain port. The
//! TLS handshake must finish within the same 10 s as the CONNECT. Not yet:
//! revoking one certificate (no CRL is checked; `mqota device remove`
//! takes away a password, not a certificate).
//!
//! Still open: rumqttd's two inner listeners are on loopback ports that any
//! local user of this machine can connect to directly, past the door. On a
//! machine shared with people who should not control the fleet, use
//! Mosquitto (`mqota broker mosquitto-conf`) instead of the embedded broker.
//! rumqttd also sees every client as coming from 127.0.0.1.
//!
//! Two other rumqttd limits shape this module: it binds its listeners on its
//! own threads and only logs a bind failure, so [`EmbeddedBroker::start`]
//! binds the public port itself and waits until the inner ports accept
//! connections; and it cannot be stopped, so the broker lives as long as the
//! process.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttd::protocol::{Packet, Protocol as _};
use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::access::{verify_password, Acl, Client, Role};
use crate::store::Store;

/// How long a client has to send the start of its CONNECT (the same bound
/// rumqttd puts on the whole CONNECT).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The 3.1.1 CONNACK refusing the protocol level (return code 1); MQTT 3.1
/// clients read the same bytes the same way.
const CONNACK_UNACCEPTABLE_PROTOCOL: [u8; 4] = [0x20, 0x02, 0x00, 0x01];

/// The largest payload rumqttd takes (its `max_payload_size`); the door
/// refuses a client packet whose remaining length is above this plus room for
/// the headers, as rumqttd would.
const MAX_PAYLOAD: usize = 64 * 1024;

/// The largest client packet the door reads: [`MAX_PAYLOAD`] plus room for
/// a topic and properties.
const MAX_CLIENT_PACKET: usize = MAX_PAYLOAD + 4 * 1024;

/// The largest broker packet the door relays to a device (rumqttd's own
/// bound is [`MAX_PAYLOAD`]; this only stops a runaway buffer).
const MAX_BROKER_PACKET: usize = 16 * 1024 * 1024;

/// MQTT 5 DISCONNECT, reason 0x87 "not authorized", no properties.
const DISCONNECT_NOT_AUTHORIZED: [u8; 4] = [0xe0, 0x02, 0x87, 0x00];

/// Who may connect and what they may do.
#[derive(Debug, Clone)]
pub enum Access {
    /// Anyone may connect, with or without a login, and publish and
    /// subscribe anywhere: the door is open.
    Open,
    /// A user name and password of one of `store`'s identities is needed;
    /// devices are held to `acl`.
    Login {
        /// Where the identities are (read at each CONNECT, so `mqota device
        /// add` and `remove` take effect at a device's next connection).
        store: Arc<Store>,
        /// The topic rules.
        acl: Acl,
    },
}

/// A second, TLS, listener of the embedded broker.
#[derive(Debug, Clone)]
pub struct TlsListener {
    /// Where it listens (port 0 picks a free port).
    pub addr: SocketAddr,
    /// The server certificate and the client-certificate check
    /// ([`crate::tls::broker_server`]).
    pub config: Arc<rustls::ServerConfig>,
}

/// A running embedded broker.
#[derive(Debug)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    open: bool,
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
    /// Starts the broker on `addr` with the door open ([`Access::Open`]);
    /// port 0 picks a free port. Returns once MQTT 3.1.1 and MQTT 5 clients
    /// can connect there.
    pub fn start(addr: SocketAddr) -> Result<Self, BrokerError> {
        Self::start_with(addr, Access::Open)
    }

    /// Starts the broker on `addr` with `access`; port 0 picks a free port.
    /// Returns once MQTT 3.1.1 and MQTT 5 clients can connect there.
    pub fn start_with(addr: SocketAddr, access: Access) -> Result<Self, BrokerError> {
        Self::start_with_tls(addr, access, None)
    }

    /// [`Self::start_with`], plus a TLS listener when `tls` is given (same
    /// broker, same door, same rules).
    pub fn start_with_tls(
        addr: SocketAddr,
        access: Access,
        tls: Option<TlsListener>,
    ) -> Result<Self, BrokerError> {
        let open = matches!(access, Access::Open);
        let bind_err = |source| BrokerError::Bind { addr, source };
        let front = TcpListener::bind(addr).map_err(bind_err)?;
        let public = front.local_addr().map_err(bind_err)?;
        front.set_nonblocking(true).map_err(bind_err)?;
        let tls_front = match &tls {
            None => None,
            Some(t) => {
                let bind_err = |source| BrokerError::Bind {
                    addr: t.addr,
                    source,
                };
                let l = TcpListener::bind(t.addr).map_err(bind_err)?;
                l.set_nonblocking(true).map_err(bind_err)?;
                let a = l.local_addr().map_err(bind_err)?;
                Some((l, tokio_rustls::TlsAcceptor::from(t.config.clone()), a))
            }
        };
        let tls_addr = tls_front.as_ref().map(|(_, _, a)| *a);

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
            .spawn(move || {
                runtime.block_on(async move {
                    let inner = Inner { v4, v5 };
                    match tls_front {
                        None => front_door(front, inner, access, None).await,
                        Some((l, acceptor, _)) => {
                            tokio::join!(
                                front_door(front, inner, access.clone(), None),
                                front_door(l, inner, access, Some(acceptor)),
                            );
                        }
                    }
                })
            })
            .map_err(bind_err)?;
        // The public sockets are bound and listening already: connections
        // made from here on wait in their backlog until the front door runs.
        Ok(Self {
            addr: public,
            tls_addr,
            open,
        })
    }

    /// Where the TLS listener is, if there is one.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// Whether anonymous clients get in and may do anything.
    pub fn is_open(&self) -> bool {
        self.open
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

async fn front_door(
    listener: TcpListener,
    inner: Inner,
    access: Access,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
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
                let _ = client.set_nodelay(true);
                let access = access.clone();
                match &tls {
                    None => {
                        tokio::spawn(serve_client(client, peer, inner, access, None));
                    }
                    Some(acceptor) => {
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            let tls = match tokio::time::timeout(
                                CONNECT_TIMEOUT,
                                acceptor.accept(client),
                            )
                            .await
                            {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    tracing::info!("mqtt client {peer}: TLS refused: {e}");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!("mqtt client {peer}: TLS handshake timed out");
                                    return;
                                }
                            };
                            // rustls verified the chain to the fleet CA.
                            let cert_id = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .map(|c| crate::tls::common_name(c).ok_or(()));
                            match cert_id {
                                Some(Err(())) => tracing::info!(
                                    "mqtt client {peer}: refused: its certificate has no single CN"
                                ),
                                Some(Ok(cn)) => {
                                    serve_client(tls, peer, inner, access, Some(cn)).await
                                }
                                None => serve_client(tls, peer, inner, access, None).await,
                            }
                        });
                    }
                }
            }
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin.
                tracing::warn!("embedded broker: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One client connection, plain or with TLS terminated; `cert_id` is the
/// CN of a verified client certificate.
async fn serve_client<S>(
    mut client: S,
    peer: SocketAddr,
    inner: Inner,
    access: Access,
    cert_id: Option<String>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
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
    let (target, level) = match verdict {
        Verdict::V311 => (inner.v4, Level::V311),
        Verdict::V5 => (inner.v5, Level::V5),
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
    let who = match &access {
        Access::Open => Client::Anonymous,
        Access::Login { store, acl } => {
            let connect = match tokio::time::timeout(
                CONNECT_TIMEOUT,
                read_frame(&mut client, &mut head, MAX_CLIENT_PACKET),
            )
            .await
            {
                Ok(Ok(Some(n))) => n,
                Ok(Ok(None)) | Ok(Err(_)) => return,
                Err(_) => {
                    tracing::debug!(
                        "mqtt client {peer}: CONNECT incomplete after {CONNECT_TIMEOUT:?}, closed"
                    );
                    return;
                }
            };
            let frame = head[..connect].to_vec();
            let (store, acl) = (store.clone(), acl.clone());
            // SQLite and PBKDF2 off the door's one thread.
            let checked = tokio::task::spawn_blocking(move || {
                check_connect(&frame, level, &store, &acl, cert_id.as_deref())
            })
            .await;
            match checked {
                Ok(Ok(who)) => who,
                Ok(Err(refusal)) => {
                    tracing::info!("mqtt client {peer}: refused: {}", refusal.why);
                    let _ = client.write_all(refusal.code.connack(level)).await;
                    let _ = client.shutdown().await;
                    return;
                }
                Err(e) => {
                    tracing::error!("embedded broker: checking a CONNECT failed: {e}");
                    return;
                }
            }
        }
    };
    let mut upstream = match tokio::net::TcpStream::connect(target).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("embedded broker: inner listener {target} refused {peer}: {e}");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    match (who, access) {
        (Client::Device(id), Access::Login { acl, .. }) => {
            // The CONNECT goes up as it came; whatever followed it is read
            // packet by packet like the rest.
            let connect = frame_len(&head)
                .ok()
                .flatten()
                .expect("the CONNECT was read whole");
            if upstream.write_all(&head[..connect]).await.is_err() {
                return;
            }
            let guard = Guard {
                level,
                acl,
                who: Client::Device(id),
                aliases: HashMap::new(),
            };
            let mut from_client = Framer::new(MAX_CLIENT_PACKET);
            from_client.buf.extend_from_slice(&head[connect..]);
            guarded(client, upstream, from_client, guard, peer).await;
        }
        _ => {
            if upstream.write_all(&head).await.is_err() {
                return;
            }
            splice(client, upstream).await;
        }
    }
}

/// The protocol level of a connection that got past [`classify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    V311,
    V5,
}

/// Why a CONNECT was refused, as a CONNACK code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RefusalCode {
    /// No login where one is needed, or a will outside the ACL.
    NotAuthorized,
    /// Unknown user or wrong password.
    BadLogin,
    /// A device connecting under a client id that is not its own.
    BadClientId,
}

impl RefusalCode {
    fn connack(self, level: Level) -> &'static [u8] {
        match (level, self) {
            (Level::V311, RefusalCode::NotAuthorized) => &[0x20, 0x02, 0x00, 0x05],
            (Level::V311, RefusalCode::BadLogin) => &[0x20, 0x02, 0x00, 0x04],
            (Level::V311, RefusalCode::BadClientId) => &[0x20, 0x02, 0x00, 0x02],
            // Flags, reason code, no properties.
            (Level::V5, RefusalCode::NotAuthorized) => &[0x20, 0x03, 0x00, 0x87, 0x00],
            (Level::V5, RefusalCode::BadLogin) => &[0x20, 0x03, 0x00, 0x86, 0x00],
            (Level::V5, RefusalCode::BadClientId) => &[0x20, 0x03, 0x00, 0x85, 0x00],
        }
    }
}

/// A refused CONNECT: the code sent and the reason logged (never the
/// password).
#[derive(Debug)]
struct Refusal {
    code: RefusalCode,
    why: String,
}

fn refuse(code: RefusalCode, why: impl Into<String>) -> Refusal {
    Refusal {
        code,
        why: why.into(),
    }
}

/// Checks one whole CONNECT packet against the store's identities (or the
/// verified client certificate's CN, `cert_id`) and the ACL; returns who
/// the client is.
fn check_connect(
    frame: &[u8],
    level: Level,
    store: &Store,
    acl: &Acl,
    cert_id: Option<&str>,
) -> Result<Client, Refusal> {
    let mut buf = BytesMut::from(frame);
    let packet = match level {
        Level::V311 => rumqttd::protocol::v4::V4.read_mut(&mut buf, MAX_CLIENT_PACKET),
        Level::V5 => rumqttd::protocol::v5::V5.read_mut(&mut buf, MAX_CLIENT_PACKET),
    };
    let Ok(Packet::Connect(connect, _, will, _, login)) = packet else {
        return Err(refuse(RefusalCode::NotAuthorized, "malformed CONNECT"));
    };
    if let Some(cn) = cert_id {
        // The certificate is the login (Mosquitto's
        // `use_identity_as_username`): whatever user name came with it is
        // not looked at.
        let who = if cn == crate::access::CONTROLLER_USER {
            Client::Controller
        } else if connect.client_id != cn {
            return Err(refuse(
                RefusalCode::BadClientId,
                format!(
                    "certificate of device {cn:?} connected with client id {:?}",
                    connect.client_id
                ),
            ));
        } else {
            Client::Device(cn.to_owned())
        };
        return check_will(acl, who, will.as_ref().map(|w| &w.topic[..]));
    }
    let Some(login) = login else {
        return Err(refuse(
            RefusalCode::NotAuthorized,
            "no user name (anonymous clients are not let in)",
        ));
    };
    let identity = match store.identity(&login.username) {
        Ok(Some(i)) => i,
        Ok(None) => {
            return Err(refuse(
                RefusalCode::BadLogin,
                format!("unknown user {:?}", login.username),
            ))
        }
        Err(e) => {
            tracing::error!("embedded broker: reading identities: {e}");
            return Err(refuse(RefusalCode::BadLogin, "the store could not be read"));
        }
    };
    if !verify_password(&identity.hash, login.password.as_bytes()) {
        return Err(refuse(
            RefusalCode::BadLogin,
            format!("wrong password for {:?}", login.username),
        ));
    }
    let who = match identity.role {
        Role::Controller => Client::Controller,
        Role::Device => {
            if connect.client_id != identity.name {
                return Err(refuse(
                    RefusalCode::BadClientId,
                    format!(
                        "device {:?} connected with client id {:?}",
                        identity.name, connect.client_id
                    ),
                ));
            }
            Client::Device(identity.name)
        }
    };
    check_will(acl, who, will.as_ref().map(|w| &w.topic[..]))
}

/// `who`, if its will (topic) is one it may publish.
fn check_will(acl: &Acl, who: Client, will: Option<&[u8]>) -> Result<Client, Refusal> {
    if let Some(topic) = will {
        let topic = std::str::from_utf8(topic).unwrap_or("");
        if !acl.may_publish(&who, topic) {
            return Err(refuse(
                RefusalCode::NotAuthorized,
                format!("{who:?} may not have a will on {topic:?}"),
            ));
        }
    }
    Ok(who)
}

/// The ACL state of one device's connection.
struct Guard {
    level: Level,
    acl: Acl,
    who: Client,
    /// MQTT 5 topic aliases the client set: a later PUBLISH may name only
    /// the alias, and is checked against the topic it stands for.
    aliases: HashMap<u16, String>,
}

impl Guard {
    /// Whether the client's `frame` (one whole packet) may go on to the
    /// broker; `Err` says why not.
    fn check(&mut self, frame: &[u8]) -> Result<(), String> {
        // PUBLISH, SUBSCRIBE and a (second, forbidden) CONNECT are read;
        // acknowledgements, pings, UNSUBSCRIBE and DISCONNECT carry nothing
        // the ACL is about.
        if !matches!(frame.first().map(|b| b >> 4), Some(1 | 3 | 8)) {
            return Ok(());
        }
        let mut buf = BytesMut::from(frame);
        let packet = match self.level {
            Level::V311 => rumqttd::protocol::v4::V4.read_mut(&mut buf, MAX_CLIENT_PACKET),
            Level::V5 => rumqttd::protocol::v5::V5.read_mut(&mut buf, MAX_CLIENT_PACKET),
        }
        .map_err(|e| format!("malformed packet ({e:?})"))?;
        match packet {
            Packet::Publish(publish, properties) => {
                let alias = properties.and_then(|p| p.topic_alias);
                let topic = if publish.topic.is_empty() {
                    alias
                        .and_then(|a| self.aliases.get(&a).cloned())
                        .ok_or("PUBLISH without a topic or a known topic alias")?
                } else {
                    std::str::from_utf8(&publish.topic)
                        .map_err(|_| "PUBLISH topic is not UTF-8")?
                        .to_owned()
                };
                if !self.acl.may_publish(&self.who, &topic) {
                    return Err(format!("PUBLISH on {topic:?} is not allowed"));
                }
                if let Some(a) = alias {
                    self.aliases.insert(a, topic);
                }
                Ok(())
            }
            Packet::Subscribe(subscribe, _) => {
                for f in &subscribe.filters {
                    if !self.acl.may_subscribe(&self.who, &f.path) {
                        return Err(format!("SUBSCRIBE to {:?} is not allowed", f.path));
                    }
                }
                Ok(())
            }
            Packet::Connect(..) => Err("a second CONNECT".into()),
            _ => Ok(()),
        }
    }
}

/// Reads whole packets from a stream; what was read past a packet's end
/// stays in `buf` for the next call, so a call may be cancelled and made
/// again without losing bytes.
struct Framer {
    buf: BytesMut,
    max: usize,
}

impl Framer {
    fn new(max: usize) -> Self {
        Self {
            buf: BytesMut::with_capacity(1024),
            max,
        }
    }

    /// The next whole packet; `None` at the end of the stream.
    async fn next<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> std::io::Result<Option<BytesMut>> {
        loop {
            match frame_len(&self.buf) {
                Err(why) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why)),
                Ok(Some(n)) if n > self.max + 5 => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "packet too large",
                    ))
                }
                Ok(Some(n)) if self.buf.len() >= n => return Ok(Some(self.buf.split_to(n))),
                _ => {}
            }
            if r.read_buf(&mut self.buf).await? == 0 {
                return Ok(None);
            }
        }
    }
}

/// Reads until `head` holds the whole first packet; returns its length.
async fn read_frame<S: AsyncRead + Unpin>(
    client: &mut S,
    head: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Option<usize>> {
    let mut buf = [0u8; 1024];
    loop {
        match frame_len(head) {
            Err(_) => return Ok(None),
            Ok(Some(n)) if n > max + 5 => return Ok(None),
            Ok(Some(n)) if head.len() >= n => return Ok(Some(n)),
            _ => {}
        }
        let n = client.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&buf[..n]);
    }
}

/// The length of the packet at the start of `buf` (fixed header included)
/// once its fixed header is complete.
fn frame_len(buf: &[u8]) -> Result<Option<usize>, &'static str> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut remaining: usize = 0;
    for i in 1..5 {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7f) << (7 * (i - 1));
        if b & 0x80 == 0 {
            return Ok(Some(1 + i + remaining));
        }
    }
    Err("malformed remaining length")
}

/// Relays a device's connection packet by packet: each packet from the
/// device is checked by `guard` before it goes up; one that fails ends the
/// connection (MQTT 5: with a DISCONNECT 0x87 sent between two of the
/// broker's packets). Returning drops (closes) both.
async fn guarded<S>(
    client: S,
    upstream: tokio::net::TcpStream,
    mut from_client: Framer,
    mut guard: Guard,
    peer: SocketAddr,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut upstream_rx, mut upstream_tx) = upstream.into_split();
    let level = guard.level;
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();

    let up = async {
        loop {
            match from_client.next(&mut client_rx).await {
                Ok(Some(packet)) => match guard.check(&packet) {
                    Ok(()) => {
                        if upstream_tx.write_all(&packet).await.is_err() {
                            return UpEnd::Failed;
                        }
                    }
                    Err(why) => {
                        tracing::warn!("mqtt client {peer} ({:?}): {why}; disconnected", guard.who);
                        return UpEnd::Refused;
                    }
                },
                Ok(None) => {
                    let _ = upstream_tx.shutdown().await;
                    return UpEnd::Closed;
                }
                Err(_) => return UpEnd::Failed,
            }
        }
    };
    let down = async {
        let mut from_broker = Framer::new(MAX_BROKER_PACKET);
        loop {
            tokio::select! {
                biased;
                _ = &mut stop_rx => {
                    if level == Level::V5 {
                        let _ = client_tx.write_all(&DISCONNECT_NOT_AUTHORIZED).await;
                    }
                    let _ = client_tx.shutdown().await;
                    return;
                }
                packet = from_broker.next(&mut upstream_rx) => match packet {
                    Ok(Some(p)) => {
                        if client_tx.write_all(&p).await.is_err() {
                            return;
                        }
                    }
                    _ => return,
                },
            }
        }
    };
    tokio::pin!(up, down);
    tokio::select! {
        _ = &mut down => {}
        end = &mut up => match end {
            // The broker gets a moment to finish, as in `splice`.
            UpEnd::Closed => {
                let _ = tokio::time::timeout(Duration::from_secs(5), &mut down).await;
            }
            // The broker's packets stop at a packet boundary, then the
            // client hears why.
            UpEnd::Refused => {
                let _ = stop_tx.send(());
                let _ = tokio::time::timeout(Duration::from_secs(5), &mut down).await;
            }
            UpEnd::Failed => {}
        },
    }
}

/// How the client-to-broker half of [`guarded`] ended.
enum UpEnd {
    /// The client closed its side after whole packets.
    Closed,
    /// A packet outside the ACL (or malformed).
    Refused,
    /// A read or write failed.
    Failed,
}

/// Copies both ways until one side is done; returning drops (closes) both.
///
/// When the client ends cleanly (end of stream), rumqttd gets the end of
/// stream after every byte before it (a DISCONNECT stays a DISCONNECT) and
/// gets a moment to close its side. When the client's connection fails, or
/// rumqttd closes (a keep-alive timeout for a client that vanished without a
/// word, say), both are closed at once, so neither side lingers.
async fn splice<S>(client: S, mut upstream: tokio::net::TcpStream)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
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
async fn read_head<S: AsyncRead + Unpin>(
    client: &mut S,
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
        max_payload_size: MAX_PAYLOAD,
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
    use super::{classify, frame_len, Guard, Level, Verdict};
    use crate::access::{Acl, Client};

    fn guard(level: Level) -> Guard {
        Guard {
            level,
            acl: Acl::new("device"),
            who: Client::Device("dev-1".into()),
            aliases: Default::default(),
        }
    }

    /// An MQTT 5 QoS 1 PUBLISH, with a topic alias property if given.
    fn publish_v5(topic: &str, alias: Option<u16>) -> Vec<u8> {
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(&[0, 1]);
        let props: Vec<u8> = alias.map_or(vec![], |a| {
            let [hi, lo] = a.to_be_bytes();
            vec![0x23, hi, lo]
        });
        body.push(props.len() as u8);
        body.extend_from_slice(&props);
        body.extend_from_slice(b"{}");
        let mut v = vec![0x32, body.len() as u8];
        v.extend_from_slice(&body);
        v
    }

    /// An MQTT 3.1.1 SUBSCRIBE of one filter at QoS 1.
    fn subscribe_v4(filter: &str) -> Vec<u8> {
        let mut body = vec![0, 1];
        body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
        body.extend_from_slice(filter.as_bytes());
        body.push(1);
        let mut v = vec![0x82, body.len() as u8];
        v.extend_from_slice(&body);
        v
    }

    #[test]
    fn a_device_publishes_on_its_own_topics_only_and_aliases_are_followed() {
        let mut g = guard(Level::V5);
        assert_eq!(g.check(&publish_v5("device/dev-1/status", None)), Ok(()));
        assert!(g.check(&publish_v5("device/dev-2/status", None)).is_err());
        assert!(g
            .check(&publish_v5("device/dev-1/ota/start", None))
            .is_err());
        // An alias stands for the topic it was set with.
        assert_eq!(
            g.check(&publish_v5("device/dev-1/progress", Some(3))),
            Ok(())
        );
        assert_eq!(g.check(&publish_v5("", Some(3))), Ok(()));
        assert!(g.check(&publish_v5("", Some(4))).is_err(), "unknown alias");
        assert!(g.check(&publish_v5("", None)).is_err(), "no topic at all");
        // Moving an alias to a forbidden topic is itself refused.
        assert!(g
            .check(&publish_v5("device/dev-2/status", Some(3)))
            .is_err());
    }

    #[test]
    fn a_device_subscribes_to_its_commands_only_and_a_second_connect_is_refused() {
        let mut g = guard(Level::V311);
        assert_eq!(g.check(&subscribe_v4("device/dev-1/ota/cancel")), Ok(()));
        assert_eq!(g.check(&subscribe_v4("device/ota/start")), Ok(()));
        for f in ["device/dev-2/ota/cancel", "device/+/ota/cancel", "#"] {
            let e = g.check(&subscribe_v4(f)).unwrap_err();
            assert!(e.contains("not allowed"), "{f}: {e}");
        }
        // PINGREQ and PUBACK pass unread; a CONNECT and garbage do not.
        assert_eq!(g.check(&[0xc0, 0x00]), Ok(()));
        assert_eq!(g.check(&[0x40, 0x02, 0x00, 0x01]), Ok(()));
        let connect = [0x10, 0x0c, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 30, 0, 0];
        assert!(g.check(&connect).is_err());
        assert!(
            g.check(&[0x82, 0x02, 0x00, 0x01]).is_err(),
            "SUBSCRIBE without filters"
        );
    }

    #[test]
    fn frame_lengths_are_read_from_the_fixed_header() {
        assert_eq!(frame_len(&[]), Ok(None));
        assert_eq!(frame_len(&[0xc0]), Ok(None));
        assert_eq!(frame_len(&[0xc0, 0x00]), Ok(Some(2)));
        assert_eq!(frame_len(&[0x30, 0x80]), Ok(None));
        assert_eq!(frame_len(&[0x30, 0x80, 0x01]), Ok(Some(3 + 128)));
        assert!(frame_len(&[0x30, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

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

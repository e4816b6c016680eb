//! Unit tests of the session against a scripted TCP peer: canned broker
//! bytes in, the packets the client wrote out.
use super::*;
use core::cell::RefCell;
use core::net::{IpAddr, SocketAddr};
use embedded_io::ErrorKind;
use embedded_nal_async::{AddrType, Dns, TcpConnect};
use std::vec::Vec as StdVec;

/// One TCP peer that records what the client writes and answers with
/// canned bytes (then end of stream).
struct Scripted {
    reply: &'static [u8],
    written: RefCell<StdVec<u8>>,
}

struct ScriptedConn<'a> {
    peer: &'a Scripted,
    at: usize,
}

impl embedded_io_async::ErrorType for ScriptedConn<'_> {
    type Error = ErrorKind;
}

impl embedded_io_async::Read for ScriptedConn<'_> {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, ErrorKind> {
        let rest = &self.peer.reply[self.at..];
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.at += n;
        Ok(n)
    }
}

impl embedded_io_async::Write for ScriptedConn<'_> {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, ErrorKind> {
        self.peer.written.borrow_mut().extend_from_slice(buf);
        Ok(buf.len())
    }
    async fn flush(&mut self) -> Result<(), ErrorKind> {
        Ok(())
    }
}

impl TcpConnect for Scripted {
    type Error = ErrorKind;
    type Connection<'a> = ScriptedConn<'a>;
    async fn connect<'a>(&'a self, _: SocketAddr) -> Result<ScriptedConn<'a>, ErrorKind> {
        Ok(ScriptedConn { peer: self, at: 0 })
    }
}

impl Dns for Scripted {
    type Error = ();
    async fn get_host_by_name(&self, _: &str, _: AddrType) -> Result<IpAddr, ()> {
        Err(())
    }
    async fn get_host_by_address(&self, _: IpAddr, _: &mut [u8]) -> Result<usize, ()> {
        Err(())
    }
}

// MQTT v5 CONNACK: no session present, the given reason code, no properties.
const CONNACK_OK: &[u8] = &[0x20, 0x03, 0x00, 0x00, 0x00];
const CONNACK_BAD_LOGIN: &[u8] = &[0x20, 0x03, 0x00, 0x86, 0x00];

/// Connects once with `username`/`password`; returns the outcome and
/// the CONNECT packet written.
fn connect_with(
    reply: &'static [u8],
    username: Option<&str>,
    password: Option<&[u8]>,
) -> (Result<Connected, MqttError>, StdVec<u8>) {
    let peer = Scripted {
        reply,
        written: RefCell::new(StdVec::new()),
    };
    let mut config = MqttConfig::new("127.0.0.1", 1883, "dev-1", "device/dev-1/status", b"{}");
    config.username = username;
    config.password = password;
    let mut rx = [0u8; MQTT_RX_BUFFER];
    let mut buffers = MqttBuffers::new(&mut rx);
    let net = crate::net::NetConnector::plain(&peer, &peer);
    let mut session = MqttSession::new(&net, &mut buffers, config);
    let outcome = embassy_futures::block_on(session.connect());
    drop(session);
    let written = peer.written.borrow().clone();
    (outcome, written)
}

/// The CONNECT flags byte: after the fixed header (type byte and a
/// one-byte remaining length for these small packets) and the protocol
/// name and level (`00 04 M Q T T 05`).
fn connect_flags(packet: &[u8]) -> u8 {
    assert_eq!(packet[0], 0x10, "not a CONNECT");
    assert_eq!(&packet[2..9], b"\x00\x04MQTT\x05");
    packet[9]
}

#[test]
fn a_url_login_is_sent_as_user_name_and_password_in_connect() {
    let (outcome, packet) = connect_with(CONNACK_OK, Some("alice"), Some(b"s3cr@t"));
    assert_eq!(
        outcome,
        Ok(Connected {
            session_present: false
        })
    );
    let flags = connect_flags(&packet);
    assert_eq!(flags & 0xc0, 0xc0, "user name and password flags");
    // User name and password are the last two payload fields.
    assert!(packet.ends_with(b"\x00\x05alice\x00\x06s3cr@t"));
}

#[test]
fn without_a_login_connect_carries_neither_flag() {
    let (outcome, packet) = connect_with(CONNACK_OK, None, None);
    assert!(outcome.is_ok());
    assert_eq!(connect_flags(&packet) & 0xc0, 0);
    assert!(!packet.windows(5).any(|w| w == b"alice"));
}

#[test]
fn a_broker_refusing_the_login_is_reported_with_its_reason_code() {
    let (outcome, _) = connect_with(CONNACK_BAD_LOGIN, Some("alice"), Some(b"wrong"));
    assert_eq!(outcome, Err(MqttError::Refused(0x86)));
}

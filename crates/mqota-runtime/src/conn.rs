//! The byte stream under the MQTT client: a TCP connection with a bounded
//! write buffer and a kill switch.
//!
//! rust-mqtt writes each packet in many small pieces and only flushes at the
//! end, so buffering turns a packet into one TCP segment instead of a dozen.
//!
//! The kill switch exists because rust-mqtt can only let go of a transport
//! after the transport failed (`Client::abort` refuses a healthy one). When
//! the session itself decides the connection is dead — a keep-alive answer
//! that never came, a packet body whose read was interrupted, the link gone —
//! it raises the switch; the next read or write fails, the client marks the
//! connection broken, and `abort` hands the transport back to be dropped.

use core::sync::atomic::{AtomicBool, Ordering};

use embedded_io::ErrorKind;
use embedded_io_async::{ErrorType, Read, Write};

/// Bytes of outgoing MQTT data collected before they are written to TCP.
/// A packet larger than this is written in several pieces, which is correct,
/// only less efficient.
pub const MQTT_TX_BUFFER: usize = 1024;

/// Shared between a session and the connections it opens.
#[derive(Debug, Default)]
pub(crate) struct KillSwitch(AtomicBool);

impl KillSwitch {
    pub(crate) const fn new() -> Self {
        Self(AtomicBool::new(false))
    }
    pub(crate) fn kill(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
    pub(crate) fn rearm(&self) {
        self.0.store(false, Ordering::Relaxed);
    }
    fn is_killed(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A TCP connection as the MQTT client sees it. Errors are reduced to their
/// kind: that is all rust-mqtt keeps of them anyway.
pub(crate) struct MqttConn<'k, C> {
    inner: C,
    kill: &'k KillSwitch,
    tx: [u8; MQTT_TX_BUFFER],
    tx_len: usize,
}

impl<'k, C: Read + Write> MqttConn<'k, C> {
    pub(crate) fn new(inner: C, kill: &'k KillSwitch) -> Self {
        Self {
            inner,
            kill,
            tx: [0; MQTT_TX_BUFFER],
            tx_len: 0,
        }
    }

    fn check(&self) -> Result<(), ErrorKind> {
        if self.kill.is_killed() {
            Err(ErrorKind::ConnectionAborted)
        } else {
            Ok(())
        }
    }

    async fn drain(&mut self) -> Result<(), ErrorKind> {
        let mut sent = 0;
        while sent < self.tx_len {
            let n = self
                .inner
                .write(&self.tx[sent..self.tx_len])
                .await
                .map_err(|e| embedded_io::Error::kind(&e))?;
            if n == 0 {
                return Err(ErrorKind::WriteZero);
            }
            sent += n;
        }
        self.tx_len = 0;
        Ok(())
    }
}

impl<C> ErrorType for MqttConn<'_, C> {
    type Error = ErrorKind;
}

impl<C: Read + Write> Read for MqttConn<'_, C> {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        self.check()?;
        let n = self
            .inner
            .read(buf)
            .await
            .map_err(|e| embedded_io::Error::kind(&e))?;
        // The stream ended: the peer closed. rust-mqtt would read this as an
        // unexpected EOF as well; saying so here keeps the error uniform.
        if n == 0 && !buf.is_empty() {
            return Err(ErrorKind::ConnectionReset);
        }
        Ok(n)
    }
}

impl<C: Read + Write> Write for MqttConn<'_, C> {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        self.check()?;
        if self.tx_len == MQTT_TX_BUFFER {
            self.drain().await?;
        }
        let n = buf.len().min(MQTT_TX_BUFFER - self.tx_len);
        self.tx[self.tx_len..self.tx_len + n].copy_from_slice(&buf[..n]);
        self.tx_len += n;
        Ok(n)
    }

    async fn flush(&mut self) -> Result<(), Self::Error> {
        self.check()?;
        self.drain().await?;
        self.inner
            .flush()
            .await
            .map_err(|e| embedded_io::Error::kind(&e))
    }
}

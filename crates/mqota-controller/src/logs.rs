//! Reading a device's field log over MQTT: publish a request on
//! `{prefix}/{id}/logs/get`, gather the chunks the device answers on
//! `{prefix}/{id}/logs` (QoS 0, numbered by `seq`), and ask again from the
//! last record received when a chunk went missing.

use std::time::Duration;

use mqota_core::protocol::{LogRecord, LogsChunk, LogsGet, Topics};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use tokio::sync::mpsc;

use crate::url::BrokerUrl;

/// Why the log could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogsError {
    /// The prefix or device id cannot be used in a topic.
    #[error("{what}: {rule}")]
    BadTopic {
        /// What was wrong (`bad device id`, ...).
        what: String,
        /// The rule it breaks.
        rule: String,
    },
    /// The broker could not be reached or refused the subscription.
    #[error("cannot reach the broker at {url}: {reason}")]
    Connect {
        /// The broker.
        url: String,
        /// What the connection or subscription attempt failed with.
        reason: String,
    },
    /// The device did not answer (it is offline, or too old to keep a log).
    #[error("device {device} did not answer within {secs} s (offline, or without a field log?)")]
    NoAnswer {
        /// The device.
        device: String,
        /// How long we waited.
        secs: u64,
    },
}

/// What one fetch found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fetched {
    /// The records, oldest first.
    pub records: Vec<LogRecord>,
    /// The newest record the device holds, as it said.
    pub newest: Option<u32>,
    /// Chunks that never arrived even after asking again (records may be
    /// missing between the ones returned).
    pub lost_chunks: u32,
    /// When the device's current boot started, as seen from here: the
    /// arrival time of its answer less the uptime it stated. `None` for
    /// devices that do not state it.
    pub clock: Option<BootClock>,
}

/// When boot `boot` of a device started, by this machine's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootClock {
    /// The boot.
    pub boot: u32,
    /// Its start.
    pub started: std::time::SystemTime,
}

impl BootClock {
    /// From a chunk's `boot` and `uptime_ms`, received at `at`.
    pub fn from_chunk(c: &LogsChunk, at: std::time::SystemTime) -> Option<Self> {
        let started = at.checked_sub(Duration::from_millis(c.uptime_ms?.into()))?;
        Some(Self {
            boot: c.boot?,
            started,
        })
    }

    /// The wall-clock time of a record of this boot; `None` for other boots,
    /// whose start the controller did not see.
    pub fn time_of(&self, r: &LogRecord) -> Option<std::time::SystemTime> {
        (r.boot == self.boot).then(|| self.started + Duration::from_millis(r.ms.into()))
    }
}

/// A connection that reads one device's log.
pub struct LogReader {
    client: AsyncClient,
    topics: Topics,
    chunks: mpsc::UnboundedReceiver<LogsChunk>,
    task: tokio::task::JoinHandle<()>,
    next_request: u32,
}

impl Drop for LogReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LogReader {
    /// Connects and subscribes to `{prefix}/{id}/logs`.
    pub async fn connect(url: &BrokerUrl, prefix: &str, device: &str) -> Result<Self, LogsError> {
        let topics = Topics::new(prefix, device).map_err(|e| LogsError::BadTopic {
            what: e.to_string(),
            rule: e.rule().to_string(),
        })?;
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let client_id = format!("mqota-logs-{}-{nonce:x}", std::process::id());
        let o = url.mqtt_options(client_id);
        let (client, mut ev) = AsyncClient::new(o, 64);
        let (tx, chunks) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
        let filter = topics.logs().to_string();
        let task = {
            let client = client.clone();
            let device = device.to_owned();
            tokio::spawn(async move {
                let mut ready = Some(ready_tx);
                loop {
                    match ev.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            let _ = client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            if let Some(r) = ready.take() {
                                let _ = r.send(Ok(()));
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            if let Ok(c) = serde_json::from_slice::<LogsChunk>(&p.payload) {
                                // Believe only the device the topic names.
                                if c.device.as_str() == device {
                                    let _ = tx.send(c);
                                }
                            }
                        }
                        Ok(_) => {}
                        Err(e) => match ready.take() {
                            Some(r) => {
                                let _ = r.send(Err(e.to_string()));
                                return;
                            }
                            None => tokio::time::sleep(Duration::from_millis(500)).await,
                        },
                    }
                }
            })
        };
        let outcome = tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .map_err(|_| "no answer within 10 s".to_owned())
            .and_then(|r| r.unwrap_or_else(|_| Err("event loop ended".to_owned())));
        if let Err(reason) = outcome {
            task.abort();
            return Err(LogsError::Connect {
                url: url.to_string(),
                reason,
            });
        }
        Ok(Self {
            client,
            topics,
            chunks,
            task,
            next_request: 0,
        })
    }

    /// Asks for the records `req` names and gathers the answer. A missing
    /// chunk, or no answer at all (a device in a download answers when it
    /// ends), is
    /// asked for again from the last record received, twice at most; a
    /// chunk still missing is counted in [`Fetched::lost_chunks`]. Waits at
    /// most `wait` for each answer.
    pub async fn fetch(&mut self, req: &LogsGet, wait: Duration) -> Result<Fetched, LogsError> {
        let mut out = Fetched::default();
        let mut want = req.clone();
        let limit = req.limit() as usize;
        let mut answered = false;
        for _ in 0..3 {
            self.next_request += 1;
            let id = format!("r{}-{}", std::process::id() % 100_000, self.next_request);
            want.id = Some(heapless::String::try_from(id.as_str()).unwrap_or_default());
            want.max = Some((limit - out.records.len()).max(1) as u16);
            let payload = serde_json::to_vec(&want).expect("a request serialises");
            let _ = self
                .client
                .publish(
                    self.topics.logs_get().to_string(),
                    QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .await;
            let mut expected = 0u16;
            let mut complete = false;
            let mut heard = false;
            let deadline = tokio::time::Instant::now() + wait;
            while let Ok(Some(c)) = tokio::time::timeout_at(deadline, self.chunks.recv()).await {
                if c.id.as_deref() != Some(id.as_str()) {
                    continue;
                }
                heard = true;
                out.newest = c.newest;
                out.clock = BootClock::from_chunk(&c, std::time::SystemTime::now()).or(out.clock);
                if c.seq != expected {
                    // A chunk went missing: keep what came before it.
                    break;
                }
                expected += 1;
                out.records.extend(c.records);
                if c.last {
                    complete = true;
                    break;
                }
            }
            if !heard {
                // A device answers a request that arrives during a
                // download when the download ends: ask again.
                continue;
            }
            answered = true;
            if complete || out.records.len() >= limit {
                out.lost_chunks = 0;
                return Ok(out);
            }
            if let Some(last) = out.records.last() {
                want.since = Some(last.n + 1);
            }
            out.lost_chunks += 1;
        }
        if !answered {
            return Err(LogsError::NoAnswer {
                device: self.topics.device_id().to_owned(),
                secs: wait.as_secs() * 3,
            });
        }
        Ok(out)
    }
}

/// Connects, fetches once, disconnects.
pub async fn fetch_logs(
    url: &BrokerUrl,
    prefix: &str,
    device: &str,
    req: &LogsGet,
    wait: Duration,
) -> Result<Fetched, LogsError> {
    LogReader::connect(url, prefix, device)
        .await?
        .fetch(req, wait)
        .await
}

/// Reads the last `count` records of a device's log (or fewer, if it holds
/// fewer). `newest_hint` is the `log_newest` of its latest status; it may
/// be stale (the status that follows a failure can still be on its way), so
/// the answer's own `newest` is believed, and the records are asked for once
/// more when the hint fell short. Without a hint, an empty answer (`since`
/// past every record) learns the newest first. At most two requests.
pub async fn fetch_last(
    url: &BrokerUrl,
    prefix: &str,
    device: &str,
    newest_hint: Option<u32>,
    count: u16,
    wait: Duration,
) -> Result<Fetched, LogsError> {
    let count = count.max(1);
    let from = |newest: u32| newest.saturating_sub(u32::from(count) - 1);
    let mut reader = LogReader::connect(url, prefix, device).await?;
    let ask = |since| LogsGet {
        since: Some(since),
        max: Some(count),
        ..LogsGet::default()
    };
    let first = reader
        .fetch(&ask(newest_hint.map_or(u32::MAX, from)), wait)
        .await?;
    let behind = match (first.newest, first.records.last()) {
        (Some(newest), Some(last)) => newest > last.n,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if !behind {
        return Ok(first);
    }
    let newest = first.newest.expect("behind only with a newest");
    reader.fetch(&ask(from(newest)), wait).await
}

/// The record among `records` that best says why job `job` failed: the newest `error` record that says more than
/// the job's own result (the device logs `job ID: rolled_back CODE` when it
/// reports; the record worth reading is the one before, such as `trial
/// failed: health check failed`), else the newest such `warn` record, else
/// the newest `error` record of any kind; its message, trimmed. `None` when
/// nothing is an error or a warning.
pub fn relevant_line(records: &[LogRecord], job: &str) -> Option<String> {
    use mqota_core::protocol::LogLevel;
    // `job ID: PHASE CODE` and nothing more (the device's note of a
    // progress event without a message).
    let echoes_result = |r: &LogRecord| {
        r.msg
            .strip_prefix("job ")
            .and_then(|rest| rest.strip_prefix(job))
            .and_then(|rest| rest.strip_prefix(':'))
            .is_some_and(|rest| rest.split_whitespace().count() <= 2)
    };
    let newest = |level: LogLevel, telling: bool| {
        records
            .iter()
            .rev()
            .find(|r| r.level == level && (!telling || !echoes_result(r)))
    };
    newest(LogLevel::Error, true)
        .or_else(|| newest(LogLevel::Warn, true))
        .or_else(|| newest(LogLevel::Error, false))
        .map(|r| r.msg.trim().to_owned())
}

/// One record as a line: `#n boot b +ms level message`.
pub fn format_record(r: &LogRecord) -> String {
    format_record_at(r, None)
}

/// One record as a line, with its UTC time (to the millisecond) after the
/// seconds since boot when `clock` knows its boot's start:
/// `#n boot b +ms [time] level message`.
pub fn format_record_at(r: &LogRecord, clock: Option<&BootClock>) -> String {
    let at = clock
        .and_then(|c| c.time_of(r))
        .map(|t| format!(" {}", humantime::format_rfc3339_millis(t)))
        .unwrap_or_default();
    format!(
        "#{:<6} boot {:<4} {:>10.3}s{at} {:<5} {}",
        r.n,
        r.boot,
        r.ms as f64 / 1000.0,
        r.level.as_str(),
        r.msg
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqota_core::protocol::LogLevel;

    #[test]
    fn the_current_boots_records_get_the_time_the_controller_saw() {
        use std::time::{Duration, UNIX_EPOCH};
        let chunk: LogsChunk = serde_json::from_str(
            r#"{"device":"d","id":null,"seq":0,"last":true,"newest":3,"boot":2,"uptime_ms":10000,"records":[]}"#,
        )
        .unwrap();
        let at = UNIX_EPOCH + Duration::from_secs(1_765_000_000);
        let clock = BootClock::from_chunk(&chunk, at).unwrap();
        let mut r = rec(3, LogLevel::Info, "up");
        r.boot = 2;
        r.ms = 4_000;
        let line = format_record_at(&r, Some(&clock));
        // Sent 10 s after boot, the record 4 s after: 6 s before arrival.
        assert!(line.contains(" 2025-12-06T05:46:34.000Z info "), "{line}");
        r.boot = 1;
        assert!(
            !format_record_at(&r, Some(&clock)).contains("Z "),
            "another boot: no time"
        );
        // An older device states no uptime: no clock.
        let old: LogsChunk = serde_json::from_str(
            r#"{"device":"d","id":null,"seq":0,"last":true,"newest":3,"records":[]}"#,
        )
        .unwrap();
        assert_eq!(BootClock::from_chunk(&old, at), None);
    }

    fn rec(n: u32, level: LogLevel, msg: &str) -> LogRecord {
        LogRecord {
            n,
            boot: 1,
            ms: 0,
            level,
            msg: heapless::String::try_from(msg).unwrap(),
        }
    }

    #[test]
    fn the_relevant_line_is_the_newest_error_that_says_more_than_the_result_code() {
        let rolled_back = [
            rec(
                0,
                LogLevel::Info,
                "boot 2: software_reset, app 1.2.0 slot 1 trial",
            ),
            rec(1, LogLevel::Warn, "broker connection lost"),
            rec(
                2,
                LogLevel::Error,
                "trial failed: health check failed, rolling back",
            ),
            rec(
                3,
                LogLevel::Info,
                "boot 3: software_reset, app 1.0.0 slot 0 valid",
            ),
            rec(
                4,
                LogLevel::Error,
                "job d-1: rolled_back health_check_failed ",
            ),
        ];
        assert_eq!(
            relevant_line(&rolled_back, "d-1").as_deref(),
            Some("trial failed: health check failed, rolling back")
        );
        // A failure whose own record carries the message is its own reason.
        let failed = [
            rec(7, LogLevel::Info, "job d-2: accepted  "),
            rec(8, LogLevel::Error, "job d-2: failed http_status HTTP 404"),
        ];
        assert_eq!(
            relevant_line(&failed, "d-2").as_deref(),
            Some("job d-2: failed http_status HTTP 404")
        );
        // Only the bare result: better than nothing.
        let bare = [rec(9, LogLevel::Error, "job d-3: failed flash")];
        assert_eq!(
            relevant_line(&bare, "d-3").as_deref(),
            Some("job d-3: failed flash")
        );
        // Another job's bare result is a telling error for this one.
        assert_eq!(
            relevant_line(&bare, "d-4").as_deref(),
            Some("job d-3: failed flash")
        );
        // Warnings when there is no error; nothing from info alone.
        let warned = [rec(1, LogLevel::Warn, "WiFi link lost")];
        assert_eq!(
            relevant_line(&warned, "d-1").as_deref(),
            Some("WiFi link lost")
        );
        assert_eq!(relevant_line(&rolled_back[..1], "d-1"), None);
        assert_eq!(relevant_line(&[], "d-1"), None);
    }
}

//! The controller's view of the fleet over MQTT (rumqttc v5): every device's
//! retained status, availability and latest progress event, kept current by
//! one subscription, and the commands the controller sends.
//!
//! Only per-device topics count (`{prefix}/{id}/status`, `…/progress`,
//! `…/availability`), and only when the payload's `device` field equals the
//! topic's id: a broker ACL can tie those topics to one identity, while the
//! shared `{prefix}/progress` copy lets any client speak as any device, so
//! the controller does not even subscribe to it.
//!
//! A controller that starts later learns the whole fleet from the retained
//! statuses and availabilities the broker hands out right after the
//! subscription; [`Fleet::settle`] waits for that burst to end.
//!
//! # Why every filter is subscribed at QoS 0
//!
//! Brokers cap how many QoS 1 messages they queue for one client, and the
//! retained replay of a large fleet counts against that cap: stock Mosquitto
//! (`max_queued_messages 1000`) silently dropped all but about a thousand
//! statuses of a 5,000-device fleet, and rumqttd hands out no more retained
//! messages than a client has in-flight slots (100). Messages a client
//! subscribed to at QoS 0 are not queued against either limit (Mosquitto
//! writes them straight out; rumqttd reads up to its router's
//! `max_outgoing_packet_count`, which the embedded broker sets far above any
//! fleet), so the controller subscribes to all three filters at QoS 0. That
//! costs nothing: the session is a clean one, so nothing QoS 1 would have
//! kept survives a reconnect anyway, and every reconnect replays the
//! retained statuses again. What the replay may still miss is reported by
//! [`Fleet::gaps`].
//!
//! QoS 0 is not a promise of delivery, though: a controller that reads more
//! slowly than a burst arrives (10,000 devices reporting at once) has
//! messages dropped by Mosquitto like any slow client. A rollout therefore
//! asks again, with [`Fleet::refresh`], for the retained status of every
//! device it waits for that has been silent a while.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mqota_core::protocol::{
    parse_device_topic, DeviceTopic, ErrorCode, Progress, Status, TopicError, TopicKind, Topics,
    OFFLINE, ONLINE,
};
use rumqttc::v5::mqttbytes::v5::{Filter, Packet};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::EventLoop;
use rumqttc::v5::{AsyncClient, Event};
use serde::Serialize;
use tokio::sync::{broadcast, watch};

use crate::signer::JobSigner;
use crate::url::BrokerUrl;

/// What the controller knows about one device.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceView {
    /// The device id (the status topic's level).
    pub id: String,
    /// Its retained status, if it published one.
    pub status: Option<Status>,
    /// Whether it is connected: its retained availability says `online`
    /// (false when it says `offline` or said nothing).
    pub online: bool,
    /// Since when `online` has held, as the controller saw it (seconds since
    /// the Unix epoch, like the store's times): when it read the
    /// availability that set it, after its own start or at the latest
    /// change. None before any availability.
    pub online_since: Option<u64>,
    /// The latest progress event seen from it since the controller started.
    pub progress: Option<Progress>,
    /// Its latest terminal progress events (`done`, `failed`, `busy` and
    /// other refusals, ...), oldest first, at most [`ENDED_KEPT`]: a later
    /// event of another job or a refusal never hides how a job ended.
    pub ended: Vec<Progress>,
    /// The job its latest non-terminal progress event was about, until an
    /// event other than a refusal ends that job: the job in flight, as far
    /// as the controller saw.
    pub in_flight: Option<String>,
}

/// Status topics per [`Fleet::refresh`] SUBSCRIBE: about 20 bytes each,
/// so a packet stays a few KiB.
const REFRESH_CHUNK: usize = 100;

/// Most devices one [`Fleet::refresh`] asks about: below stock
/// Mosquitto's 1,000 queued messages per client, so the answers are not
/// dropped in their turn.
pub const REFRESH_MAX: usize = 500;

/// How many terminal progress events [`DeviceView::ended`] keeps.
pub const ENDED_KEPT: usize = 16;

/// Something that happened in the fleet.
#[derive(Debug, Clone)]
pub enum FleetEvent {
    /// A device published (or the broker handed out) a status.
    Status(Status),
    /// A device published a progress event.
    Progress(Progress),
    /// A device's retained status was cleared.
    Removed(String),
    /// A device came online or went offline (its availability topic).
    Availability {
        /// The device.
        id: String,
        /// `true` for `online`.
        online: bool,
    },
}

/// A start command as the controller sends it; `docs/PROTOCOL.md` "Start
/// command". `mqota_core::protocol::Job` is the device's reading of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StartCommand {
    /// Where the device downloads the image.
    pub url: String,
    /// The version the image carries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// SHA-256 of the whole image file, 64 hex digits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Image size in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u32>,
    /// The job id echoed in every event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// Give up after this many seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u32>,
    /// The device may install an older version than it runs.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub allow_downgrade: bool,
    /// The device may install an image of another project.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub allow_other_project: bool,
}

/// Why talking to the broker failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    /// The broker could not be reached or refused the connection: check
    /// `--broker`, credentials, and that the broker runs.
    #[error("cannot connect to the broker at {url}: {reason}")]
    Connect {
        /// The broker (without password).
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The connection is gone and a command could not be queued: retry.
    #[error("the broker connection is closed")]
    Closed,
    /// Commands were queued but the broker did not acknowledge all of them in
    /// time: they may or may not have been delivered; check `mqota status`.
    #[error("the broker did not acknowledge {0} command(s) in time")]
    Unacknowledged(u64),
    /// No device could use this topic prefix: fix `--prefix`.
    #[error("bad topic prefix {prefix:?}: {rule}")]
    BadPrefix {
        /// The prefix as given.
        prefix: String,
        /// The rule it breaks.
        rule: String,
    },
    /// No device can have this id, so no command can reach it: fix the id.
    #[error("bad device id {id:?}: {rule}")]
    BadDeviceId {
        /// The id as given.
        id: String,
        /// The rule it breaks.
        rule: String,
    },
    /// A command could not be signed (the job key's sequence file).
    #[error("cannot sign the command: {0}")]
    Sign(String),
}

type Devices = Arc<Mutex<BTreeMap<String, DeviceView>>>;

/// A connection to the broker that follows the fleet.
pub struct Fleet {
    client: AsyncClient,
    url: BrokerUrl,
    prefix: String,
    devices: Devices,
    events: broadcast::Sender<FleetEvent>,
    sent: Arc<AtomicU64>,
    acked: Arc<AtomicU64>,
    link: Arc<Link>,
    task: tokio::task::JoinHandle<()>,
    /// Signs every command when devices take only signed ones.
    signer: Option<Arc<JobSigner>>,
    /// Ids seen without a status, and since when ([`Fleet::expire_ghosts`]).
    ghosts: Mutex<HashMap<String, std::time::Instant>>,
    /// The MQTT client id; [`Fleet::refresh`]'s connections derive theirs.
    client_id: String,
    /// [`Fleet::refresh`] connections made, numbering their client ids.
    refreshes: AtomicU64,
    /// A [`Fleet::refresh`] connection is at work: one at a time.
    refreshing: Arc<AtomicBool>,
}

/// The state of the broker connection, shared with the event loop.
#[derive(Debug, Default)]
struct Link {
    /// Subscribed and not lost since.
    up: AtomicBool,
    /// Retained messages received since the latest subscription.
    replayed: AtomicU64,
    /// Subscriptions made (one per connect).
    subscribed: AtomicU64,
}

impl Fleet {
    /// Connects as `client_id`, subscribes to `{prefix}/+/status`,
    /// `{prefix}/+/progress` and `{prefix}/+/availability`, and returns once
    /// the subscription is in place.
    pub async fn connect(
        url: &BrokerUrl,
        prefix: &str,
        client_id: &str,
    ) -> Result<Self, FleetError> {
        let o = url.mqtt_options(client_id);
        // Big enough that a rollout to thousands of devices queues its
        // commands without waiting on the event loop.
        let (client, mut ev) = AsyncClient::new(o, 4096);
        let devices: Devices = Arc::default();
        let (events, _) = broadcast::channel(8192);
        let sent = Arc::new(AtomicU64::new(0));
        let acked = Arc::new(AtomicU64::new(0));
        let link = Arc::new(Link::default());
        let (ready_tx, mut ready_rx) = watch::channel(None::<Result<(), String>>);

        let filters = Topics::controller_filters(prefix)
            .map_err(|e| FleetError::BadPrefix {
                prefix: prefix.to_owned(),
                rule: e.rule().to_string(),
            })?
            .map(|f| f.to_string());
        let task = {
            let client = client.clone();
            let devices = devices.clone();
            let events = events.clone();
            let acked = acked.clone();
            let prefix = prefix.to_owned();
            let link = link.clone();
            tokio::spawn(async move {
                let mut ever_ready = false;
                loop {
                    match ev.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            // A clean start loses subscriptions: renew them on
                            // every (re)connect. QoS 0: see the module docs.
                            for f in &filters {
                                let _ = client.try_subscribe(f.clone(), QoS::AtMostOnce);
                            }
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            link.replayed.store(0, Ordering::Relaxed);
                            link.subscribed.fetch_add(1, Ordering::Relaxed);
                            link.up.store(true, Ordering::Relaxed);
                            if !ever_ready {
                                ever_ready = true;
                                let _ = ready_tx.send(Some(Ok(())));
                            }
                        }
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            acked.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            if p.retain {
                                link.replayed.fetch_add(1, Ordering::Relaxed);
                            }
                            let topic = String::from_utf8_lossy(&p.topic);
                            handle_publish(&prefix, &topic, &p.payload, &devices, &events);
                        }
                        Ok(Event::Incoming(Packet::Disconnect(_))) => {
                            link.up.store(false, Ordering::Relaxed);
                            tracing::warn!("broker disconnected the controller");
                        }
                        Ok(_) => {}
                        Err(e) => {
                            link.up.store(false, Ordering::Relaxed);
                            if !ever_ready {
                                let _ = ready_tx.send(Some(Err(e.to_string())));
                                return;
                            }
                            tracing::warn!("broker connection lost: {e}; reconnecting");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
            })
        };

        let outcome = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(r) = ready_rx.borrow_and_update().clone() {
                    return r;
                }
                if ready_rx.changed().await.is_err() {
                    return Err("event loop ended".to_owned());
                }
            }
        })
        .await
        .unwrap_or_else(|_| Err("no answer within 10 s".to_owned()));
        if let Err(reason) = outcome {
            task.abort();
            return Err(FleetError::Connect {
                url: url.to_string(),
                reason,
            });
        }
        Ok(Self {
            client,
            url: url.clone(),
            prefix: prefix.to_owned(),
            devices,
            events,
            sent,
            acked,
            link,
            task,
            signer: None,
            ghosts: Mutex::new(HashMap::new()),
            client_id: client_id.to_owned(),
            refreshes: AtomicU64::new(0),
            refreshing: Arc::default(),
        })
    }

    /// Waits until retained messages stop arriving (`quiet` without one), at
    /// most `max`; live traffic (progress events of a running update) does
    /// not hold it up. Returns `true` when the retained replay ended within
    /// `max`: then [`Fleet::devices`] holds every device the broker
    /// replayed. `false` means the replay was still going (see
    /// [`Fleet::gaps`]).
    pub async fn settle(&self, quiet: Duration, max: Duration) -> bool {
        let start = tokio::time::Instant::now();
        let mut seen = self.link.replayed.load(Ordering::Relaxed);
        let mut since = start;
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = tokio::time::Instant::now();
            let count = self.link.replayed.load(Ordering::Relaxed);
            if count != seen {
                seen = count;
                since = now;
            } else if now - since >= quiet {
                return true;
            }
            if now - start >= max {
                return false;
            }
        }
    }

    /// Whether the broker connection is up (connected and subscribed).
    pub fn connected(&self) -> bool {
        self.link.up.load(Ordering::Relaxed)
    }

    /// Retained messages received since the latest subscription.
    pub fn replayed(&self) -> u64 {
        self.link.replayed.load(Ordering::Relaxed)
    }

    /// Why the current picture of the fleet may be incomplete, one sentence
    /// each; empty when nothing suggests so. `recorded` are the ids the
    /// store knows (the record of every device ever seen): those missing
    /// from the broker's replay are named.
    pub fn gaps(&self, recorded: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        if !self.connected() {
            out.push(
                "the broker is unreachable: this is the last picture seen, not the current one"
                    .to_owned(),
            );
        }
        let devices = self.devices.lock().unwrap();
        let no_status: Vec<&str> = devices
            .values()
            .filter(|d| d.status.is_none())
            .map(|d| d.id.as_str())
            .collect();
        if !no_status.is_empty() {
            out.push(format!(
                "{} device(s) announced availability but no status was received (the broker may have cut its replay): {}",
                no_status.len(),
                sample(&no_status)
            ));
        }
        let missing: Vec<&str> = recorded
            .iter()
            .map(String::as_str)
            .filter(|id| devices.get(*id).is_none_or(|d| d.status.is_none()))
            .collect();
        if !missing.is_empty() {
            out.push(format!(
                "{} device(s) in the store have no retained status on the broker (cleared, or the broker cut its replay): {}",
                missing.len(),
                sample(&missing)
            ));
        }
        out
    }

    /// Every device seen, by id.
    pub fn devices(&self) -> Vec<DeviceView> {
        self.devices.lock().unwrap().values().cloned().collect()
    }

    /// One device, if seen.
    pub fn device(&self, id: &str) -> Option<DeviceView> {
        self.devices.lock().unwrap().get(id).cloned()
    }

    /// Events from now on.
    pub fn events(&self) -> broadcast::Receiver<FleetEvent> {
        self.events.subscribe()
    }

    /// The topic prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Signs every command sent from now on with `signer` (devices built
    /// with a job key refuse unsigned ones).
    pub fn with_signer(mut self, signer: JobSigner) -> Self {
        self.signer = Some(Arc::new(signer));
        self
    }

    /// Whether commands are signed.
    pub fn signs(&self) -> bool {
        self.signer.is_some()
    }

    /// The broker this fleet follows (for a second connection, such as the
    /// log reader's).
    pub fn broker_url(&self) -> &BrokerUrl {
        &self.url
    }

    /// Sends a start command to one device (`{prefix}/{id}/ota/start`, QoS 1).
    pub async fn start(&self, id: &str, cmd: &StartCommand) -> Result<(), FleetError> {
        let topic = command_topic(&self.prefix, id, TopicKind::Start)?;
        let serde_json::Value::Object(fields) =
            serde_json::to_value(cmd).expect("a start command serialises")
        else {
            unreachable!("a start command is an object")
        };
        let payload = self.payload(fields, TopicKind::Start, id)?;
        self.publish(topic, payload).await
    }

    /// Sends `cancel` to one device, for `job` if given.
    pub async fn cancel(&self, id: &str, job: Option<&str>) -> Result<(), FleetError> {
        let topic = command_topic(&self.prefix, id, TopicKind::Cancel)?;
        let payload = self.payload(job_fields(job), TopicKind::Cancel, id)?;
        self.publish(topic, payload).await
    }

    /// Clears device `id`'s retained status and availability on the broker
    /// (empty retained messages), so that no controller learns it again
    /// from the broker's replay. A device that is still alive publishes
    /// them again when it next connects or changes state.
    pub async fn clear_retained(&self, id: &str) -> Result<(), FleetError> {
        self.clear(id, true).await
    }

    /// Clears only device `id`'s retained availability: what a ghost
    /// ([`Fleet::expire_ghosts`]) left. Its status, if one the controller
    /// could not read is retained, is left alone.
    pub async fn clear_availability(&self, id: &str) -> Result<(), FleetError> {
        self.clear(id, false).await
    }

    async fn clear(&self, id: &str, status: bool) -> Result<(), FleetError> {
        // The same id rules as commands: no topic nobody could own.
        command_topic(&self.prefix, id, TopicKind::Cancel)?;
        let topics = Topics::new(&self.prefix, id).expect("checked above");
        let mut clear = vec![topics.availability()];
        if status {
            clear.push(topics.status());
        }
        for topic in clear {
            self.client
                .publish(topic.to_string(), QoS::AtLeastOnce, true, Vec::new())
                .await
                .map_err(|_| FleetError::Closed)?;
            self.sent.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Forgets the ghosts whose time is up at `now`: ids the fleet has
    /// known for `max_age` without ever a status (only an availability was
    /// heard: a device that never got as far as publishing its status, or
    /// a client making ids up). They are removed from the picture (a
    /// [`FleetEvent::Removed`] each) and returned, for the caller to clear
    /// their retained availability ([`Fleet::clear_retained`]). The clock
    /// starts when a sweep first finds an id without status, so call this
    /// regularly, at most `max_age / 2` apart.
    pub fn expire_ghosts(&self, now: std::time::Instant, max_age: Duration) -> Vec<String> {
        let mut devices = self.devices.lock().unwrap();
        let mut ghosts = self.ghosts.lock().unwrap();
        let gone = expired_ghosts(&devices, &mut ghosts, now, max_age);
        for id in &gone {
            devices.remove(id);
        }
        drop((devices, ghosts));
        for id in &gone {
            let _ = self.events.send(FleetEvent::Removed(id.clone()));
        }
        gone
    }

    /// Sends `rollback` to one device, reported under `job` if given.
    pub async fn rollback(&self, id: &str, job: Option<&str>) -> Result<(), FleetError> {
        let topic = command_topic(&self.prefix, id, TopicKind::Rollback)?;
        let payload = self.payload(job_fields(job), TopicKind::Rollback, id)?;
        self.publish(topic, payload).await
    }

    /// The payload of a command: signed with `op`, `seq` and `device` when
    /// there is a signer; else the plain object (empty for a cancel or
    /// rollback without a job, as the original design sends them).
    fn payload(
        &self,
        fields: serde_json::Map<String, serde_json::Value>,
        kind: TopicKind,
        id: &str,
    ) -> Result<Vec<u8>, FleetError> {
        match &self.signer {
            Some(signer) => signer
                .seal(fields, kind, id)
                .map(|(payload, _)| payload)
                .map_err(|e| FleetError::Sign(e.to_string())),
            None if fields.is_empty() => Ok(Vec::new()),
            None => Ok(serde_json::to_vec(&fields).expect("json")),
        }
    }

    async fn publish(&self, topic: String, payload: Vec<u8>) -> Result<(), FleetError> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .map_err(|_| FleetError::Closed)?;
        self.sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Asks the broker for the retained statuses of `ids` again (at most
    /// [`REFRESH_MAX`] of them, the first ones), in the background, unless
    /// the previous refresh is still at work: then returns `false` and
    /// asks nothing (the caller asks again later). In the background, a
    /// second, short-lived connection subscribes to their status topics,
    /// takes in the retained statuses the broker answers with as the
    /// fleet's own subscription would, and disconnects once they stop
    /// coming (300 ms without one, at most 5 s). Its own connection keeps
    /// the fleet's packet ids and queue out of it, and needs no
    /// UNSUBSCRIBE: a rollout asking about thousands of devices on the main
    /// connection ran out of packet ids and lost it.
    ///
    /// For what a burst made the broker drop: Mosquitto drops messages for a
    /// client that does not read as fast as they come ("Outgoing messages
    /// are being dropped"), QoS 0 ones included, so a controller busy with
    /// 10,000 devices can miss the final status of a few. Ids no device can
    /// have are skipped. What the second connection cannot reach is only
    /// logged: the next refresh asks again.
    pub fn refresh(&self, ids: &[String]) -> bool {
        let topics: Vec<String> = ids
            .iter()
            .filter_map(|id| Topics::new(&self.prefix, id).ok())
            .map(|t| t.status().to_string())
            .take(REFRESH_MAX)
            .collect();
        if topics.is_empty() {
            return true;
        }
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return false;
        }
        let busy = self.refreshing.clone();
        let n = self.refreshes.fetch_add(1, Ordering::Relaxed);
        let options = self
            .url
            .mqtt_options(format!("{}-reread-{n}", self.client_id));
        let (client, ev) = AsyncClient::new(options, 16);
        let (prefix, devices, events) = (
            self.prefix.clone(),
            self.devices.clone(),
            self.events.clone(),
        );
        tokio::spawn(async move {
            let asked = topics.len();
            match reread(&client, ev, &topics, &prefix, &devices, &events).await {
                Ok(got) => tracing::debug!("re-read {got} of {asked} device status(es)"),
                Err(e) => tracing::warn!("re-reading {asked} device status(es): {e}"),
            }
            busy.store(false, Ordering::Release);
        });
        true
    }

    /// Waits until the broker acknowledged every command sent so far, at
    /// most `max`.
    pub async fn flush(&self, max: Duration) -> Result<(), FleetError> {
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let sent = self.sent.load(Ordering::Relaxed);
            let acked = self.acked.load(Ordering::Relaxed);
            if acked >= sent {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(FleetError::Unacknowledged(sent - acked));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Flushes, then disconnects politely.
    pub async fn close(self) -> Result<(), FleetError> {
        let flushed = self.flush(Duration::from_secs(10)).await;
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.task.abort();
        flushed
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where a command of `kind` for device `id` goes: built by the core's
/// [`Topics`], the very topics the device subscribes to; an id no device can
/// have is refused rather than published to a topic nobody reads.
fn command_topic(prefix: &str, id: &str, kind: TopicKind) -> Result<String, FleetError> {
    let topics = Topics::new(prefix, id).map_err(|e| match e {
        TopicError::BadPrefix => FleetError::BadPrefix {
            prefix: prefix.to_owned(),
            rule: e.rule().to_string(),
        },
        _ => FleetError::BadDeviceId {
            id: id.to_owned(),
            rule: e.rule().to_string(),
        },
    })?;
    let topic = match kind {
        TopicKind::Start => topics.start_device(),
        TopicKind::Cancel => topics.cancel(),
        TopicKind::Rollback => topics.rollback(),
    };
    Ok(topic.to_string())
}

/// The ghosts of `devices` whose time is up at `now`, without I/O (see
/// [`Fleet::expire_ghosts`]): `first_seen` says since when each id without
/// a status has been seen so; ids that gained a status, or left, are
/// dropped from it, and new ones start their clock at `now`.
pub fn expired_ghosts(
    devices: &BTreeMap<String, DeviceView>,
    first_seen: &mut HashMap<String, std::time::Instant>,
    now: std::time::Instant,
    max_age: Duration,
) -> Vec<String> {
    first_seen.retain(|id, _| devices.get(id).is_some_and(|d| d.status.is_none()));
    let mut gone = Vec::new();
    for d in devices.values().filter(|d| d.status.is_none()) {
        let since = *first_seen.entry(d.id.clone()).or_insert(now);
        if now.saturating_duration_since(since) >= max_age {
            gone.push(d.id.clone());
        }
    }
    for id in &gone {
        first_seen.remove(id);
    }
    gone
}

/// Up to five ids, then how many more.
fn sample(ids: &[&str]) -> String {
    let mut s = ids.iter().take(5).copied().collect::<Vec<_>>().join(", ");
    if ids.len() > 5 {
        s += &format!(" and {} more", ids.len() - 5);
    }
    s
}

fn job_fields(job: Option<&str>) -> serde_json::Map<String, serde_json::Value> {
    let mut fields = serde_json::Map::new();
    if let Some(j) = job {
        fields.insert("job".into(), j.into());
    }
    fields
}

/// [`Fleet::refresh`]'s connection: subscribes to `topics` and hands
/// each status that comes to [`handle_publish`] until none has come for
/// 300 ms after the SUBACK (at most 5 s), then disconnects. Returns how
/// many statuses came.
async fn reread(
    client: &AsyncClient,
    mut ev: EventLoop,
    topics: &[String],
    prefix: &str,
    devices: &Devices,
    events: &broadcast::Sender<FleetEvent>,
) -> Result<usize, String> {
    const QUIET: Duration = Duration::from_millis(300);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    for chunk in topics.chunks(REFRESH_CHUNK) {
        let filters = chunk
            .iter()
            .map(|t| Filter::new(t.clone(), QoS::AtMostOnce));
        client
            .subscribe_many(filters)
            .await
            .map_err(|e| e.to_string())?;
    }
    let chunks = topics.len().div_ceil(REFRESH_CHUNK);
    let (mut acked, mut got) = (0, 0);
    loop {
        let until = if acked == chunks {
            deadline.min(tokio::time::Instant::now() + QUIET)
        } else {
            deadline
        };
        match tokio::time::timeout_at(until, ev.poll()).await {
            // Quiet after every SUBACK, or out of time: done.
            Err(_) => break,
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => acked += 1,
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                got += 1;
                let topic = String::from_utf8_lossy(&p.topic);
                handle_publish(prefix, &topic, &p.payload, devices, events);
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.to_string()),
        }
    }
    let _ = client.try_disconnect();
    // Let the event loop write the DISCONNECT (bounded).
    let _ = tokio::time::timeout(Duration::from_millis(200), ev.poll()).await;
    Ok(got)
}

fn handle_publish(
    prefix: &str,
    topic: &str,
    payload: &[u8],
    devices: &Devices,
    events: &broadcast::Sender<FleetEvent>,
) {
    let Some((id, what)) = parse_device_topic(prefix, topic) else {
        return;
    };
    let view = |d: &mut BTreeMap<String, DeviceView>| -> DeviceView {
        d.get(id).cloned().unwrap_or_else(|| DeviceView {
            id: id.to_owned(),
            status: None,
            online: false,
            online_since: None,
            progress: None,
            ended: Vec::new(),
            in_flight: None,
        })
    };
    match what {
        DeviceTopic::Progress => match serde_json::from_slice::<Progress>(payload) {
            Ok(p) if p.device.as_str() == id => {
                // A progress event never adds a device: only its retained
                // status or availability does, so a client publishing under
                // made-up ids cannot grow the fleet.
                let mut d = devices.lock().unwrap();
                let Some(entry) = d.get_mut(id) else {
                    tracing::debug!("ignoring a progress event of {id}, which has no status");
                    return;
                };
                if p.phase.is_terminal() {
                    if entry.ended.len() == ENDED_KEPT {
                        entry.ended.remove(0);
                    }
                    entry.ended.push(p.clone());
                    // A refusal (`busy`, `duplicate_job`) answers a command,
                    // it does not end the job in flight.
                    let refusal =
                        matches!(p.error, Some(ErrorCode::Busy | ErrorCode::DuplicateJob));
                    if !refusal && entry.in_flight.as_deref() == p.job.as_deref() {
                        entry.in_flight = None;
                    }
                } else {
                    entry.in_flight = p.job.as_ref().map(|j| j.to_string());
                }
                entry.progress = Some(p.clone());
                drop(d);
                let _ = events.send(FleetEvent::Progress(p));
            }
            Ok(p) => tracing::warn!(
                "ignoring a progress event on {topic} that claims to be from {:?}",
                p.device.as_str()
            ),
            Err(e) => tracing::debug!("ignoring a progress event that does not parse: {e}"),
        },
        DeviceTopic::Status if payload.is_empty() => {
            devices.lock().unwrap().remove(id);
            let _ = events.send(FleetEvent::Removed(id.to_owned()));
        }
        DeviceTopic::Status => match serde_json::from_slice::<Status>(payload) {
            Ok(s) if s.device.as_str() == id => {
                let mut d = devices.lock().unwrap();
                let mut entry = view(&mut d);
                entry.status = Some(s.clone());
                d.insert(id.to_owned(), entry);
                drop(d);
                let _ = events.send(FleetEvent::Status(s));
            }
            Ok(s) => tracing::warn!(
                "ignoring a status on {topic} that claims to be from {:?}",
                s.device.as_str()
            ),
            Err(e) => tracing::debug!("ignoring a status of {id} that does not parse: {e}"),
        },
        DeviceTopic::Availability => {
            let online = match payload {
                p if p == ONLINE.as_bytes() => true,
                p if p == OFFLINE.as_bytes() || p.is_empty() => false,
                _ => {
                    tracing::debug!(
                        "ignoring an availability of {id} that is neither online nor offline"
                    );
                    return;
                }
            };
            let mut d = devices.lock().unwrap();
            if payload.is_empty() && !d.contains_key(id) {
                // A cleared availability (a forgotten device or ghost) is
                // no sign of a device.
                return;
            }
            let mut entry = view(&mut d);
            if entry.online != online || entry.online_since.is_none() {
                entry.online_since = Some(now_secs());
            }
            entry.online = online;
            d.insert(id.to_owned(), entry);
            drop(d);
            let _ = events.send(FleetEvent::Availability {
                id: id.to_owned(),
                online,
            });
        }
    }
}

/// The wall clock in seconds since the Unix epoch (0 if it is before it).
fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqota_core::protocol::{parse_command, Command, CommandOutcome};

    #[test]
    fn an_id_without_a_status_is_forgotten_once_it_has_been_one_for_the_max_age() {
        let view = |id: &str, status: bool| DeviceView {
            id: id.into(),
            status: status.then(|| {
                serde_json::from_value(serde_json::json!({
                    "device": id, "chip": "esp32c3", "project": "p",
                    "version": "1.0.0", "slot": 0, "state": "valid", "last": null,
                }))
                .unwrap()
            }),
            online: true,
            online_since: None,
            progress: None,
            ended: Vec::new(),
            in_flight: None,
        };
        let mut devices: BTreeMap<String, DeviceView> = ["real", "ghost", "late"]
            .iter()
            .map(|id| (id.to_string(), view(id, *id == "real")))
            .collect();
        let mut seen = HashMap::new();
        let t0 = std::time::Instant::now();
        let s = Duration::from_secs;
        let age = s(600);
        assert!(expired_ghosts(&devices, &mut seen, t0, age).is_empty());
        assert_eq!(
            seen.len(),
            2,
            "the clock starts for both ids without status"
        );
        // `late` publishes its status before its time is up: no ghost.
        devices.insert("late".into(), view("late", true));
        assert!(expired_ghosts(&devices, &mut seen, t0 + s(599), age).is_empty());
        assert!(!seen.contains_key("late"));
        assert_eq!(
            expired_ghosts(&devices, &mut seen, t0 + s(600), age),
            ["ghost"]
        );
        assert!(seen.is_empty());
        // An id seen first later has its own clock.
        devices.insert("new".into(), view("new", false));
        devices.remove("ghost");
        assert!(expired_ghosts(&devices, &mut seen, t0 + s(700), age).is_empty());
        assert!(expired_ghosts(&devices, &mut seen, t0 + s(1299), age).is_empty());
        assert_eq!(
            expired_ghosts(&devices, &mut seen, t0 + s(1300), age),
            ["new"]
        );
    }

    #[test]
    fn commands_go_to_the_topics_the_device_subscribes_to() {
        let device = Topics::new("plant/line-2", "c3-1").unwrap();
        for kind in [TopicKind::Start, TopicKind::Cancel, TopicKind::Rollback] {
            let topic = command_topic("plant/line-2", "c3-1", kind).unwrap();
            assert_eq!(device.classify(&topic), Some(kind), "{topic}");
        }
        assert_eq!(
            command_topic("plant/line-2", "c3-1", TopicKind::Cancel).unwrap(),
            "plant/line-2/c3-1/ota/cancel"
        );
    }

    #[test]
    fn a_command_for_an_id_no_device_can_have_is_refused() {
        let long = "x".repeat(33);
        for id in ["a/b", "+", "#", "", long.as_str()] {
            let err = command_topic("device", id, TopicKind::Start).unwrap_err();
            assert!(
                matches!(err, FleetError::BadDeviceId { .. }),
                "{id:?}: {err}"
            );
            assert!(err.to_string().contains("at most 32 bytes"), "{err}");
        }
        let err = command_topic("a//b", "c3-1", TopicKind::Rollback).unwrap_err();
        assert!(matches!(err, FleetError::BadPrefix { .. }), "{err}");
    }

    #[test]
    fn the_start_command_is_read_by_the_device_parser_field_for_field() {
        let cmd = StartCommand {
            url: "http://10.0.0.2:8080/firmware/app-1.1.0.bin".into(),
            version: Some("1.1.0".into()),
            sha256: Some("ab".repeat(32)),
            size: Some(262_144),
            job: Some("d-1700000000-42".into()),
            timeout_s: Some(300),
            allow_downgrade: true,
            allow_other_project: false,
        };
        let payload = serde_json::to_vec(&cmd).unwrap();
        match parse_command(TopicKind::Start, &payload, "c3-1") {
            Ok(CommandOutcome::Command(Command::Start(job))) => {
                assert_eq!(job.url.as_str(), cmd.url);
                assert_eq!(job.version.as_deref(), Some("1.1.0"));
                assert_eq!(job.sha256, Some([0xab; 32]));
                assert_eq!(job.size, Some(262_144));
                assert_eq!(job.job.as_deref(), Some("d-1700000000-42"));
                assert_eq!(job.timeout_s, Some(300));
                assert!(job.allow_downgrade && !job.allow_other_project);
            }
            other => panic!("device refused the controller's command: {other:?}"),
        }
    }
}

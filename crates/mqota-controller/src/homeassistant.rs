//! The Home Assistant bridge (`mqota serve --home-assistant`): every device
//! of the fleet view becomes an MQTT `update` entity in Home Assistant, with
//! its installed version, the newest catalogue image for its chip and
//! project, the progress of a running job, and an Install button that starts
//! a deployment through the normal rollout path.
//!
//! It is a surface like the web page: it reads [`Fleet`] and the catalogue,
//! and sends operator commands ([`rollout::create`], then the serve's
//! [`rollout::Runner`]); it holds no rollout logic of its own.
//!
//! # What is published
//!
//! | topic | retained | payload |
//! |---|---|---|
//! | `{discovery}/update/{node}/{object}/config` | yes | [`Discovery`]: per-entity discovery, which every Home Assistant release reads (device-based discovery exists only since 2024.11) |
//! | `{base}/{object}/state` | yes | [`UpdateState`]: `installed_version`, `latest_version`, `title`, `release_summary`, `release_url`, `in_progress`, `update_percentage` |
//! | `{base}/{object}/install` | — | Home Assistant publishes [`PAYLOAD_INSTALL`] here when Install is pressed |
//! | `{base}/bridge` | yes | `online`, or `offline` (the bridge's MQTT will): the second availability of every entity |
//!
//! `{discovery}` is `homeassistant` unless configured, `{node}` defaults to
//! `mqota`, `{base}` to `mqota/homeassistant/{node}`; `{object}` is the device
//! id when it is made of `[A-Za-z0-9_-]` only (what a discovery topic level
//! may hold), else the id with every other character replaced by `_` and
//! eight hex digits of its SHA-256 appended ([`object_id`]).
//!
//! Discovery is sent for a device once its retained status is known, again
//! when what it says changes (a new `sw_version`), again for every device when
//! Home Assistant announces itself on `{discovery}/status` with `online`, and
//! after every reconnect of the bridge. A device whose status is cleared gets
//! an empty retained config, which removes its entity. An entity is
//! available while both the device's own `{prefix}/{id}/availability` and the
//! bridge say `online` (`availability_mode: all`): a stopped `serve` shows
//! every entity unavailable rather than a stale version.
//!
//! # Home Assistant's schema
//!
//! One invalid field makes Home Assistant drop the whole message (discovery
//! or state), so both are serde structs with exactly the fields of its MQTT
//! update platform, and device-supplied strings can only ever be JSON string
//! values: a device id of `x","command_topic":"…` stays one odd name. The
//! state follows the current schema (strings must not be `null`: a value not
//! known is left out; `update_percentage` is 0–100 or `null`); releases
//! before 2024.11 ignore `in_progress` and `update_percentage` and read the
//! rest (seen with Home Assistant 2024.3.3). `tests/homeassistant_schema.rs` checks the payloads against that
//! schema, written down as data.
//!
//! Strings shown in Home Assistant's frontend have control characters and
//! bidi overrides replaced ([`plain_text`]); `release_summary` is rendered
//! there as Markdown, so every string in it that is not the bridge's own
//! (image names, the device's chip and project, its last result and error
//! code) is escaped ([`markdown_text`]): a version or name such as
//! `![x](http://…)` stays text and loads nothing.
//!
//! # Install
//!
//! A press is refused (and logged, and shown in `release_summary` for a
//! minute or until the device changes version) when the device is unknown,
//! offline, already in a running deployment or running a job, already on
//! the newest image, or when no image is newer. Otherwise it is a deployment
//! of that one device to the newest image, made by [`rollout::create`] with
//! the bridge's [`RolloutOptions`] and run by serve's runner, exactly as a
//! deployment from the page: it shows in the page, the API and
//! `mqota deploy --resume`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use mqota_core::protocol::{ErrorCode, Phase};
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, mpsc};

use crate::catalogue::{Catalogue, FirmwareEntry};
use crate::fleet::{DeviceView, Fleet, FleetEvent};
use crate::rollout::{self, RolloutOptions, Selection};
use crate::store::{DeviceState, Store};
use crate::url::BrokerUrl;

/// Home Assistant's default discovery prefix.
pub const DEFAULT_DISCOVERY_PREFIX: &str = "homeassistant";
/// The default node id: the level between `update` and the object id in
/// discovery topics.
pub const DEFAULT_NODE_ID: &str = "mqota";
/// What Home Assistant publishes on the command topic when Install is
/// pressed (set explicitly in the discovery: releases before 2024.11 have
/// no default for it).
pub const PAYLOAD_INSTALL: &str = "install";
/// Home Assistant's birth message on `{discovery}/status`.
pub const BIRTH: &str = "online";
/// Availability payloads, the same as the devices' own.
pub const ONLINE: &str = mqota_core::protocol::ONLINE;
/// See [`ONLINE`].
pub const OFFLINE: &str = mqota_core::protocol::OFFLINE;
/// Home Assistant cuts `release_summary` at 255 characters; the bridge cuts
/// it first, at a character boundary.
pub const MAX_SUMMARY_CHARS: usize = 255;
/// How often state changes are published: progress events of a fleet are
/// coalesced to at most this rate per device.
pub const FLUSH_EVERY: Duration = Duration::from_millis(250);
/// How long a refused Install stays in the entity's `release_summary` (it
/// goes at once when the device's version changes).
pub const NOTICE_FOR: Duration = Duration::from_secs(60);
/// How often the firmware directory is read again for new images (it is
/// also read at every Install press).
pub const CATALOGUE_EVERY: Duration = Duration::from_secs(5);

/// What the bridge is told by `serve`.
#[derive(Debug, Clone)]
pub struct HaConfig {
    /// Home Assistant's discovery prefix (`homeassistant`).
    pub discovery_prefix: String,
    /// The node id level of the discovery topics; `[A-Za-z0-9_-]+`.
    pub node_id: String,
    /// Where state and command topics live: `{base}/{object}/state`,
    /// `{base}/{object}/install`, and the bridge's availability
    /// `{base}/bridge`.
    pub topic_base: String,
    /// The fleet's topic prefix (`device`): the entities' availability is
    /// the devices' `{prefix}/{id}/availability`.
    pub fleet_prefix: String,
    /// The base URL devices download firmware from (`--public-url`, or the
    /// address serve listens on): `{base}/firmware/NAME`; also the
    /// entities' `release_url` and the devices' `configuration_url`
    /// (`{base}/`). `None`: Install is refused (no URL a device can use).
    pub public_url: Option<String>,
    /// How an Install press deploys (canary, timeout, ...).
    pub rollout: RolloutOptions,
}

/// Why a [`HaConfig`] cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum HaConfigError {
    /// The node id is not one discovery topic level: use letters, digits,
    /// `_` and `-`.
    #[error("Home Assistant node id {0:?} must be letters, digits, _ and - only")]
    NodeId(String),
    /// A prefix or base is not a topic to publish under: no wildcards, no
    /// empty levels, no control characters.
    #[error("{what} {value:?} is not a usable MQTT topic prefix")]
    Topic {
        /// Which setting.
        what: &'static str,
        /// Its value.
        value: String,
    },
}

impl HaConfig {
    /// The defaults for a fleet under `fleet_prefix` whose firmware is
    /// downloaded from `public_url`.
    pub fn new(fleet_prefix: &str, public_url: Option<String>) -> Self {
        Self {
            discovery_prefix: DEFAULT_DISCOVERY_PREFIX.to_owned(),
            node_id: DEFAULT_NODE_ID.to_owned(),
            topic_base: format!("mqota/homeassistant/{DEFAULT_NODE_ID}"),
            fleet_prefix: fleet_prefix.to_owned(),
            public_url: public_url.map(|u| u.trim_end_matches('/').to_owned()),
            rollout: RolloutOptions::default(),
        }
    }

    /// Checks the topic settings.
    pub fn validate(&self) -> Result<(), HaConfigError> {
        if !is_topic_level(&self.node_id) {
            return Err(HaConfigError::NodeId(self.node_id.clone()));
        }
        for (what, value) in [
            ("discovery prefix", &self.discovery_prefix),
            ("topic base", &self.topic_base),
        ] {
            let ok = !value.is_empty()
                && value.split('/').all(|l| !l.is_empty())
                && !value.contains(['+', '#'])
                && ha_topic_ok(value);
            if !ok {
                return Err(HaConfigError::Topic {
                    what,
                    value: value.clone(),
                });
            }
        }
        Ok(())
    }

    /// `{discovery}/status`, where Home Assistant announces itself.
    pub fn birth_topic(&self) -> String {
        format!("{}/status", self.discovery_prefix)
    }

    /// `{base}/bridge`: the bridge's own availability.
    pub fn bridge_topic(&self) -> String {
        format!("{}/bridge", self.topic_base)
    }

    /// The discovery topic of `object`.
    pub fn config_topic(&self, object: &str) -> String {
        format!(
            "{}/update/{}/{object}/config",
            self.discovery_prefix, self.node_id
        )
    }

    /// The state topic of `object`.
    pub fn state_topic(&self, object: &str) -> String {
        format!("{}/{object}/state", self.topic_base)
    }

    /// The command topic of `object`.
    pub fn command_topic(&self, object: &str) -> String {
        format!("{}/{object}/install", self.topic_base)
    }

    /// The object id a command topic names, if it is one of the bridge's.
    pub fn object_of_command<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let rest = topic.strip_prefix(&self.topic_base)?.strip_prefix('/')?;
        let object = rest.strip_suffix("/install")?;
        is_topic_level(object).then_some(object)
    }

    fn page_url(&self) -> Option<String> {
        self.public_url.as_ref().map(|u| format!("{u}/"))
    }
}

/// Whether `s` can be one level of a discovery topic (`node_id`,
/// `object_id`): Home Assistant reads those levels as `[a-zA-Z0-9_-]+`.
fn is_topic_level(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whether Home Assistant takes `topic` as a topic: it refuses any with a
/// NUL, a C0 or C1 control character, or a Unicode non-character, and then
/// drops the whole discovery message that names it.
pub fn ha_topic_ok(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= 65535
        && topic.chars().all(|c| {
            let n = c as u32;
            !(n <= 0x1f
                || (0x7f..=0x9f).contains(&n)
                || (0xfdd0..=0xfdef).contains(&n)
                || (n & 0xfffe) == 0xfffe)
        })
}

/// The object id of device `id` (see the module docs): the id itself when it
/// is a valid topic level, else a sanitised id with a hash, so two ids that
/// differ only in such characters stay two entities.
pub fn object_id(id: &str) -> String {
    if is_topic_level(id) {
        return id.to_owned();
    }
    let clean: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let hash = Sha256::digest(id.as_bytes());
    format!("{clean}_{}", hex::encode(&hash[..4]))
}

/// `s` with control characters, bidi overrides and isolates (and the marks
/// that steer them) replaced by U+FFFD, for strings Home Assistant shows as
/// text.
pub fn plain_text(s: &str) -> String {
    s.chars()
        .map(|c| {
            let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{061c}')
                || ('\u{202a}'..='\u{202e}').contains(&c)
                || ('\u{2066}'..='\u{2069}').contains(&c);
            if c.is_control() || bidi {
                '\u{fffd}'
            } else {
                c
            }
        })
        .collect()
}

/// [`plain_text`] with Markdown's punctuation escaped, for text inside
/// `release_summary` (which Home Assistant renders as Markdown): a version
/// such as `![x](http://…)` stays text and loads nothing.
pub fn markdown_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in plain_text(s).chars() {
        if c.is_ascii_punctuation() {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The discovery message of one device's `update` entity: Home Assistant's
/// MQTT update platform, full key names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Discovery {
    /// The entity's name within its device.
    pub name: &'static str,
    /// Stable across restarts: `mqota_{node}_{object}`.
    pub unique_id: String,
    /// `firmware`.
    pub device_class: &'static str,
    /// `config`: where Home Assistant puts update entities.
    pub entity_category: &'static str,
    /// Where the [`UpdateState`] is.
    pub state_topic: String,
    /// Where Install is published.
    pub command_topic: String,
    /// What Install publishes ([`PAYLOAD_INSTALL`]).
    pub payload_install: &'static str,
    /// The device's availability and the bridge's.
    pub availability: Vec<Availability>,
    /// `all`: available only while both say `online`.
    pub availability_mode: &'static str,
    /// QoS of the subscriptions and of Install.
    pub qos: u8,
    /// Install is never retained (a retained command would run again).
    pub retain: bool,
    /// The device in Home Assistant's device registry.
    pub device: DeviceBlock,
    /// Who made this discovery message.
    pub origin: Origin,
}

/// One availability topic of an entity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Availability {
    /// The topic.
    pub topic: String,
    /// `online`.
    pub payload_available: &'static str,
    /// `offline`.
    pub payload_not_available: &'static str,
}

/// The `device` block: one Home Assistant device per mqota device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceBlock {
    /// `mqota_{node}_{device id}`.
    pub identifiers: Vec<String>,
    /// The device id.
    pub name: String,
    /// The chip, e.g. `esp32c3`.
    pub model: String,
    /// The running firmware: `{project} {version}`.
    pub sw_version: String,
    /// serve's page, when its URL is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub configuration_url: Option<String>,
}

/// The `origin` block: mqota and its version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Origin {
    /// `mqota`.
    pub name: &'static str,
    /// This build's version.
    pub sw_version: &'static str,
}

/// What the state topic carries: the JSON Home Assistant's update entity
/// reads. Strings are never `null` (Home Assistant would drop the whole
/// message); a value not known is left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpdateState {
    /// The version the device runs.
    pub installed_version: String,
    /// The newest catalogue image for its chip and project, or the
    /// installed version when there is none newer (Home Assistant then
    /// shows it up to date).
    pub latest_version: String,
    /// `{project} {latest_version}`.
    pub title: String,
    /// Markdown: the image offered, the last result, a refused Install.
    pub release_summary: String,
    /// serve's page, when its URL is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release_url: Option<String>,
    /// A job runs on the device, or an Install was accepted and its job not
    /// yet reported.
    pub in_progress: bool,
    /// 0–100 while the job's progress is known, else `null`.
    pub update_percentage: Option<u8>,
}

/// The newest valid image of `chip` and `project` in `catalogue` (semver
/// order, as devices apply it; images whose versions cannot be compared with
/// the newest so far are passed over).
pub fn newest_for<'a>(
    catalogue: &'a [FirmwareEntry],
    chip: &str,
    project: &str,
) -> Option<&'a FirmwareEntry> {
    let mut best: Option<&FirmwareEntry> = None;
    let mut candidates: Vec<&FirmwareEntry> = catalogue
        .iter()
        .filter(|f| {
            f.is_valid()
                && f.version.is_some()
                && f.chip.as_deref() == Some(chip)
                && f.project.as_deref() == Some(project)
        })
        .collect();
    candidates.sort_by(|a, b| a.name.cmp(&b.name));
    for f in candidates {
        let v = f.version.as_deref().unwrap_or_default();
        best = match best {
            None => Some(f),
            Some(b) => match mqota_core::version::compare(v, b.version.as_deref().unwrap_or("")) {
                Some(std::cmp::Ordering::Greater) => Some(f),
                _ => Some(b),
            },
        };
    }
    best
}

/// The image to offer a device running `installed`: the newest for its chip
/// and project, if that is newer than what it runs.
pub fn offer<'a>(
    catalogue: &'a [FirmwareEntry],
    chip: &str,
    project: &str,
    installed: &str,
) -> Option<&'a FirmwareEntry> {
    newest_for(catalogue, chip, project).filter(|f| {
        let v = f.version.as_deref().unwrap_or_default();
        !mqota_core::version::same_release(v, installed)
            && mqota_core::version::compare(v, installed) == Some(std::cmp::Ordering::Greater)
    })
}

/// Whether a job runs on the device, and how far it is, as far as the
/// fleet saw: `(in_progress, update_percentage)`. `accepted` is 0 %, the
/// download its own percentage, and checking, rebooting and confirming the
/// new image 100 % (the bytes are all there; the job has not ended).
pub fn job_progress(view: &DeviceView) -> (bool, Option<u8>) {
    let Some(job) = view.in_flight.as_deref() else {
        return (false, None);
    };
    let Some(p) = view
        .progress
        .as_ref()
        .filter(|p| p.job.as_deref() == Some(job))
    else {
        return (true, None);
    };
    let pct = match p.phase {
        Phase::Accepted => Some(0),
        Phase::Downloading => Some(p.percent.min(100)),
        Phase::Verifying | Phase::Rebooting | Phase::Confirming => Some(100),
        Phase::Done | Phase::Failed | Phase::RolledBack | Phase::Cancelled => None,
    };
    (true, pct)
}

/// The entity of one device: its object id, discovery and state. `None` for a
/// device without a retained status (its versions are not known) or whose
/// availability topic Home Assistant would refuse.
pub fn entity(
    cfg: &HaConfig,
    view: &DeviceView,
    catalogue: &[FirmwareEntry],
    pending: bool,
    notice: Option<&str>,
) -> Option<(String, Discovery, UpdateState)> {
    let status = view.status.as_ref()?;
    let availability = format!("{}/{}/availability", cfg.fleet_prefix, view.id);
    // The fleet only knows ids that are one topic level; a caller's view
    // may not be one.
    if view.id.contains(['/', '+', '#']) || !ha_topic_ok(&availability) {
        return None;
    }
    let object = object_id(&view.id);
    let installed = plain_text(status.version.as_str());
    let project = status.project.as_str();
    let chip = status.chip.as_str();
    let offered = offer(catalogue, chip, project, status.version.as_str());
    let discovery = Discovery {
        name: "Firmware",
        unique_id: format!("mqota_{}_{object}", cfg.node_id),
        device_class: "firmware",
        entity_category: "config",
        state_topic: cfg.state_topic(&object),
        command_topic: cfg.command_topic(&object),
        payload_install: PAYLOAD_INSTALL,
        availability: vec![
            Availability {
                topic: availability,
                payload_available: ONLINE,
                payload_not_available: OFFLINE,
            },
            Availability {
                topic: cfg.bridge_topic(),
                payload_available: ONLINE,
                payload_not_available: OFFLINE,
            },
        ],
        availability_mode: "all",
        qos: 1,
        retain: false,
        device: DeviceBlock {
            identifiers: vec![format!("mqota_{}_{}", cfg.node_id, view.id)],
            name: plain_text(&view.id),
            model: plain_text(chip),
            sw_version: plain_text(&format!("{project} {}", status.version.as_str())),
            configuration_url: cfg.page_url(),
        },
        origin: Origin {
            name: "mqota",
            sw_version: env!("CARGO_PKG_VERSION"),
        },
    };
    let (running, mut pct) = job_progress(view);
    let in_progress = running || pending;
    if !in_progress {
        pct = None;
    }
    let latest = offered
        .and_then(|f| f.version.as_deref())
        .map(plain_text)
        .unwrap_or_else(|| installed.clone());
    let mut summary = match offered {
        Some(f) => format!(
            "**{}** for {}: {} bytes, {}.",
            markdown_text(&f.name),
            markdown_text(chip),
            f.size,
            match f.signers.as_deref() {
                Some([]) => "unsigned",
                Some(_) => "signed",
                None => "signature not checked",
            }
        ),
        None => format!(
            "No newer image for {} / {} in the catalogue.",
            markdown_text(chip),
            markdown_text(project)
        ),
    };
    if let Some(last) = &status.last {
        if last.result != Phase::Done {
            summary += &format!(" Last job: {}", markdown_text(last.result.as_str()));
            if let Some(e) = last.error {
                summary += &format!(" ({})", error_name(e));
            }
            summary += ".";
        }
    }
    if let Some(n) = notice {
        summary += &format!(" {}", markdown_text(n));
    }
    let state = UpdateState {
        installed_version: installed,
        title: plain_text(&format!("{project} {latest}")),
        latest_version: latest,
        release_summary: cut(&summary, MAX_SUMMARY_CHARS),
        release_url: cfg.page_url(),
        in_progress,
        update_percentage: pct,
    };
    Some((object, discovery, state))
}

fn error_name(e: ErrorCode) -> String {
    markdown_text(e.as_str())
}

/// At most `max` characters of `s`; a cut string ends with `…`.
fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max - 1).collect();
    // Never end on a lone escaping backslash.
    if out.ends_with('\\') {
        out.pop();
    }
    out.push('…');
    out
}

/// Why an Install press was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The command topic names no device the bridge announced.
    #[error("no device has this entity")]
    UnknownEntity,
    /// The device has no retained status (its version is not known).
    #[error("its status is not known")]
    NoStatus,
    /// The device is offline: its job would wait for the timeout.
    #[error("the device is offline")]
    Offline,
    /// The device is in a running deployment, or runs a job.
    #[error("the device is busy: {0}")]
    Busy(String),
    /// No image newer than what it runs.
    #[error("already on the newest image ({0})")]
    UpToDate(String),
    /// serve does not know a URL devices can download from.
    #[error("no firmware URL: start serve with --public-url")]
    NoUrl,
    /// The newest image cannot be deployed, or the rollout refused.
    #[error("{0}")]
    Rollout(String),
}

/// What an Install press for `view` deploys, or why it is refused (no I/O:
/// `running` are the devices of running deployments, by device).
pub fn install_target<'a>(
    view: Option<&DeviceView>,
    catalogue: &'a [FirmwareEntry],
    running: &HashMap<String, String>,
) -> Result<&'a FirmwareEntry, Refusal> {
    let view = view.ok_or(Refusal::UnknownEntity)?;
    let status = view.status.as_ref().ok_or(Refusal::NoStatus)?;
    if let Some(dep) = running.get(&view.id) {
        return Err(Refusal::Busy(format!("in running deployment {dep}")));
    }
    if let Some(job) = &view.in_flight {
        return Err(Refusal::Busy(format!("job {job} is running")));
    }
    if !view.online {
        return Err(Refusal::Offline);
    }
    offer(
        catalogue,
        status.chip.as_str(),
        status.project.as_str(),
        status.version.as_str(),
    )
    .ok_or_else(|| Refusal::UpToDate(status.version.to_string()))
}

/// The bridge, running; [`Bridge::stop`] (or dropping it) ends it.
pub struct Bridge {
    task: tokio::task::JoinHandle<()>,
    poller: tokio::task::JoinHandle<()>,
    client: AsyncClient,
    bridge_topic: String,
}

impl Bridge {
    /// Publishes the bridge's `offline` (every entity becomes unavailable)
    /// and disconnects.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self
            .client
            .publish(self.bridge_topic.clone(), QoS::AtLeastOnce, true, OFFLINE)
            .await;
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.poller.abort();
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.task.abort();
        self.poller.abort();
    }
}

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BridgeError {
    /// A setting is unusable: fix it.
    #[error(transparent)]
    Config(#[from] HaConfigError),
    /// The broker refused the bridge's connection or did not answer.
    #[error("Home Assistant bridge: cannot connect to the broker at {url}: {reason}")]
    Connect {
        /// The broker, without password.
        url: String,
        /// Why.
        reason: String,
    },
}

/// What the MQTT task hands the bridge.
enum Incoming {
    Connected,
    Publish { topic: String, payload: Vec<u8> },
}

/// Connects to the broker at `url` as `client_id` (with the bridge's will),
/// and starts publishing the fleet of `fleet` for Home Assistant; Install
/// presses become deployments in `store`, run by `runner`. Returns once the
/// broker accepted the connection.
pub async fn start(
    cfg: HaConfig,
    url: &BrokerUrl,
    client_id: &str,
    fleet: Arc<Fleet>,
    store: Arc<Store>,
    catalogue: Catalogue,
    runner: rollout::Runner,
) -> Result<Bridge, BridgeError> {
    cfg.validate()?;
    let mut o = url.mqtt_options(client_id);
    o.set_last_will(LastWill::new(
        cfg.bridge_topic(),
        OFFLINE,
        QoS::AtLeastOnce,
        true,
        None,
    ));
    let (client, mut ev) = AsyncClient::new(o, 1024);
    let (tx, rx) = mpsc::channel::<Incoming>(1024);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
    let subscribe = [cfg.birth_topic(), format!("{}/+/install", cfg.topic_base)];
    let poller = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        for t in &subscribe {
                            let _ = client.try_subscribe(t.clone(), QoS::AtLeastOnce);
                        }
                        if let Some(r) = ready.take() {
                            let _ = r.send(Ok(()));
                        }
                        if tx.send(Incoming::Connected).await.is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let topic = String::from_utf8_lossy(&p.topic).into_owned();
                        let msg = Incoming::Publish {
                            topic,
                            payload: p.payload.to_vec(),
                        };
                        if tx.send(msg).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(Err(e.to_string()));
                            return;
                        }
                        tracing::warn!("Home Assistant bridge: broker connection lost: {e}");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        })
    };
    let connected = tokio::time::timeout(Duration::from_secs(10), ready_rx)
        .await
        .map_err(|_| "no answer within 10 s".to_owned())
        .and_then(|r| r.map_err(|_| "the connection ended".to_owned()))
        .and_then(|r| r);
    if let Err(reason) = connected {
        poller.abort();
        return Err(BridgeError::Connect {
            url: url.to_string(),
            reason,
        });
    }
    let events = fleet.events();
    let bridge_topic = cfg.bridge_topic();
    let state = BridgeState {
        cfg,
        client: client.clone(),
        fleet,
        store,
        catalogue: Arc::new(catalogue),
        runner,
        images: Vec::new(),
        published: HashMap::new(),
        objects: HashMap::new(),
        dirty: BTreeSet::new(),
        pending: HashMap::new(),
        notices: HashMap::new(),
    };
    let task = tokio::spawn(state.run(rx, events));
    Ok(Bridge {
        task,
        poller,
        client,
        bridge_topic,
    })
}

/// A refused Install, shown in `release_summary` for [`NOTICE_FOR`] or
/// until the device's version changes.
struct Notice {
    text: String,
    version: String,
    at: tokio::time::Instant,
}

impl Notice {
    /// Whether it still shows, at `now`, for a device running `version`.
    fn shows(&self, now: tokio::time::Instant, version: &str) -> bool {
        self.version == version && now.duration_since(self.at) < NOTICE_FOR
    }
}

/// What was last published for a device.
struct Published {
    object: String,
    config: Vec<u8>,
    state: Vec<u8>,
}

struct BridgeState {
    cfg: HaConfig,
    client: AsyncClient,
    fleet: Arc<Fleet>,
    store: Arc<Store>,
    catalogue: Arc<Catalogue>,
    runner: rollout::Runner,
    /// The firmware directory as last read.
    images: Vec<FirmwareEntry>,
    /// By device id.
    published: HashMap<String, Published>,
    /// Object id -> device id, for command topics (and collisions).
    objects: HashMap<String, String>,
    /// Devices whose entity may have changed since the last flush.
    dirty: BTreeSet<String>,
    /// Installs accepted here: device -> deployment, until the device's
    /// result is in (`in_progress` before the device says anything).
    pending: HashMap<String, String>,
    /// The last refused Install of a device: what to say, the version it
    /// ran then, and when.
    notices: HashMap<String, Notice>,
}

impl BridgeState {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Incoming>,
        mut events: broadcast::Receiver<FleetEvent>,
    ) {
        self.rescan().await;
        let mut flush = tokio::time::interval(FLUSH_EVERY);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rescan = tokio::time::interval(CATALOGUE_EVERY);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    None => return,
                    Some(Incoming::Connected) => {
                        self.publish(self.cfg.bridge_topic(), ONLINE.as_bytes().to_vec(), true).await;
                        // A broker restarted without persistence lost every
                        // retained config: announce everything again.
                        self.announce_all();
                    }
                    Some(Incoming::Publish { topic, payload }) => {
                        if topic == self.cfg.birth_topic() {
                            if payload == BIRTH.as_bytes() {
                                tracing::info!("Home Assistant is online: announcing every device again");
                                self.announce_all();
                                self.flush().await;
                            }
                        } else if let Some(object) = self.cfg.object_of_command(&topic) {
                            let object = object.to_owned();
                            self.install(&object, &payload).await;
                        }
                    }
                },
                ev = events.recv() => match ev {
                    Ok(FleetEvent::Status(s)) => { self.dirty.insert(s.device.to_string()); }
                    Ok(FleetEvent::Progress(p)) => { self.dirty.insert(p.device.to_string()); }
                    Ok(FleetEvent::Availability { id, .. }) => { self.dirty.insert(id); }
                    Ok(FleetEvent::Removed(id)) => self.remove(&id).await,
                    Err(broadcast::error::RecvError::Lagged(_)) => self.mark_all(),
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = flush.tick() => self.flush().await,
                _ = rescan.tick() => {
                    if self.rescan().await {
                        self.mark_all();
                    }
                }
            }
        }
    }

    /// Forgets what was published, so the next flush sends every config
    /// and state again.
    fn announce_all(&mut self) {
        for p in self.published.values_mut() {
            p.config.clear();
            p.state.clear();
        }
        self.mark_all();
    }

    fn mark_all(&mut self) {
        self.dirty
            .extend(self.fleet.devices().into_iter().map(|d| d.id));
    }

    /// Reads the firmware directory; returns whether it changed.
    async fn rescan(&mut self) -> bool {
        let cat = self.catalogue.clone();
        match tokio::task::spawn_blocking(move || cat.scan()).await {
            Ok(Ok(list)) => {
                let list: Vec<FirmwareEntry> = list.into_iter().filter(|f| f.is_valid()).collect();
                let changed = list != self.images;
                self.images = list;
                changed
            }
            Ok(Err(e)) => {
                tracing::warn!(
                    "Home Assistant bridge: reading {}: {e}",
                    self.catalogue.dir().display()
                );
                false
            }
            Err(_) => false,
        }
    }

    async fn publish(&self, topic: String, payload: Vec<u8>, retain: bool) {
        if let Err(e) = self
            .client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
        {
            tracing::warn!("Home Assistant bridge: cannot publish: {e}");
        }
    }

    async fn remove(&mut self, id: &str) {
        self.dirty.remove(id);
        if let Some(p) = self.published.remove(id) {
            self.objects.remove(&p.object);
            self.publish(self.cfg.config_topic(&p.object), Vec::new(), true)
                .await;
            self.publish(self.cfg.state_topic(&p.object), Vec::new(), true)
                .await;
        }
    }

    /// Publishes what changed for the dirty devices.
    async fn flush(&mut self) {
        let now = tokio::time::Instant::now();
        let expired: Vec<String> = self
            .notices
            .iter()
            .filter(|(_, n)| now.duration_since(n.at) >= NOTICE_FOR)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            self.notices.remove(&id);
            self.dirty.insert(id);
        }
        if self.dirty.is_empty() && self.pending.is_empty() {
            return;
        }
        self.settle_pending();
        let mut ids = std::mem::take(&mut self.dirty);
        ids.extend(self.pending.keys().cloned());
        for id in ids {
            let Some(view) = self.fleet.device(&id) else {
                self.remove(&id).await;
                continue;
            };
            let version = view
                .status
                .as_ref()
                .map(|s| s.version.to_string())
                .unwrap_or_default();
            if self
                .notices
                .get(&id)
                .is_some_and(|n| !n.shows(now, &version))
            {
                self.notices.remove(&id);
            }
            let notice = self.notices.get(&id).map(|n| n.text.as_str());
            let pending = self.pending.contains_key(&id);
            let Some((object, discovery, state)) =
                entity(&self.cfg, &view, &self.images, pending, notice)
            else {
                if view.status.is_some() {
                    tracing::warn!(
                        "Home Assistant bridge: device {:?} cannot be an entity: Home Assistant refuses its availability topic",
                        plain_text(&id)
                    );
                }
                continue;
            };
            match self.objects.get(&object) {
                Some(other) if *other != id => {
                    tracing::warn!(
                        "Home Assistant bridge: devices {:?} and {:?} map to one entity ({object}); only the first is published",
                        plain_text(other),
                        plain_text(&id)
                    );
                    continue;
                }
                _ => {
                    self.objects.insert(object.clone(), id.clone());
                }
            }
            let config = serde_json::to_vec(&discovery).expect("discovery serialises");
            let state = serde_json::to_vec(&state).expect("state serialises");
            let entry = self.published.entry(id.clone()).or_insert(Published {
                object: object.clone(),
                config: Vec::new(),
                state: Vec::new(),
            });
            let send_config = entry.config != config;
            let send_state = send_config || entry.state != state;
            entry.config = config.clone();
            entry.state = state.clone();
            // Config first: Home Assistant subscribes to the state topic
            // when it reads the config, and the state is retained.
            if send_config {
                self.publish(self.cfg.config_topic(&object), config, true)
                    .await;
            }
            if send_state {
                self.publish(self.cfg.state_topic(&object), state, true)
                    .await;
            }
        }
    }

    /// Drops the accepted installs whose device has a result.
    fn settle_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let store = self.store.clone();
        self.pending
            .retain(|device, dep| match store.deployment(dep) {
                Ok(d) => {
                    !d.state.is_final()
                        && d.devices.iter().any(|x| {
                            x.device == *device
                                && matches!(x.state, DeviceState::Pending | DeviceState::Sent)
                        })
                }
                Err(_) => false,
            });
    }

    async fn install(&mut self, object: &str, payload: &[u8]) {
        if payload != PAYLOAD_INSTALL.as_bytes() {
            tracing::warn!(
                "Home Assistant bridge: ignoring a command for {object} that is not {PAYLOAD_INSTALL:?}"
            );
            return;
        }
        let Some(id) = self.objects.get(object).cloned() else {
            tracing::warn!("Home Assistant bridge: Install for {object}, which no device has");
            return;
        };
        let result = self.try_install(&id).await;
        let version = self
            .fleet
            .device(&id)
            .and_then(|v| v.status.map(|s| s.version.to_string()))
            .unwrap_or_default();
        match result {
            Ok((dep, version_to)) => {
                tracing::info!(
                    "Home Assistant: Install on {} started deployment {dep} of {version_to}",
                    plain_text(&id)
                );
                println!(
                    "home assistant: install on {} -> deployment {dep} ({version_to})",
                    plain_text(&id)
                );
                self.notices.remove(&id);
                self.pending.insert(id.clone(), dep);
            }
            Err(why) => {
                tracing::warn!(
                    "Home Assistant: Install on {} refused: {why}",
                    plain_text(&id)
                );
                println!(
                    "home assistant: install on {} refused: {why}",
                    plain_text(&id)
                );
                self.notices.insert(
                    id.clone(),
                    Notice {
                        text: format!("Install refused: {why}."),
                        version,
                        at: tokio::time::Instant::now(),
                    },
                );
            }
        }
        self.dirty.insert(id);
        self.flush().await;
    }

    /// Starts the deployment of an Install press: `(deployment id, version)`.
    async fn try_install(&mut self, id: &str) -> Result<(String, String), Refusal> {
        self.rescan().await;
        let store = self.store.clone();
        let running = tokio::task::spawn_blocking(move || store.devices_in_running_deployments())
            .await
            .map_err(|e| Refusal::Rollout(e.to_string()))?
            .map_err(|e| Refusal::Rollout(e.to_string()))?;
        let view = self.fleet.device(id);
        let image = install_target(view.as_ref(), &self.images, &running)?.clone();
        let base = self.cfg.public_url.clone().ok_or(Refusal::NoUrl)?;
        let listed = image.listed_under(&base);
        let firmware = crate::catalogue::deployable(&listed.name, &listed)
            .map_err(|e| Refusal::Rollout(e.to_string()))?;
        let version = firmware.version.clone();
        let devices = self.fleet.devices();
        let store = self.store.clone();
        let options = self.cfg.rollout.clone();
        let selection = Selection::Ids(vec![id.to_owned()]);
        let (dep, _left_out) = tokio::task::spawn_blocking(move || {
            rollout::create(&store, &devices, &firmware, &selection, &options)
        })
        .await
        .map_err(|e| Refusal::Rollout(e.to_string()))?
        .map_err(|e| Refusal::Rollout(e.to_string()))?;
        if !self.runner.run(&dep.id) {
            return Err(Refusal::Rollout(format!(
                "deployment {} is stored but serve cannot run it: `mqota deploy --resume {}`",
                dep.id, dep.id
            )));
        }
        Ok((dep.id, version))
    }
}

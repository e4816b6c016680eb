//! Staged rollouts: choose devices, send the job to a canary group first and
//! then in batches, wait for each stage's results, stop when failures pass
//! the threshold, and (optionally) roll back the devices that had already
//! updated.
//!
//! Every step is written to the [`Store`] before the next one starts, and
//! [`run`] starts from whatever the store says. So the very same function
//! carries out a new deployment and resumes one whose controller was stopped:
//! devices already finished keep their result, devices whose job was sent
//! are watched again (their retained status says how a job ended while no
//! controller listened: `last.job` is the deployment id), and the stages not
//! yet sent follow.
//!
//! A firmware served from an `https://` URL is offered only to devices whose
//! status says `"https": true`; the others (and devices too old to say) are
//! left out, with the reason, rather than sent a job they would refuse.
//!
//! Before anything is sent, each selected device is checked against the
//! image: its chip must be the image's; the image must be of the project it
//! runs (unless `allow_other_project`) and not older than its version
//! (semver, build suffix ignored; unless `allow_downgrade`); and it must be
//! online (unless `include_offline`: `--to` an offline device is refused,
//! `--all`/`--where` leave offline devices out and say how many).
//!
//! A device's job ends with the first of: a terminal progress event of the
//! deployment's job id other than `done` (its last [`crate::fleet::ENDED_KEPT`]
//! terminal events are kept, so a later event never hides it); a retained
//! status whose `last.job` is that id and, for `done`, whose version is the
//! new one; or the per-device timeout (the device is then sent `cancel`).
//! Only the device's own topics, with its own id in the payload, count.
//!
//! Stopping for failures is recorded before anything acts on it: the
//! deployment stays `running` but gets its `reason`, and that pair means
//! "stopping". Each device is marked [`DeviceState::RollbackSent`] before its rollback
//! command goes out. A controller stopped in between is resumed into the
//! same stop: devices not yet marked are sent their rollback, marked ones are
//! only waited for. A rollback is never sent twice, because a second one
//! would boot the other slot again, which holds the firmware being rolled
//! back.
//!
//! An operator can pause a deployment (no device is sent a job; those sent
//! finish; it ends `paused`), resume it, or stop it (`stopped`: devices not
//! sent a job are skipped, jobs in flight are cancelled) through the store
//! ([`Store::pause`], [`Store::resume`], [`Store::stop`]): the runner looks
//! at the deployment's state while it waits and before each job it sends,
//! so it obeys a command written by any process. Everything is decided by
//! a [`crate::machine::Rollout`], a state machine without I/O (events in,
//! actions out); [`run`] feeds it what it reads (the operator's word, the
//! devices' topics, the clock) and does what it answers.
//!
//! One deployment has one runner: [`run`] first claims the deployment in
//! the store ([`crate::lease`]; [`RolloutError::Claimed`] when another
//! process's claim holds), renews the claim while it waits and before
//! every command it sends, stops ([`RolloutError::ClaimLost`]) if another
//! process took it over meanwhile, and releases it when it returns.
//!
//! When a device's job fails or is rolled back ([`crate::machine::wants_log`]),
//! the runner reads the device's last [`LOG_RECORDS`] log records over MQTT
//! ([`crate::logs::fetch_last`]) in a task of its own, so the rollout never
//! waits for a device to answer, and keeps them with the device's result
//! ([`crate::store::JobLog`]) as they come in. Each read is bounded by
//! [`LOG_FETCH_LIMIT`]; at most [`LOG_FETCHES_MAX`] devices a run, a few at
//! a time, so a stage of a thousand failures does not open a thousand
//! connections. When the rollout is over, the reads still going get up to
//! [`LOG_FETCH_LIMIT`] more to finish, so `deploy --wait` can show why.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use mqota_core::fetch::is_https;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::fleet::{DeviceView, Fleet, FleetError, FleetEvent, StartCommand, REFRESH_MAX};
use crate::lease::{self, Claim, Lease};
use crate::machine::{Action, Devices, Event, Report, Rollout};
use crate::store::{
    Deployment, DeploymentDevice, DeploymentState, DeviceState, JobLog, Store, StoreError,
};
use crate::unix_now;

/// A count or a percentage, as in `--batch 5` or `--batch 25%`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Amount {
    /// This many devices.
    Count(usize),
    /// This share of the devices, in percent (0–100).
    Percent(u8),
}

impl FromStr for Amount {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            match p.trim().parse::<u8>() {
                Ok(n) if n <= 100 => Ok(Amount::Percent(n)),
                _ => Err(format!("{s:?} is not a percentage 0%..100%")),
            }
        } else {
            s.parse::<usize>()
                .map(Amount::Count)
                .map_err(|_| format!("{s:?} is neither a count nor a percentage like 25%"))
        }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Amount::Count(n) => write!(f, "{n}"),
            Amount::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// How a deployment proceeds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutOptions {
    /// Devices in the first stage (0: no canary stage).
    pub canary: usize,
    /// Size of each later stage, as a count or a share of all selected
    /// devices (rounded up, at least 1).
    pub batch: Amount,
    /// Stop when more devices than this have failed: a count, or a share of
    /// the devices whose job was sent so far.
    pub max_failures: Amount,
    /// When stopping for failures, send `rollback` to devices that updated.
    pub auto_rollback: bool,
    /// Seconds a device may take for its job (also sent as `timeout_s`).
    pub timeout_s: u32,
    /// Also send the job to offline devices (`--to` refuses an offline
    /// device, `--all`/`--where` leave them out, without this).
    #[serde(default)]
    pub include_offline: bool,
    /// Also send an image older than the version a device runs.
    #[serde(default)]
    pub allow_downgrade: bool,
    /// Also send an image of another project than the device runs.
    #[serde(default)]
    pub allow_other_project: bool,
}

impl Default for RolloutOptions {
    fn default() -> Self {
        Self {
            canary: 0,
            batch: Amount::Percent(100),
            max_failures: Amount::Count(0),
            auto_rollback: false,
            timeout_s: 600,
            include_offline: false,
            allow_downgrade: false,
            allow_other_project: false,
        }
    }
}

/// Which devices a deployment is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// These ids, in this order.
    Ids(Vec<String>),
    /// Every device with a status (offline ones are left out by
    /// [`plan_deployment`] unless `include_offline`).
    All,
    /// Every device whose status fields equal these values (`chip`,
    /// `project`, `version`, `state`, `slot`); offline ones as for `All`.
    Where(Vec<(String, String)>),
}

impl Selection {
    /// Reads `chip=esp32c3,version=1.0.0`.
    pub fn parse_where(s: &str) -> Result<Self, RolloutError> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| RolloutError::Option(format!("{part:?} is not key=value")))?;
            let k = k.trim();
            if !["chip", "project", "version", "state", "slot"].contains(&k) {
                return Err(RolloutError::Option(format!(
                    "cannot select by {k:?}: use chip, project, version, state or slot"
                )));
            }
            out.push((k.to_owned(), v.trim().to_owned()));
        }
        if out.is_empty() {
            return Err(RolloutError::Option("--where names no condition".into()));
        }
        Ok(Selection::Where(out))
    }

    /// The selected devices among `fleet`, offline ones included: `--all`
    /// and `--where` match every device with a status, online or not; see
    /// [`plan_deployment`] for what is done with offline ones.
    pub fn select(&self, fleet: &[DeviceView]) -> Result<Vec<DeviceView>, RolloutError> {
        let online = |d: &&DeviceView| d.status.is_some();
        match self {
            Selection::Ids(ids) => ids
                .iter()
                .map(|id| {
                    fleet
                        .iter()
                        .find(|d| &d.id == id && d.status.is_some())
                        .cloned()
                        .ok_or_else(|| RolloutError::UnknownDevice(id.clone()))
                })
                .collect(),
            Selection::All => Ok(fleet.iter().filter(online).cloned().collect()),
            Selection::Where(conds) => Ok(fleet
                .iter()
                .filter(online)
                .filter(|d| {
                    let s = d.status.as_ref().expect("filtered on a status");
                    conds.iter().all(|(k, v)| match k.as_str() {
                        "chip" => s.chip.as_str() == v,
                        "project" => s.project.as_str() == v,
                        "version" => s.version.as_str() == v,
                        "state" => s.state.as_str() == v,
                        "slot" => s.slot.map(|n| n.to_string()).unwrap_or_default() == *v,
                        _ => false,
                    })
                })
                .cloned()
                .collect()),
        }
    }
}

/// Splits `devices` into stages: the canary group, then batches.
pub fn plan(devices: &[String], canary: usize, batch: Amount) -> Vec<Vec<String>> {
    let mut stages = Vec::new();
    let canary = canary.min(devices.len());
    if canary > 0 {
        stages.push(devices[..canary].to_vec());
    }
    let size = match batch {
        Amount::Count(n) => n,
        Amount::Percent(p) => (devices.len() * p as usize).div_ceil(100),
    }
    .max(1);
    for chunk in devices[canary..].chunks(size) {
        stages.push(chunk.to_vec());
    }
    stages
}

/// Whether `failed` failures out of `attempted` sent jobs pass the threshold.
pub fn too_many_failures(max: Amount, failed: usize, attempted: usize) -> bool {
    match max {
        Amount::Count(n) => failed > n,
        Amount::Percent(p) => failed * 100 > p as usize * attempted,
    }
}

/// The image a deployment installs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Firmware {
    /// What the operator named (catalogue name or URL).
    pub name: String,
    /// Where devices download it.
    pub url: String,
    /// Version in its app descriptor.
    pub version: String,
    /// SHA-256 of the file, hex.
    pub sha256: String,
    /// Size of the image file in bytes, as the device will download it
    /// (and checks against the job's `size`).
    pub size: u32,
    /// Chip in its image header, e.g. `esp32c3` (unknown: not checked).
    #[serde(default)]
    pub chip: Option<String>,
    /// Project name in its app descriptor (unknown: not checked).
    #[serde(default)]
    pub project: Option<String>,
    /// Key digests of its valid signature blocks; empty: unsigned, sent to
    /// no device that takes only signed images (unknown: not checked).
    #[serde(default)]
    pub signers: Option<Vec<String>>,
}

/// Why a deployment could not be made or carried on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RolloutError {
    /// An option is malformed: fix the command line.
    #[error("{0}")]
    Option(String),
    /// A `--to` id has never published a status: check the id
    /// (`mqota status`).
    #[error("device {0:?} is not known (it has no retained status)")]
    UnknownDevice(String),
    /// Devices already in a running deployment: wait for it to end, or
    /// stop it (`mqota cancel`) first.
    #[error("already being updated: {0} (wait for it to end, or cancel it)")]
    InDeployment(String),
    /// A `--to` device is offline: its job would wait for the timeout.
    /// Bring it online, or pass `--include-offline` to send it anyway.
    #[error("device(s) offline: {0} (pass --include-offline to send the job anyway)")]
    Offline(String),
    /// Nothing to update: every selected device already runs the version, or
    /// the selection is empty.
    #[error("no device to update: {0}")]
    NoDevices(String),
    /// The store failed: see the error; the deployment may be resumed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The broker connection failed: the deployment can be resumed with
    /// `deploy --resume`.
    #[error(transparent)]
    Fleet(#[from] FleetError),
    /// Another process runs this deployment (its claim's lease runs, see
    /// [`crate::lease`]): follow it with `mqota watch`; if that process is
    /// gone, try again once its claim has lapsed.
    #[error(
        "deployment {deployment} is being run by {} (claim renewed until {}); \
         one deployment has one runner: follow it with `mqota watch`, or try again \
         once that process has stopped and its claim has lapsed",
        claim.holder, claim.expires_text()
    )]
    Claimed {
        /// The deployment.
        deployment: String,
        /// Who holds it, until when.
        claim: Claim,
    },
    /// This process's claim lapsed (it was held up longer than its lease)
    /// and another process took the deployment over: this runner stopped
    /// sending, the other carries on.
    #[error(
        "deployment {deployment} was taken over by {} after this process's claim lapsed; \
         it carries on there",
        claim.holder
    )]
    ClaimLost {
        /// The deployment.
        deployment: String,
        /// Who holds it now.
        claim: Claim,
    },
}

/// What a running deployment reports, for progress bars and logs.
pub trait Observer {
    /// A stage's jobs are being sent.
    fn stage(&mut self, _index: usize, _count: usize, _devices: &[String]) {}
    /// A progress event of this deployment's job.
    fn progress(&mut self, _event: &mqota_core::protocol::Progress) {}
    /// A device's result is in.
    fn result(&mut self, _device: &str, _state: DeviceState, _error: Option<&str>) {}
    /// The rollout stops: for failures (also when a resumed deployment
    /// carries on stopping), or by an operator's stop.
    fn stopped(&mut self, _reason: &str) {}
    /// An automatic rollback is about to be sent to `device`.
    fn rolling_back(&mut self, _device: &str) {}
}

/// An observer that reports nothing.
pub struct Silent;
impl Observer for Silent {}

/// A new deployment id, also the job id the devices see: a ULID in lower
/// case (time-ordered, so ids sort by creation; 26 characters, well within
/// the protocol's job id limit and short enough that a device's field-log
/// line about the job keeps its error code).
fn new_job_id() -> String {
    ulid::Ulid::new().to_string().to_ascii_lowercase()
}

/// Selected devices a deployment leaves out, by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeftOut {
    /// Already running the firmware's version.
    pub current: Vec<String>,
    /// The firmware's URL is `https://` and their status does not say
    /// `"https": true`: they would refuse the job (`bad_command`, "https is
    /// not enabled on this device").
    pub no_https: Vec<String>,
    /// Offline (selected by `--all`/`--where` without `--include-offline`).
    pub offline: Vec<String>,
    /// Their chip is not the image's.
    pub wrong_chip: Vec<String>,
    /// They run another project (without `--allow-other-project`).
    pub other_project: Vec<String>,
    /// They run a newer version, or one that cannot be compared (without
    /// `--allow-downgrade`).
    pub downgrade: Vec<String>,
    /// They take only signed images (`"signed_only": true`) and the image
    /// is unsigned: they would refuse it (`bad_signature`).
    pub unsigned: Vec<String>,
}

impl LeftOut {
    /// One line per reason, for the operator; empty when nobody was left out.
    /// Each line names at most 20 ids and counts the rest ("and N more").
    pub fn describe(&self, version: &str) -> Vec<String> {
        let mut lines = Vec::new();
        if !self.current.is_empty() {
            lines.push(format!(
                "already on {version}: {} (left out)",
                listed(&self.current)
            ));
        }
        if !self.no_https.is_empty() {
            lines.push(format!(
                "https is not enabled on: {} (left out: the firmware URL is https)",
                listed(&self.no_https)
            ));
        }
        let mut more = |list: &[String], why: &str| {
            if !list.is_empty() {
                lines.push(format!("{} {why}: {}", list.len(), listed(list)));
            }
        };
        more(
            &self.offline,
            "offline device(s) skipped (--include-offline sends to them too)",
        );
        more(&self.wrong_chip, "device(s) of another chip left out");
        more(
            &self.other_project,
            "device(s) running another project left out (--allow-other-project)",
        );
        more(
            &self.downgrade,
            "device(s) running a newer or incomparable version left out (--allow-downgrade)",
        );
        more(
            &self.unsigned,
            "device(s) that take only signed images left out: the image is unsigned (mqota image sign)",
        );
        lines
    }

    fn is_empty(&self) -> bool {
        self.current.is_empty()
            && self.no_https.is_empty()
            && self.offline.is_empty()
            && self.wrong_chip.is_empty()
            && self.other_project.is_empty()
            && self.downgrade.is_empty()
            && self.unsigned.is_empty()
    }
}

/// At most 20 ids, then how many more: a fleet of thousands stays one
/// readable line.
fn listed(ids: &[String]) -> String {
    const MAX: usize = 20;
    let mut out = ids.iter().take(MAX).cloned().collect::<Vec<_>>().join(", ");
    if ids.len() > MAX {
        out.push_str(&format!(" and {} more", ids.len() - MAX));
    }
    out
}

/// Whether installing `new` over `running` is a downgrade (the core's
/// [`mqota_core::version`] order, the one the device applies), or the two
/// cannot be compared (then it is treated as one: the operator must say so).
pub fn is_downgrade(running: &str, new: &str) -> bool {
    match mqota_core::version::compare(new, running) {
        Some(order) => order.is_lt(),
        None => !same_version(running, new),
    }
}

/// Whether two versions name the same release (build suffixes ignored).
fn same_version(a: &str, b: &str) -> bool {
    mqota_core::version::same_release(a, b)
}

/// Plans a deployment of `firmware` to the selected devices of `fleet` and
/// stores it (state `running`, every device `pending`). Devices already on
/// the version, and devices that cannot fetch an `https://` firmware URL,
/// are left out and returned second.
pub fn create(
    store: &Store,
    fleet: &[DeviceView],
    firmware: &Firmware,
    selection: &Selection,
    options: &RolloutOptions,
) -> Result<(Deployment, LeftOut), RolloutError> {
    let (d, left_out) = plan_deployment(fleet, firmware, selection, options)?;
    // A device answers a second job with `busy` while the first runs, and
    // two rollouts would fight over its slots: one deployment at a time.
    let running = store.devices_in_running_deployments()?;
    let mut taken: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for x in &d.devices {
        if let Some(dep) = running.get(&x.device) {
            taken
                .entry(dep.as_str())
                .or_default()
                .push(x.device.as_str());
        }
    }
    if !taken.is_empty() {
        return Err(RolloutError::InDeployment(
            taken
                .iter()
                .map(|(dep, ids)| format!("{} in running deployment {dep}", ids.join(", ")))
                .collect::<Vec<_>>()
                .join("; "),
        ));
    }
    store.create_deployment(&d)?;
    Ok((d, left_out))
}

/// What [`create`] would store, without storing it: the deployment (a new
/// job id, state `running`, every device `pending`) and who is left out.
pub fn plan_deployment(
    fleet: &[DeviceView],
    firmware: &Firmware,
    selection: &Selection,
    options: &RolloutOptions,
) -> Result<(Deployment, LeftOut), RolloutError> {
    let selected = selection.select(fleet)?;
    let offline_ids: Vec<String> = selected
        .iter()
        .filter(|d| !d.online)
        .map(|d| d.id.clone())
        .collect();
    if matches!(selection, Selection::Ids(_)) && !options.include_offline && !offline_ids.is_empty()
    {
        return Err(RolloutError::Offline(offline_ids.join(", ")));
    }
    let (offline, selected): (Vec<_>, Vec<_>) = selected
        .into_iter()
        .partition(|d| !d.online && !options.include_offline);
    let status = |d: &DeviceView| d.status.clone().expect("selected devices have a status");
    let (current, todo): (Vec<_>, Vec<_>) = selected
        .into_iter()
        .partition(|d| same_version(status(d).version.as_str(), &firmware.version));
    let (wrong_chip, todo): (Vec<_>, Vec<_>) = todo.into_iter().partition(|d| {
        firmware
            .chip
            .as_deref()
            .is_some_and(|c| c != status(d).chip.as_str())
    });
    let (other_project, todo): (Vec<_>, Vec<_>) = todo.into_iter().partition(|d| {
        !options.allow_other_project
            && firmware
                .project
                .as_deref()
                .is_some_and(|p| p != status(d).project.as_str())
    });
    let (downgrade, todo): (Vec<_>, Vec<_>) = todo.into_iter().partition(|d| {
        !options.allow_downgrade && is_downgrade(status(d).version.as_str(), &firmware.version)
    });
    let unsigned_image = firmware.signers.as_ref().is_some_and(|s| s.is_empty());
    let (unsigned, todo): (Vec<_>, Vec<_>) = todo
        .into_iter()
        .partition(|d| unsigned_image && status(d).signed_only);
    let needs_https = is_https(&firmware.url);
    let (no_https, todo): (Vec<_>, Vec<_>) = todo
        .into_iter()
        .partition(|d| needs_https && !d.status.as_ref().is_some_and(|s| s.https));
    let ids_of = |v: Vec<DeviceView>| v.into_iter().map(|d| d.id).collect::<Vec<_>>();
    let left_out = LeftOut {
        current: ids_of(current),
        no_https: ids_of(no_https),
        offline: ids_of(offline),
        wrong_chip: ids_of(wrong_chip),
        other_project: ids_of(other_project),
        downgrade: ids_of(downgrade),
        unsigned: ids_of(unsigned),
    };
    if todo.is_empty() {
        let only_current_or_https = left_out.offline.is_empty()
            && left_out.wrong_chip.is_empty()
            && left_out.other_project.is_empty()
            && left_out.downgrade.is_empty()
            && left_out.unsigned.is_empty();
        return Err(RolloutError::NoDevices(if left_out.is_empty() {
            "the selection is empty".into()
        } else if !only_current_or_https {
            left_out.describe(&firmware.version).join("; ")
        } else if left_out.no_https.is_empty() {
            format!(
                "all {} selected devices run {}",
                left_out.current.len(),
                firmware.version
            )
        } else {
            let mut why = format!(
                "the firmware URL {} is https, and https is not enabled on {} (serve it over http)",
                firmware.url,
                left_out.no_https.join(", ")
            );
            if !left_out.current.is_empty() {
                why += &format!(
                    "; already on {}: {}",
                    firmware.version,
                    left_out.current.join(", ")
                );
            }
            why
        }));
    }
    let ids: Vec<String> = todo.iter().map(|d| d.id.clone()).collect();
    let from: HashMap<&str, String> = todo
        .iter()
        .filter_map(|d| Some((d.id.as_str(), d.status.as_ref()?.version.to_string())))
        .collect();
    let now = unix_now();
    let mut devices = Vec::new();
    for (stage, group) in plan(&ids, options.canary, options.batch).iter().enumerate() {
        for id in group {
            devices.push(DeploymentDevice {
                device: id.clone(),
                stage: stage as u32,
                state: DeviceState::Pending,
                error: None,
                from_version: from.get(id.as_str()).cloned(),
                updated_at: now,
                log: None,
            });
        }
    }
    let d = Deployment {
        id: new_job_id(),
        firmware: firmware.name.clone(),
        url: firmware.url.clone(),
        version: firmware.version.clone(),
        sha256: firmware.sha256.clone(),
        size: firmware.size,
        options: serde_json::to_value(options).expect("options serialise"),
        state: DeploymentState::Running,
        reason: None,
        created_at: now,
        updated_at: now,
        devices,
    };
    Ok((d, left_out))
}

static RUNNER_NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Names this process as the runner of the deployments it runs (default
/// `deploy`). `serve` calls it with `"serve"` at start, so that a restarted
/// `serve` finds the deployments it was running ([`Store::running_deployments_of`]).
/// Only the first call counts.
pub fn set_runner_name(name: &str) {
    let _ = RUNNER_NAME.set(name.to_owned());
}

/// This process's runner name (see [`set_runner_name`]).
pub fn runner_name() -> &'static str {
    RUNNER_NAME.get().map(String::as_str).unwrap_or("deploy")
}

/// How often a waiting rollout looks at the store for an operator's pause
/// or stop (written by another process, or the API).
const POLL: Duration = Duration::from_millis(250);

/// How long a device the rollout waits for may stay silent before its
/// retained status is asked for again: a device downloading reports every
/// few seconds, one that finished says so once, and that once can be
/// dropped by a broker busy with thousands of others (see [`Fleet::refresh`]).
const REREAD: Duration = Duration::from_secs(10);

/// Log records read from a device whose job failed.
pub const LOG_RECORDS: u16 = 16;
/// How long one log request waits for the device's answer (it is asked up
/// to three times; see [`crate::logs::LogReader::fetch`]).
const LOG_WAIT: Duration = Duration::from_secs(2);
/// The most one device's log read may take, connection included.
pub const LOG_FETCH_LIMIT: Duration = Duration::from_secs(15);
/// The most devices of one run whose log is read.
pub const LOG_FETCHES_MAX: usize = 32;
/// Log reads going on at once.
const LOG_FETCHES_AT_ONCE: usize = 4;

/// The log reads of one run: started as results come in, each in a task of
/// its own, and written to the store as they end.
struct LogFetches {
    url: crate::url::BrokerUrl,
    prefix: String,
    tasks: tokio::task::JoinSet<(String, JobLog)>,
    started: usize,
    at_once: std::sync::Arc<tokio::sync::Semaphore>,
}

impl LogFetches {
    fn new(fleet: &Fleet) -> Self {
        Self {
            url: fleet.broker_url().clone(),
            prefix: fleet.prefix().to_owned(),
            tasks: tokio::task::JoinSet::new(),
            started: 0,
            at_once: std::sync::Arc::new(tokio::sync::Semaphore::new(LOG_FETCHES_AT_ONCE)),
        }
    }

    /// Starts reading `device`'s last records for job `job`; returns at once.
    fn start(&mut self, device: &str, job: &str, newest_hint: Option<u32>) {
        if self.started >= LOG_FETCHES_MAX {
            return;
        }
        self.started += 1;
        let (url, prefix) = (self.url.clone(), self.prefix.clone());
        let (device, job) = (device.to_owned(), job.to_owned());
        let at_once = self.at_once.clone();
        self.tasks.spawn(async move {
            let _turn = at_once.acquire_owned().await;
            let read = tokio::time::timeout(
                LOG_FETCH_LIMIT,
                crate::logs::fetch_last(&url, &prefix, &device, newest_hint, LOG_RECORDS, LOG_WAIT),
            )
            .await;
            let (records, error) = match read {
                Ok(Ok(f)) => (f.records, None),
                Ok(Err(e)) => (Vec::new(), Some(e.to_string())),
                Err(_) => (
                    Vec::new(),
                    Some(format!(
                        "the log was not read within {} s",
                        LOG_FETCH_LIMIT.as_secs()
                    )),
                ),
            };
            let log = JobLog {
                fetched_at: unix_now(),
                line: crate::logs::relevant_line(&records, &job),
                records,
                error,
            };
            (device, log)
        });
    }

    /// Stores the reads that have ended.
    fn harvest(&mut self, store: &Store, id: &str) -> Result<(), StoreError> {
        while let Some(done) = self.tasks.try_join_next() {
            if let Ok((device, log)) = done {
                store.set_device_log(id, &device, &log)?;
            }
        }
        Ok(())
    }

    /// Waits for the reads still going, at most [`LOG_FETCH_LIMIT`], and
    /// stores them; those not done by then are given up.
    async fn finish(&mut self, store: &Store, id: &str) -> Result<(), StoreError> {
        let deadline = Instant::now() + LOG_FETCH_LIMIT;
        while let Ok(Some(done)) = tokio::time::timeout_at(deadline, self.tasks.join_next()).await {
            if let Ok((device, log)) = done {
                store.set_device_log(id, &device, &log)?;
            }
        }
        self.tasks.abort_all();
        Ok(())
    }
}

/// Carries out (or resumes) deployment `id` until it ends, is paused (with
/// nothing in flight) or is stopped, and returns it as stored then. The
/// decisions are [`crate::machine::Rollout`]'s; this runner does the I/O.
pub async fn run(
    fleet: &Fleet,
    store: &Store,
    id: &str,
    observer: &mut dyn Observer,
) -> Result<Deployment, RolloutError> {
    let mut lease = claim(store, id)?;
    let mut logs = LogFetches::new(fleet);
    let ran = steps(fleet, store, id, observer, &mut logs, &mut lease).await;
    // The rollout has decided everything: the next runner may come in (the
    // log reads below only add to results).
    let released = store.release(id, lease::holder());
    // The logs of its failures may still be on their way.
    let kept = logs.finish(store, id).await;
    ran?;
    released?;
    kept?;
    Ok(store.deployment(id)?)
}

/// Claims deployment `id` for this process ([`crate::lease`]), or says who
/// runs it.
pub fn claim(store: &Store, id: &str) -> Result<Lease, RolloutError> {
    let now = lease::now_ms();
    match store.claim(id, lease::holder(), now, lease::lease())? {
        Ok(()) => Ok(Lease {
            deployment: id.to_owned(),
            lease: lease::lease(),
            renewed_at_ms: now,
        }),
        Err(claim) => Err(RolloutError::Claimed {
            deployment: id.to_owned(),
            claim,
        }),
    }
}

/// Fails with [`RolloutError::Claimed`] when another process's claim on
/// `id` is in force: asked before an operator's resume is written, so that
/// a deployment run elsewhere is not resumed into a second runner.
pub fn ensure_not_claimed_elsewhere(store: &Store, id: &str) -> Result<(), RolloutError> {
    match store.claim_in_force(id, lease::now_ms())? {
        Some(claim) if claim.holder != lease::holder() => Err(RolloutError::Claimed {
            deployment: id.to_owned(),
            claim,
        }),
        _ => Ok(()),
    }
}

/// Renews this process's claim when it is due; fails when another process
/// took the deployment over, so this runner stops before it sends again.
fn keep(store: &Store, lease: &mut Lease) -> Result<(), RolloutError> {
    let now = lease::now_ms();
    if !lease.due(now) {
        return Ok(());
    }
    match store.claim(&lease.deployment, lease::holder(), now, lease.lease)? {
        Ok(()) => {
            lease.renewed_at_ms = now;
            Ok(())
        }
        Err(claim) => Err(RolloutError::ClaimLost {
            deployment: lease.deployment.clone(),
            claim,
        }),
    }
}

/// What one run of a deployment works with: its peers (broker, store,
/// observer), the job it sends, and its claim and log reads. The runner's
/// only part is I/O: it feeds the [`Rollout`] what it reads and does what
/// the machine answers ([`Run::perform`]).
struct Run<'a> {
    fleet: &'a Fleet,
    store: &'a Store,
    id: &'a str,
    command: StartCommand,
    observer: &'a mut dyn Observer,
    logs: &'a mut LogFetches,
    lease: &'a mut Lease,
}

impl Run<'_> {
    /// Does what the machine said, in order; `false` once it said
    /// [`Action::End`].
    async fn perform(&mut self, actions: Vec<Action>) -> Result<bool, RolloutError> {
        let (fleet, store, id) = (self.fleet, self.store, self.id);
        for action in actions {
            match action {
                Action::Start(d) => {
                    keep(store, self.lease)?;
                    fleet.start(&d, &self.command).await?;
                }
                Action::Cancel(d) => {
                    keep(store, self.lease)?;
                    fleet.cancel(&d, Some(id)).await?;
                }
                Action::Rollback(d) => {
                    keep(store, self.lease)?;
                    fleet.rollback(&d, Some(id)).await?;
                }
                Action::Record {
                    device,
                    state,
                    error,
                } => store.set_device_state(id, &device, state, error.as_deref())?,
                Action::Deployment { state, reason } => {
                    store.set_deployment_state(id, state, reason.as_deref())?
                }
                Action::ReadLog(d) => {
                    let hint = fleet
                        .device(&d)
                        .and_then(|v| v.status.and_then(|st| st.log_newest));
                    self.logs.start(&d, id, hint);
                }
                Action::Report(r) => match r {
                    Report::Stage {
                        index,
                        count,
                        members,
                    } => self
                        .observer
                        .stage(index as usize, count as usize, &members),
                    Report::Result {
                        device,
                        state,
                        error,
                    } => self.observer.result(&device, state, error.as_deref()),
                    Report::Stopping(reason) => self.observer.stopped(&reason),
                    Report::RollingBack(d) => self.observer.rolling_back(&d),
                },
                Action::End => return Ok(false),
            }
        }
        Ok(true)
    }
}

async fn steps(
    fleet: &Fleet,
    store: &Store,
    id: &str,
    observer: &mut dyn Observer,
    logs: &mut LogFetches,
    lease: &mut Lease,
) -> Result<(), RolloutError> {
    let dep = store.deployment(id)?;
    if !matches!(
        dep.state,
        DeploymentState::Running | DeploymentState::Paused
    ) {
        return Ok(());
    }
    store.set_runner(id, runner_name())?;
    let options: RolloutOptions = serde_json::from_value(dep.options.clone())
        .map_err(|e| RolloutError::Option(format!("stored options unreadable: {e}")))?;
    let command = StartCommand {
        url: dep.url.clone(),
        version: Some(dep.version.clone()),
        sha256: Some(dep.sha256.clone()),
        size: Some(dep.size),
        job: Some(dep.id.clone()),
        timeout_s: Some(options.timeout_s),
        allow_downgrade: options.allow_downgrade,
        allow_other_project: options.allow_other_project,
    };
    let devices: Devices = dep
        .devices
        .iter()
        .map(|d| (d.device.clone(), (d.stage, d.state)))
        .collect();
    let mut rollout = Rollout::new(
        id,
        &dep.version,
        options,
        devices,
        dep.state,
        dep.reason.clone(),
    );
    let mut run = Run {
        fleet,
        store,
        id,
        command,
        observer,
        logs,
        lease,
    };
    let mut events = fleet.events();
    let mut pending = VecDeque::from([Event::Operator(store.deployment_state(id)?.0)]);
    let mut last_poll = Instant::now();
    // Every waited-for device is looked at once per POLL (for its deadline,
    // and for what a lagging channel skipped); in between only those an
    // event named. A fleet of 10,000 sends thousands of events a second,
    // and looking at every device on each would cost O(devices) per event.
    let mut named: HashSet<String> = HashSet::new();
    let mut last_sweep: Option<Instant> = None;
    // When each device was last heard of (an event naming it, or the
    // runner's asking again); a waited-for device silent for REREAD has
    // its retained status asked for again ([`Fleet::refresh`]).
    let mut heard: HashMap<String, Instant> = HashMap::new();
    loop {
        keep(store, run.lease)?;
        run.logs.harvest(store, id)?;
        while let Some(event) = pending.pop_front() {
            if !run.perform(rollout.handle(Instant::now(), event)).await? {
                return Ok(());
            }
            if rollout.is_sending() && pending.is_empty() {
                // A pause or stop is obeyed between two sends, so a large
                // stage does not go out whole after it.
                pending.push_back(Event::Operator(store.deployment_state(id)?.0));
            }
        }
        // Events only wake us up and feed the observer; what a device said
        // is read from the fleet's current view, so a lagging channel loses
        // nothing.
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(event) => {
                    let device = match event {
                        FleetEvent::Progress(p) => {
                            if p.job.as_deref() == Some(id) && rollout.is_waiting(p.device.as_str()) {
                                run.observer.progress(&p);
                            }
                            p.device.as_str().to_owned()
                        }
                        FleetEvent::Status(s) => s.device.as_str().to_owned(),
                        FleetEvent::Removed(d) | FleetEvent::Availability { id: d, .. } => d,
                    };
                    heard.insert(device.clone(), Instant::now());
                    named.insert(device);
                }
                Err(_) => last_sweep = None,
            },
            _ = tokio::time::sleep(POLL) => {}
        }
        // Events can come by the thousand per second; the store is asked at
        // most once per POLL.
        if last_poll.elapsed() >= POLL {
            last_poll = Instant::now();
            pending.push_back(Event::Operator(store.deployment_state(id)?.0));
        }
        let now = Instant::now();
        let sweep = last_sweep.is_none_or(|t| now - t >= POLL);
        let look: Vec<String> = if sweep {
            last_sweep = Some(now);
            named.clear();
            rollout.waiting()
        } else {
            named.drain().filter(|d| rollout.is_waiting(d)).collect()
        };
        pending.extend(
            look.iter()
                .filter_map(|d| fleet.device(d).map(|v| Event::Device(Box::new(v)))),
        );
        if sweep {
            pending.push_back(Event::Tick);
            let silent: Vec<String> = look
                .iter()
                .filter(|d| now - *heard.entry((*d).clone()).or_insert(now) >= REREAD)
                .cloned()
                .collect();
            if !silent.is_empty() {
                // The rest are asked about on the next sweeps.
                let asked: Vec<String> = silent.into_iter().take(REFRESH_MAX).collect();
                if fleet.refresh(&asked) {
                    tracing::debug!(
                        "{id}: {} waited-for device(s) silent for {REREAD:?}: reading their status again",
                        asked.len()
                    );
                    heard.extend(asked.into_iter().map(|d| (d, now)));
                }
            }
        }
    }
}

/// Runs deployments handed to it, each to its end, on a thread of its own
/// (see [`spawn_runner`]).
#[derive(Debug, Clone)]
pub struct Runner {
    tx: tokio::sync::mpsc::UnboundedSender<String>,
}

impl Runner {
    /// Runs deployment `id` (resumed from the store); a deployment this
    /// runner is already running is run once more after it returns, so a
    /// resume that arrives while a paused rollout finishes its jobs in
    /// flight is not lost.
    ///
    /// Returns whether the runner took it: `false` once its thread has
    /// ended (the deployment stays `running` in the store, for
    /// `mqota deploy --resume ID`).
    pub fn run(&self, id: &str) -> bool {
        self.tx.send(id.to_owned()).is_ok()
    }
}

/// Starts a thread that runs deployments with [`run`] on `fleet` and
/// `store`, logging how each ended. [`run`] reports to a `&mut dyn
/// Observer`, which makes its future `!Send`, so it runs on a `LocalSet`;
/// the fleet's MQTT task stays on the caller's runtime. The thread ends
/// when every [`Runner`] is dropped.
pub fn spawn_runner(fleet: std::sync::Arc<Fleet>, store: std::sync::Arc<Store>) -> Runner {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::Builder::new()
        .name("rollout-runner".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("cannot start the rollout runner: {e}");
                    return;
                }
            };
            // Deployment id -> whether to run it again when it returns.
            let active = std::rc::Rc::new(std::cell::RefCell::new(HashMap::<String, bool>::new()));
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                while let Some(id) = rx.recv().await {
                    if let Some(again) = active.borrow_mut().get_mut(&id) {
                        *again = true;
                        continue;
                    }
                    active.borrow_mut().insert(id.clone(), false);
                    let (fleet, store, active) = (fleet.clone(), store.clone(), active.clone());
                    tokio::task::spawn_local(async move {
                        loop {
                            match run(&fleet, &store, &id, &mut Silent).await {
                                Ok(d) => tracing::info!("deployment {id} is {}", d.state.as_str()),
                                Err(RolloutError::Claimed { claim, .. }) => {
                                    // Another process runs it (or one that
                                    // died holds it until its lease lapses):
                                    // try again then; a deployment that has
                                    // ended meanwhile returns at once.
                                    tracing::info!(
                                        "deployment {id} is being run by {} until {} at least; serve takes it over if that claim lapses",
                                        claim.holder,
                                        claim.expires_text()
                                    );
                                    let wait = (claim.expires_at_ms - lease::now_ms()).max(0) as u64;
                                    tokio::time::sleep(Duration::from_millis(wait + 100)).await;
                                    continue;
                                }
                                Err(e) => tracing::error!(
                                    "deployment {id} stopped: {e}; carry on with `mqota deploy --resume {id}`"
                                ),
                            }
                            let again = active.borrow_mut().insert(id.clone(), false);
                            if again != Some(true) {
                                active.borrow_mut().remove(&id);
                                break;
                            }
                        }
                    });
                }
            });
        })
        .expect("a thread can be started");
    Runner { tx }
}

pub use crate::catalogue::{deployable, resolve_firmware, resolve_firmware_as, FirmwareError};

#[cfg(test)]
mod tests;

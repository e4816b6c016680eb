//! The controller's state in SQLite: the firmware catalogue, the devices with
//! a history of their status changes, and every deployment with each device's
//! result.
//!
//! One file, `mqota.sqlite3` in the data directory, opened in WAL mode with a
//! busy timeout so `serve` and `deploy` can have it open at the same time.
//!
//! | table | key | holds |
//! |---|---|---|
//! | `firmware` | `name` | what [`crate::catalogue`] read from each file |
//! | `devices` | `id` | the latest retained status (JSON) |
//! | `device_history` | row id | every status change and every terminal progress event |
//! | `deployments` | `id` (the job id) | firmware, job fields, options, state |
//! | `deployment_devices` | `(deployment, device)` | stage, result, error, the version before, the device's last log records when its job failed ([`JobLog`]) |
//! | `deployment_claims` | `deployment` | the process running it and when its lease lapses ([`crate::lease`]) |
//! | `web_users`, `api_tokens`, `web_sessions`, `audit` | see [`crate::accounts`] | the page's and API's accounts, and who did what |

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::access::{Identity, Role};
use crate::catalogue::FirmwareEntry;
use crate::lease::{Claim, Decision};
use crate::unix_now;

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "mqota.sqlite3";

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The data directory cannot be created or the database opened: check
    /// `--data-dir` and its permissions.
    #[error("cannot open the database {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// SQLite's reason (file not found, permission denied, not a
        /// database).
        source: rusqlite::Error,
    },
    /// A query failed (disk full, database locked for too long, corrupt
    /// file): report it; the operation did not happen.
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A deployment id that the database does not know: check the id
    /// (`mqota deploy` prints it when it creates one; `GET /api/deployments`
    /// lists them all).
    #[error("no deployment {0:?}")]
    UnknownDeployment(String),
    /// The database was written by a newer mqota (its schema version is
    /// above the ones this build knows): use that mqota, or another
    /// `--data-dir`. Nothing was changed.
    #[error("the database {path} has schema version {found}; this mqota knows up to {known}")]
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// Its `user_version`.
        found: i64,
        /// The newest this build knows.
        known: i64,
    },
    /// `mqota device add` for a name that already has a login: remove it
    /// first (`mqota device remove`) to give it a new password.
    #[error("{0:?} already has MQTT credentials")]
    IdentityExists(String),
    /// `mqota forget` for a device that is in a running or paused
    /// deployment: stop that deployment first, or wait for it to end.
    #[error("device {device} is in deployment {deployment}, which is not over: stop it first (`mqota deploy --stop {deployment}`)")]
    DeviceInDeployment {
        /// The device.
        device: String,
        /// The deployment that still counts on it.
        deployment: String,
    },
    /// An operator command (pause, resume, stop) that the deployment's state
    /// does not allow, e.g. pausing a finished one: nothing was changed.
    #[error("deployment {id} is {state}: cannot {action} it")]
    NotAllowed {
        /// The deployment.
        id: String,
        /// Where it stands (`stopping` for a failing one).
        state: String,
        /// What was asked.
        action: &'static str,
    },
}

/// Where a deployment stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentState {
    /// Stages are still being sent or waited for (with a `reason`: it is
    /// stopping for failures).
    Running,
    /// An operator paused it: no device is sent a job; jobs already sent
    /// finish. `deploy --resume ID` (or `POST .../resume`) carries on.
    Paused,
    /// Every selected device runs the new firmware.
    Succeeded,
    /// Stopped because failures passed the threshold.
    Failed,
    /// An operator stopped it: no more jobs; final.
    Stopped,
}

impl DeploymentState {
    /// Every state.
    pub const ALL: [DeploymentState; 5] = [
        Self::Running,
        Self::Paused,
        Self::Succeeded,
        Self::Failed,
        Self::Stopped,
    ];

    /// The name in the database, the API and the summary.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
        }
    }

    /// The state named `s`, if there is one.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.as_str() == s)
    }

    /// Nothing more will happen to it.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Stopped)
    }
}

/// Where one device of a deployment stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Its stage has not been sent yet.
    Pending,
    /// The job was sent; no result yet.
    Sent,
    /// It reported `done` or its status shows the new version.
    Done,
    /// It reported `failed`.
    Failed,
    /// The new firmware was abandoned (health check or boot failed).
    RolledBack,
    /// A cancel command stopped it.
    Cancelled,
    /// No result within the per-device timeout.
    TimedOut,
    /// Never sent: the rollout stopped before its stage.
    Skipped,
    /// It had updated, and the controller rolled it back after the rollout
    /// stopped (`--auto-rollback`).
    Reverted,
    /// The controller's rollback did not confirm in time or failed.
    RevertFailed,
    /// It had updated, and the controller's `rollback` was sent
    /// (`--auto-rollback`); the result is not in yet. Never sent twice: a
    /// second rollback would boot the firmware being removed.
    RollbackSent,
}

impl DeviceState {
    /// Every state.
    pub const ALL: [DeviceState; 11] = [
        Self::Pending,
        Self::Sent,
        Self::Done,
        Self::Failed,
        Self::RolledBack,
        Self::Cancelled,
        Self::TimedOut,
        Self::Skipped,
        Self::Reverted,
        Self::RevertFailed,
        Self::RollbackSent,
    ];

    /// The name in the database, the API and the summary.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Sent => "sent",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::RolledBack => "rolled_back",
            Self::Cancelled => "cancelled",
            Self::TimedOut => "timed_out",
            Self::Skipped => "skipped",
            Self::Reverted => "reverted",
            Self::RevertFailed => "revert_failed",
            Self::RollbackSent => "rollback_sent",
        }
    }

    /// The state named `s`, if there is one.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.as_str() == s)
    }

    /// A job that ended without the new firmware running.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            Self::Failed | Self::RolledBack | Self::Cancelled | Self::TimedOut
        )
    }

    /// The device's job is over (whatever the result).
    pub fn is_finished(self) -> bool {
        !matches!(self, Self::Pending | Self::Sent)
    }
}

/// A state string in the database that names no state: the row was written
/// by a newer mqota or corrupted. Reading it fails rather than guess, since
/// a guess of `running` or `pending` would make a resume send jobs again.
#[derive(Debug, thiserror::Error)]
#[error("unknown {kind} state {value:?} in the database")]
pub struct UnknownState {
    /// `deployment` or `device`.
    pub kind: &'static str,
    /// What the row holds.
    pub value: String,
}

// Strict enums in and out of SQLite: stored by name, read back only if the
// name is known.
macro_rules! sql_enum {
    ($t:ty, $kind:literal) => {
        impl rusqlite::types::ToSql for $t {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                Ok(self.as_str().into())
            }
        }
        impl rusqlite::types::FromSql for $t {
            fn column_result(
                v: rusqlite::types::ValueRef<'_>,
            ) -> rusqlite::types::FromSqlResult<Self> {
                let s = v.as_str()?;
                <$t>::parse(s).ok_or_else(|| {
                    rusqlite::types::FromSqlError::Other(Box::new(UnknownState {
                        kind: $kind,
                        value: s.to_owned(),
                    }))
                })
            }
        }
    };
}
sql_enum!(DeploymentState, "deployment");
sql_enum!(DeviceState, "device");
sql_enum!(Role, "identity role");

/// One device in a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentDevice {
    /// Device id.
    pub device: String,
    /// Stage index: 0 is the canary when there is one.
    pub stage: u32,
    /// Where it stands.
    pub state: DeviceState,
    /// The device's error code or the controller's reason, if any.
    pub error: Option<String>,
    /// The version it ran when the deployment was planned.
    pub from_version: Option<String>,
    /// Last change, Unix seconds.
    pub updated_at: i64,
    /// The device's last log records, fetched when its job failed or rolled
    /// back (see [`crate::rollout`]); `None` until then, and for jobs that
    /// did not fail.
    #[serde(default)]
    pub log: Option<JobLog>,
}

/// What a device's field log said when its job failed: the records read
/// back over MQTT ([`crate::logs`]), or why they could not be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobLog {
    /// When they were read, Unix seconds.
    pub fetched_at: i64,
    /// The records, oldest first (empty when the fetch failed).
    pub records: Vec<mqota_core::protocol::LogRecord>,
    /// The record that best says why the job failed, as one line (see
    /// [`crate::logs::relevant_line`]).
    pub line: Option<String>,
    /// Why no record could be read (device offline, no log partition).
    pub error: Option<String>,
}

/// A deployment and its devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    /// The job id sent to devices.
    pub id: String,
    /// What the operator named: a catalogue name or a URL.
    pub firmware: String,
    /// The start command's URL.
    pub url: String,
    /// Version of the image.
    pub version: String,
    /// SHA-256 of the image file, hex.
    pub sha256: String,
    /// Image size in bytes.
    pub size: u32,
    /// The rollout options, as JSON (see [`crate::rollout::RolloutOptions`]).
    pub options: serde_json::Value,
    /// Where it stands.
    pub state: DeploymentState,
    /// Why it stopped, when it failed.
    pub reason: Option<String>,
    /// Created, Unix seconds.
    pub created_at: i64,
    /// Last change, Unix seconds.
    pub updated_at: i64,
    /// Its devices, by stage then id.
    pub devices: Vec<DeploymentDevice>,
}

/// A device as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredDevice {
    /// Device id.
    pub id: String,
    /// Its latest status document.
    pub status: serde_json::Value,
    /// When it last changed, Unix seconds.
    pub updated_at: i64,
}

fn row_to_device(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredDevice> {
    let text: String = r.get(1)?;
    Ok(StoredDevice {
        id: r.get(0)?,
        status: serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        updated_at: r.get(2)?,
    })
}

/// One entry of a device's history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryEntry {
    /// Its place in the history (grows with every entry of any device): the
    /// cursor for the page before it ([`Store::history_page`]).
    pub seq: i64,
    /// Unix seconds.
    pub at: i64,
    /// `status` or `progress`.
    pub kind: String,
    /// The document.
    pub data: serde_json::Value,
}

/// How much device history [`Store::prune_history`] keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Entries older than this go.
    pub max_age: std::time::Duration,
    /// Each device keeps at most this many of its newest entries.
    pub max_entries: usize,
}

impl Default for Retention {
    /// 90 days and 1,000 entries a device: a device that changes state a
    /// few times a day keeps months, and 10,000 devices at the cap are
    /// about 10 million rows (a few GB at most), not an unbounded file.
    fn default() -> Self {
        Self {
            max_age: std::time::Duration::from_secs(90 * 86_400),
            max_entries: 1000,
        }
    }
}

/// The database.
pub struct Store {
    // `crate::accounts` keeps its tables' queries beside its types.
    pub(crate) conn: Mutex<Connection>,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// The schema, one migration per version: `PRAGMA user_version` says how
/// many have been applied. Migrations only ever get appended.
///
/// | version | change |
/// |---|---|
/// | 1 | the tables (databases from before versioning are at 0 and already have them: every statement is `IF NOT EXISTS`) |
/// | 2 | `deployments.runner` (who runs it, for `serve` to resume its own); the rollback mark moves from `error = 'rollback sent'` to the state `rollback_sent` |
/// | 3 | `deployment_devices.log`: the [`JobLog`] of a failed job, as JSON |
/// | 4 | `mqtt_identities`: MQTT user name, role (`device`, `controller`), password hash |
/// | 5 | `deployment_claims`: who runs a deployment, until when ([`crate::lease`]); `device_history` indexed by time, for [`Store::prune_history`] |
/// | 6 | `web_users`, `api_tokens`, `web_sessions`, `audit`: the web page's and API's accounts and what they did ([`crate::accounts`]) |
const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE IF NOT EXISTS firmware (
    name TEXT PRIMARY KEY, chip TEXT, project TEXT, version TEXT,
    size INTEGER NOT NULL, sha256 TEXT NOT NULL, error TEXT, mtime INTEGER NOT NULL,
    updated_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY, status TEXT NOT NULL, updated_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS device_history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL, at INTEGER NOT NULL,
    kind TEXT NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS device_history_by_device ON device_history(device, seq);
CREATE TABLE IF NOT EXISTS deployments (
    id TEXT PRIMARY KEY, firmware TEXT NOT NULL, url TEXT NOT NULL, version TEXT NOT NULL,
    sha256 TEXT NOT NULL, size INTEGER NOT NULL, options TEXT NOT NULL, state TEXT NOT NULL,
    reason TEXT, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS deployment_devices (
    deployment TEXT NOT NULL, device TEXT NOT NULL, stage INTEGER NOT NULL,
    state TEXT NOT NULL, error TEXT, from_version TEXT, updated_at INTEGER NOT NULL,
    PRIMARY KEY (deployment, device));
",
    "
ALTER TABLE deployments ADD COLUMN runner TEXT;
UPDATE deployment_devices SET state = 'rollback_sent', error = NULL
    WHERE state = 'done' AND error = 'rollback sent';
",
    "
ALTER TABLE deployment_devices ADD COLUMN log TEXT;
",
    "
CREATE TABLE mqtt_identities (
    name TEXT PRIMARY KEY, role TEXT NOT NULL, hash TEXT NOT NULL, created_at INTEGER NOT NULL);
",
    "
CREATE TABLE deployment_claims (
    deployment TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at_ms INTEGER NOT NULL);
CREATE INDEX device_history_by_time ON device_history(at);
",
    "
CREATE TABLE web_users (
    name TEXT PRIMARY KEY, role TEXT NOT NULL, hash TEXT NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, user TEXT NOT NULL, label TEXT,
    created_at INTEGER NOT NULL, expires_at INTEGER, revoked_at INTEGER);
CREATE TABLE web_sessions (
    hash TEXT PRIMARY KEY, user TEXT NOT NULL, csrf TEXT NOT NULL, source TEXT,
    created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL);
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, target TEXT, source TEXT, status INTEGER NOT NULL);
",
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the database up to [`SCHEMA_VERSION`], each migration in its own
/// transaction with the version bump, so a crash leaves a whole version.
fn migrate(c: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let found: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            path: path.to_owned(),
            found,
            known: SCHEMA_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Another process may have migrated while this one waited for the
        // lock.
        let now: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if now > i as i64 {
            continue;
        }
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the database in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join(DB_FILE);
        let open_err = |source| StoreError::Open {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(data_dir)
            .map_err(|e| open_err(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        let mut conn = Connection::open(&path).map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(open_err)?;
        // WAL lets `serve` read while `deploy` writes; NORMAL sync is
        // durable across process crashes, which is what a restart needs.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        migrate(&mut conn, &path)?;
        Ok(Self {
            conn: Mutex::new(conn),
            path,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the firmware catalogue with `entries`.
    pub fn replace_firmware(&self, entries: &[FirmwareEntry]) -> Result<(), StoreError> {
        let mut c = self.conn.lock().unwrap();
        let tx = c.transaction()?;
        tx.execute("DELETE FROM firmware", [])?;
        let now = unix_now();
        for e in entries {
            tx.execute(
                "INSERT INTO firmware (name, chip, project, version, size, sha256, error, mtime, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![e.name, e.chip, e.project, e.version, e.size, e.sha256, e.error, e.mtime, now],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The firmware catalogue, by name.
    pub fn firmware(&self) -> Result<Vec<FirmwareEntry>, StoreError> {
        let c = self.conn.lock().unwrap();
        let mut st = c.prepare(
            "SELECT name, chip, project, version, size, sha256, error, mtime FROM firmware ORDER BY name",
        )?;
        let rows = st.query_map([], |r| {
            Ok(FirmwareEntry {
                name: r.get(0)?,
                url: None,
                chip: r.get(1)?,
                project: r.get(2)?,
                version: r.get(3)?,
                size: r.get(4)?,
                sha256: r.get(5)?,
                error: r.get(6)?,
                // Not stored: the catalogue reads it from the file.
                signers: None,
                mtime: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records a device's status; a change is added to its history.
    pub fn record_status(&self, id: &str, status: &serde_json::Value) -> Result<(), StoreError> {
        let text = status.to_string();
        let c = self.conn.lock().unwrap();
        let old: Option<String> = c
            .query_row("SELECT status FROM devices WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?;
        if old.as_deref() == Some(text.as_str()) {
            return Ok(());
        }
        let now = unix_now();
        c.execute(
            "INSERT INTO devices (id, status, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(id) DO UPDATE SET status = excluded.status, updated_at = excluded.updated_at",
            params![id, text, now],
        )?;
        c.execute(
            "INSERT INTO device_history (device, at, kind, data) VALUES (?1, ?2, 'status', ?3)",
            params![id, now, text],
        )?;
        Ok(())
    }

    /// Adds a progress event (the controller keeps the terminal ones) to a
    /// device's history, if the device is in the store: an id known only
    /// from progress events is no device (anyone may publish under a
    /// made-up id), and gets no record. Returns whether it was added.
    pub fn record_progress(&self, id: &str, event: &serde_json::Value) -> Result<bool, StoreError> {
        let c = self.conn.lock().unwrap();
        let n = c.execute(
            "INSERT INTO device_history (device, at, kind, data)
             SELECT ?1, ?2, 'progress', ?3 WHERE EXISTS (SELECT 1 FROM devices WHERE id = ?1)",
            params![id, unix_now(), event.to_string()],
        )?;
        Ok(n == 1)
    }

    /// Whether the store has a record of device `id`.
    pub fn device_known(&self, id: &str) -> Result<bool, StoreError> {
        let c = self.conn.lock().unwrap();
        Ok(
            c.query_row("SELECT 1 FROM devices WHERE id = ?1", [id], |_| Ok(()))
                .optional()?
                .is_some(),
        )
    }

    /// The oldest deployment not over (`running` or `paused`) that device
    /// `id` is in, if any.
    pub fn unfinished_deployment_of_device(&self, id: &str) -> Result<Option<String>, StoreError> {
        let c = self.conn.lock().unwrap();
        unfinished_deployment_of(&c, id)
    }

    /// Removes device `id` from the store: its record and its history (its
    /// results in past deployments stay, as part of those). Refused while it
    /// is in a running or paused deployment, whose rollout still counts on
    /// it. Returns whether the store knew it.
    pub fn forget_device(&self, id: &str) -> Result<bool, StoreError> {
        let mut c = self.conn.lock().unwrap();
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        if let Some(deployment) = unfinished_deployment_of(&tx, id)? {
            return Err(StoreError::DeviceInDeployment {
                device: id.to_owned(),
                deployment,
            });
        }
        let n = tx.execute("DELETE FROM devices WHERE id = ?1", [id])?;
        let h = tx.execute("DELETE FROM device_history WHERE device = ?1", [id])?;
        tx.commit()?;
        Ok(n + h > 0)
    }

    /// Applies `retention` to the device history at `now` (Unix seconds):
    /// entries older than its age go, then each device keeps at most its
    /// newest `max_entries`. Returns how many entries were removed.
    pub fn prune_history(&self, now: i64, retention: &Retention) -> Result<usize, StoreError> {
        let mut c = self.conn.lock().unwrap();
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let cutoff = now.saturating_sub(retention.max_age.as_secs() as i64);
        let mut removed = tx.execute("DELETE FROM device_history WHERE at < ?1", [cutoff])?;
        let over: Vec<String> = {
            let mut st = tx.prepare(
                "SELECT device FROM device_history GROUP BY device HAVING COUNT(*) > ?1",
            )?;
            let rows = st.query_map([retention.max_entries as i64], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        for device in over {
            // The seq of the oldest entry kept; everything before it goes.
            removed += tx.execute(
                "DELETE FROM device_history WHERE device = ?1 AND seq < (
                     SELECT seq FROM device_history WHERE device = ?1
                     ORDER BY seq DESC LIMIT 1 OFFSET ?2)",
                params![device, retention.max_entries as i64 - 1],
            )?;
        }
        tx.commit()?;
        Ok(removed)
    }

    /// Every device with its latest status, by id.
    pub fn devices(&self) -> Result<Vec<StoredDevice>, StoreError> {
        let c = self.conn.lock().unwrap();
        let mut st = c.prepare("SELECT id, status, updated_at FROM devices ORDER BY id")?;
        let rows = st.query_map([], row_to_device)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The ids of every recorded device, in order: what
    /// [`Store::devices`] lists, without reading their statuses.
    pub fn device_ids(&self) -> Result<Vec<String>, StoreError> {
        let c = self.conn.lock().unwrap();
        let mut st = c.prepare("SELECT id FROM devices ORDER BY id")?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// One page of the devices in id order: at most `limit` whose ids sort
    /// after `after` (from the first without it), and whether more follow.
    /// A walk that passes each page's last id as the next `after` sees
    /// every device recorded before it began exactly once, however many are
    /// added meanwhile.
    pub fn devices_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<StoredDevice>, bool), StoreError> {
        let c = self.conn.lock().unwrap();
        let mut st = c.prepare(
            "SELECT id, status, updated_at FROM devices
             WHERE ?1 IS NULL OR id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let rows = st.query_map(
            params![after, i64::try_from(limit).unwrap_or(i64::MAX - 1) + 1],
            row_to_device,
        )?;
        let mut page = rows.collect::<Result<Vec<_>, _>>()?;
        let more = page.len() > limit;
        page.truncate(limit);
        Ok((page, more))
    }

    /// A device's whole history, oldest first.
    pub fn history(&self, id: &str) -> Result<Vec<HistoryEntry>, StoreError> {
        Ok(self.history_page(id, None, usize::MAX)?.0)
    }

    /// One page of a device's history: its newest `limit` entries before
    /// `before` (a [`HistoryEntry::seq`]; `None`: the newest), oldest
    /// first, and the cursor of the page before it when there are older
    /// entries.
    pub fn history_page(
        &self,
        id: &str,
        before: Option<i64>,
        limit: usize,
    ) -> Result<(Vec<HistoryEntry>, Option<i64>), StoreError> {
        let c = self.conn.lock().unwrap();
        let mut st = c.prepare(
            "SELECT seq, at, kind, data FROM device_history WHERE device = ?1 AND seq < ?2
             ORDER BY seq DESC LIMIT ?3",
        )?;
        // One more than asked: whether there is an older page.
        let take = i64::try_from(limit)
            .unwrap_or(i64::MAX - 1)
            .saturating_add(1);
        let rows = st.query_map(params![id, before.unwrap_or(i64::MAX), take], |r| {
            let text: String = r.get(3)?;
            Ok(HistoryEntry {
                seq: r.get(0)?,
                at: r.get(1)?,
                kind: r.get(2)?,
                data: serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
            })
        })?;
        let mut page: Vec<HistoryEntry> = rows.collect::<Result<_, _>>()?;
        let more = page.len() > limit;
        page.truncate(limit);
        page.reverse();
        let next = if more {
            page.first().map(|e| e.seq)
        } else {
            None
        };
        Ok((page, next))
    }

    /// Stores a new deployment with its devices.
    pub fn create_deployment(&self, d: &Deployment) -> Result<(), StoreError> {
        let mut c = self.conn.lock().unwrap();
        let tx = c.transaction()?;
        tx.execute(
            "INSERT INTO deployments (id, firmware, url, version, sha256, size, options, state, reason, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                d.id, d.firmware, d.url, d.version, d.sha256, d.size, d.options.to_string(),
                d.state.as_str(), d.reason, d.created_at, d.updated_at
            ],
        )?;
        for dev in &d.devices {
            tx.execute(
                "INSERT INTO deployment_devices (deployment, device, stage, state, error, from_version, updated_at, log)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![d.id, dev.device, dev.stage, dev.state.as_str(), dev.error, dev.from_version, dev.updated_at,
                        dev.log.as_ref().map(|l| serde_json::to_string(l).expect("a log serialises"))],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Sets one device's state in a deployment.
    pub fn set_device_state(
        &self,
        deployment: &str,
        device: &str,
        state: DeviceState,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let c = self.conn.lock().unwrap();
        let now = unix_now();
        c.execute(
            "UPDATE deployment_devices SET state = ?3, error = ?4, updated_at = ?5
             WHERE deployment = ?1 AND device = ?2",
            params![deployment, device, state.as_str(), error, now],
        )?;
        c.execute(
            "UPDATE deployments SET updated_at = ?2 WHERE id = ?1",
            params![deployment, now],
        )?;
        Ok(())
    }

    /// The deployments not yet over (`running` or `paused`) that install
    /// the catalogue file `name`, named by it or by a URL ending in
    /// `/firmware/{name}`: id and state, oldest first.
    pub fn unfinished_deployments_of(
        &self,
        name: &str,
    ) -> Result<Vec<(String, DeploymentState)>, StoreError> {
        let c = self.conn.lock().unwrap();
        let mut st = c.prepare(
            "SELECT id, state, firmware, url FROM deployments
             WHERE state IN ('running', 'paused') ORDER BY created_at, id",
        )?;
        let served = format!("/firmware/{name}");
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, DeploymentState>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, state, firmware, url) = row?;
            if firmware == name || url.ends_with(&served) {
                out.push((id, state));
            }
        }
        Ok(out)
    }

    /// Keeps what a device's log said about its failed job in `deployment`.
    pub fn set_device_log(
        &self,
        deployment: &str,
        device: &str,
        log: &JobLog,
    ) -> Result<(), StoreError> {
        let c = self.conn.lock().unwrap();
        let now = unix_now();
        let text = serde_json::to_string(log).expect("a log serialises");
        let n = c.execute(
            "UPDATE deployment_devices SET log = ?3 WHERE deployment = ?1 AND device = ?2",
            params![deployment, device, text],
        )?;
        if n == 0 {
            return Err(StoreError::UnknownDeployment(deployment.to_owned()));
        }
        c.execute(
            "UPDATE deployments SET updated_at = ?2 WHERE id = ?1",
            params![deployment, now],
        )?;
        Ok(())
    }

    /// Sets a deployment's state and reason.
    pub fn set_deployment_state(
        &self,
        id: &str,
        state: DeploymentState,
        reason: Option<&str>,
    ) -> Result<(), StoreError> {
        let c = self.conn.lock().unwrap();
        let n = c.execute(
            "UPDATE deployments SET state = ?2, reason = ?3, updated_at = ?4 WHERE id = ?1",
            params![id, state.as_str(), reason, unix_now()],
        )?;
        if n == 0 {
            return Err(StoreError::UnknownDeployment(id.to_owned()));
        }
        Ok(())
    }

    /// Every device of a running deployment, with that deployment's id.
    pub fn devices_in_running_deployments(
        &self,
    ) -> Result<std::collections::HashMap<String, String>, StoreError> {
        let c = self.conn.lock().unwrap();
        let mut st = c.prepare(
            "SELECT dd.device, d.id FROM deployment_devices dd
             JOIN deployments d ON d.id = dd.deployment WHERE d.state = 'running'",
        )?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// One deployment with its devices.
    pub fn deployment(&self, id: &str) -> Result<Deployment, StoreError> {
        let c = self.conn.lock().unwrap();
        let d = c
            .query_row(
                "SELECT id, firmware, url, version, sha256, size, options, state, reason, created_at, updated_at
                 FROM deployments WHERE id = ?1",
                [id],
                row_to_deployment,
            )
            .optional()?
            .ok_or_else(|| StoreError::UnknownDeployment(id.to_owned()))?;
        with_devices(&c, d)
    }

    /// Every deployment, newest first, with their devices.
    pub fn deployments(&self) -> Result<Vec<Deployment>, StoreError> {
        let c = self.conn.lock().unwrap();
        let mut st = c.prepare(
            "SELECT id, firmware, url, version, sha256, size, options, state, reason, created_at, updated_at
             FROM deployments ORDER BY created_at DESC, id DESC",
        )?;
        let list = st
            .query_map([], row_to_deployment)?
            .collect::<Result<Vec<_>, _>>()?;
        list.into_iter().map(|d| with_devices(&c, d)).collect()
    }

    /// A deployment's state and reason, read cheaply (a rollout polls it to
    /// notice an operator's pause or stop written by another process).
    pub fn deployment_state(
        &self,
        id: &str,
    ) -> Result<(DeploymentState, Option<String>), StoreError> {
        let c = self.conn.lock().unwrap();
        c.query_row(
            "SELECT state, reason FROM deployments WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?
        .ok_or_else(|| StoreError::UnknownDeployment(id.to_owned()))
    }

    /// Records who runs deployment `id` (e.g. `serve`, `deploy`).
    pub fn set_runner(&self, id: &str, runner: &str) -> Result<(), StoreError> {
        let c = self.conn.lock().unwrap();
        let n = c.execute(
            "UPDATE deployments SET runner = ?2 WHERE id = ?1",
            params![id, runner],
        )?;
        if n == 0 {
            return Err(StoreError::UnknownDeployment(id.to_owned()));
        }
        Ok(())
    }

    /// The `running` deployments last run by `runner`, oldest first.
    pub fn running_deployments_of(&self, runner: &str) -> Result<Vec<String>, StoreError> {
        let c = self.conn.lock().unwrap();
        let mut st = c.prepare(
            "SELECT id FROM deployments WHERE state = 'running' AND runner = ?1
             ORDER BY created_at, id",
        )?;
        let rows = st.query_map([runner], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Claims deployment `id` for `holder` until `now_ms + lease`, or
    /// renews its claim, as [`crate::lease::decide`] says; inside one write
    /// transaction, so of two processes claiming at once only one wins.
    /// `Ok(Err(claim))`: another holder's lease runs; nothing was changed.
    pub fn claim(
        &self,
        id: &str,
        holder: &str,
        now_ms: i64,
        lease: std::time::Duration,
    ) -> Result<Result<(), Claim>, StoreError> {
        let mut c = self.conn.lock().unwrap();
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let known: Option<String> = tx
            .query_row("SELECT id FROM deployments WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?;
        if known.is_none() {
            return Err(StoreError::UnknownDeployment(id.to_owned()));
        }
        let current = claim_of(&tx, id)?;
        if let Decision::Refuse(other) = crate::lease::decide(current.as_ref(), holder, now_ms) {
            return Ok(Err(other));
        }
        tx.execute(
            "INSERT INTO deployment_claims (deployment, holder, expires_at_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT(deployment) DO UPDATE SET holder = excluded.holder,
                 expires_at_ms = excluded.expires_at_ms",
            params![id, holder, now_ms.saturating_add(lease.as_millis() as i64)],
        )?;
        tx.commit()?;
        Ok(Ok(()))
    }

    /// Gives up `holder`'s claim on `id` (another holder's is left alone).
    pub fn release(&self, id: &str, holder: &str) -> Result<(), StoreError> {
        let c = self.conn.lock().unwrap();
        c.execute(
            "DELETE FROM deployment_claims WHERE deployment = ?1 AND holder = ?2",
            params![id, holder],
        )?;
        Ok(())
    }

    /// Gives up every claim `holder` has (a process that stops on a
    /// signal, so that no one waits for its leases to lapse).
    pub fn release_all(&self, holder: &str) -> Result<usize, StoreError> {
        let c = self.conn.lock().unwrap();
        Ok(c.execute("DELETE FROM deployment_claims WHERE holder = ?1", [holder])?)
    }

    /// The claim on `id` that is in force at `now_ms`, if any (a lapsed one
    /// is no claim).
    pub fn claim_in_force(&self, id: &str, now_ms: i64) -> Result<Option<Claim>, StoreError> {
        let c = self.conn.lock().unwrap();
        Ok(claim_of(&c, id)?.filter(|cl| now_ms < cl.expires_at_ms))
    }

    /// Pauses a running deployment: its rollout sends no more jobs (those
    /// sent finish) and ends `paused`. A deployment stopping for failures
    /// cannot be paused.
    pub fn pause(&self, id: &str) -> Result<Deployment, StoreError> {
        self.operator(id, "pause", |state, reason| match (state, reason) {
            (DeploymentState::Running, None) => Some(DeploymentState::Paused),
            _ => None,
        })
    }

    /// Makes a paused deployment `running` again (an interrupted `running`
    /// one stays so); the caller then runs it.
    pub fn resume(&self, id: &str) -> Result<Deployment, StoreError> {
        self.operator(id, "resume", |state, _| match state {
            DeploymentState::Running | DeploymentState::Paused => Some(DeploymentState::Running),
            _ => None,
        })
    }

    /// Stops a running or paused deployment for good: it becomes `stopped`
    /// and its devices not yet sent a job are `skipped`. A rollout running
    /// it cancels the jobs in flight when it notices. A deployment stopping
    /// for failures is left to finish its stop (and rollback).
    pub fn stop(&self, id: &str) -> Result<Deployment, StoreError> {
        self.operator(id, "stop", |state, reason| match (state, reason) {
            (DeploymentState::Running, None) | (DeploymentState::Paused, _) => {
                Some(DeploymentState::Stopped)
            }
            _ => None,
        })
    }

    /// Adds an MQTT identity; refuses a name that has one.
    pub fn add_identity(&self, identity: &Identity) -> Result<(), StoreError> {
        let c = self.conn.lock().unwrap();
        let n = c.execute(
            "INSERT OR IGNORE INTO mqtt_identities (name, role, hash, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![identity.name, identity.role, identity.hash, identity.created_at],
        )?;
        if n == 0 {
            return Err(StoreError::IdentityExists(identity.name.clone()));
        }
        Ok(())
    }

    /// Removes an MQTT identity; `false` when there was none.
    pub fn remove_identity(&self, name: &str) -> Result<bool, StoreError> {
        let c = self.conn.lock().unwrap();
        Ok(c.execute("DELETE FROM mqtt_identities WHERE name = ?1", [name])? > 0)
    }

    /// The MQTT identity named `name`, if there is one.
    pub fn identity(&self, name: &str) -> Result<Option<Identity>, StoreError> {
        let c = self.conn.lock().unwrap();
        Ok(c.query_row(
            "SELECT name, role, hash, created_at FROM mqtt_identities WHERE name = ?1",
            [name],
            row_to_identity,
        )
        .optional()?)
    }

    /// Every MQTT identity, by name.
    pub fn identities(&self) -> Result<Vec<Identity>, StoreError> {
        let c = self.conn.lock().unwrap();
        let mut st =
            c.prepare("SELECT name, role, hash, created_at FROM mqtt_identities ORDER BY name")?;
        let rows = st.query_map([], row_to_identity)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn operator(
        &self,
        id: &str,
        action: &'static str,
        to: impl Fn(DeploymentState, Option<&str>) -> Option<DeploymentState>,
    ) -> Result<Deployment, StoreError> {
        {
            let mut c = self.conn.lock().unwrap();
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let (state, reason): (DeploymentState, Option<String>) = tx
                .query_row(
                    "SELECT state, reason FROM deployments WHERE id = ?1",
                    [id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?
                .ok_or_else(|| StoreError::UnknownDeployment(id.to_owned()))?;
            let Some(new) = to(state, reason.as_deref()) else {
                let state = if state == DeploymentState::Running && reason.is_some() {
                    "stopping for failures".to_owned()
                } else {
                    state.as_str().to_owned()
                };
                return Err(StoreError::NotAllowed {
                    id: id.to_owned(),
                    state,
                    action,
                });
            };
            let now = unix_now();
            let reason = if new == DeploymentState::Stopped {
                Some(crate::machine::STOPPED_BY_OPERATOR.to_owned())
            } else {
                reason
            };
            tx.execute(
                "UPDATE deployments SET state = ?2, reason = ?3, updated_at = ?4 WHERE id = ?1",
                params![id, new, reason, now],
            )?;
            if new == DeploymentState::Stopped {
                tx.execute(
                    "UPDATE deployment_devices SET state = 'skipped', error = 'rollout stopped',
                     updated_at = ?2 WHERE deployment = ?1 AND state = 'pending'",
                    params![id, now],
                )?;
            }
            tx.commit()?;
        }
        self.deployment(id)
    }
}

fn unfinished_deployment_of(c: &Connection, device: &str) -> Result<Option<String>, StoreError> {
    Ok(c.query_row(
        "SELECT d.id FROM deployment_devices dd JOIN deployments d ON d.id = dd.deployment
         WHERE dd.device = ?1 AND d.state IN ('running', 'paused')
         ORDER BY d.created_at LIMIT 1",
        [device],
        |r| r.get(0),
    )
    .optional()?)
}

fn claim_of(c: &Connection, id: &str) -> Result<Option<Claim>, StoreError> {
    Ok(c.query_row(
        "SELECT holder, expires_at_ms FROM deployment_claims WHERE deployment = ?1",
        [id],
        |r| {
            Ok(Claim {
                holder: r.get(0)?,
                expires_at_ms: r.get(1)?,
            })
        },
    )
    .optional()?)
}

fn row_to_identity(r: &rusqlite::Row<'_>) -> rusqlite::Result<Identity> {
    Ok(Identity {
        name: r.get(0)?,
        role: r.get(1)?,
        hash: r.get(2)?,
        created_at: r.get(3)?,
    })
}

fn row_to_deployment(r: &rusqlite::Row<'_>) -> rusqlite::Result<Deployment> {
    let options: String = r.get(6)?;
    Ok(Deployment {
        id: r.get(0)?,
        firmware: r.get(1)?,
        url: r.get(2)?,
        version: r.get(3)?,
        sha256: r.get(4)?,
        size: r.get(5)?,
        // The options drive what a resume sends: unreadable is an error,
        // not a default.
        options: serde_json::from_str(&options).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(6, rusqlite::types::Type::Text, Box::new(e))
        })?,
        state: r.get(7)?,
        reason: r.get(8)?,
        created_at: r.get(9)?,
        updated_at: r.get(10)?,
        devices: Vec::new(),
    })
}

fn with_devices(c: &Connection, mut d: Deployment) -> Result<Deployment, StoreError> {
    let mut st = c.prepare(
        "SELECT device, stage, state, error, from_version, updated_at, log FROM deployment_devices
         WHERE deployment = ?1 ORDER BY stage, device",
    )?;
    let rows = st.query_map([&d.id], |r| {
        let log: Option<String> = r.get(6)?;
        Ok(DeploymentDevice {
            device: r.get(0)?,
            stage: r.get(1)?,
            state: r.get(2)?,
            error: r.get(3)?,
            from_version: r.get(4)?,
            updated_at: r.get(5)?,
            // Like the options: a log this build cannot read is an error,
            // not silently nothing.
            log: log
                .map(|t| serde_json::from_str(&t))
                .transpose()
                .map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(
                        6,
                        rusqlite::types::Type::Text,
                        Box::new(e),
                    )
                })?,
        })
    })?;
    d.devices = rows.collect::<Result<_, _>>()?;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(id: &str) -> Deployment {
        Deployment {
            id: id.into(),
            firmware: "app-1.1.0.bin".into(),
            url: "http://h/firmware/app-1.1.0.bin".into(),
            version: "1.1.0".into(),
            sha256: "00".repeat(32),
            size: 4096,
            options: serde_json::json!({"canary": 1}),
            state: DeploymentState::Running,
            reason: None,
            created_at: 1,
            updated_at: 1,
            devices: vec![
                DeploymentDevice {
                    device: "a".into(),
                    stage: 0,
                    state: DeviceState::Sent,
                    error: None,
                    from_version: Some("1.0.0".into()),
                    updated_at: 1,
                    log: None,
                },
                DeploymentDevice {
                    device: "b".into(),
                    stage: 1,
                    state: DeviceState::Pending,
                    error: None,
                    from_version: Some("1.0.0".into()),
                    updated_at: 1,
                    log: None,
                },
            ],
        }
    }

    #[test]
    fn a_deployment_and_its_results_survive_reopening_the_store() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.create_deployment(&deployment("d-1")).unwrap();
            s.set_device_state(
                "d-1",
                "a",
                DeviceState::RolledBack,
                Some("health_check_failed"),
            )
            .unwrap();
            s.set_deployment_state("d-1", DeploymentState::Failed, Some("1 of 1 failed"))
                .unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let d = s.deployment("d-1").unwrap();
        assert_eq!(d.state, DeploymentState::Failed);
        assert_eq!(d.reason.as_deref(), Some("1 of 1 failed"));
        assert_eq!(d.devices[0].state, DeviceState::RolledBack);
        assert_eq!(d.devices[0].error.as_deref(), Some("health_check_failed"));
        assert_eq!(d.devices[1].state, DeviceState::Pending);
        assert_eq!(s.deployments().unwrap().len(), 1);
    }

    #[test]
    fn only_status_changes_enter_the_history() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let v1 = serde_json::json!({"version": "1.0.0"});
        let v2 = serde_json::json!({"version": "1.1.0"});
        s.record_status("a", &v1).unwrap();
        s.record_status("a", &v1).unwrap();
        s.record_status("a", &v2).unwrap();
        let h = s.history("a").unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[1].data, v2);
        assert_eq!(s.devices().unwrap()[0].status, v2);
        assert_eq!(
            s.device_ids().unwrap(),
            [s.devices().unwrap()[0].id.clone()]
        );
    }

    #[test]
    fn an_unknown_deployment_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert!(matches!(
            s.deployment("nope"),
            Err(StoreError::UnknownDeployment(id)) if id == "nope"
        ));
    }

    #[test]
    fn an_unknown_state_string_fails_loudly_instead_of_reading_as_running() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.create_deployment(&deployment("d-1")).unwrap();
        {
            let c = s.conn.lock().unwrap();
            c.execute(
                "UPDATE deployment_devices SET state = 'sennt' WHERE device = 'b'",
                [],
            )
            .unwrap();
        }
        let err = s.deployment("d-1").unwrap_err().to_string();
        assert!(err.contains("unknown device state \"sennt\""), "{err}");
        {
            let c = s.conn.lock().unwrap();
            c.execute("UPDATE deployments SET state = 'runing'", [])
                .unwrap();
        }
        let err = s.deployment_state("d-1").unwrap_err().to_string();
        assert!(err.contains("unknown deployment state \"runing\""), "{err}");
        {
            let c = s.conn.lock().unwrap();
            c.execute("UPDATE deployment_devices SET state = 'pending'", [])
                .unwrap();
            c.execute("UPDATE deployments SET state = 'running'", [])
                .unwrap();
        }
        s.deployment("d-1").unwrap();
        {
            let c = s.conn.lock().unwrap();
            c.execute("UPDATE deployments SET options = '{'", [])
                .unwrap();
        }
        let err = s.deployment("d-1").unwrap_err().to_string();
        assert!(
            err.contains("EOF while parsing"),
            "unreadable options are an error: {err}"
        );
        {
            let c = s.conn.lock().unwrap();
            c.execute(
                "UPDATE deployments SET state = 'runing', options = '{}'",
                [],
            )
            .unwrap();
        }
        let err = s.deployment_state("d-1").unwrap_err().to_string();
        assert!(err.contains("unknown deployment state \"runing\""), "{err}");
        assert!(s.deployments().is_err());
    }

    #[test]
    fn a_database_from_before_versioning_is_migrated_and_its_rollback_marks_become_a_state() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
            c.execute_batch(MIGRATIONS[0]).unwrap();
            c.execute_batch(
                "INSERT INTO deployments VALUES ('d-1','f','u','1.1.0','00',1,'{}','running','1 of 2 failed',1,1);
                 INSERT INTO deployment_devices VALUES ('d-1','a',0,'done','rollback sent','1.0.0',1);
                 INSERT INTO deployment_devices VALUES ('d-1','b',0,'done',NULL,'1.0.0',1);",
            )
            .unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let d = s.deployment("d-1").unwrap();
        assert_eq!(d.devices[0].state, DeviceState::RollbackSent);
        assert_eq!(d.devices[0].error, None);
        assert_eq!(d.devices[1].state, DeviceState::Done);
        let v: i64 = s
            .conn
            .lock()
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        drop(s);
        // Opening again changes nothing.
        Store::open(dir.path()).unwrap();
    }

    #[test]
    fn a_failed_jobs_log_is_kept_with_its_result_and_a_version_2_database_gains_the_column() {
        let dir = tempfile::tempdir().unwrap();
        {
            // A database as version 2 left it, with a deployment in it.
            let mut c = Connection::open(dir.path().join(DB_FILE)).unwrap();
            for m in &MIGRATIONS[..2] {
                c.execute_batch(m).unwrap();
            }
            c.pragma_update(None, "user_version", 2).unwrap();
            let tx = c.transaction().unwrap();
            tx.execute_batch(
                "INSERT INTO deployments VALUES ('d-1','f','u','1.1.0','00',1,'{}','running',NULL,1,1,'serve');
                 INSERT INTO deployment_devices VALUES ('d-1','a',0,'rolled_back','health_check_failed','1.0.0',1);",
            )
            .unwrap();
            tx.commit().unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let d = s.deployment("d-1").unwrap();
        assert_eq!(d.devices[0].log, None, "no log until one is read");
        let log = JobLog {
            fetched_at: 5,
            records: vec![mqota_core::protocol::LogRecord {
                n: 3,
                boot: 2,
                ms: 1500,
                level: mqota_core::protocol::LogLevel::Error,
                msg: heapless::String::try_from("trial failed: health check failed").unwrap(),
            }],
            line: Some("trial failed: health check failed".into()),
            error: None,
        };
        s.set_device_log("d-1", "a", &log).unwrap();
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        let d = s.deployment("d-1").unwrap();
        assert_eq!(d.devices[0].log.as_ref(), Some(&log));
        assert_eq!(d.devices[0].state, DeviceState::RolledBack);
        assert!(matches!(
            s.set_device_log("d-2", "a", &log),
            Err(StoreError::UnknownDeployment(_))
        ));
        // Strict like the rest: a log this build cannot read is an error.
        s.conn
            .lock()
            .unwrap()
            .execute("UPDATE deployment_devices SET log = '{\"records\": 1}'", [])
            .unwrap();
        assert!(s.deployment("d-1").is_err());
    }

    #[test]
    fn a_database_of_a_newer_mqota_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
            c.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
                .unwrap();
        }
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::NewerSchema { .. }), "{err}");
    }

    #[test]
    fn one_holder_at_a_time_claims_a_deployment_and_a_lapsed_claim_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        // Two processes on the same file, as serve and deploy are.
        let other = Store::open(dir.path()).unwrap();
        s.create_deployment(&deployment("d-1")).unwrap();
        let lease = std::time::Duration::from_secs(10);
        let (a, b) = ("serve pid 1 #aaaaaa", "deploy pid 2 #bbbbbb");
        assert!(matches!(
            s.claim("nope", a, 0, lease),
            Err(StoreError::UnknownDeployment(_))
        ));
        assert_eq!(s.claim("d-1", a, 1_000, lease).unwrap(), Ok(()));
        let held = Claim {
            holder: a.into(),
            expires_at_ms: 11_000,
        };
        assert_eq!(
            other.claim("d-1", b, 10_999, lease).unwrap(),
            Err(held.clone())
        );
        assert_eq!(other.claim_in_force("d-1", 10_999).unwrap(), Some(held));
        // The holder renews: the lease starts again from then.
        assert_eq!(s.claim("d-1", a, 8_000, lease).unwrap(), Ok(()));
        assert!(other.claim("d-1", b, 17_999, lease).unwrap().is_err());
        // Not renewed: at its expiry the other process takes it over, and
        // the old holder is then refused.
        assert_eq!(other.claim_in_force("d-1", 18_000).unwrap(), None);
        assert_eq!(other.claim("d-1", b, 18_000, lease).unwrap(), Ok(()));
        let now_b = Claim {
            holder: b.into(),
            expires_at_ms: 28_000,
        };
        assert_eq!(s.claim("d-1", a, 18_001, lease).unwrap(), Err(now_b));
        // Releasing someone else's claim does nothing; its holder's does.
        s.release("d-1", a).unwrap();
        assert!(s.claim_in_force("d-1", 18_001).unwrap().is_some());
        other.release("d-1", b).unwrap();
        assert_eq!(s.claim_in_force("d-1", 18_001).unwrap(), None);
        assert_eq!(s.claim("d-1", a, 18_002, lease).unwrap(), Ok(()));
    }

    #[test]
    fn history_is_paged_newest_last_and_pruned_by_age_and_count() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        for i in 0..5 {
            s.record_status("a", &serde_json::json!({"n": i})).unwrap();
            s.record_status("b", &serde_json::json!({"n": i})).unwrap();
        }
        let n = |page: &[HistoryEntry]| -> Vec<i64> {
            page.iter().map(|e| e.data["n"].as_i64().unwrap()).collect()
        };
        let (page, next) = s.history_page("a", None, 2).unwrap();
        assert_eq!(n(&page), [3, 4]);
        let (page, next) = s.history_page("a", next, 2).unwrap();
        assert_eq!(n(&page), [1, 2]);
        let (page, last) = s.history_page("a", next, 2).unwrap();
        assert_eq!((n(&page), last), (vec![0], None));
        assert_eq!(n(&s.history("a").unwrap()), [0, 1, 2, 3, 4]);

        // Everything recorded "now": nothing is older than a day; the count
        // leaves each device its newest three.
        let now = unix_now();
        let keep3 = Retention {
            max_age: std::time::Duration::from_secs(86_400),
            max_entries: 3,
        };
        assert_eq!(s.prune_history(now, &keep3).unwrap(), 4);
        assert_eq!(n(&s.history("a").unwrap()), [2, 3, 4]);
        assert_eq!(n(&s.history("b").unwrap()), [2, 3, 4]);
        assert_eq!(s.prune_history(now, &keep3).unwrap(), 0);
        // A day later, all of it is past the age.
        assert_eq!(s.prune_history(now + 86_401, &keep3).unwrap(), 6);
        assert!(s.history("a").unwrap().is_empty());
        // The devices themselves stay: retention is about their history.
        assert_eq!(s.devices().unwrap().len(), 2);
    }

    #[test]
    fn progress_of_an_id_without_a_status_is_not_recorded_and_forget_removes_a_device() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let ev = serde_json::json!({"phase": "failed"});
        assert!(!s.record_progress("ghost", &ev).unwrap());
        assert!(s.history("ghost").unwrap().is_empty());
        s.record_status("a", &serde_json::json!({"v": 1})).unwrap();
        assert!(s.record_progress("a", &ev).unwrap());
        assert_eq!(s.history("a").unwrap().len(), 2);

        // In a deployment not over: refused, naming it.
        let mut d = deployment("d-1");
        d.devices[0].device = "a".into();
        s.create_deployment(&d).unwrap();
        let err = s.forget_device("a").unwrap_err().to_string();
        assert!(err.contains("is in deployment d-1"), "{err}");
        s.stop("d-1").unwrap();
        assert!(s.forget_device("a").unwrap());
        assert!(s.devices().unwrap().is_empty());
        assert!(s.history("a").unwrap().is_empty());
        assert!(!s.forget_device("a").unwrap(), "already gone");
        // Its result stays with the deployment.
        assert_eq!(s.deployment("d-1").unwrap().devices[0].device, "a");
    }

    #[test]
    fn operator_commands_move_a_deployment_only_where_its_state_allows() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.create_deployment(&deployment("d-1")).unwrap();
        assert!(matches!(
            s.resume("nope"),
            Err(StoreError::UnknownDeployment(_))
        ));
        assert_eq!(s.pause("d-1").unwrap().state, DeploymentState::Paused);
        let err = s.pause("d-1").unwrap_err();
        assert!(err.to_string().contains("is paused: cannot pause"), "{err}");
        assert_eq!(s.resume("d-1").unwrap().state, DeploymentState::Running);
        assert_eq!(s.resume("d-1").unwrap().state, DeploymentState::Running);
        let d = s.stop("d-1").unwrap();
        assert_eq!(d.state, DeploymentState::Stopped);
        assert_eq!(
            d.reason.as_deref(),
            Some(crate::machine::STOPPED_BY_OPERATOR)
        );
        assert_eq!(
            d.devices[0].state,
            DeviceState::Sent,
            "in flight: the runner cancels it"
        );
        assert_eq!(d.devices[1].state, DeviceState::Skipped);
        for (name, r) in [
            ("stop", s.stop("d-1")),
            ("resume", s.resume("d-1")),
            ("pause", s.pause("d-1")),
        ] {
            let err = r.unwrap_err().to_string();
            assert!(err.contains(&format!("is stopped: cannot {name}")), "{err}");
        }
        // Stopping for failures: the stop (and rollback) is left to finish.
        s.create_deployment(&deployment("d-2")).unwrap();
        s.set_deployment_state("d-2", DeploymentState::Running, Some("1 of 1 failed"))
            .unwrap();
        let err = s.stop("d-2").unwrap_err().to_string();
        assert!(err.contains("stopping for failures"), "{err}");
        assert!(s.pause("d-2").is_err());
    }

    #[test]
    fn identities_are_kept_by_name_once_and_an_unknown_role_fails_loudly() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let id = Identity {
            name: "dev-1".into(),
            role: Role::Device,
            hash: "$7$101$x$y".into(),
            created_at: 1,
        };
        s.add_identity(&id).unwrap();
        let again = s.add_identity(&id).unwrap_err().to_string();
        assert!(again.contains("already has MQTT credentials"), "{again}");
        assert_eq!(s.identity("dev-1").unwrap(), Some(id.clone()));
        assert_eq!(s.identities().unwrap(), vec![id]);
        s.conn
            .lock()
            .unwrap()
            .execute("UPDATE mqtt_identities SET role = 'admin'", [])
            .unwrap();
        let err = s.identity("dev-1").unwrap_err().to_string();
        assert!(
            err.contains("unknown identity role state \"admin\""),
            "{err}"
        );
        assert!(s.remove_identity("dev-1").unwrap());
        assert!(!s.remove_identity("dev-1").unwrap());
    }
}

//! The web page of `mqota serve` and the routes behind it that need the
//! broker connection.
//!
//! | route | answer |
//! |---|---|
//! | `GET /` | the page: fleet table (search, filters, sorting, pages), firmware with a deploy form, deployments; live through `/api/events`, polling the API only while that stream keeps failing |
//! | `GET /dashboard.js` | its script |
//! | `GET /api/events` | Server-Sent Events: a `snapshot` first, then numbered `change`, `deployments` and `gaps` events (see [`api_events`]) |
//! | `GET /api/fleet` | `[{id, status, online, progress}]`: every retained status, availability and the latest progress event, live from the broker; header `x-mqota-fleet-complete: true` or `false` with the reasons in `x-mqota-fleet-gaps` (broker unreachable, replay cut, devices in the store without a retained status) |
//! | `POST /api/deployments` | starts a staged rollout inside serve; `201 {id, version, devices, stages, current, no_https}`; `503` while the broker is unreachable |
//! | `POST /api/deployments/preview` | the same body, nothing started: `200 {version, stages, devices: [{device, stage, from_version}], skipped: {current, offline, wrong_chip, other_project, downgrade, unsigned, no_https}, in_deployment, notes}`; `400` with the reason when no device would be touched |
//! | `POST /api/deployments/{id}/retry` | a new deployment (same firmware, same options) to the devices whose job in `id` failed, rolled back, was cancelled or timed out: `201` as above; `409` while `id` runs or when none failed |
//! | `GET /api/health` | `{broker_connected, devices, online, rollouts_running, rollouts_paused, logged_in}` |
//! | `GET /api/devices/{id}/log?max=N` | the device's newest `N` (default 64, at most 512) field-log records, read over MQTT now ([`crate::logs`]): `{device, newest, lost_chunks, records}`; `404` for a device the fleet does not know, `409` while it is offline, `504` when it does not answer within [`DEVICE_LOG_LIMIT`] |
//!
//! The body of `POST /api/deployments` mirrors `mqota deploy`'s options:
//!
//! ```json
//! {"firmware": "app-1.1.0.bin", "all": true, "canary": 2, "batch": "50%",
//!  "max_failures": "0", "auto_rollback": true, "timeout": 600,
//!  "include_offline": false, "allow_downgrade": false, "allow_other_project": false}
//! ```
//!
//! exactly one of `"to": ["id", ...]`, `"all": true` or `"where":
//! "chip=esp32c3,version=1.0.0"`; `batch` and `max_failures` are a count or
//! a percentage (`5`, `"25%"`); `firmware` is a catalogue name or an
//! `http(s)://` URL. Anything else is answered `400 {"error": "..."}`.
//!
//! The rollout is [`rollout::create`]d and [`rollout::run`] exactly as
//! `deploy` does it, recorded in the same store, so `deploy --resume ID`
//! can carry on a rollout whose serve was stopped.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc};

use crate::catalogue::{resolve_firmware, FirmwareError};
use crate::fleet::{Fleet, FleetEvent};
use crate::http::{api_error, listings, AppState};
use crate::rollout::{self, Amount, RolloutError, RolloutOptions, Selection};

const PAGE: &str = include_str!("dashboard.html");
const SCRIPT: &str = include_str!("dashboard.js");

// Everything the page needs is served from here; nothing else may load or
// run, so a device id or error text that slips past the page's escaping
// still cannot fetch or execute anything.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; \
                   connect-src 'self'; img-src 'self'; form-action 'none'; frame-ancestors 'none'";

#[derive(Clone)]
struct Dashboard {
    app: Arc<AppState>,
    fleet: Arc<Fleet>,
    rollouts: rollout::Runner,
}

/// The page and its routes, for merging into [`crate::http::router`]'s.
///
/// Rollouts begun through `POST /api/deployments` are handed to `rollouts`,
/// serve's one [`rollout::Runner`] (the same that resumes deployments and
/// obeys pause/resume/stop), so the page keeps no rollout thread of its own.
pub fn router(app: Arc<AppState>, fleet: Arc<Fleet>, rollouts: rollout::Runner) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/dashboard.js", get(script))
        .route("/api/fleet", get(api_fleet))
        .route("/api/events", get(api_events))
        .route("/api/devices/{id}/log", get(api_device_log))
        // Merged with the `GET` of the same path in `http::router`.
        .route("/api/deployments", post(api_deploy))
        .route("/api/deployments/preview", post(api_preview))
        .route("/api/deployments/{id}/retry", post(api_retry))
        .route("/api/health", get(api_health))
        .route("/api/devices/commands", post(api_device_commands))
        .with_state(Dashboard {
            app,
            fleet,
            rollouts,
        })
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        SCRIPT,
    )
        .into_response()
}

/// Response header of `GET /api/fleet`: `true` when nothing suggests the
/// picture is incomplete, else `false` with the reasons in
/// [`FLEET_GAPS_HEADER`].
pub const FLEET_COMPLETE_HEADER: &str = "x-mqota-fleet-complete";
/// Response header of `GET /api/fleet`: why the picture may be incomplete
/// (see [`Fleet::gaps`]), sentences joined by `; `.
pub const FLEET_GAPS_HEADER: &str = "x-mqota-fleet-gaps";

async fn api_fleet(State(d): State<Dashboard>) -> Response {
    let store = d.app.store.clone();
    let recorded = tokio::task::spawn_blocking(move || store.devices())
        .await
        .ok()
        .and_then(Result::ok)
        .map(|list| list.into_iter().map(|s| s.id).collect::<Vec<_>>())
        .unwrap_or_default();
    let gaps = d.fleet.gaps(&recorded);
    let mut resp = Json(d.fleet.devices()).into_response();
    let h = resp.headers_mut();
    h.insert(
        FLEET_COMPLETE_HEADER,
        HeaderValue::from_static(if gaps.is_empty() { "true" } else { "false" }),
    );
    if !gaps.is_empty() {
        let text: String = gaps
            .join("; ")
            .chars()
            .map(|c| {
                if c.is_ascii() && !c.is_ascii_control() {
                    c
                } else {
                    '?'
                }
            })
            .collect();
        if let Ok(v) = HeaderValue::from_str(&text) {
            h.insert(FLEET_GAPS_HEADER, v);
        }
    }
    resp
}

/// `GET /api/health`: the broker and the controller at a glance.
///
/// What `POST /api/devices/commands` asks: one command for several devices.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceCommands {
    /// `rollback` (boot the previous image again) or `cancel` (stop the
    /// update in flight).
    command: String,
    /// The devices, each known and online.
    devices: Vec<String>,
}

/// Most devices one `POST /api/devices/commands` may name.
const MAX_COMMAND_DEVICES: usize = 10_000;

/// `POST /api/devices/commands` `{command: "rollback"|"cancel", devices}`:
/// sends the command to each device, as `mqota rollback` / `cancel` do, and
/// answers `202 {command, job, sent}` at once; the devices' answers arrive
/// on the event stream like any progress. Nothing is sent unless every
/// device is known (404) and online (409), and the broker is reachable (503).
async fn api_device_commands(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = refuse_unless_json(&headers, "command") {
        return refused;
    }
    let req: DeviceCommands = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(format!("bad command request: {e}")),
    };
    let rollback = match req.command.as_str() {
        "rollback" => true,
        "cancel" => false,
        other => return bad_request(format!("unknown command {:?}: rollback or cancel", other)),
    };
    if req.devices.is_empty() || req.devices.len() > MAX_COMMAND_DEVICES {
        return bad_request(format!("name 1 to {MAX_COMMAND_DEVICES} devices"));
    }
    if !d.fleet.connected() {
        return api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the broker is unreachable: the command would be lost",
        );
    }
    for id in &req.devices {
        match d.fleet.device(id) {
            Some(x) if x.status.is_some() && x.online => {}
            Some(x) if x.status.is_some() => {
                return api_error(
                    StatusCode::CONFLICT,
                    format!(
                        "device {:?} is offline: it would not receive the {}",
                        id, req.command
                    ),
                )
            }
            _ => {
                return api_error(
                    StatusCode::NOT_FOUND,
                    format!("device {:?} is not known", id),
                )
            }
        }
    }
    // A rollback's events carry the job named in it, so its answer cannot
    // be confused with an older one.
    let job =
        rollback.then(|| format!("rb-{}", ulid::Ulid::new().to_string().to_ascii_lowercase()));
    for id in &req.devices {
        let sent = if rollback {
            d.fleet.rollback(id, job.as_deref()).await
        } else {
            d.fleet.cancel(id, None).await
        };
        if let Err(e) = sent {
            return api_error(StatusCode::SERVICE_UNAVAILABLE, e);
        }
    }
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({
            "command": req.command,
            "job": job,
            "sent": req.devices,
        })),
    )
        .into_response()
}

/// `{broker_connected, devices, online, rollouts_running, rollouts_paused,
/// logged_in}`; `logged_in` names the accounts with a live session.
async fn api_health(State(d): State<Dashboard>) -> Response {
    let devices = d.fleet.devices();
    let online = devices.iter().filter(|v| v.online).count();
    let store = d.app.store.clone();
    let read = tokio::task::spawn_blocking(move || {
        let deployments = store.deployments()?;
        let logged_in = store.logged_in(crate::unix_now())?;
        Ok::<_, crate::store::StoreError>((deployments, logged_in))
    })
    .await;
    let (deployments, logged_in) = match read {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => return api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let count =
        |s: crate::store::DeploymentState| deployments.iter().filter(|x| x.state == s).count();
    Json(serde_json::json!({
        "broker_connected": d.fleet.connected(),
        "devices": devices.len(),
        "online": online,
        "rollouts_running": count(crate::store::DeploymentState::Running),
        "rollouts_paused": count(crate::store::DeploymentState::Paused),
        "logged_in": logged_in,
    }))
    .into_response()
}

/// How often at most `/api/events` sends the changed devices: progress
/// events of a whole fleet are coalesced to one `change` event per period.
pub const EVENTS_COALESCE: Duration = Duration::from_millis(250);

/// How often at least `/api/events` looks for changed deployments and gaps;
/// after a device's status or progress changed it looks at the next
/// [`EVENTS_COALESCE`] tick, as that is when a rollout moves on.
pub const EVENTS_OVERVIEW: Duration = Duration::from_secs(1);

/// `GET /api/events`: the fleet live, as Server-Sent Events. Every event's
/// `id` is a number one higher than the one before, and its data is JSON
/// with that number as `seq`:
///
/// * `snapshot` `{seq, devices, deployments, gaps}`: everything, first on
///   every connection and again whenever this stream fell behind the
///   fleet's events (a client replaces what it has);
/// * `change` `{seq, devices, removed}`: the devices whose status,
///   availability or progress changed (each as in `/api/fleet`) and the ids
///   whose status was cleared, at most one per [`EVENTS_COALESCE`];
/// * `deployments` `{seq, deployments}`: every deployment as in
///   `/api/deployments`, when one changed (see [`EVENTS_OVERVIEW`]);
/// * `gaps` `{seq, gaps}`: why the picture may be incomplete, when that
///   changed (as `/api/fleet`'s `x-mqota-fleet-gaps`).
async fn api_events(
    State(d): State<Dashboard>,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = mpsc::channel::<Event>(16);
    // Subscribed before the snapshot is taken, so nothing falls between.
    let events = d.fleet.events();
    tokio::spawn(follow(d, events, tx));
    let stream =
        futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
        );
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// Deployments and gaps as JSON, read off the store on a blocking thread.
async fn overview(d: &Dashboard) -> (serde_json::Value, serde_json::Value) {
    let store = d.app.store.clone();
    let read = tokio::task::spawn_blocking(move || {
        let deployments = store.deployments().ok();
        let recorded: Vec<String> = store
            .devices()
            .map(|l| l.into_iter().map(|s| s.id).collect())
            .unwrap_or_default();
        (deployments, recorded)
    })
    .await;
    let (deployments, recorded) = read.unwrap_or_default();
    (
        serde_json::to_value(deployments.unwrap_or_default()).unwrap_or_default(),
        serde_json::to_value(d.fleet.gaps(&recorded)).unwrap_or_default(),
    )
}

fn sse(kind: &str, seq: u64, mut data: serde_json::Value) -> Event {
    data["seq"] = seq.into();
    Event::default()
        .event(kind)
        .id(seq.to_string())
        .data(data.to_string())
}

/// Feeds one `/api/events` stream until its client goes away.
async fn follow(
    d: Dashboard,
    mut events: broadcast::Receiver<FleetEvent>,
    tx: mpsc::Sender<Event>,
) {
    let mut seq = 1u64;
    let (mut deployments, mut gaps) = overview(&d).await;
    let snapshot = |seq, deployments: &serde_json::Value, gaps: &serde_json::Value| {
        sse(
            "snapshot",
            seq,
            serde_json::json!({
                "devices": d.fleet.devices(),
                "deployments": deployments,
                "gaps": gaps,
            }),
        )
    };
    if tx.send(snapshot(seq, &deployments, &gaps)).await.is_err() {
        return;
    }
    let mut dirty = BTreeSet::<String>::new();
    let mut flush = tokio::time::interval(EVENTS_COALESCE);
    let mut look = tokio::time::interval(EVENTS_COALESCE);
    // A slow store read or client delays the next tick; no burst follows.
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut since_look = Duration::ZERO;
    // A status or progress event came since the last look at the store.
    let mut nudged = false;
    loop {
        let event = tokio::select! {
            ev = events.recv() => {
                match ev {
                    Ok(FleetEvent::Status(s)) => {
                        nudged = true;
                        dirty.insert(s.device.to_string());
                    }
                    Ok(FleetEvent::Progress(p)) => {
                        nudged = true;
                        dirty.insert(p.device.to_string());
                    }
                    Ok(FleetEvent::Removed(id) | FleetEvent::Availability { id, .. }) => {
                        dirty.insert(id);
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Changes were missed: start over from a snapshot.
                        dirty.clear();
                        seq += 1;
                        if tx.send(snapshot(seq, &deployments, &gaps)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
                continue;
            }
            _ = flush.tick(), if !dirty.is_empty() => {
                let (mut changed, mut removed) = (Vec::new(), Vec::new());
                for id in std::mem::take(&mut dirty) {
                    match d.fleet.device(&id) {
                        Some(v) => changed.push(v),
                        None => removed.push(id),
                    }
                }
                seq += 1;
                sse("change", seq, serde_json::json!({"devices": changed, "removed": removed}))
            }
            _ = look.tick() => {
                since_look += EVENTS_COALESCE;
                if !nudged && since_look < EVENTS_OVERVIEW {
                    continue;
                }
                (nudged, since_look) = (false, Duration::ZERO);
                let (dep, gap) = overview(&d).await;
                if gap != gaps {
                    gaps = gap;
                    seq += 1;
                    let e = sse("gaps", seq, serde_json::json!({"gaps": gaps}));
                    if tx.send(e).await.is_err() {
                        return;
                    }
                }
                if dep == deployments {
                    continue;
                }
                deployments = dep;
                seq += 1;
                sse("deployments", seq, serde_json::json!({"deployments": deployments}))
            }
            _ = tx.closed() => return,
        };
        if tx.send(event).await.is_err() {
            return;
        }
    }
}

/// The longest `GET /api/devices/{id}/log` waits for the device.
pub const DEVICE_LOG_LIMIT: Duration = Duration::from_secs(10);

#[derive(Debug, Deserialize)]
struct LogQuery {
    max: Option<u16>,
}

async fn api_device_log(
    State(d): State<Dashboard>,
    axum::extract::Path(id): axum::extract::Path<String>,
    axum::extract::Query(q): axum::extract::Query<LogQuery>,
) -> Response {
    let Some(view) = d.fleet.device(&id) else {
        return api_error(
            StatusCode::NOT_FOUND,
            format!("no device {id:?} in the fleet"),
        );
    };
    if !view.online {
        return api_error(
            StatusCode::CONFLICT,
            format!("device {id} is offline: its log can be read once it is connected again"),
        );
    }
    let max = q
        .max
        .unwrap_or(mqota_core::protocol::DEFAULT_LOGS_MAX)
        .clamp(1, 512);
    let hint = view.status.as_ref().and_then(|s| s.log_newest);
    let read = tokio::time::timeout(
        DEVICE_LOG_LIMIT,
        crate::logs::fetch_last(
            d.fleet.broker_url(),
            d.fleet.prefix(),
            &id,
            hint,
            max,
            Duration::from_secs(3),
        ),
    )
    .await;
    match read {
        Ok(Ok(f)) => Json(serde_json::json!({
            "device": id,
            "newest": f.newest,
            "lost_chunks": f.lost_chunks,
            "records": f.records,
        }))
        .into_response(),
        Ok(Err(e @ crate::logs::LogsError::NoAnswer { .. })) => {
            api_error(StatusCode::GATEWAY_TIMEOUT, e)
        }
        Ok(Err(e @ crate::logs::LogsError::BadTopic { .. })) => {
            api_error(StatusCode::BAD_REQUEST, e)
        }
        Ok(Err(e)) => api_error(StatusCode::BAD_GATEWAY, e),
        Err(_) => api_error(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "device {id} did not answer within {} s",
                DEVICE_LOG_LIMIT.as_secs()
            ),
        ),
    }
}

/// A count or a percentage as JSON: `5`, `"5"` or `"25%"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum AmountValue {
    Count(usize),
    Text(String),
}

impl AmountValue {
    fn amount(&self, field: &str) -> Result<Amount, String> {
        match self {
            AmountValue::Count(n) => Ok(Amount::Count(*n)),
            AmountValue::Text(s) => s.parse().map_err(|e| format!("{field}: {e}")),
        }
    }
}

/// The body of `POST /api/deployments`; the names of `mqota deploy`'s
/// options.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployRequest {
    firmware: String,
    #[serde(default)]
    to: Vec<String>,
    #[serde(default)]
    all: bool,
    #[serde(rename = "where")]
    where_: Option<String>,
    #[serde(default)]
    canary: usize,
    batch: Option<AmountValue>,
    max_failures: Option<AmountValue>,
    #[serde(default)]
    auto_rollback: bool,
    timeout: Option<u32>,
    #[serde(default)]
    include_offline: bool,
    #[serde(default)]
    allow_downgrade: bool,
    #[serde(default)]
    allow_other_project: bool,
}

impl DeployRequest {
    fn selection(&self) -> Result<Selection, String> {
        let to: Vec<String> = self
            .to
            .iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        let given = [!to.is_empty(), self.all, self.where_.is_some()];
        match given {
            [true, false, false] => Ok(Selection::Ids(to)),
            [false, true, false] => Ok(Selection::All),
            [false, false, true] => Selection::parse_where(self.where_.as_deref().unwrap_or(""))
                .map_err(|e| e.to_string()),
            [false, false, false] => Err("say which devices: to, all or where".into()),
            _ => Err("give only one of to, all and where".into()),
        }
    }

    fn options(&self) -> Result<RolloutOptions, String> {
        let defaults = RolloutOptions::default();
        Ok(RolloutOptions {
            canary: self.canary,
            batch: match &self.batch {
                Some(b) => b.amount("batch")?,
                None => defaults.batch,
            },
            max_failures: match &self.max_failures {
                Some(m) => m.amount("max_failures")?,
                None => defaults.max_failures,
            },
            auto_rollback: self.auto_rollback,
            timeout_s: self.timeout.unwrap_or(defaults.timeout_s).max(1),
            include_offline: self.include_offline,
            allow_downgrade: self.allow_downgrade,
            allow_other_project: self.allow_other_project,
        })
    }
}

/// The refusal (415) of a state-changing request that is not JSON: a browser sends
/// one cross-site only after a CORS preflight, which this server never
/// grants, so another site cannot post `what` through a visitor's browser.
fn refuse_unless_json(headers: &HeaderMap, what: &str) -> Option<Response> {
    (!crate::accounts::is_json(headers)).then(|| {
        api_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("send the {what} as Content-Type: application/json"),
        )
    })
}

fn bad_request(msg: impl std::fmt::Display) -> Response {
    // serde_json's messages are one line already; the page and scripts
    // expect exactly one.
    let one_line = msg.to_string().replace(['\n', '\r'], " ");
    api_error(StatusCode::BAD_REQUEST, one_line)
}

/// What `POST /api/deployments` and its preview share: the body read and
/// checked, the firmware resolved (listed as `https://` when the request
/// came over TLS).
async fn prepare(
    d: &Dashboard,
    headers: &HeaderMap,
    body: &Bytes,
    https: bool,
) -> Result<(rollout::Firmware, Selection, RolloutOptions), Response> {
    if let Some(refused) = refuse_unless_json(headers, "deployment") {
        return Err(refused);
    }
    if !d.fleet.connected() {
        return Err(api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the broker is unreachable: no deployment can be sent or followed now",
        ));
    }
    let req: DeployRequest = serde_json::from_slice(body)
        .map_err(|e| bad_request(format!("bad deployment request: {e}")))?;
    let selection = req.selection().map_err(bad_request)?;
    let options = req.options().map_err(bad_request)?;
    let firmware = firmware_named(d, headers, &req.firmware, https).await?;
    Ok((firmware, selection, options))
}

/// The firmware `spec` names: a catalogue name or an `http(s)://` URL.
async fn firmware_named(
    d: &Dashboard,
    headers: &HeaderMap,
    spec: &str,
    https: bool,
) -> Result<rollout::Firmware, Response> {
    let spec = spec.trim();
    if spec.is_empty() {
        return Err(bad_request("name the firmware"));
    }
    let lower = spec.to_ascii_lowercase();
    let firmware = if lower.starts_with("http://") || lower.starts_with("https://") {
        resolve_firmware(spec, "", &d.app.remote_firmware).await
    } else {
        let list = listings(&d.app, headers, https)
            .await
            .map_err(|e| api_error(StatusCode::INTERNAL_SERVER_ERROR, e))?;
        crate::catalogue::deployable_named(spec, &list)
    };
    firmware.map_err(|e| match e {
        e @ FirmwareError::Fetch { .. } => api_error(StatusCode::BAD_GATEWAY, e),
        e => bad_request(e),
    })
}

/// `POST /api/deployments/preview`: what `POST /api/deployments` with the
/// same body would do, without doing it.
async fn api_preview(
    State(d): State<Dashboard>,
    https: Option<axum::Extension<crate::server::Https>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (firmware, selection, options) = match prepare(&d, &headers, &body, https.is_some()).await {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let devices = d.fleet.devices();
    let store = d.app.store.clone();
    let planned = tokio::task::spawn_blocking(move || {
        let planned = rollout::plan_deployment(&devices, &firmware, &selection, &options);
        let busy = store.devices_in_running_deployments();
        (planned, busy, firmware)
    })
    .await;
    let (planned, busy, firmware) = match planned {
        Ok(x) => x,
        Err(e) => return api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let busy = match busy {
        Ok(b) => b,
        Err(e) => return api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    match planned {
        Ok((dep, left_out)) => {
            let stages = dep.devices.iter().map(|x| x.stage).max().unwrap_or(0) + 1;
            let in_deployment: Vec<serde_json::Value> = dep
                .devices
                .iter()
                .filter_map(|x| {
                    let other = busy.get(&x.device)?;
                    Some(serde_json::json!({"device": x.device, "deployment": other}))
                })
                .collect();
            Json(serde_json::json!({
                "version": dep.version,
                "devices": dep.devices.iter().map(|x| serde_json::json!({
                    "device": x.device, "stage": x.stage, "from_version": x.from_version,
                })).collect::<Vec<_>>(),
                "stages": stages,
                "skipped": skipped_json(&left_out),
                "in_deployment": in_deployment,
                "notes": left_out.describe(&firmware.version),
            }))
            .into_response()
        }
        Err(
            e @ (RolloutError::Option(_)
            | RolloutError::UnknownDevice(_)
            | RolloutError::Offline(_)
            | RolloutError::NoDevices(_)),
        ) => bad_request(e),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// Who a deployment would skip, by reason, as the preview lists them.
fn skipped_json(l: &rollout::LeftOut) -> serde_json::Value {
    serde_json::json!({
        "current": l.current,
        "no_https": l.no_https,
        "offline": l.offline,
        "wrong_chip": l.wrong_chip,
        "other_project": l.other_project,
        "downgrade": l.downgrade,
        "unsigned": l.unsigned,
    })
}

/// `POST /api/deployments/{id}/retry`: a new deployment of the same
/// firmware, with the same options, to the devices whose job in `id`
/// failed, rolled back, was cancelled or timed out; `id` must be over.
async fn api_retry(
    State(d): State<Dashboard>,
    axum::extract::Path(id): axum::extract::Path<String>,
    https: Option<axum::Extension<crate::server::Https>>,
    headers: HeaderMap,
) -> Response {
    let store = d.app.store.clone();
    let old = match tokio::task::spawn_blocking(move || store.deployment(&id)).await {
        Ok(Ok(dep)) => dep,
        Ok(Err(crate::store::StoreError::UnknownDeployment(id))) => {
            return api_error(StatusCode::NOT_FOUND, format!("no deployment {id:?}"))
        }
        Ok(Err(e)) => return api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => return api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    if !old.state.is_final() {
        return api_error(
            StatusCode::CONFLICT,
            format!(
                "deployment {} is {}: retry its failed devices once it is over (stop it first)",
                old.id,
                old.state.as_str()
            ),
        );
    }
    let failed: Vec<String> = old
        .devices
        .iter()
        .filter(|x| x.state.is_failure())
        .map(|x| x.device.clone())
        .collect();
    if failed.is_empty() {
        return api_error(
            StatusCode::CONFLICT,
            format!("no device of deployment {} failed", old.id),
        );
    }
    if !d.fleet.connected() {
        return api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the broker is unreachable: no deployment can be sent or followed now",
        );
    }
    let options: RolloutOptions = match serde_json::from_value(old.options.clone()) {
        Ok(o) => o,
        Err(e) => return api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let firmware = match firmware_named(&d, &headers, &old.firmware, https.is_some()).await {
        Ok(f) if f.sha256 == old.sha256 => f,
        Ok(_) => {
            return api_error(
                StatusCode::CONFLICT,
                format!(
                    "{} has changed since deployment {}: deploy it anew",
                    old.firmware, old.id
                ),
            )
        }
        Err(resp) => return resp,
    };
    start(&d, firmware, Selection::Ids(failed), options).await
}

async fn api_deploy(
    State(d): State<Dashboard>,
    https: Option<axum::Extension<crate::server::Https>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (firmware, selection, options) = match prepare(&d, &headers, &body, https.is_some()).await {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    start(&d, firmware, selection, options).await
}

/// Stores a deployment and hands it to serve's runner: `201` with it.
async fn start(
    d: &Dashboard,
    firmware: rollout::Firmware,
    selection: Selection,
    options: RolloutOptions,
) -> Response {
    let devices = d.fleet.devices();
    let store = d.app.store.clone();
    let created = tokio::task::spawn_blocking(move || {
        rollout::create(&store, &devices, &firmware, &selection, &options)
    })
    .await;
    let (dep, left_out) = match created {
        Ok(Ok(x)) => x,
        Ok(Err(
            e @ (RolloutError::Option(_)
            | RolloutError::UnknownDevice(_)
            | RolloutError::Offline(_)
            | RolloutError::InDeployment(_)
            | RolloutError::NoDevices(_)),
        )) => return bad_request(e),
        Ok(Err(e)) => return api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => return api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    if !d.rollouts.run(&dep.id) {
        return api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "deployment {} is stored but serve cannot run it: `mqota deploy --resume {}`",
                dep.id, dep.id
            ),
        );
    }
    let stages = dep.devices.iter().map(|x| x.stage).max().unwrap_or(0) + 1;
    (
        StatusCode::CREATED,
        [(header::LOCATION, format!("/api/deployments/{}", dep.id))],
        Json(serde_json::json!({
            "id": dep.id,
            "version": dep.version,
            "devices": dep.devices.iter().map(|x| &x.device).collect::<Vec<_>>(),
            "stages": stages,
            "current": left_out.current,
            "no_https": left_out.no_https,
        })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: &str) -> Result<DeployRequest, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn a_request_names_exactly_one_way_of_choosing_devices() {
        let r = req(r#"{"firmware":"a.bin","all":true}"#).unwrap();
        assert_eq!(r.selection(), Ok(Selection::All));
        let r = req(r#"{"firmware":"a.bin","to":["d1"," d2 "]}"#).unwrap();
        assert_eq!(
            r.selection(),
            Ok(Selection::Ids(vec!["d1".into(), "d2".into()]))
        );
        let r = req(r#"{"firmware":"a.bin","where":"chip=esp32c3"}"#).unwrap();
        assert_eq!(
            r.selection(),
            Ok(Selection::Where(vec![("chip".into(), "esp32c3".into())]))
        );
        assert!(req(r#"{"firmware":"a.bin"}"#).unwrap().selection().is_err());
        assert!(req(r#"{"firmware":"a.bin","all":true,"to":["d1"]}"#)
            .unwrap()
            .selection()
            .is_err());
        assert!(req(r#"{"firmware":"a.bin","where":"colour=red"}"#)
            .unwrap()
            .selection()
            .is_err());
    }

    #[test]
    fn amounts_are_counts_or_percentages_and_options_default_like_deploy() {
        let r = req(r#"{"firmware":"a","all":true,"batch":"25%","max_failures":2,"timeout":0}"#)
            .unwrap();
        let o = r.options().unwrap();
        assert_eq!(o.batch, Amount::Percent(25));
        assert_eq!(o.max_failures, Amount::Count(2));
        assert_eq!(o.timeout_s, 1, "a zero timeout would fail every device");
        let o = req(r#"{"firmware":"a","all":true}"#)
            .unwrap()
            .options()
            .unwrap();
        assert_eq!(o, RolloutOptions::default());
        let r = req(r#"{"firmware":"a","all":true,"batch":"150%"}"#).unwrap();
        assert!(r.options().unwrap_err().starts_with("batch: "));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = req(r#"{"firmware":"a","all":true,"canery":2}"#).unwrap_err();
        assert!(e.to_string().contains("canery"), "{e}");
    }
}

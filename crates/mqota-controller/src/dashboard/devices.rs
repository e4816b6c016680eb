//! The fleet as the page reads it and the commands it sends devices:
//! `GET /api/fleet`, `GET /api/health`, `POST /api/devices/commands`,
//! `GET /api/devices/{id}/log`.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::{bad_request, refuse_unless_json, Dashboard};
use crate::http::api_error;

/// Response header of `GET /api/fleet`: `true` when nothing suggests the
/// picture is incomplete, else `false` with the reasons in
/// [`FLEET_GAPS_HEADER`].
pub const FLEET_COMPLETE_HEADER: &str = "x-mqota-fleet-complete";
/// Response header of `GET /api/fleet`: why the picture may be incomplete
/// (see [`crate::fleet::Fleet::gaps`]), sentences joined by `; `.
pub const FLEET_GAPS_HEADER: &str = "x-mqota-fleet-gaps";

pub(super) async fn api_fleet(State(d): State<Dashboard>) -> Response {
    let store = d.app.store.clone();
    let recorded = tokio::task::spawn_blocking(move || store.device_ids())
        .await
        .ok()
        .and_then(Result::ok)
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
pub(super) async fn api_device_commands(
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

/// `GET /api/health`: the broker and the controller at a glance,
/// `{broker_connected, devices, online, rollouts_running, rollouts_paused,
/// logged_in}`; `logged_in` names the accounts with a live session.
pub(super) async fn api_health(State(d): State<Dashboard>) -> Response {
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

/// The longest `GET /api/devices/{id}/log` waits for the device.
pub const DEVICE_LOG_LIMIT: Duration = Duration::from_secs(10);

/// The query of `GET /api/devices/{id}/log`.
#[derive(Debug, Deserialize)]
pub(super) struct LogQuery {
    /// How many records, newest first (default 64, at most 512).
    max: Option<u16>,
}

pub(super) async fn api_device_log(
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

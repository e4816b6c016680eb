//! The web page of `mqota serve` and the routes behind it that need the
//! broker connection.
//!
//! | route | answer |
//! |---|---|
//! | `GET /` | the page: fleet table (search, filters, sorting, pages), firmware with a deploy form, deployments; live through `/api/events`, polling the API only while that stream keeps failing |
//! | `GET /dashboard.js` | its script |
//! | `GET /api/events` | Server-Sent Events: a `snapshot` first, then numbered `change`, `deployments` and `gaps` events (see `events.rs`) |
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
//!
//! The modules: `page` the page and its script, `devices` the fleet,
//! health, device-command and device-log routes, `events` the event
//! stream, `deploy` deployment creation (create, preview, retry).

use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;

use crate::fleet::Fleet;
use crate::http::{api_error, AppState};
use crate::rollout;

mod deploy;
mod devices;
mod events;
mod page;

pub use devices::{DEVICE_LOG_LIMIT, FLEET_COMPLETE_HEADER, FLEET_GAPS_HEADER};
pub use events::{EVENTS_COALESCE, EVENTS_OVERVIEW};

/// What every route of the page shares.
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
        .route("/", get(page::page))
        .route("/dashboard.js", get(page::script))
        .route("/api/fleet", get(devices::api_fleet))
        .route("/api/events", get(events::api_events))
        .route("/api/devices/{id}/log", get(devices::api_device_log))
        // Merged with the `GET` of the same path in `http::router`.
        .route("/api/deployments", post(deploy::api_deploy))
        .route("/api/deployments/preview", post(deploy::api_preview))
        .route("/api/deployments/{id}/retry", post(deploy::api_retry))
        .route("/api/health", get(devices::api_health))
        .route("/api/devices/commands", post(devices::api_device_commands))
        .with_state(Dashboard {
            app,
            fleet,
            rollouts,
        })
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

/// A `400` with `msg` on one line.
fn bad_request(msg: impl std::fmt::Display) -> Response {
    // serde_json's messages are one line already; the page and scripts
    // expect exactly one.
    let one_line = msg.to_string().replace(['\n', '\r'], " ");
    api_error(StatusCode::BAD_REQUEST, one_line)
}

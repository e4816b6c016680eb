//! The firmware server and the JSON API (axum).
//!
//! | route | answer |
//! |---|---|
//! | `GET`/`HEAD /firmware/{name}` | the image, if valid (else 404); one `Range` (206, or 416 when unsatisfiable or past any number), a strong `ETag` (the file's SHA-256) with `If-None-Match` (304) and `If-Range` |
//! | `GET /api/firmware` | the valid images: `[{name, url, chip, project, version, size, sha256, valid, error, signers}]` |
//! | `GET /api/devices?limit=N&after=ID` | one page of the devices recorded in the store, in id order: `{devices: [{id, status, updated_at}], next}`, the retained statuses as last seen; at most `N` devices (default [`DEVICES_PAGE`], at most [`DEVICES_PAGE_MAX`]) whose ids sort after `ID`; `next` is the `after` of the following page, `null` on the last; `400` for a bad `limit` |
//! | `GET /api/devices/{id}/history?limit=N&before=SEQ` | a page of the device's status changes and job endings, oldest first: its newest `limit` entries (default [`HISTORY_PAGE`], at most [`HISTORY_PAGE_MAX`]) before entry `before` (default: the newest); when there are older ones, `x-mqota-history-before` names the `before` of the page before |
//! | `DELETE /api/devices/{id}` | forgets the device ([`forget_router`]): `200`, `404` unknown, `409` while it is online or in a deployment not over |
//! | `GET /api/deployments`, `/api/deployments/{id}` | deployments with each device's result |
//! | `POST /api/deployments/{id}/pause`, `/resume`, `/stop` | the operator's command ([`control_router`]); `200` with the deployment, `404` unknown, `409` when its state does not allow it |
//! | `POST /api/firmware/{name}` | adds the body (the raw file, `Content-Type: application/octet-stream`) to the catalogue ([`catalogue_router`]): `201` with its entry (as `GET /api/firmware` lists one, without `url`); refused with `{"error"}` and `400` (name), `409` (name taken), `413` (larger than [`MAX_UPLOAD`]), `422` (not a valid app image, with the validator's reason) |
//! | `DELETE /api/firmware/{name}` | removes it: `200`, `404` unknown, `409` while a running or paused deployment uses it |
//!
//! `mqota serve` adds the page and the routes that need the broker
//! connection from [`crate::dashboard`], and wraps everything in
//! [`guard_hosts`] (the `Host`/`Origin` check against DNS rebinding).
//!
//! Images are streamed from disk, whole or by `Range`, never read into
//! memory to be served: the page cache already shares one copy among a
//! thousand concurrent downloads, and a file the directory should not hold
//! costs nothing. Only valid images ([`crate::catalogue`]) are listed and
//! served.
//!
//! [`serve`] runs the router under [`HttpLimits`]: a header-read timeout, a
//! connection cap, a request-body limit, and JSON errors under `/api/`.

use std::sync::Arc;

use axum::body::{Body, Bytes};

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::catalogue::{Catalogue, CatalogueError, FirmwareEntry, MAX_UPLOAD};
use crate::store::Store;

/// What the handlers share.
#[derive(Debug)]
pub struct AppState {
    /// The firmware directory.
    pub catalogue: Catalogue,
    /// The database.
    pub store: Arc<Store>,
    /// Base URL devices should download from (e.g. `http://10.0.0.2:8080`);
    /// without it, the `Host` of each API request is used.
    pub public_url: Option<String>,
    /// Which hosts a firmware URL given to `POST /api/deployments` may
    /// point at besides public addresses (`--allow-remote-firmware`).
    pub remote_firmware: crate::remote::RemoteFirmware,
}

/// The router of the whole server.
pub fn router(state: Arc<AppState>) -> Router {
    let firmware = Router::new()
        .route("/firmware/{name}", get(firmware_file))
        .with_state(state.clone());
    Router::new()
        .route("/api/firmware", get(api_firmware))
        .route("/api/devices", get(api_devices))
        .route("/api/devices/{id}/history", get(api_history))
        .route("/api/deployments", get(api_deployments))
        .route("/api/deployments/{id}", get(api_deployment))
        .with_state(state)
        .merge(firmware)
}

/// The operator's commands on a deployment, for `serve`: `POST
/// /api/deployments/{id}/pause`, `/resume` and `/stop`. Pause and stop are
/// written to the store, where whichever process runs the rollout notices
/// them; resume makes the deployment `running` again and hands it to
/// `runner`. Each answers the deployment as stored.
pub fn control_router(store: Arc<Store>, runner: crate::rollout::Runner) -> Router {
    Router::new()
        .route(
            "/api/deployments/{id}/{action}",
            axum::routing::post(api_control),
        )
        .with_state((store, runner))
}

async fn api_control(
    State((store, runner)): State<(Arc<Store>, crate::rollout::Runner)>,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    if !["pause", "resume", "stop"].contains(&action.as_str()) {
        return api_error(
            StatusCode::NOT_FOUND,
            format!("no action {action:?}: use pause, resume or stop"),
        );
    }
    let done = tokio::task::spawn_blocking(move || {
        if action == "resume" {
            // Run elsewhere (a `deploy` holds its claim): resuming here
            // would make a second runner.
            crate::rollout::ensure_not_claimed_elsewhere(&store, &id).map_err(|e| match e {
                crate::rollout::RolloutError::Store(e) => Control::Store(e),
                e => Control::Claimed(e),
            })?;
        }
        let d = match action.as_str() {
            "pause" => store.pause(&id),
            "stop" => store.stop(&id),
            _ => store.resume(&id),
        }?;
        if action == "resume" {
            runner.run(&d.id);
        }
        Ok::<_, Control>(d)
    })
    .await;
    match done {
        Ok(Ok(d)) => Json(d).into_response(),
        Ok(Err(Control::Claimed(e))) => api_error(StatusCode::CONFLICT, e),
        Ok(Err(Control::Store(crate::store::StoreError::UnknownDeployment(id)))) => {
            api_error(StatusCode::NOT_FOUND, format!("no deployment {id:?}"))
        }
        Ok(Err(Control::Store(e @ crate::store::StoreError::NotAllowed { .. }))) => {
            api_error(StatusCode::CONFLICT, e)
        }
        Ok(Err(Control::Store(e))) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// Why an operator's command over the API was not carried out.
enum Control {
    /// The store refused it (unknown deployment, state does not allow it)
    /// or failed.
    Store(crate::store::StoreError),
    /// Another process runs the deployment.
    Claimed(crate::rollout::RolloutError),
}

impl From<crate::store::StoreError> for Control {
    fn from(e: crate::store::StoreError) -> Self {
        Control::Store(e)
    }
}

/// The operator's changes to the firmware catalogue, for `serve`: `POST
/// /api/firmware/{name}` with the file as the body, `DELETE
/// /api/firmware/{name}`. State-changing, like [`control_router`]: `serve`
/// puts both behind [`guard_hosts`].
pub fn catalogue_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(
            "/api/firmware/{name}",
            axum::routing::post(api_upload).delete(api_delete_firmware),
        )
        // One byte over the limit is enough to tell "too large" apart.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_UPLOAD + 1))
        .with_state(state)
}

fn catalogue_error(e: CatalogueError) -> Response {
    let status = match &e {
        CatalogueError::BadName(_) => StatusCode::BAD_REQUEST,
        CatalogueError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        CatalogueError::NotAnImage(_) => StatusCode::UNPROCESSABLE_ENTITY,
        CatalogueError::Exists(_) => StatusCode::CONFLICT,
        CatalogueError::Unknown(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    api_error(status, e)
}

async fn api_upload(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    // Like `POST /api/deployments`' JSON: a type no HTML form can send, so
    // a browser asks before sending it cross-site, and this server never
    // says yes.
    let is_binary = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/octet-stream"));
    if !is_binary {
        return api_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the file as Content-Type: application/octet-stream",
        );
    }
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return api_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the file is larger than the {MAX_UPLOAD} bytes an OTA slot can hold"),
            )
        }
        Err(e) => return api_error(e.status(), e.body_text()),
    };
    let added = tokio::task::spawn_blocking(move || {
        let e = st.catalogue.add(&name, &body)?;
        // The store's copy of the catalogue follows at once.
        if let Ok(list) = st.catalogue.scan() {
            let _ = st.store.replace_firmware(&list);
        }
        Ok::<_, CatalogueError>(e)
    })
    .await;
    match added {
        Ok(Ok(e)) => (StatusCode::CREATED, Json(e)).into_response(),
        Ok(Err(e)) => catalogue_error(e),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn api_delete_firmware(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Response {
    let done = tokio::task::spawn_blocking(move || {
        let users = match st.store.unfinished_deployments_of(&name) {
            Ok(u) => u,
            Err(e) => return api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
        };
        if !users.is_empty() {
            return api_error(
                StatusCode::CONFLICT,
                format!(
                    "{name:?} is used by {}: stop it (or let it end) first",
                    users
                        .iter()
                        .map(|(id, state)| format!("{} deployment {id}", state.as_str()))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
        if let Err(e) = st.catalogue.remove(&name) {
            return catalogue_error(e);
        }
        if let Ok(list) = st.catalogue.scan() {
            let _ = st.store.replace_firmware(&list);
        }
        Json(serde_json::json!({ "deleted": name })).into_response()
    })
    .await;
    done.unwrap_or_else(|e| api_error(StatusCode::INTERNAL_SERVER_ERROR, e))
}

/// Guards `router` against DNS rebinding: a request whose `Host`, or whose
/// `Origin` when it has one, names a host other than an IP address,
/// `localhost`, or one of `allowed` (case-insensitive, without port) is
/// refused with `403` before any handler runs. A web page on another site
/// can make a browser resolve its own name to this server's address, but
/// the browser then still sends that name. Paths under `/firmware/` are not
/// guarded: devices fetch images by whatever name their job's URL carries,
/// and images are no secret.
pub fn guard_hosts(router: Router, allowed: Vec<String>) -> Router {
    let allowed: Arc<Vec<String>> = Arc::new(
        allowed
            .into_iter()
            .map(|h| h.trim().to_ascii_lowercase())
            .collect(),
    );
    router.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let allowed = allowed.clone();
            async move {
                if !req.uri().path().starts_with("/firmware/") {
                    let h = req.headers();
                    let host = h.get(header::HOST).and_then(|v| v.to_str().ok());
                    if let Some(host) = host {
                        if !host_allowed(host, &allowed) {
                            return api_error(
                                StatusCode::FORBIDDEN,
                                format!(
                                    "Host {host:?} is not allowed: use an IP address, or start serve with --allow-host {}",
                                    strip_port(host)
                                ),
                            );
                        }
                    }
                    let origin = h.get(header::ORIGIN).and_then(|v| v.to_str().ok());
                    if let Some(origin) = origin.filter(|o| *o != "null") {
                        let authority = origin.split_once("://").map_or(origin, |(_, a)| a);
                        if !host_allowed(authority, &allowed) {
                            return api_error(
                                StatusCode::FORBIDDEN,
                                format!("Origin {origin:?} is not allowed"),
                            );
                        }
                    }
                }
                next.run(req).await
            }
        },
    ))
}

/// `host[:port]` or `[v6]:port` without the port.
fn strip_port(authority: &str) -> &str {
    let a = authority.trim();
    if let Some(rest) = a.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match a.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => a,
    }
}

/// Whether a `Host`/`Origin` authority names this server safely.
pub fn host_allowed(authority: &str, allowed: &[String]) -> bool {
    let host = strip_port(authority)
        .trim_end_matches('.')
        .to_ascii_lowercase();
    host.parse::<std::net::IpAddr>().is_ok()
        || host == "localhost"
        || host.ends_with(".localhost")
        || allowed.contains(&host)
}

pub(crate) fn api_error(status: StatusCode, msg: impl std::fmt::Display) -> Response {
    (
        status,
        Json(serde_json::json!({ "error": msg.to_string() })),
    )
        .into_response()
}

async fn api_firmware(
    State(st): State<Arc<AppState>>,
    https: Option<axum::Extension<crate::server::Https>>,
    headers: HeaderMap,
) -> Response {
    match listings(&st, &headers, https.is_some()).await {
        Ok(list) => Json(list).into_response(),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// The catalogue as `GET /api/firmware` lists it, scanned afresh; URLs are
/// based on `public_url` or the request's `Host` (`https://` when the
/// request came over TLS).
pub(crate) async fn listings(
    st: &Arc<AppState>,
    headers: &HeaderMap,
    https: bool,
) -> Result<Vec<FirmwareEntry>, String> {
    let st2 = st.clone();
    let scanned = tokio::task::spawn_blocking(move || {
        let list = st2.catalogue.scan()?;
        st2.store
            .replace_firmware(&list)
            .map_err(std::io::Error::other)?;
        Ok::<_, std::io::Error>(list)
    })
    .await;
    let list = match scanned {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(e) => return Err(e.to_string()),
    };
    let base = match &st.public_url {
        Some(u) => u.trim_end_matches('/').to_owned(),
        None => {
            let host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("127.0.0.1");
            let scheme = if https { "https" } else { "http" };
            format!("{scheme}://{host}")
        }
    };
    let out: Vec<FirmwareEntry> = list
        .into_iter()
        // Files that are not valid images are the operator's business
        // (`serve` says at start why it skips each), not the API's.
        .filter(FirmwareEntry::is_valid)
        .map(|e| e.listed_under(&base))
        .collect();
    Ok(out)
}

async fn blocking<T: Serialize + Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Response {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(crate::store::StoreError::UnknownDeployment(id))) => {
            api_error(StatusCode::NOT_FOUND, format!("no deployment {id:?}"))
        }
        Ok(Err(e)) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// Devices in a `GET /api/devices` page unless `limit` says otherwise.
pub const DEVICES_PAGE: usize = 1000;
/// The largest `limit` of `GET /api/devices`.
pub const DEVICES_PAGE_MAX: usize = 10_000;

/// The query of `GET /api/devices`; `limit` is read by hand so a bad one
/// gets a JSON error that says what is wrong.
#[derive(Debug, Deserialize)]
struct DevicesQuery {
    limit: Option<String>,
    after: Option<String>,
}

/// A page of `GET /api/devices`.
#[derive(Debug, Serialize)]
struct DevicesPage {
    devices: Vec<crate::store::StoredDevice>,
    /// The `after` of the next page; `None` on the last.
    next: Option<String>,
}

async fn api_devices(State(st): State<Arc<AppState>>, Query(q): Query<DevicesQuery>) -> Response {
    let limit = match q.limit.as_deref().map(str::parse::<usize>) {
        None => DEVICES_PAGE,
        Some(Ok(n)) if (1..=DEVICES_PAGE_MAX).contains(&n) => n,
        Some(_) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                format!("limit must be a number from 1 to {DEVICES_PAGE_MAX}"),
            )
        }
    };
    blocking(move || {
        let (devices, more) = st.store.devices_page(q.after.as_deref(), limit)?;
        let next = more.then(|| devices.last().map(|d| d.id.clone())).flatten();
        Ok(DevicesPage { devices, next })
    })
    .await
}

/// Entries of a device's history one `GET /api/devices/{id}/history`
/// answers unless it asks for another number.
pub const HISTORY_PAGE: usize = 200;
/// The most entries one page of history may have.
pub const HISTORY_PAGE_MAX: usize = 1000;

/// The query of `GET /api/devices/{id}/history`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    limit: Option<usize>,
    before: Option<i64>,
}

async fn api_history(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    q: Result<axum::extract::Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match q {
        Ok(axum::extract::Query(q)) => q,
        Err(e) => return api_error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let limit = q.limit.unwrap_or(HISTORY_PAGE);
    if !(1..=HISTORY_PAGE_MAX).contains(&limit) {
        return api_error(
            StatusCode::BAD_REQUEST,
            format!("limit must be 1..={HISTORY_PAGE_MAX}"),
        );
    }
    let page = tokio::task::spawn_blocking(move || st.store.history_page(&id, q.before, limit));
    match page.await {
        Ok(Ok((entries, before))) => {
            let mut resp = Json(entries).into_response();
            if let Some(b) = before {
                resp.headers_mut()
                    .insert("x-mqota-history-before", HeaderValue::from(b));
            }
            resp
        }
        Ok(Err(e)) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// `DELETE /api/devices/{id}`, for `serve`: forgets a device that is gone
/// ([`forget`]). State-changing: `serve` puts it behind [`guard_hosts`].
pub fn forget_router(store: Arc<Store>, fleet: Arc<crate::fleet::Fleet>) -> Router {
    Router::new()
        .route("/api/devices/{id}", axum::routing::delete(api_forget))
        .with_state((store, fleet))
}

async fn api_forget(
    State((store, fleet)): State<(Arc<Store>, Arc<crate::fleet::Fleet>)>,
    Path(id): Path<String>,
) -> Response {
    match forget(&store, &fleet, &id).await {
        Ok(f) => Json(f).into_response(),
        Err(e @ ForgetError::Unknown(_)) => api_error(StatusCode::NOT_FOUND, e),
        Err(
            e @ (ForgetError::Online(_)
            | ForgetError::Store(crate::store::StoreError::DeviceInDeployment { .. })),
        ) => api_error(StatusCode::CONFLICT, e),
        Err(ForgetError::Fleet(e)) => api_error(StatusCode::SERVICE_UNAVAILABLE, e),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// What [`forget`] removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Forgotten {
    /// The device.
    pub id: String,
    /// Its record and history were in the store.
    pub store: bool,
    /// The broker had a retained status or availability of it (now
    /// cleared).
    pub broker: bool,
}

/// Why a device cannot be forgotten.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForgetError {
    /// Neither the store nor the broker knows the id: check it.
    #[error("device {0:?} is not known (not in the store, no retained status)")]
    Unknown(String),
    /// The device is online: it would be back with its next status.
    /// Forget a device that is gone (switched off for good, renamed).
    #[error("device {0} is online: it would be back with its next status; forget only a device that is gone")]
    Online(String),
    /// The store refused (the device is in a deployment not over) or
    /// failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The broker could not be told: nothing was removed from the store;
    /// try again when it is reachable.
    #[error(transparent)]
    Fleet(#[from] crate::fleet::FleetError),
}

/// Forgets device `id` for good: its retained status and availability are
/// cleared on the broker (else every controller would learn it again from
/// the replay), then its record and history leave the store (its results in
/// past deployments stay with them). Refused while the device is online,
/// or while it is in a deployment that is not over.
pub async fn forget(
    store: &Arc<Store>,
    fleet: &crate::fleet::Fleet,
    id: &str,
) -> Result<Forgotten, ForgetError> {
    let seen = fleet.device(id);
    if seen.as_ref().is_some_and(|d| d.online) {
        return Err(ForgetError::Online(id.to_owned()));
    }
    if !fleet.connected() {
        return Err(ForgetError::Fleet(crate::fleet::FleetError::Closed));
    }
    // Short indexed queries: not worth a blocking task.
    let in_store = store.device_known(id)?;
    if seen.is_none() && !in_store {
        return Err(ForgetError::Unknown(id.to_owned()));
    }
    // A deployment not over still counts on it: asked before the broker is
    // changed (the store asks again when it removes the record).
    if let Some(deployment) = store.unfinished_deployment_of_device(id)? {
        return Err(ForgetError::Store(
            crate::store::StoreError::DeviceInDeployment {
                device: id.to_owned(),
                deployment,
            },
        ));
    }
    fleet.clear_retained(id).await?;
    fleet.flush(std::time::Duration::from_secs(10)).await?;
    let removed = store.forget_device(id)?;
    Ok(Forgotten {
        id: id.to_owned(),
        store: removed || in_store,
        broker: seen.is_some(),
    })
}

async fn api_deployments(State(st): State<Arc<AppState>>) -> Response {
    blocking(move || st.store.deployments()).await
}

async fn api_deployment(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    blocking(move || st.store.deployment(&id)).await
}

/// A single byte range asked for, resolved against the file length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// No usable `Range` (absent, malformed, or several ranges): send it all.
    Whole,
    /// Bytes `start..=end`.
    Part {
        /// First byte.
        start: u64,
        /// Last byte, inclusive.
        end: u64,
    },
    /// Well-formed but outside the file: answer 416.
    Unsatisfiable,
}

/// Reads a `Range` header value for a file of `len` bytes (RFC 9110
/// §14.1.2). Several ranges are answered with the whole file, which the RFC
/// allows and which devices never ask for.
///
/// Kept here rather than taken from the `headers` crate: its `Range` yields
/// unresolved bounds and cannot tell a well-formed range past the end (or a
/// position that overflows `u64`), which must be answered 416, from a
/// malformed header, which must be ignored; this resolver decides both
/// against the file's length in one place.
pub fn parse_range(value: &str, len: u64) -> RangeRequest {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeRequest::Whole;
    };
    if spec.contains(',') {
        return RangeRequest::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeRequest::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    // A position of digits only that overflows `u64` is well-formed and
    // lies past any file: unsatisfiable, not a reason to send it all.
    let number = |t: &str| match t.parse::<u64>() {
        Ok(n) => Some(Ok(n)),
        Err(_) if !t.is_empty() && t.bytes().all(|c| c.is_ascii_digit()) => Some(Err(())),
        Err(_) => None,
    };
    if a.is_empty() {
        // Suffix: the last b bytes (more than the file: all of it).
        let n = match number(b) {
            Some(Ok(n)) => n,
            Some(Err(())) => u64::MAX,
            None => return RangeRequest::Whole,
        };
        if n == 0 || len == 0 {
            return RangeRequest::Unsatisfiable;
        }
        return RangeRequest::Part {
            start: len.saturating_sub(n),
            end: len - 1,
        };
    }
    let start = match number(a) {
        Some(Ok(n)) => n,
        Some(Err(())) => return RangeRequest::Unsatisfiable,
        None => return RangeRequest::Whole,
    };
    let end = if b.is_empty() {
        len.saturating_sub(1)
    } else {
        match number(b) {
            Some(Ok(e)) if e >= start => e.min(len.saturating_sub(1)),
            Some(Err(())) => len.saturating_sub(1),
            _ => return RangeRequest::Whole,
        }
    };
    if start >= len {
        return RangeRequest::Unsatisfiable;
    }
    RangeRequest::Part { start, end }
}

fn etag_matches(list: &str, etag: &str) -> bool {
    list.split(',')
        .map(str::trim)
        .any(|t| t == "*" || t == etag || t.strip_prefix("W/") == Some(etag))
}

/// The file behind a valid catalogue entry, opened, with the entry that
/// describes exactly the bytes opened: the file may be replaced between the
/// catalogue's look and the open, and the `ETag` must describe what is sent.
async fn open_image(
    app: Arc<AppState>,
    name: String,
) -> std::io::Result<Option<(FirmwareEntry, std::fs::File)>> {
    tokio::task::spawn_blocking(move || {
        for _ in 0..3 {
            let Some(entry) = app.catalogue.entry(&name)?.filter(FirmwareEntry::is_valid) else {
                return Ok(None);
            };
            let Some((path, _)) = app.catalogue.resolve(&name)? else {
                return Ok(None);
            };
            let file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let meta = file.metadata()?;
            if meta.len() == entry.size && crate::catalogue::mtime_of(&meta) == entry.mtime {
                return Ok(Some((entry, file)));
            }
        }
        Err(std::io::Error::other(format!(
            "{name} keeps changing while it is opened"
        )))
    })
    .await
    .map_err(std::io::Error::other)?
}

async fn firmware_file(
    State(app): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (entry, file) = match open_image(app, name).await {
        Ok(Some(found)) => found,
        Ok(None) => return (StatusCode::NOT_FOUND, "no such firmware\n").into_response(),
        Err(e) => return api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let etag = format!("\"{}\"", entry.sha256);
    let len = entry.size;
    let mut h = HeaderMap::new();
    h.insert(
        header::ETAG,
        HeaderValue::from_str(&etag).expect("hex etag"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));

    if let Some(inm) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    {
        if etag_matches(inm, &etag) {
            return (StatusCode::NOT_MODIFIED, h).into_response();
        }
    }
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    // If-Range with another validator means "the file changed: send it all".
    let range_applies = headers
        .get(header::IF_RANGE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.trim() == etag);
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(r) if range_applies => parse_range(r, len),
        _ => RangeRequest::Whole,
    };
    let (status, start, end) = match range {
        RangeRequest::Whole => (StatusCode::OK, 0, len.saturating_sub(1)),
        RangeRequest::Part { start, end } => {
            h.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")).expect("ascii"),
            );
            (StatusCode::PARTIAL_CONTENT, start, end)
        }
        RangeRequest::Unsatisfiable => {
            h.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{len}")).expect("ascii"),
            );
            return (StatusCode::RANGE_NOT_SATISFIABLE, h).into_response();
        }
    };
    let count = if len == 0 { 0 } else { end - start + 1 };
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    let body = match stream_part(file, start, count).await {
        Ok(b) => b,
        Err(e) => return api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    (status, h, body).into_response()
}

/// `count` bytes of `file` from `start`, streamed from disk in 64 KiB reads.
async fn stream_part(file: std::fs::File, start: u64, count: u64) -> std::io::Result<Body> {
    use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
    let mut file = tokio::fs::File::from_std(file);
    file.seek(std::io::SeekFrom::Start(start)).await?;
    let reader = file.take(count);
    Ok(Body::from_stream(
        tokio_util::io::ReaderStream::with_capacity(reader, 64 * 1024),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_resolve_against_the_length() {
        use RangeRequest::*;
        assert_eq!(parse_range("bytes=0-99", 1000), Part { start: 0, end: 99 });
        assert_eq!(
            parse_range("bytes=900-", 1000),
            Part {
                start: 900,
                end: 999
            }
        );
        assert_eq!(
            parse_range("bytes=-100", 1000),
            Part {
                start: 900,
                end: 999
            }
        );
        assert_eq!(
            parse_range("bytes=-5000", 1000),
            Part { start: 0, end: 999 }
        );
        assert_eq!(
            parse_range("bytes=990-5000", 1000),
            Part {
                start: 990,
                end: 999
            }
        );
        assert_eq!(parse_range("bytes=1000-", 1000), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 1000), Unsatisfiable);
        assert_eq!(parse_range("bytes=5-1", 1000), Whole);
        assert_eq!(parse_range("bytes=0-1,5-6", 1000), Whole);
        assert_eq!(parse_range("items=0-1", 1000), Whole);
        assert_eq!(parse_range("bytes=x-1", 1000), Whole);
        let huge = "99999999999999999999999";
        assert_eq!(parse_range(&format!("bytes={huge}-"), 1000), Unsatisfiable);
        assert_eq!(
            parse_range(&format!("bytes=990-{huge}"), 1000),
            Part {
                start: 990,
                end: 999
            }
        );
        assert_eq!(
            parse_range(&format!("bytes=-{huge}"), 1000),
            Part { start: 0, end: 999 }
        );
    }

    #[test]
    fn only_ip_addresses_localhost_and_allowed_names_pass_the_host_check() {
        let allowed = vec!["ota.lan".to_owned()];
        for ok in [
            "127.0.0.1:8080",
            "10.0.0.2",
            "[::1]:8080",
            "localhost:8080",
            "OTA.lan:80",
            "ota.lan.",
        ] {
            assert!(host_allowed(ok, &allowed), "{ok}");
        }
        for bad in [
            "evil.example:8080",
            "127.0.0.1.evil.example",
            "ota.lan.evil",
            "",
        ] {
            assert!(!host_allowed(bad, &allowed), "{bad}");
        }
    }

    #[test]
    fn if_none_match_accepts_lists_star_and_weak_forms() {
        let e = "\"abc\"";
        assert!(etag_matches("\"abc\"", e));
        assert!(etag_matches("\"x\", W/\"abc\"", e));
        assert!(etag_matches("*", e));
        assert!(!etag_matches("\"abd\"", e));
    }
}

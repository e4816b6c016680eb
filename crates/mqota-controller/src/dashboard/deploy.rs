//! Deployment creation from the page: `POST /api/deployments`, its
//! preview and `POST /api/deployments/{id}/retry`; the request body is
//! described in [`super`].

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::{bad_request, refuse_unless_json, Dashboard};
use crate::catalogue::{resolve_firmware, FirmwareError};
use crate::http::{api_error, listings};
use crate::rollout::{self, Amount, RolloutError, RolloutOptions, Selection};

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
pub(super) async fn api_preview(
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
pub(super) async fn api_retry(
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

pub(super) async fn api_deploy(
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

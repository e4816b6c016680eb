//! The firmware server and the JSON API (axum).
//!
//! | route | answer |
//! |---|---|
//! | `GET`/`HEAD /firmware/{name}` | the image; one `Range` (206, or 416 when unsatisfiable), a strong `ETag` (the file's SHA-256) with `If-None-Match` (304) and `If-Range` |
//! | `GET /api/firmware` | `[{name, url, chip, project, version, size, sha256, valid, error}]` |
//! | `GET /api/devices` | `[{id, status, updated_at}]`, the retained statuses as last seen |
//! | `GET /api/devices/{id}/history` | the device's status changes and job endings |
//! | `GET /api/deployments`, `/api/deployments/{id}` | deployments with each device's result |
//!
//! Images are at most 16 MiB, so a request reads the file whole and slices
//! it; no streaming machinery is needed to get `Range` exactly right.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::catalogue::Catalogue;
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
}

/// The router of the whole server.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/firmware/{name}", get(firmware_file))
        .route("/api/firmware", get(api_firmware))
        .route("/api/devices", get(api_devices))
        .route("/api/devices/{id}/history", get(api_history))
        .route("/api/deployments", get(api_deployments))
        .route("/api/deployments/{id}", get(api_deployment))
        .with_state(state)
}

/// One catalogue entry as the API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct FirmwareListing {
    /// File name.
    pub name: String,
    /// Where devices download it.
    pub url: String,
    /// Chip, `null` if not a valid image.
    pub chip: Option<String>,
    /// Project name.
    pub project: Option<String>,
    /// Version.
    pub version: Option<String>,
    /// Bytes.
    pub size: u64,
    /// SHA-256 of the file, hex.
    pub sha256: String,
    /// Whether it is a valid image.
    pub valid: bool,
    /// Why not, if not.
    pub error: Option<String>,
}

fn api_error(status: StatusCode, msg: impl std::fmt::Display) -> Response {
    (
        status,
        Json(serde_json::json!({ "error": msg.to_string() })),
    )
        .into_response()
}

async fn api_firmware(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
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
        Ok(Err(e)) => return api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => return api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let base = match &st.public_url {
        Some(u) => u.trim_end_matches('/').to_owned(),
        None => {
            let host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("127.0.0.1");
            format!("http://{host}")
        }
    };
    let out: Vec<FirmwareListing> = list
        .into_iter()
        .map(|e| FirmwareListing {
            url: format!("{base}/firmware/{}", e.name),
            valid: e.is_valid(),
            name: e.name,
            chip: e.chip,
            project: e.project,
            version: e.version,
            size: e.size,
            sha256: e.sha256,
            error: e.error,
        })
        .collect();
    Json(out).into_response()
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

async fn api_devices(State(st): State<Arc<AppState>>) -> Response {
    blocking(move || st.store.devices()).await
}

async fn api_history(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    blocking(move || st.store.history(&id)).await
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
    if a.is_empty() {
        // Suffix: the last b bytes.
        let Ok(n) = b.parse::<u64>() else {
            return RangeRequest::Whole;
        };
        if n == 0 || len == 0 {
            return RangeRequest::Unsatisfiable;
        }
        return RangeRequest::Part {
            start: len.saturating_sub(n),
            end: len - 1,
        };
    }
    let Ok(start) = a.parse::<u64>() else {
        return RangeRequest::Whole;
    };
    let end = if b.is_empty() {
        len.saturating_sub(1)
    } else {
        match b.parse::<u64>() {
            Ok(e) if e >= start => e.min(len.saturating_sub(1)),
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

async fn firmware_file(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let st2 = st.clone();
    let name2 = name.clone();
    let read = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
        let Some(entry) = st2.catalogue.entry(&name2)? else {
            return Ok(None);
        };
        let bytes = std::fs::read(st2.catalogue.dir().join(&name2))?;
        Ok(Some((entry, bytes)))
    })
    .await;
    let (entry, bytes) = match read {
        Ok(Ok(Some(v))) => v,
        Ok(Ok(None)) => return (StatusCode::NOT_FOUND, "no such firmware\n").into_response(),
        Ok(Err(e)) => return api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => return api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    // The file may have changed between the catalogue look-up and the read;
    // the ETag must describe the bytes sent.
    let sha = if entry.size == bytes.len() as u64 {
        entry.sha256
    } else {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    let etag = format!("\"{sha}\"");
    let len = bytes.len() as u64;
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
    match range {
        RangeRequest::Whole => {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            (StatusCode::OK, h, bytes).into_response()
        }
        RangeRequest::Part { start, end } => {
            let part = bytes[start as usize..=end as usize].to_vec();
            h.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")).expect("ascii"),
            );
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(part.len() as u64));
            (StatusCode::PARTIAL_CONTENT, h, part).into_response()
        }
        RangeRequest::Unsatisfiable => {
            h.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{len}")).expect("ascii"),
            );
            (StatusCode::RANGE_NOT_SATISFIABLE, h).into_response()
        }
    }
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

//! Resolution: the image a deployment names, a catalogue name listed by a
//! firmware server (`GET /api/firmware`) or an `http(s)://` URL, checked as
//! deployable and turned into the rollout's [`Firmware`].

use super::FirmwareEntry;
use crate::rollout::Firmware;

/// Why the firmware named on the command line cannot be deployed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FirmwareError {
    /// The firmware server or URL could not be fetched: check `--server` or
    /// the URL, and that `mqota serve` runs.
    #[error("cannot fetch {url}: {reason}")]
    Fetch {
        /// What was fetched.
        url: String,
        /// Why it failed.
        reason: String,
    },
    /// The server's catalogue has no such name: see `GET /api/firmware`.
    #[error("the firmware server has no {name:?} (it has: {known})")]
    UnknownName {
        /// The name asked for.
        name: String,
        /// What the server lists.
        known: String,
    },
    /// The file is not a valid app image (or too large): fix the image.
    #[error("{name} is not deployable: {reason}")]
    Invalid {
        /// The firmware.
        name: String,
        /// What the image validator found wrong, in words.
        reason: String,
    },
}

/// Resolves what the operator named: an `http(s)://` URL of an image (fetched
/// once, under `remote`'s rules, to read its version, size and SHA-256), or
/// the name of an image that the firmware server at `server` lists under
/// `/api/firmware`. `server`'s own host and port may always serve a URL.
pub async fn resolve_firmware(
    spec: &str,
    server: &str,
    remote: &crate::remote::RemoteFirmware,
) -> Result<Firmware, FirmwareError> {
    resolve_firmware_as(spec, server, None, remote).await
}

/// [`resolve_firmware`], sending `token` (an API token of
/// [`crate::accounts`]) to `server`'s `/api/firmware` when given: a serve
/// that requires login answers nobody else.
pub async fn resolve_firmware_as(
    spec: &str,
    server: &str,
    token: Option<&str>,
    remote: &crate::remote::RemoteFirmware,
) -> Result<Firmware, FirmwareError> {
    let client = remote
        .client_builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .map_err(|e| FirmwareError::Fetch {
            url: server.to_owned(),
            reason: e.to_string(),
        })?;
    let fetch_err = |url: &str, e: &dyn std::fmt::Display| FirmwareError::Fetch {
        url: url.to_owned(),
        reason: e.to_string(),
    };
    let lower = spec.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        let bytes = remote
            .clone()
            .and_origin_of(server)
            .fetch(spec)
            .await
            .map_err(|e| fetch_err(spec, &e))?;
        let name = spec.rsplit('/').next().unwrap_or(spec);
        let mut entry = FirmwareEntry::from_bytes(name, &bytes, 0);
        // The validator's reason may quote bytes of the file (a magic byte,
        // a name): of a URL's body, that is not ours to repeat.
        if entry.error.is_some() {
            entry.error = Some(format!(
                "the {} bytes fetched are not a valid app image",
                bytes.len()
            ));
        }
        entry.url = Some(spec.to_owned());
        return deployable(spec, &entry);
    }
    let api = format!("{}/api/firmware", server.trim_end_matches('/'));
    let mut request = client.get(&api);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let answer = request.send().await.map_err(|e| fetch_err(&api, &e))?;
    if matches!(answer.status().as_u16(), 401 | 403) {
        let why = answer
            .json::<serde_json::Value>()
            .await
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let hint = if token.is_some() {
            "check the API token"
        } else {
            "send an API token (--token or MQOTA_TOKEN; `mqota token add`)"
        };
        return Err(fetch_err(&api, &format!("refused: {why} ({hint})")));
    }
    let list: Vec<FirmwareEntry> = answer
        .error_for_status()
        .map_err(|e| fetch_err(&api, &e))?
        .json()
        .await
        .map_err(|e| fetch_err(&api, &e))?;
    deployable_named(spec, &list)
}

/// The [`Firmware`] of the entry of `list` (a server's listing) named
/// `spec`; [`FirmwareError::UnknownName`] with the valid names if none is.
pub fn deployable_named(spec: &str, list: &[FirmwareEntry]) -> Result<Firmware, FirmwareError> {
    match list.iter().find(|f| f.name == spec) {
        Some(f) => deployable(spec, f),
        None => Err(FirmwareError::UnknownName {
            name: spec.to_owned(),
            known: list
                .iter()
                .filter(|f| f.is_valid())
                .map(|f| f.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// The [`Firmware`] a listed catalogue entry describes, if it can be
/// deployed (valid, with a version, at most 16 MiB, a URL that fits a start
/// command). `spec` is what the operator named.
pub fn deployable(spec: &str, f: &FirmwareEntry) -> Result<Firmware, FirmwareError> {
    let invalid = |reason: String| FirmwareError::Invalid {
        name: spec.to_owned(),
        reason,
    };
    if let Some(e) = &f.error {
        return Err(invalid(e.clone()));
    }
    let version = f
        .version
        .clone()
        .ok_or_else(|| invalid("no version".into()))?;
    let size = u32::try_from(f.size)
        .ok()
        .filter(|s| *s <= mqota_core::protocol::MAX_FIRMWARE_SIZE)
        .ok_or_else(|| invalid(format!("{} bytes is larger than 16 MiB", f.size)))?;
    let url = f
        .url
        .clone()
        .ok_or_else(|| invalid("no server lists it (it has no URL)".into()))?;
    if url.len() > mqota_core::protocol::MAX_URL_LEN {
        return Err(invalid(format!(
            "its URL is longer than {} bytes",
            mqota_core::protocol::MAX_URL_LEN
        )));
    }
    Ok(Firmware {
        name: spec.to_owned(),
        url,
        version,
        sha256: f.sha256.clone(),
        size,
        chip: f.chip.clone(),
        project: f.project.clone(),
        signers: f.signers.clone(),
    })
}

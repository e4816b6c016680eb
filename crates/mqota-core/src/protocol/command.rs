//! Reading commands: start (a bare URL or a JSON job), cancel and rollback.
//!
//! # Why a hand-written visitor instead of `#[derive(Deserialize)]`
//!
//! A derived struct would turn every problem into one opaque
//! `serde_json_core` error, but a refused command must say *what* is wrong
//! (the operator reads it on the dashboard). It would also need a buffer as
//! large as the payload to unescape strings, including those of fields we
//! ignore. So the visitor below borrows every string raw from the payload,
//! unescapes only the fields it keeps straight into their bounded
//! `heapless::String`, checks the `devices` list as it streams past without
//! storing it, and leaves the reason for a failure in a [`Cell`] because serde
//! errors cannot carry it without `alloc`.

use core::cell::Cell;
use core::fmt;

use heapless::String;
use serde::de::{self, DeserializeSeed, Deserializer as _, IgnoredAny, MapAccess, SeqAccess};
use serde_json_core::str::{EscapedStr, EscapedStringFragment};

use super::{
    ErrorCode, Phase, Progress, TopicKind, Topics, MAX_COMMAND_LEN, MAX_DEVICES, MAX_DEVICE_ID_LEN,
    MAX_FIRMWARE_SIZE, MAX_JOB_ID_LEN, MAX_URL_LEN, MAX_VERSION_LEN,
};

/// A job id as it travels in commands and events.
pub type JobId = String<MAX_JOB_ID_LEN>;

/// An update to carry out, read from a start command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Where to download the image: `http://` or `https://`, with a host.
    pub url: String<MAX_URL_LEN>,
    /// The version the controller expects the image to carry.
    pub version: Option<String<MAX_VERSION_LEN>>,
    /// SHA-256 the whole image must have.
    pub sha256: Option<[u8; 32]>,
    /// Exact image size in bytes, `1..=`[`MAX_FIRMWARE_SIZE`].
    pub size: Option<u32>,
    /// The controller's name for this job, echoed in every event.
    pub job: Option<JobId>,
    /// Give up after this many seconds (at least 1).
    pub timeout_s: Option<u32>,
    /// Download and install even when the device already runs `version`.
    pub force: bool,
    /// Install even if the image's version is older than the running one
    /// (semver order). Never lowers the `secure_version` floor.
    pub allow_downgrade: bool,
    /// Install even if the image belongs to another `project_name`.
    pub allow_other_project: bool,
}

/// A command for this device.
// `Start` dwarfs the others, but there is no allocator to box it in, and a
// command is parsed once and handed straight to the engine.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Download and install `Job`.
    Start(Job),
    /// Stop the update in flight; with `job`, only if it is that job.
    Cancel {
        /// The job to cancel, if the payload named one.
        job: Option<JobId>,
    },
    /// Boot the previous slot again, if it holds a valid image.
    Rollback {
        /// The job id to report the rollback under, if the payload named one.
        job: Option<JobId>,
    },
}

impl Command {
    /// The job id the command names, for the events that answer it.
    pub fn job(&self) -> Option<JobId> {
        match self {
            Command::Start(job) => job.job.clone(),
            Command::Cancel { job } | Command::Rollback { job } => job.clone(),
        }
    }
}

/// What [`parse_command`] found.
#[allow(clippy::large_enum_variant)] // as for `Command`
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandOutcome {
    /// A command for this device.
    Command(Command),
    /// A start command whose `devices` list does not name this device: ignore
    /// it silently.
    NotForMe,
}

/// A command that cannot be carried out. Answer it with a `failed` progress
/// event ([`BadCommand::to_progress`]) and carry on with whatever was running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadCommand {
    /// The error code of the answer: `bad_command` for a malformed command,
    /// `bad_signature` or `replayed` for one a device with a job key refuses.
    pub code: ErrorCode,
    /// One line naming what is wrong, e.g. `"url is missing"`.
    pub reason: &'static str,
    /// The command's job id, if it could be read.
    pub job: Option<JobId>,
}

impl BadCommand {
    /// The `failed` event that answers this command.
    pub fn to_progress(&self, topics: &Topics) -> Progress {
        Progress::new(topics.device_id(), self.job.clone(), Phase::Failed)
            .with_error(self.code, Some(self.reason))
    }
}

impl fmt::Display for BadCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code.as_str())?;
        f.write_str(": ")?;
        f.write_str(self.reason)
    }
}

#[cfg(feature = "std")]
impl std::error::Error for BadCommand {}

/// Every reason [`BadCommand::reason`] can hold. `docs/PROTOCOL.md` lists
/// them too (a test keeps the two in step).
pub(crate) mod reason {
    pub const TOO_LONG: &str = "payload is longer than 1024 bytes";
    pub const NOT_UTF8: &str = "payload is not UTF-8";
    pub const EMPTY: &str = "payload is empty";
    pub const NOT_JSON: &str = "payload is not valid JSON";
    pub const TOO_DEEP: &str = "payload nests deeper than 8 levels";
    pub const DUPLICATE: &str = "payload repeats a field";
    pub const URL_MISSING: &str = "url is missing";
    pub const URL_NOT_STRING: &str = "url is not a valid JSON string";
    pub const URL_TOO_LONG: &str = "url is longer than 256 bytes";
    pub const URL_BAD_CHARS: &str = "url contains spaces, control or non-ASCII characters";
    pub const URL_NOT_HTTP: &str = "url is not http:// or https://";
    pub const URL_NO_HOST: &str = "url has no host";
    pub const URL_BAD_PORT: &str = "url has a bad port";
    pub const VERSION_NOT_STRING: &str = "version is not a valid JSON string";
    pub const VERSION_TOO_LONG: &str = "version is longer than 32 bytes";
    pub const SHA256_BAD: &str = "sha256 is not 64 hex digits";
    pub const SIZE_NOT_INT: &str = "size is not an integer in 1..=16777216";
    pub const SIZE_ZERO: &str = "size is 0";
    pub const SIZE_TOO_BIG: &str = "size exceeds 16 MiB";
    pub const JOB_NOT_STRING: &str = "job is not a valid JSON string";
    pub const JOB_TOO_LONG: &str = "job is longer than 40 bytes";
    pub const TIMEOUT_NOT_INT: &str = "timeout_s is not an integer in 1..=4294967295";
    pub const TIMEOUT_ZERO: &str = "timeout_s is 0";
    pub const FORCE_NOT_BOOL: &str = "force is not true or false";
    pub const ALLOW_DOWNGRADE_NOT_BOOL: &str = "allow_downgrade is not true or false";
    pub const ALLOW_OTHER_PROJECT_NOT_BOOL: &str = "allow_other_project is not true or false";
    pub const DEVICE_NOT_STRING: &str = "device is not a valid JSON string";
    pub const SEQ_NOT_INT: &str = "seq is not an integer in 0..=18446744073709551615";
    pub const OP_NOT_STRING: &str = "op is not a valid JSON string";
    pub const DEVICES_NOT_LIST: &str = "devices is not an array of strings";
    pub const DEVICES_TOO_MANY: &str = "devices names more than 64 ids";
    pub const DEVICE_ID_TOO_LONG: &str = "devices names an id longer than 32 bytes";

    #[cfg(test)]
    pub const ALL: &[&str] = &[
        TOO_LONG,
        NOT_UTF8,
        EMPTY,
        NOT_JSON,
        TOO_DEEP,
        DUPLICATE,
        URL_MISSING,
        URL_NOT_STRING,
        URL_TOO_LONG,
        URL_BAD_CHARS,
        URL_NOT_HTTP,
        URL_NO_HOST,
        URL_BAD_PORT,
        VERSION_NOT_STRING,
        VERSION_TOO_LONG,
        SHA256_BAD,
        SIZE_NOT_INT,
        SIZE_ZERO,
        SIZE_TOO_BIG,
        JOB_NOT_STRING,
        JOB_TOO_LONG,
        TIMEOUT_NOT_INT,
        TIMEOUT_ZERO,
        FORCE_NOT_BOOL,
        ALLOW_DOWNGRADE_NOT_BOOL,
        ALLOW_OTHER_PROJECT_NOT_BOOL,
        DEVICE_NOT_STRING,
        SEQ_NOT_INT,
        OP_NOT_STRING,
        DEVICES_NOT_LIST,
        DEVICES_TOO_MANY,
        DEVICE_ID_TOO_LONG,
    ];
}

/// How deep `{` / `[` may nest. The known fields need two levels; the rest
/// is headroom for unknown fields. The bound exists because ignoring a value
/// recurses once per level, and a 1 KiB payload of `[` would otherwise cost
/// the device a thousand stack frames.
const MAX_JSON_DEPTH: usize = 8;

/// Reads the payload of a command that arrived on a topic of `kind` (see
/// [`Topics::classify`]) for the device `device_id`.
///
/// Start payloads are a bare URL (surrounding whitespace trimmed) or a JSON
/// object; unknown fields are ignored, `null` counts as absent. A job whose
/// `devices` list does not name `device_id` is [`CommandOutcome::NotForMe`]
/// as soon as the object could be read, even if other fields are bad, so that
/// devices not addressed stay silent.
///
/// Cancel and rollback payloads are lenient: anything that does not start
/// with `{` (empty, text, even bytes that are not UTF-8) means "no job"; a
/// JSON object may carry a `"job"` string and nothing else is read.
pub fn parse_command(
    kind: TopicKind,
    payload: &[u8],
    device_id: &str,
) -> Result<CommandOutcome, BadCommand> {
    if payload.len() > MAX_COMMAND_LEN {
        return Err(bad(reason::TOO_LONG));
    }
    let (outcome, meta) = parse_any(kind, payload, device_id)?;
    // Unsigned, `device` is an address like a one-id `devices` list.
    if meta.device.as_ref().is_some_and(|d| d != device_id) {
        return Ok(CommandOutcome::NotForMe);
    }
    Ok(outcome)
}

/// Reads the payload of a *signed* command: the bytes inside an envelope
/// whose signature [`super::envelope::open`] already verified. Returns the
/// command and its sequence number.
///
/// Besides what [`parse_command`] reads, the object must bind itself to
/// where it arrived: `"op"` names the topic kind (`start`, `cancel`,
/// `rollback`), `"seq"` is the sequence number (the caller refuses it with
/// `replayed` unless it is above the last one accepted), and `"device"`
/// equals `device_id` or a `"devices"` list names it. A `devices` list
/// without this device is [`CommandOutcome::NotForMe`]; anything else
/// missing or naming another device is refused with `bad_signature`: the
/// signature is genuine, but not for this device or this use.
pub fn parse_signed_command(
    kind: TopicKind,
    payload: &[u8],
    device_id: &str,
) -> Result<(CommandOutcome, u64), BadCommand> {
    if payload.len() > MAX_COMMAND_LEN {
        return Err(bad(reason::TOO_LONG));
    }
    let starts_object =
        core::str::from_utf8(payload).is_ok_and(|t| t.trim_start().starts_with('{'));
    if !starts_object {
        return Err(bad_sig(signed::NOT_OBJECT, None));
    }
    // The binding first: a command signed for another topic is refused as
    // that, before its body is judged by this topic's rules.
    let (job, pre) = parse_stop(payload, device_id)?;
    if pre.op.as_deref() != Some(kind.name()) {
        return Err(bad_sig(signed::WRONG_OP, job));
    }
    let (outcome, meta) = parse_any(kind, payload, device_id)?;
    let job = match &outcome {
        CommandOutcome::Command(cmd) => cmd.job(),
        CommandOutcome::NotForMe => None,
    };
    let Some(seq) = meta.seq else {
        return Err(bad_sig(signed::NO_SEQ, job));
    };
    match (&meta.device, meta.devices) {
        (Some(d), _) if d != device_id => Err(bad_sig(signed::OTHER_DEVICE, job)),
        (Some(_), _) | (None, Some(true)) => Ok((outcome, seq)),
        (None, Some(false)) => Ok((CommandOutcome::NotForMe, seq)),
        (None, None) => Err(bad_sig(signed::NO_DEVICE, job)),
    }
}

/// Why a signed command is refused with `bad_signature` although its
/// signature verified. `docs/PROTOCOL.md` lists them.
pub(crate) mod signed {
    pub const NOT_OBJECT: &str = "signed payload is not a JSON object";
    pub const WRONG_OP: &str = "command is signed for another topic (op)";
    pub const NO_SEQ: &str = "signed command has no seq";
    pub const OTHER_DEVICE: &str = "command is signed for another device";
    pub const NO_DEVICE: &str = "signed command names no device";
}

fn bad_sig(reason: &'static str, job: Option<JobId>) -> BadCommand {
    BadCommand {
        code: ErrorCode::BadSignature,
        reason,
        job,
    }
}

/// What a command says about itself, besides the command: read for signed
/// commands, and `device` as an address for any.
#[derive(Default)]
struct Meta {
    op: Option<String<8>>,
    seq: Option<u64>,
    device: Option<String<MAX_DEVICE_ID_LEN>>,
    /// Whether a `devices` list names this device; `None` without a list.
    devices: Option<bool>,
}

fn parse_any(
    kind: TopicKind,
    payload: &[u8],
    device_id: &str,
) -> Result<(CommandOutcome, Meta), BadCommand> {
    match kind {
        TopicKind::Start => parse_start(payload, device_id),
        TopicKind::Cancel => {
            parse_stop(payload, device_id).map(|(job, m)| (Command::Cancel { job }.into(), m))
        }
        TopicKind::Rollback => {
            parse_stop(payload, device_id).map(|(job, m)| (Command::Rollback { job }.into(), m))
        }
    }
}

impl From<Command> for CommandOutcome {
    fn from(command: Command) -> Self {
        CommandOutcome::Command(command)
    }
}

fn bad(reason: &'static str) -> BadCommand {
    BadCommand {
        code: ErrorCode::BadCommand,
        reason,
        job: None,
    }
}

/// The metadata fields of `fields`, unescaped.
fn meta_of(fields: &Fields<'_>, job: Option<JobId>) -> Result<Meta, BadCommand> {
    let refuse = |reason| BadCommand {
        code: ErrorCode::BadCommand,
        reason,
        job: job.clone(),
    };
    Ok(Meta {
        // An `op` too long for any kind is simply not one.
        op: fields
            .op
            .map(|raw| unescape::<8>(raw, reason::OP_NOT_STRING, ""))
            .transpose()
            .or_else(|r| {
                if r.is_empty() {
                    Ok(Some(String::new()))
                } else {
                    Err(refuse(r))
                }
            })?,
        seq: fields.seq,
        device: fields
            .device
            .map(|raw| unescape(raw, reason::DEVICE_NOT_STRING, reason::DEVICE_ID_TOO_LONG))
            .transpose()
            .map_err(refuse)?,
        devices: fields.devices,
    })
}

fn parse_start(payload: &[u8], device_id: &str) -> Result<(CommandOutcome, Meta), BadCommand> {
    let text = core::str::from_utf8(payload)
        .map_err(|_| bad(reason::NOT_UTF8))?
        .trim();
    if text.is_empty() {
        return Err(bad(reason::EMPTY));
    }
    if !text.starts_with('{') {
        // The original design's bare-URL form.
        let url = String::try_from(text).map_err(|_| bad(reason::URL_TOO_LONG))?;
        check_url(&url).map_err(bad)?;
        let job = Job {
            url,
            version: None,
            sha256: None,
            size: None,
            job: None,
            timeout_s: None,
            force: false,
            allow_downgrade: false,
            allow_other_project: false,
        };
        return Ok((Command::Start(job).into(), Meta::default()));
    }
    check_depth(text).map_err(bad)?;
    let fields = match read_object(text, Mode::Start { device_id }, true) {
        Ok(fields) => fields,
        Err(reason) => {
            return Err(BadCommand {
                code: ErrorCode::BadCommand,
                reason,
                job: recover_job(text),
            })
        }
    };
    let job = fields
        .job
        .map(|raw| unescape(raw, reason::JOB_NOT_STRING, reason::JOB_TOO_LONG))
        .transpose()
        .map_err(bad)?;
    let meta = meta_of(&fields, job.clone())?;
    if fields.devices == Some(false) {
        return Ok((CommandOutcome::NotForMe, meta));
    }
    let refuse = |reason| BadCommand {
        code: ErrorCode::BadCommand,
        reason,
        job: job.clone(),
    };
    let url = unescape(
        fields.url.ok_or(reason::URL_MISSING).map_err(refuse)?,
        reason::URL_NOT_STRING,
        reason::URL_TOO_LONG,
    )
    .map_err(refuse)?;
    check_url(&url).map_err(refuse)?;
    let version = fields
        .version
        .map(|raw| unescape(raw, reason::VERSION_NOT_STRING, reason::VERSION_TOO_LONG))
        .transpose()
        .map_err(refuse)?;
    let sha256 = fields
        .sha256
        .map(|raw| {
            unescape::<64>(raw, reason::SHA256_BAD, reason::SHA256_BAD)
                .and_then(|hex| decode_sha256(&hex).ok_or(reason::SHA256_BAD))
        })
        .transpose()
        .map_err(refuse)?;
    match fields.size {
        Some(0) => return Err(refuse(reason::SIZE_ZERO)),
        Some(size) if size > MAX_FIRMWARE_SIZE => return Err(refuse(reason::SIZE_TOO_BIG)),
        _ => {}
    }
    if fields.timeout_s == Some(0) {
        return Err(refuse(reason::TIMEOUT_ZERO));
    }
    let job = Job {
        url,
        version,
        sha256,
        size: fields.size,
        job,
        timeout_s: fields.timeout_s,
        force: fields.force.unwrap_or(false),
        allow_downgrade: fields.allow_downgrade.unwrap_or(false),
        allow_other_project: fields.allow_other_project.unwrap_or(false),
    };
    Ok((Command::Start(job).into(), meta))
}

fn parse_stop(payload: &[u8], device_id: &str) -> Result<(Option<JobId>, Meta), BadCommand> {
    let Ok(text) = core::str::from_utf8(payload) else {
        return Ok((None, Meta::default()));
    };
    let text = text.trim();
    if !text.starts_with('{') {
        return Ok((None, Meta::default()));
    }
    check_depth(text).map_err(bad)?;
    let fields = read_object(text, Mode::Stop { device_id }, true).map_err(bad)?;
    let job = fields
        .job
        .map(|raw| unescape(raw, reason::JOB_NOT_STRING, reason::JOB_TOO_LONG))
        .transpose()
        .map_err(bad)?;
    let meta = meta_of(&fields, job.clone())?;
    Ok((job, meta))
}

/// The job id of a start command that failed to parse, read again ignoring
/// everything else, so that the refusal can still name its job.
fn recover_job(text: &str) -> Option<JobId> {
    // Trailing garbage is tolerated here: the object before it may be fine.
    let fields = read_object(text, Mode::JobOnly, false).ok()?;
    unescape(fields.job?, "", "").ok()
}

/// Rejects payloads that nest `{`/`[` deeper than [`MAX_JSON_DEPTH`],
/// counting only brackets outside strings.
fn check_depth(text: &str) -> Result<(), &'static str> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for b in text.bytes() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return Err(reason::TOO_DEEP);
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Copies a raw JSON string into a bounded string, resolving escapes.
fn unescape<const N: usize>(
    raw: EscapedStr<'_>,
    not_string: &'static str,
    too_long: &'static str,
) -> Result<String<N>, &'static str> {
    let mut out = String::new();
    for fragment in raw.fragments() {
        match fragment.map_err(|_| not_string)? {
            EscapedStringFragment::NotEscaped(s) => out.push_str(s).map_err(|_| too_long)?,
            EscapedStringFragment::Escaped(c) => out.push(c).map_err(|_| too_long)?,
        }
    }
    Ok(out)
}

fn decode_sha256(hex: &str) -> Option<[u8; 32]> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

/// Checks what the downloader relies on: printable ASCII, an http(s) scheme
/// (any case), a host, and a numeric port if there is one.
fn check_url(url: &str) -> Result<(), &'static str> {
    if !url.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(reason::URL_BAD_CHARS);
    }
    let scheme_end = url.find("://").ok_or(reason::URL_NOT_HTTP)?;
    let scheme = &url[..scheme_end];
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err(reason::URL_NOT_HTTP);
    }
    let rest = &url[scheme_end + 3..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    let port = if let Some(bracketed) = host_port.strip_prefix('[') {
        // An IPv6 literal: `[::1]:8080`.
        let close = bracketed.find(']').ok_or(reason::URL_NO_HOST)?;
        if close == 0 {
            return Err(reason::URL_NO_HOST);
        }
        match &bracketed[close + 1..] {
            "" => None,
            after => Some(after.strip_prefix(':').ok_or(reason::URL_BAD_PORT)?),
        }
    } else {
        let (host, port) = match host_port.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        };
        if host.is_empty() {
            return Err(reason::URL_NO_HOST);
        }
        port
    };
    if let Some(port) = port {
        let valid = !port.is_empty()
            && port.len() <= 5
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p));
        if !valid {
            return Err(reason::URL_BAD_PORT);
        }
    }
    Ok(())
}

/// The fields of a command object, strings still raw (escaped).
#[derive(Default)]
struct Fields<'a> {
    url: Option<EscapedStr<'a>>,
    version: Option<EscapedStr<'a>>,
    sha256: Option<EscapedStr<'a>>,
    size: Option<u32>,
    job: Option<EscapedStr<'a>>,
    timeout_s: Option<u32>,
    /// Whether a `devices` list names this device; `None` without a list.
    devices: Option<bool>,
    force: Option<bool>,
    allow_downgrade: Option<bool>,
    allow_other_project: Option<bool>,
    op: Option<EscapedStr<'a>>,
    seq: Option<u64>,
    device: Option<EscapedStr<'a>>,
}

#[derive(Clone, Copy)]
enum Mode<'d> {
    /// Read every known field of a start command.
    Start { device_id: &'d str },
    /// Read the fields of a cancel or rollback: `job` and the signed
    /// command's `op`, `seq`, `device` and `devices`.
    Stop { device_id: &'d str },
    /// Read only `job`, skipping everything else unchecked.
    JobOnly,
}

/// Reads the object `text`; with `whole`, nothing but whitespace may follow it.
fn read_object<'a>(text: &'a str, mode: Mode<'_>, whole: bool) -> Result<Fields<'a>, &'static str> {
    let why = Cell::new(None);
    // No unescape buffer: every string arrives borrowed and raw, and only the
    // kept ones are unescaped (see the module doc).
    let mut de = serde_json_core::de::Deserializer::new(text.as_bytes(), None);
    let fields = de
        .deserialize_map(ObjectVisitor { mode, why: &why })
        .and_then(|fields| {
            if whole {
                de.end().map(|_| fields)
            } else {
                Ok(fields)
            }
        });
    fields.map_err(|_| why.get().unwrap_or(reason::NOT_JSON))
}

struct ObjectVisitor<'r, 'd> {
    mode: Mode<'d>,
    why: &'r Cell<Option<&'static str>>,
}

impl ObjectVisitor<'_, '_> {
    /// Reads the next value as `T`, leaving `reason` behind if that fails.
    fn value<'de, T, A>(&self, map: &mut A, reason: &'static str) -> Result<T, A::Error>
    where
        T: de::Deserialize<'de>,
        A: MapAccess<'de>,
    {
        map.next_value().inspect_err(|_| self.why.set(Some(reason)))
    }

    fn fail<E: de::Error>(&self, reason: &'static str) -> E {
        self.why.set(Some(reason));
        E::custom(reason)
    }
}

impl<'de> de::Visitor<'de> for ObjectVisitor<'_, '_> {
    type Value = Fields<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a command object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Fields::default();
        let mut seen = 0u16;
        // A number followed by `.5` or `e3` parses as its integer part and
        // fails only at the next key; this names the number's field then.
        let mut number_field: Option<&'static str> = None;
        loop {
            let raw_key = match map.next_key::<&'de str>() {
                Ok(Some(key)) => key,
                Ok(None) => break,
                Err(e) => {
                    if let Some(reason) = number_field {
                        self.why.set(Some(reason));
                    }
                    return Err(e);
                }
            };
            number_field = None;
            // Keys are compared unescaped, as any other JSON reader would:
            // `"u\u0072l"` is `url`, not an unknown field that a second
            // reader might take for the real one. A key too long for a known
            // name, or with a bad escape, is simply unknown.
            let key: String<24> = unescape(EscapedStr(raw_key), "", "").unwrap_or_default();
            let key = key.as_str();
            let device_id = match self.mode {
                Mode::Start { device_id } => device_id,
                Mode::Stop { device_id }
                    if matches!(key, "job" | "op" | "seq" | "device" | "devices") =>
                {
                    device_id
                }
                Mode::JobOnly if key == "job" => "",
                Mode::JobOnly | Mode::Stop { .. } => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            let bit: u16 = match key {
                "url" => 1,
                "version" => 2,
                "sha256" => 4,
                "size" => 8,
                "job" => 16,
                "timeout_s" => 32,
                "devices" => 64,
                "force" => 128,
                "allow_downgrade" => 256,
                "allow_other_project" => 512,
                "op" => 1024,
                "seq" => 2048,
                "device" => 4096,
                _ => 0,
            };
            if seen & bit != 0 {
                return Err(self.fail(reason::DUPLICATE));
            }
            seen |= bit;
            match key {
                "url" => fields.url = self.value(&mut map, reason::URL_NOT_STRING)?,
                "version" => fields.version = self.value(&mut map, reason::VERSION_NOT_STRING)?,
                "sha256" => fields.sha256 = self.value(&mut map, reason::SHA256_BAD)?,
                "job" => fields.job = self.value(&mut map, reason::JOB_NOT_STRING)?,
                "force" => fields.force = self.value(&mut map, reason::FORCE_NOT_BOOL)?,
                "allow_downgrade" => {
                    fields.allow_downgrade =
                        self.value(&mut map, reason::ALLOW_DOWNGRADE_NOT_BOOL)?
                }
                "allow_other_project" => {
                    fields.allow_other_project =
                        self.value(&mut map, reason::ALLOW_OTHER_PROJECT_NOT_BOOL)?
                }
                "op" => fields.op = self.value(&mut map, reason::OP_NOT_STRING)?,
                "device" => fields.device = self.value(&mut map, reason::DEVICE_NOT_STRING)?,
                "seq" => {
                    fields.seq = self.value(&mut map, reason::SEQ_NOT_INT)?;
                    number_field = Some(reason::SEQ_NOT_INT);
                }
                "size" => {
                    fields.size = self.value(&mut map, reason::SIZE_NOT_INT)?;
                    number_field = Some(reason::SIZE_NOT_INT);
                }
                "timeout_s" => {
                    fields.timeout_s = self.value(&mut map, reason::TIMEOUT_NOT_INT)?;
                    number_field = Some(reason::TIMEOUT_NOT_INT);
                }
                "devices" => {
                    fields.devices = map
                        .next_value_seed(DevicesSeed {
                            device_id,
                            why: self.why,
                        })
                        .inspect_err(|_| {
                            if self.why.get().is_none() {
                                self.why.set(Some(reason::DEVICES_NOT_LIST));
                            }
                        })?;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(fields)
    }
}

/// Streams a `devices` value (`null` or an array of strings), answering
/// whether it names `device_id`.
struct DevicesSeed<'r, 'd> {
    device_id: &'d str,
    why: &'r Cell<Option<&'static str>>,
}

impl<'de> DeserializeSeed<'de> for DevicesSeed<'_, '_> {
    type Value = Option<bool>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> de::Visitor<'de> for DevicesSeed<'_, '_> {
    type Value = Option<bool>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of device ids")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let fail = |reason| {
            self.why.set(Some(reason));
            de::Error::custom(reason)
        };
        let mut count = 0;
        let mut named = false;
        while let Some(raw) = seq.next_element::<EscapedStr<'de>>()? {
            count += 1;
            if count > MAX_DEVICES {
                return Err(fail(reason::DEVICES_TOO_MANY));
            }
            let id: String<MAX_DEVICE_ID_LEN> =
                unescape(raw, reason::DEVICES_NOT_LIST, reason::DEVICE_ID_TOO_LONG)
                    .map_err(fail)?;
            named |= id == self.device_id;
        }
        Ok(Some(named))
    }
}

#[cfg(test)]
mod tests;

//! Who may use the broker, and for what.
//!
//! Each device has its own MQTT identity: its device id as the user name
//! and a random password that `mqota device add ID` makes, writes to a file
//! with mode 0600 and forgets; the store keeps only a hash. The controller
//! has one more identity, [`CONTROLLER_USER`]. Both doors enforce the same
//! rules, built here from the protocol's own [`Topics`] so they can never
//! disagree with what devices and the controller actually use:
//!
//! | who | may publish | may subscribe |
//! |---|---|---|
//! | device `ID` | `{prefix}/ID/status`, `…/progress`, `…/availability`, `…/logs`, and the shared `{prefix}/progress` copy | exactly `{prefix}/ota/start` and its own `{prefix}/ID/ota/start`, `…/ota/cancel`, `…/ota/rollback`, `…/logs/get` |
//! | the controller | anything | anything |
//! | anonymous (only where the door is explicitly open) | anything | anything |
//!
//! The embedded broker ([`crate::broker`]) asks [`Acl`] about every PUBLISH,
//! SUBSCRIBE and will; for Mosquitto, [`mosquitto_acl`] writes the same list
//! as `pattern` lines keyed on `%u`, the authenticated user name (never `%c`,
//! the client id, which any client chooses).
//!
//! # Why PBKDF2-SHA512 (`$7$`) and not argon2id
//!
//! Device and controller passwords are made here from 24 random bytes, never
//! chosen by a person: guessing one is as hard as guessing a 192-bit key, so
//! a memory-hard hash buys nothing. The hash format that matters is the one
//! Mosquitto 2 reads in its `password_file` (`$7$`: PBKDF2-HMAC-SHA512, 101
//! iterations by default, 12-byte salt, standard base64), because keeping that
//! exact string lets `mqota broker mosquitto-conf` write Mosquitto's password
//! file at any time from the store without ever holding a password again.
//! The embedded broker checks the same hashes; at 101 iterations a check
//! costs about half a millisecond of CPU (0.42 ms measured with OpenSSL's
//! PBKDF2 on the 2-core build machine under load), so even a fleet of
//! thousands reconnecting at once costs seconds, not minutes, and the check
//! runs off the front door's thread.
//! (Human passwords, for web logins, want argon2id: [`crate::accounts`] keeps those.)

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use mqota_core::protocol::Topics;

/// The controller's user name unless configured otherwise.
pub const CONTROLLER_USER: &str = "controller";

/// File name suffix of a password file: `ID.password`.
pub const PASSWORD_SUFFIX: &str = ".password";

/// PBKDF2 iterations for new hashes: Mosquitto 2's `mosquitto_passwd` default.
pub const PBKDF2_ITERATIONS: u32 = 101;

/// The largest iteration count a stored hash may name; more would let a
/// corrupt row make every CONNECT expensive.
const MAX_ITERATIONS: u32 = 1_000_000;

const SALT_LEN: usize = 12;
const HASH_LEN: usize = 64;

/// What an identity may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A device: its own topics only.
    Device,
    /// The controller: every topic, and the only one that sends commands.
    Controller,
}

impl Role {
    /// The name in the store and in `mqota device list`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Device => "device",
            Role::Controller => "controller",
        }
    }

    /// The role named `s`, if there is one.
    pub fn parse(s: &str) -> Option<Self> {
        [Role::Device, Role::Controller]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

/// One MQTT identity as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The MQTT user name (a device's id).
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// `$7$ITERATIONS$SALT$HASH`, as in Mosquitto's password file.
    pub hash: String,
    /// Created, Unix seconds.
    pub created_at: i64,
}

/// A password in memory. It has no `Display`, and its `Debug` prints
/// `"<redacted>"`, so it cannot slip into a log line or an error by accident;
/// [`Secret::expose`] is the one way to read it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a password read from a file or the environment (one trailing
    /// newline, as editors and `echo` leave, is dropped).
    pub fn new(s: impl Into<String>) -> Self {
        let mut s = s.into();
        if s.ends_with('\n') {
            s.pop();
            if s.ends_with('\r') {
                s.pop();
            }
        }
        Secret(s)
    }

    /// The password itself: only for CONNECT and for the file it is kept in.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A new random password: 24 bytes from the OS, base64url (32 characters,
    /// safe in files, shell variables and firmware build variables).
    pub fn random() -> Self {
        let mut bytes = [0u8; 24];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
        Secret(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Hashes `password` in Mosquitto 2's `$7$` format with a fresh salt.
pub fn hash_password(password: &Secret) -> String {
    let mut salt = [0u8; SALT_LEN];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut salt);
    hash_with(password.expose().as_bytes(), &salt, PBKDF2_ITERATIONS)
}

fn hash_with(password: &[u8], salt: &[u8], iterations: u32) -> String {
    let mut out = [0u8; HASH_LEN];
    pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password, salt, iterations, &mut out);
    let b64 = base64::engine::general_purpose::STANDARD;
    format!("$7${iterations}${}${}", b64.encode(salt), b64.encode(out))
}

/// Whether `password` matches `hash` (`$7$`, as [`hash_password`] and
/// Mosquitto's `mosquitto_passwd` write it). A malformed hash matches nothing.
pub fn verify_password(hash: &str, password: &[u8]) -> bool {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut parts = hash.split('$');
    let (Some(""), Some("7"), Some(iter), Some(salt), Some(expected), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return false;
    };
    let Ok(iterations) = iter.parse::<u32>() else {
        return false;
    };
    if !(1..=MAX_ITERATIONS).contains(&iterations) {
        return false;
    }
    let (Ok(salt), Ok(expected)) = (b64.decode(salt), b64.decode(expected)) else {
        return false;
    };
    if expected.len() != HASH_LEN {
        return false;
    }
    let mut out = [0u8; HASH_LEN];
    pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password, &salt, iterations, &mut out);
    subtle::ConstantTimeEq::ct_eq(&out[..], &expected[..]).into()
}

/// Who a connection is, once the door let it in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Client {
    /// No user name, let in because the door is open.
    Anonymous,
    /// A device, by id (= its user name).
    Device(String),
    /// The controller.
    Controller,
}

/// The topic rules for one prefix.
#[derive(Debug, Clone)]
pub struct Acl {
    prefix: String,
}

impl Acl {
    /// Rules for the fleet under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// May `who` publish on `topic` (a PUBLISH, or a will at CONNECT)?
    pub fn may_publish(&self, who: &Client, topic: &str) -> bool {
        match who {
            Client::Anonymous | Client::Controller => true,
            Client::Device(id) => match Topics::new(&self.prefix, id) {
                Ok(t) => device_publishes(&t).iter().any(|p| p == topic),
                Err(_) => false,
            },
        }
    }

    /// May `who` subscribe to `filter`? A device only to the exact filters
    /// it needs: no wildcards, no `$share/…`, nothing of another device.
    pub fn may_subscribe(&self, who: &Client, filter: &str) -> bool {
        match who {
            Client::Anonymous | Client::Controller => true,
            Client::Device(id) => match Topics::new(&self.prefix, id) {
                Ok(t) => t.subscriptions().iter().any(|s| s.as_str() == filter),
                Err(_) => false,
            },
        }
    }
}

/// What a device publishes: its status, progress, availability (also its
/// will) and log pages, and the shared progress copy.
fn device_publishes(t: &Topics) -> [heapless::String<{ mqota_core::protocol::MAX_TOPIC_LEN }>; 5] {
    [
        t.status(),
        t.device_progress(),
        t.availability(),
        t.logs(),
        t.progress(),
    ]
}

/// Mosquitto's `acl_file` for the fleet under `prefix`, with `controller`
/// as the controller's user name.
///
/// `pattern` lines apply to every authenticated user with `%u` replaced by
/// the user name (Mosquitto refuses the substitution for names containing
/// `+`, `#` or `/`); the controller's own `user` block then grants it the
/// whole prefix. Mosquitto checks reads per delivered message, so a device
/// that subscribes to a wildcard still receives only its own commands.
pub fn mosquitto_acl(
    prefix: &str,
    controller: &str,
) -> Result<String, mqota_core::protocol::TopicError> {
    // `%u` is a valid device id (one level, no wildcard), so the topics the
    // embedded broker checks can be written with it in the id's place.
    let t = Topics::new(prefix, "%u")?;
    let mut out = String::from(
        "# Written by `mqota broker mosquitto-conf`; the same rules the embedded broker enforces.\n\
         # Devices: user name = device id.\n",
    );
    for topic in device_publishes(&t) {
        out.push_str(&format!("pattern write {topic}\n"));
    }
    for filter in t.subscriptions() {
        out.push_str(&format!("pattern read {filter}\n"));
    }
    out.push_str(&format!(
        "\n# The controller: everything under the prefix (and the only one that may send commands).\nuser {controller}\ntopic readwrite {prefix}/#\n"
    ));
    Ok(out)
}

/// Mosquitto's `password_file`: one `name:$7$…` line per identity.
pub fn mosquitto_passwords(identities: &[Identity]) -> String {
    identities
        .iter()
        .map(|i| format!("{}:{}\n", i.name, i.hash))
        .collect()
}

/// A `mosquitto.conf` for one listener with logins and the ACL.
pub fn mosquitto_conf(
    listen: std::net::SocketAddr,
    password_file: &std::path::Path,
    acl_file: &std::path::Path,
) -> String {
    format!(
        "# Written by `mqota broker mosquitto-conf`: logins required, topics per device.\n\
         per_listener_settings false\n\
         listener {} {}\n\
         allow_anonymous false\n\
         password_file {}\n\
         acl_file {}\n",
        listen.port(),
        listen.ip(),
        password_file.display(),
        acl_file.display()
    )
}

/// The files of a Mosquitto TLS listener (all PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MosquittoTls {
    /// The fleet CA: client certificates must chain to it.
    pub cafile: std::path::PathBuf,
    /// The broker's certificate.
    pub certfile: std::path::PathBuf,
    /// Its private key.
    pub keyfile: std::path::PathBuf,
}

/// A `mosquitto.conf` for one TLS listener where a client certificate of
/// the fleet CA is the login: `require_certificate true` (no certificate,
/// no connection) and `use_identity_as_username true` (the certificate's CN
/// is the user name the ACL's `%u` stands for; a user name in the CONNECT
/// is ignored, so no password file is needed).
pub fn mosquitto_conf_tls(
    listen: std::net::SocketAddr,
    tls: &MosquittoTls,
    acl_file: &std::path::Path,
) -> String {
    format!(
        "# Written by `mqota broker mosquitto-conf --tls`: a client certificate of the fleet CA is the login, topics per device.\n\
         per_listener_settings false\n\
         listener {} {}\n\
         allow_anonymous false\n\
         cafile {}\n\
         certfile {}\n\
         keyfile {}\n\
         require_certificate true\n\
         use_identity_as_username true\n\
         acl_file {}\n",
        listen.port(),
        listen.ip(),
        tls.cafile.display(),
        tls.certfile.display(),
        tls.keyfile.display(),
        acl_file.display()
    )
}

/// Where `mqota device add` and the controller keep password files by
/// default: `DATA_DIR/credentials/` (mode 0700).
pub fn credentials_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("credentials")
}

/// The default password file of `name`: `DATA_DIR/credentials/NAME.password`.
pub fn password_path(data_dir: &Path, name: &str) -> PathBuf {
    credentials_dir(data_dir).join(format!("{name}{PASSWORD_SUFFIX}"))
}

/// Creates the directory `path` is in, with its parents, if it is missing:
/// mode 0700, its owner's only (one that exists is left as it is).
pub(crate) fn create_private_parent(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            let mut b = std::fs::DirBuilder::new();
            b.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
            b.create(dir)?;
        }
    }
    Ok(())
}

/// Writes `password` to `path`, readable by its owner only (mode 0600 from
/// the start: the file is never readable by others, not even briefly). A
/// directory it creates gets mode 0700.
pub fn write_password_file(path: &Path, password: &Secret) -> std::io::Result<()> {
    use std::io::Write as _;
    create_private_parent(path)?;
    let _ = std::fs::remove_file(path);
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    let mut f = o.open(path)?;
    f.write_all(password.expose().as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

/// Reads a password file; the error names the file, never its content.
pub fn read_password_file(path: &Path) -> std::io::Result<Secret> {
    std::fs::read_to_string(path).map(Secret::new)
}

/// Makes a new identity with a random password: the store gets the hash,
/// the caller the password (to write to a file once).
pub fn new_identity(name: &str, role: Role) -> (Identity, Secret) {
    let password = Secret::random();
    let identity = Identity {
        name: name.to_owned(),
        role,
        hash: hash_password(&password),
        created_at: crate::unix_now(),
    };
    (identity, password)
}

/// The controller's own login for a broker the controller configures (the
/// embedded one, or Mosquitto through `mqota broker mosquitto-conf`): the
/// identity [`CONTROLLER_USER`] in `store`, with its password in
/// `DATA_DIR/credentials/controller.password`. Made on first use; made anew
/// (a new password) when the file is gone, since the store has only a hash.
/// Returns the password and whether it is new.
pub fn controller_login(
    store: &crate::store::Store,
    data_dir: &Path,
) -> Result<(Secret, bool), AccessError> {
    let path = password_path(data_dir, CONTROLLER_USER);
    if let Some(existing) = store.identity(CONTROLLER_USER)? {
        if existing.role != Role::Controller {
            return Err(AccessError::NotController);
        }
        if let Ok(pw) = read_password_file(&path) {
            if verify_password(&existing.hash, pw.expose().as_bytes()) {
                return Ok((pw, false));
            }
        }
        store.remove_identity(CONTROLLER_USER)?;
    }
    let (identity, password) = new_identity(CONTROLLER_USER, Role::Controller);
    write_password_file(&path, &password).map_err(|source| AccessError::File {
        path: path.clone(),
        source,
    })?;
    store.add_identity(&identity)?;
    Ok((password, true))
}

/// Why an identity could not be made or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AccessError {
    /// The store failed: see the cause.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A password file could not be written: check the directory's
    /// permissions (or `--out`).
    #[error("cannot write the password file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The store has a device named `controller`: remove it (`mqota device
    /// remove controller`); that name is the controller's.
    #[error("the identity {CONTROLLER_USER:?} in the store is not the controller's")]
    NotController,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_verifies_its_password_and_nothing_else() {
        let pw = Secret::random();
        let h = hash_password(&pw);
        assert!(h.starts_with("$7$101$"), "{h}");
        assert!(verify_password(&h, pw.expose().as_bytes()));
        assert!(!verify_password(&h, b"not it"));
        assert!(!verify_password("$6$101$abc$def", pw.expose().as_bytes()));
        assert!(!verify_password("", b""));
        assert!(!verify_password("$7$0$AAAA$AAAA", b""));
    }

    #[test]
    fn a_hash_made_by_mosquitto_passwd_verifies() {
        // `mosquitto_passwd -b` (Mosquitto 2.0.11, Debian) for alice / secret123.
        let h = "$7$101$97sUi/UAVdtKXM8G$UujYhZjI0RSXS2DXY8GAoW1BSeR+wqu9aV7t8r8U8XsViOpoijP+iMeItZhiGTTz4wTYT4GceiTbO9dw02JJSw==";
        assert!(verify_password(h, b"secret123"));
        assert!(!verify_password(h, b"secret124"));
    }

    #[test]
    fn a_secret_never_shows_in_debug() {
        let s = Secret::new("hunter2\n");
        assert_eq!(s.expose(), "hunter2");
        assert_eq!(format!("{s:?}"), "<redacted>");
    }

    #[test]
    fn a_device_publishes_only_its_own_reports_and_subscribes_only_to_its_commands() {
        let acl = Acl::new("fleet/a");
        let me = Client::Device("dev-1".into());
        for t in [
            "fleet/a/dev-1/status",
            "fleet/a/dev-1/progress",
            "fleet/a/dev-1/availability",
            "fleet/a/dev-1/logs",
            "fleet/a/progress",
        ] {
            assert!(acl.may_publish(&me, t), "{t}");
        }
        for t in [
            "fleet/a/dev-2/status",
            "fleet/a/dev-1/ota/start",
            "fleet/a/ota/start",
            "fleet/a/dev-1/ota/rollback",
            "fleet/a/dev-1/status/x",
            "fleet/b/dev-1/status",
            "other",
        ] {
            assert!(!acl.may_publish(&me, t), "{t}");
        }
        for f in [
            "fleet/a/ota/start",
            "fleet/a/dev-1/ota/start",
            "fleet/a/dev-1/ota/cancel",
            "fleet/a/dev-1/ota/rollback",
            "fleet/a/dev-1/logs/get",
        ] {
            assert!(acl.may_subscribe(&me, f), "{f}");
        }
        for f in [
            "fleet/a/dev-2/ota/start",
            "fleet/a/+/ota/start",
            "fleet/a/#",
            "#",
            "$share/g/fleet/a/dev-1/ota/start",
            "fleet/a/dev-1/status",
        ] {
            assert!(!acl.may_subscribe(&me, f), "{f}");
        }
        assert!(acl.may_publish(&Client::Controller, "fleet/a/dev-1/ota/start"));
        assert!(acl.may_subscribe(&Client::Controller, "fleet/a/#"));
    }

    #[test]
    fn the_mosquitto_acl_lists_the_same_topics_keyed_on_the_user_name() {
        let acl = mosquitto_acl("device", "controller").unwrap();
        assert!(acl.contains("pattern write device/%u/status\n"));
        assert!(acl.contains("pattern write device/progress\n"));
        assert!(acl.contains("pattern read device/ota/start\n"));
        assert!(acl.contains("pattern read device/%u/logs/get\n"));
        assert!(acl.contains("user controller\ntopic readwrite device/#\n"));
        assert!(!acl.contains("%c"));
        // Same rules as the embedded broker's, line for line.
        let rules = Acl::new("device");
        let me = Client::Device("x1".into());
        for line in acl.lines() {
            if let Some(t) = line.strip_prefix("pattern write ") {
                assert!(rules.may_publish(&me, &t.replace("%u", "x1")), "{line}");
            }
            if let Some(f) = line.strip_prefix("pattern read ") {
                assert!(rules.may_subscribe(&me, &f.replace("%u", "x1")), "{line}");
            }
        }
    }
}

//! Who may use the web page and the JSON API, and what they did.
//!
//! | role | may |
//! |---|---|
//! | `viewer` | read: every `GET` under `/api/` |
//! | `operator` | also change the fleet: deploy, pause, resume, stop, retry, upload and delete firmware, forget a device (every other method under `/api/`) |
//! | `admin` | also manage accounts and API tokens (`/api/users`, `/api/tokens`) |
//!
//! A person logs in with a name and password (`POST /api/login`) and gets a
//! session cookie (`HttpOnly`, `SameSite=Strict`, `Secure` when serve speaks
//! HTTPS); scripts and the CLI send an API token as `Authorization: Bearer
//! …` (`MQOTA_TOKEN`, `--token`). Every request under `/api/` passes
//! [`Auth::layer`]:
//!
//! | attempt | answer |
//! |---|---|
//! | no credentials, login required | `401` |
//! | unknown, expired or revoked token; unknown or expired session | `401` |
//! | a role below what the route needs | `403` |
//! | a state-changing request on a session without the session's CSRF token in [`CSRF_HEADER`] | `403` |
//! | too many failed logins for the name or from the address | `429` with `Retry-After` |
//!
//! # Why the CSRF token on top of `SameSite=Strict`
//!
//! `SameSite` is the browser's promise, and a sibling subdomain counts as
//! the same site; the token is the server's own check. The page reads it
//! from `GET /api/session` (same-origin only: a page elsewhere cannot read
//! the answer) and sends it with every `POST` and `DELETE`. Bearer tokens
//! need none: a browser never attaches them by itself.
//!
//! # Secrets at rest
//!
//! Passwords are hashed with argon2id (the `argon2` crate's defaults, the
//! OWASP-recommended 19 MiB, 2 passes) because people choose them and may
//! reuse them. Session cookies and API tokens are 32 random bytes: only
//! their SHA-256 is kept, which is enough for a secret no one can guess
//! and lets the lookup be one indexed query.
//!
//! # When login is required
//!
//! [`Auth::required`]: always when serve listens on anything but loopback,
//! and on loopback as soon as one account exists. A loopback serve with no
//! account stays open (as `mqota demo` is), and the audit log names the
//! actor [`OPEN_ACTOR`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use base64::Engine as _;
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::http::api_error;
use crate::store::{Store, StoreError};
use crate::unix_now;

/// What an account may do; each role may do all the one before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebRole {
    /// Reads everything.
    Viewer,
    /// Changes the fleet: deploys, stops, uploads.
    Operator,
    /// Manages accounts and tokens.
    Admin,
}

impl WebRole {
    /// Its name in the store, the API and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            WebRole::Viewer => "viewer",
            WebRole::Operator => "operator",
            WebRole::Admin => "admin",
        }
    }

    /// The role named `s`, if any.
    pub fn parse(s: &str) -> Option<Self> {
        [WebRole::Viewer, WebRole::Operator, WebRole::Admin]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for WebRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An account of the web page and the API (never its password).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebUser {
    /// Login name.
    pub name: String,
    /// What it may do.
    pub role: WebRole,
    /// Created, Unix seconds.
    pub created_at: i64,
}

/// An API token as listed (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    /// Its id, for `mqota token revoke ID`; also the token's first part.
    pub id: String,
    /// The account it acts as (with that account's role at the time of use).
    pub user: String,
    /// What it is for, as its maker said.
    pub label: Option<String>,
    /// Created, Unix seconds.
    pub created_at: i64,
    /// Refused from then on, Unix seconds; `None`: until revoked.
    pub expires_at: Option<i64>,
    /// Revoked at, Unix seconds.
    pub revoked_at: Option<i64>,
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Order of recording.
    pub seq: i64,
    /// When, Unix seconds.
    pub at: i64,
    /// Who: an account name, [`OPEN_ACTOR`], or the name a failed login gave.
    pub actor: String,
    /// What, e.g. `login`, `login refused`, `deploy`, `stop`, `upload firmware`.
    pub action: String,
    /// On what: a deployment id, a firmware or account name.
    pub target: Option<String>,
    /// From where: the client's IP address.
    pub source: Option<String>,
    /// The HTTP status it was answered with.
    pub status: u16,
}

/// The actor the audit log names while no login is required.
pub const OPEN_ACTOR: &str = "(no login: loopback)";

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "mqota_session";

/// Request header carrying the session's CSRF token.
pub const CSRF_HEADER: &str = "x-mqota-csrf";

/// How long a session lasts after login.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// Hashes a password with argon2id (PHC string format, random salt).
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut rand_core::OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2id with default parameters hashes any password")
        .to_string()
}

/// Whether `password` matches `hash` (as [`hash_password`] made it); a
/// malformed hash matches nothing.
pub fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// A hash to check wrong names against, so that a login for a name that
/// does not exist costs as much time as one with a wrong password.
fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password("not a password anyone has"))
}

fn random_text(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn sha256_hex(s: &str) -> String {
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// Whether a login name is acceptable: 1–64 letters, digits, `.`, `_`,
/// `-`, `@`.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c))
}

/// The shortest password `mqota user add` and `POST /api/users` take.
pub const MIN_PASSWORD: usize = 10;

/// A new API token: what to hand to its user (once) and what is listed.
#[derive(Debug, Clone)]
pub struct NewToken {
    /// The secret to send as `Authorization: Bearer …`. Shown once.
    pub secret: String,
    /// Its listing.
    pub token: ApiToken,
}

fn row_to_token(r: &rusqlite::Row<'_>) -> rusqlite::Result<ApiToken> {
    Ok(ApiToken {
        id: r.get(0)?,
        user: r.get(1)?,
        label: r.get(2)?,
        created_at: r.get(3)?,
        expires_at: r.get(4)?,
        revoked_at: r.get(5)?,
    })
}

fn role_of(s: String) -> rusqlite::Result<WebRole> {
    WebRole::parse(&s).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            format!("unknown web role {s:?}").into(),
        )
    })
}

/// The accounts' tables (migration 5 of [`crate::store`]).
impl Store {
    /// Adds an account with an argon2id hash ([`hash_password`]); `false`
    /// when the name is taken.
    pub fn add_web_user(&self, name: &str, role: WebRole, hash: &str) -> Result<bool, StoreError> {
        let c = self.conn.lock().unwrap();
        Ok(c.execute(
            "INSERT OR IGNORE INTO web_users (name, role, hash, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![name, role.as_str(), hash, unix_now()],
        )? > 0)
    }

    /// Removes an account, its sessions and its tokens; `false` when there
    /// was none.
    pub fn remove_web_user(&self, name: &str) -> Result<bool, StoreError> {
        let mut c = self.conn.lock().unwrap();
        let tx = c.transaction()?;
        tx.execute("DELETE FROM web_sessions WHERE user = ?1", [name])?;
        tx.execute("DELETE FROM api_tokens WHERE user = ?1", [name])?;
        let n = tx.execute("DELETE FROM web_users WHERE name = ?1", [name])?;
        tx.commit()?;
        Ok(n > 0)
    }

    /// Every account, by name.
    pub fn web_users(&self) -> Result<Vec<WebUser>, StoreError> {
        let c = self.conn.lock().unwrap();
        let mut st = c.prepare("SELECT name, role, created_at FROM web_users ORDER BY name")?;
        let rows = st.query_map([], |r| {
            Ok(WebUser {
                name: r.get(0)?,
                role: role_of(r.get(1)?)?,
                created_at: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Whether any account exists (then login is required everywhere).
    pub fn has_web_users(&self) -> Result<bool, StoreError> {
        let c = self.conn.lock().unwrap();
        Ok(c.query_row("SELECT EXISTS (SELECT 1 FROM web_users)", [], |r| r.get(0))?)
    }

    /// The account `name` and its password hash.
    fn web_user_hash(&self, name: &str) -> Result<Option<(WebRole, String)>, StoreError> {
        let c = self.conn.lock().unwrap();
        Ok(c.query_row(
            "SELECT role, hash FROM web_users WHERE name = ?1",
            [name],
            |r| Ok((role_of(r.get(0)?)?, r.get(1)?)),
        )
        .optional()?)
    }

    /// Makes an API token acting as `user`, valid until `expires_at`
    /// (Unix seconds) or revoked. The secret is returned once; only its
    /// SHA-256 is kept.
    pub fn add_token(
        &self,
        user: &str,
        label: Option<&str>,
        expires_at: Option<i64>,
    ) -> Result<NewToken, StoreError> {
        let id = hex::encode({
            let mut b = [0u8; 6];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
            b
        });
        let secret = format!("mqota_{id}_{}", random_text(32));
        let token = ApiToken {
            id,
            user: user.to_owned(),
            label: label.map(str::to_owned),
            created_at: unix_now(),
            expires_at,
            revoked_at: None,
        };
        let c = self.conn.lock().unwrap();
        c.execute(
            "INSERT INTO api_tokens (id, hash, user, label, created_at, expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                token.id,
                sha256_hex(&secret),
                token.user,
                token.label,
                token.created_at,
                token.expires_at
            ],
        )?;
        Ok(NewToken { secret, token })
    }

    /// Every API token, newest first.
    pub fn tokens(&self) -> Result<Vec<ApiToken>, StoreError> {
        let c = self.conn.lock().unwrap();
        let mut st = c.prepare(
            "SELECT id, user, label, created_at, expires_at, revoked_at FROM api_tokens \
             ORDER BY created_at DESC, id",
        )?;
        let rows = st.query_map([], row_to_token)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Revokes a token at `now`; `false` when there is none by that id or
    /// it was revoked already.
    pub fn revoke_token(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        let c = self.conn.lock().unwrap();
        Ok(c.execute(
            "UPDATE api_tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
            params![id, now],
        )? > 0)
    }

    /// The token whose secret is `secret`, with its account's role, if the
    /// account still exists.
    fn token_for(&self, secret: &str) -> Result<Option<(ApiToken, WebRole)>, StoreError> {
        let c = self.conn.lock().unwrap();
        Ok(c.query_row(
            "SELECT t.id, t.user, t.label, t.created_at, t.expires_at, t.revoked_at, u.role \
             FROM api_tokens t JOIN web_users u ON u.name = t.user WHERE t.hash = ?1",
            [sha256_hex(secret)],
            |r| Ok((row_to_token(r)?, role_of(r.get(6)?)?)),
        )
        .optional()?)
    }

    fn add_session(
        &self,
        secret: &str,
        user: &str,
        csrf: &str,
        source: Option<&str>,
        now: i64,
    ) -> Result<(), StoreError> {
        let c = self.conn.lock().unwrap();
        // Expired sessions go when new ones come: the table stays small.
        c.execute("DELETE FROM web_sessions WHERE expires_at <= ?1", [now])?;
        c.execute(
            "INSERT INTO web_sessions (hash, user, csrf, source, created_at, expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                sha256_hex(secret),
                user,
                csrf,
                source,
                now,
                now + SESSION_LIFETIME.as_secs() as i64
            ],
        )?;
        Ok(())
    }

    /// The live session whose cookie is `secret`: account, role, CSRF token.
    fn session_for(
        &self,
        secret: &str,
        now: i64,
    ) -> Result<Option<(String, WebRole, String)>, StoreError> {
        let c = self.conn.lock().unwrap();
        Ok(c.query_row(
            "SELECT s.user, u.role, s.csrf FROM web_sessions s JOIN web_users u ON u.name = s.user \
             WHERE s.hash = ?1 AND s.expires_at > ?2",
            params![sha256_hex(secret), now],
            |r| Ok((r.get(0)?, role_of(r.get(1)?)?, r.get(2)?)),
        )
        .optional()?)
    }

    fn remove_session(&self, secret: &str) -> Result<(), StoreError> {
        let c = self.conn.lock().unwrap();
        c.execute(
            "DELETE FROM web_sessions WHERE hash = ?1",
            [sha256_hex(secret)],
        )?;
        Ok(())
    }

    /// The accounts with a live session at `now` (who is logged in), by name.
    pub fn logged_in(&self, now: i64) -> Result<Vec<String>, StoreError> {
        let c = self.conn.lock().unwrap();
        let mut st = c.prepare(
            "SELECT DISTINCT user FROM web_sessions WHERE expires_at > ?1 ORDER BY user",
        )?;
        let rows = st.query_map([now], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Appends to the audit log.
    pub fn record_audit(
        &self,
        actor: &str,
        action: &str,
        target: Option<&str>,
        source: Option<&str>,
        status: u16,
    ) -> Result<(), StoreError> {
        let c = self.conn.lock().unwrap();
        c.execute(
            "INSERT INTO audit (at, actor, action, target, source, status) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![unix_now(), actor, action, target, source, status],
        )?;
        Ok(())
    }

    /// The newest `limit` entries of the audit log, newest first.
    pub fn audit(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let c = self.conn.lock().unwrap();
        let mut st = c.prepare(
            "SELECT seq, at, actor, action, target, source, status FROM audit ORDER BY seq DESC LIMIT ?1",
        )?;
        let rows = st.query_map([limit as i64], |r| {
            Ok(AuditEntry {
                seq: r.get(0)?,
                at: r.get(1)?,
                actor: r.get(2)?,
                action: r.get(3)?,
                target: r.get(4)?,
                source: r.get(5)?,
                status: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// Failed logins counted per key (a name, an address) in fixed windows.
/// The clock is an argument so that tests need not wait.
#[derive(Debug)]
pub struct LoginLimiter {
    window: Duration,
    max_failures: u32,
    failures: HashMap<String, (u32, Instant)>,
}

/// How many keys [`LoginLimiter`] holds before it forgets those whose
/// window ended (a flood of made-up names must not grow it without bound).
const LIMITER_KEYS: usize = 10_000;

impl LoginLimiter {
    /// At most `max_failures` failed logins per key in each `window`.
    pub fn new(max_failures: u32, window: Duration) -> Self {
        Self {
            window,
            max_failures,
            failures: HashMap::new(),
        }
    }

    /// `Ok` when `key` may try to log in at `now`; else how long it must
    /// wait.
    pub fn check(&self, key: &str, now: Instant) -> Result<(), Duration> {
        match self.failures.get(key) {
            Some(&(n, since)) if n >= self.max_failures => {
                let until = since + self.window;
                if now < until {
                    Err(until - now)
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }

    /// Counts a failed login of `key` at `now`.
    pub fn failed(&mut self, key: &str, now: Instant) {
        if self.failures.len() >= LIMITER_KEYS {
            let window = self.window;
            self.failures
                .retain(|_, (_, since)| now.duration_since(*since) < window);
        }
        let entry = self.failures.entry(key.to_owned()).or_insert((0, now));
        if now.duration_since(entry.1) >= self.window {
            *entry = (0, now);
        }
        entry.0 += 1;
    }

    /// Forgets the failures of `key` (after a good login).
    pub fn succeeded(&mut self, key: &str) {
        self.failures.remove(key);
    }
}

/// Who a request is from, as [`Auth::layer`] found out; handlers may read
/// it as an extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// Account name, or [`OPEN_ACTOR`].
    pub name: String,
    /// Its role (`admin` while no login is required).
    pub role: WebRole,
    /// How it proved it.
    pub via: Via,
}

/// How an [`Actor`] proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// No login required (loopback, no account).
    Open,
    /// A session cookie; its CSRF token.
    Session(String),
    /// An API token; its id.
    Token(String),
}

/// The access policy of one serve.
#[derive(Debug)]
pub struct Auth {
    store: Arc<Store>,
    always: bool,
    https: bool,
    by_name: Mutex<LoginLimiter>,
    by_address: Mutex<LoginLimiter>,
}

/// Failed logins allowed per name in [`LOGIN_WINDOW`].
pub const LOGIN_FAILURES_PER_NAME: u32 = 5;
/// Failed logins allowed per client address in [`LOGIN_WINDOW`].
pub const LOGIN_FAILURES_PER_ADDRESS: u32 = 20;
/// The window of the login limits.
pub const LOGIN_WINDOW: Duration = Duration::from_secs(300);

impl Auth {
    /// The policy: login required always (`always`, for a serve reachable
    /// from other machines) or once an account exists; `https` marks the
    /// session cookie `Secure`.
    pub fn new(store: Arc<Store>, always: bool, https: bool) -> Arc<Self> {
        Arc::new(Self {
            store,
            always,
            https,
            by_name: Mutex::new(LoginLimiter::new(LOGIN_FAILURES_PER_NAME, LOGIN_WINDOW)),
            by_address: Mutex::new(LoginLimiter::new(LOGIN_FAILURES_PER_ADDRESS, LOGIN_WINDOW)),
        })
    }

    /// Whether requests must prove who they are now.
    pub fn required(&self) -> bool {
        // A store that cannot be read is no reason to open the door.
        self.always || self.store.has_web_users().unwrap_or(true)
    }

    /// Puts `router`'s `/api/` routes behind the policy and adds the
    /// accounts' own routes (`/api/login`, `/api/logout`, `/api/session`,
    /// `/api/audit`, `/api/users`, `/api/tokens`).
    pub fn layer(self: &Arc<Self>, router: Router) -> Router {
        let me = self.clone();
        router.merge(self.routes()).layer(axum::middleware::from_fn(
            move |req: Request, next: Next| {
                let me = me.clone();
                async move { me.check(req, next).await }
            },
        ))
    }

    fn routes(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/api/login", post(login))
            .route("/api/logout", post(logout))
            .route("/api/session", get(session))
            .route("/api/audit", get(audit))
            .route("/api/users", get(users).post(add_user))
            .route("/api/users/{name}", delete(remove_user))
            .route("/api/tokens", get(tokens).post(add_token))
            .route("/api/tokens/{id}", delete(revoke_token))
            .with_state(self.clone())
    }

    /// Who sent `headers`: `Ok(None)` for nobody, `Err` (status and
    /// reason) for credentials that do not hold.
    fn identify(&self, headers: &HeaderMap) -> Result<Option<Actor>, (StatusCode, String)> {
        let unauthorized = |msg: &str| (StatusCode::UNAUTHORIZED, msg.to_owned());
        let store_error = |e: StoreError| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
        if let Some(auth) = headers.get(header::AUTHORIZATION) {
            let Some(secret) = auth
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim)
            else {
                return Err(unauthorized(
                    "send an API token as `Authorization: Bearer TOKEN`",
                ));
            };
            let Some((token, role)) = self.store.token_for(secret).map_err(store_error)? else {
                return Err(unauthorized("unknown API token"));
            };
            if token.revoked_at.is_some() {
                return Err(unauthorized(&format!("API token {} is revoked", token.id)));
            }
            if token.expires_at.is_some_and(|t| t <= unix_now()) {
                return Err(unauthorized(&format!("API token {} has expired", token.id)));
            }
            return Ok(Some(Actor {
                name: token.user,
                role,
                via: Via::Token(token.id),
            }));
        }
        let Some(secret) = cookie(headers, SESSION_COOKIE) else {
            return Ok(None);
        };
        match self
            .store
            .session_for(&secret, unix_now())
            .map_err(store_error)?
        {
            Some((name, role, csrf)) => Ok(Some(Actor {
                name,
                role,
                via: Via::Session(csrf),
            })),
            None => Err(unauthorized("the session has ended: log in again")),
        }
    }

    async fn check(self: Arc<Self>, mut req: Request, next: Next) -> Response {
        let path = req.uri().path().to_owned();
        if !path.starts_with("/api/") {
            return next.run(req).await;
        }
        let method = req.method().clone();
        let source = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip().to_string());
        let me = self.clone();
        let headers = req.headers().clone();
        let checked = tokio::task::spawn_blocking(move || {
            let required = me.required();
            let actor = me.identify(&headers)?;
            Ok::<_, (StatusCode, String)>((required, actor))
        })
        .await;
        let (required, actor) = match checked {
            Ok(Ok(x)) => x,
            Ok(Err((status, why))) => return api_error(status, why),
            Err(e) => return api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
        };
        let needed = needed_role(&method, &path);
        let actor = match (actor, required) {
            (Some(a), _) => a,
            (None, false) => Actor {
                name: OPEN_ACTOR.to_owned(),
                role: WebRole::Admin,
                via: Via::Open,
            },
            (None, true) if needed.is_none() => {
                return next.run(req).await;
            }
            (None, true) => {
                return api_error(
                    StatusCode::UNAUTHORIZED,
                    "log in first (POST /api/login), or send an API token as `Authorization: Bearer TOKEN`",
                )
            }
        };
        let changes = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
        let audited = changes && path != "/api/login";
        if let Some(needed) = needed {
            if actor.role < needed {
                let resp = api_error(
                    StatusCode::FORBIDDEN,
                    format!(
                        "{} is a {}: this needs the {needed} role",
                        actor.name, actor.role
                    ),
                );
                if audited {
                    self.audit(&actor, &method, &path, None, source, 403).await;
                }
                return resp;
            }
        }
        if let (Via::Session(csrf), true) = (&actor.via, changes) {
            let sent = req
                .headers()
                .get(CSRF_HEADER)
                .map(HeaderValue::as_bytes)
                .unwrap_or_default();
            if !bool::from(subtle::ConstantTimeEq::ct_eq(sent, csrf.as_bytes())) {
                self.audit(&actor, &method, &path, None, source, 403).await;
                return api_error(
                    StatusCode::FORBIDDEN,
                    format!("missing or wrong {CSRF_HEADER} header (the page sends it; see GET /api/session)"),
                );
            }
        }
        req.extensions_mut().insert(actor.clone());
        let resp = next.run(req).await;
        if audited {
            let made = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|l| l.rsplit('/').next())
                .map(str::to_owned);
            let status = resp.status().as_u16();
            self.audit(&actor, &method, &path, made, source, status)
                .await;
        }
        resp
    }

    async fn audit(
        &self,
        actor: &Actor,
        method: &Method,
        path: &str,
        made: Option<String>,
        source: Option<String>,
        status: u16,
    ) {
        let (action, target) = describe(method, path);
        // The request names its target; a creation (deploy, account, token)
        // learns it from the answer's `Location`.
        let target = target.or(made);
        let store = self.store.clone();
        let name = actor.name.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) =
                store.record_audit(&name, &action, target.as_deref(), source.as_deref(), status)
            {
                tracing::error!("recording the audit log: {e}");
            }
        })
        .await;
    }

    fn cookie_header(&self, value: &str, max_age: u64) -> HeaderValue {
        let secure = if self.https { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
        ))
        .expect("cookie values are base64url")
    }
}

/// The least role a request needs, `None` for the routes anyone may use
/// (logging in, asking whether one is logged in).
pub fn needed_role(method: &Method, path: &str) -> Option<WebRole> {
    if path == "/api/login" || path == "/api/session" {
        return None;
    }
    if path == "/api/users"
        || path.starts_with("/api/users/")
        || path == "/api/tokens"
        || path.starts_with("/api/tokens/")
    {
        return Some(WebRole::Admin);
    }
    if matches!(*method, Method::GET | Method::HEAD) || path == "/api/logout" {
        return Some(WebRole::Viewer);
    }
    Some(WebRole::Operator)
}

/// The audit log's words for a state-changing request: action and target.
fn describe(method: &Method, path: &str) -> (String, Option<String>) {
    let parts: Vec<&str> = path.trim_start_matches("/api/").split('/').collect();
    let decoded = |s: &str| percent_decode(s);
    let (action, target) = match (method.as_str(), parts.as_slice()) {
        ("POST", ["deployments"]) => ("deploy".to_owned(), None),
        ("POST", ["deployments", "preview"]) => ("preview deployment".to_owned(), None),
        ("POST", ["deployments", id, action]) => ((*action).to_owned(), Some(decoded(id))),
        ("POST", ["firmware", name]) => ("upload firmware".to_owned(), Some(decoded(name))),
        ("DELETE", ["firmware", name]) => ("delete firmware".to_owned(), Some(decoded(name))),
        ("POST", ["devices", id, action]) => ((*action).to_owned(), Some(decoded(id))),
        ("DELETE", ["devices", id]) => ("forget device".to_owned(), Some(decoded(id))),
        ("POST", ["logout"]) => ("logout".to_owned(), None),
        ("POST", ["users"]) => ("add account".to_owned(), None),
        ("DELETE", ["users", name]) => ("remove account".to_owned(), Some(decoded(name))),
        ("POST", ["tokens"]) => ("add token".to_owned(), None),
        ("DELETE", ["tokens", id]) => ("revoke token".to_owned(), Some(decoded(id))),
        (m, _) => (format!("{m} {path}"), None),
    };
    (action, target)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(hex, 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of cookie `name` in `headers`.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// Whether the request says its body is JSON (`Content-Type:
/// application/json`, parameters allowed).
pub(crate) fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

fn source_of(ci: &Option<axum::Extension<ConnectInfo<SocketAddr>>>) -> Option<String> {
    ci.as_ref().map(|c| c.0 .0.ip().to_string())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    user: String,
    password: String,
}

async fn login(
    State(auth): State<Arc<Auth>>,
    ci: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // JSON only: a cross-site form cannot send it (login CSRF).
    if !is_json(&headers) {
        return api_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the login as Content-Type: application/json",
        );
    }
    let Ok(req) = serde_json::from_slice::<LoginRequest>(&body) else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "send {\"user\": NAME, \"password\": PASSWORD}",
        );
    };
    let source = source_of(&ci);
    // A name no account can have is not worth a hash, and is not written
    // to the audit log as given (it could be a megabyte of anything).
    if !valid_name(&req.user) {
        let store = auth.store.clone();
        let src = source.clone();
        let _ = tokio::task::spawn_blocking(move || {
            store.record_audit(
                "(not a valid name)",
                "login failed",
                None,
                src.as_deref(),
                401,
            )
        })
        .await;
        return api_error(StatusCode::UNAUTHORIZED, "wrong name or password");
    }
    let name_key = format!("name:{}", req.user);
    let addr_key = format!("address:{}", source.as_deref().unwrap_or("?"));
    let now = Instant::now();
    let wait = [
        auth.by_name.lock().unwrap().check(&name_key, now),
        auth.by_address.lock().unwrap().check(&addr_key, now),
    ]
    .into_iter()
    .filter_map(Result::err)
    .max();
    let record = |auth: Arc<Auth>, actor: String, action: &'static str, status: u16| {
        let source = source.clone();
        tokio::task::spawn_blocking(move || {
            let _ = auth
                .store
                .record_audit(&actor, action, None, source.as_deref(), status);
        })
    };
    if let Some(wait) = wait {
        let _ = record(
            auth.clone(),
            req.user.clone(),
            "login refused (too many failures)",
            429,
        )
        .await;
        let mut resp = api_error(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many failed logins: try again in {} s",
                wait.as_secs() + 1
            ),
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(wait.as_secs() + 1));
        return resp;
    }
    let auth2 = auth.clone();
    let user = req.user.clone();
    let checked = tokio::task::spawn_blocking(move || {
        let found = auth2.store.web_user_hash(&user)?;
        let hash = found
            .as_ref()
            .map_or(dummy_hash(), |(_, h)| h.as_str())
            .to_owned();
        let ok = verify_password(&hash, &req.password) && found.is_some();
        Ok::<_, StoreError>(found.filter(|_| ok).map(|(role, _)| role))
    })
    .await;
    let role = match checked {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => return api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let Some(role) = role else {
        auth.by_name.lock().unwrap().failed(&name_key, now);
        auth.by_address.lock().unwrap().failed(&addr_key, now);
        let _ = record(auth.clone(), req.user.clone(), "login failed", 401).await;
        return api_error(StatusCode::UNAUTHORIZED, "wrong name or password");
    };
    auth.by_name.lock().unwrap().succeeded(&name_key);
    auth.by_address.lock().unwrap().succeeded(&addr_key);
    let secret = random_text(32);
    let csrf = random_text(24);
    let auth2 = auth.clone();
    let (s2, c2, u2, src2) = (
        secret.clone(),
        csrf.clone(),
        req.user.clone(),
        source.clone(),
    );
    let stored = tokio::task::spawn_blocking(move || {
        auth2
            .store
            .add_session(&s2, &u2, &c2, src2.as_deref(), unix_now())
    })
    .await;
    if let Ok(Err(e)) = stored {
        return api_error(StatusCode::INTERNAL_SERVER_ERROR, e);
    }
    let _ = record(auth.clone(), req.user.clone(), "login", 200).await;
    let mut resp = Json(serde_json::json!({
        "user": req.user, "role": role, "csrf": csrf,
    }))
    .into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        auth.cookie_header(&secret, SESSION_LIFETIME.as_secs()),
    );
    resp
}

async fn logout(State(auth): State<Arc<Auth>>, headers: HeaderMap) -> Response {
    if let Some(secret) = cookie(&headers, SESSION_COOKIE) {
        let store = auth.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.remove_session(&secret)).await;
    }
    let mut resp = Json(serde_json::json!({ "logged_out": true })).into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, auth.cookie_header("", 0));
    resp
}

/// `GET /api/session`: whether login is required, and who this is.
async fn session(State(auth): State<Arc<Auth>>, actor: Option<axum::Extension<Actor>>) -> Response {
    let me = auth.clone();
    let required = tokio::task::spawn_blocking(move || me.required())
        .await
        .unwrap_or(true);
    // While no login is required nobody is logged in, whatever the
    // audit log calls the actor.
    let (user, role, csrf) = match actor.map(|a| a.0).filter(|a| a.via != Via::Open) {
        Some(a) => {
            let csrf = match &a.via {
                Via::Session(c) => Some(c.clone()),
                _ => None,
            };
            (Some(a.name), Some(a.role), csrf)
        }
        None => (None, None, None),
    };
    Json(serde_json::json!({
        "login_required": required,
        "user": user,
        "role": role,
        "csrf": csrf,
    }))
    .into_response()
}

#[derive(Deserialize)]
struct AuditQuery {
    limit: Option<usize>,
}

async fn audit(State(auth): State<Arc<Auth>>, Query(q): Query<AuditQuery>) -> Response {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let store = auth.store.clone();
    match tokio::task::spawn_blocking(move || store.audit(limit)).await {
        Ok(Ok(list)) => Json(list).into_response(),
        Ok(Err(e)) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn users(State(auth): State<Arc<Auth>>) -> Response {
    let store = auth.store.clone();
    match tokio::task::spawn_blocking(move || store.web_users()).await {
        Ok(Ok(list)) => Json(list).into_response(),
        Ok(Err(e)) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    name: String,
    role: WebRole,
    password: String,
}

async fn add_user(State(auth): State<Arc<Auth>>, headers: HeaderMap, body: Bytes) -> Response {
    if !is_json(&headers) {
        return api_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "send JSON");
    }
    let req: NewUser = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return api_error(StatusCode::BAD_REQUEST, format!("bad account: {e}")),
    };
    if !valid_name(&req.name) {
        return api_error(
            StatusCode::BAD_REQUEST,
            "a name is 1 to 64 letters, digits, '.', '_', '-', '@'",
        );
    }
    if req.password.chars().count() < MIN_PASSWORD {
        return api_error(
            StatusCode::BAD_REQUEST,
            format!("a password has at least {MIN_PASSWORD} characters"),
        );
    }
    let store = auth.store.clone();
    let name = req.name.clone();
    let added = tokio::task::spawn_blocking(move || {
        store.add_web_user(&name, req.role, &hash_password(&req.password))
    })
    .await;
    match added {
        Ok(Ok(true)) => (
            StatusCode::CREATED,
            [(header::LOCATION, format!("/api/users/{}", req.name))],
            Json(serde_json::json!({"name": req.name, "role": req.role})),
        )
            .into_response(),
        Ok(Ok(false)) => api_error(
            StatusCode::CONFLICT,
            format!("{:?} exists already", req.name),
        ),
        Ok(Err(e)) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn remove_user(State(auth): State<Arc<Auth>>, Path(name): Path<String>) -> Response {
    let store = auth.store.clone();
    let n = name.clone();
    match tokio::task::spawn_blocking(move || store.remove_web_user(&n)).await {
        Ok(Ok(true)) => Json(serde_json::json!({ "removed": name })).into_response(),
        Ok(Ok(false)) => api_error(StatusCode::NOT_FOUND, format!("no account {name:?}")),
        Ok(Err(e)) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn tokens(State(auth): State<Arc<Auth>>) -> Response {
    let store = auth.store.clone();
    match tokio::task::spawn_blocking(move || store.tokens()).await {
        Ok(Ok(list)) => Json(list).into_response(),
        Ok(Err(e)) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    user: Option<String>,
    label: Option<String>,
    /// Seconds from now.
    expires_in: Option<u64>,
}

async fn add_token(
    State(auth): State<Arc<Auth>>,
    actor: Option<axum::Extension<Actor>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !is_json(&headers) {
        return api_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "send JSON");
    }
    let req: TokenRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return api_error(StatusCode::BAD_REQUEST, format!("bad token request: {e}")),
    };
    let Some(user) = req.user.or(actor.map(|a| a.0.name)) else {
        return api_error(StatusCode::BAD_REQUEST, "name the account: user");
    };
    let store = auth.store.clone();
    let made = tokio::task::spawn_blocking(move || {
        if store.web_user_hash(&user)?.is_none() {
            return Ok(None);
        }
        let expires = req.expires_in.map(|s| unix_now() + s as i64);
        store
            .add_token(&user, req.label.as_deref(), expires)
            .map(Some)
    })
    .await;
    match made {
        Ok(Ok(Some(t))) => (
            StatusCode::CREATED,
            [(header::LOCATION, format!("/api/tokens/{}", t.token.id))],
            Json(serde_json::json!({"token": t.secret, "listing": t.token})),
        )
            .into_response(),
        Ok(Ok(None)) => api_error(StatusCode::NOT_FOUND, "no such account"),
        Ok(Err(e)) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn revoke_token(State(auth): State<Arc<Auth>>, Path(id): Path<String>) -> Response {
    let store = auth.store.clone();
    let i = id.clone();
    match tokio::task::spawn_blocking(move || store.revoke_token(&i, unix_now())).await {
        Ok(Ok(true)) => Json(serde_json::json!({ "revoked": id })).into_response(),
        Ok(Ok(false)) => api_error(StatusCode::NOT_FOUND, format!("no live token {id:?}")),
        Ok(Err(e)) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_locked_out_after_its_failures_until_the_window_ends() {
        let t0 = Instant::now();
        let mut l = LoginLimiter::new(3, Duration::from_secs(60));
        for i in 0..3 {
            assert_eq!(l.check("alice", t0 + Duration::from_secs(i)), Ok(()));
            l.failed("alice", t0 + Duration::from_secs(i));
        }
        assert_eq!(
            l.check("alice", t0 + Duration::from_secs(10)),
            Err(Duration::from_secs(50))
        );
        assert_eq!(l.check("bob", t0 + Duration::from_secs(10)), Ok(()));
        assert_eq!(l.check("alice", t0 + Duration::from_secs(60)), Ok(()));
        // A new window starts from the next failure.
        l.failed("alice", t0 + Duration::from_secs(61));
        assert_eq!(l.check("alice", t0 + Duration::from_secs(62)), Ok(()));
    }

    #[test]
    fn a_good_login_forgets_the_failures() {
        let t0 = Instant::now();
        let mut l = LoginLimiter::new(2, Duration::from_secs(60));
        l.failed("a", t0);
        l.succeeded("a");
        l.failed("a", t0);
        assert_eq!(l.check("a", t0), Ok(()));
        l.failed("a", t0);
        assert!(l.check("a", t0).is_err());
    }

    #[test]
    fn a_flood_of_names_does_not_grow_the_limiter_without_bound() {
        let t0 = Instant::now();
        let mut l = LoginLimiter::new(2, Duration::from_secs(1));
        for i in 0..LIMITER_KEYS * 3 {
            l.failed(
                &format!("n{i}"),
                t0 + Duration::from_secs(i as u64 / 1000 * 2),
            );
        }
        assert!(l.failures.len() <= LIMITER_KEYS, "{}", l.failures.len());
    }

    #[test]
    fn passwords_verify_only_against_their_own_argon2id_hash() {
        let h = hash_password("correct horse battery");
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password(&h, "correct horse battery"));
        assert!(!verify_password(&h, "correct horse battery "));
        assert!(!verify_password("not a hash", "x"));
        assert_ne!(h, hash_password("correct horse battery"), "salted");
    }

    #[test]
    fn routes_need_the_role_of_what_they_do() {
        use WebRole::*;
        assert_eq!(needed_role(&Method::POST, "/api/login"), None);
        assert_eq!(needed_role(&Method::GET, "/api/session"), None);
        assert_eq!(needed_role(&Method::GET, "/api/fleet"), Some(Viewer));
        assert_eq!(needed_role(&Method::POST, "/api/logout"), Some(Viewer));
        assert_eq!(
            needed_role(&Method::POST, "/api/deployments"),
            Some(Operator)
        );
        assert_eq!(
            needed_role(&Method::DELETE, "/api/firmware/a.bin"),
            Some(Operator)
        );
        assert_eq!(needed_role(&Method::GET, "/api/users"), Some(Admin));
        assert_eq!(needed_role(&Method::DELETE, "/api/tokens/x"), Some(Admin));
    }

    #[test]
    fn the_audit_log_names_actions_and_their_targets() {
        assert_eq!(
            describe(&Method::POST, "/api/deployments/ab12/stop"),
            ("stop".into(), Some("ab12".into()))
        );
        assert_eq!(
            describe(&Method::POST, "/api/firmware/app%201.bin"),
            ("upload firmware".into(), Some("app 1.bin".into()))
        );
        assert_eq!(
            describe(&Method::POST, "/api/deployments"),
            ("deploy".into(), None)
        );
    }

    #[test]
    fn names_are_short_and_plain() {
        assert!(valid_name("ada.lovelace@lab-1"));
        for bad in ["", "a b", "a\u{202e}b", "<script>", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; mqota_session=xyz; b=2"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE).as_deref(), Some("xyz"));
        assert_eq!(cookie(&h, "c"), None);
    }
}

//! `mqota user add|list|remove` (accounts of `serve`'s web page and API)
//! and `mqota token add|list|revoke` (API tokens for the CLI and scripts).
//! They write the store in the data directory directly, as `mqota device`
//! does; a running serve sees the change at its next request. Roles,
//! hashes and what each route needs: `mqota_controller::accounts`.

use std::io::{BufRead as _, IsTerminal as _};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::Subcommand;
use mqota_controller::accounts::{hash_password, valid_name, WebRole, MIN_PASSWORD};
use mqota_controller::store::Store;
use mqota_controller::unix_now;

use super::settings::Common;
use super::term::safe;

/// `mqota user …`.
#[derive(Subcommand)]
pub enum UserCommand {
    /// Add an account. The password is read from MQOTA_PASSWORD, else asked
    /// for twice without echo on a terminal, else read as one line from
    /// stdin; never taken as an argument. Only its argon2id hash is kept.
    Add {
        /// Login name (letters, digits, '.', '_', '-', '@').
        name: String,
        /// What it may do: viewer (read), operator (deploy, stop, upload…),
        /// admin (also accounts and tokens).
        #[arg(long, value_parser = parse_role)]
        role: WebRole,
        #[command(flatten)]
        common: Common,
    },
    /// The accounts (names and roles; never a password).
    List {
        #[command(flatten)]
        common: Common,
    },
    /// Remove an account, its sessions and its API tokens.
    Remove {
        /// Login name.
        name: String,
        #[command(flatten)]
        common: Common,
    },
}

/// `mqota token …`.
#[derive(Subcommand)]
pub enum TokenCommand {
    /// Make an API token acting as an account (with its role), printed once
    /// on stdout; send it as MQOTA_TOKEN or --token.
    Add {
        /// The account it acts as.
        #[arg(long)]
        user: String,
        /// What it is for (shown in `token list`).
        #[arg(long)]
        label: Option<String>,
        /// Refused after this long, e.g. 30d, 12h [default: until revoked].
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
        #[command(flatten)]
        common: Common,
    },
    /// The API tokens: id, account, label, expiry, revoked (never a secret).
    List {
        #[command(flatten)]
        common: Common,
    },
    /// Revoke a token by its id: refused from its next use on.
    Revoke {
        /// The id `token list` shows.
        id: String,
        #[command(flatten)]
        common: Common,
    },
}

fn parse_role(s: &str) -> Result<WebRole, String> {
    WebRole::parse(s).ok_or_else(|| format!("{s:?}: use viewer, operator or admin"))
}

/// The new account's password: MQOTA_PASSWORD, a prompt on a terminal
/// (twice, without echo), or one line of stdin.
fn read_password(name: &str) -> Result<String> {
    let password = if let Ok(p) = std::env::var("MQOTA_PASSWORD") {
        p
    } else if std::io::stdin().is_terminal() {
        let p = rpassword::prompt_password(format!("password for {name}: "))?;
        let again = rpassword::prompt_password("the same again: ")?;
        if p != again {
            bail!("the two passwords differ");
        }
        p
    } else {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password from stdin")?;
        line.trim_end_matches(['\n', '\r']).to_owned()
    };
    if password.chars().count() < MIN_PASSWORD {
        bail!("a password has at least {MIN_PASSWORD} characters");
    }
    Ok(password)
}

fn when(t: i64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64))
        .to_string()
}

impl UserCommand {
    /// Run it.
    pub fn run(self) -> Result<()> {
        match self {
            UserCommand::Add { name, role, common } => {
                if !valid_name(&name) {
                    bail!(
                        "{:?}: a name is 1 to 64 letters, digits, '.', '_', '-', '@'",
                        safe(&name)
                    );
                }
                let s = common.settings()?;
                let store = Store::open(&s.data_dir)?;
                let password = read_password(&name)?;
                if !store.add_web_user(&name, role, &hash_password(&password))? {
                    bail!("{name} exists already: `mqota user remove {name}` first");
                }
                println!("account {name} ({role}) added; serve now requires login");
            }
            UserCommand::List { common } => {
                let s = common.settings()?;
                let store = Store::open(&s.data_dir)?;
                let users = store.web_users()?;
                if users.is_empty() {
                    println!("no accounts (a loopback serve runs without login)");
                }
                for u in users {
                    println!(
                        "{:<24} {:<8} since {}",
                        safe(&u.name),
                        u.role,
                        when(u.created_at)
                    );
                }
            }
            UserCommand::Remove { name, common } => {
                let s = common.settings()?;
                let store = Store::open(&s.data_dir)?;
                if !store.remove_web_user(&name)? {
                    bail!("no account {:?}", safe(&name));
                }
                println!("account {name} removed, with its sessions and tokens");
            }
        }
        Ok(())
    }
}

impl TokenCommand {
    /// Run it.
    pub fn run(self) -> Result<()> {
        match self {
            TokenCommand::Add {
                user,
                label,
                expires,
                common,
            } => {
                let s = common.settings()?;
                let store = Store::open(&s.data_dir)?;
                if !store.web_users()?.iter().any(|u| u.name == user) {
                    bail!("no account {:?}: `mqota user add` first", safe(&user));
                }
                let expires_at = expires.map(|d| unix_now() + d.as_secs().max(1) as i64);
                let t = store.add_token(&user, label.as_deref(), expires_at)?;
                eprintln!(
                    "token {} for {user}{}; it is shown once, here:",
                    t.token.id,
                    expires_at
                        .map(|t| format!(", expires {}", when(t)))
                        .unwrap_or_default()
                );
                println!("{}", t.secret);
            }
            TokenCommand::List { common } => {
                let s = common.settings()?;
                let store = Store::open(&s.data_dir)?;
                let now = unix_now();
                for t in store.tokens()? {
                    let state = match (t.revoked_at, t.expires_at) {
                        (Some(r), _) => format!("revoked {}", when(r)),
                        (None, Some(e)) if e <= now => format!("expired {}", when(e)),
                        (None, Some(e)) => format!("expires {}", when(e)),
                        (None, None) => "until revoked".to_owned(),
                    };
                    println!(
                        "{}  {:<16} {:<28} {}",
                        t.id,
                        safe(&t.user),
                        state,
                        safe(t.label.as_deref().unwrap_or(""))
                    );
                }
            }
            TokenCommand::Revoke { id, common } => {
                let s = common.settings()?;
                let store = Store::open(&s.data_dir)?;
                if !store.revoke_token(&id, unix_now())? {
                    bail!("no live token {:?}", safe(&id));
                }
                println!("token {id} revoked");
            }
        }
        Ok(())
    }
}

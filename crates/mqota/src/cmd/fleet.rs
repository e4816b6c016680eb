//! What every controller command shares (broker, topic prefix, data
//! directory, firmware server, config file, logging) and the small fleet
//! commands: `status`, `watch`, `rollback`, `cancel`.
//!
//! Defaults come, highest first, from the command line, the environment
//! (`MQOTA_BROKER`, `MQOTA_PREFIX`, `MQOTA_DATA_DIR`, `MQOTA_SERVER`,
//! `MQOTA_MQTT_USER`, `MQOTA_MQTT_PASSWORD`), the config file (`MQOTA_CONFIG`,
//! else `~/.config/mqota/config.toml`) and built-in values:
//!
//! ```toml
//! broker = "mqtt://broker.lan:1883"
//! prefix = "device"
//! data_dir = "/var/lib/mqota"
//! server = "http://10.0.0.2:8080"
//! mqtt_user = "controller"
//! mqtt_password_file = "/etc/mqota/controller.password"
//! job_key = "/etc/mqota/job.pem"
//! ```
//!
//! The controller's MQTT password comes, first found, from
//! `--mqtt-password-file`, `MQOTA_MQTT_PASSWORD`, the config file's
//! `mqtt_password_file`, the broker URL (discouraged: URLs end up in shell
//! history), or `DATA_DIR/credentials/controller.password` (what `serve` and
//! `mqota broker mosquitto-conf` write). The user name, when a password is
//! found, defaults to `controller`. Neither is ever printed.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Args;
use mqota_controller::access::{password_path, read_password_file, Secret, CONTROLLER_USER};
use mqota_controller::fleet::{DeviceView, Fleet};
use mqota_controller::url::BrokerUrl;
use serde::Deserialize;

use super::term::safe;

/// The config file's keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Broker URL.
    pub broker: Option<String>,
    /// Topic prefix.
    pub prefix: Option<String>,
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Firmware server base URL.
    pub server: Option<String>,
    /// The controller's MQTT user name.
    pub mqtt_user: Option<String>,
    /// File holding the controller's MQTT password.
    pub mqtt_password_file: Option<PathBuf>,
    /// The private job key every command is signed with.
    pub job_key: Option<PathBuf>,
}

impl ConfigFile {
    fn load() -> Result<Self> {
        let (path, explicit) = match std::env::var_os("MQOTA_CONFIG") {
            Some(p) => (PathBuf::from(p), true),
            None => match std::env::var_os("HOME") {
                Some(h) => (PathBuf::from(h).join(".config/mqota/config.toml"), false),
                None => return Ok(Self::default()),
            },
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|e| {
                // toml's own message draws the line with a caret over
                // several lines; errors here are one line.
                let at = e
                    .span()
                    .map(|span| {
                        let before = &text[..span.start.min(text.len())];
                        let line = before.matches('\n').count() + 1;
                        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                        format!(" at line {line}, column {column}")
                    })
                    .unwrap_or_default();
                anyhow::anyhow!("config file {}{at}: {}", path.display(), e.message().trim())
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("config file {}", path.display())),
        }
    }
}

/// Options of every command that talks to the fleet.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// MQTT broker: mqtt://[user:pass@]host[:port] [default: mqtt://127.0.0.1:1883]
    #[arg(long, env = "MQOTA_BROKER")]
    pub broker: Option<String>,
    /// Topic prefix of the fleet [default: device]
    #[arg(long, env = "MQOTA_PREFIX")]
    pub prefix: Option<String>,
    /// Where the controller keeps its database [default: ~/.local/share/mqota]
    #[arg(long, env = "MQOTA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The controller's MQTT user name [default: the URL's, else controller]
    #[arg(long, env = "MQOTA_MQTT_USER", value_name = "NAME")]
    pub mqtt_user: Option<String>,
    /// File holding the controller's MQTT password [default:
    /// MQOTA_MQTT_PASSWORD, the URL's, else DATA_DIR/credentials/controller.password]
    #[arg(long, value_name = "FILE")]
    pub mqtt_password_file: Option<PathBuf>,
    /// Sign every command with this ECDSA P-256 private key (PEM), for
    /// devices built with its public key; sequence numbers are kept in
    /// DATA_DIR/job-seq
    #[arg(long, env = "MQOTA_JOB_KEY_FILE", value_name = "KEY.pem")]
    pub job_key: Option<PathBuf>,
    /// More log output (-v info, -vv debug, -vvv also the broker's and MQTT client's)
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// [`Common`] with every default filled in.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Broker, when one was named anywhere.
    pub broker: Option<BrokerUrl>,
    /// Topic prefix.
    pub prefix: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Firmware server, when named in the config file.
    pub server: Option<String>,
    /// The controller's MQTT login, when a password was found anywhere
    /// (already applied to `broker`).
    pub login: Option<(String, Secret)>,
    /// The job key commands are signed with, if any.
    pub job_key: Option<PathBuf>,
}

impl Settings {
    /// `fleet` signing every command with the job key, if one was named;
    /// the key is read (and refused with the reason) before anything is sent.
    pub fn signing(&self, fleet: Fleet) -> Result<Fleet> {
        let Some(path) = &self.job_key else {
            return Ok(fleet);
        };
        let key = super::keys::read_job_signing_key(path)?;
        let signer = mqota_controller::signer::JobSigner::new(key, &self.data_dir.join("job-seq"))?;
        Ok(fleet.with_signer(signer))
    }

    /// The broker, or the default one on this machine, with the login.
    pub fn broker_or_default(&self) -> BrokerUrl {
        self.broker.clone().unwrap_or_else(|| {
            let mut b: BrokerUrl = "mqtt://127.0.0.1:1883"
                .parse()
                .expect("the default broker URL parses");
            apply_login(&mut b, &self.login);
            b
        })
    }
}

/// Puts `login` (if any) into `b`.
pub fn apply_login(b: &mut BrokerUrl, login: &Option<(String, Secret)>) {
    if let Some((user, password)) = login {
        b.username = Some(user.clone());
        b.password = Some(password.expose().to_owned());
    }
}

impl Common {
    /// Applies the environment and config file, and starts logging.
    pub fn settings(&self) -> Result<Settings> {
        init_logging(self.verbose);
        let file = ConfigFile::load()?;
        // Name where a bad URL came from: the flag or MQOTA_BROKER (clap
        // merges the two), or the config file.
        let broker = match (self.broker.clone(), file.broker) {
            (Some(b), _) => Some(b.parse::<BrokerUrl>().context("--broker / MQOTA_BROKER")?),
            (None, Some(b)) => Some(
                b.parse::<BrokerUrl>()
                    .context("broker in the config file")?,
            ),
            (None, None) => None,
        };
        let prefix = self
            .prefix
            .clone()
            .or(file.prefix)
            .unwrap_or_else(|| mqota_core::protocol::DEFAULT_PREFIX.to_owned());
        let data_dir = self.data_dir.clone().or(file.data_dir).unwrap_or_else(|| {
            std::env::var_os("XDG_DATA_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
                .unwrap_or_else(|| PathBuf::from("."))
                .join("mqota")
        });
        let server = std::env::var("MQOTA_SERVER").ok().or(file.server);
        let read = |path: &PathBuf, from: &str| {
            read_password_file(path).with_context(|| format!("{from}: reading {}", path.display()))
        };
        let url_login = broker.as_ref().and_then(|b| b.password.clone());
        let password = match (
            &self.mqtt_password_file,
            std::env::var("MQOTA_MQTT_PASSWORD"),
        ) {
            (Some(f), _) => Some(read(f, "--mqtt-password-file")?),
            (None, Ok(p)) => Some(Secret::new(p)),
            (None, Err(_)) => match (&file.mqtt_password_file, url_login) {
                (Some(f), _) => Some(read(f, "mqtt_password_file in the config file")?),
                (None, Some(p)) => Some(Secret::new(p)),
                (None, None) => {
                    let f = password_path(&data_dir, CONTROLLER_USER);
                    f.exists()
                        .then(|| read(&f, "the controller's password file"))
                        .transpose()?
                }
            },
        };
        let login = password.map(|p| {
            let user = self
                .mqtt_user
                .clone()
                .or(file.mqtt_user)
                .or_else(|| broker.as_ref().and_then(|b| b.username.clone()))
                .unwrap_or_else(|| CONTROLLER_USER.to_owned());
            (user, p)
        });
        let mut broker = broker;
        if let Some(b) = &mut broker {
            apply_login(b, &login);
        }
        let job_key = self.job_key.clone().or(file.job_key);
        Ok(Settings {
            broker,
            prefix,
            data_dir,
            server,
            login,
            job_key,
        })
    }
}

fn init_logging(verbose: u8) {
    // rumqttd logs ERROR for every client that disconnects without
    // DISCONNECT, which is normal for devices; keep it quiet unless asked.
    let filter = match verbose {
        0 => "warn,rumqttd=off,rumqttc=error",
        1 => "info,rumqttd=off,rumqttc=warn",
        2 => "debug,rumqttd=warn,rumqttc=info",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MQOTA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// A tokio runtime for one command.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")
}

/// A client id unique to this process.
pub fn client_id(role: &str) -> String {
    format!("mqota-{role}-{}", std::process::id())
}

/// Connects and waits for the retained statuses (until 400 ms pass without
/// one, at most 60 s), then says on stderr why the picture may be
/// incomplete: the replay did not end, devices announced availability
/// without a status, or devices the store in the data directory knows (if
/// it exists) have no retained status on the broker.
pub async fn connect_and_settle(s: &Settings, role: &str) -> Result<Fleet> {
    let fleet = Fleet::connect(&s.broker_or_default(), &s.prefix, &client_id(role)).await?;
    let fleet = s.signing(fleet)?;
    let settled = fleet
        .settle(Duration::from_millis(400), Duration::from_secs(60))
        .await;
    if !settled {
        eprintln!(
            "warning: the broker was still replaying retained statuses after 60 s; the fleet may be incomplete"
        );
    }
    let db = s.data_dir.join(mqota_controller::store::DB_FILE);
    let recorded: Vec<String> = if db.is_file() {
        mqota_controller::store::Store::open(&s.data_dir)?
            .devices()?
            .into_iter()
            .map(|d| d.id)
            .collect()
    } else {
        Vec::new()
    };
    for gap in fleet.gaps(&recorded) {
        eprintln!("warning: {}", super::term::safe(&gap.to_string()));
    }
    Ok(fleet)
}

/// `mqota status`.
#[derive(Args)]
pub struct StatusArgs {
    /// Print JSON (one object per device) instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    common: Common,
}

fn last_text(d: &DeviceView) -> String {
    match d.status.as_ref().and_then(|s| s.last.as_ref()) {
        Some(l) => {
            let mut t = l.result.as_str().to_owned();
            if let Some(e) = l.error {
                t.push_str(&format!(" ({})", e.as_str()));
            }
            if let Some(j) = &l.job {
                t.push_str(&format!(" [{}]", safe(j)));
            }
            t
        }
        None => "-".into(),
    }
}

impl StatusArgs {
    /// Run it.
    pub fn run(self) -> Result<()> {
        let s = self.common.settings()?;
        runtime()?.block_on(async {
            let fleet = connect_and_settle(&s, "status").await?;
            let devices: Vec<DeviceView> = fleet
                .devices()
                .into_iter()
                .filter(|d| d.status.is_some())
                .collect();
            if self.json {
                // Each device's retained status with `online` from its
                // availability topic beside it.
                let list: Vec<serde_json::Value> = devices
                    .iter()
                    .filter_map(|d| {
                        let mut v = serde_json::to_value(d.status.as_ref()?).ok()?;
                        v.as_object_mut()?
                            .insert("online".into(), serde_json::Value::Bool(d.online));
                        Some(v)
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<24} {:<7} {:<9} {:<16} {:<24} {:<4} {:<15} LAST",
                    "ID", "ONLINE", "CHIP", "PROJECT", "VERSION", "SLOT", "STATE"
                );
                for d in &devices {
                    let st = d.status.as_ref().expect("filtered");
                    println!(
                        "{:<24} {:<7} {:<9} {:<16} {:<24} {:<4} {:<15} {}",
                        safe(&d.id),
                        if d.online { "yes" } else { "no" },
                        safe(st.chip.as_str()),
                        safe(st.project.as_str()),
                        safe(st.version.as_str()),
                        st.slot.map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
                        safe(st.state.as_str()),
                        last_text(d)
                    );
                }
                println!("{}", super::term::devices(devices.len()));
            }
            fleet.close().await?;
            Ok(())
        })
    }
}

/// `mqota watch`.
#[derive(Args)]
pub struct WatchArgs {
    /// Stop after this many seconds (default: until Ctrl-C).
    #[arg(long)]
    seconds: Option<u64>,
    #[command(flatten)]
    common: Common,
}

impl WatchArgs {
    /// Run it.
    pub fn run(self) -> Result<()> {
        let s = self.common.settings()?;
        runtime()?.block_on(async {
            let fleet =
                Fleet::connect(&s.broker_or_default(), &s.prefix, &client_id("watch")).await?;
            let until = self
                .seconds
                .map(|n| tokio::time::Instant::now() + Duration::from_secs(n));
            loop {
                // Clear the screen only on a terminal: a pipe or a log gets
                // plain text.
                let mut out = if std::io::stdout().is_terminal() {
                    String::from("\x1b[2J\x1b[H")
                } else {
                    String::new()
                };
                out.push_str(&format!(
                    "{:<24} {:<7} {:<24} {:<12} {:>4} {:<24} LAST\n",
                    "ID", "ONLINE", "VERSION", "PHASE", "%", "JOB"
                ));
                let devices = fleet.devices();
                for d in &devices {
                    let (online, version) = d
                        .status
                        .as_ref()
                        .map(|s| {
                            (
                                if d.online { "yes" } else { "no" },
                                safe(s.version.as_str()).into_owned(),
                            )
                        })
                        .unwrap_or(("?", "?".into()));
                    let (phase, pct, job) = d
                        .progress
                        .as_ref()
                        .map(|p| {
                            (
                                p.phase.as_str().to_owned(),
                                p.percent.to_string(),
                                safe(p.job.as_deref().unwrap_or("-")).into_owned(),
                            )
                        })
                        .unwrap_or(("-".into(), "-".into(), "-".into()));
                    out.push_str(&format!(
                        "{:<24} {:<7} {:<24} {:<12} {:>4} {:<24} {}\n",
                        safe(&d.id),
                        online,
                        version,
                        phase,
                        pct,
                        job,
                        last_text(d)
                    ));
                }
                out.push_str(&format!(
                    "{} — Ctrl-C to stop\n",
                    super::term::devices(devices.len())
                ));
                print!("{out}");
                if until.is_some_and(|u| tokio::time::Instant::now() >= u) {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = tokio::signal::ctrl_c() => break,
                }
            }
            fleet.close().await?;
            Ok(())
        })
    }
}

/// `mqota rollback ID...` and `mqota cancel ID...`.
#[derive(Args)]
pub struct DeviceCommandArgs {
    /// Device ids.
    #[arg(required = true)]
    ids: Vec<String>,
    /// The job id to name in the command (cancel: only that job; rollback:
    /// the id its events are reported under, a fresh one by default).
    #[arg(long)]
    job: Option<String>,
    /// Return once the broker has the commands, without waiting for the
    /// devices' answers.
    #[arg(long)]
    no_wait: bool,
    /// Seconds to wait for each device's answer.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    #[command(flatten)]
    common: Common,
}

impl DeviceCommandArgs {
    /// Sends `rollback` (or `cancel`) to each device, then waits for each
    /// device's answer and prints it. Fails, before sending anything, when a
    /// device is unknown or offline, and afterwards when a device refuses
    /// (`failed`) or does not answer within `--timeout`.
    pub fn run(self, rollback: bool) -> Result<()> {
        let s = self.common.settings()?;
        let what = if rollback { "rollback" } else { "cancel" };
        runtime()?.block_on(async {
            let fleet = connect_and_settle(&s, "cmd").await?;
            for id in &self.ids {
                match fleet.device(id) {
                    Some(d) if d.status.is_some() && d.online => {}
                    Some(d) if d.status.is_some() => {
                        anyhow::bail!("device {id:?} is offline: it would not receive the {what}")
                    }
                    _ => anyhow::bail!("device {id:?} is not known (it has no retained status)"),
                }
            }
            // A rollback's events carry the job named in it: name one so its
            // answer cannot be confused with an older one.
            let job = self.job.clone().or_else(|| {
                rollback
                    .then(|| format!("rb-{}-{}", mqota_controller::unix_now(), std::process::id()))
            });
            let mut events = fleet.events();
            for id in &self.ids {
                if rollback {
                    fleet.rollback(id, job.as_deref()).await?;
                } else {
                    fleet.cancel(id, job.as_deref()).await?;
                }
            }
            fleet.flush(Duration::from_secs(10)).await?;
            println!("sent {what} to {}", self.ids.join(", "));
            if self.no_wait {
                fleet.close().await?;
                return Ok(());
            }
            let mut waiting: std::collections::BTreeSet<&str> =
                self.ids.iter().map(String::as_str).collect();
            let mut refused = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(self.timeout);
            while !waiting.is_empty() {
                let ev = match tokio::time::timeout_at(deadline, events.recv()).await {
                    Err(_) => break,
                    Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => continue,
                    Ok(Err(_)) => anyhow::bail!("the broker connection ended"),
                    Ok(Ok(ev)) => ev,
                };
                let mqota_controller::fleet::FleetEvent::Progress(p) = ev else {
                    continue;
                };
                let id = p.device.as_str();
                let answers = p.phase.is_terminal()
                    && waiting.contains(id)
                    && (job.is_none() || p.job.as_deref() == job.as_deref());
                if !answers {
                    continue;
                }
                waiting.remove(id);
                let error = p
                    .error
                    .map(|e| format!(" ({})", e.as_str()))
                    .unwrap_or_default();
                println!("{}: {}{error}", safe(id), p.phase.as_str());
                let ok = if rollback {
                    p.phase == mqota_core::protocol::Phase::RolledBack
                } else {
                    p.phase == mqota_core::protocol::Phase::Cancelled
                };
                if !ok {
                    refused.push(format!("{}: {}{error}", safe(id), p.phase.as_str()));
                }
            }
            fleet.close().await?;
            if !waiting.is_empty() {
                let list: Vec<&str> = waiting.into_iter().collect();
                anyhow::bail!(
                    "no answer to the {what} within {} s from: {}{}",
                    self.timeout,
                    list.join(", "),
                    if rollback {
                        ""
                    } else {
                        " (a device with no update in flight does not answer a cancel)"
                    }
                );
            }
            if !refused.is_empty() {
                anyhow::bail!("{what} refused: {}", refused.join("; "));
            }
            Ok(())
        })
    }
}

//! What every controller command shares: broker, topic prefix, data
//! directory, firmware server, config file, logging, the tokio runtime,
//! client ids, and connecting to the fleet.
//!
//! Defaults come, highest first, from the command line, the environment
//! (`MQOTA_BROKER`, `MQOTA_PREFIX`, `MQOTA_DATA_DIR`, `MQOTA_SERVER`,
//! `MQOTA_MQTT_USER`, `MQOTA_MQTT_PASSWORD`), the config file (`MQOTA_CONFIG`,
//! else `config.toml` in the user's config directory: `~/.config/mqota` on
//! Linux, or `$XDG_CONFIG_HOME/mqota`) and built-in values:
//!
//! ```toml
//! broker = "mqtt://broker.lan:1883"
//! prefix = "device"
//! data_dir = "/var/lib/mqota"
//! server = "http://10.0.0.2:8080"
//! mqtt_user = "controller"
//! mqtt_password_file = "/etc/mqota/controller.password"
//! job_key = "/etc/mqota/job.pem"
//! ca = "/etc/mqota/ca.pem"            # for mqtts:// brokers
//! cert = "/etc/mqota/controller.pem"  # client certificate, when the broker asks
//! key = "/etc/mqota/controller.key"
//! ```
//!
//! A `mqtts://` broker is reached over TLS and must present a certificate
//! that chains to the CA given by `--ca` (`MQOTA_CA`, `ca`), by default the
//! fleet CA `DATA_DIR/ca/ca.pem` (`mqota ca init`), and names the URL's
//! host; the system's roots are never used. The client certificate (`--cert`
//! and `--key`, `MQOTA_CERT` and `MQOTA_KEY`, `cert` and `key`) defaults to
//! the controller's, `DATA_DIR/ca/controller.{pem,key}`, when both exist.
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
use mqota_controller::fleet::Fleet;
use mqota_controller::tls::ClientCert;
use mqota_controller::url::BrokerUrl;
use serde::Deserialize;

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
    /// The CA a `mqtts://` broker's certificate must chain to.
    pub ca: Option<PathBuf>,
    /// The controller's client certificate for `mqtts://`.
    pub cert: Option<PathBuf>,
    /// Its private key.
    pub key: Option<PathBuf>,
}

/// mqota's own directories for this user (`~/.config/mqota`,
/// `~/.local/share/mqota` on Linux, following `XDG_CONFIG_HOME` and
/// `XDG_DATA_HOME`); None without a home directory.
fn project_dirs() -> Option<directories::ProjectDirs> {
    directories::ProjectDirs::from("", "", "mqota")
}

impl ConfigFile {
    fn load() -> Result<Self> {
        let (path, explicit) = match std::env::var_os("MQOTA_CONFIG") {
            Some(p) => (PathBuf::from(p), true),
            None => match project_dirs() {
                Some(d) => (d.config_dir().join("config.toml"), false),
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
    /// For a mqtts:// broker: the CA its certificate must chain to (the
    /// system's roots are not used) [default: DATA_DIR/ca/ca.pem]
    #[arg(long, env = "MQOTA_CA", value_name = "CA.pem")]
    pub ca: Option<PathBuf>,
    /// For a mqtts:// broker: the client certificate to present (with --key)
    /// [default: DATA_DIR/ca/controller.pem, if it exists]
    #[arg(long, env = "MQOTA_CERT", value_name = "CERT.pem", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The private key of --cert
    #[arg(long, env = "MQOTA_KEY", value_name = "KEY.pem", requires = "cert")]
    pub key: Option<PathBuf>,
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
    /// The CA to pin for TLS to the broker, if one was named or the fleet
    /// CA exists.
    pub ca: Option<PathBuf>,
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
            project_dirs().map_or_else(|| PathBuf::from("mqota"), |d| d.data_dir().to_owned())
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
        let fleet_ca = mqota_controller::ca::CaDir::new(&data_dir);
        let ca = self
            .ca
            .clone()
            .or(file.ca)
            .or_else(|| fleet_ca.exists().then(|| fleet_ca.ca_cert()));
        let client_cert = match (self.cert.clone(), self.key.clone()) {
            (Some(cert), Some(key)) => Some(ClientCert { cert, key }),
            _ => match (file.cert, file.key) {
                (Some(cert), Some(key)) => Some(ClientCert { cert, key }),
                (None, None) => {
                    let c = fleet_ca.controller();
                    (c.cert.is_file() && c.key.is_file()).then_some(ClientCert {
                        cert: c.cert,
                        key: c.key,
                    })
                }
                _ => anyhow::bail!("config file: `cert` and `key` go together"),
            },
        };
        if let Some(b) = &mut broker {
            if b.secure {
                let Some(ca) = &ca else {
                    anyhow::bail!(
                        "{b} is TLS: name the CA its certificate must chain to with --ca (or run `mqota ca init`)"
                    );
                };
                let config = mqota_controller::tls::mqtt_client(ca, client_cert.as_ref())
                    .context("TLS to the broker")?;
                *b = b.clone().with_tls(config);
            }
        }
        Ok(Settings {
            broker,
            prefix,
            data_dir,
            server,
            login,
            job_key,
            ca,
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
        // Colour only on a terminal: logs piped to a file or a test stay
        // plain text.
        .with_ansi(std::io::stderr().is_terminal())
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

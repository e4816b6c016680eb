//! `mqota device add|remove|list` (the devices' MQTT logins) and `mqota
//! broker mosquitto-conf` (Mosquitto's configuration for the same logins and
//! topic rules). What the rules are and why the hashes look as they do:
//! `mqota_controller::access`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use clap::Subcommand;
use mqota_controller::access::{
    controller_login, mosquitto_acl, mosquitto_conf, mosquitto_conf_tls, mosquitto_passwords,
    new_identity, password_path, write_password_file, MosquittoTls, Role, CONTROLLER_USER,
};
use mqota_controller::ca::CaDir;
use mqota_controller::store::Store;
use mqota_core::protocol::Topics;

use super::settings::Common;
use super::term::safe;

/// `mqota device …`.
#[derive(Subcommand)]
pub enum DeviceCommand {
    /// Give a device its MQTT login: user name = ID, a random password
    /// written to a file (mode 0600), only its hash kept in the store.
    Add {
        /// The device id (its MQTT user name and client id).
        id: String,
        /// Where to write the password [default: DATA_DIR/credentials/ID.password].
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Also print the password on stdout (e.g. to build firmware with
        /// MQOTA_BROKER_PASSWORD).
        #[arg(long)]
        print: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Take a device's MQTT login away (its next connection is refused).
    Remove {
        /// The device id.
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// The MQTT logins in the store (names and roles; never a password).
    List {
        #[command(flatten)]
        common: Common,
    },
}

/// `mqota broker …`.
#[derive(Subcommand)]
pub enum BrokerCommand {
    /// Write a Mosquitto 2 configuration for the fleet: mosquitto.conf (one
    /// listener, no anonymous clients), `passwords` (the store's logins, in
    /// mosquitto_passwd's format) and `acl` (devices held to their own
    /// topics, keyed on the user name). Makes the controller's login if the
    /// store has none. New files are mode 0600: give them to the user
    /// Mosquitto runs as (Debian: `chown mosquitto DIR/passwords DIR/acl`);
    /// later runs rewrite them in place, keeping owner and mode. Run it again
    /// after `device add` or `remove`, then reload Mosquitto (SIGHUP).
    ///
    /// With --tls: one TLS listener where a client certificate of the fleet
    /// CA is the login (`require_certificate`, `use_identity_as_username`:
    /// the CN is the user name the ACL keys on); writes mosquitto.conf,
    /// acl, and copies of the CA certificate and the server certificate
    /// and key (ca.pem, server.pem, server.key) next to them.
    MosquittoConf {
        /// Directory to write the files to (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The listener's address [default: 0.0.0.0:1883, with --tls 0.0.0.0:8883].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Certificate mode: TLS, and a client certificate of the fleet CA
        /// (`mqota ca issue device ID`) instead of a password.
        #[arg(long, requires_all = ["tls_cert", "tls_key"])]
        tls: bool,
        /// With --tls: the broker's certificate (`mqota ca issue server --host NAME`).
        #[arg(long, value_name = "CERT.pem", requires = "tls")]
        tls_cert: Option<PathBuf>,
        /// With --tls: its private key.
        #[arg(long, value_name = "KEY.pem", requires = "tls")]
        tls_key: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
}

impl DeviceCommand {
    /// Run it.
    pub fn run(self) -> Result<()> {
        match self {
            DeviceCommand::Add {
                id,
                out,
                print,
                common,
            } => {
                let s = common.settings()?;
                Topics::new(&s.prefix, &id)
                    .map_err(|e| anyhow::anyhow!("bad device id {:?}: {}", safe(&id), e.rule()))?;
                if id == CONTROLLER_USER {
                    bail!("{CONTROLLER_USER:?} is the controller's user name; choose another device id");
                }
                let store = Store::open(&s.data_dir)?;
                if store.identity(&id)?.is_some() {
                    bail!(
                        "{id:?} already has MQTT credentials; `mqota device remove {id}` first to give it a new password"
                    );
                }
                let path = out.unwrap_or_else(|| password_path(&s.data_dir, &id));
                let (identity, password) = new_identity(&id, Role::Device);
                write_password_file(&path, &password)
                    .with_context(|| format!("writing {}", path.display()))?;
                store.add_identity(&identity)?;
                eprintln!(
                    "MQTT login for {id}: user {id}, password in {}",
                    path.display()
                );
                if print {
                    println!("{}", password.expose());
                }
                Ok(())
            }
            DeviceCommand::Remove { id, common } => {
                let s = common.settings()?;
                let store = Store::open(&s.data_dir)?;
                if id == CONTROLLER_USER {
                    bail!("{CONTROLLER_USER:?} is the controller's login, not a device's");
                }
                if !store.remove_identity(&id)? {
                    bail!("{:?} has no MQTT credentials", safe(&id));
                }
                let path = password_path(&s.data_dir, &id);
                if path.exists() {
                    std::fs::remove_file(&path)
                        .with_context(|| format!("removing {}", path.display()))?;
                }
                eprintln!(
                    "MQTT login of {id} removed (Mosquitto: run `mqota broker mosquitto-conf` again and reload it)"
                );
                Ok(())
            }
            DeviceCommand::List { common } => {
                let s = common.settings()?;
                let store = Store::open(&s.data_dir)?;
                for i in store.identities()? {
                    println!("{}\t{}\t{}", safe(&i.name), i.role.as_str(), i.created_at);
                }
                Ok(())
            }
        }
    }
}

impl BrokerCommand {
    /// Run it.
    pub fn run(self) -> Result<()> {
        match self {
            BrokerCommand::MosquittoConf {
                out,
                listen,
                tls: true,
                tls_cert: Some(cert),
                tls_key: Some(key),
                common,
            } => {
                let s = common.settings()?;
                let listen = listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8883)));
                let Some(ca) = s.ca.clone() else {
                    bail!("no fleet CA: run `mqota ca init` (or name one with --ca)");
                };
                // Check the pair before writing anything: a key that is not
                // the certificate's would only show in Mosquitto's log.
                mqota_controller::tls::broker_server(&cert, &key, &ca)
                    .context("the broker's certificate and key")?;
                let (out, acl) = out_dir_and_acl(&out, &s.prefix)?;
                let files = MosquittoTls {
                    cafile: out.join("ca.pem"),
                    certfile: out.join("server.pem"),
                    keyfile: out.join("server.key"),
                };
                let acl_file = out.join("acl");
                let conf = out.join("mosquitto.conf");
                for (from, to) in [
                    (&ca, &files.cafile),
                    (&cert, &files.certfile),
                    (&key, &files.keyfile),
                ] {
                    let text = std::fs::read_to_string(from)
                        .with_context(|| format!("reading {}", from.display()))?;
                    write_private(to, &text)?;
                }
                write_private(&acl_file, &acl)?;
                write_private(&conf, &mosquitto_conf_tls(listen, &files, &acl_file))?;
                println!("{}", conf.display());
                eprintln!(
                    "wrote {} (TLS on {listen}, client certificates of the fleet CA required, CN = user name), \
                     {} (prefix {}) and copies of the CA and server certificate and key in {}; \
                     Mosquitto must be able to read them as the user it runs as (Debian: `chown mosquitto {}/*`), \
                     then `mosquitto -c {}`. Devices: `mqota ca issue device ID`; the controller uses {} \
                     with --broker mqtts://NAME:{}",
                    conf.display(),
                    acl_file.display(),
                    s.prefix,
                    out.display(),
                    out.display(),
                    conf.display(),
                    CaDir::new(&s.data_dir).controller().cert.display(),
                    listen.port()
                );
                Ok(())
            }
            BrokerCommand::MosquittoConf {
                out,
                listen,
                common,
                ..
            } => {
                let s = common.settings()?;
                let listen = listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 1883)));
                let store = Store::open(&s.data_dir)?;
                let (_, new) = controller_login(&store, &s.data_dir)?;
                if new {
                    eprintln!(
                        "controller login made: user {CONTROLLER_USER}, password in {}",
                        password_path(&s.data_dir, CONTROLLER_USER).display()
                    );
                }
                let (out, acl) = out_dir_and_acl(&out, &s.prefix)?;
                let identities = store.identities()?;
                let passwords = out.join("passwords");
                let acl_file = out.join("acl");
                let conf = out.join("mosquitto.conf");
                write_private(&passwords, &mosquitto_passwords(&identities))?;
                write_private(&acl_file, &acl)?;
                write_private(&conf, &mosquitto_conf(listen, &passwords, &acl_file))?;
                let devices = identities.iter().filter(|i| i.role == Role::Device).count();
                println!("{}", conf.display());
                eprintln!(
                    "wrote {}, {} ({} device login(s) and the controller's) and {} (prefix {}); \
                     Mosquitto must be able to read them as the user it runs as (Debian: \
                     `chown mosquitto {} {}`), then `mosquitto -c {}`",
                    conf.display(),
                    passwords.display(),
                    devices,
                    acl_file.display(),
                    s.prefix,
                    passwords.display(),
                    acl_file.display(),
                    conf.display()
                );
                Ok(())
            }
        }
    }
}

/// `out` created (with its parents) and made absolute, for Mosquitto's
/// configuration to name its files by; and the ACL of a fleet under
/// `prefix`.
fn out_dir_and_acl(out: &Path, prefix: &str) -> Result<(PathBuf, String)> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let out = out
        .canonicalize()
        .with_context(|| format!("resolving {}", out.display()))?;
    let acl = mosquitto_acl(prefix, CONTROLLER_USER)
        .map_err(|e| anyhow::anyhow!("bad prefix {:?}: {}", safe(prefix), e.rule()))?;
    Ok((out, acl))
}

/// Writes `text` to `path`: a new file gets mode 0600 (hashes and rules are
/// nobody else's business); an existing one is rewritten in place, so the
/// owner and mode given to it for Mosquitto (`chown mosquitto …`) stay.
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut o = std::fs::OpenOptions::new();
    if path.exists() {
        o.write(true).truncate(true);
    } else {
        o.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    }
    o.open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}

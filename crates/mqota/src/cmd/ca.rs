//! `mqota ca init|issue`: the fleet CA in the data directory and the
//! certificates it issues. What the files are and why P-256:
//! `mqota_controller::ca`.

use std::path::Path;

use anyhow::Result;
use clap::Subcommand;
use mqota_controller::ca::{self, CaDir, Leaf, DEFAULT_LEAF_DAYS};

use super::settings::Common;
use super::term::safe;

/// `mqota ca …`.
#[derive(Subcommand)]
pub enum CaCommand {
    /// Make the fleet CA (P-256) in DATA_DIR/ca: ca.pem, ca.key (mode
    /// 0600) and the controller's client certificate. Refuses if a CA
    /// exists.
    Init {
        #[command(flatten)]
        common: Common,
    },
    /// Issue a certificate signed by the fleet CA.
    #[command(subcommand)]
    Issue(IssueCommand),
}

/// `mqota ca issue …`.
#[derive(Subcommand)]
pub enum IssueCommand {
    /// A device's client certificate (CN = ID, client auth) and key, in
    /// DATA_DIR/ca/devices/; prints the MQOTA_* variables a firmware build
    /// takes (`eval "$(mqota ca issue device ID)"`).
    Device {
        /// The device id (its certificate's CN, MQTT user name and client id).
        id: String,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = DEFAULT_LEAF_DAYS)]
        days: u32,
        /// Replace an existing certificate and key of this device.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        common: Common,
    },
    /// A server certificate (server auth) for a broker or `mqota serve`, in
    /// DATA_DIR/ca/servers/: every name and address clients use to reach it
    /// (devices check DNS names only). Prints the certificate's and key's
    /// paths.
    Server {
        /// A DNS name or IP address clients connect to (repeatable; the
        /// first is also the CN and the file name).
        #[arg(long = "host", value_name = "NAME|IP", required = true)]
        hosts: Vec<String>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = DEFAULT_LEAF_DAYS)]
        days: u32,
        /// Replace an existing certificate and key of this name.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        common: Common,
    },
}

impl CaCommand {
    /// Run it.
    pub fn run(self) -> Result<()> {
        match self {
            CaCommand::Init { common } => {
                let s = common.settings()?;
                let dir = CaDir::new(&s.data_dir);
                let controller = ca::init(&dir)?;
                println!("{}", dir.ca_cert().display());
                eprintln!(
                    "fleet CA made: certificate {} (give it to every device, broker and client), \
                     key {} (mode 0600; keep it here, or offline)",
                    dir.ca_cert().display(),
                    dir.ca_key().display()
                );
                eprintln!(
                    "the controller's client certificate: {} (key {})",
                    controller.cert.display(),
                    controller.key.display()
                );
                eprintln!(
                    "next: `mqota ca issue server --host NAME` for the broker and serve, \
                     `mqota ca issue device ID` for each device"
                );
                Ok(())
            }
            CaCommand::Issue(IssueCommand::Device {
                id,
                days,
                force,
                common,
            }) => {
                let s = common.settings()?;
                mqota_core::protocol::Topics::new(&s.prefix, &id)
                    .map_err(|e| anyhow::anyhow!("bad device id {:?}: {}", safe(&id), e.rule()))?;
                if id == mqota_controller::access::CONTROLLER_USER {
                    anyhow::bail!(
                        "{id:?} is the controller's name; `mqota ca init` made its certificate"
                    );
                }
                let dir = CaDir::new(&s.data_dir);
                let files = ca::issue(&dir, &Leaf::Client(id.clone()), days, force)?;
                eprintln!(
                    "certificate for device {id}: {} (key {}, mode 0600)",
                    files.cert.display(),
                    files.key.display()
                );
                // The variables the firmware build reads (firmware/README.md),
                // as PEM texts; they are read from the files when the shell
                // runs these lines, so no key material is printed.
                println!("# the firmware build of device {id}: eval \"$(mqota ca issue device …)\", or paste these");
                println!("export MQOTA_DEVICE_ID={}", shell_quote(&id));
                println!(
                    "export MQOTA_TLS_CA=\"$(cat {})\"",
                    quote_path(&dir.ca_cert())
                );
                println!(
                    "export MQOTA_TLS_CERT=\"$(cat {})\"",
                    quote_path(&files.cert)
                );
                println!("export MQOTA_TLS_KEY=\"$(cat {})\"", quote_path(&files.key));
                println!("# and the broker, by a name its certificate holds: export MQOTA_BROKER_URL=mqtts://HOST:8883");
                Ok(())
            }
            CaCommand::Issue(IssueCommand::Server {
                hosts,
                days,
                force,
                common,
            }) => {
                let s = common.settings()?;
                let dir = CaDir::new(&s.data_dir);
                let files = ca::issue(&dir, &Leaf::Server(hosts.clone()), days, force)?;
                eprintln!(
                    "server certificate for {}: {} (key {}, mode 0600)",
                    hosts.join(", "),
                    files.cert.display(),
                    files.key.display()
                );
                println!("{}", files.cert.display());
                println!("{}", files.key.display());
                eprintln!(
                    "use it with `mqota serve --tls-cert {} --tls-key {}` or `mqota broker mosquitto-conf --tls --tls-cert … --tls-key …`",
                    files.cert.display(),
                    files.key.display()
                );
                Ok(())
            }
        }
    }
}

/// `s` quoted for a POSIX shell (single quotes; a single quote inside as
/// `'\''`).
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:@".contains(c))
    {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn quote_path(p: &Path) -> String {
    shell_quote(&p.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::shell_quote;

    #[test]
    fn paths_are_quoted_for_the_shell() {
        assert_eq!(shell_quote("/a/b.pem"), "/a/b.pem");
        assert_eq!(shell_quote("/my dir/x"), "'/my dir/x'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$(rm)"), "'$(rm)'");
    }
}

//! `mqota sim`: virtual devices, and the power-cut sweep over the device logic.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use mqota_controller::url::BrokerUrl;
use mqota_core::image::{BuildError, Chip, ImageBuilder};
use mqota_core::layout::Layout;
use mqota_core::partition::{PartitionTable, TABLE_MAX_LEN, TABLE_OFFSET};
use mqota_core::protocol::Topics;
use mqota_flash_sim::sweep::{sweep, Scenario, SweepConfig};
use mqota_flash_sim::BootConfig;
use mqota_virtual::device::{Handle, Password, VirtualConfig, FLASH_SIZE};
use mqota_virtual::fleet::VirtualFleet;
use mqota_virtual::net::TlsFiles;

/// Which ESP-IDF bootloader build a virtual device boots with.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BootloaderArg {
    /// What espflash ships: no app rollback.
    Stock,
    /// Built with CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE.
    Rollback,
}

impl From<BootloaderArg> for BootConfig {
    fn from(b: BootloaderArg) -> Self {
        match b {
            BootloaderArg::Stock => BootConfig::Stock,
            BootloaderArg::Rollback => BootConfig::Rollback,
        }
    }
}

/// Which update the sweep performs.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ScenarioArg {
    /// A healthy image: the update must end confirmed.
    Update,
    /// A `+unhealthy` image: the device must end on the old image.
    FailedTrial,
}

/// `mqota sim`: without a subcommand, runs virtual devices until Ctrl-C.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct SimArgs {
    #[command(subcommand)]
    command: Option<SimCommand>,
    #[command(flatten)]
    run: RunArgs,
}

/// Running virtual devices.
#[derive(Args)]
struct RunArgs {
    /// The broker the devices connect to (`mqtts://` for TLS, port 8883
    /// unless given; needs `--tls-ca`).
    #[arg(long, env = "MQOTA_BROKER", default_value = "mqtt://127.0.0.1:1883")]
    broker: String,
    /// Device id (with --devices N: ids ID-1 .. ID-N).
    #[arg(long, default_value = "sim")]
    id: String,
    /// Flash file (with --devices N: a directory holding ID-K.flash files).
    /// Created with a partition table and the initial image if missing;
    /// without it the flash lives in memory.
    #[arg(long)]
    flash: Option<PathBuf>,
    /// Chip of the virtual device.
    #[arg(long, default_value = "esp32c3")]
    chip: String,
    /// Version of the initial image (only used when the flash is created).
    #[arg(long, default_value = "1.0.0")]
    version: String,
    /// Number of devices to run in this process.
    #[arg(long, default_value_t = 1)]
    devices: u32,
    /// With --devices N: the number of the first device (ids ID-FIRST,
    /// ID-(FIRST+STEP), ...), so several processes can share one fleet's
    /// numbering.
    #[arg(long, default_value_t = 1, value_name = "FIRST")]
    first: u32,
    /// With --devices N: how far apart the numbers of the devices are; with
    /// K processes each given its own --first from 1 to K and --step K,
    /// their ids interleave, and a rollout's batches (in id order) reach
    /// every process at once.
    #[arg(long, default_value_t = 1, value_name = "STEP")]
    step: u32,
    /// Bootloader build of the devices.
    #[arg(long, value_enum, default_value = "stock")]
    bootloader: BootloaderArg,
    /// Topic prefix.
    #[arg(long, default_value = mqota_core::protocol::DEFAULT_PREFIX)]
    prefix: String,
    /// Publish progress only on `{prefix}/{id}/progress`, without the copy
    /// on the shared `{prefix}/progress`.
    #[arg(long)]
    no_progress_copy: bool,
    /// Trust this signing key (its digest, 64 hex digits, as `mqota keys
    /// digest` or `espsecure digest-sbv2-public-key` prints it; up to 3
    /// times): the devices then activate only images it signed.
    #[arg(long = "trust", value_name = "DIGEST", value_parser = crate::cmd::keys::parse_digest)]
    trust: Vec<[u8; 32]>,
    /// MQTT user name of every device [default: the URL's, else each
    /// device's id when a password is given].
    #[arg(long, value_name = "NAME")]
    mqtt_user: Option<String>,
    /// File holding the MQTT password of every device (overrides the URL's).
    #[arg(long, value_name = "FILE")]
    mqtt_password_file: Option<PathBuf>,
    /// Directory of per-device password files, ID.password, as `mqota device
    /// add` writes them: each device logs in as its id with its own file.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["mqtt_user", "mqtt_password_file"])]
    credentials: Option<PathBuf>,
    /// Take only commands signed with this job key (an ECDSA P-256 key in
    /// PEM, private or public, e.g. from `mqota keys new --scheme
    /// ecdsa-p256`); unsigned ones are refused with `bad_signature`.
    #[arg(long, value_name = "KEY.pub.pem")]
    trust_job_key: Option<PathBuf>,
    /// `project_name` of the initial image: images of other projects are
    /// refused (`wrong_project`) unless a job allows them.
    #[arg(long, default_value = "mqota-virtual")]
    project: String,
    /// `secure_version` of the initial image: the devices refuse images below it.
    #[arg(long, default_value_t = 0)]
    secure_version: u32,
    /// Fault: cut the power once this many flash bytes have been programmed
    /// or erased (the operation crossing it is torn); the devices boot again.
    #[arg(long)]
    cut_power_after_bytes: Option<u64>,
    /// Fault: drop the WiFi link every this many seconds, for 3 seconds.
    #[arg(long)]
    drop_link_every: Option<u64>,
    /// The fleet CA certificate (PEM or DER) the devices pin: with it they
    /// fetch `https://` firmware and can reach an `mqtts://` broker (which
    /// needs it). Server certificates must name the host as a DNS name.
    #[arg(long, value_name = "CA.pem")]
    tls_ca: Option<PathBuf>,
    /// The devices' client certificate (PEM or DER, CN = device id); `{id}`
    /// in the path is replaced by each device's id.
    #[arg(long, value_name = "FILE", requires_all = ["tls_ca", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// The devices' P-256 private key (PEM or DER, PKCS#8 or SEC1); `{id}`
    /// in the path is replaced by each device's id.
    #[arg(long, value_name = "FILE", requires_all = ["tls_ca", "tls_cert"])]
    tls_key: Option<PathBuf>,
}

/// `mqtts://` is the same URL as `mqtt://` over TLS, on 8883 unless a port
/// is given: the URL with `mqtt://` and whether TLS was asked for.
fn split_tls_scheme(url: &str) -> (String, bool) {
    match url.get(..8).filter(|s| s.eq_ignore_ascii_case("mqtts://")) {
        Some(_) => {
            let rest = &url[8..];
            let authority = rest.split('/').next().unwrap_or(rest);
            let host_port = authority.rsplit('@').next().unwrap_or(authority);
            let has_port = match host_port.rfind(']') {
                Some(close) => host_port[close..].contains(':'),
                None => host_port.contains(':'),
            };
            let port = if has_port { "" } else { ":8883" };
            let (before, after) = rest.split_at(authority.len());
            (format!("mqtt://{before}{port}{after}"), true)
        }
        None => (url.to_owned(), false),
    }
}

/// `path` with `{id}` replaced by the device's id.
fn per_device(path: &std::path::Path, id: &str) -> PathBuf {
    PathBuf::from(path.to_string_lossy().replace("{id}", id))
}

#[derive(Subcommand)]
enum SimCommand {
    /// Cut the power at every flash operation of an update (before it and in
    /// its middle), boot again through the bootloader model, and check that
    /// the old or the new image always boots and the update completes.
    /// Prints a JSON summary; exits non-zero if any cut bricked the device,
    /// booted a wrong image or left the update unfinishable.
    PowerCutSweep {
        /// Size of the new image in bytes.
        #[arg(long, default_value_t = 256 * 1024)]
        image_size: u32,
        /// Bootloader build of the device.
        #[arg(long, value_enum, default_value = "stock")]
        bootloader: BootloaderArg,
        /// What is installed.
        #[arg(long, value_enum, default_value = "update")]
        scenario: ScenarioArg,
    },
}

impl SimArgs {
    /// Run it.
    pub fn run(self) -> Result<()> {
        let Some(command) = self.command else {
            return run_devices(self.run);
        };
        match command {
            SimCommand::PowerCutSweep {
                image_size,
                bootloader,
                scenario,
            } => {
                if !(4096..=0x1e0000 - 4096).contains(&image_size) {
                    bail!("--image-size must be between 4096 and {} bytes (the OTA slot less its journal sector)", 0x1e0000 - 4096);
                }
                let cfg = SweepConfig {
                    image_size,
                    bootloader: bootloader.into(),
                    scenario: match scenario {
                        ScenarioArg::Update => Scenario::Update,
                        ScenarioArg::FailedTrial => Scenario::FailedTrial,
                    },
                    ..SweepConfig::default()
                };
                let summary = sweep(&cfg);
                println!("{}", serde_json::to_string_pretty(&summary)?);
                if summary.bricked + summary.wrong_image + summary.incomplete > 0 {
                    bail!(
                        "power-cut sweep failed: {} bricked, {} wrong image, {} incomplete",
                        summary.bricked,
                        summary.wrong_image,
                        summary.incomplete
                    );
                }
                Ok(())
            }
        }
    }
}

/// Reads a password file; its content never goes into the error.
fn read_password(path: &std::path::Path) -> Result<Password> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the password file {}", path.display()))?;
    Ok(Password::new(text))
}

fn run_devices(args: RunArgs) -> Result<()> {
    let (plain_url, broker_tls) = split_tls_scheme(&args.broker);
    let broker: BrokerUrl = plain_url.parse()?;
    if broker_tls && args.tls_ca.is_none() {
        bail!("an mqtts:// broker needs --tls-ca (the fleet CA the devices pin)");
    }
    let chip: Chip = args
        .chip
        .parse()
        .map_err(|_| anyhow::anyhow!("unknown chip {:?} (try esp32c3 or esp32c6)", args.chip))?;
    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    if args.step == 0 {
        bail!("--step must be at least 1");
    }
    let last = u64::from(args.first) + u64::from(args.devices - 1) * u64::from(args.step);
    if last > u64::from(u32::MAX) {
        bail!(
            "--first {} --step {} with --devices {} numbers devices past {}",
            args.first,
            args.step,
            args.devices,
            u32::MAX
        );
    }
    if args.trust.len() > mqota_core::signature::MAX_BLOCKS {
        bail!(
            "--trust given {} times; a device trusts at most {} keys",
            args.trust.len(),
            mqota_core::signature::MAX_BLOCKS
        );
    }
    check_version(chip, &args.version)?;
    // The device and the controller apply the same rules; the controller's
    // filters check the prefix alone.
    Topics::controller_filters(&args.prefix)
        .map_err(|e| anyhow::anyhow!("bad --prefix {:?}: {}", args.prefix, e.rule()))?;
    for k in 1..=args.devices {
        let id = device_id(&args, k);
        if let Err(e) = Topics::new(&args.prefix, &id) {
            if args.devices == 1 {
                bail!("bad --id {id:?}: {}", e.rule());
            }
            bail!(
                "bad device id {id:?} (--id {:?} with --devices {} makes ids up to {:?}): {}",
                args.id,
                args.devices,
                device_id(&args, args.devices),
                e.rule()
            );
        }
        if let Some(path) = flash_path(&args, &id) {
            check_flash_file(&path)?;
        }
    }
    let shared_password = match &args.mqtt_password_file {
        Some(f) => Some(read_password(f)?),
        None => broker.password.clone().map(Password::new),
    };
    let mut logins = Vec::new();
    for k in 1..=args.devices {
        let id = device_id(&args, k);
        logins.push(match &args.credentials {
            Some(dir) => (
                Some(id.clone()),
                Some(read_password(&dir.join(format!("{id}.password")))?),
            ),
            None => (
                args.mqtt_user
                    .clone()
                    .or_else(|| broker.username.clone())
                    .or_else(|| shared_password.as_ref().map(|_| id.clone())),
                shared_password.clone(),
            ),
        });
    }
    let job_key = args
        .trust_job_key
        .as_deref()
        .map(crate::cmd::keys::read_job_public_key)
        .transpose()?;
    let mut tls = Vec::new();
    for k in 1..=args.devices {
        let id = device_id(&args, k);
        tls.push(match &args.tls_ca {
            Some(ca) => {
                let client = match (&args.tls_cert, &args.tls_key) {
                    (Some(c), Some(k)) => Some((per_device(c, &id), per_device(k, &id))),
                    _ => None,
                };
                Some(
                    TlsFiles::load(ca, client.as_ref().map(|(c, k)| (c.as_path(), k.as_path())))
                        .with_context(|| format!("TLS material of {id}"))?,
                )
            }
            None => None,
        });
    }
    let configs: Vec<VirtualConfig> = (1..=args.devices)
        .zip(logins)
        .zip(tls)
        .map(|((k, (username, password)), tls)| {
            let id = device_id(&args, k);
            let mut c = VirtualConfig::new(&id, &broker.host, broker.port);
            c.broker_tls = broker_tls;
            c.tls = tls;
            c.username = username;
            c.password = password;
            c.chip = chip;
            c.initial_version = args.version.clone();
            c.bootloader = args.bootloader.into();
            c.prefix = args.prefix.clone();
            c.progress_copy = !args.no_progress_copy;
            c.trusted_keys = args.trust.clone();
            c.job_key = job_key;
            c.initial_project = args.project.clone();
            c.initial_secure_version = args.secure_version;
            c.flash = flash_path(&args, &id);
            c
        })
        .collect();
    if let (Some(dir), true) = (&args.flash, args.devices > 1) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let count = configs.len();
    let cut_power = args.cut_power_after_bytes;
    let drop_link_every = args.drop_link_every;
    let fleet = VirtualFleet::start_with(configs, move |handles| {
        if let Some(n) = cut_power {
            handles.iter().for_each(|h| h.cut_power_after_bytes(n));
        }
        if let Some(every) = drop_link_every {
            tokio::task::spawn_local(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(every.max(1))).await;
                    handles.iter().for_each(Handle::drop_link);
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    handles.iter().for_each(Handle::restore_link);
                }
            });
        }
    })
    .context("starting the virtual devices")?;
    eprintln!(
        "{count} virtual device(s) on {}://{}:{} (Ctrl-C stops)",
        if broker_tls { "mqtts" } else { "mqtt" },
        broker.host,
        broker.port
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let _ = rt.block_on(tokio::signal::ctrl_c());
    // Every device stops and drops its connections before this returns.
    fleet.stop();
    Ok(())
}

/// The id of device `k` (from 1): `--id` itself, or `ID-M` with `--devices
/// N`, where M is `--first` plus `k - 1` times `--step`.
fn device_id(args: &RunArgs, k: u32) -> String {
    if args.devices == 1 {
        args.id.clone()
    } else {
        format!("{}-{}", args.id, args.first + (k - 1) * args.step)
    }
}

/// The flash file of device `id`: `--flash` itself, or `DIR/ID.flash` with
/// `--devices N`.
fn flash_path(args: &RunArgs, id: &str) -> Option<PathBuf> {
    args.flash.as_ref().map(|p| {
        if args.devices == 1 {
            p.clone()
        } else {
            p.join(format!("{id}.flash"))
        }
    })
}

/// The initial image must carry `version`: build it once, as provisioning
/// would, so an over-long version is refused here rather than by a device
/// that then never comes up.
fn check_version(chip: Chip, version: &str) -> Result<()> {
    match ImageBuilder::new(chip).version(version).build() {
        Ok(_) => Ok(()),
        Err(BuildError::FieldTooLong { max, .. }) => bail!(
            "bad --version {version:?}: {} bytes, but an image's app descriptor holds a version of at most {max} bytes",
            version.len()
        ),
        Err(e) => bail!("bad --version {version:?}: {e}"),
    }
}

/// An existing flash file must be what a virtual device boots from: a
/// [`FLASH_SIZE`] dump with a partition table that has otadata and two OTA
/// slots. A missing file is fine: the device creates it.
fn check_flash_file(path: &std::path::Path) -> Result<()> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => bail!("cannot read flash file {}: {e}", path.display()),
    };
    if bytes.len() != FLASH_SIZE {
        bail!(
            "bad flash file {}: {} bytes, but a virtual device's flash is {FLASH_SIZE} bytes (4 MiB); \
             name a new file to have one created",
            path.display(),
            bytes.len()
        );
    }
    let table = &bytes[TABLE_OFFSET as usize..TABLE_OFFSET as usize + TABLE_MAX_LEN];
    let table = PartitionTable::from_bytes(table).map_err(|e| {
        anyhow::anyhow!(
            "bad flash file {}: no valid partition table at {TABLE_OFFSET:#x} ({e}); \
             name a new file to have one created",
            path.display()
        )
    })?;
    if Layout::from_table(&table, 0).is_none() {
        bail!(
            "bad flash file {}: its partition table needs otadata and at least two OTA slots",
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_mqtts_url_is_the_mqtt_url_over_tls_on_8883_unless_a_port_is_given() {
        for (url, want, tls) in [
            ("mqtts://broker.lan", "mqtt://broker.lan:8883", true),
            ("MQTTS://broker.lan:9999", "mqtt://broker.lan:9999", true),
            ("mqtts://u:p@broker.lan", "mqtt://u:p@broker.lan:8883", true),
            ("mqtts://[::1]", "mqtt://[::1]:8883", true),
            ("mqtts://[::1]:1234", "mqtt://[::1]:1234", true),
            ("mqtt://broker.lan:1883", "mqtt://broker.lan:1883", false),
        ] {
            assert_eq!(split_tls_scheme(url), (want.to_owned(), tls), "{url}");
        }
    }
}

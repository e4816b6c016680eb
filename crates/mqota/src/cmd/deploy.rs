//! `mqota deploy`: a staged rollout, run by this process.
//!
//! FIRMWARE is either the name of an image that `mqota serve` lists (asked
//! at `--server`, `MQOTA_SERVER` or the config file's `server`, default
//! `http://127.0.0.1:8080`), or an `http(s)://` URL of an image anywhere
//! (fetched once to read its version, size and SHA-256). A local path is not
//! accepted: devices need a URL, so put the file in serve's firmware
//! directory.
//!
//! The rollout is recorded in the data directory's database as it goes, the
//! same one `serve` reads. Without `--wait` the rollout continues in a
//! detached `mqota deploy --resume ID` whose log is in the data directory,
//! and this command returns at once. `--resume ID` carries on a deployment
//! whose controller was stopped, or one that was paused.
//!
//! `--pause ID` and `--stop ID` write the operator's command to the store;
//! whichever process runs the rollout (`serve`, a detached `deploy`, a
//! `deploy --wait`) notices it within a second. Pause: no device is sent a
//! job, those sent finish, the deployment ends `paused`. Stop: no more jobs,
//! devices not sent one are `skipped`, jobs in flight are cancelled, and the
//! deployment ends `stopped`.
//!
//! One deployment has one runner: the process running it holds a claim in
//! the store, renewed every quarter of `--runner-lease`; `--resume` is
//! refused, naming the holder, while another process's claim holds. Ctrl-C
//! releases the claim at once; a killed process's claim lapses after its
//! lease.

use std::io::IsTerminal as _;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use mqota_controller::catalogue::resolve_firmware_as;
use mqota_controller::rollout::{self, Amount, Observer, RolloutOptions, Selection};
use mqota_controller::store::{Deployment, DeploymentState, DeviceState, Store};
use mqota_core::protocol::Progress;

use super::settings::{connect_and_settle, runtime, Common};
use super::term::{devices, id_list, safe};

/// `mqota deploy`.
#[derive(Args)]
pub struct DeployArgs {
    /// Image name on the firmware server, or an http(s):// URL of an image.
    #[arg(required_unless_present_any = ["resume", "pause", "stop"])]
    firmware: Option<String>,
    /// A host (name or IP address, any port) a firmware URL may point at
    /// although it is loopback, private or link-local (repeatable); --server
    /// (its host and port) always may.
    #[arg(long, value_name = "HOST")]
    allow_remote_firmware: Vec<String>,
    /// Devices by id, comma-separated.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["all", "where_", "resume"])]
    to: Vec<String>,
    /// Every online device.
    #[arg(long, conflicts_with_all = ["where_", "resume"])]
    all: bool,
    /// Online devices matching key=value[,key=value] (chip, project, version, state, slot).
    #[arg(
        long = "where",
        id = "where_",
        value_name = "KEY=VALUE",
        conflicts_with = "resume"
    )]
    where_: Option<String>,
    /// Devices in the first stage.
    #[arg(long, default_value_t = 0)]
    canary: usize,
    /// Devices per later stage: N or P% of the selected devices.
    #[arg(long, default_value = "100%")]
    batch: Amount,
    /// Stop when more than N (or P% of the jobs sent so far) have failed.
    #[arg(long, default_value = "0")]
    max_failures: Amount,
    /// When the rollout stops for failures, roll back the devices that updated.
    #[arg(long)]
    auto_rollback: bool,
    /// Seconds each device may take.
    #[arg(long, default_value_t = 600)]
    timeout: u32,
    /// Stay and show progress; exit non-zero if the rollout fails.
    #[arg(long)]
    wait: bool,
    /// Also send the job to offline devices (a --to device that is offline
    /// is refused, and --all/--where skip offline devices, without this).
    #[arg(long, conflicts_with = "resume")]
    include_offline: bool,
    /// Also send an image older than the version a device runs.
    #[arg(long, conflicts_with = "resume")]
    allow_downgrade: bool,
    /// Also send an image of another project than the device runs.
    #[arg(long, conflicts_with = "resume")]
    allow_other_project: bool,
    /// Print which devices the deployment would go to, and stop: nothing is
    /// stored or sent.
    #[arg(long, conflicts_with = "resume")]
    dry_run: bool,
    /// Carry on deployment ID: a paused one, or one whose controller was
    /// stopped.
    #[arg(long, value_name = "ID", conflicts_with_all = ["pause", "stop"])]
    resume: Option<String>,
    /// Pause deployment ID: no more devices are sent the job; jobs in flight
    /// finish. `--resume ID` carries on.
    #[arg(long, value_name = "ID", conflicts_with_all = ["stop", "firmware", "to", "all", "where_", "wait", "dry_run"])]
    pause: Option<String>,
    /// Stop deployment ID for good: no more jobs, jobs in flight are
    /// cancelled, it ends `stopped`.
    #[arg(long, value_name = "ID", conflicts_with_all = ["firmware", "to", "all", "where_", "wait", "dry_run"])]
    stop: Option<String>,
    /// Firmware server to resolve a FIRMWARE name [default: http://127.0.0.1:8080]
    #[arg(long)]
    server: Option<String>,
    /// Seconds this process's claim on the deployment it runs lasts without
    /// renewal (renewed every quarter of it): another `deploy --resume` or
    /// `serve` takes the deployment over only once a claim has lapsed.
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    runner_lease: u64,
    /// API token for a --server that requires login (`mqota token add`);
    /// sent as `Authorization: Bearer`, never printed.
    #[arg(
        long,
        env = "MQOTA_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<String>,
    #[command(flatten)]
    common: Common,
}

impl DeployArgs {
    /// Run it.
    pub fn run(self) -> Result<()> {
        let s = self.common.settings()?;
        mqota_controller::lease::set_lease(Duration::from_secs(self.runner_lease));
        let store = Store::open(&s.data_dir)?;
        if let Some(id) = &self.resume {
            // Before anything is written or connected: a deployment another
            // process runs is followed with `watch`, not run twice.
            rollout::ensure_not_claimed_elsewhere(&store, id)?;
        }
        if let Some(id) = &self.pause {
            let d = store.pause(id)?;
            let in_flight = count(&d, DeviceState::Sent);
            println!(
                "deployment {} paused: no more jobs are sent; {} in flight {}; carry on with `mqota deploy --resume {}`",
                d.id,
                devices(in_flight),
                if in_flight == 1 { "finishes" } else { "finish" },
                d.id
            );
            return Ok(());
        }
        if let Some(id) = &self.stop {
            let d = store.stop(id)?;
            println!(
                "deployment {} stopped: {} skipped, {} in flight cancelled by its rollout",
                d.id,
                devices(count(&d, DeviceState::Skipped)),
                count(&d, DeviceState::Sent)
            );
            return Ok(());
        }
        runtime()?.block_on(async {
            let fleet = connect_and_settle(&s, "deploy").await?;
            let id = match &self.resume {
                Some(id) => {
                    let d = store.resume(id)?;
                    println!(
                        "resuming deployment {} of {} ({})",
                        d.id,
                        safe(&d.firmware),
                        safe(&d.version)
                    );
                    d.id
                }
                None => {
                    let selection = if !self.to.is_empty() {
                        Selection::Ids(self.to.clone())
                    } else if self.all {
                        Selection::All
                    } else if let Some(w) = &self.where_ {
                        Selection::parse_where(w)?
                    } else {
                        bail!("say which devices: --to ID,ID, --all or --where key=value");
                    };
                    let server = self
                        .server
                        .clone()
                        .or(s.server.clone())
                        .unwrap_or_else(|| "http://127.0.0.1:8080".to_owned());
                    let spec = self.firmware.as_deref().expect("clap requires FIRMWARE");
                    let mut remote = mqota_controller::remote::RemoteFirmware::allow(
                        &self.allow_remote_firmware,
                    );
                    if let Some(ca) = &s.ca {
                        remote = remote
                            .with_tls(mqota_controller::tls::https_client(ca).context("--ca")?);
                    }
                    let firmware =
                        resolve_firmware_as(spec, &server, self.token.as_deref(), &remote).await?;
                    // Who signed it, so the operator sees what signed-only
                    // devices will check.
                    match firmware.signers.as_deref() {
                        Some([]) => println!(
                            "{} is unsigned: devices that take only signed images will be left out",
                            safe(&firmware.name)
                        ),
                        Some(keys) => println!(
                            "{} is signed by key {}",
                            safe(&firmware.name),
                            keys.join(", key ")
                        ),
                        None => {}
                    }
                    if fleet.signs() {
                        println!("commands are signed with the job key");
                    }
                    let options = RolloutOptions {
                        canary: self.canary,
                        batch: self.batch,
                        max_failures: self.max_failures,
                        auto_rollback: self.auto_rollback,
                        timeout_s: self.timeout.max(1),
                        include_offline: self.include_offline,
                        allow_downgrade: self.allow_downgrade,
                        allow_other_project: self.allow_other_project,
                    };
                    if self.dry_run {
                        let (d, left_out) = rollout::plan_deployment(
                            &fleet.devices(),
                            &firmware,
                            &selection,
                            &options,
                        )?;
                        for line in left_out.describe(&firmware.version) {
                            println!("{}", safe(&line));
                        }
                        let stages = d.devices.iter().map(|x| x.stage).max().unwrap_or(0) + 1;
                        let ids: Vec<&str> = d.devices.iter().map(|x| x.device.as_str()).collect();
                        println!(
                            "dry run: {} ({}) would go to {} in {}: {}",
                            safe(&firmware.name),
                            safe(&firmware.version),
                            devices(d.devices.len()),
                            stages_text(stages),
                            id_list(&ids, LIST_MAX)
                        );
                        fleet.close().await?;
                        return Ok(());
                    }
                    let (d, left_out) =
                        rollout::create(&store, &fleet.devices(), &firmware, &selection, &options)?;
                    for line in left_out.describe(&firmware.version) {
                        println!("{}", safe(&line));
                    }
                    let stages = d.devices.iter().map(|x| x.stage).max().unwrap_or(0) + 1;
                    println!(
                        "deployment {} of {} ({}) to {} in {}",
                        d.id,
                        safe(&firmware.name),
                        safe(&firmware.version),
                        devices(d.devices.len()),
                        stages_text(stages)
                    );
                    if !self.wait {
                        fleet.close().await?;
                        return detach(&self.common, &s.data_dir, &d.id);
                    }
                    d.id
                }
            };
            let mut observer: Box<dyn Observer> = if self.wait && std::io::stderr().is_terminal() {
                Box::new(Bars::new(&store.deployment(&id)?))
            } else {
                Box::new(Lines)
            };
            let result = tokio::select! {
                r = rollout::run(&fleet, &store, &id, observer.as_mut()) => r,
                _ = tokio::signal::ctrl_c() => {
                    // Let the next runner in at once rather than after the
                    // lease: this one sends nothing more.
                    let _ = store.release_all(mqota_controller::lease::holder());
                    bail!("interrupted: deployment {id} is left running; carry on with `mqota deploy --resume {id}`");
                }
            };
            drop(observer);
            let _ = fleet.close().await;
            let d = result?;
            print_summary(&d);
            match d.state {
                DeploymentState::Succeeded => Ok(()),
                DeploymentState::Failed => bail!(
                    "deployment {} failed: {}",
                    d.id,
                    d.reason.as_deref().unwrap_or("see the summary")
                ),
                DeploymentState::Stopped => bail!("deployment {} stopped by the operator", d.id),
                DeploymentState::Paused => bail!(
                    "deployment {} is paused; carry on with `mqota deploy --resume {}`",
                    d.id,
                    d.id
                ),
                // A runner that saw a pause ends once its jobs in flight are
                // in, even when the deployment was resumed (and is run by
                // the resumer) meanwhile.
                DeploymentState::Running => bail!(
                    "deployment {} was paused and resumed elsewhere; follow it with `mqota watch`",
                    d.id
                ),
            }
        })
    }
}

/// Starts `mqota deploy --resume ID` in the background, its output in the
/// data directory.
fn detach(common: &Common, data_dir: &std::path::Path, id: &str) -> Result<()> {
    let log_path = data_dir.join(format!("deploy-{id}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(["deploy", "--resume", id, "--data-dir"])
        .arg(data_dir)
        .arg("--runner-lease")
        .arg(mqota_controller::lease::lease().as_secs().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if let Some(b) = &common.broker {
        cmd.args(["--broker", b]);
    }
    if let Some(p) = &common.prefix {
        cmd.args(["--prefix", p]);
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt as _;
        // Its own process group: a Ctrl-C meant for the shell does not stop
        // the rollout.
        cmd.process_group(0);
    }
    let child = cmd.spawn().context("starting the background rollout")?;
    println!(
        "rolling out in the background (pid {}); log: {}; follow with `mqota watch`",
        child.id(),
        log_path.display()
    );
    Ok(())
}

/// Plain lines, for logs and pipes.
pub(crate) struct Lines;

impl Observer for Lines {
    fn stage(&mut self, index: usize, count: usize, ids: &[String]) {
        println!(
            "stage {}/{count}: {}: {}",
            index + 1,
            devices(ids.len()),
            id_list(ids, LIST_MAX)
        );
    }
    fn result(&mut self, device: &str, state: DeviceState, error: Option<&str>) {
        match error {
            Some(e) => println!("{}: {} ({})", safe(device), state.as_str(), safe(e)),
            None => println!("{}: {}", safe(device), state.as_str()),
        }
    }
    fn stopped(&mut self, reason: &str) {
        println!("stopping: {reason}");
    }
    fn rolling_back(&mut self, device: &str) {
        println!("{}: rolling back", safe(device));
    }
}

/// One progress bar per device.
pub(crate) struct Bars {
    multi: MultiProgress,
    bars: std::collections::HashMap<String, ProgressBar>,
}

impl Bars {
    pub(crate) fn new(d: &Deployment) -> Self {
        let multi = MultiProgress::new();
        let style = ProgressStyle::with_template("{prefix:<20} [{bar:30}] {pos:>3}% {msg}")
            .expect("template")
            .progress_chars("=> ");
        let bars = d
            .devices
            .iter()
            .map(|x| {
                let b = multi.add(ProgressBar::new(100));
                b.set_style(style.clone());
                b.set_prefix(safe(&x.device).into_owned());
                b.set_message(x.state.as_str());
                (x.device.clone(), b)
            })
            .collect();
        Self { multi, bars }
    }

    /// Prints a line above the bars without tearing them.
    pub(crate) fn println(&self, line: &str) {
        let _ = self.multi.println(line);
    }
}

impl Observer for Bars {
    fn stage(&mut self, index: usize, count: usize, ids: &[String]) {
        let _ = self.multi.println(format!(
            "stage {}/{count}: {}",
            index + 1,
            devices(ids.len())
        ));
    }
    fn progress(&mut self, p: &Progress) {
        if let Some(b) = self.bars.get(p.device.as_str()) {
            b.set_position(p.percent.into());
            b.set_message(p.phase.as_str());
        }
    }
    fn result(&mut self, device: &str, state: DeviceState, error: Option<&str>) {
        if let Some(b) = self.bars.get(device) {
            if state == DeviceState::Done {
                b.set_position(100);
            }
            b.finish_with_message(match error {
                Some(e) => format!("{} ({})", state.as_str(), safe(e)),
                None => state.as_str().to_owned(),
            });
        }
    }
    fn stopped(&mut self, reason: &str) {
        let _ = self.multi.println(format!("stopping: {reason}"));
    }
    fn rolling_back(&mut self, device: &str) {
        if let Some(b) = self.bars.get(device) {
            b.set_message("rolling back");
        }
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        for b in self.bars.values() {
            if !b.is_finished() {
                b.abandon();
            }
        }
        let _ = self.multi.clear();
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Ids printed on one line at most; the rest are counted.
const LIST_MAX: usize = 20;

fn stages_text(n: u32) -> String {
    if n == 1 {
        "1 stage".to_owned()
    } else {
        format!("{n} stages")
    }
}

fn count(d: &Deployment, state: DeviceState) -> usize {
    d.devices.iter().filter(|x| x.state == state).count()
}

/// A device's error, with what its log said about it when the job failed:
/// `health_check_failed — trial failed: health check failed, rolling back`.
fn why(x: &mqota_controller::store::DeploymentDevice) -> String {
    let mut out = x.error.clone().unwrap_or_default();
    let said = x.log.as_ref().and_then(|l| match (&l.line, &l.error) {
        (Some(line), _) => Some(line.clone()),
        (None, Some(e)) => Some(format!("(log not read: {e})")),
        (None, None) => None,
    });
    if let Some(said) = said {
        if !out.is_empty() {
            out.push_str(" — ");
        }
        out.push_str(&said);
    }
    out
}

fn print_summary(d: &Deployment) {
    println!();
    println!(
        "{:<24} {:>5} {:<12} {:<14} ERROR",
        "DEVICE", "STAGE", "FROM", "RESULT"
    );
    for x in &d.devices {
        println!(
            "{:<24} {:>5} {:<12} {:<14} {}",
            safe(&x.device),
            x.stage + 1,
            safe(x.from_version.as_deref().unwrap_or("-")),
            x.state.as_str(),
            safe(&why(x))
        );
    }
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for x in &d.devices {
        *counts.entry(x.state.as_str()).or_default() += 1;
    }
    let counts: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
    println!(
        "deployment {} ({}): {} — {}",
        d.id,
        safe(&d.version),
        d.state.as_str(),
        counts.join(", ")
    );
}

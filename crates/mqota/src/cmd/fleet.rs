//! The small fleet commands: `status`, `watch`, `rollback`, `cancel`,
//! `forget`. What they share with the other commands (broker, config file,
//! logging) is in [`super::settings`].

use std::io::IsTerminal as _;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use mqota_controller::fleet::{DeviceView, Fleet};

use super::settings::{client_id, connect_and_settle, runtime, Common};
use super::term::safe;

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

/// `mqota forget`.
#[derive(Args)]
pub struct ForgetArgs {
    /// Device ids.
    #[arg(required = true)]
    ids: Vec<String>,
    #[command(flatten)]
    common: Common,
}

impl ForgetArgs {
    /// Forgets each device ([`mqota_controller::http::forget`]): clears its
    /// retained status and availability on the broker and removes its
    /// record and history from the store. Refused for a device that is
    /// online (it would be back with its next status), in a deployment not
    /// over, or unknown; fails if any was refused.
    pub fn run(self) -> Result<()> {
        let s = self.common.settings()?;
        let store = std::sync::Arc::new(mqota_controller::store::Store::open(&s.data_dir)?);
        runtime()?.block_on(async {
            let fleet = connect_and_settle(&s, "forget").await?;
            let mut refused = 0;
            for id in &self.ids {
                match mqota_controller::http::forget(&store, &fleet, id).await {
                    Ok(f) => {
                        let mut from = Vec::new();
                        if f.store {
                            from.push("its record and history in the store");
                        }
                        if f.broker {
                            from.push("its retained status and availability on the broker");
                        }
                        println!("forgot {}: {}", safe(id), from.join(", "));
                    }
                    Err(e) => {
                        refused += 1;
                        eprintln!("{}", safe(&e.to_string()));
                    }
                }
            }
            let _ = fleet.close().await;
            if refused > 0 {
                anyhow::bail!("{refused} of {} not forgotten", self.ids.len());
            }
            Ok(())
        })
    }
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

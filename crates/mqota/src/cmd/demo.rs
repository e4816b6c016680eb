//! `mqota demo`: the whole system on one machine, in one process, in well
//! under a minute — the first thing a newcomer runs.
//!
//! Everything is the real code, wired together in-process: the embedded
//! broker (rumqttd), the firmware server (`serve`'s axum router), N virtual
//! devices (the device runtime on simulated flash and the bootloader model)
//! and the staged rollout of `deploy --wait` with its progress bars. The
//! devices are locked down as the README's trust model describes: they take
//! only images signed by the demo's image key (Secure Boot V2 ECDSA blocks,
//! hence ESP32-C6 devices, whose ROM checks ECDSA) and only commands signed
//! by its job key. Two rollouts run: a healthy 1.1.0 that every device must
//! confirm, then a `1.2.0+unhealthy` whose health check fails on every
//! device, which must therefore abandon it and boot 1.1.0 again on its own.
//! Between them a forged 1.1.1, signed by a key the devices do not trust, is
//! sent to one device, which must refuse it with `bad_signature`. The
//! command fails unless exactly that happened, so it doubles as an
//! end-to-end check in CI. Both keys are made afresh for each run and live
//! only in memory.
//!
//! Nothing is left behind: the devices' thread is joined, the HTTP server
//! shut down, and the temporary directory removed. The one exception is the
//! embedded broker's thread, which rumqttd offers no way to stop; it ends
//! with the process a moment later.

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::Args;
use mqota_controller::broker::EmbeddedBroker;
use mqota_controller::catalogue::resolve_firmware;
use mqota_controller::catalogue::Catalogue;
use mqota_controller::fleet::{DeviceView, Fleet};
use mqota_controller::fleet::{FleetEvent, StartCommand};
use mqota_controller::http::{router, AppState};
use mqota_controller::rollout::{self, Amount, Observer, RolloutOptions};
use mqota_controller::signer::JobSigner;
use mqota_controller::store::{Deployment, DeploymentState, DeviceState, Store};
use mqota_core::image::{Chip, ImageBuilder};
use mqota_core::protocol::envelope::{job_key_of, JobKey};
use mqota_core::protocol::{ErrorCode, Phase, Progress, DEFAULT_PREFIX};
use mqota_core::signature::sign::{sign_file, Key};
use mqota_virtual::device::{BootRecord, VirtualConfig};
use mqota_virtual::fleet::VirtualFleet;

use super::deploy::{Bars, Lines};
use super::settings::runtime;

/// The version the devices start on, the good update and the bad one.
const V0: &str = "1.0.0";
const V1: &str = "1.1.0";
const V2: &str = "1.2.0+unhealthy";
/// The forged image's version.
const FORGED: &str = "1.1.1";
/// The chip of the demo's devices: its ROM checks ECDSA P-256 signature
/// blocks, so the demo's image key is made in an instant.
const CHIP: Chip = Chip::Esp32c6;
/// Size of the two images: big enough that the bars visibly move.
const IMAGE_SIZE: u32 = 192 * 1024;
/// The demo must finish within a minute; this leaves room for start-up and
/// clean-up around the part that waits on devices.
const DEADLINE: Duration = Duration::from_secs(50);
/// More devices than this make the bars a wall of text; `mqota sim` and
/// `cargo xtask bench fleet` are for big fleets.
const MAX_DEVICES: usize = 100;

/// `mqota demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// Number of virtual devices (1 to 100).
    #[arg(long, default_value_t = 5)]
    devices: usize,
}

impl DemoArgs {
    /// Runs the demo; fails if any device did not end as expected.
    pub fn run(self) -> Result<()> {
        let n = self.devices;
        if n == 0 || n > MAX_DEVICES {
            bail!("--devices must be between 1 and {MAX_DEVICES} (got {n})");
        }
        let started = Instant::now();
        let work = tempfile::Builder::new()
            .prefix("mqota-demo-")
            .tempdir()
            .context("creating the demo's working directory")?;
        let fw_dir = work.path().join("firmware");
        std::fs::create_dir(&fw_dir).with_context(|| format!("creating {}", fw_dir.display()))?;
        println!("mqota demo: {n} virtual ESP32-C6 devices, one MQTT broker and one firmware server, all in this process");
        println!(
            "  working in {} (removed at the end)",
            work.path().display()
        );

        let keys = DemoKeys::new()?;
        let broker = EmbeddedBroker::start(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        println!(
            "[1/7] MQTT broker (embedded rumqttd) listening on {}",
            broker.url()
        );

        let rt = runtime()?;
        let ids: Vec<String> = (1..=n).map(|k| format!("demo-{k:02}")).collect();
        let devices = VirtualFleet::start(device_configs(&ids, broker.addr().port(), &keys))
            .context("starting the virtual devices")?;
        let outcome = rt.block_on(async {
            tokio::time::timeout(
                DEADLINE,
                scenario(
                    &ids,
                    &broker.url(),
                    &fw_dir,
                    &work.path().join("data"),
                    &keys,
                ),
            )
            .await
        });
        // Stop the fleet before judging: the boot records come back with the
        // joined thread.
        let boots: HashMap<String, Vec<BootRecord>> = devices.stop().into_iter().collect();
        rt.shutdown_timeout(Duration::from_secs(2));
        let rows = match outcome {
            Ok(r) => r?,
            Err(_) => bail!(
                "the demo did not finish within {} s (a device or the broker is stuck; run `mqota sim` and `mqota serve` separately with -v to see where)",
                DEADLINE.as_secs()
            ),
        };

        println!("[7/7] summary");
        let unexpected = print_summary(&rows, &boots);
        drop(work);
        if unexpected > 0 {
            bail!(
                "the demo did not go as expected on {unexpected} of {n} devices (see the summary)"
            );
        }
        println!(
            "demo passed in {:.1} s: every device updated to {V1}, refused a forged image, then tried {V2}, failed its health check and rolled back to {V1} by itself",
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }
}

/// What the summary shows for one device.
struct Row {
    id: String,
    before: Option<String>,
    after_good: Option<String>,
    after_bad: Option<String>,
    good: DeviceState,
    bad: DeviceState,
    bad_error: Option<String>,
}

/// The part that talks to the devices: serve, wait, deploy twice.
async fn scenario(
    ids: &[String],
    broker: &str,
    fw_dir: &Path,
    data_dir: &Path,
    keys: &DemoKeys,
) -> Result<Vec<Row>> {
    let n = ids.len();
    let store = Arc::new(Store::open(data_dir)?);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .context("cannot open a port for the firmware server")?;
    let http_base = format!("http://{}", listener.local_addr()?);
    let state = Arc::new(AppState {
        catalogue: Catalogue::new(fw_dir),
        store: store.clone(),
        public_url: Some(http_base.clone()),
        remote_firmware: Default::default(),
    });
    let (stop_http, stopped) = tokio::sync::oneshot::channel::<()>();
    // The same accept loop and limits as `serve`.
    let server = tokio::spawn(async move {
        mqota_controller::server::serve(
            listener,
            router(state),
            mqota_controller::server::HttpLimits::default(),
            async {
                let _ = stopped.await;
            },
        )
        .await
    });
    println!("[2/7] firmware server listening on {http_base} (GET /firmware/NAME, /api/firmware)");

    let result = async {
        let broker_url = broker.parse().expect("the embedded broker's URL parses");
        let signer = JobSigner::new(keys.job.clone(), &data_dir.join("job-seq"))?;
        let fleet = Fleet::connect(&broker_url, DEFAULT_PREFIX, "mqota-demo")
            .await?
            .with_signer(signer);
        let before = wait_versions(&fleet, ids, V0, "come online")
            .await
            .context("the virtual devices did not come online")?;
        println!("[3/7] {n} virtual devices are online, running {V0} (in-memory flash); they take only images signed by key {} and commands signed by the job key", &hex::encode(keys.image.digest())[..16]);

        let good = pack(fw_dir, V1, &keys.image)?;
        println!("[4/7] packed and signed {good} ({V1}, {} KiB); deploying it to all {n} devices", IMAGE_SIZE / 1024);
        let d1 = deploy(&fleet, &store, &good, &http_base, false).await?;
        let after_good = wait_versions(&fleet, ids, V1, "report the new version")
            .await
            .ok();
        if d1.state == DeploymentState::Succeeded && after_good.is_some() {
            println!("      all {n} devices updated and confirmed {V1}");
        } else {
            println!("      the {V1} rollout {}: {}", state_word(d1.state), d1.reason.as_deref().unwrap_or("-"));
        }

        let refusal = forged(&fleet, fw_dir, &http_base, &ids[0]).await?;
        println!("      {} refused it: {refusal}; it still runs {V1}", ids[0]);

        let bad = pack(fw_dir, V2, &keys.image)?;
        println!("[6/7] packed and signed {bad} ({V2}): this build boots but fails its health check, so each device must put {V1} back by itself");
        let d2 = deploy(&fleet, &store, &bad, &http_base, true).await?;
        let after_bad = wait_versions(&fleet, ids, V1, "report the old version")
            .await
            .ok();
        let back = d2.devices.iter().filter(|d| d.state == DeviceState::RolledBack).count();
        println!("      {back} of {n} devices rolled back to {V1}; the rollout is marked {} as it should be", state_word(d2.state));
        let _ = fleet.close().await;

        let versions = |m: &Option<HashMap<String, String>>, id: &str| {
            m.as_ref().and_then(|m| m.get(id).cloned())
        };
        let before = Some(before);
        let result_of = |d: &Deployment, id: &str| {
            d.devices
                .iter()
                .find(|x| x.device == id)
                .map(|x| (x.state, x.error.clone()))
                .unwrap_or((DeviceState::Pending, None))
        };
        Ok::<_, anyhow::Error>(
            ids.iter()
                .map(|id| {
                    let (good, _) = result_of(&d1, id);
                    let (bad, bad_error) = result_of(&d2, id);
                    Row {
                        id: id.clone(),
                        before: versions(&before, id),
                        after_good: versions(&after_good, id),
                        after_bad: versions(&after_bad, id),
                        good,
                        bad,
                        bad_error,
                    }
                })
                .collect(),
        )
    }
    .await;

    let _ = stop_http.send(());
    // Devices close their download connections when done; don't let a
    // straggler hold the demo up.
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    result
}

fn state_word(s: DeploymentState) -> &'static str {
    match s {
        DeploymentState::Succeeded => "succeeded",
        DeploymentState::Failed => "failed",
        DeploymentState::Running => "still running",
        DeploymentState::Paused => "paused",
        DeploymentState::Stopped => "stopped",
    }
}

/// The demo's keys, made for this run and kept in memory only.
struct DemoKeys {
    /// Signs the images (a Secure Boot V2 ECDSA P-256 block).
    image: Key,
    /// Signs the commands.
    job: p256::ecdsa::SigningKey,
}

impl DemoKeys {
    fn new() -> Result<Self> {
        Ok(Self {
            image: ecdsa_key()?,
            job: p256::ecdsa::SigningKey::random(&mut rand_core::OsRng),
        })
    }

    fn job_key(&self) -> JobKey {
        job_key_of(self.job.verifying_key())
    }
}

/// A fresh ECDSA P-256 image-signing key.
fn ecdsa_key() -> Result<Key> {
    use p256::pkcs8::{EncodePrivateKey as _, LineEnding};
    let pem = p256::SecretKey::random(&mut rand_core::OsRng)
        .to_pkcs8_pem(LineEnding::LF)
        .context("encoding the demo's image key")?;
    Key::from_pem(&pem).map_err(|e| anyhow::anyhow!("the demo's image key: {e}"))
}

/// Packs an image of `version` signed by `key` into the firmware directory;
/// returns its name.
fn pack(dir: &Path, version: &str, key: &Key) -> Result<String> {
    let image = ImageBuilder::new(CHIP)
        .version(version)
        // The project the virtual devices run: deploy refuses another.
        .project("mqota-virtual")
        .size(IMAGE_SIZE)
        .build()
        .map_err(|e| anyhow::anyhow!("packing {version}: {e:?}"))?;
    let signed = sign_file(&image, key).map_err(|e| anyhow::anyhow!("signing {version}: {e}"))?;
    let name = format!("app-{version}.bin");
    std::fs::write(dir.join(&name), signed).with_context(|| format!("writing {name}"))?;
    Ok(name)
}

/// Sends `device` a job for an image signed by a key it does not trust (as
/// if the firmware server had been taken over); returns the refusal.
async fn forged(fleet: &Fleet, fw_dir: &Path, server: &str, device: &str) -> Result<String> {
    let name = pack(fw_dir, FORGED, &ecdsa_key()?)?;
    println!("[5/7] packed {name} ({FORGED}) signed by a key the devices do not trust; sending it to {device}");
    let firmware = resolve_firmware(&name, server, &Default::default()).await?;
    let mut events = fleet.events();
    let job = "demo-forged";
    fleet
        .start(
            device,
            &StartCommand {
                url: firmware.url,
                version: Some(firmware.version),
                sha256: Some(firmware.sha256),
                size: Some(firmware.size),
                job: Some(job.into()),
                timeout_s: Some(30),
                allow_downgrade: false,
                allow_other_project: false,
            },
        )
        .await?;
    loop {
        match events.recv().await {
            Ok(FleetEvent::Progress(p))
                if p.device.as_str() == device && p.job.as_deref() == Some(job) =>
            {
                match (p.phase, p.error) {
                    (Phase::Failed, Some(ErrorCode::BadSignature)) => {
                        return Ok(format!(
                            "bad_signature ({})",
                            p.message.as_deref().unwrap_or("-")
                        ))
                    }
                    (phase, error) if phase.is_terminal() => bail!(
                        "{device} did not refuse the forged image: it ended {phase:?} {error:?}"
                    ),
                    _ => {}
                }
            }
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(e) => bail!("the fleet's event stream ended: {e}"),
        }
    }
}

/// One rollout to every online device, all at once, reported like
/// `deploy --wait`.
async fn deploy(
    fleet: &Fleet,
    store: &Store,
    name: &str,
    server: &str,
    narrate: bool,
) -> Result<Deployment> {
    let firmware = resolve_firmware(name, server, &Default::default()).await?;
    let options = RolloutOptions {
        canary: 0,
        batch: Amount::Percent(100),
        max_failures: Amount::Count(0),
        auto_rollback: false,
        timeout_s: 30,
        ..RolloutOptions::default()
    };
    let (d, _) = rollout::create(
        store,
        &fleet.devices(),
        &firmware,
        &rollout::Selection::All,
        &options,
    )?;
    let reporter = if std::io::stderr().is_terminal() {
        Reporter::Bars(Bars::new(&d))
    } else {
        Reporter::Lines(Lines)
    };
    let mut narrator = Narrator {
        reporter,
        narrate,
        version: firmware.version.clone(),
        phases: HashMap::new(),
    };
    let result = rollout::run(fleet, store, &d.id, &mut narrator).await;
    drop(narrator);
    Ok(result?)
}

/// `deploy --wait`'s bars on a terminal, its plain lines otherwise.
enum Reporter {
    Bars(Bars),
    Lines(Lines),
}

impl Reporter {
    fn inner(&mut self) -> &mut dyn Observer {
        match self {
            Reporter::Bars(b) => b,
            Reporter::Lines(l) => l,
        }
    }

    fn say(&self, line: &str) {
        match self {
            Reporter::Bars(b) => b.println(line),
            Reporter::Lines(_) => println!("{line}"),
        }
    }
}

/// The rollout reporter, plus a plain sentence when a device does something
/// a newcomer should notice: start a trial of the bad image, and give it up.
struct Narrator {
    reporter: Reporter,
    narrate: bool,
    version: String,
    phases: HashMap<String, Phase>,
}

impl Observer for Narrator {
    fn stage(&mut self, index: usize, count: usize, devices: &[String]) {
        self.reporter.inner().stage(index, count, devices);
    }

    fn progress(&mut self, p: &Progress) {
        self.reporter.inner().progress(p);
        let id = p.device.as_str();
        if self.phases.insert(id.to_owned(), p.phase) == Some(p.phase) || !self.narrate {
            return;
        }
        if p.phase == Phase::Confirming {
            self.reporter.say(&format!(
                "      {id} rebooted into {} on trial and is checking its health",
                self.version
            ));
        }
    }

    fn result(&mut self, device: &str, state: DeviceState, error: Option<&str>) {
        self.reporter.inner().result(device, state, error);
        // Said here rather than on the `rolled_back` progress event: the
        // rollout may read the result from the retained status first, and
        // then that event never reaches the observer.
        if self.narrate && state == DeviceState::RolledBack {
            self.reporter.say(&format!(
                "      {device}: {} failed its health check, so the device rolled itself back to {V1}",
                self.version
            ));
        }
    }

    fn stopped(&mut self, reason: &str) {
        self.reporter.inner().stopped(reason);
    }
}

/// Waits until every device is online on `version`; returns what each runs.
async fn wait_versions(
    fleet: &Fleet,
    ids: &[String],
    version: &str,
    what: &str,
) -> Result<HashMap<String, String>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let seen: HashMap<String, DeviceView> = fleet
            .devices()
            .into_iter()
            .map(|d| (d.id.clone(), d))
            .collect();
        let on = |id: &String| {
            seen.get(id)
                .filter(|d| d.online)
                .and_then(|d| d.status.as_ref())
                .map(|s| s.version.to_string())
        };
        if ids.iter().all(|id| on(id).as_deref() == Some(version)) {
            return Ok(ids
                .iter()
                .filter_map(|id| Some((id.clone(), on(id)?)))
                .collect());
        }
        if tokio::time::Instant::now() > deadline {
            let late: Vec<&str> = ids
                .iter()
                .filter(|id| on(id).as_deref() != Some(version))
                .map(String::as_str)
                .collect();
            bail!("{} did not {what} ({version}) within 20 s", late.join(", "));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Prints the table; returns how many devices did not end as expected.
fn print_summary(rows: &[Row], boots: &HashMap<String, Vec<BootRecord>>) -> usize {
    println!(
        "{:<10} {:<8} {:<12} {:<22} {:<12} BOOTS",
        "DEVICE", "BEFORE", "AFTER 1.1.0", "AFTER 1.2.0 ATTEMPT", "RESULT"
    );
    let mut unexpected = 0;
    for r in rows {
        let trail: Vec<String> = boots
            .get(&r.id)
            .map(|b| {
                b.iter()
                    .map(|x| x.version.clone().unwrap_or_else(|| "nothing".into()))
                    .collect()
            })
            .unwrap_or_default();
        let tried_bad = trail.iter().any(|v| v == V2);
        let ok = r.before.as_deref() == Some(V0)
            && r.after_good.as_deref() == Some(V1)
            && r.after_bad.as_deref() == Some(V1)
            && r.good == DeviceState::Done
            && r.bad == DeviceState::RolledBack
            && tried_bad
            && trail.last().map(String::as_str) == Some(V1);
        let result = if ok {
            "rolled back".to_owned()
        } else {
            unexpected += 1;
            format!(
                "UNEXPECTED ({}: {}, {V2}: {}{})",
                V1,
                r.good.as_str(),
                r.bad.as_str(),
                r.bad_error
                    .as_deref()
                    .map(|e| format!(" {e}"))
                    .unwrap_or_default()
            )
        };
        println!(
            "{:<10} {:<8} {:<12} {:<22} {:<12} {}",
            r.id,
            r.before.as_deref().unwrap_or("?"),
            r.after_good.as_deref().unwrap_or("?"),
            r.after_bad.as_deref().unwrap_or("?"),
            result,
            trail.join(" > ")
        );
    }
    unexpected
}

/// The demo's devices: ESP32-C6s on 1.0.0 that take only images and
/// commands signed with the run's keys.
fn device_configs(ids: &[String], port: u16, keys: &DemoKeys) -> Vec<VirtualConfig> {
    ids.iter()
        .map(|id| {
            let mut c = VirtualConfig::new(id, "127.0.0.1", port);
            c.chip = CHIP;
            c.trusted_keys = vec![keys.image.digest()];
            c.job_key = Some(keys.job_key());
            // Short timeouts keep the demo quick; nothing here is slow.
            c.health_timeout = Duration::from_secs(2);
            c.stall_timeout = Duration::from_secs(5);
            c.update_timeout = Duration::from_secs(30);
            c.progress_interval = Duration::from_millis(100);
            c.watchdog = Duration::from_millis(500);
            c.keep_alive_secs = 10;
            c
        })
        .collect()
}

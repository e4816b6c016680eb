//! The device: the seed design's three parts — link control, the MQTT client
//! and the OTA handler — run as one loop over the core's engine and boot guard.
//!
//! The same code runs on the chip (embassy-net, esp-storage) and in the
//! virtual device (tokio sockets, the simulated flash). The board supplies
//! [`Platform`] and [`Link`]; everything else is here or in `mqota-core`.
//!
//! # One boot, front to back
//!
//! 1. [`early_boot`], before anything that could fail: read the partition
//!    table, describe the running image, run the boot guard. On
//!    [`Verdict::Reboot`] the caller resets at once.
//! 2. [`run`]: bring up the link and the broker (the last will sets the
//!    retained `{prefix}/{id}/availability` to `offline`), subscribe to the
//!    command topics without retained replay, publish `online` and the
//!    retained status.
//! 3. On a trial boot: the health check — broker reached and topics
//!    subscribed within [`DeviceConfig::health_timeout`], then the platform's
//!    own hook. Pass: confirm, publish `confirming` and `done`. Fail: roll
//!    back and reboot; the old firmware reports `rolled_back`.
//! 4. Publish any outcome the boot guard found (once), resume an interrupted
//!    download, then serve commands.
//!
//! # A download and the broker at the same time
//!
//! While the body streams into the engine (and through it into flash), the
//! MQTT side keeps running in the same task: it publishes the progress the
//! engine produced (QoS 0, so a publish costs one socket write and never
//! waits for an ack), answers `busy` to other start and rollback commands,
//! keeps the session alive, and rejoins a broker that went away. A `cancel`
//! ends the download at once, even when the server is silent. Progress waits
//! in a bounded queue ([`PROGRESS_QUEUE`]); when it is full the oldest
//! `downloading` event is dropped, then the oldest refusal of another
//! command; the job's own phase changes never are.
//!
//! # Commands that must never run
//!
//! A command the broker delivers with the retain flag is dropped unread:
//! a retained rollback or start would otherwise run again on every
//! reconnect and every boot. The subscriptions already ask the broker not to
//! replay retained messages (MQTT 5 retain handling 2); the flag check is
//! for brokers that ignore the option. A start naming a job this device has
//! already finished is answered `duplicate_job` and nothing else
//! ([`mqota_core::engine::decide`] decides what every command means, idle or
//! downloading).

use core::cell::RefCell;

use embassy_futures::select::{select3, Either3};
use embassy_time::{with_timeout, Duration, Instant, Timer};
use embedded_storage::nor_flash::{MultiwriteNorFlash, NorFlash};
use heapless::{Deque, String};
use mqota_core::bootguard::{self, Boot, TrialResult, Verdict};
use mqota_core::engine::{
    decide, Action, Actions, Config as EngineConfig, Decision, Engine, Event, Finished, Layout,
    Response, State,
};
use mqota_core::image::{self, Chip};
use mqota_core::partition::{PartitionTable, TABLE_OFFSET};
use mqota_core::protocol::envelope::{self, JobTrust};
use mqota_core::protocol::truncated;
use mqota_core::protocol::{
    parse_command, parse_signed_command, BadCommand, Command, CommandOutcome, ErrorCode,
    LastResult, Phase, Progress, Status, Topics, MAX_COMMAND_LEN, MAX_PROGRESS_JSON,
    MAX_STATUS_JSON, MAX_URL_LEN, OFFLINE, ONLINE,
};
use mqota_core::signature::TrustPolicy;

use mqota_core::backoff::{Backoff, Jitter, XorShift32};
use mqota_core::fetch::{is_https, FetchError, HTTPS_NOT_ENABLED};

use crate::fieldlog::{self, FieldLog};
use crate::http::{Abort, BodySink, DownloadError, Downloader, RedirectError, ResponseInfo};
use crate::mqtt::{Message, MqttBuffers, MqttConfig, MqttSession, QoS, MQTT_RX_BUFFER};
use crate::net::Connector;
use crate::platform::{Link, Platform};
use crate::trust::TrustState;

/// Progress events waiting to be published during a download.
pub const PROGRESS_QUEUE: usize = 8;

/// What the board tells the runtime; [`DeviceConfig::new`] gives defaults.
///
/// The one place those defaults live: the firmware and the virtual device
/// start from [`DeviceConfig::new`] and override only what they were given.
///
/// Its `Debug` output shows whether a password is set, never the password.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceConfig<'a> {
    /// Broker host name or address.
    pub broker_host: &'a str,
    /// Broker port.
    pub broker_port: u16,
    /// Reach the broker over TLS (`mqtts://`); the connector given to
    /// [`run`] must then have TLS.
    pub broker_tls: bool,
    /// MQTT user name, if the broker wants a login.
    pub username: Option<&'a str>,
    /// MQTT password, if the broker wants a login.
    pub password: Option<&'a [u8]>,
    /// Topic prefix (`device` by default).
    pub prefix: &'a str,
    /// A trial boot must reach the broker and subscribe within this time.
    pub health_timeout: Duration,
    /// Overall deadline of an update unless the job sets `timeout_s`.
    pub update_timeout: Duration,
    /// A download that delivers nothing for this long is retried.
    pub stall_timeout: Duration,
    /// At most one `downloading` event per this interval.
    pub progress_interval: Duration,
    /// MQTT keep-alive in seconds.
    pub keep_alive_secs: u16,
    /// Seed for reconnect jitter (use something device-specific, e.g. the MAC).
    pub seed: u32,
    /// Also publish every progress event on the shared `{prefix}/progress`
    /// (besides `{prefix}/{id}/progress`), for tooling that listens there.
    pub progress_copy: bool,
    /// Which signing keys updates must carry; none: unsigned images are
    /// taken (and the status says `"signed_only": false`).
    pub trust: TrustPolicy,
    /// The key commands must be signed with; none: unsigned commands are
    /// taken (and the status says `"signed_jobs": false`).
    pub job_trust: Option<JobTrust>,
}

impl<'a> DeviceConfig<'a> {
    /// Defaults: prefix `device`, 60 s health check, 10 min update deadline,
    /// 15 s stall timeout, progress at most every 250 ms, keep-alive 30 s.
    /// A `const fn`, so build-time configuration can read the defaults.
    pub const fn new(broker_host: &'a str, broker_port: u16) -> Self {
        Self {
            broker_host,
            broker_port,
            broker_tls: false,
            username: None,
            password: None,
            prefix: mqota_core::protocol::DEFAULT_PREFIX,
            health_timeout: Duration::from_secs(60),
            update_timeout: Duration::from_secs(600),
            stall_timeout: Duration::from_secs(15),
            progress_interval: Duration::from_millis(250),
            keep_alive_secs: 30,
            seed: 0x6d71_6f74,
            progress_copy: true,
            trust: TrustPolicy::none(),
            job_trust: None,
        }
    }
}

impl core::fmt::Debug for DeviceConfig<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DeviceConfig")
            .field("broker_host", &self.broker_host)
            .field("broker_port", &self.broker_port)
            .field("broker_tls", &self.broker_tls)
            .field("username", &self.username)
            .field("password", &self.password.map(|_| "<redacted>"))
            .field("prefix", &self.prefix)
            .field("health_timeout", &self.health_timeout)
            .field("update_timeout", &self.update_timeout)
            .field("stall_timeout", &self.stall_timeout)
            .field("progress_interval", &self.progress_interval)
            .field("keep_alive_secs", &self.keep_alive_secs)
            .field("seed", &self.seed)
            .field("progress_copy", &self.progress_copy)
            .field("trust", &self.trust)
            .field("job_trust", &self.job_trust)
            .finish()
    }
}

/// The running firmware, as [`early_boot`] found it.
#[derive(Debug, Clone)]
pub struct RunningFirmware {
    /// Where the slots and otadata are, and which slot runs.
    pub layout: Layout,
    /// What the boot guard decided.
    pub boot: Boot,
    /// The chip the running image is built for.
    pub chip: Chip,
    /// Version of the running image (from its app descriptor).
    pub version: String<32>,
    /// Project name of the running image.
    pub project: String<32>,
    /// `secure_version` of the running image.
    pub secure_version: u32,
}

/// Why [`early_boot`] could not describe the running firmware. The device
/// cannot take updates; report it on the console and keep running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EarlyBootError {
    /// The partition table is missing or broken.
    PartitionTable,
    /// The table has no otadata or fewer than two OTA slots, or none at the
    /// running index.
    NoOtaLayout,
    /// The running slot does not hold a valid image (it is running, so the
    /// flash read failed or the slot lookup is wrong).
    RunningImage,
    /// The boot guard could not read or write flash.
    Guard,
}

/// Runs as early as possible at every boot: reads the partition table,
/// describes the running image and runs the boot guard. `running` is the
/// index of the OTA slot the bootloader started (`ota_0` is 0), as the chip
/// glue finds it. On [`Verdict::Reboot`] reset at once; otherwise hand the
/// result to [`run`].
pub fn early_boot<F: NorFlash>(
    flash: &mut F,
    running: usize,
) -> Result<RunningFirmware, EarlyBootError> {
    let table = PartitionTable::read_from(flash, TABLE_OFFSET)
        .map_err(|_| EarlyBootError::PartitionTable)?;
    let index = running;
    let layout = Layout::from_table(&table, index).ok_or(EarlyBootError::NoOtaLayout)?;
    let slot = layout.slots[index];
    let info = image::validate_flash(flash, slot.offset, slot.size)
        .map_err(|_| EarlyBootError::RunningImage)?;
    let boot = bootguard::on_boot(flash, &layout).map_err(|_| EarlyBootError::Guard)?;
    Ok(RunningFirmware {
        layout,
        boot,
        chip: info.chip,
        version: info.app.version.clone(),
        project: info.app.project_name.clone(),
        secure_version: info.app.secure_version,
    })
}

fn now_ms() -> u64 {
    Instant::now().as_millis()
}

/// Runs the device until it reboots. Never returns: a reboot goes through
/// [`Platform::reboot`].
pub async fn run<P, L, C, F>(
    cfg: &DeviceConfig<'_>,
    booted: RunningFirmware,
    platform: &mut P,
    link: &mut L,
    net: &C,
    flash: &mut F,
) -> !
where
    P: Platform,
    L: Link,
    C: Connector,
    F: MultiwriteNorFlash,
{
    let device_id: String<{ mqota_core::protocol::MAX_DEVICE_ID_LEN }> =
        truncated(platform.device_id());
    let topics = match Topics::new(cfg.prefix, &device_id) {
        Ok(t) => t,
        Err(_) => {
            warn!("device id or topic prefix unusable in topics; updates disabled");
            loop {
                Timer::after(Duration::from_secs(3600)).await;
            }
        }
    };
    let mut status = Status {
        device: device_id.clone(),
        chip: truncated(booted.chip.name()),
        project: booted.project.clone(),
        version: booted.version.clone(),
        slot: Some(booted.layout.running as u8),
        state: truncated(booted.boot.state.name()),
        last: booted.boot.last.clone(),
        https: net.tls(),
        boot_reason: None,
        log_newest: None,
        signed_only: cfg.trust.signed_only(),
        secure_version: booted.secure_version,
        signed_jobs: cfg.job_trust.is_some(),
        job_seq: None,
    };
    // The will marks the device offline on its availability topic, never
    // on its status: the retained status keeps the last real state.
    let availability_topic = topics.availability();
    let mut mqtt_cfg = MqttConfig::new(
        cfg.broker_host,
        cfg.broker_port,
        &device_id,
        &availability_topic,
        OFFLINE.as_bytes(),
    );
    mqtt_cfg.keep_alive_secs = cfg.keep_alive_secs;
    mqtt_cfg.tls = cfg.broker_tls;
    mqtt_cfg.username = cfg.username;
    mqtt_cfg.password = cfg.password;
    let mut rx = [0u8; MQTT_RX_BUFFER];
    let mut buffers = MqttBuffers::new(&mut rx);
    let mut session = MqttSession::new(net, &mut buffers, mqtt_cfg);
    let subs = topics.subscriptions();
    let sub_refs: [&str; 5] = core::array::from_fn(|i| subs[i].as_str());
    let mut backoff = Backoff::new(500, 30_000, Jitter::Full);
    let mut rng = XorShift32::new(cfg.seed ^ now_ms() as u32);
    let mut random = move || rng.next_u32();

    let mut engine_cfg = EngineConfig::new(&device_id, booted.chip, &booted.version);
    engine_cfg.timeout_ms = cfg.update_timeout.as_millis();
    engine_cfg.stall_timeout_ms = cfg.stall_timeout.as_millis();
    engine_cfg.progress_interval_ms = cfg.progress_interval.as_millis();
    engine_cfg.trust = cfg.trust;
    engine_cfg.running_project = booted.project.clone();
    // The trust state: the sequence numbers accepted and the floor. A
    // confirmed image raises the floor to its own secure_version at every
    // boot (repairing a cut between confirming and raising).
    let mut trust = TrustState::open(flash).await;
    if booted.boot.verdict != Verdict::Trial
        && trust
            .raise_floor(flash, booted.secure_version)
            .await
            .is_err()
    {
        warn!("could not raise the secure_version floor");
    }
    engine_cfg.secure_floor = trust.floor();
    status.job_seq = trust.seq();
    // Download retries draw their jitter from the device's seed too, mixed
    // apart from the reconnect generator's.
    engine_cfg.seed = cfg.seed.rotate_left(16) ^ now_ms() as u32 ^ 0x5bd1_e995;
    let layout = booted.layout.clone();
    let mut engine = Engine::new(engine_cfg, layout.clone());
    // The jobs this device already finished: a replayed start of one of them
    // is answered `duplicate_job` instead of running again.
    engine.recall_finished(flash);
    if let Some(job) = booted.boot.last.as_ref().and_then(|l| l.job.as_ref()) {
        engine.remember_finished(job);
    }
    if let Some(job) = booted.boot.trial_job.as_ref() {
        engine.remember_finished(job);
    }

    // The field log: the boot first, then whatever this boot goes through.
    let boot_reason = platform.boot_reason();
    status.boot_reason = Some(boot_reason);
    let log = FieldLog::open(flash, boot_reason, now_ms()).await;
    log.note_fmt(
        now_ms(),
        mqota_core::protocol::LogLevel::Info,
        format_args!(
            "boot {}: {}, {} {} slot {} {}",
            log.boot(),
            boot_reason.as_str(),
            booted.project,
            booted.version,
            booted.layout.running,
            booted.boot.state.name()
        ),
    );
    if !trust.persistent() {
        log.note(
            now_ms(),
            mqota_core::protocol::LogLevel::Warn,
            "no mqota partition: replay protection and the secure_version floor last until reboot",
        );
    }
    let mut dev = Device {
        trust,
        job_trust: cfg.job_trust,
        log,
        connected_once: false,
        topics: &topics,
        status: &mut status,
        fetch: None,
        reboot: false,
        up: false,
        progress_copy: cfg.progress_copy,
    };

    // The trial, if this boot is one: reach the broker and subscribe within
    // the health timeout, then the platform's hook in what time is left.
    if booted.boot.verdict == Verdict::Trial {
        let job = booted.boot.trial_job.clone();
        let deadline = Instant::now() + cfg.health_timeout;
        let reached = with_timeout(
            cfg.health_timeout,
            dev.bring_up(
                &mut session,
                link,
                &mut backoff,
                &mut random,
                &sub_refs,
                true,
            ),
        )
        .await
        .unwrap_or(false);
        let mut healthy = reached;
        if reached {
            let mut confirming = Progress::new(topics.device_id(), job.clone(), Phase::Confirming);
            // The download reached 100 before the reboot; percent never goes down.
            confirming.percent = 100;
            dev.publish(&mut session, confirming).await;
            let left = deadline.saturating_duration_since(Instant::now());
            healthy = with_timeout(left, platform.health_check())
                .await
                .unwrap_or(false);
        }
        match bootguard::end_trial(flash, &layout, healthy) {
            Ok(TrialResult::Confirmed(report)) => {
                info!("trial passed: image confirmed");
                dev.log.note(
                    now_ms(),
                    mqota_core::protocol::LogLevel::Info,
                    "trial passed: image confirmed",
                );
                platform.confirmed();
                if dev
                    .trust
                    .raise_floor(flash, booted.secure_version)
                    .await
                    .is_err()
                {
                    warn!("could not raise the secure_version floor");
                }
                engine.set_secure_floor(dev.trust.floor());
                dev.status.state = truncated("valid");
                dev.report(&mut session, &report).await;
                let _ = bootguard::mark_reported(flash, &report);
            }
            Ok(TrialResult::RolledBack) => {
                warn!("trial failed: rolling back");
                let why = if reached {
                    "trial failed: health check failed, rolling back"
                } else {
                    "trial failed: broker not reached in time, rolling back"
                };
                dev.log
                    .note(now_ms(), mqota_core::protocol::LogLevel::Error, why);
                dev.log.flush(flash, now_ms()).await;
                dev.go_offline(&mut session).await;
                platform.reboot().await;
            }
            // The flash failed: the trial stays unfinished, and the next boot
            // treats it as one that died (rolled back, `boot_failed`).
            Err(_) => warn!("could not record the trial's verdict"),
        }
    }

    // Broker first: a report must reach it, and a resumed download's events
    // too (the download side only keeps a session alive, it does not
    // subscribe or publish the online status).
    if (booted.boot.report.is_some() || booted.boot.resume) && !dev.up {
        dev.bring_up(
            &mut session,
            link,
            &mut backoff,
            &mut random,
            &sub_refs,
            false,
        )
        .await;
    }
    if let Some(report) = &booted.boot.report {
        // Marked once published, so no later boot publishes it again.
        dev.report(&mut session, report).await;
        let _ = bootguard::mark_reported(flash, report);
    }
    if booted.boot.resume {
        if let Some(actions) = engine.resume(flash, now_ms()) {
            dev.apply(&mut session, actions, flash, &layout).await;
        }
    }

    let mut downloader = Downloader::new(net).with_io_timeout(cfg.stall_timeout);
    loop {
        dev.log.flush(flash, now_ms()).await;
        fieldlog::serve_deferred(&dev.log, &mut session, &topics, flash).await;
        if dev.reboot {
            info!("rebooting into the new image");
            dev.go_offline(&mut session).await;
            platform.reboot().await;
        }
        if let Some(from) = dev.fetch.take() {
            let actions = download(
                &mut dev,
                &mut session,
                &mut downloader,
                &mut engine,
                flash,
                from,
                link,
                &mut backoff,
                &mut random,
            )
            .await;
            dev.apply(&mut session, actions, flash, &layout).await;
            continue;
        }
        // Idle (or backing off before a retry): serve the broker.
        if !dev.up || !session.is_connected() || !link.is_connected() {
            dev.up = false;
            if !dev
                .bring_up(
                    &mut session,
                    link,
                    &mut backoff,
                    &mut random,
                    &sub_refs,
                    false,
                )
                .await
            {
                continue;
            }
        }
        let wait = if engine.is_busy() { 200 } else { 1_000 };
        let until = Instant::now() + Duration::from_millis(wait);
        match session.poll(until).await {
            Ok(Some(msg)) if topics.is_logs_get(&msg.topic) => {
                fieldlog::serve_get(&dev.log, &mut session, &topics, &msg, flash).await;
            }
            Ok(Some(msg)) => {
                let actions = dev.on_message(&mut session, &msg, &mut engine, flash).await;
                dev.apply(&mut session, actions, flash, &layout).await;
            }
            Ok(None) => {}
            Err(_) => dev.up = false,
        }
        let actions = engine.tick(flash, now_ms());
        dev.apply(&mut session, actions, flash, &layout).await;
    }
}

/// What the loop carries between steps.
struct Device<'d> {
    /// Sequence numbers accepted and the secure_version floor.
    trust: TrustState,
    /// The key commands must be signed with, if any.
    job_trust: Option<JobTrust>,
    /// The field log.
    log: FieldLog,
    /// The broker was reached since the last loss (a loss is logged once).
    connected_once: bool,
    topics: &'d Topics,
    status: &'d mut Status,
    /// A fetch the engine asked for.
    fetch: Option<u32>,
    /// The engine asked for a reboot.
    reboot: bool,
    /// Connected, subscribed, and the online status published.
    up: bool,
    /// Copy progress to the shared `{prefix}/progress` too.
    progress_copy: bool,
}

impl Device<'_> {
    /// Brings the link and the broker up, subscribes to the command topics
    /// and publishes the online status. With `once`, gives up after the
    /// first failed attempt to subscribe (the trial's health check has its
    /// own deadline around this); otherwise retries until it works.
    #[allow(clippy::too_many_arguments)]
    async fn bring_up<C: Connector, L: Link>(
        &mut self,
        session: &mut MqttSession<'_, C>,
        link: &mut L,
        backoff: &mut Backoff,
        random: &mut impl FnMut() -> u32,
        subs: &[&str],
        trial: bool,
    ) -> bool {
        if core::mem::take(&mut self.connected_once) {
            let why = if link.is_connected() {
                "broker connection lost"
            } else {
                "WiFi link lost"
            };
            self.log
                .note(now_ms(), mqota_core::protocol::LogLevel::Warn, why);
        }
        loop {
            if session.maintain(link, backoff, random).await.is_err() {
                // Only configuration errors end up here; no retry helps.
                if trial {
                    return false;
                }
                Timer::after(Duration::from_secs(5)).await;
                continue;
            }
            if session.subscribe(subs).await.is_ok() {
                self.up = true;
                self.connected_once = true;
                self.log.note(
                    now_ms(),
                    mqota_core::protocol::LogLevel::Info,
                    "broker connected",
                );
                self.publish_availability(session, ONLINE).await;
                self.publish_status(session).await;
                return true;
            }
            Timer::after(Duration::from_millis(backoff.next_delay(random()))).await;
        }
    }

    async fn publish<C: Connector>(&mut self, session: &mut MqttSession<'_, C>, p: Progress) {
        publish_progress(session, self.topics, &p, self.progress_copy).await;
        fieldlog::note_progress(&self.log, now_ms(), &p);
        // Refusals of a command (malformed, busy) are not results of an update:
        // they must not hide the last real result in the retained status.
        let refusal = matches!(
            p.error,
            Some(ErrorCode::BadCommand | ErrorCode::Busy | ErrorCode::DuplicateJob)
        );
        if p.phase.is_terminal() && !refusal {
            self.status.last = Some(LastResult {
                job: p.job.clone(),
                result: p.phase,
                error: p.error,
            });
            self.publish_status(session).await;
        }
    }

    /// Says goodbye before a reboot. A clean DISCONNECT discards the will,
    /// so without this the retained availability would claim the device
    /// online until it (or the image it falls back to) connects again.
    async fn go_offline<C: Connector>(&mut self, session: &mut MqttSession<'_, C>) {
        self.publish_availability(session, OFFLINE).await;
        session.disconnect().await;
    }

    async fn publish_availability<C: Connector>(
        &mut self,
        session: &mut MqttSession<'_, C>,
        state: &str,
    ) {
        let _ = session
            .publish(
                &self.topics.availability(),
                state.as_bytes(),
                QoS::AtLeastOnce,
                true,
            )
            .await;
    }

    async fn publish_status<C: Connector>(&mut self, session: &mut MqttSession<'_, C>) {
        self.status.log_newest = self.log.newest();
        let mut buf = [0u8; MAX_STATUS_JSON];
        if let Ok(n) = self.status.to_json(&mut buf) {
            let _ = session
                .publish(&self.topics.status(), &buf[..n], QoS::AtLeastOnce, true)
                .await;
        }
    }

    async fn report<C: Connector>(
        &mut self,
        session: &mut MqttSession<'_, C>,
        r: &bootguard::Report,
    ) {
        let mut p = Progress::new(self.topics.device_id(), r.job.clone(), r.phase);
        p.percent = 100;
        p.error = r.error;
        self.publish(session, p).await;
    }

    /// Performs the engine's actions that are not about the fetch in flight.
    async fn apply<C: Connector, F: MultiwriteNorFlash>(
        &mut self,
        session: &mut MqttSession<'_, C>,
        actions: Actions,
        flash: &mut F,
        layout: &Layout,
    ) {
        for a in actions {
            match a {
                Action::Publish(p) => self.publish(session, p).await,
                Action::Fetch { from } => self.fetch = Some(from),
                Action::StopFetch => self.fetch = None,
                Action::Reboot => self.reboot = true,
                Action::Rollback { job } => {
                    if let Some(why) = below_floor(flash, layout, self.trust.floor()) {
                        let p = Progress::new(self.topics.device_id(), job, Phase::Failed)
                            .with_error(ErrorCode::Downgrade, Some(why));
                        self.publish(session, p).await;
                        continue;
                    }
                    let p = match bootguard::rollback(flash, layout) {
                        Ok(()) => {
                            self.reboot = true;
                            let mut p =
                                Progress::new(self.topics.device_id(), job, Phase::RolledBack);
                            p.message = Some(truncated("rolling back to the previous image"));
                            p
                        }
                        Err(e) => Progress::new(self.topics.device_id(), job, Phase::Failed)
                            .with_error(e.code(), Some("no valid previous image to roll back to")),
                    };
                    self.publish(session, p).await;
                }
            }
        }
    }

    /// A command arrived while no download runs: a signed one's sequence
    /// number is checked and recorded first, then the engine decides what
    /// it means.
    async fn on_message<C: Connector, F: MultiwriteNorFlash>(
        &mut self,
        session: &mut MqttSession<'_, C>,
        msg: &Message,
        engine: &mut Engine,
        flash: &mut F,
    ) -> Actions {
        match read_command(
            msg,
            self.topics,
            self.job_trust.as_ref(),
            &self.trust,
            self.status.https,
        ) {
            Incoming::Command(cmd, seq) => {
                if let Some(seq) = seq {
                    if self.trust.accept_seq(flash, seq).await.is_err() {
                        let p = Progress::new(self.topics.device_id(), cmd.job(), Phase::Failed)
                            .with_error(
                                ErrorCode::Flash,
                                Some("could not record the command's sequence number"),
                            );
                        self.publish_refusal(session, p).await;
                        return Actions::new();
                    }
                    self.status.job_seq = self.trust.seq();
                    self.publish_status(session).await;
                }
                engine.handle(flash, now_ms(), Event::Command(cmd))
            }
            Incoming::Bad(p) => {
                self.publish_refusal(session, p).await;
                Actions::new()
            }
            Incoming::Ignored => Actions::new(),
        }
    }

    /// Publishes the refusal of a command: an answer, not the result of an
    /// update, so the retained status keeps the last real one.
    async fn publish_refusal<C: Connector>(
        &mut self,
        session: &mut MqttSession<'_, C>,
        p: Progress,
    ) {
        publish_progress(session, self.topics, &p, self.progress_copy).await;
        fieldlog::note_progress(&self.log, now_ms(), &p);
    }
}

/// Why a rollback must not boot the previous slot: its image's
/// `secure_version` is below `floor`. `None` when it is not (or the slot
/// holds no valid image: the boot guard answers that).
fn below_floor<F: NorFlash>(flash: &mut F, layout: &Layout, floor: u32) -> Option<&'static str> {
    if floor == 0 {
        return None;
    }
    let slot = layout.slots[layout.target()];
    let info = image::validate_flash(flash, slot.offset, slot.size).ok()?;
    (info.app.secure_version < floor)
        .then_some("previous image's secure_version is below the device's floor")
}

/// A message on one of the device's topics, read.
// Built and consumed at once, never stored: no allocator to box in.
#[allow(clippy::large_enum_variant)]
enum Incoming {
    /// A command for this device, with its sequence number if it was signed
    /// (fresh: above every one accepted so far).
    Command(Command, Option<u64>),
    /// A malformed command: publish this refusal.
    Bad(Progress),
    /// Not a command for this device, or a retained one: nothing to do.
    Ignored,
}

/// Reads a message: a retained command is dropped unread (it would run again
/// on every reconnect), anything not addressed to this device is ignored.
/// With a job key, only a command signed with it, bound to this device and
/// topic, and with a fresh sequence number is a command; anything else is
/// refused (`bad_signature`, `replayed`).
fn read_command(
    msg: &Message,
    topics: &Topics,
    job_trust: Option<&JobTrust>,
    state: &TrustState,
    tls: bool,
) -> Incoming {
    let Some(kind) = topics.classify(&msg.topic) else {
        return Incoming::Ignored;
    };
    if msg.retain {
        warn!("dropping a retained command: commands are never retained");
        return Incoming::Ignored;
    }
    let (parsed, seq) = match job_trust {
        None => (parse_command(kind, &msg.payload, topics.device_id()), None),
        Some(trust) => {
            let mut inner = [0u8; MAX_COMMAND_LEN];
            let opened = match envelope::open(&msg.payload, trust, &mut inner) {
                Ok(inner) => inner,
                Err(reason) => {
                    return Incoming::Bad(
                        BadCommand {
                            code: ErrorCode::BadSignature,
                            reason,
                            job: None,
                        }
                        .to_progress(topics),
                    )
                }
            };
            match parse_signed_command(kind, opened, topics.device_id()) {
                Ok((outcome, seq)) => (Ok(outcome), Some(seq)),
                Err(bad) => (Err(bad), None),
            }
        }
    };
    if let (Some(seq), Ok(CommandOutcome::Command(cmd))) = (seq, &parsed) {
        if !state.is_fresh(seq) {
            return Incoming::Bad(
                Progress::new(topics.device_id(), cmd.job(), Phase::Failed).with_error(
                    ErrorCode::Replayed,
                    Some("sequence number is not above the last one accepted"),
                ),
            );
        }
    }
    match parsed {
        // Refused before the engine sees it: the device could never fetch
        // it, and the controller can tell from `https` in the status.
        Ok(CommandOutcome::Command(Command::Start(job))) if !tls && is_https(&job.url) => {
            Incoming::Bad(
                Progress::new(topics.device_id(), job.job, Phase::Failed)
                    .with_error(ErrorCode::BadCommand, Some(HTTPS_NOT_ENABLED)),
            )
        }
        Ok(CommandOutcome::Command(cmd)) => Incoming::Command(cmd, seq),
        Ok(CommandOutcome::NotForMe) => Incoming::Ignored,
        Err(bad) => Incoming::Bad(bad.to_progress(topics)),
    }
}

/// The engine side of a download: feeds the body into the engine (and
/// through it into flash); hands the engine's events to the MQTT side.
struct EngineSink<'e, F> {
    engine: &'e mut Engine,
    flash: &'e mut F,
    outbox: &'e RefCell<Deque<Progress, PROGRESS_QUEUE>>,
    /// Actions that end this fetch (another fetch, a reboot, a stop).
    ending: Actions,
}

impl<F: MultiwriteNorFlash> EngineSink<'_, F> {
    fn feed(&mut self, event: Event<'_>) -> Result<(), Abort> {
        let actions = self.engine.handle(self.flash, now_ms(), event);
        let mut end = false;
        for a in actions {
            match a {
                Action::Publish(p) => queue(self.outbox, p),
                other => {
                    end = true;
                    let _ = self.ending.push(other);
                }
            }
        }
        if end || !self.engine.is_busy() {
            Err(Abort)
        } else {
            Ok(())
        }
    }
}

fn queue(outbox: &RefCell<Deque<Progress, PROGRESS_QUEUE>>, p: Progress) {
    let mut q = outbox.borrow_mut();
    if q.is_full() {
        // Make room by dropping, oldest first: a `downloading` event (the next
        // one supersedes it), else a refusal of another command (`busy`,
        // `bad_command`: a flood of junk must not push out the job's own
        // events). The job's phase changes are at most a handful per fetch,
        // far fewer than the queue holds, so they are never the ones to go.
        let refusal = |e: &Progress| {
            matches!(
                e.error,
                Some(ErrorCode::Busy | ErrorCode::BadCommand | ErrorCode::DuplicateJob)
            )
        };
        let victim = q
            .iter()
            .position(|e| e.phase == Phase::Downloading)
            .or_else(|| q.iter().position(refusal));
        match victim {
            Some(i) => {
                let mut kept: Deque<Progress, PROGRESS_QUEUE> = Deque::new();
                for (j, e) in q.iter().enumerate() {
                    if j != i {
                        // Cannot fail: one fewer than the queue held.
                        let _ = kept.push_back(e.clone());
                    }
                }
                *q = kept;
            }
            // Nothing expendable: the new event is the one dropped.
            None => return,
        }
    }
    let _ = q.push_back(p);
}

impl<F: MultiwriteNorFlash> BodySink for EngineSink<'_, F> {
    async fn begin(&mut self, info: &ResponseInfo) -> Result<(), Abort> {
        self.feed(Event::Response(Response {
            status: info.status,
            content_length: info.content_length.map(|l| l.min(u32::MAX as u64) as u32),
            range_start: info
                .content_range
                .map(|r| r.start.min(u32::MAX as u64) as u32),
        }))
    }

    async fn chunk(&mut self, data: &[u8]) -> Result<(), Abort> {
        self.feed(Event::Body(data))?;
        // Let the MQTT side run between chunks: flash writes block the
        // executor, so without this a fast server would starve it.
        embassy_futures::yield_now().await;
        Ok(())
    }
}

/// One fetch: the body streams into the engine while the MQTT side keeps
/// the session and publishes progress. Returns the engine's next actions.
#[allow(clippy::too_many_arguments)]
async fn download<C, F, L>(
    dev: &mut Device<'_>,
    session: &mut MqttSession<'_, C>,
    downloader: &mut Downloader<'_, C>,
    engine: &mut Engine,
    flash: &mut F,
    from: u32,
    link: &mut L,
    backoff: &mut Backoff,
    random: &mut impl FnMut() -> u32,
) -> Actions
where
    C: Connector,
    F: MultiwriteNorFlash,
    L: Link,
{
    let Some(url) = engine.url().map(truncated::<MAX_URL_LEN>) else {
        return Actions::new();
    };
    let deadline = engine.deadline().unwrap_or(u64::MAX);
    let current = engine.job().cloned();
    // The engine is lent to the body sink below; the commands that arrive
    // meanwhile are decided on a copy of what they depend on.
    let finished = engine.finished().clone();
    let copy = dev.progress_copy;
    let flog = &dev.log;
    let trust_state = &dev.trust;
    let job_trust = dev.job_trust;
    let tls = dev.status.https;
    let outbox = RefCell::new(Deque::new());
    let (result, cancel, ending) = {
        let mut sink = EngineSink {
            engine,
            flash,
            outbox: &outbox,
            ending: Actions::new(),
        };
        let topics = dev.topics;
        let mqtt_side = async {
            let mut lost = false;
            loop {
                let next = outbox.borrow_mut().pop_front();
                if let Some(p) = next {
                    publish_progress(session, topics, &p, copy).await;
                    fieldlog::note_progress(flog, now_ms(), &p);
                    continue;
                }
                if session.is_connected() == lost {
                    // A loss (or a return) of the broker during the download.
                    lost = !lost;
                    let (level, what) = if lost {
                        (
                            mqota_core::protocol::LogLevel::Warn,
                            "broker connection lost during a download",
                        )
                    } else {
                        (mqota_core::protocol::LogLevel::Info, "broker connected")
                    };
                    flog.note(now_ms(), level, what);
                }
                if !session.is_connected() && session.maintain(link, backoff, random).await.is_err()
                {
                    Timer::after(Duration::from_secs(1)).await;
                    continue;
                }
                let until = Instant::now() + Duration::from_millis(50);
                match session.poll(until).await {
                    Ok(Some(msg)) if topics.is_logs_get(&msg.topic) => {
                        fieldlog::defer_get(flog, &msg);
                    }
                    Ok(Some(msg)) => {
                        let state = State::Updating {
                            job: current.as_ref(),
                        };
                        let read = read_command(&msg, topics, job_trust.as_ref(), trust_state, tls);
                        if let Some(cmd) = during_download(read, topics, state, &finished, &outbox)
                        {
                            return cmd;
                        }
                    }
                    Ok(None) => {}
                    Err(_) => {}
                }
            }
        };
        let timer = Timer::at(Instant::from_millis(deadline));
        let outcome = select3(
            downloader.download(&url, u64::from(from), &mut sink),
            mqtt_side,
            timer,
        )
        .await;
        let (result, cancel) = match outcome {
            Either3::First(r) => (Some(r), None),
            Either3::Second(cmd) => (None, Some(cmd)),
            Either3::Third(()) => (None, None),
        };
        (result, cancel, sink.ending)
    };
    // Publish what the engine produced during the fetch, in order.
    loop {
        let next = outbox.borrow_mut().pop_front();
        match next {
            Some(p) => dev.publish(session, p).await,
            None => break,
        }
    }
    let now = now_ms();
    let mut actions = ending;
    // A signed cancel's sequence number is recorded before it acts; if that
    // fails the cancel still runs (the download already stopped), and says so.
    let cancel = match cancel {
        Some((cmd, Some(seq))) => {
            if dev.trust.accept_seq(flash, seq).await.is_err() {
                warn!("could not record a cancel's sequence number");
            }
            dev.status.job_seq = dev.trust.seq();
            Some(cmd)
        }
        Some((cmd, None)) => Some(cmd),
        None => None,
    };
    let event = match (result, cancel) {
        (_, Some(cmd)) => Some(Event::Command(cmd)),
        (Some(Ok(_)), None) => Some(Event::BodyEnd),
        (Some(Err(DownloadError::Aborted)), None) => None,
        (Some(Err(DownloadError::Timeout)), None) => Some(Event::Stalled),
        (Some(Err(e)), None) => Some(Event::FetchFailed(fetch_error(e, &url))),
        // The overall deadline passed while the fetch was silent.
        (None, None) => Some(Event::Tick),
    };
    if let Some(ev) = event {
        for a in engine.handle(flash, now, ev) {
            let _ = actions.push(a);
        }
    }
    if engine.is_busy()
        && !actions
            .iter()
            .any(|a| matches!(a, Action::Fetch { .. } | Action::StopFetch | Action::Reboot))
    {
        // Neither finished nor failed: make sure the engine gets its ticks.
        for a in engine.tick(flash, now) {
            let _ = actions.push(a);
        }
    }
    actions
}

/// Names a failed download in the core's terms; the core decides whether it
/// is retried ([`FetchError::is_transient`]).
fn fetch_error(e: DownloadError, url: &str) -> FetchError {
    match e {
        DownloadError::Status(status) => FetchError::Status(status),
        DownloadError::Dns => FetchError::Dns,
        DownloadError::Protocol => FetchError::BadResponse,
        DownloadError::BadContentLength => FetchError::BadContentLength,
        DownloadError::UnsupportedScheme if is_https(url) => FetchError::HttpsNotEnabled,
        DownloadError::UnsupportedScheme | DownloadError::InvalidUrl => FetchError::BadUrl,
        DownloadError::Redirect(RedirectError::TooMany) => FetchError::TooManyRedirects,
        DownloadError::Redirect(RedirectError::Insecure) => FetchError::InsecureRedirect,
        DownloadError::Redirect(RedirectError::UnsupportedScheme) => {
            FetchError::RedirectUnsupported
        }
        DownloadError::Redirect(_) => FetchError::BadRedirect,
        DownloadError::Tls(f) => FetchError::Tls(f.as_str()),
        // Network, and anything a later reqwless adds: worth another try.
        _ => FetchError::Connection,
    }
}

/// Publishes a progress event at QoS 0 on `{prefix}/{id}/progress`, and a
/// copy on `{prefix}/progress` when `copy`: progress must never wait on the
/// broker. A lost event is superseded by the next; results also land in the
/// retained status.
async fn publish_progress<C: Connector>(
    session: &mut MqttSession<'_, C>,
    topics: &Topics,
    p: &Progress,
    copy: bool,
) {
    let mut buf = [0u8; MAX_PROGRESS_JSON];
    if let Ok(n) = p.to_json(&mut buf) {
        let _ = session
            .publish(&topics.device_progress(), &buf[..n], QoS::AtMostOnce, false)
            .await;
        if copy {
            let _ = session
                .publish(&topics.progress(), &buf[..n], QoS::AtMostOnce, false)
                .await;
        }
    }
}

/// A command during a download, decided by [`decide`] like every other: a
/// `cancel` of this job (or of none named) ends the download (returned);
/// refusals (`busy`, `duplicate_job`, `bad_command`) are queued; retained
/// commands and everything else are ignored.
fn during_download(
    read: Incoming,
    topics: &Topics,
    state: State<'_>,
    finished: &Finished,
    outbox: &RefCell<Deque<Progress, PROGRESS_QUEUE>>,
) -> Option<(Command, Option<u64>)> {
    let (cmd, seq) = match read {
        Incoming::Command(cmd, seq) => (cmd, seq),
        Incoming::Bad(p) => {
            queue(outbox, p);
            return None;
        }
        Incoming::Ignored => return None,
    };
    match decide(state, finished, &cmd) {
        Decision::Cancel => Some((cmd, seq)),
        Decision::Refuse(code, why) => {
            let job = cmd.job();
            queue(
                outbox,
                Progress::new(topics.device_id(), job, Phase::Failed).with_error(code, Some(why)),
            );
            None
        }
        // A cancel of another job must not even drop the fetch: the engine
        // would ignore it and the download would sit until the stall timeout.
        Decision::Ignore | Decision::Start | Decision::Rollback => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_shows_the_user_name_but_never_the_password() {
        extern crate std;
        let mut c = DeviceConfig::new("broker.lan", 1883);
        c.username = Some("dev-1");
        c.password = Some(b"s3cret-pw");
        let device = std::format!("{c:?}");
        let mut m = MqttConfig::new("broker.lan", 1883, "dev-1", "t", b"offline");
        m.password = c.password;
        let mqtt = std::format!("{m:?}");
        for text in [device, mqtt] {
            assert!(!text.contains("s3cret"), "{text}");
            assert!(text.contains("<redacted>"), "{text}");
        }
    }

    fn message(topic: &str, payload: &[u8], retain: bool) -> Message {
        Message {
            topic: truncated(topic),
            payload: heapless::Vec::from_slice(payload).unwrap(),
            retain,
        }
    }

    #[test]
    fn a_command_delivered_retained_is_dropped_unread_and_unanswered() {
        let topics = Topics::new("device", "d").unwrap();
        let url = b"http://10.0.0.1/fw.bin";
        for (topic, payload) in [
            ("device/ota/start", &url[..]),
            ("device/d/ota/start", &url[..]),
            ("device/d/ota/rollback", &b"go"[..]),
            ("device/d/ota/cancel", &b""[..]),
            // Even a malformed one: no `bad_command` answer for it.
            ("device/d/ota/start", &b"{"[..]),
        ] {
            assert!(
                matches!(
                    read_command(
                        &message(topic, payload, true),
                        &topics,
                        None,
                        &TrustState::in_ram(),
                        false
                    ),
                    Incoming::Ignored
                ),
                "{topic}"
            );
            assert!(
                !matches!(
                    read_command(
                        &message(topic, payload, false),
                        &topics,
                        None,
                        &TrustState::in_ram(),
                        false
                    ),
                    Incoming::Ignored
                ),
                "{topic} unretained is read"
            );
        }
    }

    #[test]
    fn an_https_job_is_refused_bad_command_while_tls_is_off_and_read_with_it() {
        let topics = Topics::new("device", "d").unwrap();
        let msg = message("device/d/ota/start", b"https://fw.example/fw.bin", false);
        match read_command(&msg, &topics, None, &TrustState::in_ram(), false) {
            Incoming::Bad(p) => {
                assert_eq!(p.error, Some(ErrorCode::BadCommand));
                assert_eq!(p.message.as_deref(), Some(HTTPS_NOT_ENABLED));
            }
            _ => panic!("an https job is refused without TLS"),
        }
        assert!(matches!(
            read_command(&msg, &topics, None, &TrustState::in_ram(), true),
            Incoming::Command(..)
        ));
    }

    fn job_key() -> p256::ecdsa::SigningKey {
        p256::ecdsa::SigningKey::from_slice(&[7; 32]).unwrap()
    }

    fn job_trust() -> JobTrust {
        JobTrust::new(
            envelope::job_key_of(job_key().verifying_key()),
            mqota_core::signature::SoftVerifier::INSTANCE,
        )
    }

    fn sealed(json: &str) -> std::string::String {
        envelope::seal(json.as_bytes(), &job_key())
    }

    fn refusal(i: Incoming) -> (ErrorCode, std::string::String) {
        match i {
            Incoming::Bad(p) => (p.error.unwrap(), p.message.unwrap().as_str().into()),
            _ => panic!("not refused"),
        }
    }

    #[test]
    fn with_a_job_key_only_fresh_commands_signed_for_this_device_and_topic_are_read() {
        let topics = Topics::new("device", "d").unwrap();
        let trust = job_trust();
        let fresh = TrustState::in_ram();
        let read = |topic: &str, payload: &str, state: &TrustState, retain: bool| {
            read_command(
                &message(topic, payload.as_bytes(), retain),
                &topics,
                Some(&trust),
                state,
                false,
            )
        };
        let start = sealed(r#"{"op":"start","seq":5,"device":"d","url":"http://h/f","job":"j"}"#);
        match read("device/d/ota/start", &start, &fresh, false) {
            Incoming::Command(Command::Start(job), Some(5)) => {
                assert_eq!(job.job.as_deref(), Some("j"))
            }
            _ => panic!("a good signed start is read"),
        }
        // Unsigned, bare URL or JSON: refused.
        for unsigned in ["http://h/f", r#"{"url":"http://h/f"}"#] {
            assert_eq!(
                refusal(read("device/d/ota/start", unsigned, &fresh, false)),
                (ErrorCode::BadSignature, "command is not signed".into())
            );
        }
        // The same bytes after a higher number was accepted: replayed.
        let mut later = TrustState::in_ram();
        let mut flash = mqota_flash_sim::SimFlash::new(0x1000);
        embassy_futures::block_on(later.accept_seq(&mut flash, 5)).unwrap();
        let (code, _) = refusal(read("device/d/ota/start", &start, &later, false));
        assert_eq!(code, ErrorCode::Replayed);
        // Signed for another device, or for another topic.
        let other = sealed(r#"{"op":"start","seq":6,"device":"e","url":"http://h/f"}"#);
        assert_eq!(
            refusal(read("device/d/ota/start", &other, &fresh, false)).0,
            ErrorCode::BadSignature
        );
        let cancel = sealed(r#"{"op":"cancel","seq":7,"device":"d"}"#);
        assert_eq!(
            refusal(read("device/d/ota/rollback", &cancel, &fresh, false)).0,
            ErrorCode::BadSignature
        );
        // Signed by another key.
        let forged = envelope::seal(
            br#"{"op":"start","seq":8,"device":"d","url":"http://h/f"}"#,
            &p256::ecdsa::SigningKey::from_slice(&[8; 32]).unwrap(),
        );
        assert_eq!(
            refusal(read("device/d/ota/start", &forged, &fresh, false)),
            (
                ErrorCode::BadSignature,
                "command signature does not verify".into()
            )
        );
        // Retained: dropped unread, signed or not.
        assert!(matches!(
            read("device/d/ota/start", &start, &fresh, true),
            Incoming::Ignored
        ));
    }

    fn ev(phase: Phase, error: Option<ErrorCode>) -> Progress {
        let topics = Topics::new("device", "d").unwrap();
        let mut p = Progress::new(topics.device_id(), None, phase);
        p.error = error;
        p
    }

    fn phases(
        q: &RefCell<Deque<Progress, PROGRESS_QUEUE>>,
    ) -> std::vec::Vec<(Phase, Option<ErrorCode>)> {
        q.borrow().iter().map(|p| (p.phase, p.error)).collect()
    }

    #[test]
    fn a_full_queue_drops_the_oldest_downloading_event_before_anything_else() {
        let q = RefCell::new(Deque::new());
        queue(&q, ev(Phase::Accepted, None));
        for _ in 0..PROGRESS_QUEUE - 1 {
            queue(&q, ev(Phase::Downloading, None));
        }
        queue(&q, ev(Phase::Verifying, None));
        let got = phases(&q);
        assert_eq!(got.len(), PROGRESS_QUEUE);
        assert_eq!(got.first(), Some(&(Phase::Accepted, None)));
        assert_eq!(got.last(), Some(&(Phase::Verifying, None)));
    }

    #[test]
    fn a_flood_of_refusals_cannot_push_out_the_jobs_own_events() {
        let q = RefCell::new(Deque::new());
        queue(&q, ev(Phase::Accepted, None));
        for _ in 0..PROGRESS_QUEUE * 3 {
            queue(&q, ev(Phase::Failed, Some(ErrorCode::BadCommand)));
        }
        queue(&q, ev(Phase::Cancelled, Some(ErrorCode::Cancelled)));
        let got = phases(&q);
        assert_eq!(got.len(), PROGRESS_QUEUE);
        assert_eq!(got.first(), Some(&(Phase::Accepted, None)));
        assert_eq!(
            got.last(),
            Some(&(Phase::Cancelled, Some(ErrorCode::Cancelled)))
        );
    }
}

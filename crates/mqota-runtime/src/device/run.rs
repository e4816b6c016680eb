//! The loop: [`run`] sets the device up, runs the trial if this boot is
//! one, then serves the broker and the engine until a reboot.

use embassy_time::{Duration, Instant, Timer};
use embedded_storage::nor_flash::{MultiwriteNorFlash, NorFlash};
use heapless::String;
use mqota_core::bootguard::{self, Verdict};
use mqota_core::engine::{Action, Actions, Engine, EngineConfig, Event, Layout};
use mqota_core::image;
use mqota_core::protocol::envelope::JobTrust;
use mqota_core::protocol::{
    truncated, ErrorCode, LastResult, LogLevel, Phase, Progress, Status, Topics, MAX_STATUS_JSON,
    OFFLINE, ONLINE,
};

use super::boot::RunningFirmware;
use super::command::{read_command, Incoming};
use super::download::download;
use super::uplink::{publish_progress, Uplink};
use super::{now_ms, DeviceConfig};
use crate::fieldlog::{self, FieldLog};
use crate::http::Downloader;
use crate::mqtt::{Message, MqttBuffers, MqttConfig, MqttSession, QoS, MQTT_RX_BUFFER};
use crate::net::Connector;
use crate::platform::{Link, Platform};
use crate::trust::TrustState;

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
    let session = MqttSession::new(net, &mut buffers, mqtt_cfg);
    let subs = topics.subscriptions();
    let sub_refs: [&str; 5] = core::array::from_fn(|i| subs[i].as_str());
    let mut up = Uplink::new(session, link, sub_refs, cfg.seed ^ now_ms() as u32);

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
        LogLevel::Info,
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
            LogLevel::Warn,
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

    if booted.boot.verdict == Verdict::Trial {
        dev.trial(
            &mut up,
            platform,
            flash,
            &mut engine,
            &booted,
            cfg.health_timeout,
        )
        .await;
    }

    // Broker first: a report must reach it, and a resumed download's events
    // too (the download side only keeps a session alive, it does not
    // subscribe or publish the online status).
    if (booted.boot.report.is_some() || booted.boot.resume) && !dev.up {
        dev.bring_up(&mut up, false).await;
    }
    if let Some(report) = &booted.boot.report {
        // Marked once published, so no later boot publishes it again.
        dev.report(&mut up.session, report).await;
        let _ = bootguard::mark_reported(flash, report);
    }
    if booted.boot.resume {
        if let Some(actions) = engine.resume(flash, now_ms()) {
            dev.apply(&mut up.session, actions, flash, &layout).await;
        }
    }

    let mut downloader = Downloader::new(net).with_io_timeout(cfg.stall_timeout);
    loop {
        dev.log.flush(flash, now_ms()).await;
        fieldlog::serve_deferred(&dev.log, &mut up.session, &topics, flash).await;
        if dev.reboot {
            info!("rebooting into the new image");
            dev.go_offline(&mut up.session).await;
            platform.reboot().await;
        }
        if let Some(from) = dev.fetch.take() {
            let actions =
                download(&mut dev, &mut up, &mut downloader, &mut engine, flash, from).await;
            dev.apply(&mut up.session, actions, flash, &layout).await;
            continue;
        }
        // Idle (or backing off before a retry): serve the broker.
        if !dev.up || !up.session.is_connected() || !up.link_is_connected() {
            dev.up = false;
            if !dev.bring_up(&mut up, false).await {
                continue;
            }
        }
        let wait = if engine.is_busy() { 200 } else { 1_000 };
        let until = Instant::now() + Duration::from_millis(wait);
        match up.session.poll(until).await {
            Ok(Some(msg)) if topics.is_logs_get(&msg.topic) => {
                fieldlog::serve_get(&dev.log, &mut up.session, &topics, &msg, flash).await;
            }
            Ok(Some(msg)) => {
                let actions = dev
                    .on_message(&mut up.session, &msg, &mut engine, flash)
                    .await;
                dev.apply(&mut up.session, actions, flash, &layout).await;
            }
            Ok(None) => {}
            Err(_) => dev.up = false,
        }
        let actions = engine.tick(flash, now_ms());
        dev.apply(&mut up.session, actions, flash, &layout).await;
    }
}

/// What the loop carries between steps.
pub(super) struct Device<'d> {
    /// Sequence numbers accepted and the secure_version floor.
    pub(super) trust: TrustState,
    /// The key commands must be signed with, if any.
    pub(super) job_trust: Option<JobTrust>,
    /// The field log.
    pub(super) log: FieldLog,
    /// The broker was reached since the last loss (a loss is logged once).
    connected_once: bool,
    pub(super) topics: &'d Topics,
    pub(super) status: &'d mut Status,
    /// A fetch the engine asked for.
    fetch: Option<u32>,
    /// The engine asked for a reboot.
    reboot: bool,
    /// Connected, subscribed, and the online status published.
    pub(super) up: bool,
    /// Copy progress to the shared `{prefix}/progress` too.
    pub(super) progress_copy: bool,
}

impl Device<'_> {
    /// Brings the link and the broker up, subscribes to the command topics
    /// and publishes the online status. With `once`, gives up after the
    /// first failed attempt to subscribe (the trial's health check has its
    /// own deadline around this); otherwise retries until it works.
    pub(super) async fn bring_up<C: Connector, L: Link>(
        &mut self,
        up: &mut Uplink<'_, '_, C, L>,
        trial: bool,
    ) -> bool {
        if core::mem::take(&mut self.connected_once) {
            let why = if up.link_is_connected() {
                "broker connection lost"
            } else {
                "WiFi link lost"
            };
            self.log.note(now_ms(), LogLevel::Warn, why);
        }
        loop {
            if up.maintain().await.is_err() {
                // Only configuration errors end up here; no retry helps.
                if trial {
                    return false;
                }
                Timer::after(Duration::from_secs(5)).await;
                continue;
            }
            if up.subscribe().await.is_ok() {
                self.up = true;
                self.connected_once = true;
                self.log.note(now_ms(), LogLevel::Info, "broker connected");
                self.publish_availability(&mut up.session, ONLINE).await;
                self.publish_status(&mut up.session).await;
                return true;
            }
            Timer::after(up.retry_delay()).await;
        }
    }

    pub(super) async fn publish<C: Connector>(
        &mut self,
        session: &mut MqttSession<'_, C>,
        p: Progress,
    ) {
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
    pub(super) async fn go_offline<C: Connector>(&mut self, session: &mut MqttSession<'_, C>) {
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

    pub(super) async fn report<C: Connector>(
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

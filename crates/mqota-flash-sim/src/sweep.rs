//! The power-cut sweep, after MCUboot's simulator (`run_perm_with_fails`):
//! count the flash operations of a whole update, then for every operation
//! cut the power there — once before it starts and once in its middle — boot
//! again through the bootloader model, and check that a valid image boots,
//! that it is the old or the new one and never anything else, and that the
//! update can be completed afterwards.
//!
//! The device here is the core itself, driven synchronously: the same
//! [`Engine`], [`bootguard`] and journal that run on the chip and in the
//! virtual device, with the network replaced by handing the engine the image
//! bytes. One *boot cycle* is: the bootloader model picks a slot; the boot
//! guard runs; a trial is judged (healthy images confirm, `+unhealthy` ones
//! fail their health check); an interrupted download resumes; otherwise the
//! operator's command (re)starts the update.

use crate::bootloader::{BootConfig, Bootloader};
use crate::nor::SimFlash;
use embedded_storage::nor_flash::{ErrorType, MultiwriteNorFlash, NorFlash, ReadNorFlash};
use mqota_core::bootguard::{self, Verdict};
use mqota_core::engine::{Action, Engine, EngineConfig, Event, Response};
use mqota_core::image::{Chip, ImageBuilder};
use mqota_core::journal::RollbackReason;
use mqota_core::layout::Layout;
use mqota_core::otadata::{OtaState, Otadata};
use mqota_core::partition::{PartitionTable, DEFAULT_4MB_CSV, TABLE_OFFSET};
use mqota_core::protocol::{Command, Job, Phase};

/// What the sweep updates to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// 1.0.0 → 1.1.0, a healthy image: the update must end confirmed.
    Update,
    /// 1.0.0 → 1.1.0+unhealthy: the trial fails and the device must end on
    /// 1.0.0 with the rollback reported.
    FailedTrial,
}

/// Settings of a sweep.
#[derive(Debug, Clone, Copy)]
pub struct SweepConfig {
    /// Size of the new image in bytes.
    pub image_size: u32,
    /// Which bootloader build boots the device.
    pub bootloader: BootConfig,
    /// What is being installed.
    pub scenario: Scenario,
    /// Bytes handed to the engine per body chunk.
    pub chunk: usize,
}

impl Default for SweepConfig {
    fn default() -> Self {
        Self {
            image_size: 256 * 1024,
            bootloader: BootConfig::Stock,
            scenario: Scenario::Update,
            chunk: 1460,
        }
    }
}

/// The result of a sweep; every count but `cut_points`, `resumed` and
/// `commands_repeated` must be zero.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    /// Which scenario ran.
    pub scenario: &'static str,
    /// Which bootloader build.
    pub bootloader: &'static str,
    /// Size of the new image.
    pub image_size: u32,
    /// Mutating flash operations of a clean run (bootloader, engine, guard).
    pub operations: u64,
    /// Runs with a cut (two per operation: before it and in its middle).
    pub cut_points: u64,
    /// Runs where nothing bootable was left.
    pub bricked: u64,
    /// Runs where an image other than the old or the new one booted.
    pub wrong_image: u64,
    /// Runs that did not reach the scenario's end state within the boot budget.
    pub incomplete: u64,
    /// Runs where an interrupted download or activation was resumed after
    /// the reboot, without the operator.
    pub resumed: u64,
    /// Runs where the operator had to send the command again.
    pub commands_repeated: u64,
    /// The first failing cut points, for debugging.
    pub failures: Vec<String>,
}

/// Boot cycles a run may take before it counts as incomplete.
const MAX_BOOTS: usize = 24;
const OLD: &str = "1.0.0";

/// Flash wrapper that records the byte length of every mutating operation,
/// so cuts can be placed in the middle of each.
struct Recording<'a> {
    inner: &'a mut SimFlash,
    ops: Vec<u64>,
}

impl ErrorType for Recording<'_> {
    type Error = crate::nor::SimError;
}

impl ReadNorFlash for Recording<'_> {
    const READ_SIZE: usize = <SimFlash as ReadNorFlash>::READ_SIZE;
    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        self.inner.read(offset, bytes)
    }
    fn capacity(&self) -> usize {
        self.inner.capacity()
    }
}

impl MultiwriteNorFlash for Recording<'_> {}

impl NorFlash for Recording<'_> {
    const WRITE_SIZE: usize = <SimFlash as NorFlash>::WRITE_SIZE;
    const ERASE_SIZE: usize = <SimFlash as NorFlash>::ERASE_SIZE;
    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
        self.ops.push(bytes.len() as u64);
        self.inner.write(offset, bytes)
    }
    fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
        self.ops.push(u64::from(to - from));
        self.inner.erase(from, to)
    }
}

/// A device with 1.0.0 in `ota_0`, blank otadata, and the image to install.
struct Fixture {
    flash: SimFlash,
    new_version: String,
    new_image: Vec<u8>,
}

fn fixture(cfg: &SweepConfig) -> Fixture {
    let mut flash = SimFlash::new(4 * 1024 * 1024);
    let table = PartitionTable::from_csv(DEFAULT_4MB_CSV).expect("default table parses");
    flash
        .write(TABLE_OFFSET, &table.to_bytes())
        .expect("fresh flash");
    let old = build(OLD, 128 * 1024);
    let slot0 = table.ota_slots().next().expect("ota_0").offset;
    flash
        .erase(slot0, slot0 + (old.len() as u32).div_ceil(4096) * 4096)
        .expect("fresh flash");
    flash.write(slot0, &old).expect("fresh flash");
    let new_version = match cfg.scenario {
        Scenario::Update => "1.1.0".to_string(),
        Scenario::FailedTrial => "1.1.0+unhealthy".to_string(),
    };
    let new_image = build(&new_version, cfg.image_size);
    Fixture {
        flash,
        new_version,
        new_image,
    }
}

fn build(version: &str, size: u32) -> Vec<u8> {
    let mut image = ImageBuilder::new(Chip::Esp32c3)
        .version(version)
        .project("mqota-sweep")
        .size(size)
        .build()
        .expect("sweep image builds");
    image.resize(image.len().div_ceil(4) * 4, 0xFF);
    image
}

#[derive(Debug, Default)]
struct RunLog {
    resumed: bool,
    commands: u32,
}

#[derive(Debug, PartialEq, Eq)]
enum RunEnd {
    Completed,
    Bricked,
    WrongImage(String),
    Incomplete(String),
}

/// One boot cycle's result.
enum Cycle {
    Reboot,
    /// Idle on the given version; `confirmed` when otadata says VALID.
    Idle,
}

/// Runs the update to its end state, rebooting after every power cut.
fn run<F>(
    flash: &mut F,
    powered: impl Fn(&F) -> bool,
    power_on: impl Fn(&mut F),
    cfg: &SweepConfig,
    fx: &Fixture,
    log: &mut RunLog,
) -> RunEnd
where
    F: MultiwriteNorFlash,
    F::Error: core::fmt::Debug,
{
    let bootloader = Bootloader::new(cfg.bootloader).for_chip(Chip::Esp32c3);
    let mut reported_rollback = false;
    for _ in 0..MAX_BOOTS {
        if !powered(flash) {
            power_on(flash);
        }
        let outcome = match bootloader.boot(flash) {
            Ok(o) => o,
            Err(_) => continue,
        };
        let (Some(slot), Some(image)) = (outcome.slot, outcome.image.as_ref()) else {
            return RunEnd::Bricked;
        };
        let version = image.app.version.as_str().to_string();
        if std::env::var_os("MQOTA_SWEEP_DEBUG").is_some() {
            eprintln!(
                "boot: slot {slot} {version} writes {:?}",
                outcome.otadata_writes
            );
        }
        if version != OLD && version != fx.new_version {
            return RunEnd::WrongImage(version);
        }
        let table = PartitionTable::read_from(flash, TABLE_OFFSET).expect("table intact");
        let layout = Layout::from_table(&table, slot).expect("two slots");
        match cycle(
            flash,
            &layout,
            &version,
            cfg,
            fx,
            log,
            &mut reported_rollback,
        ) {
            None => continue,
            Some(Cycle::Reboot) => continue,
            Some(Cycle::Idle) => {}
        }
        if !powered(flash) {
            continue;
        }
        let ota = match Otadata::read(flash, layout.otadata) {
            Ok(o) => o,
            Err(_) => continue,
        };
        let confirmed = ota
            .active_entry()
            .is_some_and(|e| e.slot(2) == Some(slot) && e.state() == OtaState::Valid);
        let done = match cfg.scenario {
            Scenario::Update => version == fx.new_version && confirmed,
            Scenario::FailedTrial => version == OLD && reported_rollback,
        };
        if done {
            return RunEnd::Completed;
        }
        // Idle and not done: the next cycle sends the command (again).
    }
    RunEnd::Incomplete(format!("after {MAX_BOOTS} boots"))
}

/// One boot of the firmware. `None` when the power went.
#[allow(clippy::too_many_arguments)]
fn cycle<F: MultiwriteNorFlash>(
    flash: &mut F,
    layout: &Layout,
    version: &str,
    cfg: &SweepConfig,
    fx: &Fixture,
    log: &mut RunLog,
    reported_rollback: &mut bool,
) -> Option<Cycle> {
    let boot = bootguard::on_boot(flash, layout).ok()?;
    if std::env::var_os("MQOTA_SWEEP_DEBUG").is_some() {
        eprintln!("  guard: {boot:?}");
    }
    match boot.verdict {
        Verdict::Reboot => return Some(Cycle::Reboot),
        Verdict::Trial => {
            if version.ends_with("+unhealthy") {
                bootguard::reject(flash, layout, RollbackReason::HealthCheckFailed).ok()?;
                return Some(Cycle::Reboot);
            }
            let report = bootguard::confirm(flash, layout).ok()?;
            bootguard::mark_reported(flash, &report).ok()?;
        }
        Verdict::Normal => {}
    }
    if let Some(report) = &boot.report {
        if report.phase == Phase::RolledBack {
            *reported_rollback = true;
        }
        bootguard::mark_reported(flash, report).ok()?;
    }
    let mut engine = Engine::new(
        EngineConfig::new("sweep", Chip::Esp32c3, version),
        layout.clone(),
    );
    let now = 0;
    let first = if boot.resume {
        let actions = engine.resume(flash, now);
        if actions.is_some() {
            log.resumed = true;
        }
        actions
    } else {
        None
    };
    let actions = match first {
        Some(a) => a,
        // The operator repeats the command while the device is idle on the
        // old image. A cut during a trial is indistinguishable from a crash, so
        // it is rolled back (`boot_failed`) and needs the command again; in the
        // failed-trial scenario the rollback is the expected end.
        None if version == OLD && (cfg.scenario == Scenario::Update || !*reported_rollback) => {
            log.commands += 1;
            let job = Job {
                url: "http://sweep/fw.bin".try_into().expect("short url"),
                version: Some(fx.new_version.as_str().try_into().expect("short version")),
                sha256: None,
                size: Some(fx.new_image.len() as u32),
                job: Some("sweep".try_into().expect("short id")),
                timeout_s: None,
                force: false,
                allow_downgrade: false,
                allow_other_project: false,
            };
            engine.handle(flash, now, Event::Command(Command::Start(job)))
        }
        None => return Some(Cycle::Idle),
    };
    let mut pending = actions.into_iter().collect::<Vec<_>>();
    while let Some(action) = (!pending.is_empty()).then(|| pending.remove(0)) {
        match action {
            Action::Fetch { from } => {
                let from = from as usize;
                let body = &fx.new_image[from..];
                let head = Response {
                    status: if from == 0 { 200 } else { 206 },
                    content_length: Some(body.len() as u32),
                    range_start: (from > 0).then_some(from as u32),
                };
                pending.extend(engine.handle(flash, now, Event::Response(head)));
                for chunk in body.chunks(cfg.chunk) {
                    if !engine.is_busy() {
                        break;
                    }
                    pending.extend(engine.handle(flash, now, Event::Body(chunk)));
                }
                if engine.is_busy() {
                    pending.extend(engine.handle(flash, now, Event::BodyEnd));
                }
            }
            Action::Reboot => return Some(Cycle::Reboot),
            Action::Publish(p) if p.phase == Phase::Failed => {
                // A flash error from a cut surfaces as a failed job; the
                // device is about to lose power anyway.
                return None;
            }
            Action::Publish(_) | Action::StopFetch | Action::Rollback { .. } => {}
        }
    }
    Some(Cycle::Idle)
}

fn sim_powered(f: &SimFlash) -> bool {
    f.is_powered()
}

fn sim_power_on(f: &mut SimFlash) {
    f.power_on()
}

/// Runs the sweep and returns its summary.
pub fn sweep(cfg: &SweepConfig) -> Summary {
    let fx = fixture(cfg);
    let mut summary = Summary {
        scenario: match cfg.scenario {
            Scenario::Update => "update",
            Scenario::FailedTrial => "failed_trial",
        },
        bootloader: cfg.bootloader.name(),
        image_size: cfg.image_size,
        ..Summary::default()
    };

    // The clean run: how many operations, and how long each is.
    let mut clean = fx.flash.snapshot();
    let mut rec = Recording {
        inner: &mut clean,
        ops: Vec::new(),
    };
    let mut log = RunLog::default();
    let end = run(
        &mut rec,
        |r| r.inner.is_powered(),
        |r| r.inner.power_on(),
        cfg,
        &fx,
        &mut log,
    );
    assert_eq!(end, RunEnd::Completed, "the clean run must complete");
    let ops = rec.ops;
    summary.operations = ops.len() as u64;

    let mut bytes_before = 0u64;
    for (i, len) in ops.iter().enumerate() {
        for mid in [false, true] {
            let mut flash = fx.flash.snapshot();
            if mid {
                flash.cut_power_after_bytes(bytes_before + len / 2);
            } else {
                flash.cut_power_after_ops(i as u64);
            }
            let mut log = RunLog::default();
            let end = run(&mut flash, sim_powered, sim_power_on, cfg, &fx, &mut log);
            summary.cut_points += 1;
            let what = if mid { "in the middle of" } else { "before" };
            match end {
                RunEnd::Completed => {}
                RunEnd::Bricked => summary.bricked += 1,
                RunEnd::WrongImage(_) => summary.wrong_image += 1,
                RunEnd::Incomplete(_) => summary.incomplete += 1,
            }
            if end != RunEnd::Completed && summary.failures.len() < 10 {
                summary.failures.push(format!("cut {what} op {i}: {end:?}"));
            }
            summary.resumed += u64::from(log.resumed);
            summary.commands_repeated += u64::from(log.commands > 1);
        }
        bytes_before += len;
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(cfg: SweepConfig) {
        let s = sweep(&cfg);
        assert_eq!(s.cut_points, 2 * s.operations, "{s:?}");
        assert!(s.operations > 40, "{s:?}");
        assert_eq!(
            (s.bricked, s.wrong_image, s.incomplete),
            (0, 0, 0),
            "{:#?}",
            s
        );
    }

    #[test]
    fn every_cut_during_an_update_leaves_a_bootable_device_that_completes_it_stock() {
        check(SweepConfig {
            image_size: 64 * 1024,
            ..SweepConfig::default()
        });
    }

    #[test]
    fn every_cut_during_an_update_leaves_a_bootable_device_that_completes_it_rollback() {
        check(SweepConfig {
            image_size: 64 * 1024,
            bootloader: BootConfig::Rollback,
            ..SweepConfig::default()
        });
    }

    #[test]
    fn every_cut_during_a_failed_trial_ends_on_the_old_image_stock() {
        check(SweepConfig {
            image_size: 64 * 1024,
            scenario: Scenario::FailedTrial,
            ..SweepConfig::default()
        });
    }

    #[test]
    fn every_cut_during_a_failed_trial_ends_on_the_old_image_rollback() {
        check(SweepConfig {
            image_size: 64 * 1024,
            scenario: Scenario::FailedTrial,
            bootloader: BootConfig::Rollback,
            ..SweepConfig::default()
        });
    }

    #[test]
    #[ignore = "debugging aid: MQOTA_SWEEP_DEBUG=1 MQOTA_SWEEP_CUT=41 cargo test -- --ignored one_cut"]
    fn one_cut() {
        let cfg = SweepConfig {
            image_size: 64 * 1024,
            ..SweepConfig::default()
        };
        let fx = fixture(&cfg);
        let op: u64 = std::env::var("MQOTA_SWEEP_CUT").unwrap().parse().unwrap();
        let mut flash = fx.flash.snapshot();
        flash.cut_power_after_ops(op);
        let mut log = RunLog::default();
        let end = run(&mut flash, sim_powered, sim_power_on, &cfg, &fx, &mut log);
        eprintln!("{end:?} {log:?}");
    }

    #[test]
    fn downloads_cut_by_power_loss_resume_from_the_journal() {
        let s = sweep(&SweepConfig {
            image_size: 64 * 1024,
            ..SweepConfig::default()
        });
        assert!(s.resumed > 10, "{s:?}");
    }
}

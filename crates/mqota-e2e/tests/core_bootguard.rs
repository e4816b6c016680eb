//! The boot guard, transition by transition, on flash states made by the real
//! engine and booted through the bootloader model (stock and rollback builds).
//! Nothing here sleeps: time only matters to the engine, which gets the rig's
//! fake clock.

#[path = "../../mqota-core/tests/common/mod.rs"]
mod common;

use common::*;
use embedded_storage::nor_flash::NorFlash;
use mqota_core::bootguard::{self, Boot, GuardError, Verdict};
use mqota_core::engine::{Action, Engine, EngineConfig};
use mqota_core::image::Chip;
use mqota_core::journal::{Flag, RollbackReason};
use mqota_core::layout::Layout;
use mqota_core::otadata::{self, OtaState, Otadata, OTADATA_SIZE};
use mqota_core::protocol::{Command, ErrorCode, Job, LastResult, Phase};
use mqota_flash_sim::bootloader::{OtadataWrite, WriteReason};
use mqota_flash_sim::{BootConfig, Bootloader, SimFlash};

const URL: &str = "http://fw.example/fw.bin";
const OLD: &str = "1.0.0";
const NEW: &str = "1.1.0";
const BOTH: [BootConfig; 2] = [BootConfig::Stock, BootConfig::Rollback];

/// A device that boots through the bootloader model. It has booted 1.0.0 once
/// before any test step, as a real device does before it can get a command.
struct Dev {
    rig: Rig<SimFlash>,
    bl: Bootloader,
    /// The slot and version the last boot started.
    slot: usize,
    version: String,
    /// What the bootloader wrote to otadata during the last boot.
    boot_writes: Vec<OtadataWrite>,
}

impl Dev {
    fn new(config: BootConfig) -> Self {
        let mut d = Dev {
            rig: device_on(SimFlash::new(FLASH_SIZE)),
            bl: Bootloader::new(config).for_chip(Chip::Esp32c3),
            slot: 0,
            version: String::new(),
            boot_writes: Vec::new(),
        };
        d.power_cycle();
        assert_eq!((d.slot, d.version.as_str()), (0, OLD));
        d
    }

    /// Power off and on: the bootloader picks and starts an image, and the
    /// firmware gets a fresh engine for the slot it runs from.
    fn power_cycle(&mut self) {
        self.rig.flash.power_on();
        let outcome = self.bl.boot(&mut self.rig.flash).expect("boot completes");
        let slot = outcome.slot.expect("an OTA slot boots, never nothing");
        let version = outcome
            .image
            .expect("image")
            .app
            .version
            .as_str()
            .to_string();
        self.slot = slot;
        self.version = version;
        self.boot_writes = outcome.otadata_writes;
        let mut layout = self.rig.layout.clone();
        layout.running = slot;
        let mut cfg = EngineConfig::new("dev-1", Chip::Esp32c3, &self.version);
        cfg.progress_interval_ms = 0;
        self.rig.engine = Engine::new(cfg, layout.clone());
        self.rig.layout = layout;
        self.rig.published.clear();
        self.rig.fetches.clear();
        self.rig.rebooted = false;
    }

    fn layout(&self) -> Layout {
        self.rig.layout.clone()
    }

    fn otadata_bytes(&self) -> Vec<u8> {
        let at = self.rig.layout.otadata as usize;
        self.rig.flash.data()[at..at + OTADATA_SIZE as usize].to_vec()
    }

    fn otadata(&mut self) -> Otadata {
        Otadata::read(&mut self.rig.flash, self.rig.layout.otadata).unwrap()
    }

    /// The otadata state of the running slot, `None` if no valid entry selects it.
    fn running_state(&mut self) -> Option<OtaState> {
        let slot = self.slot;
        self.otadata()
            .active_entry()
            .filter(|e| e.slot(2) == Some(slot))
            .map(|e| e.state())
    }

    /// Runs the guard and returns what it found and whether it wrote otadata.
    fn guard(&mut self) -> (Boot, bool) {
        let before = self.otadata_bytes();
        let layout = self.layout();
        let boot = bootguard::on_boot(&mut self.rig.flash, &layout).expect("guard runs");
        let wrote = self.otadata_bytes() != before;
        (boot, wrote)
    }

    /// Downloads `version` as job `id` into the update slot; the engine asks
    /// for a reboot. Returns the image.
    fn download(&mut self, version: &str, id: &str) -> Vec<u8> {
        let img = image(Chip::Esp32c3, version, 120_000);
        self.rig.start(job_for(version, id));
        self.rig.serve(&img);
        assert!(self.rig.rebooted, "{:?}", self.rig.published);
        img
    }

    fn journal_has(&mut self, slot: usize, flag: Flag) -> bool {
        self.rig.layout.slots[slot]
            .journal()
            .has(&mut self.rig.flash, flag)
            .unwrap()
    }

    /// Flash operations a closure performs on a copy of the flash, so a cut
    /// can be placed at the n-th of them on the real one.
    fn ops_of(&self, f: impl FnOnce(&mut SimFlash, &Layout)) -> u64 {
        let mut copy = self.rig.flash.clone();
        copy.reset_stats();
        f(&mut copy, &self.rig.layout);
        copy.stats().mutating_ops()
    }
}

fn job_for(version: &str, id: &str) -> Job {
    let mut j = job(URL);
    j.version = Some(version.try_into().unwrap());
    j.job = Some(id.try_into().unwrap());
    j
}

fn last(job: &str, result: Phase, error: Option<ErrorCode>) -> Option<LastResult> {
    Some(LastResult {
        job: Some(job.try_into().unwrap()),
        result,
        error,
    })
}

/// What the firmware does when the guard says it is on trial.
#[derive(Debug, Clone, Copy)]
enum TrialEnd {
    /// Health check passes: confirm and publish.
    Confirm,
    /// Health check fails: reject and reboot.
    HealthCheckFails,
    /// The trial boot dies before it is judged (crash, watchdog, power loss).
    Dies,
}

/// An outcome as the runtime would publish it.
type Published = (Option<String>, Phase, Option<ErrorCode>);

/// Boots until the firmware is idle (a `Normal` verdict), playing `end` on
/// the first trial. Publishes and marks every report. Returns what was
/// published and how many times the guard itself demanded a reboot.
fn settle(d: &mut Dev, end: TrialEnd) -> (Vec<Published>, usize, Boot) {
    let mut published = Vec::new();
    let mut guard_reboots = 0;
    let mut trials = 0;
    for _ in 0..8 {
        d.power_cycle();
        let (boot, _) = d.guard();
        if let Some(r) = &boot.report {
            published.push((r.job.as_deref().map(String::from), r.phase, r.error));
            bootguard::mark_reported(&mut d.rig.flash, r).unwrap();
        }
        match boot.verdict {
            Verdict::Normal => return (published, guard_reboots, boot),
            Verdict::Reboot => guard_reboots += 1,
            Verdict::Trial => {
                trials += 1;
                assert_eq!(trials, 1, "an image gets one trial");
                let layout = d.layout();
                match end {
                    TrialEnd::Confirm => {
                        let r = bootguard::confirm(&mut d.rig.flash, &layout).unwrap();
                        published.push((r.job.as_deref().map(String::from), r.phase, r.error));
                        bootguard::mark_reported(&mut d.rig.flash, &r).unwrap();
                        // Idle on the confirmed image, like the runtime.
                        return (published, guard_reboots, boot);
                    }
                    TrialEnd::HealthCheckFails => bootguard::reject(
                        &mut d.rig.flash,
                        &layout,
                        RollbackReason::HealthCheckFailed,
                    )
                    .unwrap(),
                    TrialEnd::Dies => {}
                }
            }
        }
    }
    panic!("the device never settled");
}

struct TrialCase {
    end: TrialEnd,
    bootloader: BootConfig,
    /// Version idle at the end.
    version: &'static str,
    /// Outcomes published, in order.
    published: Vec<Published>,
    /// Reboots the guard asked for (the rollback bootloader needs none for
    /// a dead trial: it aborts the image itself).
    guard_reboots: usize,
    /// `last` in the retained status once idle, after one more boot.
    last: (Phase, Option<ErrorCode>),
}

fn job1(phase: Phase, error: Option<ErrorCode>) -> Published {
    (Some("job-7".into()), phase, error)
}

#[test]
fn every_trial_ends_as_the_table_says_with_both_bootloaders() {
    use BootConfig::*;
    use TrialEnd::*;
    let hc = Some(ErrorCode::HealthCheckFailed);
    let bf = Some(ErrorCode::BootFailed);
    let cases = [
        TrialCase {
            end: Confirm,
            bootloader: Stock,
            version: NEW,
            published: vec![job1(Phase::Done, None)],
            guard_reboots: 0,
            last: (Phase::Done, None),
        },
        TrialCase {
            end: Confirm,
            bootloader: Rollback,
            version: NEW,
            published: vec![job1(Phase::Done, None)],
            guard_reboots: 0,
            last: (Phase::Done, None),
        },
        TrialCase {
            end: HealthCheckFails,
            bootloader: Stock,
            version: OLD,
            published: vec![job1(Phase::RolledBack, hc)],
            guard_reboots: 0,
            last: (Phase::RolledBack, hc),
        },
        TrialCase {
            end: HealthCheckFails,
            bootloader: Rollback,
            version: OLD,
            published: vec![job1(Phase::RolledBack, hc)],
            guard_reboots: 0,
            last: (Phase::RolledBack, hc),
        },
        TrialCase {
            end: Dies,
            bootloader: Stock,
            version: OLD,
            published: vec![job1(Phase::RolledBack, bf)],
            guard_reboots: 1,
            last: (Phase::RolledBack, bf),
        },
        TrialCase {
            end: Dies,
            bootloader: Rollback,
            version: OLD,
            published: vec![job1(Phase::RolledBack, bf)],
            guard_reboots: 0,
            last: (Phase::RolledBack, bf),
        },
    ];
    for case in cases {
        let name = format!("{:?} with {:?}", case.end, case.bootloader);
        let mut d = Dev::new(case.bootloader);
        d.download(NEW, "job-7");
        let (published, guard_reboots, _) = settle(&mut d, case.end);
        assert_eq!(d.version, case.version, "{name}");
        assert_eq!(published, case.published, "{name}");
        assert_eq!(guard_reboots, case.guard_reboots, "{name}");
        assert_eq!(d.running_state(), Some(OtaState::Valid), "{name}");

        // The guard never rewrites the active entry, so a confirmed trial
        // leaves its old PENDING_VERIFY entry behind in the other sector; the
        // rollback bootloader aborts it at the next boot, once, which changes
        // nothing about what boots.
        d.power_cycle();
        assert_eq!(d.version, case.version, "{name}");
        assert!(
            d.boot_writes
                .iter()
                .all(|w| w.reason == WriteReason::PendingVerifyAborted
                    && case.bootloader == Rollback
                    && matches!(case.end, Confirm)),
            "{name}: {:?}",
            d.boot_writes
        );
        assert_eq!(d.running_state(), Some(OtaState::Valid), "{name}");

        // Settled means settled: another boot reports nothing again, keeps
        // the same `last`, and neither the bootloader nor the guard writes
        // otadata (the two do not fight over it).
        d.power_cycle();
        assert_eq!(d.version, case.version, "{name}");
        assert!(d.boot_writes.is_empty(), "{name}: {:?}", d.boot_writes);
        let (boot, wrote) = d.guard();
        assert_eq!(boot.verdict, Verdict::Normal, "{name}");
        assert!(!wrote, "{name}: guard rewrote otadata on a settled device");
        assert_eq!(boot.report, None, "{name}: reported twice");
        assert_eq!(boot.last, last("job-7", case.last.0, case.last.1), "{name}");
        assert_eq!(boot.state, OtaState::Valid, "{name}");
        assert!(!boot.resume, "{name}");
    }
}

#[test]
fn the_first_trial_boot_is_a_trial_and_marks_trial_started() {
    for config in BOTH {
        let mut d = Dev::new(config);
        d.download(NEW, "job-7");
        d.power_cycle();
        assert_eq!((d.slot, d.version.as_str()), (1, NEW));
        assert!(!d.journal_has(1, Flag::TrialStarted));
        let (boot, wrote) = d.guard();
        assert_eq!(boot.verdict, Verdict::Trial, "{config:?}");
        assert_eq!(boot.trial_job.as_deref(), Some("job-7"));
        assert_eq!(boot.report, None);
        assert!(!wrote, "a trial starts without touching otadata");
        assert!(d.journal_has(1, Flag::TrialStarted));
        let want = match config {
            BootConfig::Stock => OtaState::New,
            BootConfig::Rollback => OtaState::PendingVerify,
        };
        assert_eq!(boot.state, want, "{config:?}");
    }
}

#[test]
fn a_confirmation_whose_report_was_not_published_is_reported_at_the_next_boot_once() {
    for config in BOTH {
        let mut d = Dev::new(config);
        d.download(NEW, "job-7");
        d.power_cycle();
        assert_eq!(d.guard().0.verdict, Verdict::Trial);
        let layout = d.layout();
        let report = bootguard::confirm(&mut d.rig.flash, &layout).unwrap();
        assert_eq!(report.phase, Phase::Done);
        assert_eq!(report.job.as_deref(), Some("job-7"));
        // The broker went away before the report went out: not marked.
        d.power_cycle();
        assert_eq!(d.version, NEW);
        let (boot, _) = d.guard();
        assert_eq!(boot.verdict, Verdict::Normal);
        let r = boot.report.expect("the done report is still due");
        assert_eq!(
            (r.job.as_deref(), r.phase, r.error),
            (Some("job-7"), Phase::Done, None)
        );
        bootguard::mark_reported(&mut d.rig.flash, &r).unwrap();
        d.power_cycle();
        let (boot, _) = d.guard();
        assert_eq!(boot.report, None);
        assert_eq!(boot.last, last("job-7", Phase::Done, None));
    }
}

#[test]
fn a_health_check_failure_boots_the_previous_slot_and_reports_once_with_the_job_id() {
    for config in BOTH {
        let mut d = Dev::new(config);
        d.download(NEW, "job-7");
        d.power_cycle();
        assert_eq!(d.guard().0.verdict, Verdict::Trial);
        let layout = d.layout();
        bootguard::reject(&mut d.rig.flash, &layout, RollbackReason::HealthCheckFailed).unwrap();
        d.power_cycle();
        assert_eq!((d.slot, d.version.as_str()), (0, OLD), "{config:?}");
        let (boot, wrote) = d.guard();
        assert!(!wrote);
        assert_eq!(boot.verdict, Verdict::Normal);
        let r = boot.report.clone().expect("rollback reported");
        assert_eq!(
            (r.job.as_deref(), r.phase, r.error),
            (
                Some("job-7"),
                Phase::RolledBack,
                Some(ErrorCode::HealthCheckFailed)
            )
        );
        bootguard::mark_reported(&mut d.rig.flash, &r).unwrap();
        d.power_cycle();
        let (again, _) = d.guard();
        assert_eq!(again.report, None, "reported once");
        assert_eq!(
            again.last,
            last(
                "job-7",
                Phase::RolledBack,
                Some(ErrorCode::HealthCheckFailed)
            )
        );
    }
}

#[test]
fn a_dead_trial_with_the_rollback_bootloader_is_only_reported_by_the_guard() {
    let mut d = Dev::new(BootConfig::Rollback);
    d.download(NEW, "job-7");
    d.power_cycle();
    assert_eq!(d.guard().0.verdict, Verdict::Trial);
    // Dies. The bootloader aborts the PENDING_VERIFY entry on its own.
    d.power_cycle();
    assert_eq!((d.slot, d.version.as_str()), (0, OLD));
    assert!(d
        .boot_writes
        .iter()
        .any(|w| w.value.state() == OtaState::Aborted));
    let (boot, wrote) = d.guard();
    assert!(
        !wrote,
        "the guard must not rewrite what the bootloader settled"
    );
    assert_eq!(boot.verdict, Verdict::Normal);
    assert_eq!(
        boot.report.map(|r| (r.phase, r.error)),
        Some((Phase::RolledBack, Some(ErrorCode::BootFailed)))
    );
    assert_eq!(boot.state, OtaState::Valid);
}

#[test]
fn a_dead_trial_with_the_stock_bootloader_is_rolled_back_by_the_guard() {
    let mut d = Dev::new(BootConfig::Stock);
    d.download(NEW, "job-7");
    d.power_cycle();
    assert_eq!(d.guard().0.verdict, Verdict::Trial);
    // Dies; the stock bootloader boots the NEW entry again.
    d.power_cycle();
    assert_eq!((d.slot, d.version.as_str()), (1, NEW));
    assert!(d.boot_writes.is_empty());
    let (boot, wrote) = d.guard();
    assert_eq!(boot.verdict, Verdict::Reboot);
    assert!(wrote);
    assert_eq!(
        boot.report, None,
        "reported from the old image, not this one"
    );
    assert_eq!(
        d.rig.layout.slots[1]
            .journal()
            .rollback_reason(&mut d.rig.flash)
            .unwrap(),
        Some(RollbackReason::BootFailed)
    );
    d.power_cycle();
    assert_eq!((d.slot, d.version.as_str()), (0, OLD));
}

/// Cuts the power after `ops` flash operations of `step`, then settles.
fn cut_during(
    d: &mut Dev,
    ops: u64,
    step: impl FnOnce(&mut SimFlash, &Layout),
) -> (Vec<Published>, Boot) {
    d.rig.flash.cut_power_after_ops(ops);
    let layout = d.layout();
    step(&mut d.rig.flash, &layout);
    assert!(!d.rig.flash.is_powered(), "the cut happened");
    let (published, _, boot) = settle(d, TrialEnd::Confirm);
    (published, boot)
}

#[test]
fn a_confirmation_cut_between_journal_and_otadata_is_finished_at_the_next_boot() {
    for config in BOTH {
        let mut d = Dev::new(config);
        d.download(NEW, "job-7");
        d.power_cycle();
        assert_eq!(d.guard().0.verdict, Verdict::Trial);
        let total = d.ops_of(|f, l| {
            bootguard::confirm(f, l).unwrap();
        });
        assert_eq!(total, 3, "journal mark, otadata erase, otadata program");
        // After the journal mark; and after the otadata sector's erase.
        for ops in [1, 2] {
            let mut d2 = Dev {
                rig: rig_on(d.rig.flash.clone(), d.layout()),
                bl: d.bl,
                slot: d.slot,
                version: d.version.clone(),
                boot_writes: Vec::new(),
            };
            let (published, boot) = cut_during(&mut d2, ops, |f, l| {
                let _ = bootguard::confirm(f, l);
            });
            let name = format!("{config:?}, cut after {ops}");
            assert_eq!(d2.version, NEW, "{name}");
            assert_eq!(d2.running_state(), Some(OtaState::Valid), "{name}");
            assert_eq!(published, vec![job1(Phase::Done, None)], "{name}");
            assert_eq!(boot.last, last("job-7", Phase::Done, None), "{name}");
        }
    }
}

#[test]
fn an_activation_cut_between_journal_and_otadata_is_finished_at_the_next_boot() {
    for config in BOTH {
        for from_end in [2u64, 1] {
            let mut d = Dev::new(config);
            let img = image(Chip::Esp32c3, NEW, 120_000);
            d.rig.start(job_for(NEW, "job-7"));
            d.rig.respond(200, Some(img.len() as u32), None);
            d.rig.body(&img);
            assert!(d.rig.engine.is_busy());
            // BodyEnd's operations end with: journal `activated`, otadata
            // erase, otadata program. Cut before the last `from_end` of them.
            // The engine is not Clone; replay the download on a twin instead.
            let mut twin = Dev::new(config);
            twin.rig.start(job_for(NEW, "job-7"));
            twin.rig.respond(200, Some(img.len() as u32), None);
            twin.rig.body(&img);
            twin.rig.flash.reset_stats();
            twin.rig.event(mqota_core::engine::Event::BodyEnd);
            assert!(twin.rig.rebooted);
            let total = twin.rig.flash.stats().mutating_ops();

            d.rig.flash.cut_power_after_ops(total - from_end);
            d.rig.event(mqota_core::engine::Event::BodyEnd);
            assert!(!d.rig.flash.is_powered());

            d.power_cycle();
            assert!(d.journal_has(1, Flag::Activated));
            let name = format!("{config:?}, {from_end} ops short");
            assert_eq!(d.version, OLD, "{name}: otadata was not written yet");
            let (boot, wrote) = d.guard();
            assert_eq!(boot.verdict, Verdict::Reboot, "{name}");
            assert!(wrote, "{name}");
            let (published, _, _) = settle(&mut d, TrialEnd::Confirm);
            assert_eq!(d.version, NEW, "{name}");
            assert_eq!(published, vec![job1(Phase::Done, None)], "{name}");
        }
    }
}

#[test]
fn a_download_cut_by_a_reboot_sets_resume_and_the_engine_resumes_from_the_journal() {
    for config in BOTH {
        let mut d = Dev::new(config);
        let img = image(Chip::Esp32c3, NEW, 120_000);
        d.rig.start(job_for(NEW, "job-7"));
        d.rig.respond(200, Some(img.len() as u32), None);
        d.rig.body(&img[..50_000]);
        d.power_cycle();
        assert_eq!(d.version, OLD);
        let (boot, wrote) = d.guard();
        assert!(!wrote);
        assert_eq!(boot.verdict, Verdict::Normal);
        assert!(boot.resume, "{config:?}");
        assert_eq!(boot.last, None, "an unfinished job has no result yet");
        let layout = d.layout();
        let mut engine = Engine::new(EngineConfig::new("dev-1", Chip::Esp32c3, OLD), layout);
        let actions = engine.resume(&mut d.rig.flash, 0).expect("resumes");
        assert!(
            actions.contains(&Action::Fetch { from: 12 * 4096 }),
            "{actions:?}"
        );
        assert_eq!(engine.job().map(|j| j.as_str()), Some("job-7"));
    }
}

#[test]
fn a_cancelled_download_is_not_resumed_and_its_last_result_is_cancelled() {
    let mut d = Dev::new(BootConfig::Stock);
    let img = image(Chip::Esp32c3, NEW, 120_000);
    d.rig.start(job_for(NEW, "job-7"));
    d.rig.respond(200, Some(img.len() as u32), None);
    d.rig.body(&img[..50_000]);
    d.rig
        .event(mqota_core::engine::Event::Command(Command::Cancel {
            job: None,
        }));
    assert!(!d.rig.engine.is_busy());
    d.power_cycle();
    let (boot, _) = d.guard();
    assert!(!boot.resume);
    assert_eq!(
        boot.last,
        last("job-7", Phase::Cancelled, Some(ErrorCode::Cancelled))
    );
    assert_eq!(boot.report, None);
}

#[test]
fn a_failed_download_keeps_its_error_code_in_last_across_a_reboot() {
    let mut d = Dev::new(BootConfig::Stock);
    let mut img = image(Chip::Esp32c3, NEW, 120_000);
    img[60_000] ^= 0xFF;
    let mut j = job_for(NEW, "job-8");
    j.sha256 = Some([0x5a; 32]);
    d.rig.start(j);
    d.rig.serve(&img);
    assert!(!d.rig.engine.is_busy());
    d.power_cycle();
    let (boot, _) = d.guard();
    assert!(!boot.resume);
    let l = boot.last.expect("a last result");
    assert_eq!((l.job.as_deref(), l.result), (Some("job-8"), Phase::Failed));
    assert!(
        matches!(l.error, Some(ErrorCode::BadImage | ErrorCode::HashMismatch)),
        "{l:?}"
    );
}

#[test]
fn operator_rollback_selects_the_previous_confirmed_image() {
    for config in BOTH {
        let mut d = Dev::new(config);
        d.download(NEW, "job-7");
        settle(&mut d, TrialEnd::Confirm);
        assert_eq!(d.version, NEW);
        let layout = d.layout();
        bootguard::rollback(&mut d.rig.flash, &layout).unwrap();
        d.power_cycle();
        assert_eq!((d.slot, d.version.as_str()), (0, OLD), "{config:?}");
        let (boot, wrote) = d.guard();
        assert!(!wrote);
        assert_eq!(boot.verdict, Verdict::Normal);
        assert_eq!(boot.report, None, "the runtime answered the command itself");
        assert_eq!(boot.last, last("job-7", Phase::RolledBack, None));
        assert_eq!(boot.state, OtaState::Valid);
        // And back again: the image left by request is still a sound one.
        let layout = d.layout();
        bootguard::rollback(&mut d.rig.flash, &layout).unwrap();
        d.power_cycle();
        assert_eq!(d.version, NEW, "{config:?}");
    }
}

/// The operator asks for a rollback on a device in the given state; the
/// answer must be `no_previous_image`, with otadata untouched.
fn assert_no_previous_image(d: &mut Dev, why: &str) {
    let before = d.otadata_bytes();
    let layout = d.layout();
    let err = bootguard::rollback(&mut d.rig.flash, &layout).unwrap_err();
    assert_eq!(err, GuardError::NoPreviousImage, "{why}");
    assert_eq!(err.code(), ErrorCode::NoPreviousImage);
    assert_eq!(d.otadata_bytes(), before, "{why}: otadata changed");
    d.power_cycle();
    assert_eq!(d.version, OLD, "{why}");
}

#[test]
fn operator_rollback_without_an_image_to_go_back_to_is_no_previous_image() {
    for config in BOTH {
        let mut d = Dev::new(config);
        assert_no_previous_image(&mut d, "fresh device, empty ota_1");

        let mut d = Dev::new(config);
        let img = image(Chip::Esp32c3, NEW, 120_000);
        d.rig.start(job_for(NEW, "job-7"));
        d.rig.respond(200, Some(img.len() as u32), None);
        d.rig.body(&img[..50_000]);
        d.power_cycle();
        assert_no_previous_image(&mut d, "half-downloaded ota_1");

        for end in [TrialEnd::HealthCheckFails, TrialEnd::Dies] {
            let mut d = Dev::new(config);
            d.download(NEW, "job-7");
            settle(&mut d, end);
            assert_eq!(d.version, OLD);
            assert_no_previous_image(&mut d, &format!("{config:?}: {end:?} in ota_1"));
        }
    }
}

#[test]
fn an_image_in_new_state_without_a_journal_record_runs_normally() {
    for config in BOTH {
        let mut d = Dev::new(config);
        // Installed by another tool: the image and otadata, no journal.
        let img = padded(&image(Chip::Esp32c3, NEW, 120_000));
        let slot1 = d.rig.layout.slots[1].offset;
        d.rig.flash.erase(slot1, slot1 + 32 * 4096).unwrap();
        d.rig.flash.write(slot1, &img).unwrap();
        let ota = d.rig.layout.otadata;
        otadata::set_boot_slot(&mut d.rig.flash, ota, 1, 2, OtaState::New).unwrap();
        d.power_cycle();
        assert_eq!(d.version, NEW);
        let (boot, wrote) = d.guard();
        assert_eq!(boot.verdict, Verdict::Normal, "{config:?}");
        assert!(!wrote);
        assert_eq!(boot.trial_job, None);
        assert_eq!(boot.report, None);
        assert_eq!(boot.last, None);
        assert!(!d.journal_has(1, Flag::TrialStarted));
    }
}

// Regression: with the rollback bootloader, a confirmation cut after the
// journal's `confirmed` mark left the PENDING_VERIFY entry for the bootloader
// to abort; the device went back to the old image and the job's `done` was
// never reported. The guard now finishes the confirmation from the old image.
#[test]
fn regression_a_confirmation_the_rollback_bootloader_aborted_is_finished_not_lost() {
    let mut d = Dev::new(BootConfig::Rollback);
    d.download(NEW, "job-7");
    d.power_cycle();
    assert_eq!(d.guard().0.verdict, Verdict::Trial);
    d.rig.flash.cut_power_after_ops(1);
    let layout = d.layout();
    assert!(bootguard::confirm(&mut d.rig.flash, &layout).is_err());
    d.power_cycle();
    assert_eq!(
        d.version, OLD,
        "the bootloader aborted the unconfirmed entry"
    );
    let (boot, wrote) = d.guard();
    assert_eq!(boot.verdict, Verdict::Reboot);
    assert!(wrote);
    d.power_cycle();
    assert_eq!(d.version, NEW);
    assert_eq!(d.running_state(), Some(OtaState::Valid));
    let (boot, _) = d.guard();
    assert_eq!(boot.verdict, Verdict::Normal, "no second trial");
    assert_eq!(
        boot.report.map(|r| (r.job, r.phase)),
        Some((Some("job-7".try_into().unwrap()), Phase::Done))
    );
}

// Regression: a trial that the rollback bootloader aborted leaves no
// rollback mark in the journal, and operator rollback used to select that
// image again, as VALID, skipping its trial.
#[test]
fn regression_operator_rollback_refuses_an_image_whose_trial_the_bootloader_aborted() {
    let mut d = Dev::new(BootConfig::Rollback);
    d.download(NEW, "job-7");
    d.power_cycle();
    assert_eq!(d.guard().0.verdict, Verdict::Trial);
    d.power_cycle();
    assert_eq!(d.version, OLD);
    assert_no_previous_image(&mut d, "trial aborted by the bootloader");
}

// Fuzz finding (engine target): with the rollback bootloader, a health check
// that failed in `ota_1`, then a confirmed update in `ota_1`, then a failed
// health check of an update in `ota_0`: the second rejection must succeed.
#[test]
fn fuzz_a_second_failed_trial_after_a_confirmed_one_rolls_back() {
    let mut d = Dev::new(BootConfig::Rollback);
    d.download(NEW, "job-1");
    settle(&mut d, TrialEnd::HealthCheckFails);
    assert_eq!((d.slot, d.version.as_str()), (0, OLD));
    d.download("1.2.0", "job-2");
    settle(&mut d, TrialEnd::Confirm);
    assert_eq!((d.slot, d.version.as_str()), (1, "1.2.0"));
    d.download("1.3.0", "job-3");
    d.power_cycle();
    assert_eq!((d.slot, d.version.as_str()), (0, "1.3.0"));
    assert_eq!(d.guard().0.verdict, Verdict::Trial);
    let layout = d.layout();
    bootguard::reject(&mut d.rig.flash, &layout, RollbackReason::HealthCheckFailed)
        .expect("the confirmed 1.2.0 is there to go back to");
    d.power_cycle();
    assert_eq!((d.slot, d.version.as_str()), (1, "1.2.0"));
}

// Fuzz finding (engine target): a rejection cut after it erased the sector of
// the previous (valid) entry left only the trial's PENDING_VERIFY entry; the
// rollback bootloader aborted it, fell back to `ota_0` — the rejected image —
// and the guard let it run as if confirmed. It now finishes the rejection.
#[test]
fn fuzz_a_rejection_cut_after_erasing_the_previous_entry_is_finished() {
    let mut d = Dev::new(BootConfig::Rollback);
    d.download(NEW, "job-1");
    settle(&mut d, TrialEnd::Confirm);
    assert_eq!((d.slot, d.version.as_str()), (1, NEW));
    d.download("1.2.0", "job-2");
    d.power_cycle();
    assert_eq!((d.slot, d.version.as_str()), (0, "1.2.0"));
    assert_eq!(d.guard().0.verdict, Verdict::Trial);
    // Journal mark, then the erase of the sector with 1.1.0's entry; cut
    // before the program.
    d.rig.flash.cut_power_after_ops(2);
    let layout = d.layout();
    assert!(
        bootguard::reject(&mut d.rig.flash, &layout, RollbackReason::HealthCheckFailed).is_err()
    );
    let (published, _, boot) = settle(&mut d, TrialEnd::Confirm);
    assert_eq!(
        (d.slot, d.version.as_str()),
        (1, NEW),
        "back on the confirmed image"
    );
    assert_eq!(
        published,
        vec![(
            Some("job-2".into()),
            Phase::RolledBack,
            Some(ErrorCode::HealthCheckFailed)
        )]
    );
    assert_eq!(boot.state, OtaState::Valid);
}

// Fuzz finding (engine target): a trial dies under the rollback bootloader;
// later a new job starts into that slot and the power is cut while it erased
// the slot's journal. The dead trial's image was intact but had lost its
// history, so operator rollback took it for an image that predates mqota.
// Fixed in the engine: the journal switches to a new job only after the
// first page is accepted and the old image's first block is erased. Swept
// here over every byte budget through the first pages of the new job.
#[test]
fn fuzz_a_cut_while_a_new_job_takes_over_a_dead_trials_slot_never_revives_that_image() {
    let img = image(Chip::Esp32c3, "1.2.0", 120_000);
    for cut in (0..80_000u64).step_by(1024) {
        let mut d = Dev::new(BootConfig::Rollback);
        d.download(NEW, "job-1");
        settle(&mut d, TrialEnd::Dies);
        assert_eq!((d.slot, d.version.as_str()), (0, OLD));
        d.rig.flash.cut_power_after_bytes(cut);
        d.rig.start(job_for("1.2.0", "job-2"));
        d.rig.serve(&img);
        if d.rig.flash.is_powered() {
            continue;
        }
        d.power_cycle();
        assert_eq!(d.version, OLD, "cut after {cut} bytes");
        let _ = d.guard();
        assert_no_previous_image(&mut d, &format!("cut after {cut} bytes"));
    }
}

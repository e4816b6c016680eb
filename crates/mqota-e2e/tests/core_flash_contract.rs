//! The flash contract: `embedded-storage` lets code program a word a second
//! time (without an erase) only on a `MultiwriteNorFlash`. The journal's page
//! bitmap needs that, so the engine and the runtime require it; everything
//! else — the boot guard, otadata, the journal's flags, the bootloader model —
//! must program each word once per erase, and runs here on the NOR model's
//! strict single-write view, which refuses a second program.

#[path = "../../mqota-core/tests/common/mod.rs"]
mod common;

use common::*;
use embedded_storage::nor_flash::NorFlash;
use mqota_core::bootguard::{self, TrialResult, Verdict};
use mqota_core::image::Chip;
use mqota_core::journal::{Flag, RollbackReason};
use mqota_core::protocol::ErrorCode;
use mqota_flash_sim::{BootConfig, Bootloader, SimError, SimFlash, SingleWrite};

#[test]
fn the_strict_view_refuses_a_second_program_of_a_word_until_it_is_erased() {
    let mut f = SingleWrite::new(SimFlash::new(64 * 1024));
    f.write(4096, &[0xFE, 0xFF, 0xFF, 0xFF]).unwrap();
    // The same word again, even clearing only more bits: refused.
    assert_eq!(
        f.write(4096, &[0xFC, 0xFF, 0xFF, 0xFF]),
        Err(SimError::Rewrite { offset: 4096 })
    );
    // A longer write that overlaps it: refused, nothing written.
    assert_eq!(
        f.write(4092, &[0; 8]),
        Err(SimError::Rewrite { offset: 4096 })
    );
    // The next word is still fresh.
    f.write(4100, &[0; 4]).unwrap();
    f.erase(4096, 8192).unwrap();
    f.write(4096, &[0; 8]).unwrap();
    // Content written before the view existed counts as programmed.
    let mut inner = f.into_inner();
    let mut again = {
        inner.write(0, &[0x12, 0x34, 0x56, 0x78]).unwrap();
        SingleWrite::new(inner)
    };
    assert!(matches!(
        again.write(0, &[0; 4]),
        Err(SimError::Rewrite { offset: 0 })
    ));
}

#[test]
fn the_journal_flags_program_each_word_once_however_often_they_are_set() {
    let d = device_on(SimFlash::new(FLASH_SIZE));
    let slot = d.layout.slots[1];
    let mut f = SingleWrite::new(d.flash.clone());
    let journal = slot.journal();
    let mut j = job("http://fw.example/fw.bin");
    j.job = Some("j".try_into().unwrap());
    journal
        .begin(&mut f, &mqota_core::journal::JobRecord::from_job(&j))
        .unwrap();
    for flag in [
        Flag::Activated,
        Flag::TrialStarted,
        Flag::Confirmed,
        Flag::Reported,
    ] {
        journal.set(&mut f, flag).unwrap();
        journal.set(&mut f, flag).unwrap();
    }
    journal
        .set_rolled_back(&mut f, RollbackReason::Requested)
        .unwrap();
    journal
        .set_rolled_back(&mut f, RollbackReason::BootFailed)
        .unwrap();
    journal.set_abandoned(&mut f, ErrorCode::Network).unwrap();
    journal.set_abandoned(&mut f, ErrorCode::Timeout).unwrap();
    assert_eq!(
        journal.rollback_reason(&mut f).unwrap(),
        Some(RollbackReason::Requested)
    );
    assert_eq!(
        journal.abandon_error(&mut f).unwrap(),
        Some(ErrorCode::Network)
    );
}

/// An update downloaded by the engine (on the multiwrite flash), then every
/// boot, trial verdict and rollback on the strict view, with both
/// bootloader builds and both trial outcomes.
#[test]
fn boots_trials_and_rollbacks_program_each_word_once() {
    for config in [BootConfig::Stock, BootConfig::Rollback] {
        for healthy in [true, false] {
            let mut d = device_on(SimFlash::new(FLASH_SIZE));
            let v2 = image(Chip::Esp32c3, "1.1.0", 120_000);
            d.start(job("http://fw.example/fw.bin"));
            d.serve(&v2);
            assert!(d.rebooted);
            let bl = Bootloader::new(config).for_chip(Chip::Esp32c3);
            let mut f = SingleWrite::new(d.flash.clone());
            let why = format!("{config:?}, healthy {healthy}");

            let outcome = bl.boot(&mut f).expect(&why);
            let mut layout = d.layout.clone();
            layout.running = outcome.slot.expect("boots");
            assert_eq!(layout.running, 1, "{why}");
            let boot = bootguard::on_boot(&mut f, &layout).expect(&why);
            assert_eq!(boot.verdict, Verdict::Trial, "{why}");
            let verdict = bootguard::validate_and_rollback(&mut f, &layout, healthy).expect(&why);
            if let TrialResult::Confirmed(report) = &verdict {
                bootguard::mark_reported(&mut f, report).expect(&why);
            }
            assert_eq!(
                matches!(verdict, TrialResult::Confirmed(_)),
                healthy,
                "{why}"
            );

            // The next boot, its guard, and an operator rollback from there.
            let outcome = bl.boot(&mut f).expect(&why);
            layout.running = outcome.slot.expect("boots");
            let boot = bootguard::on_boot(&mut f, &layout).expect(&why);
            if let Some(report) = &boot.report {
                bootguard::mark_reported(&mut f, report).expect(&why);
            }
            if healthy {
                assert_eq!(layout.running, 1, "{why}");
                bootguard::rollback(&mut f, &layout).expect(&why);
                let outcome = bl.boot(&mut f).expect(&why);
                assert_eq!(outcome.slot, Some(0), "{why}");
            } else {
                assert_eq!(layout.running, 0, "{why}");
            }
        }
    }
}

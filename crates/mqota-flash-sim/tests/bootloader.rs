//! The bootloader model follows ESP-IDF's rules, in the stock build and the
//! rollback build, on flashes laid out like real devices.

use mqota_core::image::{validate_bytes, Chip, ImageBuilder, ImageError};
use mqota_core::otadata::{
    self, EntryCheck, OtaSelectEntry, OtaState, Otadata, ENTRY_SIZE, SECTOR_SIZE,
};
use mqota_core::partition::{PartitionTable, DEFAULT_4MB_CSV, TABLE_OFFSET};
use mqota_flash_sim::bootloader::{Rejected, WriteReason};
use mqota_flash_sim::{BootError, Booted, Bootloader, SimError, SimFlash};

const FLASH_SIZE: usize = 4 << 20;
const OTADATA: u32 = 0xd000;

/// What `esp_ota_mark_app_valid_cancel_rollback` does (mqota's boot guard
/// never does it; the bootloader must still honour it): the active entry's
/// sector erased and programmed again with the state `VALID`.
fn mark_app_valid(flash: &mut SimFlash) {
    use embedded_storage::nor_flash::NorFlash;
    let od = Otadata::read(flash, OTADATA).unwrap();
    let i = od.active().expect("an active entry");
    let mut entry = od.entries[i];
    entry.state = OtaState::Valid.to_u32();
    let at = OTADATA + i as u32 * SECTOR_SIZE;
    flash.erase(at, at + SECTOR_SIZE).unwrap();
    flash.write(at, &entry.to_bytes()).unwrap();
}

/// Factory, two OTA slots and a test app.
const FACTORY_CSV: &str = "\
nvs,      data, nvs,     0x9000,   0x4000,
otadata,  data, ota,     0xd000,   0x2000,
phy_init, data, phy,     0xf000,   0x1000,
factory,  app,  factory, 0x10000,  0x100000,
ota_0,    app,  ota_0,   0x110000, 0x100000,
ota_1,    app,  ota_1,   0x210000, 0x100000,
test,     app,  test,    0x310000, 0x80000,
";

/// Three OTA slots, no factory.
const THREE_SLOTS_CSV: &str = "\
otadata,  data, ota,     0xd000,   0x2000,
ota_0,    app,  ota_0,   0x10000,  0x100000,
ota_1,    app,  ota_1,   0x110000, 0x100000,
ota_2,    app,  ota_2,   0x210000, 0x100000,
";

struct Device {
    flash: SimFlash,
    table: PartitionTable,
}

impl Device {
    fn new(csv: &str) -> Self {
        let table = PartitionTable::from_csv(csv).unwrap();
        let mut flash = SimFlash::new(FLASH_SIZE);
        flash.write_flash(TABLE_OFFSET, &table.to_bytes()).unwrap();
        Device { flash, table }
    }

    fn slot_count(&self) -> usize {
        self.table.ota_slots().count()
    }

    fn offset_of(&self, label: &str) -> u32 {
        self.table.find(label).unwrap().offset
    }

    /// Flash a valid C3 image whose version names the partition.
    fn install(&mut self, label: &str) -> &mut Self {
        self.install_for(label, Chip::Esp32c3)
    }

    fn install_for(&mut self, label: &str, chip: Chip) -> &mut Self {
        let image = ImageBuilder::new(chip).version(label).build().unwrap();
        let at = self.offset_of(label);
        self.flash.write_flash(at, &image).unwrap();
        self
    }

    /// A valid image with one data byte flipped: the checksum fails.
    fn install_corrupt(&mut self, label: &str) -> &mut Self {
        let mut image = ImageBuilder::new(Chip::Esp32c3)
            .version(label)
            .build()
            .unwrap();
        let i = image.len() / 2;
        image[i] ^= 0x40;
        assert!(validate_bytes(&image).is_err());
        let at = self.offset_of(label);
        self.flash.write_flash(at, &image).unwrap();
        self
    }

    fn select(&mut self, slot: usize, state: OtaState) -> &mut Self {
        let n = self.slot_count();
        otadata::set_boot_slot(&mut self.flash, OTADATA, slot, n, state).unwrap();
        self
    }

    fn plant(&mut self, entry: usize, value: OtaSelectEntry) -> &mut Self {
        let at = OTADATA + entry as u32 * SECTOR_SIZE;
        self.flash.write_flash(at, &value.to_bytes()).unwrap();
        self
    }

    fn otadata(&mut self) -> Otadata {
        Otadata::read(&mut self.flash, OTADATA).unwrap()
    }
}

fn version_of(o: &mqota_flash_sim::BootOutcome) -> String {
    o.image.as_ref().unwrap().app.version.as_str().to_string()
}

// ---------------------------------------------------------------- both builds

#[test]
fn blank_otadata_without_factory_boots_ota_0_and_writes_a_real_entry() {
    for bl in [Bootloader::stock(), Bootloader::rollback()] {
        let mut d = Device::new(DEFAULT_4MB_CSV);
        d.install("ota_0").install("ota_1");
        let o = bl.boot(&mut d.flash).unwrap();
        assert_eq!(o.booted, Booted::Ota(0), "{:?}", bl.config);
        assert_eq!(o.slot, Some(0));
        assert_eq!(o.partition_offset, Some(0x10000));
        assert_eq!(version_of(&o), "ota_0");
        // set_actual_ota_seq: entry 0 = seq 1, VALID.
        assert_eq!(o.otadata_writes.len(), 1);
        assert_eq!(o.otadata_writes[0].reason, WriteReason::InitialSequence);
        let od = d.otadata();
        assert_eq!(od.entries[0], OtaSelectEntry::new(1, OtaState::Valid));
        assert_eq!(od.checks()[1], EntryCheck::Blank);
    }
}

#[test]
fn blank_otadata_without_factory_and_a_bad_ota_0_boots_ota_1_and_records_it() {
    for bl in [Bootloader::stock(), Bootloader::rollback()] {
        let mut d = Device::new(DEFAULT_4MB_CSV);
        d.install_corrupt("ota_0").install("ota_1");
        let o = bl.boot(&mut d.flash).unwrap();
        assert_eq!(o.booted, Booted::Ota(1));
        assert_eq!(o.start, Booted::Ota(0));
        assert!(matches!(
            o.rejected.as_slice(),
            [Rejected {
                target: Booted::Ota(0),
                error: ImageError::BadChecksum { .. },
                ..
            }]
        ));
        assert_eq!(
            d.otadata().entries[0],
            OtaSelectEntry::new(2, OtaState::Valid)
        );
        assert_eq!(d.otadata().selected_slot(2), Some(1));
    }
}

#[test]
fn blank_otadata_with_a_factory_app_boots_factory_and_writes_nothing() {
    for bl in [Bootloader::stock(), Bootloader::rollback()] {
        let mut d = Device::new(FACTORY_CSV);
        d.install("factory").install("ota_0").install("ota_1");
        let o = bl.boot(&mut d.flash).unwrap();
        assert_eq!(o.booted, Booted::Factory);
        assert_eq!(o.slot, None);
        assert_eq!(version_of(&o), "factory");
        assert!(o.otadata_writes.is_empty());
        assert_eq!(d.otadata().checks(), [EntryCheck::Blank, EntryCheck::Blank]);
    }
}

#[test]
fn without_an_otadata_partition_the_factory_app_boots() {
    let csv = "factory, app, factory, 0x10000, 0x100000,\nota_0, app, ota_0, 0x110000, 0x100000,\n";
    let mut d = Device::new(csv);
    d.install("factory").install("ota_0");
    let o = Bootloader::stock().boot(&mut d.flash).unwrap();
    assert_eq!(o.booted, Booted::Factory);
}

#[test]
fn the_active_entry_selects_the_slot() {
    for bl in [Bootloader::stock(), Bootloader::rollback()] {
        let mut d = Device::new(THREE_SLOTS_CSV);
        d.install("ota_0").install("ota_1").install("ota_2");
        d.select(2, OtaState::Valid);
        assert_eq!(bl.boot(&mut d.flash).unwrap().booted, Booted::Ota(2));
        d.select(1, OtaState::Valid);
        assert_eq!(bl.boot(&mut d.flash).unwrap().booted, Booted::Ota(1));
        d.select(0, OtaState::Valid);
        let o = bl.boot(&mut d.flash).unwrap();
        assert_eq!(o.booted, Booted::Ota(0));
        assert_eq!(version_of(&o), "ota_0");
        assert!(o.otadata_writes.is_empty());
    }
}

#[test]
fn an_invalid_or_aborted_entry_is_skipped_in_both_builds() {
    for state in [OtaState::Invalid, OtaState::Aborted] {
        for bl in [Bootloader::stock(), Bootloader::rollback()] {
            let mut d = Device::new(DEFAULT_4MB_CSV);
            d.install("ota_0").install("ota_1");
            d.plant(0, OtaSelectEntry::new(1, OtaState::Valid));
            d.plant(1, OtaSelectEntry::new(2, state));
            let o = bl.boot(&mut d.flash).unwrap();
            assert_eq!(o.booted, Booted::Ota(0), "{state:?} {:?}", bl.config);
            assert!(o.otadata_writes.is_empty());
        }
    }
}

#[test]
fn both_entries_rejected_without_factory_boots_ota_0_without_rewriting() {
    for bl in [Bootloader::stock(), Bootloader::rollback()] {
        let mut d = Device::new(DEFAULT_4MB_CSV);
        d.install("ota_0").install("ota_1");
        d.plant(0, OtaSelectEntry::new(1, OtaState::Aborted));
        d.plant(1, OtaSelectEntry::new(2, OtaState::Invalid));
        let o = bl.boot(&mut d.flash).unwrap();
        assert_eq!(o.booted, Booted::Ota(0));
        // The CRCs are good, so these are not "initial contents": no rewrite.
        assert!(o.otadata_writes.is_empty());
    }
}

#[test]
fn both_entries_rejected_with_factory_boots_factory() {
    let mut d = Device::new(FACTORY_CSV);
    d.install("factory").install("ota_0").install("ota_1");
    d.plant(0, OtaSelectEntry::new(1, OtaState::Invalid));
    d.plant(1, OtaSelectEntry::new(2, OtaState::Aborted));
    assert_eq!(
        Bootloader::stock().boot(&mut d.flash).unwrap().booted,
        Booted::Factory
    );
}

#[test]
fn both_crcs_bad_without_factory_tries_every_slot_from_ota_0() {
    let mut d = Device::new(THREE_SLOTS_CSV);
    d.install_corrupt("ota_0").install("ota_1").install("ota_2");
    let mut e = OtaSelectEntry::new(3, OtaState::Valid);
    e.crc ^= 1;
    d.plant(0, e);
    let mut e = OtaSelectEntry::new(4, OtaState::Valid);
    e.crc ^= 1;
    d.plant(1, e);
    let o = Bootloader::stock().boot(&mut d.flash).unwrap();
    assert_eq!(o.start, Booted::Factory);
    assert_eq!(o.booted, Booted::Ota(1));
    // Not rule 4 (the entries are not unselectable), so nothing is rewritten.
    assert!(o.otadata_writes.is_empty());
}

#[test]
fn both_crcs_bad_with_factory_falls_back_to_factory() {
    let mut d = Device::new(FACTORY_CSV);
    d.install("factory").install("ota_0").install("ota_1");
    let mut e = OtaSelectEntry::new(2, OtaState::Valid);
    e.crc = 0;
    d.plant(1, e);
    let o = Bootloader::stock().boot(&mut d.flash).unwrap();
    assert_eq!(o.booted, Booted::Factory);
}

#[test]
fn a_bad_selected_image_falls_back_downwards_first() {
    for bl in [Bootloader::stock(), Bootloader::rollback()] {
        let mut d = Device::new(FACTORY_CSV);
        d.install("factory")
            .install("ota_0")
            .install_corrupt("ota_1");
        d.select(1, OtaState::Valid);
        let o = bl.boot(&mut d.flash).unwrap();
        // Down from ota_1: ota_0 comes before factory.
        assert_eq!(o.booted, Booted::Ota(0));
        assert_eq!(o.rejected.len(), 1);
        assert_eq!(o.rejected[0].target, Booted::Ota(1));
    }
}

#[test]
fn a_bad_selected_image_then_factory_then_upwards() {
    let mut d = Device::new(FACTORY_CSV);
    d.install_corrupt("ota_0")
        .install("factory")
        .install("ota_1");
    d.select(0, OtaState::Valid);
    assert_eq!(
        Bootloader::stock().boot(&mut d.flash).unwrap().booted,
        Booted::Factory
    );

    let mut d = Device::new(THREE_SLOTS_CSV);
    d.install_corrupt("ota_0")
        .install_corrupt("ota_1")
        .install("ota_2");
    d.select(1, OtaState::Valid);
    let o = Bootloader::stock().boot(&mut d.flash).unwrap();
    assert_eq!(o.booted, Booted::Ota(2));
    let tried: Vec<_> = o.rejected.iter().map(|r| r.target).collect();
    assert_eq!(tried, [Booted::Ota(1), Booted::Ota(0)]);
}

#[test]
fn the_test_app_is_the_last_resort() {
    let mut d = Device::new(FACTORY_CSV);
    d.install("test");
    let o = Bootloader::stock().boot(&mut d.flash).unwrap();
    assert_eq!(o.booted, Booted::Test);
    let tried: Vec<_> = o.rejected.iter().map(|r| r.target).collect();
    assert_eq!(tried, [Booted::Factory, Booted::Ota(0), Booted::Ota(1)]);
}

#[test]
fn no_loadable_image_anywhere_bricks_the_device() {
    for bl in [Bootloader::stock(), Bootloader::rollback()] {
        let mut d = Device::new(DEFAULT_4MB_CSV);
        d.install_corrupt("ota_1");
        d.select(1, OtaState::New);
        let o = bl.boot(&mut d.flash).unwrap();
        assert!(o.is_bricked());
        assert_eq!(o.slot, None);
        assert_eq!(o.image, None);
        assert!(matches!(
            o.rejected[0].error,
            ImageError::BadChecksum { .. }
        ));
        assert!(matches!(
            o.rejected[1].error,
            ImageError::BadMagic { found: 0xFF }
        ));
    }
}

#[test]
fn an_image_for_another_chip_does_not_load() {
    let mut d = Device::new(DEFAULT_4MB_CSV);
    d.install_for("ota_0", Chip::Esp32c6).install("ota_1");
    d.select(0, OtaState::Valid);
    let o = Bootloader::stock()
        .for_chip(Chip::Esp32c3)
        .boot(&mut d.flash)
        .unwrap();
    assert_eq!(o.booted, Booted::Ota(1));
    assert!(matches!(o.rejected[0].error, ImageError::WrongChip { .. }));
    // A bootloader that accepts any chip boots it.
    assert_eq!(
        Bootloader::stock().boot(&mut d.flash).unwrap().booted,
        Booted::Ota(0)
    );
}

#[test]
fn a_broken_partition_table_stops_the_boot() {
    let mut d = Device::new(DEFAULT_4MB_CSV);
    d.install("ota_0");
    d.flash.raw_mut()[TABLE_OFFSET as usize] = 0x00;
    assert!(matches!(
        Bootloader::stock().boot(&mut d.flash),
        Err(BootError::PartitionTable(_))
    ));
}

#[test]
fn a_power_cut_during_a_boot_write_is_reported_and_the_next_boot_recovers() {
    let mut d = Device::new(DEFAULT_4MB_CSV);
    d.install("ota_0").install("ota_1");
    // Half of the sector erase of rule 8.
    d.flash.cut_power_after_bytes(2048);
    assert_eq!(
        Bootloader::stock().boot(&mut d.flash),
        Err(BootError::Flash(SimError::PowerCut))
    );
    d.flash.power_on();
    let o = Bootloader::stock().boot(&mut d.flash).unwrap();
    assert_eq!(o.booted, Booted::Ota(0));
    assert_eq!(
        d.otadata().entries[0],
        OtaSelectEntry::new(1, OtaState::Valid)
    );
}

#[test]
fn a_gap_in_slot_numbers_counts_slots_like_esp_idf() {
    // ota_0 and ota_2: app_count is 2, so seq 2 selects slot 1, which does not
    // exist; the search goes down to ota_0. ota_2 is never reachable.
    let csv = "otadata, data, ota, 0xd000, 0x2000,\nota_0, app, ota_0, 0x10000, 0x100000,\nota_2, app, ota_2, 0x110000, 0x100000,\n";
    let mut d = Device::new(csv);
    d.install("ota_0").install("ota_2");
    d.plant(0, OtaSelectEntry::new(2, OtaState::Valid));
    let o = Bootloader::stock().boot(&mut d.flash).unwrap();
    assert_eq!(o.start, Booted::Ota(1));
    assert_eq!(o.booted, Booted::Ota(0));
}

// ------------------------------------------------------------------ stock only

#[test]
fn the_stock_build_never_changes_a_state() {
    for state in [OtaState::New, OtaState::PendingVerify] {
        let mut d = Device::new(DEFAULT_4MB_CSV);
        d.install("ota_0").install("ota_1");
        d.select(0, OtaState::Valid).select(1, state);
        let erases = d.flash.stats().erases;
        for _ in 0..3 {
            let o = Bootloader::stock().boot(&mut d.flash).unwrap();
            assert_eq!(o.booted, Booted::Ota(1), "{state:?}");
            assert!(o.otadata_writes.is_empty());
        }
        assert_eq!(d.otadata().entries[1].state(), state);
        assert_eq!(d.flash.stats().erases, erases, "no erase by the bootloader");
    }
}

// --------------------------------------------------------------- rollback only

#[test]
fn rollback_marks_a_new_entry_pending_verify_and_boots_it() {
    let mut d = Device::new(DEFAULT_4MB_CSV);
    d.install("ota_0").install("ota_1");
    d.select(0, OtaState::Valid).select(1, OtaState::New);
    let o = Bootloader::rollback().boot(&mut d.flash).unwrap();
    assert_eq!(o.booted, Booted::Ota(1));
    assert_eq!(o.otadata_writes.len(), 1);
    assert_eq!(o.otadata_writes[0].entry, 1);
    assert_eq!(o.otadata_writes[0].reason, WriteReason::NewToPendingVerify);
    let od = d.otadata();
    assert_eq!(od.entries[1].state(), OtaState::PendingVerify);
    assert_eq!(od.entries[1].seq, 2);
    assert_eq!(od.entries[0].state(), OtaState::Valid);
}

#[test]
fn rollback_aborts_an_unconfirmed_app_and_boots_the_previous_slot() {
    let mut d = Device::new(DEFAULT_4MB_CSV);
    d.install("ota_0").install("ota_1");
    d.select(0, OtaState::Valid).select(1, OtaState::New);
    Bootloader::rollback().boot(&mut d.flash).unwrap();
    // The app never called mark-valid; the device resets.
    let o = Bootloader::rollback().boot(&mut d.flash).unwrap();
    assert_eq!(o.booted, Booted::Ota(0));
    assert_eq!(version_of(&o), "ota_0");
    assert_eq!(o.otadata_writes.len(), 1);
    assert_eq!(
        o.otadata_writes[0].reason,
        WriteReason::PendingVerifyAborted
    );
    let od = d.otadata();
    assert_eq!(od.checks(), [EntryCheck::Valid, EntryCheck::Rejected]);
    assert_eq!(od.entries[1].state(), OtaState::Aborted);
    // And it stays there.
    let o = Bootloader::rollback().boot(&mut d.flash).unwrap();
    assert_eq!(o.booted, Booted::Ota(0));
    assert!(o.otadata_writes.is_empty());
}

#[test]
fn rollback_keeps_booting_a_confirmed_app() {
    let mut d = Device::new(DEFAULT_4MB_CSV);
    d.install("ota_0").install("ota_1");
    d.select(0, OtaState::Valid).select(1, OtaState::New);
    Bootloader::rollback().boot(&mut d.flash).unwrap();
    // The app confirms itself as a stock ESP-IDF app does.
    mark_app_valid(&mut d.flash);
    for _ in 0..3 {
        let o = Bootloader::rollback().boot(&mut d.flash).unwrap();
        assert_eq!(o.booted, Booted::Ota(1));
        assert!(o.otadata_writes.is_empty());
    }
}

#[test]
fn rollback_with_the_only_entry_pending_falls_back_to_ota_0() {
    // First OTA after a blank otadata: entry 0 the only one, and unconfirmed.
    let mut d = Device::new(DEFAULT_4MB_CSV);
    d.install("ota_0").install("ota_1");
    d.select(1, OtaState::New);
    assert_eq!(
        Bootloader::rollback().boot(&mut d.flash).unwrap().booted,
        Booted::Ota(1)
    );
    let o = Bootloader::rollback().boot(&mut d.flash).unwrap();
    // Rule 4: both entries unselectable, no factory, so ota_0; the aborted
    // entry has a good CRC, so no "initial contents" rewrite either.
    assert_eq!(o.booted, Booted::Ota(0));
    assert_eq!(o.otadata_writes.len(), 1);
    assert_eq!(
        d.otadata().checks(),
        [EntryCheck::Rejected, EntryCheck::Blank]
    );
}

#[test]
fn rollback_aborts_every_pending_entry_before_selecting() {
    let mut d = Device::new(FACTORY_CSV);
    d.install("factory").install("ota_0").install("ota_1");
    d.plant(0, OtaSelectEntry::new(1, OtaState::PendingVerify));
    d.plant(1, OtaSelectEntry::new(2, OtaState::PendingVerify));
    let o = Bootloader::rollback().boot(&mut d.flash).unwrap();
    assert_eq!(o.booted, Booted::Factory);
    let entries: Vec<_> = o.otadata_writes.iter().map(|w| w.entry).collect();
    assert_eq!(entries, [0, 1]);
    assert_eq!(
        d.otadata().checks(),
        [EntryCheck::Rejected, EntryCheck::Rejected]
    );
}

#[test]
fn rollback_marks_a_new_entry_pending_even_if_its_image_then_fails() {
    let mut d = Device::new(DEFAULT_4MB_CSV);
    d.install("ota_0").install_corrupt("ota_1");
    d.select(0, OtaState::Valid).select(1, OtaState::New);
    let o = Bootloader::rollback().boot(&mut d.flash).unwrap();
    assert_eq!(o.booted, Booted::Ota(0));
    assert_eq!(d.otadata().entries[1].state(), OtaState::PendingVerify);
    // Next boot aborts it; ota_0 keeps booting.
    let o = Bootloader::rollback().boot(&mut d.flash).unwrap();
    assert_eq!(o.booted, Booted::Ota(0));
    assert_eq!(d.otadata().entries[1].state(), OtaState::Aborted);
}

#[test]
fn the_same_unconfirmed_update_sticks_on_stock_and_rolls_back_on_rollback() {
    let mut stock = Device::new(DEFAULT_4MB_CSV);
    stock.install("ota_0").install("ota_1");
    stock.select(0, OtaState::Valid).select(1, OtaState::New);
    let mut rollback = Device {
        flash: stock.flash.clone(),
        table: stock.table.clone(),
    };
    let boots = |bl: Bootloader, d: &mut Device| -> Vec<Booted> {
        (0..3)
            .map(|_| bl.boot(&mut d.flash).unwrap().booted)
            .collect()
    };
    assert_eq!(boots(Bootloader::stock(), &mut stock), [Booted::Ota(1); 3]);
    assert_eq!(
        boots(Bootloader::rollback(), &mut rollback),
        [Booted::Ota(1), Booted::Ota(0), Booted::Ota(0)]
    );
}

#[test]
fn the_rule_8_entry_is_exactly_one_esp_idf_would_write() {
    let mut d = Device::new(DEFAULT_4MB_CSV);
    d.install("ota_0");
    Bootloader::rollback().boot(&mut d.flash).unwrap();
    let at = OTADATA as usize;
    let mut expected = [0xFFu8; ENTRY_SIZE];
    expected[0..4].copy_from_slice(&1u32.to_le_bytes());
    expected[24..28].copy_from_slice(&2u32.to_le_bytes());
    expected[28..32].copy_from_slice(&0x4743_989Au32.to_le_bytes());
    assert_eq!(&d.flash.data()[at..at + ENTRY_SIZE], &expected);
}

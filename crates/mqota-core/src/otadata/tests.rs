//! Tests of the otadata format and writers against the NOR model.
use super::*;
use crate::mock_flash::MockFlash;

const OFF: u32 = 0xd000;

fn flash() -> MockFlash {
    MockFlash::new(0x10000)
}

fn read(f: &mut MockFlash) -> Otadata {
    Otadata::read(f, OFF).unwrap()
}

/// Plant an entry as a previous writer (ESP-IDF, esptool) would have.
fn plant(f: &mut MockFlash, index: usize, entry: OtaSelectEntry) {
    let at = (OFF + index as u32 * SECTOR_SIZE) as usize;
    f.raw_mut()[at..at + SECTOR_SIZE as usize].fill(0xFF);
    f.raw_mut()[at..at + ENTRY_SIZE].copy_from_slice(&entry.to_bytes());
}

fn corrupt_crc(f: &mut MockFlash, index: usize) {
    let at = (OFF + index as u32 * SECTOR_SIZE) as usize + 28;
    f.raw_mut()[at] ^= 0x01;
}

#[test]
fn the_crc_is_the_esp_rom_crc32_le_seeded_with_all_ones() {
    // Values the ESP-IDF bootloader stores (and esp-bootloader-esp-idf's tests show).
    assert_eq!(ota_seq_crc(1), 0x4743_989A);
    assert_eq!(ota_seq_crc(2), 0x55F6_3774);
    assert_eq!(OTA_SEQ_CRC.checksum(b"123456789"), 0xd202_d277);
}

#[test]
fn an_entry_round_trips_through_its_32_bytes() {
    let mut e = OtaSelectEntry::new(7, OtaState::PendingVerify);
    e.seq_label[3] = 0x42;
    let b = e.to_bytes();
    assert_eq!(&b[0..4], &[7, 0, 0, 0]);
    assert_eq!(b[4 + 3], 0x42);
    assert_eq!(&b[24..28], &[1, 0, 0, 0]);
    assert_eq!(&b[28..32], &ota_seq_crc(7).to_le_bytes());
    assert_eq!(OtaSelectEntry::from_bytes(&b), e);
}

#[test]
fn states_round_trip_through_their_raw_values() {
    for (v, s) in [
        (0, OtaState::New),
        (1, OtaState::PendingVerify),
        (2, OtaState::Valid),
        (3, OtaState::Invalid),
        (4, OtaState::Aborted),
        (0xFFFF_FFFF, OtaState::Undefined),
        (5, OtaState::Unknown(5)),
    ] {
        assert_eq!(OtaState::from_u32(v), s);
        assert_eq!(s.to_u32(), v);
    }
}

#[test]
fn blank_otadata_has_no_active_entry_and_selects_nothing() {
    let mut f = flash();
    let o = read(&mut f);
    assert_eq!(o.checks(), [EntryCheck::Blank, EntryCheck::Blank]);
    assert_eq!(o.active(), None);
    assert_eq!(o.selected_slot(2), None);
}

#[test]
fn of_two_valid_entries_the_higher_sequence_wins() {
    let mut f = flash();
    plant(&mut f, 0, OtaSelectEntry::new(5, OtaState::Valid));
    plant(&mut f, 1, OtaSelectEntry::new(4, OtaState::Valid));
    assert_eq!(read(&mut f).active(), Some(0));
    assert_eq!(read(&mut f).selected_slot(2), Some(0));
    plant(&mut f, 1, OtaSelectEntry::new(6, OtaState::Valid));
    assert_eq!(read(&mut f).active(), Some(1));
    assert_eq!(read(&mut f).selected_slot(2), Some(1));
    assert_eq!(read(&mut f).selected_slot(3), Some(2));
}

#[test]
fn equal_sequences_go_to_entry_zero() {
    let mut f = flash();
    plant(&mut f, 0, OtaSelectEntry::new(3, OtaState::Valid));
    plant(&mut f, 1, OtaSelectEntry::new(3, OtaState::Valid));
    assert_eq!(read(&mut f).active(), Some(0));
}

#[test]
fn a_corrupt_crc_in_entry_zero_leaves_entry_one_active() {
    let mut f = flash();
    plant(&mut f, 0, OtaSelectEntry::new(9, OtaState::Valid));
    plant(&mut f, 1, OtaSelectEntry::new(8, OtaState::Valid));
    corrupt_crc(&mut f, 0);
    let o = read(&mut f);
    assert_eq!(o.checks(), [EntryCheck::BadCrc, EntryCheck::Valid]);
    assert_eq!(o.active(), Some(1));
    assert_eq!(o.selected_slot(2), Some(1));
}

#[test]
fn a_corrupt_crc_in_entry_one_leaves_entry_zero_active() {
    let mut f = flash();
    plant(&mut f, 0, OtaSelectEntry::new(8, OtaState::Valid));
    plant(&mut f, 1, OtaSelectEntry::new(9, OtaState::Valid));
    corrupt_crc(&mut f, 1);
    let o = read(&mut f);
    assert_eq!(o.checks(), [EntryCheck::Valid, EntryCheck::BadCrc]);
    assert_eq!(o.active(), Some(0));
}

#[test]
fn corrupt_crcs_in_both_entries_leave_no_active_entry() {
    let mut f = flash();
    plant(&mut f, 0, OtaSelectEntry::new(1, OtaState::Valid));
    plant(&mut f, 1, OtaSelectEntry::new(2, OtaState::Valid));
    corrupt_crc(&mut f, 0);
    corrupt_crc(&mut f, 1);
    assert_eq!(read(&mut f).active(), None);
}

#[test]
fn invalid_and_aborted_entries_are_skipped_even_with_a_higher_sequence() {
    for state in [OtaState::Invalid, OtaState::Aborted] {
        let mut f = flash();
        plant(&mut f, 0, OtaSelectEntry::new(1, OtaState::Valid));
        plant(&mut f, 1, OtaSelectEntry::new(2, state));
        let o = read(&mut f);
        assert_eq!(o.checks(), [EntryCheck::Valid, EntryCheck::Rejected]);
        assert_eq!(o.active(), Some(0), "{state:?}");
        assert_eq!(o.selected_slot(2), Some(0));
    }
}

#[test]
fn new_pending_valid_undefined_and_unknown_states_are_all_selectable() {
    for state in [
        OtaState::New,
        OtaState::PendingVerify,
        OtaState::Valid,
        OtaState::Undefined,
        OtaState::Unknown(77),
    ] {
        let mut f = flash();
        plant(&mut f, 0, OtaSelectEntry::new(1, OtaState::Valid));
        plant(&mut f, 1, OtaSelectEntry::new(2, state));
        assert_eq!(read(&mut f).active(), Some(1), "{state:?}");
    }
}

#[test]
fn a_blank_sequence_with_other_bytes_written_is_not_blank_and_not_valid() {
    let mut f = flash();
    plant(&mut f, 0, OtaSelectEntry::new(SEQ_BLANK, OtaState::Valid));
    assert_eq!(read(&mut f).checks()[0], EntryCheck::NoSequence);
    assert_eq!(read(&mut f).active(), None);
}

#[test]
fn sequence_zero_maps_like_the_bootloaders_unsigned_arithmetic() {
    let e = OtaSelectEntry::new(0, OtaState::Valid);
    assert!(e.is_valid());
    assert_eq!(e.slot(2), Some(1));
    assert_eq!(e.slot(3), Some(0));
    assert_eq!(e.slot(0), None);
}

#[test]
fn from_blank_set_boot_slot_writes_seq_slot_plus_one_into_entry_zero() {
    for slot in 0..2 {
        let mut f = flash();
        let w = set_boot_slot(&mut f, OFF, slot, 2, OtaState::Undefined).unwrap();
        assert_eq!(
            w,
            BootSlotWrite {
                entry: 0,
                seq: slot as u32 + 1
            }
        );
        let o = read(&mut f);
        assert_eq!(o.selected_slot(2), Some(slot));
        assert_eq!(o.checks(), [EntryCheck::Valid, EntryCheck::Blank]);
        assert_eq!(o.entries[0].state(), OtaState::Undefined);
    }
}

#[test]
fn from_blank_straight_to_the_last_slot_never_writes_sequence_zero() {
    // esp-bootloader-esp-idf 0.6.0 computed (slot + 1) % n here and wrote 0.
    for n in [2usize, 3, 4, 16] {
        let mut f = flash();
        let w = set_boot_slot(&mut f, OFF, n - 1, n, OtaState::New).unwrap();
        assert_eq!(w.seq, n as u32, "{n} slots");
        let o = read(&mut f);
        assert_eq!(o.entries[0].seq, n as u32);
        assert_eq!(o.selected_slot(n), Some(n - 1), "{n} slots");
    }
}

#[test]
fn switching_slots_writes_the_next_sequence_into_the_inactive_entry() {
    let mut f = flash();
    set_boot_slot(&mut f, OFF, 0, 2, OtaState::Undefined).unwrap();
    let before = f.data()[OFF as usize..OFF as usize + ENTRY_SIZE].to_vec();
    let w = set_boot_slot(&mut f, OFF, 1, 2, OtaState::New).unwrap();
    assert_eq!(w, BootSlotWrite { entry: 1, seq: 2 });
    // The active entry's sector was not touched.
    assert_eq!(
        &f.data()[OFF as usize..OFF as usize + ENTRY_SIZE],
        &before[..]
    );
    let o = read(&mut f);
    assert_eq!(o.active(), Some(1));
    assert_eq!(o.selected_slot(2), Some(1));
    assert_eq!(o.entries[1].state(), OtaState::New);
    let w = set_boot_slot(&mut f, OFF, 0, 2, OtaState::New).unwrap();
    assert_eq!(w, BootSlotWrite { entry: 0, seq: 3 });
    assert_eq!(read(&mut f).selected_slot(2), Some(0));
}

#[test]
fn reselecting_the_current_slot_moves_a_full_round_ahead_in_the_other_sector() {
    let mut f = flash();
    set_boot_slot(&mut f, OFF, 1, 3, OtaState::Valid).unwrap();
    let w = set_boot_slot(&mut f, OFF, 1, 3, OtaState::New).unwrap();
    assert_eq!(w, BootSlotWrite { entry: 1, seq: 5 });
    assert_eq!(read(&mut f).selected_slot(3), Some(1));
}

#[test]
fn set_boot_slot_ignores_a_rejected_entry_and_overwrites_it() {
    let mut f = flash();
    plant(&mut f, 0, OtaSelectEntry::new(4, OtaState::Valid)); // slot 1
    plant(&mut f, 1, OtaSelectEntry::new(5, OtaState::Aborted));
    let w = set_boot_slot(&mut f, OFF, 0, 2, OtaState::New).unwrap();
    assert_eq!(w, BootSlotWrite { entry: 1, seq: 5 });
    assert_eq!(read(&mut f).selected_slot(2), Some(0));
}

#[test]
fn set_boot_slot_after_a_corrupt_active_candidate_uses_the_valid_one() {
    let mut f = flash();
    plant(&mut f, 0, OtaSelectEntry::new(10, OtaState::Valid));
    plant(&mut f, 1, OtaSelectEntry::new(11, OtaState::Valid));
    corrupt_crc(&mut f, 1);
    let w = set_boot_slot(&mut f, OFF, 0, 2, OtaState::New).unwrap();
    assert_eq!(w, BootSlotWrite { entry: 1, seq: 11 });
    assert_eq!(
        read(&mut f).checks(),
        [EntryCheck::Valid, EntryCheck::Valid]
    );
    assert_eq!(read(&mut f).selected_slot(2), Some(0));
}

#[test]
fn sequences_near_the_top_still_select_the_slot_asked() {
    let mut f = flash();
    plant(&mut f, 0, OtaSelectEntry::new(0xFFFF_FFF0, OtaState::Valid));
    let w = set_boot_slot(&mut f, OFF, 0, 2, OtaState::New).unwrap();
    assert!(w.seq > 0xFFFF_FFF0);
    assert_eq!(read(&mut f).selected_slot(2), Some(0));
}

#[test]
fn the_sequence_never_wraps_into_the_blank_value() {
    let mut f = flash();
    // slot (0xFFFFFFFE - 1) % 2 = 1; the next seq for slot 0 would be 0xFFFFFFFF.
    plant(&mut f, 0, OtaSelectEntry::new(0xFFFF_FFFE, OtaState::Valid));
    let snapshot = f.data().to_vec();
    assert_eq!(
        set_boot_slot(&mut f, OFF, 0, 2, OtaState::New),
        Err(OtadataError::SequenceExhausted)
    );
    assert_eq!(f.data(), &snapshot[..], "nothing written");
    // Reselecting slot 1 would need 0xFFFFFFFE + 2, past the top.
    assert_eq!(
        set_boot_slot(&mut f, OFF, 1, 2, OtaState::New),
        Err(OtadataError::SequenceExhausted)
    );
    // With three slots the next seq for slot 0 above 0xFFFFFFFE would be 0x1_0000_0000.
    assert_eq!(
        set_boot_slot(&mut f, OFF, 0, 3, OtaState::New),
        Err(OtadataError::SequenceExhausted)
    );
}

#[test]
fn the_largest_usable_sequence_is_accepted() {
    let mut f = flash();
    plant(&mut f, 0, OtaSelectEntry::new(0xFFFF_FFFC, OtaState::Valid));
    // (0xFFFFFFFE - 1) % 2 == 1
    let w = set_boot_slot(&mut f, OFF, 1, 2, OtaState::New).unwrap();
    assert_eq!(w.seq, 0xFFFF_FFFE);
    assert_eq!(read(&mut f).selected_slot(2), Some(1));
}

#[test]
fn a_slot_out_of_range_is_refused() {
    let mut f = flash();
    assert_eq!(
        set_boot_slot(&mut f, OFF, 2, 2, OtaState::New),
        Err(OtadataError::SlotOutOfRange {
            slot: 2,
            slot_count: 2
        })
    );
    assert_eq!(
        set_boot_slot(&mut f, OFF, 0, 0, OtaState::New),
        Err(OtadataError::SlotOutOfRange {
            slot: 0,
            slot_count: 0
        })
    );
}

#[test]
fn an_unaligned_otadata_offset_is_refused() {
    let mut f = flash();
    assert_eq!(
        set_boot_slot(&mut f, OFF + 4, 0, 2, OtaState::New),
        Err(OtadataError::BadLayout)
    );
}

#[test]
fn a_cut_anywhere_in_set_boot_slot_boots_the_old_or_the_new_slot() {
    let mut clean = flash();
    set_boot_slot(&mut clean, OFF, 0, 2, OtaState::Valid).unwrap();
    let bytes = ENTRY_SIZE as u64 + SECTOR_SIZE as u64;
    for budget in 0..bytes {
        let mut f = clean.clone();
        f.cut_power_after_bytes(budget);
        let r = set_boot_slot(&mut f, OFF, 1, 2, OtaState::New);
        f.power_on();
        let slot = read(&mut f).selected_slot(2);
        match r {
            Ok(_) => assert_eq!(slot, Some(1)),
            Err(_) => assert!(
                slot == Some(0) || slot == Some(1),
                "budget {budget}: {slot:?}"
            ),
        }
    }
}

#[test]
fn from_partition_bytes_matches_reading_flash() {
    let mut f = flash();
    set_boot_slot(&mut f, OFF, 1, 2, OtaState::New).unwrap();
    set_boot_slot(&mut f, OFF, 0, 2, OtaState::New).unwrap();
    let bytes = f.data()[OFF as usize..(OFF + OTADATA_SIZE) as usize].to_vec();
    assert_eq!(Otadata::from_partition_bytes(&bytes), read(&mut f));
    // Short input reads as erased.
    let short = Otadata::from_partition_bytes(&bytes[..10]);
    assert_eq!(short.entries[1].check(), EntryCheck::Blank);
}

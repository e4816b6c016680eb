//! Arbitrary bytes as the two otadata entries: reading never panics, and
//! `set_boot_slot` followed by a read selects the slot asked for (or refuses
//! with an error and leaves the selection as it was).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqota_core::otadata::{
    self, OtaState, Otadata, OtadataError, ENTRY_SIZE, OTADATA_SIZE, SECTOR_SIZE,
};
use mqota_flash_sim::SimFlash;

const OFF: u32 = 0x1000;

fuzz_target!(|data: &[u8]| {
    // Four control bytes, then the first 32 bytes of each sector (all the
    // bootloader reads of it); the rest of both sectors stays erased. Random
    // CRCs almost never match, so a flag byte can repair them to reach the
    // paths with valid entries.
    let (slot_count, slot, state, flags, image) = match data {
        [a, b, c, d, rest @ ..] => (*a as usize % 16 + 1, *b as usize, *c, *d, rest),
        _ => return,
    };
    let slot = slot % slot_count;
    let mut bytes = vec![0xFF; (OFF + OTADATA_SIZE) as usize];
    for (i, chunk) in image.chunks(ENTRY_SIZE).take(2).enumerate() {
        let at = (OFF + i as u32 * SECTOR_SIZE) as usize;
        bytes[at..at + chunk.len()].copy_from_slice(chunk);
        if flags & (1 << i) != 0 {
            let seq = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
            bytes[at + 28..at + 32].copy_from_slice(&otadata::ota_seq_crc(seq).to_le_bytes());
        }
    }
    let mut flash = SimFlash::from_bytes(bytes);

    let before = Otadata::read(&mut flash, OFF).unwrap();
    let _ = before.checks();
    assert_eq!(
        before.active().is_some(),
        before.checks().contains(&otadata::EntryCheck::Valid)
    );

    let state = match state % 3 {
        0 => OtaState::New,
        1 => OtaState::Undefined,
        _ => OtaState::Valid,
    };
    match otadata::set_boot_slot(&mut flash, OFF, slot, slot_count, state) {
        Ok(w) => {
            let after = Otadata::read(&mut flash, OFF).unwrap();
            assert_eq!(after.selected_slot(slot_count), Some(slot));
            assert_eq!(after.active(), Some(w.entry));
            assert_eq!(after.entries[w.entry].state(), state);
            if let Some(old) = before.active_entry() {
                assert!(w.seq > old.seq);
                // The entry that was active is untouched.
                assert_eq!(after.entries[1 - w.entry], before.entries[1 - w.entry]);
            }
        }
        Err(OtadataError::SequenceExhausted) => {
            let after = Otadata::read(&mut flash, OFF).unwrap();
            assert_eq!(after, before);
            assert!(before.active_entry().unwrap().seq > u32::MAX - 2 * slot_count as u32);
        }
        Err(e) => panic!("unexpected error {e:?}"),
    }
});

//! The trust state on the NOR flash model: sequence numbers and the
//! secure_version floor survive reboots, and a power cut at any flash
//! operation of a write leaves the old value or the new one, never less.

// The clock of the runtime's timers on the host.
use mqota_host_time as _;

use embassy_futures::block_on;
use mqota_flash_sim::SimFlash;
use mqota_runtime::trust::TrustState;

const RANGE: core::ops::Range<u32> = 0x2000..0x4000;

fn flash() -> SimFlash {
    SimFlash::new(0x10000)
}

#[test]
fn values_survive_a_reboot_and_only_grow() {
    let mut f = flash();
    let mut s = block_on(TrustState::open_range(&mut f, RANGE));
    assert_eq!((s.seq(), s.floor()), (None, 0));
    assert!(s.persistent());
    block_on(s.accept_seq(&mut f, 10)).unwrap();
    block_on(s.raise_floor(&mut f, 3)).unwrap();
    // Not fresh: refused, nothing written.
    assert!(block_on(s.accept_seq(&mut f, 10)).is_err());
    assert!(block_on(s.accept_seq(&mut f, 9)).is_err());
    // A lower floor is not a raise.
    block_on(s.raise_floor(&mut f, 1)).unwrap();
    let again = block_on(TrustState::open_range(&mut f, RANGE));
    assert_eq!((again.seq(), again.floor()), (Some(10), 3));
    assert!(!again.is_fresh(10) && again.is_fresh(11));
}

#[test]
fn many_writes_wrap_the_two_sectors_and_keep_the_newest() {
    let mut f = flash();
    let mut s = block_on(TrustState::open_range(&mut f, RANGE));
    for seq in 1..=2_000u64 {
        block_on(s.accept_seq(&mut f, seq)).unwrap();
        if seq % 100 == 0 {
            block_on(s.raise_floor(&mut f, (seq / 100) as u32)).unwrap();
        }
    }
    let again = block_on(TrustState::open_range(&mut f, RANGE));
    assert_eq!((again.seq(), again.floor()), (Some(2_000), 20));
}

#[test]
fn a_power_cut_at_every_flash_operation_keeps_the_old_or_the_new_value() {
    // Enough writes before the cut that the map has to erase a sector too.
    for before in [1u64, 150, 300] {
        let mut cut_at = 0;
        loop {
            let mut f = flash();
            let mut s = block_on(TrustState::open_range(&mut f, RANGE));
            for seq in 1..=before {
                block_on(s.accept_seq(&mut f, seq)).unwrap();
            }
            f.cut_power_after_ops(cut_at);
            let done = block_on(s.accept_seq(&mut f, before + 1)).is_ok() && f.is_powered();
            f.power_on();
            let after = block_on(TrustState::open_range(&mut f, RANGE));
            let seq = after.seq();
            assert!(
                seq == Some(before) || seq == Some(before + 1),
                "cut after {cut_at} ops with {before} written: read {seq:?}"
            );
            if done {
                assert_eq!(seq, Some(before + 1));
                break;
            }
            cut_at += 1;
            assert!(cut_at < 64, "the write never completed");
        }
    }
}

#[test]
fn the_default_table_has_the_state_partition() {
    use embedded_storage::nor_flash::NorFlash as _;
    use mqota_core::partition::{PartitionTable, DEFAULT_4MB_CSV, TABLE_OFFSET};
    let mut f = SimFlash::new(4 * 1024 * 1024);
    let table = PartitionTable::from_csv(DEFAULT_4MB_CSV).unwrap();
    f.write(TABLE_OFFSET, &table.to_bytes()).unwrap();
    let mut s = block_on(TrustState::open(&mut f));
    assert!(s.persistent());
    block_on(s.accept_seq(&mut f, 42)).unwrap();
    assert_eq!(block_on(TrustState::open(&mut f)).seq(), Some(42));
}

#[test]
fn a_power_cut_at_every_flash_operation_of_a_floor_raise_keeps_the_old_or_the_new_floor() {
    for before in [1u32, 150, 300] {
        let mut cut_at = 0;
        loop {
            let mut f = flash();
            let mut s = block_on(TrustState::open_range(&mut f, RANGE));
            for floor in 1..=before {
                block_on(s.raise_floor(&mut f, floor)).unwrap();
            }
            // The sequence number written meanwhile must survive too.
            block_on(s.accept_seq(&mut f, 7)).unwrap();
            f.cut_power_after_ops(cut_at);
            let done = block_on(s.raise_floor(&mut f, before + 1)).is_ok() && f.is_powered();
            f.power_on();
            let after = block_on(TrustState::open_range(&mut f, RANGE));
            assert!(
                after.floor() == before || after.floor() == before + 1,
                "cut after {cut_at} ops with floor {before}: read {}",
                after.floor()
            );
            assert_eq!(after.seq(), Some(7), "cut after {cut_at} ops");
            if done {
                assert_eq!(after.floor(), before + 1);
                break;
            }
            cut_at += 1;
            assert!(cut_at < 64, "the write never completed");
        }
    }
}

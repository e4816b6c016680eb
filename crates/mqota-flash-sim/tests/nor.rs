//! The NOR model behaves like the chip: bit-clearing writes, sector erase,
//! power cuts that tear operations, a file that outlives the process, timing.

use std::sync::Arc;
use std::time::Duration;

use embedded_storage::nor_flash::{NorFlash, ReadNorFlash};
use mqota_flash_sim::{SimError, SimFlash, Timing};

const SIZE: usize = 64 * 1024 * 2;

/// The same erased flash kept three ways, so every rule below is checked on
/// each: no base image at all, an erased base shared with another flash, and
/// a shared base full of data whose every sector was then erased (a copy
/// over the base must never leak it).
fn erased_flashes() -> [(&'static str, SimFlash); 3] {
    let erased: Arc<[u8]> = vec![0xFF; SIZE].into();
    let full: Arc<[u8]> = pattern(SIZE).into();
    let mut over_data = SimFlash::from_shared(full);
    over_data.erase(0, SIZE as u32).unwrap();
    over_data.reset_stats();
    [
        ("no base", SimFlash::new(SIZE)),
        ("erased shared base", SimFlash::from_shared(erased)),
        ("erased over a shared base", over_data),
    ]
}

/// Names the kind of flash of a failing check.
struct Kind(&'static str);

impl Drop for Kind {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("failed on the flash with {}", self.0);
        }
    }
}

fn read_vec<F: ReadNorFlash>(flash: &mut F, offset: u32, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    flash.read(offset, &mut buf).unwrap();
    buf
}

#[test]
fn a_new_flash_reads_erased() {
    for (kind, mut f) in erased_flashes() {
        let _failing = Kind(kind);
        assert_eq!(f.capacity(), SIZE);
        assert!(read_vec(&mut f, 0, SIZE).iter().all(|&b| b == 0xFF));
    }
}

#[test]
fn a_write_clears_bits_and_reads_back() {
    for (kind, mut f) in erased_flashes() {
        let _failing = Kind(kind);
        f.write(8, &[0x12, 0x34, 0x56, 0x78]).unwrap();
        assert_eq!(
            read_vec(&mut f, 6, 8),
            [0xFF, 0xFF, 0x12, 0x34, 0x56, 0x78, 0xFF, 0xFF]
        );
    }
}

#[test]
fn a_write_that_would_set_bits_fails() {
    for (kind, mut f) in erased_flashes() {
        let _failing = Kind(kind);
        f.write(0, &[0x0F, 0xFF, 0xFF, 0xFF]).unwrap();
        let err = f.write(0, &[0xF0, 0xFF, 0xFF, 0xFF]).unwrap_err();
        assert_eq!(err, SimError::WouldSetBits { offset: 0 });
        // Nothing of the refused write reached the cells.
        assert_eq!(read_vec(&mut f, 0, 4), [0x0F, 0xFF, 0xFF, 0xFF]);
    }
}

#[test]
fn rewriting_a_word_to_clear_more_bits_is_allowed() {
    for (kind, mut f) in erased_flashes() {
        let _failing = Kind(kind);
        f.write(0, &[0x0F, 0xFF, 0xFF, 0xFF]).unwrap();
        f.write(0, &[0x03, 0xFF, 0x7F, 0xFF]).unwrap();
        assert_eq!(read_vec(&mut f, 0, 4), [0x03, 0xFF, 0x7F, 0xFF]);
    }
}

#[test]
fn without_strict_mode_a_write_ands_like_the_chip() {
    for (kind, mut f) in erased_flashes() {
        let _failing = Kind(kind);
        f.set_strict(false);
        f.write(0, &[0x0F, 0xAA, 0xFF, 0xFF]).unwrap();
        f.write(0, &[0xF3, 0xFF, 0x00, 0xFF]).unwrap();
        assert_eq!(read_vec(&mut f, 0, 4), [0x03, 0xAA, 0x00, 0xFF]);
    }
}

#[test]
fn misaligned_writes_and_erases_are_errors() {
    for (kind, mut f) in erased_flashes() {
        let _failing = Kind(kind);
        assert_eq!(f.write(2, &[0; 4]), Err(SimError::NotAligned));
        assert_eq!(f.write(0, &[0; 3]), Err(SimError::NotAligned));
        assert_eq!(f.erase(0, 100), Err(SimError::NotAligned));
        assert_eq!(f.erase(512, 4096), Err(SimError::NotAligned));
        assert_eq!(f.stats().mutating_ops(), 0);
    }
}

#[test]
fn out_of_range_operations_are_errors() {
    for (kind, mut f) in erased_flashes() {
        let _failing = Kind(kind);
        let end = SIZE as u32;
        assert_eq!(f.write(end - 4, &[0; 8]), Err(SimError::OutOfBounds));
        assert_eq!(f.read(end - 1, &mut [0; 2]), Err(SimError::OutOfBounds));
        assert_eq!(f.read(u32::MAX, &mut [0; 2]), Err(SimError::OutOfBounds));
        assert_eq!(f.erase(end, end + 4096), Err(SimError::OutOfBounds));
        assert_eq!(f.erase(8192, 4096), Err(SimError::OutOfBounds));
    }
}

#[test]
fn erase_restores_whole_sectors_only() {
    for (kind, mut f) in erased_flashes() {
        let _failing = Kind(kind);
        f.write(4092, &[0; 8]).unwrap(); // straddles sectors 0 and 1
        f.erase(4096, 8192).unwrap();
        assert_eq!(
            read_vec(&mut f, 4092, 8),
            [0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF]
        );
        f.write(4096, &[0x11; 4]).unwrap();
        assert_eq!(read_vec(&mut f, 4096, 4), [0x11; 4]);
    }
}

#[test]
fn counters_track_operations_and_bytes() {
    for (kind, mut f) in erased_flashes() {
        let _failing = Kind(kind);
        f.erase(0, 8192).unwrap();
        f.write(0, &[0; 16]).unwrap();
        read_vec(&mut f, 0, 100);
        let s = f.stats();
        assert_eq!((s.reads, s.writes, s.erases), (1, 1, 1));
        assert_eq!(
            (s.bytes_read, s.bytes_written, s.bytes_erased),
            (100, 16, 8192)
        );
        assert_eq!((s.sector_erases, s.block_erases), (2, 0));
        f.reset_stats();
        assert_eq!(f.stats().mutating_ops(), 0);
        assert_eq!(f.elapsed(), Duration::ZERO);
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 1) as u8 & 0x7F).collect()
}

#[test]
fn a_cut_after_n_operations_lets_n_complete_and_stops_the_next() {
    for (kind, mut f) in erased_flashes() {
        let _failing = Kind(kind);
        f.cut_power_after_ops(2);
        f.write(0, &[0x01; 4]).unwrap();
        f.write(4, &[0x02; 4]).unwrap();
        assert_eq!(f.write(8, &[0x03; 4]), Err(SimError::PowerCut));
        assert!(!f.is_powered());
        // Everything fails until the reboot, reads included.
        assert_eq!(f.read(0, &mut [0; 4]), Err(SimError::PowerCut));
        assert_eq!(f.erase(0, 4096), Err(SimError::PowerCut));
        f.power_on();
        assert_eq!(
            read_vec(&mut f, 0, 12),
            [1, 1, 1, 1, 2, 2, 2, 2, 0xFF, 0xFF, 0xFF, 0xFF]
        );
        // The plan is gone after the reboot.
        f.write(8, &[0x03; 4]).unwrap();
    }
}

#[test]
fn a_cut_mid_write_leaves_a_prefix() {
    for (kind, mut f) in erased_flashes() {
        let _failing = Kind(kind);
        let data = pattern(256);
        f.cut_power_after_bytes(100);
        assert_eq!(f.write(4096, &data), Err(SimError::PowerCut));
        f.power_on();
        let got = read_vec(&mut f, 4096, 256);
        assert_eq!(&got[..100], &data[..100]);
        assert!(got[100..].iter().all(|&b| b == 0xFF));
    }
}

#[test]
fn a_byte_budget_ending_on_an_operation_boundary_cuts_the_next_one() {
    for (kind, mut f) in erased_flashes() {
        let _failing = Kind(kind);
        f.cut_power_after_bytes(8);
        f.write(0, &[0; 8]).unwrap();
        assert_eq!(f.write(8, &[0; 4]), Err(SimError::PowerCut));
        f.power_on();
        assert_eq!(read_vec(&mut f, 8, 4), [0xFF; 4]);
    }
}

#[test]
fn a_cut_mid_erase_leaves_a_sector_that_is_neither_old_nor_erased() {
    for (kind, mut f) in erased_flashes() {
        let _failing = Kind(kind);
        let old = pattern(4096);
        f.write(8192, &old).unwrap();
        f.cut_power_after_bytes(1500);
        assert_eq!(f.erase(8192, 12288), Err(SimError::PowerCut));
        f.power_on();
        let got = read_vec(&mut f, 8192, 4096);
        assert_ne!(got, old, "a cut erase must not leave the old data");
        assert!(
            got.iter().any(|&b| b != 0xFF),
            "a cut erase must not leave it erased"
        );
        assert!(got[..1500].iter().all(|&b| b == 0xFF));
        assert_eq!(&got[1500..], &old[1500..]);
    }
}

#[test]
fn a_cut_in_a_multi_sector_erase_finishes_earlier_sectors_only() {
    for (kind, mut f) in erased_flashes() {
        let _failing = Kind(kind);
        f.write(0, &pattern(3 * 4096)).unwrap();
        f.cut_power_after_bytes(4096 + 10);
        assert_eq!(f.erase(0, 3 * 4096), Err(SimError::PowerCut));
        f.power_on();
        let got = read_vec(&mut f, 0, 3 * 4096);
        assert!(got[..4106].iter().all(|&b| b == 0xFF));
        assert_eq!(&got[4106..], &pattern(3 * 4096)[4106..]);
    }
}

#[test]
fn a_block_erase_is_cheaper_than_sixteen_sector_erases() {
    let mut block = SimFlash::new(SIZE);
    block.erase(0, 65536).unwrap();
    assert_eq!(block.stats().block_erases, 1);
    assert_eq!(block.stats().sector_erases, 0);
    assert_eq!(block.elapsed(), Timing::TYPICAL.block_erase);

    let mut sectors = SimFlash::new(SIZE);
    for s in 0..16u32 {
        sectors.erase(s * 4096, (s + 1) * 4096).unwrap();
    }
    assert_eq!(sectors.stats().sector_erases, 16);
    assert_eq!(sectors.elapsed(), Timing::TYPICAL.sector_erase * 16);
    assert!(block.elapsed() < sectors.elapsed());
}

#[test]
fn an_unaligned_64k_range_costs_sector_erases() {
    for (kind, mut f) in erased_flashes() {
        let _failing = Kind(kind);
        f.erase(4096, 4096 + 65536).unwrap();
        assert_eq!(f.stats().block_erases, 0);
        assert_eq!(f.stats().sector_erases, 16);
    }
}

#[test]
fn a_write_costs_one_program_per_page_touched() {
    for (kind, mut f) in erased_flashes() {
        let _failing = Kind(kind);
        f.write(0, &[0; 256]).unwrap();
        assert_eq!(f.elapsed(), Timing::TYPICAL.page_program);
        f.reset_stats();
        // 8 bytes straddling a page boundary touch two pages.
        f.write(252, &[0; 8]).unwrap();
        assert_eq!(f.elapsed(), Timing::TYPICAL.page_program * 2);
    }
}

#[test]
fn reads_cost_time_at_quad_spi_speed() {
    for (kind, mut f) in erased_flashes() {
        let _failing = Kind(kind);
        read_vec(&mut f, 0, 40_000);
        // 40 MB/s: 40 kB in one millisecond.
        assert_eq!(f.elapsed(), Duration::from_millis(1));
    }
}

#[test]
fn the_file_backed_flash_persists_across_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flash.bin");
    {
        let mut f = SimFlash::open_file(&path, SIZE, false).unwrap();
        assert!(read_vec(&mut f, 0, 16).iter().all(|&b| b == 0xFF));
        f.write(4096, &[1, 2, 3, 4]).unwrap();
        // A torn write reaches the file too.
        f.cut_power_after_bytes(4);
        assert_eq!(
            f.write(8192, &[5, 6, 7, 8, 9, 10, 11, 12]),
            Err(SimError::PowerCut)
        );
    }
    assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE as u64);
    let mut f = SimFlash::open_file(&path, SIZE, true).unwrap();
    assert_eq!(read_vec(&mut f, 4096, 4), [1, 2, 3, 4]);
    assert_eq!(
        read_vec(&mut f, 8192, 8),
        [5, 6, 7, 8, 0xFF, 0xFF, 0xFF, 0xFF]
    );
    f.erase(4096, 8192).unwrap();
    drop(f);
    let bytes = std::fs::read(&path).unwrap();
    assert!(bytes[4096..8192].iter().all(|&b| b == 0xFF));
}

#[test]
fn the_file_backed_flash_refuses_a_file_of_the_wrong_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flash.bin");
    std::fs::write(&path, [0u8; 100]).unwrap();
    let err = SimFlash::open_file(&path, SIZE, false).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
}

#[test]
fn flashes_sharing_a_base_never_see_each_others_changes() {
    let base: Arc<[u8]> = pattern(SIZE).into();
    let mut a = SimFlash::from_shared(base.clone());
    let mut b = SimFlash::from_shared(base.clone());
    // The base's bits can only be cleared, as in any programmed cell.
    assert_eq!(
        a.write(4096, &[0xFF; 4]),
        Err(SimError::WouldSetBits { offset: 4096 })
    );
    a.write(4096, &[0; 4]).unwrap();
    b.erase(4096, 8192).unwrap();
    assert_eq!(read_vec(&mut a, 4096, 8)[..4], [0; 4]);
    assert_eq!(read_vec(&mut a, 4100, 4092), &base[4100..8192]);
    assert!(read_vec(&mut b, 4096, 4096).iter().all(|&x| x == 0xFF));
    assert_eq!(
        read_vec(&mut SimFlash::from_shared(base.clone()), 0, SIZE),
        &base[..]
    );
    assert_eq!(&*a.snapshot().data(), &a.data()[..]);
}

#[test]
fn a_flash_holds_only_the_sectors_written_since_it_was_made() {
    let base: Arc<[u8]> = pattern(SIZE).into();
    let mut f = SimFlash::from_shared(base);
    assert_eq!(f.private_bytes(), 0);
    // Reads, and a program that clears no bit, copy nothing.
    read_vec(&mut f, 0, SIZE);
    f.write(0, &pattern(4)).unwrap();
    assert_eq!(f.private_bytes(), 0);
    // A write straddling two sectors copies both; a cut erase, one.
    f.write(4092, &[0; 8]).unwrap();
    assert_eq!(f.private_bytes(), 2 * 4096);
    f.cut_power_after_bytes(100);
    assert_eq!(f.erase(16384, 20480), Err(SimError::PowerCut));
    f.power_on();
    assert_eq!(f.private_bytes(), 3 * 4096);
    // Whole-sector erases give the copies back.
    f.erase(0, 8192).unwrap();
    f.erase(16384, 20480).unwrap();
    assert_eq!(f.private_bytes(), 0);
    // An erased flash with no base allocates nothing for erased sectors.
    let mut e = SimFlash::new(SIZE);
    e.erase(0, SIZE as u32).unwrap();
    assert_eq!(e.private_bytes(), 0);
    e.write(65536, &[1, 2, 3, 4]).unwrap();
    assert_eq!(e.private_bytes(), 4096);
}

#[test]
fn planted_corruption_changes_only_what_it_touches() {
    let base: Arc<[u8]> = pattern(SIZE).into();
    let mut f = SimFlash::from_shared(base.clone());
    f.raw_mut()[5000] ^= 0x80;
    assert_eq!(f.private_bytes(), 4096);
    assert_eq!(f.stats().mutating_ops(), 0);
    let got = read_vec(&mut f, 0, SIZE);
    assert_eq!(got[5000], base[5000] ^ 0x80);
    assert_eq!(&got[..5000], &base[..5000]);
    assert_eq!(&got[5001..], &base[5001..]);
}

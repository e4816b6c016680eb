//! A small in-memory NOR flash for the core's own tests (feature
//! `mock-flash`), so the core is tested without depending on the host
//! models built on top of it (as embassy-boot and sequential-storage keep
//! their test flashes beside the code).
//!
//! It keeps the rules the engine and the formats rely on: a write can only
//! clear bits (setting one is an error, not a silent AND), writes are whole
//! aligned 4-byte words, erase is by whole 4 KiB sectors, and every access
//! stays inside the chip. It counts the erase commands a real chip would
//! receive (64 KiB blocks where aligned and whole, sectors elsewhere), which
//! is what the engine's erase-ahead is judged by, and it can cut the power
//! after a number of bytes, leaving the write or erase in progress torn, so
//! a format's writer can be checked at every byte.
//!
//! Timing, file backing, operation-counted cuts and the bootloader are not
//! here: those live in `mqota-flash-sim`, and the tests that need them (the
//! boot guard against the bootloader model, the power-cut sweeps over whole
//! updates) live in the workspace's end-to-end test crate.

use alloc::vec;
use alloc::vec::Vec;

use embedded_storage::nor_flash::{
    ErrorType, MultiwriteNorFlash, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash,
};

use crate::layout::{BLOCK_SIZE, SECTOR_SIZE, WORD_SIZE};

/// Why an access was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MockFlashError {
    /// Offset or length not a multiple of the write word or erase sector.
    NotAligned,
    /// The range runs past the end of the chip.
    OutOfBounds,
    /// A write would set a bit that is 0: NOR needs an erase first.
    WouldSetBits {
        /// The first byte that would change from 0 to 1.
        offset: u32,
    },
    /// The power was cut ([`MockFlash::cut_power_after_bytes`]): nothing
    /// works until [`MockFlash::power_on`].
    PowerCut,
}

impl NorFlashError for MockFlashError {
    fn kind(&self) -> NorFlashErrorKind {
        match self {
            MockFlashError::NotAligned => NorFlashErrorKind::NotAligned,
            MockFlashError::OutOfBounds => NorFlashErrorKind::OutOfBounds,
            MockFlashError::WouldSetBits { .. } | MockFlashError::PowerCut => {
                NorFlashErrorKind::Other
            }
        }
    }
}

/// Erase commands the chip would have received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EraseStats {
    /// `erase` calls.
    pub erases: u64,
    /// 4 KiB sector-erase commands.
    pub sector_erases: u64,
    /// 64 KiB block-erase commands.
    pub block_erases: u64,
}

/// The flash; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct MockFlash {
    data: Vec<u8>,
    stats: EraseStats,
    // Bytes that may still be programmed or erased before the power goes.
    budget: Option<u64>,
    powered: bool,
}

impl MockFlash {
    /// An erased (all `0xFF`) flash of `size` bytes, a multiple of 4 KiB.
    pub fn new(size: usize) -> Self {
        assert_eq!(size % SECTOR_SIZE as usize, 0, "size is whole sectors");
        Self {
            data: vec![0xFF; size],
            stats: EraseStats::default(),
            budget: None,
            powered: true,
        }
    }

    /// The whole contents.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Erase commands since creation or the last [`reset_stats`](Self::reset_stats).
    pub fn stats(&self) -> EraseStats {
        self.stats
    }

    /// Starts counting erase commands from zero.
    pub fn reset_stats(&mut self) {
        self.stats = EraseStats::default();
    }

    /// The contents, to plant what another writer (ESP-IDF, esptool) left
    /// or to corrupt them, bypassing the NOR rules.
    pub fn raw_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }

    /// Cuts the power once `n` more bytes have been programmed or erased:
    /// the write or erase that crosses the budget is torn (its first bytes
    /// done, the rest as before) and fails with [`MockFlashError::PowerCut`],
    /// as does everything after it until [`power_on`](Self::power_on).
    pub fn cut_power_after_bytes(&mut self, n: u64) {
        self.budget = Some(n);
    }

    /// Power back on: what was written stays, the budget is gone.
    pub fn power_on(&mut self) {
        self.powered = true;
        self.budget = None;
    }

    /// How many of `len` bytes the power lasts for; cuts it when short.
    fn spend(&mut self, len: usize) -> Result<usize, MockFlashError> {
        if !self.powered {
            return Err(MockFlashError::PowerCut);
        }
        let Some(left) = self.budget else {
            return Ok(len);
        };
        let done = left.min(len as u64);
        self.budget = Some(left - done);
        if done < len as u64 {
            self.powered = false;
        }
        Ok(done as usize)
    }

    fn check_range(&self, offset: u32, len: usize) -> Result<usize, MockFlashError> {
        let start = offset as usize;
        match start.checked_add(len) {
            Some(end) if end <= self.data.len() => Ok(start),
            _ => Err(MockFlashError::OutOfBounds),
        }
    }
}

impl ErrorType for MockFlash {
    type Error = MockFlashError;
}

impl ReadNorFlash for MockFlash {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), MockFlashError> {
        if !self.powered {
            return Err(MockFlashError::PowerCut);
        }
        let start = self.check_range(offset, bytes.len())?;
        bytes.copy_from_slice(&self.data[start..start + bytes.len()]);
        Ok(())
    }

    fn capacity(&self) -> usize {
        self.data.len()
    }
}

impl NorFlash for MockFlash {
    const WRITE_SIZE: usize = WORD_SIZE as usize;
    const ERASE_SIZE: usize = SECTOR_SIZE as usize;

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), MockFlashError> {
        if !offset.is_multiple_of(WORD_SIZE) || !bytes.len().is_multiple_of(WORD_SIZE as usize) {
            return Err(MockFlashError::NotAligned);
        }
        let start = self.check_range(offset, bytes.len())?;
        let old = &self.data[start..start + bytes.len()];
        if let Some(i) = old.iter().zip(bytes).position(|(o, n)| n & !o != 0) {
            return Err(MockFlashError::WouldSetBits {
                offset: offset + i as u32,
            });
        }
        let done = self.spend(bytes.len())?;
        self.data[start..start + done].copy_from_slice(&bytes[..done]);
        if done < bytes.len() {
            return Err(MockFlashError::PowerCut);
        }
        Ok(())
    }

    fn erase(&mut self, from: u32, to: u32) -> Result<(), MockFlashError> {
        if from > to {
            return Err(MockFlashError::OutOfBounds);
        }
        if !from.is_multiple_of(SECTOR_SIZE) || !to.is_multiple_of(SECTOR_SIZE) {
            return Err(MockFlashError::NotAligned);
        }
        let start = self.check_range(from, (to - from) as usize)?;
        let done = self.spend((to - from) as usize)?;
        self.data[start..start + done].fill(0xFF);
        self.stats.erases += 1;
        if done < (to - from) as usize {
            return Err(MockFlashError::PowerCut);
        }
        let mut at = from;
        while at < to {
            if at.is_multiple_of(BLOCK_SIZE) && to - at >= BLOCK_SIZE {
                self.stats.block_erases += 1;
                at += BLOCK_SIZE;
            } else {
                self.stats.sector_erases += 1;
                at += SECTOR_SIZE;
            }
        }
        Ok(())
    }
}

/// Writes only clear bits, so a word may be programmed again with fewer ones,
/// as on the real chip (the journal relies on it).
impl MultiwriteNorFlash for MockFlash {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_clear_bits_and_refuse_to_set_them() {
        let mut f = MockFlash::new(0x2000);
        f.write(0, &[0x0F, 0xFF, 0xFF, 0xFF]).unwrap();
        f.write(0, &[0x0E, 0xFF, 0xFF, 0xFF]).unwrap();
        assert_eq!(
            f.write(0, &[0x1E, 0xFF, 0xFF, 0xFF]),
            Err(MockFlashError::WouldSetBits { offset: 0 })
        );
        assert_eq!(&f.data()[..4], &[0x0E, 0xFF, 0xFF, 0xFF]);
    }

    #[test]
    fn alignment_and_bounds_are_enforced() {
        let mut f = MockFlash::new(0x2000);
        assert_eq!(f.write(2, &[0; 4]), Err(MockFlashError::NotAligned));
        assert_eq!(f.write(0, &[0; 3]), Err(MockFlashError::NotAligned));
        assert_eq!(f.erase(0, 0x800), Err(MockFlashError::NotAligned));
        assert_eq!(f.erase(0, 0x3000), Err(MockFlashError::OutOfBounds));
        assert_eq!(
            f.read(0x1FFF, &mut [0; 2]),
            Err(MockFlashError::OutOfBounds)
        );
    }

    #[test]
    fn erase_counts_blocks_where_aligned_and_sectors_elsewhere() {
        let mut f = MockFlash::new(0x30000);
        f.write(0x10000, &[0; 4]).unwrap();
        f.erase(0xF000, 0x21000).unwrap();
        assert_eq!(&f.data()[0x10000..0x10004], &[0xFF; 4]);
        // 0xF000 one sector, 0x10000..0x20000 one block, 0x20000 one sector.
        assert_eq!(
            f.stats(),
            EraseStats {
                erases: 1,
                sector_erases: 2,
                block_erases: 1
            }
        );
    }

    #[test]
    fn a_cut_tears_the_operation_that_crosses_the_budget_and_stops_the_rest() {
        let mut f = MockFlash::new(0x2000);
        f.write(0x1000, &[0; 8]).unwrap();
        f.cut_power_after_bytes(6);
        assert_eq!(f.write(0, &[0; 8]), Err(MockFlashError::PowerCut));
        assert_eq!(&f.data()[..8], &[0, 0, 0, 0, 0, 0, 0xFF, 0xFF]);
        assert_eq!(f.read(0, &mut [0; 4]), Err(MockFlashError::PowerCut));
        f.power_on();
        f.write(0x1100, &[0; 4]).unwrap();
        f.cut_power_after_bytes(100);
        assert_eq!(f.erase(0x1000, 0x2000), Err(MockFlashError::PowerCut));
        // The first 100 bytes are erased, the rest of the sector is as it was.
        assert_eq!(&f.data()[0x1000..0x1008], &[0xFF; 8]);
        assert_eq!(&f.data()[0x1100..0x1104], &[0; 4]);
    }
}

//! Flash geometry: where the OTA slots and otadata are, and which slot runs.
//!
//! Not engine state: the engine writes into a [`Slot`], the boot guard
//! judges slots, the runtime and the tools find them, all from one
//! [`Layout`] read off the partition table.

use crate::journal::{Journal, JOURNAL_SIZE};

/// Erase unit of the SPI NOR flash ESP chips boot from: one 4 KiB sector
/// (`SPI_FLASH_SEC_SIZE` in ESP-IDF). Otadata entries, partitions and the
/// journal are laid out in whole sectors.
pub const SECTOR_SIZE: u32 = 0x1000;
/// A 64 KiB aligned run of sectors the chip erases with one block-erase
/// command; about as costly as five sector erases while replacing sixteen,
/// so the engine erases ahead in blocks where alignment allows.
pub const BLOCK_SIZE: u32 = 0x1_0000;
/// Program unit: flash is written in aligned 4-byte words (esp-storage's
/// `WRITE_SIZE`).
pub const WORD_SIZE: u32 = 4;
use heapless::Vec;

/// One OTA app slot: where it is on flash and how large.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Flash offset of the partition.
    pub offset: u32,
    /// Partition size in bytes.
    pub size: u32,
}

impl Slot {
    /// The largest image the slot takes: its last sector is the [journal](crate::journal).
    pub fn max_image_len(&self) -> u32 {
        self.size.saturating_sub(JOURNAL_SIZE)
    }

    /// The slot's journal.
    pub fn journal(&self) -> Journal {
        Journal::for_slot(self.offset, self.size)
    }
}

/// Where things are on this device's flash, and which slot is running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Flash offset of the otadata partition.
    pub otadata: u32,
    /// The OTA app slots, `ota_0` first.
    pub slots: Vec<Slot, 16>,
    /// Index of the slot the running firmware was booted from.
    pub running: usize,
}

impl Layout {
    /// The layout of a partition table, or `None` if it lacks otadata or has
    /// fewer than two OTA slots (then there is nowhere to update into).
    pub fn from_table(table: &crate::partition::PartitionTable, running: usize) -> Option<Self> {
        let otadata = table.otadata()?.offset;
        let slots: Vec<Slot, 16> = table
            .ota_slots()
            .map(|p| Slot {
                offset: p.offset,
                size: p.size,
            })
            .collect();
        (slots.len() >= 2 && running < slots.len()).then_some(Self {
            otadata,
            slots,
            running,
        })
    }

    /// The slot updates go into: the one after the running slot, as
    /// `esp_ota_get_next_update_partition` picks it.
    pub fn target(&self) -> usize {
        (self.running + 1) % self.slots.len()
    }
}

//! Glues the SPI flash to the OTA engine: esp-storage's `FlashStorage`
//! (which implements `embedded_storage::nor_flash::NorFlash` over the whole
//! chip, absolute offsets) and the booted-slot lookup of
//! esp-bootloader-esp-idf.
//!
//! The runtime and the core are generic over `NorFlash`; this is the only
//! place that names the concrete driver.

use esp_bootloader_esp_idf::partitions::{
    self, AppPartitionSubType, PartitionType, PARTITION_TABLE_MAX_LEN,
};
use esp_hal::peripherals::FLASH;
pub use esp_storage::FlashStorage;

/// The whole flash chip as a `NorFlash` (erase 4 KiB sectors, write 4-byte words).
pub fn storage(flash: FLASH<'static>) -> FlashStorage<'static> {
    FlashStorage::new(flash)
}

/// The app partition the bootloader started this firmware from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootedSlot {
    /// `factory` or `ota_N` as in the partition table.
    pub kind: AppPartitionSubType,
    /// Flash offset of the partition.
    pub offset: u32,
    /// Size of the partition in bytes.
    pub size: u32,
}

impl BootedSlot {
    /// The OTA slot number (`ota_0` is 0), `None` for a factory app.
    pub fn ota_index(&self) -> Option<u8> {
        let raw = self.kind as u8;
        let ota0 = AppPartitionSubType::Ota0 as u8;
        raw.checked_sub(ota0)
    }
}

/// Why the booted slot could not be determined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SlotError {
    /// The partition table is missing or corrupt: reflash it
    /// (`espflash flash --partition-table partitions.csv`).
    PartitionTable(partitions::Error),
    /// The code is mapped from an offset that no app partition starts at;
    /// the table on flash is not the one the image was flashed with. Report it.
    NotInAppPartition,
}

/// Looks up which app partition is running, from the MMU mapping of the
/// code (what ESP-IDF's `esp_ota_get_running_partition` does).
pub fn booted_slot(flash: &mut FlashStorage<'_>) -> Result<BootedSlot, SlotError> {
    let mut buffer = [0u8; PARTITION_TABLE_MAX_LEN];
    let table =
        partitions::read_partition_table(flash, &mut buffer).map_err(SlotError::PartitionTable)?;
    let entry = table
        .booted_partition()
        .map_err(SlotError::PartitionTable)?
        .ok_or(SlotError::NotInAppPartition)?;
    match entry.partition_type() {
        PartitionType::App(kind) => Ok(BootedSlot {
            kind,
            offset: entry.offset(),
            size: entry.len(),
        }),
        _ => Err(SlotError::NotInAppPartition),
    }
}

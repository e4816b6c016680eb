//! Glues the SPI flash to the OTA engine: esp-storage's `FlashStorage`
//! (which implements `embedded_storage::nor_flash::NorFlash` over the whole
//! chip, absolute offsets), and the partition table read once at boot: the
//! booted-slot lookup of esp-bootloader-esp-idf and the core's parser (which
//! the boot guard and the runtime use) both work on that one read.
//!
//! The runtime and the core are generic over `NorFlash`; this is the only
//! place that names the concrete driver.

use esp_bootloader_esp_idf::partitions::{
    self, AppPartitionSubType, PartitionType, PARTITION_TABLE_MAX_LEN,
};
use esp_hal::peripherals::FLASH;
pub use esp_storage::FlashStorage;
use mqota_core::partition::PartitionTable;

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
    /// esp-bootloader-esp-idf read the table but mqota's parser refuses it
    /// (e.g. overlapping partitions): reflash it with `cargo xtask flash`.
    Refused(mqota_core::partition::Error),
    /// The code is mapped from an offset that no app partition starts at;
    /// the table on flash is not the one the image was flashed with. Report it.
    NotInAppPartition,
}

/// The partition table, read once at boot, and the app partition running.
#[derive(Debug, Clone)]
pub struct Partitions {
    /// The table as mqota's core parsed it, for the boot guard and the
    /// runtime ([`mqota_runtime::early_boot_with_table`]).
    pub table: PartitionTable,
    /// The app partition the bootloader started.
    pub booted: BootedSlot,
}

/// Reads the partition table and looks up which app partition is running,
/// from the MMU mapping of the code (what ESP-IDF's
/// `esp_ota_get_running_partition` does). The flash is read once, by
/// esp-bootloader-esp-idf (which decrypts it if flash encryption is on); the
/// core parses the same bytes, so nothing reads the table again.
pub fn read_partitions(flash: &mut FlashStorage<'_>) -> Result<Partitions, SlotError> {
    let mut buffer = [0u8; PARTITION_TABLE_MAX_LEN];
    let booted = {
        let table = partitions::read_partition_table(flash, &mut buffer)
            .map_err(SlotError::PartitionTable)?;
        let entry = table
            .booted_partition()
            .map_err(SlotError::PartitionTable)?
            .ok_or(SlotError::NotInAppPartition)?;
        match entry.partition_type() {
            PartitionType::App(kind) => BootedSlot {
                kind,
                offset: entry.offset(),
                size: entry.len(),
            },
            _ => return Err(SlotError::NotInAppPartition),
        }
    };
    let table = PartitionTable::from_bytes(&buffer).map_err(SlotError::Refused)?;
    Ok(Partitions { table, booted })
}

//! Which app the ESP-IDF second-stage bootloader boots, and what it writes to
//! otadata on the way.
//!
//! Two builds are modelled:
//!
//! * [`BootConfig::Stock`]: what espflash flashes by default, built without
//!   `CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE`. It never changes an entry's state,
//!   but it still skips entries whose state is `INVALID` or `ABORTED`.
//! * [`BootConfig::Rollback`]: built with `CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE`.
//!   A `NEW` entry it selects becomes `PENDING_VERIFY` (written back before the
//!   app starts); a `PENDING_VERIFY` it finds becomes `ABORTED`, so an app
//!   that never confirmed itself is not booted again and the previous slot is.
//!
//! Anti-rollback (`CONFIG_BOOTLOADER_APP_ANTI_ROLLBACK`), secure boot, flash
//! encryption, the factory-reset and test-app GPIOs and deep-sleep fast boot are
//! not modelled.
//!
//! # The rules, each with the ESP-IDF function it mirrors
//!
//! Sources: `components/bootloader_support/src/bootloader_utility.c` and
//! `bootloader_common_loader.c` (ESP-IDF 5.x).
//!
//! 1. *`bootloader_utility_load_partition_table`*: read the table at `0x8000`;
//!    a broken table stops the boot ([`BootError::PartitionTable`]). Every
//!    `app/ota_N` partition counts towards `app_count`, and slot `N` is the
//!    partition with subtype `ota_N` (a table with `ota_0` and `ota_2` has
//!    `app_count` 2 and no slot 1).
//! 2. *`bootloader_utility_get_selected_boot_partition`*: without an otadata
//!    partition, start at the factory app.
//! 3. Same function, rollback build only: every entry whose state is
//!    `PENDING_VERIFY` is set to `ABORTED` and its sector rewritten
//!    (erase + program, `write_otadata`), before anything is selected.
//! 4. Same function: if both entries are unselectable
//!    (`bootloader_common_ota_select_invalid`: `ota_seq` blank, or state
//!    `INVALID`/`ABORTED`; the CRC is not looked at) or there are no OTA slots,
//!    start at the factory app if there is one, otherwise at `ota_0`; in the
//!    latter case, if both entries are also "initial" (blank `ota_seq` or bad
//!    CRC, state ignored), remember to write a real entry once an OTA slot boots
//!    (`ota_has_initial_contents`, rule 8).
//! 5. Otherwise the active entry (`bootloader_common_get_active_otadata`: highest
//!    `ota_seq` among entries that are selectable *and* have a good CRC) selects
//!    slot `(ota_seq - 1) % app_count`. Rollback build: if its state is `NEW` it
//!    becomes `PENDING_VERIFY` and its sector is rewritten.
//! 6. If no entry is active after all (e.g. both CRCs bad), start at the
//!    factory index, which with no factory app means "try everything".
//! 7. *`bootloader_utility_load_boot_image`*: try the start partition, then
//!    walk *down* through lower OTA slots to the factory app, then *up* through
//!    the OTA slots above the start, then the test app. The first image that
//!    loads and verifies (`bootloader_load_image`: header, segments, checksum,
//!    appended SHA-256, chip) boots. Nothing loadable: the bootloader resets
//!    forever ([`Booted::Nothing`], the device is bricked).
//! 8. *`set_actual_ota_seq`*: when an OTA slot `N` boots and rule 4 flagged
//!    initial contents, entry 0 is rewritten as `ota_seq = N + 1`, state
//!    `VALID`.
//!
//! Every write goes through the flash, so a power cut can interrupt the
//! bootloader as well ([`BootError::Flash`]): power on and boot again.

use embedded_storage::nor_flash::NorFlash;
use mqota_core::image::{validate_flash_for, Chip, ImageError, ImageInfo};
use mqota_core::otadata::{OtaSelectEntry, OtaState, Otadata, ENTRY_SIZE, SECTOR_SIZE};
use mqota_core::partition::{self, Partition, PartitionTable, ReadError, SubType, TABLE_OFFSET};

/// Which bootloader build to model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BootConfig {
    /// No app rollback: what espflash ships.
    Stock,
    /// `CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE`.
    Rollback,
}

impl BootConfig {
    /// The lower-case name used in JSON and the CLI.
    pub const fn name(self) -> &'static str {
        match self {
            BootConfig::Stock => "stock",
            BootConfig::Rollback => "rollback",
        }
    }
}

/// What booted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Booted {
    /// OTA slot `N` (`ota_N`).
    Ota(usize),
    /// The factory app.
    Factory,
    /// The test app, the last resort.
    Test,
    /// No partition held a loadable image: the bootloader resets forever.
    Nothing,
}

/// Why the bootloader rewrote an otadata entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WriteReason {
    /// Rule 3: `PENDING_VERIFY` found at boot, marked `ABORTED`.
    PendingVerifyAborted,
    /// Rule 5: the selected entry was `NEW`, marked `PENDING_VERIFY`.
    NewToPendingVerify,
    /// Rule 8: otadata was blank and an OTA slot booted; a real entry was written.
    InitialSequence,
}

/// One otadata entry the bootloader rewrote (erase of its sector + program).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OtadataWrite {
    /// Entry index, 0 or 1.
    pub entry: usize,
    /// The entry as written.
    pub value: OtaSelectEntry,
    /// Which rule wrote it.
    pub reason: WriteReason,
}

/// A partition the bootloader tried and could not boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Which partition.
    pub target: Booted,
    /// Its flash offset.
    pub offset: u32,
    /// Why its image would not load.
    pub error: ImageError,
}

/// The result of one boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootOutcome {
    /// What booted.
    pub booted: Booted,
    /// The OTA slot that booted, `None` for the factory or test app or nothing.
    pub slot: Option<usize>,
    /// Flash offset of the partition that booted.
    pub partition_offset: Option<u32>,
    /// The image that booted.
    pub image: Option<ImageInfo>,
    /// Where the search started (rules 2 to 6).
    pub start: Booted,
    /// Partitions tried before, in order.
    pub rejected: Vec<Rejected>,
    /// otadata entries rewritten, in order.
    pub otadata_writes: Vec<OtadataWrite>,
}

impl BootOutcome {
    /// Nothing bootable was found.
    pub fn is_bricked(&self) -> bool {
        self.booted == Booted::Nothing
    }
}

/// Why the model could not finish a boot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BootError<E: core::fmt::Debug> {
    /// The flash failed (in the model: the power was cut). What was written
    /// before stays written; power on and boot again.
    #[error("flash error while booting: {0:?}")]
    Flash(E),
    /// No valid partition table: the real bootloader stops here and resets
    /// forever. Reflash the table.
    #[error("partition table: {0}")]
    PartitionTable(partition::Error),
    /// The flash's geometry does not fit ESP-IDF's layout (e.g. it erases in
    /// units larger than the 4 KiB otadata sectors). Use a flash that does.
    #[error("flash geometry does not fit the ESP-IDF layout")]
    Layout,
}

/// The bootloader model; see the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bootloader {
    /// Which build.
    pub config: BootConfig,
    /// The chip the bootloader runs on: images for other chips do not load.
    /// `None` accepts any known chip.
    pub chip: Option<Chip>,
    /// Where the partition table is (`CONFIG_PARTITION_TABLE_OFFSET`).
    pub table_offset: u32,
}

/// `bootloader_state_t` plus the flag `ota_has_initial_contents`.
struct State {
    table: PartitionTable,
    app_count: usize,
    initial_contents: bool,
}

/// Index into the search: `FACTORY_INDEX` is -1, OTA slots are 0.., as in
/// `bootloader_utility.c`.
const FACTORY_INDEX: i32 = -1;

impl Bootloader {
    /// A bootloader of the given build, accepting any chip, table at `0x8000`.
    pub const fn new(config: BootConfig) -> Self {
        Bootloader {
            config,
            chip: None,
            table_offset: TABLE_OFFSET,
        }
    }

    /// The stock build.
    pub const fn stock() -> Self {
        Self::new(BootConfig::Stock)
    }

    /// The rollback build.
    pub const fn rollback() -> Self {
        Self::new(BootConfig::Rollback)
    }

    /// Only boot images for `chip`.
    pub const fn for_chip(mut self, chip: Chip) -> Self {
        self.chip = Some(chip);
        self
    }

    /// Boot once: choose, verify and "start" an app, writing otadata as the
    /// real bootloader would.
    pub fn boot<F>(&self, flash: &mut F) -> Result<BootOutcome, BootError<F::Error>>
    where
        F: NorFlash,
        F::Error: core::fmt::Debug,
    {
        // Rule 1.
        let table = match PartitionTable::read_from(flash, self.table_offset) {
            Ok(t) => t,
            Err(ReadError::Flash(e)) => return Err(BootError::Flash(e)),
            Err(ReadError::Table(e)) => return Err(BootError::PartitionTable(e)),
            Err(_) => return Err(BootError::Layout),
        };
        let app_count = table.ota_slots().count();
        let mut st = State {
            table,
            app_count,
            initial_contents: false,
        };
        let mut writes = Vec::new();
        let start = self.selected_boot_partition(flash, &mut st, &mut writes)?;
        self.load_boot_image(flash, &st, start, writes)
    }

    /// `bootloader_utility_get_selected_boot_partition`: rules 2 to 6.
    fn selected_boot_partition<F>(
        &self,
        flash: &mut F,
        st: &mut State,
        writes: &mut Vec<OtadataWrite>,
    ) -> Result<i32, BootError<F::Error>>
    where
        F: NorFlash,
        F::Error: core::fmt::Debug,
    {
        // Rule 2.
        let Some(ota_info) = st.table.otadata().copied() else {
            return Ok(FACTORY_INDEX);
        };
        let mut otadata = match Otadata::read(flash, ota_info.offset) {
            Ok(o) => o,
            Err(mqota_core::otadata::OtadataError::Flash(e)) => return Err(BootError::Flash(e)),
            Err(_) => return Err(BootError::Layout),
        };

        // Rule 3.
        if self.config == BootConfig::Rollback {
            for i in 0..2 {
                if otadata.entries[i].state() == OtaState::PendingVerify {
                    otadata.entries[i].state = OtaState::Aborted.to_u32();
                    write_otadata(
                        flash,
                        ota_info.offset,
                        i,
                        otadata.entries[i],
                        WriteReason::PendingVerifyAborted,
                        writes,
                    )?;
                }
            }
        }

        let [e0, e1] = otadata.entries;
        // Rule 4.
        if (e0.is_unselectable() && e1.is_unselectable()) || st.app_count == 0 {
            if st.table.factory().is_some() {
                return Ok(FACTORY_INDEX);
            }
            st.initial_contents = e0.is_initial() && e1.is_initial();
            return Ok(0);
        }
        // Rules 5 and 6.
        match otadata.active() {
            Some(a) => {
                let slot = otadata.entries[a]
                    .slot(st.app_count)
                    .expect("app_count is not zero here");
                if self.config == BootConfig::Rollback
                    && otadata.entries[a].state() == OtaState::New
                {
                    otadata.entries[a].state = OtaState::PendingVerify.to_u32();
                    write_otadata(
                        flash,
                        ota_info.offset,
                        a,
                        otadata.entries[a],
                        WriteReason::NewToPendingVerify,
                        writes,
                    )?;
                }
                Ok(slot as i32)
            }
            None => Ok(FACTORY_INDEX),
        }
    }

    /// `index_to_partition`.
    fn partition(st: &State, index: i32) -> Option<(Booted, Partition)> {
        if index == FACTORY_INDEX {
            return st.table.factory().map(|p| (Booted::Factory, *p));
        }
        if index >= 0 && (index as usize) < st.app_count && index < 16 {
            return st
                .table
                .ota_slot(index as u8)
                .map(|p| (Booted::Ota(index as usize), *p));
        }
        None
    }

    /// `bootloader_utility_load_boot_image`: rules 7 and 8.
    fn load_boot_image<F>(
        &self,
        flash: &mut F,
        st: &State,
        start: i32,
        mut writes: Vec<OtadataWrite>,
    ) -> Result<BootOutcome, BootError<F::Error>>
    where
        F: NorFlash,
        F::Error: core::fmt::Debug,
    {
        let start_target =
            Self::partition(st, start)
                .map(|(t, _)| t)
                .unwrap_or(if start == FACTORY_INDEX {
                    Booted::Factory
                } else {
                    Booted::Ota(start as usize)
                });
        let mut rejected = Vec::new();
        let down = (FACTORY_INDEX..=start).rev();
        let up = start + 1..st.app_count as i32;
        for index in down.chain(up) {
            let Some((target, part)) = Self::partition(st, index) else {
                continue;
            };
            if part.size == 0 {
                continue;
            }
            match validate_flash_for(flash, part.offset, part.size, self.chip) {
                Ok(info) => {
                    if let Booted::Ota(slot) = target {
                        if st.initial_contents {
                            // Rule 8.
                            let ota_info = st.table.otadata().expect("rule 4 saw otadata");
                            let value = OtaSelectEntry::new(slot as u32 + 1, OtaState::Valid);
                            write_otadata(
                                flash,
                                ota_info.offset,
                                0,
                                value,
                                WriteReason::InitialSequence,
                                &mut writes,
                            )?;
                        }
                    }
                    return Ok(BootOutcome {
                        booted: target,
                        slot: match target {
                            Booted::Ota(s) => Some(s),
                            _ => None,
                        },
                        partition_offset: Some(part.offset),
                        image: Some(info),
                        start: start_target,
                        rejected,
                        otadata_writes: writes,
                    });
                }
                Err(error) => rejected.push(Rejected {
                    target,
                    offset: part.offset,
                    error,
                }),
            }
        }
        if let Some(test) = st
            .table
            .find_by_type(partition::PartitionType::APP, SubType::TEST)
        {
            match validate_flash_for(flash, test.offset, test.size, self.chip) {
                Ok(info) => {
                    return Ok(BootOutcome {
                        booted: Booted::Test,
                        slot: None,
                        partition_offset: Some(test.offset),
                        image: Some(info),
                        start: start_target,
                        rejected,
                        otadata_writes: writes,
                    })
                }
                Err(error) => rejected.push(Rejected {
                    target: Booted::Test,
                    offset: test.offset,
                    error,
                }),
            }
        }
        Ok(BootOutcome {
            booted: Booted::Nothing,
            slot: None,
            partition_offset: None,
            image: None,
            start: start_target,
            rejected,
            otadata_writes: writes,
        })
    }
}

/// `write_otadata`: erase the entry's sector, program the 32 bytes.
fn write_otadata<F>(
    flash: &mut F,
    otadata_offset: u32,
    entry: usize,
    value: OtaSelectEntry,
    reason: WriteReason,
    writes: &mut Vec<OtadataWrite>,
) -> Result<(), BootError<F::Error>>
where
    F: NorFlash,
    F::Error: core::fmt::Debug,
{
    let at = otadata_offset + entry as u32 * SECTOR_SIZE;
    flash
        .erase(at, at + SECTOR_SIZE)
        .map_err(BootError::Flash)?;
    let bytes: [u8; ENTRY_SIZE] = value.to_bytes();
    flash.write(at, &bytes).map_err(BootError::Flash)?;
    writes.push(OtadataWrite {
        entry,
        value,
        reason,
    });
    Ok(())
}

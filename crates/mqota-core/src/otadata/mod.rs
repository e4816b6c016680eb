//! The OTA data partition: two `esp_ota_select_entry_t` records that tell the
//! ESP-IDF second-stage bootloader which OTA slot to boot.
//!
//! # On-flash layout
//!
//! The partition (type `data`, subtype `ota`, usually at `0xd000`, `0x2000`
//! long) holds two copies of the entry, one at the start of each 4 KiB sector,
//! so that rewriting one (erase, then program) never touches the other:
//!
//! | partition offset | content                              |
//! |------------------|--------------------------------------|
//! | `0x0000`         | entry 0 (32 bytes), rest of sector `0xFF` |
//! | `0x1000`         | entry 1 (32 bytes), rest of sector `0xFF` |
//!
//! Each entry (`esp_ota_select_entry_t`, little-endian):
//!
//! | offset | size | field       | meaning                                         |
//! |--------|------|-------------|-------------------------------------------------|
//! | 0      | 4    | `ota_seq`   | sequence number; slot = `(ota_seq - 1) % slot_count` |
//! | 4      | 20   | `seq_label` | unused by ESP-IDF; not covered by the CRC       |
//! | 24     | 4    | `ota_state` | [`OtaState`]                                    |
//! | 28     | 4    | `crc`       | CRC-32 of the 4 bytes of `ota_seq` only         |
//!
//! The CRC is the ESP ROM's `crc32_le(UINT32_MAX, &ota_seq, 4)` as called by
//! `bootloader_common_ota_select_crc`: the reflected 0x04C11DB7 polynomial with a
//! zero register at the start and the result inverted (that is, what zlib's
//! `crc32(data, 0xFFFFFFFF)` returns; for `ota_seq = 1` it is `0x4743989A`).
//!
//! # Which entry wins
//!
//! An entry is *valid* (`bootloader_common_ota_select_valid`) when `ota_seq`
//! is not `0xFFFFFFFF`, its state is neither `INVALID` nor `ABORTED`, and the CRC
//! matches. Of two valid entries the one with the higher `ota_seq` is active
//! (entry 0 on a tie); otherwise the only valid one is
//! (`bootloader_common_get_active_otadata`). Note that ESP-IDF folds the state
//! into validity: an `ABORTED` entry with a higher sequence number simply does
//! not exist as far as the selection is concerned, so the older entry wins.
//!
//! # Why the writers are written the way they are
//!
//! [`set_boot_slot`] always writes a *new* sequence number, higher than the
//! active one, into the sector that does not hold the active entry. A power cut
//! during that erase or program leaves the active entry untouched, so the device
//! boots what it booted before. ESP-IDF 5.x instead rewrites the active sector in
//! place when the requested slot is already selected; that window (erase done,
//! program not yet) would leave only the older entry, so we do not copy it.
//!
//! There is no writer for `esp_ota_mark_app_valid_cancel_rollback` (rewrite
//! the active entry's state in place): the boot guard confirms a trial with a
//! mark in the slot's journal and, where the bootloader needs a state, with a
//! fresh [`set_boot_slot`] entry, so the in-place window never opens.
//!
//! mqota keeps nothing in `seq_label`: what a trial needs to remember lives
//! in the slot's journal ([`crate::journal`]), which the boot guard reads.

use embedded_storage::nor_flash::{NorFlash, ReadNorFlash};

/// Size of one `esp_ota_select_entry_t`.
pub const ENTRY_SIZE: usize = 32;
/// Distance between the two entries: one flash sector each.
pub use crate::layout::SECTOR_SIZE;
/// The size ESP-IDF expects of the otadata partition (two sectors).
pub const OTADATA_SIZE: u32 = 2 * SECTOR_SIZE;
/// Length of the `seq_label` field.
pub const SEQ_LABEL_LEN: usize = 20;
/// `ota_seq` of an erased entry; never a valid sequence number.
pub const SEQ_BLANK: u32 = u32::MAX;

/// `esp_ota_img_states_t`: what the running app (or the bootloader) has said
/// about the image an entry selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum OtaState {
    /// `ESP_OTA_IMG_NEW` (0): freshly selected; a rollback-enabled bootloader
    /// turns it into `PendingVerify` on the first boot.
    New,
    /// `ESP_OTA_IMG_PENDING_VERIFY` (1): booted once, not yet confirmed; a
    /// rollback-enabled bootloader that finds it turns it into `Aborted`.
    PendingVerify,
    /// `ESP_OTA_IMG_VALID` (2): confirmed by the app.
    Valid,
    /// `ESP_OTA_IMG_INVALID` (3): rejected by the app; never selected.
    Invalid,
    /// `ESP_OTA_IMG_ABORTED` (4): never confirmed; never selected.
    Aborted,
    /// `ESP_OTA_IMG_UNDEFINED` (`0xFFFFFFFF`): no rollback bookkeeping.
    Undefined,
    /// Any other value found on flash; ESP-IDF treats it like `Undefined`.
    Unknown(u32),
}

impl OtaState {
    /// The raw `ota_state` word.
    pub const fn to_u32(self) -> u32 {
        match self {
            OtaState::New => 0,
            OtaState::PendingVerify => 1,
            OtaState::Valid => 2,
            OtaState::Invalid => 3,
            OtaState::Aborted => 4,
            OtaState::Undefined => 0xFFFF_FFFF,
            OtaState::Unknown(v) => v,
        }
    }

    /// Decode a raw `ota_state` word.
    pub const fn from_u32(v: u32) -> Self {
        match v {
            0 => OtaState::New,
            1 => OtaState::PendingVerify,
            2 => OtaState::Valid,
            3 => OtaState::Invalid,
            4 => OtaState::Aborted,
            0xFFFF_FFFF => OtaState::Undefined,
            v => OtaState::Unknown(v),
        }
    }

    /// The lower-case name used in logs, JSON and the CLI.
    pub const fn name(self) -> &'static str {
        match self {
            OtaState::New => "new",
            OtaState::PendingVerify => "pending_verify",
            OtaState::Valid => "valid",
            OtaState::Invalid => "invalid",
            OtaState::Aborted => "aborted",
            OtaState::Undefined => "undefined",
            OtaState::Unknown(_) => "unknown",
        }
    }
}

const OTA_SEQ_CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::Algorithm {
    width: 32,
    poly: 0x04c1_1db7,
    // crc32_le(UINT32_MAX, ..) inverts its seed on entry, so the register starts at 0.
    init: 0,
    refin: true,
    refout: true,
    xorout: 0xffff_ffff,
    check: 0xd202_d277,
    residue: 0,
});

/// `bootloader_common_ota_select_crc`: the CRC stored in an entry with this
/// `ota_seq`.
pub fn ota_seq_crc(seq: u32) -> u32 {
    OTA_SEQ_CRC.checksum(&seq.to_le_bytes())
}

/// One `esp_ota_select_entry_t`, exactly as stored (nothing is normalised, so
/// garbage reads back as the same garbage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct OtaSelectEntry {
    /// `ota_seq`.
    pub seq: u32,
    /// `seq_label`: free for the application, outside the CRC.
    pub seq_label: [u8; SEQ_LABEL_LEN],
    /// `ota_state`, raw; see [`OtaSelectEntry::state`].
    pub state: u32,
    /// `crc` as stored.
    pub crc: u32,
}

/// How an entry looks to the bootloader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum EntryCheck {
    /// All 32 bytes are `0xFF`: the sector was erased and never written.
    Blank,
    /// `ota_seq` is `0xFFFFFFFF` but other bytes are not: unusable.
    NoSequence,
    /// The stored CRC does not match `ota_seq` (torn write or corruption).
    BadCrc,
    /// Well-formed, but the state is `INVALID` or `ABORTED`: skipped.
    Rejected,
    /// Selectable by the bootloader.
    Valid,
}

impl EntryCheck {
    /// The lower-case name used in JSON and the CLI.
    pub const fn name(self) -> &'static str {
        match self {
            EntryCheck::Blank => "blank",
            EntryCheck::NoSequence => "no_sequence",
            EntryCheck::BadCrc => "bad_crc",
            EntryCheck::Rejected => "rejected",
            EntryCheck::Valid => "valid",
        }
    }
}

impl OtaSelectEntry {
    /// A fresh entry: label erased (`0xFF`), CRC computed.
    pub fn new(seq: u32, state: OtaState) -> Self {
        OtaSelectEntry {
            seq,
            seq_label: [0xFF; SEQ_LABEL_LEN],
            state: state.to_u32(),
            crc: ota_seq_crc(seq),
        }
    }

    /// Decode the 32 stored bytes.
    pub fn from_bytes(b: &[u8; ENTRY_SIZE]) -> Self {
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut seq_label = [0u8; SEQ_LABEL_LEN];
        seq_label.copy_from_slice(&b[4..24]);
        OtaSelectEntry {
            seq: word(0),
            seq_label,
            state: word(24),
            crc: word(28),
        }
    }

    /// Encode as the 32 bytes to store.
    pub fn to_bytes(&self) -> [u8; ENTRY_SIZE] {
        let mut b = [0u8; ENTRY_SIZE];
        b[0..4].copy_from_slice(&self.seq.to_le_bytes());
        b[4..24].copy_from_slice(&self.seq_label);
        b[24..28].copy_from_slice(&self.state.to_le_bytes());
        b[28..32].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    /// The decoded `ota_state`.
    pub const fn state(&self) -> OtaState {
        OtaState::from_u32(self.state)
    }

    /// Does the stored CRC match `ota_seq`?
    pub fn crc_ok(&self) -> bool {
        self.crc == ota_seq_crc(self.seq)
    }

    /// All 32 bytes erased.
    pub fn is_blank(&self) -> bool {
        self.to_bytes() == [0xFF; ENTRY_SIZE]
    }

    /// `bootloader_common_ota_select_invalid`: blank sequence number or a state
    /// that forbids booting. The CRC is *not* consulted here, which matters for
    /// the bootloader's "both entries in initial state" branch.
    pub fn is_unselectable(&self) -> bool {
        self.seq == SEQ_BLANK || matches!(self.state(), OtaState::Invalid | OtaState::Aborted)
    }

    /// The bootloader's "initial contents" test (`ota_seq == UINT32_MAX ||
    /// crc != bootloader_common_ota_select_crc(..)`), which ignores the state.
    pub fn is_initial(&self) -> bool {
        self.seq == SEQ_BLANK || !self.crc_ok()
    }

    /// `bootloader_common_ota_select_valid`.
    pub fn is_valid(&self) -> bool {
        !self.is_unselectable() && self.crc_ok()
    }

    /// Classify the entry, first reason first.
    pub fn check(&self) -> EntryCheck {
        if self.is_blank() {
            EntryCheck::Blank
        } else if self.seq == SEQ_BLANK {
            EntryCheck::NoSequence
        } else if !self.crc_ok() {
            EntryCheck::BadCrc
        } else if self.is_unselectable() {
            EntryCheck::Rejected
        } else {
            EntryCheck::Valid
        }
    }

    /// The OTA slot this entry selects among `slot_count` slots, as the
    /// bootloader computes it (`(ota_seq - 1) % app_count`, unsigned, so
    /// `ota_seq = 0` maps to `u32::MAX % slot_count`). `None` for no slots.
    pub fn slot(&self, slot_count: usize) -> Option<usize> {
        if slot_count == 0 {
            return None;
        }
        Some((self.seq.wrapping_sub(1) as u64 % slot_count as u64) as usize)
    }
}

/// Both entries of an otadata partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Otadata {
    /// Entry 0 (first sector) and entry 1 (second sector).
    pub entries: [OtaSelectEntry; 2],
}

/// What went wrong reading or writing otadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum OtadataError<E> {
    /// The flash driver failed. Writes go to one sector at a time and never
    /// to the active entry's sector, so what boots is unchanged or the
    /// requested slot; read back with [`Otadata::read`] and retry or report.
    Flash(E),
    /// The slot index is not below the number of OTA slots (or there are no
    /// OTA slots). A caller bug: check the partition table.
    SlotOutOfRange {
        /// The slot asked for.
        slot: usize,
        /// The number of OTA slots.
        slot_count: usize,
    },
    /// Neither entry is valid, so there is no active entry to change the state
    /// of. Select a slot with [`set_boot_slot`] first.
    NoActiveEntry,
    /// The next sequence number would reach `0xFFFFFFFF` (after about four
    /// billion updates). Report; recovering needs an erase of otadata and
    /// a fresh [`set_boot_slot`].
    SequenceExhausted,
    /// The otadata offset is not sector aligned, or the flash erases in units
    /// larger than 4 KiB. The partition table is wrong for this flash: report.
    BadLayout,
}

impl<E: core::fmt::Debug> core::fmt::Display for OtadataError<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            OtadataError::Flash(e) => write!(f, "flash error: {e:?}"),
            OtadataError::SlotOutOfRange { slot, slot_count } => {
                write!(f, "OTA slot {slot} out of range ({slot_count} slots)")
            }
            OtadataError::NoActiveEntry => f.write_str("no valid otadata entry"),
            OtadataError::SequenceExhausted => f.write_str("otadata sequence number exhausted"),
            OtadataError::BadLayout => f.write_str("otadata not sector aligned for this flash"),
        }
    }
}

#[cfg(feature = "std")]
impl<E: core::fmt::Debug> std::error::Error for OtadataError<E> {}

fn check_layout<F: ReadNorFlash>(otadata_offset: u32) -> Result<(), OtadataError<F::Error>> {
    if !otadata_offset.is_multiple_of(SECTOR_SIZE) || !ENTRY_SIZE.is_multiple_of(F::READ_SIZE) {
        return Err(OtadataError::BadLayout);
    }
    Ok(())
}

fn check_write_layout<F: NorFlash>(otadata_offset: u32) -> Result<(), OtadataError<F::Error>> {
    check_layout::<F>(otadata_offset)?;
    if !(SECTOR_SIZE as usize).is_multiple_of(F::ERASE_SIZE)
        || !ENTRY_SIZE.is_multiple_of(F::WRITE_SIZE)
    {
        return Err(OtadataError::BadLayout);
    }
    Ok(())
}

impl Otadata {
    /// Read both entries of the otadata partition at `otadata_offset`.
    pub fn read<F: ReadNorFlash>(
        flash: &mut F,
        otadata_offset: u32,
    ) -> Result<Self, OtadataError<F::Error>> {
        check_layout::<F>(otadata_offset)?;
        let mut entries = [OtaSelectEntry::new(SEQ_BLANK, OtaState::Undefined); 2];
        for (i, e) in entries.iter_mut().enumerate() {
            let mut buf = [0u8; ENTRY_SIZE];
            flash
                .read(otadata_offset + i as u32 * SECTOR_SIZE, &mut buf)
                .map_err(OtadataError::Flash)?;
            *e = OtaSelectEntry::from_bytes(&buf);
        }
        Ok(Otadata { entries })
    }

    /// Decode from the raw bytes of the partition (at least two sectors'
    /// worth is not required: missing bytes read as erased).
    pub fn from_partition_bytes(bytes: &[u8]) -> Self {
        let entry = |at: usize| {
            let mut b = [0xFFu8; ENTRY_SIZE];
            if let Some(src) = bytes.get(at..) {
                let n = src.len().min(ENTRY_SIZE);
                b[..n].copy_from_slice(&src[..n]);
            }
            OtaSelectEntry::from_bytes(&b)
        };
        Otadata {
            entries: [entry(0), entry(SECTOR_SIZE as usize)],
        }
    }

    /// How each entry looks to the bootloader.
    pub fn checks(&self) -> [EntryCheck; 2] {
        [self.entries[0].check(), self.entries[1].check()]
    }

    /// `bootloader_common_get_active_otadata`: the index of the entry that
    /// decides the boot slot, if any.
    pub fn active(&self) -> Option<usize> {
        let [a, b] = &self.entries;
        match (a.is_valid(), b.is_valid()) {
            // Tie goes to entry 0, as in bootloader_common_select_otadata.
            (true, true) => Some(if a.seq >= b.seq { 0 } else { 1 }),
            (true, false) => Some(0),
            (false, true) => Some(1),
            (false, false) => None,
        }
    }

    /// The active entry itself.
    pub fn active_entry(&self) -> Option<&OtaSelectEntry> {
        self.active().map(|i| &self.entries[i])
    }

    /// The OTA slot the active entry selects among `slot_count` slots.
    /// `None` when no entry is valid (the bootloader then boots the factory app
    /// or `ota_0`) or there are no slots.
    pub fn selected_slot(&self, slot_count: usize) -> Option<usize> {
        self.active_entry().and_then(|e| e.slot(slot_count))
    }
}

/// What [`set_boot_slot`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BootSlotWrite {
    /// Which entry (0 or 1) was rewritten.
    pub entry: usize,
    /// The new `ota_seq`.
    pub seq: u32,
}

/// The smallest sequence number above `current` that selects `slot`, or
/// `None` if it would reach `0xFFFFFFFF`.
fn next_seq(current: Option<u32>, slot: usize, slot_count: usize) -> Option<u32> {
    let base = slot as u64 + 1;
    let n = slot_count as u64;
    let seq = match current {
        // The same value esp_rewrite_ota_data writes into unformatted otadata:
        // slot + 1, *not* (slot + 1) % n, which would be 0 for the last slot.
        None => base,
        Some(cur) if (cur as u64) < base => base,
        Some(cur) => base + ((cur as u64 - base) / n + 1) * n,
    };
    (seq < SEQ_BLANK as u64).then_some(seq as u32)
}

fn rewrite_entry<F: NorFlash>(
    flash: &mut F,
    otadata_offset: u32,
    index: usize,
    entry: &OtaSelectEntry,
) -> Result<(), OtadataError<F::Error>> {
    let at = otadata_offset + index as u32 * SECTOR_SIZE;
    flash
        .erase(at, at + SECTOR_SIZE)
        .map_err(OtadataError::Flash)?;
    flash
        .write(at, &entry.to_bytes())
        .map_err(OtadataError::Flash)
}

/// Select `slot` (of `slot_count` OTA slots) for the next boot, mirroring
/// `esp_ota_set_boot_partition` / `esp_rewrite_ota_data`.
///
/// The new entry gets the smallest `ota_seq` above the active one with
/// `(ota_seq - 1) % slot_count == slot` and goes into the sector that does not
/// hold the active entry (entry 0 when neither is valid): erase, then program.
/// `state` is [`OtaState::New`] when the bootloader has rollback enabled
/// (`set_new_state_otadata`), [`OtaState::Undefined`] otherwise. The label of
/// the new entry is left erased (`0xFF`): mqota keeps nothing there.
pub fn set_boot_slot<F: NorFlash>(
    flash: &mut F,
    otadata_offset: u32,
    slot: usize,
    slot_count: usize,
    state: OtaState,
) -> Result<BootSlotWrite, OtadataError<F::Error>> {
    check_write_layout::<F>(otadata_offset)?;
    if slot >= slot_count {
        return Err(OtadataError::SlotOutOfRange { slot, slot_count });
    }
    let otadata = Otadata::read(flash, otadata_offset)?;
    let active = otadata.active();
    let seq = next_seq(active.map(|i| otadata.entries[i].seq), slot, slot_count)
        .ok_or(OtadataError::SequenceExhausted)?;
    let entry_index = match active {
        Some(i) => 1 - i,
        None => 0,
    };
    debug!(
        "otadata: slot {} <- seq {} in entry {}",
        slot, seq, entry_index
    );
    rewrite_entry(
        flash,
        otadata_offset,
        entry_index,
        &OtaSelectEntry::new(seq, state),
    )?;
    Ok(BootSlotWrite {
        entry: entry_index,
        seq,
    })
}

#[cfg(test)]
mod tests;

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
//! [`set_state`] mirrors `esp_ota_mark_app_valid_cancel_rollback`: erase and
//! rewrite the active entry's own sector. That *is* a window in which the older
//! entry becomes active; the boot guard has to live with it exactly as ESP-IDF
//! apps do, and the flash model lets the sweeps see it.
//!
//! [`program_seq_label`] only clears bits, never erases: since the CRC does not
//! cover `seq_label`, a partially programmed label can never invalidate the
//! entry, which makes it a power-safe place for a trial-boot marker.

use embedded_storage::nor_flash::{MultiwriteNorFlash, NorFlash, ReadNorFlash};

/// Size of one `esp_ota_select_entry_t`.
pub const ENTRY_SIZE: usize = 32;
/// Distance between the two entries: one flash sector each.
pub const SECTOR_SIZE: u32 = 0x1000;
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
    /// [`program_seq_label`] was asked to turn a 0 bit back into 1, which needs
    /// an erase. Choose a label that only clears bits of the stored one.
    WouldSetBits,
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
            OtadataError::WouldSetBits => {
                f.write_str("seq_label change needs an erase (would set bits)")
            }
            OtadataError::BadLayout => f.write_str("otadata not sector aligned for this flash"),
        }
    }
}

#[cfg(feature = "std")]
impl<E: core::fmt::Debug> std::error::Error for OtadataError<E> {}

fn check_layout<F: ReadNorFlash>(otadata_offset: u32) -> Result<(), OtadataError<F::Error>> {
    if otadata_offset % SECTOR_SIZE != 0 || ENTRY_SIZE % F::READ_SIZE != 0 {
        return Err(OtadataError::BadLayout);
    }
    Ok(())
}

fn check_write_layout<F: NorFlash>(otadata_offset: u32) -> Result<(), OtadataError<F::Error>> {
    check_layout::<F>(otadata_offset)?;
    if SECTOR_SIZE as usize % F::ERASE_SIZE != 0 || ENTRY_SIZE % F::WRITE_SIZE != 0 {
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
/// the new entry is erased (`0xFF`), ready for trial-boot marks.
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

/// Change the state of the active entry, keeping its `seq_label`, as
/// `esp_ota_mark_app_valid_cancel_rollback` and
/// `esp_ota_mark_app_invalid_rollback` do: erase its sector and program it
/// again. Returns the index of the rewritten entry.
pub fn set_state<F: NorFlash>(
    flash: &mut F,
    otadata_offset: u32,
    state: OtaState,
) -> Result<usize, OtadataError<F::Error>> {
    rewrite_active(flash, otadata_offset, state, None)
}

/// Like [`set_state`], but also replaces the active entry's `seq_label`
/// (the rewrite erases the sector anyway, so any label can be had here).
pub fn set_state_and_label<F: NorFlash>(
    flash: &mut F,
    otadata_offset: u32,
    state: OtaState,
    seq_label: [u8; SEQ_LABEL_LEN],
) -> Result<usize, OtadataError<F::Error>> {
    rewrite_active(flash, otadata_offset, state, Some(seq_label))
}

fn rewrite_active<F: NorFlash>(
    flash: &mut F,
    otadata_offset: u32,
    state: OtaState,
    seq_label: Option<[u8; SEQ_LABEL_LEN]>,
) -> Result<usize, OtadataError<F::Error>> {
    check_write_layout::<F>(otadata_offset)?;
    let otadata = Otadata::read(flash, otadata_offset)?;
    let i = otadata.active().ok_or(OtadataError::NoActiveEntry)?;
    let mut entry = otadata.entries[i];
    entry.state = state.to_u32();
    if let Some(label) = seq_label {
        entry.seq_label = label;
    }
    debug!("otadata: entry {} state <- {}", i, state.name());
    rewrite_entry(flash, otadata_offset, i, &entry)?;
    Ok(i)
}

/// Program `new_label` into the `seq_label` of entry `entry` (0 or 1) without
/// erasing. Every bit that is 0 in the stored label must stay 0 in
/// `new_label`, otherwise [`OtadataError::WouldSetBits`] and nothing is
/// written. Unchanged labels are not written at all.
///
/// Power-safe: the CRC covers only `ota_seq`, so an interrupted program leaves
/// a label somewhere between old and new and the entry as valid as before.
pub fn program_seq_label<F: MultiwriteNorFlash>(
    flash: &mut F,
    otadata_offset: u32,
    entry: usize,
    new_label: [u8; SEQ_LABEL_LEN],
) -> Result<(), OtadataError<F::Error>> {
    check_write_layout::<F>(otadata_offset)?;
    if entry > 1 {
        return Err(OtadataError::SlotOutOfRange {
            slot: entry,
            slot_count: 2,
        });
    }
    let at = otadata_offset + entry as u32 * SECTOR_SIZE;
    let mut buf = [0u8; ENTRY_SIZE];
    flash.read(at, &mut buf).map_err(OtadataError::Flash)?;
    let old = OtaSelectEntry::from_bytes(&buf);
    if old.seq_label == new_label {
        return Ok(());
    }
    if old
        .seq_label
        .iter()
        .zip(new_label.iter())
        .any(|(o, n)| n & !o != 0)
    {
        return Err(OtadataError::WouldSetBits);
    }
    if 4 % F::WRITE_SIZE == 0 {
        // Only the label's own words: the words holding seq, state and CRC are
        // never put under a program pulse.
        flash.write(at + 4, &new_label).map_err(OtadataError::Flash)
    } else {
        // Coarser write units: rewrite the whole entry with identical bytes
        // outside the label, which a multi-write flash leaves as they are.
        let mut entry = old;
        entry.seq_label = new_label;
        flash
            .write(at, &entry.to_bytes())
            .map_err(OtadataError::Flash)
    }
}

/// Erase both entries, which makes the bootloader boot the factory app (or
/// `ota_0`), as `esp_ota_set_boot_partition` does for the factory partition.
pub fn erase<F: NorFlash>(
    flash: &mut F,
    otadata_offset: u32,
) -> Result<(), OtadataError<F::Error>> {
    check_write_layout::<F>(otadata_offset)?;
    flash
        .erase(otadata_offset, otadata_offset + OTADATA_SIZE)
        .map_err(OtadataError::Flash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqota_flash_sim::{SimError, SimFlash};

    const OFF: u32 = 0xd000;

    fn flash() -> SimFlash {
        SimFlash::new(0x10000)
    }

    fn read(f: &mut SimFlash) -> Otadata {
        Otadata::read(f, OFF).unwrap()
    }

    /// Plant an entry as a previous writer (ESP-IDF, esptool) would have.
    fn plant(f: &mut SimFlash, index: usize, entry: OtaSelectEntry) {
        let at = (OFF + index as u32 * SECTOR_SIZE) as usize;
        f.raw_mut()[at..at + SECTOR_SIZE as usize].fill(0xFF);
        f.raw_mut()[at..at + ENTRY_SIZE].copy_from_slice(&entry.to_bytes());
    }

    fn corrupt_crc(f: &mut SimFlash, index: usize) {
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
    fn set_state_rewrites_the_active_entry_in_place_keeping_seq_and_label() {
        let mut f = flash();
        set_boot_slot(&mut f, OFF, 0, 2, OtaState::Valid).unwrap();
        set_boot_slot(&mut f, OFF, 1, 2, OtaState::New).unwrap();
        program_seq_label(&mut f, OFF, 1, [0x7F; SEQ_LABEL_LEN]).unwrap();
        assert_eq!(set_state(&mut f, OFF, OtaState::Valid), Ok(1));
        let o = read(&mut f);
        assert_eq!(o.entries[1].seq, 2);
        assert_eq!(o.entries[1].state(), OtaState::Valid);
        assert_eq!(o.entries[1].seq_label, [0x7F; SEQ_LABEL_LEN]);
        assert_eq!(o.entries[0].state(), OtaState::Valid);
        assert_eq!(o.selected_slot(2), Some(1));
    }

    #[test]
    fn marking_the_active_entry_invalid_hands_the_boot_back_to_the_other() {
        let mut f = flash();
        set_boot_slot(&mut f, OFF, 0, 2, OtaState::Valid).unwrap();
        set_boot_slot(&mut f, OFF, 1, 2, OtaState::New).unwrap();
        set_state(&mut f, OFF, OtaState::Invalid).unwrap();
        let o = read(&mut f);
        assert_eq!(o.checks(), [EntryCheck::Valid, EntryCheck::Rejected]);
        assert_eq!(o.selected_slot(2), Some(0));
    }

    #[test]
    fn set_state_without_an_active_entry_is_an_error() {
        let mut f = flash();
        assert_eq!(
            set_state(&mut f, OFF, OtaState::Valid),
            Err(OtadataError::NoActiveEntry)
        );
    }

    #[test]
    fn set_state_and_label_replaces_the_label() {
        let mut f = flash();
        set_boot_slot(&mut f, OFF, 1, 2, OtaState::New).unwrap();
        program_seq_label(&mut f, OFF, 0, [0; SEQ_LABEL_LEN]).unwrap();
        set_state_and_label(&mut f, OFF, OtaState::Valid, [0xFF; SEQ_LABEL_LEN]).unwrap();
        assert_eq!(read(&mut f).entries[0].seq_label, [0xFF; SEQ_LABEL_LEN]);
    }

    #[test]
    fn program_seq_label_only_clears_bits_and_keeps_the_entry_valid() {
        let mut f = flash();
        set_boot_slot(&mut f, OFF, 0, 2, OtaState::New).unwrap();
        let erases = f.stats().erases;
        let mut label = [0xFF; SEQ_LABEL_LEN];
        label[0] = 0xFE;
        program_seq_label(&mut f, OFF, 0, label).unwrap();
        label[19] = 0x00;
        program_seq_label(&mut f, OFF, 0, label).unwrap();
        assert_eq!(f.stats().erases, erases, "no erase");
        let o = read(&mut f);
        assert_eq!(o.entries[0].seq_label, label);
        assert_eq!(o.checks()[0], EntryCheck::Valid);
        assert_eq!(o.selected_slot(2), Some(0));
    }

    #[test]
    fn program_seq_label_refuses_to_set_a_bit() {
        let mut f = flash();
        set_boot_slot(&mut f, OFF, 0, 2, OtaState::New).unwrap();
        program_seq_label(&mut f, OFF, 0, [0x0F; SEQ_LABEL_LEN]).unwrap();
        let writes = f.stats().writes;
        let mut label = [0x0F; SEQ_LABEL_LEN];
        label[5] = 0x1F;
        assert_eq!(
            program_seq_label(&mut f, OFF, 0, label),
            Err(OtadataError::WouldSetBits)
        );
        assert_eq!(f.stats().writes, writes, "nothing written");
        assert_eq!(read(&mut f).entries[0].seq_label, [0x0F; SEQ_LABEL_LEN]);
    }

    #[test]
    fn an_unchanged_label_is_not_written() {
        let mut f = flash();
        set_boot_slot(&mut f, OFF, 0, 2, OtaState::New).unwrap();
        let writes = f.stats().writes;
        program_seq_label(&mut f, OFF, 0, [0xFF; SEQ_LABEL_LEN]).unwrap();
        assert_eq!(f.stats().writes, writes);
    }

    #[test]
    fn a_torn_label_program_never_invalidates_the_entry() {
        for budget in 0..SEQ_LABEL_LEN as u64 {
            let mut f = flash();
            set_boot_slot(&mut f, OFF, 1, 2, OtaState::New).unwrap();
            f.cut_power_after_bytes(budget);
            assert_eq!(
                program_seq_label(&mut f, OFF, 1, [0; SEQ_LABEL_LEN]),
                Err(OtadataError::Flash(SimError::PowerCut))
            );
            f.power_on();
            let o = read(&mut f);
            assert_eq!(o.checks()[0], EntryCheck::Valid);
            assert_eq!(o.selected_slot(2), Some(1), "budget {budget}");
        }
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
    fn erase_returns_otadata_to_blank() {
        let mut f = flash();
        set_boot_slot(&mut f, OFF, 1, 2, OtaState::Valid).unwrap();
        set_boot_slot(&mut f, OFF, 0, 2, OtaState::Valid).unwrap();
        erase(&mut f, OFF).unwrap();
        assert_eq!(
            read(&mut f).checks(),
            [EntryCheck::Blank, EntryCheck::Blank]
        );
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
}

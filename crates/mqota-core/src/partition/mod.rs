//! The ESP-IDF partition table, as the second-stage bootloader and
//! `esp_partition_find()` read it, and as `gen_esp32part.py` and espflash write it.
//!
//! The binary table lives at flash offset [`TABLE_OFFSET`] and takes at most
//! [`TABLE_MAX_LEN`] bytes: a run of 32-byte `esp_partition_info_t` entries, an
//! optional MD5 entry, then erased flash (`0xFF`) as the end marker.
//!
//! | bytes  | `esp_partition_info_t` field | meaning                                          |
//! |--------|------------------------------|--------------------------------------------------|
//! | 0..2   | `magic`                      | `0x50AA` little-endian (`AA 50` on flash)        |
//! | 2      | `type`                       | [`PartitionType`]: app, data or a custom byte    |
//! | 3      | `subtype`                    | [`SubType`], read in the light of the type       |
//! | 4..8   | `pos.offset`                 | start on flash, u32 LE                           |
//! | 8..12  | `pos.size`                   | length in bytes, u32 LE                          |
//! | 12..28 | `label`                      | [`Label`], NUL-padded, no terminator when 16 long|
//! | 28..32 | `flags`                      | [`Flags`]: bit 0 encrypted, bit 1 readonly       |
//!
//! | bytes  | MD5 entry                                                                        |
//! |--------|----------------------------------------------------------------------------------|
//! | 0..2   | `0xEBEB` little-endian (`ESP_PARTITION_MAGIC_MD5`)                               |
//! | 2..16  | `0xFF`                                                                           |
//! | 16..32 | MD5 of every entry before it, as written                                         |
//!
//! The CSV form (`partitions.csv`) is parsed by [`PartitionTable::from_csv`]; see
//! the `csv` submodule for the rules it shares with `gen_esp32part.py`.
//!
//! Why not a crate of the field: `esp-idf-part` (what espflash uses) needs `std`
//! and allocates; `esp-bootloader-esp-idf` reads tables on the chip only and
//! cannot write them or read CSV. The core needs all three without a heap.

mod csv;

pub use self::csv::{CsvError, Field, DEFAULT_4MB_CSV};

use core::fmt;
use embedded_storage::nor_flash::ReadNorFlash;
use md5::{Digest, Md5};

/// Where the bootloader looks for the table (`CONFIG_PARTITION_TABLE_OFFSET`'s default).
pub const TABLE_OFFSET: u32 = 0x8000;
/// Bytes the table may take (`MAX_PARTITION_LENGTH` in `gen_esp32part.py`); the rest
/// of its 4 KiB sector is left for a signature.
pub const TABLE_MAX_LEN: usize = 0xC00;
/// The first address a partition may start at: the table's sector ends here.
pub const FIRST_PARTITION_OFFSET: u32 = TABLE_OFFSET + 0x1000;
/// Size of one `esp_partition_info_t`.
pub const ENTRY_LEN: usize = 32;
/// Most partitions one table holds: [`TABLE_MAX_LEN`] has room for 96 entries and
/// one of them is the MD5 entry.
pub const MAX_ENTRIES: usize = TABLE_MAX_LEN / ENTRY_LEN - 1;
/// `ESP_PARTITION_MAGIC`.
pub const ENTRY_MAGIC: u16 = 0x50AA;
/// `ESP_PARTITION_MAGIC_MD5`.
pub const MD5_MAGIC: u16 = 0xEBEB;
/// App partitions must start on a 64 KiB boundary: the flash MMU maps them in pages
/// of that size.
pub const APP_ALIGN: u32 = 0x1_0000;
/// Every other partition must start on a 4 KiB boundary, the flash sector size.
pub const DATA_ALIGN: u32 = crate::layout::SECTOR_SIZE;
/// Size the otadata partition must have: two `esp_ota_select_entry_t` sectors.
pub use crate::otadata::OTADATA_SIZE;

/// The partition type byte (`esp_partition_type_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct PartitionType(pub u8);

impl PartitionType {
    /// `ESP_PARTITION_TYPE_APP`.
    pub const APP: Self = Self(0x00);
    /// `ESP_PARTITION_TYPE_DATA`.
    pub const DATA: Self = Self(0x01);

    /// The CSV name (`app`, `data`), if the type has one.
    pub const fn name(self) -> Option<&'static str> {
        match self {
            Self::APP => Some("app"),
            Self::DATA => Some("data"),
            _ => None,
        }
    }

    /// The type called `name` in a CSV file.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "app" => Some(Self::APP),
            "data" => Some(Self::DATA),
            _ => None,
        }
    }

    /// Where partitions of this type must start (what `gen_esp32part.py` pads
    /// blank offsets to).
    pub const fn alignment(self) -> u32 {
        match self {
            Self::APP => APP_ALIGN,
            _ => DATA_ALIGN,
        }
    }
}

impl fmt::Display for PartitionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "{:#04x}", self.0),
        }
    }
}

/// The partition subtype byte (`esp_partition_subtype_t`). The same byte means
/// different things under different [`PartitionType`]s: `0x00` is `factory` for an
/// app and `ota` (otadata) for data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SubType(pub u8);

/// CSV names of the app subtypes `ota_0` .. `ota_15`, indexed by slot.
const OTA_NAMES: [&str; 16] = [
    "ota_0", "ota_1", "ota_2", "ota_3", "ota_4", "ota_5", "ota_6", "ota_7", "ota_8", "ota_9",
    "ota_10", "ota_11", "ota_12", "ota_13", "ota_14", "ota_15",
];

/// CSV names of the data subtypes, as `esp_partition.h` and `gen_esp32part.py` spell them.
const DATA_NAMES: [(&str, SubType); 11] = [
    ("ota", SubType::OTADATA),
    ("phy", SubType::PHY),
    ("nvs", SubType::NVS),
    ("coredump", SubType::COREDUMP),
    ("nvs_keys", SubType::NVS_KEYS),
    ("efuse", SubType::EFUSE),
    ("undefined", SubType::UNDEFINED),
    ("esphttpd", SubType::ESPHTTPD),
    ("fat", SubType::FAT),
    ("spiffs", SubType::SPIFFS),
    ("littlefs", SubType::LITTLEFS),
];

impl SubType {
    /// App: `ESP_PARTITION_SUBTYPE_APP_FACTORY`, booted when otadata is blank.
    pub const FACTORY: Self = Self(0x00);
    /// App: `ESP_PARTITION_SUBTYPE_APP_OTA_0`, the first OTA slot.
    pub const OTA_0: Self = Self(0x10);
    /// App: `ESP_PARTITION_SUBTYPE_APP_OTA_1`.
    pub const OTA_1: Self = Self(0x11);
    /// App: `ESP_PARTITION_SUBTYPE_APP_OTA_15`, the last OTA slot.
    pub const OTA_15: Self = Self(0x1F);
    /// App: `ESP_PARTITION_SUBTYPE_APP_TEST`.
    pub const TEST: Self = Self(0x20);
    /// Data: `ESP_PARTITION_SUBTYPE_DATA_OTA`, the otadata partition (CSV name `ota`).
    pub const OTADATA: Self = Self(0x00);
    /// Data: `ESP_PARTITION_SUBTYPE_DATA_PHY`.
    pub const PHY: Self = Self(0x01);
    /// Data: `ESP_PARTITION_SUBTYPE_DATA_NVS`.
    pub const NVS: Self = Self(0x02);
    /// Data: `ESP_PARTITION_SUBTYPE_DATA_COREDUMP`.
    pub const COREDUMP: Self = Self(0x03);
    /// Data: `ESP_PARTITION_SUBTYPE_DATA_NVS_KEYS`.
    pub const NVS_KEYS: Self = Self(0x04);
    /// Data: `ESP_PARTITION_SUBTYPE_DATA_EFUSE_EM`.
    pub const EFUSE: Self = Self(0x05);
    /// Data: `ESP_PARTITION_SUBTYPE_DATA_UNDEFINED`, what a blank CSV subtype means.
    pub const UNDEFINED: Self = Self(0x06);
    /// Data: `ESP_PARTITION_SUBTYPE_DATA_ESPHTTPD`.
    pub const ESPHTTPD: Self = Self(0x80);
    /// Data: `ESP_PARTITION_SUBTYPE_DATA_FAT`.
    pub const FAT: Self = Self(0x81);
    /// Data: `ESP_PARTITION_SUBTYPE_DATA_SPIFFS`.
    pub const SPIFFS: Self = Self(0x82);
    /// Data: `ESP_PARTITION_SUBTYPE_DATA_LITTLEFS`.
    pub const LITTLEFS: Self = Self(0x83);

    /// The app subtype of OTA slot `slot` (`ota_0` .. `ota_15`), if there is one.
    pub const fn ota(slot: u8) -> Option<Self> {
        if slot < 16 {
            Some(Self(Self::OTA_0.0 + slot))
        } else {
            None
        }
    }

    /// The OTA slot number, if this is an app subtype `ota_0` .. `ota_15`.
    pub const fn ota_slot(self) -> Option<u8> {
        if self.0 >= Self::OTA_0.0 && self.0 <= Self::OTA_15.0 {
            Some(self.0 - Self::OTA_0.0)
        } else {
            None
        }
    }

    /// The CSV name of this subtype under type `ty`, if it has one.
    pub fn name(self, ty: PartitionType) -> Option<&'static str> {
        match ty {
            PartitionType::APP => match self {
                Self::FACTORY => Some("factory"),
                Self::TEST => Some("test"),
                _ => self.ota_slot().map(|n| OTA_NAMES[n as usize]),
            },
            PartitionType::DATA => DATA_NAMES
                .iter()
                .find(|(_, sub)| *sub == self)
                .map(|(name, _)| *name),
            _ => None,
        }
    }

    /// The subtype called `name` under type `ty` in a CSV file. Custom types have
    /// no subtype names, as in `gen_esp32part.py`.
    pub fn from_name(ty: PartitionType, name: &str) -> Option<Self> {
        match ty {
            PartitionType::APP => match name {
                "factory" => Some(Self::FACTORY),
                "test" => Some(Self::TEST),
                _ => OTA_NAMES
                    .iter()
                    .position(|n| *n == name)
                    .and_then(|slot| Self::ota(slot as u8)),
            },
            PartitionType::DATA => DATA_NAMES
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, sub)| *sub),
            _ => None,
        }
    }
}

/// The partition flags word. Only the bits ESP-IDF defines are accepted, so that
/// every table this module holds can be written as CSV.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Flags(u32);

impl Flags {
    /// No flags.
    pub const NONE: Self = Self(0);
    /// `PART_FLAG_ENCRYPTED`: encrypted when flash encryption is on.
    pub const ENCRYPTED: Self = Self(1 << 0);
    /// `PART_FLAG_READONLY`: `esp_partition_write()` refuses it.
    pub const READONLY: Self = Self(1 << 1);
    const KNOWN: u32 = Self::ENCRYPTED.0 | Self::READONLY.0;

    /// The raw word as stored.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// The flags for a raw word, or `None` if it sets a bit ESP-IDF does not define.
    pub const fn from_bits(bits: u32) -> Option<Self> {
        if bits & !Self::KNOWN == 0 {
            Some(Self(bits))
        } else {
            None
        }
    }

    /// Whether every flag in `other` is set here.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Both sets of flags.
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
}

impl fmt::Display for Flags {
    /// The CSV spelling: `encrypted`, `readonly`, `encrypted:readonly` or nothing.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        for (flag, name) in [(Self::ENCRYPTED, "encrypted"), (Self::READONLY, "readonly")] {
            if self.contains(flag) {
                f.write_str(sep)?;
                f.write_str(name)?;
                sep = ":";
            }
        }
        Ok(())
    }
}

/// Why a partition label was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum LabelError {
    /// Longer than the 16 bytes of `esp_partition_info_t.label`: shorten it.
    TooLong,
    /// Empty: give the partition a name.
    Empty,
    /// The stored bytes are not UTF-8: the table is corrupt or not a table.
    NotUtf8,
    /// A non-NUL byte follows the first NUL in the stored label: the table is
    /// corrupt, or was written by a tool that does not NUL-pad.
    NotNulPadded,
    /// Holds a character a CSV file cannot carry (a comma, a control character,
    /// leading or trailing white space, or a leading `#`): rename the partition.
    BadChar,
}

impl fmt::Display for LabelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::TooLong => "label is longer than 16 bytes",
            Self::Empty => "label is empty",
            Self::NotUtf8 => "label is not UTF-8",
            Self::NotNulPadded => "label has bytes after its NUL padding",
            Self::BadChar => {
                "label has a comma, control character, surrounding space or leading '#'"
            }
        })
    }
}

/// A partition label: 1 to 16 bytes of UTF-8 that survive a trip through CSV.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Label {
    bytes: [u8; 16],
    len: u8,
}

impl Label {
    /// Longest label `esp_partition_info_t` can hold.
    pub const MAX_LEN: usize = 16;

    /// A label from text, checked as described on [`LabelError`].
    pub fn new(text: &str) -> Result<Self, LabelError> {
        if text.is_empty() {
            return Err(LabelError::Empty);
        }
        if text.len() > Self::MAX_LEN {
            return Err(LabelError::TooLong);
        }
        // `gen_esp32part.py` splits lines on commas and strips fields, so any of
        // these would come back from a CSV as a different label or none at all.
        if text.starts_with('#')
            || text.trim() != text
            || text.chars().any(|c| c == ',' || c.is_control())
        {
            return Err(LabelError::BadChar);
        }
        let mut bytes = [0; 16];
        bytes[..text.len()].copy_from_slice(text.as_bytes());
        Ok(Self {
            bytes,
            len: text.len() as u8,
        })
    }

    /// A label from the 16 NUL-padded bytes of `esp_partition_info_t.label`.
    pub fn from_padded(raw: &[u8; 16]) -> Result<Self, LabelError> {
        let len = raw.iter().position(|&b| b == 0).unwrap_or(16);
        if raw[len..].iter().any(|&b| b != 0) {
            return Err(LabelError::NotNulPadded);
        }
        let text = core::str::from_utf8(&raw[..len]).map_err(|_| LabelError::NotUtf8)?;
        Self::new(text)
    }

    /// The label as text.
    pub fn as_str(&self) -> &str {
        // Built only from a `&str` of `len` bytes, so this cannot fail.
        core::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("")
    }

    /// The 16 NUL-padded bytes stored in `esp_partition_info_t.label`.
    pub const fn to_padded(&self) -> [u8; 16] {
        self.bytes
    }
}

impl fmt::Debug for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for Label {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Label {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for Label {
    fn format(&self, f: defmt::Formatter) {
        defmt::write!(f, "{=str}", self.as_str())
    }
}

/// One partition: the decoded `esp_partition_info_t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Partition {
    /// Its name, unique in the table.
    pub label: Label,
    /// App, data or custom.
    pub ty: PartitionType,
    /// What kind of app or data.
    pub subtype: SubType,
    /// Start on flash.
    pub offset: u32,
    /// Length in bytes.
    pub size: u32,
    /// Encrypted / readonly.
    pub flags: Flags,
}

impl Partition {
    /// A partition without flags.
    pub fn new(
        label: &str,
        ty: PartitionType,
        subtype: SubType,
        offset: u32,
        size: u32,
    ) -> Result<Self, LabelError> {
        Ok(Self {
            label: Label::new(label)?,
            ty,
            subtype,
            offset,
            size,
            flags: Flags::NONE,
        })
    }

    /// One past the last byte, as a `u64` so that a partition ending at 4 GiB
    /// has an end.
    pub const fn end(&self) -> u64 {
        self.offset as u64 + self.size as u64
    }

    /// Whether this is an app partition.
    pub const fn is_app(&self) -> bool {
        self.ty.0 == PartitionType::APP.0
    }

    /// The OTA slot number if this is an app partition `ota_0` .. `ota_15`.
    pub const fn ota_slot(&self) -> Option<u8> {
        if self.is_app() {
            self.subtype.ota_slot()
        } else {
            None
        }
    }

    /// The CSV name of the subtype, if it has one.
    pub fn subtype_name(&self) -> Option<&'static str> {
        self.subtype.name(self.ty)
    }

    /// Whether `self` and `other` share a byte of flash.
    pub const fn overlaps(&self, other: &Partition) -> bool {
        let start = if self.offset > other.offset {
            self.offset
        } else {
            other.offset
        };
        let end = if self.end() < other.end() {
            self.end()
        } else {
            other.end()
        };
        (start as u64) < end
    }

    /// The 32 bytes of this partition's `esp_partition_info_t`.
    pub fn to_bytes(&self) -> [u8; ENTRY_LEN] {
        let mut raw = [0; ENTRY_LEN];
        raw[0..2].copy_from_slice(&ENTRY_MAGIC.to_le_bytes());
        raw[2] = self.ty.0;
        raw[3] = self.subtype.0;
        raw[4..8].copy_from_slice(&self.offset.to_le_bytes());
        raw[8..12].copy_from_slice(&self.size.to_le_bytes());
        raw[12..28].copy_from_slice(&self.label.to_padded());
        raw[28..32].copy_from_slice(&self.flags.bits().to_le_bytes());
        raw
    }

    /// Decodes entry number `entry` (for error messages) from its 32 bytes.
    /// The magic must already have been checked.
    fn from_entry(entry: usize, raw: &[u8; ENTRY_LEN]) -> Result<Self, Error> {
        let mut label = [0; 16];
        label.copy_from_slice(&raw[12..28]);
        let label = Label::from_padded(&label).map_err(|error| Error::Label { entry, error })?;
        let bits = u32::from_le_bytes([raw[28], raw[29], raw[30], raw[31]]);
        let flags = Flags::from_bits(bits).ok_or(Error::UnknownFlags { label, bits })?;
        Ok(Self {
            label,
            ty: PartitionType(raw[2]),
            subtype: SubType(raw[3]),
            offset: u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]),
            size: u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]),
            flags,
        })
    }
}

/// Everything that can be wrong with a partition table, binary or CSV.
///
/// A table that fails here will not boot, or will boot into the wrong thing: the
/// caller should refuse it (report it to whoever supplied it), never patch it up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Error {
    /// The data ran out before the `0xFF` end marker: read the whole
    /// [`TABLE_MAX_LEN`] bytes, or this is not a partition table.
    NoEndMarker,
    /// Entry `entry` starts with neither `0x50AA`, `0xEBEB` nor the end marker:
    /// the flash at this offset does not hold a table, or it is corrupt.
    BadMagic {
        /// Index of the 32-byte entry.
        entry: usize,
        /// The magic found there.
        magic: u16,
    },
    /// The MD5 entry does not match the entries before it: the table is corrupt;
    /// write it again from its source.
    BadMd5,
    /// An entry follows the MD5 entry, which the tools always write last: the
    /// table is corrupt or hand-made.
    EntryAfterMd5 {
        /// Index of the 32-byte entry after the MD5 entry.
        entry: usize,
    },
    /// More than [`MAX_ENTRIES`] partitions: merge or drop some.
    TooManyEntries,
    /// The table holds no partitions (a blank flash reads like this): flash a table.
    Empty,
    /// The label of entry `entry` (counting from 0) is unusable.
    Label {
        /// Index of the partition.
        entry: usize,
        /// What is wrong with the label.
        error: LabelError,
    },
    /// The flags word sets bits ESP-IDF does not define: the table is corrupt or
    /// from a newer ESP-IDF this code does not know.
    UnknownFlags {
        /// The partition.
        label: Label,
        /// The flags word found.
        bits: u32,
    },
    /// The partition runs past the 4 GiB a 32-bit offset can address: fix its size.
    OutOfRange {
        /// The partition.
        label: Label,
    },
    /// The partition starts before [`FIRST_PARTITION_OFFSET`], over the bootloader
    /// or the table itself: move it.
    BelowTable {
        /// The partition.
        label: Label,
    },
    /// The partition is not aligned: apps to [`APP_ALIGN`], the rest to
    /// [`DATA_ALIGN`]. Move it.
    Misaligned {
        /// The partition.
        label: Label,
        /// The alignment it needs.
        align: u32,
    },
    /// Two partitions share flash: move or shrink one.
    Overlap {
        /// The later partition in the table.
        label: Label,
        /// The earlier one it overlaps.
        other: Label,
    },
    /// Two partitions have the same label: rename one.
    DuplicateLabel {
        /// The repeated label.
        label: Label,
    },
    /// Two partitions are both the factory app, both otadata or both the same OTA
    /// slot, so the bootloader could pick either: drop or retype one.
    DuplicateSubtype {
        /// The later partition in the table.
        label: Label,
        /// The earlier one with the same role.
        other: Label,
    },
    /// The otadata partition is not [`OTADATA_SIZE`] bytes: fix its size.
    OtadataSize {
        /// The otadata partition.
        label: Label,
    },
    /// No app partition, so nothing to boot: add one.
    NoApp,
    /// A CSV line lacks a field that has no default: fill it in.
    MissingField(Field),
    /// A CSV line has non-empty fields past the sixth (flags): remove them.
    TooManyFields,
    /// The CSV type is neither `app`, `data` nor a number 0..=255.
    BadType,
    /// The CSV subtype is neither a name for this type nor a number 0..=255.
    BadSubtype,
    /// The CSV offset or size is not a number (hex `0x..`, decimal, optionally
    /// with a `K` or `M` suffix), or does not fit 32 bits.
    BadNumber(Field),
    /// The CSV flags hold something other than `encrypted` and `readonly`.
    UnknownFlag,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoEndMarker => f.write_str("partition table has no end marker"),
            Self::BadMagic { entry, magic } => {
                write!(f, "entry {entry} has bad magic {magic:#06x}")
            }
            Self::BadMd5 => f.write_str("partition table MD5 does not match its entries"),
            Self::EntryAfterMd5 { entry } => {
                write!(f, "entry {entry} follows the MD5 entry")
            }
            Self::TooManyEntries => write!(f, "more than {MAX_ENTRIES} partitions"),
            Self::Empty => f.write_str("partition table is empty"),
            Self::Label { entry, error } => write!(f, "partition {entry}: {error}"),
            Self::UnknownFlags { label, bits } => {
                write!(f, "partition `{label}` has unknown flags {bits:#x}")
            }
            Self::OutOfRange { label } => write!(f, "partition `{label}` runs past 4 GiB"),
            Self::BelowTable { label } => write!(
                f,
                "partition `{label}` starts below {FIRST_PARTITION_OFFSET:#x}, over the bootloader or partition table"
            ),
            Self::Misaligned { label, align } => {
                write!(f, "partition `{label}` is not aligned to {align:#x}")
            }
            Self::Overlap { label, other } => {
                write!(f, "partition `{label}` overlaps `{other}`")
            }
            Self::DuplicateLabel { label } => {
                write!(f, "two partitions are labelled `{label}`")
            }
            Self::DuplicateSubtype { label, other } => {
                write!(f, "partition `{label}` has the same role as `{other}`")
            }
            Self::OtadataSize { label } => {
                write!(f, "otadata partition `{label}` is not {OTADATA_SIZE:#x} bytes")
            }
            Self::NoApp => f.write_str("no app partition"),
            Self::MissingField(field) => write!(f, "{field} is missing"),
            Self::TooManyFields => f.write_str("more than six fields"),
            Self::BadType => f.write_str("type is not `app`, `data` or a number 0..=255"),
            Self::BadSubtype => {
                f.write_str("subtype is not a name for this type or a number 0..=255")
            }
            Self::BadNumber(field) => write!(f, "{field} is not a 32-bit number"),
            Self::UnknownFlag => f.write_str("flags other than `encrypted` and `readonly`"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Error {}

/// Reading a table from flash failed.
#[derive(Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReadError<E> {
    /// The flash driver failed: retry, or treat the flash as broken.
    Flash(E),
    /// The flash was read but does not hold a good table: see [`Error`].
    Table(Error),
}

impl<E: fmt::Debug> fmt::Display for ReadError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Flash(e) => write!(f, "reading the partition table: {e:?}"),
            Self::Table(e) => fmt::Display::fmt(e, f),
        }
    }
}

#[cfg(feature = "std")]
impl<E: fmt::Debug> std::error::Error for ReadError<E> {}

impl<E> From<Error> for ReadError<E> {
    fn from(e: Error) -> Self {
        Self::Table(e)
    }
}

/// A checked partition table of at most [`MAX_ENTRIES`] partitions, in table order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionTable {
    entries: heapless::Vec<Partition, MAX_ENTRIES>,
}

impl PartitionTable {
    /// A table of `partitions`, checked as a binary or CSV table would be.
    pub fn new(partitions: &[Partition]) -> Result<Self, Error> {
        let entries = heapless::Vec::from_slice(partitions).map_err(|_| Error::TooManyEntries)?;
        let table = Self { entries };
        table.validate().map_err(|(_, e)| e)?;
        Ok(table)
    }

    /// Parses a binary table (what is at [`TABLE_OFFSET`]) from `bytes`, which
    /// may be shorter than [`TABLE_MAX_LEN`] if the end marker is in it, and may
    /// run on past it (only the first [`TABLE_MAX_LEN`] bytes are looked at).
    ///
    /// Mirrors `esp_partition_table_verify()`: the MD5 entry is optional.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let mut parser = BinaryParser::new();
        for chunk in bytes
            .chunks_exact(ENTRY_LEN)
            .take(TABLE_MAX_LEN / ENTRY_LEN)
        {
            let mut raw = [0; ENTRY_LEN];
            raw.copy_from_slice(chunk);
            if parser.feed(&raw)? {
                return parser.finish();
            }
        }
        parser.out_of_data()
    }

    /// Reads and parses the binary table at `offset` (normally [`TABLE_OFFSET`])
    /// one 32-byte entry at a time, so it needs no 3 KiB buffer. The flash's
    /// `READ_SIZE` must divide 32.
    pub fn read_from<F: ReadNorFlash>(
        flash: &mut F,
        offset: u32,
    ) -> Result<Self, ReadError<F::Error>> {
        let mut parser = BinaryParser::new();
        for slot in 0..TABLE_MAX_LEN / ENTRY_LEN {
            let mut raw = [0; ENTRY_LEN];
            let at = offset
                .checked_add((slot * ENTRY_LEN) as u32)
                .ok_or(ReadError::Table(Error::NoEndMarker))?;
            flash.read(at, &mut raw).map_err(ReadError::Flash)?;
            if parser.feed(&raw)? {
                return Ok(parser.finish()?);
            }
        }
        Ok(parser.out_of_data()?)
    }

    /// The binary table exactly as `gen_esp32part.py` and espflash write it:
    /// the entries, the MD5 entry, then `0xFF` up to [`TABLE_MAX_LEN`].
    pub fn to_bytes(&self) -> [u8; TABLE_MAX_LEN] {
        let mut out = [0xFF; TABLE_MAX_LEN];
        let mut md5 = Md5::new();
        let mut at = 0;
        for p in &self.entries {
            let raw = p.to_bytes();
            md5.update(raw);
            out[at..at + ENTRY_LEN].copy_from_slice(&raw);
            at += ENTRY_LEN;
        }
        // MAX_ENTRIES leaves room for this one slot; 0xEBEB then 14 bytes of 0xFF.
        out[at..at + 2].copy_from_slice(&MD5_MAGIC.to_le_bytes());
        out[at + 16..at + ENTRY_LEN].copy_from_slice(&md5.finalize());
        out
    }

    /// The partitions in table order.
    pub fn partitions(&self) -> &[Partition] {
        &self.entries
    }

    /// The partition labelled `label` (`esp_partition_find_first(.., label)`).
    pub fn find(&self, label: &str) -> Option<&Partition> {
        self.entries.iter().find(|p| p.label == label)
    }

    /// The first partition of type `ty` and subtype `subtype`.
    pub fn find_by_type(&self, ty: PartitionType, subtype: SubType) -> Option<&Partition> {
        self.entries
            .iter()
            .find(|p| p.ty == ty && p.subtype == subtype)
    }

    /// Every partition of type `ty`, in table order.
    pub fn iter_type(&self, ty: PartitionType) -> impl Iterator<Item = &Partition> {
        self.entries.iter().filter(move |p| p.ty == ty)
    }

    /// The app partition of OTA slot `slot` (`ota_<slot>`).
    pub fn ota_slot(&self, slot: u8) -> Option<&Partition> {
        self.find_by_type(PartitionType::APP, SubType::ota(slot)?)
    }

    /// The OTA app partitions by slot number (`ota_0`, `ota_1`, ...), whatever
    /// their order in the table; missing slot numbers are skipped.
    pub fn ota_slots(&self) -> impl Iterator<Item = &Partition> {
        (0..16).filter_map(move |slot| self.ota_slot(slot))
    }

    /// The otadata partition (`data`, `ota`), which chooses the boot slot.
    pub fn otadata(&self) -> Option<&Partition> {
        self.find_by_type(PartitionType::DATA, SubType::OTADATA)
    }

    /// The factory app, booted when otadata is blank.
    pub fn factory(&self) -> Option<&Partition> {
        self.find_by_type(PartitionType::APP, SubType::FACTORY)
    }

    /// The partition holding flash address `addr`, if any.
    pub fn containing(&self, addr: u32) -> Option<&Partition> {
        self.entries
            .iter()
            .find(|p| p.offset <= addr && (addr as u64) < p.end())
    }

    /// Checks the rules of `gen_esp32part.py`'s `verify()` and espflash's
    /// `validate()`; on failure returns the index of the offending partition
    /// (none for table-wide faults) so the CSV parser can name its line.
    fn validate(&self) -> Result<(), (Option<usize>, Error)> {
        if self.entries.is_empty() {
            return Err((None, Error::Empty));
        }
        for (i, p) in self.entries.iter().enumerate() {
            let fail = |e| Err((Some(i), e));
            let label = p.label;
            if p.end() > 1 << 32 {
                return fail(Error::OutOfRange { label });
            }
            if p.offset < FIRST_PARTITION_OFFSET {
                return fail(Error::BelowTable { label });
            }
            let align = p.ty.alignment();
            if p.offset % align != 0 {
                return fail(Error::Misaligned { label, align });
            }
            let is_otadata = p.ty == PartitionType::DATA && p.subtype == SubType::OTADATA;
            if is_otadata && p.size != OTADATA_SIZE {
                return fail(Error::OtadataSize { label });
            }
            let unique_role = is_otadata
                || (p.is_app() && (p.subtype == SubType::FACTORY || p.ota_slot().is_some()));
            for q in &self.entries[..i] {
                let other = q.label;
                if q.label == p.label {
                    return fail(Error::DuplicateLabel { label });
                }
                if unique_role && q.ty == p.ty && q.subtype == p.subtype {
                    return fail(Error::DuplicateSubtype { label, other });
                }
                if p.overlaps(q) {
                    return fail(Error::Overlap { label, other });
                }
            }
        }
        if !self.entries.iter().any(Partition::is_app) {
            return Err((None, Error::NoApp));
        }
        Ok(())
    }
}

/// The binary table read one entry at a time, so the same code serves a byte
/// slice and a flash read entry by entry.
struct BinaryParser {
    entries: heapless::Vec<Partition, MAX_ENTRIES>,
    md5: Md5,
    md5_seen: bool,
    slot: usize,
}

impl BinaryParser {
    fn new() -> Self {
        Self {
            entries: heapless::Vec::new(),
            md5: Md5::new(),
            md5_seen: false,
            slot: 0,
        }
    }

    /// Takes the next 32-byte entry; `Ok(true)` once the end marker is reached.
    fn feed(&mut self, raw: &[u8; ENTRY_LEN]) -> Result<bool, Error> {
        let entry = self.slot;
        self.slot += 1;
        let magic = u16::from_le_bytes([raw[0], raw[1]]);
        // esp_partition_table_verify() ends the table at magic, type and subtype
        // all 0xFF; the rest of the entry is not looked at.
        if raw[..4] == [0xFF; 4] {
            return Ok(true);
        }
        if self.md5_seen {
            return Err(Error::EntryAfterMd5 { entry });
        }
        match magic {
            MD5_MAGIC => {
                // Like the bootloader, only the magic marks the MD5 entry; the
                // digest covers every entry before it, byte for byte.
                if self.md5.clone().finalize()[..] != raw[16..] {
                    return Err(Error::BadMd5);
                }
                self.md5_seen = true;
                Ok(false)
            }
            ENTRY_MAGIC => {
                let p = Partition::from_entry(self.entries.len(), raw)?;
                self.entries.push(p).map_err(|_| Error::TooManyEntries)?;
                self.md5.update(raw);
                Ok(false)
            }
            _ => Err(Error::BadMagic { entry, magic }),
        }
    }

    fn finish(self) -> Result<PartitionTable, Error> {
        let table = PartitionTable {
            entries: self.entries,
        };
        table.validate().map_err(|(_, e)| e)?;
        debug!("partition table: {} partitions", table.entries.len());
        Ok(table)
    }

    /// The data ended (or the 0xC00 bytes were used up) without an end marker.
    fn out_of_data(self) -> Result<PartitionTable, Error> {
        // A full table (95 entries and the MD5 entry) fills all 0xC00 bytes, so
        // espflash writes no end marker after it; the bootloader stops there too.
        if self.slot == TABLE_MAX_LEN / ENTRY_LEN && self.md5_seen {
            self.finish()
        } else {
            Err(Error::NoEndMarker)
        }
    }
}

#[cfg(test)]
mod tests;

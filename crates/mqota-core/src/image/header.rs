//! The fixed-size headers of an app image: `esp_image_header_t` and
//! `esp_image_segment_header_t`, plus the [`Chip`] named by the header.

use core::fmt;
use core::ops::Range;
use core::str::FromStr;

/// First byte of every image (`ESP_IMAGE_HEADER_MAGIC`).
pub const IMAGE_MAGIC: u8 = 0xE9;
/// Size of `esp_image_header_t`: the 8-byte common header plus the 16-byte
/// extended header.
pub const IMAGE_HEADER_LEN: usize = 24;
/// Size of `esp_image_segment_header_t`.
pub const SEGMENT_HEADER_LEN: usize = 8;
/// `ESP_IMAGE_MAX_SEGMENTS`: the bootloader refuses images with more.
pub const MAX_SEGMENTS: usize = 16;
/// Seed of the one-byte XOR checksum (`ESP_ROM_CHECKSUM_INITIAL`).
pub const CHECKSUM_SEED: u8 = 0xEF;
/// The bootloader refuses segments of this length or more, and partitions
/// larger than this (`SIXTEEN_MB` in `esp_image_format.c`).
pub const MAX_IMAGE_LEN: u32 = 16 * 1024 * 1024;

/// An Espressif chip, as named by the `chip_id` field of the image header.
///
/// The ids and the flash-mapped address windows are the ones esptool uses
/// (`IMAGE_CHIP_ID`, `IROM_MAP_START`..`IROM_MAP_END`,
/// `DROM_MAP_START`..`DROM_MAP_END` of its `ESP32*ROM` classes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Chip {
    /// ESP32 (Xtensa), chip id 0.
    Esp32,
    /// ESP32-S2 (Xtensa), chip id 2.
    Esp32s2,
    /// ESP32-C3 (RISC-V), chip id 5.
    Esp32c3,
    /// ESP32-S3 (Xtensa), chip id 9.
    Esp32s3,
    /// ESP32-C2 (RISC-V), chip id 12.
    Esp32c2,
    /// ESP32-C6 (RISC-V), chip id 13.
    Esp32c6,
    /// ESP32-H2 (RISC-V), chip id 16.
    Esp32h2,
    /// ESP32-P4 (RISC-V), chip id 18.
    Esp32p4,
    /// ESP32-C5 (RISC-V), chip id 23.
    Esp32c5,
}

impl Chip {
    /// Every chip this crate knows, in chip-id order.
    pub const ALL: [Chip; 9] = [
        Chip::Esp32,
        Chip::Esp32s2,
        Chip::Esp32c3,
        Chip::Esp32s3,
        Chip::Esp32c2,
        Chip::Esp32c6,
        Chip::Esp32h2,
        Chip::Esp32p4,
        Chip::Esp32c5,
    ];

    /// The `chip_id` written in the extended image header.
    pub const fn id(self) -> u16 {
        match self {
            Chip::Esp32 => 0,
            Chip::Esp32s2 => 2,
            Chip::Esp32c3 => 5,
            Chip::Esp32s3 => 9,
            Chip::Esp32c2 => 12,
            Chip::Esp32c6 => 13,
            Chip::Esp32h2 => 16,
            Chip::Esp32p4 => 18,
            Chip::Esp32c5 => 23,
        }
    }

    /// The chip with this `chip_id`, if it is one this crate knows.
    pub fn from_id(id: u16) -> Option<Chip> {
        Chip::ALL.into_iter().find(|c| c.id() == id)
    }

    /// Lower-case name as used by esptool, espflash and Rust features: `"esp32c3"`.
    pub const fn name(self) -> &'static str {
        match self {
            Chip::Esp32 => "esp32",
            Chip::Esp32s2 => "esp32s2",
            Chip::Esp32c3 => "esp32c3",
            Chip::Esp32s3 => "esp32s3",
            Chip::Esp32c2 => "esp32c2",
            Chip::Esp32c6 => "esp32c6",
            Chip::Esp32h2 => "esp32h2",
            Chip::Esp32p4 => "esp32p4",
            Chip::Esp32c5 => "esp32c5",
        }
    }

    /// Virtual addresses of the instruction bus mapped from flash (IROM).
    pub const fn irom(self) -> Range<u32> {
        match self {
            Chip::Esp32 => 0x400D_0000..0x4040_0000,
            Chip::Esp32s2 => 0x4008_0000..0x40B8_0000,
            Chip::Esp32s3 => 0x4200_0000..0x4400_0000,
            Chip::Esp32c2 => 0x4200_0000..0x4240_0000,
            Chip::Esp32c3 | Chip::Esp32c6 | Chip::Esp32h2 => 0x4200_0000..0x4280_0000,
            Chip::Esp32p4 => 0x4000_0000..0x4C00_0000,
            Chip::Esp32c5 => 0x4200_0000..0x4400_0000,
        }
    }

    /// Virtual addresses of the data bus mapped from flash (DROM), where
    /// the app descriptor lives.
    pub const fn drom(self) -> Range<u32> {
        match self {
            Chip::Esp32 => 0x3F40_0000..0x3F80_0000,
            Chip::Esp32s2 => 0x3F00_0000..0x3F3F_0000,
            Chip::Esp32s3 => 0x3C00_0000..0x3E00_0000,
            Chip::Esp32c2 => 0x3C00_0000..0x3C40_0000,
            Chip::Esp32c3 => 0x3C00_0000..0x3C80_0000,
            Chip::Esp32c6 | Chip::Esp32h2 => 0x4280_0000..0x4300_0000,
            Chip::Esp32p4 => 0x4000_0000..0x4C00_0000,
            Chip::Esp32c5 => 0x4200_0000..0x4400_0000,
        }
    }

    /// Whether the bootloader maps (rather than copies) a segment loaded at
    /// `addr`: mirrors `should_map()` in `esp_image_format.c`.
    pub fn is_flash_mapped(self, addr: u32) -> bool {
        self.irom().contains(&addr) || self.drom().contains(&addr)
    }
}

impl fmt::Display for Chip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A chip name that [`Chip::from_str`] does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownChipName;

impl fmt::Display for UnknownChipName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("unknown chip (expected one of esp32, esp32s2, esp32s3, esp32c2, esp32c3, esp32c5, esp32c6, esp32h2, esp32p4)")
    }
}

#[cfg(feature = "std")]
impl std::error::Error for UnknownChipName {}

impl FromStr for Chip {
    type Err = UnknownChipName;

    /// Accepts `esp32c3`, `ESP32-C3` and `esp32_c3` alike.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut norm = [0u8; 16];
        let mut n = 0;
        for b in s.bytes().filter(|b| *b != b'-' && *b != b'_') {
            if n == norm.len() {
                return Err(UnknownChipName);
            }
            norm[n] = b.to_ascii_lowercase();
            n += 1;
        }
        Chip::ALL
            .into_iter()
            .find(|c| c.name().as_bytes() == &norm[..n])
            .ok_or(UnknownChipName)
    }
}

/// `esp_image_header_t`: the 24 bytes at the start of every image.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 1 | `magic` (0xE9) |
/// | 1 | 1 | `segment_count` |
/// | 2 | 1 | `spi_mode` |
/// | 3 | 1 | `spi_speed` (low nibble), `spi_size` (high nibble) |
/// | 4 | 4 | `entry_addr` |
/// | 8 | 1 | `wp_pin` |
/// | 9 | 3 | `spi_pin_drv` |
/// | 12 | 2 | `chip_id` |
/// | 14 | 1 | `min_chip_rev` (deprecated) |
/// | 15 | 2 | `min_chip_rev_full` (major × 100 + minor) |
/// | 17 | 2 | `max_chip_rev_full` |
/// | 19 | 4 | `reserved` |
/// | 23 | 1 | `hash_appended` |
///
/// All multi-byte fields are little-endian; the struct is packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    /// Should be [`IMAGE_MAGIC`].
    pub magic: u8,
    /// Number of segments that follow the header.
    pub segment_count: u8,
    /// SPI flash mode: 0 QIO, 1 QOUT, 2 DIO, 3 DOUT.
    pub spi_mode: u8,
    /// SPI flash clock, chip-specific encoding (low nibble of byte 3).
    pub spi_speed: u8,
    /// SPI flash size code (high nibble of byte 3): 0 1 MB, 1 2 MB, 2 4 MB, ...
    pub spi_size: u8,
    /// Address the bootloader jumps to.
    pub entry_addr: u32,
    /// Flash write-protect pin, 0xEE when unused.
    pub wp_pin: u8,
    /// Drive strengths of the flash pins, two nibbles per byte.
    pub spi_pin_drv: [u8; 3],
    /// Which chip the image is built for; see [`Chip::id`].
    pub chip_id: u16,
    /// Deprecated one-byte minimum chip revision.
    pub min_chip_rev: u8,
    /// Minimum chip revision, major × 100 + minor.
    pub min_chip_rev_full: u16,
    /// Maximum chip revision, major × 100 + minor.
    pub max_chip_rev_full: u16,
    /// Reserved bytes, kept so a header round-trips.
    pub reserved: [u8; 4],
    /// Whether a SHA-256 of the image follows the checksum. The bootloader
    /// treats any non-zero value as "yes".
    pub hash_appended: bool,
}

impl ImageHeader {
    /// Decodes the 24 header bytes. Checks nothing: the validator decides
    /// what is acceptable.
    pub fn parse(b: &[u8; IMAGE_HEADER_LEN]) -> ImageHeader {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        ImageHeader {
            magic: b[0],
            segment_count: b[1],
            spi_mode: b[2],
            spi_speed: b[3] & 0x0F,
            spi_size: b[3] >> 4,
            entry_addr: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            wp_pin: b[8],
            spi_pin_drv: [b[9], b[10], b[11]],
            chip_id: u16_at(12),
            min_chip_rev: b[14],
            min_chip_rev_full: u16_at(15),
            max_chip_rev_full: u16_at(17),
            reserved: [b[19], b[20], b[21], b[22]],
            hash_appended: b[23] != 0,
        }
    }

    /// Encodes the header as the 24 bytes `parse` reads.
    pub fn to_bytes(&self) -> [u8; IMAGE_HEADER_LEN] {
        let mut b = [0u8; IMAGE_HEADER_LEN];
        b[0] = self.magic;
        b[1] = self.segment_count;
        b[2] = self.spi_mode;
        b[3] = (self.spi_speed & 0x0F) | (self.spi_size << 4);
        b[4..8].copy_from_slice(&self.entry_addr.to_le_bytes());
        b[8] = self.wp_pin;
        b[9..12].copy_from_slice(&self.spi_pin_drv);
        b[12..14].copy_from_slice(&self.chip_id.to_le_bytes());
        b[14] = self.min_chip_rev;
        b[15..17].copy_from_slice(&self.min_chip_rev_full.to_le_bytes());
        b[17..19].copy_from_slice(&self.max_chip_rev_full.to_le_bytes());
        b[19..23].copy_from_slice(&self.reserved);
        b[23] = u8::from(self.hash_appended);
        b
    }
}

/// `esp_image_segment_header_t`: precedes each segment's data.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 4 | `load_addr` |
/// | 4 | 4 | `data_len` |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Where the segment is loaded or mapped; 0 for esptool's padding segments.
    pub load_addr: u32,
    /// Length of the data that follows, a multiple of 4.
    pub data_len: u32,
}

impl SegmentHeader {
    /// Decodes the 8 segment header bytes.
    pub fn parse(b: &[u8; SEGMENT_HEADER_LEN]) -> SegmentHeader {
        SegmentHeader {
            load_addr: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            data_len: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }

    /// Encodes the header as the 8 bytes `parse` reads.
    pub fn to_bytes(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = [0u8; SEGMENT_HEADER_LEN];
        b[..4].copy_from_slice(&self.load_addr.to_le_bytes());
        b[4..].copy_from_slice(&self.data_len.to_le_bytes());
        b
    }
}

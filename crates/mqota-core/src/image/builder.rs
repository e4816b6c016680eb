//! Makes small, valid app images of an exact size without a compiler: for
//! tests, virtual devices and `mqota image pack`.
//!
//! An image has two segments: DROM, holding the app descriptor and a little
//! "rodata", and IROM, holding filler "code" sized so the whole image is
//! exactly the size asked for. Filler bytes come from a generator seeded with
//! the chip, project and version, so two versions never share an image and
//! the same inputs always give the same bytes.

use alloc::vec::Vec;
use core::fmt;

use heapless::String;
use sha2::{Digest, Sha256};

use super::desc::{AppDescriptor, APP_DESC_LEN};
use super::header::{
    Chip, ImageHeader, SegmentHeader, CHECKSUM_SEED, IMAGE_HEADER_LEN, IMAGE_MAGIC, MAX_IMAGE_LEN,
    SEGMENT_HEADER_LEN,
};
use super::stream::HASH_LEN;

/// Bytes of filler after the descriptor in the DROM segment.
const RODATA_LEN: usize = 32;
/// Smallest IROM segment the builder makes.
const MIN_CODE_LEN: u32 = 8;
/// Offset of the IROM data: image header, DROM header + data, IROM header.
const CODE_OFFSET: u32 =
    (IMAGE_HEADER_LEN + SEGMENT_HEADER_LEN + APP_DESC_LEN + RODATA_LEN + SEGMENT_HEADER_LEN) as u32;
/// Bytes after the IROM data: 15 bytes of padding, the checksum, the hash.
/// CODE_OFFSET + code length is kept a multiple of 16 so this is constant.
const TAIL_LEN: u32 = 16 + HASH_LEN as u32;

/// Why an image could not be built. Fix the arguments and try again.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BuildError {
    /// The size is below the smallest image the builder can make.
    SizeTooSmall {
        /// Smallest size accepted.
        min: u32,
    },
    /// The size is not a multiple of 16: an image with an appended hash
    /// always is.
    SizeNotAligned,
    /// The size does not fit the chip's IROM window or a 16 MiB partition.
    SizeTooLarge {
        /// Largest size accepted for this chip.
        max: u32,
    },
    /// A text field does not fit its `esp_app_desc_t` field with its NUL.
    FieldTooLong {
        /// Which field.
        field: &'static str,
        /// Longest length accepted, in bytes.
        max: usize,
    },
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::SizeTooSmall { min } => {
                write!(f, "image size must be at least {min} bytes")
            }
            BuildError::SizeNotAligned => f.write_str("image size must be a multiple of 16"),
            BuildError::SizeTooLarge { max } => write!(f, "image size must be at most {max} bytes"),
            BuildError::FieldTooLong { field, max } => {
                write!(f, "{field} is longer than {max} bytes")
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for BuildError {}

/// Builds a valid ESP-IDF app image; see the module docs.
#[derive(Debug, Clone)]
pub struct ImageBuilder<'a> {
    chip: Chip,
    version: &'a str,
    project: &'a str,
    idf_ver: &'a str,
    secure_version: u32,
    size: Option<u32>,
}

impl<'a> ImageBuilder<'a> {
    /// Smallest image the builder makes.
    pub const MIN_SIZE: u32 = CODE_OFFSET + MIN_CODE_LEN + TAIL_LEN;

    /// An image for `chip`, version "0.0.0", project "mqota-app", of the
    /// smallest size.
    pub fn new(chip: Chip) -> Self {
        ImageBuilder {
            chip,
            version: "0.0.0",
            project: "mqota-app",
            idf_ver: "mqota",
            secure_version: 0,
            size: None,
        }
    }

    /// The app version (at most 31 bytes).
    pub fn version(mut self, version: &'a str) -> Self {
        self.version = version;
        self
    }

    /// The project name (at most 31 bytes).
    pub fn project(mut self, project: &'a str) -> Self {
        self.project = project;
        self
    }

    /// The SDK version string (at most 31 bytes); defaults to "mqota".
    pub fn idf_ver(mut self, idf_ver: &'a str) -> Self {
        self.idf_ver = idf_ver;
        self
    }

    /// The anti-rollback secure version.
    pub fn secure_version(mut self, secure_version: u32) -> Self {
        self.secure_version = secure_version;
        self
    }

    /// The exact size of the image in bytes, a multiple of 16 and at least
    /// [`MIN_SIZE`](Self::MIN_SIZE).
    pub fn size(mut self, size: u32) -> Self {
        self.size = Some(size);
        self
    }

    /// The largest size this chip's IROM window and a 16 MiB partition allow.
    pub fn max_size(chip: Chip) -> u32 {
        let irom = chip.irom();
        let window = irom.end - irom.start;
        window.min(MAX_IMAGE_LEN) & !15
    }

    /// Makes the image.
    pub fn build(&self) -> Result<Vec<u8>, BuildError> {
        let size = self.size.unwrap_or(Self::MIN_SIZE);
        if size < Self::MIN_SIZE {
            return Err(BuildError::SizeTooSmall {
                min: Self::MIN_SIZE,
            });
        }
        if !size.is_multiple_of(16) {
            return Err(BuildError::SizeNotAligned);
        }
        let max = Self::max_size(self.chip);
        if size > max {
            return Err(BuildError::SizeTooLarge { max });
        }
        let code_len = size - CODE_OFFSET - TAIL_LEN;

        let mut rng = Filler::new(self.chip, self.project, self.version, self.secure_version);
        let mut rodata = [0u8; RODATA_LEN];
        rng.fill(&mut rodata);
        let mut code = alloc::vec![0u8; code_len as usize];
        rng.fill(&mut code);

        let app = AppDescriptor {
            secure_version: self.secure_version,
            version: field("version", self.version)?,
            project_name: field("project", self.project)?,
            // Fixed so that the same inputs give the same bytes.
            time: field("time", "00:00:00")?,
            date: field("date", "Jan  1 2000")?,
            idf_ver: field("idf_ver", self.idf_ver)?,
            // There is no ELF; the code stands in for it so the field still
            // tells versions apart.
            app_elf_sha256: Sha256::digest(&code).into(),
            min_efuse_blk_rev_full: 0,
            max_efuse_blk_rev_full: u16::MAX,
            mmu_page_size: 16,
        };

        // Both flash-mapped segments sit at the start of their window plus
        // their offset in the image, so offset and address agree modulo any
        // MMU page size, as the bootloader requires.
        let drom_addr = self.chip.drom().start + (IMAGE_HEADER_LEN + SEGMENT_HEADER_LEN) as u32;
        let code_addr = self.chip.irom().start + CODE_OFFSET;
        let header = ImageHeader {
            magic: IMAGE_MAGIC,
            segment_count: 2,
            spi_mode: 2, // DIO
            spi_speed: 0,
            spi_size: 2, // 4 MB
            entry_addr: code_addr,
            wp_pin: 0xEE,
            spi_pin_drv: [0; 3],
            chip_id: self.chip.id(),
            min_chip_rev: 0,
            min_chip_rev_full: 0,
            max_chip_rev_full: u16::MAX,
            reserved: [0; 4],
            hash_appended: true,
        };

        let mut out = Vec::with_capacity(size as usize);
        out.extend_from_slice(&header.to_bytes());
        out.extend_from_slice(
            &SegmentHeader {
                load_addr: drom_addr,
                data_len: (APP_DESC_LEN + RODATA_LEN) as u32,
            }
            .to_bytes(),
        );
        out.extend_from_slice(&app.to_bytes());
        out.extend_from_slice(&rodata);
        out.extend_from_slice(
            &SegmentHeader {
                load_addr: code_addr,
                data_len: code_len,
            }
            .to_bytes(),
        );
        out.extend_from_slice(&code);

        let checksum = [&app.to_bytes()[..], &rodata, &code]
            .into_iter()
            .flatten()
            .fold(CHECKSUM_SEED, |c, b| c ^ b);
        out.resize(out.len() + 15, 0);
        out.push(checksum);
        let digest = Sha256::digest(&out);
        out.extend_from_slice(&digest);
        debug_assert_eq!(out.len(), size as usize);
        Ok(out)
    }
}

fn field<const N: usize>(name: &'static str, s: &str) -> Result<String<N>, BuildError> {
    let too_long = BuildError::FieldTooLong {
        field: name,
        max: N - 1,
    };
    if s.len() >= N {
        return Err(too_long);
    }
    String::try_from(s).map_err(|_| too_long)
}

/// xorshift64* seeded from a SHA-256 of the inputs: fast enough for
/// multi-megabyte images, and stable across platforms and releases.
struct Filler(u64);

impl Filler {
    fn new(chip: Chip, project: &str, version: &str, secure_version: u32) -> Filler {
        let mut h = Sha256::new();
        for part in [chip.name(), project, version] {
            h.update((part.len() as u32).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.update(secure_version.to_le_bytes());
        let d = h.finalize();
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&d[..8]);
        // xorshift never leaves 0.
        Filler(u64::from_le_bytes(seed) | 1)
    }

    fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

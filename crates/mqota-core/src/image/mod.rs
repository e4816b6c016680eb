//! The ESP-IDF app image: `esp_image_header_t`, its segments, the XOR
//! checksum, the appended SHA-256 and the `esp_app_desc_t` inside the first
//! segment.
//!
//! | offset | size | what |
//! |---|---|---|
//! | 0 | 24 | [`ImageHeader`] (`esp_image_header_t`) |
//! | 24 | 8 | first [`SegmentHeader`] (`esp_image_segment_header_t`) |
//! | 32 | 256 | [`AppDescriptor`] (`esp_app_desc_t`), the start of the first segment's data |
//! | ... | | rest of the first segment, then each further segment: 8-byte header + data |
//! | | 0–15 | zero padding, so the checksum byte ends a 16-byte block |
//! | | 1 | checksum: 0xEF XOR every byte of segment data |
//! | | 32 | SHA-256 of everything before it, when `hash_appended` is set |
//!
//! Why this is written here rather than taken from esp-bootloader-esp-idf:
//! that crate's image and app-descriptor code reads through
//! `esp_storage::FlashStorage` and is compiled for one chip, whereas mqota
//! needs the same checks generic over `embedded-storage` (so host tests run
//! them against a simulated NOR flash), for any chip (the controller checks
//! images for every device it serves), and as a stream (so an OTA download
//! is judged as its bytes arrive). [`StreamValidator`] is that single
//! implementation; [`validate_flash`] and [`validate_bytes`] drive it.
//!
//! The checks mirror what the second-stage bootloader does in
//! `esp_image_format.c` (`verify_image_header`, `verify_segment_header`,
//! `process_checksum`, `process_appended_hash`), so an image accepted here is
//! one the bootloader will accept.

mod desc;
mod header;
mod stream;

#[cfg(feature = "alloc")]
mod builder;

#[cfg(feature = "alloc")]
pub use builder::{BuildError, ImageBuilder};
pub use desc::{AppDescriptor, APP_DESC_LEN, APP_DESC_MAGIC};
pub use header::{
    Chip, ImageHeader, SegmentHeader, UnknownChipName, CHECKSUM_SEED, IMAGE_HEADER_LEN,
    IMAGE_MAGIC, MAX_IMAGE_LEN, MAX_SEGMENTS, SEGMENT_HEADER_LEN,
};
pub use stream::{
    validate_bytes, validate_flash, validate_flash_file, validate_flash_for, ImageError, ImageInfo,
    SegmentInfo, StreamValidator, HASH_LEN, SIGNATURE_ALIGN,
};

#[cfg(test)]
mod tests;

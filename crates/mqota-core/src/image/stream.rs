//! The one image validator: a push-style state machine that is fed the image
//! in pieces of any size. [`validate_flash`] and [`validate_bytes`] drive it;
//! an OTA download drives it chunk by chunk as the bytes arrive, so a wrong
//! image is refused after its first few bytes rather than after the download.

use core::fmt;

use embedded_storage::nor_flash::{NorFlashError, NorFlashErrorKind, ReadNorFlash};
use heapless::Vec;
use sha2::{Digest, Sha256};

use super::desc::{AppDescriptor, APP_DESC_LEN};
use super::header::{
    Chip, ImageHeader, SegmentHeader, CHECKSUM_SEED, IMAGE_HEADER_LEN, IMAGE_MAGIC, MAX_IMAGE_LEN,
    MAX_SEGMENTS, SEGMENT_HEADER_LEN,
};

/// Length of the SHA-256 digest appended when `hash_appended` is set.
pub const HASH_LEN: usize = 32;

/// Every way an app image can be wrong, plus flash read failures.
///
/// For all variants except [`ImageError::Flash`] the image itself is bad:
/// the caller should refuse it (abort the update, report the error, never
/// mark the slot bootable). Downloading it again only helps for
/// `Truncated`, `BadChecksum` and `BadHash`, which transfer errors cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ImageError {
    /// The first byte is not 0xE9: not an app image (0xFF: erased flash).
    BadMagic {
        /// The byte found instead.
        found: u8,
    },
    /// The header names a chip id this crate does not know. Refuse the image.
    UnknownChip {
        /// The `chip_id` field.
        id: u16,
    },
    /// The image is built for another chip. Refuse it: it cannot boot here.
    WrongChip {
        /// The chip the caller asked for.
        expected: Chip,
        /// The `chip_id` in the header.
        found: u16,
    },
    /// More segments than the bootloader accepts (`ESP_IMAGE_MAX_SEGMENTS`).
    TooManySegments {
        /// The `segment_count` field.
        count: u8,
    },
    /// A segment length that is not a multiple of 4 or is 16 MiB or more;
    /// the bootloader refuses both.
    BadSegmentLength {
        /// Index of the segment.
        index: u8,
        /// Its `data_len`.
        len: u32,
    },
    /// A segment's data would run past `max_len` (the slot size).
    SegmentPastEnd {
        /// Index of the segment.
        index: u8,
        /// Offset just past the segment's data.
        end: u32,
        /// The limit given to the validator.
        max_len: u32,
    },
    /// A flash-mapped segment whose data offset and load address differ
    /// modulo the MMU page size: the bootloader cannot map it.
    MisalignedSegment {
        /// Index of the segment.
        index: u8,
        /// Its load address.
        load_addr: u32,
        /// Offset of its data from the start of the image.
        offset: u32,
    },
    /// No `esp_app_desc_t` (magic 0xABCD5432) at the start of the first
    /// segment: not an app built for ESP-IDF's bootloader.
    MissingAppDescriptor,
    /// The whole image (with padding, checksum and hash) exceeds `max_len`.
    TooLarge {
        /// Full image length.
        len: u32,
        /// The limit given to the validator.
        max_len: u32,
    },
    /// The data stopped before the end of the image.
    Truncated {
        /// Bytes received.
        seen: u32,
        /// Full image length, when the segment table got that far.
        expected: Option<u32>,
    },
    /// More bytes arrived after the end of the image than a Secure Boot V2
    /// signature sector explains (0xFF padding to 4 KiB, then one 4 KiB
    /// sector), or the padding is not 0xFF.
    TrailingData {
        /// Length of the image; the extra bytes started here.
        len: u32,
    },
    /// Bytes follow the image but stop short of a whole signature sector
    /// (0xFF padding to 4 KiB, then 4 KiB): a cut signed file, or padding
    /// without a signature.
    IncompleteSignatureSector {
        /// Length of the image; the extra bytes started here.
        len: u32,
        /// Bytes of the file.
        seen: u32,
        /// Length the file would have with its signature sector.
        expected: u32,
    },
    /// The XOR checksum byte does not match the segment data.
    BadChecksum {
        /// Checksum byte in the image.
        stored: u8,
        /// Checksum of the data received.
        computed: u8,
    },
    /// The appended SHA-256 does not match the image.
    BadHash,
    /// Reading flash failed, or the region given is not readable: a driver
    /// or caller problem rather than a bad image. Retrying may help.
    Flash(NorFlashErrorKind),
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ImageError::BadMagic { found } => {
                write!(f, "not an app image: first byte is {found:#04x}, expected 0xe9")
            }
            ImageError::UnknownChip { id } => write!(f, "image is for unknown chip id {id}"),
            ImageError::WrongChip { expected, found } => match Chip::from_id(found) {
                Some(c) => write!(f, "image is for {c} (chip id {found}), expected {expected}"),
                None => write!(f, "image is for chip id {found}, expected {expected}"),
            },
            ImageError::TooManySegments { count } => {
                write!(f, "image has {count} segments, at most {MAX_SEGMENTS} allowed")
            }
            ImageError::BadSegmentLength { index, len } => write!(
                f,
                "segment {index} has invalid length {len:#x} (must be a multiple of 4 below 16 MiB)"
            ),
            ImageError::SegmentPastEnd { index, end, max_len } => write!(
                f,
                "segment {index} ends at {end:#x}, past the {max_len:#x}-byte limit"
            ),
            ImageError::MisalignedSegment { index, load_addr, offset } => write!(
                f,
                "segment {index} at {load_addr:#010x} cannot be mapped from image offset {offset:#x}"
            ),
            ImageError::MissingAppDescriptor => f.write_str(
                "no app descriptor (esp_app_desc_t) at the start of the first segment",
            ),
            ImageError::TooLarge { len, max_len } => {
                write!(f, "image is {len} bytes, larger than the {max_len}-byte limit")
            }
            ImageError::Truncated { seen, expected: Some(e) } => {
                write!(f, "image is truncated: {seen} of {e} bytes")
            }
            ImageError::Truncated { seen, expected: None } => {
                write!(f, "image is truncated after {seen} bytes")
            }
            ImageError::TrailingData { len } => {
                write!(f, "unexpected data after the end of the image at byte {len}")
            }
            ImageError::IncompleteSignatureSector { len, seen, expected } => write!(
                f,
                "{} bytes after the end of the image at byte {len}, not a whole signature sector (the file would be {expected} bytes)",
                seen - len
            ),
            ImageError::BadChecksum { stored, computed } => write!(
                f,
                "image checksum mismatch: stored {stored:#04x}, computed {computed:#04x}"
            ),
            ImageError::BadHash => f.write_str("appended SHA-256 does not match the image"),
            ImageError::Flash(kind) => write!(f, "flash read failed: {kind:?}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for ImageError {}

/// One segment as found in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentInfo {
    /// The segment header.
    pub header: SegmentHeader,
    /// Offset of the segment header from the start of the image (esptool's
    /// "File offs"); the data follows 8 bytes later.
    pub offset: u32,
}

impl SegmentInfo {
    /// Offset of the segment's data from the start of the image.
    pub fn data_offset(&self) -> u32 {
        self.offset + SEGMENT_HEADER_LEN as u32
    }
}

/// Everything learned from one complete pass over an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The image header.
    pub header: ImageHeader,
    /// The chip named by `header.chip_id`.
    pub chip: Chip,
    /// The segments, in image order.
    pub segments: Vec<SegmentInfo, MAX_SEGMENTS>,
    /// The app descriptor from the first segment.
    pub app: AppDescriptor,
    /// Checksum byte stored in the image.
    pub checksum: u8,
    /// Checksum computed over the segment data.
    pub checksum_computed: u8,
    /// `checksum == checksum_computed`.
    pub checksum_valid: bool,
    /// The appended SHA-256, when the header says there is one.
    pub sha256: Option<[u8; 32]>,
    /// SHA-256 of the image up to and including the checksum byte.
    pub sha256_computed: [u8; 32],
    /// An appended SHA-256 is present and matches `sha256_computed`.
    pub sha256_valid: bool,
    /// Full length: headers, segments, padding, checksum and appended hash.
    pub len: u32,
    /// SHA-256 of every byte of the file (the image including the appended
    /// hash, and a signature sector if one follows): what `sha256sum` prints
    /// for the file, and what an OTA job carries.
    pub file_sha256: [u8; 32],
    /// Length of the whole file: `len`, or with a signature sector the
    /// image padded to 4 KiB plus that sector.
    pub file_len: u32,
    /// With a signature sector: SHA-256 of the image padded with 0xFF to
    /// 4 KiB, the digest each signature block signs. `None` without one.
    pub padded_sha256: Option<[u8; 32]>,
}

impl ImageInfo {
    /// Checks the integrity fields: `Ok` when the checksum matches and the
    /// appended hash, if any, matches.
    pub fn verify(&self) -> Result<(), ImageError> {
        if !self.checksum_valid {
            return Err(ImageError::BadChecksum {
                stored: self.checksum,
                computed: self.checksum_computed,
            });
        }
        if self.sha256.is_some() && !self.sha256_valid {
            return Err(ImageError::BadHash);
        }
        Ok(())
    }

    /// Flash offset of the Secure Boot V2 signature sector, relative to the
    /// start of the image, when the file carries one.
    pub fn signature_sector(&self) -> Option<u32> {
        self.padded_sha256
            .is_some()
            .then(|| self.len.next_multiple_of(SIGNATURE_ALIGN))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Header,
    SegmentHeader { index: u8 },
    SegmentData { index: u8, remaining: u32 },
    Padding { remaining: u32 },
    Checksum,
    Hash,
    Done,
}

/// Validates an image fed in pieces, holding only a few hundred bytes of
/// state (about 1 KiB in all) whatever the image size.
///
/// Each check runs as soon as the bytes it needs have arrived: a bad magic
/// byte fails on the first byte, a wrong chip on byte 14, an oversized segment
/// on its header. The checksum and appended hash can only be judged at the end,
/// by [`finish`](Self::finish). After the first error every further call
/// returns that same error.
///
/// Offsets are relative to the start of the image; the mapping check assumes
/// the image will sit at an MMU-page-aligned flash address, as app partitions
/// must.
#[derive(Clone)]
pub struct StreamValidator {
    expected_chip: Option<Chip>,
    max_len: u32,
    phase: Phase,
    seen: u32,
    scratch: [u8; HASH_LEN],
    scratch_len: usize,
    header: Option<ImageHeader>,
    chip: Option<Chip>,
    segments: Vec<SegmentInfo, MAX_SEGMENTS>,
    desc_buf: [u8; APP_DESC_LEN],
    desc_len: usize,
    app: Option<AppDescriptor>,
    checksum: u8,
    stored_checksum: u8,
    image_digest: [u8; 32],
    stored_hash: [u8; 32],
    hasher: Sha256,
    /// Off for [`StreamValidator::structure_only`].
    hashing: bool,
    expected_len: Option<u32>,
    error: Option<ImageError>,
    /// Length of the image proper, once complete; bytes after it belong to
    /// a signature sector.
    image_len: u32,
    padded_digest: Option<[u8; 32]>,
}

/// A Secure Boot V2 signature sector starts at the next multiple of this
/// after the image (`esp_secure_boot_verify_sbv2_signature_block` reads it
/// from `ALIGN_UP(image_len, FLASH_SECTOR_SIZE)`) and is this long.
pub const SIGNATURE_ALIGN: u32 = 4096;

// Hand-written: the buffers and hasher state say nothing useful.
impl fmt::Debug for StreamValidator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamValidator")
            .field("phase", &self.phase)
            .field("seen", &self.seen)
            .field("expected_len", &self.expected_len)
            .field("chip", &self.chip)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl StreamValidator {
    /// A validator for an image of at most `max_len` bytes (the slot size).
    /// With `expected_chip`, an image for any other chip is refused; without,
    /// any chip this crate knows is accepted.
    pub fn new(expected_chip: Option<Chip>, max_len: u32) -> StreamValidator {
        StreamValidator {
            expected_chip,
            max_len,
            phase: Phase::Header,
            seen: 0,
            scratch: [0; HASH_LEN],
            scratch_len: 0,
            header: None,
            chip: None,
            segments: Vec::new(),
            desc_buf: [0; APP_DESC_LEN],
            desc_len: 0,
            app: None,
            checksum: CHECKSUM_SEED,
            stored_checksum: 0,
            image_digest: [0; 32],
            stored_hash: [0; 32],
            hasher: Sha256::new(),
            hashing: true,
            expected_len: None,
            error: None,
            image_len: 0,
            padded_digest: None,
        }
    }

    /// Checks structure only (header, chip, segments, lengths) and skips
    /// hashing: for a caller that verifies the hash afterwards anyway, e.g.
    /// from flash with [`validate_flash`]. Hashing is the validator's main
    /// cost; on a chip without a SHA engine in use it is about as slow as the
    /// download itself. The checksum is still computed; the hash fields of
    /// the result are not meaningful and `finish` reports `BadHash` for an
    /// image with an appended hash, so use [`StreamValidator::finish_unchecked`].
    pub fn structure_only(mut self) -> StreamValidator {
        self.hashing = false;
        self
    }

    /// Takes the next piece of the image (any length, including 0).
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), ImageError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let mut rest = chunk;
        while !rest.is_empty() {
            match self.step(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) => {
                    self.error = Some(e);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// The image header, once its 24 bytes have arrived and passed the
    /// header checks.
    pub fn header(&self) -> Option<&ImageHeader> {
        self.header.as_ref()
    }

    /// The chip, once the header has been accepted.
    pub fn chip(&self) -> Option<Chip> {
        self.chip
    }

    /// The app descriptor, once the first 256 bytes of the first segment
    /// have arrived.
    pub fn app_descriptor(&self) -> Option<&AppDescriptor> {
        self.app.as_ref()
    }

    /// Bytes accepted so far.
    pub fn bytes_seen(&self) -> u32 {
        self.seen
    }

    /// The full image length, known once the last segment header has arrived.
    pub fn expected_len(&self) -> Option<u32> {
        self.expected_len
    }

    /// Whether the whole image, through its appended hash, has arrived.
    pub fn is_complete(&self) -> bool {
        self.phase == Phase::Done
    }

    /// How many more bytes can be fed without running past the end of the
    /// image; 0 when complete or failed. Lets a flash reader stop exactly at
    /// the end of the image even before the full length is known.
    pub(crate) fn bytes_wanted(&self) -> u32 {
        if self.error.is_some() {
            return 0;
        }
        match self.phase {
            Phase::Header => (IMAGE_HEADER_LEN - self.scratch_len) as u32,
            Phase::SegmentHeader { .. } => (SEGMENT_HEADER_LEN - self.scratch_len) as u32,
            Phase::SegmentData { remaining, .. } | Phase::Padding { remaining } => remaining,
            Phase::Checksum => 1,
            Phase::Hash => (HASH_LEN - self.scratch_len) as u32,
            Phase::Done => 0,
        }
    }

    /// Ends the stream and judges the image: `Err` for structural errors,
    /// truncation, a checksum mismatch or a hash mismatch.
    pub fn finish(self) -> Result<ImageInfo, ImageError> {
        let info = self.finish_unchecked()?;
        info.verify()?;
        Ok(info)
    }

    /// Like [`finish`](Self::finish) but returns the image's description even
    /// when its checksum or appended hash is wrong (`checksum_valid`,
    /// `sha256_valid` say so), for tools that show what is wrong.
    pub fn finish_unchecked(self) -> Result<ImageInfo, ImageError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let (Phase::Done, Some(header), Some(chip), Some(app)) =
            (self.phase, self.header, self.chip, self.app)
        else {
            return Err(ImageError::Truncated {
                seen: self.seen,
                expected: self.expected_len,
            });
        };
        let sha256 = header.hash_appended.then_some(self.stored_hash);
        let image_len = if self.seen > self.image_len {
            let file_end = self.image_len.next_multiple_of(SIGNATURE_ALIGN) + SIGNATURE_ALIGN;
            if self.seen != file_end {
                return Err(ImageError::IncompleteSignatureSector {
                    len: self.image_len,
                    seen: self.seen,
                    expected: file_end,
                });
            }
            self.image_len
        } else {
            self.seen
        };
        Ok(ImageInfo {
            header,
            chip,
            segments: self.segments,
            app,
            checksum: self.stored_checksum,
            checksum_computed: self.checksum,
            checksum_valid: self.stored_checksum == self.checksum,
            sha256,
            sha256_computed: self.image_digest,
            sha256_valid: sha256 == Some(self.image_digest),
            len: image_len,
            file_sha256: self.hasher.finalize().into(),
            file_len: self.seen,
            padded_sha256: self.padded_digest,
        })
    }

    fn accept(&mut self, bytes: &[u8]) {
        if self.hashing {
            self.hasher.update(bytes);
        }
        self.seen += bytes.len() as u32;
    }

    /// Copies up to `want - scratch_len` bytes into the scratch buffer;
    /// returns how many were taken.
    fn gather(&mut self, rest: &[u8], want: usize) -> usize {
        let n = (want - self.scratch_len).min(rest.len());
        self.scratch[self.scratch_len..self.scratch_len + n].copy_from_slice(&rest[..n]);
        self.scratch_len += n;
        self.accept(&rest[..n]);
        n
    }

    /// Consumes a prefix of `rest` (at least one byte) for the current phase.
    fn step(&mut self, rest: &[u8]) -> Result<usize, ImageError> {
        match self.phase {
            Phase::Header => {
                let n = self.gather(rest, IMAGE_HEADER_LEN);
                self.check_partial_header()?;
                if self.scratch_len == IMAGE_HEADER_LEN {
                    self.start_segments()?;
                }
                Ok(n)
            }
            Phase::SegmentHeader { index } => {
                let n = self.gather(rest, SEGMENT_HEADER_LEN);
                if self.scratch_len == SEGMENT_HEADER_LEN {
                    self.start_segment(index)?;
                }
                Ok(n)
            }
            Phase::SegmentData { index, remaining } => {
                let n = (remaining as usize).min(rest.len());
                let data = &rest[..n];
                for b in data {
                    self.checksum ^= b;
                }
                self.accept(data);
                if index == 0 && self.desc_len < APP_DESC_LEN {
                    let d = (APP_DESC_LEN - self.desc_len).min(n);
                    self.desc_buf[self.desc_len..self.desc_len + d].copy_from_slice(&data[..d]);
                    self.desc_len += d;
                    if self.desc_len == APP_DESC_LEN {
                        self.take_descriptor()?;
                    }
                }
                self.after_data(index, remaining - n as u32);
                Ok(n)
            }
            Phase::Padding { remaining } => {
                let n = (remaining as usize).min(rest.len());
                self.accept(&rest[..n]);
                self.phase = if n as u32 == remaining {
                    Phase::Checksum
                } else {
                    Phase::Padding {
                        remaining: remaining - n as u32,
                    }
                };
                Ok(n)
            }
            Phase::Checksum => {
                self.stored_checksum = rest[0];
                self.accept(&rest[..1]);
                // The appended hash covers everything up to here; the file
                // hash goes on to include the appended hash itself.
                self.image_digest = self.hasher.clone().finalize().into();
                let hashed = self.header.is_some_and(|h| h.hash_appended);
                self.phase = if hashed { Phase::Hash } else { Phase::Done };
                self.image_len = self.seen;
                self.scratch_len = 0;
                Ok(1)
            }
            Phase::Hash => {
                let n = self.gather(rest, HASH_LEN);
                if self.scratch_len == HASH_LEN {
                    self.stored_hash = self.scratch;
                    self.phase = Phase::Done;
                    self.image_len = self.seen;
                }
                Ok(n)
            }
            Phase::Done => self.trailer(rest),
        }
    }

    /// Bytes after the image: 0xFF padding to the next 4 KiB, then one 4 KiB
    /// Secure Boot V2 signature sector, as `espsecure sign-data --version 2`
    /// appends them. Anything else is [`ImageError::TrailingData`]. The
    /// sector's content is judged by [`crate::signature`], not here.
    fn trailer(&mut self, rest: &[u8]) -> Result<usize, ImageError> {
        let trailing = ImageError::TrailingData {
            len: self.image_len,
        };
        let pad_end = self.image_len.next_multiple_of(SIGNATURE_ALIGN);
        let file_end = pad_end + SIGNATURE_ALIGN;
        if self.seen >= file_end {
            return Err(trailing);
        }
        if file_end > self.max_len {
            return Err(ImageError::TooLarge {
                len: file_end,
                max_len: self.max_len,
            });
        }
        if self.seen == pad_end && self.padded_digest.is_none() {
            self.padded_digest = Some(self.hasher.clone().finalize().into());
        }
        let limit = if self.seen < pad_end {
            pad_end
        } else {
            file_end
        };
        let n = ((limit - self.seen) as usize).min(rest.len());
        if self.seen < pad_end && rest[..n].iter().any(|&b| b != 0xFF) {
            return Err(trailing);
        }
        self.accept(&rest[..n]);
        Ok(n)
    }

    /// Header checks that need only a prefix of the header, so that they
    /// fail at the earliest byte that decides them.
    fn check_partial_header(&mut self) -> Result<(), ImageError> {
        let h = &self.scratch[..self.scratch_len];
        if let Some(&magic) = h.first() {
            if magic != IMAGE_MAGIC {
                return Err(ImageError::BadMagic { found: magic });
            }
        }
        if let Some(&count) = h.get(1) {
            if count as usize > MAX_SEGMENTS {
                return Err(ImageError::TooManySegments { count });
            }
        }
        if h.len() >= 14 && self.chip.is_none() {
            let id = u16::from_le_bytes([h[12], h[13]]);
            self.chip = Some(match self.expected_chip {
                Some(c) if c.id() == id => c,
                Some(expected) => {
                    return Err(ImageError::WrongChip {
                        expected,
                        found: id,
                    })
                }
                None => Chip::from_id(id).ok_or(ImageError::UnknownChip { id })?,
            });
        }
        Ok(())
    }

    fn start_segments(&mut self) -> Result<(), ImageError> {
        let mut raw = [0u8; IMAGE_HEADER_LEN];
        raw.copy_from_slice(&self.scratch[..IMAGE_HEADER_LEN]);
        let header = ImageHeader::parse(&raw);
        self.header = Some(header);
        if header.segment_count == 0 {
            return Err(ImageError::MissingAppDescriptor);
        }
        self.phase = Phase::SegmentHeader { index: 0 };
        self.scratch_len = 0;
        Ok(())
    }

    fn start_segment(&mut self, index: u8) -> Result<(), ImageError> {
        let mut raw = [0u8; SEGMENT_HEADER_LEN];
        raw.copy_from_slice(&self.scratch[..SEGMENT_HEADER_LEN]);
        self.scratch_len = 0;
        let header = SegmentHeader::parse(&raw);
        let len = header.data_len;
        // Mirrors verify_segment_header() in esp_image_format.c.
        if !len.is_multiple_of(4) || len >= MAX_IMAGE_LEN {
            return Err(ImageError::BadSegmentLength { index, len });
        }
        // `seen` never exceeds `max_len` and `len` is below 16 MiB, so this
        // only overflows for limits near 4 GiB; saturate to report it.
        let end = self.seen.saturating_add(len);
        if end > self.max_len {
            return Err(ImageError::SegmentPastEnd {
                index,
                end,
                max_len: self.max_len,
            });
        }
        if index == 0 && (len as usize) < APP_DESC_LEN {
            return Err(ImageError::MissingAppDescriptor);
        }
        let seg = SegmentInfo {
            header,
            offset: self.seen - SEGMENT_HEADER_LEN as u32,
        };
        // Segment 0's mapping is checked once the descriptor gives the page size.
        if let Some(app) = &self.app {
            self.check_mapping(index, &seg, app.mmu_page_bytes())?;
        }
        // Cannot fail: `index` < segment_count <= MAX_SEGMENTS.
        let _ = self.segments.push(seg);

        let count = self.header.map_or(0, |h| h.segment_count);
        if index + 1 == count {
            let hashed = self.header.is_some_and(|h| h.hash_appended);
            // The checksum byte ends a 16-byte block (process_checksum()).
            let total =
                u64::from(end + 1).next_multiple_of(16) + if hashed { HASH_LEN as u64 } else { 0 };
            if total > u64::from(self.max_len) {
                return Err(ImageError::TooLarge {
                    len: total.min(u64::from(u32::MAX)) as u32,
                    max_len: self.max_len,
                });
            }
            self.expected_len = Some(total as u32);
        }
        self.after_data(index, len);
        Ok(())
    }

    fn check_mapping(&self, index: u8, seg: &SegmentInfo, page: u32) -> Result<(), ImageError> {
        let Some(chip) = self.chip else { return Ok(()) };
        let addr = seg.header.load_addr;
        if chip.is_flash_mapped(addr) && seg.data_offset() % page != addr % page {
            return Err(ImageError::MisalignedSegment {
                index,
                load_addr: addr,
                offset: seg.data_offset(),
            });
        }
        Ok(())
    }

    fn take_descriptor(&mut self) -> Result<(), ImageError> {
        let app = AppDescriptor::parse(&self.desc_buf).ok_or(ImageError::MissingAppDescriptor)?;
        if let Some(seg0) = self.segments.first().copied() {
            self.check_mapping(0, &seg0, app.mmu_page_bytes())?;
        }
        self.app = Some(app);
        Ok(())
    }

    /// Moves on once `remaining` bytes of segment `index` are left.
    fn after_data(&mut self, index: u8, remaining: u32) {
        if remaining > 0 {
            self.phase = Phase::SegmentData { index, remaining };
            return;
        }
        let count = self.header.map_or(0, |h| h.segment_count);
        self.phase = if index + 1 < count {
            Phase::SegmentHeader { index: index + 1 }
        } else {
            match 15 - self.seen % 16 {
                0 => Phase::Checksum,
                pad => Phase::Padding { remaining: pad },
            }
        };
    }
}

/// Validates a complete image held in memory: the slice must hold exactly
/// one image, no more and no less.
pub fn validate_bytes(bytes: &[u8]) -> Result<ImageInfo, ImageError> {
    let mut v = StreamValidator::new(None, MAX_IMAGE_LEN);
    v.feed(bytes)?;
    v.finish()
}

/// Validates the image at `offset` in `flash`, which may use at most
/// `max_len` bytes (the slot size), accepting any known chip.
///
/// Reads through a 64-byte buffer and stops at the end of the image, so RAM
/// use does not grow with the image.
pub fn validate_flash<F: ReadNorFlash>(
    flash: &mut F,
    offset: u32,
    max_len: u32,
) -> Result<ImageInfo, ImageError> {
    validate_flash_for(flash, offset, max_len, None)
}

/// [`validate_flash`] that also refuses images for any chip but `chip`.
pub fn validate_flash_for<F: ReadNorFlash>(
    flash: &mut F,
    offset: u32,
    max_len: u32,
    chip: Option<Chip>,
) -> Result<ImageInfo, ImageError> {
    validate_flash_inner(flash, offset, max_len, chip, None)?.finish()
}

/// Validates the file of exactly `file_len` bytes at `offset`: the image and,
/// when `file_len` reaches past it, its 0xFF padding and signature sector
/// ([`ImageInfo::padded_sha256`] is then the digest the signatures sign).
/// This is what an OTA download leaves in a slot.
///
/// Like [`StreamValidator::finish_unchecked`], the checksum and appended hash
/// are reported, not judged: call [`ImageInfo::verify`]. A device that
/// requires signatures checks the signature first, so any changed byte is
/// reported as a bad signature.
pub fn validate_flash_file<F: ReadNorFlash>(
    flash: &mut F,
    offset: u32,
    file_len: u32,
    chip: Option<Chip>,
) -> Result<ImageInfo, ImageError> {
    validate_flash_inner(flash, offset, file_len, chip, Some(file_len))?.finish_unchecked()
}

fn validate_flash_inner<F: ReadNorFlash>(
    flash: &mut F,
    offset: u32,
    max_len: u32,
    chip: Option<Chip>,
    file_len: Option<u32>,
) -> Result<StreamValidator, ImageError> {
    const BUF: usize = 64;
    let rs = F::READ_SIZE;
    if rs == 0 || !BUF.is_multiple_of(rs) || !(offset as usize).is_multiple_of(rs) {
        return Err(ImageError::Flash(NorFlashErrorKind::NotAligned));
    }
    let capacity = flash.capacity();
    let limit = offset
        .checked_add(max_len)
        .filter(|l| *l as usize <= capacity)
        .ok_or(ImageError::Flash(NorFlashErrorKind::OutOfBounds))?;
    // Reads are whole READ_SIZE units, so they may reach a little past `limit`
    // but never past the flash.
    let read_end = (limit as usize)
        .next_multiple_of(rs)
        .min(capacity - capacity % rs);

    let mut v = StreamValidator::new(chip, max_len);
    let mut buf = [0u8; BUF];
    let mut buf_addr = 0usize;
    let mut buf_len = 0usize;
    loop {
        let want = match file_len {
            Some(len) if v.is_complete() => len.saturating_sub(v.bytes_seen()) as usize,
            _ => v.bytes_wanted() as usize,
        };
        let cur = offset as usize + v.bytes_seen() as usize;
        if want == 0 || cur >= limit as usize {
            break;
        }
        if !(buf_addr..buf_addr + buf_len).contains(&cur) {
            buf_addr = cur - cur % rs;
            buf_len = BUF.min(read_end - buf_addr);
            flash
                .read(buf_addr as u32, &mut buf[..buf_len])
                .map_err(|e| ImageError::Flash(e.kind()))?;
        }
        let start = cur - buf_addr;
        let n = want.min(buf_len - start).min(limit as usize - cur);
        v.feed(&buf[start..start + n])?;
    }
    Ok(v)
}

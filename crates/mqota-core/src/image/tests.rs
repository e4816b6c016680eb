extern crate std;

use std::vec;
use std::vec::Vec;

use embedded_storage::nor_flash::{ErrorType, NorFlashErrorKind, ReadNorFlash};
use sha2::{Digest, Sha256};

use super::*;

const SAMPLE: &[u8] = include_bytes!("../../../../testdata/images/sample-esp32c3.bin");
const C3_ESPFLASH: &[u8] = include_bytes!("../../../../testdata/images/esp32c3-espflash.bin");
const C3_ESPTOOL: &[u8] = include_bytes!("../../../../testdata/images/esp32c3-esptool.bin");
const C3_NODIGEST: &[u8] =
    include_bytes!("../../../../testdata/images/esp32c3-esptool-nodigest.bin");
const C6_ESPFLASH: &[u8] = include_bytes!("../../../../testdata/images/esp32c6-espflash.bin");

fn desc(magic_ok: bool) -> Vec<u8> {
    let app = AppDescriptor {
        secure_version: 3,
        version: heapless::String::try_from("9.9.9").unwrap(),
        project_name: heapless::String::try_from("hand-made").unwrap(),
        time: heapless::String::new(),
        date: heapless::String::new(),
        idf_ver: heapless::String::new(),
        app_elf_sha256: [0; 32],
        min_efuse_blk_rev_full: 0,
        max_efuse_blk_rev_full: 0,
        mmu_page_size: 16,
    };
    let mut b = app.to_bytes().to_vec();
    if !magic_ok {
        b[0] ^= 1;
    }
    b
}

/// Assembles an image from raw parts, computing padding, checksum and hash
/// the way the format says, so each test can break exactly one thing.
struct Raw {
    header: ImageHeader,
    segments: Vec<(u32, Vec<u8>)>,
}

impl Raw {
    /// A valid ESP32-C3 image: DROM with a descriptor, IROM with 8 bytes.
    fn c3() -> Raw {
        let mut drom = desc(true);
        drom.extend_from_slice(&[0x11; 8]);
        Raw {
            header: ImageHeader {
                magic: IMAGE_MAGIC,
                segment_count: 2,
                spi_mode: 2,
                spi_speed: 0,
                spi_size: 2,
                entry_addr: 0x4200_0000,
                wp_pin: 0xEE,
                spi_pin_drv: [0; 3],
                chip_id: 5,
                min_chip_rev: 0,
                min_chip_rev_full: 0,
                max_chip_rev_full: 199,
                reserved: [0; 4],
                hash_appended: true,
            },
            // Both mapped segments sit at window start + image offset.
            segments: vec![
                (0x3C00_0020, drom),
                (0x4200_0000 + 24 + 8 + 264 + 8, vec![0x22; 8]),
            ],
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = self.header.to_bytes().to_vec();
        let mut ck = CHECKSUM_SEED;
        for (addr, data) in &self.segments {
            out.extend_from_slice(
                &SegmentHeader {
                    load_addr: *addr,
                    data_len: data.len() as u32,
                }
                .to_bytes(),
            );
            out.extend_from_slice(data);
            ck = data.iter().fold(ck, |c, b| c ^ b);
        }
        while out.len() % 16 != 15 {
            out.push(0);
        }
        out.push(ck);
        if self.header.hash_appended {
            let d = Sha256::digest(&out);
            out.extend_from_slice(&d);
        }
        out
    }
}

/// Feeds `bytes` in pieces of `chunk` bytes and finishes.
fn streamed(bytes: &[u8], chunk: usize) -> Result<ImageInfo, ImageError> {
    let mut v = StreamValidator::new(None, MAX_IMAGE_LEN);
    for c in bytes.chunks(chunk) {
        v.feed(c)?;
    }
    v.finish()
}

#[test]
fn the_vendor_images_validate() {
    for img in [SAMPLE, C3_ESPFLASH, C3_ESPTOOL, C3_NODIGEST, C6_ESPFLASH] {
        let info = validate_bytes(img).unwrap();
        assert_eq!(info.len as usize, img.len());
        assert!(info.checksum_valid);
    }
}

#[test]
fn an_espflash_image_is_described_as_esptool_describes_it() {
    // Facts from testdata/images/esp32c3-espflash.txt (esptool image-info).
    let info = validate_bytes(C3_ESPFLASH).unwrap();
    assert_eq!(info.chip, Chip::Esp32c3);
    assert_eq!(info.header.entry_addr, 0x4200_0400);
    let segs: Vec<(u32, u32, u32)> = info
        .segments
        .iter()
        .map(|s| (s.header.data_len, s.header.load_addr, s.offset))
        .collect();
    assert_eq!(
        segs,
        vec![
            (0x120, 0x3c00_0020, 0x18),
            (0x2b0, 0, 0x140),
            (0x50, 0x4200_0400, 0x3f8)
        ]
    );
    assert_eq!(info.checksum, 0xcb);
    assert!(info.sha256_valid);
    assert_eq!(info.app.version.as_str(), "1.2.3");
    assert_eq!(info.app.project_name.as_str(), "golden-esp32c3");
    assert_eq!(info.app.secure_version, 2);
    assert_eq!(info.app.mmu_page_bytes(), 0x1_0000);
}

#[test]
fn an_image_without_appended_hash_has_no_sha256_but_is_valid() {
    let info = validate_bytes(C3_NODIGEST).unwrap();
    assert!(!info.header.hash_appended);
    assert_eq!(info.sha256, None);
    assert!(!info.sha256_valid);
    // Without an appended hash the file hash is the hash of the image.
    assert_eq!(info.file_sha256, info.sha256_computed);
}

#[test]
fn the_file_hash_covers_every_byte_including_the_appended_hash() {
    let info = validate_bytes(SAMPLE).unwrap();
    assert_eq!(info.file_sha256, <[u8; 32]>::from(Sha256::digest(SAMPLE)));
    let body = &SAMPLE[..SAMPLE.len() - HASH_LEN];
    assert_eq!(info.sha256_computed, <[u8; 32]>::from(Sha256::digest(body)));
    assert_eq!(info.sha256.unwrap(), SAMPLE[SAMPLE.len() - HASH_LEN..]);
}

#[test]
fn any_chunking_gives_the_same_result_as_one_slice() {
    let whole = validate_bytes(C6_ESPFLASH).unwrap();
    for chunk in [1, 2, 3, 7, 24, 31, 64, 255, 256, 257, 1000] {
        assert_eq!(
            streamed(C6_ESPFLASH, chunk).unwrap(),
            whole,
            "chunk {chunk}"
        );
    }
}

#[test]
fn the_hand_made_image_is_valid() {
    let info = validate_bytes(&Raw::c3().bytes()).unwrap();
    assert_eq!(info.app.project_name.as_str(), "hand-made");
    assert_eq!(info.segments.len(), 2);
}

#[test]
fn the_header_and_descriptor_are_known_as_soon_as_their_bytes_arrive() {
    let img = Raw::c3().bytes();
    let mut v = StreamValidator::new(Some(Chip::Esp32c3), MAX_IMAGE_LEN);
    v.feed(&img[..23]).unwrap();
    assert!(v.header().is_none());
    v.feed(&img[23..24]).unwrap();
    assert_eq!(v.header().unwrap().segment_count, 2);
    v.feed(&img[24..32 + 255]).unwrap();
    assert!(v.app_descriptor().is_none());
    assert_eq!(v.expected_len(), None);
    v.feed(&img[32 + 255..32 + 256]).unwrap();
    assert_eq!(v.app_descriptor().unwrap().version.as_str(), "9.9.9");
    // The length is known once the last segment header is in.
    let last_hdr_end = 24 + 8 + 264 + 8;
    v.feed(&img[32 + 256..last_hdr_end]).unwrap();
    assert_eq!(v.expected_len(), Some(img.len() as u32));
    v.feed(&img[last_hdr_end..]).unwrap();
    assert!(v.is_complete());
    assert_eq!(v.bytes_seen() as usize, img.len());
    v.finish().unwrap();
}

#[test]
fn a_bad_magic_byte_fails_on_the_first_byte() {
    let mut v = StreamValidator::new(None, MAX_IMAGE_LEN);
    assert_eq!(v.feed(&[0xFF]), Err(ImageError::BadMagic { found: 0xFF }));
    // The error sticks.
    assert_eq!(
        v.feed(&Raw::c3().bytes()),
        Err(ImageError::BadMagic { found: 0xFF })
    );
}

#[test]
fn an_image_for_another_chip_fails_once_the_chip_id_arrives() {
    let img = validate_bytes(C6_ESPFLASH).map(|_| C6_ESPFLASH).unwrap();
    let mut v = StreamValidator::new(Some(Chip::Esp32c3), MAX_IMAGE_LEN);
    v.feed(&img[..13]).unwrap();
    assert_eq!(
        v.feed(&img[13..14]),
        Err(ImageError::WrongChip {
            expected: Chip::Esp32c3,
            found: 13
        })
    );
}

#[test]
fn an_unknown_chip_id_is_refused_when_no_chip_is_expected() {
    let mut raw = Raw::c3();
    raw.header.chip_id = 0x7777;
    assert_eq!(
        validate_bytes(&raw.bytes()),
        Err(ImageError::UnknownChip { id: 0x7777 })
    );
}

#[test]
fn more_than_sixteen_segments_fail_on_the_second_byte() {
    let mut v = StreamValidator::new(None, MAX_IMAGE_LEN);
    assert_eq!(
        v.feed(&[IMAGE_MAGIC, 17]),
        Err(ImageError::TooManySegments { count: 17 })
    );
}

#[test]
fn a_segment_length_that_is_not_a_multiple_of_four_is_refused() {
    let mut raw = Raw::c3();
    raw.segments[1].1.push(0);
    assert_eq!(
        validate_bytes(&raw.bytes()),
        Err(ImageError::BadSegmentLength { index: 1, len: 9 })
    );
}

#[test]
fn a_segment_running_past_the_slot_fails_on_its_header() {
    let img = Raw::c3().bytes();
    let mut v = StreamValidator::new(None, 300);
    // The first segment's data would end at 32 + 264 = 296: fits.
    v.feed(&img[..32]).unwrap();
    let mut v = StreamValidator::new(None, 295);
    assert_eq!(
        v.feed(&img[..32]),
        Err(ImageError::SegmentPastEnd {
            index: 0,
            end: 296,
            max_len: 295
        })
    );
}

#[test]
fn an_image_whose_tail_does_not_fit_the_slot_is_too_large() {
    let img = Raw::c3().bytes();
    let max = img.len() as u32 - 1;
    let mut v = StreamValidator::new(None, max);
    assert_eq!(
        v.feed(&img),
        Err(ImageError::TooLarge {
            len: img.len() as u32,
            max_len: max
        })
    );
    // Exactly the slot size is fine.
    let mut v = StreamValidator::new(None, img.len() as u32);
    v.feed(&img).unwrap();
    v.finish().unwrap();
}

#[test]
fn a_mapped_segment_off_its_page_offset_is_misaligned() {
    let mut raw = Raw::c3();
    raw.segments[1].0 += 4;
    assert_eq!(
        validate_bytes(&raw.bytes()),
        Err(ImageError::MisalignedSegment {
            index: 1,
            load_addr: 0x4200_0000 + 304 + 4,
            offset: 304
        })
    );
}

#[test]
fn the_first_segment_is_checked_for_alignment_once_the_page_size_is_known() {
    let mut raw = Raw::c3();
    raw.segments[0].0 = 0x3C00_0040;
    let img = raw.bytes();
    let mut v = StreamValidator::new(None, MAX_IMAGE_LEN);
    v.feed(&img[..32 + 255]).unwrap();
    assert_eq!(
        v.feed(&img[32 + 255..]),
        Err(ImageError::MisalignedSegment {
            index: 0,
            load_addr: 0x3C00_0040,
            offset: 32
        })
    );
}

#[test]
fn a_wrong_descriptor_magic_means_no_app_descriptor() {
    let mut raw = Raw::c3();
    raw.segments[0].1[..APP_DESC_LEN].copy_from_slice(&desc(false));
    assert_eq!(
        validate_bytes(&raw.bytes()),
        Err(ImageError::MissingAppDescriptor)
    );
}

#[test]
fn a_first_segment_too_short_for_a_descriptor_means_no_app_descriptor() {
    let mut raw = Raw::c3();
    raw.segments[0].1.truncate(252);
    assert_eq!(
        validate_bytes(&raw.bytes()),
        Err(ImageError::MissingAppDescriptor)
    );
}

#[test]
fn an_image_without_segments_has_no_app_descriptor() {
    let mut raw = Raw::c3();
    raw.header.segment_count = 0;
    raw.segments.clear();
    assert_eq!(
        validate_bytes(&raw.bytes()),
        Err(ImageError::MissingAppDescriptor)
    );
}

#[test]
fn a_cut_image_is_truncated_and_says_how_long_it_should_be() {
    let img = &SAMPLE[..SAMPLE.len() - 1];
    assert_eq!(
        validate_bytes(img),
        Err(ImageError::Truncated {
            seen: img.len() as u32,
            expected: Some(SAMPLE.len() as u32)
        })
    );
    assert_eq!(
        validate_bytes(&SAMPLE[..10]),
        Err(ImageError::Truncated {
            seen: 10,
            expected: None
        })
    );
    assert_eq!(
        validate_bytes(&[]),
        Err(ImageError::Truncated {
            seen: 0,
            expected: None
        })
    );
}

#[test]
fn bytes_after_the_image_are_trailing_data() {
    // Anything but 0xFF padding towards a signature sector.
    let mut img = SAMPLE.to_vec();
    img.push(0x00);
    assert_eq!(
        validate_bytes(&img),
        Err(ImageError::TrailingData {
            len: SAMPLE.len() as u32
        })
    );
}

#[test]
fn a_flipped_data_bit_breaks_the_checksum() {
    let mut img = C3_NODIGEST.to_vec();
    img[40] ^= 0x01;
    let err = validate_bytes(&img).unwrap_err();
    assert_eq!(
        err,
        ImageError::BadChecksum {
            stored: 0xcb,
            computed: 0xca
        }
    );
}

#[test]
fn a_damaged_appended_hash_is_a_bad_hash() {
    let mut img = SAMPLE.to_vec();
    *img.last_mut().unwrap() ^= 0x80;
    assert_eq!(validate_bytes(&img), Err(ImageError::BadHash));
    // The lenient finish still describes the image and says what is wrong.
    let mut v = StreamValidator::new(None, MAX_IMAGE_LEN);
    v.feed(&img).unwrap();
    let info = v.finish_unchecked().unwrap();
    assert!(info.checksum_valid);
    assert!(!info.sha256_valid);
}

#[test]
fn a_damaged_padding_byte_breaks_the_hash_but_not_the_checksum() {
    let mut img = SAMPLE.to_vec();
    let ck = img.len() - HASH_LEN - 1;
    img[ck - 1] ^= 0x01; // padding is hashed but not summed
    assert_eq!(validate_bytes(&img), Err(ImageError::BadHash));
}

#[test]
fn every_error_prints_as_one_line_naming_the_problem() {
    let errors = [
        ImageError::BadMagic { found: 0xff },
        ImageError::UnknownChip { id: 99 },
        ImageError::WrongChip {
            expected: Chip::Esp32c3,
            found: 13,
        },
        ImageError::TooManySegments { count: 20 },
        ImageError::BadSegmentLength { index: 1, len: 3 },
        ImageError::SegmentPastEnd {
            index: 2,
            end: 10,
            max_len: 5,
        },
        ImageError::MisalignedSegment {
            index: 1,
            load_addr: 4,
            offset: 0,
        },
        ImageError::MissingAppDescriptor,
        ImageError::TooLarge { len: 2, max_len: 1 },
        ImageError::Truncated {
            seen: 1,
            expected: Some(2),
        },
        ImageError::TrailingData { len: 5 },
        ImageError::BadChecksum {
            stored: 1,
            computed: 2,
        },
        ImageError::BadHash,
        ImageError::Flash(NorFlashErrorKind::Other),
    ];
    for e in errors {
        let s = std::format!("{e}");
        assert!(!s.is_empty() && !s.contains('\n'), "{s:?}");
    }
    assert_eq!(
        std::format!("{}", errors[2]),
        "image is for esp32c6 (chip id 13), expected esp32c3"
    );
}

#[test]
fn chips_parse_from_vendor_spellings_and_round_trip_ids() {
    assert_eq!("esp32c3".parse(), Ok(Chip::Esp32c3));
    assert_eq!("ESP32-C6".parse(), Ok(Chip::Esp32c6));
    assert_eq!("esp32_h2".parse(), Ok(Chip::Esp32h2));
    assert_eq!("esp32c4".parse::<Chip>(), Err(UnknownChipName));
    assert_eq!(
        "esp32c3esp32c3esp32c3".parse::<Chip>(),
        Err(UnknownChipName)
    );
    for c in Chip::ALL {
        assert_eq!(Chip::from_id(c.id()), Some(c));
        assert_eq!(c.name().parse(), Ok(c));
    }
    // esptool's IMAGE_CHIP_ID values.
    assert_eq!(Chip::Esp32.id(), 0);
    assert_eq!(Chip::Esp32c3.id(), 5);
    assert_eq!(Chip::Esp32c6.id(), 13);
    assert_eq!(Chip::from_id(1), None);
}

#[test]
fn a_header_round_trips_through_bytes() {
    let h = ImageHeader::parse(&SAMPLE[..24].try_into().unwrap());
    assert_eq!(h.to_bytes(), SAMPLE[..24]);
    assert_eq!(h.spi_size, 2); // esptool: "Flash size: 4MB"
    assert_eq!(h.spi_mode, 2); // esptool: "Flash mode: DIO"
}

/// A flash with 4-byte reads that refuses misaligned access, like
/// esp-storage, and remembers how much it was asked to read.
struct WordFlash {
    data: Vec<u8>,
    largest_read: usize,
    bytes_read: usize,
    fail_at: Option<u32>,
}

impl WordFlash {
    fn new(image: &[u8], at: usize, size: usize) -> WordFlash {
        let mut data = vec![0xFF; size];
        data[at..at + image.len()].copy_from_slice(image);
        WordFlash {
            data,
            largest_read: 0,
            bytes_read: 0,
            fail_at: None,
        }
    }
}

impl ErrorType for WordFlash {
    type Error = NorFlashErrorKind;
}

impl ReadNorFlash for WordFlash {
    const READ_SIZE: usize = 4;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        let o = offset as usize;
        if !o.is_multiple_of(4) || !bytes.len().is_multiple_of(4) {
            return Err(NorFlashErrorKind::NotAligned);
        }
        if o + bytes.len() > self.data.len() {
            return Err(NorFlashErrorKind::OutOfBounds);
        }
        if self
            .fail_at
            .is_some_and(|f| (o..o + bytes.len()).contains(&(f as usize)))
        {
            return Err(NorFlashErrorKind::Other);
        }
        self.largest_read = self.largest_read.max(bytes.len());
        self.bytes_read += bytes.len();
        bytes.copy_from_slice(&self.data[o..o + bytes.len()]);
        Ok(())
    }

    fn capacity(&self) -> usize {
        self.data.len()
    }
}

#[test]
fn flash_validation_streams_through_a_small_buffer_and_stops_at_the_image_end() {
    let mut flash = WordFlash::new(C3_ESPTOOL, 0x1_0000, 0x4_0000);
    let info = validate_flash(&mut flash, 0x1_0000, 0x3_0000).unwrap();
    assert_eq!(info, validate_bytes(C3_ESPTOOL).unwrap());
    assert!(flash.largest_read <= 64);
    // Reads stop within one buffer of the image end, not at the slot end.
    assert!(
        flash.bytes_read < C3_ESPTOOL.len() + 64,
        "{}",
        flash.bytes_read
    );
}

#[test]
fn flash_validation_refuses_the_wrong_chip() {
    let mut flash = WordFlash::new(C6_ESPFLASH, 0, 0x1_0000);
    assert_eq!(
        validate_flash_for(&mut flash, 0, 0x1_0000, Some(Chip::Esp32c3)),
        Err(ImageError::WrongChip {
            expected: Chip::Esp32c3,
            found: 13
        })
    );
    assert!(validate_flash_for(&mut flash, 0, 0x1_0000, Some(Chip::Esp32c6)).is_ok());
}

#[test]
fn erased_flash_is_a_bad_magic_byte() {
    let mut flash = WordFlash::new(&[], 0, 0x1_0000);
    assert_eq!(
        validate_flash(&mut flash, 0x8000, 0x8000),
        Err(ImageError::BadMagic { found: 0xFF })
    );
}

#[test]
fn a_slot_that_ends_before_the_image_fits_reports_it() {
    // An image at the very end of the flash with an unaligned slot end.
    let mut flash = WordFlash::new(SAMPLE, 0x1_0000 - SAMPLE.len(), 0x1_0000);
    let at = 0x1_0000 - SAMPLE.len() as u32;
    assert!(validate_flash(&mut flash, at, SAMPLE.len() as u32).is_ok());
    assert!(matches!(
        validate_flash(&mut flash, at, SAMPLE.len() as u32 - 3),
        Err(ImageError::TooLarge { .. })
    ));
}

#[test]
fn flash_errors_and_bad_regions_are_flash_errors() {
    let mut flash = WordFlash::new(SAMPLE, 0, 0x1_0000);
    flash.fail_at = Some(500);
    assert_eq!(
        validate_flash(&mut flash, 0, 0x1_0000),
        Err(ImageError::Flash(NorFlashErrorKind::Other))
    );
    assert_eq!(
        validate_flash(&mut flash, 2, 0x100),
        Err(ImageError::Flash(NorFlashErrorKind::NotAligned))
    );
    assert_eq!(
        validate_flash(&mut flash, 0x8000, 0x1_0000),
        Err(ImageError::Flash(NorFlashErrorKind::OutOfBounds))
    );
}

#[cfg(feature = "alloc")]
mod builder {
    use super::*;

    #[test]
    fn built_images_have_the_exact_size_and_validate() {
        for chip in Chip::ALL {
            for size in [ImageBuilder::MIN_SIZE, 4096, 65536 + 16] {
                let img = ImageBuilder::new(chip)
                    .version("1.0.0")
                    .project("p")
                    .secure_version(4)
                    .size(size)
                    .build()
                    .unwrap();
                assert_eq!(img.len() as u32, size);
                let info = validate_bytes(&img).unwrap();
                assert_eq!(info.chip, chip);
                assert_eq!(info.app.version.as_str(), "1.0.0");
                assert_eq!(info.app.secure_version, 4);
                assert!(info.sha256_valid);
            }
        }
    }

    #[test]
    fn different_versions_give_different_bytes_and_the_same_inputs_the_same() {
        let b = |v| {
            ImageBuilder::new(Chip::Esp32c3)
                .version(v)
                .size(4096)
                .build()
                .unwrap()
        };
        let (a1, a2, c) = (b("1.0.0"), b("1.0.0"), b("1.0.1"));
        assert_eq!(a1, a2);
        let differing = a1.iter().zip(&c).filter(|(x, y)| x != y).count();
        assert!(differing > 3000, "only {differing} bytes differ");
    }

    #[test]
    fn unusable_sizes_and_fields_are_refused() {
        let b = ImageBuilder::new(Chip::Esp32c3);
        assert_eq!(
            b.clone().size(ImageBuilder::MIN_SIZE - 16).build(),
            Err(BuildError::SizeTooSmall {
                min: ImageBuilder::MIN_SIZE
            })
        );
        assert_eq!(
            b.clone().size(4100).build(),
            Err(BuildError::SizeNotAligned)
        );
        assert_eq!(
            b.clone().size(0x0100_0000).build(),
            Err(BuildError::SizeTooLarge { max: 0x80_0000 })
        );
        assert_eq!(
            b.clone().version(&"x".repeat(32)).build(),
            Err(BuildError::FieldTooLong {
                field: "version",
                max: 31
            })
        );
        assert!(b.version(&"x".repeat(31)).build().is_ok());
    }
}

#[test]
fn padding_and_a_signature_sector_after_the_image_are_accepted() {
    let mut img = SAMPLE.to_vec();
    let padded = img.len().next_multiple_of(4096);
    img.resize(padded, 0xFF);
    let padded_digest: [u8; 32] = Sha256::digest(&img).into();
    img.extend_from_slice(&[0xAB; 4096]);
    let info = validate_bytes(&img).unwrap();
    assert_eq!(info.len, SAMPLE.len() as u32);
    assert_eq!(info.file_len, img.len() as u32);
    assert_eq!(info.padded_sha256, Some(padded_digest));
    assert_eq!(info.signature_sector(), Some(padded as u32));
    assert_eq!(info.file_sha256, <[u8; 32]>::from(Sha256::digest(&img)));
}

#[test]
fn padding_without_its_signature_sector_is_an_incomplete_sector() {
    let mut img = SAMPLE.to_vec();
    img.resize(img.len().next_multiple_of(4096), 0xFF);
    assert_eq!(
        validate_bytes(&img),
        Err(ImageError::IncompleteSignatureSector {
            len: SAMPLE.len() as u32,
            seen: img.len() as u32,
            expected: img.len() as u32 + 4096,
        })
    );
}

#[test]
fn more_than_one_signature_sector_is_trailing_data() {
    let mut img = SAMPLE.to_vec();
    img.resize(img.len().next_multiple_of(4096) + 4097, 0xFF);
    assert_eq!(
        validate_bytes(&img),
        Err(ImageError::TrailingData {
            len: SAMPLE.len() as u32
        })
    );
}

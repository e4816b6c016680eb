//! Arbitrary bytes as an app image: `validate_bytes`, the `StreamValidator`
//! fed in arbitrary pieces, and `validate_flash` over a word-addressed flash
//! all reach the same verdict, and none panics.
#![no_main]

use embedded_storage::nor_flash::{ErrorType, NorFlashErrorKind, ReadNorFlash};
use libfuzzer_sys::fuzz_target;
use mqota_core::image::{
    validate_bytes, validate_flash, ImageError, ImageInfo, StreamValidator, HASH_LEN, MAX_IMAGE_LEN,
};
use sha2::{Digest, Sha256};

/// A flash with 4-byte reads, like esp-storage, that refuses anything else.
struct WordFlash(Vec<u8>);

impl ErrorType for WordFlash {
    type Error = NorFlashErrorKind;
}

impl ReadNorFlash for WordFlash {
    const READ_SIZE: usize = 4;
    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        let o = offset as usize;
        assert!(o % 4 == 0 && bytes.len() % 4 == 0, "misaligned read");
        let src = self
            .0
            .get(o..o + bytes.len())
            .ok_or(NorFlashErrorKind::OutOfBounds)?;
        bytes.copy_from_slice(src);
        Ok(())
    }
    fn capacity(&self) -> usize {
        self.0.len()
    }
}

fn streamed(img: &[u8], splits: &[u8]) -> Result<ImageInfo, ImageError> {
    let mut v = StreamValidator::new(None, MAX_IMAGE_LEN);
    let mut rest = img;
    let mut i = 0;
    while !rest.is_empty() {
        let s = splits[i % splits.len()];
        i += 1;
        if s == 0 {
            v.feed(&[])?;
        }
        let n = (usize::from(s) + 1).min(rest.len());
        v.feed(&rest[..n])?;
        rest = &rest[n..];
    }
    v.finish()
}

fn check(img: &[u8], splits: &[u8]) -> Result<ImageInfo, ImageError> {
    let whole = validate_bytes(img);
    assert_eq!(whole, streamed(img, splits), "streamed verdict differs");
    if let Ok(info) = &whole {
        assert_eq!(info.file_len as usize, img.len());
        assert_eq!(info.file_sha256, <[u8; 32]>::from(Sha256::digest(img)));
        if info.len != info.file_len {
            // A signed file: 0xFF padding to 4 KiB, then one 4 KiB sector.
            let padded = info.len.next_multiple_of(4096) as usize;
            assert_eq!(img.len(), padded + 4096);
            assert!(img[info.len as usize..padded].iter().all(|&b| b == 0xFF));
            assert_eq!(
                info.padded_sha256,
                Some(<[u8; 32]>::from(Sha256::digest(&img[..padded])))
            );
            return whole;
        }
        assert_eq!(info.padded_sha256, None);
        assert_eq!(info.segments.len(), usize::from(info.header.segment_count));
        // The same image in flash, one word in, in a slot that just fits.
        let mut bytes = vec![0xFF; 4];
        bytes.extend_from_slice(img);
        bytes.resize(bytes.len().next_multiple_of(4), 0xFF);
        let mut flash = WordFlash(bytes);
        assert_eq!(
            validate_flash(&mut flash, 4, img.len() as u32).as_ref(),
            Ok(info)
        );
    }
    whole
}

fuzz_target!(|data: &[u8]| {
    // One control byte: low 3 bits give how many split bytes follow, bit 3
    // asks to repair the checksum and hash, so that the fuzzer also reaches
    // images that are structurally fine and fully valid.
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(ctl & 7) + 1;
    if rest.len() < n {
        return;
    }
    let (splits, img) = rest.split_at(n);
    let mut img = img.to_vec();
    let mut verdict = check(&img, splits);
    if ctl & 8 != 0 {
        if let Err(ImageError::BadChecksum { computed, .. }) = verdict {
            let hashed = img[23] != 0;
            let at = img.len() - 1 - if hashed { HASH_LEN } else { 0 };
            img[at] = computed;
            verdict = check(&img, splits);
        }
        if let Err(ImageError::BadHash) = verdict {
            let at = img.len() - HASH_LEN;
            let d = Sha256::digest(&img[..at]);
            img[at..].copy_from_slice(&d);
            verdict = check(&img, splits);
            assert!(verdict.is_ok(), "repaired image still bad: {verdict:?}");
        }
    }
});

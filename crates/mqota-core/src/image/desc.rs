//! `esp_app_desc_t`: the application descriptor at the start of the first
//! segment's data.

use heapless::String;

/// `ESP_APP_DESC_MAGIC_WORD`.
pub const APP_DESC_MAGIC: u32 = 0xABCD_5432;
/// Size of `esp_app_desc_t`.
pub const APP_DESC_LEN: usize = 256;

/// `esp_app_desc_t`, decoded.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 4 | `magic_word` (0xABCD5432) |
/// | 4 | 4 | `secure_version` (anti-rollback counter) |
/// | 8 | 8 | `reserv1` |
/// | 16 | 32 | `version` |
/// | 48 | 32 | `project_name` |
/// | 80 | 16 | `time` |
/// | 96 | 16 | `date` |
/// | 112 | 32 | `idf_ver` |
/// | 144 | 32 | `app_elf_sha256` |
/// | 176 | 2 | `min_efuse_blk_rev_full` |
/// | 178 | 2 | `max_efuse_blk_rev_full` |
/// | 180 | 1 | `mmu_page_size` (log2, 0 = unknown) |
/// | 181 | 3 | `reserv3` |
/// | 184 | 72 | `reserv2` |
///
/// The strings are NUL-padded C strings that may fill their field without a
/// NUL. Bytes that are not UTF-8 decode as `?`, so a descriptor always
/// decodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppDescriptor {
    /// Secure version, compared with the eFuse anti-rollback counter.
    pub secure_version: u32,
    /// Application version, e.g. `"1.2.3"`.
    pub version: String<32>,
    /// Project name.
    pub project_name: String<32>,
    /// Compile time, `__TIME__` style.
    pub time: String<16>,
    /// Compile date, `__DATE__` style.
    pub date: String<16>,
    /// ESP-IDF (or other SDK) version string.
    pub idf_ver: String<32>,
    /// SHA-256 of the ELF the image was made from (patched in by the tools).
    pub app_elf_sha256: [u8; 32],
    /// Minimum eFuse block revision, major × 100 + minor.
    pub min_efuse_blk_rev_full: u16,
    /// Maximum eFuse block revision, major × 100 + minor.
    pub max_efuse_blk_rev_full: u16,
    /// log2 of the MMU page size the app was built for; 0 when unset.
    pub mmu_page_size: u8,
}

impl AppDescriptor {
    /// Decodes the 256 descriptor bytes, or `None` when the magic word is wrong.
    pub fn parse(b: &[u8; APP_DESC_LEN]) -> Option<AppDescriptor> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        if u32_at(0) != APP_DESC_MAGIC {
            return None;
        }
        let mut app_elf_sha256 = [0u8; 32];
        app_elf_sha256.copy_from_slice(&b[144..176]);
        Some(AppDescriptor {
            secure_version: u32_at(4),
            version: c_string(&b[16..48]),
            project_name: c_string(&b[48..80]),
            time: c_string(&b[80..96]),
            date: c_string(&b[96..112]),
            idf_ver: c_string(&b[112..144]),
            app_elf_sha256,
            min_efuse_blk_rev_full: u16_at(176),
            max_efuse_blk_rev_full: u16_at(178),
            mmu_page_size: b[180],
        })
    }

    /// Encodes the descriptor as the 256 bytes `parse` reads, reserved
    /// fields zero.
    pub fn to_bytes(&self) -> [u8; APP_DESC_LEN] {
        let mut b = [0u8; APP_DESC_LEN];
        b[0..4].copy_from_slice(&APP_DESC_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.secure_version.to_le_bytes());
        put(&mut b[16..48], &self.version);
        put(&mut b[48..80], &self.project_name);
        put(&mut b[80..96], &self.time);
        put(&mut b[96..112], &self.date);
        put(&mut b[112..144], &self.idf_ver);
        b[144..176].copy_from_slice(&self.app_elf_sha256);
        b[176..178].copy_from_slice(&self.min_efuse_blk_rev_full.to_le_bytes());
        b[178..180].copy_from_slice(&self.max_efuse_blk_rev_full.to_le_bytes());
        b[180] = self.mmu_page_size;
        b
    }

    /// The MMU page size in bytes the app was built for: 64 KiB when the
    /// descriptor does not say (older ESP-IDF), as that was the only size then.
    pub fn mmu_page_bytes(&self) -> u32 {
        match self.mmu_page_size {
            // ESP chips have 8 KiB to 64 KiB pages; anything else is not a
            // real setting and falls back to the historical default.
            13..=16 => 1 << self.mmu_page_size,
            _ => 0x1_0000,
        }
    }
}

fn put(field: &mut [u8], s: &str) {
    let n = s.len().min(field.len());
    field[..n].copy_from_slice(&s.as_bytes()[..n]);
}

/// Decodes a NUL-padded field into a string of the same capacity. Every
/// pushed char is no longer than the bytes it replaces, so pushes never fail.
fn c_string<const N: usize>(field: &[u8]) -> String<N> {
    let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    let mut rest = &field[..end];
    let mut out = String::new();
    while !rest.is_empty() {
        match core::str::from_utf8(rest) {
            Ok(s) => {
                let _ = out.push_str(s);
                break;
            }
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                // `good` was just checked to be UTF-8.
                let _ = out.push_str(core::str::from_utf8(good).unwrap_or(""));
                let _ = out.push('?');
                rest = &bad[e.error_len().unwrap_or(bad.len()).max(1)..];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_without_nul_uses_all_its_bytes() {
        let s: String<16> = c_string(b"0123456789abcdef");
        assert_eq!(s.as_str(), "0123456789abcdef");
    }

    #[test]
    fn invalid_utf8_becomes_question_marks_and_stops_at_nul() {
        let s: String<8> = c_string(b"a\xffb\xe2\x82c\0zz");
        assert_eq!(s.as_str(), "a?b?c");
    }

    #[test]
    fn a_descriptor_round_trips_through_bytes() {
        let d = AppDescriptor {
            secure_version: 7,
            version: String::try_from("1.0.0").unwrap(),
            project_name: String::try_from("p").unwrap(),
            time: String::try_from("12:00:00").unwrap(),
            date: String::try_from("Jan  1 2026").unwrap(),
            idf_ver: String::try_from("v5.4").unwrap(),
            app_elf_sha256: [9; 32],
            min_efuse_blk_rev_full: 1,
            max_efuse_blk_rev_full: 99,
            mmu_page_size: 16,
        };
        assert_eq!(AppDescriptor::parse(&d.to_bytes()), Some(d));
    }

    #[test]
    fn a_wrong_magic_word_is_not_a_descriptor() {
        let mut b = [0u8; APP_DESC_LEN];
        b[0..4].copy_from_slice(&0xABCD_5433u32.to_le_bytes());
        assert_eq!(AppDescriptor::parse(&b), None);
    }
}

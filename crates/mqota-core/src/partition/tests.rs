extern crate std;

use std::string::String;
use std::vec::Vec;

use super::*;

const GOLDEN: [(&str, &str, &[u8], &str); 3] = [
    (
        "default_4mb",
        include_str!("../../../../testdata/partitions/default_4mb.csv"),
        include_bytes!("../../../../testdata/partitions/default_4mb.bin"),
        include_str!("../../../../testdata/partitions/default_4mb.espflash.csv"),
    ),
    (
        "blank_offsets",
        include_str!("../../../../testdata/partitions/blank_offsets.csv"),
        include_bytes!("../../../../testdata/partitions/blank_offsets.bin"),
        include_str!("../../../../testdata/partitions/blank_offsets.espflash.csv"),
    ),
    (
        "factory_ota_custom",
        include_str!("../../../../testdata/partitions/factory_ota_custom.csv"),
        include_bytes!("../../../../testdata/partitions/factory_ota_custom.bin"),
        include_str!("../../../../testdata/partitions/factory_ota_custom.espflash.csv"),
    ),
];

fn default_table() -> PartitionTable {
    PartitionTable::from_csv(DEFAULT_4MB_CSV).unwrap()
}

fn part(label: &str, ty: PartitionType, subtype: SubType, offset: u32, size: u32) -> Partition {
    Partition::new(label, ty, subtype, offset, size).unwrap()
}

fn app(label: &str, subtype: SubType, offset: u32, size: u32) -> Partition {
    part(label, PartitionType::APP, subtype, offset, size)
}

fn data(label: &str, subtype: SubType, offset: u32, size: u32) -> Partition {
    part(label, PartitionType::DATA, subtype, offset, size)
}

fn csv_err(text: &str) -> CsvError {
    PartitionTable::from_csv(text).unwrap_err()
}

fn to_csv(table: &PartitionTable) -> String {
    let mut out = String::new();
    table.write_csv(&mut out).unwrap();
    out
}

/// `to_bytes` of the default table, patched by `edit`, with the MD5 entry
/// recomputed so that only the edit is wrong.
fn patched(edit: impl FnOnce(&mut [u8; TABLE_MAX_LEN])) -> [u8; TABLE_MAX_LEN] {
    let mut bin = default_table().to_bytes();
    edit(&mut bin);
    let n = default_table().partitions().len() * ENTRY_LEN;
    let digest = Md5::digest(&bin[..n]);
    bin[n + 16..n + 32].copy_from_slice(&digest);
    bin
}

// ---- golden files made by espflash ----

#[test]
fn the_default_csv_const_is_the_golden_file() {
    assert_eq!(DEFAULT_4MB_CSV, GOLDEN[0].1);
}

#[test]
fn espflash_binaries_parse_to_the_same_partitions_as_their_csv() {
    for (name, csv, bin, _) in GOLDEN {
        let from_csv = PartitionTable::from_csv(csv).unwrap();
        let from_bin = PartitionTable::from_bytes(bin).unwrap();
        assert_eq!(from_csv, from_bin, "{name}");
    }
}

#[test]
fn the_writer_reproduces_espflash_binaries_byte_for_byte() {
    for (name, csv, bin, _) in GOLDEN {
        let table = PartitionTable::from_csv(csv).unwrap();
        assert_eq!(&table.to_bytes()[..], bin, "{name}");
    }
}

#[test]
fn the_csv_writer_matches_espflash_to_csv() {
    for (name, _, bin, espflash_csv) in GOLDEN {
        let table = PartitionTable::from_bytes(bin).unwrap();
        assert_eq!(to_csv(&table), espflash_csv, "{name}");
    }
}

#[test]
fn blank_offsets_are_computed_as_espflash_computes_them() {
    let (_, csv, _, espflash_csv) = GOLDEN[1];
    let blank =
        |l: &&str| !l.starts_with('#') && l.split(',').nth(3).is_some_and(|f| f.trim().is_empty());
    assert_eq!(csv.lines().filter(blank).count(), 8);
    let ours = PartitionTable::from_csv(csv).unwrap();
    let theirs = PartitionTable::from_csv(espflash_csv).unwrap();
    let offsets = |t: &PartitionTable| t.partitions().iter().map(|p| p.offset).collect::<Vec<_>>();
    assert_eq!(offsets(&ours), offsets(&theirs));
    assert_eq!(
        offsets(&ours),
        [0x9000, 0xd000, 0xf000, 0x10000, 0x110000, 0x210000, 0x310000, 0x33c000]
    );
}

#[test]
fn a_sixteen_byte_label_fills_the_field_without_a_nul() {
    let (_, _, bin, _) = GOLDEN[2];
    let table = PartitionTable::from_bytes(bin).unwrap();
    let p = table.find("vendor_calib_16b").unwrap();
    assert_eq!(p.ty, PartitionType(0x40));
    assert_eq!(p.subtype, SubType(0x01));
    assert_eq!(p.label.to_padded(), *b"vendor_calib_16b");
}

// ---- look-ups ----

#[test]
fn the_default_table_has_two_ota_slots_and_otadata_but_no_factory() {
    let t = default_table();
    let slots: Vec<_> = t
        .ota_slots()
        .map(|p| (p.label.as_str(), p.offset))
        .collect();
    assert_eq!(slots, [("ota_0", 0x10000), ("ota_1", 0x1f0000)]);
    let otadata = t.otadata().unwrap();
    assert_eq!((otadata.offset, otadata.size), (0xd000, OTADATA_SIZE));
    assert!(t.factory().is_none());
    assert!(t.partitions().last().unwrap().end() <= 4 * 1024 * 1024);
}

#[test]
fn ota_slots_come_in_slot_order_not_table_order() {
    let t = PartitionTable::from_bytes(GOLDEN[2].2).unwrap();
    let order: Vec<_> = t.ota_slots().map(|p| p.ota_slot().unwrap()).collect();
    assert_eq!(order, [0, 1, 2]);
    assert_eq!(t.ota_slot(1).unwrap().offset, 0xe0000);
    assert!(t.ota_slot(3).is_none());
    assert!(t.ota_slot(200).is_none());
    assert_eq!(t.factory().unwrap().label, "factory");
}

#[test]
fn look_ups_by_label_type_and_address() {
    let t = PartitionTable::from_bytes(GOLDEN[2].2).unwrap();
    assert_eq!(t.find("nvs_key").unwrap().subtype, SubType::NVS_KEYS);
    assert!(t.find("nvs_keys").is_none());
    let fat = t.find_by_type(PartitionType::DATA, SubType::FAT).unwrap();
    assert!(fat.flags.contains(Flags::ENCRYPTED.union(Flags::READONLY)));
    assert_eq!(t.iter_type(PartitionType::APP).count(), 4);
    assert_eq!(t.containing(0x1a0000).unwrap().label, "ota_0");
    assert_eq!(t.containing(0x25ffff).unwrap().label, "ota_0");
    assert!(t.containing(0x14000).is_none());
}

#[test]
fn subtype_names_depend_on_the_type() {
    assert_eq!(SubType(0).name(PartitionType::APP), Some("factory"));
    assert_eq!(SubType(0).name(PartitionType::DATA), Some("ota"));
    assert_eq!(SubType(0).name(PartitionType(0x40)), None);
    assert_eq!(
        SubType::from_name(PartitionType::APP, "ota_15"),
        Some(SubType::OTA_15)
    );
    assert_eq!(SubType::from_name(PartitionType::DATA, "ota_0"), None);
    assert_eq!(SubType::from_name(PartitionType::APP, "nvs"), None);
    assert_eq!(SubType::ota(16), None);
}

// ---- binary ----

#[test]
fn a_table_without_the_md5_entry_is_accepted() {
    let mut bin = default_table().to_bytes();
    let n = default_table().partitions().len() * ENTRY_LEN;
    bin[n..n + ENTRY_LEN].fill(0xFF);
    assert_eq!(PartitionTable::from_bytes(&bin).unwrap(), default_table());
}

#[test]
fn a_short_slice_is_enough_when_it_holds_the_end_marker() {
    let bin = default_table().to_bytes();
    let n = (default_table().partitions().len() + 2) * ENTRY_LEN;
    assert_eq!(
        PartitionTable::from_bytes(&bin[..n]).unwrap(),
        default_table()
    );
    assert_eq!(
        PartitionTable::from_bytes(&bin[..n - 1]),
        Err(Error::NoEndMarker)
    );
}

#[test]
fn a_flipped_bit_fails_the_md5_check() {
    let mut bin = default_table().to_bytes();
    bin[5] ^= 0x01;
    assert_eq!(PartitionTable::from_bytes(&bin), Err(Error::BadMd5));
}

#[test]
fn an_entry_with_a_foreign_magic_is_refused() {
    let mut bin = default_table().to_bytes();
    bin[ENTRY_LEN] = 0x00;
    assert_eq!(
        PartitionTable::from_bytes(&bin),
        Err(Error::BadMagic {
            entry: 1,
            magic: 0x5000
        })
    );
}

#[test]
fn zeroed_flash_is_not_a_table() {
    assert_eq!(
        PartitionTable::from_bytes(&[0; TABLE_MAX_LEN]),
        Err(Error::BadMagic { entry: 0, magic: 0 })
    );
}

#[test]
fn erased_flash_is_an_empty_table() {
    assert_eq!(
        PartitionTable::from_bytes(&[0xFF; TABLE_MAX_LEN]),
        Err(Error::Empty)
    );
}

#[test]
fn a_table_with_no_end_marker_is_refused() {
    let mut bin = [0u8; 3 * ENTRY_LEN];
    bin[..ENTRY_LEN].copy_from_slice(&app("a", SubType::FACTORY, 0x10000, 0x1000).to_bytes());
    bin[ENTRY_LEN..2 * ENTRY_LEN]
        .copy_from_slice(&app("b", SubType::OTA_0, 0x20000, 0x1000).to_bytes());
    bin[2 * ENTRY_LEN..].copy_from_slice(&app("c", SubType::OTA_1, 0x30000, 0x1000).to_bytes());
    assert_eq!(PartitionTable::from_bytes(&bin), Err(Error::NoEndMarker));
}

#[test]
fn an_entry_after_the_md5_entry_is_refused() {
    let t = default_table();
    let mut bin = t.to_bytes();
    let n = t.partitions().len() * ENTRY_LEN;
    let extra = data("extra", SubType::FAT, 0x3e0000, 0x1000).to_bytes();
    bin[n + ENTRY_LEN..n + 2 * ENTRY_LEN].copy_from_slice(&extra);
    assert_eq!(
        PartitionTable::from_bytes(&bin),
        Err(Error::EntryAfterMd5 {
            entry: t.partitions().len() + 1
        })
    );
}

fn many(n: usize) -> Vec<Partition> {
    let mut v = std::vec![app("app", SubType::FACTORY, 0x10000, 0x10000)];
    for i in 1..n {
        let label = std::format!("d{i}");
        v.push(data(
            &label,
            SubType::NVS,
            0x20000 + i as u32 * 0x1000,
            0x1000,
        ));
    }
    v
}

#[test]
fn ninety_five_partitions_fill_the_table_and_need_no_end_marker() {
    let t = PartitionTable::new(&many(MAX_ENTRIES)).unwrap();
    let bin = t.to_bytes();
    assert_eq!(
        u16::from_le_bytes([bin[TABLE_MAX_LEN - 32], bin[TABLE_MAX_LEN - 31]]),
        MD5_MAGIC
    );
    assert_eq!(PartitionTable::from_bytes(&bin).unwrap(), t);
}

#[test]
fn ninety_six_partitions_are_too_many() {
    assert_eq!(
        PartitionTable::new(&many(MAX_ENTRIES + 1)),
        Err(Error::TooManyEntries)
    );
    let mut bin = [0xFF; TABLE_MAX_LEN];
    for (i, p) in many(96).iter().enumerate() {
        bin[i * ENTRY_LEN..(i + 1) * ENTRY_LEN].copy_from_slice(&p.to_bytes());
    }
    assert_eq!(PartitionTable::from_bytes(&bin), Err(Error::TooManyEntries));
    let mut csv = String::new();
    for p in many(96) {
        csv += &std::format!(
            "{},{},{},{:#x},{:#x}\n",
            p.label,
            p.ty,
            p.subtype.0,
            p.offset,
            p.size
        );
    }
    assert_eq!(
        csv_err(&csv),
        CsvError {
            line: Some(96),
            error: Error::TooManyEntries
        }
    );
}

#[test]
fn a_label_that_is_not_utf8_is_refused() {
    let bin = patched(|b| b[12] = 0xC3);
    assert_eq!(
        PartitionTable::from_bytes(&bin),
        Err(Error::Label {
            entry: 0,
            error: LabelError::NotUtf8
        })
    );
}

#[test]
fn a_label_with_bytes_after_its_padding_is_refused() {
    // "nvs\0" then a stray byte: not what any tool writes.
    let bin = patched(|b| b[12 + 5] = b'x');
    assert_eq!(
        PartitionTable::from_bytes(&bin),
        Err(Error::Label {
            entry: 0,
            error: LabelError::NotNulPadded
        })
    );
}

#[test]
fn an_empty_label_is_refused() {
    let bin = patched(|b| b[12..28].fill(0));
    assert_eq!(
        PartitionTable::from_bytes(&bin),
        Err(Error::Label {
            entry: 0,
            error: LabelError::Empty
        })
    );
}

#[test]
fn labels_that_csv_cannot_carry_are_refused() {
    for bad in ["a,b", " a", "a ", "#a", "a\nb", "a\0b", "\u{3000}a"] {
        assert_eq!(Label::new(bad), Err(LabelError::BadChar), "{bad:?}");
    }
    assert_eq!(Label::new("seventeen_chars_x"), Err(LabelError::TooLong));
    assert_eq!(
        Label::new("sixteen_chars_ab").unwrap().as_str(),
        "sixteen_chars_ab"
    );
    assert_eq!(Label::new("año").unwrap().as_str(), "año");
}

#[test]
fn undefined_flag_bits_are_refused() {
    let bin = patched(|b| b[28] = 0x04);
    assert_eq!(
        PartitionTable::from_bytes(&bin),
        Err(Error::UnknownFlags {
            label: Label::new("nvs").unwrap(),
            bits: 4
        })
    );
}

#[test]
fn read_from_flash_matches_from_bytes() {
    let t = PartitionTable::from_csv(GOLDEN[2].1).unwrap();
    let mut flash = TestFlash(std::vec![0xFF; 0x10000]);
    flash.0[TABLE_OFFSET as usize..][..TABLE_MAX_LEN].copy_from_slice(&t.to_bytes());
    assert_eq!(
        PartitionTable::read_from(&mut flash, TABLE_OFFSET).unwrap(),
        t
    );
    assert_eq!(
        PartitionTable::read_from(&mut flash, 0x9000),
        Err(ReadError::Table(Error::Empty))
    );
    assert_eq!(
        PartitionTable::read_from(&mut flash, 0xFFF0),
        Err(ReadError::Flash(OutOfBounds))
    );
}

#[derive(Debug, PartialEq)]
struct OutOfBounds;

impl embedded_storage::nor_flash::NorFlashError for OutOfBounds {
    fn kind(&self) -> embedded_storage::nor_flash::NorFlashErrorKind {
        embedded_storage::nor_flash::NorFlashErrorKind::OutOfBounds
    }
}

struct TestFlash(Vec<u8>);

impl embedded_storage::nor_flash::ErrorType for TestFlash {
    type Error = OutOfBounds;
}

impl ReadNorFlash for TestFlash {
    const READ_SIZE: usize = 4;
    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), OutOfBounds> {
        let src = self
            .0
            .get(offset as usize..offset as usize + bytes.len())
            .ok_or(OutOfBounds)?;
        bytes.copy_from_slice(src);
        Ok(())
    }
    fn capacity(&self) -> usize {
        self.0.len()
    }
}

// ---- layout rules ----

#[test]
fn an_app_off_a_64k_boundary_is_misaligned() {
    let err = PartitionTable::new(&[app("a", SubType::FACTORY, 0x11000, 0x10000)]);
    assert_eq!(
        err,
        Err(Error::Misaligned {
            label: Label::new("a").unwrap(),
            align: APP_ALIGN
        })
    );
}

#[test]
fn data_off_a_4k_boundary_is_misaligned() {
    let err = PartitionTable::new(&[
        data("d", SubType::NVS, 0x9004, 0x1000),
        app("a", SubType::FACTORY, 0x10000, 0x10000),
    ]);
    assert_eq!(
        err,
        Err(Error::Misaligned {
            label: Label::new("d").unwrap(),
            align: DATA_ALIGN
        })
    );
}

#[test]
fn overlapping_partitions_are_refused_but_touching_ones_are_not() {
    let a = app("a", SubType::OTA_0, 0x10000, 0x10000);
    assert!(PartitionTable::new(&[a, app("b", SubType::OTA_1, 0x20000, 0x10000)]).is_ok());
    assert_eq!(
        PartitionTable::new(&[a, app("b", SubType::OTA_1, 0x10000, 0x10000)]),
        Err(Error::Overlap {
            label: Label::new("b").unwrap(),
            other: Label::new("a").unwrap()
        })
    );
}

#[test]
fn a_partition_over_the_table_is_refused() {
    assert_eq!(
        PartitionTable::new(&[
            data("n", SubType::NVS, 0x8000, 0x1000),
            app("a", SubType::FACTORY, 0x10000, 0x10000)
        ]),
        Err(Error::BelowTable {
            label: Label::new("n").unwrap()
        })
    );
}

#[test]
fn a_partition_past_four_gib_is_refused() {
    assert!(PartitionTable::new(&[app("a", SubType::FACTORY, 0xFFFF_0000, 0x10000)]).is_ok());
    assert_eq!(
        PartitionTable::new(&[app("a", SubType::FACTORY, 0xFFFF_0000, 0x10001)]),
        Err(Error::OutOfRange {
            label: Label::new("a").unwrap()
        })
    );
}

#[test]
fn duplicate_labels_are_refused() {
    assert_eq!(
        PartitionTable::new(&[
            app("a", SubType::OTA_0, 0x10000, 0x10000),
            app("a", SubType::OTA_1, 0x20000, 0x10000)
        ]),
        Err(Error::DuplicateLabel {
            label: Label::new("a").unwrap()
        })
    );
}

#[test]
fn two_partitions_in_the_same_ota_slot_are_refused() {
    assert_eq!(
        PartitionTable::new(&[
            app("a", SubType::OTA_0, 0x10000, 0x10000),
            app("b", SubType::OTA_0, 0x20000, 0x10000)
        ]),
        Err(Error::DuplicateSubtype {
            label: Label::new("b").unwrap(),
            other: Label::new("a").unwrap()
        })
    );
    // Two NVS partitions are normal: only boot roles must be unique.
    assert!(PartitionTable::new(&[
        data("n1", SubType::NVS, 0x9000, 0x1000),
        data("n2", SubType::NVS, 0xa000, 0x1000),
        app("a", SubType::OTA_0, 0x10000, 0x10000),
    ])
    .is_ok());
}

#[test]
fn otadata_must_be_two_sectors() {
    assert_eq!(
        PartitionTable::new(&[
            data("otadata", SubType::OTADATA, 0xd000, 0x1000),
            app("a", SubType::OTA_0, 0x10000, 0x10000)
        ]),
        Err(Error::OtadataSize {
            label: Label::new("otadata").unwrap()
        })
    );
}

#[test]
fn a_table_without_an_app_is_refused() {
    assert_eq!(
        PartitionTable::new(&[data("n", SubType::NVS, 0x9000, 0x1000)]),
        Err(Error::NoApp)
    );
    assert_eq!(PartitionTable::new(&[]), Err(Error::Empty));
}

// ---- CSV ----

#[test]
fn csv_numbers_take_hex_decimal_octal_binary_and_k_m_suffixes() {
    let t = PartitionTable::from_csv(
        "a, app, factory, 65536, 0x10K\n\
         b, app, ota_0, 0o400000, 1m\n\
         c, data, nvs, 0b1000000000000000000000, 4k\n",
    )
    .unwrap();
    let got: Vec<_> = t.partitions().iter().map(|p| (p.offset, p.size)).collect();
    assert_eq!(
        got,
        [(0x10000, 0x4000), (0x20000, 0x100000), (0x200000, 0x1000)]
    );
}

#[test]
fn blank_offsets_pad_apps_to_64k_and_data_to_4k() {
    let t = PartitionTable::from_csv(
        "n, data, nvs,, 0x1800\n\
         p, data, phy,, 0x1000\n\
         a, app, factory,, 0x1000\n\
         e, data, ,, 0x1000\n",
    )
    .unwrap();
    let got: Vec<_> = t.partitions().iter().map(|p| p.offset).collect();
    assert_eq!(got, [0x9000, 0xb000, 0x10000, 0x11000]);
    assert_eq!(t.partitions()[3].subtype, SubType::UNDEFINED);
}

#[test]
fn a_blank_offset_follows_an_explicit_one() {
    let t =
        PartitionTable::from_csv("a, app, factory, 0x100000, 0x1000\nb, app, ota_0,, 1\n").unwrap();
    assert_eq!(t.partitions()[1].offset, 0x110000);
}

#[test]
fn types_and_subtypes_may_be_numbers() {
    let t = PartitionTable::from_csv("a, 0, 0x10, 0x10000, 1M\nx, 1, 2, 0x9000, 4K\n").unwrap();
    assert_eq!(t.ota_slot(0).unwrap().label, "a");
    assert_eq!(
        t.find_by_type(PartitionType::DATA, SubType::NVS)
            .unwrap()
            .label,
        "x"
    );
}

#[test]
fn csv_errors_name_their_line() {
    let cases: [(&str, usize, Error); 13] = [
        ("\n# c\nnvs", 3, Error::MissingField(Field::Type)),
        (",app,factory,,1M", 1, Error::MissingField(Field::Name)),
        ("a,app,,,1M", 1, Error::MissingField(Field::SubType)),
        ("a,app,factory,,", 1, Error::MissingField(Field::Size)),
        ("a,application,factory,,1M", 1, Error::BadType),
        ("a,256,factory,,1M", 1, Error::BadType),
        ("a,app,nvs,,1M", 1, Error::BadSubtype),
        ("a,app,factory,0x1g,1M", 1, Error::BadNumber(Field::Offset)),
        ("a,app,factory,,4096M", 1, Error::BadNumber(Field::Size)),
        ("a,app,factory,,-1", 1, Error::BadNumber(Field::Size)),
        ("a,app,factory,,1M,secret", 1, Error::UnknownFlag),
        ("a,app,factory,,1M,,x", 1, Error::TooManyFields),
        (
            "a,app,factory,,1M\n\nseventeen_chars_x,app,ota_0,,1M",
            3,
            Error::Label {
                entry: 1,
                error: LabelError::TooLong,
            },
        ),
    ];
    for (text, line, error) in cases {
        assert_eq!(
            csv_err(text),
            CsvError {
                line: Some(line),
                error
            },
            "{text:?}"
        );
    }
}

#[test]
fn csv_layout_errors_name_the_line_of_the_later_partition() {
    let err = csv_err("# header\na, app, ota_0, 0x10000, 1M\n\nb, app, ota_1, 0x80000, 1M\n");
    assert_eq!(err.line, Some(4));
    assert_eq!(std::format!("{err}"), "line 4: partition `b` overlaps `a`");
    assert_eq!(csv_err("# nothing\n").line, None);
}

#[test]
fn a_trailing_comma_and_crlf_line_ends_are_fine() {
    let t = PartitionTable::from_csv("a, app, factory, , 1M,,\r\n").unwrap();
    assert_eq!(t.factory().unwrap().offset, 0x10000);
}

#[test]
fn csv_written_by_the_table_reads_back_to_the_same_table() {
    for (name, csv, _, _) in GOLDEN {
        let t = PartitionTable::from_csv(csv).unwrap();
        assert_eq!(PartitionTable::from_csv(&to_csv(&t)).unwrap(), t, "{name}");
    }
}

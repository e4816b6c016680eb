//! `mqota partitions` against the espflash-made golden files in testdata/partitions.

mod cli_support;

use cli_support::{failure, stdout};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/partitions")
        .join(name)
}

fn mqota(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mqota"))
        .arg("partitions")
        .args(args)
        .output()
        .expect("run mqota")
}

#[test]
fn listing_a_binary_shows_every_partition_with_its_flags() {
    let out = stdout(&mqota(&[golden("factory_ota_custom.bin").as_os_str()]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1 + 13, "{out}");
    let cols = |l: &str| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(
        cols(lines[0]),
        ["LABEL", "TYPE", "SUBTYPE", "OFFSET", "SIZE", "FLAGS"]
    );
    assert_eq!(
        cols(lines[11]),
        [
            "fatfs",
            "data",
            "fat",
            "0x360000",
            "0x40000",
            "(256",
            "KiB)",
            "encrypted:readonly"
        ]
    );
    assert_eq!(
        cols(lines[12]),
        [
            "vendor_calib_16b",
            "0x40",
            "0x01",
            "0x3a0000",
            "0x10000",
            "(64",
            "KiB)"
        ]
    );
    // Columns line up: every row's offset starts where the header's does.
    let at = lines[0].find("OFFSET").unwrap();
    for l in &lines[1..] {
        assert!(l[at..].starts_with("0x"), "{l}");
    }
}

#[test]
fn listing_a_csv_fills_in_blank_offsets() {
    let out = stdout(&mqota(&[golden("blank_offsets.csv").as_os_str()]));
    let ota_1 = out.lines().find(|l| l.starts_with("ota_1 ")).unwrap();
    assert!(ota_1.contains(" 0x210000 "), "{ota_1}");
}

#[test]
fn csv_to_binary_writes_what_espflash_writes() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["default_4mb", "blank_offsets", "factory_ota_custom"] {
        let out_path = dir.path().join(format!("{name}.bin"));
        let out = mqota(&[
            golden(&format!("{name}.csv")).as_os_str(),
            "--to-binary".as_ref(),
            out_path.as_os_str(),
        ]);
        assert_eq!(stdout(&out), "");
        let ours = std::fs::read(&out_path).unwrap();
        let theirs = std::fs::read(golden(&format!("{name}.bin"))).unwrap();
        assert_eq!(ours, theirs, "{name}");
    }
}

#[test]
fn binary_to_csv_writes_what_espflash_writes() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["default_4mb", "blank_offsets", "factory_ota_custom"] {
        let out_path = dir.path().join(format!("{name}.csv"));
        let out = mqota(&[
            golden(&format!("{name}.bin")).as_os_str(),
            "--to-csv".as_ref(),
            out_path.as_os_str(),
        ]);
        assert_eq!(stdout(&out), "");
        let ours = std::fs::read_to_string(&out_path).unwrap();
        let theirs = std::fs::read_to_string(golden(&format!("{name}.espflash.csv"))).unwrap();
        assert_eq!(ours, theirs, "{name}");
    }
}

#[test]
fn a_corrupt_binary_fails_with_one_line_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut bin = std::fs::read(golden("default_4mb.bin")).unwrap();
    bin[4] ^= 0x10;
    let path = dir.path().join("corrupt.bin");
    std::fs::write(&path, &bin).unwrap();
    let err = failure(&mqota(&[path.as_os_str()]));
    assert!(err.contains("corrupt.bin"), "{err}");
    assert!(err.contains("MD5"), "{err}");
}

#[test]
fn a_bad_csv_fails_with_the_line_number() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.csv");
    std::fs::write(
        &path,
        "# header\nnvs, data, nvs, , 16K\nfw, app, ota_9000, , 1M\n",
    )
    .unwrap();
    let err = failure(&mqota(&[path.as_os_str()]));
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("subtype"), "{err}");
}

#[test]
fn a_file_that_is_neither_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("noise");
    std::fs::write(&path, [0xFF, 0xFE, 0x00, 0x80]).unwrap();
    let err = failure(&mqota(&[path.as_os_str()]));
    assert!(err.contains("neither"), "{err}");
    let err = failure(&mqota(&[dir.path().join("missing.csv").as_os_str()]));
    assert!(err.contains("missing.csv"), "{err}");
}

#[test]
fn no_output_file_is_written_when_the_input_is_bad() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("bad.csv");
    std::fs::write(
        &input,
        "a, app, factory, 0x10000, 1M\nb, app, ota_0, 0x80000, 1M\n",
    )
    .unwrap();
    let out_path = dir.path().join("out.bin");
    let err = failure(&mqota(&[
        input.as_os_str(),
        "--to-binary".as_ref(),
        out_path.as_os_str(),
    ]));
    assert!(err.contains("overlaps"), "{err}");
    assert!(!out_path.exists());
}

#[test]
fn asking_for_both_conversions_is_refused() {
    let out = mqota(&[
        golden("default_4mb.csv").as_os_str(),
        "--to-csv".as_ref(),
        "a".as_ref(),
        "--to-binary".as_ref(),
        "b".as_ref(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
}

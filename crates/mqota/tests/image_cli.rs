//! `mqota image info` and `mqota image pack` against the vendor tools: the
//! golden images in testdata/images/ were made by espflash and esptool, and
//! each has esptool's `image-info` report beside it; packed images are handed
//! to esptool itself.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn mqota(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mqota"))
        .args(args)
        .output()
        .expect("run mqota")
}

fn images() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/images")
}

/// `mqota image info --json`, checking that it exits with success exactly
/// when the image is `valid`.
fn info_json_expecting(path: &Path, valid: bool) -> Value {
    let out = mqota(&["image", "info", "--json", path.to_str().unwrap()]);
    assert_eq!(
        out.status.success(),
        valid,
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("info --json prints JSON")
}

fn info_json(path: &Path) -> Value {
    info_json_expecting(path, true)
}

/// The value after `key` on the first line of esptool's report that starts
/// with it.
fn field<'a>(report: &'a str, key: &str) -> Option<&'a str> {
    report
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}

fn hex_u64(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()
}

/// (length, load address, file offset) rows of esptool's segment table.
fn esptool_segments(report: &str) -> Vec<(u64, u64, u64)> {
    report
        .lines()
        .skip_while(|l| !l.starts_with("Segments Information"))
        .skip(4)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            (hex_u64(c[1]), hex_u64(c[2]), hex_u64(c[3]))
        })
        .collect()
}

#[test]
fn info_agrees_with_esptool_on_every_golden_image() {
    let mut checked = 0;
    for entry in std::fs::read_dir(images()).unwrap() {
        let bin = entry.unwrap().path();
        let txt = bin.with_extension("txt");
        if bin.extension().is_none_or(|e| e != "bin") || !txt.exists() {
            continue;
        }
        let report = std::fs::read_to_string(&txt).unwrap();
        // Corrupt samples are shown, then mqota exits non-zero.
        let valid = !report.contains("invalid");
        let j = info_json_expecting(&bin, valid);
        let name = bin.display();

        assert_eq!(
            j["size"].as_u64().unwrap(),
            field(&report, "Image size:")
                .unwrap()
                .trim_end_matches(" bytes")
                .parse::<u64>()
                .unwrap(),
            "{name}"
        );
        let entry = field(&report, "Entry point:").unwrap();
        assert_eq!(j["entry"].as_u64().unwrap(), hex_u64(entry), "{name}");
        let chip = field(&report, "Chip ID:").unwrap();
        let (id, chip_name) = chip.split_once(' ').unwrap();
        assert_eq!(
            j["chip_id"].as_u64().unwrap(),
            id.parse::<u64>().unwrap(),
            "{name}"
        );
        // esptool writes "(ESP32-C3)".
        assert_eq!(
            j["chip"].as_str().unwrap(),
            chip_name
                .trim_matches(['(', ')'])
                .replace('-', "")
                .to_lowercase(),
            "{name}"
        );

        let segs: Vec<(u64, u64, u64)> = j["segments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["len"].as_u64().unwrap(),
                    s["load_addr"].as_u64().unwrap(),
                    s["offset"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(segs, esptool_segments(&report), "{name}");

        let (ck, ck_state) = field(&report, "Checksum:")
            .unwrap()
            .split_once(' ')
            .unwrap();
        assert_eq!(j["checksum"].as_u64().unwrap(), hex_u64(ck), "{name}");
        assert_eq!(
            j["checksum_valid"].as_bool().unwrap(),
            ck_state == "(valid)",
            "{name}"
        );

        match field(&report, "Validation hash:") {
            Some(v) => {
                let (digest, state) = v.split_once(' ').unwrap();
                // esptool prints the digest it computed.
                assert_eq!(j["sha256_computed"].as_str().unwrap(), digest, "{name}");
                assert_eq!(
                    j["sha256_valid"].as_bool().unwrap(),
                    state == "(valid)",
                    "{name}"
                );
                assert!(j["sha256"].is_string(), "{name}");
            }
            None => {
                assert!(j["sha256"].is_null(), "{name}");
                assert!(!j["hash_appended"].as_bool().unwrap(), "{name}");
            }
        }

        assert_eq!(
            j["version"],
            field(&report, "App version:").unwrap(),
            "{name}"
        );
        assert_eq!(
            j["project"],
            field(&report, "Project name:").unwrap(),
            "{name}"
        );
        assert_eq!(j["idf_ver"], field(&report, "ESP-IDF:").unwrap(), "{name}");
        assert_eq!(
            j["app_elf_sha256"],
            field(&report, "ELF file SHA256:").unwrap(),
            "{name}"
        );
        assert_eq!(
            j["secure_version"].as_u64().unwrap(),
            field(&report, "Secure version:")
                .unwrap()
                .parse::<u64>()
                .unwrap(),
            "{name}"
        );
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} golden images found");
}

#[test]
fn the_readme_sample_is_a_valid_esp32c3_image() {
    let out = mqota(&[
        "image",
        "info",
        images().join("sample-esp32c3.bin").to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("ESP-IDF app image for esp32c3"), "{text}");
    assert!(text.contains("checksum       0x86 (valid)"), "{text}");
}

fn pack(dir: &Path, chip: &str, version: &str, size: &str) -> PathBuf {
    let out_path = dir.join(format!("{chip}-{version}.bin"));
    let out = mqota(&[
        "image",
        "pack",
        "--chip",
        chip,
        "--version",
        version,
        "--project",
        "packed",
        "--secure-version",
        "3",
        "--size",
        size,
        "-o",
        out_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out_path
}

#[test]
fn packed_images_have_the_exact_size_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let a = pack(dir.path(), "esp32c3", "1.0.0", "64K");
    let b = pack(dir.path(), "esp32c3", "1.0.1", "65536");
    assert_eq!(std::fs::metadata(&a).unwrap().len(), 65536);
    let (ja, jb) = (info_json(&a), info_json(&b));
    assert_eq!(ja["version"], "1.0.0");
    assert_eq!(ja["project"], "packed");
    assert_eq!(ja["secure_version"], 3);
    assert_eq!(ja["chip"], "esp32c3");
    assert_eq!(ja["checksum_valid"], true);
    assert_eq!(ja["sha256_valid"], true);
    assert_ne!(ja["file_sha256"], jb["file_sha256"]);
}

#[test]
fn esptool_accepts_packed_images() {
    if Command::new("esptool").arg("version").output().is_err() {
        eprintln!("!!! SKIPPED esptool_accepts_packed_images: esptool is not on PATH (pip install esptool)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (chip, id) in [("esp32c3", "5"), ("esp32c6", "13")] {
        let img = pack(dir.path(), chip, "4.5.6", "0x3000");
        let out = Command::new("esptool")
            .args(["image-info", img.to_str().unwrap()])
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{report}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            field(&report, "Chip ID:").unwrap().starts_with(id),
            "{report}"
        );
        assert!(
            field(&report, "Checksum:").unwrap().ends_with("(valid)"),
            "{report}"
        );
        assert!(
            field(&report, "Validation hash:")
                .unwrap()
                .ends_with("(valid)"),
            "{report}"
        );
        assert_eq!(field(&report, "App version:"), Some("4.5.6"), "{report}");
        assert_eq!(field(&report, "Secure version:"), Some("3"), "{report}");
        // esptool names the segments by the chip's memory map.
        let mem_types: Vec<&str> = report
            .lines()
            .skip_while(|l| !l.starts_with("Segments Information"))
            .skip(4)
            .take(2)
            .collect();
        assert!(mem_types[0].contains("DROM"), "{report}");
        assert!(mem_types[1].contains("IROM"), "{report}");
    }
}

/// Runs mqota expecting failure; returns its single stderr line.
fn fails(args: &[&str]) -> String {
    let out = mqota(args);
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: "), "{err}");
    err
}

#[test]
fn bad_images_give_one_line_errors_and_fail() {
    let dir = tempfile::tempdir().unwrap();
    let sample = std::fs::read(images().join("sample-esp32c3.bin")).unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p.to_str().unwrap().to_owned()
    };

    let truncated = write("truncated.bin", &sample[..sample.len() - 20]);
    assert!(fails(&["image", "info", &truncated]).contains("truncated: 1132 of 1152 bytes"));

    let garbage = write("garbage.bin", b"hello world, not an image");
    assert!(fails(&["image", "info", &garbage]).contains("not an app image"));

    let empty = write("empty.bin", b"");
    assert!(fails(&["image", "info", &empty]).contains("truncated"));

    let mut long = sample.clone();
    long.extend_from_slice(&[0xFF; 16]);
    let long = write("long.bin", &long);
    assert!(fails(&["image", "info", &long]).contains("after the end of the image"));

    let missing = dir.path().join("missing.bin");
    assert!(fails(&["image", "info", missing.to_str().unwrap()]).contains("missing.bin"));
}

#[test]
fn a_corrupt_image_is_shown_then_fails() {
    let dir = tempfile::tempdir().unwrap();
    let mut img = std::fs::read(images().join("sample-esp32c3.bin")).unwrap();
    img[100] ^= 0x10; // inside the app descriptor's version field padding
    let p = dir.path().join("corrupt.bin");
    std::fs::write(&p, &img).unwrap();
    let out = mqota(&["image", "info", "--json", p.to_str().unwrap()]);
    assert!(!out.status.success());
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["checksum_valid"], false);
    assert_eq!(j["sha256_valid"], false);
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("checksum mismatch"), "{err}");
}

#[test]
fn unusable_pack_arguments_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.bin");
    let out = out.to_str().unwrap();
    let base = |chip: &'static str, size: &'static str| {
        [
            "image",
            "pack",
            "--chip",
            chip,
            "--version",
            "1",
            "--project",
            "p",
            "--size",
            size,
            "-o",
        ]
    };
    let run = |chip, size| {
        let mut args = base(chip, size).to_vec();
        args.push(out);
        fails(&args)
    };
    assert!(run("esp32c3", "100").contains("at least"));
    assert!(run("esp32c3", "4100").contains("multiple of 16"));
    assert!(run("esp32c3", "32M").contains("at most"));
    assert!(!Path::new(out).exists());
    // Argument errors are clap's: a usage hint follows the error line.
    let mut args = base("esp32c4", "4096").to_vec();
    args.push(out);
    let res = mqota(&args);
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("unknown chip"));
}

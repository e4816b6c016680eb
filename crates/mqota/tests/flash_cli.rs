//! `mqota flash inspect` on flash dumps the tests build: partition table,
//! otadata and images made with the core's builders, laid out as on a device.

mod cli_support;

use cli_support::{failure, stdout};
use std::path::Path;
use std::process::{Command, Output};

use mqota_core::image::{Chip, ImageBuilder};
use mqota_core::otadata::{self, OtaState};
use mqota_core::partition::{PartitionTable, DEFAULT_4MB_CSV, TABLE_OFFSET};
use mqota_flash_sim::SimFlash;

const OTADATA: u32 = 0xd000;

fn mqota(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mqota"))
        .args(["flash", "inspect"])
        .args(args)
        .output()
        .expect("run mqota")
}

/// A 4 MiB device after one OTA: ota_0 runs 1.0.0 (confirmed), ota_1 holds
/// 1.1.0 and is selected but not yet booted (state NEW).
fn device_after_an_update() -> SimFlash {
    let table = PartitionTable::from_csv(DEFAULT_4MB_CSV).unwrap();
    let mut flash = SimFlash::new(4 << 20);
    flash.write_flash(TABLE_OFFSET, &table.to_bytes()).unwrap();
    for (label, version) in [("ota_0", "1.0.0"), ("ota_1", "1.1.0")] {
        let image = ImageBuilder::new(Chip::Esp32c3)
            .project("thermostat")
            .version(version)
            .build()
            .unwrap();
        flash
            .write_flash(table.find(label).unwrap().offset, &image)
            .unwrap();
    }
    otadata::set_boot_slot(&mut flash, OTADATA, 0, 2, OtaState::Valid).unwrap();
    otadata::set_boot_slot(&mut flash, OTADATA, 1, 2, OtaState::New).unwrap();
    flash
}

fn save(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn inspect_json(path: &Path) -> serde_json::Value {
    let out = mqota(&[path.as_os_str(), "--json".as_ref()]);
    serde_json::from_str(&stdout(&out)).unwrap()
}

#[test]
fn inspect_reports_table_otadata_images_and_both_bootloaders() {
    let dir = tempfile::tempdir().unwrap();
    let path = save(dir.path(), "flash.bin", &device_after_an_update().data());
    let r = inspect_json(&path);

    let labels: Vec<_> = r["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["label"].as_str().unwrap())
        .collect();
    assert_eq!(
        labels,
        ["nvs", "otadata", "phy_init", "ota_0", "ota_1", "log", "mqota"]
    );

    let e = &r["otadata"]["entries"];
    assert_eq!(e[0]["seq"], 1);
    assert_eq!(e[0]["state"], "valid");
    assert_eq!(e[0]["check"], "valid");
    assert_eq!(e[1]["seq"], 2);
    assert_eq!(e[1]["state"], "new");
    assert_eq!(e[1]["crc_ok"], true);
    assert_eq!(r["otadata"]["active"], 1);
    assert_eq!(r["otadata"]["selected_slot"], 1);

    let apps = r["apps"].as_array().unwrap();
    assert_eq!(apps[0]["label"], "ota_0");
    assert_eq!(apps[0]["image"]["valid"], true);
    assert_eq!(apps[0]["image"]["chip"], "esp32c3");
    assert_eq!(apps[0]["image"]["project"], "thermostat");
    assert_eq!(apps[0]["image"]["version"], "1.0.0");
    assert_eq!(apps[1]["image"]["version"], "1.1.0");

    let stock = &r["boot"]["stock"];
    assert_eq!(stock["booted"], "ota_1");
    assert_eq!(stock["version"], "1.1.0");
    assert_eq!(stock["otadata_writes"].as_array().unwrap().len(), 0);
    let rollback = &r["boot"]["rollback"];
    assert_eq!(rollback["booted"], "ota_1");
    assert_eq!(
        rollback["otadata_writes"][0]["reason"],
        "new_to_pending_verify"
    );
    assert_eq!(rollback["next_boot_if_unconfirmed"]["booted"], "ota_0");
    assert_eq!(rollback["next_boot_if_unconfirmed"]["version"], "1.0.0");
}

#[test]
fn inspect_never_changes_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = device_after_an_update().into_data();
    let path = save(dir.path(), "flash.bin", &bytes);
    stdout(&mqota(&[path.as_os_str()]));
    inspect_json(&path);
    assert!(std::fs::read(&path).unwrap() == bytes, "file changed");
}

#[test]
fn the_text_form_names_what_boots() {
    let dir = tempfile::tempdir().unwrap();
    let path = save(dir.path(), "flash.bin", &device_after_an_update().data());
    let out = stdout(&mqota(&[path.as_os_str()]));
    assert!(
        out.contains("stock     boots ota_1 at 0x1f0000 (version 1.1.0)"),
        "{out}"
    );
    assert!(out.contains("rollback  boots ota_1"), "{out}");
    assert!(
        out.contains("then      boots ota_0 at 0x10000 (version 1.0.0)"),
        "{out}"
    );
    assert!(out.contains("active entry: [1], selects slot 1"), "{out}");
    assert!(out.contains("valid  esp32c3 thermostat 1.1.0"), "{out}");
}

#[test]
fn a_corrupt_entry_and_a_corrupt_image_are_reported() {
    let mut flash = device_after_an_update();
    // Break the CRC of entry 1 and one byte of the ota_0 image.
    flash.raw_mut()[(OTADATA + 0x1000 + 28) as usize] ^= 0xFF;
    flash.raw_mut()[0x10000 + 300] ^= 0x01;
    let dir = tempfile::tempdir().unwrap();
    let path = save(dir.path(), "flash.bin", &flash.data());
    let r = inspect_json(&path);
    assert_eq!(r["otadata"]["entries"][1]["check"], "bad_crc");
    assert_eq!(r["otadata"]["entries"][1]["crc_ok"], false);
    assert_eq!(r["otadata"]["active"], 0);
    assert_eq!(r["apps"][0]["image"]["valid"], false);
    assert!(r["apps"][0]["image"]["error"]
        .as_str()
        .unwrap()
        .contains("checksum"));
    // Entry 0 selects ota_0, whose image is bad: the bootloader falls back to ota_1.
    let stock = &r["boot"]["stock"];
    assert_eq!(stock["booted"], "ota_1");
    assert_eq!(stock["rejected"][0]["partition"], "ota_0");
}

#[test]
fn an_empty_slot_is_shown_as_empty_and_a_wrong_chip_as_not_bootable() {
    let table = PartitionTable::from_csv(DEFAULT_4MB_CSV).unwrap();
    let mut flash = SimFlash::new(4 << 20);
    flash.write_flash(TABLE_OFFSET, &table.to_bytes()).unwrap();
    let image = ImageBuilder::new(Chip::Esp32c6).build().unwrap();
    flash.write_flash(0x10000, &image).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = save(dir.path(), "flash.bin", &flash.data());

    let r = inspect_json(&path);
    assert_eq!(r["apps"][1]["image"]["empty"], true);
    assert_eq!(r["boot"]["stock"]["booted"], "ota_0");
    // Blank otadata without factory: the bootloader would write entry 0.
    assert_eq!(
        r["boot"]["stock"]["otadata_writes"][0]["reason"],
        "initial_sequence"
    );

    let out = mqota(&[
        path.as_os_str(),
        "--json".as_ref(),
        "--chip".as_ref(),
        "esp32c3".as_ref(),
    ]);
    let r: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(r["apps"][0]["image"]["valid"], false);
    assert_eq!(r["boot"]["stock"]["bricked"], true);
    assert!(r["boot"]["stock"]["booted"].is_null());
}

#[test]
fn a_missing_file_is_a_one_line_error() {
    let err = failure(&mqota(&["/nonexistent/flash.bin".as_ref()]));
    assert!(err.contains("reading /nonexistent/flash.bin"), "{err}");
}

#[test]
fn a_file_too_short_for_a_partition_table_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = save(dir.path(), "short.bin", &[0xFF; 100]);
    let err = failure(&mqota(&[path.as_os_str()]));
    assert!(err.contains("too short"), "{err}");
}

#[test]
fn a_dump_without_a_partition_table_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = save(dir.path(), "blank.bin", &vec![0xFF; 64 * 1024]);
    let err = failure(&mqota(&[path.as_os_str()]));
    assert!(err.contains("no valid partition table at 0x8000"), "{err}");
}

#[test]
fn a_truncated_dump_reports_what_it_holds() {
    // Only the first 1 MiB: ota_1 lies beyond the end.
    let flash = device_after_an_update();
    let dir = tempfile::tempdir().unwrap();
    let path = save(dir.path(), "part.bin", &flash.data()[..1 << 20]);
    let r = inspect_json(&path);
    assert_eq!(r["size"], 1 << 20);
    // The end of the last partition, the trust state.
    assert_eq!(r["padded_to"], 0x3da000);
    assert_eq!(r["apps"][0]["image"]["valid"], true);
    assert_eq!(r["apps"][1]["image"]["empty"], true);
    assert_eq!(r["boot"]["stock"]["booted"], "ota_0");
}

#[test]
fn inspect_shows_the_journal_of_an_update_the_engine_made_and_its_trial_marks() {
    use mqota_core::bootguard;
    use mqota_core::engine::{Action, Engine, EngineConfig, Event, Response};
    use mqota_core::layout::Layout;
    use mqota_core::protocol::{Command, Job};

    let table = PartitionTable::from_csv(DEFAULT_4MB_CSV).unwrap();
    let mut flash = SimFlash::new(4 << 20);
    flash.write_flash(TABLE_OFFSET, &table.to_bytes()).unwrap();
    let old = ImageBuilder::new(Chip::Esp32c3)
        .version("1.0.0")
        .build()
        .unwrap();
    flash
        .write_flash(table.find("ota_0").unwrap().offset, &old)
        .unwrap();
    let new = ImageBuilder::new(Chip::Esp32c3)
        .version("1.1.0")
        .size(40_960)
        .build()
        .unwrap();
    let layout = Layout::from_table(&table, 0).unwrap();
    let mut engine = Engine::new(
        EngineConfig::new("d", Chip::Esp32c3, "1.0.0"),
        layout.clone(),
    );
    let job = Job {
        url: "http://fw.example/app.bin".try_into().unwrap(),
        version: Some("1.1.0".try_into().unwrap()),
        sha256: None,
        size: None,
        job: Some("rollout-7".try_into().unwrap()),
        timeout_s: None,
        force: false,
        allow_downgrade: false,
        allow_other_project: false,
    };
    engine.handle(&mut flash, 0, Event::Command(Command::Start(job)));
    let head = Response {
        status: 200,
        content_length: Some(new.len() as u32),
        range_start: None,
    };
    engine.handle(&mut flash, 0, Event::Response(head));
    engine.handle(&mut flash, 0, Event::Body(&new));
    let actions = engine.handle(&mut flash, 0, Event::BodyEnd);
    assert!(actions.iter().any(|a| matches!(a, Action::Reboot)));
    // The new image's first boot: the guard starts its trial.
    let mut trial = layout.clone();
    trial.running = 1;
    assert_eq!(
        bootguard::on_boot(&mut flash, &trial).unwrap().verdict,
        bootguard::Verdict::Trial
    );

    let dir = tempfile::tempdir().unwrap();
    let path = save(dir.path(), "flash.bin", &flash.data());
    let r = inspect_json(&path);
    let j = &r["apps"][1]["journal"];
    assert_eq!(j["job"], "rollout-7");
    assert_eq!(j["version"], "1.1.0");
    assert_eq!(j["url"], "http://fw.example/app.bin");
    assert_eq!(j["pages_written"], 10);
    assert_eq!(
        j["flags"],
        serde_json::json!(["activated", "trial_started"])
    );
    assert_eq!(
        r["apps"][0]["journal"]["job"],
        serde_json::Value::Null,
        "ota_0 was flashed, not updated"
    );
    let text = stdout(&mqota(&[path.as_os_str()]));
    assert!(text.contains("journal: job rollout-7 (1.1.0)"), "{text}");
}

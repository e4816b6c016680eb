//! `mqota flash inspect FLASH_IMAGE [--json]`: what a whole-flash dump holds
//! (partition table, both otadata entries, every app image) and which app the
//! ESP-IDF bootloader would boot from it, stock and with rollback.
//!
//! The bootloader models write otadata while booting (rollback marks entries),
//! so they run on an in-memory copy: inspecting never changes the file.

use std::path::PathBuf;

use anyhow::Context as _;
use mqota_core::image::{validate_flash_for, Chip, ImageError};
use mqota_core::journal::{Flag, Journal, RollbackReason};
use mqota_core::otadata::Otadata;
use mqota_core::partition::{PartitionTable, SubType, TABLE_OFFSET};
use mqota_flash_sim::bootloader::{BootOutcome, WriteReason};
use mqota_flash_sim::{Booted, Bootloader, SimFlash};
use serde_json::{json, Value};

/// Inspect whole flash dumps.
#[derive(clap::Subcommand)]
pub enum FlashCommand {
    /// Show the partition table, otadata, app images and which app boots.
    Inspect(InspectArgs),
}

/// Arguments of `mqota flash inspect`.
#[derive(clap::Args)]
pub struct InspectArgs {
    /// A raw dump of the whole flash, from offset 0 (`esptool read_flash 0 ALL`).
    flash_image: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// The chip the device is: images for other chips are reported as not bootable.
    #[arg(long)]
    chip: Option<Chip>,
}

impl FlashCommand {
    /// Run the subcommand.
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            FlashCommand::Inspect(args) => args.run(),
        }
    }
}

impl InspectArgs {
    fn run(self) -> anyhow::Result<()> {
        let bytes = std::fs::read(&self.flash_image)
            .with_context(|| format!("reading {}", self.flash_image.display()))?;
        let report =
            inspect(bytes, self.chip).with_context(|| format!("{}", self.flash_image.display()))?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", render(&report));
        }
        Ok(())
    }
}

/// Everything `inspect` reports, as JSON (the text form is rendered from it).
fn inspect(bytes: Vec<u8>, chip: Option<Chip>) -> anyhow::Result<Value> {
    let size = bytes.len();
    if size <= TABLE_OFFSET as usize {
        anyhow::bail!(
            "{size} bytes is too short for a flash dump: the partition table is at {TABLE_OFFSET:#x}"
        );
    }
    let mut flash = SimFlash::from_bytes(bytes);
    let table = PartitionTable::read_from(&mut flash, TABLE_OFFSET)
        .map_err(|e| anyhow::anyhow!("no valid partition table at {TABLE_OFFSET:#x}: {e}"))?;
    // A dump shorter than the table's extent (a partial read_flash): what it
    // does not hold reads as erased, so the models see empty slots there
    // rather than failing on every partition that crosses the end.
    let extent = table
        .partitions()
        .iter()
        .map(|p| p.end())
        .max()
        .unwrap_or(0);
    let padded_to = if extent > size as u64 {
        let mut bytes = flash.into_data();
        bytes.resize(extent as usize, 0xFF);
        flash = SimFlash::from_bytes(bytes);
        Some(extent)
    } else {
        None
    };

    let partitions: Vec<Value> = table
        .partitions()
        .iter()
        .map(|p| {
            json!({
                "label": p.label.as_str(),
                "type": p.ty.to_string(),
                "subtype": p.subtype_name().map(str::to_owned)
                    .unwrap_or_else(|| format!("{:#04x}", p.subtype.0)),
                "offset": p.offset,
                "size": p.size,
            })
        })
        .collect();

    let slot_count = table.ota_slots().count();
    let otadata = match table.otadata() {
        None => Value::Null,
        Some(p) => {
            let o = Otadata::read(&mut flash, p.offset)
                .map_err(|e| anyhow::anyhow!("reading otadata: {e}"))?;
            let entries: Vec<Value> = o
                .entries
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    json!({
                        "index": i,
                        "seq": e.seq,
                        "state": e.state().name(),
                        "state_raw": e.state,
                        "crc": e.crc,
                        "crc_ok": e.crc_ok(),
                        "check": e.check().name(),
                        "slot": if e.is_valid() { e.slot(slot_count) } else { None },
                    })
                })
                .collect();
            json!({
                "offset": p.offset,
                "entries": entries,
                "active": o.active(),
                "selected_slot": o.selected_slot(slot_count),
            })
        }
    };

    let apps: Vec<Value> = table
        .partitions()
        .iter()
        .filter(|p| p.is_app())
        .map(|p| {
            let image = {
                match validate_flash_for(&mut flash, p.offset, p.size, chip) {
                    Ok(info) => json!({
                        "valid": true,
                        "chip": info.chip.name(),
                        "project": info.app.project_name.as_str(),
                        "version": info.app.version.as_str(),
                        "idf_ver": info.app.idf_ver.as_str(),
                        "len": info.len,
                        "sha256": hex::encode(info.file_sha256),
                    }),
                    Err(ImageError::BadMagic { found: 0xFF }) => {
                        json!({ "valid": false, "empty": true, "error": "empty (erased)" })
                    }
                    Err(e) => json!({ "valid": false, "error": e.to_string() }),
                }
            };
            let journal = match p.ota_slot() {
                Some(_) => journal_report(&mut flash, Journal::for_slot(p.offset, p.size)),
                None => Value::Null,
            };
            json!({
                "label": p.label.as_str(),
                "offset": p.offset,
                "size": p.size,
                "slot": p.ota_slot(),
                "image": image,
                "journal": journal,
            })
        })
        .collect();

    let with_chip = |b: Bootloader| match chip {
        Some(c) => b.for_chip(c),
        None => b,
    };
    // Each model gets its own copy: booting writes otadata.
    let mut stock_copy = flash.clone();
    let stock = boot_report(&table, &mut stock_copy, with_chip(Bootloader::stock()));
    let mut rollback_copy = flash.clone();
    let mut rollback = boot_report(
        &table,
        &mut rollback_copy,
        with_chip(Bootloader::rollback()),
    );
    if rollback.get("error").is_none() {
        // What the next reset does if the app that just booted never confirms.
        rollback["next_boot_if_unconfirmed"] = boot_report(
            &table,
            &mut rollback_copy,
            with_chip(Bootloader::rollback()),
        );
    }

    Ok(json!({
        "size": size,
        "padded_to": padded_to,
        "partitions": partitions,
        "otadata": otadata,
        "apps": apps,
        "boot": { "stock": stock, "rollback": rollback },
    }))
}

fn target_label(table: &PartitionTable, target: Booted) -> Option<String> {
    let p = match target {
        Booted::Ota(n) => table.ota_slot(u8::try_from(n).ok()?),
        Booted::Factory => table.factory(),
        Booted::Test => {
            table.find_by_type(mqota_core::partition::PartitionType::APP, SubType::TEST)
        }
        Booted::Nothing => None,
    };
    p.map(|p| p.label.as_str().to_owned())
}

fn boot_report(table: &PartitionTable, flash: &mut SimFlash, bl: Bootloader) -> Value {
    let o: BootOutcome = match bl.boot(flash) {
        Ok(o) => o,
        Err(e) => return json!({ "error": e.to_string() }),
    };
    let writes: Vec<Value> = o
        .otadata_writes
        .iter()
        .map(|w| {
            json!({
                "entry": w.entry,
                "seq": w.value.seq,
                "state": w.value.state().name(),
                "reason": match w.reason {
                    WriteReason::PendingVerifyAborted => "pending_verify_aborted",
                    WriteReason::NewToPendingVerify => "new_to_pending_verify",
                    WriteReason::InitialSequence => "initial_sequence",
                },
            })
        })
        .collect();
    let rejected: Vec<Value> = o
        .rejected
        .iter()
        .map(|r| {
            json!({
                "partition": target_label(table, r.target),
                "offset": r.offset,
                "error": r.error.to_string(),
            })
        })
        .collect();
    json!({
        "booted": target_label(table, o.booted),
        "slot": o.slot,
        "offset": o.partition_offset,
        "version": o.image.as_ref().map(|i| i.app.version.as_str().to_owned()),
        "bricked": o.is_bricked(),
        "otadata_writes": writes,
        "rejected": rejected,
    })
}

/// mqota's journal in the last sector of an OTA slot: the job that wrote
/// the slot, how far its download got, and what became of it.
fn journal_report(flash: &mut SimFlash, journal: Journal) -> Value {
    let job = match journal.job(flash) {
        Ok(Some(job)) => job,
        Ok(None) => return json!({ "job": null }),
        Err(e) => return json!({ "error": format!("{e:?}") }),
    };
    let flags: Vec<&str> = [
        (Flag::Activated, "activated"),
        (Flag::TrialStarted, "trial_started"),
        (Flag::Confirmed, "confirmed"),
        (Flag::RolledBack, "rolled_back"),
        (Flag::Reported, "reported"),
        (Flag::Abandoned, "abandoned"),
    ]
    .into_iter()
    .filter(|(f, _)| journal.has(flash, *f).unwrap_or(false))
    .map(|(_, name)| name)
    .collect();
    let reason = journal
        .rollback_reason(flash)
        .ok()
        .flatten()
        .map(|r| match r {
            RollbackReason::HealthCheckFailed => "health_check_failed",
            RollbackReason::BootFailed => "boot_failed",
            RollbackReason::Requested => "requested",
        });
    json!({
        "job": job.job.as_deref(),
        "url": job.url.as_str(),
        "version": job.version.as_deref(),
        "size": job.size,
        "sha256": job.sha256.map(hex::encode),
        "flags": flags,
        "rollback_reason": reason,
        "pages_written": journal.pages_done(flash).unwrap_or(0),
    })
}

fn hex32(v: &Value) -> String {
    v.as_u64().map(|n| format!("{n:#x}")).unwrap_or_default()
}

fn render_boot(out: &mut String, name: &str, b: &Value) {
    use std::fmt::Write as _;
    if let Some(e) = b["error"].as_str() {
        let _ = writeln!(out, "  {name:<9} does not boot: {e}");
        return;
    }
    match b["booted"].as_str() {
        Some(label) => {
            let _ = write!(out, "  {name:<9} boots {label} at {}", hex32(&b["offset"]));
            if let Some(v) = b["version"].as_str() {
                let _ = write!(out, " (version {v})");
            }
            out.push('\n');
        }
        None => {
            let _ = writeln!(
                out,
                "  {name:<9} finds nothing bootable: the device is bricked"
            );
        }
    }
    for r in b["rejected"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "            skipped {}: {}",
            r["partition"].as_str().unwrap_or("?"),
            r["error"].as_str().unwrap_or("?")
        );
    }
    for w in b["otadata_writes"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "            writes otadata[{}]: seq {} state {} ({})",
            w["entry"],
            w["seq"],
            w["state"].as_str().unwrap_or("?"),
            w["reason"].as_str().unwrap_or("?")
        );
    }
}

/// The text form of the report.
fn render(r: &Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "Flash: {} bytes", r["size"]);
    if let Some(p) = r["padded_to"].as_u64() {
        let _ = writeln!(
            out,
            "  shorter than its partition table: read as erased up to {p:#x}"
        );
    }

    let _ = writeln!(out, "\nPartitions:");
    let _ = writeln!(
        out,
        "  {:<16} {:<5} {:<9} {:>10} {:>10}",
        "LABEL", "TYPE", "SUBTYPE", "OFFSET", "SIZE"
    );
    for p in r["partitions"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {:<16} {:<5} {:<9} {:>10} {:>10}",
            p["label"].as_str().unwrap_or(""),
            p["type"].as_str().unwrap_or(""),
            p["subtype"].as_str().unwrap_or(""),
            hex32(&p["offset"]),
            hex32(&p["size"]),
        );
    }

    let _ = writeln!(out, "\nOtadata:");
    let od = &r["otadata"];
    if od.is_null() {
        let _ = writeln!(out, "  no otadata partition");
    } else if let Some(e) = od["error"].as_str() {
        let _ = writeln!(out, "  at {}: {e}", hex32(&od["offset"]));
    } else {
        for e in od["entries"].as_array().into_iter().flatten() {
            let _ = write!(
                out,
                "  [{}] seq {:>10}  state {:<14}  crc {:#010x} {}  {}",
                e["index"],
                hex32(&e["seq"]),
                e["state"].as_str().unwrap_or(""),
                e["crc"].as_u64().unwrap_or(0),
                if e["crc_ok"].as_bool() == Some(true) {
                    "ok "
                } else {
                    "BAD"
                },
                e["check"].as_str().unwrap_or(""),
            );
            if let Some(s) = e["slot"].as_u64() {
                let _ = write!(out, " -> ota_{s}");
            }
            out.push('\n');
        }
        match od["active"].as_u64() {
            Some(a) => {
                let _ = writeln!(
                    out,
                    "  active entry: [{a}], selects slot {}",
                    od["selected_slot"]
                );
            }
            None => {
                let _ = writeln!(out, "  no valid entry: factory app, else ota_0");
            }
        }
    }

    let _ = writeln!(out, "\nApps:");
    for a in r["apps"].as_array().into_iter().flatten() {
        let img = &a["image"];
        let _ = write!(
            out,
            "  {:<16} {:>10}  ",
            a["label"].as_str().unwrap_or(""),
            hex32(&a["offset"])
        );
        if img["valid"].as_bool() == Some(true) {
            let _ = writeln!(
                out,
                "valid  {} {} {} ({} bytes, sha256 {})",
                img["chip"].as_str().unwrap_or(""),
                img["project"].as_str().unwrap_or(""),
                img["version"].as_str().unwrap_or(""),
                img["len"],
                img["sha256"].as_str().map_or("", |s| &s[..s.len().min(16)]),
            );
        } else {
            let _ = writeln!(out, "{}", img["error"].as_str().unwrap_or("invalid"));
        }
        let j = &a["journal"];
        if let Some(url) = j["url"].as_str() {
            let flags: Vec<&str> = j["flags"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let _ = write!(
                out,
                "  {:<16} journal: job {} ({}) from {url}, {} pages written",
                "",
                j["job"].as_str().unwrap_or("-"),
                j["version"].as_str().unwrap_or("no version"),
                j["pages_written"],
            );
            if !flags.is_empty() {
                let _ = write!(out, "; {}", flags.join(", "));
            }
            if let Some(r) = j["rollback_reason"].as_str() {
                let _ = write!(out, " ({r})");
            }
            out.push('\n');
        }
    }

    let _ = writeln!(out, "\nBoot:");
    render_boot(&mut out, "stock", &r["boot"]["stock"]);
    render_boot(&mut out, "rollback", &r["boot"]["rollback"]);
    let next = &r["boot"]["rollback"]["next_boot_if_unconfirmed"];
    if !next.is_null() {
        let _ = writeln!(out, "  if that app never confirms itself, the next boot:");
        render_boot(&mut out, "then", next);
    }
    out
}

//! `cargo xtask firmware` and `cargo xtask flash`: build the esp-hal firmware
//! in `firmware/` for one chip, turn it into an ESP-IDF app image, check the
//! image with the vendor tools and against the OTA slot, and report its size.
//!
//! Arguments are read with clap, the firmware's manifest with toml and the
//! ELF section table with object: the field's parsers, not hand-written ones.

use anyhow::{bail, ensure, Context, Result};
use mqota_core::journal::JOURNAL_SIZE;
use mqota_core::layout::Slot;
use mqota_core::partition::PartitionTable;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Name of the firmware binary, its app descriptor's project name, and the image file stem.
const PROJECT: &str = "mqota-firmware";

/// A chip the firmware can be built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chip {
    Esp32c3,
    Esp32c6,
}

impl Chip {
    fn parse(name: &str) -> Result<Chip> {
        match name {
            "esp32c3" => Ok(Chip::Esp32c3),
            "esp32c6" => Ok(Chip::Esp32c6),
            "esp32" | "esp32s3" => bail!(
                "{name} is an Xtensa chip: it needs the espup toolchain, which cannot be \
                 installed here; see firmware/README.md"
            ),
            other => bail!("unknown chip `{other}` (expected esp32c3 or esp32c6)"),
        }
    }

    /// Also the cargo feature and espflash/esptool's chip name.
    fn name(self) -> &'static str {
        match self {
            Chip::Esp32c3 => "esp32c3",
            Chip::Esp32c6 => "esp32c6",
        }
    }

    fn target(self) -> &'static str {
        match self {
            Chip::Esp32c3 => "riscv32imc-unknown-none-elf",
            Chip::Esp32c6 => "riscv32imac-unknown-none-elf",
        }
    }
}

/// Command-line options shared by both tasks.
#[derive(Debug, PartialEq, Eq)]
struct Options {
    chip: Chip,
    port: Option<String>,
    monitor: bool,
}

/// What clap reads; [`parse_options`] turns it into [`Options`].
#[derive(clap::Parser)]
#[command(name = "cargo xtask firmware|flash", no_binary_name = true)]
struct Args {
    /// The chip to build for: esp32c3 or esp32c6.
    #[arg(long)]
    chip: String,
    /// Serial port of the board (`flash` only).
    #[arg(long)]
    port: Option<String>,
    /// Open the serial monitor after flashing (`flash` only).
    #[arg(long)]
    monitor: bool,
}

fn parse_options(args: &[String]) -> Result<Options> {
    use clap::Parser as _;
    let a = Args::try_parse_from(args).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Options {
        chip: Chip::parse(&a.chip)?,
        port: a.port,
        monitor: a.monitor,
    })
}

/// Used for `MQOTA_WIFI_SSID` when it is unset: without any SSID the
/// firmware stops before WiFi and the compiler drops the whole network and
/// mqota, so the image and size report would describe nothing real.
const PLACEHOLDER_SSID: &str = "mqota-unconfigured";

/// Used for `MQOTA_TLS_CA` when it is unset, for the same reason: without a
/// CA the firmware never opens TLS and the compiler drops it. A self-signed
/// P-256 CA whose private key was thrown away when it was made, so an image
/// built with it trusts no server at all.
const PLACEHOLDER_CA: &str = "-----BEGIN CERTIFICATE-----\n\
MIIBszCCAVmgAwIBAgIUb6Vixd8fUiwNSS/qDO3/SLl3huswCgYIKoZIzj0EAwIw\n\
LzEtMCsGA1UEAwwkbXFvdGEgcGxhY2Vob2xkZXIgQ0EgKGtleSBkaXNjYXJkZWQp\n\
MB4XDTI2MTIwNzAzMzUzNFoXDTQ2MTIwMjAzMzUzNFowLzEtMCsGA1UEAwwkbXFv\n\
dGEgcGxhY2Vob2xkZXIgQ0EgKGtleSBkaXNjYXJkZWQpMFkwEwYHKoZIzj0CAQYI\n\
KoZIzj0DAQcDQgAEr2CTvHojrHpC3zktTxXLgOBkVLkIeaTfiUNfvcVhidMLhovx\n\
DWnodTdhbZI8uwzjrTWrRxq9H2PPt+a16xeCEKNTMFEwHQYDVR0OBBYEFF9TQsBF\n\
GreiRfQprqBbYZ8AwdgvMB8GA1UdIwQYMBaAFF9TQsBFGreiRfQprqBbYZ8Awdgv\n\
MA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSAAwRQIgXzCdv9czvrMBYpoe\n\
Mkcvag4Ehht5ojxsqyCcDljQyHICIQCMuTjJdlbfi2KHZxdPGrfi+sr+lGcpM6N6\n\
cV2Z29GjaQ==\n\
-----END CERTIFICATE-----\n\
";

/// `cargo xtask firmware --chip CHIP`: release build, clippy, app image, checks, size report.
pub fn firmware(args: &[String]) -> Result<()> {
    let opts = parse_options(args)?;
    ensure!(
        opts.port.is_none() && !opts.monitor,
        "--port and --monitor belong to `cargo xtask flash`"
    );
    let chip = opts.chip;
    let root = root();
    let fw = root.join("firmware");
    let env = wifi_env(false)?;
    let elf = build(chip, &[], &env)?;
    run_env(
        &fw,
        "cargo",
        &cargo_args(
            "clippy",
            chip,
            &[],
            &["--lib", "--bins", "--examples", "--", "-D", "warnings"],
        ),
        &env,
    )?;
    // The library face must keep working for applications that embed mqota.
    run_env(
        &fw,
        "cargo",
        &cargo_args("build", chip, &[], &["--examples"]),
        &env,
    )?;

    let espflash = espflash()?;
    let out_dir = root.join("target/firmware").join(chip.name());
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let image = out_dir.join(format!("{PROJECT}.bin"));
    let partitions = fw.join("partitions.csv");
    save_image(&espflash, chip, &elf, &image)?;

    eprintln!(
        "$ esptool --chip {} image-info {}",
        chip.name(),
        image.display()
    );
    let info = Command::new("esptool")
        .args(["--chip", chip.name(), "image-info"])
        .arg(&image)
        .output()
        .context("running esptool (install it with `pip install esptool`)")?;
    ensure!(
        info.status.success(),
        "esptool image-info failed: {}",
        String::from_utf8_lossy(&info.stderr)
    );
    let info = String::from_utf8(info.stdout).context("esptool printed non-UTF-8")?;
    let version = crate_version(&std::fs::read_to_string(fw.join("Cargo.toml"))?)?;
    check_image_info(&info, PROJECT, &version)?;

    let image_bytes = std::fs::metadata(&image)?.len();
    let slot = smallest_ota_slot(&std::fs::read_to_string(&partitions)?)?;
    check_image_fits(image_bytes, &slot)?;
    let capacity = u64::from(slot.max_image_len());
    let sizes =
        elf_sizes(&std::fs::read(&elf).with_context(|| format!("reading {}", elf.display()))?)?;
    // Kept next to the image: the baseline build below overwrites cargo's copy.
    std::fs::copy(&elf, out_dir.join(format!("{PROJECT}.elf")))?;

    // The same firmware without mqota, to split the size between mqota and
    // the WiFi/network stack. Cargo keeps both feature sets' artifacts, so
    // alternating costs a link, not a rebuild.
    let base_elf = build(chip, &["size-baseline"], &env)?;
    let base_image = out_dir.join("size-baseline.bin");
    save_image(&espflash, chip, &base_elf, &base_image)?;
    let base = Footprint {
        image: std::fs::metadata(&base_image)?.len(),
        sizes: elf_sizes(&std::fs::read(&base_elf)?)?,
    };

    let report = size_report(chip, image_bytes, &slot, &sizes, &base);
    let report_path = out_dir.join("size-report.json");
    std::fs::write(&report_path, &report)?;
    println!("{} image OK: {}", chip.name(), image.display());
    println!(
        "  image   {image_bytes:>9} bytes ({:.1}% of the {capacity} bytes an OTA slot takes)",
        percent(image_bytes, capacity)
    );
    println!("            {:>9} {:>9} {:>9}", "total", "network", "mqota");
    let row = |name: &str, total: u64, base: u64| {
        println!(
            "  {name:<8}{total:>9} {base:>9} {:>9}",
            total as i64 - base as i64
        )
    };
    row("image", image_bytes, base.image);
    row(".text", sizes.text, base.sizes.text);
    row(".rodata", sizes.rodata, base.sizes.rodata);
    row(".data", sizes.data, base.sizes.data);
    row(".bss", sizes.bss, base.sizes.bss);
    println!("  (network: the same firmware built with `size-baseline`, WiFi and IP stack only)");
    println!("  report  {}", report_path.display());
    Ok(())
}

/// The environment for building: the caller's WiFi settings, or a
/// placeholder SSID for a build check (refused when the image is flashed);
/// the caller's fleet CA, or for a build check a placeholder CA.
fn wifi_env(for_flash: bool) -> Result<Vec<(&'static str, String)>> {
    let mut env = Vec::new();
    if std::env::var("MQOTA_TLS_CA").unwrap_or_default().is_empty() && !for_flash {
        eprintln!(
            "note: MQOTA_TLS_CA is not set; building with a placeholder CA that trusts no \
             server (fine for checks and sizes; set it to the fleet CA for an image to flash)"
        );
        env.push(("MQOTA_TLS_CA", PLACEHOLDER_CA.to_string()));
    }
    let ssid = std::env::var("MQOTA_WIFI_SSID").unwrap_or_default();
    if !ssid.is_empty() {
        return Ok(env);
    }
    ensure!(
        !for_flash,
        "set MQOTA_WIFI_SSID (and MQOTA_WIFI_PASSWORD, MQOTA_BROKER_URL) before flashing; \
         see firmware/README.md"
    );
    eprintln!(
        "note: MQOTA_WIFI_SSID is not set; building with the placeholder `{PLACEHOLDER_SSID}` \
         (fine for checks and sizes; set it for an image to flash)"
    );
    env.push(("MQOTA_WIFI_SSID", PLACEHOLDER_SSID.to_string()));
    Ok(env)
}

fn save_image(espflash: &str, chip: Chip, elf: &Path, image: &Path) -> Result<()> {
    let partitions = root().join("firmware/partitions.csv");
    run(
        &root().join("firmware"),
        espflash,
        &[
            "save-image",
            "--chip",
            chip.name(),
            "--flash-size",
            "4mb",
            "--partition-table",
            path_str(&partitions)?,
            path_str(elf)?,
            path_str(image)?,
        ],
    )
}

/// `cargo xtask flash --chip CHIP [--port PORT] [--monitor]`: build, then
/// write bootloader, partition table and app (into `ota_0`) with espflash.
pub fn flash(args: &[String]) -> Result<()> {
    let opts = parse_options(args)?;
    let fw = root().join("firmware");
    let elf = build(opts.chip, &[], &wifi_env(true)?)?;
    let espflash = espflash()?;
    let mut cmd = vec![
        "flash".to_string(),
        "--chip".into(),
        opts.chip.name().into(),
        "--partition-table".into(),
        "partitions.csv".into(),
        "--target-app-partition".into(),
        "ota_0".into(),
        // A blank otadata makes the bootloader start ota_0 with no stale
        // trial state left from whatever ran before.
        "--erase-parts".into(),
        "otadata".into(),
    ];
    if let Some(port) = &opts.port {
        cmd.extend(["--port".into(), port.clone()]);
    }
    if opts.monitor {
        cmd.push("--monitor".into());
    }
    cmd.push(path_str(&elf)?.to_string());
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    run(&fw, &espflash, &cmd)
}

/// Release build for `chip` with extra `features`; returns the ELF.
fn build(chip: Chip, features: &[&str], env: &[(&str, String)]) -> Result<PathBuf> {
    let fw = root().join("firmware");
    run_env(&fw, "cargo", &cargo_args("build", chip, features, &[]), env)?;
    Ok(fw
        .join("target")
        .join(chip.target())
        .join("release")
        .join(PROJECT))
}

fn cargo_args(sub: &str, chip: Chip, features: &[&str], extra: &[&str]) -> Vec<String> {
    let mut all = vec![chip.name()];
    all.extend_from_slice(features);
    let mut args: Vec<String> = [sub, "--release", "--target", chip.target(), "--features"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(all.join(","));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// espflash from PATH or ~/.cargo/bin, installed with cargo if missing.
fn espflash() -> Result<String> {
    let found = |p: &str| {
        Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if found("espflash") {
        return Ok("espflash".into());
    }
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| Path::new(&h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let local = home.join("bin/espflash");
    let local = path_str(&local)?.to_string();
    if !found(&local) {
        // Needs libudev-dev and pkg-config (Debian) and a few minutes.
        run(&root(), "cargo", &["install", "espflash", "--locked"])?;
    }
    Ok(local)
}

use crate::root;

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("non-UTF-8 path {}", path.display()))
}

/// Runs a command in `dir`, echoing it, failing on a non-zero exit.
fn run(dir: &Path, program: &str, args: &[&str]) -> Result<()> {
    run_env(dir, program, args, &[])
}

/// [`run`] with extra environment variables.
fn run_env<S: AsRef<str>>(
    dir: &Path,
    program: &str,
    args: &[S],
    env: &[(&str, String)],
) -> Result<()> {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let shown: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v} ")).collect();
    eprintln!("$ {}{program} {}", shown.concat(), args.join(" "));
    let status = Command::new(program)
        .args(&args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(dir)
        .status()
        .with_context(|| format!("starting {program}"))?;
    ensure!(
        status.success(),
        "`{program} {}` failed: {status}",
        args.join(" ")
    );
    Ok(())
}

/// The `version` of the `[package]` section of a Cargo.toml.
fn crate_version(manifest: &str) -> Result<String> {
    let doc: toml::Table = manifest
        .parse()
        .context("firmware/Cargo.toml is not TOML")?;
    doc.get("package")
        .and_then(|p| p.get("version"))
        .and_then(toml::Value::as_str)
        .map(str::to_string)
        .context("no [package] version in firmware/Cargo.toml")
}

/// Checks esptool's `image-info` report: checksum and SHA-256 valid, and the
/// app descriptor names this project and version. (esptool exits 0 even for
/// a corrupt image, so its words are what counts.)
fn check_image_info(info: &str, project: &str, version: &str) -> Result<()> {
    let field = |name: &str| {
        info.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|r| r.strip_prefix(':'))
                    .map(str::trim)
            })
            .with_context(|| format!("esptool image-info shows no `{name}`"))
    };
    let checksum = field("Checksum")?;
    ensure!(
        checksum.ends_with("(valid)"),
        "image checksum is not valid: {checksum}"
    );
    let hash = field("Validation hash")?;
    ensure!(
        hash.ends_with("(valid)"),
        "image SHA-256 is not valid: {hash}"
    );
    let name = field("Project name")?;
    ensure!(
        name == project,
        "app descriptor names project `{name}`, expected `{project}`"
    );
    let app_version = field("App version")?;
    ensure!(
        app_version == version,
        "app descriptor has version `{app_version}`, expected `{version}`"
    );
    Ok(())
}

/// The smallest `ota_N` app partition of an ESP-IDF partition CSV, read by
/// the core's parser (the one the devices use): an image must fit whichever
/// slot it is downloaded into.
fn smallest_ota_slot(csv: &str) -> Result<Slot> {
    let table = PartitionTable::from_csv(csv)
        .map_err(|e| anyhow::anyhow!("firmware/partitions.csv: {e}"))?;
    table
        .ota_slots()
        .map(|p| Slot {
            offset: p.offset,
            size: p.size,
        })
        .min_by_key(Slot::max_image_len)
        .context("firmware/partitions.csv has no ota_N app partition")
}

/// Refuses an image a device would refuse: the device's rule,
/// [`Slot::max_image_len`], leaves the slot's last sector to the mqota journal.
fn check_image_fits(image_bytes: u64, slot: &Slot) -> Result<()> {
    let max = u64::from(slot.max_image_len());
    ensure!(
        image_bytes <= max,
        "image is {image_bytes} bytes but an OTA slot of firmware/partitions.csv takes at most \
         {max} ({} bytes less the {JOURNAL_SIZE}-byte mqota journal sector)",
        slot.size
    );
    Ok(())
}

/// One allocated section of the ELF.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Section {
    name: String,
    size: u64,
    kind: Kind,
}

/// Where a section's bytes go, in the Berkeley `size` sense, split finer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Executable code.
    Text,
    /// Read-only data, flash-mapped.
    Rodata,
    /// Initialised RAM, copied from the image.
    Data,
    /// Zeroed RAM, not in the image.
    Bss,
    /// Address space the linker script reserves (stack, alignment dummies), not data.
    Reserved,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Text => "text",
            Kind::Rodata => "rodata",
            Kind::Data => "data",
            Kind::Bss => "bss",
            Kind::Reserved => "reserved",
        }
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Sizes {
    text: u64,
    rodata: u64,
    data: u64,
    bss: u64,
    sections: Vec<Section>,
}

/// Sums the allocated sections of a 32-bit little-endian ELF by kind.
fn elf_sizes(elf: &[u8]) -> Result<Sizes> {
    use object::elf::{SHF_ALLOC, SHF_EXECINSTR, SHF_WRITE, SHT_NOBITS};
    use object::read::elf::{ElfFile32, SectionHeader as _};
    use object::{LittleEndian as LE, Object as _, ObjectSection as _};
    let file = ElfFile32::<LE>::parse(elf).context("not a 32-bit little-endian ELF file")?;
    let mut sizes = Sizes::default();
    for section in file.sections() {
        let h = section.elf_section_header();
        let (sh_type, flags, size) = (h.sh_type(LE), h.sh_flags(LE), u64::from(h.sh_size(LE)));
        if flags & SHF_ALLOC == 0 || size == 0 {
            continue;
        }
        let kind = match (
            sh_type == SHT_NOBITS,
            flags & SHF_WRITE != 0,
            flags & SHF_EXECINSTR != 0,
        ) {
            (true, true, _) => Kind::Bss,
            (true, false, _) => Kind::Reserved,
            (false, _, true) => Kind::Text,
            (false, true, false) => Kind::Data,
            (false, false, false) => Kind::Rodata,
        };
        match kind {
            Kind::Text => sizes.text += size,
            Kind::Rodata => sizes.rodata += size,
            Kind::Data => sizes.data += size,
            Kind::Bss => sizes.bss += size,
            Kind::Reserved => {}
        }
        sizes.sections.push(Section {
            name: section.name().context("ELF section name")?.to_string(),
            size,
            kind,
        });
    }
    Ok(sizes)
}

fn percent(part: u64, whole: u64) -> f64 {
    part as f64 * 100.0 / whole as f64
}

/// Image and ELF sizes of one build.
struct Footprint {
    image: u64,
    sizes: Sizes,
}

/// The JSON size report (written by hand: flat, with names the linker chose).
/// `base` is the `size-baseline` build: WiFi and network stack without mqota.
fn size_report(chip: Chip, image: u64, slot: &Slot, sizes: &Sizes, base: &Footprint) -> String {
    let capacity = u64::from(slot.max_image_len());
    let mut s = String::new();
    let _ = writeln!(s, "{{");
    let _ = writeln!(s, "  \"chip\": \"{}\",", chip.name());
    let _ = writeln!(s, "  \"target\": \"{}\",", chip.target());
    let _ = writeln!(s, "  \"image_bytes\": {image},");
    let _ = writeln!(s, "  \"ota_slot_bytes\": {},", slot.size);
    let _ = writeln!(s, "  \"max_image_bytes\": {capacity},");
    let _ = writeln!(
        s,
        "  \"ota_slot_used_percent\": {:.1},",
        percent(image, capacity)
    );
    let _ = writeln!(s, "  \"text\": {},", sizes.text);
    let _ = writeln!(s, "  \"rodata\": {},", sizes.rodata);
    let _ = writeln!(s, "  \"data\": {},", sizes.data);
    let _ = writeln!(s, "  \"bss\": {},", sizes.bss);
    for (name, total, without) in [
        ("image_bytes", image, base.image),
        ("text", sizes.text, base.sizes.text),
        ("rodata", sizes.rodata, base.sizes.rodata),
        ("data", sizes.data, base.sizes.data),
        ("bss", sizes.bss, base.sizes.bss),
    ] {
        let _ = writeln!(
            s,
            "  \"{name}_without_mqota\": {without},\n  \"{name}_mqota\": {},",
            total as i64 - without as i64
        );
    }
    let _ = writeln!(s, "  \"sections\": [");
    for (i, sec) in sizes.sections.iter().enumerate() {
        let comma = if i + 1 < sizes.sections.len() {
            ","
        } else {
            ""
        };
        let name: String = sec
            .name
            .chars()
            .filter(|c| !matches!(c, '"' | '\\') && !c.is_control())
            .collect();
        let _ = writeln!(
            s,
            "    {{ \"name\": \"{name}\", \"bytes\": {}, \"kind\": \"{}\" }}{comma}",
            sec.size,
            sec.kind.name()
        );
    }
    let _ = writeln!(s, "  ]");
    let _ = writeln!(s, "}}");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use object::elf::{SHF_ALLOC, SHF_EXECINSTR, SHF_WRITE, SHT_NOBITS};

    fn testdata(path: &str) -> String {
        std::fs::read_to_string(root().join("testdata").join(path)).unwrap()
    }

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_firmware_partition_table_is_mqota_cores_default() {
        // testdata/partitions/default_4mb.csv is asserted equal to
        // mqota_core::partition::DEFAULT_4MB_CSV by the core's own tests.
        let firmware = std::fs::read_to_string(root().join("firmware/partitions.csv")).unwrap();
        assert_eq!(firmware, testdata("partitions/default_4mb.csv"));
    }

    #[test]
    fn the_ota_slot_is_the_smallest_ota_app_partition() {
        let csv = "factory, app, factory, 0x10000, 3M,\n\
                   ota_0, app, ota_0, , 0x100000,\n\
                   ota_1, app, ota_1, , 960K,\n\
                   spiffs, data, spiffs, , 64K,\n";
        assert_eq!(smallest_ota_slot(csv).unwrap().size, 960 * 1024);
    }

    #[test]
    fn blank_offsets_and_sizes_with_suffixes_are_read_as_the_core_reads_them() {
        let slot = smallest_ota_slot(&testdata("partitions/blank_offsets.csv")).unwrap();
        assert_eq!(slot.size, 0x100000);
    }

    #[test]
    fn a_table_without_ota_slots_is_an_error() {
        assert!(smallest_ota_slot("factory, app, factory, 0x10000, 1M,\n").is_err());
    }

    #[test]
    fn an_image_reaching_into_the_journal_sector_does_not_fit() {
        let csv = std::fs::read_to_string(root().join("firmware/partitions.csv")).unwrap();
        let slot = smallest_ota_slot(&csv).unwrap();
        let size = u64::from(slot.size);
        let journal = u64::from(JOURNAL_SIZE);
        assert_eq!(journal, 4096);
        assert!(check_image_fits(size - journal, &slot).is_ok());
        for bytes in [size - journal + 1, size - 1, size] {
            let err = check_image_fits(bytes, &slot).unwrap_err().to_string();
            assert!(
                err.contains(&format!("at most {}", size - journal)),
                "{err}"
            );
        }
        assert!(check_image_fits(size + 1, &slot).is_err());
    }

    #[test]
    fn a_valid_image_of_the_expected_project_passes_the_esptool_check() {
        check_image_info(
            &testdata("images/sample-esp32c3.txt"),
            "mqota-sample",
            "0.1.0",
        )
        .unwrap();
    }

    #[test]
    fn an_image_of_another_project_or_version_is_rejected() {
        let info = testdata("images/sample-esp32c3.txt");
        assert!(check_image_info(&info, PROJECT, "0.1.0").is_err());
        assert!(check_image_info(&info, "mqota-sample", "0.2.0").is_err());
    }

    #[test]
    fn a_corrupt_segment_fails_the_checksum_check() {
        let err = check_image_info(
            &testdata("images/sample-esp32c3-corrupt-segment.txt"),
            "mqota-sample",
            "0.1.0",
        )
        .unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[test]
    fn a_corrupt_digest_fails_the_hash_check() {
        let err = check_image_info(
            &testdata("images/sample-esp32c3-corrupt-hash.txt"),
            "mqota-sample",
            "0.1.0",
        )
        .unwrap_err();
        assert!(err.to_string().contains("SHA-256"), "{err}");
    }

    #[test]
    fn an_image_without_a_digest_is_rejected() {
        let info = testdata("images/esp32c3-esptool-nodigest.txt");
        assert!(check_image_info(&info, "golden-esp32c3", "1.2.3").is_err());
    }

    #[test]
    fn the_package_version_is_read_from_the_package_section_only() {
        let manifest =
            "[package]\nname = \"x\"\nversion = \"1.4.0\"\n[dependencies]\nversion = \"9\"\n";
        assert_eq!(crate_version(manifest).unwrap(), "1.4.0");
        assert!(crate_version("[dependencies]\nversion = \"9\"\n").is_err());
    }

    #[test]
    fn xtensa_chips_are_refused_with_a_pointer_to_the_readme() {
        let err = parse_options(&args(&["--chip", "esp32s3"])).unwrap_err();
        assert!(err.to_string().contains("README"), "{err}");
    }

    #[test]
    fn options_accept_separate_and_inline_values() {
        let opts = parse_options(&args(&[
            "--chip=esp32c6",
            "--port",
            "/dev/ttyACM0",
            "--monitor",
        ]))
        .unwrap();
        assert_eq!(
            opts,
            Options {
                chip: Chip::Esp32c6,
                port: Some("/dev/ttyACM0".into()),
                monitor: true
            }
        );
        assert_eq!(opts.chip.target(), "riscv32imac-unknown-none-elf");
        assert!(parse_options(&args(&["--port", "/dev/x"])).is_err());
        assert!(parse_options(&args(&["--chip"])).is_err());
    }

    /// A minimal ELF32 LE with a NULL section, the given sections and a
    /// section-name table, laid out as the ELF spec says (headers at the end).
    fn elf32(sections: &[(&str, u32, u32, u32)]) -> Vec<u8> {
        let mut names = vec![0u8];
        let mut name_offsets = Vec::new();
        for (name, ..) in sections {
            name_offsets.push(names.len() as u32);
            names.extend_from_slice(name.as_bytes());
            names.push(0);
        }
        let shstrtab_name = names.len() as u32;
        names.extend_from_slice(b".shstrtab\0");
        let names_off = 52u32;
        let shoff = names_off + names.len() as u32;
        let shnum = sections.len() as u16 + 2;
        let mut elf = vec![0u8; 52];
        // Magic, 32-bit, little-endian, ELF version 1.
        elf[..7].copy_from_slice(b"\x7fELF\x01\x01\x01");
        elf[0x20..0x24].copy_from_slice(&shoff.to_le_bytes());
        elf[0x2e..0x30].copy_from_slice(&40u16.to_le_bytes());
        elf[0x30..0x32].copy_from_slice(&shnum.to_le_bytes());
        elf[0x32..0x34].copy_from_slice(&(shnum - 1).to_le_bytes());
        elf.extend_from_slice(&names);
        let header = |name: u32, ty: u32, flags: u32, off: u32, size: u32| {
            let mut h = [0u8; 40];
            for (i, v) in [name, ty, flags, 0, off, size].into_iter().enumerate() {
                h[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
            }
            h
        };
        elf.extend_from_slice(&[0u8; 40]);
        for ((_, ty, flags, size), name) in sections.iter().zip(&name_offsets) {
            elf.extend_from_slice(&header(*name, *ty, *flags, 0, *size));
        }
        elf.extend_from_slice(&header(shstrtab_name, 3, 0, names_off, names.len() as u32));
        elf
    }

    #[test]
    fn allocated_sections_are_summed_by_kind_and_reservations_left_out() {
        const PROGBITS: u32 = 1;
        let elf = elf32(&[
            (".text", PROGBITS, SHF_ALLOC | SHF_EXECINSTR, 1000),
            (
                ".rwtext",
                PROGBITS,
                SHF_ALLOC | SHF_EXECINSTR | SHF_WRITE,
                24,
            ),
            (".rodata", PROGBITS, SHF_ALLOC, 300),
            (".flash.appdesc", PROGBITS, SHF_ALLOC, 256),
            (".data", PROGBITS, SHF_ALLOC | SHF_WRITE, 40),
            (".bss", SHT_NOBITS, SHF_ALLOC | SHF_WRITE, 500),
            (".stack", SHT_NOBITS, SHF_ALLOC, 65536),
            (".debug_info", PROGBITS, 0, 99999),
            (".empty", PROGBITS, SHF_ALLOC, 0),
        ]);
        let sizes = elf_sizes(&elf).unwrap();
        assert_eq!(
            (sizes.text, sizes.rodata, sizes.data, sizes.bss),
            (1024, 556, 40, 500)
        );
        let names: Vec<_> = sizes.sections.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                ".text",
                ".rwtext",
                ".rodata",
                ".flash.appdesc",
                ".data",
                ".bss",
                ".stack"
            ]
        );
        assert_eq!(sizes.sections[6].kind, Kind::Reserved);
        let base = Footprint {
            image: 1500,
            sizes: Sizes {
                text: 800,
                rodata: 600,
                data: 40,
                bss: 100,
                sections: Vec::new(),
            },
        };
        let slot = Slot {
            offset: 0x10000,
            size: 8192,
        };
        let report = size_report(Chip::Esp32c3, 2048, &slot, &sizes, &base);
        for expected in [
            "\"text\": 1024,",
            "\"ota_slot_bytes\": 8192,",
            // The journal sector is not room for the image.
            "\"max_image_bytes\": 4096,",
            "\"ota_slot_used_percent\": 50.0,",
            "\"image_bytes_without_mqota\": 1500,",
            "\"image_bytes_mqota\": 548,",
            "\"text_mqota\": 224,",
            // A section may shrink when mqota is in: the split can be negative.
            "\"rodata_mqota\": -44,",
            "\"bss_mqota\": 400,",
        ] {
            assert!(report.contains(expected), "{expected} in {report}");
        }
    }

    #[test]
    fn a_64_bit_or_truncated_elf_is_an_error() {
        let mut elf = elf32(&[(".text", 1, SHF_ALLOC | SHF_EXECINSTR, 10)]);
        let cut = elf.len() - 10;
        assert!(elf_sizes(&elf[..cut]).is_err());
        elf[4] = 2;
        assert!(elf_sizes(&elf).is_err());
        assert!(elf_sizes(b"not an elf at all, but long enough to have a header........").is_err());
    }
}

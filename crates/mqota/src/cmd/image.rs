//! `mqota image info FILE [--json]` and `mqota image pack ...`: inspect an
//! ESP-IDF app image, or make a valid one of an exact size for tests and
//! virtual devices.
//!
//! `info` streams the file through the same validator the device runs, so
//! what it accepts the device accepts. It prints the image even when its
//! checksum or hash is wrong (marked invalid), then exits non-zero.

use std::fmt::Write as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use mqota_core::image::{
    Chip, ImageBuilder, ImageInfo, StreamValidator, MAX_IMAGE_LEN, SEGMENT_HEADER_LEN,
};
use mqota_core::signature::sign::sign_file;
use mqota_core::signature::{
    self, blocks, Scheme, SoftVerifier, TrustPolicy, MAX_BLOCKS, SECTOR_LEN,
};
use serde_json::json;

/// Inspect and build ESP-IDF app images.
#[derive(clap::Subcommand)]
pub enum ImageCommand {
    /// Show an app image: header, segments, checksum, hash, app descriptor.
    Info {
        /// The image, as written by `espflash save-image` or `esptool elf2image`.
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Sign an image with a Secure Boot V2 key (RSA-3072 or ECDSA P-256), as
    /// `espsecure sign-data --version 2` does: pads it with 0xFF to 4 KiB and
    /// appends the signature sector, or adds a block to a signed image's
    /// sector (key rotation: sign again with the new key; at most 3 blocks).
    Sign {
        /// The private key (PEM; `mqota keys new` or `espsecure
        /// generate-signing-key`).
        #[arg(long)]
        key: PathBuf,
        /// The image to sign.
        image: PathBuf,
        /// Where to write the signed image.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Check a signed image as a device trusting the given keys would: exit
    /// 0 when a block of a trusted key verifies, else print the reason.
    Verify {
        /// A trusted key digest (64 hex digits); repeatable.
        #[arg(long, value_name = "DIGEST", value_parser = crate::cmd::keys::parse_digest)]
        trust: Vec<[u8; 32]>,
        /// A trusted key file (public or private PEM); repeatable.
        #[arg(long)]
        key: Vec<PathBuf>,
        /// The signed image.
        image: PathBuf,
    },
    /// Make a valid app image of an exact size (filler code, real headers).
    Pack {
        /// Chip the image is for: esp32c3, esp32c6, ...
        #[arg(long, value_parser = parse_chip)]
        chip: Chip,
        /// App version written in the app descriptor.
        #[arg(long)]
        version: String,
        /// Project name written in the app descriptor.
        #[arg(long)]
        project: String,
        /// Anti-rollback secure version.
        #[arg(long, default_value_t = 0)]
        secure_version: u32,
        /// Exact image size: bytes, 0x hex, or with a K/M suffix (KiB/MiB);
        /// a multiple of 16.
        #[arg(long, value_parser = parse_size)]
        size: u32,
        /// Where to write the image.
        #[arg(short, long)]
        output: PathBuf,
    },
}

impl ImageCommand {
    /// Runs the subcommand.
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            ImageCommand::Info { file, json } => info(&file, json),
            ImageCommand::Sign { key, image, output } => sign(&key, &image, &output),
            ImageCommand::Verify { trust, key, image } => verify(trust, &key, &image),
            ImageCommand::Pack {
                chip,
                version,
                project,
                secure_version,
                size,
                output,
            } => pack(chip, &version, &project, secure_version, size, &output),
        }
    }
}

fn parse_chip(s: &str) -> Result<Chip, String> {
    s.parse::<Chip>().map_err(|e| e.to_string())
}

fn parse_size(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let (digits, unit) = if let Some(d) = t.strip_suffix("KiB").or(t.strip_suffix('K')) {
        (d, 1024)
    } else if let Some(d) = t.strip_suffix("MiB").or(t.strip_suffix('M')) {
        (d, 1024 * 1024)
    } else {
        (t, 1)
    };
    let n = match digits.strip_prefix("0x").or(digits.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => digits.parse::<u64>(),
    }
    .map_err(|_| format!("not a size: {s:?} (try 4096, 0x1000, 64K or 1M)"))?;
    u32::try_from(n * unit).map_err(|_| format!("size {s} does not fit in 32 bits"))
}

/// Streams the file through the validator; a structural error (not an image,
/// truncated, ...) fails here, an integrity error only after printing.
fn read_image(path: &Path) -> anyhow::Result<ImageInfo> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut v = StreamValidator::new(None, MAX_IMAGE_LEN);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        v.feed(&buf[..n])
            .with_context(|| format!("{}", path.display()))?;
    }
    v.finish_unchecked()
        .with_context(|| format!("{}", path.display()))
}

/// One signature block as `info` shows it.
struct BlockView {
    scheme: Option<Scheme>,
    key_digest: Option<[u8; 32]>,
    crc_valid: bool,
    digest_matches: bool,
    signature_valid: bool,
}

impl BlockView {
    fn valid(&self) -> bool {
        self.crc_valid && self.digest_matches && self.signature_valid
    }
}

/// The signature sector of a file, if it has one.
fn read_sector(path: &Path, info: &ImageInfo) -> anyhow::Result<Option<Box<[u8; SECTOR_LEN]>>> {
    let Some(at) = info.signature_sector() else {
        return Ok(None);
    };
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let sector: [u8; SECTOR_LEN] = bytes
        .get(at as usize..at as usize + SECTOR_LEN)
        .and_then(|s| s.try_into().ok())
        .with_context(|| format!("{}: signature sector cut short", path.display()))?;
    Ok(Some(Box::new(sector)))
}

fn block_views(sector: &[u8; SECTOR_LEN], info: &ImageInfo) -> Vec<BlockView> {
    blocks(sector)
        .map(|b| match b {
            Ok(b) => BlockView {
                scheme: Some(b.scheme()),
                key_digest: Some(b.key_digest()),
                crc_valid: b.crc_valid(),
                digest_matches: Some(b.image_digest()) == info.padded_sha256,
                signature_valid: b.signature_verifies(SoftVerifier::INSTANCE),
            },
            Err(_) => BlockView {
                scheme: None,
                key_digest: None,
                crc_valid: false,
                digest_matches: false,
                signature_valid: false,
            },
        })
        .collect()
}

fn info(path: &Path, as_json: bool) -> anyhow::Result<()> {
    let info = read_image(path)?;
    let views = match read_sector(path, &info)? {
        Some(sector) => block_views(&sector, &info),
        None => Vec::new(),
    };
    if as_json {
        let mut j = to_json(&info);
        j["signatures"] = views
            .iter()
            .map(|v| {
                json!({
                    "scheme": v.scheme.map(Scheme::name),
                    "key_digest": v.key_digest.map(hex::encode),
                    "crc_valid": v.crc_valid,
                    "digest_matches": v.digest_matches,
                    "signature_valid": v.signature_valid,
                    "valid": v.valid(),
                    "chip_supports": v.scheme.is_some_and(|s| s.supported_on(info.chip)),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        print!("{}", to_text(path, &info));
        if views.is_empty() {
            println!("  signatures     none");
        }
        for (i, v) in views.iter().enumerate() {
            let scheme = v.scheme.map_or("unsupported", Scheme::name);
            let digest = v.key_digest.map_or_else(|| "-".to_owned(), hex::encode);
            let why = if v.scheme.is_none() {
                "INVALID, unknown block version"
            } else if !v.crc_valid {
                "INVALID, bad CRC"
            } else if !v.digest_matches {
                "INVALID, signs other bytes"
            } else if !v.signature_valid {
                "INVALID, signature does not verify"
            } else {
                "valid"
            };
            let chip = if v.scheme.is_some_and(|s| !s.supported_on(info.chip)) {
                format!(", not checked by {}", info.chip)
            } else {
                String::new()
            };
            println!("  signature {i}    {scheme} key {digest} ({why}{chip})");
        }
    }
    info.verify()
        .with_context(|| format!("{}", path.display()))?;
    Ok(())
}

/// esptool's names for the `spi_size` codes of the ESP32 family.
fn flash_size_name(code: u8) -> Option<&'static str> {
    ["1MB", "2MB", "4MB", "8MB", "16MB", "32MB", "64MB", "128MB"]
        .get(code as usize)
        .copied()
}

fn flash_mode_name(mode: u8) -> Option<&'static str> {
    ["QIO", "QOUT", "DIO", "DOUT"].get(mode as usize).copied()
}

fn rev(full: u16) -> String {
    format!("v{}.{}", full / 100, full % 100)
}

fn to_json(info: &ImageInfo) -> serde_json::Value {
    let h = &info.header;
    let a = &info.app;
    let segments: Vec<_> = info
        .segments
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({
                "index": i,
                "load_addr": s.header.load_addr,
                "len": s.header.data_len,
                "offset": s.offset,
                "data_offset": s.offset + SEGMENT_HEADER_LEN as u32,
                "mapped": info.chip.is_flash_mapped(s.header.load_addr),
            })
        })
        .collect();
    json!({
        "chip": info.chip.name(),
        "chip_id": h.chip_id,
        "size": info.len,
        "entry": h.entry_addr,
        "spi_mode": h.spi_mode,
        "flash_mode": flash_mode_name(h.spi_mode),
        "spi_speed": h.spi_speed,
        "spi_size": h.spi_size,
        "flash_size": flash_size_name(h.spi_size),
        "min_chip_rev_full": h.min_chip_rev_full,
        "max_chip_rev_full": h.max_chip_rev_full,
        "segments": segments,
        "checksum": info.checksum,
        "checksum_computed": info.checksum_computed,
        "checksum_valid": info.checksum_valid,
        "hash_appended": h.hash_appended,
        "sha256": info.sha256.map(hex::encode),
        "sha256_computed": hex::encode(info.sha256_computed),
        "sha256_valid": info.sha256_valid,
        "file_sha256": hex::encode(info.file_sha256),
        "project": a.project_name.as_str(),
        "version": a.version.as_str(),
        "secure_version": a.secure_version,
        "idf_ver": a.idf_ver.as_str(),
        "date": a.date.as_str(),
        "time": a.time.as_str(),
        "app_elf_sha256": hex::encode(a.app_elf_sha256),
        "min_efuse_blk_rev_full": a.min_efuse_blk_rev_full,
        "max_efuse_blk_rev_full": a.max_efuse_blk_rev_full,
        "mmu_page_size": a.mmu_page_bytes(),
    })
}

fn validity(ok: bool) -> &'static str {
    if ok {
        "valid"
    } else {
        "INVALID"
    }
}

fn to_text(path: &Path, info: &ImageInfo) -> String {
    let h = &info.header;
    let a = &info.app;
    let mut s = String::new();
    // Writing to a String cannot fail.
    let _ = (|| -> std::fmt::Result {
        writeln!(
            s,
            "{}: ESP-IDF app image for {}, {} bytes",
            path.display(),
            info.chip,
            info.len
        )?;
        writeln!(s, "  project        {}", a.project_name)?;
        writeln!(s, "  version        {}", a.version)?;
        writeln!(s, "  secure version {}", a.secure_version)?;
        writeln!(
            s,
            "  built          {} {} (SDK {})",
            a.date, a.time, a.idf_ver
        )?;
        writeln!(s, "  entry          {:#010x}", h.entry_addr)?;
        writeln!(
            s,
            "  flash          {}, {}, speed code {}",
            flash_mode_name(h.spi_mode).unwrap_or("unknown mode"),
            flash_size_name(h.spi_size).unwrap_or("unknown size"),
            h.spi_speed
        )?;
        writeln!(
            s,
            "  chip revision  {} to {}",
            rev(h.min_chip_rev_full),
            rev(h.max_chip_rev_full)
        )?;
        writeln!(s, "  segments       {}", info.segments.len())?;
        writeln!(s, "       #  load addr       length   offset")?;
        for (i, seg) in info.segments.iter().enumerate() {
            let kind = if seg.header.load_addr == 0 {
                "padding"
            } else if info.chip.is_flash_mapped(seg.header.load_addr) {
                "flash-mapped"
            } else {
                "loaded to RAM"
            };
            writeln!(
                s,
                "    {i:>4}  {:#010x}  {:>9}  {:#08x}  {kind}",
                seg.header.load_addr, seg.header.data_len, seg.offset
            )?;
        }
        writeln!(
            s,
            "  checksum       {:#04x} ({})",
            info.checksum,
            if info.checksum_valid {
                "valid".to_owned()
            } else {
                format!("INVALID, computed {:#04x}", info.checksum_computed)
            }
        )?;
        match info.sha256 {
            Some(stored) => writeln!(
                s,
                "  sha256         {} ({})",
                hex::encode(stored),
                validity(info.sha256_valid)
            )?,
            None => writeln!(s, "  sha256         not appended")?,
        }
        writeln!(s, "  file sha256    {}", hex::encode(info.file_sha256))
    })();
    s
}

fn sign(key: &Path, image: &Path, output: &Path) -> anyhow::Result<()> {
    let key = crate::cmd::keys::read_sbv2_key(key)?;
    let bytes = std::fs::read(image).with_context(|| format!("reading {}", image.display()))?;
    let signed = sign_file(&bytes, &key).with_context(|| format!("{}", image.display()))?;
    let info = mqota_core::image::validate_bytes(&signed)
        .context("internal error: the signed image does not validate")?;
    if !key.scheme().supported_on(info.chip) {
        eprintln!(
            "warning: {} does not check {} signatures; sign with an RSA-3072 key too",
            info.chip,
            key.scheme().name()
        );
    }
    std::fs::write(output, &signed).with_context(|| format!("writing {}", output.display()))?;
    println!(
        "{}: signed with {} key {}, {} bytes, sha256 {}",
        output.display(),
        key.scheme().name(),
        hex::encode(key.digest()),
        signed.len(),
        hex::encode(info.file_sha256)
    );
    Ok(())
}

fn verify(mut trust: Vec<[u8; 32]>, keys: &[PathBuf], image: &Path) -> anyhow::Result<()> {
    for k in keys {
        trust.push(crate::cmd::keys::digest_of_file(k)?);
    }
    if trust.is_empty() {
        bail!("name the trusted keys with --trust DIGEST or --key PUB.pem");
    }
    if trust.len() > MAX_BLOCKS {
        bail!("at most {MAX_BLOCKS} trusted keys, as on a device");
    }
    let info = read_image(image)?;
    let sector = read_sector(image, &info)?;
    let policy = TrustPolicy::new(&trust, SoftVerifier::INSTANCE);
    let digest = info.padded_sha256.unwrap_or_default();
    let started = std::time::Instant::now();
    let checked = signature::check(&policy, info.chip, sector.as_deref(), &digest);
    let took = started.elapsed();
    checked.map_err(|why| anyhow::anyhow!("{}: bad_signature: {why}", image.display()))?;
    info.verify()
        .with_context(|| format!("{}", image.display()))?;
    println!(
        "{}: signature verified ({} chip, {:.2} ms)",
        image.display(),
        info.chip,
        took.as_secs_f64() * 1000.0
    );
    Ok(())
}

fn pack(
    chip: Chip,
    version: &str,
    project: &str,
    secure_version: u32,
    size: u32,
    output: &Path,
) -> anyhow::Result<()> {
    let image = ImageBuilder::new(chip)
        .version(version)
        .project(project)
        .secure_version(secure_version)
        .size(size)
        .build()?;
    // The builder and the validator are separate code: check one with the other.
    let info = mqota_core::image::validate_bytes(&image)
        .context("internal error: the packed image does not validate")?;
    if info.len != size {
        bail!("internal error: packed {} bytes, not {size}", info.len);
    }
    std::fs::write(output, &image).with_context(|| format!("writing {}", output.display()))?;
    println!(
        "{}: {chip} app {project} {version}, {size} bytes, sha256 {}",
        output.display(),
        hex::encode(info.file_sha256)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_accept_decimal_hex_and_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("8192M").is_err());
    }
}

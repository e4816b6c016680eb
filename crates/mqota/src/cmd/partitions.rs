//! `mqota partitions FILE [--to-csv OUT | --to-binary OUT]`: shows an ESP-IDF
//! partition table, binary or CSV, and converts between the two.

use std::path::PathBuf;

use anyhow::Context as _;
use mqota_core::partition::{PartitionTable, ENTRY_MAGIC};

/// Show an ESP-IDF partition table (binary or CSV) or convert it.
#[derive(clap::Args)]
pub struct PartitionsArgs {
    /// The table: a binary (as flashed at 0x8000) or a partitions.csv.
    file: PathBuf,
    /// Write the table as CSV to this file.
    #[arg(long, value_name = "OUT", conflicts_with = "to_binary")]
    to_csv: Option<PathBuf>,
    /// Write the table as a binary (with MD5, padded to 0xC00 bytes) to this file.
    #[arg(long, value_name = "OUT")]
    to_binary: Option<PathBuf>,
}

impl PartitionsArgs {
    /// Reads the table, then prints it or writes the conversion asked for.
    pub fn run(self) -> anyhow::Result<()> {
        let bytes = std::fs::read(&self.file)
            .with_context(|| format!("reading {}", self.file.display()))?;
        let table = parse(&bytes).with_context(|| format!("{}", self.file.display()))?;

        if let Some(out) = &self.to_csv {
            let mut csv = String::new();
            table.write_csv(&mut csv)?;
            std::fs::write(out, csv).with_context(|| format!("writing {}", out.display()))?;
        } else if let Some(out) = &self.to_binary {
            std::fs::write(out, table.to_bytes())
                .with_context(|| format!("writing {}", out.display()))?;
        } else {
            print!("{}", listing(&table));
        }
        Ok(())
    }
}

/// Binary tables start with the entry magic (`AA 50`), as `gen_esp32part.py`
/// decides; anything else is read as CSV text.
fn parse(bytes: &[u8]) -> anyhow::Result<PartitionTable> {
    if bytes.starts_with(&ENTRY_MAGIC.to_le_bytes()) {
        Ok(PartitionTable::from_bytes(bytes)?)
    } else {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| anyhow::anyhow!("neither a binary partition table nor UTF-8 CSV"))?;
        Ok(PartitionTable::from_csv(text)?)
    }
}

/// One row per partition, columns aligned, sizes also in KiB.
fn listing(table: &PartitionTable) -> String {
    let rows: Vec<[String; 6]> = table
        .partitions()
        .iter()
        .map(|p| {
            let subtype = p
                .subtype_name()
                .map(str::to_owned)
                .unwrap_or_else(|| format!("{:#04x}", p.subtype.0));
            let size = if p.size % 1024 == 0 {
                format!("{:#x} ({} KiB)", p.size, p.size / 1024)
            } else {
                format!("{:#x} ({} B)", p.size, p.size)
            };
            [
                p.label.to_string(),
                p.ty.to_string(),
                subtype,
                format!("{:#x}", p.offset),
                size,
                p.flags.to_string(),
            ]
        })
        .collect();
    let header = ["LABEL", "TYPE", "SUBTYPE", "OFFSET", "SIZE", "FLAGS"].map(str::to_owned);
    let mut widths = [0; 6];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(&format!("{cell:<w$}"));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

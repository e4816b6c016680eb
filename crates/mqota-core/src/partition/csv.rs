//! The CSV form of the table (`partitions.csv`), read the way `gen_esp32part.py`
//! reads it:
//!
//! - one partition per line: `Name, Type, SubType, Offset, Size, Flags`;
//!   fields are split on commas and stripped of white space (no quoting);
//! - blank lines and lines starting with `#` are skipped;
//! - types by name (`app`, `data`) or number; subtypes by the names of
//!   [`SubType::from_name`] for that type, or number; a blank data subtype is
//!   `undefined`;
//! - offsets and sizes in hex (`0x..`), octal (`0o..`), binary (`0b..`) or
//!   decimal, optionally with a `K` (KiB) or `M` (MiB) suffix;
//! - a blank offset continues where the previous partition ended (the first
//!   one at [`FIRST_PARTITION_OFFSET`]), padded up to [`PartitionType::alignment`];
//! - flags are `encrypted` and `readonly`, joined by `:`.

use core::fmt;

use super::{
    Error, Flags, Label, Partition, PartitionTable, PartitionType, SubType, FIRST_PARTITION_OFFSET,
    MAX_ENTRIES,
};

/// The table mqota devices ship with: two OTA slots of 1.875 MiB on a 4 MiB flash
/// and no factory app, after ESP-IDF's "two OTA" layout, then in the free
/// space after `ota_1` a 32 KiB `log` partition for the device's field log
/// and an 8 KiB `mqota` partition for its trust state (job sequence number,
/// `secure_version` floor), so every partition an existing device relies on
/// keeps its offset and size. Virtual devices and the firmware share it.
pub const DEFAULT_4MB_CSV: &str = "\
# mqota default: two OTA app slots on a 4 MiB flash, no factory app.
# Name,   Type, SubType, Offset,   Size,     Flags
nvs,      data, nvs,     0x9000,   0x4000,
otadata,  data, ota,     0xd000,   0x2000,
phy_init, data, phy,     0xf000,   0x1000,
ota_0,    app,  ota_0,   0x10000,  0x1e0000,
ota_1,    app,  ota_1,   0x1f0000, 0x1e0000,
log,      data, undefined, 0x3d0000, 0x8000,
mqota,    data, undefined, 0x3d8000, 0x2000,
";

/// A column of the CSV file, to say which one is wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Field {
    /// The label.
    Name,
    /// `app`, `data` or a number.
    Type,
    /// The subtype.
    SubType,
    /// Where the partition starts.
    Offset,
    /// How long it is.
    Size,
    /// `encrypted`, `readonly`.
    Flags,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Name => "name",
            Self::Type => "type",
            Self::SubType => "subtype",
            Self::Offset => "offset",
            Self::Size => "size",
            Self::Flags => "flags",
        })
    }
}

/// A CSV table was refused: `error` says why, `line` (counting from 1) where.
/// Fix the file; nothing here is worth retrying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct CsvError {
    /// The line at fault, or `None` for faults of the whole table (empty, no app).
    pub line: Option<usize>,
    /// What is wrong.
    pub error: Error,
}

impl fmt::Display for CsvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}", self.error),
            None => fmt::Display::fmt(&self.error, f),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for CsvError {}

impl PartitionTable {
    /// Parses a `partitions.csv`, filling in blank offsets as `gen_esp32part.py`
    /// does, then checks the table as [`PartitionTable::new`] does.
    pub fn from_csv(text: &str) -> Result<Self, CsvError> {
        let mut entries = heapless::Vec::<Partition, MAX_ENTRIES>::new();
        let mut lines = heapless::Vec::<usize, MAX_ENTRIES>::new();
        let mut last_end = u64::from(FIRST_PARTITION_OFFSET);
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = |error| CsvError {
                line: Some(i + 1),
                error,
            };
            let row = parse_row(line, entries.len(), last_end).map_err(at)?;
            last_end = row.end();
            entries.push(row).map_err(|_| at(Error::TooManyEntries))?;
            // Same capacity as `entries`, so this push cannot fail after that one.
            let _ = lines.push(i + 1);
        }
        let table = Self { entries };
        table.validate().map_err(|(entry, error)| CsvError {
            line: entry.and_then(|e| lines.get(e).copied()),
            error,
        })?;
        Ok(table)
    }

    /// Writes the table as CSV that [`PartitionTable::from_csv`] and
    /// `gen_esp32part.py` read back to the same table: every offset explicit,
    /// names where the type and subtype have them, laid out as espflash's
    /// `partition-table --to-csv` lays it out.
    pub fn write_csv<W: fmt::Write>(&self, out: &mut W) -> fmt::Result {
        out.write_str("# ESP-IDF Partition Table\n")?;
        out.write_str("# Name,Type,SubType,Offset,Size,Flags\n")?;
        for p in self.partitions() {
            write!(out, "{},{},", p.label, p.ty)?;
            match p.subtype_name() {
                Some(name) => out.write_str(name)?,
                None => write!(out, "{:#04x}", p.subtype.0)?,
            }
            writeln!(out, ",{:#x},{:#x},{}", p.offset, p.size, p.flags)?;
        }
        Ok(())
    }
}

/// One CSV line, already trimmed and known not to be a comment. `entry` is the
/// partition's index, for label errors; `last_end` is where the previous
/// partition ended, for a blank offset.
fn parse_row(line: &str, entry: usize, last_end: u64) -> Result<Partition, Error> {
    let mut fields = line.split(',').map(str::trim);
    let mut next = || fields.next().unwrap_or("");
    let (name, ty, subtype, offset, size, flags) = (next(), next(), next(), next(), next(), next());
    // `gen_esp32part.py` ignores anything past the flags; only empty trailing
    // fields (a stray comma) are let through here, since text there is a mistake.
    if fields.any(|f| !f.is_empty()) {
        return Err(Error::TooManyFields);
    }

    if name.is_empty() {
        return Err(Error::MissingField(Field::Name));
    }
    let label = Label::new(name).map_err(|error| Error::Label { entry, error })?;

    if ty.is_empty() {
        return Err(Error::MissingField(Field::Type));
    }
    let ty = match PartitionType::from_name(ty) {
        Some(ty) => ty,
        None => PartitionType(parse_u8(ty).ok_or(Error::BadType)?),
    };

    let subtype = if subtype.is_empty() {
        if ty == PartitionType::APP {
            return Err(Error::MissingField(Field::SubType));
        }
        SubType::UNDEFINED
    } else {
        match SubType::from_name(ty, subtype) {
            Some(sub) => sub,
            None => SubType(parse_u8(subtype).ok_or(Error::BadSubtype)?),
        }
    };

    if size.is_empty() {
        return Err(Error::MissingField(Field::Size));
    }
    let size = parse_number(size).ok_or(Error::BadNumber(Field::Size))?;

    let offset = if offset.is_empty() {
        let align = u64::from(ty.alignment());
        let padded = last_end.div_ceil(align) * align;
        u32::try_from(padded).map_err(|_| Error::OutOfRange { label })?
    } else {
        parse_number(offset).ok_or(Error::BadNumber(Field::Offset))?
    };

    let mut parsed = Flags::NONE;
    for flag in flags.split(':').map(str::trim) {
        parsed = parsed.union(match flag {
            "" => Flags::NONE,
            "encrypted" => Flags::ENCRYPTED,
            "readonly" => Flags::READONLY,
            _ => return Err(Error::UnknownFlag),
        });
    }

    Ok(Partition {
        label,
        ty,
        subtype,
        offset,
        size,
        flags: parsed,
    })
}

fn parse_u8(text: &str) -> Option<u8> {
    parse_int(text).and_then(|n| u8::try_from(n).ok())
}

/// An offset or size: an integer with an optional `K`/`M` suffix, as
/// `gen_esp32part.py`'s `parse_int()` reads it.
fn parse_number(text: &str) -> Option<u32> {
    let (digits, scale) = match text.as_bytes().last()? {
        b'k' | b'K' => (&text[..text.len() - 1], 1024),
        b'm' | b'M' => (&text[..text.len() - 1], 1024 * 1024),
        _ => (text, 1),
    };
    parse_int(digits)?.checked_mul(scale)
}

/// An integer the way Python's `int(text, 0)` reads one: `0x`, `0o`, `0b` or decimal.
fn parse_int(text: &str) -> Option<u32> {
    let lower = |p: &str| text.get(..2).is_some_and(|h| h.eq_ignore_ascii_case(p));
    let (digits, radix) = if lower("0x") {
        (&text[2..], 16)
    } else if lower("0o") {
        (&text[2..], 8)
    } else if lower("0b") {
        (&text[2..], 2)
    } else {
        (text, 10)
    };
    // from_str_radix would take a sign after the prefix ("0x+1"); Python does not.
    if digits.is_empty() || digits.starts_with(['+', '-']) {
        return None;
    }
    u32::from_str_radix(digits, radix).ok()
}

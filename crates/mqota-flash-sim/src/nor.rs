//! A SPI NOR flash that behaves like the chip on an ESP32 module.
//!
//! | property        | model                                                          |
//! |-----------------|----------------------------------------------------------------|
//! | erased state    | `0xFF`                                                         |
//! | read            | any offset and length ([`ReadNorFlash::READ_SIZE`] = 1)        |
//! | write (program) | 4-byte aligned offset and length; only clears bits             |
//! | erase           | whole 4 KiB sectors; an aligned 64 KiB run costs one block erase |
//! | power cut       | after N writes/erases, or after N bytes programmed/erased      |
//! | time            | accumulated from [`Timing`], datasheet-typical figures         |
//!
//! The sizes are esp-storage's: `WRITE_SIZE` 4 and `ERASE_SIZE` 4096. Its
//! `READ_SIZE` is 4 unless its `bytewise-read` feature is on; the model reads
//! bytewise, so code that must also run on esp-storage's default should keep
//! its reads word aligned (the core's otadata and image readers do).
//!
//! # Writes that would set bits
//!
//! Real NOR ANDs the programmed data into the cells: a 1 written over a 0 stays
//! 0 and nobody is told. In this project that only ever happens when code forgot
//! an erase, so in *strict* mode (the default) such a write fails with
//! [`SimError::WouldSetBits`] and changes nothing. With strict mode off the
//! model ANDs, like the chip.
//!
//! [`MultiwriteNorFlash`] is implemented because writing the same word again
//! to clear further bits is exactly what the model (and esp-storage) allows.
//! Strict mode narrows that contract on purpose: a rewrite is accepted only if
//! the result equals the data written, i.e. the caller clears bits and keeps
//! already-cleared ones cleared. Code that writes `0xFF` as "leave alone" over
//! programmed bytes must turn strict mode off.
//!
//! # Power cuts
//!
//! [`SimFlash::cut_power_after_ops`]`(n)` lets `n` more writes/erases complete
//! and cuts the power as the next one starts: it changes nothing.
//! [`SimFlash::cut_power_after_bytes`]`(n)` lets `n` more bytes be programmed
//! or erased (an erased sector counts 4096): the write that crosses the budget
//! leaves only a prefix programmed; the erase that crosses it leaves that sector
//! half done, its first part `0xFF` and the rest the old data. After a cut
//! every operation fails with [`SimError::PowerCut`] until
//! [`SimFlash::power_on`], the reboot.
//!
//! # Memory: only what was written
//!
//! The contents are kept sector by sector over a base image: none (every
//! sector erased, nothing allocated) for [`SimFlash::new`], or one shared
//! with other flashes through an [`Arc`] ([`SimFlash::from_shared`], e.g. the
//! partition table and first image of a thousand virtual devices). A sector
//! is copied on its first change and freed again by an erase, so a flash
//! costs 4 KiB per sector written since it was made
//! ([`SimFlash::private_bytes`]). Where the bytes live changes nothing of
//! the rules above.
//!
//! # Backing stores
//!
//! [`SimFlash<Memory>`] lives in memory; [`SimFlash<FileStore>`] mirrors every
//! change into a file before the operation returns, so a later process (a
//! "rebooted" virtual device) finds the flash as it was left, torn writes and
//! all.

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use embedded_storage::nor_flash::{
    ErrorType, MultiwriteNorFlash, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash,
};

use crate::cells::Cells;

/// The flash geometry the model implements: the core's, so the two never
/// disagree (sector erase unit, 64 KiB block erase, 4-byte program word).
pub use mqota_core::layout::{BLOCK_SIZE, SECTOR_SIZE, WORD_SIZE};

/// What a flash operation can fail with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// Offset or length not a multiple of the write or erase unit: a caller bug.
    #[error("flash access not aligned")]
    NotAligned,
    /// The range runs past the end of the flash: a caller bug.
    #[error("flash access out of bounds")]
    OutOfBounds,
    /// Strict mode: the write would need a 0 bit to become 1, which needs an
    /// erase first. Nothing was written. Erase the sector, or turn strict off
    /// if AND-ing is intended.
    #[error("write at {offset:#x} would set bits that are 0 (erase first)")]
    WouldSetBits {
        /// Flash offset of the first offending byte.
        offset: u32,
    },
    /// Single-write mode ([`SingleWrite`]): the word at `offset` was
    /// already programmed since its sector was last erased. A flash that
    /// does not implement `MultiwriteNorFlash` promises nothing for a second
    /// program of a word; the caller must erase first or require
    /// `MultiwriteNorFlash`. Nothing was written.
    #[error("word at {offset:#x} programmed twice without an erase")]
    Rewrite {
        /// Flash offset of the word.
        offset: u32,
    },
    /// The power is off (a simulated cut). Call [`SimFlash::power_on`] to
    /// reboot, then look at what the flash holds.
    #[error("power cut")]
    PowerCut,
    /// The backing file could not be read or written. The in-memory image
    /// already has the change; report, the file may be stale.
    #[error("backing file: {0:?}")]
    Io(std::io::ErrorKind),
}

impl NorFlashError for SimError {
    fn kind(&self) -> NorFlashErrorKind {
        match self {
            SimError::NotAligned => NorFlashErrorKind::NotAligned,
            SimError::OutOfBounds => NorFlashErrorKind::OutOfBounds,
            _ => NorFlashErrorKind::Other,
        }
    }
}

/// Datasheet-typical timings of a SPI NOR part, used to add up how long a
/// sequence of operations would take on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// One 4 KiB sector erase.
    pub sector_erase: Duration,
    /// One 64 KiB block erase.
    pub block_erase: Duration,
    /// Programming one page (or any part of it).
    pub page_program: Duration,
    /// Program page size: a write costs one `page_program` per page touched.
    pub page_size: u32,
    /// Read throughput in bytes per second.
    pub read_bytes_per_sec: u64,
}

impl Timing {
    /// Typical figures: 30 ms sector erase, 150 ms block erase, 0.7 ms per
    /// 256-byte page program, reads at 80 MHz quad I/O (4 bits per clock).
    pub const TYPICAL: Timing = Timing {
        sector_erase: Duration::from_millis(30),
        block_erase: Duration::from_millis(150),
        page_program: Duration::from_micros(700),
        page_size: 256,
        read_bytes_per_sec: 80_000_000 / 2,
    };
}

impl Default for Timing {
    fn default() -> Self {
        Timing::TYPICAL
    }
}

/// Counts of operations since creation or [`SimFlash::reset_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// `read` calls.
    pub reads: u64,
    /// `write` calls that reached the chip (including a cut one).
    pub writes: u64,
    /// `erase` calls that reached the chip (including a cut one).
    pub erases: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes programmed.
    pub bytes_written: u64,
    /// Bytes erased.
    pub bytes_erased: u64,
    /// 4 KiB sector-erase commands.
    pub sector_erases: u64,
    /// 64 KiB block-erase commands.
    pub block_erases: u64,
}

impl Stats {
    /// Writes plus erases: the operations a power cut can interrupt.
    pub fn mutating_ops(&self) -> u64 {
        self.writes + self.erases
    }
}

/// Where the model keeps a copy of its contents besides memory.
pub trait Backing {
    /// Store `bytes`, the new contents at `offset`, before the operation returns.
    fn persist(&mut self, offset: usize, bytes: &[u8]) -> std::io::Result<()>;
}

/// No copy: the flash lives only as long as the value.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory;

impl Backing for Memory {
    fn persist(&mut self, _offset: usize, _bytes: &[u8]) -> std::io::Result<()> {
        Ok(())
    }
}

/// A file holding the raw flash image, written through on every change.
#[derive(Debug)]
pub struct FileStore {
    file: File,
    sync: bool,
}

impl Backing for FileStore {
    fn persist(&mut self, offset: usize, bytes: &[u8]) -> std::io::Result<()> {
        self.file.seek(SeekFrom::Start(offset as u64))?;
        self.file.write_all(bytes)?;
        if self.sync {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    AfterOps(u64),
    AfterBytes(u64),
}

/// The NOR flash model; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct SimFlash<B: Backing = Memory> {
    cells: Cells,
    backing: B,
    strict: bool,
    powered: bool,
    cut: Option<Cut>,
    stats: Stats,
    timing: Timing,
    elapsed: Duration,
}

impl SimFlash<Memory> {
    /// An erased flash of `size` bytes (a multiple of 4 KiB). It allocates
    /// nothing until a sector is written.
    pub fn new(size: usize) -> Self {
        Self::with_cells(Cells::erased(size), Memory)
    }

    /// A flash holding `bytes`, e.g. a dump read from a file.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self::with_backing(bytes, Memory)
    }

    /// A flash that starts as `base`, shared with every other flash made
    /// from it and never changed: a sector is copied on its first change,
    /// so each flash holds only what it wrote ([`private_bytes`](Self::private_bytes)).
    pub fn from_shared(base: Arc<[u8]>) -> Self {
        Self::with_cells(Cells::over(base), Memory)
    }
}

impl SimFlash<FileStore> {
    /// Open the flash image at `path`, or create it erased with `size` bytes.
    /// An existing file must be exactly `size` bytes long. With `sync`, every
    /// change is also `fsync`ed (survives a host crash, not just a process exit).
    pub fn open_file(path: impl AsRef<Path>, size: usize, sync: bool) -> std::io::Result<Self> {
        let path = path.as_ref();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let len = file.metadata()?.len();
        let data = if len == 0 {
            file.write_all(&vec![0xFF; size])?;
            file.sync_all()?;
            return Ok(Self::with_cells(
                Cells::erased(size),
                FileStore { file, sync },
            ));
        } else if len == size as u64 {
            let mut data = Vec::with_capacity(size);
            file.read_to_end(&mut data)?;
            data
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} is {len} bytes, expected a {size}-byte flash image",
                    path.display()
                ),
            ));
        };
        Ok(Self::with_backing(data, FileStore { file, sync }))
    }
}

impl<B: Backing> SimFlash<B> {
    /// A flash holding `bytes`, mirrored into `backing`.
    pub fn with_backing(bytes: Vec<u8>, backing: B) -> Self {
        Self::with_cells(Cells::over(bytes.into()), backing)
    }

    fn with_cells(cells: Cells, backing: B) -> Self {
        SimFlash {
            cells,
            backing,
            strict: true,
            powered: true,
            cut: None,
            stats: Stats::default(),
            timing: Timing::TYPICAL,
            elapsed: Duration::ZERO,
        }
    }

    /// The whole contents (borrowed from the base image while nothing was
    /// written, else assembled).
    pub fn data(&self) -> Cow<'_, [u8]> {
        self.cells.contents()
    }

    /// The whole contents, owned.
    pub fn into_data(self) -> Vec<u8> {
        self.cells.contents().into_owned()
    }

    /// Bytes this flash holds for itself: 4 KiB for each sector that differs
    /// from the base image it started from (an erased sector over an erased
    /// base costs nothing). What a virtual device's flash costs beyond the
    /// shared image.
    pub fn private_bytes(&self) -> usize {
        self.cells.private_bytes()
    }

    /// A new in-memory flash with the same contents (the base still shared,
    /// written sectors copied), power on, no cut planned, counters and time
    /// at zero, the same strict mode and timing: the flash as a device
    /// would find it after a reboot, to run one of many futures from.
    pub fn snapshot(&self) -> SimFlash<Memory> {
        let mut f = SimFlash::with_cells(self.cells.clone(), Memory);
        f.strict = self.strict;
        f.timing = self.timing;
        f
    }

    /// Change bytes directly, bypassing every NOR rule, the counters, the
    /// power state and the backing file: for tests that plant corruption.
    /// The guard holds a copy of the whole contents and puts back what
    /// changed when it is dropped.
    pub fn raw_mut(&mut self) -> RawMut<'_> {
        let bytes = self.cells.contents().into_owned();
        RawMut {
            cells: &mut self.cells,
            bytes,
        }
    }

    /// Is strict mode on (the default)? See the module docs.
    pub fn strict(&self) -> bool {
        self.strict
    }

    /// Turn strict mode on or off.
    pub fn set_strict(&mut self, strict: bool) {
        self.strict = strict;
    }

    /// Replace the timing figures.
    pub fn set_timing(&mut self, timing: Timing) {
        self.timing = timing;
    }

    /// Modelled device time spent in operations so far.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// Operation counts so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Zero the counters and the modelled time.
    pub fn reset_stats(&mut self) {
        self.stats = Stats::default();
        self.elapsed = Duration::ZERO;
    }

    /// Let `n` more writes/erases complete, then cut the power as the next
    /// one starts (it changes nothing).
    pub fn cut_power_after_ops(&mut self, n: u64) {
        self.cut = Some(Cut::AfterOps(n));
    }

    /// Let `n` more bytes be programmed or erased, then cut the power in the
    /// middle of the operation that crosses the budget.
    pub fn cut_power_after_bytes(&mut self, n: u64) {
        self.cut = Some(Cut::AfterBytes(n));
    }

    /// Cancel a planned cut.
    pub fn disarm(&mut self) {
        self.cut = None;
    }

    /// Is the power on?
    pub fn is_powered(&self) -> bool {
        self.powered
    }

    /// Reboot after a cut: power on, no cut planned. The contents are what the
    /// cut left.
    pub fn power_on(&mut self) {
        self.powered = true;
        self.cut = None;
    }

    /// What `esptool write_flash` does: erase the sectors `bytes` covers, then
    /// program them (padded with `0xFF` to a whole word). The rest of those
    /// sectors ends up erased. Counts as ordinary operations.
    pub fn write_flash(&mut self, offset: u32, bytes: &[u8]) -> Result<(), SimError> {
        if !offset.is_multiple_of(SECTOR_SIZE) {
            return Err(SimError::NotAligned);
        }
        let end = offset as u64 + bytes.len() as u64;
        let erase_end = end.div_ceil(SECTOR_SIZE as u64) * SECTOR_SIZE as u64;
        if erase_end > self.cells.len() as u64 {
            return Err(SimError::OutOfBounds);
        }
        NorFlash::erase(self, offset, erase_end as u32)?;
        let whole = bytes.len() - bytes.len() % WORD_SIZE as usize;
        NorFlash::write(self, offset, &bytes[..whole])?;
        if whole < bytes.len() {
            let mut last = [0xFF; WORD_SIZE as usize];
            last[..bytes.len() - whole].copy_from_slice(&bytes[whole..]);
            NorFlash::write(self, offset + whole as u32, &last)?;
        }
        Ok(())
    }

    fn check_powered(&self) -> Result<(), SimError> {
        if self.powered {
            Ok(())
        } else {
            Err(SimError::PowerCut)
        }
    }

    fn check_range(&self, offset: u32, len: usize) -> Result<(), SimError> {
        match (offset as usize).checked_add(len) {
            Some(end) if end <= self.cells.len() => Ok(()),
            _ => Err(SimError::OutOfBounds),
        }
    }

    fn cut_now(&mut self) -> SimError {
        self.powered = false;
        self.cut = None;
        SimError::PowerCut
    }

    /// Starts a mutating operation of `len` bytes: how many bytes of it happen
    /// before the power goes (`len` when it completes).
    fn budget(&mut self, len: u64) -> u64 {
        match &mut self.cut {
            None => len,
            Some(Cut::AfterOps(0)) => 0,
            Some(Cut::AfterOps(n)) => {
                *n -= 1;
                len
            }
            Some(Cut::AfterBytes(r)) => {
                let done = (*r).min(len);
                *r -= done;
                // An exhausted budget cuts the *next* operation, so a budget
                // that ends exactly on an operation boundary leaves that
                // operation complete.
                if done < len {
                    self.cut = Some(Cut::AfterOps(0));
                }
                done
            }
        }
    }

    fn persist(&mut self, offset: usize, len: usize) -> Result<(), SimError> {
        let backing = &mut self.backing;
        self.cells
            .each_piece(offset, len, |at, bytes| backing.persist(at, bytes))
            .map_err(|e| SimError::Io(e.kind()))
    }

    fn program_time(&self, offset: u32, len: usize) -> Duration {
        if len == 0 {
            return Duration::ZERO;
        }
        let page = self.timing.page_size.max(1) as u64;
        let first = offset as u64 / page;
        let last = (offset as u64 + len as u64 - 1) / page;
        self.timing.page_program * (last - first + 1) as u32
    }
}

impl<B: Backing> ErrorType for SimFlash<B> {
    type Error = SimError;
}

impl<B: Backing> ReadNorFlash for SimFlash<B> {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), SimError> {
        self.check_powered()?;
        self.check_range(offset, bytes.len())?;
        self.cells.read(offset as usize, bytes);
        self.stats.reads += 1;
        self.stats.bytes_read += bytes.len() as u64;
        let rate = self.timing.read_bytes_per_sec.max(1);
        self.elapsed += Duration::from_nanos(bytes.len() as u64 * 1_000_000_000 / rate);
        Ok(())
    }

    fn capacity(&self) -> usize {
        self.cells.len()
    }
}

impl<B: Backing> NorFlash for SimFlash<B> {
    const WRITE_SIZE: usize = WORD_SIZE as usize;
    const ERASE_SIZE: usize = SECTOR_SIZE as usize;

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), SimError> {
        self.check_powered()?;
        if !offset.is_multiple_of(WORD_SIZE) || !bytes.len().is_multiple_of(WORD_SIZE as usize) {
            return Err(SimError::NotAligned);
        }
        self.check_range(offset, bytes.len())?;
        let start = offset as usize;
        if self.strict {
            if let Some(i) = self.cells.first_bit_to_set(start, bytes) {
                return Err(SimError::WouldSetBits {
                    offset: offset + i as u32,
                });
            }
        }
        let done = self.budget(bytes.len() as u64) as usize;
        if done == 0 && !bytes.is_empty() {
            return Err(self.cut_now());
        }
        self.cells.program(start, &bytes[..done]);
        self.stats.writes += 1;
        self.stats.bytes_written += done as u64;
        self.elapsed += self.program_time(offset, done);
        let persisted = self.persist(start, done);
        if done < bytes.len() {
            return Err(self.cut_now());
        }
        persisted
    }

    fn erase(&mut self, from: u32, to: u32) -> Result<(), SimError> {
        self.check_powered()?;
        if from > to || to as usize > self.cells.len() {
            return Err(SimError::OutOfBounds);
        }
        if !from.is_multiple_of(SECTOR_SIZE) || !to.is_multiple_of(SECTOR_SIZE) {
            return Err(SimError::NotAligned);
        }
        let done = self.budget((to - from) as u64) as u32;
        if done == 0 && to > from {
            return Err(self.cut_now());
        }
        let end = from + done;
        self.cells.erase(from as usize, done as usize);
        // The sector the cut falls in is left half erased: its first part
        // 0xFF, the rest still the old data. That is `done` bytes total already.
        self.stats.erases += 1;
        self.stats.bytes_erased += done as u64;
        // Commands the chip would receive for the part that ran: 64 KiB
        // blocks where aligned and whole, sectors elsewhere.
        let mut at = from;
        while at < end.min(to) {
            if at.is_multiple_of(BLOCK_SIZE) && to - at >= BLOCK_SIZE {
                self.stats.block_erases += 1;
                self.elapsed += self.timing.block_erase;
                at += BLOCK_SIZE;
            } else {
                self.stats.sector_erases += 1;
                self.elapsed += self.timing.sector_erase;
                at += SECTOR_SIZE;
            }
        }
        let persisted = self.persist(from as usize, done as usize);
        if end < to {
            return Err(self.cut_now());
        }
        persisted
    }
}

impl<B: Backing> MultiwriteNorFlash for SimFlash<B> {}

/// The whole contents of a [`SimFlash`], to change freely
/// ([`SimFlash::raw_mut`]); what changed is put back when it is dropped.
pub struct RawMut<'a> {
    cells: &'a mut Cells,
    bytes: Vec<u8>,
}

impl Deref for RawMut<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl DerefMut for RawMut<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }
}

impl Drop for RawMut<'_> {
    fn drop(&mut self) {
        self.cells.overwrite(0, &self.bytes);
    }
}

/// A strict single-write view of a flash: a plain `NorFlash` (deliberately
/// **not** `MultiwriteNorFlash`) that refuses to program any 4-byte word a
/// second time before its sector is erased ([`SimError::Rewrite`]).
///
/// `embedded-storage` allows a second program of a word only to flashes that
/// implement `MultiwriteNorFlash`. Code that needs only `NorFlash` runs on
/// this view in tests, so a rewrite that would work on the NOR model (which
/// ANDs bits like the real chip) but break on a flash with ECC or a
/// controller that forbids it is caught.
#[derive(Debug)]
pub struct SingleWrite<F> {
    inner: F,
    /// One flag per word: programmed since the last erase of its sector.
    programmed: Vec<bool>,
}

impl<F: NorFlash> SingleWrite<F> {
    /// Wraps `inner`. A word that does not read as all ones has been
    /// programmed, so it counts as programmed until its sector is erased;
    /// an all-ones word counts as erased (programming it with ones changed
    /// nothing, so a later program is its first real one).
    pub fn new(mut inner: F) -> Self {
        let words = inner.capacity() / WORD_SIZE as usize;
        let mut programmed = vec![false; words];
        let mut chunk = [0u8; SECTOR_SIZE as usize];
        for (s, marks) in programmed
            .chunks_mut(SECTOR_SIZE as usize / WORD_SIZE as usize)
            .enumerate()
        {
            let at = s as u32 * SECTOR_SIZE;
            let n = marks.len() * WORD_SIZE as usize;
            if inner.read(at, &mut chunk[..n]).is_err() {
                continue;
            }
            for (mark, word) in marks.iter_mut().zip(chunk[..n].chunks_exact(4)) {
                *mark = word != [0xFF; 4];
            }
        }
        Self { inner, programmed }
    }

    /// The wrapped flash.
    pub fn into_inner(self) -> F {
        self.inner
    }
}

impl<F: NorFlash<Error = SimError>> embedded_storage::nor_flash::ErrorType for SingleWrite<F> {
    type Error = SimError;
}

impl<F: NorFlash<Error = SimError>> ReadNorFlash for SingleWrite<F> {
    const READ_SIZE: usize = F::READ_SIZE;
    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), SimError> {
        self.inner.read(offset, bytes)
    }
    fn capacity(&self) -> usize {
        self.inner.capacity()
    }
}

impl<F: NorFlash<Error = SimError>> NorFlash for SingleWrite<F> {
    const WRITE_SIZE: usize = F::WRITE_SIZE;
    const ERASE_SIZE: usize = F::ERASE_SIZE;
    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), SimError> {
        let first = (offset / WORD_SIZE) as usize;
        let words = bytes.len().div_ceil(WORD_SIZE as usize);
        let range = first..(first + words).min(self.programmed.len());
        if let Some(i) = range.clone().find(|&i| self.programmed[i]) {
            return Err(SimError::Rewrite {
                offset: i as u32 * WORD_SIZE,
            });
        }
        self.inner.write(offset, bytes)?;
        self.programmed[range].iter_mut().for_each(|p| *p = true);
        Ok(())
    }
    fn erase(&mut self, from: u32, to: u32) -> Result<(), SimError> {
        self.inner.erase(from, to)?;
        let words = self.programmed.len();
        let (a, b) = ((from / WORD_SIZE) as usize, (to / WORD_SIZE) as usize);
        self.programmed[a.min(words)..b.min(words)]
            .iter_mut()
            .for_each(|p| *p = false);
        Ok(())
    }
}

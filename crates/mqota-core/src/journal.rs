//! The update journal: what mqota keeps on flash so that a download can resume
//! after a reboot and a trial boot can be judged after a crash.
//!
//! ESP-IDF keeps nothing of the kind: `esp_https_ota` starts from zero after
//! any interruption, and the rollback bootloader knows only the four otadata
//! states. mqota needs more (the job that produced an image, how far its
//! download got, whether a trial boot already started), and it needs it in a
//! place that works with *any* partition table the user ships. So the journal
//! lives in the **last 4 KiB sector of each OTA slot**, outside the image: an
//! image may fill at most `slot size - 4 KiB` (the engine refuses larger ones
//! with `too_large`). The bootloader never reads past an image's end, so the
//! sector is invisible to it.
//!
//! The journal of a slot describes the image being written into, or last
//! written into, that slot. It is erased exactly once per job, when the
//! download into the slot starts (the slot is inactive then). After that it is
//! only ever *programmed*, and only by clearing bits, so every update to it is
//! a single NOR write that a power cut either completes, leaves undone, or
//! leaves as a prefix, and each field below reads correctly in all three cases.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `MQJ1` |
//! | 4 | 4 | CRC-32 of the job record |
//! | 8 | 384 | job record: url, job id, version, sha256, size, timeout |
//! | 1024 | 4 | `activated`: image verified and selected in otadata |
//! | 1028 | 4 | `trial_started`: the image has booted once on trial |
//! | 1032 | 4 | `confirmed`: the trial passed |
//! | 1036 | 4 | `rolled_back`: first byte holds the [`RollbackReason`] |
//! | 1040 | 4 | `reported`: the outcome has been published |
//! | 1044 | 4 | `abandoned`: the download failed or was cancelled; do not resume. First byte: the error code (its index in `ErrorCode::ALL`) |
//! | 2048 | 2048 | page bitmap: bit *i* cleared once 4 KiB page *i* of the image is written |
//!
//! Each flag word is programmed once per erase. The page bitmap is the one
//! exception: 32 pages share a word and each mark clears one more bit, a
//! second program of the word that `embedded-storage` allows only on a
//! `MultiwriteNorFlash` (see [`Journal::mark_page`]).
//!
//! A flag word reads as set when it is not all ones, so a write cut short
//! after its first byte still counts: the action it records had already
//! happened when the write started.

use crate::protocol::{ErrorCode, Job, JobId};
use embedded_storage::nor_flash::{
    MultiwriteNorFlash, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash,
};
use heapless::String;

/// The journal occupies one 4 KiB sector at the end of every OTA slot.
pub const JOURNAL_SIZE: u32 = 4096;
/// Images are written and tracked in pages of this many bytes (one sector).
pub const PAGE_SIZE: u32 = 4096;

const MAGIC: [u8; 4] = *b"MQJ1";
const RECORD_OFFSET: u32 = 8;
const RECORD_LEN: usize = 384;
const FLAGS_OFFSET: u32 = 1024;
const BITMAP_OFFSET: u32 = 2048;
const BITMAP_LEN: u32 = 2048;

const URL_MAX: usize = crate::protocol::MAX_URL_LEN;
const JOB_MAX: usize = crate::protocol::MAX_JOB_ID_LEN;
const VERSION_MAX: usize = crate::protocol::MAX_VERSION_LEN;

/// One-way flags of a journal, in the order an update sets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Flag {
    /// The image was verified and otadata now selects its slot.
    Activated = 0,
    /// The image has started (at least) one trial boot.
    TrialStarted = 1,
    /// The image passed its trial and is marked valid.
    Confirmed = 2,
    /// The image was left for the previous one; see [`RollbackReason`].
    RolledBack = 3,
    /// The final outcome of this journal's job has been published.
    Reported = 4,
    /// The download failed or was cancelled: never resume it.
    Abandoned = 5,
}

/// Why an image was left for the previous one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RollbackReason {
    /// The image booted but its health check failed.
    HealthCheckFailed = 1,
    /// A trial boot of the image died (crash, hang, watchdog, power loss).
    BootFailed = 2,
    /// An operator asked for the previous image.
    Requested = 3,
}

impl RollbackReason {
    fn from_byte(b: u8) -> Self {
        match b {
            1 => Self::HealthCheckFailed,
            3 => Self::Requested,
            // A torn or unknown reason byte: the only reason recorded without
            // a health check having run is a failed boot.
            _ => Self::BootFailed,
        }
    }
}

/// The job an image came from, as persisted in its slot's journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    /// Where the image is downloaded from (needed to resume after a reboot).
    pub url: String<URL_MAX>,
    /// The controller's job id, echoed in every progress event.
    pub job: Option<JobId>,
    /// The version the job announced.
    pub version: Option<String<VERSION_MAX>>,
    /// SHA-256 of the whole file, if the job gave one.
    pub sha256: Option<[u8; 32]>,
    /// Size of the whole file, if known.
    pub size: Option<u32>,
    /// Overall deadline of the job in seconds, if the job gave one.
    pub timeout_s: Option<u32>,
}

impl JobRecord {
    /// The record of a freshly accepted job.
    pub fn from_job(job: &Job) -> Self {
        Self {
            url: job.url.clone(),
            job: job.job.clone(),
            version: job.version.clone(),
            sha256: job.sha256,
            size: job.size,
            timeout_s: job.timeout_s,
        }
    }

    /// The job again, as the engine needs it to resume.
    pub fn to_job(&self) -> Job {
        Job {
            url: self.url.clone(),
            version: self.version.clone(),
            sha256: self.sha256,
            size: self.size,
            job: self.job.clone(),
            timeout_s: self.timeout_s,
            force: true,
            allow_downgrade: false,
            allow_other_project: false,
        }
    }

    fn encode(&self, out: &mut [u8; RECORD_LEN]) {
        out.fill(0);
        let mut w = Writer { buf: out, pos: 0 };
        w.str(&self.url, URL_MAX);
        w.str(self.job.as_deref().unwrap_or(""), JOB_MAX);
        w.u8(self.job.is_some() as u8);
        w.str(self.version.as_deref().unwrap_or(""), VERSION_MAX);
        w.u8(self.version.is_some() as u8);
        w.u8(self.sha256.is_some() as u8);
        w.bytes(&self.sha256.unwrap_or([0; 32]));
        w.u32(self.size.unwrap_or(u32::MAX));
        w.u32(self.timeout_s.unwrap_or(u32::MAX));
    }

    fn decode(buf: &[u8; RECORD_LEN]) -> Option<Self> {
        let mut r = Reader { buf, pos: 0 };
        let url = r.str::<URL_MAX>()?;
        let job = r.str::<JOB_MAX>()?;
        let has_job = r.u8()? != 0;
        let version = r.str::<VERSION_MAX>()?;
        let has_version = r.u8()? != 0;
        let has_sha = r.u8()? != 0;
        let sha: [u8; 32] = r.take(32)?.try_into().ok()?;
        let size = r.u32()?;
        let timeout = r.u32()?;
        Some(Self {
            url,
            job: has_job.then_some(job),
            version: has_version.then_some(version),
            sha256: has_sha.then_some(sha),
            size: (size != u32::MAX).then_some(size),
            timeout_s: (timeout != u32::MAX).then_some(timeout),
        })
    }
}

struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl Writer<'_> {
    fn bytes(&mut self, b: &[u8]) {
        self.buf[self.pos..self.pos + b.len()].copy_from_slice(b);
        self.pos += b.len();
    }
    fn u8(&mut self, v: u8) {
        self.bytes(&[v]);
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    /// A length-prefixed string in a fixed-size field.
    fn str(&mut self, s: &str, cap: usize) {
        self.u32(s.len() as u32);
        self.bytes(s.as_bytes());
        self.pos += cap - s.len();
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.buf.get(self.pos..self.pos + n)?;
        self.pos += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn str<const N: usize>(&mut self) -> Option<String<N>> {
        let len = self.u32()? as usize;
        if len > N {
            return None;
        }
        let field = self.take(N)?;
        let mut s = String::new();
        s.push_str(core::str::from_utf8(&field[..len]).ok()?).ok()?;
        Some(s)
    }
}

/// Errors of the journal: all of them are flash errors, reported as `flash`.
pub type JournalError = NorFlashErrorKind;

fn crc32(data: &[u8]) -> u32 {
    crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC).checksum(data)
}

/// The journal of one OTA slot: a view at a flash offset, holding no state of
/// its own, so it can never disagree with the flash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Journal {
    /// Flash offset of the journal sector.
    pub offset: u32,
}

impl Journal {
    /// The journal of the slot at `slot_offset` with `slot_size` bytes.
    pub fn for_slot(slot_offset: u32, slot_size: u32) -> Self {
        Self {
            offset: slot_offset + slot_size - JOURNAL_SIZE,
        }
    }

    /// Starts a new job: erases the journal and writes its record. Only ever
    /// called on the inactive slot.
    pub fn begin<F: NorFlash>(&self, flash: &mut F, job: &JobRecord) -> Result<(), JournalError> {
        flash
            .erase(self.offset, self.offset + JOURNAL_SIZE)
            .map_err(|e| e.kind())?;
        let mut record = [0u8; RECORD_LEN];
        job.encode(&mut record);
        // Record first, then the header that makes it count: a cut between the
        // two leaves a journal that reads as empty, which is what it is.
        flash
            .write(self.offset + RECORD_OFFSET, &record)
            .map_err(|e| e.kind())?;
        let mut header = [0u8; 8];
        header[..4].copy_from_slice(&MAGIC);
        header[4..].copy_from_slice(&crc32(&record).to_le_bytes());
        flash.write(self.offset, &header).map_err(|e| e.kind())
    }

    /// The job recorded in this journal, if it holds an intact one.
    pub fn job<F: ReadNorFlash>(&self, flash: &mut F) -> Result<Option<JobRecord>, JournalError> {
        let mut header = [0u8; 8];
        flash.read(self.offset, &mut header).map_err(|e| e.kind())?;
        if header[..4] != MAGIC {
            return Ok(None);
        }
        let mut record = [0u8; RECORD_LEN];
        flash
            .read(self.offset + RECORD_OFFSET, &mut record)
            .map_err(|e| e.kind())?;
        if crc32(&record).to_le_bytes() != header[4..8] {
            return Ok(None);
        }
        Ok(JobRecord::decode(&record))
    }

    fn flag_addr(&self, flag: Flag) -> u32 {
        self.offset + FLAGS_OFFSET + 4 * flag as u32
    }

    /// Whether `flag` is set.
    pub fn has<F: ReadNorFlash>(&self, flash: &mut F, flag: Flag) -> Result<bool, JournalError> {
        let mut w = [0u8; 4];
        flash
            .read(self.flag_addr(flag), &mut w)
            .map_err(|e| e.kind())?;
        Ok(w != [0xFF; 4])
    }

    /// Sets `flag` (a single bit-clearing write; setting it twice is harmless).
    pub fn set<F: NorFlash>(&self, flash: &mut F, flag: Flag) -> Result<(), JournalError> {
        if self.has(flash, flag)? {
            return Ok(());
        }
        flash
            .write(self.flag_addr(flag), &[0, 0, 0, 0])
            .map_err(|e| e.kind())
    }

    /// Records a rollback and why, unless one is recorded already (the first
    /// reason is the true one: a retried rollback must not overwrite it).
    pub fn set_rolled_back<F: NorFlash>(
        &self,
        flash: &mut F,
        reason: RollbackReason,
    ) -> Result<(), JournalError> {
        if self.has(flash, Flag::RolledBack)? {
            return Ok(());
        }
        flash
            .write(self.flag_addr(Flag::RolledBack), &[reason as u8, 0, 0, 0])
            .map_err(|e| e.kind())
    }

    /// Records that the job ended without an image (failed or cancelled) and
    /// with which error, unless an end is recorded already.
    pub fn set_abandoned<F: NorFlash>(
        &self,
        flash: &mut F,
        error: ErrorCode,
    ) -> Result<(), JournalError> {
        if self.has(flash, Flag::Abandoned)? {
            return Ok(());
        }
        let index = ErrorCode::ALL.iter().position(|e| *e == error).unwrap_or(0) as u8;
        flash
            .write(self.flag_addr(Flag::Abandoned), &[index, 0, 0, 0])
            .map_err(|e| e.kind())
    }

    /// The error the job ended with, if it was abandoned. A torn or unknown
    /// code byte reads as `None` (the job still counts as abandoned).
    pub fn abandon_error<F: ReadNorFlash>(
        &self,
        flash: &mut F,
    ) -> Result<Option<ErrorCode>, JournalError> {
        let mut w = [0u8; 4];
        flash
            .read(self.flag_addr(Flag::Abandoned), &mut w)
            .map_err(|e| e.kind())?;
        if w == [0xFF; 4] {
            return Ok(None);
        }
        Ok(ErrorCode::ALL.get(w[0] as usize).copied())
    }

    /// Why the image was rolled back, if it was.
    pub fn rollback_reason<F: ReadNorFlash>(
        &self,
        flash: &mut F,
    ) -> Result<Option<RollbackReason>, JournalError> {
        let mut w = [0u8; 4];
        flash
            .read(self.flag_addr(Flag::RolledBack), &mut w)
            .map_err(|e| e.kind())?;
        Ok((w != [0xFF; 4]).then(|| RollbackReason::from_byte(w[0])))
    }

    /// Marks image page `page` (4 KiB, counted from the slot start) as written.
    ///
    /// The only journal write that programs a word a second time (32 pages
    /// share one bitmap word, each mark clears one more bit), hence
    /// `MultiwriteNorFlash`, which esp-storage's `FlashStorage` implements.
    /// Every other journal write programs a word once per erase.
    pub fn mark_page<F: MultiwriteNorFlash>(
        &self,
        flash: &mut F,
        page: u32,
    ) -> Result<(), JournalError> {
        if page >= BITMAP_LEN * 8 {
            return Err(NorFlashErrorKind::OutOfBounds);
        }
        let addr = self.offset + BITMAP_OFFSET + (page / 32) * 4;
        let mut w = [0u8; 4];
        flash.read(addr, &mut w).map_err(|e| e.kind())?;
        let word = u32::from_le_bytes(w) & !(1 << (page % 32));
        flash.write(addr, &word.to_le_bytes()).map_err(|e| e.kind())
    }

    /// How many pages from the start of the image are written: the offset a
    /// download resumes from is this times [`PAGE_SIZE`].
    pub fn pages_done<F: ReadNorFlash>(&self, flash: &mut F) -> Result<u32, JournalError> {
        let mut done = 0;
        let mut chunk = [0u8; 64];
        let mut at = 0;
        while at < BITMAP_LEN {
            flash
                .read(self.offset + BITMAP_OFFSET + at, &mut chunk)
                .map_err(|e| e.kind())?;
            for word in chunk.chunks_exact(4) {
                let w = u32::from_le_bytes(word.try_into().unwrap_or([0xFF; 4]));
                // Pages are written in order, so the done pages are a prefix:
                // count the cleared low bits, stop at the first page not done.
                let cleared = (!w).trailing_ones();
                done += cleared;
                if cleared < 32 {
                    return Ok(done);
                }
            }
            at += chunk.len() as u32;
        }
        Ok(done)
    }
}

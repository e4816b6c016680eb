//! The field log: a small, bounded, power-cut-safe ring of records in the
//! device's own `log` partition, read back over MQTT (`{prefix}/{id}/logs/get`).
//!
//! # What goes in
//!
//! The device loop writes the boot (number, reason, version, slot), every
//! phase change of a job with its error and message, every loss and return
//! of the broker or the WiFi link (during a download: of the broker), and
//! the trial's outcome; the application
//! adds its own lines with [`log`](crate::log()). A record is the boot number,
//! the milliseconds since that boot, a level and a message of at most
//! [`MAX_LOG_MSG`] bytes; records are numbered one after another across boots.
//!
//! # Why `sequential-storage`
//!
//! The records live in a `sequential-storage` queue rather than a format of
//! our own. Its queue already does what a ring on NOR flash needs and is
//! easy to get subtly wrong: items never span a sector, each item header and
//! body carry a CRC (a half-written record is skipped, never misread),
//! sectors are erased only when the ring wraps (oldest sector first), and a
//! sector whose erase was cut is repaired on the next access. Its authors
//! test it against power loss at every flash operation, and we test it
//! again on our NOR model (`tests` below, every cut point of a write). The
//! crate's API is async over `embedded-storage-async`; the runtime's flash
//! is the blocking `embedded-storage` one, so [`BlockingAsync`] lends it
//! through a few lines of adapter (each call completes at once).
//!
//! # Bounded wear
//!
//! Records first go to a small RAM queue ([`PENDING`] records), from which
//! the device loop writes them to flash at its own pace, never during a
//! download (a `logs/get` that arrives during one is answered after it). A token bucket ([`Budget`]) lets at most [`BOOT_TOKENS`]
//! records through at boot, then refills one token per [`REFILL_MS`] up to
//! [`BURST`]; what does not fit waits in RAM, and what does not fit there is
//! counted and reported by a single "N records dropped" record. So one boot
//! writes at most `BURST + 3600 s / REFILL_MS` records an hour whatever the
//! application does, and each sector erase makes room for at least
//! [`RECORDS_PER_SECTOR`] records: see [`MAX_ERASES_PER_HOUR`].
//!
//! # Never in the way of an update
//!
//! A missing `log` partition disables the log; one that the queue cannot
//! read (garbage, another format) is erased once and started afresh. Either
//! way the device says so once on its console and in nothing else it does:
//! every log operation's failure is swallowed, and the update path never
//! waits on the log.

use core::cell::RefCell;
use core::ops::Range;

use critical_section::Mutex;
use embedded_storage::nor_flash::{ErrorType, NorFlash, ReadNorFlash};
use heapless::{Deque, String, Vec};
use mqota_core::partition::{PartitionTable, TABLE_OFFSET};
use mqota_core::protocol::{
    truncated, BootReason, LogLevel, LogRecord, LogsChunk, LogsGet, Topics, LOGS_PER_CHUNK,
    MAX_LOGS_CHUNK_JSON, MAX_LOG_MSG,
};
use sequential_storage::cache::Cache;
use sequential_storage::queue::{QueueConfig, QueueStorage};

/// The label of the log partition.
pub const LOG_PARTITION: &str = "log";
/// Records waiting in RAM for their turn to be written.
pub const PENDING: usize = 16;
/// Tokens at boot: records a boot may write before the first refill.
pub const BOOT_TOKENS: u32 = 8;
/// Most tokens the bucket holds.
pub const BURST: u32 = 32;
/// One token comes back every this many milliseconds.
pub const REFILL_MS: u64 = 5_000;
/// Bytes of a stored record before its message: number, boot, ms, level.
const HEADER: usize = 13;
/// Largest stored record.
const MAX_RECORD: usize = HEADER + MAX_LOG_MSG;
/// The queue reads whole flash words (and wants room for its largest word
/// size), so a read buffer is larger than a record.
const READ_BUF: usize = MAX_RECORD.next_multiple_of(32);
/// Flash sector size of the ESP32 family (and of the NOR model).
pub const SECTOR: u32 = 4096;
/// `sequential-storage`'s overhead per item (header with CRCs, word size 4).
const ITEM_OVERHEAD: usize = 8;
/// Records of the largest size one sector holds: its two state words aside,
/// each item is the overhead plus the record padded to a word.
pub const RECORDS_PER_SECTOR: u32 =
    ((SECTOR as usize - 8) / (ITEM_OVERHEAD + MAX_RECORD.div_ceil(4) * 4)) as u32;
/// Records one boot writes in an hour at most (the bucket full at the start,
/// then every refill).
pub const MAX_RECORDS_PER_HOUR: u32 = BURST + (3_600_000 / REFILL_MS) as u32;
/// Sector erases one boot causes in an hour at most: every
/// [`RECORDS_PER_SECTOR`] records fill a sector, and the ring erases the
/// oldest one to go on.
pub const MAX_ERASES_PER_HOUR: u32 = MAX_RECORDS_PER_HOUR.div_ceil(RECORDS_PER_SECTOR);

/// Why the log could not do something. The device carries on regardless.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum LogError {
    /// The partition table has no `log` partition (or none usable).
    NoPartition,
    /// The flash failed, or the queue found the partition unreadable.
    Flash,
}

/// Lends a blocking `embedded-storage` flash to an `embedded-storage-async`
/// user. Every call completes in its first poll.
pub struct BlockingAsync<'f, F>(pub &'f mut F);

impl<F: ErrorType> ErrorType for BlockingAsync<'_, F> {
    type Error = F::Error;
}

impl<F: ReadNorFlash> embedded_storage_async::nor_flash::ReadNorFlash for BlockingAsync<'_, F> {
    const READ_SIZE: usize = F::READ_SIZE;

    async fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        self.0.read(offset, bytes)
    }

    fn capacity(&self) -> usize {
        self.0.capacity()
    }
}

impl<F: NorFlash> embedded_storage_async::nor_flash::NorFlash for BlockingAsync<'_, F> {
    const WRITE_SIZE: usize = F::WRITE_SIZE;
    const ERASE_SIZE: usize = F::ERASE_SIZE;

    async fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
        self.0.erase(from, to)
    }

    async fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
        self.0.write(offset, bytes)
    }
}

/// The token bucket that bounds how fast records reach flash. Time is an
/// input (milliseconds since boot), so tests drive it with any clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    tokens: u32,
    refilled_ms: u64,
}

impl Budget {
    /// A bucket at boot: [`BOOT_TOKENS`] tokens.
    pub const fn new(now_ms: u64) -> Self {
        Self {
            tokens: BOOT_TOKENS,
            refilled_ms: now_ms,
        }
    }

    /// Takes a token if there is one at `now_ms`.
    pub fn take(&mut self, now_ms: u64) -> bool {
        let back = now_ms.saturating_sub(self.refilled_ms) / REFILL_MS;
        if back > 0 {
            self.tokens = (self.tokens as u64 + back).min(BURST as u64) as u32;
            self.refilled_ms += back * REFILL_MS;
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// A record not yet written: it gets its number and boot when written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Note {
    ms: u32,
    level: LogLevel,
    msg: String<MAX_LOG_MSG>,
}

/// A bounded RAM queue of records waiting for flash, safe to fill from any
/// task or interrupt. When full, new records are dropped and counted.
pub struct Pending {
    inner: Mutex<RefCell<(Deque<Note, PENDING>, u32)>>,
}

impl Default for Pending {
    fn default() -> Self {
        Self::new()
    }
}

impl Pending {
    /// An empty queue.
    pub const fn new() -> Self {
        Self {
            inner: Mutex::new(RefCell::new((Deque::new(), 0))),
        }
    }

    /// Queues a record made at `ms` since boot.
    pub fn push(&self, ms: u64, level: LogLevel, msg: &str) {
        critical_section::with(|cs| {
            let mut q = self.inner.borrow_ref_mut(cs);
            let note = Note {
                ms: ms.min(u32::MAX as u64) as u32,
                level,
                msg: truncated(msg),
            };
            if q.0.push_back(note).is_err() {
                q.1 = q.1.saturating_add(1);
            }
        })
    }

    fn front(&self) -> Option<Note> {
        critical_section::with(|cs| self.inner.borrow_ref(cs).0.front().cloned())
    }

    fn pop(&self) {
        critical_section::with(|cs| {
            self.inner.borrow_ref_mut(cs).0.pop_front();
        })
    }

    fn take_dropped(&self) -> u32 {
        critical_section::with(|cs| core::mem::take(&mut self.inner.borrow_ref_mut(cs).1))
    }

    fn add_dropped(&self, n: u32) {
        critical_section::with(|cs| {
            let mut q = self.inner.borrow_ref_mut(cs);
            q.1 = q.1.saturating_add(n);
        })
    }

    /// Records waiting.
    pub fn len(&self) -> usize {
        critical_section::with(|cs| self.inner.borrow_ref(cs).0.len())
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the application logs through [`log`](crate::log()), waiting for the
/// device loop. One per program: a process running several virtual devices
/// shares it, and whichever device flushes first stores it.
pub static APP_LOG: Pending = Pending::new();

/// Adds a line to the device's field log (at most [`MAX_LOG_MSG`] bytes are
/// kept). Cheap and safe from any task: the line waits in RAM until the
/// device loop writes it, within the log's wear budget.
pub fn log(level: LogLevel, msg: &str) {
    APP_LOG.push(embassy_time::Instant::now().as_millis(), level, msg);
}

fn encode(r: &LogRecord, buf: &mut [u8; MAX_RECORD]) -> usize {
    buf[0..4].copy_from_slice(&r.n.to_le_bytes());
    buf[4..8].copy_from_slice(&r.boot.to_le_bytes());
    buf[8..12].copy_from_slice(&r.ms.to_le_bytes());
    buf[12] = r.level.code();
    let m = r.msg.as_bytes();
    buf[HEADER..HEADER + m.len()].copy_from_slice(m);
    HEADER + m.len()
}

fn decode(b: &[u8]) -> Option<LogRecord> {
    if b.len() < HEADER {
        return None;
    }
    let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let msg = core::str::from_utf8(&b[HEADER..]).ok()?;
    Some(LogRecord {
        n: word(0),
        boot: word(4),
        ms: word(8),
        level: LogLevel::from_code(b[12]),
        msg: truncated(msg),
    })
}

/// The ring in flash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogStore {
    range: Range<u32>,
    next_n: u32,
    boot: u32,
    newest: Option<u32>,
}

type Queue<'f, F> = QueueStorage<
    BlockingAsync<'f, F>,
    Cache<
        sequential_storage::cache::Uncached,
        sequential_storage::cache::Uncached,
        sequential_storage::cache::Uncached,
        (),
    >,
>;

impl LogStore {
    fn queue<'f, F: NorFlash>(&self, flash: &'f mut F) -> Result<Queue<'f, F>, LogError> {
        let config = QueueConfig::try_new(self.range.clone()).map_err(|_| LogError::NoPartition)?;
        Ok(QueueStorage::new(
            BlockingAsync(flash),
            config,
            Cache::new_uncached(),
        ))
    }

    /// Opens the ring in `range` (whole sectors) and starts a new boot: its
    /// number is one more than the newest record's. A ring the queue cannot
    /// read is erased once and started afresh.
    pub async fn open<F: NorFlash>(flash: &mut F, range: Range<u32>) -> Result<Self, LogError> {
        let mut store = Self {
            range,
            next_n: 0,
            boot: 1,
            newest: None,
        };
        match store.scan(flash).await {
            Ok(()) => {}
            Err(_) => {
                warn!("field log unreadable: erasing it");
                store
                    .queue(flash)?
                    .erase_all()
                    .await
                    .map_err(|_| LogError::Flash)?;
                store.scan(flash).await?;
            }
        }
        Ok(store)
    }

    /// Opens the `log` partition of the table at [`TABLE_OFFSET`].
    pub async fn open_partition<F: NorFlash>(flash: &mut F) -> Result<Self, LogError> {
        let table =
            PartitionTable::read_from(flash, TABLE_OFFSET).map_err(|_| LogError::NoPartition)?;
        let p = table.find(LOG_PARTITION).ok_or(LogError::NoPartition)?;
        Self::open(flash, p.offset..p.offset + p.size).await
    }

    async fn scan<F: NorFlash>(&mut self, flash: &mut F) -> Result<(), LogError> {
        let mut q = self.queue(flash)?;
        let mut it = q.iter().await.map_err(|_| LogError::Flash)?;
        let mut buf = [0u8; READ_BUF];
        let mut newest: Option<(u32, u32)> = None;
        while let Some(entry) = it.next(&mut buf).await.map_err(|_| LogError::Flash)? {
            if let Some(r) = decode(&entry) {
                newest = Some((r.n, r.boot));
            }
        }
        if let Some((n, boot)) = newest {
            self.newest = Some(n);
            self.next_n = n.wrapping_add(1);
            self.boot = boot.wrapping_add(1);
        }
        Ok(())
    }

    /// This boot's number.
    pub fn boot(&self) -> u32 {
        self.boot
    }

    /// The number of the newest record, if any.
    pub fn newest(&self) -> Option<u32> {
        self.newest
    }

    /// Writes one record of this boot; the ring drops its oldest sector when
    /// full. Returns the record's number.
    pub async fn append<F: NorFlash>(
        &mut self,
        flash: &mut F,
        ms: u32,
        level: LogLevel,
        msg: &str,
    ) -> Result<u32, LogError> {
        let r = LogRecord {
            n: self.next_n,
            boot: self.boot,
            ms,
            level,
            msg: truncated(msg),
        };
        let mut buf = [0u8; MAX_RECORD];
        let len = encode(&r, &mut buf);
        self.queue(flash)?
            .push(&buf[..len], true)
            .await
            .map_err(|_| LogError::Flash)?;
        self.newest = Some(r.n);
        self.next_n = r.n.wrapping_add(1);
        Ok(r.n)
    }

    /// Reads up to `out`'s capacity of the records `req` wants, from record
    /// `from` on, oldest first. Returns whether more matching records follow.
    pub async fn read<F: NorFlash, const N: usize>(
        &self,
        flash: &mut F,
        req: &LogsGet,
        from: u32,
        out: &mut Vec<LogRecord, N>,
    ) -> Result<bool, LogError> {
        let mut q = self.queue(flash)?;
        let mut it = q.iter().await.map_err(|_| LogError::Flash)?;
        let mut buf = [0u8; READ_BUF];
        while let Some(entry) = it.next(&mut buf).await.map_err(|_| LogError::Flash)? {
            let Some(r) = decode(&entry) else { continue };
            if r.n < from || !req.wants(&r) {
                continue;
            }
            if out.push(r).is_err() {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// The device's log: the ring (when usable), the wear budget and the
/// records of the device loop waiting for flash.
pub struct FieldLog {
    store: Option<LogStore>,
    budget: Budget,
    notes: Pending,
    boot_reason: BootReason,
    /// A `logs/get` that arrived during a download.
    deferred: RefCell<Option<LogsGet>>,
}

impl FieldLog {
    /// Opens the `log` partition and notes the boot. Never fails: without a
    /// usable partition the log is off, said once on the console.
    pub async fn open<F: NorFlash>(flash: &mut F, boot_reason: BootReason, now_ms: u64) -> Self {
        let store = match LogStore::open_partition(flash).await {
            Ok(s) => Some(s),
            Err(e) => {
                warn!("field log off: {:?}", e);
                None
            }
        };
        Self {
            store,
            budget: Budget::new(now_ms),
            notes: Pending::new(),
            boot_reason,
            deferred: RefCell::new(None),
        }
    }

    /// Whether records reach flash.
    pub fn is_on(&self) -> bool {
        self.store.is_some()
    }

    /// Why this boot started.
    pub fn boot_reason(&self) -> BootReason {
        self.boot_reason
    }

    /// This boot's number (0 when the log is off).
    pub fn boot(&self) -> u32 {
        self.store.as_ref().map_or(0, |s| s.boot())
    }

    /// The newest record's number, if the log holds any.
    pub fn newest(&self) -> Option<u32> {
        self.store.as_ref().and_then(|s| s.newest())
    }

    /// Queues a record of the device loop (written by the next
    /// [`FieldLog::flush`]).
    pub fn note(&self, now_ms: u64, level: LogLevel, msg: &str) {
        self.notes.push(now_ms, level, msg);
    }

    /// Queues a formatted record.
    pub fn note_fmt(&self, now_ms: u64, level: LogLevel, args: core::fmt::Arguments<'_>) {
        let mut s: String<MAX_LOG_MSG> = String::new();
        let _ = core::fmt::write(&mut Cut(&mut s), args);
        self.note(now_ms, level, &s);
    }

    /// Writes what waits (the loop's records first, then the
    /// application's) as far as the budget allows.
    pub async fn flush<F: NorFlash>(&mut self, flash: &mut F, now_ms: u64) {
        let Some(store) = self.store.as_mut() else {
            // Off: nothing will ever be written; do not let RAM fill up.
            while self.notes.front().is_some() {
                self.notes.pop();
            }
            return;
        };
        for q in [&self.notes, &APP_LOG] {
            // Records the full RAM queue turned away are reported by one
            // record of their own, as soon as the budget allows.
            let dropped = q.take_dropped();
            if dropped > 0 {
                if !self.budget.take(now_ms) {
                    q.add_dropped(dropped);
                    return;
                }
                let mut s: String<MAX_LOG_MSG> = String::new();
                let _ = core::fmt::write(
                    &mut Cut(&mut s),
                    format_args!("{dropped} records dropped (too many too fast)"),
                );
                let ms = now_ms.min(u32::MAX as u64) as u32;
                if store.append(flash, ms, LogLevel::Warn, &s).await.is_err() {
                    warn!("field log write failed: log off until reboot");
                    self.store = None;
                    return;
                }
            }
            while let Some(note) = q.front() {
                if !self.budget.take(now_ms) {
                    return;
                }
                if store
                    .append(flash, note.ms, note.level, &note.msg)
                    .await
                    .is_err()
                {
                    warn!("field log write failed: log off until reboot");
                    self.store = None;
                    return;
                }
                q.pop();
            }
        }
    }

    /// Answers a `logs/get`: the records it asks for in chunks of at most
    /// [`LOGS_PER_CHUNK`], handed to `send` as JSON with `seq` from 0 and the
    /// last one marked. A log that is off answers one empty, last chunk.
    pub async fn answer<F: NorFlash>(
        &self,
        flash: &mut F,
        topics: &Topics,
        req: &LogsGet,
        now_ms: u64,
        mut send: impl AsyncFnMut(&[u8]),
    ) {
        let mut left = req.limit() as usize;
        let mut from = 0u32;
        let mut seq = 0u16;
        let mut buf = [0u8; MAX_LOGS_CHUNK_JSON];
        loop {
            let mut records: Vec<LogRecord, LOGS_PER_CHUNK> = Vec::new();
            let mut more = false;
            if let Some(store) = &self.store {
                let mut got: Vec<LogRecord, LOGS_PER_CHUNK> = Vec::new();
                more = store
                    .read(flash, req, from, &mut got)
                    .await
                    .unwrap_or(false);
                for r in got {
                    if left == 0 {
                        more = false;
                        break;
                    }
                    from = r.n.wrapping_add(1);
                    left -= 1;
                    let _ = records.push(r);
                }
                if left == 0 {
                    more = false;
                }
            }
            let chunk = LogsChunk {
                device: truncated(topics.device_id()),
                id: req.id.clone(),
                seq,
                last: !more,
                newest: self.newest(),
                boot: self.store.as_ref().map(|s| s.boot()),
                uptime_ms: Some(now_ms as u32),
                records,
            };
            if let Ok(n) = chunk.to_json(&mut buf) {
                send(&buf[..n]).await;
            }
            if !more {
                return;
            }
            seq = seq.wrapping_add(1);
        }
    }
}

/// A `fmt::Write` into a bounded string that keeps what fits.
struct Cut<'s>(&'s mut String<MAX_LOG_MSG>);

impl core::fmt::Write for Cut<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for c in s.chars() {
            if self.0.push(c).is_err() {
                break;
            }
        }
        Ok(())
    }
}

/// Notes a progress event that changes a job's phase: every phase but
/// `downloading`, with its error and message. Refusals of a command
/// (`bad_command`, `busy`, `duplicate_job`) change no job and are left out.
pub(crate) fn note_progress(log: &FieldLog, now_ms: u64, p: &mqota_core::protocol::Progress) {
    use mqota_core::protocol::{ErrorCode, Phase};
    if p.phase == Phase::Downloading
        || matches!(
            p.error,
            Some(ErrorCode::BadCommand | ErrorCode::Busy | ErrorCode::DuplicateJob)
        )
    {
        return;
    }
    let level = match p.phase {
        Phase::Failed | Phase::RolledBack => LogLevel::Error,
        Phase::Cancelled => LogLevel::Warn,
        _ => LogLevel::Info,
    };
    let job = p.job.as_deref().unwrap_or("-");
    let error = p.error.map_or("", |e| e.as_str());
    let message = p.message.as_deref().unwrap_or("");
    log.note_fmt(
        now_ms,
        level,
        format_args!("job {job}: {} {error} {message}", p.phase.as_str()),
    );
}

/// Answers a `{prefix}/{id}/logs/get` message on `{prefix}/{id}/logs`
/// (QoS 0, like progress: `seq` tells a reader what it missed). A retained
/// request is dropped unread, like a retained command.
pub(crate) async fn serve_get<F: NorFlash, C: crate::net::Connector>(
    log: &FieldLog,
    session: &mut crate::mqtt::MqttSession<'_, C>,
    topics: &Topics,
    msg: &crate::mqtt::Message,
    flash: &mut F,
) {
    if let Some(req) = read_get(msg) {
        serve(log, session, topics, &req, flash).await;
    }
}

/// A request that arrives during a download (the flash is the download's):
/// kept, the latest one only, and answered once the download ends.
pub(crate) fn defer_get(log: &FieldLog, msg: &crate::mqtt::Message) {
    if let Some(req) = read_get(msg) {
        *log.deferred.borrow_mut() = Some(req);
    }
}

/// Answers a request kept by [`defer_get`], if any.
pub(crate) async fn serve_deferred<F: NorFlash, C: crate::net::Connector>(
    log: &FieldLog,
    session: &mut crate::mqtt::MqttSession<'_, C>,
    topics: &Topics,
    flash: &mut F,
) {
    let req = log.deferred.borrow_mut().take();
    if let Some(req) = req {
        serve(log, session, topics, &req, flash).await;
    }
}

fn read_get(msg: &crate::mqtt::Message) -> Option<LogsGet> {
    if msg.retain {
        warn!("dropping a retained logs/get");
        return None;
    }
    Some(LogsGet::parse(&msg.payload))
}

async fn serve<F: NorFlash, C: crate::net::Connector>(
    log: &FieldLog,
    session: &mut crate::mqtt::MqttSession<'_, C>,
    topics: &Topics,
    req: &LogsGet,
    flash: &mut F,
) {
    let topic = topics.logs();
    let now_ms = embassy_time::Instant::now().as_millis();
    log.answer(flash, topics, req, now_ms, async |json: &[u8]| {
        let _ = session
            .publish(&topic, json, crate::mqtt::QoS::AtMostOnce, false)
            .await;
    })
    .await;
}

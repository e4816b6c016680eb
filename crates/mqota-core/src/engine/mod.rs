//! The update engine: a sans-IO state machine that takes a command, streams a
//! firmware into the inactive slot, verifies it and activates it.
//!
//! The split follows rumqttc's `state.rs`: the engine holds state and decides;
//! the caller performs the I/O. Every call takes the current time in
//! milliseconds as an input, so tests drive it with a fake clock and the
//! engine never reads one. It returns [`Actions`]: progress to publish, a fetch
//! to start (from a byte offset), a fetch to stop, a reboot to perform.
//!
//! Flash is the exception, on purpose: the engine takes the caller's flash as a
//! generic `embedded_storage::nor_flash::MultiwriteNorFlash` argument (the
//! journal's page bitmap programs a word more than once, see
//! [`Journal::mark_page`](crate::journal::Journal::mark_page)) and programs it
//! directly, as embassy-boot's `FirmwareUpdater` does. Flash operations are
//! synchronous on every ESP32 (the cache is off while they run), and returning
//! each 4 KiB page as an action would only add a copy and a round trip. The
//! engine still never names a flash type: the caller chooses it.
//!
//! One update, front to back:
//!
//! 1. [`Event::Command`] with a start command: the job is checked against the
//!    running image and the slot size, the target slot's [journal] is started,
//!    and the engine asks for a fetch from offset 0 (`accepted`).
//! 2. [`Event::Response`]: the status and length are checked (`too_large`,
//!    `size_mismatch`, `http_status`; a 200 to a ranged request restarts).
//!    Redirects never reach the engine: the caller's HTTP layer follows them
//!    and reports the final answer.
//! 3. [`Event::Body`] chunks fill a 4 KiB page buffer. Each full page goes
//!    through the incremental image validator (so a wrong chip or a bad header
//!    is refused before anything is erased), then the flash ahead of it is
//!    erased (64 KiB blocks where aligned), the page is programmed and marked
//!    in the journal: the resume point. Progress is throttled.
//! 4. [`Event::BodyEnd`]: the last page is written, the image is verified from
//!    flash (structure, checksum, appended SHA-256, the job's `sha256`, the
//!    Secure Boot V2 signature under [`Config::trust`]), the journal records
//!    the activation, otadata selects the slot, and the engine asks for a
//!    reboot (`verifying`, `rebooting`).
//!
//! Failures that a retry may cure (a reset, HTTP 408, 429 or 5xx, a stall;
//! [`fetch`](crate::fetch) decides which) are retried after a jittered
//! exponential [backoff](crate::backoff), resuming from the last page written
//! with a Range request. The jitter comes from a [`XorShift32`] the engine
//! owns, seeded from [`Config::seed`]: the engine stays sans-IO and
//! reproducible under test, and devices seeded differently spread their
//! retries. Every other failure ends the job at once with a `failed` event,
//! its error code and a message (`HTTP 404`); the running slot is never
//! touched, so the device keeps its firmware.
//!
//! # The seed design's OTA handler
//!
//! Its five calls are here, thin over the state machine:
//! [`Engine::begin_ota`], [`Engine::handle_progress`],
//! [`Engine::check_for_timeout`], [`Engine::set_timeout`], and
//! [`validate_and_rollback`](crate::bootguard::validate_and_rollback) in the
//! boot guard, which owns the trial.
//!
//! # Where things are
//!
//! This file holds the state machine over a fetch and [`decide`]; the slot
//! writer (page buffer, erase-ahead, journal marks) is in `writer.rs`, the
//! progress percentage, its throttling and the event builders in
//! `progress.rs`. Both add methods to [`Engine`].
//!
//! [journal]: crate::journal

use crate::backoff::{Backoff, Jitter, XorShift32};
use crate::fetch::FetchError;
use crate::image::{self, AppDescriptor, Chip, ImageError, StreamValidator};
use crate::journal::{Flag, JobRecord, PAGE_SIZE};
use crate::otadata::{self, OtaState};
use crate::protocol::truncated;
use crate::protocol::{
    Command, ErrorCode, Job, JobId, Phase, Progress, MAX_DEVICE_ID_LEN, MAX_MESSAGE_LEN,
};
use crate::signature::{self, TrustPolicy};
use core::fmt::Write as _;
use embedded_storage::nor_flash::{MultiwriteNorFlash, ReadNorFlash};
use heapless::{String, Vec};

mod progress;
mod writer;

pub use writer::BLOCK_SIZE;

/// Milliseconds since some fixed point (boot); only differences matter.
pub type Millis = u64;

// The flash geometry the engine works on; kept importable from here too.
pub use crate::layout::{Layout, Slot};

/// Tunables of the engine. [`Config::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct Config {
    /// This device's id, named in every progress event.
    pub device: String<MAX_DEVICE_ID_LEN>,
    /// The chip images must be built for.
    pub chip: Chip,
    /// Version of the running firmware (from its app descriptor).
    pub running_version: String<32>,
    /// Project name of the running firmware (from its app descriptor). An
    /// image of another project is refused (`wrong_project`) unless the job
    /// allows it; empty: no project check.
    pub running_project: String<32>,
    /// The lowest `secure_version` the device may run: images below it are
    /// refused (`downgrade`), whatever the job says. The runtime keeps it in
    /// flash and raises it when an image is confirmed.
    pub secure_floor: u32,
    /// Overall deadline of an update, unless the job sets `timeout_s`.
    pub timeout_ms: Millis,
    /// A fetch that delivers no bytes for this long is treated as a failed
    /// connection and retried.
    pub stall_timeout_ms: Millis,
    /// How many times a transient failure is retried before the job fails.
    pub max_retries: u8,
    /// Shortest retry delay. Each delay is drawn at random between this and
    /// three times the one before ([`Jitter::Decorrelated`]), capped at
    /// [`Config::retry_max_ms`].
    pub retry_base_ms: Millis,
    /// Cap of the retry delay.
    pub retry_max_ms: Millis,
    /// Seed of the generator the retry jitter is drawn from. Give every
    /// device its own (the runtime uses its device seed), so a fleet whose
    /// server failed does not retry in lockstep.
    pub seed: u32,
    /// At most one `downloading` event per this many milliseconds (and at most
    /// one per whole percent). Phase changes are always sent.
    pub progress_interval_ms: Millis,
    /// Which signing keys the device trusts. With keys, an image is
    /// activated only if a block of its signature sector verifies
    /// ([`signature::check`]); otherwise the job fails with `bad_signature`.
    pub trust: TrustPolicy,
}

impl Config {
    /// Defaults: 10 minute deadline, 15 s stall timeout, 5 retries jittered
    /// between 1 s and 16 s, progress at most every 250 ms, a fixed seed.
    pub fn new(device: &str, chip: Chip, running_version: &str) -> Self {
        Self {
            device: truncated(device),
            chip,
            running_version: truncated(running_version),
            running_project: String::new(),
            secure_floor: 0,
            timeout_ms: 600_000,
            stall_timeout_ms: 15_000,
            max_retries: 5,
            retry_base_ms: 1_000,
            retry_max_ms: 16_000,
            seed: 0x6d71_6f74,
            progress_interval_ms: 250,
            trust: TrustPolicy::default(),
        }
    }
}

/// What the caller tells the engine.
// Events are built and consumed at once, never stored: no allocator to box in.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Event<'a> {
    /// A command arrived on one of the device's command topics.
    Command(Command),
    /// The HTTP response head of the current fetch arrived.
    Response(Response),
    /// A chunk of the response body.
    Body(&'a [u8]),
    /// The response body ended (the server closed or sent all it announced).
    BodyEnd,
    /// The fetch ended without a usable response: an HTTP status other than
    /// 200/206 after any redirects, a network failure, a URL the device
    /// cannot use. [`FetchError::is_transient`] decides whether it is
    /// retried.
    FetchFailed(FetchError),
    /// The fetch delivered nothing for the transport's I/O timeout: treated
    /// like the engine's own stall timeout (retried, `timeout` in the end).
    Stalled,
    /// Nothing happened; lets the engine check its deadlines.
    Tick,
}

/// The head of an HTTP response, as far as the engine cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// `Content-Length`, if sent.
    pub content_length: Option<u32>,
    /// First byte of a `Content-Range`, if sent (206 responses).
    pub range_start: Option<u32>,
}

/// What the engine asks the caller to do, in order.
// A progress event is the common case; boxing it would need an allocator.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Publish this progress event on the progress topic.
    Publish(Progress),
    /// Start fetching the job's URL ([`Engine::url`]) from byte `from` (with
    /// `Range: bytes=from-` when `from > 0`). Any fetch in flight is dropped.
    Fetch {
        /// First byte wanted.
        from: u32,
    },
    /// Drop the fetch in flight, if any.
    StopFetch,
    /// Reboot now: the new image is selected in otadata.
    Reboot,
    /// A rollback command was accepted: hand it to the boot guard
    /// ([`bootguard::rollback`](crate::bootguard::rollback)), which selects
    /// the previous slot if it holds a valid image; answer `rolled_back` and
    /// reboot, or `failed` with the guard's error code.
    Rollback {
        /// The job id the command named, to report the rollback under.
        job: Option<JobId>,
    },
}

/// What the engine is doing, as far as the meaning of a command depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State<'a> {
    /// No update in flight.
    Idle,
    /// An update is in flight (downloading, backing off before a retry).
    Updating {
        /// Its job id, if the command named one.
        job: Option<&'a JobId>,
    },
}

/// What a command means in a [`State`]: [`decide`] is the one place that
/// says so, for the engine, the runtime's idle loop and its download loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start the job (the engine still checks it against the slot and the
    /// running version).
    Start,
    /// Answer `failed` with this error code and message; nothing else
    /// changes.
    Refuse(ErrorCode, &'static str),
    /// Stop the update in flight: `cancelled`.
    Cancel,
    /// Do nothing and say nothing (a cancel with nothing to cancel, or one
    /// naming another job: a late cancel of an old job must not end the next).
    Ignore,
    /// Roll back to the previous slot ([`Action::Rollback`]).
    Rollback,
}

/// Job ids this device has finished, newest last: a start naming one again
/// is a replayed or repeated command and is refused with
/// [`ErrorCode::DuplicateJob`]. Seeded at boot from both slots' journals
/// ([`Engine::recall_finished`]) and extended as jobs end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Finished(heapless::Deque<JobId, FINISHED_JOBS>);

/// How many finished job ids the engine remembers. A slot's journal holds
/// one job, so two survive any reboot; the rest are from this boot.
pub const FINISHED_JOBS: usize = 8;

impl Finished {
    /// Remembers `job` as finished (the oldest is forgotten when full).
    pub fn remember(&mut self, job: &JobId) {
        if self.contains(job) {
            return;
        }
        if self.0.is_full() {
            self.0.pop_front();
        }
        // Cannot fail: room was made above.
        let _ = self.0.push_back(job.clone());
    }

    /// Whether `job` is one this device finished.
    pub fn contains(&self, job: &JobId) -> bool {
        self.0.iter().any(|j| j == job)
    }
}

const BUSY: &str = "an update is in flight";

/// What `cmd` means in `state`, given the jobs already `finished`. Pure: the
/// table tests in `tests/engine.rs` cover every (state × command) pair.
///
/// | command | idle | updating job `j` |
/// |---|---|---|
/// | start of a finished job | refuse `duplicate_job` | refuse `duplicate_job` |
/// | start of `j` itself (a redelivery) | — | ignore |
/// | start | start | refuse `busy` |
/// | cancel (no job, or `j`) | ignore | cancel |
/// | cancel of another job | ignore | ignore |
/// | rollback | rollback | refuse `busy` |
pub fn decide(state: State<'_>, finished: &Finished, cmd: &Command) -> Decision {
    match (cmd, state) {
        (Command::Start(job), _) if job.job.as_ref().is_some_and(|j| finished.contains(j)) => {
            Decision::Refuse(
                ErrorCode::DuplicateJob,
                "job already finished on this device",
            )
        }
        (Command::Start(_), State::Idle) => Decision::Start,
        // The same job again while it runs: MQTT delivers at least once
        // (a broker resends an unacknowledged start after a reconnect), so
        // this is the command already being carried out, not a second one.
        (Command::Start(job), State::Updating { job: Some(current) })
            if job.job.as_ref() == Some(current) =>
        {
            Decision::Ignore
        }
        (Command::Start(_), State::Updating { .. }) => Decision::Refuse(ErrorCode::Busy, BUSY),
        (Command::Cancel { .. }, State::Idle) => Decision::Ignore,
        (Command::Cancel { job: None }, State::Updating { .. }) => Decision::Cancel,
        (Command::Cancel { job: Some(j) }, State::Updating { job: current }) => {
            if current == Some(j) {
                Decision::Cancel
            } else {
                Decision::Ignore
            }
        }
        (Command::Rollback { .. }, State::Idle) => Decision::Rollback,
        (Command::Rollback { .. }, State::Updating { .. }) => {
            Decision::Refuse(ErrorCode::Busy, BUSY)
        }
    }
}

/// The actions of one step (never more than four).
pub type Actions = Vec<Action, 4>;

fn push(actions: &mut Actions, a: Action) {
    // Capacity is sized for the longest sequence a step produces.
    let _ = actions.push(a);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fetch {
    /// Waiting for the response head.
    Head,
    /// Streaming the body.
    Body,
    /// Waiting to retry until the given time.
    Backoff(Millis),
}

struct Download {
    record: JobRecord,
    target: usize,
    slot: Slot,
    /// Bytes programmed and marked in the journal: the resume point.
    written: u32,
    /// Slot-relative end of the erased area ahead of `written`.
    erased_to: u32,
    /// The slot's journal holds this job. Until the first page is accepted
    /// the journal still tells the story of the image before, and a job that
    /// fails that early leaves both untouched.
    journal_started: bool,
    /// Announced size of the whole file, once known.
    total: Option<u32>,
    /// Bytes received in the current fetch, counted from its first byte.
    fetch: Fetch,
    deadline: Millis,
    last_data: Millis,
    retries: u8,
    /// Paces the retries of this job.
    backoff: Backoff,
    /// The transient failure being retried, reported if the deadline passes
    /// while backing off: it says more than `timeout` would.
    last_failure: Option<Fail>,
    percent: u8,
    last_publish: Millis,
    validator: StreamValidator,
    /// The job allows an older version / another project. Not journaled: a
    /// download resumed after a reboot before its first page was kept
    /// checks without them.
    allow_downgrade: bool,
    allow_other_project: bool,
    /// The image's app descriptor passed [`check_descriptor`].
    descriptor_checked: bool,
}

/// The update engine. See the [module docs](self).
pub struct Engine {
    cfg: Config,
    layout: Layout,
    /// Where the retry jitter comes from.
    rng: XorShift32,
    dl: Option<Download>,
    finished: Finished,
    page: [u8; PAGE_SIZE as usize],
    fill: usize,
}

/// Ends the job in flight with an error code and one line for the operator.
#[derive(Debug, Clone)]
struct Fail(ErrorCode, String<MAX_MESSAGE_LEN>);

impl From<FetchError> for Fail {
    fn from(e: FetchError) -> Self {
        Fail(e.code(), e.message())
    }
}

/// A [`Fail`] with a fixed message.
fn fail(code: ErrorCode, why: &str) -> Fail {
    Fail(code, truncated(why))
}

impl Engine {
    /// An idle engine.
    pub fn new(cfg: Config, layout: Layout) -> Self {
        Self {
            rng: XorShift32::new(cfg.seed),
            cfg,
            layout,
            dl: None,
            finished: Finished::default(),
            page: [0xFF; PAGE_SIZE as usize],
            fill: 0,
        }
    }

    /// Raises or sets the `secure_version` floor images are checked
    /// against ([`Config::secure_floor`]), e.g. after a trial confirmed an
    /// image with a higher one.
    pub fn set_secure_floor(&mut self, floor: u32) {
        self.cfg.secure_floor = floor;
    }

    /// Whether an update is in flight.
    pub fn is_busy(&self) -> bool {
        self.dl.is_some()
    }

    /// What the engine is doing, for [`decide`].
    pub fn state(&self) -> State<'_> {
        match &self.dl {
            None => State::Idle,
            Some(d) => State::Updating {
                job: d.record.job.as_ref(),
            },
        }
    }

    /// The jobs this device finished, for [`decide`].
    pub fn finished(&self) -> &Finished {
        &self.finished
    }

    /// Remembers `job` as finished: for jobs the engine did not end itself
    /// (a trial the boot guard confirmed or rolled back).
    pub fn remember_finished(&mut self, job: &JobId) {
        self.finished.remember(job);
    }

    /// Seeds the finished jobs from both slots' journals, once at boot: the
    /// running slot's job installed the running image (its trial is over by
    /// the time commands are served); the other slot's job is finished if it
    /// was abandoned or activated (then rolled back). A job the journal
    /// shows neither way is an interrupted download that [`Engine::resume`]
    /// picks up, not a finished one. Unreadable journals add nothing.
    pub fn recall_finished<F: ReadNorFlash>(&mut self, flash: &mut F) {
        for (i, slot) in self.layout.slots.clone().iter().enumerate() {
            let journal = slot.journal();
            let Ok(Some(record)) = journal.job(flash) else {
                continue;
            };
            let Some(job) = record.job.as_ref() else {
                continue;
            };
            let over = i == self.layout.running
                || journal.has(flash, Flag::Abandoned).unwrap_or(false)
                || journal.has(flash, Flag::Activated).unwrap_or(false);
            if over {
                self.finished.remember(job);
            }
        }
    }

    /// The URL of the update in flight.
    pub fn url(&self) -> Option<&str> {
        self.dl.as_ref().map(|d| d.record.url.as_str())
    }

    /// The job id of the update in flight.
    pub fn job(&self) -> Option<&JobId> {
        self.dl.as_ref().and_then(|d| d.record.job.as_ref())
    }

    /// When the update in flight must be over: the caller should tick the
    /// engine by then even if the fetch is silent.
    pub fn deadline(&self) -> Option<Millis> {
        self.dl.as_ref().map(|d| d.deadline)
    }

    /// The configuration the engine runs with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The flash layout the engine works on.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Sets the overall deadline of updates started from now on (a job's
    /// `timeout_s` still wins).
    pub fn set_default_timeout(&mut self, timeout_ms: Millis) {
        self.cfg.timeout_ms = timeout_ms;
    }

    /// Seed API, kept as an alias of [`Engine::set_default_timeout`].
    pub fn set_timeout(&mut self, timeout_ms: Millis) {
        self.set_default_timeout(timeout_ms);
    }

    /// Seed API, kept as an alias of [`Engine::start_from_url`].
    pub fn begin_ota<F: MultiwriteNorFlash>(
        &mut self,
        flash: &mut F,
        now: Millis,
        url: &str,
    ) -> Actions {
        self.start_from_url(flash, now, url)
    }

    /// Starts an update from a bare URL, as a message of only a URL on a
    /// start topic does: no version, digest or job id to check.
    pub fn start_from_url<F: MultiwriteNorFlash>(
        &mut self,
        flash: &mut F,
        now: Millis,
        url: &str,
    ) -> Actions {
        let mut job = Job {
            url: String::new(),
            version: None,
            sha256: None,
            size: None,
            job: None,
            timeout_s: None,
            force: false,
            allow_downgrade: false,
            allow_other_project: false,
        };
        if job.url.push_str(url).is_err() {
            let mut a = Actions::new();
            let refused = self
                .event(None, Phase::Failed, 0, None, 0)
                .with_error(ErrorCode::BadCommand, Some("url is longer than 256 bytes"));
            push(&mut a, Action::Publish(refused));
            return a;
        }
        self.handle(flash, now, Event::Command(Command::Start(job)))
    }

    /// Checks the deadlines (the overall timeout, a stalled fetch, a retry
    /// that is due): [`Event::Tick`].
    pub fn tick<F: MultiwriteNorFlash>(&mut self, flash: &mut F, now: Millis) -> Actions {
        self.handle(flash, now, Event::Tick)
    }

    /// Seed API, kept as an alias of [`Engine::tick`].
    pub fn check_for_timeout<F: MultiwriteNorFlash>(
        &mut self,
        flash: &mut F,
        now: Millis,
    ) -> Actions {
        self.tick(flash, now)
    }

    /// Feeds one event; returns what the caller must do, in order.
    pub fn handle<F: MultiwriteNorFlash>(
        &mut self,
        flash: &mut F,
        now: Millis,
        event: Event<'_>,
    ) -> Actions {
        let mut actions = Actions::new();
        let result = match event {
            Event::Command(cmd) => match (decide(self.state(), &self.finished, &cmd), cmd) {
                (Decision::Start, Command::Start(job)) => self.start(now, job, &mut actions),
                (Decision::Refuse(code, why), cmd) => {
                    let ev = self
                        .event(cmd.job(), Phase::Failed, 0, None, 0)
                        .with_error(code, Some(why));
                    push(&mut actions, Action::Publish(ev));
                    Ok(())
                }
                (Decision::Cancel, _) => {
                    self.finish(
                        flash,
                        Phase::Cancelled,
                        Some(ErrorCode::Cancelled),
                        "cancelled by operator",
                        &mut actions,
                    );
                    Ok(())
                }
                // Rollback is the boot guard's business: the caller performs it.
                (Decision::Rollback, cmd) => {
                    let job = cmd.job();
                    push(&mut actions, Action::Rollback { job });
                    Ok(())
                }
                _ => Ok(()),
            },
            Event::Response(r) => self.on_response(flash, now, r, &mut actions),
            Event::Body(data) => self.on_body(flash, now, data, &mut actions),
            Event::BodyEnd => self.on_end(flash, now, &mut actions),
            Event::FetchFailed(e) => self.fetch_failed(now, e, &mut actions),
            Event::Stalled => self.transient(
                now,
                fail(ErrorCode::Timeout, "no data within the stall timeout"),
                &mut actions,
            ),
            Event::Tick => self.on_tick(now, &mut actions),
        };
        if let Err(Fail(code, why)) = result {
            self.finish(flash, Phase::Failed, Some(code), &why, &mut actions);
        }
        actions
    }

    /// Resumes a download that a reboot interrupted, from what the target
    /// slot's journal says was written. Returns `None` (and does nothing) if
    /// there is nothing to resume.
    pub fn resume<F: MultiwriteNorFlash>(&mut self, flash: &mut F, now: Millis) -> Option<Actions> {
        if self.dl.is_some() {
            return None;
        }
        let target = self.layout.target();
        let slot = self.layout.slots[target];
        let journal = slot.journal();
        let record = journal.job(flash).ok()??;
        if journal.has(flash, Flag::Abandoned).ok()? || journal.has(flash, Flag::Activated).ok()? {
            return None;
        }
        let pages = journal.pages_done(flash).ok()?;
        let mut written = pages.saturating_mul(PAGE_SIZE).min(slot.max_image_len());
        if let Some(size) = record.size {
            written = written.min(size);
        }
        let mut dl = self.new_download(now, record, target);
        // The validator must have seen every byte before the resume point:
        // read them back from flash. Nothing beyond `written` is trusted, not
        // even as erased: a cut may have hit an erase or a page program there.
        let mut at = 0;
        while at < written {
            let n = (written - at).min(PAGE_SIZE) as usize;
            if flash.read(slot.offset + at, &mut self.page[..n]).is_err()
                || dl.validator.feed(&self.page[..n]).is_err()
            {
                return None;
            }
            at += n as u32;
        }
        dl.written = written;
        dl.erased_to = written;
        dl.journal_started = true;
        // Its descriptor was checked (with the job's permissions) before
        // its first page was kept.
        dl.descriptor_checked = written > 0;
        // The job's events before the reboot already reached this far.
        dl.percent = Self::percent(written, dl.total).min(99);
        info!("resuming job at byte {} after reboot", written);
        self.dl = Some(dl);
        self.fill = 0;
        let mut actions = Actions::new();
        push(
            &mut actions,
            Action::Publish(self.progress_event(Phase::Downloading, None, "resumed after reboot")),
        );
        push(&mut actions, Action::Fetch { from: written });
        Some(actions)
    }

    fn new_download(&self, now: Millis, record: JobRecord, target: usize) -> Download {
        let slot = self.layout.slots[target];
        let timeout = record
            .timeout_s
            .map(|s| s as Millis * 1000)
            .unwrap_or(self.cfg.timeout_ms);
        Download {
            total: record.size,
            record,
            target,
            slot,
            written: 0,
            erased_to: 0,
            journal_started: false,
            fetch: Fetch::Head,
            deadline: now + timeout,
            last_data: now,
            retries: 0,
            backoff: Backoff::new(
                self.cfg.retry_base_ms,
                self.cfg.retry_max_ms,
                Jitter::Decorrelated,
            ),
            last_failure: None,
            percent: 0,
            last_publish: now,
            validator: StreamValidator::new(Some(self.cfg.chip), slot.max_image_len())
                .structure_only(),
            allow_downgrade: false,
            allow_other_project: false,
            descriptor_checked: false,
        }
    }

    fn start(&mut self, now: Millis, job: Job, actions: &mut Actions) -> Result<(), Fail> {
        let target = self.layout.target();
        let slot = self.layout.slots[target];
        if !job.force && job.version.as_deref() == Some(self.cfg.running_version.as_str()) {
            if let Some(j) = &job.job {
                self.finished.remember(j);
            }
            push(
                actions,
                Action::Publish(self.event_msg(
                    job.job,
                    Phase::Done,
                    100,
                    None,
                    "already running this version",
                )),
            );
            return Ok(());
        }
        let record = JobRecord::from_job(&job);
        let mut dl = self.new_download(now, record, target);
        dl.allow_downgrade = job.allow_downgrade;
        dl.allow_other_project = job.allow_other_project;
        self.dl = Some(dl);
        self.fill = 0;
        if let Some(size) = job.size {
            if size > slot.max_image_len() {
                return Err(fail(ErrorCode::TooLarge, "job size exceeds the OTA slot"));
            }
        }
        info!("job accepted into slot {}", target);
        push(
            actions,
            Action::Publish(self.progress_event(Phase::Accepted, None, "")),
        );
        push(actions, Action::Fetch { from: 0 });
        Ok(())
    }

    fn on_response<F: MultiwriteNorFlash>(
        &mut self,
        flash: &mut F,
        now: Millis,
        r: Response,
        actions: &mut Actions,
    ) -> Result<(), Fail> {
        let Some(dl) = self.dl.as_mut() else {
            return Ok(());
        };
        if dl.fetch != Fetch::Head {
            return Ok(());
        }
        dl.last_data = now;
        match r.status {
            200 if dl.written > 0 => {
                // The server ignored our Range: start over cleanly. The pages
                // already programmed must be erased again before they are
                // rewritten, and the journal's page marks cleared with them.
                warn!("server ignored Range; restarting from byte 0");
                dl.written = 0;
                dl.erased_to = 0;
                dl.validator = StreamValidator::new(Some(self.cfg.chip), dl.slot.max_image_len())
                    .structure_only();
                self.fill = 0;
                // Its page marks cannot be cleared without an erase: start
                // the journal (already this job's) again, before any page of
                // the old progress is erased, so a resume never trusts them.
                if dl.journal_started {
                    dl.slot
                        .journal()
                        .begin(flash, &dl.record)
                        .map_err(|_| fail(ErrorCode::Flash, "journal write failed"))?;
                }
            }
            200 => {}
            206 => {
                if r.range_start != Some(dl.written) {
                    return self.transient(
                        now,
                        fail(
                            ErrorCode::HttpStatus,
                            "Content-Range does not start where asked",
                        ),
                        actions,
                    );
                }
            }
            status => return self.fetch_failed(now, FetchError::Status(status), actions),
        }
        if let Some(len) = r.content_length {
            let total = dl.written.saturating_add(len);
            if total > dl.slot.max_image_len() {
                return Err(fail(
                    ErrorCode::TooLarge,
                    "Content-Length exceeds the OTA slot",
                ));
            }
            match dl.total {
                Some(t) if t != total => {
                    return Err(fail(
                        ErrorCode::SizeMismatch,
                        "Content-Length differs from the job's size",
                    ))
                }
                _ => dl.total = Some(total),
            }
            // A resumed job learns its total only now: carry on from the
            // bytes already written, never below what was published.
            let pct = Self::percent(dl.written, Some(total)).min(99);
            dl.percent = dl.percent.max(pct);
        }
        dl.fetch = Fetch::Body;
        push(
            actions,
            Action::Publish(self.progress_event(Phase::Downloading, None, "")),
        );
        Ok(())
    }

    fn on_end<F: MultiwriteNorFlash>(
        &mut self,
        flash: &mut F,
        now: Millis,
        actions: &mut Actions,
    ) -> Result<(), Fail> {
        let received = self.received();
        let Some(dl) = self.dl.as_ref() else {
            return Ok(());
        };
        if dl.fetch != Fetch::Body {
            return Ok(());
        }
        if let Some(total) = dl.total {
            if received < total {
                // The connection ended early: resume from the last whole page.
                return self.transient(
                    now,
                    fail(ErrorCode::Network, "connection closed before the end"),
                    actions,
                );
            }
        }
        if self.fill > 0 {
            self.flush_page(flash)?;
        }
        let dl = self.dl.as_mut().expect("checked above");
        dl.total = Some(dl.written);
        dl.percent = 100;
        push(
            actions,
            Action::Publish(self.progress_event(Phase::Verifying, None, "")),
        );
        self.verify_and_activate(flash, actions)
    }

    fn verify_and_activate<F: MultiwriteNorFlash>(
        &mut self,
        flash: &mut F,
        actions: &mut Actions,
    ) -> Result<(), Fail> {
        let dl = self.dl.as_mut().expect("verify without download");
        let validator = core::mem::replace(&mut dl.validator, StreamValidator::new(None, 0));
        // Structure and length only: the hash is checked once, from flash.
        validator.finish_unchecked().map_err(image_fail)?;
        // What counts is what is on flash, not what went past in RAM: read it
        // back, as esp_image_verify does before esp_ota_set_boot_partition.
        // Exactly the bytes downloaded: the image, then perhaps the 0xFF
        // padding and signature sector of a signed file.
        let info = image::validate_flash_file(flash, dl.slot.offset, dl.written, None)
            .map_err(image_fail)?;
        if info.chip != self.cfg.chip {
            return Err(fail(ErrorCode::WrongChip, "image is for another chip"));
        }
        // A device that requires signatures asks its signers first: whatever
        // else is wrong with a file no trusted key signed, the answer is
        // `bad_signature`.
        if self.cfg.trust.signed_only() {
            // The sector is read back from flash like the image, into the
            // page buffer, which is idle now that every page is written.
            let sector = match (info.signature_sector(), info.padded_sha256) {
                (Some(at), Some(_)) => {
                    flash
                        .read(dl.slot.offset + at, &mut self.page)
                        .map_err(|_| {
                            fail(ErrorCode::Flash, "flash read failed during verification")
                        })?;
                    Some(&self.page)
                }
                _ => None,
            };
            let digest = info.padded_sha256.unwrap_or_default();
            let checked = signature::check(&self.cfg.trust, self.cfg.chip, sector, &digest);
            self.page.fill(0xFF);
            if let Err(why) = checked {
                warn!("image refused: {}", why.reason());
                return Err(fail(ErrorCode::BadSignature, why.reason()));
            }
        }
        info.verify().map_err(image_fail)?;
        if dl
            .record
            .sha256
            .is_some_and(|want| want != info.file_sha256)
        {
            return Err(fail(
                ErrorCode::HashMismatch,
                "SHA-256 differs from the job's",
            ));
        }
        // Journal first, then otadata: a cut between the two leaves an
        // activated journal that the boot guard finishes activating.
        let journal = dl.slot.journal();
        journal
            .set(flash, Flag::Activated)
            .map_err(|_| fail(ErrorCode::Flash, "journal write failed"))?;
        otadata::set_boot_slot(
            flash,
            self.layout.otadata,
            dl.target,
            self.layout.slots.len(),
            OtaState::New,
        )
        .map_err(|_| fail(ErrorCode::Flash, "otadata write failed"))?;
        info!("image verified; slot {} selected, rebooting", dl.target);
        let ev = self.progress_event(Phase::Rebooting, None, "");
        self.dl = None;
        push(actions, Action::Publish(ev));
        push(actions, Action::Reboot);
        Ok(())
    }

    fn on_tick(&mut self, now: Millis, actions: &mut Actions) -> Result<(), Fail> {
        let Some(dl) = self.dl.as_mut() else {
            return Ok(());
        };
        if now >= dl.deadline {
            return Err(match (dl.fetch, dl.last_failure.take()) {
                (Fetch::Backoff(_), Some(last)) => last,
                _ => fail(ErrorCode::Timeout, "update deadline passed"),
            });
        }
        match dl.fetch {
            Fetch::Backoff(until) if now >= until => {
                dl.fetch = Fetch::Head;
                dl.last_data = now;
                self.fill = 0;
                let from = dl.written;
                push(actions, Action::Fetch { from });
            }
            Fetch::Head | Fetch::Body
                if now.saturating_sub(dl.last_data) >= self.cfg.stall_timeout_ms =>
            {
                return self.transient(
                    now,
                    fail(ErrorCode::Timeout, "no data within the stall timeout"),
                    actions,
                );
            }
            _ => {}
        }
        Ok(())
    }

    /// A fetch that ended without a usable response: retried if
    /// [`FetchError::is_transient`] says a retry may help, the end of the job
    /// otherwise.
    fn fetch_failed(
        &mut self,
        now: Millis,
        e: FetchError,
        actions: &mut Actions,
    ) -> Result<(), Fail> {
        if e.is_transient() {
            self.transient(now, e.into(), actions)
        } else {
            Err(e.into())
        }
    }

    /// A failure worth retrying: back off, then resume from the last page.
    /// Once the retries are used up, `failure` ends the job.
    fn transient(&mut self, now: Millis, failure: Fail, actions: &mut Actions) -> Result<(), Fail> {
        let Some(dl) = self.dl.as_mut() else {
            return Ok(());
        };
        if matches!(dl.fetch, Fetch::Backoff(_)) {
            return Ok(());
        }
        if dl.retries >= self.cfg.max_retries {
            return Err(failure);
        }
        let delay = dl.backoff.next_delay(self.rng.next_u32());
        dl.retries += 1;
        warn!(
            "{}; retry {} in {} ms",
            failure.1.as_str(),
            dl.retries,
            delay
        );
        dl.last_failure = Some(failure);
        dl.fetch = Fetch::Backoff(now + delay);
        // Bytes past the last whole page are dropped and fetched again.
        self.fill = 0;
        push(actions, Action::StopFetch);
        Ok(())
    }

    fn finish<F: MultiwriteNorFlash>(
        &mut self,
        flash: &mut F,
        phase: Phase,
        code: Option<ErrorCode>,
        why: &str,
        actions: &mut Actions,
    ) {
        let Some(dl) = self.dl.as_ref() else { return };
        // A download that failed must not be resumed at the next boot. If even
        // this write fails, the resume will fail the same way and end here.
        if dl.journal_started {
            let error = code.unwrap_or(ErrorCode::Cancelled);
            let _ = dl.slot.journal().set_abandoned(flash, error);
        }
        let ev = self.progress_event(phase, code, why);
        warn!("job ended: {}", why);
        if let Some(j) = &dl.record.job {
            self.finished.remember(j);
        }
        self.dl = None;
        self.fill = 0;
        push(actions, Action::StopFetch);
        push(actions, Action::Publish(ev));
    }
}

/// The device's policy on an image, from its app descriptor (in the first
/// page, so it is asked before anything is erased): `secure_version` not
/// below `cfg.secure_floor` (no job can override that); the same project as
/// the running firmware unless `allow_other_project`; a version not older
/// than the running one ([`crate::version`] order) unless `allow_downgrade`.
/// Versions that are not of semver form are not ordered.
pub fn check_descriptor(
    cfg: &Config,
    desc: &AppDescriptor,
    allow_downgrade: bool,
    allow_other_project: bool,
) -> Result<(), (ErrorCode, &'static str)> {
    if desc.secure_version < cfg.secure_floor {
        return Err((
            ErrorCode::Downgrade,
            "image secure_version is below the device's floor",
        ));
    }
    if !allow_other_project
        && !cfg.running_project.is_empty()
        && desc.project_name != cfg.running_project
    {
        return Err((ErrorCode::WrongProject, "image belongs to another project"));
    }
    let older =
        crate::version::compare(&desc.version, &cfg.running_version).is_some_and(|o| o.is_lt());
    if older && !allow_downgrade {
        return Err((
            ErrorCode::Downgrade,
            "image version is older than the running one",
        ));
    }
    Ok(())
}

fn image_fail(e: ImageError) -> Fail {
    match e {
        ImageError::WrongChip { .. } => fail(ErrorCode::WrongChip, "image is for another chip"),
        ImageError::TooLarge { .. } => fail(ErrorCode::TooLarge, "image exceeds the OTA slot"),
        // The image's own length is the declared size when the server
        // announced none: more data after it is an endless (or wrong) body.
        ImageError::TrailingData { .. } => fail(
            ErrorCode::SizeMismatch,
            "server sent data past the end of the image",
        ),
        ImageError::Flash(_) => fail(ErrorCode::Flash, "flash read failed during verification"),
        _ => {
            let mut why = String::new();
            // A message cut short is still the right message.
            let _ = write!(why, "{e}");
            Fail(ErrorCode::BadImage, why)
        }
    }
}

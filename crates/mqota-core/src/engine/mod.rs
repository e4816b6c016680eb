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
//!    Secure Boot V2 signature under [`EngineConfig::trust`]), the journal records
//!    the activation, otadata selects the slot, and the engine asks for a
//!    reboot (`verifying`, `rebooting`).
//!
//! Failures that a retry may cure (a reset, HTTP 408, 429 or 5xx, a stall;
//! [`fetch`](crate::fetch) decides which) are retried after a jittered
//! exponential [backoff](crate::backoff), resuming from the last page written
//! with a Range request. The jitter comes from a [`XorShift32`] the engine
//! owns, seeded from [`EngineConfig::seed`]: the engine stays sans-IO and
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
//! This file holds the state machine over a fetch: its events, actions and
//! the download it carries. Around it:
//!
//! | file | what |
//! |---|---|
//! | `config.rs` | [`EngineConfig`], what the engine is told once |
//! | `decide.rs` | [`decide`]: what a command means, idle or updating |
//! | `writer.rs` | the slot writer: page buffer, erase-ahead, journal marks |
//! | `progress.rs` | the progress percentage, its throttling, the event builders |
//! | `verify.rs` | verifying the image from flash and activating it; [`check_descriptor`] |
//!
//! `writer.rs`, `progress.rs` and `verify.rs` add methods to [`Engine`].
//!
//! [journal]: crate::journal

use crate::backoff::{Backoff, Jitter, XorShift32};
use crate::fetch::FetchError;
use crate::image::StreamValidator;
use crate::journal::{Flag, JobRecord, PAGE_SIZE};
use crate::protocol::truncated;
use crate::protocol::{Command, ErrorCode, Job, JobId, Phase, Progress, MAX_MESSAGE_LEN};
use embedded_storage::nor_flash::{MultiwriteNorFlash, ReadNorFlash};
use heapless::{String, Vec};

mod config;
mod decide;
mod progress;
mod verify;
mod writer;

pub use config::EngineConfig;
pub use decide::{decide, Decision, Finished, State, FINISHED_JOBS};
pub use verify::check_descriptor;
use verify::image_fail;
pub use writer::BLOCK_SIZE;

/// Milliseconds since some fixed point (boot); only differences matter.
pub type Millis = u64;

// The flash geometry the engine works on; kept importable from here too.
pub use crate::layout::{Layout, Slot};

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
    /// Where the current fetch is: awaiting its head, streaming its body, or
    /// backing off before a retry.
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
    cfg: EngineConfig,
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
    pub fn new(cfg: EngineConfig, layout: Layout) -> Self {
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
    /// against ([`EngineConfig::secure_floor`]), e.g. after a trial confirmed an
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
    pub fn config(&self) -> &EngineConfig {
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

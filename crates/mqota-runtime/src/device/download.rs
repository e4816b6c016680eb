//! One fetch: the body streams into the engine (and through it into flash)
//! while the MQTT side keeps the session, publishes the progress the engine
//! produced and answers other commands. Progress waits in a bounded queue
//! ([`PROGRESS_QUEUE`]) between the two.

use core::cell::RefCell;

use embassy_futures::select::{select3, Either3};
use embassy_time::{Duration, Instant, Timer};
use embedded_storage::nor_flash::MultiwriteNorFlash;
use heapless::Deque;
use mqota_core::engine::{
    decide, Action, Actions, Decision, Engine, Event, Finished, Response, State,
};
use mqota_core::fetch::{is_https, FetchError};
use mqota_core::protocol::{
    truncated, Command, ErrorCode, LogLevel, Phase, Progress, Topics, MAX_URL_LEN,
};

use super::command::{read_command, Incoming};
use super::now_ms;
use super::run::Device;
use super::uplink::{publish_progress, Uplink};
use crate::fieldlog;
use crate::http::{Abort, BodySink, DownloadError, Downloader, RedirectError, ResponseInfo};
use crate::net::Connector;
use crate::platform::Link;

/// Progress events waiting to be published during a download.
pub const PROGRESS_QUEUE: usize = 8;

/// The engine side of a download: feeds the body into the engine (and
/// through it into flash); hands the engine's events to the MQTT side.
struct EngineSink<'e, F> {
    engine: &'e mut Engine,
    flash: &'e mut F,
    outbox: &'e RefCell<Deque<Progress, PROGRESS_QUEUE>>,
    /// Actions that end this fetch (another fetch, a reboot, a stop).
    ending: Actions,
}

impl<F: MultiwriteNorFlash> EngineSink<'_, F> {
    fn feed(&mut self, event: Event<'_>) -> Result<(), Abort> {
        let actions = self.engine.handle(self.flash, now_ms(), event);
        let mut end = false;
        for a in actions {
            match a {
                Action::Publish(p) => queue(self.outbox, p),
                other => {
                    end = true;
                    let _ = self.ending.push(other);
                }
            }
        }
        if end || !self.engine.is_busy() {
            Err(Abort)
        } else {
            Ok(())
        }
    }
}

pub(super) fn queue(outbox: &RefCell<Deque<Progress, PROGRESS_QUEUE>>, p: Progress) {
    let mut q = outbox.borrow_mut();
    if q.is_full() {
        // Make room by dropping, oldest first: a `downloading` event (the next
        // one supersedes it), else a refusal of another command (`busy`,
        // `bad_command`: a flood of junk must not push out the job's own
        // events). The job's phase changes are at most a handful per fetch,
        // far fewer than the queue holds, so they are never the ones to go.
        let refusal = |e: &Progress| {
            matches!(
                e.error,
                Some(ErrorCode::Busy | ErrorCode::BadCommand | ErrorCode::DuplicateJob)
            )
        };
        let victim = q
            .iter()
            .position(|e| e.phase == Phase::Downloading)
            .or_else(|| q.iter().position(refusal));
        match victim {
            Some(i) => {
                let mut kept: Deque<Progress, PROGRESS_QUEUE> = Deque::new();
                for (j, e) in q.iter().enumerate() {
                    if j != i {
                        // Cannot fail: one fewer than the queue held.
                        let _ = kept.push_back(e.clone());
                    }
                }
                *q = kept;
            }
            // Nothing expendable: the new event is the one dropped.
            None => return,
        }
    }
    let _ = q.push_back(p);
}

impl<F: MultiwriteNorFlash> BodySink for EngineSink<'_, F> {
    async fn begin(&mut self, info: &ResponseInfo) -> Result<(), Abort> {
        self.feed(Event::Response(Response {
            status: info.status,
            content_length: info.content_length.map(|l| l.min(u32::MAX as u64) as u32),
            range_start: info
                .content_range
                .map(|r| r.start.min(u32::MAX as u64) as u32),
        }))
    }

    async fn chunk(&mut self, data: &[u8]) -> Result<(), Abort> {
        self.feed(Event::Body(data))?;
        // Let the MQTT side run between chunks: flash writes block the
        // executor, so without this a fast server would starve it.
        embassy_futures::yield_now().await;
        Ok(())
    }
}

/// One fetch: the body streams into the engine while the MQTT side keeps
/// the session and publishes progress. Returns the engine's next actions.
pub(super) async fn download<C, F, L>(
    dev: &mut Device<'_>,
    up: &mut Uplink<'_, '_, C, L>,
    downloader: &mut Downloader<'_, C>,
    engine: &mut Engine,
    flash: &mut F,
    from: u32,
) -> Actions
where
    C: Connector,
    F: MultiwriteNorFlash,
    L: Link,
{
    let Some(url) = engine.url().map(truncated::<MAX_URL_LEN>) else {
        return Actions::new();
    };
    let deadline = engine.deadline().unwrap_or(u64::MAX);
    let current = engine.job().cloned();
    // The engine is lent to the body sink below; the commands that arrive
    // meanwhile are decided on a copy of what they depend on.
    let finished = engine.finished().clone();
    let copy = dev.progress_copy;
    let flog = &dev.log;
    let trust_state = &dev.trust;
    let job_trust = dev.job_trust;
    let tls = dev.status.https;
    let outbox = RefCell::new(Deque::new());
    let (result, cancel, ending) = {
        let mut sink = EngineSink {
            engine,
            flash,
            outbox: &outbox,
            ending: Actions::new(),
        };
        let topics = dev.topics;
        let mqtt_side = async {
            let mut lost = false;
            loop {
                let next = outbox.borrow_mut().pop_front();
                if let Some(p) = next {
                    publish_progress(&mut up.session, topics, &p, copy).await;
                    fieldlog::note_progress(flog, now_ms(), &p);
                    continue;
                }
                if up.session.is_connected() == lost {
                    // A loss (or a return) of the broker during the download.
                    lost = !lost;
                    let (level, what) = if lost {
                        (LogLevel::Warn, "broker connection lost during a download")
                    } else {
                        (LogLevel::Info, "broker connected")
                    };
                    flog.note(now_ms(), level, what);
                }
                if !up.session.is_connected() && up.maintain().await.is_err() {
                    Timer::after(Duration::from_secs(1)).await;
                    continue;
                }
                let until = Instant::now() + Duration::from_millis(50);
                match up.session.poll(until).await {
                    Ok(Some(msg)) if topics.is_logs_get(&msg.topic) => {
                        fieldlog::defer_get(flog, &msg);
                    }
                    Ok(Some(msg)) => {
                        let state = State::Updating {
                            job: current.as_ref(),
                        };
                        let read = read_command(&msg, topics, job_trust.as_ref(), trust_state, tls);
                        if let Some(cmd) = during_download(read, topics, state, &finished, &outbox)
                        {
                            return cmd;
                        }
                    }
                    Ok(None) => {}
                    Err(_) => {}
                }
            }
        };
        let timer = Timer::at(Instant::from_millis(deadline));
        let outcome = select3(
            downloader.download(&url, u64::from(from), &mut sink),
            mqtt_side,
            timer,
        )
        .await;
        let (result, cancel) = match outcome {
            Either3::First(r) => (Some(r), None),
            Either3::Second(cmd) => (None, Some(cmd)),
            Either3::Third(()) => (None, None),
        };
        (result, cancel, sink.ending)
    };
    // Publish what the engine produced during the fetch, in order.
    loop {
        let next = outbox.borrow_mut().pop_front();
        match next {
            Some(p) => dev.publish(&mut up.session, p).await,
            None => break,
        }
    }
    let now = now_ms();
    let mut actions = ending;
    // A signed cancel's sequence number is recorded before it acts; if that
    // fails the cancel still runs (the download already stopped), and says so.
    let cancel = match cancel {
        Some((cmd, Some(seq))) => {
            if dev.trust.accept_seq(flash, seq).await.is_err() {
                warn!("could not record a cancel's sequence number");
            }
            dev.status.job_seq = dev.trust.seq();
            Some(cmd)
        }
        Some((cmd, None)) => Some(cmd),
        None => None,
    };
    let event = match (result, cancel) {
        (_, Some(cmd)) => Some(Event::Command(cmd)),
        (Some(Ok(_)), None) => Some(Event::BodyEnd),
        (Some(Err(DownloadError::Aborted)), None) => None,
        (Some(Err(DownloadError::Timeout)), None) => Some(Event::Stalled),
        (Some(Err(e)), None) => Some(Event::FetchFailed(fetch_error(e, &url))),
        // The overall deadline passed while the fetch was silent.
        (None, None) => Some(Event::Tick),
    };
    if let Some(ev) = event {
        for a in engine.handle(flash, now, ev) {
            let _ = actions.push(a);
        }
    }
    if engine.is_busy()
        && !actions
            .iter()
            .any(|a| matches!(a, Action::Fetch { .. } | Action::StopFetch | Action::Reboot))
    {
        // Neither finished nor failed: make sure the engine gets its ticks.
        for a in engine.tick(flash, now) {
            let _ = actions.push(a);
        }
    }
    actions
}

/// Names a failed download in the core's terms; the core decides whether it
/// is retried ([`FetchError::is_transient`]).
fn fetch_error(e: DownloadError, url: &str) -> FetchError {
    match e {
        DownloadError::Status(status) => FetchError::Status(status),
        DownloadError::Dns => FetchError::Dns,
        DownloadError::Protocol => FetchError::BadResponse,
        DownloadError::BadContentLength => FetchError::BadContentLength,
        DownloadError::UnsupportedScheme if is_https(url) => FetchError::HttpsNotEnabled,
        DownloadError::UnsupportedScheme | DownloadError::InvalidUrl => FetchError::BadUrl,
        DownloadError::Redirect(RedirectError::TooMany) => FetchError::TooManyRedirects,
        DownloadError::Redirect(RedirectError::Insecure) => FetchError::InsecureRedirect,
        DownloadError::Redirect(RedirectError::UnsupportedScheme) => {
            FetchError::RedirectUnsupported
        }
        DownloadError::Redirect(_) => FetchError::BadRedirect,
        DownloadError::Tls(f) => FetchError::Tls(f.as_str()),
        // Network, and anything a later reqwless adds: worth another try.
        _ => FetchError::Connection,
    }
}
/// A command during a download, decided by [`decide`] like every other: a
/// `cancel` of this job (or of none named) ends the download (returned);
/// refusals (`busy`, `duplicate_job`, `bad_command`) are queued; retained
/// commands and everything else are ignored.
pub(super) fn during_download(
    read: Incoming,
    topics: &Topics,
    state: State<'_>,
    finished: &Finished,
    outbox: &RefCell<Deque<Progress, PROGRESS_QUEUE>>,
) -> Option<(Command, Option<u64>)> {
    let (cmd, seq) = match read {
        Incoming::Command(cmd, seq) => (cmd, seq),
        Incoming::Bad(p) => {
            queue(outbox, p);
            return None;
        }
        Incoming::Ignored => return None,
    };
    match decide(state, finished, &cmd) {
        Decision::Cancel => Some((cmd, seq)),
        Decision::Refuse(code, why) => {
            let job = cmd.job();
            queue(
                outbox,
                Progress::new(topics.device_id(), job, Phase::Failed).with_error(code, Some(why)),
            );
            None
        }
        // A cancel of another job must not even drop the fetch: the engine
        // would ignore it and the download would sit until the stall timeout.
        Decision::Ignore | Decision::Start | Decision::Rollback => None,
    }
}

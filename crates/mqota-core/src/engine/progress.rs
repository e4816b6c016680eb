//! Progress: the percentage reported, its throttling, and the builders of
//! the progress events the engine publishes.
use super::{push, Action, Actions, Engine, Millis};
use crate::protocol::{truncated, ErrorCode, JobId, Phase, Progress};

impl Engine {
    /// The percentage of `current` in `total` that progress events carry (0
    /// when the total is unknown, never above 100).
    pub fn percent(current: u32, total: Option<u32>) -> u8 {
        match total {
            Some(t) if t > 0 => ((current as u64 * 100) / t as u64).min(100) as u8,
            _ => 0,
        }
    }

    /// Seed API, kept as an alias of [`Engine::percent`].
    pub fn handle_progress(current: u32, total: Option<u32>) -> u8 {
        Self::percent(current, total)
    }

    pub(super) fn maybe_progress(&mut self, now: Millis, actions: &mut Actions) {
        let received = self.received();
        let interval = self.cfg.progress_interval_ms;
        let Some(dl) = self.dl.as_mut() else { return };
        let pct = Self::percent(received, dl.total).min(99);
        if pct > dl.percent && now.saturating_sub(dl.last_publish) >= interval {
            dl.percent = pct;
            dl.last_publish = now;
            push(
                actions,
                Action::Publish(self.progress_event(Phase::Downloading, None, "")),
            );
        }
    }

    pub(super) fn progress_event(
        &self,
        phase: Phase,
        error: Option<ErrorCode>,
        msg: &str,
    ) -> Progress {
        let (job, total, pct) = match &self.dl {
            Some(d) => (d.record.job.clone(), d.total, d.percent),
            None => (None, None, 0),
        };
        let mut ev = self.event_msg(job, phase, pct, error, msg);
        ev.bytes = self.received();
        ev.total = total;
        ev
    }

    pub(super) fn event(
        &self,
        job: Option<JobId>,
        phase: Phase,
        percent: u8,
        error: Option<ErrorCode>,
        bytes: u32,
    ) -> Progress {
        let mut ev = self.event_msg(job, phase, percent, error, "");
        ev.bytes = bytes;
        ev
    }

    pub(super) fn event_msg(
        &self,
        job: Option<JobId>,
        phase: Phase,
        percent: u8,
        error: Option<ErrorCode>,
        msg: &str,
    ) -> Progress {
        let mut ev = Progress::new(&self.cfg.device, job, phase);
        ev.percent = percent;
        ev.error = error;
        ev.message = (!msg.is_empty()).then(|| truncated(msg));
        ev
    }
}

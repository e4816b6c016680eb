//! What a command means: [`decide`], one pure function over the engine's
//! [`State`] and the jobs it [`Finished`], used by the engine, the runtime's
//! idle loop and its download loop alike.

use crate::protocol::{Command, ErrorCode, JobId};

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
/// table tests in `tests/commands.rs` cover every (state × command) pair.
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

//! The waits of a rollout, without I/O: [`Wait`] holds the devices a stage
//! (or a stop's rollback) waits for with their deadlines, and is told what
//! each device said ([`result_of`], read from the device's own topics only)
//! and the clock; it answers whose wait ended and how ([`Outcome`]).

use std::collections::BTreeMap;

use mqota_core::protocol::{ErrorCode, Phase};

use crate::fleet::DeviceView;
use crate::store::{DeploymentState, DeviceState};

/// What a [`Wait`] waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Awaiting {
    /// Jobs: any terminal phase of the job ends a device's wait, and an
    /// operator's stop ends the whole wait (the stop then cancels them).
    Jobs,
    /// Rollbacks the controller sent: the device reports one under the
    /// deployment's job id while its retained `last` still says `done`, so
    /// only `rolled_back` (or a `failed`) ends it; a stop does not (a
    /// rollback is never cancelled: the device may be booting back).
    Rollbacks,
}

/// The devices a runner waits for, each with its deadline, without I/O
/// (see the module doc). `I` is the clock's instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wait<I> {
    awaiting: Awaiting,
    deadlines: BTreeMap<String, I>,
}

impl<I: Copy + PartialOrd> Wait<I> {
    /// Nobody waited for yet.
    pub fn new(awaiting: Awaiting) -> Self {
        Self {
            awaiting,
            deadlines: BTreeMap::new(),
        }
    }

    /// Waits for `device` until `deadline`.
    pub fn add(&mut self, device: String, deadline: I) {
        self.deadlines.insert(device, deadline);
    }

    /// Whether every device's wait has ended.
    pub fn is_over(&self) -> bool {
        self.deadlines.is_empty()
    }

    /// Whether `device` is still waited for.
    pub fn is_waiting(&self, device: &str) -> bool {
        self.deadlines.contains_key(device)
    }

    /// The devices still waited for.
    pub fn waiting(&self) -> Vec<String> {
        self.deadlines.keys().cloned().collect()
    }

    /// Whether the deployment's state, as the operator left it, matters to
    /// this wait (the runner then reads it now and then).
    pub fn obeys_operator(&self) -> bool {
        self.awaiting == Awaiting::Jobs
    }

    /// Whether the operator's `state` ends the wait now: a stop ends a
    /// wait for jobs (the runner's next step cancels them).
    pub fn ended_by(&self, state: DeploymentState) -> bool {
        self.obeys_operator() && state == DeploymentState::Stopped
    }

    /// What `device` (waited for in state `before`) said, at `now`: its
    /// outcome when its wait ends (it is then no longer waited for). `said`
    /// is [`result_of`] the device; a phase that does not end what is
    /// awaited counts as nothing said.
    pub fn device(
        &mut self,
        device: &str,
        before: DeviceState,
        said: Option<(Phase, Option<String>)>,
        now: I,
    ) -> Option<Outcome> {
        let deadline = *self.deadlines.get(device)?;
        let said = said.filter(|(p, _)| match self.awaiting {
            Awaiting::Jobs => p.is_terminal(),
            Awaiting::Rollbacks => matches!(p, Phase::RolledBack | Phase::Failed),
        });
        let o = outcome(before, said, now, deadline)?;
        self.deadlines.remove(device);
        Some(o)
    }
}

/// How a job of deployment `job` (installing `version`) ended on `d`, if it
/// did. Everything read here came from the device's own topics with its own
/// id in the payload ([`crate::fleet`] drops the rest). A failure is
/// believed from a terminal progress event of the job; success only from
/// the retained status: it must run `version` and its `last.job` must be
/// the job, since a progress `done` alone proves nothing about what boots.
pub fn result_of(d: &DeviceView, job: &str, version: &str) -> Option<(Phase, Option<String>)> {
    let status = d.status.as_ref();
    if let Some(last) = status.and_then(|s| s.last.as_ref()) {
        if last.job.as_deref() == Some(job) && last.result.is_terminal() {
            let runs_it = status
                .is_some_and(|s| mqota_core::version::same_release(s.version.as_str(), version));
            if last.result != Phase::Done || runs_it {
                return Some((last.result, last.error.map(|e| e.as_str().to_owned())));
            }
        }
    }
    for p in d.ended.iter().rev() {
        if p.job.as_deref() != Some(job) || p.phase == Phase::Done {
            continue;
        }
        match p.error {
            // A refusal of a repeated start (`duplicate_job`, or `busy` or
            // `replayed` while this very job runs: a redelivered command,
            // from firmware older than the one that ignores it) is not how
            // the job ended: the job's own events and the status say that.
            Some(ErrorCode::DuplicateJob) => continue,
            Some(ErrorCode::Busy | ErrorCode::Replayed) if d.in_flight.as_deref() == Some(job) => {
                continue
            }
            // `busy` with another job: this one will never run.
            _ => return Some((p.phase, p.error.map(|e| e.as_str().to_owned()))),
        }
    }
    None
}

/// What a waited-for device's job came to, decided from what the device
/// said (`said`: the terminal phase and error the rollout believes, see
/// [`crate::rollout`]) and the clock (`now` against its `deadline`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Its new state.
    pub state: DeviceState,
    /// The device's error code or the controller's reason.
    pub error: Option<String>,
    /// Send `cancel` first: a job given up on must not finish afterwards.
    pub cancel: bool,
}

/// Whether a device whose job ended in `state` should have its log read
/// for the job's result: only a job that failed on the device (it reported
/// `failed`, or its new firmware was rolled back) has a story in its log. A
/// timed-out device is likely unreachable, and a cancelled one did as told.
pub fn wants_log(state: DeviceState) -> bool {
    matches!(state, DeviceState::Failed | DeviceState::RolledBack)
}

/// How the wait for one device ends, if it does now. `before` is its state
/// while waited for: `sent` (its job) or `rollback_sent` (the controller's
/// rollback, which only `rolled_back` confirms; any other end is
/// `revert_failed`). `said` is `None` while the device has said nothing
/// that ends the wait; then the deadline decides.
pub fn outcome<N: PartialOrd>(
    before: DeviceState,
    said: Option<(mqota_core::protocol::Phase, Option<String>)>,
    now: N,
    deadline: N,
) -> Option<Outcome> {
    use mqota_core::protocol::Phase;
    let reverting = before == DeviceState::RollbackSent;
    if let Some((phase, error)) = said {
        let state = match (reverting, phase) {
            (true, Phase::RolledBack) => DeviceState::Reverted,
            (true, _) => DeviceState::RevertFailed,
            (false, Phase::Done) => DeviceState::Done,
            (false, Phase::RolledBack) => DeviceState::RolledBack,
            (false, Phase::Cancelled) => DeviceState::Cancelled,
            (false, _) => DeviceState::Failed,
        };
        return Some(Outcome {
            state,
            error,
            cancel: false,
        });
    }
    (now >= deadline).then(|| Outcome {
        state: if reverting {
            DeviceState::RevertFailed
        } else {
            DeviceState::TimedOut
        },
        error: Some("timeout".to_owned()),
        // A rollback is never cancelled: the device may be booting back.
        cancel: !reverting,
    })
}

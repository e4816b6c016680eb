//! The decisions of a rollout, without I/O: given where every device stands,
//! the options and what the operator asked, [`next`] says what the runner
//! ([`crate::rollout::run`]) does next. The runner sends the commands,
//! writes the store and waits for devices; then it asks again. Everything a
//! rollout decides (next stage, failure threshold, automatic rollback,
//! pause, stop) is here, so it is tested as a table (below) rather than
//! through a broker.
//!
//! The same goes for the waits in between: [`Wait`] holds the devices a
//! stage (or a stop's rollback) waits for with their deadlines, and is told
//! what each device said ([`result_of`], read from the device's own topics
//! only), the clock and the operator's state; it answers whose wait ended,
//! how ([`Outcome`]), and whether an operator's stop ends the wait. [`Course`]
//! is what one runner remembers between two steps (a pause it saw, the
//! stage it announced). The runner is left with the I/O: the broker, the
//! store, the clock and the observer.

use std::collections::BTreeMap;

use mqota_core::protocol::{ErrorCode, Phase};

use crate::fleet::DeviceView;
use crate::rollout::{too_many_failures, RolloutOptions};
use crate::store::{DeploymentState, DeviceState};

/// Every device of a deployment: its stage and where it stands.
pub type Devices = BTreeMap<String, (u32, DeviceState)>;

/// The reason stored when an operator stops a deployment.
pub const STOPPED_BY_OPERATOR: &str = "stopped by the operator";

/// What the runner does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// The operator stopped it: cancel these jobs in flight (mark them
    /// `cancelled`); the deployment is over, `stopped`.
    Stopped {
        /// Devices whose job was sent and has no result.
        cancel: Vec<String>,
    },
    /// Stop for failures (or carry on a stop decided before the runner
    /// went away): store `reason` while still `running`, mark `skip` as
    /// skipped, send `rollback` to `roll_back` (marking each
    /// `rollback_sent` first), wait for them and for `awaiting_rollback`,
    /// then end `failed`.
    StopForFailures {
        /// Why, as stored.
        reason: String,
        /// Devices never sent a job.
        skip: Vec<String>,
        /// Updated devices to send `rollback` (only with auto-rollback).
        roll_back: Vec<String>,
        /// Devices whose rollback was sent before: only waited for.
        awaiting_rollback: Vec<String>,
    },
    /// Wait for the jobs in flight of stage `stage`.
    Wait {
        /// Stage index.
        stage: u32,
        /// Devices whose job was sent and has no result.
        devices: Vec<String>,
    },
    /// Send the jobs of stage `stage` to `send` (its devices not sent yet),
    /// checking for a pause or stop before each.
    Send {
        /// Stage index.
        stage: u32,
        /// Every device of the stage.
        members: Vec<String>,
        /// Those still `pending`.
        send: Vec<String>,
    },
    /// Paused with nothing in flight: the runner ends here; the deployment
    /// stays `paused` until resumed.
    Paused,
    /// Every stage is over: store this end.
    Finish {
        /// `succeeded` or `failed`.
        state: DeploymentState,
        /// Why, when some failed.
        reason: Option<String>,
    },
}

fn ids(devices: &Devices, f: impl Fn(u32, DeviceState) -> bool) -> Vec<String> {
    devices
        .iter()
        .filter(|(_, (stage, s))| f(*stage, *s))
        .map(|(d, _)| d.clone())
        .collect()
}

/// What to do next. `state` and `reason` are the deployment's as stored
/// (a `running` deployment with a reason is stopping for failures).
///
/// In order: an operator's stop wins; a stop for failures already decided
/// is carried on; jobs in flight are waited for (a pause lets them
/// finish); then the failure threshold is checked against the jobs sent so
/// far; then a pause ends the runner; then the next stage is sent; and
/// when no stage is left, the deployment ends.
pub fn next(
    devices: &Devices,
    options: &RolloutOptions,
    state: DeploymentState,
    reason: Option<&str>,
) -> Next {
    let stage_count = devices.values().map(|(s, _)| *s + 1).max().unwrap_or(0);
    if state == DeploymentState::Stopped {
        return Next::Stopped {
            cancel: ids(devices, |_, s| s == DeviceState::Sent),
        };
    }
    let failing = |reason: String| Next::StopForFailures {
        reason,
        skip: ids(devices, |_, s| s == DeviceState::Pending),
        roll_back: if options.auto_rollback {
            ids(devices, |_, s| s == DeviceState::Done)
        } else {
            Vec::new()
        },
        awaiting_rollback: ids(devices, |_, s| s == DeviceState::RollbackSent),
    };
    if let (DeploymentState::Running, Some(r)) = (state, reason) {
        return failing(r.to_owned());
    }
    let in_flight = ids(devices, |_, s| s == DeviceState::Sent);
    if let Some(first) = in_flight.first() {
        return Next::Wait {
            stage: devices[first].0,
            devices: in_flight,
        };
    }
    let attempted = devices
        .values()
        .filter(|(_, s)| !matches!(s, DeviceState::Pending | DeviceState::Skipped))
        .count();
    let failed = devices.values().filter(|(_, s)| s.is_failure()).count();
    if too_many_failures(options.max_failures, failed, attempted) {
        let last = devices
            .values()
            .filter(|(_, s)| !matches!(s, DeviceState::Pending | DeviceState::Skipped))
            .map(|(st, _)| *st)
            .max()
            .unwrap_or(0);
        return failing(format!(
            "{failed} of {attempted} {} failed (limit {}), stopped after stage {} of {stage_count}",
            if attempted == 1 { "device" } else { "devices" },
            options.max_failures,
            last + 1
        ));
    }
    if state == DeploymentState::Paused {
        return Next::Paused;
    }
    let pending_stage = devices
        .values()
        .filter(|(_, s)| *s == DeviceState::Pending)
        .map(|(st, _)| *st)
        .min();
    if let Some(stage) = pending_stage {
        return Next::Send {
            stage,
            members: ids(devices, |st, _| st == stage),
            send: ids(devices, |st, s| st == stage && s == DeviceState::Pending),
        };
    }
    if failed == 0 {
        Next::Finish {
            state: DeploymentState::Succeeded,
            reason: None,
        }
    } else {
        Next::Finish {
            state: DeploymentState::Failed,
            reason: Some(format!(
                "{failed} {} failed (within the limit)",
                if failed == 1 { "device" } else { "devices" }
            )),
        }
    }
}

/// What one runner remembers between two steps: [`Course::next`] is
/// [`next`] for a runner that has seen a pause (it must end once its jobs in
/// flight are in, even when resumed meanwhile: the resume starts a runner
/// of its own, and two would send every later stage twice), and
/// [`Course::announce`] tells each stage once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Course {
    saw_pause: bool,
    announced: Option<u32>,
}

impl Course {
    /// [`next`], after a pause seen by this runner: no more sending, no
    /// end; the runner stops with its jobs in flight in.
    pub fn next(
        &mut self,
        devices: &Devices,
        options: &RolloutOptions,
        state: DeploymentState,
        reason: Option<&str>,
    ) -> Next {
        self.saw_pause |= state == DeploymentState::Paused;
        match next(devices, options, state, reason) {
            Next::Send { .. } | Next::Finish { .. } if self.saw_pause => Next::Paused,
            step => step,
        }
    }

    /// Whether stage `stage` is to be announced now (the first time it is
    /// sent or waited for).
    pub fn announce(&mut self, stage: u32) -> bool {
        let first = self.announced != Some(stage);
        self.announced = Some(stage);
        first
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::Amount;
    use DeploymentState as D;
    use DeviceState::*;

    fn devices(list: &[(&str, u32, DeviceState)]) -> Devices {
        list.iter()
            .map(|(d, st, s)| (d.to_string(), (*st, *s)))
            .collect()
    }

    fn v(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn opts(max: Amount, auto_rollback: bool) -> RolloutOptions {
        RolloutOptions {
            max_failures: max,
            auto_rollback,
            ..RolloutOptions::default()
        }
    }

    #[test]
    fn each_situation_leads_to_its_next_step() {
        let none = opts(Amount::Count(0), false);
        let one = opts(Amount::Count(1), false);
        let rb = opts(Amount::Count(0), true);
        struct Case {
            what: &'static str,
            devices: Devices,
            options: RolloutOptions,
            state: DeploymentState,
            reason: Option<&'static str>,
            next: Next,
        }
        let cases = [
            Case {
                what: "a new deployment sends its canary stage",
                devices: devices(&[("a", 0, Pending), ("b", 1, Pending), ("c", 1, Pending)]),
                options: none.clone(),
                state: D::Running,
                reason: None,
                next: Next::Send {
                    stage: 0,
                    members: v(&["a"]),
                    send: v(&["a"]),
                },
            },
            Case {
                what: "jobs in flight are waited for before anything else",
                devices: devices(&[("a", 0, Sent), ("b", 0, Failed), ("c", 1, Pending)]),
                options: none.clone(),
                state: D::Running,
                reason: None,
                next: Next::Wait {
                    stage: 0,
                    devices: v(&["a"]),
                },
            },
            Case {
                what: "a stage over with the canary done sends the next",
                devices: devices(&[("a", 0, Done), ("b", 1, Pending), ("c", 1, Pending)]),
                options: none.clone(),
                state: D::Running,
                reason: None,
                next: Next::Send {
                    stage: 1,
                    members: v(&["b", "c"]),
                    send: v(&["b", "c"]),
                },
            },
            Case {
                what: "a stage half sent before a pause or crash sends the rest",
                devices: devices(&[("a", 0, Done), ("b", 0, Pending)]),
                options: none.clone(),
                state: D::Running,
                reason: None,
                next: Next::Send {
                    stage: 0,
                    members: v(&["a", "b"]),
                    send: v(&["b"]),
                },
            },
            Case {
                what: "a failure past the threshold stops, skipping the rest",
                devices: devices(&[("a", 0, Failed), ("b", 1, Pending)]),
                options: none.clone(),
                state: D::Running,
                reason: None,
                next: Next::StopForFailures {
                    reason: "1 of 1 device failed (limit 0), stopped after stage 1 of 2".into(),
                    skip: v(&["b"]),
                    roll_back: vec![],
                    awaiting_rollback: vec![],
                },
            },
            Case {
                what: "a failure within the threshold carries on",
                devices: devices(&[("a", 0, TimedOut), ("b", 0, Done), ("c", 1, Pending)]),
                options: one.clone(),
                state: D::Running,
                reason: None,
                next: Next::Send {
                    stage: 1,
                    members: v(&["c"]),
                    send: v(&["c"]),
                },
            },
            Case {
                what: "auto-rollback rolls back the updated devices",
                devices: devices(&[("a", 0, Done), ("b", 0, RolledBack), ("c", 1, Pending)]),
                options: rb.clone(),
                state: D::Running,
                reason: None,
                next: Next::StopForFailures {
                    reason: "1 of 2 devices failed (limit 0), stopped after stage 1 of 2".into(),
                    skip: v(&["c"]),
                    roll_back: v(&["a"]),
                    awaiting_rollback: vec![],
                },
            },
            Case {
                what: "a resumed stop never sends a second rollback",
                devices: devices(&[("a", 0, RollbackSent), ("b", 0, Done), ("c", 0, Failed)]),
                options: rb.clone(),
                state: D::Running,
                reason: Some("1 of 3 devices failed"),
                next: Next::StopForFailures {
                    reason: "1 of 3 devices failed".into(),
                    skip: vec![],
                    roll_back: v(&["b"]),
                    awaiting_rollback: v(&["a"]),
                },
            },
            Case {
                what: "a pause lets the jobs in flight finish",
                devices: devices(&[("a", 0, Sent), ("b", 1, Pending)]),
                options: none.clone(),
                state: D::Paused,
                reason: None,
                next: Next::Wait {
                    stage: 0,
                    devices: v(&["a"]),
                },
            },
            Case {
                what: "paused with nothing in flight, the runner ends",
                devices: devices(&[("a", 0, Done), ("b", 1, Pending)]),
                options: none.clone(),
                state: D::Paused,
                reason: None,
                next: Next::Paused,
            },
            Case {
                what: "a pause does not hide failures past the threshold",
                devices: devices(&[("a", 0, Failed), ("b", 1, Pending)]),
                options: none.clone(),
                state: D::Paused,
                reason: None,
                next: Next::StopForFailures {
                    reason: "1 of 1 device failed (limit 0), stopped after stage 1 of 2".into(),
                    skip: v(&["b"]),
                    roll_back: vec![],
                    awaiting_rollback: vec![],
                },
            },
            Case {
                what: "a stop cancels the jobs in flight, even past the threshold",
                devices: devices(&[("a", 0, Failed), ("b", 0, Sent), ("c", 1, Skipped)]),
                options: rb.clone(),
                state: D::Stopped,
                reason: Some(STOPPED_BY_OPERATOR),
                next: Next::Stopped { cancel: v(&["b"]) },
            },
            Case {
                what: "every stage over without failures succeeds",
                devices: devices(&[("a", 0, Done), ("b", 1, Done)]),
                options: none.clone(),
                state: D::Running,
                reason: None,
                next: Next::Finish {
                    state: D::Succeeded,
                    reason: None,
                },
            },
            Case {
                what: "failures within the limit end failed, with the count",
                devices: devices(&[("a", 0, Done), ("b", 1, Cancelled)]),
                options: one.clone(),
                state: D::Running,
                reason: None,
                next: Next::Finish {
                    state: D::Failed,
                    reason: Some("1 device failed (within the limit)".into()),
                },
            },
            Case {
                what: "a percentage threshold counts jobs sent so far",
                devices: devices(&[
                    ("a", 0, Failed),
                    ("b", 0, Done),
                    ("c", 0, Done),
                    ("d", 1, Pending),
                ]),
                options: opts(Amount::Percent(50), false),
                state: D::Running,
                reason: None,
                next: Next::Send {
                    stage: 1,
                    members: v(&["d"]),
                    send: v(&["d"]),
                },
            },
        ];
        for c in cases {
            assert_eq!(
                next(&c.devices, &c.options, c.state, c.reason),
                c.next,
                "{}",
                c.what
            );
        }
    }

    #[test]
    fn a_runner_that_saw_a_pause_sends_nothing_more_even_once_resumed() {
        let none = opts(Amount::Count(0), false);
        let mut c = Course::default();
        let sent = devices(&[("a", 0, Sent), ("b", 1, Pending)]);
        let done = devices(&[("a", 0, Done), ("b", 1, Pending)]);
        let all_done = devices(&[("a", 0, Done), ("b", 1, Done)]);
        // Running: it sends the next stage.
        assert!(matches!(
            c.clone().next(&done, &none, D::Running, None),
            Next::Send { stage: 1, .. }
        ));
        // Paused with a job in flight: it waits for it.
        assert!(matches!(
            c.next(&sent, &none, D::Paused, None),
            Next::Wait { stage: 0, .. }
        ));
        // Resumed meanwhile (by another process or this one's next run): this
        // run still ends once its job is in, and ends nothing itself.
        assert_eq!(c.next(&done, &none, D::Running, None), Next::Paused);
        assert_eq!(c.next(&all_done, &none, D::Running, None), Next::Paused);
        // A stop or a stop for failures is still carried out.
        assert!(matches!(
            c.next(&sent, &none, D::Stopped, Some(STOPPED_BY_OPERATOR)),
            Next::Stopped { .. }
        ));
        let failed = devices(&[("a", 0, Failed), ("b", 1, Pending)]);
        assert!(matches!(
            c.next(&failed, &none, D::Running, None),
            Next::StopForFailures { .. }
        ));
        // Each stage is announced once.
        let mut c = Course::default();
        assert!(c.announce(0));
        assert!(!c.announce(0));
        assert!(c.announce(1));
    }

    #[test]
    fn a_wait_ends_device_by_device_by_what_each_said_or_its_deadline() {
        let said = |p: Phase, e: Option<&str>| Some((p, e.map(str::to_owned)));
        let mut w = Wait::new(Awaiting::Jobs);
        w.add("a".into(), 10);
        w.add("b".into(), 20);
        assert!(w.obeys_operator());
        assert!(!w.ended_by(D::Paused), "a pause lets the jobs finish");
        assert!(!w.ended_by(D::Running));
        assert!(w.ended_by(D::Stopped));
        // A phase that is not an end is nothing said.
        assert_eq!(w.device("a", Sent, said(Phase::Downloading, None), 5), None);
        assert_eq!(
            w.device("x", Sent, said(Phase::Done, None), 5),
            None,
            "not waited for"
        );
        let o = w
            .device("a", Sent, said(Phase::Failed, Some("http_status")), 5)
            .unwrap();
        assert_eq!(
            (o.state, o.error.as_deref(), o.cancel),
            (Failed, Some("http_status"), false)
        );
        assert!(!w.is_waiting("a"));
        assert_eq!(
            w.device("a", Failed, said(Phase::Done, None), 6),
            None,
            "ended once"
        );
        assert_eq!(w.device("b", Sent, None, 19), None);
        let o = w.device("b", Sent, None, 20).unwrap();
        assert_eq!((o.state, o.cancel), (TimedOut, true));
        assert!(w.is_over());

        // A rollback's wait: only `rolled_back` or `failed` ends it, a stop
        // does not, and a timeout sends no cancel.
        let mut w = Wait::new(Awaiting::Rollbacks);
        w.add("a".into(), 10);
        w.add("b".into(), 10);
        assert!(!w.obeys_operator() && !w.ended_by(D::Stopped));
        assert_eq!(
            w.device("a", RollbackSent, said(Phase::Cancelled, None), 1),
            None
        );
        let o = w
            .device("a", RollbackSent, said(Phase::RolledBack, None), 1)
            .unwrap();
        assert_eq!(o.state, Reverted);
        let o = w.device("b", RollbackSent, None, 10).unwrap();
        assert_eq!((o.state, o.cancel), (RevertFailed, false));
    }

    #[test]
    fn a_device_wait_ends_by_what_it_said_or_by_the_clock() {
        use mqota_core::protocol::Phase;
        let said = |p: Phase, e: Option<&str>| Some((p, e.map(str::to_owned)));
        let o = |state, error: Option<&str>, cancel| {
            Some(Outcome {
                state,
                error: error.map(str::to_owned),
                cancel,
            })
        };
        #[rustfmt::skip]
        let cases = [
            ("a job done", Sent, said(Phase::Done, None), 0, 10, o(Done, None, false)),
            ("a job failed", Sent, said(Phase::Failed, Some("http_status")), 0, 10, o(Failed, Some("http_status"), false)),
            ("a job rolled back by the device", Sent, said(Phase::RolledBack, Some("health_check_failed")), 0, 10, o(RolledBack, Some("health_check_failed"), false)),
            ("a job cancelled", Sent, said(Phase::Cancelled, None), 0, 10, o(Cancelled, None, false)),
            ("silence before the deadline", Sent, None, 9, 10, None),
            ("silence at the deadline cancels the job", Sent, None, 10, 10, o(TimedOut, Some("timeout"), true)),
            ("a result wins over a passed deadline", Sent, said(Phase::Done, None), 11, 10, o(Done, None, false)),
            ("a rollback confirmed", RollbackSent, said(Phase::RolledBack, None), 0, 10, o(Reverted, None, false)),
            ("a rollback failed", RollbackSent, said(Phase::Failed, Some("no_previous_image")), 0, 10, o(RevertFailed, Some("no_previous_image"), false)),
            ("a rollback unanswered is not cancelled", RollbackSent, None, 10, 10, o(RevertFailed, Some("timeout"), false)),
        ];
        for (what, before, said, now, deadline, want) in cases {
            assert_eq!(outcome(before, said, now, deadline), want, "{what}");
        }
    }
}

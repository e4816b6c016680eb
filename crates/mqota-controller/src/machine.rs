//! The decisions of a rollout, without I/O: given where every device stands,
//! the options and what the operator asked, [`next`] says what the runner
//! ([`crate::rollout::run`]) does next. The runner sends the commands,
//! writes the store and waits for devices; then it asks again. Everything a
//! rollout decides (next stage, failure threshold, automatic rollback,
//! pause, stop) is here, so it is tested as a table (below) rather than
//! through a broker.

use std::collections::BTreeMap;

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

//! The rollout machine told as tables: what it decides ([`next`]), how a
//! wait ends ([`Wait`], [`outcome`]), and whole rollouts driven event by
//! event ([`Rollout`]).
use super::*;
use crate::rollout::Amount;
use mqota_core::protocol::Phase;
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

// ---- Whole rollouts, event by event ----

/// The deployment's job id and the version it installs.
const JOB: &str = "j";
const NEW: &str = "1.1.0";
const OLD: &str = "1.0.0";

/// The operator's word as the runner reads it from the store.
const RUN: Event = Event::Operator(D::Running);
const PAUSE: Event = Event::Operator(D::Paused);
const STOP: Event = Event::Operator(D::Stopped);

/// A device's view: its retained status (running `version`, with `last`
/// as `(job, result)`), its terminal progress events `ended` as
/// `(job, phase, error)`, and the job it is busy with.
fn view(
    id: &str,
    version: &str,
    last: Option<(&str, &str)>,
    ended: &[(&str, &str, Option<&str>)],
    in_flight: Option<&str>,
) -> Event {
    let last = last.map(|(job, result)| serde_json::json!({"job": job, "result": result}));
    let status = serde_json::json!({
        "device": id, "chip": "esp32c3", "project": "p",
        "version": version, "slot": 0, "state": "valid", "last": last,
    });
    let ended = ended
        .iter()
        .map(|(job, phase, error)| {
            serde_json::from_value(serde_json::json!({
                "device": id, "job": job, "phase": phase, "bytes": 0, "total": null,
                "percent": 100, "error": error, "message": null
            }))
            .unwrap()
        })
        .collect();
    Event::Device(Box::new(DeviceView {
        id: id.into(),
        status: Some(serde_json::from_value(status).unwrap()),
        online: true,
        progress: None,
        ended,
        in_flight: in_flight.map(str::to_owned),
    }))
}

/// The device runs the new version and its status says the job is done.
fn done(id: &str) -> Event {
    view(id, NEW, Some((JOB, "done")), &[], None)
}

/// The device reported the job `failed` with `error`.
fn failed(id: &str, error: &str) -> Event {
    view(id, OLD, None, &[(JOB, "failed", Some(error))], None)
}

/// The device refused a start of the job with `error` while busy with
/// `in_flight`.
fn refused(id: &str, error: &str, in_flight: &str) -> Event {
    view(
        id,
        OLD,
        None,
        &[(JOB, "failed", Some(error))],
        Some(in_flight),
    )
}

/// The device booted back to the old version under the job's id (its
/// answer to the controller's rollback), while its status still says the
/// job was done.
fn rolled_back(id: &str) -> Event {
    view(
        id,
        OLD,
        Some((JOB, "done")),
        &[(JOB, "rolled_back", None)],
        None,
    )
}

/// An action as one line of the tables below.
fn show(a: &Action) -> String {
    let err = |e: &Option<String>| e.as_ref().map(|e| format!(": {e}")).unwrap_or_default();
    match a {
        Action::Start(d) => format!("start {d}"),
        Action::Cancel(d) => format!("cancel {d}"),
        Action::Rollback(d) => format!("rollback {d}"),
        Action::Record {
            device,
            state,
            error,
        } => format!("record {device} {}{}", state.as_str(), err(error)),
        Action::Deployment { state, reason } => {
            format!("deployment {}{}", state.as_str(), err(reason))
        }
        Action::ReadLog(d) => format!("read log {d}"),
        Action::Report(Report::Stage {
            index,
            count,
            members,
        }) => format!("stage {} of {count}: {}", index + 1, members.join(", ")),
        Action::Report(Report::Result {
            device,
            state,
            error,
        }) => format!("result {device} {}{}", state.as_str(), err(error)),
        Action::Report(Report::Stopping(why)) => format!("stopping: {why}"),
        Action::Report(Report::RollingBack(d)) => format!("rolling back {d}"),
        Action::End => "end".into(),
    }
}

struct Run {
    what: &'static str,
    /// Where each device stands as stored when the run starts.
    devices: &'static [(&'static str, u32, DeviceState)],
    options: RolloutOptions,
    /// The deployment's state and reason as stored.
    state: DeploymentState,
    reason: Option<&'static str>,
    /// Seconds since the start, what happens, what the runner is told to do.
    script: Vec<(u64, Event, &'static [&'static str])>,
    /// Where each device stands at the end, as far as the machine knows.
    after: &'static [(&'static str, DeviceState)],
}

const FAILED_1_OF_2: &str = "1 of 2 devices failed (limit 0), stopped after stage 1 of 2";

#[test]
fn each_rollout_runs_its_course_event_by_event() {
    let none = opts(Amount::Count(0), false);
    let one = opts(Amount::Count(1), false);
    let rb = opts(Amount::Count(0), true);
    #[rustfmt::skip]
    let runs = [
        Run {
            what: "a canary that succeeds lets the next stage go, a job at a time",
            devices: &[("a", 0, Pending), ("b", 1, Pending), ("c", 1, Pending)],
            options: none.clone(),
            state: D::Running,
            reason: None,
            script: vec![
                (0, RUN, &["stage 1 of 2: a", "start a", "record a sent"]),
                // Downloading: nothing has ended.
                (1, view("a", OLD, None, &[], Some(JOB)), &[]),
                (2, done("a"), &["record a done", "result a done", "stage 2 of 2: b, c"]),
                (2, RUN, &["start b", "record b sent"]),
                (2, RUN, &["start c", "record c sent"]),
                (3, done("b"), &["record b done", "result b done"]),
                (4, done("c"), &["record c done", "result c done", "deployment succeeded", "end"]),
                (5, RUN, &[]),
            ],
            after: &[("a", Done), ("b", Done), ("c", Done)],
        },
        Run {
            what: "a failure past the threshold stops the rollout and skips the rest",
            devices: &[("a", 0, Pending), ("b", 1, Pending), ("c", 1, Pending)],
            options: none.clone(),
            state: D::Running,
            reason: None,
            script: vec![
                (0, RUN, &["stage 1 of 2: a", "start a", "record a sent"]),
                (1, failed("a", "http_status"), &[
                    "record a failed: http_status", "read log a", "result a failed: http_status",
                    "deployment running: 1 of 1 device failed (limit 0), stopped after stage 1 of 2",
                    "stopping: 1 of 1 device failed (limit 0), stopped after stage 1 of 2",
                    "record b skipped: rollout stopped", "record c skipped: rollout stopped",
                    "deployment failed: 1 of 1 device failed (limit 0), stopped after stage 1 of 2",
                    "end",
                ]),
            ],
            after: &[("a", Failed), ("b", Skipped), ("c", Skipped)],
        },
        Run {
            what: "auto-rollback sends a rollback to the updated devices, once, and waits for it; \
                   an operator's stop does not cut it short",
            devices: &[("a", 0, Pending), ("b", 0, Pending), ("c", 1, Pending)],
            options: rb.clone(),
            state: D::Running,
            reason: None,
            script: vec![
                (0, RUN, &["stage 1 of 2: a, b", "start a", "record a sent"]),
                (0, RUN, &["start b", "record b sent"]),
                (1, done("a"), &["record a done", "result a done"]),
                (2, failed("b", "hash_mismatch"), &[
                    "record b failed: hash_mismatch", "read log b", "result b failed: hash_mismatch",
                    "deployment running: 1 of 2 devices failed (limit 0), stopped after stage 1 of 2",
                    "stopping: 1 of 2 devices failed (limit 0), stopped after stage 1 of 2",
                    "record c skipped: rollout stopped",
                    "rolling back a", "record a rollback_sent", "rollback a",
                ]),
                // Its status still says `done`: that is not the rollback's end.
                (3, done("a"), &[]),
                (3, STOP, &[]),
                (4, rolled_back("a"), &[
                    "record a reverted", "result a reverted",
                    "deployment failed: 1 of 2 devices failed (limit 0), stopped after stage 1 of 2",
                    "end",
                ]),
            ],
            after: &[("a", Reverted), ("b", Failed), ("c", Skipped)],
        },
        Run {
            what: "a resumed stop for failures waits for the rollback sent before and never sends it again",
            devices: &[("a", 0, RollbackSent), ("b", 0, Done), ("c", 0, Failed), ("d", 1, Skipped)],
            options: rb.clone(),
            state: D::Running,
            reason: Some(FAILED_1_OF_2),
            script: vec![
                (0, RUN, &[
                    "stopping: 1 of 2 devices failed (limit 0), stopped after stage 1 of 2",
                    "rolling back b", "record b rollback_sent", "rollback b",
                ]),
                (1, rolled_back("a"), &["record a reverted", "result a reverted"]),
                // A rollback unanswered is given up on, never cancelled.
                (599, Event::Tick, &[]),
                (600, Event::Tick, &[
                    "record b revert_failed: timeout", "result b revert_failed: timeout",
                    "deployment failed: 1 of 2 devices failed (limit 0), stopped after stage 1 of 2",
                    "end",
                ]),
            ],
            after: &[("a", Reverted), ("b", RevertFailed), ("c", Failed), ("d", Skipped)],
        },
        Run {
            what: "an operator's stop cancels the jobs in flight and ends the run `stopped`: nothing more is sent",
            devices: &[("a", 0, Pending), ("b", 0, Pending), ("c", 1, Pending)],
            options: none.clone(),
            state: D::Running,
            reason: None,
            script: vec![
                (0, RUN, &["stage 1 of 2: a, b", "start a", "record a sent"]),
                // Read between two sends: b is never sent.
                (0, STOP, &[
                    "stopping: stopped by the operator",
                    "cancel a", "record a cancelled: stopped by the operator",
                    "result a cancelled: stopped by the operator", "end",
                ]),
                (1, done("a"), &[]),
                (1, RUN, &[]),
                (700, Event::Tick, &[]),
            ],
            // The store's stop skipped those never sent.
            after: &[("a", Cancelled), ("b", Skipped), ("c", Skipped)],
        },
        Run {
            what: "a stop while a stage is waited for cancels it, even past the threshold",
            devices: &[("a", 0, Failed), ("b", 0, Sent), ("c", 1, Pending)],
            options: one.clone(),
            state: D::Running,
            reason: None,
            script: vec![
                (0, RUN, &["stage 1 of 2: a, b"]),
                (1, STOP, &[
                    "stopping: stopped by the operator",
                    "cancel b", "record b cancelled: stopped by the operator",
                    "result b cancelled: stopped by the operator", "end",
                ]),
            ],
            after: &[("a", Failed), ("b", Cancelled), ("c", Skipped)],
        },
        Run {
            what: "a pause sends nothing more: the jobs in flight finish and the run ends, \
                   even when resumed meanwhile (the resume runs it anew)",
            devices: &[("a", 0, Pending), ("b", 0, Pending), ("c", 1, Pending)],
            options: none.clone(),
            state: D::Running,
            reason: None,
            script: vec![
                (0, RUN, &["stage 1 of 2: a, b", "start a", "record a sent"]),
                (0, PAUSE, &[]),
                (1, RUN, &[]),
                (2, done("a"), &["record a done", "result a done", "end"]),
                (3, RUN, &[]),
            ],
            after: &[("a", Done), ("b", Pending), ("c", Pending)],
        },
        Run {
            what: "paused with nothing in flight, the run ends at once",
            devices: &[("a", 0, Done), ("b", 1, Pending)],
            options: none.clone(),
            state: D::Paused,
            reason: None,
            script: vec![(0, PAUSE, &["end"])],
            after: &[("a", Done), ("b", Pending)],
        },
        Run {
            what: "a resumed run carries on where the last one stopped: the rest of a half-sent \
                   stage, then the next",
            devices: &[("a", 0, Done), ("b", 0, Pending), ("c", 1, Pending)],
            options: none.clone(),
            state: D::Running,
            reason: None,
            script: vec![
                (0, RUN, &["stage 1 of 2: a, b", "start b", "record b sent"]),
                (1, done("b"), &["record b done", "result b done", "stage 2 of 2: c"]),
                (1, RUN, &["start c", "record c sent"]),
                (2, done("c"), &["record c done", "result c done", "deployment succeeded", "end"]),
            ],
            after: &[("a", Done), ("b", Done), ("c", Done)],
        },
        Run {
            what: "a resumed run waits afresh for the jobs sent before it",
            devices: &[("a", 0, Sent), ("b", 1, Pending)],
            options: none.clone(),
            state: D::Running,
            reason: None,
            script: vec![
                (100, RUN, &["stage 1 of 2: a"]),
                (699, Event::Tick, &[]),
                (700, done("a"), &["record a done", "result a done", "stage 2 of 2: b"]),
                (700, RUN, &["start b", "record b sent"]),
            ],
            after: &[("a", Done), ("b", Sent)],
        },
        Run {
            what: "a device silent past its timeout is `timed_out` and sent a cancel",
            devices: &[("a", 0, Pending), ("b", 1, Pending)],
            options: one.clone(),
            state: D::Running,
            reason: None,
            script: vec![
                (0, RUN, &["stage 1 of 2: a", "start a", "record a sent"]),
                (599, Event::Tick, &[]),
                (600, Event::Tick, &[
                    "cancel a", "record a timed_out: timeout", "result a timed_out: timeout",
                    "stage 2 of 2: b",
                ]),
                // Too late: the wait is over.
                (601, done("a"), &[]),
                (601, RUN, &["start b", "record b sent"]),
                (602, done("b"), &[
                    "record b done", "result b done",
                    "deployment failed: 1 device failed (within the limit)", "end",
                ]),
            ],
            after: &[("a", TimedOut), ("b", Done)],
        },
        Run {
            what: "a redelivered start's refusal, and a bare `done`, are not how the job ended",
            devices: &[("a", 0, Pending)],
            options: none.clone(),
            state: D::Running,
            reason: None,
            script: vec![
                (0, RUN, &["stage 1 of 1: a", "start a", "record a sent"]),
                (1, refused("a", "busy", JOB), &[]),
                (1, refused("a", "duplicate_job", "other"), &[]),
                (1, refused("a", "replayed", JOB), &[]),
                (2, view("a", OLD, None, &[(JOB, "done", None)], None), &[]),
                (3, done("a"), &["record a done", "result a done", "deployment succeeded", "end"]),
            ],
            after: &[("a", Done)],
        },
        Run {
            what: "`busy` with another job is this job's end: it will never run",
            devices: &[("a", 0, Pending), ("b", 1, Pending)],
            options: none.clone(),
            state: D::Running,
            reason: None,
            script: vec![
                (0, RUN, &["stage 1 of 2: a", "start a", "record a sent"]),
                (1, refused("a", "busy", "other"), &[
                    "record a failed: busy", "read log a", "result a failed: busy",
                    "deployment running: 1 of 1 device failed (limit 0), stopped after stage 1 of 2",
                    "stopping: 1 of 1 device failed (limit 0), stopped after stage 1 of 2",
                    "record b skipped: rollout stopped",
                    "deployment failed: 1 of 1 device failed (limit 0), stopped after stage 1 of 2",
                    "end",
                ]),
            ],
            after: &[("a", Failed), ("b", Skipped)],
        },
        Run {
            what: "a deployment ended by someone else ends the run without a word",
            devices: &[("a", 0, Pending), ("b", 0, Pending)],
            options: none.clone(),
            state: D::Running,
            reason: None,
            script: vec![
                (0, RUN, &["stage 1 of 1: a, b", "start a", "record a sent"]),
                (0, Event::Operator(D::Succeeded), &[]),
                (1, done("a"), &["record a done", "result a done", "end"]),
            ],
            after: &[("a", Done), ("b", Pending)],
        },
        Run {
            what: "another device's news, and devices not waited for, change nothing",
            devices: &[("a", 0, Pending), ("b", 1, Pending)],
            options: none.clone(),
            state: D::Running,
            reason: None,
            script: vec![
                (0, RUN, &["stage 1 of 2: a", "start a", "record a sent"]),
                (1, done("b"), &[]),
                (1, done("x"), &[]),
                (1, failed("b", "http_status"), &[]),
            ],
            after: &[("a", Sent), ("b", Pending)],
        },
    ];
    for run in runs {
        let mut r = Rollout::new(
            JOB,
            NEW,
            run.options,
            devices(run.devices),
            run.state,
            run.reason.map(str::to_owned),
        );
        for (i, (at, event, want)) in run.script.into_iter().enumerate() {
            let got: Vec<String> = r
                .handle(Duration::from_secs(at), event)
                .iter()
                .map(show)
                .collect();
            assert_eq!(got, want, "{}: step {}", run.what, i + 1);
        }
        let after: Vec<(&str, DeviceState)> = r
            .devices()
            .iter()
            .map(|(d, (_, s))| (d.as_str(), *s))
            .collect();
        assert_eq!(after, run.after, "{}: where the devices stand", run.what);
    }
}

#[test]
fn a_run_sends_one_job_per_running_read_and_says_when_it_is_sending() {
    let mut r: Rollout<Duration> = Rollout::new(
        JOB,
        NEW,
        RolloutOptions::default(),
        devices(&[("a", 0, Pending), ("b", 0, Pending)]),
        D::Running,
        None,
    );
    assert!(!r.is_sending() && !r.is_over());
    // A clock tick is not the operator's word: nothing goes out yet.
    assert_eq!(
        r.handle(Duration::ZERO, Event::Tick)
            .iter()
            .map(show)
            .collect::<Vec<_>>(),
        ["stage 1 of 1: a, b"]
    );
    assert!(r.is_sending());
    r.handle(Duration::ZERO, RUN);
    assert!(r.is_sending() && r.is_waiting("a") && !r.is_waiting("b"));
    r.handle(Duration::ZERO, RUN);
    assert!(!r.is_sending());
    assert_eq!(r.waiting(), ["a", "b"]);
    r.handle(Duration::from_secs(1), done("a"));
    r.handle(Duration::from_secs(1), done("b"));
    assert!(r.is_over() && r.waiting().is_empty());
}

#[test]
fn a_paused_run_resumed_from_its_devices_sends_what_was_left() {
    let options = RolloutOptions::default();
    let mut r: Rollout<Duration> = Rollout::new(
        JOB,
        NEW,
        options.clone(),
        devices(&[("a", 0, Pending), ("b", 0, Pending), ("c", 1, Pending)]),
        D::Running,
        None,
    );
    r.handle(Duration::ZERO, RUN);
    r.handle(Duration::ZERO, PAUSE);
    let last: Vec<String> = r
        .handle(Duration::from_secs(1), done("a"))
        .iter()
        .map(show)
        .collect();
    assert_eq!(last, ["record a done", "result a done", "end"]);
    // `deploy --resume`: a new run from where the devices stand.
    let mut r: Rollout<Duration> =
        Rollout::new(JOB, NEW, options, r.devices().clone(), D::Running, None);
    let first: Vec<String> = r.handle(Duration::ZERO, RUN).iter().map(show).collect();
    assert_eq!(first, ["stage 1 of 2: a, b", "start b", "record b sent"]);
}

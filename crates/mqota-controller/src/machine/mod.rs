//! The rollout, without I/O. A [`Rollout`] is one deployment's whole
//! course as a state machine: the runner ([`crate::rollout::run`]) builds
//! it from the store, tells it what happens ([`Event`]: the operator's word
//! as stored, what a device's own topics say, the clock) and does what it
//! answers ([`Action`]: send a job, a cancel or a rollback; write a
//! device's or the deployment's state; read a failed device's log; report
//! to the observer; end). The runner decides nothing; everything a rollout
//! decides (next stage, failure threshold, automatic rollback, pause,
//! resume, stop, timeouts, which answers count) is here, so it is tested
//! as tables of events and actions (`machine/tests.rs`) rather than through a
//! broker. Like rumqttc's `state.rs`: pure state, `now` as an input.
//!
//! Inside, [`next`] plans the next step from where every device stands,
//! [`Course`] is what one run remembers between two steps (a pause it saw,
//! the stage it announced), and [`Wait`] (in `wait.rs`) holds the devices
//! a stage or a stop's rollback waits for with their deadlines, and
//! decides from [`result_of`] and the clock how each wait ends.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Add;
use std::time::Duration;

use crate::fleet::DeviceView;
use crate::rollout::{too_many_failures, RolloutOptions};
use crate::store::{DeploymentState, DeviceState};

mod wait;
pub use wait::{outcome, result_of, wants_log, Awaiting, Outcome, Wait};

#[cfg(test)]
mod tests;

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
        self.saw(state);
        match next(devices, options, state, reason) {
            Next::Send { .. } | Next::Finish { .. } if self.saw_pause => Next::Paused,
            step => step,
        }
    }

    /// Notes the operator's `state`: once this runner has seen a pause, it
    /// sends nothing more.
    pub fn saw(&mut self, state: DeploymentState) {
        self.saw_pause |= state == DeploymentState::Paused;
    }

    /// Whether stage `stage` is to be announced now (the first time it is
    /// sent or waited for).
    pub fn announce(&mut self, stage: u32) -> bool {
        let first = self.announced != Some(stage);
        self.announced = Some(stage);
        first
    }
}

/// What happened, as the runner tells a [`Rollout`].
#[derive(Debug, Clone)]
pub enum Event {
    /// The deployment's state as the operator left it in the store
    /// (`running`, `paused` or `stopped`), read just now. The runner reads
    /// it before each job it sends (while [`Rollout::is_sending`]) and now
    /// and then while it waits: each `running` read while sending lets one
    /// job go out, so a pause or stop is obeyed between two sends.
    Operator(DeploymentState),
    /// What a device's own topics say now (its view in [`crate::fleet`]);
    /// only a device waited for is looked at.
    Device(Box<DeviceView>),
    /// The clock: every device waited for whose deadline has passed is
    /// given up on.
    Tick,
}

/// What the runner does for a [`Rollout`], in the order given: the order
/// is what makes a stop durable (a device is marked `rollback_sent` before
/// its rollback goes out, a job is marked `sent` once it has).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send the deployment's job (its start command) to this device.
    Start(String),
    /// Send `cancel` for the deployment's job to this device.
    Cancel(String),
    /// Send `rollback` to this device.
    Rollback(String),
    /// Store a device's state in the deployment.
    Record {
        /// The device.
        device: String,
        /// Its new state.
        state: DeviceState,
        /// The device's error code or the controller's reason.
        error: Option<String>,
    },
    /// Store the deployment's state and reason.
    Deployment {
        /// Its new state.
        state: DeploymentState,
        /// Why (a `running` deployment with a reason is stopping for
        /// failures).
        reason: Option<String>,
    },
    /// Read this device's last log records and keep them with its result:
    /// its job failed on the device ([`wants_log`]).
    ReadLog(String),
    /// Tell the observer.
    Report(Report),
    /// The run is over (the deployment has ended, or is paused or stopped):
    /// nothing more comes from this machine.
    End,
}

/// What a [`Rollout`] tells the operator (the runner's observer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// Stage `index` of `count` is being sent or waited for (told once).
    Stage {
        /// Stage index, from 0.
        index: u32,
        /// How many stages there are.
        count: u32,
        /// Every device of the stage.
        members: Vec<String>,
    },
    /// A device's result is in.
    Result {
        /// The device.
        device: String,
        /// Its result.
        state: DeviceState,
        /// The device's error code or the controller's reason.
        error: Option<String>,
    },
    /// The rollout stops: for failures (also when a resumed deployment
    /// carries on stopping), or by the operator.
    Stopping(String),
    /// An automatic rollback is about to be sent to this device.
    RollingBack(String),
}

/// Where a [`Rollout`] is between two events.
#[derive(Debug, Clone)]
enum Step<I> {
    /// Nothing in hand: [`next`] says what comes.
    Deciding,
    /// Sending a stage's jobs, one per `running` read of the operator's
    /// word; `wait` holds those sent.
    Sending {
        queue: VecDeque<String>,
        wait: Wait<I>,
    },
    /// Waiting for jobs in flight.
    Waiting(Wait<I>),
    /// Stopping for failures: waiting for the rollbacks sent.
    RollingBack { reason: String, wait: Wait<I> },
    /// Ended, paused or stopped.
    Over,
}

/// One run of a deployment as a state machine, without I/O (see the module
/// doc). `I` is the clock's instant (any type a [`Duration`] can be added
/// to: `tokio::time::Instant` in the runner, a `Duration` since the start
/// in the tests).
#[derive(Debug, Clone)]
pub struct Rollout<I> {
    job: String,
    version: String,
    options: RolloutOptions,
    devices: Devices,
    stages: u32,
    operator: DeploymentState,
    reason: Option<String>,
    course: Course,
    step: Step<I>,
}

impl<I: Copy + PartialOrd + Add<Duration, Output = I>> Rollout<I> {
    /// A run of deployment `job` (installing `version`) from where it
    /// stands: `devices` as stored, and the deployment's `state` and
    /// `reason` as stored. The same for a new deployment and a resumed
    /// one: finished devices keep their result, devices whose job was sent
    /// are waited for again (with a fresh deadline: when it was sent is not
    /// worth trusting across a controller restart), a stop for failures
    /// already decided is carried on, and the stages not yet sent follow.
    /// Nothing happens until the first [`Rollout::handle`].
    pub fn new(
        job: &str,
        version: &str,
        options: RolloutOptions,
        devices: Devices,
        state: DeploymentState,
        reason: Option<String>,
    ) -> Self {
        let stages = devices.values().map(|(s, _)| *s + 1).max().unwrap_or(0);
        Self {
            job: job.to_owned(),
            version: version.to_owned(),
            options,
            devices,
            stages,
            operator: state,
            reason,
            course: Course::default(),
            step: Step::Deciding,
        }
    }

    /// Takes `event`, at `now`, and answers what to do, in order.
    pub fn handle(&mut self, now: I, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        if matches!(self.step, Step::Over) {
            return out;
        }
        let mut go = false;
        match event {
            Event::Operator(state) => {
                self.operator = state;
                self.course.saw(state);
                go = state == DeploymentState::Running;
            }
            Event::Device(view) => self.device(&view.id, Some(&view), now, &mut out),
            Event::Tick => {
                for d in self.waiting() {
                    self.device(&d, None, now, &mut out);
                }
            }
        }
        self.advance(now, go, &mut out);
        out
    }

    /// Whether a stage's jobs are being sent: the runner reads the
    /// operator's word before each ([`Event::Operator`]).
    pub fn is_sending(&self) -> bool {
        matches!(self.step, Step::Sending { .. })
    }

    /// Whether the run is over ([`Action::End`] was given).
    pub fn is_over(&self) -> bool {
        matches!(self.step, Step::Over)
    }

    /// Whether `device` is waited for (its job or its rollback).
    pub fn is_waiting(&self, device: &str) -> bool {
        self.wait().is_some_and(|w| w.is_waiting(device))
    }

    /// The devices waited for: the runner looks at each now and then
    /// ([`Event::Device`]), since a lagging event channel may skip one.
    pub fn waiting(&self) -> Vec<String> {
        self.wait().map(Wait::waiting).unwrap_or_default()
    }

    /// Every device, with its stage and where it stands as far as this
    /// machine knows.
    pub fn devices(&self) -> &Devices {
        &self.devices
    }

    fn wait(&self) -> Option<&Wait<I>> {
        match &self.step {
            Step::Sending { wait, .. } | Step::Waiting(wait) | Step::RollingBack { wait, .. } => {
                Some(wait)
            }
            Step::Deciding | Step::Over => None,
        }
    }

    /// What `device` said (`view`: its topics now; `None`: only the clock
    /// speaks), if it ends its wait.
    fn device(&mut self, device: &str, view: Option<&DeviceView>, now: I, out: &mut Vec<Action>) {
        let wait = match &mut self.step {
            Step::Sending { wait, .. } | Step::Waiting(wait) | Step::RollingBack { wait, .. } => {
                wait
            }
            Step::Deciding | Step::Over => return,
        };
        let Some(entry) = self.devices.get_mut(device) else {
            return;
        };
        let said = view.and_then(|v| result_of(v, &self.job, &self.version));
        let Some(o) = wait.device(device, entry.1, said, now) else {
            return;
        };
        entry.1 = o.state;
        if o.cancel {
            // Stop a job that may still be running so it cannot finish
            // after the rollout gave up on it.
            out.push(Action::Cancel(device.to_owned()));
        }
        out.push(Action::Record {
            device: device.to_owned(),
            state: o.state,
            error: o.error.clone(),
        });
        if wants_log(o.state) {
            out.push(Action::ReadLog(device.to_owned()));
        }
        out.push(Action::Report(Report::Result {
            device: device.to_owned(),
            state: o.state,
            error: o.error,
        }));
    }

    fn set(&mut self, device: &str, state: DeviceState) {
        self.devices
            .get_mut(device)
            .expect("a device of the deployment")
            .1 = state;
    }

    fn announce(&mut self, stage: u32, members: Vec<String>, out: &mut Vec<Action>) {
        if self.course.announce(stage) {
            out.push(Action::Report(Report::Stage {
                index: stage,
                count: self.stages,
                members,
            }));
        }
    }

    fn end(&mut self, out: &mut Vec<Action>) {
        out.push(Action::End);
        self.step = Step::Over;
    }

    /// Moves on as far as it can without hearing more. `go`: the operator's
    /// word was just read as `running`, so one job may go out.
    fn advance(&mut self, now: I, mut go: bool, out: &mut Vec<Action>) {
        let deadline = now + Duration::from_secs(self.options.timeout_s.into());
        loop {
            // An operator's stop ends any step but a stop for failures (the
            // store refuses to stop one: its rollbacks must be waited for).
            if self.operator == DeploymentState::Stopped
                && !matches!(self.step, Step::RollingBack { .. } | Step::Over)
            {
                self.step = Step::Deciding;
            }
            match &mut self.step {
                Step::Over => return,
                Step::Sending { queue, wait } => {
                    let paused = self.operator != DeploymentState::Running || self.course.saw_pause;
                    if !paused && !queue.is_empty() {
                        if !go {
                            return;
                        }
                        go = false;
                        let d = queue.pop_front().expect("not empty");
                        out.push(Action::Start(d.clone()));
                        out.push(Action::Record {
                            device: d.clone(),
                            state: DeviceState::Sent,
                            error: None,
                        });
                        if let Some(entry) = self.devices.get_mut(&d) {
                            entry.1 = DeviceState::Sent;
                        }
                        wait.add(d, deadline);
                        if !queue.is_empty() {
                            return;
                        }
                    }
                    // All sent, or paused (the jobs sent finish; nothing
                    // more goes out): wait for those in flight.
                    let wait = std::mem::replace(wait, Wait::new(Awaiting::Jobs));
                    self.step = Step::Waiting(wait);
                }
                Step::Waiting(wait) => {
                    if !wait.is_over() {
                        return;
                    }
                    self.step = Step::Deciding;
                }
                Step::RollingBack { reason, wait } => {
                    if !wait.is_over() {
                        return;
                    }
                    out.push(Action::Deployment {
                        state: DeploymentState::Failed,
                        reason: Some(reason.clone()),
                    });
                    return self.end(out);
                }
                Step::Deciding
                    if matches!(
                        self.operator,
                        DeploymentState::Succeeded | DeploymentState::Failed
                    ) =>
                {
                    // Ended by someone else: nothing is left to decide.
                    return self.end(out);
                }
                Step::Deciding => {
                    let step = self.course.next(
                        &self.devices,
                        &self.options,
                        self.operator,
                        self.reason.as_deref(),
                    );
                    self.decided(step, deadline, out);
                }
            }
        }
    }

    /// Starts what [`next`] said.
    fn decided(&mut self, step: Next, deadline: I, out: &mut Vec<Action>) {
        match step {
            Next::Stopped { cancel } => {
                out.push(Action::Report(Report::Stopping(
                    STOPPED_BY_OPERATOR.to_owned(),
                )));
                // The store's stop skipped the devices not sent a job.
                for (_, s) in self.devices.values_mut() {
                    if *s == DeviceState::Pending {
                        *s = DeviceState::Skipped;
                    }
                }
                for d in cancel {
                    let error = Some(STOPPED_BY_OPERATOR.to_owned());
                    out.push(Action::Cancel(d.clone()));
                    out.push(Action::Record {
                        device: d.clone(),
                        state: DeviceState::Cancelled,
                        error: error.clone(),
                    });
                    self.set(&d, DeviceState::Cancelled);
                    out.push(Action::Report(Report::Result {
                        device: d,
                        state: DeviceState::Cancelled,
                        error,
                    }));
                }
                self.end(out);
            }
            Next::Paused => self.end(out),
            Next::Finish { state, reason } => {
                out.push(Action::Deployment { state, reason });
                self.end(out);
            }
            Next::StopForFailures {
                reason,
                skip,
                roll_back,
                awaiting_rollback,
            } => {
                if self.reason.is_none() {
                    // Durable before anything acts on it, so a resumed
                    // controller finishes this stop instead of sending
                    // more stages.
                    out.push(Action::Deployment {
                        state: DeploymentState::Running,
                        reason: Some(reason.clone()),
                    });
                    self.reason = Some(reason.clone());
                }
                out.push(Action::Report(Report::Stopping(reason.clone())));
                for d in skip {
                    out.push(Action::Record {
                        device: d.clone(),
                        state: DeviceState::Skipped,
                        error: Some("rollout stopped".to_owned()),
                    });
                    self.set(&d, DeviceState::Skipped);
                }
                let mut wait = Wait::new(Awaiting::Rollbacks);
                for d in roll_back {
                    out.push(Action::Report(Report::RollingBack(d.clone())));
                    // Marked before it goes out: a rollback is never sent
                    // twice.
                    out.push(Action::Record {
                        device: d.clone(),
                        state: DeviceState::RollbackSent,
                        error: None,
                    });
                    self.set(&d, DeviceState::RollbackSent);
                    out.push(Action::Rollback(d.clone()));
                    wait.add(d, deadline);
                }
                for d in awaiting_rollback {
                    wait.add(d, deadline);
                }
                self.step = Step::RollingBack { reason, wait };
            }
            Next::Wait { stage, devices } => {
                let members = ids(&self.devices, |st, _| st == stage);
                self.announce(stage, members, out);
                let mut wait = Wait::new(Awaiting::Jobs);
                for d in devices {
                    wait.add(d, deadline);
                }
                self.step = Step::Waiting(wait);
            }
            Next::Send {
                stage,
                members,
                send,
            } => {
                self.announce(stage, members, out);
                self.step = Step::Sending {
                    queue: send.into(),
                    wait: Wait::new(Awaiting::Jobs),
                };
            }
        }
    }
}

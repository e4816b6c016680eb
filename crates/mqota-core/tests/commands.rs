//! What a command means in each state: `engine::decide` over every
//! (state × command) pair, and the engine acting on it — including the
//! refusal of a job the device already finished (`duplicate_job`), which
//! must survive a reboot through the slots' journals.

mod common;

use common::*;
use mqota_core::engine::{decide, Decision, Engine, Finished, State};
use mqota_core::image::Chip;
use mqota_core::protocol::{Command, ErrorCode, JobId, Phase};

const URL: &str = "http://fw.example/fw.bin";

fn id(s: &str) -> JobId {
    s.try_into().unwrap()
}

fn start(job: Option<&str>) -> Command {
    let mut j = common::job(URL);
    j.job = job.map(id);
    Command::Start(j)
}

#[test]
fn every_state_and_command_pair_has_one_meaning() {
    let mut finished = Finished::default();
    finished.remember(&id("old"));
    let running = id("run");
    let idle = State::Idle;
    let busy = State::Updating {
        job: Some(&running),
    };
    let busy_anonymous = State::Updating { job: None };
    let busy_refusal = Decision::Refuse(ErrorCode::Busy, "an update is in flight");
    let duplicate = Decision::Refuse(
        ErrorCode::DuplicateJob,
        "job already finished on this device",
    );
    let cancel = |j: Option<&str>| Command::Cancel { job: j.map(id) };
    let rollback = |j: Option<&str>| Command::Rollback { job: j.map(id) };
    let table: Vec<(State<'_>, Command, Decision)> = vec![
        // start
        (idle, start(None), Decision::Start),
        (idle, start(Some("new")), Decision::Start),
        (idle, start(Some("old")), duplicate),
        (busy, start(None), busy_refusal),
        (busy, start(Some("new")), busy_refusal),
        // a redelivered start of the job in flight is that job
        (busy, start(Some("run")), Decision::Ignore),
        (busy, start(Some("old")), duplicate),
        (busy_anonymous, start(Some("new")), busy_refusal),
        // cancel
        (idle, cancel(None), Decision::Ignore),
        (idle, cancel(Some("old")), Decision::Ignore),
        (busy, cancel(None), Decision::Cancel),
        (busy, cancel(Some("run")), Decision::Cancel),
        (busy, cancel(Some("other")), Decision::Ignore),
        (busy_anonymous, cancel(None), Decision::Cancel),
        (busy_anonymous, cancel(Some("run")), Decision::Ignore),
        // rollback
        (idle, rollback(None), Decision::Rollback),
        (idle, rollback(Some("old")), Decision::Rollback),
        (busy, rollback(None), busy_refusal),
        (busy, rollback(Some("run")), busy_refusal),
    ];
    for (state, cmd, want) in table {
        assert_eq!(decide(state, &finished, &cmd), want, "{state:?} × {cmd:?}");
    }
}

#[test]
fn the_engine_hands_a_rollback_to_the_caller_when_idle_and_refuses_it_while_busy() {
    let mut d = device();
    d.event(mqota_core::engine::Event::Command(Command::Rollback {
        job: Some(id("back")),
    }));
    assert_eq!(d.rollbacks, vec![Some(id("back"))]);
    assert!(d.published.is_empty());

    d.start(common::job(URL));
    d.event(mqota_core::engine::Event::Command(Command::Rollback {
        job: Some(id("back")),
    }));
    assert_eq!(d.rollbacks.len(), 1, "not handed over while busy");
    let last = d.last();
    assert_eq!(
        (last.phase, last.error),
        (Phase::Failed, Some(ErrorCode::Busy))
    );
    assert_eq!(last.job.as_deref(), Some("back"));
    assert!(d.engine.is_busy(), "the update carries on");
}

#[test]
fn a_finished_job_started_again_is_refused_with_duplicate_job_and_nothing_else() {
    let mut d = device();
    let v2 = image(Chip::Esp32c3, "1.1.0", 100_000);
    d.start(common::job(URL));
    // The server answers 404: the job ends (before anything was written).
    d.respond(404, None, None);
    assert_eq!(d.failed_with(), Some(ErrorCode::HttpStatus));
    let fetches = d.fetches.len();

    d.start(common::job(URL));
    let last = d.last();
    assert_eq!(
        (last.phase, last.error),
        (Phase::Failed, Some(ErrorCode::DuplicateJob))
    );
    assert_eq!(last.job.as_deref(), Some("job-1"));
    assert_eq!(d.fetches.len(), fetches, "no fetch for a duplicate");
    assert!(!d.engine.is_busy());

    // A new job id runs.
    let mut again = common::job(URL);
    again.job = Some(id("job-2"));
    d.start(again);
    d.serve(&v2);
    assert!(d.rebooted);
}

#[test]
fn after_a_reboot_the_journals_remember_the_jobs_that_finished() {
    let mut d = device();
    let v2 = image(Chip::Esp32c3, "1.1.0", 100_000);
    d.start(common::job(URL));
    d.serve(&v2);
    assert!(d.rebooted);

    // The next boot: a fresh engine on the same flash, running the new slot.
    let mut layout = d.layout.clone();
    layout.running = 1;
    let cfg = mqota_core::engine::EngineConfig::new("dev-1", Chip::Esp32c3, "1.1.0");
    let mut engine = Engine::new(cfg, layout);
    assert_eq!(
        decide(engine.state(), engine.finished(), &start(Some("job-1"))),
        Decision::Start
    );
    engine.recall_finished(&mut d.flash);
    assert!(engine.finished().contains(&id("job-1")));
    assert_eq!(
        decide(engine.state(), engine.finished(), &start(Some("job-1"))),
        Decision::Refuse(
            ErrorCode::DuplicateJob,
            "job already finished on this device"
        )
    );
}

#[test]
fn an_interrupted_download_is_not_a_finished_job() {
    let mut d = device();
    let v2 = image(Chip::Esp32c3, "1.1.0", 300_000);
    d.start(common::job(URL));
    d.respond(200, Some(v2.len() as u32), None);
    // Three pages reach flash, then the power goes.
    d.body(&v2[..3 * 4096]);
    let cfg = mqota_core::engine::EngineConfig::new("dev-1", Chip::Esp32c3, "1.0.0");
    let mut engine = Engine::new(cfg, d.layout.clone());
    engine.recall_finished(&mut d.flash);
    assert!(
        !engine.finished().contains(&id("job-1")),
        "it is resumed, not refused"
    );
    assert!(engine.resume(&mut d.flash, 0).is_some());
}

#[test]
fn the_finished_memory_forgets_the_oldest_when_full() {
    let mut f = Finished::default();
    for i in 0..mqota_core::engine::FINISHED_JOBS + 1 {
        f.remember(&id(&format!("j{i}")));
    }
    assert!(!f.contains(&id("j0")));
    assert!(f.contains(&id(&format!("j{}", mqota_core::engine::FINISHED_JOBS))));
    // Remembering one twice does not push another out.
    f.remember(&id("j1"));
    assert!(f.contains(&id("j1")));
}

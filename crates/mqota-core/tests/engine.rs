//! The update engine, driven by hand with a fake clock on the simulated flash.

mod common;

use common::*;
use embedded_storage::nor_flash::ReadNorFlash;
use mqota_core::engine::{Engine, EngineConfig, Event};
use mqota_core::fetch::FetchError;
use mqota_core::image::{Chip, ImageBuilder};
use mqota_core::journal::{Flag, PAGE_SIZE};
use mqota_core::otadata::{OtaState, Otadata};
use mqota_core::protocol::{Command, ErrorCode, Phase};

const URL: &str = "http://fw.example/fw.bin";

#[test]
fn a_bare_url_update_streams_verifies_and_selects_the_new_slot() {
    let mut d = device();
    let v2 = image(Chip::Esp32c3, "1.1.0", 300_000);
    let slot0_before = d.slot_bytes(0, 200_000);
    let a = d.engine.begin_ota(&mut d.flash, d.now, URL);
    d.apply(a);
    assert_eq!(d.fetches, vec![0]);
    d.serve(&v2);
    assert_eq!(
        d.phases(),
        vec![
            Phase::Accepted,
            Phase::Downloading,
            Phase::Verifying,
            Phase::Rebooting
        ]
    );
    assert!(d.rebooted);
    assert_eq!(d.slot_bytes(1, v2.len()), v2);
    assert_eq!(
        d.slot_bytes(0, 200_000),
        slot0_before,
        "the running slot is never touched"
    );
    let ota = Otadata::read(&mut d.flash, d.layout.otadata).unwrap();
    let active = ota.active_entry().unwrap();
    assert_eq!(active.slot(2), Some(1));
    assert_eq!(active.state(), OtaState::New);
    assert!(d.layout.slots[1]
        .journal()
        .has(&mut d.flash, Flag::Activated)
        .unwrap());
    assert!(!d.engine.is_busy());
}

#[test]
fn percent_never_goes_down_and_reaches_100() {
    let mut d = device();
    let v2 = image(Chip::Esp32c3, "1.1.0", 300_000);
    d.start(job(URL));
    d.serve(&v2);
    let percents: Vec<u8> = d.published.iter().map(|p| p.percent).collect();
    assert!(percents.windows(2).all(|w| w[0] <= w[1]), "{percents:?}");
    assert_eq!(*percents.last().unwrap(), 100);
    assert!(
        d.published
            .iter()
            .filter(|p| p.phase == Phase::Downloading)
            .count()
            > 10
    );
    assert!(d
        .published
        .iter()
        .all(|p| p.job.as_deref() == Some("job-1")));
}

#[test]
fn progress_is_throttled_to_the_configured_interval() {
    let mut d = device();
    let mut cfg = mqota_core::engine::EngineConfig::new("dev-1", Chip::Esp32c3, "1.0.0");
    cfg.progress_interval_ms = 50;
    d.engine = Engine::new(cfg, d.layout.clone());
    let v2 = image(Chip::Esp32c3, "1.1.0", 300_000);
    d.start(job(URL));
    d.serve(&v2);
    // ~293 chunks 1 ms apart: at most one event per 50 ms.
    let downloading = d
        .published
        .iter()
        .filter(|p| p.phase == Phase::Downloading)
        .count();
    assert!(
        (2..=8).contains(&downloading),
        "{downloading} downloading events"
    );
}

#[test]
fn a_job_with_the_right_sha256_and_size_succeeds() {
    let mut d = device();
    let v2 = image(Chip::Esp32c3, "1.1.0", 100_000);
    let mut j = job(URL);
    j.sha256 = Some(sha256(&v2));
    j.size = Some(v2.len() as u32);
    d.start(j);
    d.serve(&v2);
    assert!(d.rebooted);
    assert_eq!(d.last().phase, Phase::Rebooting);
    assert_eq!(d.last().total, Some(v2.len() as u32));
}

/// One failure per row: how the job is set up, what the server does, the
/// error the job must end with.
#[test]
fn every_failure_ends_with_its_own_error_and_keeps_the_old_firmware() {
    type Setup = fn(&mut Rig, &mut mqota_core::protocol::Job) -> Vec<u8>;
    let good = || image(Chip::Esp32c3, "1.1.0", 100_000);
    let cases: Vec<(&str, Setup, ErrorCode)> = vec![
        (
            "wrong sha256",
            |_, j| {
                j.sha256 = Some([0x11; 32]);
                image(Chip::Esp32c3, "1.1.0", 100_000)
            },
            ErrorCode::HashMismatch,
        ),
        (
            "wrong chip",
            |_, _| image(Chip::Esp32c6, "1.1.0", 100_000),
            ErrorCode::WrongChip,
        ),
        (
            "not an image",
            |_, _| vec![0x42; 50_000],
            ErrorCode::BadImage,
        ),
        (
            "job larger than the slot",
            |_, j| {
                j.size = Some(0x1e0000);
                image(Chip::Esp32c3, "1.1.0", 100_000)
            },
            ErrorCode::TooLarge,
        ),
        (
            "size differs from the job",
            |_, j| {
                j.size = Some(99_000);
                image(Chip::Esp32c3, "1.1.0", 100_000)
            },
            ErrorCode::SizeMismatch,
        ),
        (
            "truncated image",
            |_, _| {
                let mut v = image(Chip::Esp32c3, "1.1.0", 100_000);
                v.truncate(60_000);
                v
            },
            ErrorCode::BadImage,
        ),
        (
            "corrupted byte",
            |_, _| {
                let mut v = image(Chip::Esp32c3, "1.1.0", 100_000);
                v[50_000] ^= 0x01;
                v
            },
            ErrorCode::BadImage,
        ),
    ];
    for (name, setup, code) in cases {
        let mut d = device();
        let before = d.slot_bytes(0, 200_000);
        let mut j = job(URL);
        let file = setup(&mut d, &mut j);
        d.start(j);
        if d.engine.is_busy() {
            d.serve(&file);
        }
        assert_eq!(d.failed_with(), Some(code), "{name}: {:?}", d.published);
        assert!(!d.rebooted, "{name}");
        assert!(!d.engine.is_busy(), "{name}: the device is free again");
        assert_eq!(d.slot_bytes(0, 200_000), before, "{name}");
        let ota = Otadata::read(&mut d.flash, d.layout.otadata).unwrap();
        assert_eq!(ota.selected_slot(2), None, "{name}: otadata untouched");
        // And the next command (a new job) works.
        d.published.clear();
        d.fetches.clear();
        let mut next = job(URL);
        next.job = Some("job-2".try_into().unwrap());
        d.start(next);
        d.serve(&good());
        assert!(d.rebooted, "{name}: the next command succeeds");
    }
}

#[test]
fn a_wrong_chip_is_refused_before_the_slot_is_erased() {
    let mut d = device();
    // Something recognisable in the first sector of ota_1.
    let slot1 = d.layout.slots[1].offset;
    embedded_storage::nor_flash::NorFlash::write(&mut d.flash, slot1, &[0x12, 0x34, 0x56, 0x78])
        .unwrap();
    d.start(job(URL));
    d.serve(&image(Chip::Esp32c6, "1.1.0", 100_000));
    assert_eq!(d.failed_with(), Some(ErrorCode::WrongChip));
    assert_eq!(d.slot_bytes(1, 4), vec![0x12, 0x34, 0x56, 0x78]);
}

#[test]
fn content_length_beyond_the_slot_is_refused_at_once() {
    let mut d = device();
    d.start(job(URL));
    d.respond(200, Some(0x1e0000), None);
    assert_eq!(d.failed_with(), Some(ErrorCode::TooLarge));
}

#[test]
fn a_server_that_sends_endless_data_is_cut_off() {
    let mut d = device();
    let v2 = image(Chip::Esp32c3, "1.1.0", 100_000);
    d.start(job(URL));
    d.respond(200, Some(v2.len() as u32), None);
    d.body(&v2);
    d.body(&[0u8; 4096]);
    assert_eq!(d.failed_with(), Some(ErrorCode::SizeMismatch));
}

#[test]
fn without_a_length_a_body_longer_than_its_image_is_cut_off_with_size_mismatch() {
    let mut d = device();
    d.start(job(URL));
    d.respond(200, None, None);
    let mut sent = 0;
    while d.engine.is_busy() && sent < 3 * 1024 * 1024 {
        // A valid header first, then filler, without end.
        let head = image(Chip::Esp32c3, "1.1.0", 100_000);
        let chunk = if sent == 0 {
            head[..4096].to_vec()
        } else {
            vec![0u8; 4096]
        };
        d.body(&chunk);
        sent += 4096;
    }
    // The image's own length (100,000 bytes) is the declared size.
    assert_eq!(d.failed_with(), Some(ErrorCode::SizeMismatch));
    assert!(
        sent <= 100_000 + 2 * 4096,
        "cut off right after the image: {sent}"
    );
}

/// The `message` of the job's `failed` event.
fn failed_message(d: &Rig) -> Option<String> {
    d.published
        .iter()
        .find(|p| p.phase == Phase::Failed)
        .and_then(|p| p.message.as_ref().map(|m| m.to_string()))
}

#[test]
fn http_404_fails_at_once_with_the_status_in_the_message() {
    let mut d = device();
    d.start(job(URL));
    d.respond(404, Some(10), None);
    assert_eq!(d.failed_with(), Some(ErrorCode::HttpStatus));
    assert_eq!(failed_message(&d).as_deref(), Some("HTTP 404"));
    assert!(!d.engine.is_busy(), "no retry is pending");
    assert_eq!(d.fetches, vec![0], "fetched once, never retried");
}

#[test]
fn client_errors_other_than_408_and_429_are_never_retried() {
    for status in [400, 401, 403, 410, 416, 451, 300, 304] {
        let mut d = device();
        d.start(job(URL));
        d.respond(status, None, None);
        assert_eq!(d.failed_with(), Some(ErrorCode::HttpStatus), "{status}");
        assert_eq!(
            failed_message(&d),
            Some(format!("HTTP {status}")),
            "{status}"
        );
        assert_eq!(d.fetches.len(), 1, "{status}");
    }
}

/// Answers every fetch with `status` and ticks 100 ms at a time until the
/// engine asks again or gives up; returns the waits, in ms.
fn retry_gaps(d: &mut Rig, status: u16) -> Vec<u64> {
    let mut gaps = Vec::new();
    while d.engine.is_busy() {
        d.respond(status, None, None);
        let asked = d.fetches.len();
        let mut waited = 0;
        while d.fetches.len() == asked && d.engine.is_busy() {
            d.tick(100);
            waited += 100;
        }
        if d.engine.is_busy() {
            gaps.push(waited);
        }
    }
    gaps
}

#[test]
fn server_errors_are_retried_with_jittered_backoff_then_fail_with_the_status() {
    let mut d = device();
    d.start(job(URL));
    let gaps = retry_gaps(&mut d, 503);
    assert_eq!(d.failed_with(), Some(ErrorCode::HttpStatus));
    assert_eq!(failed_message(&d).as_deref(), Some("HTTP 503"));
    assert_eq!(d.fetches.len(), 6, "the first fetch and five retries");
    // Decorrelated jitter: at least the base (1 s), at most three times the
    // delay before and the cap (16 s); the tick rounds up to 100 ms.
    let mut previous = 1_000;
    for &g in &gaps {
        assert!(g >= 1_000, "{gaps:?}");
        assert!(g <= 16_000 + 100, "{gaps:?}");
        assert!(g <= 3 * previous + 100, "{gaps:?}");
        previous = g;
    }
}

#[test]
fn request_timeout_and_too_many_requests_are_retried() {
    for status in [408, 429, 500, 502, 504] {
        let mut d = device();
        d.start(job(URL));
        d.respond(status, None, None);
        assert!(d.engine.is_busy(), "{status} is retried");
        d.tick(16_000);
        assert_eq!(d.fetches, vec![0, 0], "{status}: fetched again");
        let v2 = image(Chip::Esp32c3, "1.1.0", 100_000);
        d.serve(&v2);
        assert!(d.rebooted, "{status}: the retry succeeds");
    }
}

#[test]
fn retry_delays_differ_between_seeds_and_repeat_for_the_same_seed() {
    let gaps_with = |seed: u32| {
        let mut d = device();
        let mut cfg = EngineConfig::new("dev-1", Chip::Esp32c3, "1.0.0");
        cfg.seed = seed;
        d.engine = Engine::new(cfg, d.layout.clone());
        d.start(job(URL));
        retry_gaps(&mut d, 503)
    };
    let a = gaps_with(1);
    assert_eq!(a.len(), 5);
    assert_eq!(a, gaps_with(1), "the same seed gives the same delays");
    assert_ne!(a, gaps_with(2), "another seed, other delays");
    assert!(
        a.windows(2).any(|w| w[0] != w[1]),
        "not a fixed schedule: {a:?}"
    );
}

#[test]
fn failures_a_retry_cannot_cure_end_the_job_at_once() {
    let cases = [
        (
            FetchError::BadContentLength,
            ErrorCode::HttpStatus,
            "bad Content-Length",
        ),
        (
            FetchError::TooManyRedirects,
            ErrorCode::HttpStatus,
            "too many redirects",
        ),
        (
            FetchError::InsecureRedirect,
            ErrorCode::HttpStatus,
            "redirect from https to http refused",
        ),
        (
            FetchError::HttpsNotEnabled,
            ErrorCode::BadCommand,
            "https is not enabled on this device",
        ),
        (
            FetchError::BadUrl,
            ErrorCode::BadCommand,
            "URL not usable on this device",
        ),
    ];
    for (e, code, message) in cases {
        let mut d = device();
        d.start(job(URL));
        d.event(Event::FetchFailed(e));
        assert_eq!(d.failed_with(), Some(code), "{e:?}");
        assert_eq!(failed_message(&d).as_deref(), Some(message), "{e:?}");
        assert!(!d.engine.is_busy(), "{e:?}");
        assert_eq!(d.fetches.len(), 1, "{e:?}");
    }
}

#[test]
fn network_failures_are_retried_and_end_with_the_last_one() {
    let mut d = device();
    d.start(job(URL));
    while d.engine.is_busy() {
        d.event(Event::FetchFailed(FetchError::Dns));
        d.tick(16_000);
    }
    assert_eq!(d.fetches.len(), 6);
    assert_eq!(d.failed_with(), Some(ErrorCode::Network));
    assert_eq!(failed_message(&d).as_deref(), Some("DNS lookup failed"));
}

#[test]
fn a_dropped_connection_resumes_from_the_last_whole_page_with_range() {
    let mut d = device();
    let v2 = image(Chip::Esp32c3, "1.1.0", 300_000);
    d.start(job(URL));
    d.respond(200, Some(v2.len() as u32), None);
    d.body(&v2[..150_500]);
    d.event(Event::FetchFailed(FetchError::Connection));
    d.tick(5_000);
    let from = *d.fetches.last().unwrap();
    assert_eq!(from, (150_500 / PAGE_SIZE) * PAGE_SIZE);
    d.serve(&v2);
    assert!(d.rebooted);
    assert_eq!(d.slot_bytes(1, v2.len()), v2);
}

#[test]
fn a_body_that_ends_early_is_resumed_not_failed() {
    let mut d = device();
    let v2 = image(Chip::Esp32c3, "1.1.0", 300_000);
    d.start(job(URL));
    d.respond(200, Some(v2.len() as u32), None);
    d.body(&v2[..100_000]);
    d.event(Event::BodyEnd);
    d.tick(5_000);
    assert!(*d.fetches.last().unwrap() > 0);
    d.serve(&v2);
    assert!(d.rebooted);
}

#[test]
fn a_server_that_ignores_range_is_restarted_cleanly() {
    let mut d = device();
    let v2 = image(Chip::Esp32c3, "1.1.0", 300_000);
    d.start(job(URL));
    d.respond(200, Some(v2.len() as u32), None);
    d.body(&v2[..200_000]);
    d.event(Event::FetchFailed(FetchError::Connection));
    d.tick(5_000);
    assert!(*d.fetches.last().unwrap() > 0);
    // The server answers the ranged request with the whole file.
    d.respond(200, Some(v2.len() as u32), None);
    d.body(&v2);
    d.event(Event::BodyEnd);
    assert!(d.rebooted, "{:?}", d.published.last());
    assert_eq!(d.slot_bytes(1, v2.len()), v2);
}

#[test]
fn a_stalled_server_ends_with_timeout_after_the_retries() {
    let mut d = device();
    d.start(job(URL));
    d.respond(200, Some(300_000), None);
    let mut elapsed = 0;
    while d.engine.is_busy() {
        d.tick(1_000);
        elapsed += 1_000;
        assert!(elapsed < 600_000);
    }
    assert_eq!(d.failed_with(), Some(ErrorCode::Timeout));
    // 6 stalls of 15 s plus the backoff between them (five, each 16 s at most).
    assert!(elapsed <= 6 * 15_000 + 5 * 16_000 + 6_000, "{elapsed} ms");
}

#[test]
fn the_overall_deadline_ends_the_update_with_timeout() {
    let mut d = device();
    let mut j = job(URL);
    j.timeout_s = Some(10);
    d.start(j);
    d.respond(200, Some(300_000), None);
    let v2 = image(Chip::Esp32c3, "1.1.0", 300_000);
    // A slow but steady server: a chunk every second.
    for c in v2.chunks(1024).take(20) {
        d.now += 1_000;
        d.event(Event::Body(c));
        d.event(Event::Tick);
    }
    assert_eq!(d.failed_with(), Some(ErrorCode::Timeout));
    assert!(!d.engine.is_busy());
}

#[test]
fn set_timeout_sets_the_deadline_of_later_updates() {
    let mut d = device();
    d.engine.set_timeout(3_000);
    d.start(job(URL));
    d.respond(200, Some(300_000), None);
    d.tick(1_000);
    assert!(d.engine.is_busy());
    d.tick(2_000);
    assert_eq!(d.failed_with(), Some(ErrorCode::Timeout));
}

#[test]
fn a_second_start_during_an_update_is_refused_busy() {
    let mut d = device();
    let v2 = image(Chip::Esp32c3, "1.1.0", 300_000);
    d.start(job(URL));
    d.respond(200, Some(v2.len() as u32), None);
    d.body(&v2[..50_000]);
    let mut other = job("http://elsewhere/fw.bin");
    other.job = Some("job-2".try_into().unwrap());
    d.start(other);
    let busy = d
        .published
        .iter()
        .find(|p| p.error == Some(ErrorCode::Busy))
        .unwrap();
    assert_eq!(busy.job.as_deref(), Some("job-2"));
    assert_eq!(d.engine.url(), Some(URL));
    d.body(&v2[50_000..]);
    d.event(Event::BodyEnd);
    assert!(d.rebooted);
}

#[test]
fn cancel_stops_the_update_and_frees_the_device() {
    let mut d = device();
    let v2 = image(Chip::Esp32c3, "1.1.0", 300_000);
    d.start(job(URL));
    d.respond(200, Some(v2.len() as u32), None);
    d.body(&v2[..50_000]);
    d.event(Event::Command(Command::Cancel { job: None }));
    assert_eq!(d.last().phase, Phase::Cancelled);
    assert_eq!(d.last().error, Some(ErrorCode::Cancelled));
    assert!(!d.engine.is_busy());
    assert!(d.layout.slots[1]
        .journal()
        .has(&mut d.flash, Flag::Abandoned)
        .unwrap());
    // A cancelled download is not resumed after a reboot.
    assert!(d.engine.resume(&mut d.flash, d.now).is_none());
}

#[test]
fn a_download_cut_by_a_reboot_resumes_from_the_journal() {
    let mut d = device();
    let v2 = image(Chip::Esp32c3, "1.1.0", 300_000);
    d.start(job(URL));
    d.respond(200, Some(v2.len() as u32), None);
    d.body(&v2[..170_000]);
    // Reboot: a new engine on the same flash.
    let flash = std::mem::replace(&mut d.flash, mqota_core::mock_flash::MockFlash::new(4096));
    let mut d = rig_on(flash, d.layout.clone());
    let a = d
        .engine
        .resume(&mut d.flash, d.now)
        .expect("something to resume");
    d.apply(a);
    let from = *d.fetches.last().unwrap();
    assert_eq!(from, (170_000 / PAGE_SIZE) * PAGE_SIZE);
    assert_eq!(d.engine.job().map(|j| j.as_str()), Some("job-1"));
    d.serve(&v2);
    assert!(d.rebooted, "{:?}", d.published.last());
    assert_eq!(d.slot_bytes(1, v2.len()), v2);
}

#[test]
fn the_running_version_is_not_downloaded_again_unless_forced() {
    let mut d = device();
    let mut j = job(URL);
    j.version = Some("1.0.0".try_into().unwrap());
    d.start(j.clone());
    assert_eq!(d.last().phase, Phase::Done);
    assert!(d.fetches.is_empty());
    // Forcing is a new job: the same id again would be a duplicate.
    j.force = true;
    j.job = Some("job-2".try_into().unwrap());
    d.start(j);
    assert_eq!(d.fetches, vec![0]);
}

#[test]
fn erases_ahead_in_64k_blocks_where_aligned() {
    let mut d = device();
    let v2 = image(Chip::Esp32c3, "1.1.0", 1_000_000);
    d.start(job(URL));
    d.flash.reset_stats();
    d.serve(&v2);
    let s = d.flash.stats();
    // ota_1 starts 64 KiB aligned: 15 whole blocks, then 4 KiB sectors for the rest,
    // plus the otadata sector.
    assert!(s.block_erases >= 15, "{s:?}");
    assert!(s.sector_erases <= 17, "{s:?}");
    let mut back = vec![0u8; v2.len()];
    d.flash.read(d.layout.slots[1].offset, &mut back).unwrap();
    assert_eq!(back, v2);
}

#[test]
fn percent_does_not_go_down_when_a_download_resumes_after_a_reboot() {
    let v2 = image(Chip::Esp32c3, "1.1.0", 300_000);
    for size_in_job in [true, false] {
        let mut d = device();
        let mut j = job(URL);
        if size_in_job {
            j.size = Some(v2.len() as u32);
        }
        d.start(j);
        d.respond(200, Some(v2.len() as u32), None);
        d.body(&v2[..170_000]);
        let before = d.published.last().unwrap().percent;
        assert!(before > 40, "{before}");
        let flash = std::mem::replace(&mut d.flash, mqota_core::mock_flash::MockFlash::new(4096));
        let mut d = rig_on(flash, d.layout.clone());
        let a = d.engine.resume(&mut d.flash, d.now).expect("resumes");
        d.apply(a);
        d.serve(&v2);
        assert!(d.rebooted);
        let after: Vec<(Phase, u8)> = d.published.iter().map(|p| (p.phase, p.percent)).collect();
        // While the total is unknown the protocol says 0; once it is known
        // again the job carries on from where it was, less the partial page
        // that a reboot loses and that is fetched again.
        let one_page = (PAGE_SIZE as usize * 100).div_ceil(v2.len()) as u8;
        let known: Vec<u8> = d
            .published
            .iter()
            .filter(|p| p.total.is_some())
            .map(|p| p.percent)
            .collect();
        assert!(
            known[0] + one_page >= before,
            "size in job {size_in_job}: {before} then {after:?}"
        );
        assert!(known.windows(2).all(|w| w[0] <= w[1]), "{after:?}");
    }
}

#[test]
fn a_cancel_naming_another_job_leaves_the_update_running() {
    let mut d = device();
    let v2 = image(Chip::Esp32c3, "1.1.0", 300_000);
    d.start(job(URL));
    d.respond(200, Some(v2.len() as u32), None);
    d.body(&v2[..50_000]);
    let n = d.published.len();
    d.event(Event::Command(Command::Cancel {
        job: Some("job-2".try_into().unwrap()),
    }));
    assert!(d.engine.is_busy());
    assert_eq!(d.published.len(), n, "{:?}", d.published.last());
    d.event(Event::Command(Command::Cancel {
        job: Some("job-1".try_into().unwrap()),
    }));
    assert!(!d.engine.is_busy());
    assert_eq!(d.last().phase, Phase::Cancelled);
}

#[test]
fn begin_ota_with_an_overlong_url_fails_with_bad_command() {
    let mut d = device();
    let url = format!("http://fw.example/{}", "a".repeat(300));
    let a = d.engine.begin_ota(&mut d.flash, d.now, &url);
    d.apply(a);
    assert_eq!(d.last().phase, Phase::Failed);
    assert_eq!(d.last().error, Some(ErrorCode::BadCommand));
    assert!(!d.engine.is_busy());
}

/// A device running 1.0.0 of `mqota-test` with a `secure_version` floor of 2.
fn guarded() -> Rig {
    let mut d = device();
    let mut cfg = EngineConfig::new("dev-1", Chip::Esp32c3, "1.0.0");
    cfg.progress_interval_ms = 0;
    cfg.running_project = "mqota-test".try_into().unwrap();
    cfg.secure_floor = 2;
    d.engine = Engine::new(cfg, d.layout.clone());
    d
}

fn built(version: &str, project: &str, secure_version: u32) -> Vec<u8> {
    ImageBuilder::new(Chip::Esp32c3)
        .version(version)
        .project(project)
        .secure_version(secure_version)
        .size(100_000)
        .build()
        .unwrap()
}

#[test]
fn an_older_version_another_project_or_a_lower_secure_version_is_refused_before_any_erase() {
    let cases = [
        (
            built("0.9.0", "mqota-test", 2),
            ErrorCode::Downgrade,
            "older than the running",
        ),
        (
            built("1.1.0", "other-app", 2),
            ErrorCode::WrongProject,
            "another project",
        ),
        (
            built("1.1.0", "mqota-test", 1),
            ErrorCode::Downgrade,
            "below the device's floor",
        ),
    ];
    for (img, code, says) in cases {
        let mut d = guarded();
        let before = d.slot_bytes(1, 8192);
        d.start(job(URL));
        d.flash.reset_stats();
        d.serve(&img);
        let last = d.last();
        assert_eq!(
            (last.phase, last.error),
            (Phase::Failed, Some(code)),
            "{last:?}"
        );
        assert!(last.message.as_deref().unwrap().contains(says), "{last:?}");
        assert_eq!(d.flash.stats().erases, 0, "nothing erased");
        assert_eq!(d.slot_bytes(1, 8192), before);
        assert!(!d.rebooted && !d.engine.is_busy());
    }
}

#[test]
fn the_job_may_allow_an_older_version_or_another_project_but_never_a_lower_secure_version() {
    let mut allowed = job(URL);
    allowed.allow_downgrade = true;
    allowed.allow_other_project = true;
    for img in [
        built("0.9.0", "mqota-test", 2),
        built("1.1.0", "other-app", 3),
    ] {
        let mut d = guarded();
        d.start(allowed.clone());
        d.serve(&img);
        assert!(d.rebooted, "{:?}", d.last());
    }
    let mut d = guarded();
    d.start(allowed);
    d.serve(&built("1.1.0", "mqota-test", 1));
    assert_eq!(d.last().error, Some(ErrorCode::Downgrade));
    assert!(!d.rebooted);
}

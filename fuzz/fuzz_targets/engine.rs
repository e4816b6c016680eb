//! The update engine, the boot guard and the bootloader model driven by a
//! random sequence of events (commands, HTTP heads, body chunks of a valid or
//! corrupted image, ends, failures, ticks, cancels, reboots, power cuts at
//! random flash operations, health checks, operator rollbacks), against a
//! simple model of which image may boot.
//!
//! After every boot:
//! - something boots, and it is the old image or one the engine went on to
//!   activate, byte for byte (never a partial or corrupted one);
//! - an image whose health check failed does not boot again until it is
//!   downloaded again, and one whose trial died gets no second trial;
//! - an image that has not been confirmed boots only on trial (or to be
//!   rolled back).
//!
//! At every flash operation of the firmware (engine and guard): nothing is
//! written into the running slot's image area.
#![no_main]

use arbitrary::Unstructured;
use embedded_storage::nor_flash::{ErrorType, MultiwriteNorFlash, NorFlash, ReadNorFlash};
use libfuzzer_sys::fuzz_target;
use mqota_core::bootguard::{self, Verdict};
use mqota_core::engine::{Action, Engine, EngineConfig, Event, Response};
use mqota_core::fetch::FetchError;
use mqota_core::image::{Chip, ImageBuilder};
use mqota_core::journal::{RollbackReason, JOURNAL_SIZE};
use mqota_core::layout::Layout;
use mqota_core::partition::{PartitionTable, TABLE_OFFSET};
use mqota_core::protocol::{Command, Job};
use mqota_flash_sim::{Bootloader, SimFlash};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::sync::OnceLock;

/// Small slots keep each run cheap while still crossing 64 KiB blocks.
const TABLE: &str = "\
# Name, Type, SubType, Offset, Size
nvs, data, nvs, 0x9000, 0x4000
otadata, data, ota, 0xd000, 0x2000
phy_init, data, phy, 0xf000, 0x1000
ota_0, app, ota_0, 0x10000, 0x40000
ota_1, app, ota_1, 0x50000, 0x40000
";
const FLASH_SIZE: usize = 0x90000;
const OLD: &str = "1.0.0";

struct Fixture {
    flash: SimFlash,
    layout: Layout,
    /// (version, bytes): 0 is the running image, then updates; the last two
    /// are for the wrong chip and too large for a slot.
    images: Vec<(&'static str, Vec<u8>)>,
}

fn build(chip: Chip, version: &str, size: u32) -> Vec<u8> {
    let mut img = ImageBuilder::new(chip)
        .version(version)
        .project("mqota-fuzz")
        .size(size)
        .build()
        .expect("fixture image builds");
    img.resize(img.len().div_ceil(4) * 4, 0xFF);
    img
}

fn fixture() -> &'static Fixture {
    static FX: OnceLock<Fixture> = OnceLock::new();
    FX.get_or_init(|| {
        let table = PartitionTable::from_csv(TABLE).expect("table parses");
        let mut flash = SimFlash::new(FLASH_SIZE);
        flash.write(TABLE_OFFSET, &table.to_bytes()).unwrap();
        let layout = Layout::from_table(&table, 0).expect("two slots");
        let images = vec![
            (OLD, build(Chip::Esp32c3, OLD, 20_000)),
            ("1.1.0", build(Chip::Esp32c3, "1.1.0", 30_000)),
            ("1.2.0", build(Chip::Esp32c3, "1.2.0", 90_000)),
            ("1.3.0", build(Chip::Esp32c6, "1.3.0", 12_000)),
            ("1.4.0", build(Chip::Esp32c3, "1.4.0", 0x40000 - 2048)),
        ];
        let slot0 = layout.slots[0].offset;
        flash.write_flash(slot0, &images[0].1).unwrap();
        // The device has booted once before it gets any command.
        Bootloader::stock().boot(&mut flash).unwrap();
        flash.reset_stats();
        Fixture {
            flash,
            layout,
            images,
        }
    })
}

/// The firmware's view of the flash: any write or erase that reaches into
/// the running slot's image area is a bug (its journal sector is fair game).
struct Guarded<'a> {
    inner: &'a mut SimFlash,
    forbidden: core::ops::Range<u32>,
}

impl Guarded<'_> {
    fn check(&self, from: u32, to: u32) {
        assert!(
            to <= self.forbidden.start || from >= self.forbidden.end,
            "the firmware touched its own running image: {from:#x}..{to:#x} in {:#x?}",
            self.forbidden
        );
    }
}

impl ErrorType for Guarded<'_> {
    type Error = <SimFlash as ErrorType>::Error;
}

impl ReadNorFlash for Guarded<'_> {
    const READ_SIZE: usize = <SimFlash as ReadNorFlash>::READ_SIZE;
    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        self.inner.read(offset, bytes)
    }
    fn capacity(&self) -> usize {
        self.inner.capacity()
    }
}

/// The guard only watches where writes land; rewriting bits to 0 is as
/// allowed as on the flash it wraps.
impl MultiwriteNorFlash for Guarded<'_> {}

impl NorFlash for Guarded<'_> {
    const WRITE_SIZE: usize = <SimFlash as NorFlash>::WRITE_SIZE;
    const ERASE_SIZE: usize = <SimFlash as NorFlash>::ERASE_SIZE;
    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
        self.check(offset, offset + bytes.len() as u32);
        let r = self.inner.write(offset, bytes);
        if let Err(e) = &r {
            trace(&format!("write {offset:#x} +{} failed: {e:?}", bytes.len()));
        }
        r
    }
    fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
        self.check(from, to);
        let r = self.inner.erase(from, to);
        if let Err(e) = &r {
            trace(&format!("erase {from:#x}..{to:#x} failed: {e:?}"));
        }
        r
    }
}

/// What the file server is sending for the fetch in flight.
struct Serving {
    image: usize,
    /// Next byte to send.
    pos: usize,
    /// First byte asked for.
    from: u32,
}

struct Sim {
    fx: &'static Fixture,
    flash: SimFlash,
    bootloader: Bootloader,
    layout: Layout,
    version: &'static str,
    engine: Engine,
    now: u64,
    on_trial: bool,
    /// Boots so far.
    boots: u64,
    /// Image of the job in flight (for the server), by the URL it was given.
    job_image: Option<usize>,
    serving: Option<Serving>,
    // The model.
    /// Versions the engine may have activated (a BodyEnd reached it).
    candidates: HashSet<&'static str>,
    /// (slot, version) for which `confirm` was called (it may have been cut).
    confirming: HashSet<(usize, &'static str)>,
    /// (slot, version) whose trial started, not downloaded again since.
    tried: HashSet<(usize, &'static str)>,
    /// (slot, version) rejected by a failed health check, not downloaded
    /// again since.
    /// Whether `reject` returned (else it was cut).
    rejected: std::collections::HashMap<(usize, &'static str), bool>,
}

impl Sim {
    fn new(bootloader: Bootloader) -> Self {
        let fx = fixture();
        let layout = fx.layout.clone();
        let mut s = Sim {
            fx,
            flash: fx.flash.clone(),
            bootloader,
            engine: Engine::new(
                EngineConfig::new("fuzz", Chip::Esp32c3, OLD),
                layout.clone(),
            ),
            layout,
            version: OLD,
            now: 0,
            on_trial: false,
            boots: 0,
            job_image: None,
            serving: None,
            candidates: HashSet::new(),
            confirming: HashSet::from([(0, OLD)]),
            tried: HashSet::new(),
            rejected: Default::default(),
        };
        s.reboot();
        s
    }

    /// `version` may now be activated into the update slot: a fresh copy
    /// replaces whatever the slot held, and its history.
    fn fresh_copy(&mut self, version: &'static str) {
        let target = self.layout.target();
        self.candidates.insert(version);
        self.rejected.retain(|(slot, _), _| *slot != target);
        self.tried.retain(|(slot, _)| *slot != target);
        self.confirming.retain(|(slot, _)| *slot != target);
    }

    fn guarded(&mut self) -> Guarded<'_> {
        let slot = self.layout.slots[self.layout.running];
        Guarded {
            inner: &mut self.flash,
            forbidden: slot.offset..slot.offset + slot.size - JOURNAL_SIZE,
        }
    }

    /// Power on (if it went), boot through the bootloader, run the guard,
    /// and check the model. Loops while the guard or a cut asks for more.
    fn reboot(&mut self) {
        for _ in 0..32 {
            // A cut still armed may hit the bootloader's own otadata writes.
            if !self.flash.is_powered() {
                self.flash.power_on();
            }
            self.serving = None;
            self.job_image = None;
            self.on_trial = false;
            self.boots += 1;
            let outcome = match self.bootloader.boot(&mut self.flash) {
                Ok(o) => o,
                Err(_) if !self.flash.is_powered() => continue,
                Err(e) => panic!("the bootloader failed with the power on: {e:?}"),
            };
            trace(&format!(
                "boot {:?} start {:?} rejected {:?} writes {:?}",
                outcome.booted, outcome.start, outcome.rejected, outcome.otadata_writes
            ));
            let slot = outcome.slot.expect("something boots, never nothing");
            let info = outcome.image.expect("a booted slot has an image");
            let version = self
                .fx
                .images
                .iter()
                .map(|(v, _)| *v)
                .find(|v| *v == info.app.version.as_str())
                .unwrap_or_else(|| panic!("unknown image booted: {:?}", info.app.version));
            // Byte for byte the image built for that version.
            let want = &self
                .fx
                .images
                .iter()
                .find(|(v, _)| *v == version)
                .unwrap()
                .1;
            let at = self.layout.slots[slot].offset as usize;
            assert_eq!(
                Sha256::digest(&self.flash.data()[at..at + want.len()]),
                Sha256::digest(want),
                "a partial or corrupted {version} booted"
            );
            assert!(
                version == OLD || self.candidates.contains(version),
                "{version} booted but the engine never activated it"
            );
            // A rejection that completed leaves the image unbootable; one cut
            // short may let it boot once more, only to be rejected again.
            let was_rejected = self.rejected.get(&(slot, version)).copied();
            assert_ne!(
                was_rejected,
                Some(true),
                "{version} failed its health check yet booted again"
            );
            self.layout.running = slot;
            self.version = version;
            let mut cfg = EngineConfig::new("fuzz", Chip::Esp32c3, version);
            cfg.progress_interval_ms = 0;
            self.engine = Engine::new(cfg, self.layout.clone());

            let layout = self.layout.clone();
            let boot = match bootguard::on_boot(&mut self.guarded(), &layout) {
                Ok(b) => b,
                Err(_) => {
                    assert!(!self.flash.is_powered(), "guard failed with the power on");
                    continue;
                }
            };
            assert!(
                was_rejected.is_none() || boot.verdict == Verdict::Reboot,
                "{version} failed its health check, the rejection was cut, and the guard let it run: {boot:?}"
            );
            match boot.verdict {
                Verdict::Trial => {
                    trace("trial");
                    assert!(
                        !self.tried.contains(&(slot, version)),
                        "{version} got a second trial after one died"
                    );
                    self.tried.insert((slot, version));
                    self.on_trial = true;
                    return;
                }
                Verdict::Reboot => continue,
                Verdict::Normal => {
                    assert!(
                        !self.tried.contains(&(slot, version))
                            || self.confirming.contains(&(slot, version)),
                        "{version} runs normally though its trial was never passed"
                    );
                }
            }
            if let Some(r) = &boot.report {
                if bootguard::mark_reported(&mut self.guarded(), r).is_err() {
                    continue;
                }
            }
            if boot.resume {
                let now = self.now;
                let slot = self.layout.slots[self.layout.running];
                let mut g = Guarded {
                    inner: &mut self.flash,
                    forbidden: slot.offset..slot.offset + slot.size - JOURNAL_SIZE,
                };
                if let Some(actions) = self.engine.resume(&mut g, now) {
                    // A resumed job is the one recorded; find its image by URL.
                    self.job_image = self.engine.url().and_then(image_of_url);
                    self.apply(actions);
                }
                if !self.flash.is_powered() {
                    continue;
                }
            }
            return;
        }
        panic!("the device never settled after 32 boots");
    }

    fn apply(&mut self, actions: mqota_core::engine::Actions) {
        for a in actions {
            match a {
                Action::Fetch { from } => {
                    self.serving = self.job_image.map(|image| Serving {
                        image,
                        pos: from as usize,
                        from,
                    })
                }
                Action::StopFetch => self.serving = None,
                Action::Reboot => {
                    trace("activated");
                    self.reboot();
                    return;
                }
                Action::Publish(_) | Action::Rollback { .. } => {}
            }
        }
    }

    fn event(&mut self, ev: Event<'_>) {
        let now = self.now;
        let slot = self.layout.slots[self.layout.running];
        let mut g = Guarded {
            inner: &mut self.flash,
            forbidden: slot.offset..slot.offset + slot.size - JOURNAL_SIZE,
        };
        let actions = self.engine.handle(&mut g, now, ev);
        if !self.flash.is_powered() {
            self.reboot();
            return;
        }
        if !self.engine.is_busy() {
            self.job_image = None;
        }
        self.apply(actions);
    }
}

/// `MQOTA_FUZZ_TRACE=1`: one line per milestone, to see what a run reaches.
fn trace(what: &str) {
    static ON: OnceLock<bool> = OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("MQOTA_FUZZ_TRACE").is_some()) {
        eprintln!("milestone: {what}");
    }
}

fn url_of(image: usize) -> String {
    format!("http://fw.test/{image}.bin")
}

fn image_of_url(url: &str) -> Option<usize> {
    url.strip_prefix("http://fw.test/")?
        .strip_suffix(".bin")?
        .parse()
        .ok()
}

fn step(s: &mut Sim, u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let op: u8 = u.int_in_range(0..=15)?;
    trace(&format!(
        "op {op} trial {} busy {}",
        s.on_trial,
        s.engine.is_busy()
    ));
    if s.on_trial {
        // The runtime judges the trial before it takes any command.
        match op % 4 {
            0 => {
                let layout = s.layout.clone();
                s.confirming.insert((s.layout.running, s.version));
                let ok = bootguard::confirm(&mut s.guarded(), &layout)
                    .and_then(|r| bootguard::mark_reported(&mut s.guarded(), &r));
                if ok.is_ok() {
                    s.on_trial = false;
                } else {
                    s.reboot();
                }
            }
            1 => {
                let layout = s.layout.clone();
                let result =
                    bootguard::reject(&mut s.guarded(), &layout, RollbackReason::HealthCheckFailed);
                trace(&format!("reject: {result:?}"));
                let done = result.is_ok();
                s.rejected.insert((s.layout.running, s.version), done);
                s.reboot();
            }
            2 => s.reboot(),
            _ => arm_cut(s, u)?,
        }
        return Ok(());
    }
    match op {
        0 | 1 => {
            let image = u.int_in_range(0..=s.fx.images.len() - 1)?;
            let (version, bytes) = &s.fx.images[image];
            let mut job = Job {
                url: url_of(image).as_str().try_into().unwrap(),
                version: u
                    .arbitrary::<bool>()?
                    .then(|| (*version).try_into().unwrap()),
                sha256: None,
                size: None,
                job: Some("fuzz".try_into().unwrap()),
                timeout_s: u.arbitrary::<Option<u8>>()?.map(u32::from),
                force: u.arbitrary()?,
                allow_downgrade: u.arbitrary()?,
                allow_other_project: u.arbitrary()?,
            };
            job.sha256 = match u.int_in_range(0..=2u8)? {
                0 => None,
                1 => Some(Sha256::digest(bytes).into()),
                _ => Some(u.arbitrary()?),
            };
            job.size = match u.int_in_range(0..=2u8)? {
                0 => None,
                1 => Some(bytes.len() as u32),
                _ => Some(u.arbitrary()?),
            };
            let busy = s.engine.is_busy();
            if !busy {
                s.job_image = Some(image);
            }
            s.event(Event::Command(Command::Start(job)));
        }
        2 => {
            let Some(sv) = s.serving.as_mut() else {
                return Ok(());
            };
            let len = s.fx.images[sv.image].1.len() as u32;
            let status = *u.choose(&[200u16, 206, 206, 206, 404, 500, 503])?;
            let range_start = match status {
                206 if u.arbitrary::<bool>()? => Some(sv.from),
                206 => Some(u.int_in_range(0..=len)?),
                _ => None,
            };
            sv.pos = range_start.unwrap_or(0) as usize;
            let rest = len.saturating_sub(sv.pos as u32);
            let content_length = match u.int_in_range(0..=3u8)? {
                0 => None,
                1 => Some(u.arbitrary()?),
                _ => Some(rest),
            };
            if !(200..300).contains(&status) {
                s.serving = None;
            }
            s.event(Event::Response(Response {
                status,
                content_length,
                range_start,
            }));
        }
        3..=6 => {
            let Some(sv) = s.serving.as_mut() else {
                return Ok(());
            };
            let bytes = &s.fx.images[sv.image].1;
            let n = u
                .int_in_range(1..=16_384usize)?
                .min(bytes.len() - sv.pos.min(bytes.len()));
            let mut chunk = bytes[sv.pos.min(bytes.len())..][..n].to_vec();
            if !chunk.is_empty() && u.ratio(1u8, 16)? {
                let i = u.int_in_range(0..=chunk.len() - 1)?;
                chunk[i] ^= u.int_in_range(1..=255u8)?;
            }
            sv.pos += n;
            if chunk.is_empty() {
                return Ok(());
            }
            s.event(Event::Body(&chunk));
        }
        7 => {
            if let Some(sv) = &s.serving {
                if sv.pos >= s.fx.images[sv.image].1.len() {
                    // A fresh copy replaces whatever the slot held before.
                    let v = s.fx.images[sv.image].0;
                    s.fresh_copy(v);
                }
            }
            s.serving = None;
            s.event(Event::BodyEnd);
        }
        8 => {
            s.serving = None;
            s.event(Event::FetchFailed(FetchError::Connection));
        }
        9 => {
            s.now += u.int_in_range(0..=40_000u64)?;
            s.event(Event::Tick);
        }
        10 => s.event(Event::Command(Command::Cancel { job: None })),
        11 => s.reboot(),
        12 => arm_cut(s, u)?,
        14 | 15 => serve_rest(s, u)?,
        _ if s.engine.is_busy() => s.event(Event::Command(Command::Rollback { job: None })),
        _ => {
            let layout = s.layout.clone();
            if bootguard::rollback(&mut s.guarded(), &layout).is_ok() {
                s.reboot();
            } else if !s.flash.is_powered() {
                s.reboot();
            }
        }
    }
    Ok(())
}

/// A well-behaved server answers the fetch in flight to the end, in chunks
/// of one random size (rarely corrupting one byte): reaching activation by
/// single chunks alone takes the fuzzer too long.
fn serve_rest(s: &mut Sim, u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let Some(sv) = s.serving.as_ref() else {
        return Ok(());
    };
    let (image, from) = (sv.image, sv.from as usize);
    let bytes = &s.fx.images[image].1;
    let chunk = u.int_in_range(512..=16_384usize)?;
    let corrupt = u
        .ratio(1u8, 8)?
        .then(|| u.int_in_range(from..=bytes.len().max(from + 1) - 1))
        .transpose()?;
    s.event(Event::Response(Response {
        status: if from == 0 { 200 } else { 206 },
        content_length: Some((bytes.len() - from.min(bytes.len())) as u32),
        range_start: (from > 0).then_some(from as u32),
    }));
    let mut at = from;
    while at < bytes.len() {
        if s.serving.is_none() || !s.engine.is_busy() {
            return Ok(());
        }
        let end = (at + chunk).min(bytes.len());
        let mut c = bytes[at..end].to_vec();
        if let Some(i) = corrupt.filter(|i| (at..end).contains(i)) {
            c[i - at] ^= 0x5A;
        }
        at = end;
        if let Some(sv) = s.serving.as_mut() {
            sv.pos = at;
        }
        s.event(Event::Body(&c));
    }
    if s.serving.is_some() && s.engine.is_busy() {
        let v = s.fx.images[image].0;
        s.fresh_copy(v);
        s.serving = None;
        s.event(Event::BodyEnd);
    }
    Ok(())
}

fn arm_cut(s: &mut Sim, u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    if u.arbitrary()? {
        s.flash.cut_power_after_ops(u.int_in_range(0..=64)?);
    } else {
        s.flash.cut_power_after_bytes(u.int_in_range(0..=200_000)?);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let bootloader = if u.arbitrary().unwrap_or(false) {
        Bootloader::rollback()
    } else {
        Bootloader::stock()
    };
    let mut s = Sim::new(bootloader.for_chip(Chip::Esp32c3));
    for _ in 0..256 {
        if step(&mut s, &mut u).is_err() || u.is_empty() {
            break;
        }
    }
});

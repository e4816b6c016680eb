//! A device on a flash: the default partition table, version 1.0.0 in
//! `ota_0`, blank otadata. Shared by the core's engine tests (on the core's
//! own [`MockFlash`]) and, through `#[path]`, by the boot guard and flash
//! contract tests in `mqota-e2e` (on `mqota-flash-sim`'s NOR model with
//! power cuts and the bootloader model).
#![allow(dead_code)]

use embedded_storage::nor_flash::MultiwriteNorFlash;
use mqota_core::engine::{Action, Actions, Engine, EngineConfig, Event, Response};
use mqota_core::image::{Chip, ImageBuilder};
use mqota_core::layout::Layout;
use mqota_core::mock_flash::MockFlash;
use mqota_core::partition::{PartitionTable, DEFAULT_4MB_CSV, TABLE_OFFSET};
use mqota_core::protocol::{Command, ErrorCode, Job, Phase, Progress};

pub const FLASH_SIZE: usize = 4 * 1024 * 1024;
pub const CHUNK: usize = 1024;

pub fn image(chip: Chip, version: &str, size: u32) -> Vec<u8> {
    ImageBuilder::new(chip)
        .version(version)
        .project("mqota-test")
        .size(size)
        .build()
        .expect("image builds")
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

pub struct Rig<F = MockFlash> {
    pub flash: F,
    pub layout: Layout,
    pub engine: Engine,
    pub now: u64,
    pub published: Vec<Progress>,
    pub fetches: Vec<u32>,
    pub rebooted: bool,
    /// Rollbacks the engine handed to the caller (the boot guard's job).
    pub rollbacks: Vec<Option<mqota_core::protocol::JobId>>,
}

/// A fresh device running 1.0.0 from `ota_0`, on the core's mock flash.
pub fn device() -> Rig {
    device_on(MockFlash::new(FLASH_SIZE))
}

/// A fresh device running 1.0.0 from `ota_0`, on `flash` (erased,
/// [`FLASH_SIZE`] bytes).
pub fn device_on<F: MultiwriteNorFlash>(mut flash: F) -> Rig<F> {
    let table = PartitionTable::from_csv(DEFAULT_4MB_CSV).unwrap();
    flash.write(TABLE_OFFSET, &table.to_bytes()).unwrap();
    let layout = Layout::from_table(&table, 0).unwrap();
    let v1 = image(Chip::Esp32c3, "1.0.0", 200_000);
    let slot0 = layout.slots[0];
    flash
        .erase(
            slot0.offset,
            slot0.offset + (v1.len() as u32).div_ceil(4096) * 4096,
        )
        .unwrap();
    flash.write(slot0.offset, &padded(&v1)).unwrap();
    rig_on(flash, layout)
}

pub fn padded(b: &[u8]) -> Vec<u8> {
    let mut v = b.to_vec();
    v.resize(b.len().div_ceil(4) * 4, 0xFF);
    v
}

pub fn rig_on<F: MultiwriteNorFlash>(flash: F, layout: Layout) -> Rig<F> {
    let mut cfg = EngineConfig::new("dev-1", Chip::Esp32c3, "1.0.0");
    cfg.progress_interval_ms = 0;
    Rig {
        engine: Engine::new(cfg, layout.clone()),
        flash,
        layout,
        now: 1_000,
        published: Vec::new(),
        fetches: Vec::new(),
        rebooted: false,
        rollbacks: Vec::new(),
    }
}

pub fn job(url: &str) -> Job {
    Job {
        url: url.try_into().unwrap(),
        version: None,
        sha256: None,
        size: None,
        job: Some("job-1".try_into().unwrap()),
        timeout_s: None,
        force: false,
        allow_downgrade: false,
        allow_other_project: false,
    }
}

impl<F: MultiwriteNorFlash> Rig<F> {
    pub fn apply(&mut self, actions: Actions) {
        for a in actions {
            match a {
                Action::Publish(p) => self.published.push(p),
                Action::Fetch { from } => self.fetches.push(from),
                Action::StopFetch => {}
                Action::Reboot => self.rebooted = true,
                Action::Rollback { job } => self.rollbacks.push(job),
            }
        }
    }

    pub fn event(&mut self, ev: Event<'_>) {
        let a = self.engine.handle(&mut self.flash, self.now, ev);
        self.apply(a);
    }

    pub fn start(&mut self, job: Job) {
        self.event(Event::Command(Command::Start(job)));
    }

    pub fn respond(&mut self, status: u16, content_length: Option<u32>, range_start: Option<u32>) {
        self.event(Event::Response(Response {
            status,
            content_length,
            range_start,
        }));
    }

    /// Streams `body` in chunks, advancing the clock 1 ms per chunk.
    pub fn body(&mut self, body: &[u8]) {
        for c in body.chunks(CHUNK) {
            self.now += 1;
            self.event(Event::Body(c));
            if !self.engine.is_busy() {
                return;
            }
        }
    }

    /// Serves `file` as a plain server would for the last fetch asked for.
    pub fn serve(&mut self, file: &[u8]) {
        let from = *self.fetches.last().expect("a fetch was asked for") as usize;
        if from == 0 {
            self.respond(200, Some(file.len() as u32), None);
        } else {
            self.respond(206, Some((file.len() - from) as u32), Some(from as u32));
        }
        self.body(&file[from..]);
        if self.engine.is_busy() {
            self.event(Event::BodyEnd);
        }
    }

    pub fn tick(&mut self, advance_ms: u64) {
        self.now += advance_ms;
        self.event(Event::Tick);
    }

    pub fn phases(&self) -> Vec<Phase> {
        let mut v: Vec<Phase> = self.published.iter().map(|p| p.phase).collect();
        v.dedup();
        v
    }

    pub fn last(&self) -> &Progress {
        self.published.last().expect("something was published")
    }

    pub fn failed_with(&self) -> Option<ErrorCode> {
        self.published
            .iter()
            .find(|p| p.phase == Phase::Failed)
            .and_then(|p| p.error)
    }

    pub fn slot_bytes(&mut self, slot: usize, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.flash
            .read(self.layout.slots[slot].offset, &mut b)
            .unwrap();
        b
    }
}

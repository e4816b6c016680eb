//! `cargo xtask bench pipeline`: what the update pipeline costs beyond the
//! download itself, and what the update costs on real flash.
//!
//! 1. Over loopback, from one HTTP server (tower-http `ServeDir`), the same
//!    1.5 MiB image is fetched (a) by the runtime's downloader into a sink
//!    that drops the bytes, and (b) by the same downloader into the update
//!    engine, which parses, hashes, erases and programs it into the simulated
//!    flash and verifies it from flash. The ratio a/b (median of the runs) is
//!    how close the pipeline comes to the bare download: 1.0 is free.
//! 2. The same update on the flash timing model (datasheet-typical figures):
//!    modelled flash time with the engine's 64 KiB block erases, next to the
//!    same writes with every 4 KiB sector erased on its own, as ESP-IDF's
//!    default path does.
//! 3. The memory a device needs: the size of the runtime's future (its whole
//!    state: buffers, session, engine — there is no heap) and of the engine.

use std::time::{Duration, Instant};

use embedded_storage::nor_flash::{ErrorType, MultiwriteNorFlash, NorFlash, ReadNorFlash};
use mqota_core::engine::{Engine, EngineConfig, Event, Response};
use mqota_core::image::{Chip, ImageBuilder};
use mqota_core::layout::Layout;
use mqota_core::partition::{PartitionTable, DEFAULT_4MB_CSV, TABLE_OFFSET};
use mqota_core::protocol::{Command, Job};
use mqota_flash_sim::SimFlash;
use mqota_runtime::{Abort, BodySink, Downloader, ResponseInfo};
use mqota_virtual::net::TokioNet;
use mqota_virtual::testing::{Fault, FaultServer, FileServer};

const IMAGE_SIZE: u32 = 1536 * 1024;
const RUNS: usize = 7;

struct Discard(u64);

impl BodySink for Discard {
    async fn begin(&mut self, _: &ResponseInfo) -> Result<(), Abort> {
        Ok(())
    }
    async fn chunk(&mut self, data: &[u8]) -> Result<(), Abort> {
        self.0 += data.len() as u64;
        Ok(())
    }
}

struct Pipeline<'a, F> {
    engine: &'a mut Engine,
    flash: &'a mut F,
}

impl<F: MultiwriteNorFlash> BodySink for Pipeline<'_, F> {
    async fn begin(&mut self, info: &ResponseInfo) -> Result<(), Abort> {
        let r = Response {
            status: info.status,
            content_length: info.content_length.map(|l| l as u32),
            range_start: None,
        };
        self.engine.handle(self.flash, 0, Event::Response(r));
        Ok(())
    }
    async fn chunk(&mut self, data: &[u8]) -> Result<(), Abort> {
        self.engine.handle(self.flash, 0, Event::Body(data));
        if self.engine.is_busy() {
            Ok(())
        } else {
            Err(Abort)
        }
    }
}

/// Erases one 4 KiB sector at a time, as ESP-IDF's `esp_ota_write` does
/// without `OTA_WITH_SEQUENTIAL_WRITES` tuning.
struct SectorOnly<'a>(&'a mut SimFlash);

impl ErrorType for SectorOnly<'_> {
    type Error = mqota_flash_sim::SimError;
}
impl ReadNorFlash for SectorOnly<'_> {
    const READ_SIZE: usize = 1;
    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        self.0.read(offset, bytes)
    }
    fn capacity(&self) -> usize {
        self.0.capacity()
    }
}
impl MultiwriteNorFlash for SectorOnly<'_> {}

impl NorFlash for SectorOnly<'_> {
    const WRITE_SIZE: usize = 4;
    const ERASE_SIZE: usize = 4096;
    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
        self.0.write(offset, bytes)
    }
    fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
        (from..to)
            .step_by(4096)
            .try_for_each(|s| self.0.erase(s, s + 4096))
    }
}

fn fresh_device() -> (SimFlash, Layout) {
    let mut flash = SimFlash::new(4 * 1024 * 1024);
    let table = PartitionTable::from_csv(DEFAULT_4MB_CSV).unwrap();
    flash.write_flash(TABLE_OFFSET, &table.to_bytes()).unwrap();
    (flash, Layout::from_table(&table, 0).unwrap())
}

fn start<F: MultiwriteNorFlash>(engine: &mut Engine, flash: &mut F, url: &str) {
    let job = Job {
        url: url.try_into().unwrap(),
        version: None,
        sha256: None,
        size: None,
        job: None,
        timeout_s: None,
        force: false,
        allow_downgrade: false,
        allow_other_project: false,
    };
    engine.handle(flash, 0, Event::Command(Command::Start(job)));
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let image = ImageBuilder::new(Chip::Esp32c3)
        .version("2.0.0")
        .project("bench")
        .size(IMAGE_SIZE)
        .build()
        .unwrap();
    let server = FileServer::start(&[("fw.bin", &image)]).await;
    let url = server.url("fw.bin");
    let net = TokioNet::plain();

    let mut plain = Vec::new();
    let mut update = Vec::new();
    for _ in 0..RUNS {
        let mut dl = Downloader::new(&net);
        let mut sink = Discard(0);
        let t = Instant::now();
        dl.download(&url, 0, &mut sink).await.unwrap();
        plain.push(t.elapsed());
        assert_eq!(sink.0, image.len() as u64);

        let (mut flash, layout) = fresh_device();
        let mut engine = Engine::new(EngineConfig::new("bench", Chip::Esp32c3, "1.0.0"), layout);
        let t = Instant::now();
        start(&mut engine, &mut flash, &url);
        let mut dl = Downloader::new(&net);
        dl.download(
            &url,
            0,
            &mut Pipeline {
                engine: &mut engine,
                flash: &mut flash,
            },
        )
        .await
        .unwrap();
        let actions = engine.handle(&mut flash, 0, Event::BodyEnd);
        update.push(t.elapsed());
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, mqota_core::engine::Action::Reboot)),
            "the update must end in a reboot: {actions:?}"
        );
    }
    let (p, u) = (median(plain), median(update));

    // The same at a WiFi-like 10 Mbit/s: the pipeline hides behind the link.
    let slow = FaultServer::start(image.clone(), Fault::Throttle(1_250_000)).await;
    let (mut slow_plain, mut slow_update) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        let mut dl = Downloader::new(&net);
        let t = Instant::now();
        dl.download(&slow.url(), 0, &mut Discard(0)).await.unwrap();
        slow_plain.push(t.elapsed());
        let (mut flash, layout) = fresh_device();
        let mut engine = Engine::new(EngineConfig::new("bench", Chip::Esp32c3, "1.0.0"), layout);
        let t = Instant::now();
        start(&mut engine, &mut flash, &slow.url());
        let mut dl = Downloader::new(&net);
        dl.download(
            &slow.url(),
            0,
            &mut Pipeline {
                engine: &mut engine,
                flash: &mut flash,
            },
        )
        .await
        .unwrap();
        engine.handle(&mut flash, 0, Event::BodyEnd);
        slow_update.push(t.elapsed());
    }
    let (sp, su) = (median(slow_plain), median(slow_update));

    // The flash timing model: one update each way, time of writes and erases.
    let modelled = |sector_only: bool| {
        let (mut flash, layout) = fresh_device();
        let mut engine = Engine::new(EngineConfig::new("bench", Chip::Esp32c3, "1.0.0"), layout);
        flash.reset_stats();
        let run = |f: &mut dyn FnMut(Event<'_>)| {
            f(Event::Response(Response {
                status: 200,
                content_length: Some(image.len() as u32),
                range_start: None,
            }));
            for c in image.chunks(1024) {
                f(Event::Body(c));
            }
            f(Event::BodyEnd);
        };
        if sector_only {
            let mut so = SectorOnly(&mut flash);
            start(&mut engine, &mut so, &url);
            run(&mut |e| {
                engine.handle(&mut so, 0, e);
            });
        } else {
            start(&mut engine, &mut flash, &url);
            run(&mut |e| {
                engine.handle(&mut flash, 0, e);
            });
        }
        (flash.elapsed(), flash.stats())
    };
    let (blocks, bstats) = modelled(false);
    let (sectors, sstats) = modelled(true);

    // Memory: the runtime's whole state is its future (no heap).
    let (mut flash, layout) = fresh_device();
    let engine = Engine::new(EngineConfig::new("bench", Chip::Esp32c3, "1.0.0"), layout);
    let engine_bytes = std::mem::size_of_val(&engine);
    let _ = &mut flash;

    let report = serde_json::json!({
        "image_bytes": image.len(),
        "runs": RUNS,
        "plain_download_ms": p.as_secs_f64() * 1e3,
        "update_pipeline_ms": u.as_secs_f64() * 1e3,
        "ratio_plain_over_update": p.as_secs_f64() / u.as_secs_f64(),
        "wifi_like_10mbit_plain_ms": sp.as_secs_f64() * 1e3,
        "wifi_like_10mbit_update_ms": su.as_secs_f64() * 1e3,
        "wifi_like_ratio_plain_over_update": sp.as_secs_f64() / su.as_secs_f64(),
        "update_throughput_mib_s": image.len() as f64 / (1 << 20) as f64 / u.as_secs_f64(),
        "modelled_flash_s_block_erase": blocks.as_secs_f64(),
        "modelled_flash_s_sector_erase_only": sectors.as_secs_f64(),
        "block_erases": bstats.block_erases,
        "sector_erases_with_blocks": bstats.sector_erases,
        "sector_erases_sector_only": sstats.sector_erases,
        "engine_bytes": engine_bytes,
        "device_future_bytes": mqota_virtual::device::runtime_future_size(),
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}

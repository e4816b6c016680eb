//! The field log on the NOR flash model: records survive reboots and power
//! cuts at every flash operation of a write, a flood stays within the
//! stated erase budget, and a missing or garbled partition never stops the
//! device.

// The clock of the runtime's timers on the host.
use mqota_host_time as _;

use embassy_futures::block_on;
use heapless::Vec;
use mqota_core::partition::{PartitionTable, DEFAULT_4MB_CSV, TABLE_OFFSET};
use mqota_core::protocol::{LogLevel, LogRecord, LogsGet, Topics};
use mqota_flash_sim::SimFlash;
use mqota_runtime::fieldlog::{FieldLog, LogStore, MAX_ERASES_PER_HOUR, RECORDS_PER_SECTOR};
use mqota_runtime::BootReason;

/// A 32 KiB ring at the start of a small flash.
const RING: core::ops::Range<u32> = 0..0x8000;

fn small_flash() -> SimFlash {
    SimFlash::new(0x10000)
}

fn all(store: &LogStore, flash: &mut SimFlash) -> std::vec::Vec<LogRecord> {
    let mut out = std::vec::Vec::new();
    let mut from = 0;
    loop {
        let mut got: Vec<LogRecord, 64> = Vec::new();
        let more = block_on(store.read(flash, &LogsGet::default(), from, &mut got)).unwrap();
        for r in &got {
            from = r.n + 1;
        }
        out.extend(got);
        if !more {
            return out;
        }
    }
}

fn numbers(records: &[LogRecord]) -> std::vec::Vec<u32> {
    records.iter().map(|r| r.n).collect()
}

fn msg(n: u32) -> String {
    // Records of varying length, some at the maximum.
    format!("record {n} {}", "x".repeat((n as usize * 7) % 60))
}

#[test]
fn records_survive_a_reboot_and_boots_count_up() {
    let mut flash = small_flash();
    let mut store = block_on(LogStore::open(&mut flash, RING)).unwrap();
    assert_eq!((store.boot(), store.newest()), (1, None));
    for n in 0..3 {
        let got = block_on(store.append(&mut flash, n * 10, LogLevel::Info, &msg(n))).unwrap();
        assert_eq!(got, n);
    }
    let store = block_on(LogStore::open(&mut flash, RING)).unwrap();
    assert_eq!((store.boot(), store.newest()), (2, Some(2)));
    let records = all(&store, &mut flash);
    assert_eq!(numbers(&records), [0, 1, 2]);
    assert_eq!(records[1].msg, msg(1).as_str());
    assert_eq!(records[1].ms, 10);
    assert!(records.iter().all(|r| r.boot == 1));
}

#[test]
fn the_ring_keeps_the_newest_records_when_it_wraps() {
    let mut flash = small_flash();
    let mut store = block_on(LogStore::open(&mut flash, RING)).unwrap();
    let total = RECORDS_PER_SECTOR * 8 * 3;
    for n in 0..total {
        block_on(store.append(&mut flash, n, LogLevel::Debug, &msg(n))).unwrap();
    }
    let records = all(&store, &mut flash);
    let got = numbers(&records);
    assert_eq!(*got.last().unwrap(), total - 1);
    // Contiguous, and at least seven sectors' worth survive.
    assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "{got:?}");
    assert!(got.len() as u32 >= RECORDS_PER_SECTOR * 7, "{}", got.len());
}

enum Cut {
    Ops(u64),
    Bytes(u64),
}

/// Every record that survives a completed append also survives an append
/// cut at any of its flash operations (or in the middle of one), and the
/// log reopens and takes the next record.
#[test]
fn a_power_cut_in_the_middle_of_a_write_loses_nothing_committed() {
    let mut flash = small_flash();
    let mut store = block_on(LogStore::open(&mut flash, RING)).unwrap();
    let wrap = RECORDS_PER_SECTOR * 8;
    // The appends to cut: the first, ones around a sector boundary, and
    // ones around the first wrap (the oldest sector is erased).
    let interesting: std::vec::Vec<u32> = (0..3)
        .chain(RECORDS_PER_SECTOR - 3..RECORDS_PER_SECTOR + 3)
        .chain(wrap - 4..wrap + 6)
        .collect();
    let mut cuts = 0;
    for n in 0..=*interesting.last().unwrap() {
        if interesting.contains(&n) {
            let before = numbers(&all(&store, &mut flash));
            // The reference: the same append, not cut.
            let mut reference = SimFlash::from_bytes(flash.data().to_vec());
            let mut rstore = store.clone();
            let ops0 = reference.stats().mutating_ops();
            block_on(rstore.append(&mut reference, n, LogLevel::Info, &msg(n))).unwrap();
            let ops = reference.stats().mutating_ops() - ops0;
            let kept: std::vec::Vec<u32> = numbers(&all(&rstore, &mut reference))
                .into_iter()
                .filter(|&m| m != n)
                .collect();
            // A cut as each operation starts, and torn operations: a few
            // byte budgets inside the append.
            let plans = (0..ops)
                .map(Cut::Ops)
                .chain([1u64, 3, 5, 100, 2000, 4095].map(Cut::Bytes));
            for plan in plans {
                let mut cut = SimFlash::from_bytes(flash.data().to_vec());
                let mut cstore = store.clone();
                match plan {
                    Cut::Ops(k) => cut.cut_power_after_ops(k),
                    Cut::Bytes(b) => cut.cut_power_after_bytes(b),
                }
                let _ = block_on(cstore.append(&mut cut, n, LogLevel::Info, &msg(n)));
                cut.power_on();
                let mut reopened = block_on(LogStore::open(&mut cut, RING)).unwrap();
                let after = numbers(&all(&reopened, &mut cut));
                for m in &kept {
                    assert!(after.contains(m), "append {n}: record {m} lost: {after:?}");
                }
                for m in &after {
                    assert!(
                        *m == n || before.contains(m),
                        "append {n}: {m} from nowhere"
                    );
                }
                // The log goes on.
                let next = block_on(reopened.append(&mut cut, 0, LogLevel::Info, "after the cut"))
                    .unwrap();
                assert!(numbers(&all(&reopened, &mut cut)).contains(&next));
                cuts += 1;
            }
        }
        block_on(store.append(&mut flash, n, LogLevel::Info, &msg(n))).unwrap();
    }
    assert!(cuts > 100, "{cuts} cuts");
}

fn device_flash(csv: &str) -> SimFlash {
    let mut flash = SimFlash::new(4 * 1024 * 1024);
    let table = PartitionTable::from_csv(csv).unwrap();
    flash.write_flash(TABLE_OFFSET, &table.to_bytes()).unwrap();
    flash
}

#[test]
fn a_flood_of_log_calls_stays_within_the_erase_budget() {
    let mut flash = device_flash(DEFAULT_4MB_CSV);
    let mut log = block_on(FieldLog::open(&mut flash, BootReason::PowerOn, 0));
    assert!(log.is_on());
    let erases0 = flash.stats().sector_erases + flash.stats().block_erases;
    // Two hours of a loop that logs as fast as it can, 100 lines per 100 ms.
    let mut now = 0u64;
    while now <= 2 * 3_600_000 {
        for i in 0..100 {
            log.note(
                now,
                LogLevel::Debug,
                &format!("busy loop line {i} {}", "y".repeat(60)),
            );
        }
        block_on(log.flush(&mut flash, now));
        now += 100;
    }
    let erases = flash.stats().sector_erases + flash.stats().block_erases - erases0;
    println!("flood: {erases} erases in two hours (budget {MAX_ERASES_PER_HOUR} an hour)");
    assert!(
        erases <= 2 * MAX_ERASES_PER_HOUR as u64,
        "{erases} erases in two hours, budget {MAX_ERASES_PER_HOUR} an hour"
    );
    // The log says it dropped records, and it is still readable.
    let newest = log.newest().unwrap();
    assert!(newest > 100, "{newest}");
    let topics = Topics::new("device", "d1").unwrap();
    let mut chunks = std::vec::Vec::new();
    block_on(log.answer(
        &mut flash,
        &topics,
        &LogsGet::parse(br#"{"max":512}"#),
        0,
        async |json: &[u8]| chunks.push(serde_json::from_slice::<serde_json::Value>(json).unwrap()),
    ));
    let text = serde_json::to_string(&chunks).unwrap();
    assert!(text.contains("records dropped"), "{} chunks", chunks.len());
}

#[test]
fn a_missing_or_garbled_log_partition_never_stops_the_device() {
    // No log partition: the log is off, and nothing fails.
    let old = "nvs,data,nvs,0x9000,0x4000,\notadata,data,ota,0xd000,0x2000,\nota_0,app,ota_0,0x10000,0x1e0000,\nota_1,app,ota_1,0x1f0000,0x1e0000,\n";
    let mut flash = device_flash(old);
    let mut log = block_on(FieldLog::open(&mut flash, BootReason::Watchdog, 0));
    assert!(!log.is_on());
    log.note(0, LogLevel::Info, "nowhere to go");
    block_on(log.flush(&mut flash, 0));
    let topics = Topics::new("device", "d1").unwrap();
    let mut chunks = std::vec::Vec::new();
    block_on(log.answer(
        &mut flash,
        &topics,
        &LogsGet::default(),
        0,
        async |json: &[u8]| chunks.push(serde_json::from_slice::<serde_json::Value>(json).unwrap()),
    ));
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0]["last"], true);
    assert_eq!(chunks[0]["records"], serde_json::json!([]));

    // Garbage in the partition: erased once, then the log works.
    let mut flash = device_flash(DEFAULT_4MB_CSV);
    let table = PartitionTable::from_csv(DEFAULT_4MB_CSV).unwrap();
    let p = *table.find("log").unwrap();
    let mut x = 0x1234_5678u32;
    for b in &mut flash.raw_mut()[p.offset as usize..(p.offset + p.size) as usize] {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    let mut log = block_on(FieldLog::open(&mut flash, BootReason::Panic, 0));
    assert!(log.is_on());
    log.note(5, LogLevel::Error, "after the garbage");
    block_on(log.flush(&mut flash, 5));
    assert_eq!(log.newest(), Some(0));
}

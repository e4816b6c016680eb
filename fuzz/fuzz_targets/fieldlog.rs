//! The field log (`mqota_runtime::fieldlog::LogStore`, a `sequential-storage`
//! queue) on the NOR model, driven by a random sequence of appends of random
//! lengths, reboots, and appends cut by a power loss at a random flash
//! operation or in the middle of one (a byte budget), against a model of what
//! must be readable.
//!
//! After every step:
//! - the records read are exactly the committed ones (appends that returned
//!   `Ok`) from some number on: contiguous, oldest first, each byte for byte
//!   as written, the newest committed one last; a record whose append was
//!   cut is either whole or absent, and once read it counts as committed;
//! - the ring drops whole sectors only: it keeps at least `RING_SECTORS - 2`
//!   sectors' worth of the largest records (or everything, when less was
//!   written);
//! - a reopened log (a boot) numbers its boot one past the newest record's
//!   and goes on numbering records after it.
#![no_main]

use std::ops::Range;

use arbitrary::Unstructured;
use embassy_futures::block_on;
use libfuzzer_sys::fuzz_target;
use mqota_core::protocol::{LogLevel, LogRecord, LogsGet, MAX_LOG_MSG};
use mqota_flash_sim::SimFlash;
use mqota_runtime::fieldlog::{LogStore, RECORDS_PER_SECTOR, SECTOR};

/// A small ring, so that runs wrap it often.
const RING_SECTORS: u32 = 4;
const RING: Range<u32> = 0..RING_SECTORS * SECTOR;

/// Every record of the ring, oldest first.
fn all(store: &LogStore, flash: &mut SimFlash) -> Vec<LogRecord> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let mut got: heapless::Vec<LogRecord, 64> = heapless::Vec::new();
        let more = block_on(store.read(flash, &LogsGet::default(), from, &mut got))
            .expect("a log that opened can be read");
        for r in &got {
            from = r.n + 1;
        }
        out.extend(got);
        if !more {
            return out;
        }
    }
}

fn message(u: &mut Unstructured<'_>, n: u32) -> String {
    let len = u.int_in_range(0..=MAX_LOG_MSG + 8).unwrap_or(0);
    // Text, with a marker of its record so a misplaced one shows.
    let mut m = format!("{n}:");
    while m.len() < len {
        m.push((b'a' + (m.len() % 26) as u8) as char);
    }
    m
}

/// What the model knows.
struct Model {
    /// Every committed record, in order (the ring may have dropped the
    /// oldest ones).
    committed: Vec<LogRecord>,
}

impl Model {
    fn check(&mut self, store: &LogStore, flash: &mut SimFlash, cut: Option<&LogRecord>) {
        let read = all(store, flash);
        // A cut record that made it whole is committed from now on.
        if let (Some(c), Some(last)) = (cut, read.last()) {
            if last.n == c.n && self.committed.last().is_none_or(|l| l.n != c.n) {
                assert_eq!(last, c, "a cut record was read torn");
                self.committed.push(c.clone());
            }
        }
        let Some(newest) = self.committed.last() else {
            assert!(read.is_empty(), "records from nowhere: {read:?}");
            assert_eq!(store.newest(), None);
            return;
        };
        let last = read.last().expect("the newest committed record was lost");
        assert_eq!(last.n, newest.n, "the newest committed record was lost");
        assert_eq!(store.newest(), Some(newest.n));
        for w in read.windows(2) {
            assert_eq!(
                w[1].n,
                w[0].n + 1,
                "a gap in the ring: {:?}",
                (w[0].n, w[1].n)
            );
        }
        let first = read[0].n;
        let expected: Vec<&LogRecord> = self.committed.iter().filter(|r| r.n >= first).collect();
        assert_eq!(read.len(), expected.len(), "records lost or added");
        for (r, e) in read.iter().zip(expected) {
            assert_eq!(r, e, "a record changed");
        }
        let floor = ((RING_SECTORS - 2) * RECORDS_PER_SECTOR) as usize;
        assert!(
            read.len() >= floor.min(self.committed.len()),
            "only {} of {} records kept",
            read.len(),
            self.committed.len()
        );
    }
}

fn append(
    store: &mut LogStore,
    flash: &mut SimFlash,
    u: &mut Unstructured<'_>,
    ms: u32,
) -> (Result<u32, mqota_runtime::fieldlog::LogError>, LogRecord) {
    let n = store.newest().map_or(0, |n| n + 1);
    let level = [
        LogLevel::Error,
        LogLevel::Warn,
        LogLevel::Info,
        LogLevel::Debug,
    ][u.int_in_range(0..=3).unwrap_or(0)];
    let msg = message(u, n);
    let record = LogRecord {
        n,
        boot: store.boot(),
        ms,
        level,
        msg: mqota_core::protocol::truncated(&msg),
    };
    (block_on(store.append(flash, ms, level, &msg)), record)
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let mut flash = SimFlash::new(RING.end as usize);
    let mut store =
        block_on(LogStore::open(&mut flash, RING.clone())).expect("an erased ring opens");
    assert_eq!((store.boot(), store.newest()), (1, None));
    let mut model = Model {
        committed: Vec::new(),
    };
    let mut ms = 0u32;
    for _ in 0..200 {
        if u.is_empty() {
            break;
        }
        ms = ms.wrapping_add(u.int_in_range(0..=1000).unwrap_or(0));
        match u.int_in_range(0..=9u8).unwrap_or(0) {
            // Most steps append and must succeed.
            0..=6 => {
                let (got, record) = append(&mut store, &mut flash, &mut u, ms);
                assert_eq!(got.expect("an append with power on succeeds"), record.n);
                model.committed.push(record);
                model.check(&store, &mut flash, None);
            }
            // A reboot.
            7 => {
                store =
                    block_on(LogStore::open(&mut flash, RING.clone())).expect("the log reopens");
                let boot = model.committed.last().map_or(1, |r| r.boot + 1);
                assert_eq!(store.boot(), boot, "the boot number");
                model.check(&store, &mut flash, None);
            }
            // An append cut by a power loss, then a boot.
            _ => {
                if u.arbitrary::<bool>().unwrap_or(false) {
                    flash.cut_power_after_ops(u.int_in_range(0..=12).unwrap_or(0));
                } else {
                    flash.cut_power_after_bytes(u.int_in_range(0..=2 * SECTOR as u64).unwrap_or(0));
                }
                let (got, record) = append(&mut store, &mut flash, &mut u, ms);
                let finished = got.is_ok() && flash.is_powered();
                flash.disarm();
                flash.power_on();
                if finished {
                    model.committed.push(record.clone());
                }
                store = block_on(LogStore::open(&mut flash, RING.clone()))
                    .expect("the log reopens after a power cut");
                model.check(&store, &mut flash, Some(&record));
                let boot = model.committed.last().map_or(1, |r| r.boot + 1);
                assert_eq!(store.boot(), boot, "the boot number after a cut");
            }
        }
    }
});

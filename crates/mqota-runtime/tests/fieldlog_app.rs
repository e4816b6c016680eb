//! The application's `mqota_runtime::log` reaches the field log through the
//! device loop's flush (its own test binary: the queue is one per program).

// The clock of the runtime's timers on the host.
use mqota_host_time as _;

use embassy_futures::block_on;
use mqota_core::partition::{PartitionTable, DEFAULT_4MB_CSV, TABLE_OFFSET};
use mqota_core::protocol::{LogLevel, LogsGet, Topics};
use mqota_flash_sim::SimFlash;
use mqota_runtime::{BootReason, FieldLog};

#[test]
fn what_the_application_logs_reaches_flash() {
    let mut flash = SimFlash::new(4 * 1024 * 1024);
    let table = PartitionTable::from_csv(DEFAULT_4MB_CSV).unwrap();
    flash.write_flash(TABLE_OFFSET, &table.to_bytes()).unwrap();
    let mut log = block_on(FieldLog::open(&mut flash, BootReason::PowerOn, 0));
    mqota_runtime::log(LogLevel::Warn, "sensor 3 did not answer");
    block_on(log.flush(&mut flash, 0));
    assert_eq!(log.newest(), Some(0));
    let topics = Topics::new("device", "d1").unwrap();
    let mut got = Vec::new();
    block_on(log.answer(
        &mut flash,
        &topics,
        &LogsGet::default(),
        0,
        async |j: &[u8]| got.push(String::from_utf8(j.to_vec()).unwrap()),
    ));
    assert_eq!(got.len(), 1);
    assert!(
        got[0].contains(r#""level":"warn","msg":"sensor 3 did not answer""#),
        "{}",
        got[0]
    );
}

//! Arbitrary bytes as a binary partition table and as CSV: whatever parses must
//! survive writing and parsing again, both ways, unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqota_core::partition::PartitionTable;

fuzz_target!(|data: &[u8]| {
    if let Ok(table) = PartitionTable::from_bytes(data) {
        round_trips(&table);
    }
    if let Ok(text) = core::str::from_utf8(data) {
        if let Ok(table) = PartitionTable::from_csv(text) {
            round_trips(&table);
        }
    }
});

fn round_trips(table: &PartitionTable) {
    let bin = table.to_bytes();
    assert_eq!(PartitionTable::from_bytes(&bin).as_ref(), Ok(table));

    let mut csv = String::new();
    table.write_csv(&mut csv).unwrap();
    assert_eq!(PartitionTable::from_csv(&csv).as_ref(), Ok(table), "{csv}");

    assert_eq!(PartitionTable::new(table.partitions()).as_ref(), Ok(table));
}

//! What the device keeps about trust between boots: the highest sequence
//! number of a signed command it accepted, and the `secure_version` floor
//! below which it runs no image.
//!
//! Both live in the `mqota` data partition (8 KiB, two sectors) as items of
//! a `sequential-storage` map, for the reasons the field log uses that crate
//! (see [`crate::fieldlog`]): a value is written as a new item with its own
//! CRC, the old one stays readable until the new one is complete, and a cut
//! erase is repaired on the next access. So a power cut during a write
//! leaves either the old value or the new one, never less than the old.
//!
//! The order the callers keep: a sequence number is stored *before* the
//! command acts ([`TrustState::accept_seq`]); the floor is raised only
//! *after* an image is confirmed ([`TrustState::raise_floor`]), at every boot
//! of a confirmed image, so a cut between confirming and raising is repaired
//! on the next boot.
//!
//! A table without the partition (an older device) keeps both in RAM only:
//! replay protection then lasts until the next reboot, and the device says
//! so once on its console and in its field log. A partition the map cannot
//! read is erased and started afresh (flash corruption, not something a
//! remote attacker can cause).

use core::ops::Range;

use embedded_storage::nor_flash::NorFlash;
use mqota_core::partition::{PartitionTable, TABLE_OFFSET};
use sequential_storage::cache::Cache;
use sequential_storage::map::{MapConfig, MapStorage};

use crate::fieldlog::BlockingAsync;

/// The label of the partition that holds the state.
pub const STATE_PARTITION: &str = "mqota";

const KEY_SEQ: u8 = 1;
const KEY_FLOOR: u8 = 2;

/// The device's trust state, read at boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustState {
    range: Option<Range<u32>>,
    seq: Option<u64>,
    floor: u32,
}

/// The state could not be written: the command must not act, the floor
/// stays where it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateWriteError;

impl TrustState {
    /// Reads the state from the `mqota` partition of the table at
    /// [`TABLE_OFFSET`]; without one, starts in RAM (no sequence number,
    /// floor 0).
    pub async fn open<F: NorFlash>(flash: &mut F) -> Self {
        let range = PartitionTable::read_from(flash, TABLE_OFFSET)
            .ok()
            .and_then(|t| t.find(STATE_PARTITION).map(|p| p.offset..p.offset + p.size));
        let Some(range) = range else {
            warn!("no `mqota` partition: sequence numbers and the secure_version floor are kept in RAM only");
            return Self {
                range: None,
                seq: None,
                floor: 0,
            };
        };
        Self::open_range(flash, range).await
    }

    /// A state kept in RAM only: no sequence number yet, floor 0.
    pub fn in_ram() -> Self {
        Self {
            range: None,
            seq: None,
            floor: 0,
        }
    }

    /// Reads the state kept in `range` (whole sectors, at least two).
    pub async fn open_range<F: NorFlash>(flash: &mut F, range: Range<u32>) -> Self {
        let mut state = Self {
            range: Some(range.clone()),
            seq: None,
            floor: 0,
        };
        match read(flash, range.clone()).await {
            Ok((seq, floor)) => {
                state.seq = seq;
                state.floor = floor;
            }
            Err(()) => {
                warn!("`mqota` partition unreadable: erasing it");
                if erase(flash, range).await.is_err() {
                    state.range = None;
                }
            }
        }
        state
    }

    /// Whether the state survives a reboot.
    pub fn persistent(&self) -> bool {
        self.range.is_some()
    }

    /// The highest sequence number accepted, if any.
    pub fn seq(&self) -> Option<u64> {
        self.seq
    }

    /// The lowest `secure_version` the device may run.
    pub fn floor(&self) -> u32 {
        self.floor
    }

    /// Whether `seq` is above every sequence number accepted so far.
    pub fn is_fresh(&self, seq: u64) -> bool {
        self.seq.is_none_or(|last| seq > last)
    }

    /// Records `seq` as accepted; call before the command acts. Refuses a
    /// number that is not fresh.
    pub async fn accept_seq<F: NorFlash>(
        &mut self,
        flash: &mut F,
        seq: u64,
    ) -> Result<(), StateWriteError> {
        if !self.is_fresh(seq) {
            return Err(StateWriteError);
        }
        if let Some(range) = self.range.clone() {
            store(flash, range, KEY_SEQ, Value::Seq(seq))
                .await
                .map_err(|_| StateWriteError)?;
        }
        self.seq = Some(seq);
        Ok(())
    }

    /// Raises the floor to `secure_version` if it is higher; call only for
    /// the image that runs confirmed.
    pub async fn raise_floor<F: NorFlash>(
        &mut self,
        flash: &mut F,
        secure_version: u32,
    ) -> Result<(), StateWriteError> {
        if secure_version <= self.floor {
            return Ok(());
        }
        if let Some(range) = self.range.clone() {
            store(flash, range, KEY_FLOOR, Value::Floor(secure_version))
                .await
                .map_err(|_| StateWriteError)?;
        }
        self.floor = secure_version;
        Ok(())
    }
}

enum Value {
    Seq(u64),
    Floor(u32),
}

async fn read<F: NorFlash>(flash: &mut F, range: Range<u32>) -> Result<(Option<u64>, u32), ()> {
    let config = MapConfig::try_new(range).map_err(|_| ())?;
    let mut map = MapStorage::<u8, _, _>::new(BlockingAsync(flash), config, Cache::new_uncached());
    let mut buf = [0u8; 32];
    let seq = map
        .fetch_item::<u64>(&mut buf, &KEY_SEQ)
        .await
        .map_err(|_| ())?;
    let floor = map
        .fetch_item::<u32>(&mut buf, &KEY_FLOOR)
        .await
        .map_err(|_| ())?;
    Ok((seq, floor.unwrap_or(0)))
}

async fn store<F: NorFlash>(
    flash: &mut F,
    range: Range<u32>,
    key: u8,
    value: Value,
) -> Result<(), ()> {
    let config = MapConfig::try_new(range).map_err(|_| ())?;
    let mut map = MapStorage::<u8, _, _>::new(BlockingAsync(flash), config, Cache::new_uncached());
    let mut buf = [0u8; 32];
    match value {
        Value::Seq(v) => map.store_item(&mut buf, &key, &v).await,
        Value::Floor(v) => map.store_item(&mut buf, &key, &v).await,
    }
    .map_err(|_| ())
}

async fn erase<F: NorFlash>(flash: &mut F, range: Range<u32>) -> Result<(), ()> {
    let config = MapConfig::try_new(range).map_err(|_| ())?;
    let mut map = MapStorage::<u8, _, _>::new(BlockingAsync(flash), config, Cache::new_uncached());
    map.erase_all().await.map_err(|_| ())
}

//! Where the NOR model keeps its bytes: sector by sector, copy-on-write over
//! a base image that many flashes can share.
//!
//! A thousand virtual devices each own a 4 MiB flash, but they hold the same
//! partition table and the same first image, and most of each flash stays
//! erased. So the contents are a base image (`None`: all erased, no memory at
//! all) shared through an [`Arc`], plus the sectors that differ from it:
//!
//! | sector in `overlay` | contents |
//! |---|---|
//! | absent | the base's bytes (or `0xFF` where there is no base) |
//! | [`Sector::Erased`] | `0xFF`: erased over a base that held data there |
//! | [`Sector::Owned`] | its own copy, made on the first change |
//!
//! A flash therefore costs what was written since it was made, 4 KiB per
//! sector touched, and an erase gives a sector's memory back. The NOR rules
//! themselves (bit clearing, alignment, power cuts) stay in
//! [`SimFlash`](crate::SimFlash); this module only stores bytes.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::nor::SECTOR_SIZE;

const SECTOR: usize = SECTOR_SIZE as usize;

/// What every erased sector reads as.
static ERASED: [u8; SECTOR] = [0xFF; SECTOR];

#[derive(Debug, Clone)]
enum Sector {
    Erased,
    Owned(Box<[u8]>),
}

/// The contents of one flash.
#[derive(Debug, Clone)]
pub(crate) struct Cells {
    len: usize,
    base: Option<Arc<[u8]>>,
    overlay: BTreeMap<usize, Sector>,
}

impl Cells {
    /// `len` erased bytes; nothing is allocated.
    pub(crate) fn erased(len: usize) -> Self {
        Cells {
            len,
            base: None,
            overlay: BTreeMap::new(),
        }
    }

    /// Starts as `base`, which is shared, never written.
    pub(crate) fn over(base: Arc<[u8]>) -> Self {
        Cells {
            len: base.len(),
            base: Some(base),
            overlay: BTreeMap::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Bytes held by this flash alone: its changed sectors.
    pub(crate) fn private_bytes(&self) -> usize {
        self.overlay
            .values()
            .map(|s| match s {
                Sector::Erased => 0,
                Sector::Owned(b) => b.len(),
            })
            .sum()
    }

    fn sector_len(&self, i: usize) -> usize {
        (self.len - i * SECTOR).min(SECTOR)
    }

    fn base_sector(&self, i: usize) -> &[u8] {
        let n = self.sector_len(i);
        match &self.base {
            Some(b) => &b[i * SECTOR..i * SECTOR + n],
            None => &ERASED[..n],
        }
    }

    /// Sector `i` as it reads now.
    fn sector(&self, i: usize) -> &[u8] {
        match self.overlay.get(&i) {
            None => self.base_sector(i),
            Some(Sector::Erased) => &ERASED[..self.sector_len(i)],
            Some(Sector::Owned(b)) => b,
        }
    }

    /// Sector `i`, made this flash's own first.
    fn sector_mut(&mut self, i: usize) -> &mut [u8] {
        if !matches!(self.overlay.get(&i), Some(Sector::Owned(_))) {
            let copy: Box<[u8]> = self.sector(i).into();
            self.overlay.insert(i, Sector::Owned(copy));
        }
        match self.overlay.get_mut(&i) {
            Some(Sector::Owned(b)) => b,
            _ => unreachable!("just made owned"),
        }
    }

    /// The pieces of `offset..offset + len`, one per sector touched:
    /// `(sector, start in it, length, start in the range)`. The caller has
    /// checked the range.
    fn pieces(offset: usize, len: usize) -> impl Iterator<Item = (usize, usize, usize, usize)> {
        let end = offset + len;
        let mut at = offset;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let (i, start) = (at / SECTOR, at % SECTOR);
            let n = (SECTOR - start).min(end - at);
            let piece = (i, start, n, at - offset);
            at += n;
            Some(piece)
        })
    }

    /// Copies `out.len()` bytes from `offset`.
    pub(crate) fn read(&self, offset: usize, out: &mut [u8]) {
        for (i, start, n, k) in Self::pieces(offset, out.len()) {
            out[k..k + n].copy_from_slice(&self.sector(i)[start..start + n]);
        }
    }

    /// The first byte of `bytes` that has a 1 where the flash at `offset`
    /// holds a 0 (programming it would need to set a bit).
    pub(crate) fn first_bit_to_set(&self, offset: usize, bytes: &[u8]) -> Option<usize> {
        Self::pieces(offset, bytes.len()).find_map(|(i, start, n, k)| {
            let old = &self.sector(i)[start..start + n];
            let new = &bytes[k..k + n];
            // The common answer (none) from a loop without an early exit,
            // which the compiler vectorizes; the position only when needed.
            if old.iter().zip(new).fold(0, |acc, (o, b)| acc | (b & !o)) == 0 {
                return None;
            }
            old.iter()
                .zip(new)
                .position(|(o, b)| b & !o != 0)
                .map(|p| k + p)
        })
    }

    /// Programs `bytes` at `offset`: each cell becomes `old & new`. A
    /// sector the program would not change stays shared.
    pub(crate) fn program(&mut self, offset: usize, bytes: &[u8]) {
        for (i, start, n, k) in Self::pieces(offset, bytes.len()) {
            let new = &bytes[k..k + n];
            let old = &self.sector(i)[start..start + n];
            // Would any cell change (a 1 cleared)? Vectorizable, as above.
            if old.iter().zip(new).fold(0, |acc, (o, b)| acc | (o & !b)) == 0 {
                continue;
            }
            let cells = &mut self.sector_mut(i)[start..start + n];
            for (cell, b) in cells.iter_mut().zip(new) {
                *cell &= b;
            }
        }
    }

    /// Sets `offset..offset + len` to `0xFF`. Whole sectors give their
    /// memory back; a part of one (a cut erase) is written into it.
    pub(crate) fn erase(&mut self, offset: usize, len: usize) {
        for (i, start, n, _) in Self::pieces(offset, len) {
            if start == 0 && n == self.sector_len(i) {
                if self.base_sector(i).iter().all(|&b| b == 0xFF) {
                    self.overlay.remove(&i);
                } else {
                    self.overlay.insert(i, Sector::Erased);
                }
            } else {
                self.sector_mut(i)[start..start + n].fill(0xFF);
            }
        }
    }

    /// Puts `bytes` at `offset` as they are, no NOR rule applied; sectors
    /// left unchanged are not copied.
    pub(crate) fn overwrite(&mut self, offset: usize, bytes: &[u8]) {
        for (i, start, n, k) in Self::pieces(offset, bytes.len()) {
            if self.sector(i)[start..start + n] != bytes[k..k + n] {
                self.sector_mut(i)[start..start + n].copy_from_slice(&bytes[k..k + n]);
            }
        }
    }

    /// Calls `f(offset, bytes)` for each sector-sized piece of the range as
    /// it reads now, in order.
    pub(crate) fn each_piece<E>(
        &self,
        offset: usize,
        len: usize,
        mut f: impl FnMut(usize, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        for (i, start, n, k) in Self::pieces(offset, len) {
            f(offset + k, &self.sector(i)[start..start + n])?;
        }
        Ok(())
    }

    /// The whole contents: the shared base itself while nothing changed.
    pub(crate) fn contents(&self) -> Cow<'_, [u8]> {
        match &self.base {
            Some(b) if self.overlay.is_empty() => Cow::Borrowed(b),
            _ => {
                let mut all = vec![0; self.len];
                self.read(0, &mut all);
                Cow::Owned(all)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_erased_flash_holds_nothing_and_reads_ff() {
        let c = Cells::erased(4 * SECTOR + 16);
        let mut out = vec![0; 4 * SECTOR + 16];
        c.read(0, &mut out);
        assert!(out.iter().all(|&b| b == 0xFF));
        assert_eq!(c.private_bytes(), 0);
    }

    #[test]
    fn a_program_copies_only_the_sector_it_changes() {
        let base: Arc<[u8]> = (0..3 * SECTOR).map(|i| i as u8 | 0x80).collect();
        let mut a = Cells::over(base.clone());
        let b = Cells::over(base.clone());
        a.program(SECTOR + 8, &[0x00; 4]);
        assert_eq!(a.private_bytes(), SECTOR);
        // A program that clears nothing leaves the sector shared.
        a.program(2 * SECTOR, &base[2 * SECTOR..2 * SECTOR + 4]);
        assert_eq!(a.private_bytes(), SECTOR);
        let mut got = [0; 6];
        a.read(SECTOR + 6, &mut got);
        assert_eq!(got, [base[SECTOR + 6], base[SECTOR + 7], 0, 0, 0, 0]);
        // The other flash and the base are untouched.
        b.read(SECTOR + 6, &mut got);
        assert_eq!(&got[..], &base[SECTOR + 6..SECTOR + 12]);
        assert_eq!(b.private_bytes(), 0);
    }

    #[test]
    fn an_erase_gives_memory_back_and_hides_the_base() {
        let base: Arc<[u8]> = vec![0x5A; 2 * SECTOR].into();
        let mut c = Cells::over(base);
        c.program(0, &[0; 4]);
        c.erase(0, 2 * SECTOR);
        assert_eq!(c.private_bytes(), 0);
        assert!(c.contents().iter().all(|&b| b == 0xFF));
        // Over an erased base, an erased sector is no entry at all.
        let mut e = Cells::erased(2 * SECTOR);
        e.program(SECTOR, &[0; 4]);
        e.erase(SECTOR, SECTOR);
        assert!(e.overlay.is_empty());
    }

    #[test]
    fn a_part_erase_keeps_the_rest_of_the_sector() {
        let mut c = Cells::over(vec![0x11; SECTOR].into());
        c.erase(0, 100);
        let all = c.contents();
        assert!(all[..100].iter().all(|&b| b == 0xFF));
        assert!(all[100..].iter().all(|&b| b == 0x11));
    }
}

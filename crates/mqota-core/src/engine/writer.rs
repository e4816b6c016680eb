//! The slot writer: body bytes into a 4 KiB page buffer, each full page
//! validated, the flash ahead of it erased (64 KiB blocks where aligned), the
//! page programmed and marked in the slot's journal, which makes it the resume
//! point. The embassy-boot-like part of the engine.
use super::{check_descriptor, fail, image_fail, Actions, Engine, Fail, Fetch, Millis};
use crate::journal::PAGE_SIZE;
use crate::protocol::ErrorCode;
use embedded_storage::nor_flash::MultiwriteNorFlash;

pub use crate::layout::BLOCK_SIZE;

impl Engine {
    pub(super) fn received(&self) -> u32 {
        self.dl.as_ref().map_or(0, |d| d.written + self.fill as u32)
    }

    pub(super) fn on_body<F: MultiwriteNorFlash>(
        &mut self,
        flash: &mut F,
        now: Millis,
        mut data: &[u8],
        actions: &mut Actions,
    ) -> Result<(), Fail> {
        let received = self.received();
        let Some(dl) = self.dl.as_mut() else {
            return Ok(());
        };
        if dl.fetch != Fetch::Body {
            return Ok(());
        }
        dl.last_data = now;
        let limit = dl.total.unwrap_or(dl.slot.max_image_len());
        if received as u64 + data.len() as u64 > limit as u64 {
            return Err(if dl.total.is_some() {
                fail(
                    ErrorCode::SizeMismatch,
                    "server sent more than the announced size",
                )
            } else {
                fail(ErrorCode::TooLarge, "image exceeds the OTA slot")
            });
        }
        while !data.is_empty() {
            let n = data.len().min(self.page.len() - self.fill);
            self.page[self.fill..self.fill + n].copy_from_slice(&data[..n]);
            self.fill += n;
            data = &data[n..];
            if self.fill == self.page.len() {
                self.flush_page(flash)?;
            }
        }
        self.maybe_progress(now, actions);
        Ok(())
    }

    /// Validates, erases ahead, programs and journals the buffered page.
    pub(super) fn flush_page<F: MultiwriteNorFlash>(&mut self, flash: &mut F) -> Result<(), Fail> {
        let dl = self.dl.as_mut().expect("flush without download");
        let data = &self.page[..self.fill];
        dl.validator.feed(data).map_err(image_fail)?;
        // The descriptor sits in the first page: the policy is asked before
        // anything of the old image is erased.
        if !dl.descriptor_checked {
            if let Some(desc) = dl.validator.app_descriptor() {
                check_descriptor(&self.cfg, desc, dl.allow_downgrade, dl.allow_other_project)
                    .map_err(|(code, why)| fail(code, why))?;
                dl.descriptor_checked = true;
            }
        }
        let need = dl.written + PAGE_SIZE;
        let erase_end = match dl.total {
            Some(t) => round_up(t, PAGE_SIZE),
            None => dl.slot.max_image_len(),
        };
        while dl.erased_to < need {
            let from = dl.erased_to;
            let to = if from.is_multiple_of(BLOCK_SIZE) && from + BLOCK_SIZE <= erase_end {
                from + BLOCK_SIZE
            } else {
                from + PAGE_SIZE
            };
            flash
                .erase(dl.slot.offset + from, dl.slot.offset + to)
                .map_err(|_| fail(ErrorCode::Flash, "erase failed"))?;
            dl.erased_to = to;
        }
        if !dl.journal_started {
            // Only now, with the header accepted and the old image's first
            // block already erased (so it can never boot or be rolled back to),
            // does the journal switch to this job. A cut in between leaves an
            // unbootable slot whose journal still describes the old image.
            dl.slot
                .journal()
                .begin(flash, &dl.record)
                .map_err(|_| fail(ErrorCode::Flash, "journal write failed"))?;
            dl.journal_started = true;
        }
        // Program whole write units; the padding is 0xFF, which NOR leaves as it is.
        let len = round_up(self.fill as u32, F::WRITE_SIZE as u32) as usize;
        self.page[self.fill..len].fill(0xFF);
        flash
            .write(dl.slot.offset + dl.written, &self.page[..len])
            .map_err(|_| fail(ErrorCode::Flash, "write failed"))?;
        dl.slot
            .journal()
            .mark_page(flash, dl.written / PAGE_SIZE)
            .map_err(|_| fail(ErrorCode::Flash, "journal write failed"))?;
        dl.written += self.fill as u32;
        self.fill = 0;
        self.page.fill(0xFF);
        Ok(())
    }
}

fn round_up(v: u32, to: u32) -> u32 {
    v.div_ceil(to) * to
}

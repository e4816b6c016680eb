//! The end of a download: the image read back from flash and checked
//! (structure, chip, signature, digests), then activated (journal, otadata);
//! and the device's policy on an image's app descriptor, asked of its first
//! page before anything is erased.

use super::{fail, push, Action, Actions, Engine, EngineConfig, Fail};
use crate::image::{self, AppDescriptor, ImageError, StreamValidator};
use crate::journal::Flag;
use crate::otadata::{self, OtaState};
use crate::protocol::{ErrorCode, Phase};
use crate::signature;
use core::fmt::Write as _;
use embedded_storage::nor_flash::MultiwriteNorFlash;
use heapless::String;

impl Engine {
    /// The body is complete and the last page written: verify the image
    /// from flash, then select its slot and ask for a reboot.
    pub(super) fn verify_and_activate<F: MultiwriteNorFlash>(
        &mut self,
        flash: &mut F,
        actions: &mut Actions,
    ) -> Result<(), Fail> {
        let dl = self.dl.as_mut().expect("verify without download");
        let validator = core::mem::replace(&mut dl.validator, StreamValidator::new(None, 0));
        // Structure and length only: the hash is checked once, from flash.
        validator.finish_unchecked().map_err(image_fail)?;
        // What counts is what is on flash, not what went past in RAM: read it
        // back, as esp_image_verify does before esp_ota_set_boot_partition.
        // Exactly the bytes downloaded: the image, then perhaps the 0xFF
        // padding and signature sector of a signed file.
        let info = image::validate_flash_file(flash, dl.slot.offset, dl.written, None)
            .map_err(image_fail)?;
        if info.chip != self.cfg.chip {
            return Err(fail(ErrorCode::WrongChip, "image is for another chip"));
        }
        // A device that requires signatures asks its signers first: whatever
        // else is wrong with a file no trusted key signed, the answer is
        // `bad_signature`.
        if self.cfg.trust.signed_only() {
            // The sector is read back from flash like the image, into the
            // page buffer, which is idle now that every page is written.
            let sector = match (info.signature_sector(), info.padded_sha256) {
                (Some(at), Some(_)) => {
                    flash
                        .read(dl.slot.offset + at, &mut self.page)
                        .map_err(|_| {
                            fail(ErrorCode::Flash, "flash read failed during verification")
                        })?;
                    Some(&self.page)
                }
                _ => None,
            };
            let digest = info.padded_sha256.unwrap_or_default();
            let checked = signature::check(&self.cfg.trust, self.cfg.chip, sector, &digest);
            self.page.fill(0xFF);
            if let Err(why) = checked {
                warn!("image refused: {}", why.reason());
                return Err(fail(ErrorCode::BadSignature, why.reason()));
            }
        }
        info.verify().map_err(image_fail)?;
        if dl
            .record
            .sha256
            .is_some_and(|want| want != info.file_sha256)
        {
            return Err(fail(
                ErrorCode::HashMismatch,
                "SHA-256 differs from the job's",
            ));
        }
        // Journal first, then otadata: a cut between the two leaves an
        // activated journal that the boot guard finishes activating.
        let journal = dl.slot.journal();
        journal
            .set(flash, Flag::Activated)
            .map_err(|_| fail(ErrorCode::Flash, "journal write failed"))?;
        otadata::set_boot_slot(
            flash,
            self.layout.otadata,
            dl.target,
            self.layout.slots.len(),
            OtaState::New,
        )
        .map_err(|_| fail(ErrorCode::Flash, "otadata write failed"))?;
        info!("image verified; slot {} selected, rebooting", dl.target);
        let ev = self.progress_event(Phase::Rebooting, None, "");
        self.dl = None;
        push(actions, Action::Publish(ev));
        push(actions, Action::Reboot);
        Ok(())
    }
}

/// The device's policy on an image, from its app descriptor (in the first
/// page, so it is asked before anything is erased): `secure_version` not
/// below `cfg.secure_floor` (no job can override that); the same project as
/// the running firmware unless `allow_other_project`; a version not older
/// than the running one ([`crate::version`] order) unless `allow_downgrade`.
/// Versions that are not of semver form are not ordered.
pub fn check_descriptor(
    cfg: &EngineConfig,
    desc: &AppDescriptor,
    allow_downgrade: bool,
    allow_other_project: bool,
) -> Result<(), (ErrorCode, &'static str)> {
    if desc.secure_version < cfg.secure_floor {
        return Err((
            ErrorCode::Downgrade,
            "image secure_version is below the device's floor",
        ));
    }
    if !allow_other_project
        && !cfg.running_project.is_empty()
        && desc.project_name != cfg.running_project
    {
        return Err((ErrorCode::WrongProject, "image belongs to another project"));
    }
    let older =
        crate::version::compare(&desc.version, &cfg.running_version).is_some_and(|o| o.is_lt());
    if older && !allow_downgrade {
        return Err((
            ErrorCode::Downgrade,
            "image version is older than the running one",
        ));
    }
    Ok(())
}

pub(super) fn image_fail(e: ImageError) -> Fail {
    match e {
        ImageError::WrongChip { .. } => fail(ErrorCode::WrongChip, "image is for another chip"),
        ImageError::TooLarge { .. } => fail(ErrorCode::TooLarge, "image exceeds the OTA slot"),
        // The image's own length is the declared size when the server
        // announced none: more data after it is an endless (or wrong) body.
        ImageError::TrailingData { .. } => fail(
            ErrorCode::SizeMismatch,
            "server sent data past the end of the image",
        ),
        ImageError::Flash(_) => fail(ErrorCode::Flash, "flash read failed during verification"),
        _ => {
            let mut why = String::new();
            // A message cut short is still the right message.
            let _ = write!(why, "{e}");
            Fail(ErrorCode::BadImage, why)
        }
    }
}

//! The boot guard: after a reboot into a new image, the image is on trial. It
//! is confirmed only when its health check passes; otherwise, or if a trial
//! boot dies, the device goes back to the image before it.
//!
//! [`on_boot`] runs as early as possible at every boot, before the network.
//! It reads otadata and the [journals](crate::journal) and returns a [`Boot`]:
//! what the running firmware is ([`Verdict`]), an outcome to publish once the
//! broker is reached, and the `last` result for the retained status.
//!
//! # Rules
//!
//! Let *r* be the running slot and *E* the active otadata entry.
//!
//! 1. *E* selects *r*, its state is `NEW` or `PENDING_VERIFY`, and *r*'s
//!    journal holds a job: the image is mqota's and unconfirmed.
//!    - journal `confirmed`: a confirmation was cut short; finish it.
//!    - journal `trial_started` (or `rolled_back`): an earlier trial boot of
//!      this image died before it was judged (crash, hang and watchdog, power
//!      loss): roll back with `boot_failed`.
//!    - otherwise: this is the first trial boot. Set `trial_started` and run
//!      the trial: [`Verdict::Trial`].
//! 2. Otherwise the running image is confirmed (or predates mqota). The
//!    journal of the update slot tells what became of the last job:
//!    - `activated`, not `confirmed`, and otadata once selected it: its trial
//!      failed, by the guard's hand or the rollback bootloader's (which turns
//!      a `PENDING_VERIFY` found at boot into `ABORTED`). Report
//!      `rolled_back` with the recorded reason, `boot_failed` if none.
//!    - `confirmed`, and otadata once selected it later than the running
//!      image: the confirmation was cut between the journal and otadata and
//!      the rollback bootloader aborted the entry. Finish the confirmation.
//!    - `activated` but otadata never selected it: power was cut between the
//!      journal write and the otadata write. Re-verify and finish activating.
//!    - neither `activated` nor `abandoned`: a download was cut short by a
//!      reboot: resume it ([`Boot::resume`]).
//!
//! # Working with both bootloaders
//!
//! The stock bootloader that espflash ships has no app rollback: it boots a
//! `NEW` entry again and again. The guard makes up for it with the
//! `trial_started` mark, which survives every reboot. The ESP-IDF bootloader
//! with `CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE` turns `NEW` into
//! `PENDING_VERIFY` on the first boot (the guard accepts either) and aborts a
//! `PENDING_VERIFY` it finds on the next (the guard then runs in the old
//! image and only reports). They never fight over otadata: the guard never
//! rewrites the active entry; it writes a new entry into the other sector,
//! the same single-sector update that `esp_ota_set_boot_partition` makes, so
//! the active entry stays the fallback while the write is in progress.

use crate::image;
use crate::journal::{Flag, Journal, RollbackReason};
use crate::layout::Layout;
use crate::otadata::{self, OtaState, Otadata, SEQ_BLANK};
use crate::protocol::{ErrorCode, JobId, LastResult, Phase};
use embedded_storage::nor_flash::NorFlash;

/// What the running firmware is, as far as updates go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Confirmed (or not installed by mqota): carry on.
    Normal,
    /// On trial: run the health check, then [`confirm`] or [`reject`].
    Trial,
    /// The guard changed what boots next: reboot now.
    Reboot,
}

/// An outcome to publish on the progress topic, once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The job the outcome belongs to.
    pub job: Option<JobId>,
    /// `done` or `rolled_back`.
    pub phase: Phase,
    /// Why, for `rolled_back`.
    pub error: Option<ErrorCode>,
    /// The journal to mark once published ([`mark_reported`]).
    pub journal: Journal,
}

/// What [`on_boot`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boot {
    /// What to do now.
    pub verdict: Verdict,
    /// The job of the image on trial.
    pub trial_job: Option<JobId>,
    /// An outcome not yet published.
    pub report: Option<Report>,
    /// The last job's result, for the retained status.
    pub last: Option<LastResult>,
    /// A download into the update slot was cut short by a reboot: resume it
    /// (`Engine::resume`).
    pub resume: bool,
    /// The otadata state of the running image.
    pub state: OtaState,
}

/// What went wrong in the guard: the flash failed, or otadata could not be
/// written. Report it; the device keeps running what it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GuardError {
    /// A flash read or write failed.
    Flash,
    /// There is no valid previous image to go back to.
    NoPreviousImage,
}

impl GuardError {
    /// The protocol's error code for this failure.
    pub fn code(self) -> ErrorCode {
        match self {
            GuardError::Flash => ErrorCode::Flash,
            GuardError::NoPreviousImage => ErrorCode::NoPreviousImage,
        }
    }
}

impl<E> From<otadata::OtadataError<E>> for GuardError {
    fn from(_: otadata::OtadataError<E>) -> Self {
        GuardError::Flash
    }
}

impl From<crate::journal::JournalError> for GuardError {
    fn from(_: crate::journal::JournalError) -> Self {
        GuardError::Flash
    }
}

fn reason_code(r: Option<RollbackReason>) -> Option<ErrorCode> {
    match r {
        Some(RollbackReason::HealthCheckFailed) => Some(ErrorCode::HealthCheckFailed),
        Some(RollbackReason::Requested) => None,
        Some(RollbackReason::BootFailed) | None => Some(ErrorCode::BootFailed),
    }
}

/// The running slot's active entry, if the active entry selects it.
fn running_entry(ota: &Otadata, layout: &Layout) -> Option<otadata::OtaSelectEntry> {
    let e = *ota.active_entry()?;
    (e.slot(layout.slots.len()) == Some(layout.running)).then_some(e)
}

/// Runs at every boot, before anything else that could fail. See the
/// [module docs](self) for the rules.
pub fn on_boot<F: NorFlash>(flash: &mut F, layout: &Layout) -> Result<Boot, GuardError> {
    let ota = Otadata::read(flash, layout.otadata)?;
    let own = layout.slots[layout.running].journal();
    let entry = running_entry(&ota, layout);
    let state = entry.map_or(OtaState::Undefined, |e| e.state());
    let mut boot = Boot {
        verdict: Verdict::Normal,
        trial_job: None,
        report: None,
        last: None,
        resume: false,
        state,
    };
    let own_job = own.job(flash)?;

    if let (Some(job), OtaState::New | OtaState::PendingVerify) = (&own_job, state) {
        if own.has(flash, Flag::Confirmed)? {
            // Cut short between the journal's mark and otadata's: finish.
            otadata::set_boot_slot(
                flash,
                layout.otadata,
                layout.running,
                layout.slots.len(),
                OtaState::Valid,
            )?;
            boot.state = OtaState::Valid;
        } else if own.has(flash, Flag::TrialStarted)? || own.has(flash, Flag::RolledBack)? {
            let reason = own
                .rollback_reason(flash)?
                .unwrap_or(RollbackReason::BootFailed);
            warn!("an earlier trial boot died: rolling back");
            reject(flash, layout, reason)?;
            boot.verdict = Verdict::Reboot;
            return Ok(boot);
        } else {
            own.set(flash, Flag::TrialStarted)?;
            boot.verdict = Verdict::Trial;
            boot.trial_job = job.job.clone();
            return Ok(boot);
        }
    }

    if own_job.is_some()
        && entry.is_none()
        && !own.has(flash, Flag::Confirmed)?
        && (own.has(flash, Flag::TrialStarted)? || own.has(flash, Flag::RolledBack)?)
    {
        // No entry selects this unconfirmed image: the bootloader fell back
        // to it, e.g. because a rejection was cut after erasing the sector
        // of the previous entry and the rollback bootloader then aborted the
        // trial's. Finish the rejection if there is anything to go back to.
        let reason = own
            .rollback_reason(flash)?
            .unwrap_or(RollbackReason::BootFailed);
        match reject(flash, layout, reason) {
            Ok(()) => {
                boot.verdict = Verdict::Reboot;
                return Ok(boot);
            }
            Err(GuardError::NoPreviousImage) => {}
            Err(e) => return Err(e),
        }
    }

    if let Some(job) = &own_job {
        if own.has(flash, Flag::Confirmed)? {
            boot.last = Some(LastResult {
                job: job.job.clone(),
                result: Phase::Done,
                error: None,
            });
            if !own.has(flash, Flag::Reported)? {
                boot.report = Some(Report {
                    job: job.job.clone(),
                    phase: Phase::Done,
                    error: None,
                    journal: own,
                });
            }
        }
    }

    let target = layout.target();
    let other = layout.slots[target].journal();
    let Some(job) = other.job(flash)? else {
        return Ok(boot);
    };
    let confirmed = other.has(flash, Flag::Confirmed)?;
    let rolled_back = other.rollback_reason(flash)?;
    if other.has(flash, Flag::Activated)? {
        let running_seq = entry.map_or(0, |e| e.seq);
        let selected_later = ota.entries.iter().any(|e| {
            e.seq != SEQ_BLANK
                && e.crc_ok()
                && e.slot(layout.slots.len()) == Some(target)
                && e.seq > running_seq
        });
        if confirmed && rolled_back.is_none() && selected_later {
            // The image passed its trial, but the confirmation was cut
            // between the journal and otadata, and the rollback bootloader
            // then aborted the entry still PENDING_VERIFY. The trial's verdict
            // stands: select the image again, valid this time.
            if select_if_sound(flash, layout, target, OtaState::Valid)? {
                info!("finished a confirmation the bootloader aborted");
                boot.verdict = Verdict::Reboot;
                return Ok(boot);
            }
        }
        if confirmed && rolled_back.is_none() {
            // The image before the running one: its story is told.
            return Ok(boot);
        }
        if !selected_later && rolled_back.is_none() && !confirmed {
            // Cut between the journal's `activated` and otadata: finish the
            // activation if the image is still sound.
            if select_if_sound(flash, layout, target, OtaState::New)? {
                info!("finished an interrupted activation");
                boot.verdict = Verdict::Reboot;
                return Ok(boot);
            }
        }
        let error = reason_code(rolled_back);
        boot.last = Some(LastResult {
            job: job.job.clone(),
            result: Phase::RolledBack,
            error,
        });
        if !other.has(flash, Flag::Reported)? && rolled_back != Some(RollbackReason::Requested) {
            boot.report = Some(Report {
                job: job.job.clone(),
                phase: Phase::RolledBack,
                error,
                journal: other,
            });
        }
    } else if other.has(flash, Flag::Abandoned)? {
        let error = other.abandon_error(flash)?;
        boot.last = Some(LastResult {
            job: job.job.clone(),
            result: if error == Some(ErrorCode::Cancelled) {
                Phase::Cancelled
            } else {
                Phase::Failed
            },
            error,
        });
    } else {
        boot.resume = true;
    }
    Ok(boot)
}

/// Selects `slot` for the next boot with `state`, if it holds a sound image.
/// Returns whether it did.
fn select_if_sound<F: NorFlash>(
    flash: &mut F,
    layout: &Layout,
    slot: usize,
    state: OtaState,
) -> Result<bool, GuardError> {
    let s = layout.slots[slot];
    if image::validate_flash(flash, s.offset, s.max_image_len()).is_err() {
        return Ok(false);
    }
    otadata::set_boot_slot(flash, layout.otadata, slot, layout.slots.len(), state)?;
    Ok(true)
}

/// The slot to go back to: the one the other otadata entry selects if it is
/// selectable, else `ota_0` (what boots from blank otadata), provided it holds
/// a sound image.
fn previous_slot<F: NorFlash>(flash: &mut F, layout: &Layout) -> Result<usize, GuardError> {
    let ota = Otadata::read(flash, layout.otadata)?;
    let n = layout.slots.len();
    let from_otadata = ota
        .entries
        .iter()
        .filter(|e| e.is_valid())
        .filter_map(|e| e.slot(n))
        .find(|&s| s != layout.running);
    let prev = match from_otadata {
        Some(s) => s,
        None if layout.running != 0 => 0,
        None => layout.target(),
    };
    let slot = layout.slots[prev];
    // An image whose own trial failed is no place to go back to.
    let journal = slot.journal();
    if journal.job(flash)?.is_some()
        && journal
            .rollback_reason(flash)?
            .is_some_and(|r| r != RollbackReason::Requested)
    {
        return Err(GuardError::NoPreviousImage);
    }
    // Nor is one that never passed it: a partial download, or a trial that
    // the rollback bootloader aborted (which leaves no rollback mark).
    if journal.job(flash)?.is_some() && !journal.has(flash, Flag::Confirmed)? {
        return Err(GuardError::NoPreviousImage);
    }
    image::validate_flash(flash, slot.offset, slot.max_image_len())
        .map_err(|_| GuardError::NoPreviousImage)?;
    Ok(prev)
}

/// What [`validate_and_rollback`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrialResult {
    /// The image is confirmed: publish the `done` report (then
    /// [`mark_reported`]).
    Confirmed(Report),
    /// The previous image is selected: reboot now; it reports `rolled_back`.
    RolledBack,
}

/// Seed API, kept as an alias of [`end_trial`].
pub fn validate_and_rollback<F: NorFlash>(
    flash: &mut F,
    layout: &Layout,
    healthy: bool,
) -> Result<TrialResult, GuardError> {
    end_trial(flash, layout, healthy)
}

/// Ends a trial with the health check's verdict: confirms the running image
/// if `healthy`, otherwise marks it rolled back (`health_check_failed`) and
/// selects the image before it.
pub fn end_trial<F: NorFlash>(
    flash: &mut F,
    layout: &Layout,
    healthy: bool,
) -> Result<TrialResult, GuardError> {
    if healthy {
        confirm(flash, layout).map(TrialResult::Confirmed)
    } else {
        reject(flash, layout, RollbackReason::HealthCheckFailed).map(|()| TrialResult::RolledBack)
    }
}

/// The trial passed: mark the image valid. Returns the `done` report to
/// publish (then [`mark_reported`]).
pub fn confirm<F: NorFlash>(flash: &mut F, layout: &Layout) -> Result<Report, GuardError> {
    let own = layout.slots[layout.running].journal();
    let job = own.job(flash)?.and_then(|j| j.job);
    // Journal first: if the otadata write is cut short, the next boot sees
    // `confirmed` and finishes it instead of judging the trial failed.
    own.set(flash, Flag::Confirmed)?;
    otadata::set_boot_slot(
        flash,
        layout.otadata,
        layout.running,
        layout.slots.len(),
        OtaState::Valid,
    )?;
    info!("image confirmed");
    Ok(Report {
        job,
        phase: Phase::Done,
        error: None,
        journal: own,
    })
}

/// The trial failed (or died): select the previous image. The caller reboots.
pub fn reject<F: NorFlash>(
    flash: &mut F,
    layout: &Layout,
    reason: RollbackReason,
) -> Result<(), GuardError> {
    let own = layout.slots[layout.running].journal();
    own.set_rolled_back(flash, reason)?;
    let prev = previous_slot(flash, layout)?;
    otadata::set_boot_slot(
        flash,
        layout.otadata,
        prev,
        layout.slots.len(),
        OtaState::Valid,
    )?;
    warn!("rolled back to slot {}", prev);
    Ok(())
}

/// An operator asked for the previous image: select it if it is sound. The
/// caller publishes and reboots.
pub fn rollback<F: NorFlash>(flash: &mut F, layout: &Layout) -> Result<(), GuardError> {
    let prev = previous_slot(flash, layout)?;
    let own = layout.slots[layout.running].journal();
    if own.job(flash)?.is_some() {
        own.set_rolled_back(flash, RollbackReason::Requested)?;
    }
    otadata::set_boot_slot(
        flash,
        layout.otadata,
        prev,
        layout.slots.len(),
        OtaState::Valid,
    )?;
    Ok(())
}

/// Records that `report` has been published, so it is not published again.
pub fn mark_reported<F: NorFlash>(flash: &mut F, report: &Report) -> Result<(), GuardError> {
    report.journal.set(flash, Flag::Reported)?;
    Ok(())
}

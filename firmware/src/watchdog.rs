//! Glues the RTC watchdog (RWDT) to the boot guard's trial deadline.
//!
//! A freshly updated firmware boots "on trial": it must prove itself (reach
//! the broker, report its version) before the deadline. If it hangs instead,
//! nothing would ever roll it back, so the trial is backed by the RWDT, whose
//! stage 0 resets the whole digital system, radio included. The next boot then
//! finds the trial unconfirmed and the boot guard rolls back.
//!
//! The RWDT rather than a timer group's MWDT: it keeps running across a CPU
//! lock-up and `esp_hal::init` leaves it free (it disables all watchdogs).

use esp_hal::{
    peripherals::RTC_TIMER,
    rtc_cntl::{Rtc, RwdtStage},
    time::Duration,
};

/// The RTC watchdog, armed only while a trial boot is undecided.
pub struct TrialWatchdog {
    rtc: Rtc<'static>,
}

impl TrialWatchdog {
    /// Takes the RTC timer; the watchdog starts disarmed.
    pub fn new(rtc_timer: RTC_TIMER<'static>) -> Self {
        Self {
            rtc: Rtc::new(rtc_timer),
        }
    }

    /// Starts (or restarts) the countdown: if [`disarm`](Self::disarm) does
    /// not come within `timeout`, the chip resets. Nothing feeds it: a trial
    /// that takes longer than its deadline is a failed trial.
    pub fn arm(&mut self, timeout: Duration) {
        self.rtc.rwdt.set_timeout(RwdtStage::Stage0, timeout);
        self.rtc.rwdt.enable();
        self.rtc.rwdt.feed();
    }

    /// Stops the countdown once the boot guard has confirmed the image.
    pub fn disarm(&mut self) {
        self.rtc.rwdt.disable();
    }
}

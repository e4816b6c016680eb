//! Retry pacing: exponential backoff with jitter, in milliseconds.
//!
//! One policy for every retry on the device: the runtime paces its broker
//! reconnects with it, and the update [engine](crate::engine) paces the
//! retries of a failed download with it, so a fleet that lost its broker or
//! its firmware server at the same moment does not come back in lockstep.
//!
//! The type is pure: it never reads a clock or a random source itself. The
//! caller hands in one random `u32` per attempt (from the chip's RNG or a
//! [`XorShift32`] seeded per device, from a fixed seed in tests), so every
//! sequence of delays is reproducible.
//!
//! Two jitter strategies, after the AWS architecture blog's analysis of
//! backoff under contention:
//!
//! | strategy        | delay of attempt n                                      |
//! |-----------------|---------------------------------------------------------|
//! | [`Jitter::Full`]         | uniform in `[0, min(max, base * 2^n)]`         |
//! | [`Jitter::Decorrelated`] | uniform in `[base, min(max, 3 * previous)]`    |
//!
//! Full jitter spreads a fleet that lost its broker at the same moment; the
//! decorrelated variant never retries faster than `base`.

use crate::engine::Millis;

/// How the random part of each delay is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Jitter {
    /// Uniform between zero and the exponential ceiling `min(max, base * 2^attempt)`.
    Full,
    /// Uniform between `base` and three times the previous delay, capped at `max`.
    Decorrelated,
}

/// Exponential backoff (factor 2) between `base` and `max`, with jitter.
///
/// Call [`Backoff::next_delay`] after each failed attempt and
/// [`Backoff::reset`] after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    base_ms: u64,
    max_ms: u64,
    jitter: Jitter,
    attempt: u32,
    previous_ms: u64,
}

impl Backoff {
    /// A backoff starting at `base_ms` and never waiting longer than
    /// `max_ms` milliseconds.
    ///
    /// A zero `base_ms` is raised to one millisecond and a `max_ms` below
    /// `base_ms` is raised to it, so the sequence always grows and stays
    /// bounded.
    pub fn new(base_ms: Millis, max_ms: Millis, jitter: Jitter) -> Self {
        let base_ms = base_ms.max(1);
        let max_ms = max_ms.max(base_ms);
        Self {
            base_ms,
            max_ms,
            jitter,
            attempt: 0,
            previous_ms: base_ms,
        }
    }

    /// Failed attempts since the last [`Backoff::reset`].
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// The ceiling in milliseconds the next delay is drawn under: for
    /// [`Jitter::Full`] `min(max, base * 2^attempts)`, for
    /// [`Jitter::Decorrelated`] `min(max, 3 * previous)`.
    pub fn ceiling(&self) -> Millis {
        match self.jitter {
            Jitter::Full => {
                // Shifts past 63 would overflow; by then the cap has long won.
                let shift = self.attempt.min(62);
                self.base_ms.saturating_mul(1u64 << shift).min(self.max_ms)
            }
            Jitter::Decorrelated => self.previous_ms.saturating_mul(3).min(self.max_ms),
        }
    }

    /// The lowest delay the next attempt can draw: zero for
    /// [`Jitter::Full`], `base` for [`Jitter::Decorrelated`].
    pub fn floor(&self) -> Millis {
        match self.jitter {
            Jitter::Full => 0,
            Jitter::Decorrelated => self.base_ms,
        }
    }

    /// The delay in milliseconds to wait before the next attempt; `random`
    /// is any uniformly distributed `u32` (one fresh value per call).
    pub fn next_delay(&mut self, random: u32) -> Millis {
        let ceiling = self.ceiling();
        let delay = match self.jitter {
            Jitter::Full => scale(random, 0, ceiling),
            Jitter::Decorrelated => scale(random, self.base_ms, ceiling),
        };
        self.attempt = self.attempt.saturating_add(1);
        self.previous_ms = delay.max(self.base_ms);
        delay
    }

    /// Forget the failures: the next delay starts from `base` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
        self.previous_ms = self.base_ms;
    }
}

/// Maps `random` uniformly onto `[low, high]` (inclusive) without division
/// bias worth caring about for delays.
fn scale(random: u32, low: u64, high: u64) -> u64 {
    if high <= low {
        return low;
    }
    let span = high - low;
    // (random * (span + 1)) >> 32 lands in [0, span] for every random value.
    let offset = ((random as u128 * (span as u128 + 1)) >> 32) as u64;
    low + offset
}

/// A tiny xorshift generator for hosts and tests that have no hardware RNG.
///
/// Not for anything security related: it only decorrelates retry timing.
#[derive(Debug, Clone)]
pub struct XorShift32(u32);

impl XorShift32 {
    /// A generator from `seed`; a zero seed (a fixed point of xorshift) is replaced.
    pub fn new(seed: u32) -> Self {
        Self(if seed == 0 { 0x9E37_79B9 } else { seed })
    }

    /// The next pseudo-random value.
    pub fn next_u32(&mut self) -> u32 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.0 = x;
        x
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    const BASE: Millis = 100;
    const MAX: Millis = 10_000;

    #[test]
    fn the_full_jitter_ceiling_doubles_per_failure_until_the_cap() {
        let mut b = Backoff::new(BASE, MAX, Jitter::Full);
        let mut ceilings = [0u64; 10];
        for c in ceilings.iter_mut() {
            *c = b.ceiling();
            b.next_delay(u32::MAX);
        }
        assert_eq!(
            ceilings,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
    }

    #[test]
    fn the_largest_random_value_yields_the_ceiling_and_zero_yields_nothing() {
        let mut high = Backoff::new(BASE, MAX, Jitter::Full);
        let mut low = Backoff::new(BASE, MAX, Jitter::Full);
        for _ in 0..4 {
            let ceiling = high.ceiling();
            assert_eq!(high.next_delay(u32::MAX), ceiling);
            assert_eq!(low.next_delay(0), 0);
        }
    }

    #[test]
    fn full_jitter_delays_stay_within_zero_and_the_ceiling() {
        let mut rng = XorShift32::new(7);
        let mut b = Backoff::new(BASE, MAX, Jitter::Full);
        let mut distinct = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let ceiling = b.ceiling();
            let d = b.next_delay(rng.next_u32());
            assert!(d <= ceiling, "{d:?} above {ceiling:?}");
            assert!(d <= MAX);
            distinct.insert(d);
        }
        // Jitter that always picked the same value would not spread a fleet.
        assert!(
            distinct.len() > 50,
            "only {} distinct delays",
            distinct.len()
        );
    }

    #[test]
    fn decorrelated_jitter_never_goes_below_base_nor_above_max_or_three_times_the_last() {
        let mut rng = XorShift32::new(0xDEAD_BEEF);
        let mut b = Backoff::new(BASE, MAX, Jitter::Decorrelated);
        let mut previous = BASE;
        for _ in 0..200 {
            let d = b.next_delay(rng.next_u32());
            assert!(d >= BASE, "{d:?} below base");
            assert!(d <= MAX, "{d:?} above max");
            assert!(d <= previous * 3, "{d:?} > 3 * {previous:?}");
            previous = d;
        }
    }

    #[test]
    fn decorrelated_delays_grow_when_the_random_values_are_high() {
        let mut b = Backoff::new(BASE, MAX, Jitter::Decorrelated);
        let delays: std::vec::Vec<u64> = (0..6).map(|_| b.next_delay(u32::MAX)).collect();
        assert_eq!(delays, [300, 900, 2700, 8100, 10_000, 10_000]);
    }

    #[test]
    fn a_reset_after_success_starts_again_from_base() {
        for jitter in [Jitter::Full, Jitter::Decorrelated] {
            let mut b = Backoff::new(BASE, MAX, jitter);
            for _ in 0..8 {
                b.next_delay(u32::MAX);
            }
            assert_eq!(b.attempts(), 8);
            assert_eq!(b.ceiling(), MAX);
            b.reset();
            assert_eq!(b.attempts(), 0);
            let expected = match jitter {
                Jitter::Full => BASE,
                Jitter::Decorrelated => BASE * 3,
            };
            assert_eq!(b.ceiling(), expected);
        }
    }

    #[test]
    fn the_same_random_values_give_the_same_delays() {
        let run = |seed| {
            let mut rng = XorShift32::new(seed);
            let mut b = Backoff::new(BASE, MAX, Jitter::Full);
            (0..20)
                .map(|_| b.next_delay(rng.next_u32()))
                .collect::<std::vec::Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn a_cap_below_base_is_raised_to_base() {
        let mut b = Backoff::new(500, 10, Jitter::Full);
        assert_eq!(b.next_delay(u32::MAX), 500);
        assert_eq!(b.next_delay(u32::MAX), 500);
    }
}

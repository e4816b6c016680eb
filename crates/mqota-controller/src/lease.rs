//! One runner per deployment: a claim with a lease.
//!
//! `serve` and `deploy` can both run rollouts from the same database, and
//! nothing but the store tells one process that another is already running a
//! deployment. Two runners would send every stage twice (a device answers
//! the second start with `busy`, which the other runner takes for a
//! failure) and fight over pause, stop and rollback. So a runner first
//! *claims* the deployment in the store ([`crate::store::Store::claim`]):
//! the claim names its holder and lasts a lease; the holder renews it while
//! it runs (every quarter of the lease, see [`Lease::due`]) and releases it
//! when it stops. A process that dies without releasing leaves a claim that
//! lapses after its lease: then (and only then) another process takes the
//! deployment over.
//!
//! The decision is [`decide`], a pure function of the stored claim, who
//! asks and the clock, so the lease logic is tested without sleeping
//! (below); the store applies it inside one write transaction, so two
//! processes claiming at once cannot both win.

use std::time::Duration;

/// A stored claim on a deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// Who holds it ([`holder`] of the process: its runner name, pid and a
    /// random tag).
    pub holder: String,
    /// When it lapses unless renewed, in milliseconds since the Unix epoch.
    pub expires_at_ms: i64,
}

impl Claim {
    /// When it lapses, as `HH:MM:SS UTC`, for messages.
    pub fn expires_text(&self) -> String {
        let s = self.expires_at_ms.div_euclid(1000).rem_euclid(86_400);
        format!("{:02}:{:02}:{:02} UTC", s / 3600, s / 60 % 60, s % 60)
    }
}

/// What a claim request comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it, or the holder's lease lapsed: it is the asker's now.
    Take,
    /// The asker holds it already: its lease starts again.
    Renew,
    /// Another holder's lease runs: the asker must not run the deployment.
    Refuse(Claim),
}

/// Whether `me` may hold a deployment claimed as `current` at `now_ms`. A
/// lease is over at its expiry instant (a claim renewed exactly then was
/// late).
pub fn decide(current: Option<&Claim>, me: &str, now_ms: i64) -> Decision {
    match current {
        None => Decision::Take,
        Some(c) if c.holder == me => Decision::Renew,
        Some(c) if now_ms >= c.expires_at_ms => Decision::Take,
        Some(c) => Decision::Refuse(c.clone()),
    }
}

/// How long a claim lasts without renewal, unless the process says
/// otherwise ([`set_lease`]): short enough that a `serve` restarted after a
/// crash takes its deployments back within seconds, long enough that a
/// runner held up for a few seconds (a slow disk, a stalled broker
/// connection) does not lose its claim.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);

static LEASE: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
static HOLDER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets this process's lease (`--runner-lease`); only the first call counts,
/// and at least one second is used.
pub fn set_lease(lease: Duration) {
    let _ = LEASE.set(lease.max(Duration::from_secs(1)));
}

/// This process's lease (see [`set_lease`]).
pub fn lease() -> Duration {
    LEASE.get().copied().unwrap_or(DEFAULT_LEASE)
}

/// This process's name as a claim holder: the runner name
/// ([`crate::rollout::runner_name`]), its pid and a random tag (so a later
/// process that reuses the pid is not taken for this one).
pub fn holder() -> &'static str {
    HOLDER.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(now_ms() as u128);
        format!(
            "{} pid {} #{:06x}",
            crate::rollout::runner_name(),
            std::process::id(),
            h.finish() & 0xff_ffff
        )
    })
}

/// Milliseconds since the Unix epoch: the clock the claims are kept in.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A claim this process holds, and when it was last renewed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The deployment.
    pub deployment: String,
    /// How long each renewal lasts.
    pub lease: Duration,
    /// When it was last taken or renewed (ms since the epoch).
    pub renewed_at_ms: i64,
}

impl Lease {
    /// Whether it is time to renew at `now_ms`: every quarter of the lease,
    /// so three renewals in a row may be late before it lapses.
    pub fn due(&self, now_ms: i64) -> bool {
        now_ms - self.renewed_at_ms >= self.lease.as_millis() as i64 / 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(holder: &str, expires_at_ms: i64) -> Claim {
        Claim {
            holder: holder.into(),
            expires_at_ms,
        }
    }

    #[test]
    fn a_claim_is_taken_when_free_or_lapsed_renewed_by_its_holder_and_refused_otherwise() {
        let a = claim("serve pid 1 #aaaaaa", 10_000);
        #[rustfmt::skip]
        let cases = [
            ("nobody holds it", None, "deploy pid 2 #bbbbbb", 0, Decision::Take),
            ("the holder renews before expiry", Some(&a), "serve pid 1 #aaaaaa", 9_999, Decision::Renew),
            ("the holder renews after expiry (nobody took it)", Some(&a), "serve pid 1 #aaaaaa", 20_000, Decision::Renew),
            ("another process while the lease runs", Some(&a), "deploy pid 2 #bbbbbb", 9_999, Decision::Refuse(a.clone())),
            ("another process at the expiry instant", Some(&a), "deploy pid 2 #bbbbbb", 10_000, Decision::Take),
            ("another process after expiry", Some(&a), "deploy pid 2 #bbbbbb", 10_001, Decision::Take),
            ("the same pid with another tag is another process", Some(&a), "serve pid 1 #cccccc", 5_000, Decision::Refuse(a.clone())),
        ];
        for (what, current, me, now, want) in cases {
            assert_eq!(decide(current, me, now), want, "{what}");
        }
    }

    #[test]
    fn a_lease_is_renewed_every_quarter_of_its_length() {
        let l = Lease {
            deployment: "d".into(),
            lease: Duration::from_secs(8),
            renewed_at_ms: 1_000,
        };
        assert!(!l.due(1_000));
        assert!(!l.due(2_999));
        assert!(l.due(3_000));
    }

    #[test]
    fn the_expiry_is_shown_as_a_utc_time_of_day() {
        // 2026-12-07 03:12:40.5 UTC
        let c = claim("x", 1_796_613_160_500);
        assert_eq!(c.expires_text(), "03:12:40 UTC");
    }
}

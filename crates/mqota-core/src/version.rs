//! Version order: `MAJOR.MINOR.PATCH[-PRE][+BUILD]` as semver orders it,
//! the build suffix ignored. The device refuses an older version with it
//! (`downgrade`), and the controller checks the same before it sends.
//!
//! Written here rather than taken from the `semver` crate because that
//! crate allocates; this needs nothing but the two strings. Pre-release
//! tags compare as text, which is semver's order for the usual `rc.1`,
//! `beta` forms; numeric identifiers of different lengths (`rc.9` vs
//! `rc.10`) are the known difference.

use core::cmp::Ordering;

/// A version read for ordering: the release numbers and the pre-release tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version<'a> {
    /// `MAJOR.MINOR.PATCH`.
    pub release: (u64, u64, u64),
    /// What follows `-`, if anything (before any `+`).
    pub pre: Option<&'a str>,
}

impl<'a> Version<'a> {
    /// Reads `v` (surrounding spaces and a leading `v` allowed, a `+BUILD`
    /// suffix ignored); `None` when it is not of that form.
    pub fn parse(v: &'a str) -> Option<Self> {
        let v = v.trim();
        let v = v.strip_prefix('v').unwrap_or(v);
        let v = v.split('+').next().unwrap_or(v);
        let (core, pre) = match v.split_once('-') {
            Some((c, p)) => (c, Some(p)),
            None => (v, None),
        };
        let mut parts = core.split('.').map(|n| {
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                None
            } else {
                n.parse::<u64>().ok()
            }
        });
        let release = (parts.next()??, parts.next()??, parts.next()??);
        if parts.next().is_some() || pre == Some("") {
            return None;
        }
        Some(Self { release, pre })
    }
}

impl Ord for Version<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        // A pre-release sorts before its release.
        self.release
            .cmp(&other.release)
            .then_with(|| match (self.pre, other.pre) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => Ordering::Greater,
                (Some(_), None) => Ordering::Less,
                (Some(a), Some(b)) => a.cmp(b),
            })
    }
}

impl PartialOrd for Version<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// How `new` compares with `running`: `None` when either is not a version
/// of that form (then there is no order to enforce).
pub fn compare(new: &str, running: &str) -> Option<Ordering> {
    Some(Version::parse(new)?.cmp(&Version::parse(running)?))
}

/// Whether `a` and `b` name the same release (build suffixes ignored).
pub fn same_release(a: &str, b: &str) -> bool {
    a.split('+').next() == b.split('+').next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_follows_semver_without_the_build_suffix() {
        use Ordering::*;
        for (a, b, want) in [
            ("1.2.0", "1.1.9", Some(Greater)),
            ("1.10.0", "1.9.0", Some(Greater)),
            ("1.0.0", "1.0.0+other", Some(Equal)),
            ("v2.0.0", "2.0.0", Some(Equal)),
            ("1.0.0-rc.1", "1.0.0", Some(Less)),
            ("1.0.0-beta", "1.0.0-alpha", Some(Greater)),
            ("0.9.9", "1.0.0", Some(Less)),
            ("1.2", "1.0.0", None),
            ("1.2.x", "1.0.0", None),
            ("1.2.3.4", "1.0.0", None),
            ("1.2.3-", "1.0.0", None),
            ("+1.2.3", "1.0.0", None),
        ] {
            assert_eq!(compare(a, b), want, "{a} vs {b}");
        }
    }
}

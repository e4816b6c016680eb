//! Topic names, built and recognised without allocation.

use core::fmt;

use heapless::String;

use super::{MAX_DEVICE_ID_LEN, MAX_PREFIX_LEN, MAX_TOPIC_LEN};

/// The topics of one device under one prefix.
///
/// Both parts are checked once, in [`Topics::new`], so that every topic built
/// afterwards fits [`MAX_TOPIC_LEN`] and contains no MQTT wildcard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String<MAX_PREFIX_LEN>,
    device: String<MAX_DEVICE_ID_LEN>,
}

/// What an incoming topic asks the device to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum TopicKind {
    /// `{prefix}/ota/start` or `{prefix}/{id}/ota/start`: start an update.
    Start,
    /// `{prefix}/{id}/ota/cancel`: stop the update in flight.
    Cancel,
    /// `{prefix}/{id}/ota/rollback`: boot the previous slot again.
    Rollback,
}

impl TopicKind {
    /// The command's name, as a signed command's `"op"` spells it:
    /// `start`, `cancel` or `rollback`.
    pub const fn name(self) -> &'static str {
        match self {
            TopicKind::Start => "start",
            TopicKind::Cancel => "cancel",
            TopicKind::Rollback => "rollback",
        }
    }
}

/// Why [`Topics::new`] refused a prefix or device id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum TopicError {
    /// The prefix is empty, longer than [`MAX_PREFIX_LEN`], starts or ends
    /// with `/`, has an empty level (`//`), or contains `+`, `#` or NUL.
    /// Fix the configuration; there is no sensible fallback.
    BadPrefix,
    /// The device id is empty, longer than [`MAX_DEVICE_ID_LEN`], or contains
    /// `/`, `+`, `#` or NUL. Fix the configuration (or derive the id from the
    /// MAC address, which always fits).
    BadDeviceId,
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TopicError::BadPrefix => "bad MQTT topic prefix",
            TopicError::BadDeviceId => "bad device id",
        })
    }
}

impl TopicError {
    /// The rule the refused value broke, in words for an error message
    /// (`{value}: {rule}`).
    pub fn rule(&self) -> impl fmt::Display {
        Rule(*self)
    }
}

struct Rule(TopicError);

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            TopicError::BadPrefix => write!(
                f,
                "a topic prefix is one or more levels joined by `/`, none of them empty, \
                 without `+`, `#` or NUL, at most {MAX_PREFIX_LEN} bytes"
            ),
            TopicError::BadDeviceId => write!(
                f,
                "a device id is one topic level: not empty, without `/`, `+`, `#` or NUL, \
                 at most {MAX_DEVICE_ID_LEN} bytes"
            ),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for TopicError {}

const START: &str = "ota/start";
const CANCEL: &str = "ota/cancel";
const ROLLBACK: &str = "ota/rollback";
const STATUS: &str = "status";
const PROGRESS: &str = "progress";
const AVAILABILITY: &str = "availability";
const LOGS_GET: &str = "logs/get";
const LOGS: &str = "logs";

/// What a device publishes on one of its own topics
/// (`{prefix}/{id}/{what}`), as a controller reads it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DeviceTopic {
    /// `{prefix}/{id}/status`: the retained [`Status`](super::Status).
    Status,
    /// `{prefix}/{id}/progress`: a [`Progress`](super::Progress) event.
    Progress,
    /// `{prefix}/{id}/availability`: retained `online` / `offline`.
    Availability,
}

/// Reads a topic a device publishes on: `Some((id, what))` for
/// `{prefix}/{id}/status`, `…/progress` and `…/availability` with an id that
/// [`Topics::new`] would accept, `None` for anything else (the shared
/// `{prefix}/progress` copy included).
pub fn parse_device_topic<'t>(prefix: &str, topic: &'t str) -> Option<(&'t str, DeviceTopic)> {
    let rest = topic.strip_prefix(prefix)?.strip_prefix('/')?;
    let (id, what) = rest.split_once('/')?;
    let kind = match what {
        STATUS => DeviceTopic::Status,
        PROGRESS => DeviceTopic::Progress,
        AVAILABILITY => DeviceTopic::Availability,
        _ => return None,
    };
    let valid = !id.is_empty() && id.len() <= MAX_DEVICE_ID_LEN && !has_forbidden(id, &['+', '#']);
    valid.then_some((id, kind))
}

/// The availability payload of a device that is connected.
pub const ONLINE: &str = "online";
/// The availability payload of a device that is not (its MQTT will, and what
/// it publishes before a clean reboot).
pub const OFFLINE: &str = "offline";

fn has_forbidden(s: &str, forbidden: &[char]) -> bool {
    s.chars().any(|c| c == '\0' || forbidden.contains(&c))
}

impl Topics {
    /// Topics for device `device_id` under `prefix` (use
    /// [`DEFAULT_PREFIX`](super::DEFAULT_PREFIX) when unconfigured).
    ///
    /// A prefix may have several levels (`site/ota-devices`); a device id is
    /// one level.
    pub fn new(prefix: &str, device_id: &str) -> Result<Self, TopicError> {
        if prefix.is_empty()
            || prefix.starts_with('/')
            || prefix.ends_with('/')
            || prefix.contains("//")
            || has_forbidden(prefix, &['+', '#'])
        {
            return Err(TopicError::BadPrefix);
        }
        if device_id.is_empty() || has_forbidden(device_id, &['/', '+', '#']) {
            return Err(TopicError::BadDeviceId);
        }
        Ok(Topics {
            prefix: String::try_from(prefix).map_err(|_| TopicError::BadPrefix)?,
            device: String::try_from(device_id).map_err(|_| TopicError::BadDeviceId)?,
        })
    }

    /// The prefix these topics live under.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The device these topics belong to.
    pub fn device_id(&self) -> &str {
        &self.device
    }

    fn join(&self, parts: &[&str]) -> String<MAX_TOPIC_LEN> {
        let mut topic = String::new();
        for part in parts {
            // Cannot fail: `new` bounded the prefix so that the longest
            // topic, the per-device rollback one, fits exactly.
            let pushed = topic.push_str(part);
            debug_assert!(pushed.is_ok());
        }
        topic
    }

    /// `{prefix}/ota/start`: update commands for every device.
    pub fn start_all(&self) -> String<MAX_TOPIC_LEN> {
        self.join(&[&self.prefix, "/", START])
    }

    /// `{prefix}/{id}/ota/start`: update commands for this device only.
    pub fn start_device(&self) -> String<MAX_TOPIC_LEN> {
        self.join(&[&self.prefix, "/", &self.device, "/", START])
    }

    /// `{prefix}/{id}/ota/cancel`.
    pub fn cancel(&self) -> String<MAX_TOPIC_LEN> {
        self.join(&[&self.prefix, "/", &self.device, "/", CANCEL])
    }

    /// `{prefix}/{id}/ota/rollback`.
    pub fn rollback(&self) -> String<MAX_TOPIC_LEN> {
        self.join(&[&self.prefix, "/", &self.device, "/", ROLLBACK])
    }

    /// `{prefix}/progress`: the shared copy of every device's progress
    /// events (the payload names the device). Kept because the original
    /// design names it and existing tooling listens there; a controller
    /// decides only from [`Topics::device_progress`].
    pub fn progress(&self) -> String<MAX_TOPIC_LEN> {
        self.join(&[&self.prefix, "/progress"])
    }

    /// `{prefix}/{id}/progress`: this device's progress events, on a topic
    /// a broker ACL can tie to the device's identity.
    pub fn device_progress(&self) -> String<MAX_TOPIC_LEN> {
        self.join(&[&self.prefix, "/", &self.device, "/", PROGRESS])
    }

    /// `{prefix}/{id}/availability`: retained `online` / `offline`; the
    /// MQTT will is `offline` here, so the retained status is never
    /// overwritten by a will.
    pub fn availability(&self) -> String<MAX_TOPIC_LEN> {
        self.join(&[&self.prefix, "/", &self.device, "/", AVAILABILITY])
    }

    /// `{prefix}/{id}/status`: this device's retained status and its will.
    pub fn status(&self) -> String<MAX_TOPIC_LEN> {
        self.join(&[&self.prefix, "/", &self.device, "/", STATUS])
    }

    /// `{prefix}/{id}/logs/get`: requests for this device's log
    /// ([`LogsGet`](super::LogsGet)). Subscribed like a command topic (QoS 1,
    /// no retained replay); a retained request is dropped unread.
    pub fn logs_get(&self) -> String<MAX_TOPIC_LEN> {
        self.join(&[&self.prefix, "/", &self.device, "/", LOGS_GET])
    }

    /// `{prefix}/{id}/logs`: the chunks answering a `logs/get`
    /// ([`LogsChunk`](super::LogsChunk)), QoS 0, never retained.
    pub fn logs(&self) -> String<MAX_TOPIC_LEN> {
        self.join(&[&self.prefix, "/", &self.device, "/", LOGS])
    }

    /// Whether `topic` is this device's `{prefix}/{id}/logs/get`.
    pub fn is_logs_get(&self, topic: &str) -> bool {
        topic == self.logs_get().as_str()
    }

    /// `{prefix}/+/status`: the filter a controller subscribes to for the
    /// status of every device.
    pub fn status_filter(&self) -> String<MAX_TOPIC_LEN> {
        self.join(&[&self.prefix, "/+/status"])
    }

    /// The filters a controller subscribes to: every device's status,
    /// per-device progress and availability (never the shared
    /// `{prefix}/progress` copy, which any client may publish to as any
    /// device).
    pub fn controller_filters(prefix: &str) -> Result<[String<MAX_TOPIC_LEN>; 3], TopicError> {
        // Any valid id gives the same filters; "x" only lets `new` check the prefix.
        let t = Topics::new(prefix, "x")?;
        Ok([
            t.join(&[&t.prefix, "/+/", STATUS]),
            t.join(&[&t.prefix, "/+/", PROGRESS]),
            t.join(&[&t.prefix, "/+/", AVAILABILITY]),
        ])
    }

    /// The topics a device subscribes to (all QoS 1): start for everyone,
    /// then start, cancel, rollback and logs/get for this device.
    pub fn subscriptions(&self) -> [String<MAX_TOPIC_LEN>; 5] {
        [
            self.start_all(),
            self.start_device(),
            self.cancel(),
            self.rollback(),
            self.logs_get(),
        ]
    }

    /// What an incoming `topic` asks of this device, or `None` when it is not
    /// one of this device's command topics (another device's, progress,
    /// status, anything else): the caller ignores those.
    pub fn classify(&self, topic: &str) -> Option<TopicKind> {
        let rest = topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('/')?;
        if rest == START {
            return Some(TopicKind::Start);
        }
        let action = rest.strip_prefix(self.device.as_str())?.strip_prefix('/')?;
        match action {
            START => Some(TopicKind::Start),
            CANCEL => Some(TopicKind::Cancel),
            ROLLBACK => Some(TopicKind::Rollback),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::format;

    use super::super::{DEFAULT_PREFIX, MAX_DEVICE_ID_LEN, MAX_PREFIX_LEN, MAX_TOPIC_LEN};
    use super::*;

    fn topics() -> Topics {
        Topics::new(DEFAULT_PREFIX, "c3-a1b2c3").unwrap()
    }

    #[test]
    fn topics_follow_the_documented_names() {
        let t = topics();
        assert_eq!(t.start_all(), "device/ota/start");
        assert_eq!(t.start_device(), "device/c3-a1b2c3/ota/start");
        assert_eq!(t.cancel(), "device/c3-a1b2c3/ota/cancel");
        assert_eq!(t.rollback(), "device/c3-a1b2c3/ota/rollback");
        assert_eq!(t.progress(), "device/progress");
        assert_eq!(t.status(), "device/c3-a1b2c3/status");
        assert_eq!(t.status_filter(), "device/+/status");
        assert_eq!(t.device_progress(), "device/c3-a1b2c3/progress");
        assert_eq!(t.availability(), "device/c3-a1b2c3/availability");
        assert_eq!(
            Topics::controller_filters("device").unwrap(),
            [
                "device/+/status",
                "device/+/progress",
                "device/+/availability"
            ]
        );
    }

    #[test]
    fn a_controller_reads_the_device_id_from_per_device_topics_only() {
        let t = topics();
        for (topic, what) in [
            (t.status(), DeviceTopic::Status),
            (t.device_progress(), DeviceTopic::Progress),
            (t.availability(), DeviceTopic::Availability),
        ] {
            assert_eq!(
                parse_device_topic("device", &topic),
                Some(("c3-a1b2c3", what)),
                "{topic}"
            );
        }
        for topic in [
            "device/progress",
            "device/a/b/status",
            "device//status",
            "device/+/status",
            "other/a/status",
            "device/a/ota/start",
            "device/a/statusx",
        ] {
            assert_eq!(parse_device_topic("device", topic), None, "{topic}");
        }
        let long = format!("device/{}/status", "i".repeat(MAX_DEVICE_ID_LEN + 1));
        assert_eq!(parse_device_topic("device", &long), None);
    }

    #[test]
    fn a_device_subscribes_to_exactly_the_topics_it_classifies_as_commands() {
        let t = topics();
        let subs = t.subscriptions();
        let kinds: [Option<TopicKind>; 5] = core::array::from_fn(|i| t.classify(&subs[i]));
        assert_eq!(
            kinds,
            [
                Some(TopicKind::Start),
                Some(TopicKind::Start),
                Some(TopicKind::Cancel),
                Some(TopicKind::Rollback),
                // Not a command: the device answers it from its log.
                None,
            ]
        );
        assert!(t.is_logs_get(&subs[4]));
        assert_eq!(subs[4], "device/c3-a1b2c3/logs/get");
        assert_eq!(t.logs(), "device/c3-a1b2c3/logs");
        assert!(!t.is_logs_get("device/c3-ffffff/logs/get"));
        assert!(!t.is_logs_get("device/c3-a1b2c3/logs"));
    }

    #[test]
    fn topics_of_other_devices_and_non_command_topics_are_ignored() {
        let t = topics();
        let ignored = [
            "device/c3-ffffff/ota/start",
            "device/c3-ffffff/ota/cancel",
            "device/c3-ffffff/ota/rollback",
            // An id that merely starts like ours is another device.
            "device/c3-a1b2c3x/ota/start",
            "device/c3-a1b2c/ota/start",
            "device/progress",
            "device/c3-a1b2c3/status",
            "device/c3-a1b2c3/ota/start/extra",
            "device/c3-a1b2c3/ota/",
            "device/c3-a1b2c3/ota",
            "device/c3-a1b2c3",
            "device/ota/start/",
            "device/ota/cancel",
            "devices/ota/start",
            "other/ota/start",
            "other/c3-a1b2c3/ota/start",
            "deviceota/start",
            "device//ota/start",
            "/device/ota/start",
            "",
        ];
        for topic in ignored {
            assert_eq!(t.classify(topic), None, "{topic}");
        }
    }

    #[test]
    fn a_multi_level_prefix_is_matched_as_a_whole() {
        let t = Topics::new("site/ota-fleet", "dev1").unwrap();
        assert_eq!(
            t.classify("site/ota-fleet/ota/start"),
            Some(TopicKind::Start)
        );
        assert_eq!(
            t.classify("site/ota-fleet/dev1/ota/cancel"),
            Some(TopicKind::Cancel)
        );
        assert_eq!(t.classify("site/ota/start"), None);
        assert_eq!(t.classify("site/ota-fleet/dev2/ota/cancel"), None);
    }

    #[test]
    fn a_refusal_names_the_rule_with_its_limits() {
        use std::string::ToString;
        let prefix = TopicError::BadPrefix.rule().to_string();
        assert!(
            prefix.contains(&format!("at most {MAX_PREFIX_LEN} bytes")),
            "{prefix}"
        );
        let id = TopicError::BadDeviceId.rule().to_string();
        assert!(
            id.contains(&format!("at most {MAX_DEVICE_ID_LEN} bytes")),
            "{id}"
        );
        assert!(id.contains("`/`"), "{id}");
    }

    #[test]
    fn prefixes_and_ids_that_would_break_topics_are_refused() {
        for prefix in ["", "/device", "device/", "a//b", "dev+", "dev#", "de\0v"] {
            assert_eq!(
                Topics::new(prefix, "dev1"),
                Err(TopicError::BadPrefix),
                "{prefix:?}"
            );
        }
        for id in ["", "a/b", "+", "#", "a\0"] {
            assert_eq!(
                Topics::new("device", id),
                Err(TopicError::BadDeviceId),
                "{id:?}"
            );
        }
        let long_prefix = "p".repeat(MAX_PREFIX_LEN + 1);
        assert_eq!(
            Topics::new(&long_prefix, "dev1"),
            Err(TopicError::BadPrefix)
        );
        let long_id = "i".repeat(MAX_DEVICE_ID_LEN + 1);
        assert_eq!(
            Topics::new("device", &long_id),
            Err(TopicError::BadDeviceId)
        );
    }

    #[test]
    fn the_longest_prefix_and_id_still_build_every_topic_in_full() {
        let prefix = "p".repeat(MAX_PREFIX_LEN);
        let id = "i".repeat(MAX_DEVICE_ID_LEN);
        let t = Topics::new(&prefix, &id).unwrap();
        let rollback = t.rollback();
        assert_eq!(rollback.len(), MAX_TOPIC_LEN);
        assert!(rollback.ends_with("/ota/rollback"));
        assert_eq!(t.classify(&rollback), Some(TopicKind::Rollback));
        assert_eq!(t.availability().len(), MAX_TOPIC_LEN);
        for topic in [
            t.start_all(),
            t.start_device(),
            t.cancel(),
            t.status(),
            t.device_progress(),
        ] {
            assert!(topic.starts_with(prefix.as_str()), "{topic}");
        }
        assert!(t.status().ends_with(&format!("/{id}/status")));
    }
}

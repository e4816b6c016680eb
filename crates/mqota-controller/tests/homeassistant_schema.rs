//! The Home Assistant bridge's payloads against Home Assistant's MQTT update
//! platform schema, written down as data in `data/ha-mqtt-update-schema.json`
//! (field names, types, the 0–100 range, where `null` is allowed). One
//! invalid field makes Home Assistant drop a whole message, so every kind of
//! device the bridge can meet is checked, and the checker is shown to refuse
//! what Home Assistant refuses.

use std::collections::HashMap;

use mqota_controller::catalogue::FirmwareEntry;
use mqota_controller::fleet::DeviceView;
use mqota_controller::homeassistant::{
    entity, install_target, markdown_text, object_id, HaConfig, Refusal, PAYLOAD_INSTALL,
};
use serde_json::{json, Value};

const SCHEMA: &str = include_str!("data/ha-mqtt-update-schema.json");

fn schema() -> Value {
    serde_json::from_str(SCHEMA).expect("the schema file is JSON")
}

/// Home Assistant's topic rule: no NUL, C0/C1 control or non-character.
fn topic_chars_ok(t: &str) -> bool {
    !t.is_empty()
        && t.chars().all(|c| {
            let n = c as u32;
            !(n <= 0x1f
                || (0x7f..=0x9f).contains(&n)
                || (0xfdd0..=0xfdef).contains(&n)
                || (n & 0xfffe) == 0xfffe)
        })
}

/// Checks `v` against one schema node; errors name the path.
fn check(path: &str, v: &Value, node: &Value, errs: &mut Vec<String>) {
    if v.is_null() {
        if node["nullable"] != json!(true) {
            errs.push(format!("{path}: null is not allowed"));
        }
        return;
    }
    let ty = node["type"].as_str().expect("every node has a type");
    let mut bad = |why: String| errs.push(format!("{path}: {why} (got {v})"));
    match ty {
        "string" | "template" => match v.as_str() {
            Some(s) => {
                if let Some(max) = node["max_chars"].as_u64() {
                    if s.chars().count() as u64 > max {
                        bad(format!("longer than {max} characters"));
                    }
                }
            }
            None => bad("not a string".into()),
        },
        "boolean" => {
            if !v.is_boolean() {
                bad("not a boolean".into())
            }
        }
        "integer" | "number" => {
            let n = if ty == "integer" {
                v.as_i64().map(|n| n as f64)
            } else {
                v.as_f64()
            };
            match n {
                None => bad(format!("not an {ty}")),
                Some(n) => {
                    if node["min"].as_f64().is_some_and(|m| n < m)
                        || node["max"].as_f64().is_some_and(|m| n > m)
                    {
                        bad(format!("outside {}..={}", node["min"], node["max"]));
                    }
                }
            }
        }
        "enum" => {
            let values = node["values"].as_array().unwrap();
            if !values.contains(v) {
                bad(format!("not one of {values:?}"));
            }
        }
        "url" => match v.as_str() {
            Some(s) => {
                let rest = s
                    .strip_prefix("http://")
                    .or_else(|| s.strip_prefix("https://"));
                let host = rest.map(|r| r.split(['/', '?', '#']).next().unwrap_or(""));
                if host.is_none_or(str::is_empty) || s.contains(char::is_whitespace) {
                    bad("not an http(s) URL with a host".into());
                }
            }
            None => bad("not a string".into()),
        },
        "publish_topic" | "subscribe_topic" => match v.as_str() {
            Some(t) => {
                if !topic_chars_ok(t) {
                    bad("not a topic Home Assistant takes".into());
                } else if ty == "publish_topic" && t.contains(['+', '#']) {
                    bad("a wildcard in a publish topic".into());
                } else {
                    let levels: Vec<&str> = t.split('/').collect();
                    for (i, l) in levels.iter().enumerate() {
                        let misplaced = (l.contains('+') && *l != "+")
                            || (l.contains('#') && (*l != "#" || i + 1 != levels.len()));
                        if misplaced {
                            bad("a misplaced wildcard".into());
                            break;
                        }
                    }
                }
            }
            None => bad("not a string".into()),
        },
        "list" => match v.as_array() {
            Some(items) => {
                if let Some(len) = node["len"].as_u64() {
                    if items.len() as u64 != len {
                        bad(format!("not {len} items"));
                    }
                }
                for (i, item) in items.iter().enumerate() {
                    check(&format!("{path}[{i}]"), item, &node["items"], errs);
                }
            }
            None => bad("not a list".into()),
        },
        "object" => check_object(path, v, node, errs),
        other => panic!("the schema names an unknown type {other}"),
    }
}

fn check_object(path: &str, v: &Value, node: &Value, errs: &mut Vec<String>) {
    let Some(obj) = v.as_object() else {
        errs.push(format!("{path}: not an object (got {v})"));
        return;
    };
    let keys = node["keys"].as_object().unwrap();
    for (k, val) in obj {
        match keys.get(k) {
            Some(sub) => check(&format!("{path}.{k}"), val, sub, errs),
            None if node["unknown_keys"] == json!("deny") => {
                errs.push(format!("{path}: unknown key {k:?}"))
            }
            None => {}
        }
    }
    for (k, sub) in keys {
        if sub["required"] == json!(true) && !obj.contains_key(k) {
            errs.push(format!("{path}: {k} is required"));
        }
    }
    if let Some(any) = node["one_of_required"].as_array() {
        let has = any.iter().any(|k| {
            obj.get(k.as_str().unwrap())
                .and_then(Value::as_array)
                .is_some_and(|a| !a.is_empty())
        });
        if !has {
            errs.push(format!("{path}: needs one of {any:?}"));
        }
    }
    if let Some(groups) = node["exclusive"].as_array() {
        for g in groups {
            let present = g
                .as_array()
                .unwrap()
                .iter()
                .filter(|k| obj.contains_key(k.as_str().unwrap()))
                .count();
            if present > 1 {
                errs.push(format!("{path}: only one of {g}"));
            }
        }
    }
    if let Some(req) = node["required_with"].as_object() {
        for (k, needs) in req {
            if obj.contains_key(k) {
                for n in needs.as_array().unwrap() {
                    if !obj.contains_key(n.as_str().unwrap()) {
                        errs.push(format!("{path}: {k} without {n}"));
                    }
                }
            }
        }
    }
}

fn discovery_errors(v: &Value) -> Vec<String> {
    let mut errs = Vec::new();
    check_object("discovery", v, &schema()["discovery"], &mut errs);
    errs
}

fn state_errors(v: &Value) -> Vec<String> {
    let mut errs = Vec::new();
    check_object("state", v, &schema()["state"], &mut errs);
    errs
}

fn level_ok(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn view(id: &str, version: &str, extra: impl FnOnce(&mut DeviceView)) -> DeviceView {
    let status = json!({
        "device": id, "chip": "esp32c3", "project": "app", "version": version,
        "slot": 0, "state": "valid", "last": null, "https": false,
    });
    let mut v = DeviceView {
        id: id.to_owned(),
        status: Some(serde_json::from_value(status).expect("a status")),
        online: true,
        online_since: None,
        progress: None,
        ended: Vec::new(),
        in_flight: None,
    };
    extra(&mut v);
    v
}

fn progress(id: &str, job: &str, phase: &str, percent: u8) -> mqota_core::protocol::Progress {
    serde_json::from_value(json!({
        "device": id, "job": job, "phase": phase, "bytes": 1000, "total": 2000,
        "percent": percent, "error": null, "message": null,
    }))
    .expect("a progress event")
}

fn image(name: &str, version: &str, signers: Option<Vec<String>>) -> FirmwareEntry {
    FirmwareEntry {
        name: name.to_owned(),
        url: None,
        chip: Some("esp32c3".into()),
        project: Some("app".into()),
        version: Some(version.to_owned()),
        size: 262_144,
        sha256: "ab".repeat(32),
        error: None,
        signers,
        mtime: 0,
    }
}

fn catalogue() -> Vec<FirmwareEntry> {
    vec![
        image("app-1.0.0.bin", "1.0.0", Some(vec![])),
        image("app-1.2.0.bin", "1.2.0", Some(vec!["cd".repeat(32)])),
        image("app-1.1.0.bin", "1.1.0", None),
        // Another project and another chip never count.
        FirmwareEntry {
            project: Some("other".into()),
            ..image("other-9.0.0.bin", "9.0.0", None)
        },
        FirmwareEntry {
            chip: Some("esp32c6".into()),
            ..image("c6-9.0.0.bin", "9.0.0", None)
        },
    ]
}

fn cfg() -> HaConfig {
    HaConfig::new("device", Some("http://10.0.0.2:8080".into()))
}

/// Every kind of device the bridge meets, by name.
fn fleet() -> Vec<(&'static str, DeviceView)> {
    let hostile = "x\",\"command_topic\":\"evil";
    vec![
        ("idle, update offered", view("c3-1", "1.0.0", |_| {})),
        ("up to date", view("c3-2", "1.2.0", |_| {})),
        ("newer than the catalogue", view("c3-3", "2.0.0", |_| {})),
        (
            "no image of its project",
            view("c3-4", "1.0.0", |v| {
                let mut s = v.status.take().unwrap();
                s.project = "lamp".try_into().unwrap();
                v.status = Some(s);
            }),
        ),
        (
            "accepted",
            view("c3-5", "1.0.0", |v| {
                v.in_flight = Some("d-1".into());
                v.progress = Some(progress("c3-5", "d-1", "accepted", 0));
            }),
        ),
        (
            "downloading 0 %",
            view("c3-6", "1.0.0", |v| {
                v.in_flight = Some("d-1".into());
                v.progress = Some(progress("c3-6", "d-1", "downloading", 0));
            }),
        ),
        (
            "downloading 50 %",
            view("c3-7", "1.0.0", |v| {
                v.in_flight = Some("d-1".into());
                v.progress = Some(progress("c3-7", "d-1", "downloading", 50));
            }),
        ),
        (
            "downloading 100 %",
            view("c3-8", "1.0.0", |v| {
                v.in_flight = Some("d-1".into());
                v.progress = Some(progress("c3-8", "d-1", "downloading", 100));
            }),
        ),
        (
            "confirming",
            view("c3-9", "1.0.0", |v| {
                v.in_flight = Some("d-1".into());
                v.progress = Some(progress("c3-9", "d-1", "confirming", 100));
            }),
        ),
        (
            "job seen, no progress yet",
            view("c3-10", "1.0.0", |v| v.in_flight = Some("d-1".into())),
        ),
        (
            "last job failed",
            view("c3-11", "1.0.0", |v| {
                let mut s = v.status.take().unwrap();
                s.last = Some(
                    serde_json::from_value(json!({"job": "d-0", "result": "rolled_back", "error": "health_check_failed"}))
                        .unwrap(),
                );
                v.status = Some(s);
            }),
        ),
        ("offline", view("c3-12", "1.0.0", |v| v.online = false)),
        ("an id that breaks JSON", view(hostile, "1.0.0", |_| {})),
        (
            "markup and bidi in its version",
            view("c3.bidi", "1.0.0\u{202e}![x](http://e/)", |_| {}),
        ),
        ("dots in its id", view("kitchen.lamp", "1.0.0", |_| {})),
    ]
}

#[test]
fn every_discovery_and_state_the_bridge_makes_fits_home_assistants_schema() {
    let cfg = cfg();
    let cat = catalogue();
    let mut checked = 0;
    for (what, v) in fleet() {
        for (pending, notice) in [
            (false, None),
            (true, Some("Install refused: [x](y) *busy*.")),
        ] {
            let (object, discovery, state) = entity(&cfg, &v, &cat, pending, notice)
                .unwrap_or_else(|| panic!("{what}: no entity"));
            assert!(level_ok(&object), "{what}: object id {object:?}");
            let topic = cfg.config_topic(&object);
            let levels: Vec<&str> = topic.split('/').collect();
            assert_eq!(
                levels,
                [
                    "homeassistant",
                    "update",
                    "mqota",
                    object.as_str(),
                    "config"
                ],
                "{what}"
            );
            let d = serde_json::to_value(&discovery).unwrap();
            let s = serde_json::to_value(&state).unwrap();
            assert_eq!(discovery_errors(&d), Vec::<String>::new(), "{what}: {d}");
            assert_eq!(state_errors(&s), Vec::<String>::new(), "{what}: {s}");
            // Home Assistant before 2024.11 has no default for it.
            assert_eq!(d["payload_install"], PAYLOAD_INSTALL, "{what}");
            checked += 1;
        }
    }
    assert_eq!(checked, 2 * fleet().len());
}

#[test]
fn the_state_says_versions_progress_and_the_newest_image_of_the_devices_chip_and_project() {
    let cfg = cfg();
    let cat = catalogue();
    let fleet: HashMap<&str, DeviceView> = fleet().into_iter().collect();
    let state = |what: &str, pending: bool| {
        let (_, _, s) = entity(&cfg, &fleet[what], &cat, pending, None).unwrap();
        serde_json::to_value(s).unwrap()
    };
    let idle = state("idle, update offered", false);
    assert_eq!(idle["installed_version"], "1.0.0");
    assert_eq!(
        idle["latest_version"], "1.2.0",
        "the newest, not the last listed"
    );
    assert_eq!(idle["title"], "app 1.2.0");
    assert_eq!(idle["in_progress"], false);
    assert_eq!(idle["update_percentage"], Value::Null);
    assert_eq!(idle["release_url"], "http://10.0.0.2:8080/");
    let summary = idle["release_summary"].as_str().unwrap();
    assert!(
        summary.contains("app\\-1\\.2\\.0\\.bin") && summary.contains("signed"),
        "{summary}"
    );

    for what in [
        "up to date",
        "newer than the catalogue",
        "no image of its project",
    ] {
        let s = state(what, false);
        assert_eq!(
            s["latest_version"], s["installed_version"],
            "{what}: nothing to offer"
        );
    }
    for (what, pct) in [
        ("accepted", json!(0)),
        ("downloading 0 %", json!(0)),
        ("downloading 50 %", json!(50)),
        ("downloading 100 %", json!(100)),
        ("confirming", json!(100)),
        ("job seen, no progress yet", Value::Null),
    ] {
        let s = state(what, false);
        assert_eq!(s["in_progress"], true, "{what}");
        assert_eq!(s["update_percentage"], pct, "{what}");
    }
    let pending = state("idle, update offered", true);
    assert_eq!(
        pending["in_progress"], true,
        "an accepted Install before any event"
    );
    assert_eq!(pending["update_percentage"], Value::Null);
    let failed = state("last job failed", false);
    assert!(
        failed["release_summary"]
            .as_str()
            .unwrap()
            .contains("rolled\\_back (health\\_check\\_failed)"),
        "{failed}"
    );
}

#[test]
fn a_device_supplied_string_cannot_add_or_change_discovery_fields() {
    let cfg = cfg();
    let hostile = "x\",\"command_topic\":\"evil";
    let v = view(hostile, "1\",\"payload_install\":\"boom", |_| {});
    let (object, discovery, state) = entity(&cfg, &v, &catalogue(), false, None).unwrap();
    let d = serde_json::to_value(&discovery).unwrap();
    let keys: Vec<&String> = d.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "availability",
            "availability_mode",
            "command_topic",
            "device",
            "device_class",
            "entity_category",
            "name",
            "origin",
            "payload_install",
            "qos",
            "retain",
            "state_topic",
            "unique_id"
        ]
    );
    assert_eq!(
        d["command_topic"],
        format!("mqota/homeassistant/mqota/{object}/install")
    );
    assert_eq!(d["payload_install"], "install");
    assert_eq!(d["device"]["name"], hostile, "the id is one string value");
    assert_eq!(
        d["availability"][0]["topic"],
        format!("device/{hostile}/availability")
    );
    let s = serde_json::to_value(&state).unwrap();
    assert_eq!(s["installed_version"], "1\",\"payload_install\":\"boom");
    assert_eq!(s.as_object().unwrap().len(), 7);
    assert!(level_ok(&object) && object.starts_with("x___command_topic___evil_"));
}

#[test]
fn bidi_overrides_and_markup_stay_text() {
    let cfg = cfg();
    let v = view("c3\u{202e}1", "1.0.0\u{202e}![x](http://e/)", |_| {});
    let (_, discovery, state) =
        entity(&cfg, &v, &catalogue(), false, Some("[click](http://e/)")).unwrap();
    assert_eq!(discovery.device.name, "c3\u{fffd}1");
    assert!(!state.installed_version.contains('\u{202e}'));
    assert!(
        !state.release_summary.contains("[click](http"),
        "{}",
        state.release_summary
    );
    assert_eq!(markdown_text("![x](y)"), "\\!\\[x\\]\\(y\\)");
}

#[test]
fn ids_that_are_not_topic_levels_get_distinct_object_ids() {
    assert_eq!(object_id("c3-a1_B"), "c3-a1_B");
    let (a, b) = (object_id("kitchen.lamp"), object_id("kitchen lamp"));
    assert!(level_ok(&a) && level_ok(&b) && a != b, "{a} {b}");
    assert_ne!(object_id("kitchen_lamp"), a);
}

#[test]
fn a_device_whose_availability_topic_home_assistant_refuses_gets_no_entity() {
    for id in ["c3\u{7}bell", "c3\u{85}", "a/b", "a#", "a+"] {
        let v = view(id, "1.0.0", |_| {});
        assert!(
            entity(&cfg(), &v, &catalogue(), false, None).is_none(),
            "{id:?}"
        );
    }
    let mut no_status = view("c3-x", "1.0.0", |_| {});
    no_status.status = None;
    assert!(entity(&cfg(), &no_status, &catalogue(), false, None).is_none());
}

#[test]
fn install_is_refused_when_busy_offline_or_up_to_date() {
    let cat = catalogue();
    let fleet: HashMap<&str, DeviceView> = fleet().into_iter().collect();
    let none = HashMap::new();
    let target = install_target(Some(&fleet["idle, update offered"]), &cat, &none).unwrap();
    assert_eq!(target.name, "app-1.2.0.bin");
    let running = HashMap::from([("c3-1".to_owned(), "d-9".to_owned())]);
    assert!(matches!(
        install_target(Some(&fleet["idle, update offered"]), &cat, &running),
        Err(Refusal::Busy(m)) if m.contains("d-9")
    ));
    assert!(matches!(
        install_target(Some(&fleet["downloading 50 %"]), &cat, &none),
        Err(Refusal::Busy(_))
    ));
    assert_eq!(
        install_target(Some(&fleet["offline"]), &cat, &none),
        Err(Refusal::Offline)
    );
    assert_eq!(
        install_target(Some(&fleet["up to date"]), &cat, &none),
        Err(Refusal::UpToDate("1.2.0".into()))
    );
    assert!(matches!(
        install_target(Some(&fleet["newer than the catalogue"]), &cat, &none),
        Err(Refusal::UpToDate(_))
    ));
    assert_eq!(
        install_target(None, &cat, &none),
        Err(Refusal::UnknownEntity)
    );
}

/// Breaks one rule in a good discovery message.
type Spoil = Box<dyn Fn(&mut Value)>;

/// The checker is only worth something if it refuses what Home Assistant
/// refuses: each of these breaks one rule of the schema.
#[test]
fn the_checker_refuses_what_home_assistant_would_drop() {
    let (_, discovery, state) = entity(&cfg(), &fleet()[0].1, &catalogue(), false, None).unwrap();
    let good_d = serde_json::to_value(&discovery).unwrap();
    let good_s = serde_json::to_value(&state).unwrap();
    assert!(discovery_errors(&good_d).is_empty() && state_errors(&good_s).is_empty());

    let bad_states = [
        ("installed_version", json!(null)),
        ("latest_version", json!(null)),
        ("latest_version", json!(12)),
        ("title", json!(null)),
        ("release_summary", json!(null)),
        ("release_summary", json!("x".repeat(256))),
        ("release_url", json!("not a url")),
        ("release_url", json!(null)),
        ("in_progress", json!(null)),
        ("in_progress", json!("true")),
        ("update_percentage", json!(101)),
        ("update_percentage", json!(-1)),
        ("update_percentage", json!("50")),
        ("unknown_key", json!(1)),
    ];
    for (k, v) in bad_states {
        let mut s = good_s.clone();
        s[k] = v.clone();
        assert!(!state_errors(&s).is_empty(), "state with {k} = {v} passed");
    }
    let bad_discoveries: Vec<(&str, Spoil)> = vec![
        (
            "no payload_install",
            Box::new(|d| {
                d.as_object_mut().unwrap().remove("payload_install");
            }),
        ),
        (
            "a wildcard command topic",
            Box::new(|d| d["command_topic"] = json!("a/#")),
        ),
        (
            "a control character in a topic",
            Box::new(|d| d["state_topic"] = json!("a/\u{1}")),
        ),
        ("qos 3", Box::new(|d| d["qos"] = json!(3))),
        (
            "availability without topic",
            Box::new(|d| d["availability"][0] = json!({"payload_available": "online"})),
        ),
        (
            "both availability forms",
            Box::new(|d| d["availability_topic"] = json!("a/b")),
        ),
        (
            "a device without identifiers",
            Box::new(|d| d["device"]["identifiers"] = json!([])),
        ),
        (
            "a numeric sw_version",
            Box::new(|d| d["device"]["sw_version"] = json!(1.0)),
        ),
        (
            "an unknown device key",
            Box::new(|d| d["device"]["colour"] = json!("red")),
        ),
        (
            "an unknown key",
            Box::new(|d| d["paylod_install"] = json!("x")),
        ),
        (
            "entity_category null",
            Box::new(|d| d["entity_category"] = json!(null)),
        ),
        (
            "a device class of another platform",
            Box::new(|d| d["device_class"] = json!("temperature")),
        ),
        (
            "origin without name",
            Box::new(|d| d["origin"] = json!({"sw_version": "1"})),
        ),
    ];
    for (what, spoil) in bad_discoveries {
        let mut d = good_d.clone();
        spoil(&mut d);
        assert!(
            !discovery_errors(&d).is_empty(),
            "discovery with {what} passed"
        );
    }
}

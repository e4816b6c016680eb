//! Tests of the rollout's pure parts: which devices a firmware may go to,
//! how stages are cut, the failure threshold, and which statuses prove a result.
use super::*;
// `result_of` is the machine's; its tests against device views stay here.
use crate::machine::result_of;
use mqota_core::protocol::Phase;
use mqota_core::protocol::Status;

fn device(id: &str, version: &str, https: Option<bool>) -> DeviceView {
    let mut json = serde_json::json!({
        "device": id, "chip": "esp32c3", "project": "p",
        "version": version, "slot": 0, "state": "valid", "last": null,
    });
    if let Some(h) = https {
        json["https"] = h.into();
    }
    DeviceView {
        id: id.into(),
        status: Some(serde_json::from_value::<Status>(json).unwrap()),
        online: true,
        progress: None,
        ended: Vec::new(),
        in_flight: None,
    }
}

fn firmware(url: &str) -> Firmware {
    Firmware {
        name: "app".into(),
        url: url.into(),
        version: "1.1.0".into(),
        sha256: "00".repeat(32),
        size: 1000,
        chip: Some("esp32c3".into()),
        project: Some("p".into()),
        signers: None,
    }
}

#[test]
fn an_https_firmware_is_offered_only_to_devices_that_say_https() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let fleet = [
        device("old", "1.0.0", None),
        device("off", "1.0.0", Some(false)),
        device("on", "1.0.0", Some(true)),
        device("current", "1.1.0", Some(true)),
    ];
    let options = RolloutOptions::default();
    let (dep, left) = create(
        &store,
        &fleet,
        &firmware("https://fw.example/app.bin"),
        &Selection::All,
        &options,
    )
    .unwrap();
    let sent: Vec<&str> = dep.devices.iter().map(|d| d.device.as_str()).collect();
    assert_eq!(sent, ["on"]);
    assert_eq!(left.current, ["current"]);
    assert_eq!(left.no_https, ["old", "off"]);
    assert!(left.describe("1.1.0")[1].contains("https is not enabled on: old, off"));

    // Over http every device that needs the update gets it.
    let (dep, left) = plan_deployment(
        &fleet,
        &firmware("http://fw.example/app.bin"),
        &Selection::All,
        &options,
    )
    .unwrap();
    assert_eq!(dep.devices.len(), 3);
    assert!(left.no_https.is_empty());
}

#[test]
fn an_https_firmware_for_devices_without_https_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let fleet = [device("a", "1.0.0", Some(false))];
    let err = create(
        &store,
        &fleet,
        &firmware("HTTPS://fw.example/app.bin"),
        &Selection::Ids(vec!["a".into()]),
        &RolloutOptions::default(),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, RolloutError::NoDevices(_)), "{text}");
    assert!(text.contains("https is not enabled on a"), "{text}");
}

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("d{i:02}")).collect()
}

#[test]
fn twenty_devices_with_canary_2_and_half_batches_make_three_stages() {
    let stages = plan(&ids(20), 2, Amount::Percent(50));
    let sizes: Vec<usize> = stages.iter().map(Vec::len).collect();
    assert_eq!(sizes, [2, 10, 8]);
    assert_eq!(
        stages.concat(),
        ids(20),
        "every device exactly once, in order"
    );
}

#[test]
fn no_canary_and_a_count_batch() {
    let sizes: Vec<usize> = plan(&ids(7), 0, Amount::Count(3))
        .iter()
        .map(Vec::len)
        .collect();
    assert_eq!(sizes, [3, 3, 1]);
    let sizes: Vec<usize> = plan(&ids(3), 5, Amount::Count(3))
        .iter()
        .map(Vec::len)
        .collect();
    assert_eq!(
        sizes,
        [3],
        "a canary larger than the fleet takes everything"
    );
    assert_eq!(
        plan(&ids(3), 0, Amount::Percent(0)).len(),
        3,
        "batches hold at least one"
    );
}

#[test]
fn the_failure_threshold_counts_against_jobs_sent_so_far() {
    // Both canaries of a 20-device fleet failing is 100% of what was
    // tried, far past 10%.
    assert!(too_many_failures(Amount::Percent(10), 2, 2));
    assert!(!too_many_failures(Amount::Percent(10), 1, 12));
    assert!(too_many_failures(Amount::Percent(10), 2, 12));
    assert!(too_many_failures(Amount::Count(0), 1, 20));
    assert!(!too_many_failures(Amount::Count(1), 1, 20));
}

#[test]
fn amounts_read_counts_and_percentages() {
    assert_eq!("5".parse::<Amount>(), Ok(Amount::Count(5)));
    assert_eq!(" 25% ".parse::<Amount>(), Ok(Amount::Percent(25)));
    assert!("101%".parse::<Amount>().is_err());
    assert!("x".parse::<Amount>().is_err());
}

#[test]
fn a_device_in_a_running_deployment_cannot_be_targeted_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let fleet = [device("a", "1.0.0", None), device("b", "1.0.0", None)];
    let fw = firmware("http://fw/app.bin");
    let o = RolloutOptions::default();
    let (first, _) = create(&store, &fleet, &fw, &Selection::Ids(vec!["a".into()]), &o).unwrap();
    let err = create(&store, &fleet, &fw, &Selection::All, &o).unwrap_err();
    assert!(matches!(err, RolloutError::InDeployment(_)), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("a in running deployment {}", first.id)),
        "{err}"
    );
    // b alone is free; once the first ends, a is too.
    create(&store, &fleet, &fw, &Selection::Ids(vec!["b".into()]), &o).unwrap();
    store
        .set_deployment_state(&first.id, DeploymentState::Succeeded, None)
        .unwrap();
    create(&store, &fleet, &fw, &Selection::Ids(vec!["a".into()]), &o).unwrap();
}

#[test]
fn versions_compare_as_semver_without_the_build_suffix() {
    assert!(is_downgrade("1.2.0", "1.1.9"));
    assert!(is_downgrade("1.10.0", "1.9.0"));
    assert!(!is_downgrade("1.9.0", "1.10.0"));
    assert!(!is_downgrade("1.1.0+a", "1.1.0+b"), "build suffix ignored");
    assert!(
        is_downgrade("1.1.0", "1.1.0-rc.1"),
        "a pre-release is older"
    );
    assert!(!is_downgrade("1.1.0-rc.1", "1.1.0"));
    assert!(!is_downgrade("v1.0.0", "1.0.1"));
    assert!(
        is_downgrade("nightly", "1.0.0"),
        "incomparable needs consent"
    );
    assert!(same_version("1.1.0+abc", "1.1.0"));
}

fn view(id: &str, chip: &str, project: &str, version: &str, online: bool) -> DeviceView {
    let json = serde_json::json!({
        "device": id, "chip": chip, "project": project,
        "version": version, "slot": 0, "state": "valid", "last": null,
    });
    DeviceView {
        id: id.into(),
        status: Some(serde_json::from_value::<Status>(json).unwrap()),
        online,
        progress: None,
        ended: Vec::new(),
        in_flight: None,
    }
}

#[test]
fn an_unsigned_image_is_not_sent_to_devices_that_take_only_signed_ones() {
    let mut strict = view("strict", "esp32c3", "p", "1.0.0", true);
    strict.status.as_mut().unwrap().signed_only = true;
    let fleet = [strict, view("open", "esp32c3", "p", "1.0.0", true)];
    let o = RolloutOptions::default();
    let unsigned = Firmware {
        signers: Some(Vec::new()),
        ..firmware("http://fw/app.bin")
    };
    let (dep, left) = plan_deployment(&fleet, &unsigned, &Selection::All, &o).unwrap();
    let sent: Vec<&str> = dep.devices.iter().map(|d| d.device.as_str()).collect();
    assert_eq!(sent, ["open"]);
    assert_eq!(left.unsigned, ["strict"]);
    let text = left.describe("1.1.0").join("\n");
    assert!(text.contains("take only signed images"), "{text}");
    // Signed (by any key: the status does not name the trusted ones).
    let signed = Firmware {
        signers: Some(vec!["ab".repeat(32)]),
        ..firmware("http://fw/app.bin")
    };
    let (dep, _) = plan_deployment(&fleet, &signed, &Selection::All, &o).unwrap();
    assert_eq!(dep.devices.len(), 2);
}

#[test]
fn chip_project_version_and_offline_devices_are_checked_before_sending() {
    let fleet = [
        view("ok", "esp32c3", "p", "1.0.0", true),
        view("c6", "esp32c6", "p", "1.0.0", true),
        view("other", "esp32c3", "q", "1.0.0", true),
        view("newer", "esp32c3", "p", "2.0.0", true),
        view("off", "esp32c3", "p", "1.0.0", false),
    ];
    let fw = firmware("http://fw/app.bin");
    let o = RolloutOptions::default();
    let (dep, left) = plan_deployment(&fleet, &fw, &Selection::All, &o).unwrap();
    let sent: Vec<&str> = dep.devices.iter().map(|d| d.device.as_str()).collect();
    assert_eq!(sent, ["ok"]);
    assert_eq!(left.wrong_chip, ["c6"]);
    assert_eq!(left.other_project, ["other"]);
    assert_eq!(left.downgrade, ["newer"]);
    assert_eq!(left.offline, ["off"]);
    let text = left.describe("1.1.0").join("\n");
    assert!(text.contains("1 offline device(s) skipped"), "{text}");

    // Consent: every device of the right chip goes.
    let o = RolloutOptions {
        include_offline: true,
        allow_downgrade: true,
        allow_other_project: true,
        ..RolloutOptions::default()
    };
    let (dep, left) = plan_deployment(&fleet, &fw, &Selection::All, &o).unwrap();
    assert_eq!(dep.devices.len(), 4);
    assert_eq!(left.wrong_chip, ["c6"], "a chip mismatch is never sent");

    // --to an offline device is refused, naming it.
    let to_off = Selection::Ids(vec!["ok".into(), "off".into()]);
    let err = plan_deployment(&fleet, &fw, &to_off, &RolloutOptions::default()).unwrap_err();
    assert!(
        matches!(err, RolloutError::Offline(ref ids) if ids == "off"),
        "{err}"
    );
    assert!(err.to_string().contains("--include-offline"), "{err}");
    // --to a device of another chip: nothing to do, with the reason.
    let err = plan_deployment(
        &fleet,
        &fw,
        &Selection::Ids(vec!["c6".into()]),
        &RolloutOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("another chip"), "{err}");
}

#[test]
fn done_is_believed_only_from_the_retained_status() {
    let mut d = view("a", "esp32c3", "p", "1.0.0", true);
    let event = |job: &str, phase: &str, error: Option<&str>| {
        serde_json::from_value::<mqota_core::protocol::Progress>(serde_json::json!({
            "device": "a", "job": job, "phase": phase, "bytes": 0, "total": null,
            "percent": 100, "error": error, "message": null
        }))
        .unwrap()
    };
    d.ended.push(event("j", "done", None));
    assert_eq!(result_of(&d, "j", "1.1.0"), None, "a bare done");
    let mut st = d.status.clone().unwrap();
    st.last = Some(mqota_core::protocol::LastResult {
        job: Some("j".try_into().unwrap()),
        result: Phase::Done,
        error: None,
    });
    d.status = Some(st.clone());
    assert_eq!(result_of(&d, "j", "1.1.0"), None, "done but not running it");
    st.version = "1.1.0+build7".try_into().unwrap();
    d.status = Some(st);
    assert_eq!(result_of(&d, "j", "1.1.0"), Some((Phase::Done, None)));

    let mut d = view("a", "esp32c3", "p", "1.0.0", true);
    d.ended.push(event("j", "failed", Some("http_status")));
    d.ended.push(event("k", "failed", Some("busy")));
    assert_eq!(
        result_of(&d, "j", "1.1.0"),
        Some((Phase::Failed, Some("http_status".into()))),
        "a later refusal does not hide the failure"
    );

    // `busy` for this job: an answer while another job runs, nothing
    // while this one does (a redelivered start).
    let mut d = view("a", "esp32c3", "p", "1.0.0", true);
    d.ended.push(event("j", "failed", Some("busy")));
    d.in_flight = Some("other".into());
    assert_eq!(
        result_of(&d, "j", "1.1.0"),
        Some((Phase::Failed, Some("busy".into())))
    );
    d.in_flight = Some("j".into());
    assert_eq!(result_of(&d, "j", "1.1.0"), None);
    d.ended = vec![event("j", "failed", Some("duplicate_job"))];
    assert_eq!(result_of(&d, "j", "1.1.0"), None);
    // a signed start redelivered while it runs carries a used sequence
    d.ended = vec![event("j", "failed", Some("replayed"))];
    assert_eq!(result_of(&d, "j", "1.1.0"), None);
    d.in_flight = None;
    assert_eq!(
        result_of(&d, "j", "1.1.0"),
        Some((Phase::Failed, Some("replayed".into()))),
        "a replay refused with nothing in flight ends the job"
    );
}

#[test]
fn where_refuses_unknown_keys() {
    assert!(Selection::parse_where("chip=esp32c3, version=1.0.0").is_ok());
    assert!(matches!(
        Selection::parse_where("colour=red"),
        Err(RolloutError::Option(_))
    ));
}

//! A controller that dies in the middle of an automatic rollback, resumed:
//! real Mosquitto, real virtual devices, the rollout library as `deploy`
//! drives it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use mqota_controller::fleet::Fleet;
use mqota_controller::rollout::{
    self, Amount, Firmware, Observer, RolloutOptions, Selection, Silent,
};
use mqota_controller::store::{DeploymentState, DeviceState, Store};
use mqota_controller::url::BrokerUrl;
use mqota_core::image::{Chip, ImageBuilder};
use mqota_virtual::device::{self, VirtualConfig};
use mqota_virtual::testing::{observe_on, wait_until_async, FileServer, Mosquitto};
use sha2::Digest;

/// Dies (panics, which drops the rollout mid-flight as a killed process
/// would stop it) when asked to roll back its second device, after giving
/// the first rollback time to leave.
struct DieOnSecondRollback {
    seen: usize,
}

impl Observer for DieOnSecondRollback {
    fn rolling_back(&mut self, _device: &str) {
        self.seen += 1;
        if self.seen == 2 {
            std::thread::sleep(Duration::from_millis(500));
            panic!("controller killed in the middle of the rollback");
        }
    }
}

fn device(id: &str, chip: Chip, port: u16) -> VirtualConfig {
    let mut c = VirtualConfig::new(id, "127.0.0.1", port);
    c.chip = chip;
    c.health_timeout = Duration::from_secs(3);
    c.progress_interval = Duration::from_millis(100);
    c.watchdog = Duration::from_millis(500);
    c.keep_alive_secs = 10;
    c
}

async fn wait_fleet(fleet: &Fleet, what: &str, check: impl Fn(&BTreeMap<String, String>) -> bool) {
    let versions = || {
        let online: BTreeMap<String, String> = fleet
            .devices()
            .into_iter()
            .filter_map(|d| {
                let s = d.status?;
                d.online.then(|| (d.id.clone(), s.version.to_string()))
            })
            .collect();
        std::future::ready(online)
    };
    let (within, every) = (Duration::from_secs(60), Duration::from_millis(200));
    wait_until_async(&format!("the fleet {what}"), within, every, versions, check).await;
}

#[test]
fn a_rollout_killed_mid_rollback_is_finished_by_resume_without_a_second_rollback_to_anyone() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let broker = Mosquitto::start();
        let port = broker.port();
        let url: BrokerUrl = format!("mqtt://127.0.0.1:{port}").parse().unwrap();
        let img = ImageBuilder::new(Chip::Esp32c3)
            .version("1.1.0")
            .project("mqota-virtual")
            .size(64 * 1024)
            .build()
            .unwrap();
        let files = FileServer::start(&[("app.bin", &img)]).await;
        let firmware = Firmware {
            name: "app.bin".into(),
            url: files.url("app.bin"),
            version: "1.1.0".into(),
            sha256: hex::encode(sha2::Sha256::digest(&img)),
            size: img.len() as u32,
            // Unknown to the controller, so device c (another chip) is sent
            // the job and refuses it itself.
            chip: None,
            project: None,
            signers: None,
        };

        // Two devices that take the image, then one of another chip that
        // refuses it: the rollout stops after the second stage and rolls
        // back the first two.
        let _a = device::spawn(device("a", Chip::Esp32c3, port));
        let _b = device::spawn(device("b", Chip::Esp32c3, port));
        let _c = device::spawn(device("c", Chip::Esp32c6, port));
        let rollbacks = observe_on(port, "device/+/ota/rollback").await;

        let data = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(data.path()).unwrap());
        let fleet = Fleet::connect(&url, "device", "ctl-1").await.unwrap();
        wait_fleet(&fleet, "came online", |v| {
            v.len() == 3 && v.values().all(|x| x == "1.0.0")
        })
        .await;
        let options = RolloutOptions {
            canary: 2,
            batch: Amount::Count(1),
            max_failures: Amount::Count(0),
            auto_rollback: true,
            timeout_s: 60,
            ..RolloutOptions::default()
        };
        let ids = Selection::Ids(vec!["a".into(), "b".into(), "c".into()]);
        let (dep, _) =
            rollout::create(&store, &fleet.devices(), &firmware, &ids, &options).unwrap();
        let id = dep.id.clone();

        let (st, id2) = (store.clone(), id.clone());
        let killed = tokio::task::spawn_local(async move {
            let mut obs = DieOnSecondRollback { seen: 0 };
            let _ = rollout::run(&fleet, &st, &id2, &mut obs).await;
        })
        .await;
        assert!(killed.is_err(), "the first controller must have died");

        // What the dead controller left: the stop decided and stored, one
        // rollback sent, one not.
        let d = store.deployment(&id).unwrap();
        assert_eq!(d.state, DeploymentState::Running, "{d:#?}");
        assert!(
            d.reason.as_deref().is_some_and(|r| r.contains("1 of 3")),
            "{d:#?}"
        );
        let by_id = |d: &mqota_controller::store::Deployment, dev: &str| {
            let x = d.devices.iter().find(|x| x.device == dev).unwrap().clone();
            (x.state, x.error)
        };
        assert_eq!(by_id(&d, "a"), (DeviceState::RollbackSent, None));
        assert_eq!(by_id(&d, "b"), (DeviceState::Done, None));
        assert_eq!(by_id(&d, "c").0, DeviceState::Failed);

        // A new controller resumes the deployment.
        let fleet = Fleet::connect(&url, "device", "ctl-2").await.unwrap();
        fleet
            .settle(Duration::from_millis(400), Duration::from_secs(5))
            .await;
        let d = rollout::run(&fleet, &store, &id, &mut Silent)
            .await
            .unwrap();
        assert_eq!(d.state, DeploymentState::Failed, "{d:#?}");
        assert!(d.reason.as_deref().unwrap().contains("1 of 3"), "{d:#?}");
        assert_eq!(by_id(&d, "a").0, DeviceState::Reverted, "{d:#?}");
        assert_eq!(by_id(&d, "b").0, DeviceState::Reverted, "{d:#?}");
        assert_eq!(by_id(&d, "c").0, DeviceState::Failed, "{d:#?}");

        // Both run the old version, and stay there: a second rollback to
        // `a` would have booted 1.1.0 again.
        wait_fleet(&fleet, "went back to 1.0.0", |v| {
            v.len() == 3 && v.values().all(|x| x == "1.0.0")
        })
        .await;
        // A marker rollback from the same client: the broker delivers one
        // client's messages in order, so once it is seen, every rollback the
        // resumed run sent before it has been seen too.
        const MARKER: &str = "device/zz-marker/ota/rollback";
        fleet.rollback("zz-marker", None).await.unwrap();
        assert!(
            rollbacks
                .wait_until(Duration::from_secs(10), |s| s
                    .iter()
                    .any(|r| r.topic == MARKER))
                .await,
            "the marker rollback never arrived"
        );
        let sent: Vec<String> = rollbacks
            .all()
            .into_iter()
            .map(|r| r.topic)
            .filter(|t| t != MARKER)
            .collect();
        assert_eq!(
            sent,
            ["device/a/ota/rollback", "device/b/ota/rollback"],
            "each updated device gets exactly one rollback"
        );
        wait_fleet(&fleet, "stayed on 1.0.0", |v| {
            v.len() == 3 && v.values().all(|x| x == "1.0.0")
        })
        .await;
        let _ = fleet.close().await;
    });
}

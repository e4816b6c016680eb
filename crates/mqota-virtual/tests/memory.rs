//! A virtual device's 4 MiB flash costs memory only for what the device
//! wrote: devices of one process share the provisioned image (partition
//! table and first firmware) copy-on-write, so thousands fit in one process.

use std::time::Duration;

use mqota_core::image::{Chip, ImageBuilder};
use mqota_core::protocol::Status;
use mqota_virtual::device::{spawn, Handle, VirtualConfig, FLASH_SIZE};
use mqota_virtual::testing::{FileServer, Mosquitto, Received};
use tokio::task::LocalSet;

const DEVICES: usize = 20;
const IMAGE: u32 = 256 * 1024;

fn version_of(seen: &[Received], id: &str) -> Option<String> {
    seen.iter()
        .rev()
        .find(|r| r.topic == format!("device/{id}/status"))
        .and_then(|r| serde_json::from_slice::<Status>(&r.payload).ok())
        .map(|s| s.version.as_str().to_owned())
}

#[tokio::test(flavor = "current_thread")]
async fn idle_devices_hold_only_the_sectors_they_wrote_and_an_update_adds_only_its_image() {
    let broker = Mosquitto::start();
    let obs = broker.observe("device/+/status").await;
    LocalSet::new()
        .run_until(async {
            let ids: Vec<String> = (0..DEVICES).map(|i| format!("mem-{i}")).collect();
            let handles: Vec<Handle> = ids
                .iter()
                .map(|id| spawn(VirtualConfig::new(id, "127.0.0.1", broker.port())))
                .collect();
            assert!(
                obs.wait_until(Duration::from_secs(30), |s| ids
                    .iter()
                    .all(|id| version_of(s, id).as_deref() == Some("1.0.0")))
                    .await,
                "not every device came up on 1.0.0"
            );
            let idle: Vec<usize> = handles.iter().map(Handle::flash_private_bytes).collect();
            let max = *idle.iter().max().unwrap();
            eprintln!(
                "idle: each device's flash holds {} to {max} bytes of its own (of {FLASH_SIZE})",
                idle.iter().min().unwrap()
            );
            // A few sectors (boot record in the field log, trust state), not
            // the 4 MiB a dense flash would cost.
            assert!(max <= 64 * 1024, "an idle device holds {max} bytes");

            // One device updates: it gains about the image, the others nothing.
            let image = ImageBuilder::new(Chip::Esp32c3)
                .version("1.1.0")
                .project("mqota-virtual")
                .size(IMAGE)
                .build()
                .unwrap();
            let files = FileServer::start(&[("app.bin", &image)]).await;
            broker
                .publish(
                    "device/mem-0/ota/start",
                    files.url("app.bin").as_bytes(),
                    false,
                )
                .await;
            assert!(
                obs.wait_until(Duration::from_secs(60), |s| version_of(s, "mem-0")
                    .as_deref()
                    == Some("1.1.0"))
                    .await,
                "mem-0 never reported 1.1.0"
            );
            let updated = handles[0].flash_private_bytes();
            eprintln!("after a {IMAGE}-byte update: {updated} bytes of its own");
            assert!(
                (IMAGE as usize..=IMAGE as usize + 128 * 1024).contains(&updated),
                "the updated device holds {updated} bytes"
            );
            for (h, id) in handles.iter().zip(&ids).skip(1) {
                assert!(
                    h.flash_private_bytes() <= max,
                    "{id} grew to {} bytes while another device updated",
                    h.flash_private_bytes()
                );
            }
            handles.iter().for_each(Handle::stop);
        })
        .await;
}

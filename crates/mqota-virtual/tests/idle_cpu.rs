//! Idle virtual devices cost next to no CPU, however many share a process:
//! each waits on its own timers (MQTT keep-alive) and sockets, and nothing
//! wakes it before its time. With embassy-time's stock std driver, whose
//! timer queue holds 128 timers and wakes the one it evicts, a few hundred
//! devices woke each other in a busy loop; two 100 ms polling timers per
//! device (power and link checks) added 20 wake-ups a second each.

use std::time::{Duration, Instant};

use mqota_core::protocol::Status;
use mqota_virtual::device::{spawn, Handle, VirtualConfig};
use mqota_virtual::testing::{Mosquitto, Received};
use tokio::task::LocalSet;

/// Well past the stock queue's 128 entries.
const DEVICES: usize = 300;

fn online_on_1_0_0(seen: &[Received], id: &str) -> bool {
    seen.iter()
        .rev()
        .find(|r| r.topic == format!("device/{id}/status"))
        .and_then(|r| serde_json::from_slice::<Status>(&r.payload).ok())
        .is_some_and(|s| s.version.as_str() == "1.0.0")
}

/// CPU time (user and system) this process has used, from
/// `/proc/self/stat` (clock ticks of 1/100 s).
fn cpu_s() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = s[s.rfind(')').unwrap() + 2..].split_whitespace().collect();
    (f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()) as f64 / 100.0
}

#[tokio::test(flavor = "current_thread")]
async fn hundreds_of_idle_devices_in_one_process_use_almost_no_cpu() {
    let broker = Mosquitto::start();
    let obs = broker.observe("device/+/status").await;
    LocalSet::new()
        .run_until(async {
            let ids: Vec<String> = (0..DEVICES).map(|i| format!("idle-{i}")).collect();
            let handles: Vec<Handle> = ids
                .iter()
                .map(|id| spawn(VirtualConfig::new(id, "127.0.0.1", broker.port())))
                .collect();
            assert!(
                obs.wait_until(Duration::from_secs(60), |s| ids
                    .iter()
                    .all(|id| online_on_1_0_0(s, id)))
                    .await,
                "not every device came up on 1.0.0"
            );
            // Let the start-up settle (subscriptions, retained replays).
            tokio::time::sleep(Duration::from_secs(1)).await;
            let (cpu0, t0) = (cpu_s(), Instant::now());
            tokio::time::sleep(Duration::from_secs(3)).await;
            let (cpu, wall) = (cpu_s() - cpu0, t0.elapsed().as_secs_f64());
            eprintln!("{DEVICES} idle devices used {cpu:.2} CPU-s in {wall:.1} s");
            // Idle, the whole process (devices, the test's own MQTT
            // observer, the runtime) needs a few hundredths of a CPU-second;
            // a busy loop takes whatever the machine gives it, even on a
            // loaded one far more than this.
            assert!(
                cpu < 0.15 * wall,
                "{DEVICES} idle devices used {cpu:.2} CPU-s in {wall:.1} s"
            );
            handles.iter().for_each(Handle::stop);
        })
        .await;
}

//! Many virtual devices on a thread of their own: what `mqota demo`, `mqota
//! sim`, the controller's tests and the browser tests run, through one type.
//!
//! The device runtime is `!Send` (it is the firmware's single-core code), so
//! devices share one current-thread tokio runtime and `LocalSet` on a thread
//! the fleet owns; the caller keeps its own runtime, sync or async.
//! [`VirtualFleet::stop`] stops every device and waits until each task has
//! ended (its sockets closed, so the broker sees it go), then returns the
//! boots each device went through.

use std::io;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::device::{spawn_task, BootRecord, Handle, VirtualConfig};

/// Each device's id and the boots it went through, oldest first.
pub type Boots = Vec<(String, Vec<BootRecord>)>;

/// How long [`VirtualFleet::stop`] waits for a device to reach an await
/// point and end; a device still running after that is abandoned (its boots
/// are still reported).
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Virtual devices running on their own thread; stopped when dropped.
#[derive(Debug)]
pub struct VirtualFleet {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Boots>>,
}

impl VirtualFleet {
    /// Starts one device per configuration, each from power-on.
    pub fn start(configs: Vec<VirtualConfig>) -> io::Result<Self> {
        Self::start_with(configs, |_| {})
    }

    /// [`VirtualFleet::start`], then `on_start` with the devices' handles,
    /// on the fleet's thread: there it may inject faults and spawn local
    /// tasks that drive them (handles are `!Send`, like the devices).
    pub fn start_with<F>(configs: Vec<VirtualConfig>, on_start: F) -> io::Result<Self>
    where
        F: FnOnce(Vec<Handle>) + Send + 'static,
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("mqota-virtual-fleet".into())
            .spawn(move || {
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, async move {
                    let devices: Vec<_> = configs
                        .into_iter()
                        .map(|c| {
                            let id = c.id.clone();
                            let (handle, task) = spawn_task(c);
                            (id, handle, task)
                        })
                        .collect();
                    on_start(devices.iter().map(|(_, h, _)| h.clone()).collect());
                    // A dropped sender stops the fleet as a sent `()` does.
                    let _ = stopped.await;
                    for (_, handle, _) in &devices {
                        handle.stop();
                    }
                    let mut boots = Vec::with_capacity(devices.len());
                    for (id, handle, task) in devices {
                        if tokio::time::timeout(STOP_GRACE, task).await.is_err() {
                            log::warn!("{id}: still running {STOP_GRACE:?} after stop");
                        }
                        boots.push((id, handle.boots()));
                    }
                    boots
                })
            })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stops every device, waits for each to end, and returns their boots.
    pub fn stop(mut self) -> Boots {
        self.finish()
    }

    fn finish(&mut self) -> Boots {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.thread
            .take()
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Drop for VirtualFleet {
    fn drop(&mut self) {
        self.finish();
    }
}

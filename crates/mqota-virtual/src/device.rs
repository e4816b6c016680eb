//! A virtual ESP32: the device runtime of `mqota-runtime`, unchanged, on a
//! simulated NOR flash with the real ESP-IDF layout, booted by the model of
//! the ESP-IDF bootloader, talking to a real broker over tokio sockets.
//!
//! A reboot is real in the sense that matters: the runtime's future is
//! dropped, the bootloader model picks a slot from the flash, and the device
//! comes back up running "the firmware in that slot": it reports the version
//! from that image's app descriptor, and the image decides how the firmware
//! behaves:
//!
//! | version ends in | behaviour |
//! |---|---|
//! | `+crash` | dies during a trial boot, right after the boot guard's first step |
//! | `+hang` | never gets going on a trial boot; the trial watchdog resets it |
//! | `+unhealthy` | runs, but its health check fails |
//!
//! Faults on request ([`Handle`]): drop the WiFi link for a while (open TCP
//! connections die and new ones are refused), cut the power now or after a
//! number of flash operations (the flash keeps what the cut left, the network
//! goes dead at the same instant).

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration as StdDuration;

use embedded_storage::nor_flash::{ErrorType, MultiwriteNorFlash, NorFlash, ReadNorFlash};
use mqota_core::bootguard::Verdict;
use mqota_core::image::{Chip, ImageBuilder};
use mqota_core::partition::{PartitionTable, DEFAULT_4MB_CSV, TABLE_OFFSET};
use mqota_core::protocol::envelope::{JobKey, JobTrust};
use mqota_core::signature::{KeyDigest, SoftVerifier, TrustPolicy};
use mqota_flash_sim::nor::Backing;
use mqota_flash_sim::{BootConfig, Bootloader, FileStore, Memory, SimError, SimFlash};
use mqota_runtime::{early_boot, BootReason, DeviceConfig, Link, Platform};
use tokio::sync::Notify;

use crate::net::{TlsFiles, VirtualConnector, VirtualNet};
use mqota_runtime::{TlsBuffers, TlsSetup};

/// Flash size of every virtual device: 4 MiB, as on most ESP32-C3 modules.
pub const FLASH_SIZE: usize = 4 * 1024 * 1024;

/// How a virtual device is set up.
///
/// The device settings (prefix, timeouts, keep-alive) start as the runtime's
/// defaults, [`DeviceConfig::new`], so a virtual device behaves like the
/// firmware unless a test or the CLI changes one; [`VirtualConfig::device_config`]
/// is what the runtime then gets.
#[derive(Debug, Clone)]
pub struct VirtualConfig {
    /// Device id (MQTT client id and topic level).
    pub id: String,
    /// Flash file; `None` keeps the flash in memory.
    pub flash: Option<PathBuf>,
    /// The chip the device is.
    pub chip: Chip,
    /// Version of the image put into `ota_0` when the flash is created.
    pub initial_version: String,
    /// Size of that image.
    pub initial_size: u32,
    /// Which bootloader build boots the device.
    pub bootloader: BootConfig,
    /// Broker host.
    pub broker_host: String,
    /// Broker port.
    pub broker_port: u16,
    /// Reach the broker over TLS (`mqtts://`, [`DeviceConfig::broker_tls`]);
    /// needs [`VirtualConfig::tls`].
    pub broker_tls: bool,
    /// The fleet CA the device pins and its client certificate and key;
    /// with them the device fetches `https://` and can reach an `mqtts://`
    /// broker, without them it refuses `https://` jobs.
    pub tls: Option<TlsFiles>,
    /// MQTT user name ([`DeviceConfig::username`]); brokers with per-device
    /// logins want the device id.
    pub username: Option<String>,
    /// MQTT password ([`DeviceConfig::password`]).
    pub password: Option<Password>,
    /// Topic prefix ([`DeviceConfig::prefix`]).
    pub prefix: String,
    /// Health check budget of a trial boot ([`DeviceConfig::health_timeout`]).
    pub health_timeout: StdDuration,
    /// Overall update deadline ([`DeviceConfig::update_timeout`]).
    pub update_timeout: StdDuration,
    /// Download stall timeout ([`DeviceConfig::stall_timeout`]).
    pub stall_timeout: StdDuration,
    /// Progress throttle ([`DeviceConfig::progress_interval`]).
    pub progress_interval: StdDuration,
    /// How long a hung trial boot runs before the watchdog resets it (the
    /// virtual board's own setting; the runtime has none).
    pub watchdog: StdDuration,
    /// MQTT keep-alive ([`DeviceConfig::keep_alive_secs`]).
    pub keep_alive_secs: u16,
    /// Also publish progress on the shared `{prefix}/progress`
    /// ([`DeviceConfig::progress_copy`]).
    pub progress_copy: bool,
    /// Digests of the signing keys the device trusts (at most three); with
    /// any, it activates only images one of them signed
    /// ([`DeviceConfig::trust`], checked in software).
    pub trusted_keys: Vec<KeyDigest>,
    /// The key commands must be signed with; with one the device refuses
    /// unsigned commands ([`DeviceConfig::job_trust`], checked in software).
    pub job_key: Option<JobKey>,
    /// `project_name` of the initial image (`mqota-virtual`).
    pub initial_project: String,
    /// `secure_version` of the initial image (0).
    pub initial_secure_version: u32,
}

impl VirtualConfig {
    /// A device on `broker_host:broker_port` with an in-memory flash holding
    /// 1.0.0 for the ESP32-C3 and the stock bootloader, and the runtime's
    /// default device settings.
    pub fn new(id: &str, broker_host: &str, broker_port: u16) -> Self {
        let defaults = DeviceConfig::new(broker_host, broker_port);
        Self {
            id: id.to_string(),
            flash: None,
            chip: Chip::Esp32c3,
            initial_version: "1.0.0".to_string(),
            initial_size: 128 * 1024,
            bootloader: BootConfig::Stock,
            broker_host: broker_host.to_string(),
            broker_port,
            broker_tls: false,
            tls: None,
            username: None,
            password: None,
            prefix: defaults.prefix.to_string(),
            health_timeout: to_std(defaults.health_timeout),
            update_timeout: to_std(defaults.update_timeout),
            stall_timeout: to_std(defaults.stall_timeout),
            progress_interval: to_std(defaults.progress_interval),
            watchdog: StdDuration::from_secs(3),
            keep_alive_secs: defaults.keep_alive_secs,
            progress_copy: defaults.progress_copy,
            trusted_keys: Vec::new(),
            job_key: None,
            initial_project: "mqota-virtual".to_string(),
            initial_secure_version: 0,
        }
    }

    /// What the runtime gets: [`DeviceConfig::new`] with this device's
    /// broker, prefix, timeouts, keep-alive and progress copy, and a jitter seed derived
    /// from the id (devices started together must not retry in step).
    pub fn device_config(&self) -> DeviceConfig<'_> {
        let mut d = DeviceConfig::new(&self.broker_host, self.broker_port);
        d.broker_tls = self.broker_tls;
        d.username = self.username.as_deref();
        d.password = self.password.as_ref().map(|p| p.0.as_bytes());
        d.prefix = &self.prefix;
        d.health_timeout = to_embassy(self.health_timeout);
        d.update_timeout = to_embassy(self.update_timeout);
        d.stall_timeout = to_embassy(self.stall_timeout);
        d.progress_interval = to_embassy(self.progress_interval);
        d.keep_alive_secs = self.keep_alive_secs;
        d.progress_copy = self.progress_copy;
        if !self.trusted_keys.is_empty() {
            d.trust = TrustPolicy::new(&self.trusted_keys, SoftVerifier::INSTANCE);
        }
        d.job_trust = self
            .job_key
            .map(|k| JobTrust::new(k, SoftVerifier::INSTANCE));
        d.seed = self.id.bytes().fold(0x811c_9dc5u32, |h, b| {
            (h ^ b as u32).wrapping_mul(0x0100_0193)
        });
        d
    }
}

/// An MQTT password; its `Debug` output is `"<redacted>"`, so a logged
/// [`VirtualConfig`] never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// Wraps a password (one trailing newline, as a file written by an
    /// editor or `echo` ends, is dropped).
    pub fn new(s: impl Into<String>) -> Self {
        let mut s = s.into();
        if s.ends_with('\n') {
            s.pop();
            if s.ends_with('\r') {
                s.pop();
            }
        }
        Password(s)
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

fn to_std(d: embassy_time::Duration) -> StdDuration {
    StdDuration::from_micros(d.as_micros())
}

fn to_embassy(d: StdDuration) -> embassy_time::Duration {
    embassy_time::Duration::from_micros(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// What one boot of a virtual device was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootRecord {
    /// Slot booted, `None` when nothing was bootable.
    pub slot: Option<usize>,
    /// Version of the image booted.
    pub version: Option<String>,
}

#[derive(Debug, Clone, Copy)]
enum Cut {
    Ops(u64),
    Bytes(u64),
}

/// Shared between a running device and whoever controls it.
#[derive(Debug, Default)]
struct Shared {
    powered: Cell<bool>,
    link_up: Cell<bool>,
    /// Bumped on every link drop: connections opened before it are dead.
    link_epoch: Cell<u64>,
    cut: Cell<Option<Cut>>,
    stopped: Cell<bool>,
    boots: RefCell<Vec<BootRecord>>,
    /// Flash writes and erases the device started, over all its boots,
    /// outside the field log's partition.
    flash_ops: Cell<u64>,
    /// Flash writes and erases in the field log's partition.
    log_ops: Cell<u64>,
    /// Where the field log's partition is, once the flash is open.
    log_range: Cell<Option<(u32, u32)>>,
    /// Bytes the flash holds beyond the shared image, after the last
    /// write or erase.
    flash_bytes: Cell<usize>,
    /// Notified whenever the power, the link or `stopped` changes: what
    /// waits on one of them sleeps until then instead of polling.
    wake: Notify,
}

/// Controls a running virtual device (faults, stop) and reads its boots.
#[derive(Debug, Clone)]
pub struct Handle(Rc<Shared>);

impl Default for Handle {
    fn default() -> Self {
        Self::new()
    }
}

impl Handle {
    /// A handle for a device not yet started.
    pub fn new() -> Self {
        let s = Shared::default();
        s.powered.set(true);
        s.link_up.set(true);
        Handle(Rc::new(s))
    }

    /// Cut the power now; the device boots again at once.
    pub fn cut_power(&self) {
        self.0.powered.set(false);
        self.0.wake.notify_waiters();
    }

    /// Cut the power when `n` more flash writes/erases have completed, as the
    /// next one starts.
    pub fn cut_power_after_ops(&self, n: u64) {
        self.0.cut.set(Some(Cut::Ops(n)));
    }

    /// Cut the power when `n` more bytes have been programmed or erased: the
    /// operation that crosses the budget is torn (a half-written page, a
    /// half-erased sector).
    pub fn cut_power_after_bytes(&self, n: u64) {
        self.0.cut.set(Some(Cut::Bytes(n)));
    }

    /// Drop the WiFi link: open connections die, new ones are refused until
    /// [`Handle::restore_link`].
    pub fn drop_link(&self) {
        self.0.link_up.set(false);
        self.0.link_epoch.set(self.0.link_epoch.get() + 1);
        self.0.wake.notify_waiters();
    }

    /// Bring the WiFi link back.
    pub fn restore_link(&self) {
        self.0.link_up.set(true);
        self.0.wake.notify_waiters();
    }

    /// Stop the device (at its next await point).
    pub fn stop(&self) {
        self.0.stopped.set(true);
        self.0.wake.notify_waiters();
    }

    /// Every boot so far, oldest first.
    pub fn boots(&self) -> Vec<BootRecord> {
        self.0.boots.borrow().clone()
    }

    /// Flash writes and erases the device (firmware and bootloader) has
    /// started so far, over all its boots, outside the field log: what the
    /// update path wears.
    pub fn flash_ops(&self) -> u64 {
        self.0.flash_ops.get()
    }

    /// Flash writes and erases in the field log's `log` partition, over all
    /// boots.
    pub fn log_flash_ops(&self) -> u64 {
        self.0.log_ops.get()
    }

    /// Bytes of memory the device's flash holds for itself, as of its last
    /// write or erase: the sectors it changed since it was provisioned
    /// ([`SimFlash::private_bytes`]). The provisioned image is shared by
    /// every in-memory device of the process with the same initial image,
    /// and not counted.
    pub fn flash_private_bytes(&self) -> usize {
        self.0.flash_bytes.get()
    }

    pub(crate) fn powered(&self) -> bool {
        self.0.powered.get()
    }

    pub(crate) fn link(&self) -> (bool, u64) {
        (self.0.link_up.get(), self.0.link_epoch.get())
    }

    /// Completes at the next change of the power, the link or a stop (for
    /// a caller that checked them in the same poll: the executor is single
    /// threaded, so no change slips in between).
    pub(crate) async fn changed(&self) {
        self.0.wake.notified().await;
    }
}

/// The flash of a virtual device: in memory or file-backed.
pub enum DeviceFlash {
    /// Kept in memory: copy-on-write over the provisioned image, which all
    /// in-memory devices of the process with the same initial image share
    /// (see [`DeviceFlash::open`]).
    Memory(SimFlash<Memory>),
    /// Kept in a file that survives the process.
    File(SimFlash<FileStore>),
}

impl DeviceFlash {
    /// The `log` partition of the flash's table, if it has one.
    fn log_range(&mut self) -> Option<(u32, u32)> {
        let table = match self {
            DeviceFlash::Memory(f) => PartitionTable::read_from(f, TABLE_OFFSET),
            DeviceFlash::File(f) => PartitionTable::read_from(f, TABLE_OFFSET),
        }
        .ok()?;
        let p = table.find(mqota_runtime::fieldlog::LOG_PARTITION)?;
        Some((p.offset, p.offset + p.size))
    }

    fn private_bytes(&self) -> usize {
        match self {
            DeviceFlash::Memory(f) => f.private_bytes(),
            DeviceFlash::File(f) => f.private_bytes(),
        }
    }

    fn is_powered(&self) -> bool {
        match self {
            DeviceFlash::Memory(f) => f.is_powered(),
            DeviceFlash::File(f) => f.is_powered(),
        }
    }
    fn power_on(&mut self) {
        match self {
            DeviceFlash::Memory(f) => f.power_on(),
            DeviceFlash::File(f) => f.power_on(),
        }
    }
    fn arm(&mut self, cut: Cut) {
        match (self, cut) {
            (DeviceFlash::Memory(f), Cut::Ops(n)) => f.cut_power_after_ops(n),
            (DeviceFlash::Memory(f), Cut::Bytes(n)) => f.cut_power_after_bytes(n),
            (DeviceFlash::File(f), Cut::Ops(n)) => f.cut_power_after_ops(n),
            (DeviceFlash::File(f), Cut::Bytes(n)) => f.cut_power_after_bytes(n),
        }
    }
    /// Creates or opens the flash of `cfg`; a new flash gets the default
    /// partition table and the initial image in `ota_0`.
    ///
    /// An in-memory flash starts as a copy-on-write view of that provisioned
    /// image, which is made once per process for each initial image (chip,
    /// version, project, secure version, size) and shared by every device
    /// that has it: a device then costs only the sectors it writes, a few
    /// KiB while idle instead of 4 MiB.
    pub fn open(cfg: &VirtualConfig) -> std::io::Result<Self> {
        let failed = |e| std::io::Error::other(format!("provisioning the flash: {e}"));
        match &cfg.flash {
            None => Ok(DeviceFlash::Memory(SimFlash::from_shared(
                provisioned(cfg).map_err(failed)?,
            ))),
            Some(path) => {
                let fresh = !path.exists();
                let mut flash = SimFlash::open_file(path, FLASH_SIZE, false)?;
                if fresh {
                    provision(&mut flash, cfg).map_err(failed)?;
                }
                Ok(DeviceFlash::File(flash))
            }
        }
    }
}

/// What sets a provisioned image apart.
type ImageKey = (Chip, String, String, u32, u32);

/// The provisioned flash image for `cfg`'s initial image, shared while any
/// device holds it.
fn provisioned(cfg: &VirtualConfig) -> Result<Arc<[u8]>, String> {
    static IMAGES: Mutex<Vec<(ImageKey, Weak<[u8]>)>> = Mutex::new(Vec::new());
    let key = (
        cfg.chip,
        cfg.initial_version.clone(),
        cfg.initial_project.clone(),
        cfg.initial_secure_version,
        cfg.initial_size,
    );
    let mut images = IMAGES.lock().unwrap_or_else(|e| e.into_inner());
    images.retain(|(_, w)| w.strong_count() > 0);
    if let Some(image) = images
        .iter()
        .find(|(k, _)| *k == key)
        .and_then(|(_, w)| w.upgrade())
    {
        return Ok(image);
    }
    let mut flash = SimFlash::new(FLASH_SIZE);
    provision(&mut flash, cfg)?;
    let image: Arc<[u8]> = flash.into_data().into();
    images.push((key, Arc::downgrade(&image)));
    Ok(image)
}

fn provision<B: Backing>(flash: &mut SimFlash<B>, cfg: &VirtualConfig) -> Result<(), String> {
    let table = PartitionTable::from_csv(DEFAULT_4MB_CSV).map_err(|e| format!("{e:?}"))?;
    let image = ImageBuilder::new(cfg.chip)
        .version(&cfg.initial_version)
        .project(&cfg.initial_project)
        .secure_version(cfg.initial_secure_version)
        .size(cfg.initial_size)
        .build()
        .map_err(|e| format!("initial image: {e:?}"))?;
    let slot0 = table.ota_slots().next().ok_or("no ota_0")?.offset;
    let mut padded = image;
    padded.resize(padded.len().div_ceil(4) * 4, 0xFF);
    let table = table.to_bytes();
    flash
        .write_flash(TABLE_OFFSET, &table)
        .and_then(|_| flash.write_flash(slot0, &padded))
        .map_err(|e| format!("{e}"))
}

/// The device's view of its flash: every operation notices a power cut and
/// takes the network down with it, as losing power does.
struct Powered<'a> {
    flash: &'a mut DeviceFlash,
    handle: Handle,
}

impl Powered<'_> {
    /// Arms a cut the handle asked for, at the first mutating operation after.
    fn before(&mut self, offset: u32) -> Result<(), SimError> {
        if !self.handle.powered() {
            return Err(SimError::PowerCut);
        }
        let in_log = self
            .handle
            .0
            .log_range
            .get()
            .is_some_and(|(start, end)| (start..end).contains(&offset));
        let ops = if in_log {
            &self.handle.0.log_ops
        } else {
            &self.handle.0.flash_ops
        };
        ops.set(ops.get() + 1);
        if let Some(cut) = self.handle.0.cut.take() {
            self.flash.arm(cut);
        }
        Ok(())
    }

    /// After a write or erase: what the flash now holds for itself.
    fn changed<T>(&mut self, r: Result<T, SimError>) -> Result<T, SimError> {
        self.handle.0.flash_bytes.set(self.flash.private_bytes());
        self.after(r)
    }

    fn after<T>(&mut self, r: Result<T, SimError>) -> Result<T, SimError> {
        if !self.flash.is_powered() {
            self.handle.0.powered.set(false);
            self.handle.0.wake.notify_waiters();
        }
        r
    }
}

impl ErrorType for Powered<'_> {
    type Error = SimError;
}

impl ReadNorFlash for Powered<'_> {
    const READ_SIZE: usize = 1;
    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), SimError> {
        if !self.handle.powered() {
            return Err(SimError::PowerCut);
        }
        let r = match self.flash {
            DeviceFlash::Memory(f) => f.read(offset, bytes),
            DeviceFlash::File(f) => f.read(offset, bytes),
        };
        self.after(r)
    }
    fn capacity(&self) -> usize {
        FLASH_SIZE
    }
}

impl NorFlash for Powered<'_> {
    const WRITE_SIZE: usize = 4;
    const ERASE_SIZE: usize = 4096;
    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), SimError> {
        self.before(offset)?;
        let r = match self.flash {
            DeviceFlash::Memory(f) => f.write(offset, bytes),
            DeviceFlash::File(f) => f.write(offset, bytes),
        };
        self.changed(r)
    }
    fn erase(&mut self, from: u32, to: u32) -> Result<(), SimError> {
        self.before(from)?;
        let r = match self.flash {
            DeviceFlash::Memory(f) => f.erase(from, to),
            DeviceFlash::File(f) => f.erase(from, to),
        };
        self.changed(r)
    }
}

// The NOR model ANDs a second program into a word, as the chip does and as
// esp-storage promises by implementing `MultiwriteNorFlash` too.
impl MultiwriteNorFlash for Powered<'_> {}

/// The WiFi link of a virtual device.
pub struct VirtualLink {
    handle: Handle,
}

impl Link for VirtualLink {
    type Error = ();
    async fn connect(&mut self) -> Result<(), ()> {
        self.reconnect().await
    }
    async fn reconnect(&mut self) -> Result<(), ()> {
        if self.handle.link().0 {
            Ok(())
        } else {
            tokio::time::sleep(StdDuration::from_millis(200)).await;
            Err(())
        }
    }
    fn is_connected(&self) -> bool {
        self.handle.link().0
    }
}

/// The board of a virtual device.
struct VirtualPlatform {
    id: String,
    unhealthy: bool,
    reboot: Rc<Notify>,
    /// Why this boot happened, from the fault that ended the last one.
    boot_reason: BootReason,
}

impl Platform for VirtualPlatform {
    async fn reboot(&mut self) -> ! {
        self.reboot.notify_one();
        loop {
            std::future::pending::<()>().await;
        }
    }
    fn device_id(&self) -> &str {
        &self.id
    }
    async fn health_check(&mut self) -> bool {
        !self.unhealthy
    }
    fn boot_reason(&self) -> BootReason {
        self.boot_reason
    }
}

/// Runs the device until [`Handle::stop`]. Errors only when the flash file
/// cannot be created or opened.
pub async fn run_device(cfg: VirtualConfig, handle: Handle) -> std::io::Result<()> {
    let mut flash = DeviceFlash::open(&cfg)?;
    handle.0.log_range.set(flash.log_range());
    let net = VirtualNet::new(handle.clone());
    // The record buffers of both TLS sessions, as a `static` holds them on
    // the chip; boxed so they stay off the task's stack.
    let tls_buffers = Box::new(TlsBuffers::new());
    let identity = match &cfg.tls {
        Some(files) => Some(files.identity().map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("TLS certificate or key unusable: {e:?}"),
            )
        })?),
        None => None,
    };
    let bootloader = Bootloader::new(cfg.bootloader).for_chip(cfg.chip);
    let dcfg = cfg.device_config();
    // What ended the previous boot, as the chip's reset reason would say.
    let mut reason = BootReason::PowerOn;

    while !handle.0.stopped.get() {
        // A cut (from any path) means this boot is a power-on.
        let boot_reason = if handle.powered() {
            std::mem::replace(&mut reason, BootReason::SoftwareReset)
        } else {
            BootReason::PowerOn
        };
        reason = BootReason::SoftwareReset;
        // Power on.
        flash.power_on();
        handle.0.powered.set(true);
        let mut pflash = Powered {
            flash: &mut flash,
            handle: handle.clone(),
        };
        let outcome = match bootloader.boot(&mut pflash) {
            Ok(o) => o,
            // The power went while the bootloader wrote otadata.
            Err(_) => {
                reason = BootReason::PowerOn;
                continue;
            }
        };
        let version = outcome
            .image
            .as_ref()
            .map(|i| i.app.version.as_str().to_string());
        handle.0.boots.borrow_mut().push(BootRecord {
            slot: outcome.slot,
            version: version.clone(),
        });
        let (Some(slot_index), Some(version)) = (outcome.slot, version) else {
            log::error!("{}: nothing bootable on the flash", cfg.id);
            while !handle.0.stopped.get() {
                handle.0.wake.notified().await;
            }
            break;
        };
        let booted = match early_boot(&mut pflash, slot_index) {
            Ok(b) => b,
            Err(e) => {
                if handle.powered() {
                    log::error!("{}: early boot failed: {e:?}", cfg.id);
                    tokio::time::sleep(StdDuration::from_secs(1)).await;
                } else {
                    reason = BootReason::PowerOn;
                }
                continue;
            }
        };
        log::debug!(
            "{}: booted {version} from slot {slot_index}: {:?}",
            cfg.id,
            booted.boot.verdict
        );
        match booted.boot.verdict {
            Verdict::Reboot => continue,
            Verdict::Trial if version.ends_with("+crash") => {
                // Dies right after the guard marked the trial.
                tokio::time::sleep(StdDuration::from_millis(50)).await;
                reason = BootReason::Panic;
                continue;
            }
            Verdict::Trial if version.ends_with("+hang") => {
                // Never gets anywhere; the trial watchdog resets it.
                tokio::time::sleep(cfg.watchdog).await;
                reason = BootReason::Watchdog;
                continue;
            }
            _ => {}
        }
        let reboot = Rc::new(Notify::new());
        let mut platform = VirtualPlatform {
            id: cfg.id.clone(),
            unhealthy: version.ends_with("+unhealthy"),
            reboot: reboot.clone(),
            boot_reason,
        };
        let mut link = VirtualLink {
            handle: handle.clone(),
        };
        // A new connector each boot, as the chip's firmware starts afresh.
        let connector: VirtualConnector<'_> = mqota_runtime::NetConnector::new(
            &net,
            &net,
            identity
                .as_ref()
                .map(|id| TlsSetup::new(id, &tls_buffers, rand_core::OsRng)),
        );
        let runtime = mqota_runtime::run(
            &dcfg,
            booted,
            &mut platform,
            &mut link,
            &connector,
            &mut pflash,
        );
        let power_or_stop = async {
            loop {
                if !handle.powered() || handle.0.stopped.get() {
                    return;
                }
                handle.changed().await;
            }
        };
        tokio::select! {
            _ = runtime => {}
            _ = reboot.notified() => {}
            _ = power_or_stop => {
                if !handle.powered() {
                    reason = BootReason::PowerOn;
                }
            }
        }
    }
    Ok(())
}

/// Starts a device on the current [`tokio::task::LocalSet`] and returns its
/// handle. Errors opening the flash end the device and are logged.
pub fn spawn(cfg: VirtualConfig) -> Handle {
    spawn_task(cfg).0
}

/// [`spawn`], also returning the device's task, which ends once the device
/// has stopped ([`Handle::stop`]) and dropped its connections.
pub fn spawn_task(cfg: VirtualConfig) -> (Handle, tokio::task::JoinHandle<()>) {
    let handle = Handle::new();
    let h = handle.clone();
    let task = tokio::task::spawn_local(async move {
        let id = cfg.id.clone();
        if let Err(e) = run_device(cfg, h).await {
            log::error!("{id}: {e}");
        }
    });
    (handle, task)
}

/// Bytes of the device runtime's future with the virtual device's types: the
/// whole state of a running device (buffers, MQTT session, engine), since the
/// runtime allocates nothing. On the chip it lives in a static task arena.
pub fn runtime_future_size() -> usize {
    let cfg = VirtualConfig::new("size", "127.0.0.1", 1);
    let mut flash = DeviceFlash::open(&cfg).expect("in-memory flash");
    let handle = Handle::new();
    let mut pflash = Powered {
        flash: &mut flash,
        handle: handle.clone(),
    };
    let booted = early_boot(&mut pflash, 0).expect("fresh flash boots");
    let dcfg = cfg.device_config();
    let net = VirtualNet::new(handle.clone());
    let mut platform = VirtualPlatform {
        id: cfg.id.clone(),
        unhealthy: false,
        reboot: Rc::new(Notify::new()),
        boot_reason: BootReason::PowerOn,
    };
    let mut link = VirtualLink { handle };
    let connector: VirtualConnector<'_> = mqota_runtime::NetConnector::new(&net, &net, None);
    let fut = mqota_runtime::run(
        &dcfg,
        booted,
        &mut platform,
        &mut link,
        &connector,
        &mut pflash,
    );
    std::mem::size_of_val(&fut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_virtual_device_runs_with_the_runtime_defaults_unless_told_otherwise() {
        let cfg = VirtualConfig::new("dev-1", "broker.lan", 1884);
        let seed = cfg.device_config().seed;
        assert_eq!(
            cfg.device_config(),
            DeviceConfig {
                seed,
                ..DeviceConfig::new("broker.lan", 1884)
            }
        );

        let mut cfg = cfg;
        cfg.stall_timeout = StdDuration::from_secs(2);
        cfg.prefix = "plant".to_string();
        let d = cfg.device_config();
        assert_eq!(d.stall_timeout, embassy_time::Duration::from_secs(2));
        assert_eq!(d.prefix, "plant");
        assert_eq!(
            d,
            DeviceConfig {
                seed,
                prefix: "plant",
                stall_timeout: embassy_time::Duration::from_secs(2),
                ..DeviceConfig::new("broker.lan", 1884)
            }
        );
    }

    #[test]
    fn devices_with_different_ids_get_different_jitter_seeds() {
        let a = VirtualConfig::new("dev-1", "h", 1).device_config().seed;
        let b = VirtualConfig::new("dev-2", "h", 1).device_config().seed;
        assert_ne!(a, b);
    }
}

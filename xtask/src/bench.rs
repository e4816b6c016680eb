//! `cargo xtask bench pipeline|fleet`.
//!
//! `fleet` measures a whole rollout the way an operator runs one, every
//! piece its own process, as in production: one Mosquitto with its stock
//! settings, `mqota sim` processes with N virtual devices between them (the
//! real device runtime on in-memory flash that holds only what each device
//! wrote over one shared provisioned image), one `mqota serve` (firmware
//! over HTTP, fleet recorder) and one `mqota deploy --all --wait` (the
//! rollout). It reports
//!
//! - the rollout's wall time (from the deployment being created to its last
//!   result) and the whole `deploy` command's (connect, retained-status
//!   settle, firmware look-up included);
//! - failures, which must be 0 (and every device must report the new
//!   version afterwards);
//! - the controller's peak RSS (`VmHWM` of `deploy` and of `serve`), and
//!   the devices' memory: the `sim` processes' RSS once every device is
//!   online (idle) and at their peak, in total and per device;
//! - MQTT PUBLISH messages per second through the broker during the
//!   rollout, from Mosquitto's own `$SYS/broker/publish/messages/*`
//!   counters (published every second, so the window is ±1 s);
//! - the CPU time each part used (the sims' split into coming online and
//!   the rollout after it) and the load average as the rollout starts and
//!   at its end: on a shared machine the wall times depend on what else
//!   runs, the CPU times much less.
//!
//! The report is printed as JSON and written to `target/bench/fleet.json`.
//!
//! Mosquitto runs with its defaults (`max_queued_messages 1000`,
//! `max_inflight_messages 20`, no connection limit); the configuration only
//! opens an anonymous listener and asks for `$SYS` every second instead of
//! every 10 (the rate measurement). It needs a file descriptor per device:
//! the broker is started with its soft `ulimit -n` raised to the hard
//! limit, and the bench refuses to start when that is below the fleet.
//! No memory or queue setting is needed: earlier 10,000-device runs lost
//! devices that Mosquitto logged as "disconnected due to out of memory",
//! but Mosquitto before 2.0.22 prints that for a client that closes its
//! connection with a QoS 1 PUBACK still owed to it (eclipse-mosquitto
//! issue 3253), not for a broker short of memory. The devices closed those
//! connections while the `sim` processes, then spinning on a full timer
//! queue (see `mqota-host-time`), kept the machine's CPU busy; since that
//! fix, 10,000-device runs log none.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{root, run};

/// Runs a benchmark by name.
pub fn bench(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("pipeline") => run(
            &root(),
            "cargo",
            &[
                "run",
                "--release",
                "-p",
                "mqota-virtual",
                "--features",
                "testing",
                "--example",
                "bench_pipeline",
            ],
        ),
        Some("fleet") => fleet(&args[1..]),
        _ => {
            eprintln!("usage: cargo xtask bench <pipeline|fleet>");
            eprintln!("  pipeline   what the update pipeline costs beyond the download (bench_pipeline example)");
            eprintln!("  fleet [--devices N] [--sims K] [--image-size BYTES] [--batch N|P% ({DEFAULT_BATCH})]");
            eprintln!("        [--http-max-connections N (serve's own default)]");
            eprintln!("             N virtual devices (1000) in K `mqota sim` processes (one per {DEVICES_PER_SIM})");
            eprintln!("             updated through one mqota controller and one Mosquitto");
            bail!("unknown or missing benchmark")
        }
    }
}

/// Devices per stage unless `--batch` says otherwise: what `serve` takes at
/// once. It serves at most 1,024 connections and closes more on arrival (its
/// defence against floods); in a stage of 10,000 devices downloading
/// together some are refused until their retries run out, unless
/// `--http-max-connections` raises the cap.
const DEFAULT_BATCH: &str = "1000";

/// Devices per `mqota sim` process unless `--sims` says otherwise: one
/// process runs its devices on one thread, so a large fleet is split to use
/// every core.
const DEVICES_PER_SIM: u32 = 2500;

struct FleetOptions {
    devices: u32,
    sims: Option<u32>,
    image_size: u32,
    batch: String,
    /// Passed to `serve --http-max-connections` when given.
    http_max_connections: Option<u32>,
}

fn parse_fleet(args: &[String]) -> Result<FleetOptions> {
    let mut o = FleetOptions {
        devices: 1000,
        sims: None,
        image_size: 256 * 1024,
        batch: DEFAULT_BATCH.into(),
        http_max_connections: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--devices" => o.devices = value()?.parse().context("--devices")?,
            "--sims" => o.sims = Some(value()?.parse().context("--sims")?),
            "--image-size" => o.image_size = value()?.parse().context("--image-size")?,
            "--batch" => o.batch = value()?.clone(),
            "--http-max-connections" => {
                o.http_max_connections =
                    Some(value()?.parse().context("--http-max-connections")?)
            }
            other => bail!(
                "unknown option {other:?} (--devices, --sims, --image-size, --batch, --http-max-connections)"
            ),
        }
    }
    if o.devices == 0 {
        bail!("--devices must be at least 1");
    }
    if o.sims.is_some_and(|k| k == 0 || k > o.devices) {
        bail!("--sims must be from 1 to the number of devices");
    }
    Ok(o)
}

fn fleet(args: &[String]) -> Result<()> {
    let opts = parse_fleet(args)?;
    let sims = opts
        .sims
        .unwrap_or_else(|| opts.devices.div_ceil(DEVICES_PER_SIM));
    let fds = hard_fd_limit();
    // The broker's sockets for the devices, the controller and a margin.
    if fds < u64::from(opts.devices) + 64 {
        bail!(
            "{} devices need {} open files in Mosquitto, but `ulimit -Hn` is {fds}: raise it (e.g. LimitNOFILE, /etc/security/limits.conf)",
            opts.devices,
            opts.devices + 64
        );
    }
    let root = root();
    run(&root, "cargo", &["build", "--release", "-p", "mqota"])?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| root.join(d))
        .unwrap_or_else(|| root.join("target"));
    let mqota = target.join("release/mqota");
    let out_dir = root.join("target/bench");
    let work = out_dir.join("fleet-work");
    let _ = std::fs::remove_dir_all(&work);
    let fw_dir = work.join("firmware");
    let data_dir = work.join("data");
    std::fs::create_dir_all(&fw_dir)?;
    std::fs::create_dir_all(&data_dir)?;

    // The image to roll out.
    let image = "app-1.1.0.bin";
    run(
        &root,
        mqota.to_str().unwrap(),
        &[
            "image",
            "pack",
            "--chip",
            "esp32c3",
            "--version",
            "1.1.0",
            "--project",
            "mqota-virtual",
            "--size",
            &opts.image_size.to_string(),
            "-o",
            fw_dir.join(image).to_str().unwrap(),
        ],
    )?;

    // The broker, with its stock settings (see the module docs).
    let port = free_port()?;
    let conf = work.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\nsys_interval 1\n"),
    )?;
    let mosquitto_log = std::fs::File::create(work.join("mosquitto.log"))?;
    let mosquitto = Proc::spawn(
        "mosquitto",
        // `ulimit -n` to the hard limit first: a socket per device.
        Command::new("sh")
            .args(["-c", "ulimit -n \"$(ulimit -Hn)\" && exec \"$@\"", "sh"])
            .arg(mosquitto_program())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(mosquitto_log),
    )?;
    wait_port(port, Duration::from_secs(10)).context("mosquitto did not start listening")?;
    let broker = format!("mqtt://127.0.0.1:{port}");
    let sys = SysCounters::start(port)?;

    // The devices, in processes of their own. Their ids interleave (`sim` k
    // of K runs bench-(k+1), bench-(k+1+K), ...), so each batch of the
    // rollout, taken in id order, keeps every process and core busy.
    let t_sim = Instant::now();
    let mut sim_procs = Vec::new();
    for k in 0..sims {
        let n = opts.devices / sims + u32::from(k < opts.devices % sims);
        let sim_log = std::fs::File::create(work.join(format!("sim{k}.log")))?;
        sim_procs.push(Proc::spawn(
            "mqota sim",
            Command::new(&mqota)
                .args(["sim", "--devices", &n.to_string()])
                .args(["--first", &(k + 1).to_string(), "--step", &sims.to_string()])
                .args(["--id", "bench", "--broker", &broker])
                .env("MQOTA_CONFIG", "/dev/null")
                .stdout(Stdio::null())
                .stderr(sim_log),
        )?);
    }
    let sims_kib = |read: fn(u32) -> Option<u64>| -> u64 {
        sim_procs.iter().filter_map(|p| read(p.pid())).sum()
    };

    // The controller's server.
    let http_port = free_port()?;
    let server = format!("http://127.0.0.1:{http_port}");
    let serve_log = std::fs::File::create(work.join("serve.log"))?;
    let serve = Proc::spawn(
        "mqota serve",
        Command::new(&mqota)
            .arg("serve")
            .arg("--firmware-dir")
            .arg(&fw_dir)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--http", &format!("127.0.0.1:{http_port}")])
            .args(["--broker", &broker])
            .args(
                opts.http_max_connections
                    .map(|n| vec!["--http-max-connections".to_string(), n.to_string()])
                    .unwrap_or_default(),
            )
            .env("MQOTA_CONFIG", "/dev/null")
            .stdout(serve_log.try_clone()?)
            .stderr(serve_log),
    )?;
    wait_port(http_port, Duration::from_secs(20)).context("mqota serve did not listen")?;

    eprintln!("waiting for {} devices to come online", opts.devices);
    let online = wait_fleet(
        &mqota,
        &broker,
        opts.devices,
        "1.0.0",
        Duration::from_secs(300),
    )?;
    if online < opts.devices {
        bail!(
            "only {online} of {} devices came online on 1.0.0 (see target/bench/fleet-work/sim*.log)",
            opts.devices
        );
    }
    let startup_s = t_sim.elapsed().as_secs_f64();
    let sim_idle = sims_kib(vm_rss_kib);
    let sim_cpu_online: f64 = sim_procs.iter().filter_map(|p| cpu_s(p.pid())).sum();
    eprintln!(
        "{online} devices online on 1.0.0 after {startup_s:.1} s; {sims} sim process(es) hold {} MiB",
        sim_idle / 1024
    );

    // The rollout.
    let load_at_start = load_average();
    let deploy_log_path = work.join("deploy.log");
    let mut deploy_log = std::fs::File::create(&deploy_log_path)?;
    let t_deploy = Instant::now();
    let mut deploy = Command::new(&mqota)
        .args(["deploy", image, "--all", "--batch", &opts.batch])
        .args(["--timeout", "300", "--wait", "--server", &server])
        .args(["--broker", &broker])
        .arg("--data-dir")
        .arg(&data_dir)
        .env("MQOTA_CONFIG", "/dev/null")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting mqota deploy")?;
    let deploy_pid = deploy.id();
    let stdout = deploy.stdout.take().unwrap();
    let stderr = deploy.stderr.take().unwrap();
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
        s
    });
    let created: Arc<Mutex<Option<Created>>> = Arc::default();
    let out_thread = {
        let created = created.clone();
        let sys = sys.clone();
        std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("deployment ") && created.lock().unwrap().is_none() {
                    *created.lock().unwrap() =
                        Some((Instant::now(), sys.get("received"), sys.get("sent")));
                }
                lines.push(line);
            }
            lines
        })
    };
    let mut deploy_hwm = 0;
    let mut deploy_cpu = 0.0f64;
    let status = loop {
        if let Some(kib) = vm_hwm_kib(deploy_pid) {
            deploy_hwm = deploy_hwm.max(kib);
        }
        if let Some(s) = cpu_s(deploy_pid) {
            deploy_cpu = deploy_cpu.max(s);
        }
        if let Some(s) = deploy.try_wait()? {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let t_end = Instant::now();
    let deploy_wall_s = t_end.duration_since(t_deploy).as_secs_f64();
    let lines = out_thread.join().expect("stdout reader");
    let errors = err_thread.join().expect("stderr reader");
    for l in &lines {
        use std::io::Write as _;
        writeln!(deploy_log, "{l}")?;
    }
    let (t_created, recv0, sent0) = created
        .lock()
        .unwrap()
        .context("deploy never created the deployment (see target/bench/fleet-work/deploy.log)")?;
    let rollout_s = t_end.duration_since(t_created).as_secs_f64();
    // $SYS is published once a second: wait for the value covering the end.
    std::thread::sleep(Duration::from_millis(1500));
    let (recv1, sent1) = (sys.get("received"), sys.get("sent"));
    let serve_hwm = vm_hwm_kib(serve.pid()).unwrap_or(0);
    let sim_hwm = sims_kib(vm_hwm_kib);
    let sim_cpu: f64 = sim_procs.iter().filter_map(|p| cpu_s(p.pid())).sum();
    let serve_cpu = cpu_s(serve.pid()).unwrap_or(0.0);
    let mosquitto_cpu = cpu_s(mosquitto.pid()).unwrap_or(0.0);
    let mosquitto_hwm = vm_hwm_kib(mosquitto.pid()).unwrap_or(0);

    let results = summary_results(&lines);
    let done = results.get("done").copied().unwrap_or(0);
    let failures: usize = results
        .iter()
        .filter(|(k, _)| k.as_str() != "done")
        .map(|(_, v)| v)
        .sum();
    let updated = wait_fleet(
        &mqota,
        &broker,
        opts.devices,
        "1.1.0",
        Duration::from_secs(60),
    )?;

    let received = recv1.zip(recv0).map(|(b, a)| b.saturating_sub(a));
    let sent = sent1.zip(sent0).map(|(b, a)| b.saturating_sub(a));
    let per_s = |n: Option<u64>| n.map(|n| format!("{:.0}", n as f64 / rollout_s));
    let opt = |n: Option<u64>| n.map_or("null".to_owned(), |n| n.to_string());
    let report = format!(
        r#"{{
  "bench": "fleet",
  "devices": {devices},
  "image_bytes": {image_bytes},
  "batch": "{batch}",
  "http_max_connections": {max_conn},
  "broker": "mosquitto",
  "cores": {cores},
  "devices_online_s": {startup_s:.2},
  "rollout_s": {rollout_s:.2},
  "deploy_command_s": {deploy_wall_s:.2},
  "devices_per_minute": {dpm:.0},
  "done": {done},
  "failures": {failures},
  "devices_on_new_version": {updated},
  "deploy_exit_ok": {deploy_ok},
  "controller_peak_rss_kib": {{ "deploy": {deploy_hwm}, "serve": {serve_hwm} }},
  "sim_processes": {sims},
  "sim_rss_kib": {{ "idle": {sim_idle}, "peak": {sim_hwm} }},
  "sim_rss_kib_per_device": {{ "idle": {idle_per:.1}, "peak": {peak_per:.1} }},
  "mosquitto_peak_rss_kib": {mosquitto_hwm},
  "cpu_s": {{ "sims_start": {sim_cpu_online:.1}, "sims_rollout": {sims_rollout:.1}, "serve": {serve_cpu:.1}, "deploy": {deploy_cpu:.1}, "mosquitto": {mosquitto_cpu:.1} }},
  "load_average_at_start": {load_at_start},
  "load_average_at_end": {load},
  "mqtt_publish_received": {received},
  "mqtt_publish_sent": {sent},
  "mqtt_publish_received_per_s": {recv_s},
  "mqtt_publish_sent_per_s": {sent_s}
}}"#,
        devices = opts.devices,
        image_bytes = opts.image_size,
        batch = opts.batch,
        // null: serve's own default.
        max_conn = opts
            .http_max_connections
            .map_or_else(|| "null".to_owned(), |n| n.to_string()),
        cores = std::thread::available_parallelism().map_or(0, |n| n.get()),
        dpm = done as f64 * 60.0 / rollout_s,
        deploy_ok = status.success(),
        sims_rollout = sim_cpu - sim_cpu_online,
        load = load_average(),
        idle_per = sim_idle as f64 / f64::from(opts.devices),
        peak_per = sim_hwm as f64 / f64::from(opts.devices),
        received = opt(received),
        sent = opt(sent),
        recv_s = per_s(received).unwrap_or_else(|| "null".into()),
        sent_s = per_s(sent).unwrap_or_else(|| "null".into()),
    );
    println!("{report}");
    std::fs::write(out_dir.join("fleet.json"), format!("{report}\n"))?;
    eprintln!("written to {}", out_dir.join("fleet.json").display());

    drop(sys);
    drop(serve);
    drop(sim_procs);
    drop(mosquitto);
    if !status.success() || failures > 0 || done != opts.devices as usize || updated != opts.devices
    {
        bail!(
            "the rollout did not update every device: {done} done, {failures} failed, {updated} report 1.1.0; deploy said: {}",
            errors.trim()
        );
    }
    Ok(())
}

/// The 1-minute load average (`/proc/loadavg`), as JSON: what else ran on
/// the machine's cores.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "null".into())
}

/// When `deploy` printed that the deployment exists, and the broker's
/// received and sent counters then.
type Created = (Instant, Option<u64>, Option<u64>);

fn mosquitto_program() -> String {
    std::env::var("MOSQUITTO").unwrap_or_else(|_| "/usr/sbin/mosquitto".to_owned())
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_port(port: u16, max: Duration) -> Result<()> {
    let deadline = Instant::now() + max;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {addr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Waits until `n` devices are online on `version` (by `mqota status
/// --json`), at most `max`; returns how many were when it stopped waiting.
fn wait_fleet(mqota: &Path, broker: &str, n: u32, version: &str, max: Duration) -> Result<u32> {
    let deadline = Instant::now() + max;
    let want_version = format!("\"version\": \"{version}\"");
    loop {
        let out = Command::new(mqota)
            .args(["status", "--json", "--broker", broker])
            .env("MQOTA_CONFIG", "/dev/null")
            .output()
            .context("mqota status")?;
        let text = String::from_utf8_lossy(&out.stdout);
        // One pretty-printed object per device: count the objects that are
        // online and on the version.
        let good = text
            .split("\n  {")
            .filter(|o| o.contains("\"online\": true") && o.contains(&want_version))
            .count() as u32;
        if good >= n {
            return Ok(good);
        }
        if Instant::now() > deadline {
            eprintln!("only {good} of {n} devices online on {version} after {max:?}");
            return Ok(good);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Counts of each RESULT in deploy's summary table.
fn summary_results(lines: &[String]) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    let Some(header) = lines.iter().position(|l| l.starts_with("DEVICE ")) else {
        return out;
    };
    for l in &lines[header + 1..] {
        if l.starts_with("deployment ") {
            break;
        }
        // DEVICE STAGE FROM RESULT [ERROR]
        if let Some(result) = l.split_whitespace().nth(3) {
            *out.entry(result.to_owned()).or_default() += 1;
        }
    }
    out
}

/// Peak resident set size of a process, from `/proc/PID/status`.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmHWM:")
}

/// CPU time (user and system) a process has used so far, in seconds, from
/// `/proc/PID/stat` (in clock ticks of 1/100 s, as Linux reports them to
/// user space on every architecture it runs the bench on).
fn cpu_s(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// Resident set size of a process now.
fn vm_rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmRSS:")
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The hard limit of open files (`ulimit -Hn`) this process and its
/// children may raise their soft limit to.
fn hard_fd_limit() -> u64 {
    let out = Command::new("sh")
        .args(["-c", "ulimit -Hn"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .unwrap_or_default();
    let hard = out.trim();
    if hard == "unlimited" {
        return u64::MAX;
    }
    hard.parse().unwrap_or(0)
}

/// A child process stopped (SIGINT, then SIGKILL) when dropped.
struct Proc {
    name: &'static str,
    child: Child,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command) -> Result<Self> {
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Self { name, child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGINT first: `mqota sim` and `serve` stop cleanly on Ctrl-C.
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} did not stop on SIGINT; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Mosquitto's `$SYS/broker/publish/messages/{received,sent}`, followed by a
/// `mosquitto_sub` in the background.
#[derive(Clone)]
struct SysCounters {
    values: Arc<Mutex<HashMap<String, u64>>>,
    proc: Arc<Mutex<Option<Proc>>>,
}

impl SysCounters {
    fn start(port: u16) -> Result<Self> {
        let mut child = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-v"])
            .args(["-t", "$SYS/broker/publish/messages/+"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting mosquitto_sub (apt-get install mosquitto-clients)")?;
        let stdout = child.stdout.take().unwrap();
        let values: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        let v = values.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some((topic, n)) = line.split_once(' ') {
                    if let (Some(key), Ok(n)) = (topic.rsplit('/').next(), n.trim().parse()) {
                        v.lock().unwrap().insert(key.to_owned(), n);
                    }
                }
            }
        });
        Ok(Self {
            values,
            proc: Arc::new(Mutex::new(Some(Proc {
                name: "mosquitto_sub",
                child,
            }))),
        })
    }

    fn get(&self, key: &str) -> Option<u64> {
        self.values.lock().unwrap().get(key).copied()
    }
}

impl Drop for SysCounters {
    fn drop(&mut self) {
        if Arc::strong_count(&self.proc) == 1 {
            self.proc.lock().unwrap().take();
        }
    }
}

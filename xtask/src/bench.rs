//! `cargo xtask bench pipeline|fleet`.
//!
//! `fleet` measures a whole rollout the way an operator runs one, every
//! piece its own process, as in production: one Mosquitto, `mqota sim` with
//! N virtual devices (the real device runtime on in-memory flash), one
//! `mqota serve` (firmware over HTTP, fleet recorder) and one
//! `mqota deploy --all --wait` (the rollout). It reports
//!
//! - the rollout's wall time (from the deployment being created to its last
//!   result) and the whole `deploy` command's (connect, retained-status
//!   settle, firmware look-up included);
//! - failures, which must be 0 (and every device must report the new
//!   version afterwards);
//! - the controller's peak RSS (`VmHWM` of `deploy` and of `serve`);
//! - MQTT PUBLISH messages per second through the broker during the
//!   rollout, from Mosquitto's own `$SYS/broker/publish/messages/*`
//!   counters (published every second, so the window is ±1 s).
//!
//! The report is printed as JSON and written to `target/bench/fleet.json`.

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
            eprintln!("  fleet [--devices N] [--image-size BYTES] [--batch N|P%]");
            eprintln!("             N virtual devices (1000) updated through one mqota controller and one Mosquitto");
            bail!("unknown or missing benchmark")
        }
    }
}

struct FleetOptions {
    devices: u32,
    image_size: u32,
    batch: String,
}

fn parse_fleet(args: &[String]) -> Result<FleetOptions> {
    let mut o = FleetOptions {
        devices: 1000,
        image_size: 256 * 1024,
        batch: "100%".into(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--devices" => o.devices = value()?.parse().context("--devices")?,
            "--image-size" => o.image_size = value()?.parse().context("--image-size")?,
            "--batch" => o.batch = value()?.clone(),
            other => bail!("unknown option {other:?} (--devices, --image-size, --batch)"),
        }
    }
    if o.devices == 0 {
        bail!("--devices must be at least 1");
    }
    Ok(o)
}

fn fleet(args: &[String]) -> Result<()> {
    let opts = parse_fleet(args)?;
    let root = root();
    run(&root, "cargo", &["build", "--release", "-p", "mqota"])?;
    let mqota = root.join("target/release/mqota");
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

    // The broker. max_queued_messages: the controller subscribes to every
    // progress event at QoS 1; Mosquitto's default queue of 1000 per client
    // would drop events when 1000 devices report at once.
    let port = free_port()?;
    let conf = work.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             max_queued_messages 1000000\nmax_inflight_messages 0\nsys_interval 1\n\
             set_tcp_nodelay true\n"
        ),
    )?;
    let mosquitto_log = std::fs::File::create(work.join("mosquitto.log"))?;
    let mosquitto = Proc::spawn(
        "mosquitto",
        Command::new(mosquitto_program())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(mosquitto_log),
    )?;
    wait_port(port, Duration::from_secs(10)).context("mosquitto did not start listening")?;
    let broker = format!("mqtt://127.0.0.1:{port}");
    let sys = SysCounters::start(port)?;

    // The devices, in their own process.
    let sim_log = std::fs::File::create(work.join("sim.log"))?;
    let t_sim = Instant::now();
    let sim = Proc::spawn(
        "mqota sim",
        Command::new(&mqota)
            .args(["sim", "--devices", &opts.devices.to_string()])
            .args(["--id", "bench", "--broker", &broker])
            .env("MQOTA_CONFIG", "/dev/null")
            .stdout(Stdio::null())
            .stderr(sim_log),
    )?;

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
    let startup_s = t_sim.elapsed().as_secs_f64();
    eprintln!("{online} devices online on 1.0.0 after {startup_s:.1} s");

    // The rollout.
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
    let status = loop {
        if let Some(kib) = vm_hwm_kib(deploy_pid) {
            deploy_hwm = deploy_hwm.max(kib);
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
    let sim_hwm = vm_hwm_kib(sim.pid()).unwrap_or(0);
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
    )
    .unwrap_or_else(|e| {
        eprintln!("{e:#}");
        0
    });

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
  "other_peak_rss_kib": {{ "sim": {sim_hwm}, "mosquitto": {mosquitto_hwm} }},
  "mqtt_publish_received": {received},
  "mqtt_publish_sent": {sent},
  "mqtt_publish_received_per_s": {recv_s},
  "mqtt_publish_sent_per_s": {sent_s}
}}"#,
        devices = opts.devices,
        image_bytes = opts.image_size,
        batch = opts.batch,
        cores = std::thread::available_parallelism().map_or(0, |n| n.get()),
        dpm = done as f64 * 60.0 / rollout_s,
        deploy_ok = status.success(),
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
    drop(sim);
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
/// --json`); returns how many were when it stopped waiting.
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
            bail!("only {good} of {n} devices online on {version} after {max:?}");
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
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
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

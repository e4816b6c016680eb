//! The web page of `mqota serve` in a real browser: Debian's Chromium,
//! headless, driven through ChromeDriver's WebDriver protocol (plain HTTP
//! and JSON, spoken with reqwest), against serve as a process (embedded
//! broker) and virtual devices running in this test.
//!
//! Needs `/usr/bin/chromium` and `chromedriver` (Debian packages `chromium`
//! and `chromium-driver`; `cargo xtask ci` installs them when missing): without them
//! the test fails and says so. It writes a screenshot of the page to
//! `target/page-browser.png` (and one mid-update to
//! `target/page-browser-progress.png`); the operator scenario writes
//! `target/page-browser-deployment.png`, `…-firmware.png`, `…-rollback.png`,
//! `…-device.png`, `…-login.png`, `…-session.png` and `…-audit.png`; the first also
//! `…-preview.png`.
//!
//! The tests take turns (one Chromium at a time on a small machine).

mod controller_support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use controller_support::{device_config, image, start_devices, Serve};
use mqota_virtual::testing::wait_until_async;
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";

/// Held by each test for its whole run: one browser and one serve at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// ChromeDriver running on a port of its own; killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_chromedriver() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join("chromedriver"))
        .find(|p| p.is_file());
    let missing = "install them with `apt-get install chromium chromium-driver` \
                   or let `cargo xtask ci` install them";
    assert!(
        std::path::Path::new(CHROMIUM).is_file(),
        "the browser test needs Chromium at {CHROMIUM} and chromedriver: {missing}"
    );
    on_path.unwrap_or_else(|| {
        panic!("the browser test needs chromedriver on PATH beside {CHROMIUM}: {missing}")
    })
}

async fn start_driver() -> Driver {
    let exe = find_chromedriver();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(&exe)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
    let driver = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let status = format!("{}/status", driver.url);
    let status = status.as_str();
    let read = move || async move {
        match reqwest::get(status).await {
            Ok(r) => r.json::<Value>().await.unwrap_or_default(),
            Err(_) => Value::Null,
        }
    };
    let (within, every) = (Duration::from_secs(20), Duration::from_millis(100));
    wait_until_async("chromedriver ready", within, every, read, |v| {
        v["value"]["ready"] == true
    })
    .await;
    driver
}

/// One browser session.
struct Browser {
    http: reqwest::Client,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start(driver: &Driver) -> Self {
        let profile = tempfile::tempdir().unwrap();
        // The flags this closed network needs: without the background
        // networking ones Chromium keeps trying to reach Google's hosts.
        let args = [
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--window-size=1400,900".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
            // Every request the page makes, read back at the end.
            "goog:loggingPrefs": {"performance": "ALL"},
        }}});
        let http = reqwest::Client::new();
        let r: Value = http
            .post(format!("{}/session", driver.url))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("chromedriver did not start Chromium: {r:#}"))
            .to_owned();
        Self {
            http,
            session: format!("{}/session/{session}", driver.url),
            _profile: profile,
        }
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.session);
        let mut req = self.http.request(method, &url);
        if body != Value::Null {
            req = req.json(&body);
        }
        let r = req.send().await.unwrap();
        let ok = r.status().is_success();
        let v: Value = r.json().await.unwrap();
        assert!(ok, "WebDriver {path}: {v:#}");
        v["value"].clone()
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.cmd(reqwest::Method::POST, path, body).await
    }

    async fn goto(&self, url: &str) {
        self.post("/url", json!({ "url": url })).await;
    }

    /// Runs `script` (a function body) in the page and returns its value.
    async fn js(&self, script: &str) -> Value {
        self.post("/execute/sync", json!({"script": script, "args": []}))
            .await
    }

    async fn element(&self, css: &str) -> String {
        let v = self
            .post("/element", json!({"using": "css selector", "value": css}))
            .await;
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_owned()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.element(css).await;
        self.post(&format!("/element/{e}/clear"), json!({})).await;
        self.post(&format!("/element/{e}/value"), json!({ "text": text }))
            .await;
    }

    /// Clicks the element `css` selects. A live page may draw it anew
    /// between finding and clicking: then it is found again (a few times).
    async fn click(&self, css: &str) {
        for _ in 0..5 {
            let e = self.element(css).await;
            // In the middle of the window: the table's sticky header would
            // cover a row scrolled to the top.
            let r = self
                .http
                .post(format!("{}/execute/sync", self.session))
                .json(&json!({"script": "document.querySelector(arguments[0])\
                                           .scrollIntoView({block: 'center'});",
                              "args": [css]}))
                .send()
                .await
                .unwrap();
            if !r.status().is_success() {
                let v: Value = r.json().await.unwrap();
                assert_eq!(
                    v["value"]["error"], "stale element reference",
                    "WebDriver scroll to {css}: {v:#}"
                );
                continue;
            }
            let r = self
                .http
                .post(format!("{}/element/{e}/click", self.session))
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            if r.status().is_success() {
                return;
            }
            let v: Value = r.json().await.unwrap();
            assert_eq!(
                v["value"]["error"], "stale element reference",
                "WebDriver click on {css}: {v:#}"
            );
        }
        panic!("{css} was drawn anew five times in a row");
    }

    /// Runs `script` (a function body) with `args` and returns its value.
    async fn js_with(&self, script: &str, args: Value) -> Value {
        self.post("/execute/sync", json!({"script": script, "args": args}))
            .await
    }

    /// Polls `script` until `check` accepts its value, for at most `secs`.
    async fn wait_for(
        &self,
        what: &str,
        secs: u64,
        script: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let (within, every) = (Duration::from_secs(secs), Duration::from_millis(100));
        let what = format!("the page {what}");
        wait_until_async(&what, within, every, || self.js(script), |v| check(v)).await
    }

    async fn screenshot(&self, to: &std::path::Path) {
        use base64_png::decode;
        let v = self
            .cmd(reqwest::Method::GET, "/screenshot", Value::Null)
            .await;
        std::fs::write(to, decode(v.as_str().unwrap())).unwrap();
    }

    /// Every URL a document under `origin` asked for so far (ChromeDriver's
    /// performance log; the browser's own start page is left out).
    async fn requested_urls(&self, origin: &str) -> Vec<String> {
        let log = self.post("/se/log", json!({"type": "performance"})).await;
        log.as_array()
            .unwrap()
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(e["message"].as_str()?).ok())
            .filter(|m| m["message"]["method"] == "Network.requestWillBeSent")
            .map(|m| m["message"]["params"].clone())
            .filter(|p| {
                p["documentURL"]
                    .as_str()
                    .is_some_and(|d| d.starts_with(origin))
            })
            .filter_map(|p| Some(p["request"]["url"].as_str()?.to_owned()))
            .collect()
    }
}

impl Drop for Browser {
    /// Ends the session, and so Chromium, also when the test failed: killing
    /// ChromeDriver alone leaves its Chromium running.
    fn drop(&mut self) {
        let session = self.session.clone();
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async { reqwest::Client::new().delete(session).send().await })
        })
        .join();
    }
}

/// A tiny base64 decoder: screenshots come as base64 and no crate here
/// decodes it.
mod base64_png {
    pub fn decode(text: &str) -> Vec<u8> {
        let value = |c: u8| -> u32 {
            match c {
                b'A'..=b'Z' => (c - b'A') as u32,
                b'a'..=b'z' => (c - b'a') as u32 + 26,
                b'0'..=b'9' => (c - b'0') as u32 + 52,
                b'+' => 62,
                b'/' => 63,
                _ => panic!("not base64: {c}"),
            }
        };
        let bytes: Vec<u8> = text.bytes().filter(|c| *c != b'=' && *c != b'\n').collect();
        let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
        for chunk in bytes.chunks(4) {
            let mut n = 0u32;
            for (i, c) in chunk.iter().enumerate() {
                n |= value(*c) << (18 - 6 * i);
            }
            out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
        }
        out
    }
}

/// The fleet table's rows as the page shows them: each row's cell texts.
const ROWS: &str = "return [...document.querySelectorAll('#fleet tr')]\
                    .map(tr => [...tr.cells].map(c => (c.querySelector('.pill') || c).textContent.trim()));";

/// Polls the table until `check` holds, for at most `secs`.
async fn wait_rows(
    b: &Browser,
    what: &str,
    secs: u64,
    check: impl Fn(&[Vec<String>]) -> bool,
) -> Vec<Vec<String>> {
    let read = move || async move {
        serde_json::from_value::<Vec<Vec<String>>>(b.js(ROWS).await).unwrap()
    };
    let (within, every) = (Duration::from_secs(secs), Duration::from_millis(100));
    let what = format!("the page {what}");
    wait_until_async(&what, within, every, read, |rows| check(rows)).await
}

/// A firmware server that sends `image` to the first request at once (serve
/// reading it to learn its size and hash) and to every later one (the
/// devices) slowly, 32 KiB every 60 ms, so an update lasts long enough to
/// watch its progress bar move. Returns the image's URL.
async fn slow_firmware(image: Vec<u8>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/app-1.1.0.bin", listener.local_addr().unwrap());
    let image = std::sync::Arc::new(image);
    tokio::spawn(async move {
        let mut served = 0u32;
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            served += 1;
            let slow = served > 1;
            let image = image.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let header = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n",
                    image.len()
                );
                if conn.write_all(header.as_bytes()).await.is_err() {
                    return;
                }
                for chunk in image.chunks(32 * 1024) {
                    if conn.write_all(chunk).await.is_err() {
                        return;
                    }
                    if slow {
                        tokio::time::sleep(Duration::from_millis(60)).await;
                    }
                }
                let _ = conn.shutdown().await;
            });
        }
    });
    url
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}

// Columns of the fleet table.
const ID: usize = 0;
const ONLINE: usize = 1;
const VERSION: usize = 4;
const LAST: usize = 7;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_in_chromium_shows_the_fleet_live_deploys_filters_and_sees_a_device_go_offline() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let driver = start_driver().await;
    let fw = tempfile::tempdir().unwrap();
    // Big enough that the download takes a few progress events.
    std::fs::write(fw.path().join("app-1.1.0.bin"), image("1.1.0", 1024 * 1024)).unwrap();
    // Newer than what the deployment below installs: previewed at the end.
    std::fs::write(fw.path().join("app-1.2.0.bin"), image("1.2.0", 64 * 1024)).unwrap();
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start(fw.path(), data.path(), None);
    let port: u16 = serve.broker.rsplit(':').next().unwrap().parse().unwrap();
    let fleet = start_devices(
        ["br-a", "br-b"]
            .iter()
            .map(|id| device_config(id, port))
            .collect(),
    );
    // A device of its own, to be switched off.
    let leaving = start_devices(vec![device_config("br-c", port)]);

    let b = Browser::start(&driver).await;
    let started = Instant::now();
    b.goto(&format!("{}/", serve.http)).await;

    let rows = wait_rows(&b, "listed three devices online on 1.0.0", 30, |rows| {
        rows.len() == 3
            && rows
                .iter()
                .all(|r| r[ONLINE] == "online" && r[VERSION] == "1.0.0")
    })
    .await;
    let ids: Vec<&str> = rows.iter().map(|r| r[ID].as_str()).collect();
    assert_eq!(ids, ["br-a", "br-b", "br-c"]);
    assert_eq!(
        b.js("return document.getElementById('status').textContent;")
            .await,
        "live"
    );

    // The search box narrows the rows, and so do the filters.
    b.type_into("#q", "br-b").await;
    wait_rows(&b, "narrowed to br-b", 5, |rows| {
        rows.len() == 1 && rows[0][ID] == "br-b"
    })
    .await;
    b.type_into("#q", "").await;
    b.js(
        "const s = document.getElementById('f-online'); s.value = 'offline'; \
          s.dispatchEvent(new Event('input'));",
    )
    .await;
    wait_rows(&b, "showed no offline device", 5, |rows| rows.is_empty()).await;
    b.js(
        "const s = document.getElementById('f-online'); s.value = ''; \
          s.dispatchEvent(new Event('input'));",
    )
    .await;
    wait_rows(&b, "showed all three again", 5, |rows| rows.len() == 3).await;

    // A device that publishes markup and a bidi override: the page shows
    // the characters as they are, never as elements, and the override as an
    // escape (it would make "1.0.0<RLO>gnp.exe" read as "1.0.0exe.png").
    let hostile = json!({
        "device": "br-evil", "chip": "esp32c3", "project": "<img src=x onerror=pwned=1>",
        "version": "1.0.0\u{202e}gnp.exe", "slot": 0, "state": "valid", "last": null
    });
    mqota_virtual::testing::publish_to(
        port,
        "device/br-evil/status",
        hostile.to_string().as_bytes(),
        true,
    )
    .await;
    let rows = wait_rows(&b, "listed br-evil", 10, |rows| {
        rows.iter().any(|r| r[ID] == "br-evil")
    })
    .await;
    let evil = rows.iter().find(|r| r[ID] == "br-evil").unwrap();
    assert_eq!(evil[3], "<img src=x onerror=pwned=1>");
    assert_eq!(evil[VERSION], "1.0.0\\u{202e}gnp.exe");
    assert_eq!(
        b.js(
            "return [document.querySelectorAll('#fleet img').length, window.pwned === undefined];"
        )
        .await,
        json!([0, true])
    );
    // Gone again: an empty retained status removes a device.
    mqota_virtual::testing::publish_to(port, "device/br-evil/status", b"", true).await;
    wait_rows(&b, "dropped br-evil", 10, |rows| rows.len() == 3).await;

    // A deployment started from the page's form: the rows follow it through
    // the event stream, without a reload (the marker set here survives).
    // The form offers the catalogue; the deployment names the slow server's
    // URL instead (the API takes a URL too), added to the form's choices.
    let slow = slow_firmware(image("1.1.0", 1024 * 1024)).await;
    b.js("window.notReloaded = true;").await;
    b.post(
        "/execute/sync",
        json!({"script": "const s = document.getElementById('d-firmware'); \
                          const o = document.createElement('option'); \
                          o.value = arguments[0]; o.textContent = arguments[0]; \
                          s.appendChild(o); s.value = arguments[0]; \
                          document.getElementById('d-mode').value = 'to';",
               "args": [slow]}),
    )
    .await;
    b.type_into("#d-targets", "br-a,br-b").await;
    b.type_into("#d-timeout", "60").await;
    b.click("#deploy button[type=submit]").await;
    let mut seen_percent = std::collections::BTreeSet::new();
    let mut seen_target = false;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let v = b
            .js(
                "return [...document.querySelectorAll('#fleet tr')].map(tr => \
                 [tr.cells[0].textContent, tr.cells[4].textContent, tr.cells[5].textContent, \
                  tr.querySelector('progress') ? tr.querySelector('progress').value : null]);",
            )
            .await;
        let rows: Vec<(String, String, String, Option<f64>)> = serde_json::from_value(v).unwrap();
        for (_, _, target, percent) in &rows {
            seen_target |= target == "1.1.0";
            if let Some(p) = percent {
                let p = *p as u32;
                if (1..100).contains(&p) && !seen_percent.iter().any(|q| (1..100).contains(q)) {
                    b.screenshot(&target_dir().join("page-browser-progress.png"))
                        .await;
                }
                seen_percent.insert(p);
            }
        }
        let done = rows
            .iter()
            .filter(|r| r.0 != "br-c")
            .all(|r| r.1 == "1.1.0" && r.2.is_empty());
        if done {
            break;
        }
        let result = b
            .js("return document.getElementById('deploy-result').textContent;")
            .await;
        assert!(
            Instant::now() < deadline,
            "the rows never reached 1.1.0: {rows:?}; the form said {result}"
        );
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    assert_eq!(
        b.js("return window.notReloaded === true;").await,
        true,
        "the page reloaded"
    );
    assert!(
        seen_target,
        "no row said it was being updated to 1.1.0 (progress seen: {seen_percent:?})"
    );
    assert!(
        seen_percent.iter().any(|p| (1..100).contains(p)) && seen_percent.len() >= 2,
        "the progress bar never moved: saw {seen_percent:?}"
    );
    let rows = wait_rows(&b, "kept br-c on 1.0.0", 5, |rows| rows.len() == 3).await;
    assert_eq!(rows[2][VERSION], "1.0.0", "br-c was not in the deployment");
    assert!(
        rows[0][LAST].contains("updated"),
        "last result in words: {:?}",
        rows[0]
    );

    // A device's details and history, opened from its row.
    b.click("#fleet tr[data-id='br-a'] button").await;
    b.wait_for(
        "showed the history of br-a",
        10,
        "const d = document.getElementById('detail'); return [d.hidden, d.textContent];",
        |v| {
            let (hidden, text): (bool, String) = serde_json::from_value(v.clone()).unwrap();
            !hidden && text.contains("Device br-a") && text.contains("version 1.1.0, ")
        },
    )
    .await;

    // A device that goes away is shown offline, and since when.
    let left_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    drop(leaving);
    wait_rows(&b, "showed br-c offline", 30, |rows| {
        rows.iter()
            .any(|r| r[ID] == "br-c" && r[ONLINE] == "offline")
    })
    .await;
    let v = b
        .js("const c = document.querySelector(\"#fleet tr[data-id='br-c']\").cells[1]; \
             return [c.textContent, devices.get('br-c').online_since, \
                     'offline since ' + new Date(devices.get('br-c').online_since * 1000).toLocaleTimeString()];")
        .await;
    assert_eq!(v[0], v[2], "{v:#}");
    assert!(
        v[1].as_u64().unwrap() >= left_at,
        "offline since before it left: {v:#}"
    );
    // Health at a glance: the broker, who is online, rollouts, logins.
    let v = b
        .wait_for(
            "showed the health of broker and fleet",
            10,
            "return ['health-broker', 'health-online', 'health-rollouts', 'health-users']\
               .map(id => document.getElementById(id).textContent);",
            |v| v[1] == "2 of 3 devices online",
        )
        .await;
    assert_eq!(
        v,
        json!([
            "broker reachable",
            "2 of 3 devices online",
            "0 rollouts running",
            "no login (loopback)"
        ])
    );
    // The preview of a deployment to all devices: which it would touch,
    // and why it would leave br-c out.
    b.js(
        "document.getElementById('d-firmware').value = 'app-1.2.0.bin'; \
          document.getElementById('d-mode').value = 'all';",
    )
    .await;
    b.click("#deploy-preview").await;
    let v = b
        .wait_for(
            "previewed the deployment",
            10,
            "const t = document.getElementById('preview-touch'); \
             const s = document.querySelector(\"#preview-skip li[data-reason='offline']\"); \
             return [t ? t.textContent : null, s ? s.textContent : null, \
                     document.getElementById('preview').textContent];",
            |v| v[0].is_string(),
        )
        .await;
    assert_eq!(
        v[0], "stage 1: br-a (from 1.1.0), br-b (from 1.1.0)",
        "{v:#}"
    );
    assert_eq!(v[1], "1 skipped, offline: br-c", "{v:#}");
    assert!(
        v[2].as_str()
            .unwrap()
            .starts_with("Would update 2 devices to 1.2.0 in 1 stage"),
        "{v:#}"
    );
    b.js("document.getElementById('preview').scrollIntoView({block: 'center'});")
        .await;
    b.screenshot(&target_dir().join("page-browser-preview.png"))
        .await;
    // Only a preview: nothing was started.
    let stored = controller_support::get_json(&format!("{}/api/deployments", serve.http));
    assert_eq!(stored.as_array().unwrap().len(), 1, "{stored:#}");
    b.js("window.scrollTo(0, 0);").await;
    let shot = target_dir().join("page-browser.png");
    b.screenshot(&shot).await;

    // For a screen reader, every control that can be reached has a name;
    // for the keyboard, none is taken out of the tab order.
    let unnamed = b
        .js("return [...document.querySelectorAll('input, select, textarea, button')] \
               .filter(e => e.getClientRects().length > 0) \
               .filter(e => !((e.labels && e.labels.length) || e.getAttribute('aria-label') || \
                              e.getAttribute('aria-labelledby') || e.textContent.trim() || e.title)) \
               .map(e => e.outerHTML.slice(0, 80));")
        .await;
    assert_eq!(unnamed, json!([]), "controls without a name");
    let untabbable = b
        .js(
            "return [...document.querySelectorAll('input, select, button, a[href]')] \
               .filter(e => e.getClientRects().length > 0 && e.tabIndex < 0).map(e => e.id);",
        )
        .await;
    assert_eq!(untabbable, json!([]), "controls the keyboard cannot reach");
    // Tab from the search box lands on the state filter, as the eye reads.
    b.click("#q").await;
    b.post(
        &format!("/element/{}/value", b.element("#q").await),
        json!({"text": "\u{e004}"}),
    )
    .await;
    assert_eq!(
        b.js("return document.activeElement.id;").await,
        "f-state",
        "the next control after the search box"
    );

    // Everything the page asked for came from serve itself.
    let own = format!("{}/", serve.http);
    let urls = b.requested_urls(&own).await;
    assert!(
        urls.iter().any(|u| u.ends_with("/api/events")),
        "the page never opened the event stream: {urls:?}"
    );
    let foreign: Vec<&String> = urls.iter().filter(|u| !u.starts_with(&own)).collect();
    assert!(
        foreign.is_empty(),
        "the page asked other origins: {foreign:?}"
    );
    // Live, not polling: the fallback never ran.
    assert!(
        !urls.iter().any(|u| u.ends_with("/api/fleet")),
        "the page polled /api/fleet although the stream worked"
    );
    // A hidden tab lets go of the stream, a visible one takes it up again.
    b.js(
        "window.seen = []; document.addEventListener('visibilitychange', () => \
          window.seen.push([document.hidden, stream === null]));",
    )
    .await;
    let page = b.cmd(reqwest::Method::GET, "/window", Value::Null).await;
    let tab = b.post("/window/new", json!({"type": "tab"})).await;
    b.post("/window", json!({"handle": tab["handle"]})).await;
    b.post("/window", json!({ "handle": page })).await;
    let seen = b.js("return [window.seen, stream !== null];").await;
    assert_eq!(
        seen,
        json!([[[true, true], [false, false]], true]),
        "[hidden, stream closed] at each visibility change, then whether it is open"
    );

    // A stream that keeps failing (three errors in a row, raised here by
    // hand) gives way to polling the JSON API.
    b.js("for (let i = 0; i < 3; i++) stream.onerror(new Event('error'));")
        .await;
    b.wait_for(
        "fell back to polling",
        10,
        "return [document.getElementById('status').textContent, stream === null];",
        |v| {
            let (status, closed): (String, bool) = serde_json::from_value(v.clone()).unwrap();
            status.starts_with("polling") && closed
        },
    )
    .await;
    wait_rows(&b, "kept the rows while polling", 5, |rows| rows.len() == 3).await;

    // Ten thousand devices (made up in the page) stay fast: one page of 100
    // rows is drawn, and filtering and sorting all of them is quick.
    let v = b
        .js("for (let i = 0; i < 10000; i++) { \
               const id = 'x-' + String(i).padStart(5, '0'); \
               devices.set(id, {id, online: i % 3 > 0, progress: null, ended: [], in_flight: null, \
                 status: {device: id, chip: 'esp32c3', project: 'p', version: '1.0.' + (i % 7), \
                          slot: 0, state: 'valid', last: null, https: false}}); } \
             const t0 = performance.now(); renderFleet(); const all = performance.now() - t0; \
             const q = document.getElementById('q'); q.value = 'x-0999'; \
             q.dispatchEvent(new Event('input')); \
             const t1 = performance.now(); renderFleet(); const search = performance.now() - t1; \
             return [all, search, document.querySelectorAll('#fleet tr').length, \
                     document.getElementById('page-info').textContent];")
        .await;
    let (all_ms, search_ms, rows, info): (f64, f64, usize, String) =
        serde_json::from_value(v).unwrap();
    eprintln!("10,003 devices: drawn in {all_ms:.0} ms, searched in {search_ms:.0} ms; {info}");
    assert!(
        all_ms < 1000.0 && search_ms < 1000.0,
        "slow: {all_ms} ms, {search_ms} ms"
    );
    assert_eq!(rows, 10, "x-09990..x-09999: {info}");
    eprintln!(
        "browser part took {:.1} s; screenshot at {}",
        started.elapsed().as_secs_f64(),
        shot.display()
    );
    drop(b);
    drop(fleet);
}

/// Picks `name` from the deploy form's catalogue choices (once offered)
/// and the targets `mode` (`all`, `to`, `where`).
async fn choose_firmware(b: &Browser, name: &str, mode: &str) {
    b.wait_for(
        &format!("offered {name}"),
        10,
        "return [...document.querySelectorAll('#d-firmware option')].map(o => o.value);",
        |v| v.as_array().is_some_and(|a| a.iter().any(|o| o == name)),
    )
    .await;
    b.js_with(
        "document.getElementById('d-firmware').value = arguments[0]; \
         document.getElementById('d-mode').value = arguments[1];",
        json!([name, mode]),
    )
    .await;
}

/// Puts a firmware URL (a server of the test's own) among the deploy
/// form's choices and picks it, with the targets `mode`.
async fn choose_url_firmware(b: &Browser, url: &str, mode: &str) {
    b.js_with(
        "const s = document.getElementById('d-firmware'); \
         const o = document.createElement('option'); \
         o.value = arguments[0]; o.textContent = arguments[0]; \
         s.appendChild(o); s.value = arguments[0]; \
         document.getElementById('d-mode').value = arguments[1];",
        json!([url, mode]),
    )
    .await;
}

/// The deployment listed first once it is none of `known`: the one the
/// form just created.
async fn newest_deployment(b: &Browser, what: &str, known: &[&str]) -> String {
    let v = b
        .wait_for(
            what,
            20,
            "const r = document.querySelector('#deployments tr'); return r ? r.dataset.id : null;",
            |v| v.as_str().is_some_and(|id| !known.contains(&id)),
        )
        .await;
    v.as_str().unwrap().to_owned()
}

/// The deployment detail's counts, by state: `{"pending": 2, ...}`.
const COUNTS: &str = "const o = {}; for (const li of document.querySelectorAll('#dep-counts li')) \
                      o[li.dataset.state] = Number(li.querySelector('b').textContent); \
                      return {state: document.getElementById('dep-state').textContent, counts: o, \
                      stages: [...document.querySelectorAll('#dep-stages progress')].map(p => p.value)};";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_pauses_and_resumes_a_rollout_uploads_firmware_and_reads_a_device_log_in_chromium(
) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let driver = start_driver().await;
    let broker = mqota_virtual::testing::Mosquitto::start();
    let broker_url = format!("mqtt://127.0.0.1:{}", broker.port());
    let fw = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    // A signed image in the catalogue, to show who signed it.
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("fleet.pem");
    let unsigned = keys.path().join("app-0.9.0.bin");
    std::fs::write(&unsigned, image("0.9.0", 64 * 1024)).unwrap();
    let (key_s, unsigned_s) = (key.to_str().unwrap(), unsigned.to_str().unwrap());
    let signed = fw.path().join("app-0.9.0-signed.bin");
    for args in [
        vec!["keys", "new", "--scheme", "ecdsa-p256", "-o", key_s],
        vec![
            "image",
            "sign",
            "--key",
            key_s,
            unsigned_s,
            "-o",
            signed.to_str().unwrap(),
        ],
    ] {
        let (ok, _, err) = controller_support::mqota(&args);
        assert!(ok, "mqota {args:?}: {err}");
    }
    let (ok, digest, err) = controller_support::mqota(&["keys", "digest", key_s]);
    assert!(ok, "{err}");
    let digest = digest.trim().to_owned();
    let serve = Serve::start(fw.path(), data.path(), Some(&broker_url));
    let ids = ["op-a", "op-b", "op-c", "op-d", "op-e"];
    let _fleet = start_devices(
        ids.iter()
            .map(|id| device_config(id, broker.port()))
            .collect(),
    );
    let b = Browser::start(&driver).await;
    let started = Instant::now();
    b.goto(&format!("{}/", serve.http)).await;
    wait_rows(&b, "listed five devices online", 30, |rows| {
        rows.len() == 5 && rows.iter().all(|r| r[ONLINE] == "online")
    })
    .await;
    // Every progress bar a fleet row draws, by device: the highest value
    // it showed (the bars come and go with the downloads).
    b.js("window.seenBars = {}; setInterval(() => { \
            for (const tr of document.querySelectorAll('#fleet tr')) { \
              const p = tr.querySelector('progress'); \
              if (p) seenBars[tr.dataset.id] = Math.max(seenBars[tr.dataset.id] || 0, p.value); \
            } }, 20);")
        .await;

    // 1. A rollout to five devices in three stages (a canary, then two and
    // two), from the page's form; downloads are slow enough (about 2 s) to
    // pause in the first stage.
    let slow = slow_firmware(image("1.1.0", 1024 * 1024)).await;
    choose_url_firmware(&b, &slow, "to").await;
    b.type_into("#d-targets", &ids.join(",")).await;
    b.type_into("#d-canary", "1").await;
    b.type_into("#d-batch", "2").await;
    b.type_into("#d-timeout", "60").await;
    b.click("#deploy button[type=submit]").await;
    let v = b
        .wait_for(
            "listed the deployment",
            20,
            "const r = document.querySelector('#deployments tr'); return r ? r.dataset.id : null;",
            Value::is_string,
        )
        .await;
    let dep = v.as_str().unwrap().to_owned();
    b.click(&format!("#deployments tr[data-id='{dep}'] button"))
        .await;
    // Pause while the canary downloads: its job finishes, nothing more is
    // sent.
    let v = b
        .wait_for("showed the canary downloading", 20, COUNTS, |v| {
            v["counts"]["downloading"] == 1
        })
        .await;
    assert_eq!(v["counts"]["pending"], 4, "{v:#}");
    assert_eq!(v["stages"].as_array().unwrap().len(), 3, "{v:#}");
    b.click("#dep-pause").await;
    let v = b
        .wait_for(
            "showed the rollout paused after the canary",
            30,
            COUNTS,
            |v| v["state"] == "paused" && v["counts"]["done"] == 1,
        )
        .await;
    assert_eq!(v["counts"]["pending"], 4, "paused: no new job: {v:#}");
    assert_eq!(v["stages"], json!([100, 0, 0]), "{v:#}");
    assert_eq!(
        b.js("return [document.getElementById('dep-pause').disabled, \
              document.getElementById('dep-resume').disabled];")
            .await,
        json!([true, false]),
        "a paused rollout can be resumed, not paused"
    );
    b.screenshot(&target_dir().join("page-browser-deployment.png"))
        .await;
    // The store agrees with what the page shows.
    let stored = controller_support::get_json(&format!("{}/api/deployments/{dep}", serve.http));
    assert_eq!(stored["state"], "paused", "{stored:#}");
    b.click("#dep-resume").await;
    let v = b
        .wait_for(
            "showed the rollout succeeded after the resume",
            60,
            COUNTS,
            |v| v["state"] == "succeeded",
        )
        .await;
    assert_eq!(v["counts"]["done"], 5, "{v:#}");
    assert_eq!(v["counts"]["pending"], 0, "{v:#}");
    assert_eq!(v["stages"], json!([100, 100, 100]), "{v:#}");
    let rows = wait_rows(&b, "showed all five on 1.1.0", 20, |rows| {
        rows.iter().all(|r| r[VERSION] == "1.1.0")
    })
    .await;
    assert_eq!(rows.len(), 5);
    // Each device's row drew its download's bar on the way.
    let seen = b.js("return window.seenBars;").await;
    for id in ids {
        assert!(
            seen[id].as_u64().is_some_and(|p| p > 0),
            "{id} never showed a moving bar: {seen:#}"
        );
    }

    // Stop: a rollout to two devices, one at a time, stopped from the page
    // while the first downloads: that job is cancelled, the second device
    // never gets one, and `stopped` is the deployment's final state.
    let slow = slow_firmware(image("1.2.0", 1024 * 1024)).await;
    choose_url_firmware(&b, &slow, "to").await;
    b.type_into("#d-targets", "op-d,op-e").await;
    b.type_into("#d-canary", "0").await;
    b.type_into("#d-batch", "1").await;
    b.click("#deploy button[type=submit]").await;
    let stopped = newest_deployment(&b, "listed the deployment to stop", &[&dep]).await;
    b.click(&format!("#deployments tr[data-id='{stopped}'] button"))
        .await;
    b.wait_for("showed op-d downloading", 20, COUNTS, |v| {
        v["counts"]["downloading"] == 1
    })
    .await;
    b.click("#dep-stop").await;
    let v = b
        .wait_for("showed the rollout stopped", 30, COUNTS, |v| {
            v["state"] == "stopped" && v["counts"]["downloading"] == 0
        })
        .await;
    assert_eq!(v["counts"]["done"], 0, "{v:#}");
    assert_eq!(v["counts"]["downloading"], 0, "{v:#}");
    assert_eq!(v["counts"]["sent"], 0, "{v:#}");
    let states = b
        .js("return [...document.querySelectorAll('#dep-devices tr')].map(r => [r.dataset.id, r.cells[3].textContent]);")
        .await;
    assert_eq!(states[0], json!(["op-d", "cancelled"]), "{states:#}");
    assert_ne!(states[1][1], "done", "op-e got no job: {states:#}");
    assert_ne!(states[1][1], "sent", "op-e got no job: {states:#}");
    b.screenshot(&target_dir().join("page-browser-stopped.png"))
        .await;
    let stored = controller_support::get_json(&format!("{}/api/deployments/{stopped}", serve.http));
    assert_eq!(stored["state"], "stopped", "{stored:#}");
    wait_rows(&b, "kept op-d and op-e on 1.1.0", 30, |rows| {
        rows.iter()
            .filter(|r| r[ID] == "op-d" || r[ID] == "op-e")
            .all(|r| r[VERSION] == "1.1.0" && r[6].is_empty())
    })
    .await;

    // 2. A file that is not an app image, dropped on the page: refused with
    // the validator's reason.
    b.js("const dt = new DataTransfer(); \
          dt.items.add(new File(['just some notes'], 'notes.bin')); \
          document.getElementById('drop').dispatchEvent(\
            new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));")
        .await;
    let v = b
        .wait_for(
            "showed why notes.bin was refused",
            10,
            "return document.getElementById('upload-result').textContent;",
            |v| v.as_str().is_some_and(|t| t.starts_with("refused")),
        )
        .await;
    assert!(
        v.as_str()
            .unwrap()
            .starts_with("refused notes.bin: not a valid app image"),
        "{v}"
    );
    // A good image through the file picker: in the catalogue.
    let upload = tempfile::tempdir().unwrap();
    let file = upload.path().join("app-1.3.0.bin");
    std::fs::write(&file, image("1.3.0", 64 * 1024)).unwrap();
    let input = b.element("#upload-file").await;
    b.post(
        &format!("/element/{input}/value"),
        json!({ "text": file.to_str().unwrap() }),
    )
    .await;
    let v = b
        .wait_for(
            "listed the uploaded image",
            10,
            "const r = document.querySelector(\"#firmware tr[data-name='app-1.3.0.bin']\"); \
             return [document.getElementById('upload-result').textContent, \
                     r ? [...r.cells].map(c => c.textContent) : null];",
            |v| v[1].is_array(),
        )
        .await;
    assert_eq!(
        v[0], "added app-1.3.0.bin (esp32c3 mqota-virtual 1.3.0)",
        "{v:#}"
    );
    assert_eq!(v[1][3], "1.3.0", "{v:#}");
    assert_eq!(v[1][6], "unsigned", "{v:#}");
    let v = b
        .js("const r = document.querySelector(\"#firmware tr[data-name='app-0.9.0-signed.bin']\"); \
             return [r.cells[6].textContent, r.cells[6].querySelector('code').title];")
        .await;
    assert_eq!(v[0], format!("signed by {}", &digest[..12]), "{v:#}");
    assert_eq!(v[1], format!("key digest {digest}"), "{v:#}");
    assert!(
        fw.path().join("app-1.3.0.bin").is_file(),
        "the file is in the firmware directory"
    );
    assert!(
        !fw.path().join("notes.bin").exists(),
        "nothing refused is left behind"
    );
    b.js("document.getElementById('firmware').scrollIntoView({block: 'center'});")
        .await;
    b.screenshot(&target_dir().join("page-browser-firmware.png"))
        .await;

    // The uploaded image, deployed from the page to all five at once: every
    // bar of the deployment reaches 100 % and every version changes.
    choose_firmware(&b, "app-1.3.0.bin", "all").await;
    b.type_into("#d-targets", "").await;
    b.type_into("#d-canary", "0").await;
    b.type_into("#d-batch", "100%").await;
    b.click("#deploy button[type=submit]").await;
    let all = newest_deployment(
        &b,
        "listed the deployment of the upload first",
        &[&dep, &stopped],
    )
    .await;
    b.click(&format!("#deployments tr[data-id='{all}'] button"))
        .await;
    let v = b
        .wait_for("showed the upload's rollout succeeded", 60, COUNTS, |v| {
            v["state"] == "succeeded"
        })
        .await;
    assert_eq!(v["counts"]["done"], 5, "{v:#}");
    assert_eq!(v["stages"], json!([100]), "{v:#}");
    let bar = b
        .js(&format!(
            "return document.querySelector(\"#deployments tr[data-id='{all}'] progress\").value;"
        ))
        .await;
    assert_eq!(bar, 100, "the list's bar for {all}");
    wait_rows(&b, "showed all five on 1.3.0", 20, |rows| {
        rows.len() == 5 && rows.iter().all(|r| r[VERSION] == "1.3.0")
    })
    .await;
    b.screenshot(&target_dir().join("page-browser-five-updated.png"))
        .await;

    // An unhealthy image, uploaded and deployed from the page to all five
    // with a canary: the canary rolls back, the rollout stops there, and the
    // deployment's detail says why from the canary's log.
    let file = upload.path().join("app-1.4.0+unhealthy.bin");
    std::fs::write(&file, image("1.4.0+unhealthy", 64 * 1024)).unwrap();
    let input = b.element("#upload-file").await;
    b.post(
        &format!("/element/{input}/value"),
        json!({ "text": file.to_str().unwrap() }),
    )
    .await;
    choose_firmware(&b, "app-1.4.0+unhealthy.bin", "all").await;
    b.type_into("#d-canary", "1").await;
    b.click("#deploy button[type=submit]").await;
    let bad = newest_deployment(
        &b,
        "listed the unhealthy deployment first",
        &[&dep, &stopped, &all],
    )
    .await;
    b.click(&format!("#deployments tr[data-id='{bad}'] button"))
        .await;
    let v = b
        .wait_for(
            "showed the canary rolled back with the reason from its log",
            60,
            "const r = [...document.querySelectorAll('#dep-devices tr')] \
                 .find(r => r.cells[3].textContent === 'rolled_back'); \
             return [document.getElementById('dep-title').textContent, \
                     r ? r.dataset.id : null, r ? r.cells[5].textContent : null];",
            |v| {
                v[2].as_str()
                    .is_some_and(|t| t.contains("trial failed: health check failed"))
            },
        )
        .await;
    assert_eq!(v[0], format!("Deployment {bad}"), "{v:#}");
    let canary = v[1].as_str().unwrap().to_owned();
    assert!(
        v[2].as_str()
            .unwrap()
            .starts_with("the new firmware failed its health check; rolled back — "),
        "{v:#}"
    );
    let v = b
        .wait_for(
            "showed the rollout stopped at the canary",
            30,
            COUNTS,
            |v| v["state"] != "running",
        )
        .await;
    assert_eq!(v["state"], "failed", "{v:#}");
    assert_eq!(v["counts"]["rolled_back"], 1, "{v:#}");
    assert_eq!(
        v["counts"]["skipped"], 4,
        "nothing sent past the canary: {v:#}"
    );
    assert_eq!(v["counts"]["pending"], 0, "{v:#}");
    assert_eq!(v["counts"]["done"], 0, "{v:#}");
    let rows = wait_rows(&b, "showed the canary back on 1.3.0", 30, |rows| {
        rows.iter().all(|r| r[VERSION] == "1.3.0")
    })
    .await;
    assert_eq!(rows.len(), 5);
    b.wait_for(
        "offered to retry the failed device once the deployment was over",
        30,
        "const r = document.getElementById('dep-retry'); return [r.disabled, r.textContent];",
        |v| v[0] == false,
    )
    .await;
    b.screenshot(&target_dir().join("page-browser-rollback.png"))
        .await;
    // Retry the failed: a new deployment of the same image to the canary
    // alone.
    b.click("#dep-retry").await;
    let v = b
        .wait_for(
            "opened the retry's deployment",
            20,
            "return [document.getElementById('dep-title').textContent, \
                     document.getElementById('dep-result').textContent, \
                     [...document.querySelectorAll('#dep-devices tr')].map(r => r.dataset.id)];",
            |v| {
                v[0].as_str()
                    .is_some_and(|t| t != format!("Deployment {bad}"))
                    && v[2].as_array().is_some_and(|rows| !rows.is_empty())
            },
        )
        .await;
    let retry = v[0]
        .as_str()
        .unwrap()
        .trim_start_matches("Deployment ")
        .to_owned();
    assert_eq!(v[2], json!([canary]), "{v:#}");
    assert_eq!(
        v[1],
        format!("deployment {retry} retries 1 device of {bad}"),
        "{v:#}"
    );
    let stored = controller_support::get_json(&format!("{}/api/deployments/{retry}", serve.http));
    assert_eq!(stored["firmware"], "app-1.4.0+unhealthy.bin", "{stored:#}");
    // The same image fails the same way; wait for it, so the canary is idle.
    b.wait_for("showed the retry rolled back", 60, COUNTS, |v| {
        v["counts"]["rolled_back"] == 1
    })
    .await;

    // 3. A device's view: its history and its log, read from the device.
    b.click("#fleet tr[data-id='op-b'] button").await;
    let v = b
        .wait_for(
            "showed op-b's log",
            30,
            "return [document.getElementById('detail-log-status').textContent, \
                     [...document.querySelectorAll('#detail-log tr')].map(r => r.cells[4].textContent), \
                     document.querySelectorAll('#detail-history tr').length];",
            |v| v[1].as_array().is_some_and(|a| !a.is_empty()),
        )
        .await;
    let msgs: Vec<String> = serde_json::from_value(v[1].clone()).unwrap();
    assert!(
        msgs.iter().any(|m| m.starts_with("boot 1: power_on")),
        "{msgs:#?}"
    );
    assert!(
        msgs.iter().any(|m| m.contains(&format!("job {dep}: done"))),
        "{msgs:#?}"
    );
    assert!(v[2].as_u64().unwrap() > 0, "no history shown: {v:#}");
    let fields = b
        .js("const o = {}; for (const dt of document.querySelectorAll('#detail-fields dt')) \
               o[dt.textContent] = dt.nextElementSibling.textContent; \
             return [o, [...document.querySelectorAll('#detail-history tr')].map(r => r.cells[2].textContent)];")
        .await;
    assert_eq!(fields[0]["version"], "1.3.0", "{fields:#}");
    assert_eq!(fields[0]["installs"], "any valid image", "{fields:#}");
    assert_eq!(fields[0]["secure version"], "0", "{fields:#}");
    // Its boot trail: the update's reboots, each status saying why.
    assert_eq!(
        fields[0]["last boot"], "software reset (an update or a rollback)",
        "{fields:#}"
    );
    assert!(
        fields[1].as_array().unwrap().iter().any(|l| l
            .as_str()
            .is_some_and(|l| l.starts_with("version 1.3.0, valid")
                && l.ends_with("; booted: software reset (an update or a rollback)"))),
        "{fields:#}"
    );
    b.js("document.getElementById('detail-log-title').scrollIntoView();")
        .await;
    b.screenshot(&target_dir().join("page-browser-device.png"))
        .await;

    // A device rolled back from its own view: op-b, updated to 1.1.0 and
    // then 1.3.0 above, boots 1.1.0 again, and the fleet table shows it
    // without a reload.
    b.click("#detail-rollback").await;
    b.wait_for(
        "said the rollback was sent",
        20,
        "return document.getElementById('detail-command-status').textContent;",
        |v| {
            v.as_str()
                .is_some_and(|t| t.starts_with("rollback sent to op-b"))
        },
    )
    .await;
    wait_rows(&b, "showed op-b back on 1.1.0", 60, |rows| {
        rows.iter().any(|r| r[0] == "op-b" && r[VERSION] == "1.1.0")
    })
    .await;
    b.screenshot(&target_dir().join("page-browser-device-rolled-back.png"))
        .await;

    // Several devices selected in the fleet table: "deploy to the selected"
    // names them in the deployment form.
    b.click("#fleet tr[data-id='op-a'] input[type=checkbox]")
        .await;
    b.click("#fleet tr[data-id='op-c'] input[type=checkbox]")
        .await;
    b.wait_for(
        "counted the selection",
        10,
        "return document.getElementById('selected-count').textContent;",
        |v| v == "2 devices selected",
    )
    .await;
    b.click("#sel-deploy").await;
    let targets = b
        .js("return document.getElementById('d-targets').value;")
        .await;
    assert_eq!(targets, "op-a,op-c");
    b.click("#sel-clear").await;
    b.wait_for(
        "cleared the selection",
        10,
        "return [document.getElementById('selected-count').textContent, \
                 document.querySelectorAll('#fleet input[type=checkbox]:checked').length];",
        |v| v[0] == "none selected" && v[1] == 0,
    )
    .await;

    // The same page on a phone, and in the dark: the layout fits the
    // screen's width (wide tables scroll inside their section) and the dark
    // colours apply when the system asks for them.
    b.post("/window/rect", json!({"width": 390, "height": 844}))
        .await;
    let v = b
        .wait_for(
            "laid the page out for a phone",
            10,
            "return [window.innerWidth, document.documentElement.scrollWidth, \
                     getComputedStyle(document.getElementById('deploy')).gridTemplateColumns.split(' ').length];",
            |v| v[0].as_u64().is_some_and(|w| w < 700),
        )
        .await;
    assert!(
        v[1].as_u64().unwrap() <= v[0].as_u64().unwrap(),
        "the page is wider than the phone's screen: {v:#}"
    );
    assert_eq!(v[2], 1, "the deploy form is one column on a phone: {v:#}");
    wait_rows(&b, "kept the fleet on a phone", 10, |rows| rows.len() == 5).await;
    // A fleet row stays one line high (the table scrolls sideways instead).
    let heights = b
        .js("return [...document.querySelectorAll('#fleet tr')].map(r => r.getBoundingClientRect().height);")
        .await;
    assert!(
        heights
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h.as_f64().is_some_and(|h| h < 60.0)),
        "fleet rows on a phone: {heights}"
    );
    // Every button of the selection is on the screen, none cut off.
    let cut = b
        .js(
            "return [...document.querySelectorAll('#fleet-actions button')] \
               .filter(e => e.getBoundingClientRect().right > window.innerWidth).map(e => e.id);",
        )
        .await;
    assert_eq!(cut, json!([]), "buttons past the screen's edge");
    b.screenshot(&target_dir().join("page-browser-phone.png"))
        .await;
    b.post("/window/rect", json!({"width": 1400, "height": 900}))
        .await;
    let dark = |on: bool| {
        json!({"cmd": "Emulation.setEmulatedMedia", "params": {"features": [
            {"name": "prefers-color-scheme", "value": if on { "dark" } else { "light" }}
        ]}})
    };
    b.post("/goog/cdp/execute", dark(true)).await;
    let v = b
        .wait_for(
            "drew the page dark",
            10,
            "return [matchMedia('(prefers-color-scheme: dark)').matches, \
                     getComputedStyle(document.body).backgroundColor, \
                     getComputedStyle(document.body).color];",
            |v| v[0] == true,
        )
        .await;
    assert_eq!(v[1], "rgb(11, 16, 32)", "the dark background: {v:#}");
    assert_eq!(v[2], "rgb(229, 231, 235)", "light text on it: {v:#}");
    b.screenshot(&target_dir().join("page-browser-dark.png"))
        .await;
    b.post("/goog/cdp/execute", dark(false)).await;
    let v = b
        .js("return getComputedStyle(document.body).backgroundColor;")
        .await;
    assert_ne!(v, "rgb(11, 16, 32)", "light again");

    // 4. Accounts: once one exists, the page asks for a login, and the
    // session then drives the page, CSRF token included.
    let password = "the operator's long password";
    let (ok, _, err) = controller_support::mqota_env(
        &[
            "user",
            "add",
            "olga",
            "--role",
            "operator",
            "--data-dir",
            data.path().to_str().unwrap(),
        ],
        &[("MQOTA_PASSWORD", password)],
    );
    assert!(ok, "{err}");
    b.goto(&format!("{}/", serve.http)).await;
    b.wait_for(
        "asked for a login",
        10,
        "return [document.getElementById('login').hidden, document.getElementById('app').hidden];",
        |v| *v == json!([false, true]),
    )
    .await;
    b.type_into("#login-name", "olga").await;
    b.type_into("#login-password", "not it").await;
    b.click("#login-form button[type=submit]").await;
    b.wait_for(
        "refused a wrong password",
        10,
        "return document.getElementById('login-result').textContent;",
        |v| *v == "wrong name or password",
    )
    .await;
    b.screenshot(&target_dir().join("page-browser-login.png"))
        .await;
    b.type_into("#login-password", password).await;
    b.click("#login-form button[type=submit]").await;
    b.wait_for(
        "logged olga in",
        10,
        "return [document.getElementById('whoami').textContent, \
                 document.getElementById('health-users').textContent];",
        |v| *v == json!(["olga (operator)", "logged in: olga"]),
    )
    .await;
    wait_rows(&b, "listed the fleet after the login", 20, |rows| {
        rows.len() == 5
    })
    .await;
    b.screenshot(&target_dir().join("page-browser-session.png"))
        .await;
    // The cookie is HttpOnly: the page's script cannot read it.
    assert_eq!(b.js("return document.cookie;").await, "");
    // A state-changing click: the page sends the CSRF token with it.
    b.click("#firmware tr[data-name='app-1.3.0.bin'] button")
        .await;
    b.wait_for(
        "deleted app-1.3.0.bin",
        10,
        "return document.getElementById('firmware-result').textContent;",
        |v| *v == "deleted app-1.3.0.bin",
    )
    .await;
    let v = b
        .wait_for(
            "showed the audit log",
            10,
            "return [...document.querySelectorAll('#audit tr')].map(r => [...r.cells].map(c => c.textContent));",
            |v| {
                v.as_array().is_some_and(|rows| {
                    rows.iter().any(|r| r[2] == "delete firmware")
                })
            },
        )
        .await;
    let rows: Vec<Vec<String>> = serde_json::from_value(v).unwrap();
    let row = |action: &str, status: &str| {
        rows.iter()
            .find(|r| r[2] == action && r[5] == status)
            .unwrap_or_else(|| panic!("no {action} {status} in {rows:#?}"))
            .clone()
    };
    assert_eq!(
        &row("delete firmware", "200")[1..5],
        ["olga", "delete firmware", "app-1.3.0.bin", "127.0.0.1"]
    );
    assert_eq!(row("login", "200")[1], "olga");
    assert_eq!(row("login failed", "401")[1], "olga");
    assert_eq!(row("retry", "201")[1], "(no login: loopback)");
    assert_eq!(row("pause", "200")[3], dep);
    b.js("document.getElementById('audit').scrollIntoView({block: 'center'});")
        .await;
    b.screenshot(&target_dir().join("page-browser-audit.png"))
        .await;
    eprintln!(
        "operator scenario took {:.1} s in the browser",
        started.elapsed().as_secs_f64()
    );
}

/// Runs `script` (an async function body that settles by calling `done`,
/// its last argument) in the page and returns what it passed to `done`.
async fn js_async(b: &Browser, script: &str) -> Value {
    b.post("/execute/async", json!({"script": script, "args": []}))
        .await
}

/// Resolves, in the page, once `#fleet-count` reads `arguments[0]`: with
/// the page's clock, so the time is the page's and not the polling's.
const COUNT_READS: &str = "const [want, done] = arguments; \
    const check = () => document.getElementById('fleet-count').textContent === want; \
    if (check()) return done(performance.now()); \
    new MutationObserver((_, o) => { if (check()) { o.disconnect(); done(performance.now()); } }) \
      .observe(document.body, {childList: true, subtree: true, characterData: true});";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_devices_in_the_store_load_and_filter_in_the_page() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let n = 10_000;
    let fw = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start(fw.path(), data.path(), None);
    let port: u16 = serve.broker.rsplit(':').next().unwrap().parse().unwrap();
    tokio::task::spawn_blocking(move || controller_support::publish_fleet(port, n))
        .await
        .unwrap();
    // serve has every one of them before the page is opened.
    let health = format!("{}/api/health", serve.http);
    let read = || std::future::ready(controller_support::get_json(&health));
    let (within, every) = (Duration::from_secs(60), Duration::from_millis(200));
    let what = format!("serve seeing {n}");
    wait_until_async(&what, within, every, read, |h| h["devices"] == n).await;
    let driver = start_driver().await;
    let b = Browser::start(&driver).await;
    b.goto(&format!("{}/", serve.http)).await;
    // From the start of the navigation until the table says all of them.
    let want = format!("{n} devices");
    let loaded = b
        .post(
            "/execute/async",
            json!({"script": COUNT_READS, "args": [want]}),
        )
        .await;
    let rows = b
        .js("return document.querySelectorAll('#fleet tr').length;")
        .await;
    assert_eq!(rows, 100, "one page of rows is drawn");
    // A search typed into the box, until the count says what it found.
    let searched = js_async(
        &b,
        &format!(
            "const done = arguments[0]; const t0 = performance.now(); \
             const q = document.getElementById('q'); q.value = 's-0999'; \
             q.dispatchEvent(new Event('input')); \
             const want = '10 of {n} devices'; \
             const check = () => document.getElementById('fleet-count').textContent === want; \
             if (check()) return done(performance.now() - t0); \
             new MutationObserver((_, o) => {{ if (check()) {{ o.disconnect(); done(performance.now() - t0); }} }}) \
               .observe(document.body, {{childList: true, subtree: true, characterData: true}});"
        ),
    )
    .await;
    let ids = b
        .js("return [...document.querySelectorAll('#fleet tr')].map(r => r.dataset.id);")
        .await;
    let want_ids: Vec<String> = (9990..10_000).map(|i| format!("s-{i:05}")).collect();
    assert_eq!(ids, json!(want_ids));
    let (loaded, searched) = (loaded.as_f64().unwrap(), searched.as_f64().unwrap());
    eprintln!(
        "{n} devices from the store: page loaded with all of them {loaded:.0} ms after navigation; \
         a search narrowed them in {searched:.0} ms"
    );
    b.screenshot(&target_dir().join("page-browser-10k.png"))
        .await;
    // The aim is under a second for both (0.58-0.72 s and 18-25 ms measured
    // here with the machine otherwise idle); the bound for the load is wider so
    // that a busy 2-core runner does not fail it, and still catches the
    // seconds-long loads of a page that polls or draws every row.
    assert!(
        loaded < 3000.0 && searched < 1000.0,
        "slow: loaded in {loaded:.0} ms, searched in {searched:.0} ms"
    );
}

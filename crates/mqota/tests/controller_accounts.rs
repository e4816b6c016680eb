//! Logins, roles, API tokens, CSRF and the audit log of `mqota serve`,
//! tried over real HTTP against the real binary the way an attacker would:
//! each way in without the right credentials is refused with its status.

mod controller_support;

use std::time::Duration;

use controller_support::{image, mqota, mqota_env, Serve};
use mqota_virtual::testing::wait_until_async;
use serde_json::{json, Value};

const PASSWORD: &str = "a long enough password";

/// A logged-in browser, as far as the server can tell: the cookie and the
/// CSRF token the page would send.
struct Session {
    cookie: String,
    csrf: String,
}

async fn login(http: &str, user: &str, password: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{http}/api/login"))
        .json(&json!({"user": user, "password": password}))
        .send()
        .await
        .unwrap()
}

async fn session(http: &str, user: &str) -> Session {
    session_over(http, user, false).await
}

/// [`session`], where serve's `--public-url` is `https://` (`secure`) or not.
async fn session_over(http: &str, user: &str, secure: bool) -> Session {
    let r = login(http, user, PASSWORD).await;
    assert_eq!(r.status(), 200, "{user} logs in");
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attr), "the cookie is {attr}: {set}");
    }
    assert_eq!(
        set.contains("; Secure"),
        secure,
        "Secure only under HTTPS: {set}"
    );
    let cookie = set.split(';').next().unwrap().to_owned();
    let j: Value = r.json().await.unwrap();
    Session {
        cookie,
        csrf: j["csrf"].as_str().unwrap().to_owned(),
    }
}

fn add_user(data: &str, name: &str, role: &str) {
    let (ok, out, err) = mqota_env(
        &["user", "add", name, "--role", role, "--data-dir", data],
        &[("MQOTA_PASSWORD", PASSWORD)],
    );
    assert!(ok, "user add {name}: {err}");
    assert!(!out.contains(PASSWORD) && !err.contains(PASSWORD));
}

fn add_token(data: &str, user: &str, expires: Option<&str>) -> (String, String) {
    let mut args = vec!["token", "add", "--user", user, "--data-dir", data];
    if let Some(e) = expires {
        args.extend(["--expires", e]);
    }
    let (ok, out, err) = mqota(&args);
    assert!(ok, "token add: {err}");
    let secret = out.trim().to_owned();
    let id = err
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("token add names the id: {err}"))
        .to_owned();
    assert!(
        secret.starts_with(&format!("mqota_{id}_")),
        "{secret} / {err}"
    );
    (id, secret)
}

async fn status_of(req: reqwest::RequestBuilder) -> (u16, Value) {
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_way_in_without_the_right_credentials_is_refused_with_its_status() {
    let fw = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let d = data.path().to_str().unwrap().to_owned();
    add_user(&d, "ada", "admin");
    add_user(&d, "otto", "operator");
    add_user(&d, "vera", "viewer");
    let (ok, out, _) = mqota(&["user", "list", "--data-dir", &d]);
    assert!(
        ok && out.contains("otto") && out.contains("operator"),
        "{out}"
    );
    assert!(!out.contains("argon2"), "no hash is listed: {out}");

    let serve = {
        let (fw, data) = (fw.path().to_owned(), data.path().to_owned());
        tokio::task::spawn_blocking(move || Serve::start(&fw, &data, None))
            .await
            .unwrap()
    };
    serve.wait_line(|l| l.starts_with("web login required: 3 account(s)"));
    let http = serve.http.clone();
    let c = reqwest::Client::new();

    // Anonymous: reads and writes alike.
    let (s, _) = status_of(c.get(format!("{http}/api/devices"))).await;
    assert_eq!(s, 401, "anonymous read");
    let (s, _) = status_of(
        c.post(format!("{http}/api/deployments"))
            .json(&json!({"firmware": "a", "all": true})),
    )
    .await;
    assert_eq!(s, 401, "anonymous deploy");
    let (s, j) = status_of(c.get(format!("{http}/api/session"))).await;
    assert_eq!(
        (s, &j["login_required"], &j["user"]),
        (200, &json!(true), &Value::Null)
    );
    // The page itself and device downloads stay reachable.
    assert_eq!(c.get(&http).send().await.unwrap().status(), 200);

    // Wrong password, unknown name.
    assert_eq!(login(&http, "vera", "not her password").await.status(), 401);
    assert_eq!(login(&http, "nobody", PASSWORD).await.status(), 401);
    // A cookie the server never made.
    let (s, _) = status_of(
        c.get(format!("{http}/api/devices"))
            .header("cookie", "mqota_session=forged"),
    )
    .await;
    assert_eq!(s, 401, "forged session");

    // A viewer reads but may not deploy, upload or manage accounts.
    let vera = session(&http, "vera").await;
    let (s, _) = status_of(
        c.get(format!("{http}/api/devices"))
            .header("cookie", &vera.cookie),
    )
    .await;
    assert_eq!(s, 200, "viewer reads");
    let (s, j) = status_of(
        c.post(format!("{http}/api/deployments"))
            .header("cookie", &vera.cookie)
            .header("x-mqota-csrf", &vera.csrf)
            .json(&json!({"firmware": "a", "all": true})),
    )
    .await;
    assert_eq!(s, 403, "viewer deploys: {j}");
    assert!(j["error"].as_str().unwrap().contains("operator"), "{j}");
    let (s, _) = status_of(
        c.get(format!("{http}/api/users"))
            .header("cookie", &vera.cookie),
    )
    .await;
    assert_eq!(s, 403, "viewer lists accounts");

    // An operator uploads, but only with the session's CSRF token: the same
    // request as a page elsewhere would make it (cookie, no token) fails.
    let otto = session(&http, "otto").await;
    let upload = |csrf: Option<&str>| {
        let mut r = c
            .post(format!("{http}/api/firmware/app-1.1.0.bin"))
            .header("cookie", &otto.cookie)
            .header("content-type", "application/octet-stream")
            .body(image("1.1.0", 4096));
        if let Some(t) = csrf {
            r = r.header("x-mqota-csrf", t);
        }
        r
    };
    let (s, j) = status_of(upload(None)).await;
    assert_eq!(s, 403, "CSRF without the token: {j}");
    let (s, _) = status_of(upload(Some(&vera.csrf))).await;
    assert_eq!(s, 403, "CSRF with another session's token");
    assert!(!fw.path().join("app-1.1.0.bin").exists());
    // Valid credentials do not get past the DNS-rebinding guard.
    let (s, _) = status_of(upload(Some(&otto.csrf)).header("host", "evil.example")).await;
    assert_eq!(s, 403, "foreign Host");
    let (s, _) = status_of(upload(Some(&otto.csrf)).header("origin", "http://evil.example")).await;
    assert_eq!(s, 403, "foreign Origin");
    let (s, j) = status_of(upload(Some(&otto.csrf))).await;
    assert_eq!(s, 201, "the operator's upload: {j}");

    // API tokens: accepted, then refused once revoked or expired.
    let (id, token) = add_token(&d, "otto", None);
    let (s, _) = status_of(c.get(format!("{http}/api/firmware")).bearer_auth(&token)).await;
    assert_eq!(s, 200, "a live token");
    let (s, _) = status_of(
        c.get(format!("{http}/api/firmware"))
            .bearer_auth(format!("{token}x")),
    )
    .await;
    assert_eq!(s, 401, "a token one character off");
    // The CLI sends it: deploy resolves a name through serve's catalogue.
    let deploy = |token: Option<&str>| {
        let mut args = vec![
            "deploy",
            "app-1.1.0.bin",
            "--all",
            "--dry-run",
            "--server",
            &http,
            "--broker",
            &serve.broker,
            "--data-dir",
            &d,
        ];
        if let Some(t) = token {
            args.extend(["--token", t]);
        }
        mqota(&args)
    };
    let (ok, _, err) = deploy(None);
    assert!(!ok && err.contains("send an API token"), "{err}");
    let (_, out, err) = deploy(Some(&token));
    // Resolved: what stops it now is that no device has published yet.
    assert!(err.contains("the selection is empty"), "{out}{err}");
    assert!(
        !out.contains(&token) && !err.contains(&token),
        "the token is never printed"
    );
    let (ok, _, err) = mqota(&["token", "revoke", &id, "--data-dir", &d]);
    assert!(ok, "{err}");
    let (s, j) = status_of(c.get(format!("{http}/api/firmware")).bearer_auth(&token)).await;
    assert_eq!(s, 401, "a revoked token: {j}");
    assert!(j["error"].as_str().unwrap().contains("revoked"), "{j}");
    let (_, short) = add_token(&d, "otto", Some("2s"));
    let (c2, http2, short2) = (&c, http.as_str(), short.as_str());
    let read = move || status_of(c2.get(format!("{http2}/api/firmware")).bearer_auth(short2));
    let (within, every) = (Duration::from_secs(15), Duration::from_millis(200));
    let (_, j) = wait_until_async("the token expired", within, every, read, |(s, _)| {
        assert!(*s == 401 || *s == 200, "{s}");
        *s == 401
    })
    .await;
    assert!(j["error"].as_str().unwrap().contains("expired"), "{j}");
    // A viewer's token is a viewer.
    let (_, vt) = add_token(&d, "vera", None);
    let (s, _) = status_of(
        c.delete(format!("{http}/api/firmware/app-1.1.0.bin"))
            .bearer_auth(&vt),
    )
    .await;
    assert_eq!(s, 403, "viewer token deletes");

    // Guessing passwords: after five failures the name is locked out, even
    // for the right password, with Retry-After.
    for _ in 0..5 {
        assert_eq!(login(&http, "ada", "guess").await.status(), 401);
    }
    let r = login(&http, "ada", PASSWORD).await;
    assert_eq!(r.status(), 429);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=300).contains(&wait), "{wait}");

    // The audit log: who did what, from where, and what was refused.
    let (s, log) = status_of(
        c.get(format!("{http}/api/audit"))
            .header("cookie", &vera.cookie),
    )
    .await;
    assert_eq!(s, 200);
    let has = |actor: &str, action: &str, status: u64| {
        log.as_array().unwrap().iter().any(|e| {
            e["actor"] == actor
                && e["action"] == action
                && e["status"] == status
                && e["source"] == "127.0.0.1"
        })
    };
    assert!(has("otto", "upload firmware", 201), "{log:#}");
    assert!(
        has("otto", "upload firmware", 403),
        "the CSRF attempt: {log:#}"
    );
    assert!(has("vera", "deploy", 403), "{log:#}");
    assert!(has("otto", "login", 200), "{log:#}");
    assert!(has("vera", "login failed", 401), "{log:#}");
    assert!(
        has("ada", "login refused (too many failures)", 429),
        "{log:#}"
    );
    let upload_entry = log
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "upload firmware" && e["status"] == 201)
        .unwrap();
    assert_eq!(upload_entry["target"], "app-1.1.0.bin");
    assert!(
        !log.to_string().contains(PASSWORD),
        "no password in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reachable_from_other_machines_requires_login_and_says_how_to_make_the_first_account()
{
    let fw = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let serve = {
        let (fw, data) = (fw.path().to_owned(), data.path().to_owned());
        tokio::task::spawn_blocking(move || {
            Serve::start_with(
                &fw,
                &data,
                None,
                "0.0.0.0:0",
                &["--public-url", "https://ota.example:8443"],
            )
        })
        .await
        .unwrap()
    };
    let line = serve.wait_line(|l| l.starts_with("web login required"));
    assert!(line.contains("mqota user add NAME --role admin"), "{line}");
    let port = serve.http.rsplit(':').next().unwrap();
    let http = format!("http://127.0.0.1:{port}");
    let c = reqwest::Client::new();
    let (s, j) = status_of(c.get(format!("{http}/api/devices"))).await;
    assert_eq!(s, 401, "no account, still no way in: {j}");
    let (s, _) = status_of(
        c.post(format!("{http}/api/users"))
            .json(&json!({"name": "x", "role": "admin", "password": PASSWORD})),
    )
    .await;
    assert_eq!(s, 401, "nobody may make themselves the first account");

    // The first account, made as serve said: login works at once.
    add_user(data.path().to_str().unwrap(), "ada", "admin");
    let ada = session_over(&http, "ada", true).await;
    let (s, users) = status_of(
        c.get(format!("{http}/api/users"))
            .header("cookie", &ada.cookie),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(users[0]["name"], "ada");
    let (s, h) = status_of(
        c.get(format!("{http}/api/health"))
            .header("cookie", &ada.cookie),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(h["logged_in"], json!(["ada"]), "{h}");
    // An admin makes an API token over the API; it works as ada, shown once.
    let (s, t) = status_of(
        c.post(format!("{http}/api/tokens"))
            .header("cookie", &ada.cookie)
            .header("x-mqota-csrf", &ada.csrf)
            .json(&json!({"label": "ci", "expires_in": 3600})),
    )
    .await;
    assert_eq!(s, 201, "{t}");
    let token = t["token"].as_str().unwrap();
    let (s, list) = status_of(c.get(format!("{http}/api/tokens")).bearer_auth(token)).await;
    assert_eq!(s, 200);
    assert_eq!(list[0]["label"], "ci");
    assert!(
        !list.to_string().contains(token),
        "listed without the secret"
    );
    // Logging out ends the session on the server, not only in the browser.
    let (s, _) = status_of(
        c.post(format!("{http}/api/logout"))
            .header("cookie", &ada.cookie)
            .header("x-mqota-csrf", &ada.csrf),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = status_of(
        c.get(format!("{http}/api/users"))
            .header("cookie", &ada.cookie),
    )
    .await;
    assert_eq!(s, 401, "the old cookie after logout");
}

#[test]
fn user_add_takes_the_password_from_stdin_never_from_an_argument_and_refuses_short_ones() {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let data = tempfile::tempdir().unwrap();
    let d = data.path().to_str().unwrap();
    let add = |name: &str, stdin: &str| {
        let mut child = Command::new(controller_support::MQOTA)
            .args(["user", "add", name, "--role", "viewer", "--data-dir", d])
            .env("MQOTA_CONFIG", "/dev/null")
            .env_remove("MQOTA_PASSWORD")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = add("short", "tiny\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 10 characters"));
    let out = add("piped", "from a pipe, long enough\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, list, _) = mqota(&["user", "list", "--data-dir", d]);
    assert!(
        ok && list.contains("piped") && !list.contains("short"),
        "{list}"
    );
    let (ok, _, err) = mqota(&["user", "add", "x", "--role", "root", "--data-dir", d]);
    assert!(
        !ok && err.contains("use viewer, operator or admin"),
        "{err}"
    );
    // No way to hand the password over as an argument.
    let (ok, _, err) = mqota(&[
        "user",
        "add",
        "y",
        "--role",
        "admin",
        "--password",
        "p",
        "--data-dir",
        d,
    ]);
    assert!(!ok && err.contains("--password"), "{err}");
    let (ok, _, _) = mqota(&["user", "add", "piped", "--role", "admin", "--data-dir", d]);
    assert!(!ok, "a taken name");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loopback_serve_without_accounts_stays_open_and_audits_what_is_done() {
    let fw = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let serve = {
        let (fw, data) = (fw.path().to_owned(), data.path().to_owned());
        tokio::task::spawn_blocking(move || Serve::start(&fw, &data, None))
            .await
            .unwrap()
    };
    serve.wait_line(|l| l.starts_with("web page and API open without login"));
    let http = serve.http.clone();
    let c = reqwest::Client::new();
    let (s, _) = status_of(
        c.post(format!("{http}/api/firmware/app-1.0.1.bin"))
            .header("content-type", "application/octet-stream")
            .body(image("1.0.1", 4096)),
    )
    .await;
    assert_eq!(s, 201);
    let (s, log) = status_of(c.get(format!("{http}/api/audit"))).await;
    assert_eq!(s, 200);
    assert_eq!(log[0]["action"], "upload firmware", "{log}");
    assert_eq!(log[0]["actor"], "(no login: loopback)", "{log}");
}

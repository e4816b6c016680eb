//! The firmware server under a rollout's load and under abuse: many devices
//! download the same image at once, whole or by `Range`, over real sockets;
//! a directory holding what it should not, and clients that never finish a
//! request, do not take it down.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use mqota_controller::http::router;
use mqota_controller::server::{serve as serve_limited, HttpLimits};
use mqota_controller::store::Store;
use reqwest::{header, StatusCode};
use sha2::Digest;
use support::{app_state, image};

struct Server {
    base: String,
    _data: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(fw: &std::path::Path) -> Server {
    serve_with(fw, HttpLimits::default()).await
}

async fn serve_with(fw: &std::path::Path, limits: HttpLimits) -> Server {
    let data = tempfile::tempdir().unwrap();
    let state = app_state(fw, Arc::new(Store::open(data.path()).unwrap()));
    let app = router(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        serve_limited(listener, app, limits, std::future::pending())
            .await
            .unwrap();
    });
    Server {
        base,
        _data: data,
        task,
    }
}

/// Sends `n` requests at once (whole, ranged and HEAD, in turn) and checks
/// every answer against `img`.
async fn burst(url: &str, img: &[u8], n: usize) {
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let etag = format!("\"{}\"", hex::encode(sha2::Sha256::digest(img)));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (c, url, img, etag) = (c.clone(), url.to_owned(), img.to_vec(), etag.clone());
        tasks.push(tokio::spawn(async move {
            match i % 3 {
                0 => {
                    let r = c.get(&url).send().await.unwrap();
                    assert_eq!(r.status(), StatusCode::OK);
                    assert_eq!(r.headers()[header::ETAG], etag.as_str());
                    assert_eq!(r.bytes().await.unwrap().as_ref(), img.as_slice());
                }
                1 => {
                    // A device resuming from somewhere in the middle.
                    let from = (i * 997) % img.len();
                    let r = c
                        .get(&url)
                        .header(header::RANGE, format!("bytes={from}-"))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
                    assert_eq!(
                        r.headers()[header::CONTENT_RANGE],
                        format!("bytes {from}-{}/{}", img.len() - 1, img.len()).as_str()
                    );
                    assert_eq!(r.bytes().await.unwrap().as_ref(), &img[from..]);
                }
                _ => {
                    let r = c.head(&url).send().await.unwrap();
                    assert_eq!(r.status(), StatusCode::OK);
                    assert_eq!(
                        r.headers()[header::CONTENT_LENGTH],
                        img.len().to_string().as_str()
                    );
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_downloads_are_exact_and_a_replaced_or_removed_file_is_seen_at_once() {
    let fw = tempfile::tempdir().unwrap();
    let path = fw.path().join("app.bin");
    let v1 = image("1.1.0", 256 * 1024);
    std::fs::write(&path, &v1).unwrap();
    let server = serve(fw.path()).await;
    let url = format!("{}/firmware/app.bin", server.base);

    burst(&url, &v1, 150).await;

    // The operator replaces the file (another size, so the catalogue sees
    // the change at once): the new bytes and ETag are served.
    let v2 = image("1.2.0", 200 * 1024);
    std::fs::write(&path, &v2).unwrap();
    burst(&url, &v2, 60).await;

    // A removed file is gone, not served from memory.
    std::fs::remove_file(&path).unwrap();
    let r = reqwest::get(&url).await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_non_image_and_a_link_out_of_the_directory_are_neither_listed_nor_served() {
    let fw = tempfile::tempdir().unwrap();
    let img = image("1.0.0", 64 * 1024);
    std::fs::write(fw.path().join("app.bin"), &img).unwrap();
    std::fs::write(fw.path().join("notes.bin"), b"not an image").unwrap();
    // 1 GiB that occupies no disk: reading it would cost a gigabyte of RAM.
    std::fs::File::create(fw.path().join("huge.bin"))
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    std::os::unix::fs::symlink("/etc/passwd", fw.path().join("x.bin")).unwrap();
    // A link that stays inside the directory is the file it names.
    std::os::unix::fs::symlink("app.bin", fw.path().join("current.bin")).unwrap();
    let server = serve(fw.path()).await;
    let before = rss_kib();

    let list: Vec<serde_json::Value> = reqwest::get(format!("{}/api/firmware", server.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = list.iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["app.bin", "current.bin"], "{list:#?}");
    for bad in ["huge.bin", "x.bin", "notes.bin"] {
        let r = reqwest::get(format!("{}/firmware/{bad}", server.base))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{bad}");
        let body = r.bytes().await.unwrap();
        assert!(!body.windows(5).any(|w| w == b"root:"), "{bad}");
    }
    let r = reqwest::get(format!("{}/firmware/current.bin", server.base))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap().as_ref(), img.as_slice());
    let grown = rss_kib().saturating_sub(before);
    println!("RSS grew by {grown} KiB while listing and asking for a 1 GiB file");
    assert!(grown < 64 * 1024, "RSS grew by {grown} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_names_are_404_overflowing_ranges_416_and_api_errors_json() {
    let fw = tempfile::tempdir().unwrap();
    let img = image("1.0.0", 8192);
    std::fs::write(fw.path().join("app.bin"), &img).unwrap();
    let server = serve(fw.path()).await;
    let c = reqwest::Client::new();

    let long = "a".repeat(4000);
    let r = c
        .get(format!("{}/firmware/{long}.bin", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    let url = format!("{}/firmware/app.bin", server.base);
    for range in [
        "bytes=99999999999999999999999-",
        "bytes=8192-",
        "bytes=18446744073709551615-18446744073709551615",
    ] {
        let r = c
            .get(&url)
            .header(header::RANGE, range)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
        assert_eq!(r.headers()[header::CONTENT_RANGE], "bytes */8192");
    }

    for (method, path, want) in [
        (
            reqwest::Method::GET,
            "/api/nothing-here",
            StatusCode::NOT_FOUND,
        ),
        (
            reqwest::Method::DELETE,
            "/api/devices",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            reqwest::Method::GET,
            &*format!("/api/deployments/{long}"),
            StatusCode::NOT_FOUND,
        ),
    ] {
        let r = c
            .request(method, format!("{}{path}", server.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), want, "{path}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert!(v["error"].is_string(), "{path}: {v}");
    }
}

/// Opens `n` connections that each send half a request head (or, every
/// other one, nothing at all) and then nothing more, and keeps them.
async fn half_open(addr: std::net::SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt as _;
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
            continue;
        };
        if i % 2 == 1 {
            held.push(s);
            continue;
        }
        // Closed at once when over the cap: that is the server's answer.
        let _ = s
            .write_all(b"GET /firmware/app.bin HTTP/1.1\r\nHost: x\r\n")
            .await;
        held.push(s);
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_half_open_connections_do_not_stop_a_download() {
    let fw = tempfile::tempdir().unwrap();
    let img = image("1.0.0", 1024 * 1024);
    std::fs::write(fw.path().join("app.bin"), &img).unwrap();
    let limits = HttpLimits {
        header_read_timeout: Duration::from_secs(1),
        max_connections: 256,
        ..HttpLimits::default()
    };
    let server = serve_with(fw.path(), limits).await;
    let addr: std::net::SocketAddr = server.base.trim_start_matches("http://").parse().unwrap();

    let started = Instant::now();
    let held = half_open(addr, 2000).await;
    println!(
        "{} half-open connections in {:?}",
        held.len(),
        started.elapsed()
    );

    // A device downloads as devices do: retry a refused or cut connection.
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let url = format!("{}/firmware/app.bin", server.base);
    let asked = Instant::now();
    let deadline = asked + Duration::from_secs(8);
    let mut tries = 0;
    let body = loop {
        tries += 1;
        match c.get(&url).timeout(Duration::from_secs(4)).send().await {
            Ok(r) if r.status() == StatusCode::OK => match r.bytes().await {
                Ok(b) => break b,
                Err(e) => assert!(Instant::now() < deadline, "{e}"),
            },
            Ok(r) => panic!("{}", r.status()),
            Err(e) => assert!(
                Instant::now() < deadline,
                "no download by the deadline: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(body.as_ref(), img.as_slice());
    println!(
        "download done {:?} after the flood ({tries} tries)",
        asked.elapsed()
    );
    drop(held);
}

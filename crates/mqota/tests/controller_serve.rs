//! `mqota serve` as a process, checked with a plain HTTP client.

mod controller_support;

use std::time::Duration;

use controller_support::{image, Serve};
use mqota_virtual::testing::wait_until_async;
use reqwest::header;
use reqwest::StatusCode;
use sha2::Digest;

fn firmware_dir() -> (tempfile::TempDir, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let img = image("1.1.0", 64 * 1024);
    std::fs::write(dir.path().join("app-1.1.0.bin"), &img).unwrap();
    std::fs::write(dir.path().join("README.txt"), b"not an image").unwrap();
    (dir, img)
}

#[tokio::test]
async fn firmware_is_served_with_length_etag_ranges_and_conditional_answers() {
    let (fw, img) = firmware_dir();
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start(fw.path(), data.path(), None);
    let url = format!("{}/firmware/app-1.1.0.bin", serve.http);
    let c = reqwest::Client::new();
    let etag = format!("\"{}\"", hex::encode(sha2::Sha256::digest(&img)));

    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()[header::ETAG], etag.as_str());
    assert_eq!(r.headers()[header::ACCEPT_RANGES], "bytes");
    assert_eq!(
        r.headers()[header::CONTENT_LENGTH],
        img.len().to_string().as_str()
    );
    assert_eq!(r.bytes().await.unwrap().as_ref(), img.as_slice());

    let r = c.head(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()[header::CONTENT_LENGTH],
        img.len().to_string().as_str()
    );
    assert_eq!(r.headers()[header::ETAG], etag.as_str());
    assert!(r.bytes().await.unwrap().is_empty(), "HEAD has no body");

    let r = c
        .get(&url)
        .header(header::RANGE, "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        r.headers()[header::CONTENT_RANGE],
        format!("bytes 100-199/{}", img.len()).as_str()
    );
    assert_eq!(r.headers()[header::CONTENT_LENGTH], "100");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &img[100..200]);

    // Resuming a download from the middle to the end.
    let from = img.len() - 1000;
    let r = c
        .get(&url)
        .header(header::RANGE, format!("bytes={from}-"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &img[from..]);

    let r = c
        .get(&url)
        .header(header::RANGE, format!("bytes={}-", img.len()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        r.headers()[header::CONTENT_RANGE],
        format!("bytes */{}", img.len()).as_str()
    );

    let r = c
        .get(&url)
        .header(header::IF_NONE_MATCH, &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert!(r.bytes().await.unwrap().is_empty());

    let r = c
        .get(&url)
        .header(header::IF_NONE_MATCH, "\"something-else\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // If-Range with a stale validator: the whole (changed) file, not a slice.
    let r = c
        .get(&url)
        .header(header::RANGE, "bytes=0-9")
        .header(header::IF_RANGE, "\"stale\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    for missing in ["nope.bin", "..%2Fetc%2Fpasswd"] {
        let r = c
            .get(format!("{}/firmware/{missing}", serve.http))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{missing}");
    }
}

#[tokio::test]
async fn the_api_lists_each_image_as_read_from_it_and_no_other_file() {
    let (fw, img) = firmware_dir();
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start(fw.path(), data.path(), None);
    let list: Vec<serde_json::Value> = reqwest::get(format!("{}/api/firmware", serve.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // README.txt is no image: serve says so at start, the API leaves it out.
    assert_eq!(list.len(), 1, "{list:#?}");
    let app = &list[0];
    assert_eq!(app["name"], "app-1.1.0.bin");
    assert_eq!(app["url"], format!("{}/firmware/app-1.1.0.bin", serve.http));
    assert_eq!(app["chip"], "esp32c3");
    assert_eq!(app["project"], controller_support::PROJECT);
    assert_eq!(app["version"], "1.1.0");
    assert_eq!(app["size"], img.len());
    assert_eq!(app["sha256"], hex::encode(sha2::Sha256::digest(&img)));
    assert_eq!(app["valid"], true);
}

#[tokio::test]
async fn serves_http_limits_are_set_by_its_flags() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (fw, _) = firmware_dir();
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start_with(
        fw.path(),
        data.path(),
        None,
        "127.0.0.1:0",
        &[
            "--http-header-timeout",
            "1",
            "--http-max-body",
            "2048",
            "--http-max-connections",
            "2",
        ],
    );
    let addr = serve.http.trim_start_matches("http://").to_owned();

    // A body over --http-max-body: 413, as JSON. (No idle pooled
    // connection: it would hold one of the two slots below.)
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let body = serde_json::json!({"firmware": "app-1.1.0.bin", "to": vec!["x".repeat(64); 64]});
    let r = c
        .post(format!("{}/api/deployments", serve.http))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let err: serde_json::Value = r.json().await.unwrap();
    assert!(err["error"].is_string(), "{err}");

    // A head not sent within --http-header-timeout: the connection is
    // closed (well before the 10 s default would).
    let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    idle.write_all(b"GET /api/firmware HTTP/1.1\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(std::time::Duration::from_secs(8), async {
        loop {
            match idle.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a half-sent head was kept open");
    assert!(started.elapsed() < std::time::Duration::from_secs(8));

    // --http-max-connections 2: with two connections held open, a third is
    // closed at once; once they go, it is served again.
    let held: Vec<_> = {
        let mut v = Vec::new();
        for _ in 0..2 {
            let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
            // A complete request on a kept-alive connection holds its slot.
            s.write_all(b"GET /api/firmware HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                .await
                .unwrap();
            let n = s.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            v.push(s);
        }
        v
    };
    let mut third = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let _ = third
        .write_all(b"GET /api/firmware HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await;
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("the connection over the cap is closed at once")
        .unwrap_or(0);
    assert_eq!(
        n,
        0,
        "served over the cap: {:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    drop(held);
    let (c, url) = (&c, format!("{}/api/firmware", serve.http));
    let url = url.as_str();
    let read = move || async move { c.get(url).send().await.ok().map(|r| r.status()) };
    let (within, every) = (Duration::from_secs(10), Duration::from_millis(100));
    wait_until_async("served again", within, every, read, |s| {
        *s == Some(StatusCode::OK)
    })
    .await;
}

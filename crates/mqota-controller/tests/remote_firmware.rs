//! A firmware URL is fetched against real local HTTP servers that misbehave:
//! an endless body, a redirect loop, a redirect into loopback, a body that
//! must not be echoed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use futures_util::StreamExt as _;
use mqota_controller::catalogue::resolve_firmware;
use mqota_controller::remote::RemoteFirmware;
use mqota_core::protocol::MAX_FIRMWARE_SIZE;

/// A server on 127.0.0.1 with the misbehaving routes; returns its port and
/// how many requests reached it.
async fn misbehaving_server() -> (u16, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = Router::new()
        .route(
            "/endless.bin",
            get(|| async {
                let chunk = Bytes::from(vec![0xE9u8; 64 * 1024]);
                let endless = futures_util::stream::repeat(chunk).map(Ok::<_, std::io::Error>);
                Body::from_stream(endless)
            }),
        )
        .route(
            "/loop",
            get(|| async { (StatusCode::FOUND, [(header::LOCATION, "/loop")]) }),
        )
        .route(
            "/to-loopback",
            get(move || async move {
                let to = format!("http://127.0.0.1:{port}/secret");
                (StatusCode::FOUND, [(header::LOCATION, to)]).into_response()
            }),
        )
        .route("/secret", get(|| async { "SECRET-internal-token" }))
        .route(
            "/broken",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "SECRET-internal-token") }),
        )
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let counted = counted.clone();
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    next.run(req).await
                }
            },
        ));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, hits)
}

/// The process's peak resident set so far.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_body_is_cut_at_the_image_limit() {
    let (port, _) = misbehaving_server().await;
    let allowed = RemoteFirmware::allow(["127.0.0.1"]);
    let before = peak_rss_kib();
    let started = Instant::now();
    let err = allowed
        .fetch(&format!("http://127.0.0.1:{port}/endless.bin"))
        .await
        .unwrap_err();
    let grown = peak_rss_kib().saturating_sub(before);
    println!(
        "endless body refused in {:?}, peak RSS grew {grown} KiB: {err}",
        started.elapsed()
    );
    assert!(err.contains(&MAX_FIRMWARE_SIZE.to_string()), "{err}");
    assert!(
        grown < 3 * MAX_FIRMWARE_SIZE as u64 / 1024,
        "peak RSS grew {grown} KiB"
    );
}

#[tokio::test]
async fn a_redirect_loop_stops_after_five_redirects() {
    let (port, hits) = misbehaving_server().await;
    let err = RemoteFirmware::allow(["127.0.0.1"])
        .fetch(&format!("http://127.0.0.1:{port}/loop"))
        .await
        .unwrap_err();
    assert!(err.contains("more than 5 redirects"), "{err}");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        6,
        "the first request and 5 redirects"
    );
}

#[tokio::test]
async fn loopback_is_refused_directly_and_behind_a_redirect_unless_allowed() {
    let (port, hits) = misbehaving_server().await;
    let none = RemoteFirmware::default();
    let err = none
        .fetch(&format!("http://127.0.0.1:{port}/secret"))
        .await
        .unwrap_err();
    assert!(err.contains("--allow-remote-firmware 127.0.0.1"), "{err}");
    let err = none
        .fetch(&format!("http://localhost:{port}/secret"))
        .await
        .unwrap_err();
    assert!(err.contains("--allow-remote-firmware localhost"), "{err}");
    assert_eq!(hits.load(Ordering::SeqCst), 0, "no connection was made");

    // `localhost` is allowed, the 127.0.0.1 it redirects to is not.
    let err = RemoteFirmware::allow(["localhost"])
        .fetch(&format!("http://localhost:{port}/to-loopback"))
        .await
        .unwrap_err();
    assert!(err.contains("--allow-remote-firmware 127.0.0.1"), "{err}");
    assert!(!err.contains("SECRET"), "{err}");
    assert_eq!(hits.load(Ordering::SeqCst), 1, "/secret was never asked");
}

#[tokio::test]
async fn an_error_never_quotes_what_was_fetched() {
    let (port, _) = misbehaving_server().await;
    let allowed = RemoteFirmware::allow(["127.0.0.1"]);
    for path in ["secret", "broken"] {
        let url = format!("http://127.0.0.1:{port}/{path}");
        let err = resolve_firmware(&url, "", &allowed)
            .await
            .unwrap_err()
            .to_string();
        assert!(!err.contains("SECRET") && !err.contains("S\\"), "{err}");
        println!("{path}: {err}");
    }
    // The firmware server's own host is allowed without a flag.
    let url = format!("http://127.0.0.1:{port}/secret");
    let err = resolve_firmware(
        &url,
        &format!("http://127.0.0.1:{port}"),
        &RemoteFirmware::default(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("not a valid app image"), "{err}");
    // ... that port of it only: another loopback service stays out of reach.
    let err = resolve_firmware(
        &url,
        &format!("http://127.0.0.1:{}", port.wrapping_add(1)),
        &RemoteFirmware::default(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("--allow-remote-firmware 127.0.0.1"), "{err}");
}

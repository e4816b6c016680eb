//! The operator's changes to the firmware catalogue over HTTP (`POST` and
//! `DELETE /api/firmware/{name}`), on a real socket, behind the same
//! Host/Origin guard as in `serve`.

mod support;

use std::sync::Arc;

use mqota_controller::catalogue::MAX_UPLOAD;
use mqota_controller::http::{catalogue_router, guard_hosts, router};
use mqota_controller::store::{Deployment, DeploymentState, Store};
use reqwest::StatusCode;
use serde_json::Value;
use support::{app_state, image};

#[tokio::test]
async fn uploads_are_checked_as_app_images_and_a_file_in_use_cannot_be_deleted() {
    let fw = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(data.path()).unwrap());
    let state = app_state(fw.path(), store.clone());
    let app = guard_hosts(
        router(state.clone()).merge(catalogue_router(state)),
        Vec::new(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let c = reqwest::Client::new();
    let put = |name: &str, body: Vec<u8>| {
        c.post(format!("{base}/api/firmware/{name}"))
            .header("content-type", "application/octet-stream")
            .body(body)
            .send()
    };
    let error = |r: reqwest::Response| async move {
        let status = r.status();
        let v: Value = r.json().await.unwrap();
        (status, v["error"].as_str().unwrap_or_default().to_owned())
    };

    let r = put("app-2.0.0.bin", image("2.0.0", 8192)).await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["version"], "2.0.0");
    let list: Value = c
        .get(format!("{base}/api/firmware"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list[0]["name"], "app-2.0.0.bin");
    assert_eq!(list[0]["valid"], true);

    // Refused, each with its reason, and nothing written.
    let (s, e) = error(put("notes.bin", b"hello".to_vec()).await.unwrap()).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(e.starts_with("not a valid app image"), "{e}");
    let (s, e) = error(put("app-2.0.0.bin", image("2.0.1", 8192)).await.unwrap()).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(e.contains("already in the catalogue"), "{e}");
    let (s, e) = error(put(".hidden", image("2.0.1", 8192)).await.unwrap()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(e.contains("not a usable file name"), "{e}");
    let (s, e) = error(put("big.bin", vec![0xE9; MAX_UPLOAD + 2]).await.unwrap()).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(e.contains("larger than"), "{e}");
    // A form could post text/plain cross-site without asking first.
    let r = c
        .post(format!("{base}/api/firmware/x.bin"))
        .header("content-type", "text/plain")
        .body(image("2.0.1", 8192))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // Another site's page is turned away by the guard.
    let r = c
        .post(format!("{base}/api/firmware/x.bin"))
        .header("content-type", "application/octet-stream")
        .header("origin", "http://evil.example")
        .body(image("2.0.1", 8192))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let mut names: Vec<String> = std::fs::read_dir(fw.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["app-2.0.0.bin"]);

    // In use by a paused deployment (by its URL): kept, and who uses it said.
    store
        .create_deployment(&Deployment {
            id: "d-1".into(),
            firmware: format!("{base}/firmware/app-2.0.0.bin"),
            url: format!("{base}/firmware/app-2.0.0.bin"),
            version: "2.0.0".into(),
            sha256: "00".repeat(32),
            size: 8192,
            options: serde_json::json!({}),
            state: DeploymentState::Running,
            reason: None,
            created_at: 1,
            updated_at: 1,
            devices: Vec::new(),
        })
        .unwrap();
    store.pause("d-1").unwrap();
    let delete = || {
        c.delete(format!("{base}/api/firmware/app-2.0.0.bin"))
            .send()
    };
    let (s, e) = error(delete().await.unwrap()).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(e.contains("paused deployment d-1"), "{e}");
    assert!(fw.path().join("app-2.0.0.bin").is_file());
    store.stop("d-1").unwrap();
    assert_eq!(delete().await.unwrap().status(), StatusCode::OK);
    assert!(!fw.path().join("app-2.0.0.bin").exists());
    let (s, _) = error(delete().await.unwrap()).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    task.abort();
}

//! `GET /api/devices` pages through the recorded fleet: a default and a
//! largest page size, an `after` cursor, `next` on every page but the last,
//! and JSON errors for a bad `limit`. Real store, real HTTP server.

mod support;

use std::sync::Arc;

use mqota_controller::http::{router, DEVICES_PAGE, DEVICES_PAGE_MAX};
use mqota_controller::server::{serve, HttpLimits};
use mqota_controller::store::Store;
use reqwest::StatusCode;
use support::app_state;

const FLEET: usize = 2_500;

struct Server {
    base: String,
    store: Arc<Store>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start() -> Server {
    let (fw, data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let store = Arc::new(Store::open(data.path()).unwrap());
    let state = app_state(fw.path(), store.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = router(state);
    let task = tokio::spawn(async move {
        serve(listener, app, HttpLimits::default(), std::future::pending())
            .await
            .unwrap();
    });
    Server {
        base,
        store,
        _dirs: (fw, data),
        task,
    }
}

fn record(store: &Store, id: &str) {
    store
        .record_status(id, &serde_json::json!({"device": id, "version": "1.0.0"}))
        .unwrap();
}

async fn get(url: &str) -> (StatusCode, serde_json::Value) {
    let r = reqwest::get(url).await.unwrap();
    (r.status(), r.json().await.unwrap())
}

fn ids(page: &serde_json::Value) -> Vec<String> {
    page["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_list_comes_in_pages_that_add_up_to_the_whole_fleet() {
    let s = start().await;
    // Recorded out of order: pages come in id order all the same.
    let mut want: Vec<String> = (0..FLEET).map(|i| format!("d-{i:05}")).collect();
    for id in want.iter().rev() {
        record(&s.store, id);
    }

    // Without a limit: the default page, and where to go on.
    let (code, first) = get(&format!("{}/api/devices", s.base)).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(ids(&first), want[..DEVICES_PAGE]);
    assert_eq!(first["next"], want[DEVICES_PAGE - 1].as_str());
    assert_eq!(first["devices"][0]["status"]["version"], "1.0.0");

    // A walk by `next` sees every device once, in order; a device recorded
    // during the walk, after the cursor, is seen too.
    let mut seen = Vec::new();
    let mut url = format!("{}/api/devices?limit=700", s.base);
    let mut pages = 0;
    loop {
        let (code, page) = get(&url).await;
        assert_eq!(code, StatusCode::OK, "{page}");
        seen.extend(ids(&page));
        pages += 1;
        if pages == 1 {
            record(&s.store, "zz-late");
            want.push("zz-late".to_owned());
        }
        match page["next"].as_str() {
            Some(next) => url = format!("{}/api/devices?limit=700&after={next}", s.base),
            None => break,
        }
    }
    assert_eq!(pages, (FLEET + 1).div_ceil(700));
    assert_eq!(seen, want);

    // One page holds the whole fleet at the largest limit; past the end,
    // an empty last page.
    let (_, all) = get(&format!("{}/api/devices?limit={DEVICES_PAGE_MAX}", s.base)).await;
    assert_eq!(ids(&all).len(), FLEET + 1);
    assert!(all["next"].is_null());
    let (code, past) = get(&format!("{}/api/devices?after=zz-late", s.base)).await;
    assert_eq!(code, StatusCode::OK);
    assert!(ids(&past).is_empty() && past["next"].is_null(), "{past}");

    // A bad limit is refused, in JSON, saying what a good one is.
    let too_many = (DEVICES_PAGE_MAX + 1).to_string();
    for bad in ["0", "-1", "ten", too_many.as_str()] {
        let (code, err) = get(&format!("{}/api/devices?limit={bad}", s.base)).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "limit={bad}");
        assert!(
            err["error"].as_str().unwrap().contains("limit"),
            "limit={bad}: {err}"
        );
    }
}

//! The firmware server under a rollout's load: many devices download the
//! same image at once, whole or by `Range`, over real sockets.

use std::sync::Arc;

use mqota_controller::catalogue::Catalogue;
use mqota_controller::http::{router_with_cache, AppState, ImageCache};
use mqota_controller::store::Store;
use mqota_core::image::{Chip, ImageBuilder};
use reqwest::{header, StatusCode};
use sha2::Digest;

fn image(version: &str, size: u32) -> Vec<u8> {
    ImageBuilder::new(Chip::Esp32c3)
        .version(version)
        .project("fleet")
        .size(size)
        .build()
        .unwrap()
}

struct Server {
    base: String,
    images: Arc<ImageCache>,
    _data: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(fw: &std::path::Path) -> Server {
    let data = tempfile::tempdir().unwrap();
    let state = Arc::new(AppState {
        catalogue: Catalogue::new(fw),
        store: Arc::new(Store::open(data.path()).unwrap()),
        public_url: None,
    });
    let images = Arc::new(ImageCache::default());
    let app = router_with_cache(state, images.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Server {
        base,
        images,
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
async fn concurrent_downloads_share_one_read_of_the_image_and_a_replaced_file_is_read_again() {
    let fw = tempfile::tempdir().unwrap();
    let path = fw.path().join("app.bin");
    let v1 = image("1.1.0", 256 * 1024);
    std::fs::write(&path, &v1).unwrap();
    let server = serve(fw.path()).await;
    let url = format!("{}/firmware/app.bin", server.base);

    burst(&url, &v1, 150).await;
    assert_eq!(
        server.images.reads(),
        1,
        "150 concurrent requests must share one read of the file"
    );
    burst(&url, &v1, 30).await;
    assert_eq!(server.images.reads(), 1, "later requests reuse the copy");

    // The operator replaces the file (another size, so the catalogue sees
    // the change at once): the new bytes and ETag are served, read once.
    let v2 = image("1.2.0", 200 * 1024);
    std::fs::write(&path, &v2).unwrap();
    burst(&url, &v2, 60).await;
    assert_eq!(server.images.reads(), 2);

    // A removed file is gone, not served from memory.
    std::fs::remove_file(&path).unwrap();
    let r = reqwest::get(&url).await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

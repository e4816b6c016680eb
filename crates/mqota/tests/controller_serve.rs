//! `mqota serve` as a process, checked with a plain HTTP client.

mod controller_support;

use controller_support::{image, Serve};
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

//! The runtime's downloader against a real HTTP server (tower-http ServeDir).

use embedded_io::ErrorKind;
use mqota_runtime::{Abort, BodySink, DownloadError, Downloader, ResponseInfo, BODY_CHUNK};
use mqota_virtual::net::TokioNet;
use mqota_virtual::testing::{free_port, FileServer};
use sha2::{Digest, Sha256};

const SIZE: usize = 100_000;

fn firmware() -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[derive(Default)]
struct HashSink {
    info: Option<ResponseInfo>,
    hasher: Sha256,
    bytes: usize,
    largest_chunk: usize,
    abort_after: Option<usize>,
}

impl BodySink for HashSink {
    async fn begin(&mut self, info: &ResponseInfo) -> Result<(), Abort> {
        assert!(self.info.is_none(), "begin called twice");
        self.info = Some(*info);
        Ok(())
    }
    async fn chunk(&mut self, data: &[u8]) -> Result<(), Abort> {
        assert!(self.info.is_some(), "chunk before begin");
        self.hasher.update(data);
        self.bytes += data.len();
        self.largest_chunk = self.largest_chunk.max(data.len());
        match self.abort_after {
            Some(limit) if self.bytes >= limit => Err(Abort),
            _ => Ok(()),
        }
    }
}

#[tokio::test]
async fn a_download_streams_every_byte_in_bounded_chunks() {
    let image = firmware();
    let server = FileServer::start(&[("app.bin", &image)]).await;
    let net = TokioNet;
    let mut downloader = Downloader::new(&net, &net);
    let mut sink = HashSink::default();

    let n = downloader
        .download(&server.url("app.bin"), 0, &mut sink)
        .await
        .expect("download");

    assert_eq!(n, SIZE as u64);
    assert_eq!(sink.bytes, SIZE);
    assert_eq!(
        sink.hasher.finalize().as_slice(),
        Sha256::digest(&image).as_slice()
    );
    assert!(sink.largest_chunk <= BODY_CHUNK);
    let info = sink.info.expect("begin was called");
    assert_eq!(info.status, 200);
    assert_eq!(info.content_length, Some(SIZE as u64));
    assert!(info.range_honoured);
    assert_eq!(info.total_size(), Some(SIZE as u64));
}

#[tokio::test]
async fn a_resume_from_the_middle_fetches_only_the_rest_with_206() {
    let image = firmware();
    let server = FileServer::start(&[("app.bin", &image)]).await;
    let net = TokioNet;
    let mut downloader = Downloader::new(&net, &net);
    let mut sink = HashSink::default();
    let start = 40_000;

    let n = downloader
        .download(&server.url("app.bin"), start as u64, &mut sink)
        .await
        .expect("download");

    assert_eq!(n, (SIZE - start) as u64);
    assert_eq!(
        sink.hasher.finalize().as_slice(),
        Sha256::digest(&image[start..]).as_slice()
    );
    let info = sink.info.expect("begin was called");
    assert_eq!(info.status, 206);
    assert!(info.range_honoured);
    assert_eq!(info.content_length, Some((SIZE - start) as u64));
    let range = info.content_range.expect("Content-Range");
    assert_eq!(
        (range.start, range.end, range.total),
        (start as u64, SIZE as u64 - 1, Some(SIZE as u64))
    );
    assert_eq!(info.body_offset(), start as u64);
    assert_eq!(info.total_size(), Some(SIZE as u64));
}

#[tokio::test]
async fn a_missing_file_yields_the_status_error_without_touching_the_sink() {
    let server = FileServer::start(&[("app.bin", b"x")]).await;
    let net = TokioNet;
    let mut downloader = Downloader::new(&net, &net);
    let mut sink = HashSink::default();

    let err = downloader
        .download(&server.url("missing.bin"), 0, &mut sink)
        .await
        .expect_err("404");

    assert_eq!(err, DownloadError::Status(404));
    assert!(sink.info.is_none());
}

#[tokio::test]
async fn a_refused_connection_yields_the_network_error() {
    let net = TokioNet;
    let mut downloader = Downloader::new(&net, &net);
    let mut sink = HashSink::default();
    let url = format!("http://127.0.0.1:{}/app.bin", free_port());

    let err = downloader
        .download(&url, 0, &mut sink)
        .await
        .expect_err("refused");

    assert_eq!(err, DownloadError::Network(ErrorKind::ConnectionRefused));
}

#[tokio::test]
async fn a_sink_abort_stops_the_download() {
    let image = firmware();
    let server = FileServer::start(&[("app.bin", &image)]).await;
    let net = TokioNet;
    let mut downloader = Downloader::new(&net, &net);
    let mut sink = HashSink {
        abort_after: Some(10_000),
        ..HashSink::default()
    };

    let err = downloader
        .download(&server.url("app.bin"), 0, &mut sink)
        .await
        .expect_err("aborted");

    assert_eq!(err, DownloadError::Aborted);
    assert!(sink.bytes >= 10_000 && sink.bytes < 10_000 + BODY_CHUNK);
}

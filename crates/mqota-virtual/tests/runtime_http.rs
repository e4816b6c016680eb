//! The runtime's downloader against real HTTP servers: tower-http ServeDir,
//! and the test support's server that redirects and misbehaves on purpose.

use embedded_io::ErrorKind;
use mqota_runtime::{
    Abort, BodySink, DownloadError, Downloader, RedirectError, ResponseInfo, BODY_CHUNK,
};
use mqota_virtual::net::TokioNet;
use mqota_virtual::testing::{
    free_port, Fault, FaultServer, FileServer, Location, Redirect, Request,
};
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
    let net = TokioNet::plain();
    let mut downloader = Downloader::new(&net);
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

/// Downloads `url` from byte `start` and checks that exactly the rest of
/// `image` arrived; returns the sink for what the test checks further.
async fn resume_from(url: &str, image: &[u8], start: usize) -> HashSink {
    let net = TokioNet::plain();
    let mut downloader = Downloader::new(&net);
    let mut sink = HashSink::default();
    let n = downloader
        .download(url, start as u64, &mut sink)
        .await
        .expect("download");
    assert_eq!(n, (SIZE - start) as u64);
    let digest = std::mem::take(&mut sink.hasher).finalize();
    assert_eq!(
        digest.as_slice(),
        Sha256::digest(&image[start..]).as_slice()
    );
    sink
}

#[tokio::test]
async fn a_resume_from_the_middle_fetches_only_the_rest_with_206() {
    let image = firmware();
    let server = FileServer::start(&[("app.bin", &image)]).await;
    let start = 40_000;
    let sink = resume_from(&server.url("app.bin"), &image, start).await;
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
    let net = TokioNet::plain();
    let mut downloader = Downloader::new(&net);
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
    let net = TokioNet::plain();
    let mut downloader = Downloader::new(&net);
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
    let net = TokioNet::plain();
    let mut downloader = Downloader::new(&net);
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

fn paths(requests: &[Request]) -> Vec<&str> {
    requests.iter().map(|r| r.path.as_str()).collect()
}

#[tokio::test]
async fn every_redirect_status_is_followed_to_a_relative_or_absolute_location() {
    let image = firmware();
    let net = TokioNet::plain();
    for status in [301, 302, 303, 307, 308] {
        for location in [
            Location::Absolute,
            Location::AbsolutePath,
            Location::Relative,
        ] {
            let server = FaultServer::start_redirecting(
                image.clone(),
                Fault::None,
                Some(Redirect::Chain {
                    status,
                    hops: 3,
                    location,
                }),
            )
            .await;
            let mut downloader = Downloader::new(&net);
            let mut sink = HashSink::default();

            let n = downloader
                .download(&server.url(), 0, &mut sink)
                .await
                .unwrap_or_else(|e| panic!("{status} {location:?}: {e:?}"));

            assert_eq!(n, SIZE as u64, "{status} {location:?}");
            assert_eq!(
                sink.hasher.finalize().as_slice(),
                Sha256::digest(&image).as_slice()
            );
            assert_eq!(sink.info.expect("begin").status, 200);
            assert_eq!(
                paths(&server.requests()),
                ["/fw.bin", "/hop/1/fw.bin", "/hop/2/fw.bin", "/final/fw.bin"],
                "{status} {location:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_resumed_download_sends_its_range_along_every_hop_to_the_final_location() {
    let image = firmware();
    let server = FaultServer::start_redirecting(
        image.clone(),
        Fault::None,
        Some(Redirect::Chain {
            status: 302,
            hops: 2,
            location: Location::Relative,
        }),
    )
    .await;
    let start = 40_000;
    let sink = resume_from(&server.url(), &image, start).await;
    let info = sink.info.expect("begin");
    assert_eq!(info.status, 206);
    assert_eq!(info.body_offset(), start as u64);
    let requests = server.requests();
    assert_eq!(
        paths(&requests),
        ["/fw.bin", "/hop/1/fw.bin", "/final/fw.bin"]
    );
    assert!(
        requests.iter().all(|r| r.range_start == start as u64),
        "{requests:?}"
    );
}

#[tokio::test]
async fn five_redirects_are_followed_and_a_sixth_is_refused() {
    let image = firmware();
    let net = TokioNet::plain();
    let five = FaultServer::start_redirecting(
        image.clone(),
        Fault::None,
        Some(Redirect::Chain {
            status: 302,
            hops: 5,
            location: Location::AbsolutePath,
        }),
    )
    .await;
    let mut sink = HashSink::default();
    Downloader::new(&net)
        .download(&five.url(), 0, &mut sink)
        .await
        .expect("five redirects are fine");
    assert_eq!(five.requests().len(), 6);

    let six = FaultServer::start_redirecting(
        image,
        Fault::None,
        Some(Redirect::Chain {
            status: 302,
            hops: 6,
            location: Location::AbsolutePath,
        }),
    )
    .await;
    let mut sink = HashSink::default();
    let err = Downloader::new(&net)
        .download(&six.url(), 0, &mut sink)
        .await
        .expect_err("six redirects");
    assert_eq!(err, DownloadError::Redirect(RedirectError::TooMany));
    assert_eq!(six.requests().len(), 6, "the sixth Location is not fetched");
    assert!(sink.info.is_none());
}

#[tokio::test]
async fn a_redirect_loop_ends_with_too_many_redirects() {
    let server =
        FaultServer::start_redirecting(firmware(), Fault::None, Some(Redirect::Loop)).await;
    let net = TokioNet::plain();
    let mut sink = HashSink::default();

    let err = Downloader::new(&net)
        .download(&server.url(), 0, &mut sink)
        .await
        .expect_err("loop");

    assert_eq!(err, DownloadError::Redirect(RedirectError::TooMany));
    assert_eq!(server.requests().len(), 6);
}

#[tokio::test]
async fn a_negative_content_length_is_its_own_error() {
    let server = FaultServer::start(firmware(), Fault::NegativeLength).await;
    let net = TokioNet::plain();
    let mut sink = HashSink::default();

    let err = Downloader::new(&net)
        .download(&server.url(), 0, &mut sink)
        .await
        .expect_err("bad length");

    assert_eq!(err, DownloadError::BadContentLength);
    assert!(sink.info.is_none());
}

#[tokio::test]
async fn an_https_url_is_refused_without_connecting() {
    // A listener that would see any connection attempt.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("https://{}/fw.bin", listener.local_addr().unwrap());
    let net = TokioNet::plain();
    let mut sink = HashSink::default();

    let err = Downloader::new(&net)
        .download(&url, 0, &mut sink)
        .await
        .expect_err("no TLS");

    assert_eq!(err, DownloadError::UnsupportedScheme);
    assert!(listener.accept().is_err(), "nothing connected");
}

//! TLS on the device against real peers: Mosquitto with a TLS listener that
//! requires client certificates (and takes the certificate's CN as the user
//! name), and an HTTPS front (rustls) over the fault HTTP server. Each test
//! makes its own fleet CA with rcgen. Every threat is tried and shown
//! refused: a broker or download server with a certificate from another
//! CA, one for another name, a device without a certificate, a device with
//! another CA's certificate, a redirect from https to http.

use std::time::Duration;

use mqota_core::image::{Chip, ImageBuilder};
use mqota_core::protocol::{ErrorCode, Phase, Progress, Status};
use mqota_runtime::tls::TlsFailure;
use mqota_runtime::{
    Abort, BodySink, DownloadError, Downloader, MqttBuffers, MqttConfig, MqttError, MqttSession,
    NetConnector, RedirectError, ResponseInfo, TlsBuffers, TlsSetup, MQTT_RX_BUFFER,
};
use mqota_virtual::device::{run_device, Handle, VirtualConfig};
use mqota_virtual::net::{SystemClock, TlsFiles, TokioNet};
use mqota_virtual::testing::{
    Fault, FaultServer, HttpsFront, Location, Mosquitto, Received, Redirect, TestPki, TopicRecorder,
};
use sha2::Digest;
use tokio::task::LocalSet;

/// The name every server certificate is for; it resolves to 127.0.0.1.
const HOST: &str = "localhost";

fn image(version: &str, size: u32) -> Vec<u8> {
    ImageBuilder::new(Chip::Esp32c3)
        .version(version)
        .project("mqota-virtual")
        .size(size)
        .build()
        .unwrap()
}

/// Runs `f` with a TLS connector over the host's network for `files`.
async fn with_connector<F, Fut, T>(files: &TlsFiles, f: F) -> T
where
    F: FnOnce(
        &'static NetConnector<'static, TokioNet, TokioNet, rand_core::OsRng, SystemClock>,
    ) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    // Leaked: a test's connector lives as long as the test, like the
    // firmware's static one.
    let files: &'static TlsFiles = Box::leak(Box::new(files.clone()));
    let identity: &'static _ = Box::leak(Box::new(files.identity().expect("identity")));
    let buffers: &'static TlsBuffers = Box::leak(Box::new(TlsBuffers::new()));
    let net = Box::leak(Box::new(NetConnector::with_tls(
        &TokioNet,
        &TokioNet,
        TlsSetup::<_, SystemClock>::new(identity, buffers, rand_core::OsRng),
    )));
    f(net).await
}

/// One MQTT connect over TLS to `host:port` as `id`; the outcome.
async fn mqtts_connect(
    files: &TlsFiles,
    host: &'static str,
    port: u16,
    id: &'static str,
) -> Result<(), MqttError> {
    with_connector(files, |net| async move {
        let rx: &'static mut [u8; MQTT_RX_BUFFER] = Box::leak(Box::new([0u8; MQTT_RX_BUFFER]));
        let buffers = Box::leak(Box::new(MqttBuffers::new(rx)));
        let mut config = MqttConfig::new(host, port, id, "device/x/availability", b"offline");
        config.tls = true;
        let mut session = MqttSession::new(net, buffers, config);
        let outcome = session.connect().await.map(|_| ());
        if outcome.is_ok() {
            // The broker took the CONNECT; prove the session works.
            session
                .subscribe(&[&*format!("device/{id}/ota/start")])
                .await
                .expect("subscribe over TLS");
        }
        outcome
    })
    .await
}

#[tokio::test]
async fn a_device_with_the_fleet_certificate_connects_over_mqtts() {
    let pki = TestPki::new("fleet CA");
    let broker = Mosquitto::start_tls(&pki, &pki.server(HOST));
    let files = pki.device_tls(Some(&pki.client("dev-t")));
    assert_eq!(
        mqtts_connect(&files, HOST, broker.tls_port(), "dev-t").await,
        Ok(())
    );
}

#[tokio::test]
async fn a_broker_certificate_from_another_ca_is_refused() {
    let fleet = TestPki::new("fleet CA");
    let rogue = TestPki::new("rogue CA");
    // The rogue broker even requires client certificates from the fleet CA,
    // so only the device's own check can refuse it.
    let broker = Mosquitto::start_tls_with_client_ca(&rogue.server(HOST), &fleet);
    let files = fleet.device_tls(Some(&fleet.client("dev-t")));
    assert_eq!(
        mqtts_connect(&files, HOST, broker.tls_port(), "dev-t").await,
        Err(MqttError::Tls(TlsFailure::ServerNotTrusted))
    );
}

#[tokio::test]
async fn a_broker_certificate_for_another_name_is_refused() {
    let pki = TestPki::new("fleet CA");
    let broker = Mosquitto::start_tls(&pki, &pki.server("broker.example"));
    let files = pki.device_tls(Some(&pki.client("dev-t")));
    assert_eq!(
        mqtts_connect(&files, HOST, broker.tls_port(), "dev-t").await,
        Err(MqttError::Tls(TlsFailure::ServerNotTrusted))
    );
}

#[tokio::test]
async fn a_device_without_a_client_certificate_is_refused_by_the_broker() {
    let pki = TestPki::new("fleet CA");
    let broker = Mosquitto::start_tls(&pki, &pki.server(HOST));
    let files = pki.device_tls(None);
    assert_eq!(
        mqtts_connect(&files, HOST, broker.tls_port(), "dev-t").await,
        Err(MqttError::Tls(TlsFailure::ClientCertificateRequired))
    );
}

#[tokio::test]
async fn a_device_certificate_from_another_ca_is_refused_by_the_broker() {
    let fleet = TestPki::new("fleet CA");
    let rogue = TestPki::new("rogue CA");
    let broker = Mosquitto::start_tls(&fleet, &fleet.server(HOST));
    // Trusts the right broker, but presents a certificate the fleet CA
    // never issued.
    let mut files = fleet.device_tls(None);
    let forged = rogue.client("dev-t");
    files.client_cert_der = Some(forged.cert_der.clone());
    files.client_key_der = Some(forged.key_der.clone());
    assert_eq!(
        mqtts_connect(&files, HOST, broker.tls_port(), "dev-t").await,
        Err(MqttError::Tls(TlsFailure::ClientRefused))
    );
}

#[tokio::test]
async fn mqtts_without_a_fleet_ca_is_refused_before_any_connection() {
    let net = TokioNet::plain();
    let rx = Box::leak(Box::new([0u8; MQTT_RX_BUFFER]));
    let mut buffers = MqttBuffers::new(rx);
    let mut config = MqttConfig::new(HOST, 1, "dev-t", "device/dev-t/availability", b"offline");
    config.tls = true;
    let mut session = MqttSession::new(&net, &mut buffers, config);
    assert_eq!(session.connect().await, Err(MqttError::TlsUnavailable));
}

/// A sink that hashes what it gets and remembers where each answer began.
#[derive(Default)]
struct Hashing {
    hasher: sha2::Sha256,
    bytes: u64,
    infos: Vec<ResponseInfo>,
}

impl BodySink for Hashing {
    async fn begin(&mut self, info: &ResponseInfo) -> Result<(), Abort> {
        self.infos.push(*info);
        Ok(())
    }
    async fn chunk(&mut self, data: &[u8]) -> Result<(), Abort> {
        self.hasher.update(data);
        self.bytes += data.len() as u64;
        Ok(())
    }
}

#[tokio::test]
async fn an_https_download_cut_at_half_resumes_with_range_to_the_same_bytes() {
    let pki = TestPki::new("fleet CA");
    let file: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let http = FaultServer::start(file.clone(), Fault::DropOnceAt(50)).await;
    let front = HttpsFront::start(http.addr(), &pki.server(HOST)).await;
    let url = front.url(HOST);
    let files = pki.device_tls(None);
    let (first, second, sink) = with_connector(&files, |net| async move {
        let mut dl = Downloader::new(net);
        let mut sink = Hashing::default();
        let first = dl.download(&url, 0, &mut sink).await;
        let got = sink.bytes;
        let second = dl.download(&url, got, &mut sink).await;
        (first, second, sink)
    })
    .await;
    assert!(matches!(first, Err(DownloadError::Network(_))), "{first:?}");
    assert_eq!(second, Ok(300_000 - sink.infos[1].body_offset()));
    assert!(sink.infos[1].range_honoured && sink.infos[1].status == 206);
    assert_eq!(sink.infos[1].body_offset(), 150_000);
    assert_eq!(sink.bytes, 300_000);
    assert_eq!(sink.hasher.finalize()[..], sha2::Sha256::digest(&file)[..]);
    assert_eq!(http.range_starts(), vec![0, 150_000]);
}

async fn download_once(files: &TlsFiles, url: String) -> Result<u64, DownloadError> {
    with_connector(files, |net| async move {
        Downloader::new(net)
            .download(&url, 0, &mut Hashing::default())
            .await
    })
    .await
}

#[tokio::test]
async fn an_https_server_from_another_ca_or_for_another_name_is_refused() {
    let fleet = TestPki::new("fleet CA");
    let rogue = TestPki::new("rogue CA");
    let http = FaultServer::start(vec![1; 1000], Fault::None).await;
    let files = fleet.device_tls(None);
    for server in [rogue.server(HOST), fleet.server("fw.example")] {
        let front = HttpsFront::start(http.addr(), &server).await;
        assert_eq!(
            download_once(&files, front.url(HOST)).await,
            Err(DownloadError::Tls(TlsFailure::ServerNotTrusted))
        );
    }
    // Nothing was ever requested: the handshake ended before HTTP.
    assert!(http.requests().is_empty(), "{:?}", http.requests());
}

#[tokio::test]
async fn a_redirect_from_https_to_http_is_refused() {
    let pki = TestPki::new("fleet CA");
    let redirect = Redirect::Chain {
        status: 302,
        hops: 1,
        location: Location::Absolute,
    };
    let http = FaultServer::start_redirecting(vec![1; 1000], Fault::None, Some(redirect)).await;
    let front = HttpsFront::start(http.addr(), &pki.server(HOST)).await;
    assert_eq!(
        download_once(&pki.device_tls(None), front.url(HOST)).await,
        Err(DownloadError::Redirect(RedirectError::Insecure))
    );
    // The redirect was read over TLS; the plain target never was.
    assert_eq!(http.requests().len(), 1, "{:?}", http.requests());
}

// ---- The whole device over mqtts:// and https:// ----

fn tls_device(broker: &Mosquitto, id: &str, tls: TlsFiles) -> VirtualConfig {
    let mut c = VirtualConfig::new(id, HOST, broker.tls_port());
    c.broker_tls = true;
    c.tls = Some(tls);
    c.health_timeout = Duration::from_secs(10);
    c.stall_timeout = Duration::from_secs(2);
    c.progress_interval = Duration::from_millis(20);
    c.update_timeout = Duration::from_secs(60);
    c
}

fn start(cfg: VirtualConfig) -> Handle {
    let handle = Handle::new();
    let h = handle.clone();
    tokio::task::spawn_local(async move {
        run_device(cfg, h).await.expect("device runs");
    });
    handle
}

fn status_of(seen: &[Received], id: &str) -> Option<Status> {
    seen.iter()
        .rev()
        .find(|r| r.topic == format!("device/{id}/status"))
        .and_then(|r| serde_json::from_slice(&r.payload).ok())
}

fn progress_of(seen: &[Received], id: &str) -> Vec<Progress> {
    seen.iter()
        .filter(|r| r.topic == format!("device/{id}/progress"))
        .filter_map(|r| serde_json::from_slice::<Progress>(&r.payload).ok())
        .collect()
}

async fn online(obs: &TopicRecorder, id: &str, version: &str) {
    assert!(
        obs.wait_until(Duration::from_secs(30), |s| status_of(s, id)
            .is_some_and(|st| st.version.as_str() == version))
            .await,
        "{id} never reported {version}: {:?}",
        status_of(&obs.all(), id)
    );
}

#[tokio::test]
async fn a_device_updates_over_mqtts_and_https_resuming_a_drop_at_half() {
    LocalSet::new()
        .run_until(async {
            let pki = TestPki::new("fleet CA");
            let broker = Mosquitto::start_tls(&pki, &pki.server(HOST));
            // The observer and the operator use the plain listener; the
            // device only the TLS one.
            let obs = broker.observe("device/#").await;
            let v2 = image("1.1.0", 400_000);
            let http = FaultServer::start(v2.clone(), Fault::DropOnceAt(50)).await;
            let front = HttpsFront::start(http.addr(), &pki.server(HOST)).await;
            let dev = start(tls_device(
                &broker,
                "dev-tls",
                pki.device_tls(Some(&pki.client("dev-tls"))),
            ));
            online(&obs, "dev-tls", "1.0.0").await;
            assert!(status_of(&obs.all(), "dev-tls").is_some_and(|s| s.https));
            broker
                .publish(
                    "device/dev-tls/ota/start",
                    front.url(HOST).as_bytes(),
                    false,
                )
                .await;
            online(&obs, "dev-tls", "1.1.0").await;
            assert!(
                obs.wait_until(Duration::from_secs(20), |s| progress_of(s, "dev-tls")
                    .iter()
                    .any(|p| p.phase == Phase::Done))
                    .await,
                "the trial of 1.1.0 never reported done"
            );
            let starts = http.range_starts();
            assert_eq!(starts.len(), 2, "{starts:?}");
            assert!(starts[1] >= 190_000, "resumed from {}", starts[1]);
            dev.stop();
        })
        .await;
}

#[tokio::test]
async fn a_device_refuses_an_https_server_of_another_ca_and_keeps_its_firmware() {
    LocalSet::new()
        .run_until(async {
            let pki = TestPki::new("fleet CA");
            let rogue = TestPki::new("rogue CA");
            let broker = Mosquitto::start_tls(&pki, &pki.server(HOST));
            let obs = broker.observe("device/#").await;
            let http = FaultServer::start(image("6.6.6", 100_000), Fault::None).await;
            let front = HttpsFront::start(http.addr(), &rogue.server(HOST)).await;
            let dev = start(tls_device(
                &broker,
                "dev-r",
                pki.device_tls(Some(&pki.client("dev-r"))),
            ));
            online(&obs, "dev-r", "1.0.0").await;
            broker
                .publish("device/dev-r/ota/start", front.url(HOST).as_bytes(), false)
                .await;
            assert!(
                obs.wait_until(Duration::from_secs(30), |s| progress_of(s, "dev-r")
                    .iter()
                    .any(|p| p.phase == Phase::Failed))
                    .await
            );
            let failed: Vec<Progress> = progress_of(&obs.all(), "dev-r")
                .into_iter()
                .filter(|p| p.phase == Phase::Failed)
                .collect();
            assert_eq!(failed[0].error, Some(ErrorCode::Network));
            let message = failed[0].message.as_deref().unwrap_or_default();
            assert!(
                message.starts_with("TLS: server certificate not trusted"),
                "{message}"
            );
            // Refused once, not retried against the same certificate.
            assert!(http.requests().is_empty());
            let status = status_of(&obs.all(), "dev-r").expect("status");
            assert_eq!(status.version.as_str(), "1.0.0");
            dev.stop();
        })
        .await;
}

/// A plain device (no fleet CA) says so: `https: false`, and an
/// `https://` job is refused at once.
#[tokio::test]
async fn a_device_without_tls_reports_https_false_and_refuses_https_jobs() {
    LocalSet::new()
        .run_until(async {
            let broker = Mosquitto::start();
            let obs = broker.observe("device/#").await;
            let mut cfg = VirtualConfig::new("dev-p", "127.0.0.1", broker.port());
            cfg.progress_interval = Duration::from_millis(20);
            let dev = start(cfg);
            online(&obs, "dev-p", "1.0.0").await;
            assert!(status_of(&obs.all(), "dev-p").is_some_and(|s| !s.https));
            broker
                .publish(
                    "device/dev-p/ota/start",
                    b"https://localhost:1/fw.bin",
                    false,
                )
                .await;
            assert!(
                obs.wait_until(Duration::from_secs(20), |s| progress_of(s, "dev-p")
                    .iter()
                    .any(
                        |p| p.phase == Phase::Failed && p.error == Some(ErrorCode::BadCommand)
                    ))
                .await
            );
            dev.stop();
        })
        .await;
}

/// A TCP relay that passes the server's bytes on in 16-byte pieces every
/// 20 ms, so that a TLS record arrives over many reads; it counts them.
async fn trickle(
    backend: std::net::SocketAddr,
    slow: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let server = tokio::net::TcpStream::connect(backend).await.unwrap();
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut cr, &mut sw).await;
        });
        let mut buf = [0u8; 4096];
        loop {
            let Ok(n) = sr.read(&mut buf).await else {
                return;
            };
            if n == 0 {
                return;
            }
            let pieces = if slow.load(Ordering::SeqCst) { 16 } else { n };
            for piece in buf[..n].chunks(pieces) {
                if cw.write_all(piece).await.is_err() {
                    return;
                }
                counted.fetch_add(piece.len(), Ordering::SeqCst);
                if pieces == 16 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    });
    (port, count)
}

#[tokio::test]
async fn a_tls_read_cancelled_before_any_byte_is_harmless_and_one_cancelled_mid_record_ends_the_connection(
) {
    use embedded_io_async::{Read, Write};
    use mqota_runtime::Connector;
    use std::sync::atomic::Ordering;
    let pki = TestPki::new("fleet CA");
    let http = FaultServer::start(vec![7; 4000], Fault::None).await;
    let front = HttpsFront::start(http.addr(), &pki.server(HOST)).await;
    let slow = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (port, forwarded) = trickle(front.addr(), slow.clone()).await;
    let files = pki.device_tls(None);
    with_connector(&files, |net| async move {
        let mut s = net.connect(HOST, port, true).await.expect("handshake");
        let mut buf = [0u8; 64];
        // The server says nothing until asked (its session tickets are
        // whole records, not data): this read is cancelled between records.
        let silent = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await;
        assert!(silent.is_err(), "read returned without data: {silent:?}");
        slow.store(true, Ordering::SeqCst);
        let before = forwarded.load(Ordering::SeqCst);
        s.write_all(b"GET /fw.bin HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .expect("the session still works after the harmless cancel");
        s.flush().await.unwrap();
        // Cancel the read once part of the answer's first record came in.
        // `biased`: on every wake-up the read is polled first, so the bytes
        // already forwarded are inside the TLS reader (mid-record) by the
        // time the cancel is chosen; no extra delay is needed.
        let mid_record = async {
            while forwarded.load(Ordering::SeqCst) < before + 16 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        tokio::select! {
            biased;
            r = s.read(&mut buf) => panic!("a whole record arrived at 16 bytes per 20 ms: {r:?}"),
            _ = mid_record => {}
        }
        let after = s.read(&mut buf).await;
        assert_eq!(
            after.map_err(|e| embedded_io::Error::kind(&e)),
            Err(embedded_io::ErrorKind::ConnectionAborted)
        );
        // Ended by the runtime before embedded-tls read the body as a
        // header: no garbage record was ever decoded.
        assert_eq!(net.take_tls_failure(), None);
    })
    .await;
}

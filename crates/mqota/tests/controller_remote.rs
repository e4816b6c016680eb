//! `mqota deploy URL` fetches the image under the remote-firmware rules: a
//! loopback URL is refused unless `--allow-remote-firmware` names its host,
//! and what the URL answered is never echoed.

mod controller_support;

use controller_support::{mqota, Serve};

/// A real HTTP server on loopback that answers every request with a body
/// that is no image and must never appear in an error.
async fn secret_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/app.bin", listener.local_addr().unwrap());
    let app = axum::Router::new().fallback(|| async { "SECRET-internal-token" });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_refuses_a_loopback_url_unless_allowed_and_never_echoes_it() {
    let fw = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let serve = Serve::start(fw.path(), data.path(), None);
    let url = secret_server().await;
    let cli_data = tempfile::tempdir().unwrap();
    let cli_data = cli_data.path().to_str().unwrap().to_owned();
    let deploy = move |allow: bool| {
        let (url, broker, server, cli_data) = (
            url.clone(),
            serve.broker.clone(),
            serve.http.clone(),
            cli_data.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let mut args = vec![
                "deploy",
                &url,
                "--to",
                "d1",
                "--data-dir",
                &cli_data,
                "--broker",
                &broker,
                "--server",
                &server,
            ];
            if allow {
                args.extend(["--allow-remote-firmware", "127.0.0.1"]);
            }
            mqota(&args)
        })
    };
    let (ok, _, err) = deploy(false).await.unwrap();
    assert!(!ok);
    assert!(
        err.contains("loopback, private or link-local")
            && err.contains("--allow-remote-firmware 127.0.0.1"),
        "{err}"
    );
    let (ok, out, err) = deploy(true).await.unwrap();
    assert!(!ok);
    assert!(err.contains("not a valid app image"), "{err}");
    assert!(
        !err.contains("SECRET") && !out.contains("SECRET"),
        "{out}{err}"
    );
}

//! Running the router on a socket so that abuse does not take it down.
//!
//! `axum::serve` accepts every connection and waits for headers forever, so
//! a few thousand clients that send half a request line (slow-loris) hold a
//! task and a socket each until they give up. [`serve`] is the accept loop
//! of axum's `serve-with-hyper` example with three limits ([`HttpLimits`]):
//!
//! | limit | how |
//! |---|---|
//! | header-read timeout | hyper's HTTP/1 `header_read_timeout`: a request head not complete in time closes the connection |
//! | connection cap | a semaphore; a connection over the cap is closed at once rather than left in the kernel's backlog, where a device's download would queue behind the flood |
//! | request-body limit | axum's `DefaultBodyLimit` for every route (the firmware upload route sets its own, larger one) |
//!
//! With a TLS configuration ([`serve_tls`], `mqota serve --tls-cert
//! --tls-key`) every connection is HTTPS: the handshake must finish within
//! the header-read timeout too (a client that opens a TLS connection and
//! stalls holds a permit no longer than one that stalls in its request
//! head), and a client speaking plain HTTP to it gets its connection
//! closed, with no answer.
//!
//! and one courtesy: every error answer under `/api/` is JSON
//! (`{"error": "…"}`), including those axum's extractors and router make
//! (unknown route, wrong method, malformed JSON body).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// Marks a request that came over TLS (a request extension [`serve_tls`]
/// sets), so handlers that write the server's own URLs say `https://`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Https;

/// The limits [`serve`] holds every client to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// How long a client has to send a whole request head.
    pub header_read_timeout: Duration,
    /// Connections served at once; more are closed on arrival.
    pub max_connections: usize,
    /// Largest request body of any route that does not set its own.
    pub max_body: usize,
}

impl Default for HttpLimits {
    /// 10 s for a head (a device on a poor link sends ~200 bytes in one
    /// segment); 1,024 connections (a rollout wave downloading at once plus
    /// the page and the CLI); 1 MiB bodies (a deployment request naming
    /// 10,000 devices by id is about 300 KiB).
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 1024,
            max_body: 1024 * 1024,
        }
    }
}

/// Serves `app` on `listener` under `limits` until `shutdown` completes;
/// then stops accepting and gives open connections up to 5 s to finish
/// their current request.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    serve_tls(listener, app, limits, None, shutdown).await
}

/// [`serve`], over TLS when `tls` is given (see [`crate::tls::http_server`]).
pub async fn serve_tls(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let app = if acceptor.is_some() {
        app.layer(axum::Extension(Https))
    } else {
        app
    };
    let app = app
        .layer(axum::extract::DefaultBodyLimit::max(limits.max_body))
        .layer(axum::middleware::from_fn(json_api_errors));
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                // Out of file descriptors or a connection reset before it
                // was accepted: nothing to do but go on.
                Err(e) => {
                    tracing::debug!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Dropping the stream closes it: the client learns at once and
            // retries, instead of waiting in the backlog behind a flood.
            tracing::debug!("connection cap of {} reached", limits.max_connections);
            continue;
        };
        let _ = stream.set_nodelay(true);
        // Handlers and the audit log learn the client's address as axum's
        // `ConnectInfo`, as `axum::serve` would give it.
        let service = TowerToHyperService::new(tower::ServiceExt::map_request(
            app.clone(),
            move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                req
            },
        ));
        let stop = stop_rx.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match acceptor {
                None => serve_connection(stream, service, limits, stop).await,
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream));
                    match handshake.await {
                        Ok(Ok(tls)) => serve_connection(tls, service, limits, stop).await,
                        // Plain HTTP, another protocol, a certificate the
                        // client refused, or a stall: nothing to answer.
                        Ok(Err(e)) => tracing::debug!("TLS handshake: {e}"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
            }
        });
    }
    let _ = stop_tx.send(true);
    // Wait (bounded) for the connections to finish: each holds a permit.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(Duration::from_secs(5), slots.acquire_many(all)).await;
    Ok(())
}

/// Runs one HTTP/1 connection under `limits` until it ends, or `stop`
/// says so (then up to 5 s more for the request in flight).
async fn serve_connection<I, S>(
    io: I,
    service: TowerToHyperService<S>,
    limits: HttpLimits,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stop.wait_for(|s| *s) => conn.as_mut().graceful_shutdown(),
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
}

/// Makes every error answer under `/api/` JSON: those of the handlers
/// already are; those axum makes itself (404 for no route, 405, 413, 415,
/// 422 for a body that does not parse) are plain text, which a client
/// parsing `{"error"}` would choke on.
async fn json_api_errors(req: Request, next: Next) -> Response {
    let api = req.uri().path().starts_with("/api/") || req.uri().path() == "/api";
    let resp = next.run(req).await;
    let status = resp.status();
    if !api || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    // axum's own rejection texts are short; anything longer is cut.
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let msg = if text.trim().is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text.trim().to_owned()
    };
    let mut out = (status, axum::Json(serde_json::json!({ "error": msg }))).into_response();
    // Keep what the answer said besides its body (e.g. `Allow` on a 405).
    for (k, v) in parts.headers.iter() {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

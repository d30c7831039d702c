//! The admin listener: `/healthz` (the process is up) and `/readyz` (the upstream Milvus
//! answers and the sidecar is not draining), for Kubernetes probes and scripts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::proxy::Upstream;

/// How long `/readyz` waits for the upstream before calling it unready.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn serve(
    listener: TcpListener,
    upstream: Upstream,
    draining: Arc<AtomicBool>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "admin listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let upstream = upstream.clone();
        let draining = draining.clone();
        let service = service_fn(move |req| respond(req, upstream.clone(), draining.clone()));
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

async fn respond(
    req: Request<Incoming>,
    upstream: Upstream,
    draining: Arc<AtomicBool>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let (status, text) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => (StatusCode::OK, "ok".to_owned()),
        (&Method::GET, "/readyz") if draining.load(Ordering::Relaxed) => {
            (StatusCode::SERVICE_UNAVAILABLE, "not ready: draining for shutdown".to_owned())
        }
        (&Method::GET, "/readyz") => match upstream.probe(PROBE_TIMEOUT).await {
            Ok(()) => (StatusCode::OK, format!("ready: upstream Milvus at {} answers", upstream.name())),
            Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}")),
        },
        (_, "/healthz" | "/readyz") => (StatusCode::METHOD_NOT_ALLOWED, "use GET".to_owned()),
        _ => (StatusCode::NOT_FOUND, "not found: try /healthz or /readyz".to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(text + "\n")));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    Ok(response)
}

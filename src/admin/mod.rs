//! The admin listener, for Kubernetes probes, Prometheus and scripts: `/healthz` (the
//! process is up), `/readyz` (the upstream Milvus answers and the sidecar is not
//! draining; PostgreSQL reported beside it) and `/metrics`.

use std::sync::Arc;
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
use crate::readiness::{PROBE_TIMEOUT, Readiness};
use crate::telemetry::Telemetry;

pub async fn serve(
    listener: TcpListener,
    upstream: Upstream,
    telemetry: Arc<Telemetry>,
    readiness: Arc<Readiness>,
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
        let state = Admin { upstream: upstream.clone(), telemetry: telemetry.clone(), readiness: readiness.clone() };
        let service = service_fn(move |req| respond(req, state.clone()));
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

#[derive(Clone)]
struct Admin {
    upstream: Upstream,
    telemetry: Arc<Telemetry>,
    readiness: Arc<Readiness>,
}

async fn respond(req: Request<Incoming>, admin: Admin) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let (status, text, content_type) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => (StatusCode::OK, "ok\n".to_owned(), TEXT),
        (&Method::GET, "/readyz") => {
            let (status, text) = readiness(&admin).await;
            (status, text, TEXT)
        }
        (&Method::GET, "/metrics") => (StatusCode::OK, admin.telemetry.metrics.render(&admin.upstream).await, METRICS),
        (_, "/healthz" | "/readyz" | "/metrics") => (StatusCode::METHOD_NOT_ALLOWED, "use GET\n".to_owned(), TEXT),
        _ => (StatusCode::NOT_FOUND, "not found: try /healthz, /readyz or /metrics\n".to_owned(), TEXT),
    };
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    Ok(response)
}

const TEXT: &str = "text/plain; charset=utf-8";
const METRICS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Ready when not draining and the upstream answers. PostgreSQL is reported on its own
/// line but does not decide: without it the sidecar still forwards (records spill to disk,
/// cached permissions keep serving), and taking every replica out of the Service because
/// PostgreSQL restarts would turn a recording gap into an outage.
async fn readiness(admin: &Admin) -> (StatusCode, String) {
    let draining = admin.readiness.draining();
    // A fresh probe: whoever asks /readyz wants the state now.
    let (upstream, postgres) = tokio::join!(admin.readiness.upstream(Duration::ZERO), async {
        match admin.telemetry.metrics.pool() {
            Some(pool) => Some(crate::store::probe(&pool, PROBE_TIMEOUT).await),
            None => None,
        }
    });
    let mut text = String::new();
    let status = if draining {
        text.push_str("not ready: draining for shutdown\n");
        StatusCode::SERVICE_UNAVAILABLE
    } else if upstream.is_ok() {
        text.push_str("ready\n");
        StatusCode::OK
    } else {
        text.push_str("not ready: the upstream Milvus does not answer\n");
        StatusCode::SERVICE_UNAVAILABLE
    };
    match upstream {
        Ok(()) => text.push_str(&format!("upstream: ok (Milvus at {} answers)\n", admin.readiness.upstream_name())),
        Err(reason) => text.push_str(&format!("upstream: down ({reason})\n")),
    }
    match postgres {
        Some(Ok(())) => text.push_str("postgres: ok\n"),
        Some(Err(reason)) => {
            text.push_str(&format!("postgres: down ({reason}); calls are still served, records spill to disk\n"))
        }
        None => text.push_str("postgres: not used (--no-recording)\n"),
    }
    (status, text)
}

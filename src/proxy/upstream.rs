//! The connection to the upstream Milvus proxy: one multiplexed HTTP/2 client that
//! reconnects by itself when Milvus comes back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};

use super::body::Body;
use super::error::ProxyError;
use super::link::{Link, ReplyBody, Settings, connector};
use crate::config::Config;
use crate::milvus::SERVICE_PREFIX;

/// How long a call may wait for the upstream, and who set that limit (for the message).
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    pub after: Duration,
    pub source: &'static str,
}

#[derive(Clone)]
pub struct Upstream {
    /// Plain HTTP/2 for an `http://` upstream, TLS for `https://`.
    link: Arc<Link>,
    scheme: Scheme,
    authority: Authority,
    /// The configured address, for messages that tell the caller what was unreachable.
    name: Arc<str>,
    /// Longest wait for reply headers when the client gave no deadline.
    timeout: Option<Duration>,
    /// Sent as `authorization` instead of the caller's, for a Milvus that checks its own.
    credential: Option<http::HeaderValue>,
    /// Whether the last call reached Milvus: [`UNKNOWN`], [`UP`] or [`DOWN`].
    state: Arc<AtomicU8>,
}

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

impl Upstream {
    pub fn new(config: &Config) -> Self {
        let uri = &config.upstream;
        let settings = Settings {
            connect_timeout: config.upstream_connect_timeout,
            // Detect a silently dead Milvus connection instead of waiting on it forever.
            keep_alive_interval: Duration::from_secs(30),
            keep_alive_timeout: Duration::from_secs(10),
        };
        Upstream {
            link: Arc::new(Link::new(
                connector(&config.upstream_tls, config.upstream_connect_timeout),
                uri.clone(),
                settings,
            )),
            scheme: uri.scheme().cloned().unwrap_or(Scheme::HTTP),
            authority: uri.authority().cloned().expect("config validated the upstream has an authority"),
            name: Arc::from(uri.to_string().trim_end_matches('/')),
            timeout: config.upstream_timeout,
            credential: config.auth.upstream_credential_header(),
            state: Arc::new(AtomicU8::new(UNKNOWN)),
        }
    }

    /// Whether the last call sent reached Milvus; None before the first.
    pub fn reachable(&self) -> Option<bool> {
        match self.state.load(Ordering::Relaxed) {
            UP => Some(true),
            DOWN => Some(false),
            _ => None,
        }
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Sends the call on, with its headers as they came, and waits for the reply headers
    /// no longer than `deadline` or the configured upstream timeout, whichever is shorter.
    pub async fn send(
        &self,
        mut request: Request<Body>,
        deadline: Option<Deadline>,
    ) -> Result<Response<ReplyBody>, ProxyError> {
        let mut parts = request.uri().clone().into_parts();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        *request.uri_mut() = Uri::from_parts(parts).expect("scheme, authority and the original path form a URI");
        *request.version_mut() = http::Version::HTTP_2;
        if let Some(credential) = &self.credential {
            request.headers_mut().insert(http::header::AUTHORIZATION, credential.clone());
        }

        let limit = match (deadline, self.timeout) {
            (Some(d), Some(t)) if t < d.after => Some(Deadline { after: t, source: "--upstream-timeout" }),
            (Some(d), _) => Some(d),
            (None, Some(t)) => Some(Deadline { after: t, source: "--upstream-timeout" }),
            (None, None) => None,
        };
        let call = self.link.send(request);
        let reply =
            match limit {
                Some(limit) => tokio::time::timeout(limit.after, call).await.map_err(|_| {
                    ProxyError::UpstreamTimeout { upstream: self.name.clone(), after: limit.after, limit: limit.source }
                })?,
                None => call.await,
            };
        let state = if reply.is_ok() { UP } else { DOWN };
        // A store per call would bounce the cache line between cores for nothing.
        if self.state.load(Ordering::Relaxed) != state {
            self.state.store(state, Ordering::Relaxed);
        }
        reply.map_err(|e| ProxyError::UpstreamUnavailable {
            upstream: self.name.clone(),
            reason: crate::error_chain(&e),
        })
    }

    /// Calls `method` on the upstream with an (unframed) request message and returns the
    /// reply message, for the sidecar's own calls (reconciling with Milvus). `headers` are
    /// added to the call, e.g. `dbname`.
    pub async fn unary(
        &self,
        method: &str,
        message: &[u8],
        headers: &[(http::HeaderName, http::HeaderValue)],
        within: Duration,
    ) -> Result<bytes::Bytes, ProxyError> {
        use http_body_util::BodyExt;
        let mut framed = Vec::with_capacity(message.len() + super::grpc::HEADER_LEN);
        framed.push(0);
        framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
        framed.extend_from_slice(message);
        let mut request = Request::post(format!("{SERVICE_PREFIX}{method}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Body::Full(Some(framed.into())))
            .expect("a static path and headers form a valid request");
        for (name, value) in headers {
            request.headers_mut().insert(name, value.clone());
        }
        let reply = self.send(request, Some(Deadline { after: within, source: "the sidecar's own call" })).await?;
        let unavailable = |reason: String| ProxyError::UpstreamUnavailable { upstream: self.name.clone(), reason };
        let (parts, body) = reply.into_parts();
        let collected = tokio::time::timeout(within, body.collect())
            .await
            .map_err(|_| unavailable(format!("{method} reply did not complete within {within:?}")))?
            .map_err(|e| unavailable(crate::error_chain(&e)))?;
        let status = collected
            .trailers()
            .and_then(super::grpc::outcome_in)
            .or_else(|| super::grpc::outcome_in(&parts.headers))
            .unwrap_or_else(|| crate::facts::Outcome::grpc(tonic::Code::Internal, "no grpc-status in the reply"));
        if status.grpc != tonic::Code::Ok {
            return Err(unavailable(format!(
                "{method} failed: {:?} {}",
                status.grpc,
                status.message.unwrap_or_default()
            )));
        }
        let body = collected.to_bytes();
        let message = super::grpc::first_message(&body, parts.headers.get(super::grpc::GRPC_ENCODING), usize::MAX / 2)
            .map_err(|e| unavailable(format!("{method} reply unreadable: {e:?}")))?;
        Ok(bytes::Bytes::copy_from_slice(&message))
    }

    /// Whether the upstream answers gRPC at all: any gRPC reply to `GetVersion` counts
    /// (Milvus with authentication on refuses it, which still proves it is up).
    pub async fn probe(&self, within: Duration) -> Result<(), String> {
        let request = Request::post(format!("{SERVICE_PREFIX}GetVersion"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Body::Full(Some(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]))))
            .expect("static request is valid");
        let reply = self
            .send(request, Some(Deadline { after: within, source: "readiness probe" }))
            .await
            .map_err(|e| e.to_string())?;
        if reply.status() == http::StatusCode::OK {
            Ok(())
        } else {
            Err(format!("upstream Milvus at {} answered HTTP {}", self.name, reply.status()))
        }
    }
}

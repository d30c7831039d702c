//! The request path: every call is forwarded to the upstream Milvus; inspected calls
//! (see [`crate::milvus::Rpc`]) are read through views on the way, all calls are observed
//! on the way back, and each call's facts go to the recorder when it ends.

mod body;
mod error;
pub mod grpc;
mod inspect;
mod observe;
mod upstream;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::{Request, Response};
use hyper::body::Incoming;

pub use body::Body;
pub use error::ProxyError;
use observe::{InFlight, Observed, Pending, ReplyCapture};
pub use upstream::{Deadline, Upstream};

use crate::config::Config;
use crate::facts::{CallFacts, Client, DEFAULT_DATABASE, Method, Outcome};
use crate::milvus::Rpc;
use crate::record::Recorder;
use crate::settings::Settings;

/// Headers Milvus trusts only from its own cluster members (`sourceid` lets a caller skip
/// authentication). No client may send them through the sidecar.
const INTERNAL_HEADERS: &[&str] = &["sourceid"];

#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

struct Shared {
    upstream: Upstream,
    recorder: Arc<dyn Recorder>,
    settings: Arc<Settings>,
    max_message_bytes: usize,
}

impl Proxy {
    pub fn new(config: &Config, recorder: Arc<dyn Recorder>, settings: Arc<Settings>) -> Self {
        let shared =
            Shared { upstream: Upstream::new(config), recorder, settings, max_message_bytes: config.max_message_bytes };
        Proxy { shared: Arc::new(shared) }
    }

    pub fn upstream(&self) -> &Upstream {
        &self.shared.upstream
    }

    /// The service for one client connection.
    pub fn for_peer(&self, peer: SocketAddr) -> PeerService {
        PeerService { shared: self.shared.clone(), peer }
    }
}

#[derive(Clone)]
pub struct PeerService {
    shared: Arc<Shared>,
    peer: SocketAddr,
}

impl hyper::service::Service<Request<Incoming>> for PeerService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let shared = self.shared.clone();
        let peer = self.peer;
        Box::pin(async move { Ok(shared.handle(peer, request).await) })
    }
}

impl Shared {
    async fn handle(&self, peer: SocketAddr, request: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let (mut parts, body) = request.into_parts();
        for name in INTERNAL_HEADERS {
            parts.headers.remove(*name);
        }
        let rpc = Rpc::from_path(parts.uri.path());
        let mut call = self.start_call(rpc, &parts, peer, started);

        let body = match rpc {
            Some(rpc) => match inspect::read_request(rpc, &parts.headers, body, self.max_message_bytes).await {
                Ok((bytes, facts)) => {
                    call.facts.request_bytes = bytes.len() as u64;
                    if let Some(db) = &facts.database {
                        call.facts.database.clone_from(db);
                    }
                    call.facts.request = facts;
                    call.reply = Some(ReplyCapture {
                        kind: rpc.reply(),
                        encoding: None,
                        limit: self.max_message_bytes,
                        gathered: Default::default(),
                        overflowed: false,
                    });
                    Body::Full(Some(bytes))
                }
                Err(refusal) => return answer_ourselves(call, refusal),
            },
            None => Body::Raw(body),
        };

        let deadline = self.deadline(rpc, &mut parts.headers);
        match self.upstream.send(Request::from_parts(parts, body), deadline).await {
            Ok(reply) => {
                let (parts, inner) = reply.into_parts();
                let upstream = self.upstream.name().clone();
                let observed = Observed::new(parts.status, &parts.headers, inner, Pending::new(call), upstream);
                Response::from_parts(parts, Body::Observed(observed))
            }
            Err(failure) => answer_ourselves(call, failure),
        }
    }

    /// The client's deadline, capped by `max_query_timeout` for searches and queries. A cap
    /// is also sent upstream as the call's `grpc-timeout`, so Milvus gives up too.
    fn deadline(&self, rpc: Option<Rpc>, headers: &mut http::HeaderMap) -> Option<Deadline> {
        let client = grpc::timeout(headers).map(|after| Deadline { after, source: "the client's deadline" });
        let is_query = matches!(rpc, Some(Rpc::Search | Rpc::HybridSearch | Rpc::Query));
        let cap = if is_query { self.settings.max_query_timeout() } else { None };
        match (client, cap) {
            (Some(c), Some(cap)) if cap >= c.after => Some(c),
            (_, Some(cap)) => {
                headers.insert("grpc-timeout", grpc::timeout_header(cap));
                Some(Deadline { after: cap, source: "max_query_timeout in system_config" })
            }
            (client, None) => client,
        }
    }

    fn start_call(
        &self,
        rpc: Option<Rpc>,
        parts: &http::request::Parts,
        peer: SocketAddr,
        started: Instant,
    ) -> InFlight {
        let headers = &parts.headers;
        let database =
            headers.get("dbname").and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty()).unwrap_or(DEFAULT_DATABASE);
        let path = parts.uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        InFlight {
            facts: CallFacts {
                id: uuid::Uuid::now_v7(),
                started_at: SystemTime::now(),
                duration: Default::default(),
                method: Method { rpc, path },
                database: database.to_owned(),
                request: Default::default(),
                reply: Default::default(),
                outcome: Outcome::default(),
                request_bytes: 0,
                reply_bytes: 0,
                client: Client {
                    peer: Some(peer),
                    user: crate::auth::claimed_user(headers),
                    user_agent: headers.get(http::header::USER_AGENT).cloned(),
                    request_id: headers.get("client-request-id").cloned(),
                },
            },
            started,
            recorder: self.recorder.clone(),
            finished: false,
            reply: None,
        }
    }
}

/// Ends a call with the sidecar's own status, recorded like any other outcome.
fn answer_ourselves(call: InFlight, refusal: ProxyError) -> Response<Body> {
    let status = refusal.to_status();
    Pending::new(call).finish(Outcome::grpc(status.code(), status.message()));
    status.into_http()
}

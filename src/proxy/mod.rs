//! The request path: every call is forwarded to the upstream Milvus; inspected calls
//! (see [`crate::milvus::Rpc`]) are read through views on the way, all calls are observed
//! on the way back, and each call's facts go to the recorder when it ends.

mod body;
mod coalesce;
mod error;
pub mod grpc;
mod health;
mod inspect;
mod link;
mod observe;
pub mod rewrite;
mod scan;
mod upstream;

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Instant, SystemTime};

use http::{HeaderName, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;

pub use body::Body;
pub use error::ProxyError;
use inspect::Head;
use link::ReplyBody;
use observe::{CreatedHook, InFlight, Observed, Pending, ReplyCapture};
pub use upstream::{Deadline, Upstream};

use crate::auth::authority::{AuthError, Authority, Principal};
use crate::auth::policy::Role;
use crate::config::Config;
use crate::facts::{CallFacts, Client, Method, Outcome};
use crate::milvus::access::{self, Access, MethodRule};
use crate::milvus::headers::{CLIENT_REQUEST_ID, CLIENT_REQUEST_UNIXMSEC, SOURCEID};
use crate::milvus::{Rpc, views, wire};
use crate::readiness::Readiness;
use crate::record::Recorder;
use crate::settings::Settings;
use crate::telemetry::Telemetry;

/// Headers Milvus trusts only from its own cluster members (`sourceid` lets a caller skip
/// authentication). No client may send them through the sidecar.
const INTERNAL_HEADERS: [HeaderName; 1] = [SOURCEID];

/// Headers whose value is new on every call: pymilvus sets the first two, a gRPC client with
/// a deadline the third.
const PER_CALL_HEADERS: [HeaderName; 3] = [CLIENT_REQUEST_ID, CLIENT_REQUEST_UNIXMSEC, grpc::GRPC_TIMEOUT];

/// The caller's headers as they go upstream: without the internal ones, and with the
/// per-call values sent as HPACK never-indexed literals. Left indexable, each call would
/// add them to the upstream connection's header table, evicting the stable headers it holds
/// so that those went out in full again, and the encoder would compare each new value with
/// every one still stored under its name (callgrind of the bench's Search: 63 comparisons
/// per call, 19 with these never indexed).
fn prepare_for_upstream(headers: &mut http::HeaderMap) {
    for name in &INTERNAL_HEADERS {
        headers.remove(name);
    }
    for name in &PER_CALL_HEADERS {
        if let Some(value) = headers.get_mut(name) {
            value.set_sensitive(true);
        }
    }
}

#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

struct Shared {
    upstream: Upstream,
    recorder: Arc<dyn Recorder>,
    telemetry: Arc<Telemetry>,
    settings: Arc<Settings>,
    /// None: every call is let through unauthenticated (`--no-auth`).
    auth: Option<Arc<Authority>>,
    max_message_bytes: usize,
    readiness: Arc<Readiness>,
}

impl Proxy {
    pub fn new(
        config: &Config,
        recorder: Arc<dyn Recorder>,
        telemetry: Arc<Telemetry>,
        settings: Arc<Settings>,
        auth: Option<Arc<Authority>>,
        draining: Arc<AtomicBool>,
    ) -> Self {
        let upstream = Upstream::new(config);
        let readiness = Arc::new(Readiness::new(upstream.clone(), draining));
        let shared = Shared {
            upstream,
            recorder,
            telemetry,
            settings,
            auth,
            max_message_bytes: config.max_message_bytes,
            readiness,
        };
        Proxy { shared: Arc::new(shared) }
    }

    pub fn upstream(&self) -> &Upstream {
        &self.shared.upstream
    }

    pub fn readiness(&self) -> &Arc<Readiness> {
        &self.shared.readiness
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
        // A future of its own, so that `handle`'s, which every call moves several times,
        // does not carry a health check's state.
        if request.uri().path().starts_with(health::SERVICE_PATH) {
            return Box::pin(async move {
                let metrics = &shared.telemetry.metrics;
                Ok(health::answer(request, &shared.readiness, metrics, Instant::now()).await)
            });
        }
        let peer = self.peer;
        Box::pin(async move { Ok(shared.handle(peer, request).await) })
    }
}

impl Shared {
    /// identify -> read what is needed -> authorize -> forward -> observe.
    async fn handle(&self, peer: SocketAddr, request: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let (mut parts, body) = request.into_parts();
        prepare_for_upstream(&mut parts.headers);
        let method = Method::from_path(parts.uri.path());
        let rpc = method.rpc();
        let mut call = self.start_call(method.clone(), &parts, peer, started);

        // The user on the call's record: the verified one, else who the header claims to be
        // (a refused login is audited under the name it tried).
        let who = match &self.auth {
            Some(auth) => match auth.identify(&parts.headers).await {
                Ok(principal) => {
                    call.facts.client.user = Some(principal.name.to_string());
                    Some((auth, principal))
                }
                Err(refusal) => {
                    call.facts.client.user = crate::auth::claimed_user(&parts.headers);
                    return answer_ourselves(call, refusal.into());
                }
            },
            None => {
                call.facts.client.user = crate::auth::claimed_user(&parts.headers);
                None
            }
        };
        let rule = access::rule(method.name());
        let scoped = matches!(rule, Some(MethodRule { access: Access::Collection { .. }, .. }));
        let listing = method.name() == "ShowCollections";
        let needs_body = rpc.is_some() || (who.is_some() && (scoped || listing));

        let deadline = self.deadline(rpc, &mut parts.headers);
        let mut database_in_body = None;
        let mut streamed = None;
        let body = if needs_body {
            let bulky = rpc.map_or(&[][..], |rpc| rpc.request().bulky_fields());
            let read = inspect::read(method.name(), body, self.max_message_bytes, bulky);
            let head = match by_deadline(deadline, started, read).await {
                Ok(head) => head,
                Err(refusal) => return answer_ourselves(call, refusal),
            };
            let head = match head {
                // A streamed insert is authorized on the collection it names before its
                // rows; one that names none there is read whole.
                Head::Streaming(s) if who.is_some() && !names_a_collection(rule, s.sketch()) => {
                    let read = s.into_whole(method.name(), self.max_message_bytes);
                    match by_deadline(deadline, started, read).await {
                        Ok(bytes) => Head::Whole(bytes),
                        Err(refusal) => return answer_ourselves(call, refusal),
                    }
                }
                head => head,
            };
            let mut authorized = Vec::new();
            {
                let message = match &head {
                    Head::Whole(bytes) => {
                        call.facts.request_bytes = bytes.len() as u64;
                        let encoding = parts.headers.get(grpc::GRPC_ENCODING);
                        match grpc::first_message(bytes, encoding, self.max_message_bytes) {
                            Ok(message) => message,
                            Err(e) => {
                                let refusal = e.into_proxy_error(method.name(), self.max_message_bytes);
                                return answer_ourselves(call, refusal);
                            }
                        }
                    }
                    Head::Streaming(s) => Cow::Borrowed(s.sketch()),
                };
                if let Some(rpc) = rpc {
                    match views::read_request(rpc.request(), &message) {
                        Ok(facts) => {
                            call.facts.set_request(facts);
                            call.reply = Some(ReplyCapture {
                                kind: rpc.reply(),
                                encoding: None,
                                limit: self.max_message_bytes,
                                gathered: Default::default(),
                                overflowed: false,
                            });
                        }
                        Err(e) => {
                            let refusal =
                                ProxyError::Malformed { method: method.name().to_owned(), reason: e.to_string() };
                            return answer_ourselves(call, refusal);
                        }
                    }
                }
                if let Some((auth, principal)) = &who {
                    let targets = match targets(rule, &message, &call.facts.database) {
                        Some(targets) => targets,
                        None => {
                            let reason = "request body is not valid protobuf".to_owned();
                            return answer_ourselves(
                                call,
                                ProxyError::Malformed { method: method.name().to_owned(), reason },
                            );
                        }
                    };
                    if call.facts.request.collection.is_none() {
                        call.facts.request.collection = targets.first().map(|(_, c)| c.clone());
                    }
                    if let Err(refusal) = auth.authorize(principal, rule, &targets).await {
                        return answer_ourselves(call, refusal.into());
                    }
                    if listing {
                        database_in_body = wire::strings(&message, 2).and_then(|v| v.last().map(|s| s.to_string()));
                    }
                    authorized = targets;
                }
            }
            match head {
                Head::Whole(bytes) => Body::Full(Some(bytes)),
                Head::Streaming(s) => {
                    let check = who.is_some().then(|| {
                        let header_database = crate::auth::identity::database(&parts.headers).to_owned();
                        same_targets(method.name(), rule, header_database, authorized)
                    });
                    let (body, result) = s.forward(method.name(), self.max_message_bytes, check);
                    call.request_scan = Some(result.clone());
                    streamed = Some(result);
                    Body::Streamed(body)
                }
            }
        } else {
            if let Some((auth, principal)) = &who
                && let Err(refusal) = auth.authorize(principal, rule, &[]).await
            {
                return answer_ourselves(call, refusal.into());
            }
            let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
            call.request_seen = Some(seen.clone());
            Body::Raw { inner: body, seen }
        };

        if let Some((auth, principal)) = &who
            && principal.role != Role::Admin
        {
            call.on_created = Some(CreatedHook { authority: (*auth).clone(), principal: principal.clone() });
        }
        call.forwarded_at = Some(Instant::now());
        let reply = self.upstream.send(Request::from_parts(parts, body), deadline).await;
        // A streamed request the sidecar broke off: its reason, not the upstream's account
        // of the reset.
        if let Some(refusal) = streamed.and_then(|result| result.refusal()) {
            return answer_ourselves(call, refusal);
        }
        let reply = match reply {
            Ok(reply) => reply,
            Err(failure) => return answer_ourselves(call, failure),
        };
        if listing
            && let Some((auth, principal)) = &who
            && principal.role != Role::Admin
        {
            let database = database_in_body.filter(|d| !d.is_empty()).unwrap_or_else(|| call.facts.database.clone());
            return self.filtered_listing(reply, call, auth, principal, database).await;
        }
        self.observed(reply, call)
    }

    /// The upstream's reply on its way to the client, observed.
    fn observed(&self, reply: Response<ReplyBody>, call: Pending) -> Response<Body> {
        let (mut parts, inner) = reply.into_parts();
        let upstream = self.upstream.name().clone();
        let observed = Observed::new(parts.status, &mut parts.headers, inner, call, upstream);
        Response::from_parts(parts, Body::Observed(observed))
    }

    /// ShowCollections for a caller who is not an admin: only what they may read.
    async fn filtered_listing(
        &self,
        reply: Response<ReplyBody>,
        mut call: Pending,
        auth: &Authority,
        principal: &Principal,
        database: String,
    ) -> Response<Body> {
        let grants = match auth.grants(principal).await {
            Ok(grants) => grants,
            // Failing open, a listing that cannot be filtered goes out as Milvus sent it,
            // as any other call whose grants cannot be read goes through unchecked.
            Err(AuthError::Unavailable(_)) if auth.fails_open() => return self.observed(reply, call),
            Err(refusal) => return answer_ourselves(call, refusal.into()),
        };
        let (parts, body) = reply.into_parts();
        let collected = match body.collect().await {
            Ok(collected) => collected,
            Err(e) => {
                let reason = format!("reply broken off: {}", crate::error_chain(&e));
                let failure = ProxyError::UpstreamUnavailable { upstream: self.upstream.name().clone(), reason };
                return answer_ourselves(call, failure);
            }
        };
        let trailers = collected.trailers().cloned();
        let bytes = collected.to_bytes();
        let outcome = trailers.as_ref().and_then(grpc::outcome_in).or_else(|| grpc::outcome_in(&parts.headers));
        let rewritten = grpc::first_message(&bytes, parts.headers.get(grpc::GRPC_ENCODING), self.max_message_bytes)
            .ok()
            .and_then(|msg| {
                rewrite::filter_show_collections(&msg, |name| Authority::may_read(principal, &grants, &database, name))
            });
        let body = match rewritten {
            // Re-sent uncompressed; the grpc-encoding header goes.
            Some(message) => grpc::frame(&message),
            // An empty or unreadable reply (an error status) passes as it came.
            None => bytes,
        };
        let mut parts = parts;
        parts.headers.remove(grpc::GRPC_ENCODING);
        call.set_sizes(body.len() as u64);
        let receipt = call.finish(outcome.unwrap_or_default());
        Response::from_parts(parts, Body::Complete { data: Some(body), receipt, trailers })
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
                headers.insert(grpc::GRPC_TIMEOUT, grpc::timeout_header(cap));
                Some(Deadline { after: cap, source: "max_query_timeout in system_config" })
            }
            (client, None) => client,
        }
    }

    fn start_call(&self, method: Method, parts: &http::request::Parts, peer: SocketAddr, started: Instant) -> Pending {
        let headers = &parts.headers;
        let database = crate::auth::identity::database(headers);
        // The header values point into the connection's read buffer: the record, which may
        // wait in the writer's queue, gets copies rather than pin that buffer.
        let detached = |v: &http::HeaderValue| http::HeaderValue::from_bytes(v.as_bytes()).ok();
        self.telemetry.call_started();
        let started_at = SystemTime::now();
        Pending::new(InFlight {
            facts: CallFacts {
                id: crate::facts::call_id(started_at),
                started_at,
                duration: Default::default(),
                method,
                database: database.to_owned(),
                request: Default::default(),
                reply: Default::default(),
                outcome: Outcome::default(),
                request_bytes: 0,
                reply_bytes: 0,
                client: Client {
                    peer: Some(peer),
                    user: None,
                    user_agent: headers.get(http::header::USER_AGENT).and_then(detached),
                    request_id: headers.get(CLIENT_REQUEST_ID).and_then(detached),
                },
            },
            started,
            recorder: self.recorder.clone(),
            telemetry: self.telemetry.clone(),
            forwarded_at: None,
            upstream_done: None,
            finished: false,
            reply: None,
            on_created: None,
            request_seen: None,
            request_scan: None,
        })
    }
}

/// The (database, collection) pairs a request names, where its rule says to look.
/// Some(empty) when the rule names no collection; None when the body is not protobuf.
fn targets(rule: Option<MethodRule>, message: &[u8], default_database: &str) -> Option<Vec<(String, String)>> {
    let Some(MethodRule { access: Access::Collection { target, .. }, .. }) = rule else { return Some(Vec::new()) };
    // A database_field of 0 (none) matches nothing: no field has that number.
    let [databases, names] = wire::fields(message, [target.database_field, target.collection_field])?;
    // The last value, as Milvus (like any protobuf reader) keeps it; an empty one means
    // "the database in the header", as in Milvus, even after a non-empty one.
    let database = databases.last().copied().filter(|d| !d.is_empty()).unwrap_or(default_database);
    Some(names.into_iter().filter(|c| !c.is_empty()).map(|c| (database.to_owned(), c.to_owned())).collect())
}

fn names_a_collection(rule: Option<MethodRule>, message: &[u8]) -> bool {
    targets(rule, message, "").is_some_and(|t| !t.is_empty())
}

/// The check a streamed request's complete sketch must pass: it names what was authorized
/// from its start. Milvus keeps the last value of a repeated name, so a name sent again
/// after the rows could otherwise redirect an authorized insert.
fn same_targets(
    method: &str,
    rule: Option<MethodRule>,
    header_database: String,
    authorized: Vec<(String, String)>,
) -> inspect::Check {
    let method = method.to_owned();
    Box::new(move |sketch: &[u8]| {
        if targets(rule, sketch, &header_database).is_some_and(|t| t == authorized) {
            return Ok(());
        }
        let reason = "the collection or database it names after its rows differs from the one named before them".into();
        Err(ProxyError::Malformed { method: method.clone(), reason })
    })
}

/// `read` (of a request body the sidecar needs before forwarding), cut off at the call's
/// deadline: a client whose body stops arriving gets DEADLINE_EXCEEDED then, as from Milvus,
/// instead of holding the call open. A body already there is read without a timer.
async fn by_deadline<T>(
    deadline: Option<Deadline>,
    started: Instant,
    read: impl Future<Output = Result<T, ProxyError>>,
) -> Result<T, ProxyError> {
    let Some(Deadline { after, source }) = deadline else { return read.await };
    let at = tokio::time::Instant::from_std(started + after);
    tokio::time::timeout_at(at, read).await.unwrap_or(Err(ProxyError::RequestTimeout { after, limit: source }))
}

/// Ends a call with the sidecar's own status, recorded like any other outcome.
fn answer_ourselves(call: Pending, refusal: ProxyError) -> Response<Body> {
    let status = refusal.to_status();
    match call.finish(Outcome::grpc(status.code(), status.message())) {
        None => status.into_http(),
        Some(receipt) => observe::held_status(&status, receipt),
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderValue};

    use super::prepare_for_upstream;

    #[test]
    fn per_call_values_are_never_indexed_and_internal_headers_dropped() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("client-request-id", "9f3c2a"),
            ("client-request-unixmsec", "1765011600123"),
            ("grpc-timeout", "9998m"),
            ("dbname", "analytics"),
            ("sourceid", "QEBtaWx2dXMtbWVtYmVyQEA="),
        ] {
            headers.insert(name, HeaderValue::from_static(value));
        }
        prepare_for_upstream(&mut headers);

        assert!(headers.get("sourceid").is_none());
        for (name, value) in
            [("client-request-id", "9f3c2a"), ("client-request-unixmsec", "1765011600123"), ("grpc-timeout", "9998m")]
        {
            assert_eq!(headers[name], value, "{name} keeps its value");
            assert!(headers[name].is_sensitive(), "{name} goes as a never-indexed literal");
        }
        assert!(!headers["dbname"].is_sensitive(), "a value that repeats stays indexable");
    }
}

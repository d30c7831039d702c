//! Watching a reply stream back to the client, and turning what was seen into call facts.
//!
//! Frames pass through as they arrive (no added latency). For inspected calls the reply's
//! message is gathered on the side to be read through a view once the call is over. The
//! facts are recorded when the call ends, however it ends: completed, broken off by the
//! upstream, or abandoned by the client (the body is dropped).
//!
//! With a durable recorder (`--durable-records`) the call is recorded as its status
//! arrives instead, and the status (the trailers) is held back from the client until the
//! recorder says the records are durable: a client never sees a call end that a crash of
//! the sidecar could leave unrecorded.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::{Body as _, Frame, SizeHint};
use tonic::Code;

use super::grpc::{self, Gathered};
use super::inspect::ScanResult;
use super::link::ReplyBody;
use crate::auth::authority::{Authority, Principal};
use crate::facts::{CallFacts, Outcome};
use crate::milvus::{Reply, Rpc, views};
use crate::record::{NotDurable, Receipt, Recorder};
use crate::telemetry::Telemetry;

/// A call whose facts will be recorded exactly once: when it is dropped, or earlier when it
/// is finished (or, with a durable recorder, when its status arrives). A call is held as
/// one from its start, so that a call dropped anywhere (its client reset the stream) is
/// still recorded, as cancelled.
pub struct Pending(Option<Box<InFlight>>);

/// The call while the proxy handles it, before it is finished or handed to its reply.
impl std::ops::Deref for Pending {
    type Target = InFlight;

    fn deref(&self) -> &InFlight {
        self.0.as_deref().expect("a call is used only until it is finished")
    }
}

impl std::ops::DerefMut for Pending {
    fn deref_mut(&mut self) -> &mut InFlight {
        self.0.as_deref_mut().expect("a call is used only until it is finished")
    }
}

pub struct InFlight {
    pub facts: CallFacts,
    pub started: Instant,
    pub recorder: Arc<dyn Recorder>,
    pub telemetry: Arc<Telemetry>,
    /// When the call went upstream (None: the sidecar answered it itself), and when the
    /// upstream's reply ended.
    pub forwarded_at: Option<Instant>,
    pub upstream_done: Option<Instant>,
    /// Set once a gRPC status was seen; a call dropped without one was cancelled.
    pub finished: bool,
    /// How to read the reply, for inspected calls.
    pub reply: Option<ReplyCapture>,
    /// Who to tell when this call creates a collection.
    pub on_created: Option<CreatedHook>,
    /// Bytes of a request that streamed through unread, counted as they went.
    pub request_seen: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// A request read up to its rows and streamed: its complete sketch, read at the end.
    pub request_scan: Option<Arc<ScanResult>>,
}

/// The creator of a collection may use it at once: the grant is cached as soon as Milvus
/// confirms the creation, before the client sees the reply.
pub struct CreatedHook {
    pub authority: Arc<Authority>,
    pub principal: Arc<Principal>,
}

pub struct ReplyCapture {
    pub kind: Reply,
    pub encoding: Option<HeaderValue>,
    pub limit: usize,
    pub gathered: Gathered,
    /// The reply outgrew `limit`: it still streams through, unread.
    pub overflowed: bool,
}

impl Pending {
    pub fn new(call: InFlight) -> Self {
        Pending(Some(Box::new(call)))
    }

    /// Ends the call now with `outcome` (for replies the sidecar composes itself). With a
    /// durable recorder, the receipt the reply must wait for before its status.
    #[must_use = "with a durable recorder, the reply's status must wait for the receipt"]
    pub fn finish(mut self, outcome: Outcome) -> Option<Receipt> {
        let mut call = self.0.take()?;
        call.end_with(outcome);
        call.complete(true)
    }

    /// Whether this call's status must wait for its records (durable recorder).
    fn durable(&self) -> bool {
        self.0.as_ref().is_some_and(|c| c.recorder.durable())
    }

    /// Records the call now; with a durable recorder, returns what to wait for.
    fn complete_now(&mut self) -> Option<Receipt> {
        self.0.take().and_then(|call| call.complete(true))
    }

    /// For replies the sidecar sends itself: the bytes it sent.
    pub fn set_sizes(&mut self, reply_bytes: u64) {
        if let Some(call) = self.0.as_mut() {
            call.facts.reply_bytes = reply_bytes;
        }
    }

    fn call(&mut self) -> Option<&mut InFlight> {
        self.0.as_deref_mut()
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // Nobody is left to wait for a receipt: the client is gone or already answered.
        if let Some(call) = self.0.take() {
            call.complete(false);
        }
    }
}

impl InFlight {
    fn on_headers(&mut self, status: http::StatusCode, headers: &HeaderMap) {
        if status != http::StatusCode::OK {
            let outcome = Outcome::grpc(grpc::code_for_http(status), format!("upstream answered HTTP {status}"));
            self.end_with(outcome);
        } else if let Some(outcome) = grpc::outcome_in(headers) {
            // Trailers-only reply: the status came with the headers.
            self.end_with(outcome);
        } else if let Some(capture) = self.reply.as_mut() {
            capture.encoding = headers.get(grpc::GRPC_ENCODING).cloned();
        }
    }

    fn on_data(&mut self, data: &Bytes) {
        self.facts.reply_bytes += data.len() as u64;
        let Some(capture) = self.reply.as_mut().filter(|c| !c.overflowed) else { return };
        if capture.gathered.len() + data.len() > capture.limit + grpc::HEADER_LEN {
            capture.overflowed = true;
            capture.gathered = Gathered::Empty;
            return;
        }
        let expected = grpc::declared_len(capture.gathered.as_slice())
            .or_else(|| grpc::declared_len(data))
            .map_or(0, |n| n + grpc::HEADER_LEN);
        capture.gathered.push(data.clone(), expected);
    }

    fn end_with(&mut self, outcome: Outcome) {
        self.facts.outcome = outcome;
        self.finished = true;
        if self.forwarded_at.is_some() {
            self.upstream_done = Some(Instant::now());
        }
    }

    /// Reads the gathered reply once the call's gRPC status is known, and acts on it.
    fn settle(&mut self) {
        if let Some(capture) = self.reply.take()
            && self.facts.outcome.grpc == Code::Ok
        {
            self.read_reply(capture);
        }
        if let Some(hook) = self.on_created.take()
            && self.facts.outcome.is_success()
            && self.facts.method.rpc() == Some(Rpc::CreateCollection)
            && let Some(collection) = &self.facts.request.collection
        {
            hook.authority.note_created(&hook.principal, &self.facts.database, collection);
        }
    }

    /// Records the call. With `wait` and a durable recorder, returns the receipt to wait
    /// for; without, the record is queued as usual (a full queue drops it, counted).
    fn complete(mut self: Box<Self>, wait: bool) -> Option<Receipt> {
        if !self.finished {
            self.facts.outcome =
                Outcome::grpc(Code::Cancelled, "the client cancelled the call before its reply was complete");
        }
        self.settle();
        if let Some(seen) = &self.request_seen {
            self.facts.request_bytes = seen.load(std::sync::atomic::Ordering::Relaxed);
        }
        if let Some(scan) = self.request_scan.take() {
            self.read_streamed_request(&scan);
        }
        let now = Instant::now();
        self.facts.duration = now - self.started;
        let upstream = self.forwarded_at.map(|at| self.upstream_done.unwrap_or(now).saturating_duration_since(at));
        self.telemetry.call_ended(&self.facts, upstream);
        if wait && self.recorder.durable() {
            Some(self.recorder.record_durably(self.facts))
        } else {
            self.recorder.record(self.facts);
            None
        }
    }

    /// What a streamed request said after its rows (an insert's `num_rows`) is known once
    /// it has all gone upstream.
    fn read_streamed_request(&mut self, scan: &ScanResult) {
        let (Some(Ok(scanned)), Some(rpc)) = (scan.get(), self.facts.method.rpc()) else { return };
        self.facts.request_bytes = scanned.bytes;
        match views::read_request(rpc.request(), &scanned.sketch) {
            Ok(facts) => self.facts.set_request(facts),
            Err(e) => tracing::warn!(method = rpc.name(), error = %e, "could not read the end of a streamed request"),
        }
    }

    fn read_reply(&mut self, capture: ReplyCapture) {
        if capture.overflowed || capture.gathered.is_empty() {
            return;
        }
        let method = self.facts.method.name();
        let read = grpc::first_message(capture.gathered.as_slice(), capture.encoding.as_ref(), capture.limit)
            .map_err(|e| format!("{e:?}"))
            .and_then(|msg| views::read_reply(capture.kind, &msg, &mut self.facts.outcome).map_err(|e| e.to_string()));
        match read {
            Ok(detail) => self.facts.reply = detail,
            // The client got Milvus's reply as it was; only our account of it is partial.
            Err(e) => tracing::warn!(method, error = %e, "could not read the upstream's reply"),
        }
    }
}

/// A reply body from the upstream, observed on its way to the client.
pub struct Observed {
    inner: ReplyBody,
    call: Pending,
    upstream: Arc<str>,
    /// Set after the sidecar ended the stream itself (upstream failure).
    ended: bool,
    /// Durable recorder: the status of a trailers-only reply, moved out of the headers so
    /// that it can wait for the call's records like any other trailers.
    deferred: Option<HeaderMap>,
    /// Durable recorder: the trailers, held until the call's records are durable.
    held: Option<(Receipt, Frame<Bytes>)>,
}

impl Observed {
    /// `headers` go to the client; with a durable recorder, a status in them (a
    /// trailers-only reply) is moved to trailers sent after the call's records are durable.
    pub fn new(
        status: http::StatusCode,
        headers: &mut HeaderMap,
        inner: ReplyBody,
        mut call: Pending,
        upstream: Arc<str>,
    ) -> Self {
        if let Some(c) = call.call() {
            c.on_headers(status, headers);
        }
        let mut deferred = None;
        if call.durable() && headers.contains_key(grpc::GRPC_STATUS) {
            let mut trailers = HeaderMap::new();
            for name in [grpc::GRPC_STATUS, grpc::GRPC_MESSAGE, grpc::GRPC_STATUS_DETAILS_BIN] {
                if let Some(value) = headers.remove(&name) {
                    trailers.insert(name, value);
                }
            }
            deferred = Some(trailers);
        }
        Observed { inner, call, upstream, ended: false, deferred, held: None }
    }

    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if let Some((receipt, _)) = self.held.as_mut() {
            let durable = ready!(receipt.as_mut().poll(cx));
            let (_, trailers) = self.held.take().expect("held above");
            return Poll::Ready(Some(Ok(match durable {
                Ok(()) => trailers,
                Err(e) => not_durable(e),
            })));
        }
        if self.ended {
            return Poll::Ready(None);
        }
        let frame = match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                let trailers = self.broken_off(&e);
                return self.release(trailers, cx);
            }
            None => match self.deferred.take() {
                Some(trailers) => return self.release(Frame::trailers(trailers), cx),
                None => return Poll::Ready(None),
            },
        };
        let mut last = false;
        if let Some(call) = self.call.call() {
            if let Some(data) = frame.data_ref() {
                call.on_data(data);
            } else if let Some(trailers) = frame.trailers_ref() {
                let outcome = grpc::outcome_in(trailers)
                    .unwrap_or_else(|| Outcome::grpc(Code::Internal, "upstream ended the reply without a grpc-status"));
                call.end_with(outcome);
                call.settle();
                last = true;
            }
        }
        if last {
            return self.release(frame, cx);
        }
        Poll::Ready(Some(Ok(frame)))
    }

    /// Sends the reply's last frame (its trailers) now, or, with a durable recorder, once
    /// the call's records are durable.
    fn release(
        &mut self,
        trailers: Frame<Bytes>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.call.durable() {
            return Poll::Ready(Some(Ok(trailers)));
        }
        match self.call.complete_now() {
            Some(receipt) => {
                self.held = Some((receipt, trailers));
                self.poll_frame(cx)
            }
            None => Poll::Ready(Some(Ok(trailers))),
        }
    }

    /// The upstream failed mid-reply: end the client's stream with a proper gRPC status in
    /// trailers rather than a bare stream reset, so the client sees why.
    fn broken_off(&mut self, err: &h2::Error) -> Frame<Bytes> {
        self.ended = true;
        let status = tonic::Status::unavailable(format!(
            "upstream Milvus at {} broke off the reply: {}",
            self.upstream,
            crate::error_chain(err)
        ));
        if let Some(call) = self.call.call() {
            call.end_with(Outcome::grpc(status.code(), status.message()));
        }
        let mut trailers = HeaderMap::new();
        // `add_header` only fails on a message that cannot be encoded, which ours can.
        let _ = status.add_header(&mut trailers);
        Frame::trailers(trailers)
    }

    pub fn is_end_stream(&self) -> bool {
        if self.held.is_some() || self.deferred.is_some() {
            return false;
        }
        self.ended || self.inner.is_end_stream()
    }

    pub fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The trailers of a call whose records could not be made durable (durable mode): the
/// client must not take the call as done and recorded. Milvus did carry it out.
pub fn not_durable(e: NotDurable) -> Frame<Bytes> {
    let status = tonic::Status::internal(e.to_string());
    let mut trailers = HeaderMap::new();
    let _ = status.add_header(&mut trailers);
    Frame::trailers(trailers)
}

/// A reply the sidecar composed itself, for a durable recorder: its status goes in
/// trailers, sent once `receipt` resolves (a trailers-only reply could not wait).
pub fn held_status(status: &tonic::Status, receipt: Receipt) -> http::Response<super::Body> {
    let mut trailers = HeaderMap::new();
    let _ = status.add_header(&mut trailers);
    let mut response =
        http::Response::new(super::Body::Complete { data: None, receipt: Some(receipt), trailers: Some(trailers) });
    response.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}

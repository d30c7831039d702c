//! A fake upstream Milvus for proxy behaviour that a real one cannot be made to show on
//! demand: exact bytes and metadata, error details, streaming, slowness, broken replies.
//! Behaviour is chosen by method name; every request is kept for inspection.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

type Body = BoxBody<Bytes, std::io::Error>;

/// A request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Default)]
pub struct State {
    seen: Mutex<Vec<Seen>>,
    canned: Mutex<HashMap<String, Bytes>>,
}

pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub state: Arc<State>,
    task: JoinHandle<()>,
}

impl FakeUpstream {
    pub async fn start() -> FakeUpstream {
        FakeUpstream::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(addr: SocketAddr) -> FakeUpstream {
        let listener = TcpListener::bind(addr).await.expect("fake upstream binds");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let task = tokio::spawn(accept(listener, state.clone()));
        FakeUpstream { addr, state, task }
    }

    /// From now on, answer `method` with this (unframed) message.
    pub fn reply_with(&self, method: &str, message: Bytes) {
        self.state.canned.lock().unwrap().insert(method.to_owned(), message);
    }

    /// The last request received for `method`.
    pub fn last(&self, method: &str) -> Option<Seen> {
        self.state.seen.lock().unwrap().iter().rev().find(|s| s.method == method).cloned()
    }

    pub fn count(&self, method: &str) -> usize {
        self.state.seen.lock().unwrap().iter().filter(|s| s.method == method).count()
    }

    /// Stops accepting connections (existing ones end when their tasks end).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(req, state).await) }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .max_frame_size(1 << 20)
                .adaptive_window(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(req: Request<Incoming>, state: Arc<State>) -> Response<Body> {
    let method = req.uri().path().rsplit('/').next().unwrap_or_default().to_owned();
    match method.as_str() {
        "CreateReplicateStream" => return echo_stream(req),
        "BreakOff" => return broken_reply(),
        _ => {}
    }
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let delay = parts.headers.get("x-fake-delay-ms").and_then(|v| v.to_str().ok()?.parse().ok());
    state.seen.lock().unwrap().push(Seen { method: method.clone(), headers: parts.headers, body: body.clone() });
    // Any call can be made slow on request (after it has been seen).
    if let Some(ms) = delay {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    match method.as_str() {
        "Fail" => failure(),
        "DumpMessages" => {
            let (tx, body) = channel();
            tokio::spawn(async move {
                for i in 1..=3 {
                    let _ = tx.send(Ok(Frame::data(super::framed(format!("message {i}").as_bytes())))).await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let _ = tx.send(Ok(Frame::trailers(ok_trailers()))).await;
            });
            grpc_response(body)
        }
        "Slow" => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            reply(body)
        }
        _ => {
            let canned = state.canned.lock().unwrap().get(&method).cloned();
            reply(canned.map_or(body, |m| super::framed(&m)))
        }
    }
}

fn channel() -> (mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>, Body) {
    let (tx, rx) = mpsc::channel(16);
    (tx, BodyExt::boxed(StreamBody::new(ReceiverStream::new(rx))))
}

fn grpc_response(body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    response.headers_mut().insert("content-type", HeaderValue::from_static("application/grpc"));
    response.headers_mut().insert("x-upstream-header", HeaderValue::from_static("kept"));
    response
}

fn ok_trailers() -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    trailers.insert("x-upstream-trailer", HeaderValue::from_static("kept"));
    trailers
}

/// Replies with `framed` (already gRPC-framed bytes) and OK trailers.
fn reply(framed: Bytes) -> Response<Body> {
    let (tx, body) = channel();
    tokio::spawn(async move {
        let _ = tx.send(Ok(Frame::data(framed))).await;
        let _ = tx.send(Ok(Frame::trailers(ok_trailers()))).await;
    });
    grpc_response(body)
}

/// The error details a test expects back, byte for byte.
pub const FAILURE_DETAILS: &[u8] = b"\x08\x05\x12\x10widget not found";

/// A trailers-only NOT_FOUND with a message and binary details.
fn failure() -> Response<Body> {
    let status = tonic::Status::with_details(tonic::Code::NotFound, "widget 42 not found", FAILURE_DETAILS.into());
    let mut response: Response<Body> = status.into_http();
    *response.body_mut() = BodyExt::boxed(http_body_util::Empty::new().map_err(|e: Infallible| match e {}));
    response.headers_mut().insert("x-upstream-header", HeaderValue::from_static("kept"));
    response
}

/// Bidirectional: every frame received is sent straight back, as it arrives.
fn echo_stream(req: Request<Incoming>) -> Response<Body> {
    let (tx, body) = channel();
    let mut incoming = req.into_body();
    tokio::spawn(async move {
        while let Some(Ok(frame)) = incoming.frame().await {
            if let Ok(data) = frame.into_data()
                && tx.send(Ok(Frame::data(data))).await.is_err()
            {
                return;
            }
        }
        let _ = tx.send(Ok(Frame::trailers(ok_trailers()))).await;
    });
    grpc_response(body)
}

/// Starts a reply, then fails it midway (the connection resets the stream).
fn broken_reply() -> Response<Body> {
    let (tx, body) = channel();
    tokio::spawn(async move {
        let _ = tx.send(Ok(Frame::data(super::framed(b"partial")))).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _ = tx.send(Err(std::io::Error::other("upstream crashed"))).await;
    });
    grpc_response(body)
}

//! A fast fake Milvus: an HTTP/2 gRPC server that answers every
//! `/milvus.proto.milvus.MilvusService/*` call at once with a small valid reply. It runs on its own
//! single-threaded runtime in its own OS thread so that it never competes with the load generator
//! for tokio workers (it still competes for the machine's cores, as a real upstream would).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;

use anyhow::{Context, Result};
use bytes::{BufMut, Bytes, BytesMut};
use futures::stream;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use milvus::proto::common::Status;
use milvus::proto::milvus::SearchResults;
use milvus::proto::schema::{IDs, LongArray, SearchResultData, i_ds::IdField};
use prost013::Message;
use tokio::net::TcpListener;

const MILVUS_PREFIX: &str = "/milvus.proto.milvus.MilvusService/";

/// gRPC status codes the fake can answer with.
const GRPC_INTERNAL: &str = "13";
const GRPC_UNIMPLEMENTED: &str = "12";

type ReplyBody = StreamBody<stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// Replies are encoded and framed once; answering a call only clones a `Bytes` handle.
struct Replies {
    search: Bytes,
    /// An empty message is a valid default of every proto3 reply type (an OK `common.Status`, an
    /// empty `DescribeCollectionResponse`, ...), so it serves all methods other than `Search`.
    empty: Bytes,
}

/// The name of the thread that serves every call, so its CPU time can be told apart.
pub const THREAD: &str = "fake-milvus";

/// Starts the fake on 127.0.0.1 with an OS-chosen port and returns that address.
pub fn start() -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding the fake Milvus")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let replies = Arc::new(Replies { search: grpc_frame(&search_results().encode_to_vec()), empty: grpc_frame(&[]) });
    thread::Builder::new()
        .name(THREAD.into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("building the fake Milvus runtime");
            if let Err(e) = runtime.block_on(serve(listener, replies)) {
                eprintln!("fake Milvus stopped: {e:#}");
            }
        })
        .context("spawning the fake Milvus thread")?;
    Ok(addr)
}

/// The reply the load generator checks for: OK status, one query, ten hits.
fn search_results() -> SearchResults {
    let top_k = crate::TOP_K;
    SearchResults {
        status: Some(Status::default()), // error_code Success, code 0
        results: Some(SearchResultData {
            num_queries: 1,
            top_k,
            topks: vec![top_k],
            scores: (0..top_k).map(|i| 0.99 - i as f32 * 0.01).collect(),
            ids: Some(IDs { id_field: Some(IdField::IntId(LongArray { data: (1..=top_k).collect() })) }),
            primary_field_name: "id".into(),
            ..Default::default()
        }),
        collection_name: crate::COLLECTION.into(),
        ..Default::default()
    }
}

/// A gRPC length-prefixed message: uncompressed flag, big-endian length, payload.
fn grpc_frame(message: &[u8]) -> Bytes {
    let mut framed = BytesMut::with_capacity(5 + message.len());
    framed.put_u8(0);
    framed.put_u32(u32::try_from(message.len()).expect("reply fits a gRPC frame"));
    framed.put_slice(message);
    framed.freeze()
}

async fn serve(listener: std::net::TcpListener, replies: Arc<Replies>) -> Result<()> {
    let listener = TcpListener::from_std(listener)?;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Transient (e.g. out of file descriptors): keep serving the other connections.
                eprintln!("fake Milvus: accept failed: {e}");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let replies = replies.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| answer(request, replies.clone()));
            // A client hanging up between runs ends its connection with an error: expected.
            // Flow-control windows that grow with the bandwidth-delay product, as grpc-go's (Milvus)
            // do: fixed 1 MiB windows would throttle 4 MiB inserts sent directly more than ones
            // relayed by a proxy with windows of its own.
            let _ = http2::Builder::new(TokioExecutor::new())
                .adaptive_window(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(request: Request<Incoming>, replies: Arc<Replies>) -> Result<Response<ReplyBody>, Infallible> {
    let reply = match request.uri().path().strip_prefix(MILVUS_PREFIX) {
        Some("Search") => Some(replies.search.clone()),
        Some(_) => Some(replies.empty.clone()),
        None => None,
    };
    // Read the whole request as a real server must before it can decode it.
    let read = request.into_body().collect().await;
    Ok(match (reply, read) {
        (_, Err(_)) => trailers_only(GRPC_INTERNAL),
        (None, _) => trailers_only(GRPC_UNIMPLEMENTED),
        (Some(reply), Ok(_)) => ok_reply(reply),
    })
}

fn ok_reply(framed: Bytes) -> Response<ReplyBody> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    grpc_response(HeaderMap::new(), vec![Ok(Frame::data(framed)), Ok(Frame::trailers(trailers))])
}

/// An error as gRPC sends it without a body: the status travels in the response headers.
fn trailers_only(code: &'static str) -> Response<ReplyBody> {
    let mut headers = HeaderMap::new();
    headers.insert("grpc-status", HeaderValue::from_static(code));
    grpc_response(headers, Vec::new())
}

fn grpc_response(headers: HeaderMap, frames: Vec<Result<Frame<Bytes>, Infallible>>) -> Response<ReplyBody> {
    let mut response = Response::new(StreamBody::new(stream::iter(frames)));
    *response.headers_mut() = headers;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}

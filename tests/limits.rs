//! What one client can hold of the sidecar: header block size, calls in flight on one
//! connection, connections at once, and message size.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::fake::FakeUpstream;
use common::{RawClient, RawCodec, SERVICE, Sidecar, at_least, at_most, framed, h2_connect, http_get, path, sample};
use http_body_util::BodyExt;
use tonic::Code;
use tonic::transport::Channel;

/// One call over a fresh bare HTTP/2 connection with one extra header of `size` bytes.
/// Returns the HTTP status and grpc-status, or the error that ended the call.
async fn call_with_header(addr: std::net::SocketAddr, size: usize) -> Result<(u16, Option<String>), String> {
    let mut send = h2_connect(addr).await.map_err(|e| e.to_string())?;
    let request = http::Request::post(format!("http://{addr}{SERVICE}Echo"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-padding", "a".repeat(size))
        .body(http_body_util::Full::new(framed(b"\x0a\x01x")))
        .unwrap();
    let reply = send.send_request(request).await.map_err(|e| milvus_sidecar::error_chain(&e))?;
    let status = reply.status().as_u16();
    let (parts, body) = reply.into_parts();
    let mut headers = parts.headers;
    if let Ok(collected) = body.collect().await
        && let Some(trailers) = collected.trailers()
    {
        headers.extend(trailers.clone());
    }
    Ok((status, headers.get("grpc-status").map(|v| v.to_str().unwrap().to_owned())))
}

#[tokio::test]
async fn a_header_block_over_the_limit_is_refused_and_the_sidecar_serves_on() {
    let upstream = FakeUpstream::start().await;
    let sidecar = Sidecar::start_with(upstream.addr, |c| c.limits.max_header_list_bytes = 8 * 1024).await;

    let small = call_with_header(sidecar.addr(), 1024).await.expect("a small header block passes");
    assert_eq!(small, (200, Some("0".into())));

    let big = call_with_header(sidecar.addr(), 64 * 1024).await;
    assert!(!matches!(big, Ok((200, _))), "a 64 KiB header block over an 8 KiB limit is refused: {big:?}");
    assert_eq!(upstream.count("Echo"), 1, "the refused call never reaches Milvus");

    call_with_header(sidecar.addr(), 1024).await.expect("later calls are served");
    assert_eq!(upstream.count("Echo"), 2);
}

#[tokio::test]
async fn calls_beyond_the_stream_limit_of_a_connection_wait_for_a_free_stream() {
    let upstream = FakeUpstream::start().await;
    let sidecar = Sidecar::start_with(upstream.addr, |c| c.limits.max_concurrent_streams = 2).await;
    let client = sidecar.raw_client().await;
    // Prime the connection so the client has the server's SETTINGS.
    client.clone().unary("Echo", Bytes::from_static(b"\x0a\x01x")).await.unwrap();

    let started = Instant::now();
    let calls = (0..6).map(|_| {
        let mut client = client.clone();
        async move {
            let mut request = tonic::Request::new(Bytes::from_static(b"\x0a\x01x"));
            request.metadata_mut().insert("x-fake-delay-ms", "300".parse().unwrap());
            client.unary_with("Echo", request).await
        }
    });
    for result in futures::future::join_all(calls).await {
        result.expect("every call completes");
    }
    // Six 300 ms calls, two at a time on the one connection: three rounds.
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(850), "calls ran more than two at a time: {took:?}");
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_until_one_closes() {
    let upstream = FakeUpstream::start().await;
    let sidecar = Sidecar::start_with(upstream.addr, |c| c.limits.max_connections = 1).await;
    let mut first = sidecar.raw_client().await;
    first.unary("Echo", Bytes::from_static(b"\x0a\x01a")).await.unwrap();

    // A second connection is not served while the first is open...
    let addr = sidecar.addr();
    let second = tokio::spawn(async move {
        let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        grpc.unary(tonic::Request::new(Bytes::from_static(b"\x0a\x01b")), path("Echo"), RawCodec).await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!second.is_finished(), "the second connection waits");
    assert_eq!(upstream.count("Echo"), 1);

    // ...and is once the first closes.
    drop(first);
    let reply = tokio::time::timeout(Duration::from_secs(5), second).await.expect("served after the first closed");
    reply.unwrap().expect("the waiting call succeeds");
    assert_eq!(upstream.count("Echo"), 2);
}

#[tokio::test]
async fn a_connection_that_never_speaks_is_closed_at_the_handshake_timeout_and_frees_its_slot() {
    let upstream = FakeUpstream::start().await;
    let sidecar = Sidecar::start_with(upstream.addr, |c| {
        c.limits.max_connections = 1;
        c.limits.handshake_timeout = Duration::from_millis(300);
    })
    .await;
    // Connected first, so accepted first (the listen backlog is first in, first out): it
    // holds the only slot and sends nothing.
    let mut silent = tokio::net::TcpStream::connect(sidecar.addr()).await.unwrap();
    let started = Instant::now();
    let mut client = RawClient::connect_lazy(sidecar.addr());
    let reply = tokio::time::timeout(Duration::from_secs(5), client.unary("Echo", Bytes::from_static(b"\x0a\x01a")))
        .await
        .expect("served once the silent connection is closed");
    reply.expect("the waiting call succeeds");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(250), "the call waited for the slot the silent one held: {took:?}");
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(1), tokio::io::AsyncReadExt::read(&mut silent, &mut byte))
        .await
        .expect("the silent connection was closed");
    assert!(matches!(read, Ok(0) | Err(_)), "closed without a byte: {read:?}");

    let admin = sidecar.running.admin_addr;
    at_least(admin, r#"milvus_sidecar_client_connections_unserved_total{reason="handshake_timeout"}"#, 1.0).await;
    let scrape = http_get(admin, "/metrics").await.1;
    assert_eq!(sample(&scrape, "milvus_sidecar_client_connections"), 1.0, "the served client's, open: {scrape}");
    assert_eq!(sample(&scrape, "milvus_sidecar_client_connections_limit"), 1.0, "{scrape}");
    drop(client);
    at_most(admin, "milvus_sidecar_client_connections", 0.0).await;
}

#[tokio::test]
async fn an_http1_request_is_answered_that_grpc_needs_http2() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = FakeUpstream::start().await;
    let sidecar = Sidecar::start(upstream.addr).await;
    let mut http1 = tokio::net::TcpStream::connect(sidecar.addr()).await.unwrap();
    http1.write_all(b"GET /healthz HTTP/1.1\r\nhost: sidecar\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), http1.read_to_string(&mut answer))
        .await
        .expect("answered and closed at once")
        .expect("read the answer");
    assert!(answer.starts_with("HTTP/1.1 505 HTTP Version Not Supported\r\n"), "{answer}");
    assert!(answer.contains("gRPC over HTTP/2 only") && answer.contains("/readyz"), "{answer}");

    let mut client = sidecar.raw_client().await;
    client.unary("Echo", Bytes::from_static(b"\x0a\x01a")).await.expect("gRPC clients are served as before");
    assert_eq!(upstream.count("Echo"), 1);

    // As a TCP health check does: connect, then close having sent nothing.
    drop(tokio::net::TcpStream::connect(sidecar.addr()).await.unwrap());
    let admin = sidecar.running.admin_addr;
    let unserved = |reason: &str| format!(r#"milvus_sidecar_client_connections_unserved_total{{reason="{reason}"}}"#);
    at_least(admin, &unserved("closed"), 1.0).await;
    drop(http1);
    at_least(admin, &unserved("not_http2"), 1.0).await;
    let scrape = http_get(admin, "/metrics").await.1;
    assert_eq!(sample(&scrape, &unserved("not_http2")), 1.0, "{scrape}");
    assert_eq!(sample(&scrape, &unserved("closed")), 1.0, "{scrape}");
    assert_eq!(sample(&scrape, &unserved("handshake_timeout")), 0.0, "{scrape}");
}

#[tokio::test]
async fn an_over_limit_message_is_refused_naming_the_limit_before_it_is_read() {
    let upstream = FakeUpstream::start().await;
    let sidecar = Sidecar::start_with(upstream.addr, |c| c.max_message_bytes = 1024).await;
    let mut client: RawClient = sidecar.raw_client().await;

    // A Search body that only declares 100 MiB: the refusal comes from the 5-byte header, so
    // the sidecar never waits for (or buffers) the rest.
    let addr = sidecar.addr();
    let mut send = h2_connect(addr).await.unwrap();
    let (mut tx, body) = futures::channel::mpsc::channel::<Result<hyper::body::Frame<Bytes>, std::io::Error>>(1);
    let request = http::Request::post(format!("http://{addr}{SERVICE}Search"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::StreamBody::new(body))
        .unwrap();
    let mut header = vec![0u8];
    header.extend_from_slice(&(100u32 << 20).to_be_bytes());
    futures::SinkExt::send(&mut tx, Ok(hyper::body::Frame::data(Bytes::from(header)))).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), send.send_request(request))
        .await
        .expect("answered without waiting for the 100 MiB")
        .unwrap();
    let status = tonic::Status::from_header_map(reply.headers()).expect("a trailers-only gRPC status");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("104857600 bytes exceeds the sidecar's limit of 1024"), "{}", status.message());
    assert!(status.message().contains("--max-message-bytes"), "names the setting: {}", status.message());
    drop(tx);

    // Within the limit, the same method passes.
    client.unary("Search", Bytes::from_static(b"\x1a\x01c")).await.expect("a small Search is forwarded");
    assert_eq!(upstream.count("Search"), 1);
}

#[tokio::test]
async fn a_request_body_that_stops_arriving_ends_at_the_callers_deadline() {
    let upstream = FakeUpstream::start().await;
    let sidecar = Sidecar::start(upstream.addr).await;
    let addr = sidecar.addr();
    let mut send = h2_connect(addr).await.unwrap();
    // A Search whose prefix announces 100 bytes; 10 arrive and the stream stays open, as
    // from a client that stalls without cancelling.
    let (more, body) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, std::convert::Infallible>>(1);
    let mut partial = vec![0, 0, 0, 0, 100];
    partial.extend_from_slice(b"\x12\x08partial_");
    more.send(Ok(http_body::Frame::data(Bytes::from(partial)))).await.unwrap();
    let request = http::Request::post(format!("http://{addr}{}", path("Search")))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "300m")
        .body(http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(body)))
        .unwrap();
    let started = Instant::now();
    let reply = tokio::time::timeout(Duration::from_secs(5), send.send_request(request))
        .await
        .expect("answered, not held past the deadline")
        .unwrap();
    let took = started.elapsed();
    let headers = reply.headers();
    let status = headers.get("grpc-status").map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(status.as_deref(), Some("4"), "DEADLINE_EXCEEDED: {headers:?}");
    let message = headers.get("grpc-message").unwrap().to_str().unwrap();
    assert!(message.contains("300ms") && message.contains("deadline"), "{message}");
    assert!(took >= Duration::from_millis(290) && took < Duration::from_secs(2), "answered after {took:?}");
    assert_eq!(upstream.count("Search"), 0, "nothing reached Milvus");
    drop(more);
}

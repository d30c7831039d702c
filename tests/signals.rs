//! SIGTERM sent to the built binary, as Kubernetes sends it: calls in flight finish, new
//! connections are refused, and the process exits 0 within the drain timeout. (In-process
//! tests call `shutdown()` directly; only the real process shows that the signal is
//! caught and leads there.) No PostgreSQL: `--no-auth --no-recording`.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::bin::Process;
use common::fake::FakeUpstream;
use common::{RawClient, encode};
use milvus::proto::common::Status as MilvusStatus;
use milvus::proto::milvus::{SearchRequest, SearchResults};
use tonic::Code;
use tonic::metadata::MetadataValue;

/// The binary, without PostgreSQL, in front of `upstream`.
async fn sidecar(upstream: &FakeUpstream, drain_timeout: &str) -> Process {
    let upstream = format!("http://{}", upstream.addr);
    let args = ["--no-auth", "--no-recording", "--upstream", &upstream, "--drain-timeout", drain_timeout];
    Process::serve(&args, &[("RUST_LOG", "info")]).await
}

/// A Search the fake upstream holds for `hold_ms` before it answers.
fn held_search(hold_ms: u64) -> tonic::Request<Bytes> {
    let body = encode(&SearchRequest { collection_name: "docs".into(), nq: 1, ..Default::default() });
    let mut request = tonic::Request::new(body);
    request.metadata_mut().insert("x-fake-delay-ms", MetadataValue::from(hold_ms));
    request
}

/// Waits until the upstream holds `n` Search calls: they are truly in flight then.
async fn until_upstream_holds(upstream: &FakeUpstream, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while upstream.count("Search") < n {
        assert!(Instant::now() < deadline, "the call never reached the upstream");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_the_call_in_flight_refuses_new_connections_and_exits_0() {
    let upstream = FakeUpstream::start().await;
    let held = MilvusStatus { reason: "the held reply".into(), ..Default::default() };
    let reply = encode(&SearchResults { status: Some(held), collection_name: "docs".into(), ..Default::default() });
    upstream.reply_with("Search", reply.clone());
    let mut p = sidecar(&upstream, "10s").await;
    let mut client = RawClient::connect(p.listen).await;
    let in_flight = tokio::spawn(async move { client.unary_with("Search", held_search(1500)).await });
    until_upstream_holds(&upstream, 1).await;

    let signalled = Instant::now();
    p.signal(libc::SIGTERM);
    // Refused while the held call is still running: the listener closed, the process did not.
    loop {
        match tokio::net::TcpStream::connect(p.listen).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            // Connected into the listen backlog just as the listener closed, which resets
            // what waits there: closing, not yet closed.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("connecting failed otherwise than refused: {e}"),
            Ok(_) => {}
        }
        assert!(signalled.elapsed() < Duration::from_secs(1), "still accepting connections 1 s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!in_flight.is_finished(), "the call ended before connections were refused; nothing was drained");
    assert!(p.exited_within(Duration::ZERO).await.is_none(), "the process exited instead of draining");
    let status = RawClient::connect_lazy(p.listen).unary("Search", Bytes::new()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "a new client gets no call through: {status:?}");

    let answered = in_flight.await.unwrap().expect("the in-flight call completes");
    assert_eq!(answered.into_inner(), reply, "with the upstream's reply, byte for byte");
    let status = p.exited_within(Duration::from_secs(10)).await;
    let log = p.full_log();
    let status = status.unwrap_or_else(|| panic!("still running 10 s (the drain timeout) after SIGTERM:\n{log}"));
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("all in-flight calls finished"), "{log}");
    assert!(!log.contains("drain timeout reached"), "{log}");
    assert_eq!(upstream.count("Search"), 1, "the refused client's call never reached the upstream");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_cuts_a_call_longer_than_the_drain_timeout_and_still_exits_0() {
    let upstream = FakeUpstream::start().await;
    let mut p = sidecar(&upstream, "1s").await;
    let mut client = RawClient::connect(p.listen).await;
    let in_flight = tokio::spawn(async move { client.unary_with("Search", held_search(10_000)).await });
    until_upstream_holds(&upstream, 1).await;

    let signalled = Instant::now();
    p.signal(libc::SIGTERM);
    let status = p.exited_within(Duration::from_secs(5)).await;
    let log = p.full_log();
    let status = status.unwrap_or_else(|| panic!("still running 5 s after SIGTERM with a 1 s drain timeout:\n{log}"));
    assert_eq!(status.code(), Some(0), "{log}");
    let took = signalled.elapsed();
    assert!(took >= Duration::from_secs(1), "exited after {took:?}, before the drain timeout");
    assert!(log.contains("drain timeout reached"), "{log}");
    // Cut, not answered: the upstream would have taken 10 s.
    let cut = in_flight.await.unwrap();
    assert!(cut.is_err(), "the cut call got a reply: {cut:?}");
}

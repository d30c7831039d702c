//! The proxy against a fake upstream: bytes, metadata, statuses, streams, sizes,
//! compression and failures arrive as the other side sent them.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::fake::{FAILURE_DETAILS, FakeUpstream};
use common::{Sidecar, encode, http_get, sample, unused_addr};
use milvus::proto::common::{KeyValuePair, Status as MilvusStatus};
use milvus::proto::milvus::{InsertRequest, MutationResult, SearchRequest, SearchResults, search_request};
use milvus::proto::schema::{FieldData, FloatArray, SearchResultData, VectorField, field_data, vector_field};
use milvus_sidecar::facts::{ReplyDetail, RequestDetail};
use tonic::Code;
use tonic::metadata::{BinaryMetadataValue, MetadataValue};

fn search_request(collection: &str) -> SearchRequest {
    SearchRequest {
        collection_name: collection.into(),
        partition_names: vec!["p1".into()],
        dsl: "age > 3".into(),
        nq: 5,
        search_params: vec![
            KeyValuePair { key: "topk".into(), value: "10".into() },
            KeyValuePair { key: "metric_type".into(), value: "L2".into() },
        ],
        search_input: Some(search_request::SearchInput::PlaceholderGroup(vec![7; 3000])),
        ..Default::default()
    }
}

#[allow(deprecated)] // error_code is deprecated in favour of code, but Milvus still sends both
fn search_results(code: i32, reason: &str) -> SearchResults {
    SearchResults {
        status: Some(MilvusStatus {
            code,
            error_code: if code == 0 { 0 } else { 4 },
            reason: reason.into(),
            ..Default::default()
        }),
        results: Some(SearchResultData {
            num_queries: 5,
            top_k: 10,
            topks: vec![10, 10, 10, 10, 3],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn insert_request(collection: &str, floats: usize) -> InsertRequest {
    let dim = 128;
    InsertRequest {
        collection_name: collection.into(),
        num_rows: (floats / dim) as u32,
        fields_data: vec![FieldData {
            field_name: "vec".into(),
            field: Some(field_data::Field::Vectors(VectorField {
                dim: dim as i64,
                data: Some(vector_field::Data::FloatVector(FloatArray {
                    data: (0..floats).map(|i| i as f32).collect(),
                })),
                ..Default::default()
            })),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn unknown_method_bytes_metadata_and_trailers_arrive_unchanged() {
    let upstream = FakeUpstream::start().await;
    let sidecar = Sidecar::start(upstream.addr).await;
    let mut client = sidecar.raw_client().await;

    let body = Bytes::from_static(b"\x0a\x03abc\x10\x2a any bytes the sidecar has never heard of");
    let mut request = tonic::Request::new(body.clone());
    let md = request.metadata_mut();
    md.insert("authorization", MetadataValue::from_static("cm9vdDpNaWx2dXM="));
    md.insert("dbname", MetadataValue::from_static("analytics"));
    md.insert("client-request-id", MetadataValue::from_static("req-17"));
    md.insert_bin("trace-bin", BinaryMetadataValue::from_bytes(b"\x00\x01\xff"));
    md.insert("sourceid", MetadataValue::from_static("QEBtaWx2dXMtbWVtYmVyQEA="));
    let reply = client.unary_with("SomeMethodFromMilvus9", request).await.expect("forwarded");

    assert_eq!(reply.get_ref(), &body, "reply bytes come back as the upstream sent them");
    assert_eq!(reply.metadata().get("x-upstream-header").unwrap(), "kept");
    let seen = upstream.last("SomeMethodFromMilvus9").expect("upstream saw the call");
    assert_eq!(&seen.body[5..], &body[..], "request message arrives byte for byte");
    assert_eq!(seen.headers["authorization"], "cm9vdDpNaWx2dXM=");
    assert_eq!(seen.headers["dbname"], "analytics");
    assert_eq!(seen.headers["client-request-id"], "req-17");
    assert_eq!(seen.headers["trace-bin"], "AAH/");
    assert!(seen.headers.get("sourceid").is_none(), "the cluster-member header must never pass through");

    let facts = sidecar.captured.wait_for("SomeMethodFromMilvus9").await;
    assert_eq!(facts.database, "analytics");
    assert!(facts.outcome.is_success());
    assert_eq!(facts.method.rpc(), None);
}

#[tokio::test]
async fn inspected_search_is_forwarded_byte_for_byte_and_yields_facts() {
    let upstream = FakeUpstream::start().await;
    let reply = encode(&search_results(0, ""));
    upstream.reply_with("Search", reply.clone());
    let sidecar = Sidecar::start(upstream.addr).await;
    let mut client = sidecar.raw_client().await;

    let request = encode(&search_request("docs"));
    let got = client.unary("Search", request.clone()).await.expect("search forwarded");

    assert_eq!(got.get_ref(), &reply);
    assert_eq!(&upstream.last("Search").unwrap().body[5..], &request[..]);
    let facts = sidecar.captured.wait_for("Search").await;
    assert_eq!(facts.request.collection.as_deref(), Some("docs"));
    assert_eq!(facts.request.partitions, vec!["p1".to_string()]);
    assert_eq!(facts.database, "default");
    let RequestDetail::Search(search) = &facts.request.detail else { panic!("{:?}", facts.request.detail) };
    assert_eq!((search.nq, search.top_k, search.filter.as_str()), (5, Some(10), "age > 3"));
    assert_eq!(facts.reply, ReplyDetail::Search { num_queries: 5, top_k: 10, hits: 43 });
    assert!(facts.outcome.is_success());
    assert_eq!(facts.request_bytes, request.len() as u64 + 5);
    assert_eq!(facts.reply_bytes, reply.len() as u64 + 5);
}

#[tokio::test]
async fn milvus_failure_inside_an_ok_reply_is_passed_on_and_recorded_as_failure() {
    let upstream = FakeUpstream::start().await;
    let reason = "collection not found[database=default][collection=Z]";
    let reply = encode(&search_results(100, reason));
    upstream.reply_with("Search", reply.clone());
    let sidecar = Sidecar::start(upstream.addr).await;

    let got = sidecar.raw_client().await.unary("Search", encode(&search_request("Z"))).await.expect("gRPC OK");

    assert_eq!(got.get_ref(), &reply, "the client sees Milvus's reply as it was");
    let facts = sidecar.captured.wait_for("Search").await;
    assert_eq!(facts.outcome.grpc, Code::Ok);
    assert_eq!(facts.outcome.milvus_code, 100);
    assert_eq!(facts.outcome.message.as_deref(), Some(reason));
    assert!(!facts.outcome.is_success());
}

#[tokio::test]
async fn error_status_message_details_and_metadata_pass_through() {
    let upstream = FakeUpstream::start().await;
    let sidecar = Sidecar::start(upstream.addr).await;

    let status = sidecar.raw_client().await.unary("Fail", Bytes::new()).await.unwrap_err();

    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.message(), "widget 42 not found");
    assert_eq!(status.details(), FAILURE_DETAILS);
    assert_eq!(status.metadata().get("x-upstream-header").unwrap(), "kept");
    let facts = sidecar.captured.wait_for("Fail").await;
    assert_eq!(facts.outcome.grpc, Code::NotFound);
    assert_eq!(facts.outcome.message.as_deref(), Some("widget 42 not found"));
}

#[tokio::test]
async fn large_messages_arrive_byte_for_byte_inspected_or_not() {
    let upstream = FakeUpstream::start().await;
    upstream.reply_with("Insert", encode(&MutationResult { insert_cnt: 131_072, ..Default::default() }));
    let sidecar = Sidecar::start(upstream.addr).await;
    let mut client = sidecar.raw_client().await;

    // Just under the default 256 MiB limit: an insert the sidecar reads whole.
    let floats = (256 << 20) / 4 - 4096;
    let insert = encode(&insert_request("big", floats));
    assert!(insert.len() > 255 << 20 && insert.len() <= 256 << 20, "{} bytes", insert.len());
    client.unary("Insert", insert.clone()).await.expect("large insert forwarded");
    assert!(upstream.last("Insert").unwrap().body[5..] == insert[..], "insert arrives byte for byte");
    let facts = sidecar.captured.wait_for("Insert").await;
    assert_eq!(facts.request.detail, RequestDetail::Insert { rows: (floats / 128) as u64 });
    assert_eq!(facts.reply, ReplyDetail::Mutation { inserted: 131_072, deleted: 0, upserted: 0 });

    // 64 MiB through a method that streams through undecoded, echoed back.
    let raw = insert.slice(..64 << 20);
    let echoed = client.unary("Echo", raw.clone()).await.expect("large raw call forwarded");
    assert!(echoed.get_ref()[..] == raw[..], "echo arrives byte for byte both ways");
}

#[tokio::test]
async fn over_limit_inspected_message_is_refused_before_it_is_buffered() {
    let upstream = FakeUpstream::start().await;
    let sidecar = Sidecar::start_with(upstream.addr, |c| c.max_message_bytes = 1 << 20).await;

    let status = sidecar.raw_client().await.unary("Insert", encode(&insert_request("c", 1 << 19))).await.unwrap_err();

    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("limit of 1048576 bytes"), "{}", status.message());
    assert_eq!(upstream.count("Insert"), 0, "never forwarded");
    assert_eq!(sidecar.captured.wait_for("Insert").await.outcome.grpc, Code::ResourceExhausted);
}

#[tokio::test]
async fn gzip_compressed_calls_are_read_and_forwarded_compressed() {
    let upstream = FakeUpstream::start().await;
    let reply = encode(&search_results(0, ""));
    upstream.reply_with("Search", reply.clone());
    let sidecar = Sidecar::start(upstream.addr).await;
    let mut client = sidecar.raw_client().await;
    client.grpc = client
        .grpc
        .send_compressed(tonic::codec::CompressionEncoding::Gzip)
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip);

    let got = client.unary("Search", encode(&search_request("zipped"))).await.expect("compressed call");

    assert_eq!(got.get_ref(), &reply);
    let seen = upstream.last("Search").unwrap();
    assert_eq!(seen.headers["grpc-encoding"], "gzip");
    assert_eq!(seen.body[0], 1, "the message stays compressed on its way upstream");
    let facts = sidecar.captured.wait_for("Search").await;
    assert_eq!(facts.request.collection.as_deref(), Some("zipped"));
}

#[tokio::test]
async fn malformed_inspected_request_is_refused_not_forwarded() {
    let upstream = FakeUpstream::start().await;
    let sidecar = Sidecar::start(upstream.addr).await;

    // Field 3 (collection_name, a string) sent as a varint.
    let status =
        sidecar.raw_client().await.unary("DropCollection", Bytes::from_static(&[0x18, 0x01])).await.unwrap_err();

    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("not a valid milvus.proto.milvus.DropCollectionRequest"), "{}", status.message());
    assert_eq!(upstream.count("DropCollection"), 0);
}

#[tokio::test]
async fn server_streaming_dump_messages_arrives_in_order() {
    let upstream = FakeUpstream::start().await;
    let sidecar = Sidecar::start(upstream.addr).await;
    let mut client = sidecar.raw_client().await;
    client.grpc.ready().await.unwrap();

    let reply = client
        .grpc
        .server_streaming(
            tonic::Request::new(Bytes::from_static(b"from the start")),
            common::path("DumpMessages"),
            common::RawCodec,
        )
        .await
        .expect("stream opened");
    let mut stream = reply.into_inner();
    let mut got = Vec::new();
    while let Some(msg) = stream.message().await.expect("stream item") {
        got.push(msg);
    }
    assert_eq!(got, vec![Bytes::from("message 1"), Bytes::from("message 2"), Bytes::from("message 3")]);
    assert_eq!(stream.trailers().await.unwrap().unwrap().get("x-upstream-trailer").unwrap(), "kept");
}

#[tokio::test]
async fn bidirectional_replicate_stream_is_full_duplex() {
    let upstream = FakeUpstream::start().await;
    let sidecar = Sidecar::start(upstream.addr).await;
    let mut client = sidecar.raw_client().await;
    client.grpc.ready().await.unwrap();

    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let outbound = tokio_stream::wrappers::ReceiverStream::new(rx);
    tx.send(Bytes::from("ping 1")).await.unwrap();
    let reply = client
        .grpc
        .streaming(tonic::Request::new(outbound), common::path("CreateReplicateStream"), common::RawCodec)
        .await
        .expect("stream opened");
    let mut inbound = reply.into_inner();
    // Each echo arrives before the next message is sent: the call is not buffered whole.
    for i in 1..=3 {
        let echoed = tokio::time::timeout(Duration::from_secs(5), inbound.message()).await.expect("echo in time");
        assert_eq!(echoed.unwrap().unwrap(), Bytes::from(format!("ping {i}")));
        if i < 3 {
            tx.send(Bytes::from(format!("ping {}", i + 1))).await.unwrap();
        }
    }
    drop(tx);
    assert!(inbound.message().await.unwrap().is_none(), "stream ends after the client half-closes");
}

#[tokio::test]
async fn upstream_down_is_unavailable_naming_it_and_the_sidecar_reconnects() {
    let addr = unused_addr();
    let sidecar = Sidecar::start(addr).await;
    let mut client = sidecar.raw_client().await;

    let status = client.unary("GetVersion", Bytes::new()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains(&format!("upstream Milvus at http://{addr}")), "{}", status.message());
    assert_eq!(sidecar.captured.wait_for("GetVersion").await.outcome.grpc, Code::Unavailable);

    let _upstream = FakeUpstream::start_on(addr).await;
    let reply = client.unary("GetVersion", Bytes::from_static(b"again")).await.expect("works once Milvus is back");
    assert_eq!(reply.into_inner(), Bytes::from_static(b"again"));
}

#[tokio::test]
async fn slow_upstream_is_deadline_exceeded_naming_it() {
    let upstream = FakeUpstream::start().await;
    let sidecar = Sidecar::start_with(upstream.addr, |c| c.upstream_timeout = Some(Duration::from_millis(300))).await;
    let mut client = sidecar.raw_client().await;

    let status = client.unary("Slow", Bytes::new()).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert!(status.message().contains(&format!("upstream Milvus at http://{}", upstream.addr)), "{}", status.message());

    // The client's own deadline (grpc-timeout) is honoured as well. A gRPC library would
    // enforce it too and race the sidecar, so this call is made over bare HTTP/2.
    let no_timeout = Sidecar::start(upstream.addr).await;
    let reply = common::bare_call(no_timeout.addr(), "Slow", &[("grpc-timeout", "200m")], Bytes::new()).await;
    assert_eq!(reply["grpc-status"], "4", "DEADLINE_EXCEEDED: {reply:?}");
    // ...and the sidecar still serves.
    client.unary("Echo", Bytes::from_static(b"alive")).await.expect("still serving");
}

#[tokio::test]
async fn reply_broken_off_midway_ends_with_unavailable() {
    let upstream = FakeUpstream::start().await;
    let sidecar = Sidecar::start(upstream.addr).await;

    let status = sidecar.raw_client().await.unary("BreakOff", Bytes::new()).await.unwrap_err();

    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("broke off the reply"), "{}", status.message());
    assert_eq!(sidecar.captured.wait_for("BreakOff").await.outcome.grpc, Code::Unavailable);
}

#[tokio::test]
async fn shutdown_drains_in_flight_calls_then_refuses_new_ones() {
    let upstream = FakeUpstream::start().await;
    let sidecar = Sidecar::start(upstream.addr).await;
    let addr = sidecar.addr();
    let mut client = sidecar.raw_client().await;

    let in_flight = tokio::spawn(async move { client.unary("Slow", Bytes::from_static(b"finish me")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    sidecar.running.shutdown().await;

    let reply = in_flight.await.unwrap().expect("the in-flight call completes during the drain");
    assert_eq!(reply.into_inner(), Bytes::from_static(b"finish me"));
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "no longer accepting");
}

#[tokio::test]
async fn readyz_follows_the_upstream() {
    let addr = unused_addr();
    let sidecar = Sidecar::start(addr).await;
    let admin = sidecar.running.admin_addr;

    let (code, text) = http_get(admin, "/healthz").await;
    assert_eq!((code, text.as_str()), (200, "ok\n"));
    let (code, text) = http_get(admin, "/readyz").await;
    assert_eq!(code, 503);
    assert!(text.contains(&addr.to_string()), "{text}");

    let _upstream = FakeUpstream::start_on(addr).await;
    let (code, _) = http_get(admin, "/readyz").await;
    assert_eq!(code, 200);
}

/// The standard health service on the client port, as a load balancer or Kubernetes' `grpc`
/// probe asks it (tonic-health's client): the sidecar answers it itself, with /readyz's
/// verdict.
#[tokio::test]
async fn the_grpc_health_check_follows_the_upstream() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;

    let addr = unused_addr();
    let sidecar = Sidecar::start(addr).await;
    let mut health = common::health_client(sidecar.addr()).await;
    let check = |service: &str| HealthCheckRequest { service: service.into() };

    let reply = health.check(check("")).await.expect("answered while Milvus is away");
    assert_eq!(reply.into_inner().status(), ServingStatus::NotServing);

    let upstream = FakeUpstream::start_on(addr).await;
    // A probe's answer is reused for a second; within a few the check turns.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut serving_polls = 0;
    loop {
        serving_polls += 1;
        let status = health.check(check("")).await.unwrap().into_inner().status();
        if status == ServingStatus::Serving {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still {status:?} 5 s after Milvus came up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reply = health.check(check("milvus.proto.milvus.MilvusService")).await.unwrap();
    assert_eq!(reply.into_inner().status(), ServingStatus::Serving);

    let unknown = health.check(check("some.other.Service")).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    assert!(unknown.message().contains("some.other.Service"), "{unknown:?}");
    let watch = health.watch(check("")).await.unwrap_err();
    assert_eq!(watch.code(), Code::Unimplemented, "clients then treat the server as healthy: {watch:?}");

    // Checks arriving together share a probe: they cannot turn into a flood of calls to Milvus.
    let probes_before = upstream.count("GetVersion");
    let burst = (0..50).map(|_| {
        let mut health = health.clone();
        async move { health.check(check("")).await.map(|r| r.into_inner().status()) }
    });
    for status in futures::future::join_all(burst).await {
        assert_eq!(status.unwrap(), ServingStatus::Serving);
    }
    let probes = upstream.count("GetVersion") - probes_before;
    assert!(probes <= 2, "50 checks made {probes} probes of Milvus");
    assert_eq!(upstream.count("Check") + upstream.count("Watch"), 0, "health checks are not forwarded");
    assert_eq!(sidecar.captured.count("Check"), 0, "nor recorded");

    // Counted by answer, apart from calls.
    let (_, scrape) = http_get(sidecar.running.admin_addr, "/metrics").await;
    let answered =
        |answer: &str| sample(&scrape, &format!("milvus_sidecar_health_checks_total{{answer=\"{answer}\"}}"));
    assert_eq!(answered("not_serving") + answered("serving"), 2.0 + serving_polls as f64 + 50.0, "{scrape}");
    assert!(answered("not_serving") >= 1.0, "{scrape}");
    assert_eq!(answered("refused"), 2.0, "the unknown service and Watch");
    assert!(!scrape.contains("method=\"Check\""), "{scrape}");
}

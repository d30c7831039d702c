//! `--durable-records`: a call ends for its client only once its records are durable, so
//! the rows (or the spill file's lines) are there the moment a call returns, with no wait.
//! Replies pass unchanged; only the moment their status is sent moves.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::fake::{FAILURE_DETAILS, FakeUpstream};
use common::pg::TestDb;
use common::relay::Relay;
use common::{RawClient, encode};
use milvus::proto::common::{KeyValuePair, Status as MilvusStatus};
use milvus::proto::milvus::{SearchRequest, SearchResults};
use milvus::proto::schema::SearchResultData;
use milvus_sidecar::App;
use tonic::metadata::MetadataValue;

struct Spill(std::path::PathBuf);

impl Spill {
    fn new() -> Spill {
        Spill(std::env::temp_dir().join(format!("sidecar-durable-{}", uuid::Uuid::now_v7())))
    }

    fn lines(&self) -> usize {
        std::fs::read_to_string(self.0.join("records.jsonl")).map_or(0, |s| s.lines().count())
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn start(upstream: std::net::SocketAddr, database_url: String, auth: bool) -> (App, Spill) {
    let spill = Spill::new();
    let mut config = common::recording_config(upstream, &database_url, &spill.0);
    config.recording.durable_records = true;
    config.auth.no_auth = !auth;
    config.drain_timeout = Duration::from_secs(5);
    (App::start(config).await.expect("sidecar with durable records starts"), spill)
}

fn search() -> Bytes {
    encode(&SearchRequest {
        collection_name: "c".into(),
        nq: 1,
        search_params: vec![KeyValuePair { key: "topk".into(), value: "3".into() }],
        ..Default::default()
    })
}

async fn fake_milvus() -> FakeUpstream {
    let upstream = FakeUpstream::start().await;
    upstream.reply_with(
        "Search",
        encode(&SearchResults {
            status: Some(MilvusStatus::default()),
            results: Some(SearchResultData { num_queries: 1, top_k: 3, topks: vec![3], ..Default::default() }),
            ..Default::default()
        }),
    );
    upstream
}

#[tokio::test]
async fn a_call_returns_only_once_its_rows_are_committed() {
    let db = TestDb::create().await;
    let upstream = fake_milvus().await;
    let (app, _spill) = start(upstream.addr, db.url(), false).await;
    let mut client = RawClient::connect(app.running.listen_addr).await;
    let perf = "SELECT count(*) FROM performance_metrics";

    let reply = client.unary("Search", search()).await.expect("search");
    assert!(!reply.get_ref().is_empty(), "the reply's message still arrives");
    assert_eq!(db.count(perf).await, 1, "committed before the client saw the call end");
    assert_eq!(db.count("SELECT count(*) FROM query_logs").await, 1);

    // A trailers-only reply from Milvus: its status is sent after the rows, unchanged.
    let status = client.unary("Fail", Bytes::new()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert_eq!(status.message(), "widget 42 not found");
    assert_eq!(status.details(), FAILURE_DETAILS);
    assert_eq!(db.count(perf).await, 2);

    // A reply Milvus broke off: the sidecar's UNAVAILABLE waits for its rows as well.
    let status = client.unary("BreakOff", Bytes::new()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(db.count(perf).await, 3);

    // Concurrent calls share commits (group commit) and each still finds its row.
    let addr = app.running.listen_addr;
    let callers: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(async move {
                let mut client = RawClient::connect(addr).await;
                for _ in 0..25 {
                    client.unary("Search", search()).await.expect("search");
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.unwrap();
    }
    assert_eq!(db.count(perf).await, 203);
    let stats = &app.recording.as_ref().unwrap().stats;
    let batches = stats.batches_written.load(std::sync::atomic::Ordering::Relaxed);
    assert!(batches < 203, "some commits covered several calls: {batches} batches for 203 calls");
    app.shutdown().await;
}

#[tokio::test]
async fn a_refusal_is_sent_only_once_its_audit_row_is_committed() {
    let db = TestDb::create().await;
    let upstream = fake_milvus().await;
    let (app, _spill) = start(upstream.addr, db.url(), true).await;
    let mut client = RawClient::connect(app.running.listen_addr).await;

    let mut request = tonic::Request::new(search());
    // base64("nobody:wrong")
    request.metadata_mut().insert("authorization", MetadataValue::from_static("bm9ib2R5Ondyb25n"));
    let status = client.unary_with("Search", request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert_eq!(status.message(), "auth check failure, please check username and password are correct");
    assert_eq!(db.count("SELECT count(*) FROM audit_logs WHERE grpc_code = 16").await, 1);
    assert_eq!(upstream.count("Search"), 0, "never forwarded");
    app.shutdown().await;
}

#[tokio::test]
async fn with_postgres_away_a_call_returns_once_its_records_are_in_the_spill_file() {
    let db = TestDb::create().await;
    let relay = Relay::start(db.server()).await;
    let upstream = fake_milvus().await;
    let (app, spill) = start(upstream.addr, db.url_via(Some(&relay.addr.to_string())), false).await;
    let mut client = RawClient::connect(app.running.listen_addr).await;

    relay.cut();
    for n in 1..=20 {
        client.unary("Search", search()).await.expect("calls keep flowing while PostgreSQL is away");
        assert_eq!(spill.lines(), n, "on disk before the client saw the call end");
    }
    relay.restore();
    assert_eq!(db.wait_for_count("SELECT count(*) FROM performance_metrics", 20).await, 20, "replayed");
    client.unary("Search", search()).await.unwrap();
    assert_eq!(db.count("SELECT count(*) FROM performance_metrics").await, 21);
    app.shutdown().await;
    assert_eq!(spill.lines(), 0, "the spill file is gone once replayed");
}

//! Recording in a real PostgreSQL: every call leaves its rows, settings apply while
//! running, an outage loses and duplicates nothing, migrations and partitions behave.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::fake::FakeUpstream;
use common::pg::TestDb;
use common::relay::Relay;
use common::{RawClient, encode, http_get};
use milvus::proto::common::{KeyValuePair, Status as MilvusStatus};
use milvus::proto::milvus::{
    CreateCollectionRequest, ImportRequest, ImportResponse, InsertRequest, MutationResult, SearchRequest, SearchResults,
};
use milvus::proto::schema::{CollectionSchema, DataType, FieldSchema, SearchResultData};
use milvus_sidecar::App;
use milvus_sidecar::config::{Config, DatabaseArgs};
use milvus_sidecar::store::maintenance::Maintained;
use tonic::metadata::MetadataValue;

async fn start_app(upstream: std::net::SocketAddr, database_url: String) -> (App, tempdir::Dir) {
    start_app_with(upstream, database_url, |_| {}).await
}

/// [`start_app`], with the configuration changed by `tweak` first.
async fn start_app_with(
    upstream: std::net::SocketAddr,
    database_url: String,
    tweak: impl FnOnce(&mut Config),
) -> (App, tempdir::Dir) {
    let spill = tempdir::Dir::new();
    let mut config = common::recording_config(upstream, &database_url, &spill.path);
    config.drain_timeout = Duration::from_secs(5);
    tweak(&mut config);
    (App::start(config).await.expect("sidecar with recording starts"), spill)
}

/// The first column of every row `sql` returns, as text.
async fn texts(c: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    c.query(sql, &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
}

/// A tiny temporary directory, removed on drop.
mod tempdir {
    pub struct Dir {
        pub path: std::path::PathBuf,
    }
    impl Dir {
        pub fn new() -> Dir {
            let path = std::env::temp_dir().join(format!("sidecar-spill-{}", uuid::Uuid::now_v7()));
            Dir { path }
        }
        pub fn spilled_lines(&self) -> usize {
            std::fs::read_to_string(self.path.join("records.jsonl")).map_or(0, |s| s.lines().count())
        }
        /// The spilled lines once there are `n`, else as many as there are after `within`.
        pub async fn wait_for_spilled(&self, n: usize, within: std::time::Duration) -> usize {
            let deadline = std::time::Instant::now() + within;
            while self.spilled_lines() < n && std::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            self.spilled_lines()
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn search(collection: &str) -> Bytes {
    encode(&SearchRequest {
        collection_name: collection.into(),
        nq: 2,
        search_params: vec![KeyValuePair { key: "topk".into(), value: "3".into() }],
        ..Default::default()
    })
}

fn as_alice(body: Bytes) -> tonic::Request<Bytes> {
    let mut request = tonic::Request::new(body);
    // base64("alice:pw")
    request.metadata_mut().insert("authorization", MetadataValue::from_static("YWxpY2U6cHc="));
    request
}

/// A fake Milvus that answers Search, Insert and CreateCollection with valid replies.
async fn fake_milvus() -> FakeUpstream {
    {
        let upstream = FakeUpstream::start().await;
        let ok = MilvusStatus::default();
        upstream.reply_with(
            "Search",
            encode(&SearchResults {
                status: Some(ok.clone()),
                results: Some(SearchResultData { num_queries: 2, top_k: 3, topks: vec![3, 2], ..Default::default() }),
                ..Default::default()
            }),
        );
        upstream.reply_with(
            "Insert",
            encode(&MutationResult { status: Some(ok.clone()), insert_cnt: 10, ..Default::default() }),
        );
        upstream.reply_with("CreateCollection", encode(&ok));
        upstream
    }
}

/// Waits for `n` performance rows (every call's, spilled ones replayed), with none dropped,
/// then stops the app and checks that the rows stayed `n`: each record arrived exactly once.
async fn each_record_arrives_once(db: &TestDb, app: App, n: i64) {
    assert_eq!(db.wait_for_count("SELECT count(*) FROM performance_metrics", n).await, n, "all arrive");
    let stats = &app.recording.as_ref().unwrap().stats;
    assert_eq!(stats.records_dropped.load(std::sync::atomic::Ordering::Relaxed), 0);
    app.shutdown().await;
    assert_eq!(db.count("SELECT count(*) FROM performance_metrics").await, n, "none twice");
}

#[tokio::test]
async fn every_call_leaves_its_rows_and_the_mirror_follows() {
    let db = TestDb::create().await;
    let upstream = fake_milvus().await;
    let (app, _spill) = start_app(upstream.addr, db.url()).await;
    let mut client = RawClient::connect(app.running.listen_addr).await;

    let schema = CollectionSchema {
        name: "docs".into(),
        fields: vec![
            FieldSchema {
                name: "id".into(),
                is_primary_key: true,
                data_type: DataType::Int64 as i32,
                ..Default::default()
            },
            FieldSchema {
                name: "vec".into(),
                data_type: DataType::FloatVector as i32,
                type_params: vec![KeyValuePair { key: "dim".into(), value: "16".into() }],
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let create = CreateCollectionRequest {
        collection_name: "docs".into(),
        schema: prost013::Message::encode_to_vec(&schema),
        shards_num: 1,
        ..Default::default()
    };
    client.unary_with("CreateCollection", as_alice(encode(&create))).await.unwrap();
    client.unary_with("Search", as_alice(search("docs"))).await.unwrap();
    let insert = InsertRequest { collection_name: "docs".into(), num_rows: 10, ..Default::default() };
    client.unary_with("Insert", as_alice(encode(&insert))).await.unwrap();
    client.unary("GetVersion", Bytes::new()).await.unwrap();
    // Shutdown writes whatever is still queued.
    app.shutdown().await;

    assert_eq!(db.count("SELECT count(*) FROM performance_metrics").await, 4, "one performance row per call");
    let c = db.client().await;
    let row = c
        .query_one(
            "SELECT q.query_type, q.nq, q.top_k, q.result_count, q.username, q.query_vector_dimension, q.success
             FROM query_logs q JOIN collections c ON c.id = q.collection_id WHERE c.collection_name = 'docs'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "search");
    assert_eq!((row.get::<_, Option<i32>>(1), row.get::<_, Option<i32>>(2)), (Some(2), Some(3)));
    assert_eq!(row.get::<_, Option<i64>>(3), Some(5), "hits over both queries");
    assert_eq!(row.get::<_, Option<String>>(4).as_deref(), Some("alice"));
    assert_eq!(row.get::<_, Option<i32>>(5), Some(16), "dimension from the mirrored schema");
    assert!(row.get::<_, bool>(6));
    let row =
        c.query_one("SELECT operation, rows_sent, rows_acknowledged, bytes FROM ingestion_logs", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "insert");
    assert_eq!((row.get::<_, Option<i64>>(1), row.get::<_, Option<i64>>(2)), (Some(10), Some(10)));
    assert!(row.get::<_, Option<i64>>(3).unwrap() > 0);
    let actions = texts(&c, "SELECT action FROM audit_logs ORDER BY occurred_at").await;
    assert_eq!(actions, vec!["create_collection", "insert"], "state changes are audited, reads are not");
    // The jsonb columns, compared as jsonb (key order and spacing aside).
    for (sql, want) in [
        (
            "SELECT metadata FROM performance_metrics WHERE operation_type = 'search'",
            r#"{"nq": 2, "top_k": 3, "result_count": 5}"#,
        ),
        (
            "SELECT metadata FROM performance_metrics WHERE operation_type = 'insert'",
            r#"{"rows": 10, "acknowledged": 10}"#,
        ),
        ("SELECT metadata FROM performance_metrics WHERE operation_type = 'get_version'", "{}"),
        ("SELECT search_params FROM query_logs", r#"{"topk": "3"}"#),
        ("SELECT details FROM audit_logs WHERE action = 'insert'", r#"{"method": "Insert", "rows": 10}"#),
    ] {
        let same: bool = c.query_one(&format!("SELECT ({sql}) = $1::text::jsonb"), &[&want]).await.unwrap().get(0);
        let got: String = c.query_one(&format!("SELECT ({sql})::text"), &[]).await.unwrap().get(0);
        assert!(same, "{sql}: {got}, expected {want}");
    }
    let row = c
        .query_one("SELECT dimension, fields->1->>'data_type', shards_num, status FROM collections WHERE collection_name = 'docs'", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<i32>>(0), Some(16));
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("FloatVector"));
    assert_eq!(row.get::<_, Option<i32>>(2), Some(1));
    assert_eq!(row.get::<_, String>(3), "active");
    let stats = c
        .query_one("SELECT total_queries, successful_queries FROM collection_stats WHERE collection_name = 'docs'", &[])
        .await
        .unwrap();
    assert_eq!((stats.get::<_, i64>(0), stats.get::<_, i64>(1)), (1, 1));
}

#[tokio::test]
async fn a_postgres_outage_loses_nothing_and_duplicates_nothing() {
    let db = TestDb::create().await;
    let relay = Relay::start(db.server()).await;
    let upstream = fake_milvus().await;
    let (app, spill) = start_app(upstream.addr, db.url_via(Some(&relay.addr.to_string()))).await;
    let mut client = RawClient::connect(app.running.listen_addr).await;

    for _ in 0..20 {
        client.unary("Search", search("c")).await.expect("before the outage");
    }
    assert_eq!(db.wait_for_count("SELECT count(*) FROM performance_metrics", 20).await, 20);

    relay.cut();
    for _ in 0..150 {
        client.unary("Search", search("c")).await.expect("calls keep flowing while PostgreSQL is away");
    }
    // The writer finds PostgreSQL gone and keeps the records on disk.
    let spilled = spill.wait_for_spilled(150, Duration::from_secs(15)).await;
    assert_eq!(spilled, 150, "every record made during the outage is on disk");
    assert_eq!(db.count("SELECT count(*) FROM performance_metrics").await, 20);

    relay.restore();
    for _ in 0..30 {
        client.unary("Search", search("c")).await.unwrap();
    }
    assert_eq!(db.wait_for_count("SELECT count(*) FROM performance_metrics", 200).await, 200, "all arrive");
    assert_eq!(db.wait_for_count("SELECT count(*) FROM query_logs", 200).await, 200);
    let stats = &app.recording.as_ref().unwrap().stats;
    assert_eq!(stats.records_dropped.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert!(stats.records_replayed.load(std::sync::atomic::Ordering::Relaxed) >= 150);
    app.shutdown().await;
    assert_eq!(db.count("SELECT count(*) FROM performance_metrics").await, 200, "none twice");
    assert_eq!(spill.spilled_lines(), 0, "the spill file is gone once replayed");
}

/// A PostgreSQL that stops answering without closing the connection (a network gone away
/// without a reset) must not hold the writer: the pool hands out connections untested, so
/// the writer bounds its BEGIN, and the records go to disk until PostgreSQL is back.
#[tokio::test]
async fn a_postgres_that_stops_answering_sends_records_to_disk_and_all_arrive() {
    let db = TestDb::create().await;
    let relay = Relay::start(db.server()).await;
    let upstream = fake_milvus().await;
    let (app, spill) = start_app(upstream.addr, db.url_via(Some(&relay.addr.to_string()))).await;
    let mut client = RawClient::connect(app.running.listen_addr).await;
    for _ in 0..10 {
        client.unary("Search", search("c")).await.unwrap();
    }
    assert_eq!(db.wait_for_count("SELECT count(*) FROM performance_metrics", 10).await, 10);

    relay.stall();
    for _ in 0..50 {
        client.unary("Search", search("c")).await.expect("calls keep flowing while PostgreSQL is silent");
    }
    let spilled = spill.wait_for_spilled(50, Duration::from_secs(20)).await;
    assert_eq!(spilled, 50, "every record made while PostgreSQL was silent is on disk");

    relay.restore();
    for _ in 0..10 {
        client.unary("Search", search("c")).await.unwrap();
    }
    each_record_arrives_once(&db, app, 70).await;
}

/// PostgreSQL, or the network to it, going silent in the middle of a batch, after its BEGIN:
/// no statement_timeout can end that wait. The writer gives the batch up after
/// --write-timeout and a little more, keeps it on disk, closes that connection rather than
/// pooling it again, and goes on; every record arrives once.
#[tokio::test]
async fn a_postgres_silent_mid_batch_is_given_up_on_and_its_records_arrive_once() {
    let db = TestDb::create().await;
    let relay = Relay::start(db.server()).await;
    let upstream = fake_milvus().await;
    let (app, spill) = start_app_with(upstream.addr, db.url_via(Some(&relay.addr.to_string())), |c| {
        c.recording.write_timeout = Duration::from_millis(500);
    })
    .await;
    let mut client = RawClient::connect(app.running.listen_addr).await;
    for _ in 0..5 {
        client.unary("Search", search("c")).await.unwrap();
    }
    assert_eq!(db.wait_for_count("SELECT count(*) FROM performance_metrics", 5).await, 5);

    // The next batch's COPYs never reach PostgreSQL, nor does anything after them.
    relay.stall_at(b"FROM STDIN");
    for _ in 0..10 {
        client.unary("Search", search("c")).await.expect("calls keep flowing while PostgreSQL is silent");
    }
    let spilled = spill.wait_for_spilled(10, Duration::from_secs(20)).await;
    assert_eq!(spilled, 10, "the batch PostgreSQL went silent in is on disk");
    assert!(
        relay.wait_for_stalled_close(Duration::from_secs(5)).await,
        "the writer closed the connection it gave up on"
    );

    for _ in 0..10 {
        client.unary("Search", search("c")).await.unwrap();
    }
    each_record_arrives_once(&db, app, 25).await;
}

/// The writer's pool hands out connections untested (a test query would be a round trip in
/// every batch): one PostgreSQL closed while idle must be replaced before a batch fails on it.
#[tokio::test]
async fn writer_connections_closed_while_idle_are_replaced_without_spilling() {
    let db = TestDb::create().await;
    let upstream = fake_milvus().await;
    let (app, spill) = start_app(upstream.addr, db.url()).await;
    let mut client = RawClient::connect(app.running.listen_addr).await;
    for _ in 0..5 {
        client.unary("Search", search("c")).await.unwrap();
    }
    assert_eq!(db.wait_for_count("SELECT count(*) FROM performance_metrics", 5).await, 5);

    // As a restart of PostgreSQL would, between two batches.
    let admin = db.client().await;
    let closed: i64 = admin
        .query_one(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'milvus-sidecar'
               AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(closed >= 1, "the writer's connection was closed");
    tokio::time::sleep(Duration::from_millis(200)).await;

    for _ in 0..5 {
        client.unary("Search", search("c")).await.unwrap();
    }
    assert_eq!(db.wait_for_count("SELECT count(*) FROM performance_metrics", 10).await, 10);
    let stats = &app.recording.as_ref().unwrap().stats;
    assert_eq!(stats.records_spilled.load(std::sync::atomic::Ordering::Relaxed), 0, "no batch failed");
    assert_eq!(spill.spilled_lines(), 0);
    app.shutdown().await;
}

#[tokio::test]
async fn system_config_changes_apply_without_a_restart() {
    let db = TestDb::create().await;
    let upstream = fake_milvus().await;
    let (app, _spill) = start_app(upstream.addr, db.url()).await;
    let mut client = RawClient::connect(app.running.listen_addr).await;
    let admin = db.client().await;

    admin
        .batch_execute(
            "UPDATE system_config SET config_value = 'false' WHERE config_key = 'enable_performance_monitoring';
             UPDATE system_config SET config_value = '0.3' WHERE config_key = 'max_query_timeout';",
        )
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while app.settings.performance() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!app.settings.performance(), "NOTIFY reached the running sidecar");
    assert_eq!(app.settings.max_query_timeout(), Some(Duration::from_millis(300)));

    let mut slow = tonic::Request::new(search("c"));
    slow.metadata_mut().insert("x-fake-delay-ms", MetadataValue::from_static("2000"));
    let status = client.unary_with("Search", slow).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
    assert!(status.message().contains("max_query_timeout"), "{}", status.message());
    let sent_upstream = upstream.last("Search").unwrap();
    assert_eq!(sent_upstream.headers["grpc-timeout"], "300m", "Milvus is told the capped deadline too");

    client
        .unary("Insert", encode(&InsertRequest { collection_name: "c".into(), num_rows: 10, ..Default::default() }))
        .await
        .unwrap();
    app.shutdown().await;
    assert_eq!(db.count("SELECT count(*) FROM performance_metrics").await, 0, "performance rows switched off");
    assert_eq!(db.count("SELECT count(*) FROM query_logs").await, 1, "the timed-out search is still a query row");
    assert_eq!(db.count("SELECT count(*) FROM ingestion_logs").await, 1);
}

/// A client that gives up on a call while Milvus works on it: the call is still recorded,
/// as cancelled, and no longer counted in flight.
#[tokio::test]
async fn a_call_the_client_cancels_is_recorded_as_cancelled() {
    let db = TestDb::create().await;
    let upstream = fake_milvus().await;
    let (app, _spill) = start_app(upstream.addr, db.url()).await;
    let mut client = RawClient::connect(app.running.listen_addr).await;

    let mut slow = tonic::Request::new(search("c"));
    slow.metadata_mut().insert("x-fake-delay-ms", MetadataValue::from_static("3000"));
    // Dropping the call's future resets its stream, as a cancelled gRPC call does.
    let gave_up = tokio::time::timeout(Duration::from_millis(500), client.unary_with("Search", slow)).await;
    assert!(gave_up.is_err(), "the call ended before the client gave up: {gave_up:?}");
    assert_eq!(upstream.count("Search"), 1, "the call had reached Milvus");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while app.calls_in_flight.get() != 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(app.calls_in_flight.get(), 0, "the cancelled call is no longer in flight");
    app.shutdown().await;

    let c = db.client().await;
    let row = c.query_one("SELECT success, error_message FROM query_logs", &[]).await.unwrap();
    assert!(!row.get::<_, bool>(0));
    let message: Option<String> = row.get(1);
    assert!(message.as_deref().is_some_and(|m| m.contains("cancelled")), "{message:?}");
    assert_eq!(db.count("SELECT count(*) FROM performance_metrics").await, 1);
}

#[tokio::test]
async fn migrations_apply_once_and_partitions_follow_retention() {
    let db = TestDb::create().await;
    let config = DatabaseArgs::from_url(&db.url()).pg_config().unwrap();
    let mut client = db.client().await;
    let first = milvus_sidecar::store::migrate::run(&mut client).await.unwrap();
    assert_eq!(
        first,
        [
            "V1__schema",
            "V2__log_tables_without_foreign_keys",
            "V3__log_partitions_take_over_default_rows",
            "V4__log_time_indexes_ascending",
            "V5__log_keys_lead_with_time"
        ]
    );
    assert!(milvus_sidecar::store::migrate::run(&mut client).await.unwrap().is_empty(), "re-running is a no-op");
    let keys = texts(&db.client().await, "SELECT config_key FROM system_config ORDER BY config_key").await;
    // The seed's six, the switch that extends the audit to every call, and who may create.
    assert_eq!(
        keys,
        [
            "audit_all_calls",
            "data_retention_days",
            "default_top_k",
            "enable_audit_logging",
            "enable_performance_monitoring",
            "max_query_timeout",
            "milvus_api_endpoint",
            "users_may_create_collections"
        ]
    );

    let c = db.client().await;
    c.batch_execute("SELECT ensure_log_partitions(current_date - 120, 0)").await.unwrap();
    let old = "SELECT count(*) FROM pg_class WHERE relname = 'audit_logs_p' || to_char(current_date - 120, 'YYYYMMDD')";
    assert_eq!(db.count(old).await, 1);
    let pool = milvus_sidecar::store::pool(config, 1, milvus_sidecar::store::CheckOut::Tested);
    let done = milvus_sidecar::store::maintenance::run_once(&pool, 90).await.unwrap();
    assert_eq!(done.dropped, 4, "one expired day in each of the four log tables");
    assert_eq!(db.count(old).await, 0);
    assert_eq!((done.created, done.failed), (0, 0), "the migration already created the days ahead");
    let ahead = "SELECT count(*) FROM pg_class WHERE relname = 'query_logs_p' || to_char(current_date + 7, 'YYYYMMDD')";
    assert_eq!(db.count(ahead).await, 1, "a week of partitions ahead");
}

#[tokio::test]
async fn when_postgres_falls_behind_records_go_to_disk_and_all_arrive() {
    let db = TestDb::create().await;
    let upstream = fake_milvus().await;
    // A small queue, one-record transactions, and a PostgreSQL that takes 2 ms per row
    // COPYed in (at most 500 calls a second; replays of the spill file, by INSERT, are
    // not slowed): it cannot keep up with 16 callers, however fast the writer and the
    // machine are. Past half the queue, everything queued goes to disk and a batch of at
    // least 1 000 is replayed: the queue must hold the calls made meanwhile, which on a
    // busy machine (the other tests of this file) came to 1 600 at once. Below half, what
    // is queued drains at 500 a second.
    const CALLERS: usize = 16;
    const CALLS: usize = 400;
    let (app, spill) = start_app_with(upstream.addr, db.url(), |config| {
        config.recording.queue_capacity = 4096;
        config.recording.batch_rows = 1;
    })
    .await;
    db.client()
        .await
        .batch_execute(
            "CREATE FUNCTION slow_down() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN IF current_query() LIKE 'COPY%' THEN PERFORM pg_sleep(0.002); END IF; RETURN NEW; END $$; \
             CREATE TRIGGER slow_down BEFORE INSERT ON performance_metrics \
             FOR EACH ROW EXECUTE FUNCTION slow_down();",
        )
        .await
        .unwrap();
    let addr = app.running.listen_addr;
    let callers: Vec<_> = (0..CALLERS)
        .map(|_| {
            tokio::spawn(async move {
                let mut client = RawClient::connect(addr).await;
                for _ in 0..CALLS {
                    client.unary("Search", search("c")).await.expect("calls never wait for PostgreSQL");
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.unwrap();
    }
    let stats = &app.recording.as_ref().unwrap().stats;
    assert!(stats.records_spilled.load(std::sync::atomic::Ordering::Relaxed) > 0, "the backlog went to disk");
    let made = (CALLERS * CALLS) as i64;
    let arrived = db.wait_for_count("SELECT count(*) FROM performance_metrics", made).await;
    assert_eq!(
        arrived,
        made,
        "every call arrives; {stats:?}; rejected: {:?}",
        std::fs::read_to_string(spill.path.join("rejected.jsonl")).map(|s| s.lines().count())
    );
    assert_eq!(stats.records_dropped.load(std::sync::atomic::Ordering::Relaxed), 0, "nothing dropped");
    app.shutdown().await;
    assert_eq!(db.count("SELECT count(*) FROM performance_metrics").await, made, "none twice");
}

/// A Query whose filter is `filter_bytes` long (`id in [...]`, as a client deleting or
/// fetching many ids by primary key sends it).
fn query_with_filter(filter_bytes: usize) -> Bytes {
    let mut expr = String::from("id in [");
    while expr.len() + 8 < filter_bytes {
        expr.push_str("1234567,");
    }
    expr.push_str("0]");
    encode(&milvus::proto::milvus::QueryRequest {
        collection_name: "c".into(),
        expr,
        output_fields: vec!["id".into()],
        ..Default::default()
    })
}

/// Records that hold much memory (long filters) reach half of `--queue-max-bytes` long
/// before half the queue's count: they go to the spill file then, not into more memory,
/// and all arrive once, replayed.
#[tokio::test]
async fn records_past_half_the_queues_bytes_go_to_disk_and_all_arrive() {
    use std::sync::atomic::Ordering::Relaxed;
    const FILTER: usize = 32 * 1024;
    const CALLS: usize = 24;
    let db = TestDb::create().await;
    let upstream = fake_milvus().await;
    // The writer waits 2 s after a first record for its batch to fill: by then the calls
    // below have queued about 800 KiB in 24 records (of 65 536 the queue may count).
    let (app, spill) = start_app_with(upstream.addr, db.url(), |config| {
        config.recording.queue_max_bytes = 1 << 20;
        config.recording.flush_interval = Duration::from_secs(2);
    })
    .await;
    let mut client = RawClient::connect(app.running.listen_addr).await;
    for _ in 0..CALLS {
        client.unary("Query", query_with_filter(FILTER)).await.expect("calls never wait for PostgreSQL");
    }
    let stats = &app.recording.as_ref().unwrap().stats;
    settle(Duration::from_secs(10), || stats.records_spilled.load(Relaxed) >= CALLS as u64).await;
    assert_eq!(stats.records_spilled.load(Relaxed), CALLS as u64, "over half the bytes: all went to disk; {stats:?}");
    let arrived = db.wait_for_count("SELECT count(*) FROM query_logs", CALLS as i64).await;
    assert_eq!(arrived, CALLS as i64, "every call arrives, replayed; {stats:?}");
    assert_eq!(stats.records_replayed.load(Relaxed), CALLS as u64);
    assert_eq!(stats.records_dropped.load(Relaxed), 0);
    let lengths =
        texts(&db.client().await, "SELECT DISTINCT length(filter_expression)::text AS n FROM query_logs").await;
    assert_eq!(lengths.len(), 1, "{lengths:?}");
    let length: usize = lengths[0].parse().unwrap();
    assert!((FILTER - 8..=FILTER + 8).contains(&length), "each filter recorded whole: {length} bytes");
    assert_eq!(spill.spilled_lines(), 0, "the spill file is emptied once replayed");
    app.shutdown().await;
    assert_eq!(db.count("SELECT count(*) FROM query_logs").await, CALLS as i64, "none twice");
}

/// While the writer is stuck in a batch (a table locked elsewhere), records with long
/// filters fill the queue by their bytes long before its count: past half its
/// `--queue-max-bytes` the batch is given up and the queue drains to the spill file, so
/// nothing is dropped, the memory held stays within the bound, and every call arrives once
/// the lock is gone.
#[tokio::test]
async fn long_records_behind_a_stuck_batch_go_to_disk_before_the_queue_fills_by_bytes() {
    use std::sync::atomic::Ordering::Relaxed;
    const FILTER: usize = 32 * 1024;
    const CAP: usize = 256 * 1024;
    const CALLS: u64 = 20;
    let db = TestDb::create().await;
    let upstream = fake_milvus().await;
    let (app, spill) = start_app_with(upstream.addr, db.url(), |config| {
        config.recording.queue_max_bytes = CAP;
        // Only the queue behind the batch can end the wait.
        config.recording.write_timeout = Duration::from_secs(120);
    })
    .await;
    let mut client = RawClient::connect(app.running.listen_addr).await;
    let locker = db.client().await;
    locker.batch_execute("BEGIN; LOCK TABLE query_logs IN ACCESS EXCLUSIVE MODE").await.unwrap();
    client.unary("Query", query_with_filter(FILTER)).await.unwrap();
    assert_eq!(db.writers_waiting_on("query_logs").await, 1, "the writer is stuck on the lock");

    for _ in 0..CALLS {
        client.unary("Query", query_with_filter(FILTER)).await.expect("calls go on while the writer is stuck");
    }
    let stats = &app.recording.as_ref().unwrap().stats;
    // A call's record may be handed over just after its client has the reply.
    settle(Duration::from_secs(10), || stats.records_spilled.load(Relaxed) > CALLS).await;
    assert_eq!(stats.records_spilled.load(Relaxed), 1 + CALLS, "the stuck batch and every call after it; {stats:?}");
    assert_eq!(stats.records_dropped.load(Relaxed), 0, "nothing lost");
    assert_eq!(spill.spilled_lines() as u64, 1 + CALLS);
    let held = stats.queued_bytes.load(Relaxed);
    assert_eq!(held, 0, "the writer took every byte it was counted");
    let (_, metrics) = http_get(app.running.admin_addr, "/metrics").await;
    assert!(metrics.contains("milvus_sidecar_recording_queue_bytes 0"), "{metrics}");
    assert!(metrics.contains(&format!("milvus_sidecar_recording_rows_spilled_total {}", 1 + CALLS)), "{metrics}");

    locker.batch_execute("ROLLBACK").await.unwrap();
    let all = 1 + CALLS as i64;
    assert_eq!(db.wait_for_count("SELECT count(*) FROM query_logs", all).await, all);
    app.shutdown().await;
    assert_eq!(db.count("SELECT count(*) FROM query_logs").await, all, "none twice");
    assert_eq!(upstream.count("Query"), 1 + CALLS as usize, "every call reached Milvus");
}

/// A PostgreSQL that answers but never finishes (a lock held elsewhere) must not hold the
/// writer: past `--write-timeout` the statement is cancelled, the batch goes to the spill
/// file, and everything arrives once the lock is gone.
#[tokio::test]
async fn a_table_locked_elsewhere_sends_records_to_disk_until_it_is_free() {
    use std::sync::atomic::Ordering::Relaxed;
    let db = TestDb::create().await;
    let upstream = fake_milvus().await;
    let (app, spill) =
        start_app_with(upstream.addr, db.url(), |config| config.recording.write_timeout = Duration::from_millis(200))
            .await;
    let mut client = RawClient::connect(app.running.listen_addr).await;
    client.unary("Search", search("c")).await.unwrap();
    db.wait_for_count("SELECT count(*) FROM performance_metrics", 1).await;

    let locker = db.client().await;
    locker.batch_execute("BEGIN; LOCK TABLE performance_metrics IN ACCESS EXCLUSIVE MODE").await.unwrap();
    for _ in 0..20 {
        client.unary("Search", search("c")).await.expect("calls never wait for PostgreSQL");
    }
    let stats = &app.recording.as_ref().unwrap().stats;
    settle(Duration::from_secs(10), || stats.records_spilled.load(Relaxed) >= 20).await;
    assert_eq!(stats.records_spilled.load(Relaxed), 20, "the calls made while the table was locked went to disk");
    assert_eq!(spill.spilled_lines(), 20);

    locker.batch_execute("ROLLBACK").await.unwrap();
    let arrived = db.wait_for_count("SELECT count(*) FROM performance_metrics", 21).await;
    assert_eq!(arrived, 21, "every call arrives once the lock is gone; {stats:?}");
    assert_eq!(stats.records_replayed.load(Relaxed), 20);
    assert_eq!(stats.records_rejected.load(Relaxed), 0, "a cancelled statement is not the data's fault");
    assert_eq!(stats.records_dropped.load(Relaxed), 0);
    app.shutdown().await;
    assert_eq!(db.count("SELECT count(*) FROM query_logs").await, 21, "none twice");
}

/// The spill file stops at `--spill-max-bytes`: what does not fit is dropped and counted,
/// what fits arrives once PostgreSQL is back, and the emptied file takes records again.
#[tokio::test]
async fn a_spill_file_at_its_cap_drops_and_counts_the_rest() {
    use std::sync::atomic::Ordering::Relaxed;
    const CAP: u64 = 4096;
    let db = TestDb::create().await;
    let upstream = fake_milvus().await;
    let (app, spill) = start_app_with(upstream.addr, db.url(), |config| {
        config.recording.write_timeout = Duration::from_millis(200);
        config.recording.spill_max_bytes = CAP;
        config.recording.batch_rows = 1;
    })
    .await;
    let mut client = RawClient::connect(app.running.listen_addr).await;
    let locker = db.client().await;
    locker.batch_execute("BEGIN; LOCK TABLE performance_metrics IN ACCESS EXCLUSIVE MODE").await.unwrap();
    for _ in 0..20 {
        client.unary("Search", search("c")).await.expect("a full spill file fails no call");
    }
    let stats = &app.recording.as_ref().unwrap().stats;
    settle(Duration::from_secs(10), || stats.records_spilled.load(Relaxed) + stats.records_dropped.load(Relaxed) >= 20)
        .await;
    let (spilled, dropped) = (stats.records_spilled.load(Relaxed), stats.records_dropped.load(Relaxed));
    assert_eq!(spilled + dropped, 20, "every record either kept or counted as lost: {stats:?}");
    assert!(spilled >= 2 && dropped >= 1, "some fit, the rest did not: {stats:?}");
    let size = std::fs::metadata(spill.path.join("records.jsonl")).unwrap().len();
    assert!(size <= CAP, "the file stays within its cap: {size} bytes");
    assert_eq!(spill.spilled_lines() as u64, spilled);

    locker.batch_execute("ROLLBACK").await.unwrap();
    let arrived = db.wait_for_count("SELECT count(*) FROM performance_metrics", spilled as i64).await;
    assert_eq!(arrived, spilled as i64, "what was kept arrives");
    // Emptied by the replay, the file keeps records again.
    settle(Duration::from_secs(10), || !spill.path.join("records.jsonl").exists()).await;
    assert!(!spill.path.join("records.jsonl").exists(), "removed once replayed");
    client.unary("Search", search("c")).await.unwrap();
    let arrived = db.wait_for_count("SELECT count(*) FROM performance_metrics", spilled as i64 + 1).await;
    assert_eq!(arrived, spilled as i64 + 1);
    app.shutdown().await;
}

/// Started while its PostgreSQL cannot be reached yet (a cluster coming up at once), the
/// sidecar waits for it rather than exiting, then serves and records as usual.
#[tokio::test]
async fn start_up_waits_for_a_postgres_that_is_not_reachable_yet() {
    let db = TestDb::create().await;
    let upstream = fake_milvus().await;
    let relay = Relay::start(db.server()).await;
    relay.cut();
    let url = db.url_via(Some(&relay.addr.to_string()));
    let starting = tokio::spawn(start_app_with(upstream.addr, url, |_| {}));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!starting.is_finished(), "still waiting while PostgreSQL refuses connections");
    relay.restore();
    let (app, _spill) =
        tokio::time::timeout(Duration::from_secs(10), starting).await.expect("starts once PostgreSQL answers").unwrap();
    let mut client = RawClient::connect(app.running.listen_addr).await;
    client.unary("Search", search("c")).await.unwrap();
    assert_eq!(db.wait_for_count("SELECT count(*) FROM query_logs", 1).await, 1);
    app.shutdown().await;
}

/// An error PostgreSQL answers with is not worth waiting for: start-up fails at once, saying why.
#[tokio::test]
async fn start_up_fails_at_once_when_postgres_refuses_the_database() {
    let db = TestDb::create().await;
    let upstream = fake_milvus().await;
    let spill = tempdir::Dir::new();
    let url = db.url().replace(&db.name, &format!("{}_missing", db.name));
    let started = std::time::Instant::now();
    let failed = App::start(common::recording_config(upstream.addr, &url, &spill.path)).await.err().expect("fails");
    assert!(started.elapsed() < Duration::from_secs(5), "no waiting: {:?}", started.elapsed());
    let message = format!("{failed:#}");
    assert!(message.contains("does not exist"), "{message}");
}

/// The writer has a thread of its own: it writes while every thread of the calls' runtime is
/// busy (this test's runtime has one, shared with the sidecar), and the calls of one flush
/// interval go in one batch, however the writer is woken.
#[tokio::test]
async fn the_writer_writes_beside_busy_call_threads_one_batch_per_flush_interval() {
    use std::sync::atomic::Ordering::Relaxed;
    let db = TestDb::create().await;
    let upstream = fake_milvus().await;
    let (app, _spill) =
        start_app_with(upstream.addr, db.url(), |config| config.recording.flush_interval = Duration::from_secs(1))
            .await;
    let mut client = RawClient::connect(app.running.listen_addr).await;
    let started = std::time::Instant::now();
    for _ in 0..20 {
        client.unary("Search", search("c")).await.unwrap();
    }
    assert!(started.elapsed() < Duration::from_secs(1), "the 20 calls fit in one flush interval");
    let stats = &app.recording.as_ref().unwrap().stats;
    // Blocks the only thread of this runtime: no task of the sidecar's can run meanwhile.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while stats.rows_written.load(Relaxed) < 40 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(stats.rows_written.load(Relaxed), 40, "a performance and a query row per Search, written meanwhile");
    assert_eq!(stats.batches_written.load(Relaxed), 1, "one batch for the calls of one interval: {stats:?}");
    app.shutdown().await;
    assert_eq!(db.count("SELECT count(*) FROM query_logs").await, 20);
}

/// The log tables and the column each is partitioned by.
const LOG_TABLES: [(&str, &str); 4] = [
    ("audit_logs", "occurred_at"),
    ("performance_metrics", "recorded_at"),
    ("query_logs", "executed_at"),
    ("ingestion_logs", "ingested_at"),
];

/// A database migrated by the sidecar, with a connection to it and a pool for maintenance.
async fn migrated() -> (TestDb, tokio_postgres::Client, milvus_sidecar::store::Pool) {
    let db = TestDb::create().await;
    let config = DatabaseArgs::from_url(&db.url()).pg_config().unwrap();
    let mut client = db.client().await;
    milvus_sidecar::store::migrate::run(&mut client).await.unwrap();
    (db, client, milvus_sidecar::store::pool(config, 1, milvus_sidecar::store::CheckOut::Tested))
}

/// The name of `table`'s partition for `day` days from today.
async fn partition(c: &tokio_postgres::Client, table: &str, day: i32) -> String {
    c.query_one("SELECT $1::text || '_p' || to_char(current_date + $2::int, 'YYYYMMDD')", &[&table, &day])
        .await
        .unwrap()
        .get(0)
}

/// Drops `table`'s partition for `day`, as if it had never been created.
async fn drop_partition(c: &tokio_postgres::Client, table: &str, day: i32) {
    let name = partition(c, table, day).await;
    c.batch_execute(&format!("DROP TABLE \"{name}\"")).await.unwrap();
}

/// Puts `n` rows in `table` at 13:00, `day` days from today, with the columns it requires.
async fn log_rows(c: &tokio_postgres::Client, table: &str, day: i32, n: i32) {
    let sql = match table {
        "audit_logs" => {
            "INSERT INTO audit_logs (id, occurred_at, action, resource_type, success, grpc_code)
             SELECT uuid_v7(), current_date + $1::int + time '13:00', 'test', 'system', true, 0
             FROM generate_series(1, $2::int)"
        }
        "performance_metrics" => {
            "INSERT INTO performance_metrics (id, recorded_at, operation_type, duration_ms, success, grpc_code)
             SELECT uuid_v7(), current_date + $1::int + time '13:00', 'search', 1, true, 0
             FROM generate_series(1, $2::int)"
        }
        "query_logs" => {
            "INSERT INTO query_logs (id, executed_at, query_type, duration_ms, success)
             SELECT uuid_v7(), current_date + $1::int + time '13:00', 'search', 1, true FROM generate_series(1, $2::int)"
        }
        "ingestion_logs" => {
            "INSERT INTO ingestion_logs (id, ingested_at, operation, duration_ms, success)
             SELECT uuid_v7(), current_date + $1::int + time '13:00', 'insert', 1, true FROM generate_series(1, $2::int)"
        }
        other => panic!("not a log table: {other}"),
    };
    c.execute(sql, &[&day, &n]).await.unwrap();
}

/// Rows of `table` held by the partition named `relation`.
async fn rows_in(c: &tokio_postgres::Client, table: &str, relation: &str) -> i64 {
    c.query_one(&format!("SELECT count(*) FROM {table} WHERE tableoid = to_regclass($1)"), &[&relation])
        .await
        .unwrap()
        .get(0)
}

/// Every row of `table`: its id and its day relative to today, in id order.
async fn log_ids(c: &tokio_postgres::Client, table: &str, column: &str) -> Vec<(String, i32)> {
    let sql = format!("SELECT id::text, {column}::date - current_date FROM {table} ORDER BY id");
    c.query(&sql, &[]).await.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect()
}

#[tokio::test]
async fn rows_in_a_default_partition_move_into_their_day_and_expire_with_it() {
    let (_db, c, pool) = migrated().await;
    // Yesterday and three days ahead have no partition (the sidecar was stopped), so their
    // rows went to DEFAULT, as did rows of a day long past retention and of one within it.
    for (table, _) in LOG_TABLES {
        drop_partition(&c, table, -1).await;
        drop_partition(&c, table, 3).await;
        for (day, n) in [(-1, 3), (3, 2), (0, 1), (-10, 1), (-100, 2)] {
            log_rows(&c, table, day, n).await;
        }
        assert_eq!(rows_in(&c, table, &format!("{table}_default")).await, 8, "{table}: all but today's");
    }
    let mut before = Vec::new();
    for (table, column) in LOG_TABLES {
        before.push(log_ids(&c, table, column).await);
    }

    let done = milvus_sidecar::store::maintenance::run_once(&pool, 90).await.unwrap();
    let expected = Maintained { created: 8, failed: 0, dropped: 0, indexes_built: 0, keys_swapped: 0 };
    assert_eq!(done, expected, "two days in each of the four tables");

    for ((table, column), before) in LOG_TABLES.into_iter().zip(before) {
        let (yesterday, ahead, today) =
            (partition(&c, table, -1).await, partition(&c, table, 3).await, partition(&c, table, 0).await);
        let attached: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = to_regclass($1)
                 AND inhrelid IN (to_regclass($2), to_regclass($3))",
                &[&table, &yesterday, &ahead],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(attached, 2, "{table}: both days are partitions of it");
        assert_eq!(rows_in(&c, table, &yesterday).await, 3, "{table}: yesterday's rows moved out of DEFAULT");
        assert_eq!(rows_in(&c, table, &ahead).await, 2, "{table}: a future day's rows moved out of DEFAULT");
        assert_eq!(
            rows_in(&c, table, &format!("{table}_default")).await,
            1,
            "{table}: only the row within retention and outside the maintained days stays"
        );
        // Rows move between partitions, nothing else: no row lost, none twice, and the
        // ones past retention deleted.
        let kept: Vec<(String, i32)> = before.iter().filter(|(_, day)| *day != -100).cloned().collect();
        assert_eq!(kept.len(), before.len() - 2);
        assert_eq!(log_ids(&c, table, column).await, kept, "{table}");
        // A moved day is a partition like the others: same indexes (the primary key among
        // them), and new rows of that day go to it.
        let indexes = "SELECT count(*) FROM pg_index WHERE indrelid = to_regclass($1)";
        let today_indexes: i64 = c.query_one(indexes, &[&today]).await.unwrap().get(0);
        let moved_indexes: i64 = c.query_one(indexes, &[&yesterday]).await.unwrap().get(0);
        assert!(today_indexes >= 2, "{table}: {today_indexes} indexes");
        assert_eq!(moved_indexes, today_indexes, "{table}");
        log_rows(&c, table, -1, 1).await;
        assert_eq!(rows_in(&c, table, &yesterday).await, 4, "{table}");
    }

    let again = milvus_sidecar::store::maintenance::run_once(&pool, 90).await.unwrap();
    assert_eq!(again, Maintained::default(), "nothing left to do");
}

#[tokio::test]
async fn maintenance_rounds_show_in_the_metrics() {
    let (db, c, _pool) = migrated().await;
    // What the sidecar's first round finds to do: tomorrow missing from every log table, and
    // one table with a day long past retention.
    for (table, _) in LOG_TABLES {
        drop_partition(&c, table, 1).await;
    }
    c.execute("SELECT ensure_log_partition('query_logs', current_date - 400)", &[]).await.unwrap();
    let upstream = FakeUpstream::start().await;
    let started = unix_now();
    let (app, _spill) = start_app(upstream.addr, db.url()).await;

    let admin = app.running.admin_addr;
    let ok = r#"milvus_sidecar_log_maintenance_runs_total{result="ok"}"#;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let scrape = loop {
        let (code, scrape) = common::http_get(admin, "/metrics").await;
        assert_eq!(code, 200);
        if common::sample(&scrape, ok) >= 1.0 {
            break scrape;
        }
        assert!(std::time::Instant::now() < deadline, "no completed maintenance round:\n{scrape}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let action = |name: &str| {
        common::sample(&scrape, &format!(r#"milvus_sidecar_log_maintenance_actions_total{{action="{name}"}}"#))
    };
    assert_eq!(common::sample(&scrape, ok), 1.0, "one round at start, the next in an hour");
    assert_eq!(common::sample(&scrape, r#"milvus_sidecar_log_maintenance_runs_total{result="failed"}"#), 0.0);
    assert_eq!(action("partition_created"), LOG_TABLES.len() as f64, "tomorrow, in each table");
    assert_eq!(action("partition_dropped"), 1.0, "the day past retention");
    assert_eq!(action("partition_failed"), 0.0);
    let last = common::sample(&scrape, "milvus_sidecar_log_maintenance_last_success_timestamp_seconds");
    assert!((started as f64..=unix_now() as f64).contains(&last), "{started} <= {last} <= now");
    app.shutdown().await;
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

#[tokio::test]
async fn a_day_that_cannot_be_created_does_not_stop_the_others() {
    let (_db, c, pool) = migrated().await;
    for (table, _) in LOG_TABLES {
        drop_partition(&c, table, 2).await;
        drop_partition(&c, table, 3).await;
    }
    log_rows(&c, "query_logs", 2, 1).await;
    log_rows(&c, "query_logs", 3, 1).await;
    // A domain of the partition's name (not a relation, so not taken for the partition)
    // makes CREATE TABLE fail for that day only.
    let blocked = partition(&c, "query_logs", 2).await;
    c.batch_execute(&format!("CREATE DOMAIN \"{blocked}\" AS int")).await.unwrap();

    let done = milvus_sidecar::store::maintenance::run_once(&pool, 90).await.unwrap();
    assert_eq!((done.created, done.failed), (7, 1), "{done:?}");
    let later = partition(&c, "query_logs", 3).await;
    assert_eq!(rows_in(&c, "query_logs", &later).await, 1, "the day after the failed one was created and filled");
    assert_eq!(rows_in(&c, "query_logs", "query_logs_default").await, 1, "the failed day's row waits, kept");
    for (table, _) in LOG_TABLES.into_iter().filter(|(t, _)| *t != "query_logs") {
        let day = partition(&c, table, 2).await;
        let exists: bool = c.query_one("SELECT to_regclass($1) IS NOT NULL", &[&day]).await.unwrap().get(0);
        assert!(exists, "{day}: other tables' partitions of the same day were created");
    }

    c.batch_execute(&format!("DROP DOMAIN \"{blocked}\"")).await.unwrap();
    let done = milvus_sidecar::store::maintenance::run_once(&pool, 90).await.unwrap();
    assert_eq!((done.created, done.failed), (1, 0), "the next round creates it");
    assert_eq!(rows_in(&c, "query_logs", &blocked).await, 1);
    assert_eq!(rows_in(&c, "query_logs", "query_logs_default").await, 0);

    // The SQL function on its own (for operators) goes on past a failing day in one call.
    let far = partition(&c, "audit_logs", 31).await;
    c.batch_execute(&format!("CREATE DOMAIN \"{far}\" AS int")).await.unwrap();
    let created: i32 = c.query_one("SELECT ensure_log_partitions(current_date + 30, 2)", &[]).await.unwrap().get(0);
    assert_eq!(created, 4 * 3 - 1);
    let after: bool = c
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&partition(&c, "audit_logs", 32).await])
        .await
        .unwrap()
        .get(0);
    assert!(after, "the day after the failing one was created");
}

/// The log tables' indexes on a time column: each one's definition and whether it is valid
/// (every partition has its copy).
async fn time_indexes(c: &tokio_postgres::Client) -> Vec<(String, String, bool)> {
    c.query(
        "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid), i.indisvalid
         FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid
         WHERE t.relname = ANY(log_tables()) AND NOT i.indisprimary
         ORDER BY 1",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// How many of `table`'s indexes `relation` (one of its partitions) has its copy of.
async fn copies_on(c: &tokio_postgres::Client, relation: &str) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pg_index i JOIN pg_inherits a ON a.inhrelid = i.indexrelid
         WHERE i.indrelid = to_regclass($1)",
        &[&relation],
    )
    .await
    .unwrap()
    .get(0)
}

/// A deployment at migration `version` with rows today, yesterday and on day 5, whose
/// partition is dropped so they wait in DEFAULT: the database, the connection that migrated
/// it, another, and a pool for maintenance.
async fn deployed_at(
    version: i32,
) -> (TestDb, tokio_postgres::Client, tokio_postgres::Client, milvus_sidecar::store::Pool) {
    let db = TestDb::create().await;
    let config = DatabaseArgs::from_url(&db.url()).pg_config().unwrap();
    let mut client = db.client().await;
    milvus_sidecar::store::migrate::run_up_to(&mut client, version).await.unwrap();
    let c = db.client().await;
    for (table, _) in LOG_TABLES {
        drop_partition(&c, table, 5).await;
        for (day, n) in [(0, 50), (-1, 20), (5, 3)] {
            log_rows(&c, table, day, n).await;
        }
    }
    (db, client, c, milvus_sidecar::store::pool(config, 1, milvus_sidecar::store::CheckOut::Tested))
}

/// The plan of a newest-first read of today's query_logs, sequential scans ruled out (these
/// tables are too small for the planner to prefer an index otherwise).
async fn newest_first_plan(c: &tokio_postgres::Client) -> Vec<String> {
    c.batch_execute("SET enable_seqscan = off").await.unwrap();
    texts(c, "EXPLAIN SELECT id FROM query_logs WHERE executed_at >= current_date ORDER BY executed_at DESC LIMIT 5")
        .await
}

#[tokio::test]
async fn upgrading_to_ascending_time_indexes_builds_the_days_with_rows_afterwards() {
    // A deployment at V3 with rows today, yesterday and in DEFAULT (a day with no partition).
    let (_db, mut client, c, pool) = deployed_at(3).await;
    assert!(time_indexes(&c).await.iter().all(|(_, def, _)| def.contains(" DESC)")), "V3 indexes are descending");

    let applied = milvus_sidecar::store::migrate::run_up_to(&mut client, 4).await.unwrap();
    assert_eq!(applied, ["V4__log_time_indexes_ascending"]);
    let indexes = time_indexes(&c).await;
    assert_eq!(indexes.len(), 11, "{indexes:?}");
    for (name, def, valid) in &indexes {
        assert!(!def.contains("DESC"), "{name}: {def}");
        assert!(!valid, "{name}: partitions with rows wait for theirs");
    }
    let per_table = |table: &str| if table == "ingestion_logs" { 2 } else { 3 };
    for (table, _) in LOG_TABLES {
        let (today, ahead) = (partition(&c, table, 0).await, partition(&c, table, 1).await);
        assert_eq!(copies_on(&c, &ahead).await, per_table(table) + 1, "{ahead}: empty, built in the migration");
        assert_eq!(copies_on(&c, &today).await, 1, "{today}: only the primary key's until maintenance");
    }

    // Leftovers of builds broken off: a valid index not attached yet, and an invalid one
    // (a unique build that failed on duplicate times) under the names maintenance uses.
    let today = partition(&c, "query_logs", 0).await;
    c.batch_execute(&format!("CREATE INDEX \"{today}_user\" ON \"{today}\" (user_id, executed_at)")).await.unwrap();
    let unique = format!("CREATE UNIQUE INDEX CONCURRENTLY \"{today}_time\" ON \"{today}\" (executed_at)");
    assert!(c.batch_execute(&unique).await.is_err(), "50 rows share one time");

    let done = milvus_sidecar::store::maintenance::run_once(&pool, 90).await.unwrap();
    // Today, yesterday and DEFAULT in each table: 3 x (3 + 3 + 3 + 2) copies.
    assert_eq!(done.indexes_built, 33, "{done:?}");
    for (name, def, valid) in time_indexes(&c).await {
        assert!(valid, "{name} ({def}): every partition has its copy now");
    }
    for (table, _) in LOG_TABLES {
        for relation in [partition(&c, table, 0).await, partition(&c, table, -1).await, format!("{table}_default")] {
            assert_eq!(copies_on(&c, &relation).await, per_table(table) + 1, "{relation}");
        }
    }
    let unique: bool = c
        .query_one("SELECT indisunique FROM pg_index WHERE indexrelid = to_regclass($1)", &[&format!("{today}_time")])
        .await
        .unwrap()
        .get(0);
    assert!(!unique, "the invalid leftover was dropped and the right index built in its place");
    // Newest first, as the CLI and dashboards read them, from the ascending index.
    let plan = newest_first_plan(&c).await;
    assert!(plan.iter().any(|line| line.contains("Index Scan Backward")), "{plan:#?}");
    let again = milvus_sidecar::store::maintenance::run_once(&pool, 90).await.unwrap();
    assert_eq!(again.indexes_built, 0, "nothing left to build");
}

/// Each log table's primary key: its columns, in order.
async fn primary_keys(c: &tokio_postgres::Client) -> Vec<(String, String)> {
    c.query(
        "SELECT t.relname::text, string_agg(a.attname, ', ' ORDER BY k.n)
         FROM pg_index i
         JOIN pg_class t ON t.oid = i.indrelid
         CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
         JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum
         WHERE t.relname = ANY(log_tables()) AND i.indisprimary
         GROUP BY t.relname ORDER BY t.relname",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// The names of the log tables' own indexes (not their partitions').
async fn log_table_indexes(c: &tokio_postgres::Client) -> Vec<String> {
    texts(
        c,
        "SELECT i.indexrelid::regclass::text FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid
         WHERE t.relname = ANY(log_tables()) ORDER BY 1",
    )
    .await
}

#[tokio::test]
async fn log_keys_lead_with_time_at_once_when_new_and_after_maintenance_when_upgraded() {
    let time_first: Vec<(String, String)> = {
        let mut keys: Vec<_> = LOG_TABLES.iter().map(|(t, col)| (t.to_string(), format!("{col}, id"))).collect();
        keys.sort();
        keys
    };
    let without_time_indexes = [
        "audit_logs_action",
        "audit_logs_pkey",
        "audit_logs_user",
        "ingestion_logs_collection",
        "ingestion_logs_pkey",
        "performance_metrics_collection",
        "performance_metrics_pkey",
        "query_logs_collection",
        "query_logs_pkey",
        "query_logs_user",
    ];
    // A new database: swapped by the migration itself.
    let (_fresh, c, _) = migrated().await;
    assert_eq!(primary_keys(&c).await, time_first);
    assert_eq!(log_table_indexes(&c).await, without_time_indexes);

    // A deployment at V4 with rows today, yesterday and in DEFAULT.
    let (_db, mut client, c, pool) = deployed_at(4).await;
    let mut before = Vec::new();
    for (table, column) in LOG_TABLES {
        before.push(log_ids(&c, table, column).await);
    }

    let applied = milvus_sidecar::store::migrate::run(&mut client).await.unwrap();
    assert_eq!(applied, ["V5__log_keys_lead_with_time"]);
    // Tables with rows keep their key and time index until maintenance has built the new
    // key's index on the partitions that hold rows; the operation index went at once.
    for (table, key) in primary_keys(&c).await {
        assert!(key.starts_with("id, "), "{table}: {key}");
    }
    let indexes = log_table_indexes(&c).await;
    assert!(indexes.contains(&"query_logs_time".to_string()), "{indexes:?}");
    assert!(!indexes.contains(&"performance_metrics_operation".to_string()), "{indexes:?}");

    let done = milvus_sidecar::store::maintenance::run_once(&pool, 90).await.unwrap();
    // Today, yesterday and day 5 (created first, its rows taken from DEFAULT) in each of
    // the four tables; the empty partitions get theirs inside the swap.
    assert_eq!((done.indexes_built, done.keys_swapped), (12, 4), "{done:?}");
    assert_eq!(primary_keys(&c).await, time_first);
    assert_eq!(log_table_indexes(&c).await, without_time_indexes);
    let per_table = |table: &str| match table {
        "audit_logs" | "query_logs" => 3,
        _ => 2,
    };
    for (table, _) in LOG_TABLES {
        for day in [-1, 0, 1] {
            let relation = partition(&c, table, day).await;
            assert_eq!(copies_on(&c, &relation).await, per_table(table), "{relation}: every index of its table");
        }
        let default = format!("{table}_default");
        assert_eq!(copies_on(&c, &default).await, per_table(table), "{default}");
    }
    for ((table, column), before) in LOG_TABLES.into_iter().zip(before) {
        assert_eq!(log_ids(&c, table, column).await, before, "{table}: every row kept");
    }
    // The key still refuses a row twice (what replays of the spill file rely on)...
    let dup = c
        .execute(
            "INSERT INTO query_logs (id, executed_at, query_type, duration_ms, success)
             SELECT id, executed_at, query_type, duration_ms, success FROM query_logs LIMIT 1
             ON CONFLICT DO NOTHING",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(dup, 0);
    // ...and serves newest-first reads as the time index did.
    let plan = newest_first_plan(&c).await;
    assert!(plan.iter().any(|line| line.contains("Scan Backward using") && line.contains("_pkey")), "{plan:#?}");
    let again = milvus_sidecar::store::maintenance::run_once(&pool, 90).await.unwrap();
    assert_eq!(again, Maintained::default(), "nothing left to do");
}

/// Waits (up to 5 s) until `done` holds, for a setting that arrives by NOTIFY.
async fn until(what: &str, done: impl Fn() -> bool) {
    settle(Duration::from_secs(5), &done).await;
    assert!(done(), "{what} within 5 s");
}

/// Waits until `done` holds or `within` has passed; the caller asserts on what it finds.
async fn settle(within: Duration, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !done() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_bulk_import_leaves_an_ingestion_row_whether_milvus_accepts_it_or_not() {
    let db = TestDb::create().await;
    let upstream = fake_milvus().await;
    upstream.reply_with("Import", encode(&ImportResponse { status: Some(MilvusStatus::default()), tasks: vec![7] }));
    let (app, _spill) = start_app(upstream.addr, db.url()).await;
    let mut client = RawClient::connect(app.running.listen_addr).await;
    let import = encode(&ImportRequest {
        collection_name: "docs".into(),
        partition_name: "p2024".into(),
        files: vec!["s3://bucket/part-0.parquet".into()],
        ..Default::default()
    });
    client.unary_with("Import", as_alice(import.clone())).await.unwrap();
    // Refused inside an OK reply, as Milvus reports most failures.
    let refused = MilvusStatus { code: 2100, reason: "import is disabled".into(), ..Default::default() };
    upstream.reply_with("Import", encode(&ImportResponse { status: Some(refused), ..Default::default() }));
    client.unary_with("Import", as_alice(import.clone())).await.unwrap();
    app.shutdown().await;

    let c = db.client().await;
    let rows = c
        .query(
            "SELECT i.operation, i.partition_name, i.rows_sent, i.bytes, i.success, i.error_message, i.username,
                    c.collection_name
             FROM ingestion_logs i LEFT JOIN collections c ON c.id = i.collection_id ORDER BY i.ingested_at",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2, "one ingestion row per import");
    for (row, success) in rows.iter().zip([true, false]) {
        assert_eq!(row.get::<_, String>(0), "import");
        assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("p2024"));
        assert_eq!(row.get::<_, Option<i64>>(2), None, "an import names files, not rows");
        // As framed on the wire: the message and gRPC's 5-byte prefix.
        assert_eq!(row.get::<_, Option<i64>>(3), Some(import.len() as i64 + 5), "the request's size");
        assert_eq!(row.get::<_, bool>(4), success);
        assert_eq!(row.get::<_, Option<String>>(6).as_deref(), Some("alice"));
        assert_eq!(row.get::<_, Option<String>>(7).as_deref(), Some("docs"));
    }
    assert_eq!(rows[0].get::<_, Option<String>>(5), None);
    assert_eq!(rows[1].get::<_, Option<String>>(5).as_deref(), Some("import is disabled"), "Milvus's reason");
    let audit = c
        .query("SELECT action, resource_type, details->'files'->>0, success FROM audit_logs ORDER BY occurred_at", &[])
        .await
        .unwrap();
    let audit: Vec<(String, String, Option<String>, bool)> =
        audit.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
    let file = Some("s3://bucket/part-0.parquet".to_string());
    assert_eq!(
        audit,
        [("import".into(), "data".into(), file.clone(), true), ("import".into(), "data".into(), file, false)]
    );
}

#[tokio::test]
async fn audit_settings_extend_stop_and_resume_the_audit_while_running() {
    let db = TestDb::create().await;
    let upstream = fake_milvus().await;
    let (app, _spill) = start_app(upstream.addr, db.url()).await;
    let mut client = RawClient::connect(app.running.listen_addr).await;
    let admin = db.client().await;
    let set = "UPDATE system_config SET config_value = $2 WHERE config_key = $1";
    let insert = || encode(&InsertRequest { collection_name: "c".into(), num_rows: 10, ..Default::default() });
    // Settings apply when the writer takes a record: each phase's rows are waited for
    // before the next switch, so no record straddles one.
    let mut calls = 0;
    let mut written = |n: i64| {
        calls += n;
        db.wait_for_count("SELECT count(*) FROM performance_metrics", calls)
    };

    client.unary("Search", search("c")).await.unwrap();
    assert_eq!(written(1).await, 1);
    assert_eq!(db.count("SELECT count(*) FROM audit_logs").await, 0, "reads are not audited by default");

    admin.execute(set, &[&"audit_all_calls", &"true"]).await.unwrap();
    until("audit_all_calls", || app.settings.audit_every_call()).await;
    client.unary("Search", search("c")).await.unwrap();
    client.unary("GetVersion", Bytes::new()).await.unwrap();
    assert_eq!(written(2).await, 3);

    admin.execute(set, &[&"enable_audit_logging", &"false"]).await.unwrap();
    until("enable_audit_logging off", || !app.settings.audit()).await;
    client.unary("Insert", insert()).await.unwrap();
    client.unary("Search", search("c")).await.unwrap();
    assert_eq!(written(2).await, 5);
    assert_eq!(db.count("SELECT count(*) FROM ingestion_logs").await, 1, "only the audit stops");

    admin.execute(set, &[&"enable_audit_logging", &"true"]).await.unwrap();
    until("enable_audit_logging on", || app.settings.audit()).await;
    client.unary("Insert", insert()).await.unwrap();
    assert_eq!(written(1).await, 6);
    app.shutdown().await;

    let actions = texts(&admin, "SELECT action FROM audit_logs ORDER BY occurred_at").await;
    assert_eq!(actions, ["search", "get_version", "insert"], "reads while extended, nothing while off");
}

#[tokio::test]
async fn a_schema_newer_than_the_build_is_refused_with_what_to_do() {
    // What a rollback meets: a newer build has applied a migration this one does not have.
    let (db, c, _pool) = migrated().await;
    c.execute(
        "INSERT INTO refinery_schema_history (version, name, applied_on, checksum)
         VALUES (9999, 'from_a_newer_build', now()::text, '0')",
        &[],
    )
    .await
    .unwrap();
    let history = "SELECT count(*) FROM refinery_schema_history";
    let rows = db.count(history).await;
    let upstream = FakeUpstream::start().await;
    let spill = tempdir::Dir::new();
    let config = common::recording_config(upstream.addr, &db.url(), &spill.path);

    let refused = App::start(config).await.err().expect("a schema newer than the build is refused");
    let message = format!("{refused:#}");
    for part in ["V9999 (from_a_newer_build)", "newer than this build", "--skip-migrations"] {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
    assert_eq!(db.count(history).await, rows, "nothing applied");

    // The way out the message names: this build runs on that schema without migrating.
    let (app, _spill) = start_app_with(upstream.addr, db.url(), |c| c.recording.skip_migrations = true).await;
    app.shutdown().await;
}

#[tokio::test]
async fn skip_migrations_leaves_an_empty_database_untouched() {
    let db = TestDb::create().await;
    let upstream = fake_milvus().await;
    let spill = tempdir::Dir::new();
    let tables = "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'";
    let mut config = common::recording_config(upstream.addr, &db.url(), &spill.path);
    config.recording.skip_migrations = true;
    let Err(e) = App::start(config.clone()).await else { panic!("started on a database without a schema") };
    assert!(format!("{e:#}").contains("cannot read system_config"), "{e:#}");
    assert_eq!(db.count(tables).await, 0, "no migration ran");

    // The same through the command line flag.
    let mut serve = std::process::Command::new(env!("CARGO_BIN_EXE_milvus-sidecar"))
        .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--no-auth", "--skip-migrations"])
        .args(["--upstream", &format!("http://{}", upstream.addr), "--database-url", &db.url()])
        .arg("--spill-dir")
        .arg(&spill.path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = serve.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = serve.kill();
            panic!("serve --skip-migrations kept running on a database without a schema");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut serve.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(stderr.contains("system_config"), "{stderr}");
    assert_eq!(db.count(tables).await, 0, "no migration ran");

    // Without it, the same start-up migrates.
    config.recording.skip_migrations = false;
    let app = App::start(config).await.expect("migrates, then starts");
    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations")).unwrap().count();
    assert_eq!(db.count("SELECT count(*) FROM refinery_schema_history").await, migrations as i64);
    app.shutdown().await;
}

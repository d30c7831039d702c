//! `milvus-sidecar sync`: the mirror is brought in step with what a real Milvus-protocol
//! server (milvus-lite) holds, in a real PostgreSQL; collections created or dropped behind
//! the sidecar's back appear or go, and a sync with nothing new changes nothing. The
//! sidecar syncs by itself at start-up, and renames and index drops made through it follow.

mod common;

use std::collections::HashMap;
use std::process::Command;

use bytes::Bytes;
use common::fake::FakeUpstream;
use common::lite::MilvusLite;
use common::pg::TestDb;
use common::{RawClient, encode, unused_addr};
use milvus::client::Client;
use milvus::index::{IndexParams, IndexType, MetricType};
use milvus::schema::{CollectionSchemaBuilder, FieldSchema};
use milvus_sidecar::App;
use milvus_sidecar::proxy::Upstream;
use milvus_sidecar::store::migrate;
use milvus_sidecar::sync::{self, SyncError};

const SIDECAR: &str = env!("CARGO_BIN_EXE_milvus-sidecar");

/// A migrated database of its own, and a connection to it.
async fn mirror() -> (TestDb, tokio_postgres::Client) {
    let db = TestDb::create().await;
    let mut client = db.client().await;
    migrate::run(&mut client).await.expect("migrations apply");
    (db, client)
}

fn upstream_at(addr: std::net::SocketAddr) -> Upstream {
    sync::upstream(&format!("http://{addr}").parse().unwrap(), None)
}

async fn create_collection(milvus: &Client, name: &str, dim: i64) {
    let schema = CollectionSchemaBuilder::new(name, "made behind the sidecar's back")
        .add_field(FieldSchema::new_primary_int64("id", "", false))
        .add_field(FieldSchema::new_float_vector("vec", "", dim))
        .build()
        .unwrap();
    milvus.create_collection(schema, None).await.unwrap_or_else(|e| panic!("create {name}: {e:?}"));
}

/// Every mirror row as text, to show that a sync changed nothing at all.
async fn mirror_rows(client: &tokio_postgres::Client) -> Vec<String> {
    let mut rows = Vec::new();
    for table in ["collections", "collection_partitions", "index_management", "permissions"] {
        for row in client.query(&format!("SELECT t::text FROM {table} t ORDER BY id"), &[]).await.unwrap() {
            rows.push(format!("{table}: {}", row.get::<_, String>(0)));
        }
    }
    rows
}

async fn status_of(client: &tokio_postgres::Client, db: &str, name: &str) -> Vec<String> {
    let rows = client
        .query(
            "SELECT status FROM collections WHERE database_name = $1 AND collection_name = $2 ORDER BY created_at",
            &[&db, &name],
        )
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

async fn partitions_of(client: &tokio_postgres::Client, name: &str) -> HashMap<String, String> {
    let rows = client
        .query(
            "SELECT p.partition_name, p.status FROM collection_partitions p JOIN collections c ON c.id = p.collection_id
             WHERE c.database_name = 'default' AND c.collection_name = $1",
            &[&name],
        )
        .await
        .unwrap();
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

/// A user with a grant on a live mirror row `db.name` that Milvus does not have.
async fn granted_collection(client: &tokio_postgres::Client, db: &str, name: &str, milvus_id: Option<i64>) {
    client
        .execute("INSERT INTO users (username) VALUES ('alice') ON CONFLICT (username) DO NOTHING", &[])
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO collections (database_name, collection_name, dimension, milvus_collection_id)
             VALUES ($1, $2, 8, $3)",
            &[&db, &name, &milvus_id],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO permissions (user_id, collection_id, permission_type)
             SELECT u.id, c.id, 'read' FROM users u, collections c
             WHERE u.username = 'alice' AND c.database_name = $1 AND c.collection_name = $2",
            &[&db, &name],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn sync_mirrors_what_milvus_holds_and_follows_what_it_drops() {
    let lite = MilvusLite::start().await;
    let (db, client) = mirror().await;
    let mut client = client;
    let upstream = upstream_at(lite.addr);

    // Milvus holds collections the sidecar never saw created, in two databases.
    let mut milvus = Client::new(format!("http://{}", lite.addr)).await.expect("connect to milvus-lite");
    create_collection(&milvus, "docs", 8).await;
    milvus.create_partition("docs".into(), "p2024".into()).await.expect("create partition");
    let index = IndexParams::new("vec_idx".into(), IndexType::Flat, MetricType::L2, HashMap::new());
    // The SDK then waits for DescribeIndex to list `vec_idx`, which milvus-lite never does
    // (it lists the index under its field's name); the index itself is created.
    let _ = milvus.create_index("docs", "vec", index).await;
    create_collection(&milvus, "notes", 4).await;
    milvus.create_database("analytics", None).await.expect("create database");
    milvus.using_database("analytics").await.unwrap();
    create_collection(&milvus, "events", 16).await;
    milvus.using_database("default").await.unwrap();

    // The mirror knows a collection Milvus no longer has (with a grant on it), and one in a
    // database Milvus does not have.
    granted_collection(&client, "default", "ghost", None).await;
    granted_collection(&client, "elsewhere", "old", None).await;

    let report = sync::run(&upstream, &mut client).await.expect("sync");
    let mut databases = report.databases.clone();
    databases.sort();
    assert_eq!(databases, ["analytics", "default"]);
    assert_eq!((report.collections_seen, report.added, report.updated, report.dropped), (3, 3, 0, 1), "{report}");
    assert_eq!(report.partitions_added, 1, "p2024; Milvus's own `_default` is not recorded: {report}");
    assert_eq!((report.indexes_added, report.indexes_updated), (1, 0), "{report}");
    assert_eq!(report.warnings.len(), 1, "{report}");
    assert!(report.warnings[0].contains("database elsewhere"), "{report}");

    let docs = client
        .query_one(
            "SELECT dimension, fields, shards_num, metric_type FROM collections
             WHERE database_name = 'default' AND collection_name = 'docs' AND status = 'active'",
            &[],
        )
        .await
        .expect("docs is in the mirror");
    assert_eq!(docs.get::<_, Option<i32>>(0), Some(8));
    let fields: serde_json::Value = docs.get(1);
    let names: Vec<&str> = fields.as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["id", "vec"], "{fields}");
    assert_eq!(fields[1]["data_type"], "FloatVector", "{fields}");
    assert_eq!(fields[0]["is_primary_key"], true, "{fields}");
    assert!(docs.get::<_, Option<i32>>(2).is_some_and(|n| n > 0), "shards recorded");
    assert_eq!(docs.get::<_, Option<String>>(3).as_deref(), Some("L2"), "the index's metric becomes the collection's");
    let events = client
        .query_one(
            "SELECT dimension FROM collections
             WHERE database_name = 'analytics' AND collection_name = 'events' AND status = 'active'",
            &[],
        )
        .await
        .expect("analytics.events is in the mirror");
    assert_eq!(events.get::<_, Option<i32>>(0), Some(16));

    let partitions = partitions_of(&client, "docs").await;
    assert_eq!(partitions.len(), 1, "{partitions:?}");
    assert_eq!(partitions["p2024"], "active");

    let indexes = client
        .query(
            "SELECT i.field_name, i.index_type, i.metric_type, i.state FROM index_management i
             JOIN collections c ON c.id = i.collection_id WHERE c.collection_name = 'docs'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(indexes.len(), 1);
    let index = &indexes[0];
    assert_eq!(index.get::<_, String>(0), "vec");
    assert_eq!(index.get::<_, Option<String>>(1).as_deref(), Some("FLAT"));
    assert_eq!(index.get::<_, Option<String>>(2).as_deref(), Some("L2"));
    assert_eq!(index.get::<_, String>(3), "finished");

    assert_eq!(status_of(&client, "default", "ghost").await, ["dropped"]);
    let grants: i64 = client.query_one("SELECT count(*) FROM permissions p JOIN collections c ON c.id = p.collection_id WHERE c.collection_name = 'ghost'", &[]).await.unwrap().get(0);
    assert_eq!(grants, 0, "grants die with the collection");
    assert_eq!(
        status_of(&client, "elsewhere", "old").await,
        ["active"],
        "a database Milvus did not list is left alone"
    );

    // Dropped behind the sidecar's back: a collection and a partition.
    let docs_before: std::time::SystemTime = client
        .query_one("SELECT updated_at FROM collections WHERE collection_name = 'docs'", &[])
        .await
        .unwrap()
        .get(0);
    milvus.drop_collection("notes").await.expect("drop notes");
    milvus.drop_partition("docs".into(), "p2024".into()).await.expect("drop partition");
    let report = sync::run(&upstream, &mut client).await.expect("second sync");
    assert_eq!((report.collections_seen, report.added, report.updated, report.dropped), (2, 0, 0, 1), "{report}");
    assert_eq!((report.partitions_added, report.partitions_dropped), (0, 1), "{report}");
    assert_eq!(status_of(&client, "default", "notes").await, ["dropped"]);
    assert_eq!(status_of(&client, "default", "docs").await, ["active"]);
    let docs_after: std::time::SystemTime = client
        .query_one("SELECT updated_at FROM collections WHERE collection_name = 'docs'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(docs_after, docs_before, "docs is untouched");
    let partitions = partitions_of(&client, "docs").await;
    assert_eq!(partitions.len(), 1, "{partitions:?}");
    assert_eq!(partitions["p2024"], "dropped");

    // Nothing new in Milvus: nothing changes, not even a timestamp.
    let before = mirror_rows(&client).await;
    let report = sync::run(&upstream, &mut client).await.expect("third sync");
    assert_eq!(report.changes(), 0, "{report}");
    assert_eq!(mirror_rows(&client).await, before);

    // The same from the command line, which prints a summary.
    let out = Command::new(SIDECAR)
        .args(["sync", "--upstream", &format!("http://{}", lite.addr), "--database-url", &db.url()])
        .output()
        .expect("milvus-sidecar runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("collections: 2 in Milvus; 0 added, 0 updated, 0 marked dropped"), "{stdout}");
    assert!(stdout.contains("the mirror already matched Milvus"), "{stdout}");
    assert_eq!(mirror_rows(&client).await, before);
}

/// Milvus's replies built with Milvus's own messages (milvus-sdk-rust), from a fake that
/// answers one collection: what milvus-lite cannot show (collection ids).
async fn fake_milvus_with(collection: &str, milvus_id: i64) -> FakeUpstream {
    use milvus::proto::common::Status;
    use milvus::proto::milvus::{
        DescribeCollectionResponse, DescribeIndexResponse, ListDatabasesResponse, ShowCollectionsResponse,
        ShowPartitionsResponse,
    };
    use milvus::proto::schema::{CollectionSchema, DataType, FieldSchema};
    let fake = FakeUpstream::start().await;
    let ok = || Some(Status::default());
    fake.reply_with(
        "ListDatabases",
        encode(&ListDatabasesResponse { status: ok(), db_names: vec!["default".into()], ..Default::default() }),
    );
    fake.reply_with(
        "ShowCollections",
        encode(&ShowCollectionsResponse {
            status: ok(),
            collection_names: vec![collection.into()],
            collection_ids: vec![milvus_id],
            ..Default::default()
        }),
    );
    let vector = FieldSchema {
        name: "embedding".into(),
        data_type: DataType::FloatVector as i32,
        type_params: vec![milvus::proto::common::KeyValuePair { key: "dim".into(), value: "32".into() }],
        ..Default::default()
    };
    let id = FieldSchema {
        name: "pk".into(),
        data_type: DataType::Int64 as i32,
        is_primary_key: true,
        ..Default::default()
    };
    fake.reply_with(
        "DescribeCollection",
        encode(&DescribeCollectionResponse {
            status: ok(),
            schema: Some(CollectionSchema {
                name: collection.into(),
                description: "recreated".into(),
                fields: vec![id, vector],
                ..Default::default()
            }),
            collection_id: milvus_id,
            shards_num: 2,
            ..Default::default()
        }),
    );
    fake.reply_with(
        "ShowPartitions",
        encode(&ShowPartitionsResponse {
            status: ok(),
            partition_names: vec!["_default".into(), "p1".into()],
            ..Default::default()
        }),
    );
    // No index: Milvus answers ErrIndexNotFound (700), which is an empty list, not a failure.
    // (`error_code` varies: IndexNotExist from Milvus, IllegalRowRecord from milvus-lite.)
    let no_index = Status { reason: "index not found".into(), code: 700, ..Default::default() };
    fake.reply_with("DescribeIndex", encode(&DescribeIndexResponse { status: Some(no_index), ..Default::default() }));
    fake
}

#[tokio::test]
async fn a_collection_recreated_behind_the_sidecar_s_back_starts_without_the_old_grants() {
    let (_db, mut client) = mirror().await;
    granted_collection(&client, "default", "docs", Some(41)).await;
    // Written after the sync read Milvus (as the record writer may, for a collection created
    // meanwhile): absent from what was read, but newer than it, so not dropped.
    client
        .execute(
            "INSERT INTO collections (database_name, collection_name, created_at, updated_at)
             VALUES ('default', 'fresh', now() + interval '1 hour', now() + interval '1 hour')",
            &[],
        )
        .await
        .unwrap();
    let fake = fake_milvus_with("docs", 42).await;

    let report = sync::run(&upstream_at(fake.addr), &mut client).await.expect("sync");
    assert_eq!((report.added, report.updated, report.dropped), (1, 0, 1), "{report}");
    assert!(report.warnings.is_empty(), "{report}");
    let rows = client
        .query(
            "SELECT status, milvus_collection_id, dimension, description, shards_num,
                    (SELECT count(*) FROM permissions p WHERE p.collection_id = c.id)
             FROM collections c WHERE collection_name = 'docs' ORDER BY created_at",
            &[],
        )
        .await
        .unwrap();
    // status, milvus_collection_id, dimension, description, shards_num, grants
    type Row = (String, Option<i64>, Option<i32>, Option<String>, Option<i32>, i64);
    let rows: Vec<Row> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5))).collect();
    assert_eq!(
        rows,
        [
            ("dropped".into(), Some(41), Some(8), None, None, 0),
            ("active".into(), Some(42), Some(32), Some("recreated".into()), Some(2), 0),
        ]
    );
    assert_eq!(status_of(&client, "default", "fresh").await, ["active"]);
    let partitions = partitions_of(&client, "docs").await;
    assert_eq!(partitions, HashMap::from([("p1".to_string(), "active".to_string())]), "`_default` is not recorded");

    let before = mirror_rows(&client).await;
    let report = sync::run(&upstream_at(fake.addr), &mut client).await.expect("second sync");
    assert_eq!(report.changes(), 0, "{report}");
    assert_eq!(mirror_rows(&client).await, before);
}

#[tokio::test]
async fn without_milvus_sync_fails_clearly_and_changes_nothing() {
    let (db, mut client) = mirror().await;
    granted_collection(&client, "default", "docs", None).await;
    let before = mirror_rows(&client).await;

    let nobody = unused_addr();
    let err = sync::run(&upstream_at(nobody), &mut client).await.expect_err("nothing listens there");
    assert!(matches!(err, SyncError::Milvus(_)), "{err}");
    assert!(err.to_string().contains(&nobody.to_string()), "names the address: {err}");

    // A server that answers but is not Milvus (it echoes requests back): its replies carry
    // no status and must not be read as "Milvus holds nothing".
    let echo = FakeUpstream::start().await;
    let err = sync::run(&upstream_at(echo.addr), &mut client).await.expect_err("an echo is not Milvus");
    assert!(err.to_string().contains("not from Milvus"), "{err}");
    assert_eq!(mirror_rows(&client).await, before, "nothing changed");

    let out = Command::new(SIDECAR)
        .args(["sync", "--upstream", &format!("http://{nobody}"), "--database-url", &db.url()])
        .output()
        .expect("milvus-sidecar runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("cannot read what Milvus holds"), "{stderr}");

    let no_pg = format!("postgres://postgres@{}/postgres", unused_addr());
    let out = Command::new(SIDECAR)
        .args(["sync", "--upstream", &format!("http://{nobody}"), "--database-url", &no_pg])
        .output()
        .expect("milvus-sidecar runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("cannot connect to PostgreSQL"), "{stderr}");
    assert_eq!(mirror_rows(&client).await, before, "nothing changed");
}

/// The sidecar in front of `upstream`, recording into `db` (migrated at start-up).
async fn start_app(upstream: std::net::SocketAddr, db: &TestDb, spill: &common::TempDir) -> App {
    let mut config = common::recording_config(upstream, &db.url(), &spill.path);
    config.drain_timeout = std::time::Duration::from_secs(5);
    App::start(config).await.expect("sidecar with recording starts")
}

const LIVE_DOCS: &str = "SELECT count(*) FROM collections
     WHERE database_name = 'default' AND collection_name = 'docs' AND status = 'active' AND dimension = 8";

#[tokio::test]
async fn collections_milvus_held_before_the_sidecar_started_join_the_mirror_at_start_up() {
    let lite = MilvusLite::start().await;
    let milvus = Client::new(format!("http://{}", lite.addr)).await.expect("connect to milvus-lite");
    create_collection(&milvus, "docs", 8).await;
    milvus.create_partition("docs".into(), "p2024".into()).await.expect("create partition");
    let db = TestDb::create().await;
    let spill = common::TempDir::new("sync-spill");

    // No call goes through the sidecar and `milvus-sidecar sync` is not run: only the
    // start-up sync can put these rows there.
    let app = start_app(lite.addr, &db, &spill).await;
    assert_eq!(db.wait_for_count(LIVE_DOCS, 1).await, 1, "docs, with its schema's dimension");
    let client = db.client().await;
    let partitions = partitions_of(&client, "docs").await;
    assert_eq!(partitions, HashMap::from([("p2024".to_string(), "active".to_string())]));
    let fields: serde_json::Value =
        client.query_one("SELECT fields FROM collections WHERE collection_name = 'docs'", &[]).await.unwrap().get(0);
    assert_eq!(fields[1]["name"], "vec", "{fields}");
    app.shutdown().await;
    assert_eq!(db.count("SELECT count(*) FROM performance_metrics").await, 0, "nothing was called through it");
}

/// Milvus's reply to a call that returns a bare `common.Status`, checked to be a success.
// `error_code` is deprecated in the proto but still the only code some servers set.
#[allow(deprecated)]
fn accepted(reply: tonic::Response<Bytes>) {
    let status: milvus::proto::common::Status = prost013::Message::decode(reply.into_inner()).unwrap();
    assert!(status.code == 0 && status.error_code == 0, "Milvus refused: {status:?}");
}

#[tokio::test]
async fn renames_and_index_drops_through_the_sidecar_follow_into_the_mirror() {
    use milvus::proto::common::KeyValuePair;
    use milvus::proto::milvus::{CreateIndexRequest, DropIndexRequest, RenameCollectionRequest};
    let lite = MilvusLite::start().await;
    let milvus = Client::new(format!("http://{}", lite.addr)).await.expect("connect to milvus-lite");
    create_collection(&milvus, "docs", 8).await;
    let db = TestDb::create().await;
    let spill = common::TempDir::new("sync-spill");
    let app = start_app(lite.addr, &db, &spill).await;
    // Once the start-up sync has mirrored docs it is over: it cannot race the calls below.
    assert_eq!(db.wait_for_count(LIVE_DOCS, 1).await, 1);
    let client = db.client().await;
    let docs_id: uuid::Uuid =
        client.query_one("SELECT id FROM collections WHERE collection_name = 'docs'", &[]).await.unwrap().get(0);
    let mut sidecar = RawClient::connect(app.running.listen_addr).await;

    let kv = |key: &str, value: &str| KeyValuePair { key: key.into(), value: value.into() };
    let create_index = CreateIndexRequest {
        collection_name: "docs".into(),
        field_name: "vec".into(),
        index_name: "vec_idx".into(),
        extra_params: vec![kv("index_type", "FLAT"), kv("metric_type", "L2"), kv("params", "{}")],
        ..Default::default()
    };
    accepted(sidecar.unary("CreateIndex", encode(&create_index)).await.unwrap());
    let rename = RenameCollectionRequest { old_name: "docs".into(), new_name: "papers".into(), ..Default::default() };
    accepted(sidecar.unary("RenameCollection", encode(&rename)).await.unwrap());
    let live_papers = "SELECT count(*) FROM collections WHERE collection_name = 'papers' AND status = 'active'";
    assert_eq!(db.wait_for_count(live_papers, 1).await, 1);
    let renamed = client
        .query_one("SELECT id, database_name, dimension FROM collections WHERE collection_name = 'papers'", &[])
        .await
        .unwrap();
    assert_eq!(renamed.get::<_, uuid::Uuid>(0), docs_id, "the same row, renamed, with its history and grants");
    assert_eq!(renamed.get::<_, String>(1), "default");
    assert_eq!(renamed.get::<_, Option<i32>>(2), Some(8));
    assert_eq!(status_of(&client, "default", "docs").await, Vec::<String>::new(), "no row is left under the old name");

    let drop_index = DropIndexRequest {
        collection_name: "papers".into(),
        field_name: "vec".into(),
        index_name: "vec_idx".into(),
        ..Default::default()
    };
    accepted(sidecar.unary("DropIndex", encode(&drop_index)).await.unwrap());
    let dropped = "SELECT count(*) FROM index_management WHERE index_name = 'vec_idx' AND state = 'dropped'";
    assert_eq!(db.wait_for_count(dropped, 1).await, 1);
    let index = client
        .query_one(
            "SELECT collection_id, field_name, index_type FROM index_management WHERE index_name = 'vec_idx'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(index.get::<_, uuid::Uuid>(0), docs_id, "the index followed its collection's rename");
    assert_eq!(index.get::<_, String>(1), "vec");
    assert_eq!(index.get::<_, Option<String>>(2).as_deref(), Some("FLAT"));
    assert!(milvus.list_collections().await.unwrap().contains(&"papers".to_string()), "Milvus renamed it too");
    app.shutdown().await;

    let audit = client
        .query("SELECT action, resource_id, details->>'new_name' FROM audit_logs ORDER BY occurred_at", &[])
        .await
        .unwrap();
    let audit: Vec<(String, Option<String>, Option<String>)> =
        audit.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(
        audit,
        [
            ("create_index".into(), Some("default.docs/vec_idx".into()), None),
            ("rename_collection".into(), Some("default.docs".into()), Some("papers".into())),
            ("drop_index".into(), Some("default.papers/vec_idx".into()), None),
        ]
    );
}

//! Hostile input against a recording, authenticating sidecar (real PostgreSQL, fake Milvus):
//! bodies that are not the message they claim to be, and strings made to break SQL, logs or
//! terminals, sent through every field the sidecar records.

mod common;

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use common::fake::FakeUpstream;
use common::pg::TestDb;
use common::{RawClient, encode};
use milvus::proto::common::{KeyValuePair, Status as MilvusStatus};
use milvus::proto::milvus::{CreateCollectionRequest, QueryRequest, QueryResults, SearchRequest, SearchResults};
use milvus::proto::schema::{CollectionSchema, DataType, FieldSchema, SearchResultData};
use milvus_sidecar::App;
use milvus_sidecar::config::AuthArgs;
use tonic::Code;
use tonic::metadata::MetadataValue;

const ROOT: &str = "root:Milvus";

/// Strings made to break things: terminal escapes, SQL, a forged log line, quoting.
const HOSTILE: &[&str] =
    &["\x1b[2J\x1b[31mred", "'; DROP TABLE users; --", "line\nERROR forged log line", "\"q\" $1 \\x %s {}"];
/// Proto strings may hold NUL, PostgreSQL text may not: it is recorded as U+FFFD.
const WITH_NUL: &str = "nul\0byte";
const NUL_RECORDED: &str = "nul\u{FFFD}byte";

// ---- logs, captured in this process as the binary writes them (text format, no colours) ----

fn logs() -> &'static common::logs::LogBuffer {
    common::logs::captured("info,milvus_sidecar::call=debug")
}

// ---- the sidecar under test ----

struct Setup {
    db: TestDb,
    upstream: FakeUpstream,
    app: App,
    client: RawClient,
    _spill: common::TempDir,
}

async fn setup() -> Setup {
    logs();
    let db = TestDb::create().await;
    let upstream = FakeUpstream::start().await;
    let ok = MilvusStatus::default();
    upstream.reply_with("CreateCollection", encode(&ok));
    upstream.reply_with(
        "Search",
        encode(&SearchResults {
            status: Some(ok.clone()),
            results: Some(SearchResultData { num_queries: 1, top_k: 3, topks: vec![3], ..Default::default() }),
            ..Default::default()
        }),
    );
    upstream.reply_with("Query", encode(&QueryResults { status: Some(ok), ..Default::default() }));
    let spill = common::TempDir::new("hostile-spill");
    let mut config = common::recording_config(upstream.addr, &db.url(), &spill.path);
    config.auth = AuthArgs::default();
    let app = App::start(config).await.expect("sidecar starts");
    let client = RawClient::connect(app.running.listen_addr).await;
    Setup { db, upstream, app, client, _spill: spill }
}

fn credential(user_password: &str) -> MetadataValue<tonic::metadata::Ascii> {
    base64::engine::general_purpose::STANDARD.encode(user_password).parse().unwrap()
}

fn call(body: Bytes, token: &str, user_agent: &str) -> tonic::Request<Bytes> {
    let mut request = tonic::Request::new(body);
    request.metadata_mut().insert("authorization", credential(token));
    request.metadata_mut().insert("user-agent", user_agent.parse().unwrap());
    request
}

fn create_collection(name: &str) -> Bytes {
    let field = |name: &str, data_type: DataType, params: Vec<KeyValuePair>| FieldSchema {
        name: name.into(),
        data_type: data_type as i32,
        is_primary_key: data_type == DataType::Int64,
        type_params: params,
        ..Default::default()
    };
    let schema = CollectionSchema {
        name: name.into(),
        fields: vec![
            field("id", DataType::Int64, vec![]),
            field("vec", DataType::FloatVector, vec![KeyValuePair { key: "dim".into(), value: "8".into() }]),
        ],
        ..Default::default()
    };
    encode(&CreateCollectionRequest {
        collection_name: name.into(),
        schema: prost013::Message::encode_to_vec(&schema),
        ..Default::default()
    })
}

fn search(collection: &str, filter: &str, output: &str) -> Bytes {
    encode(&SearchRequest {
        collection_name: collection.into(),
        dsl: filter.into(),
        output_fields: vec![output.into(), "id".into()],
        nq: 1,
        search_params: vec![KeyValuePair { key: "topk".into(), value: "3".into() }],
        ..Default::default()
    })
}

fn query(collection: &str, filter: &str, output: &str) -> Bytes {
    encode(&QueryRequest {
        collection_name: collection.into(),
        expr: filter.into(),
        output_fields: vec![output.into()],
        ..Default::default()
    })
}

// ---- bodies that are not what they claim ----

#[tokio::test]
async fn undecodable_bodies_are_invalid_argument_audited_and_never_forwarded() {
    let mut s = setup().await;
    let garbage: &[(&str, &[u8])] = &[
        ("Search", &[0xff; 16]),                           // no valid key at all
        ("Insert", &[0x1a, 0x7f, b'x']),                   // collection_name longer than the body
        ("DropCollection", &[0x18, 0x01]),                 // a string field sent as a varint
        ("CreateIndex", &[0x0b, 0x0c]),                    // a group (wire types 3/4)
        ("DescribeCollection", &[0x1a, 0x02, 0xc3, 0x28]), // invalid UTF-8 in a string
    ];
    for (method, body) in garbage {
        let request = call(Bytes::from_static(body), ROOT, "hostile-test");
        let status = s.client.unary_with(method, request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{method}: {status:?}");
        assert!(status.message().contains(&format!("{method}: request body is not a valid")), "{}", status.message());
        assert_eq!(s.upstream.count(method), 0, "{method} must not be forwarded");
    }
    let audited = s
        .db
        .wait_for_count("SELECT count(*) FROM audit_logs WHERE grpc_code = 3 AND NOT success AND username = 'root'", 5)
        .await;
    assert_eq!(audited, 5, "each refusal is in audit_logs");
    let actions: Vec<String> =
        s.db.client()
            .await
            .query("SELECT action FROM audit_logs WHERE grpc_code = 3 ORDER BY action", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
    assert_eq!(actions, ["create_index", "describe_collection", "drop_collection", "insert", "search"]);

    // The sidecar is unharmed.
    let ok = s.client.unary_with("Search", call(search("c", "", "id"), ROOT, "t")).await;
    assert!(ok.is_ok(), "{ok:?}");
    s.app.shutdown().await;
}

// ---- strings made to break SQL, logs and terminals ----

#[tokio::test]
async fn hostile_strings_reach_postgresql_verbatim_and_logs_escaped() {
    let mut s = setup().await;
    let mut expected = Vec::new();
    for (i, hostile) in HOSTILE.iter().copied().chain([WITH_NUL]).enumerate() {
        let recorded = if hostile == WITH_NUL { NUL_RECORDED.to_owned() } else { hostile.to_owned() };
        let name = format!("c{i}{hostile}");
        let name_recorded = format!("c{i}{recorded}");
        // A header value cannot hold control characters; the rest of the string can go.
        let agent: String = hostile.chars().filter(|c| !c.is_control()).collect();
        let agent = format!("ua{i} {agent}");

        s.client.unary_with("CreateCollection", call(create_collection(&name), ROOT, &agent)).await.unwrap();
        s.client.unary_with("Search", call(search(&name, hostile, hostile), ROOT, &agent)).await.unwrap();
        s.client.unary_with("Query", call(query(&name, hostile, hostile), ROOT, &agent)).await.unwrap();
        // A database named in the body.
        let mut in_database =
            QueryRequest { db_name: hostile.into(), collection_name: "c".into(), ..Default::default() };
        in_database.expr = "id > 0".into();
        s.client.unary_with("Query", call(encode(&in_database), ROOT, &agent)).await.unwrap();
        // A refused login is audited under the name it claimed.
        let status =
            s.client.unary_with("Search", call(search("x", "", "id"), &format!("u{i}{hostile}:bad"), &agent)).await;
        let status = status.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{hostile:?}: {status:?}");
        expected.push((
            name_recorded,
            recorded,
            agent,
            format!("u{i}{}", if hostile == WITH_NUL { NUL_RECORDED } else { hostile }),
        ));
    }

    let n = expected.len() as i64;
    // Search and Query per collection, the Query in another database, the refused Search.
    assert_eq!(s.db.wait_for_count("SELECT count(*) FROM query_logs", 4 * n).await, 4 * n);
    assert_eq!(s.db.wait_for_count("SELECT count(*) FROM audit_logs WHERE grpc_code = 16", n).await, n);
    // (Calls on a collection the mirror does not know add it: the Query in another database did.)
    let created = "SELECT count(*) FROM collections WHERE database_name = 'default'";
    assert_eq!(s.db.wait_for_count(created, n).await, n);
    let pg = s.db.client().await;
    assert_eq!(pg.query_one("SELECT count(*) FROM users", &[]).await.unwrap().get::<_, i64>(0), 1, "users intact");
    for (name, hostile, agent, user) in &expected {
        let row = pg
            .query_one("SELECT id FROM collections WHERE collection_name = $1 AND database_name = 'default'", &[name])
            .await
            .unwrap_or_else(|e| panic!("collection {name:?} recorded verbatim: {e}"));
        let collection_id: uuid::Uuid = row.get(0);
        let rows = pg
            .query(
                "SELECT query_type, filter_expression, output_fields FROM query_logs WHERE collection_id = $1 ORDER BY query_type",
                &[&collection_id],
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), 2, "{name:?}");
        for row in rows {
            assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some(hostile.as_str()));
            let fields: Vec<String> = row.get(2);
            assert_eq!(&fields[0], hostile);
        }
        let in_database = pg
            .query_one("SELECT count(*) FROM query_logs WHERE database_name = $1", &[hostile])
            .await
            .unwrap()
            .get::<_, i64>(0);
        assert_eq!(in_database, 1, "database {hostile:?} recorded verbatim");
        let created = pg
            .query_one(
                "SELECT resource_id, user_agent FROM audit_logs WHERE action = 'create_collection' AND resource_id = $1",
                &[&format!("default.{name}")],
            )
            .await
            .unwrap_or_else(|e| panic!("audit of creating {name:?}: {e}"));
        // (tonic appends its own name to the user agent.)
        let ua: Option<String> = created.get(1);
        assert!(ua.as_deref().is_some_and(|ua| ua.starts_with(agent.as_str())), "{ua:?}");
        let refused = pg
            .query_one("SELECT user_agent FROM audit_logs WHERE grpc_code = 16 AND username = $1", &[user])
            .await
            .unwrap_or_else(|e| panic!("refused login of {user:?} audited under that name: {e}"));
        let ua: Option<String> = refused.get(0);
        assert!(ua.as_deref().is_some_and(|ua| ua.starts_with(agent.as_str())), "{ua:?}");
    }
    s.app.shutdown().await;

    // In the log, every string arrives escaped: no raw escape character, no NUL, and no
    // line that a client wrote.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let text = logs().text();
    assert!(text.contains("DROP TABLE users"), "the calls were logged");
    assert!(!text.contains('\x1b'), "a raw ESC reached the log");
    assert!(!text.contains('\0'), "a raw NUL reached the log");
    for line in text.lines() {
        assert!(!line.starts_with("ERROR forged"), "a client forged a log line: {line:?}");
    }
}

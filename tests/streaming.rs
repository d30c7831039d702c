//! Large inserts stream through: the sidecar reads them up to their rows, decides, and
//! forwards the rest as it arrives, holding back the bytes that complete the message until
//! what follows the rows agrees with what was decided. Real PostgreSQL (users, grants),
//! fake upstream (to see what Milvus would have received).

mod common;

use bytes::{BufMut, Bytes, BytesMut};
use common::fake::FakeUpstream;
use common::pg::TestDb;
use common::{RawClient, encode};
use milvus::proto::milvus::{InsertRequest, MutationResult};
use milvus::proto::schema::{FieldData, FloatArray, VectorField, field_data, vector_field};
use milvus_sidecar::App;
use milvus_sidecar::config::AuthArgs;
use tonic::Code;

const DIM: usize = 128;
/// Rows enough for a message of several HTTP/2 frames (~4 MiB).
const ROWS: usize = 8192;

struct Setup {
    db: TestDb,
    upstream: FakeUpstream,
    app: App,
    _spill: common::TempDir,
}

/// A sidecar with authentication on; `writer` may write to default.docs, nothing else.
async fn setup() -> Setup {
    let db = TestDb::create().await;
    let upstream = FakeUpstream::start().await;
    upstream.reply_with("Insert", encode(&MutationResult { insert_cnt: ROWS as i64, ..Default::default() }));
    let spill = common::TempDir::new("streaming");
    let mut config = common::recording_config(upstream.addr, &db.url(), &spill.path);
    config.auth = AuthArgs::default();
    let app = App::start(config).await.expect("sidecar starts");
    let hash = milvus_sidecar::auth::password::hash("writer-pw");
    let c = db.client().await;
    c.execute("INSERT INTO users (username, role, password_hash) VALUES ('writer', 'user', $1)", &[&hash])
        .await
        .unwrap();
    c.batch_execute(
        "INSERT INTO collections (database_name, collection_name, dimension) VALUES ('default', 'docs', 128), ('default', 'secret', 128);
         INSERT INTO permissions (user_id, collection_id, permission_type)
           SELECT u.id, c.id, 'write' FROM users u, collections c WHERE u.username = 'writer' AND c.collection_name = 'docs';",
    )
    .await
    .unwrap();
    Setup { db, upstream, app, _spill: spill }
}

/// An insert into `collection` as pymilvus encodes it: names, then rows, then num_rows.
fn insert(collection: &str) -> BytesMut {
    let request = InsertRequest {
        collection_name: collection.into(),
        num_rows: ROWS as u32,
        fields_data: vec![FieldData {
            field_name: "vec".into(),
            field: Some(field_data::Field::Vectors(VectorField {
                dim: DIM as i64,
                data: Some(vector_field::Data::FloatVector(FloatArray {
                    data: (0..ROWS * DIM).map(|i| i as f32).collect(),
                })),
                ..Default::default()
            })),
            ..Default::default()
        }],
        ..Default::default()
    };
    BytesMut::from(&encode(&request)[..])
}

/// Appends a string field (as a client that repeats a name after the rows would).
fn then_string(mut msg: BytesMut, field: u8, value: &str) -> Bytes {
    msg.put_u8(field << 3 | 2);
    msg.put_u8(value.len() as u8);
    msg.put_slice(value.as_bytes());
    msg.freeze()
}

async fn call(s: &Setup, credential: &str, body: Bytes) -> Result<Bytes, tonic::Status> {
    use base64::Engine;
    let mut client = RawClient::connect(s.app.running.listen_addr).await;
    let mut request = tonic::Request::new(body);
    let token = base64::engine::general_purpose::STANDARD.encode(credential);
    request.metadata_mut().insert("authorization", token.parse().unwrap());
    client.unary_with("Insert", request).await.map(|r| r.into_inner())
}

/// Whether the upstream ever received `message` whole (it keeps every request's body).
fn upstream_got_whole(s: &Setup, message: &[u8]) -> bool {
    s.upstream.last("Insert").is_some_and(|seen| seen.body.len() > 5 && seen.body[5..] == *message)
}

async fn rows_recorded(s: &Setup) -> Vec<(String, i64, bool)> {
    let c = tokio_postgres::connect(&s.db.url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(c.1);
    let mut waited = 0;
    loop {
        let rows =
            c.0.query(
                "SELECT coalesce((SELECT collection_name FROM collections c WHERE c.id = collection_id), ''),
                        coalesce(rows_sent, -1), success
                   FROM ingestion_logs ORDER BY ingested_at",
                &[],
            )
            .await
            .unwrap();
        if !rows.is_empty() || waited > 50 {
            return rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
        }
        waited += 1;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn an_authorized_insert_streams_through_whole_and_is_recorded_from_its_end() {
    let s = setup().await;
    let message = insert("docs").freeze();
    assert!(message.len() > 4 << 20);

    let reply = call(&s, "writer:writer-pw", message.clone()).await.expect("insert forwarded");

    assert_eq!(reply, encode(&MutationResult { insert_cnt: ROWS as i64, ..Default::default() }));
    assert!(upstream_got_whole(&s, &message), "the message arrives byte for byte");
    // num_rows comes after the rows: it is read from the scan, not from a buffered body.
    assert_eq!(rows_recorded(&s).await, vec![("docs".to_owned(), ROWS as i64, true)]);
}

#[tokio::test]
async fn a_collection_named_again_after_the_rows_cannot_redirect_an_insert() {
    let s = setup().await;
    let message = then_string(insert("docs"), 3, "secret");

    let status = call(&s, "writer:writer-pw", message.clone()).await.unwrap_err();

    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("differs from the one named before them"), "{}", status.message());
    assert!(!upstream_got_whole(&s, &message), "Milvus never holds the complete message");
    // Without the name after the rows, the same user's insert goes through.
    call(&s, "writer:writer-pw", insert("docs").freeze()).await.expect("plain insert forwarded");
}

#[tokio::test]
async fn an_insert_refused_on_its_leading_names_sends_nothing_upstream() {
    let s = setup().await;

    let status = call(&s, "writer:writer-pw", insert("secret").freeze()).await.unwrap_err();

    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(s.upstream.count("Insert"), 0, "nothing was forwarded");
}

#[tokio::test]
async fn an_insert_naming_its_collection_only_after_the_rows_is_read_whole_and_checked() {
    let s = setup().await;
    let allowed = then_string(insert(""), 3, "docs");
    let denied = then_string(insert(""), 3, "secret");

    call(&s, "writer:writer-pw", allowed.clone()).await.expect("insert into docs forwarded");
    assert!(upstream_got_whole(&s, &allowed));
    let status = call(&s, "writer:writer-pw", denied.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(!upstream_got_whole(&s, &denied));
}

#[tokio::test]
async fn a_message_that_breaks_after_its_rows_never_completes_upstream() {
    let s = setup().await;
    let mut broken = insert("docs");
    broken.put_slice(&[0x1a, 0x7f, b'x']); // a string field longer than what is left
    let broken = broken.freeze();

    let status = call(&s, "writer:writer-pw", broken.clone()).await.unwrap_err();

    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("runs past the end of the message"), "{}", status.message());
    assert!(!upstream_got_whole(&s, &broken));
    let recorded = rows_recorded(&s).await;
    assert_eq!(recorded.len(), 1, "the refused insert is recorded: {recorded:?}");
    assert!(!recorded[0].2, "as a failure");
}

//! Authentication and permissions against a real PostgreSQL (users, grants) and a fake
//! upstream (to see exactly what is forwarded and what is not).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::bin::Process;
use common::fake::FakeUpstream;
use common::pg::TestDb;
use common::relay::Relay;
use common::{RawClient, at_least, encode, http_get, sample};
use milvus::proto::common::Status as MilvusStatus;
use milvus::proto::milvus::{
    CreateCollectionRequest, CreateIndexRequest, DescribeIndexRequest, DescribeIndexResponse, DropIndexRequest,
    InsertRequest, MutationResult, SearchRequest, SearchResults, ShowCollectionsResponse,
};
use milvus_sidecar::App;
use milvus_sidecar::config::{AuthArgs, Config};
use tonic::Code;
use tonic::metadata::MetadataValue;

struct Setup {
    db: TestDb,
    upstream: FakeUpstream,
    app: App,
    /// Between the sidecar and PostgreSQL, when a test needs to take PostgreSQL away.
    relay: Option<Relay>,
    _spill: tempfile_dir::Dir,
}

mod tempfile_dir {
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

async fn setup_with(via_relay: bool, tweak: impl FnOnce(&mut Config)) -> Setup {
    let db = TestDb::create().await;
    let relay = if via_relay { Some(Relay::start(db.server()).await) } else { None };
    let database_url = db.url_via(relay.as_ref().map(|r| r.addr.to_string()).as_deref());
    let upstream = FakeUpstream::start().await;
    let ok = encode(&MilvusStatus::default());
    for method in ["CreateCollection", "CreateIndex", "DropCollection"] {
        upstream.reply_with(method, ok.clone());
    }
    let spill = std::env::temp_dir().join(format!("sidecar-auth-{}", uuid::Uuid::now_v7()));
    let mut config = common::recording_config(upstream.addr, &database_url, &spill);
    config.auth = AuthArgs::default();
    tweak(&mut config);
    let app = App::start(config).await.expect("sidecar starts");
    let c = db.client().await;
    // alice: a user with read on default.docs; bob: a disabled user.
    let hash = milvus_sidecar::auth::password::hash("alice-pw");
    c.execute("INSERT INTO users (username, role, password_hash) VALUES ('alice', 'user', $1)", &[&hash])
        .await
        .unwrap();
    c.execute(
        "INSERT INTO users (username, role, password_hash, is_active) VALUES ('bob', 'user', $1, false)",
        &[&hash],
    )
    .await
    .unwrap();
    c.batch_execute(
        "INSERT INTO collections (database_name, collection_name, dimension) VALUES ('default', 'docs', 8), ('default', 'secret', 8);
         INSERT INTO permissions (user_id, collection_id, permission_type)
           SELECT u.id, c.id, 'read' FROM users u, collections c WHERE u.username = 'alice' AND c.collection_name = 'docs';",
    )
    .await
    .unwrap();
    Setup { db, upstream, app, relay, _spill: tempfile_dir::Dir(spill) }
}

async fn setup() -> Setup {
    setup_with(false, |_| {}).await
}

/// base64 of "user:password", as pymilvus sends it.
fn token(credential: &str) -> MetadataValue<tonic::metadata::Ascii> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(credential).parse().unwrap()
}

async fn call(s: &Setup, method: &str, credential: Option<&str>, body: Bytes) -> Result<Bytes, tonic::Status> {
    let mut client = RawClient::connect(s.app.running.listen_addr).await;
    let mut request = tonic::Request::new(body);
    if let Some(c) = credential {
        request.metadata_mut().insert("authorization", token(c));
    }
    client.unary_with(method, request).await.map(|r| r.into_inner())
}

fn search(collection: &str) -> Bytes {
    encode(&SearchRequest { collection_name: collection.into(), nq: 1, ..Default::default() })
}

#[tokio::test]
async fn bad_credentials_are_refused_the_way_milvus_refuses_them() {
    let s = setup().await;
    let cases: [(Option<&str>, Option<&str>, &str); 5] = [
        (None, None, "missing authorization in header"),
        (Some("root:wrong"), None, "auth check failure, please check username and password are correct"),
        (Some("nobody:pw"), None, "auth check failure, please check username and password are correct"),
        (Some("bob:alice-pw"), None, "auth check failure, please check username and password are correct"),
        (Some("an-api-key"), None, "auth check failure, please check api key is correct"),
    ];
    for (credential, _, message) in cases {
        for method in ["Connect", "Search"] {
            let status = call(&s, method, credential, search("docs")).await.unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated, "{credential:?} {method}");
            assert_eq!(status.message(), message, "{credential:?} {method}");
        }
    }
    let mut client = RawClient::connect(s.app.running.listen_addr).await;
    let mut garbage = tonic::Request::new(Bytes::new());
    garbage.metadata_mut().insert("authorization", MetadataValue::from_static("%%%not-base64"));
    assert_eq!(client.unary_with("Connect", garbage).await.unwrap_err().message(), "invalid token format");
    assert_eq!(s.upstream.count("Search") + s.upstream.count("Connect"), 0, "nothing refused reaches Milvus");

    // The default root credential works.
    call(&s, "GetVersion", Some("root:Milvus"), Bytes::new()).await.expect("root:Milvus");
    s.app.shutdown().await;
    let refused = s.db.count("SELECT count(*) FROM audit_logs WHERE grpc_code = 16").await;
    assert_eq!(refused, 11, "every refusal is audited");
    let leaked = s
        .db
        .count("SELECT count(*) FROM audit_logs WHERE details::text LIKE '%wrong%' OR details::text LIKE '%alice-pw%'")
        .await;
    assert_eq!(leaked, 0, "no password in the audit trail");
    let who = s.db.count("SELECT count(*) FROM audit_logs WHERE grpc_code = 16 AND username = 'root'").await;
    assert_eq!(who, 2, "a refused call names who it claimed to be");
}

#[tokio::test]
async fn grants_decide_and_refusals_never_reach_milvus() {
    let s = setup().await;
    let alice = Some("alice:alice-pw");
    call(&s, "Search", alice, search("docs")).await.expect("read grant allows search");
    let status = call(&s, "Search", alice, search("secret")).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(status.message(), "PrivilegeSearch: permission deny to alice on collection default.secret");
    let insert = encode(&InsertRequest { collection_name: "docs".into(), num_rows: 1, ..Default::default() });
    let status = call(&s, "Insert", alice, insert).await.unwrap_err();
    assert_eq!(status.message(), "PrivilegeInsert: permission deny to alice on collection default.docs");
    // Checked before existence, as in Milvus.
    let status = call(&s, "Search", alice, search("no_such_collection")).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // Global operations are for admins.
    let status = call(&s, "CreateCredential", alice, Bytes::new()).await.unwrap_err();
    assert_eq!(status.message(), "PrivilegeCreateOwnership: permission deny to alice");
    // Methods this build does not know: admins only by default.
    let status = call(&s, "SomethingFromMilvus9", alice, Bytes::new()).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    call(&s, "SomethingFromMilvus9", Some("root:Milvus"), Bytes::new()).await.expect("admins may");
    assert_eq!(s.upstream.count("Search"), 1, "only the allowed search was forwarded");
    assert_eq!(s.upstream.count("Insert"), 0);

    // A revoke made in PostgreSQL applies within a second.
    s.db.client().await.batch_execute("DELETE FROM permissions").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        if let Err(status) = call(&s, "Search", alice, search("docs")).await {
            assert_eq!(status.code(), Code::PermissionDenied);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "revocation not seen within 1 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.app.shutdown().await;
    let denied = s.db.count("SELECT count(*) FROM audit_logs WHERE grpc_code = 7").await;
    assert!(denied >= 6, "refusals are audited ({denied})");
}

#[tokio::test]
async fn a_repeated_db_name_is_authorized_as_milvus_reads_it_the_last_one() {
    let s = setup().await;
    // db_name "default" (where alice may read docs), then db_name "" again: Milvus keeps the
    // last value, finds it empty and takes the database from the `dbname` header instead.
    let mut body = encode(&SearchRequest {
        db_name: "default".into(),
        collection_name: "docs".into(),
        nq: 1,
        ..Default::default()
    })
    .to_vec();
    body.extend_from_slice(&[0x12, 0x00]);
    let mut client = RawClient::connect(s.app.running.listen_addr).await;
    let mut request = tonic::Request::new(Bytes::from(body));
    request.metadata_mut().insert("authorization", token("alice:alice-pw"));
    request.metadata_mut().insert("dbname", MetadataValue::from_static("other"));
    let status = client.unary_with("Search", request).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(status.message(), "PrivilegeSearch: permission deny to alice on collection other.docs");
    assert_eq!(s.upstream.count("Search"), 0);

    // A listing names two databases: Milvus lists the last one's, so that is the one the
    // names are filtered against (alice may read default.docs, nothing in other).
    s.upstream.reply_with(
        "ShowCollections",
        encode(&ShowCollectionsResponse {
            status: Some(MilvusStatus::default()),
            collection_names: vec!["docs".into(), "secret".into()],
            ..Default::default()
        }),
    );
    let mut body = vec![0x12, 7];
    body.extend_from_slice(b"default");
    body.extend_from_slice(&[0x12, 5]);
    body.extend_from_slice(b"other");
    let listed = call(&s, "ShowCollections", Some("alice:alice-pw"), Bytes::from(body)).await.unwrap();
    let listed: ShowCollectionsResponse = prost013::Message::decode(listed).unwrap();
    assert!(listed.collection_names.is_empty(), "other.docs is not alice's: {:?}", listed.collection_names);
    s.app.shutdown().await;
}

#[tokio::test]
async fn creators_administer_their_collections_at_once_and_listings_are_filtered() {
    let s = setup().await;
    let alice = Some("alice:alice-pw");
    let create = CreateCollectionRequest { collection_name: "mine".into(), ..Default::default() };
    call(&s, "CreateCollection", alice, encode(&create)).await.expect("users may create collections");
    // Straight away, as pymilvus's quick setup does: index the new collection.
    let index = CreateIndexRequest { collection_name: "mine".into(), field_name: "vec".into(), ..Default::default() };
    call(&s, "CreateIndex", alice, encode(&index)).await.expect("the creator administers it immediately");

    s.upstream.reply_with(
        "ShowCollections",
        encode(&ShowCollectionsResponse {
            status: Some(MilvusStatus::default()),
            collection_names: vec!["docs".into(), "secret".into(), "mine".into()],
            collection_ids: vec![1, 2, 3],
            created_timestamps: vec![10, 20, 30],
            ..Default::default()
        }),
    );
    let listed = call(&s, "ShowCollections", alice, Bytes::new()).await.unwrap();
    let listed: ShowCollectionsResponse = prost013::Message::decode(listed).unwrap();
    assert_eq!(listed.collection_names, vec!["docs", "mine"]);
    assert_eq!(listed.collection_ids, vec![1, 3], "ids stay aligned with names");
    assert_eq!(listed.created_timestamps, vec![10, 30]);
    let all = call(&s, "ShowCollections", Some("root:Milvus"), Bytes::new()).await.unwrap();
    let all: ShowCollectionsResponse = prost013::Message::decode(all).unwrap();
    assert_eq!(all.collection_names.len(), 3, "admins see everything");

    // Switched off in system_config, users may no longer create.
    s.db.client()
        .await
        .batch_execute(
            "UPDATE system_config SET config_value = 'false' WHERE config_key = 'users_may_create_collections'",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let other = CreateCollectionRequest { collection_name: "another".into(), ..Default::default() };
    let status = call(&s, "CreateCollection", alice, encode(&other)).await.unwrap_err();
    assert_eq!(status.message(), "PrivilegeCreateCollection: permission deny to alice");
    s.app.shutdown().await;
    let granted = s
        .db
        .count(
            "SELECT count(*) FROM permissions p JOIN users u ON u.id = p.user_id JOIN collections c ON c.id = p.collection_id
             WHERE u.username = 'alice' AND c.collection_name = 'mine' AND p.permission_type = 'admin'",
        )
        .await;
    assert_eq!(granted, 1, "the creator's admin grant is stored");
}

#[tokio::test]
async fn uncached_decisions_fail_closed_when_postgres_is_away() {
    let s = setup_with(true, |_| {}).await;
    let alice = Some("alice:alice-pw");
    call(&s, "Search", alice, search("docs")).await.expect("cached from now on");
    s.relay.as_ref().unwrap().cut();
    // Cached: alice keeps working while PostgreSQL is away.
    call(&s, "Search", alice, search("docs")).await.expect("a cached decision needs no PostgreSQL");
    // Not cached: root's credential has not been seen yet.
    let status = call(&s, "Search", Some("root:Milvus"), search("docs")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("PostgreSQL"), "{}", status.message());
    s.relay.as_ref().unwrap().restore();
    // The pool reconnects on its own; give it a few seconds.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while let Err(status) = call(&s, "Search", Some("root:Milvus"), search("docs")).await {
        assert!(std::time::Instant::now() < deadline, "not back after PostgreSQL returned: {status:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    s.app.shutdown().await;
}

/// A lookup whose connection goes silent (a network lost without a reset) is answered
/// UNAVAILABLE at the lookup timeout, and that connection is closed rather than pooled
/// again, where it would hold up the next lookups the same way.
#[tokio::test]
async fn a_lookup_on_a_connection_gone_silent_fails_and_the_connection_is_not_reused() {
    let s = setup_with(true, |_| {}).await;
    let relay = s.relay.as_ref().unwrap();
    call(&s, "Search", Some("alice:alice-pw"), search("docs")).await.expect("PostgreSQL answers");
    relay.stall_at(b"password_hash FROM users");

    let started = std::time::Instant::now();
    let status = call(&s, "Search", Some("root:Milvus"), search("docs")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("no answer within 3 s"), "{}", status.message());
    assert!(started.elapsed() < Duration::from_secs(6), "answered at the lookup timeout: {:?}", started.elapsed());
    assert!(
        relay.wait_for_stalled_close(Duration::from_secs(2)).await,
        "the sidecar closed the connection that went silent"
    );

    // The next lookup goes through a connection that answers.
    let started = std::time::Instant::now();
    call(&s, "Search", Some("root:Milvus"), search("docs")).await.expect("the lookup succeeds on another connection");
    assert!(started.elapsed() < Duration::from_secs(2), "not held up: {:?}", started.elapsed());
    s.app.shutdown().await;
}

#[tokio::test]
async fn fail_open_lets_uncached_grants_through_and_anonymous_maps_to_a_user() {
    let s = setup_with(true, |c| {
        c.auth.auth_fail_open = true;
        c.auth.anonymous_user = Some("alice".into());
    })
    .await;
    // No header at all: treated as alice, with alice's grants.
    call(&s, "Search", None, search("docs")).await.expect("anonymous is alice");
    let status = call(&s, "Search", None, search("secret")).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    // carol has no grant at all; the revoke comes last. Each change notification clears the
    // cached grants, so alice's (now empty) grants are cached for the outage by a call made
    // after the revoke's own notification was acted on; notifications arrive in commit
    // order, so carol's is in by then. A call made earlier could be refused on the strength
    // of carol's notification and have its grants cleared again by the revoke's.
    let admin = s.app.running.admin_addr;
    let revokes = "milvus_sidecar_auth_change_notifications_total{table=\"permissions\"}";
    // The set-up's grant notified too: once it is counted it cannot pass for the revoke.
    let before = at_least(admin, revokes, 1.0).await;
    let c = s.db.client().await;
    let hash = milvus_sidecar::auth::password::hash("carol-pw");
    c.execute("INSERT INTO users (username, role, password_hash) VALUES ('carol', 'user', $1)", &[&hash])
        .await
        .unwrap();
    c.batch_execute("DELETE FROM permissions").await.unwrap();
    at_least(admin, revokes, before + 1.0).await;
    call(&s, "Search", None, search("docs")).await.expect_err("the revoke holds");
    // Connect needs no grant: carol's credential is cached, her grants never loaded.
    call(&s, "Connect", Some("carol:carol-pw"), Bytes::new()).await.expect("carol connects");

    s.relay.as_ref().unwrap().cut();
    let searches = s.upstream.count("Search");
    // Uncached grants and PostgreSQL away: let through unchecked, even on a collection
    // carol was never granted, and forwarded as sent.
    call(&s, "Search", Some("carol:carol-pw"), search("secret")).await.expect("fail-open lets carol through");
    assert_eq!(s.upstream.count("Search"), searches + 1, "the call reached Milvus");
    assert_eq!(s.upstream.last("Search").unwrap().body, common::framed(&search("secret")));

    // Fail-open is for uncached grants only. A cached decision still decides...
    let status = call(&s, "Search", None, search("docs")).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "alice's cached (empty) grants: {status:?}");
    // ...rules that need no PostgreSQL still refuse...
    let status = call(&s, "CreateCredential", Some("carol:carol-pw"), Bytes::new()).await.unwrap_err();
    assert_eq!(status.message(), "PrivilegeCreateOwnership: permission deny to carol");
    // ...and a credential that cannot be checked is not taken on trust: a user never
    // seen, an unknown one and a wrong password are UNAVAILABLE, not let in.
    for credential in ["root:Milvus", "nobody:pw", "carol:not-her-password"] {
        let status = call(&s, "Search", Some(credential), search("docs")).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{credential}: {status:?}");
        assert!(status.message().contains("PostgreSQL"), "{credential}: {}", status.message());
    }
    // Headers that are wrong on their face need no PostgreSQL to be refused.
    let status = call(&s, "Search", Some("an-api-key"), search("docs")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(s.upstream.count("Search"), searches + 1, "only carol's search was forwarded");
    let (_, scrape) = http_get(s.app.running.admin_addr, "/metrics").await;
    // carol's search let through, and the three credentials that could not be checked.
    assert_eq!(sample(&scrape, r#"milvus_sidecar_auth_decisions_total{decision="unavailable"}"#), 4.0, "{scrape}");
    // A listing that cannot be filtered (carol's grants unread) is Milvus's, unfiltered.
    let everything = ShowCollectionsResponse {
        collection_names: vec!["docs".into(), "secret".into()],
        collection_ids: vec![1, 2],
        ..Default::default()
    };
    s.upstream.reply_with("ShowCollections", encode(&everything));
    let listed = call(&s, "ShowCollections", Some("carol:carol-pw"), Bytes::new()).await.expect("carol lists");
    assert_eq!(listed, encode(&everything), "passed through as Milvus sent it");

    // Back to normal once PostgreSQL returns: carol's grants are read, and refuse.
    s.relay.as_ref().unwrap().restore();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match call(&s, "Search", Some("carol:carol-pw"), search("secret")).await {
            Err(status) if status.code() == Code::PermissionDenied => break,
            other => assert!(std::time::Instant::now() < deadline, "carol still let through: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    s.app.shutdown().await;
}

#[tokio::test]
async fn index_changes_need_an_admin_grant_and_read_or_write_is_not_enough() {
    let s = setup().await;
    // walter writes to docs, adam administers it; both have role `user`, so the grant
    // alone decides.
    let c = s.db.client().await;
    let hash = milvus_sidecar::auth::password::hash("pw");
    for (user, level) in [("walter", "write"), ("adam", "admin")] {
        c.execute("INSERT INTO users (username, role, password_hash) VALUES ($1, 'user', $2)", &[&user, &hash])
            .await
            .unwrap();
        c.execute(
            "INSERT INTO permissions (user_id, collection_id, permission_type)
             SELECT u.id, c.id, $2 FROM users u, collections c WHERE u.username = $1 AND c.collection_name = 'docs'",
            &[&user, &level],
        )
        .await
        .unwrap();
    }
    let ok = MilvusStatus::default();
    s.upstream.reply_with("DropIndex", encode(&ok));
    s.upstream
        .reply_with("DescribeIndex", encode(&DescribeIndexResponse { status: Some(ok.clone()), ..Default::default() }));
    s.upstream.reply_with("Insert", encode(&MutationResult { status: Some(ok), insert_cnt: 1, ..Default::default() }));
    let create =
        encode(&CreateIndexRequest { collection_name: "docs".into(), field_name: "vec".into(), ..Default::default() });
    let drop = encode(&DropIndexRequest {
        collection_name: "docs".into(),
        field_name: "vec".into(),
        index_name: "vec".into(),
        ..Default::default()
    });

    // Their grants do work, so the refusals below are about the level alone.
    let describe = encode(&DescribeIndexRequest { collection_name: "docs".into(), ..Default::default() });
    call(&s, "DescribeIndex", Some("alice:alice-pw"), describe).await.expect("read may describe the index");
    let insert = encode(&InsertRequest { collection_name: "docs".into(), num_rows: 1, ..Default::default() });
    call(&s, "Insert", Some("walter:pw"), insert).await.expect("write may insert");
    for (credential, user) in [("alice:alice-pw", "alice"), ("walter:pw", "walter")] {
        for (method, body, privilege) in
            [("CreateIndex", &create, "PrivilegeCreateIndex"), ("DropIndex", &drop, "PrivilegeDropIndex")]
        {
            let status = call(&s, method, Some(credential), body.clone()).await.unwrap_err();
            assert_eq!(status.code(), Code::PermissionDenied, "{user} {method}: {status:?}");
            assert_eq!(status.message(), format!("{privilege}: permission deny to {user} on collection default.docs"));
        }
    }
    assert_eq!(s.upstream.count("CreateIndex") + s.upstream.count("DropIndex"), 0, "no refused call reached Milvus");

    call(&s, "CreateIndex", Some("adam:pw"), create.clone()).await.expect("an admin grant may create the index");
    call(&s, "DropIndex", Some("adam:pw"), drop.clone()).await.expect("an admin grant may drop the index");
    assert_eq!(s.upstream.last("CreateIndex").unwrap().body, common::framed(&create));
    assert_eq!(s.upstream.last("DropIndex").unwrap().body, common::framed(&drop));
    assert_eq!(s.upstream.count("CreateIndex") + s.upstream.count("DropIndex"), 2);
    s.app.shutdown().await;
    let refused =
        s.db.count("SELECT count(*) FROM audit_logs WHERE grpc_code = 7 AND action IN ('create_index', 'drop_index')")
            .await;
    assert_eq!(refused, 4, "every refusal is audited");
}

#[tokio::test]
async fn two_sidecars_on_one_database_both_follow_a_revocation() {
    let s = setup().await;
    let spill = std::env::temp_dir().join(format!("sidecar-auth-{}", uuid::Uuid::now_v7()));
    let _spill = tempfile_dir::Dir(spill.clone());
    let mut config = common::recording_config(s.upstream.addr, &s.db.url(), &spill);
    config.auth = AuthArgs::default();
    let second = App::start(config).await.expect("a second sidecar starts on the same database");
    let alice = Some("alice:alice-pw");
    let via_second = |body: Bytes| {
        let addr = second.running.listen_addr;
        async move {
            let mut client = RawClient::connect(addr).await;
            let mut request = tonic::Request::new(body);
            request.metadata_mut().insert("authorization", token("alice:alice-pw"));
            client.unary_with("Search", request).await.map(|r| r.into_inner())
        }
    };
    call(&s, "Search", alice, search("docs")).await.expect("first sidecar allows");
    via_second(search("docs")).await.expect("second sidecar allows");

    // Revoked through the first sidecar's database (as the CLI or SQL would).
    s.db.client().await.batch_execute("DELETE FROM permissions").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    let (mut first_denied, mut second_denied) = (false, false);
    while !(first_denied && second_denied) {
        assert!(std::time::Instant::now() < deadline, "both sidecars see the revocation within 1 s");
        first_denied = first_denied || call(&s, "Search", alice, search("docs")).await.is_err();
        second_denied = second_denied || via_second(search("docs")).await.is_err();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    second.shutdown().await;
    s.app.shutdown().await;
}

#[tokio::test]
async fn a_service_credential_replaces_the_callers_towards_milvus() {
    let s = setup_with(false, |c| c.auth.upstream_credential = Some("svc:upstream-secret".into())).await;
    call(&s, "Search", Some("alice:alice-pw"), search("docs")).await.expect("allowed");
    let seen = s.upstream.last("Search").unwrap();
    use base64::Engine;
    let expected = base64::engine::general_purpose::STANDARD.encode("svc:upstream-secret");
    assert_eq!(seen.headers["authorization"], expected.as_str(), "Milvus sees the sidecar's credential");
    s.app.shutdown().await;

    // By default the caller's own header passes through.
    let s = setup().await;
    call(&s, "Search", Some("alice:alice-pw"), search("docs")).await.expect("allowed");
    let seen = s.upstream.last("Search").unwrap();
    let expected = base64::engine::general_purpose::STANDARD.encode("alice:alice-pw");
    assert_eq!(seen.headers["authorization"], expected.as_str());
    s.app.shutdown().await;
}

#[tokio::test]
async fn metrics_count_calls_decisions_and_recording() {
    let s = setup_with(false, |c| c.telemetry.metrics_collection_limit = 1).await;
    let admin = s.app.running.admin_addr;
    let alice = Some("alice:alice-pw");
    s.upstream
        .reply_with("Search", encode(&SearchResults { status: Some(MilvusStatus::default()), ..Default::default() }));
    call(&s, "Search", alice, search("docs")).await.unwrap();
    call(&s, "Search", alice, search("docs")).await.unwrap();
    call(&s, "Search", alice, search("secret")).await.unwrap_err();
    call(&s, "Connect", Some("alice:wrong"), Bytes::new()).await.unwrap_err();
    call(&s, "SomethingFromMilvus9", Some("root:Milvus"), Bytes::new()).await.unwrap();
    let failing = MilvusStatus { code: 100, reason: "collection not loaded".into(), ..Default::default() };
    s.upstream.reply_with("Search", encode(&SearchResults { status: Some(failing), ..Default::default() }));
    call(&s, "Search", alice, search("docs")).await.unwrap();

    // Recording is asynchronous: wait for the writer to have stored the six calls.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let scrape = loop {
        let (code, scrape) = http_get(admin, "/metrics").await;
        assert_eq!(code, 200);
        if sample(&scrape, "milvus_sidecar_recording_rows_written_total") >= 6.0 {
            break scrape;
        }
        assert!(std::time::Instant::now() < deadline, "rows never written:\n{scrape}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let expect = [
        (r#"milvus_sidecar_calls_total{method="Search",outcome="ok"}"#, 2.0),
        (r#"milvus_sidecar_calls_total{method="Search",outcome="milvus_error"}"#, 1.0),
        (r#"milvus_sidecar_calls_total{method="Search",outcome="refused"}"#, 1.0),
        (r#"milvus_sidecar_calls_total{method="Connect",outcome="refused"}"#, 1.0),
        // Methods this build does not know share one label, whatever clients send.
        (r#"milvus_sidecar_calls_total{method="other",outcome="ok"}"#, 1.0),
        (r#"milvus_sidecar_overhead_seconds_count{method="Search"}"#, 4.0),
        (r#"milvus_sidecar_upstream_seconds_count{method="Search"}"#, 3.0),
        // One collection label allowed: the first called keeps it, the rest are `other`.
        (r#"milvus_sidecar_collection_calls_total{collection="default.docs",outcome="ok"}"#, 2.0),
        (r#"milvus_sidecar_collection_calls_total{collection="default.docs",outcome="milvus_error"}"#, 1.0),
        (r#"milvus_sidecar_collection_calls_total{collection="other",outcome="refused"}"#, 1.0),
        (r#"milvus_sidecar_auth_decisions_total{decision="denied"}"#, 1.0),
        (r#"milvus_sidecar_auth_decisions_total{decision="unauthenticated"}"#, 1.0),
        (r#"milvus_sidecar_auth_decisions_total{decision="allowed"}"#, 4.0),
        // argon2 once per credential: alice's, the wrong one, root's (a users change seen
        // meanwhile, from the set-up, has alice's row read again but not her hash checked).
        ("milvus_sidecar_auth_password_checks_total", 3.0),
        ("milvus_sidecar_inflight_calls", 0.0),
        ("milvus_sidecar_recording_rows_dropped_total", 0.0),
        ("milvus_sidecar_postgres_up", 1.0),
        ("milvus_sidecar_upstream_up", 1.0),
    ];
    for (series, value) in expect {
        assert_eq!(sample(&scrape, series), value, "{series} in\n{scrape}");
    }
    let lookups = |result: &str| {
        sample(&scrape, &format!(r#"milvus_sidecar_auth_cache_lookups_total{{cache="credentials",result="{result}"}}"#))
    };
    assert_eq!(lookups("hit") + lookups("miss"), 6.0, "one credential lookup per call");
    assert!(lookups("hit") >= 2.0, "alice's later calls are served from the cache\n{scrape}");
    assert!(!scrape.contains("SomethingFromMilvus9"), "unknown method names never become labels");
    let (_, ready) = http_get(admin, "/readyz").await;
    assert!(ready.contains("upstream: ok") && ready.contains("postgres: ok"), "{ready}");

    // PostgreSQL away: still ready (calls are served), and the report says why.
    let s2 = setup_with(true, |_| {}).await;
    s2.relay.as_ref().unwrap().cut();
    let (code, ready) = http_get(s2.app.running.admin_addr, "/readyz").await;
    assert_eq!(code, 200, "{ready}");
    assert!(ready.contains("postgres: down"), "{ready}");
    let (_, scrape) = http_get(s2.app.running.admin_addr, "/metrics").await;
    assert_eq!(sample(&scrape, "milvus_sidecar_postgres_up"), 0.0);
    s2.relay.as_ref().unwrap().restore();
    s.app.shutdown().await;
    s2.app.shutdown().await;
}

#[tokio::test]
async fn a_burst_of_new_callers_costs_one_password_check_and_user_changes_no_more() {
    let s = setup().await;
    let admin = s.app.running.admin_addr;
    let checks = || async { sample(&http_get(admin, "/metrics").await.1, "milvus_sidecar_auth_password_checks_total") };
    let burst = (0..16).map(|_| call(&s, "Search", Some("alice:alice-pw"), search("docs")));
    for reply in futures::future::join_all(burst).await {
        reply.expect("alice may search docs");
    }
    assert_eq!(checks().await, 1.0, "sixteen calls at once share one argon2 verification");

    // Another user changes: alice's credential is checked against her row again (it could
    // have been her), but her hash is the one verified, so argon2 does not run.
    let misses = || async {
        sample(
            &http_get(admin, "/metrics").await.1,
            r#"milvus_sidecar_auth_cache_lookups_total{cache="credentials",result="miss"}"#,
        )
    };
    let before = misses().await;
    let c = s.db.client().await;
    c.batch_execute("UPDATE users SET email = 'bob@example.com' WHERE username = 'bob'").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while misses().await == before {
        assert!(std::time::Instant::now() < deadline, "the users change was not noticed");
        call(&s, "Search", Some("alice:alice-pw"), search("docs")).await.expect("still alice");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(checks().await, 1.0, "an unchanged hash needs no new verification");

    // Her password changes: the old one stops working at once, the new one works.
    let hash = milvus_sidecar::auth::password::hash("new-pw");
    c.execute("UPDATE users SET password_hash = $1 WHERE username = 'alice'", &[&hash]).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while call(&s, "Search", Some("alice:alice-pw"), search("docs")).await.is_ok() {
        assert!(std::time::Instant::now() < deadline, "the old password still works");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    call(&s, "Search", Some("alice:new-pw"), search("docs")).await.expect("the new password works");
    s.app.shutdown().await;
}

// ---- the binary itself: what it logs, from start-up to exit ----

/// `serve` arguments for the binary in front of `upstream`, recording into `db`.
fn serve_args(db: &TestDb, upstream: &FakeUpstream, spill: &common::TempDir) -> Vec<String> {
    vec![
        "--upstream".into(),
        format!("http://{}", upstream.addr),
        "--database-url".into(),
        db.url(),
        "--spill-dir".into(),
        spill.path.display().to_string(),
    ]
}

/// Runs the binary once, has `root:password` make one call (proving which password root
/// has), stops it and returns its log.
async fn serve_once(args: &[String], env: &[(&str, &str)], root_password: &str) -> String {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let p = Process::serve(&args, env).await;
    let mut client = RawClient::connect(p.listen).await;
    let mut request = tonic::Request::new(Bytes::new());
    request.metadata_mut().insert("authorization", token(&format!("root:{root_password}")));
    let reply = client.unary_with("GetVersion", request).await;
    let (status, log) = p.stop().await;
    assert!(reply.is_ok(), "root:{root_password} is refused: {reply:?}\n{log}");
    assert_eq!(status.code(), Some(0), "{log}");
    log
}

/// argon2 takes 19 MiB per password check, on a blocking thread. Checks that ran side by
/// side on several threads must not leave their blocks resident (with glibc's defaults one
/// stayed per thread: 68 MiB idle).
#[tokio::test(flavor = "multi_thread")]
async fn password_checks_give_their_memory_back() {
    const USERS: usize = 6;
    let db = TestDb::create().await;
    let upstream = FakeUpstream::start().await;
    let spill = common::TempDir::new("auth-rss-spill");
    let args = serve_args(&db, &upstream, &spill);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let p = Process::serve(&args, &[("MILVUS_SIDECAR_ROOT_PASSWORD", "Root-Pw-Rss")]).await;
    let c = db.client().await;
    for i in 0..USERS {
        let hash = milvus_sidecar::auth::password::hash(&format!("pw-{i}"));
        c.execute(
            "INSERT INTO users (username, role, password_hash) VALUES ($1, 'user', $2)",
            &[&format!("u{i}"), &hash],
        )
        .await
        .unwrap();
    }
    let before = p.rss_mib();
    // At once, so that the checks run on as many blocking threads.
    let calls = (0..USERS).map(|i| {
        let listen = p.listen;
        async move {
            let mut client = RawClient::connect(listen).await;
            let mut request = tonic::Request::new(Bytes::new());
            request.metadata_mut().insert("authorization", token(&format!("u{i}:pw-{i}")));
            client.unary_with("GetVersion", request).await
        }
    });
    for reply in futures::future::join_all(calls).await {
        assert!(reply.is_ok(), "{reply:?}\n{}", p.log());
    }
    let after = p.rss_mib();
    let (status, log) = p.stop().await;
    assert_eq!(status.code(), Some(0), "{log}");
    // One block kept would be 19 MiB more. Measured: 1.6 MiB more; 97 MiB more with
    // jemalloc's arena for large blocks turned off (`_RJEM_MALLOC_CONF=oversize_threshold:0`).
    // Growth, not a level: a debug build's larger binary starts at 26 MiB.
    assert!(after - before < 12.0, "RSS {before:.1} MiB before {USERS} password checks, {after:.1} after");
}

const DEFAULT_PASSWORD_WARNING: &str = "SECURITY: user root still has the default password 'Milvus'";

#[tokio::test(flavor = "multi_thread")]
async fn root_is_warned_about_while_its_password_is_the_default() {
    let db = TestDb::create().await;
    let upstream = FakeUpstream::start().await;
    let spill = common::TempDir::new("auth-root-spill");
    let args = serve_args(&db, &upstream, &spill);
    let env = [("RUST_LOG", "info")];
    let warnings = |log: &str| log.lines().filter(|l| l.contains(DEFAULT_PASSWORD_WARNING)).count();

    let log = serve_once(&args, &env, "Milvus").await;
    assert!(log.contains("created the root admin user"), "{log}");
    assert_eq!(warnings(&log), 1, "{log}");
    let line = log.lines().find(|l| l.contains(DEFAULT_PASSWORD_WARNING)).unwrap();
    assert!(line.contains(" WARN "), "the warning is at warn level: {line}");

    // Not only when root is created: every start warns while the default stays.
    let log = serve_once(&args, &env, "Milvus").await;
    assert!(!log.contains("created the root admin user"), "root exists already: {log}");
    assert_eq!(warnings(&log), 1, "{log}");

    let set = std::process::Command::new(common::bin::BIN)
        .args(["user", "set-password", "root", "--password-stdin", "--database-url", &db.url()])
        .env_clear()
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    set.stdin.as_ref().unwrap().write_all(b"Changed-Root-Pw\n").unwrap();
    let out = set.wait_with_output().unwrap();
    assert!(out.status.success(), "set-password: {}", String::from_utf8_lossy(&out.stderr));
    let log = serve_once(&args, &env, "Changed-Root-Pw").await;
    assert_eq!(warnings(&log), 0, "the password was changed: {log}");

    // A fresh database given another initial password never had the default.
    let db = TestDb::create().await;
    let args = serve_args(&db, &upstream, &spill);
    let env = [("RUST_LOG", "info"), ("MILVUS_SIDECAR_ROOT_PASSWORD", "Initial-Root-Pw")];
    let log = serve_once(&args, &env, "Initial-Root-Pw").await;
    assert!(log.contains("created the root admin user"), "{log}");
    assert_eq!(warnings(&log), 0, "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_password_reaches_the_log_at_debug_level_or_any_row() {
    let db = TestDb::create().await;
    let upstream = FakeUpstream::start().await;
    let ok = MilvusStatus::default();
    upstream.reply_with("Search", encode(&SearchResults { status: Some(ok.clone()), ..Default::default() }));
    let spill = common::TempDir::new("auth-leak-spill");
    let args = serve_args(&db, &upstream, &spill);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Distinct strings, found nowhere else, so that any occurrence is a leak.
    let root_pw = "Root-Pw-7c1e";
    let alice_pw = "Alice-Pw-3b9d";
    let env = [("RUST_LOG", "debug"), ("MILVUS_SIDECAR_ROOT_PASSWORD", root_pw)];
    let p = Process::serve(&args, &env).await;
    let c = db.client().await;
    let hash = milvus_sidecar::auth::password::hash(alice_pw);
    c.execute("INSERT INTO users (username, role, password_hash) VALUES ('alice', 'user', $1)", &[&hash])
        .await
        .unwrap();

    let garbage = "%%%Garbage-Pw-1f6b";
    let not_utf8 = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(b"\xffroot:Bytes-Pw-5a0c")
    };
    let headers: Vec<(String, Option<Code>)> = vec![
        (token(&format!("root:{root_pw}")).to_str().unwrap().into(), None),
        (token(&format!("alice:{alice_pw}")).to_str().unwrap().into(), Some(Code::PermissionDenied)),
        (token("root:Wrong-Pw-5e2a").to_str().unwrap().into(), Some(Code::Unauthenticated)),
        (token("ghost:Ghost-Pw-8d4f").to_str().unwrap().into(), Some(Code::Unauthenticated)),
        (token("ApiKey-Secret-4a7c").to_str().unwrap().into(), Some(Code::Unauthenticated)),
        (garbage.into(), Some(Code::Unauthenticated)),
        (not_utf8.clone(), Some(Code::Unauthenticated)),
    ];
    let mut client = RawClient::connect(p.listen).await;
    for (header, refused) in &headers {
        for (method, body) in [("Connect", Bytes::new()), ("Search", search("docs"))] {
            let mut request = tonic::Request::new(body);
            request.metadata_mut().insert("authorization", header.parse().unwrap());
            let reply = client.unary_with(method, request).await;
            // Connect needs no grant: alice is refused only her search.
            let want = if method == "Connect" && *refused == Some(Code::PermissionDenied) { None } else { *refused };
            assert_eq!(reply.as_ref().err().map(|s| s.code()), want, "{header} {method}: {reply:?}");
        }
    }
    let (status, log) = p.stop().await;
    assert_eq!(status.code(), Some(0), "{log}");
    // The log did capture the calls at debug level, refusals included.
    assert!(log.contains(" DEBUG "), "no debug lines: {log}");
    assert!(log.contains("milvus_sidecar::call"), "no per-call lines: {log}");
    assert!(log.contains("invalid token format"), "the garbage header's refusal is not logged: {log}");

    let secrets =
        [root_pw, alice_pw, "Wrong-Pw-5e2a", "Ghost-Pw-8d4f", "ApiKey-Secret-4a7c", "Garbage-Pw-1f6b", "Bytes-Pw-5a0c"];
    for secret in secrets {
        assert!(!log.contains(secret), "{secret} is in the log:\n{log}");
        assert_eq!(db.rows_containing(secret).await, 0, "{secret} is in a row");
    }
    // Nor a hash to guess passwords against offline.
    assert!(!log.contains("$argon2"), "a password hash is in the log:\n{log}");
    // Nor the header as sent (base64 hides nothing).
    for (header, _) in &headers {
        assert!(!log.contains(header.as_str()), "the header {header} is in the log:\n{log}");
        assert_eq!(db.rows_containing(header).await, 0, "the header {header} is in a row");
    }
    // Every call was recorded before the exit, so the rows above were there to leak.
    let audited = db.count("SELECT count(*) FROM audit_logs WHERE grpc_code = 16").await;
    assert_eq!(audited, 10, "five bad credentials, two calls each");
}

/// Load balancers and Kubernetes' `grpc` probes send no credentials: the health service is
/// answered without them, while every Milvus method still needs them, and probes leave no
/// rows in the log tables.
#[tokio::test]
async fn the_grpc_health_check_needs_no_credentials_and_leaves_no_record() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;

    let s = setup().await;
    let mut health = common::health_client(s.app.running.listen_addr).await;
    for _ in 0..3 {
        let reply = health.check(HealthCheckRequest { service: String::new() }).await.expect("no credential needed");
        assert_eq!(reply.into_inner().status(), ServingStatus::Serving);
    }
    let refused = call(&s, "Search", None, search("docs")).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "Milvus methods still need a credential");
    s.app.shutdown().await;

    assert_eq!(s.db.count("SELECT count(*) FROM audit_logs").await, 1, "only the refused Search is audited");
    assert_eq!(s.db.count("SELECT count(*) FROM audit_logs WHERE grpc_code = 16").await, 1);
    let logged = s.db.count("SELECT count(*) FROM performance_metrics WHERE operation_type ILIKE '%check%'").await;
    assert_eq!(logged, 0, "health checks are not calls to Milvus");
}

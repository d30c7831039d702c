//! Property tests over everything that parses client or upstream bytes: the view decoders,
//! the wire string scanner, the `authorization` / `dbname` headers and the ShowCollections
//! rewrite. Arbitrary input must never panic; real messages (encoded by the Milvus SDK's own
//! types) must give back the fields the sidecar reads.
//!
//! The default run is short (256 cases per property). A longer one:
//!     PROPTEST_CASES=100000 cargo test --release --test fuzz
//! A failing case is shrunk and printed; turn it into a named test in `regressions` below.

use base64::Engine;
use http::{HeaderMap, HeaderValue};
use milvus::proto::common::{KeyValuePair, Status};
use milvus::proto::milvus::{
    CreateIndexRequest, DeleteRequest, DropCollectionRequest, InsertRequest, MutationResult, QueryRequest,
    RenameCollectionRequest, SearchRequest, SearchResults, ShowCollectionsResponse,
};
use milvus::proto::schema::SearchResultData;
use milvus_sidecar::auth::{claimed_user, identity};
use milvus_sidecar::facts::{Outcome, ReplyDetail, RequestDetail};
use milvus_sidecar::milvus::{Rpc, views, wire};
use milvus_sidecar::proxy::rewrite::filter_show_collections;
use proptest::prelude::*;
use prost013::Message;

// ---- inputs ----

/// Bytes that look like protobuf often enough to get past the first key: a run of fields
/// with random numbers and wire types (some invalid), lengths that may lie, and noise.
fn protoish() -> impl Strategy<Value = Vec<u8>> {
    let field = (1u32..24, 0u8..8, proptest::collection::vec(any::<u8>(), 0..24), any::<bool>());
    (proptest::collection::vec(field, 0..12), proptest::collection::vec(any::<u8>(), 0..4)).prop_map(
        |(fields, tail)| {
            let mut out = Vec::new();
            for (number, wire_type, payload, lie) in fields {
                put_varint(&mut out, u64::from(number << 3 | u32::from(wire_type)));
                match wire_type {
                    0 => put_varint(&mut out, payload.iter().map(|b| u64::from(*b)).sum()),
                    2 => {
                        let len = if lie { payload.len() as u64 + 7 } else { payload.len() as u64 };
                        put_varint(&mut out, len);
                        out.extend_from_slice(&payload);
                    }
                    _ => out.extend_from_slice(&payload),
                }
            }
            out.extend_from_slice(&tail);
            out
        },
    )
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![proptest::collection::vec(any::<u8>(), 0..256), protoish()]
}

/// Any string, NUL and control characters included (valid UTF-8, as protobuf requires).
fn text() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[a-z_]{0,12}", Just(String::new()), Just("'; DROP TABLE users; --\0\x1b[2J".into())]
}

fn texts() -> impl Strategy<Value = Vec<String>> {
    proptest::collection::vec(text(), 0..4)
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

fn kv(key: &str, value: &str) -> KeyValuePair {
    KeyValuePair { key: key.into(), value: value.into() }
}

/// A header value made of whatever bytes HTTP allows in one (tab, visible ASCII, obs-text).
fn header_value() -> impl Strategy<Value = HeaderValue> {
    let byte = prop_oneof![Just(b'\t'), 0x20u8..0x7f, 0x80u8..=0xff];
    proptest::collection::vec(byte, 0..64).prop_map(|b| HeaderValue::from_bytes(&b).expect("allowed bytes"))
}

// ---- arbitrary input never panics ----

proptest! {
    #[test]
    fn view_decoders_never_panic(msg in bytes()) {
        for rpc in Rpc::ALL {
            let _ = views::read_request(rpc.request(), &msg);
            let mut outcome = Outcome::default();
            let _ = views::read_reply(rpc.reply(), &msg, &mut outcome);
        }
    }

    #[test]
    fn wire_scanner_never_panics(msg in bytes(), number in 0u32..32) {
        if let Some(found) = wire::strings(&msg, number) {
            for s in found {
                prop_assert!(s.len() <= msg.len());
            }
        }
        let mut rest = &msg[..];
        let _ = wire::varint(&mut rest);
    }

    /// Authorization reads names with the wire scanner, Milvus with a protobuf decoder:
    /// where both read a message, the scanner's last value is the decoder's (a repeated
    /// singular field counts once, the last time, in protobuf).
    #[test]
    fn wire_scanner_agrees_with_protobuf_on_the_value_that_counts(msg in protoish()) {
        let Ok(decoded) = <views::CollectionRequest as prost::Message>::decode(&msg[..]) else { return Ok(()) };
        if let Some(dbs) = wire::strings(&msg, 2) {
            prop_assert_eq!(dbs.last().copied().unwrap_or(""), decoded.db_name.as_str());
        }
        if let Some(names) = wire::strings(&msg, 3) {
            prop_assert_eq!(names.last().copied().unwrap_or(""), decoded.collection_name.as_str());
        }
    }

    #[test]
    fn show_collections_rewrite_never_panics(msg in bytes(), keep in any::<bool>()) {
        if let Some(out) = filter_show_collections(&msg, |_| keep) {
            // What it writes is well-formed, so it can be read again.
            prop_assert!(filter_show_collections(&out, |_| true).is_some());
        }
    }

    #[test]
    fn header_parsing_never_panics(value in header_value()) {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, value.clone());
        headers.insert("dbname", value);
        let _ = identity::credential(&headers);
        let _ = claimed_user(&headers);
        let db = identity::database(&headers);
        prop_assert!(!db.is_empty());
    }
}

// ---- real messages give back what the sidecar reads ----

proptest! {
    #[test]
    fn search_request_round_trips(
        db in text(), collection in text(), partitions in texts(), dsl in text(), output in texts(),
        nq in any::<i64>(), top_k in any::<i64>(),
    ) {
        let msg = SearchRequest {
            db_name: db.clone(),
            collection_name: collection.clone(),
            partition_names: partitions.clone(),
            dsl: dsl.clone(),
            output_fields: output.clone(),
            nq,
            search_params: vec![kv("metric_type", "L2"), kv("topk", &top_k.to_string())],
            ..Default::default()
        }
        .encode_to_vec();
        let facts = views::read_request(Rpc::Search.request(), &msg).unwrap();
        prop_assert_eq!(facts.database.as_deref(), non_empty(&db));
        prop_assert_eq!(facts.collection.as_deref(), non_empty(&collection));
        prop_assert_eq!(&facts.partitions, &partitions);
        let RequestDetail::Search(s) = facts.detail else { panic!("not a search") };
        prop_assert_eq!((s.nq, s.top_k), (nq, Some(top_k)));
        prop_assert_eq!(&s.filter, &dsl);
        prop_assert_eq!(&s.output_fields, &output);
        // The wire scanner finds the same collection (proto3 leaves empty strings out).
        prop_assert_eq!(wire::strings(&msg, 3).unwrap(), non_empty(&collection).into_iter().collect::<Vec<_>>());
        prop_assert_eq!(wire::strings(&msg, 4).unwrap(), partitions.iter().map(String::as_str).collect::<Vec<_>>());
    }

    #[test]
    fn query_request_round_trips(collection in text(), expr in text(), output in texts(), limit in any::<i64>()) {
        let msg = QueryRequest {
            collection_name: collection.clone(),
            expr: expr.clone(),
            output_fields: output.clone(),
            query_params: vec![kv("limit", &limit.to_string())],
            ..Default::default()
        }
        .encode_to_vec();
        let facts = views::read_request(Rpc::Query.request(), &msg).unwrap();
        prop_assert_eq!(facts.collection.as_deref(), non_empty(&collection));
        prop_assert_eq!(facts.detail, RequestDetail::Query { filter: expr, output_fields: output, limit: Some(limit) });
    }

    #[test]
    fn mutation_requests_round_trip(collection in text(), partition in text(), rows in any::<u32>(), expr in text()) {
        let insert = InsertRequest {
            collection_name: collection.clone(),
            partition_name: partition.clone(),
            num_rows: rows,
            ..Default::default()
        }
        .encode_to_vec();
        let facts = views::read_request(Rpc::Insert.request(), &insert).unwrap();
        prop_assert_eq!(facts.collection.as_deref(), non_empty(&collection));
        prop_assert_eq!(facts.partitions, non_empty(&partition).map(str::to_owned).into_iter().collect::<Vec<_>>());
        prop_assert_eq!(facts.detail, RequestDetail::Insert { rows: u64::from(rows) });

        let delete = DeleteRequest { collection_name: collection.clone(), expr: expr.clone(), ..Default::default() };
        let facts = views::read_request(Rpc::Delete.request(), &delete.encode_to_vec()).unwrap();
        prop_assert_eq!(facts.detail, RequestDetail::Delete { filter: expr });
    }

    #[test]
    fn collection_and_index_requests_round_trip(
        db in text(), collection in text(), field in text(), index in text(), key in text(), value in text(),
    ) {
        let drop = DropCollectionRequest { db_name: db.clone(), collection_name: collection.clone(), ..Default::default() };
        let facts = views::read_request(Rpc::DropCollection.request(), &drop.encode_to_vec()).unwrap();
        prop_assert_eq!(facts.database.as_deref(), non_empty(&db));
        prop_assert_eq!(facts.collection.as_deref(), non_empty(&collection));

        let create = CreateIndexRequest {
            collection_name: collection.clone(),
            field_name: field.clone(),
            index_name: index.clone(),
            extra_params: vec![kv(&key, &value)],
            ..Default::default()
        };
        let facts = views::read_request(Rpc::CreateIndex.request(), &create.encode_to_vec()).unwrap();
        prop_assert_eq!(facts.detail, RequestDetail::Index { field_name: field, index_name: index, params: vec![(key, value)] });
    }

    #[test]
    fn rename_round_trips(old in text(), new in text(), new_db in text()) {
        let msg = RenameCollectionRequest { old_name: old.clone(), new_name: new.clone(), new_db_name: new_db.clone(), ..Default::default() };
        let facts = views::read_request(Rpc::RenameCollection.request(), &msg.encode_to_vec()).unwrap();
        prop_assert_eq!(facts.collection.as_deref(), non_empty(&old));
        prop_assert_eq!(facts.detail, RequestDetail::Rename { new_name: new, new_database: non_empty(&new_db).map(str::to_owned) });
    }

    #[test]
    fn replies_round_trip(
        code in any::<i32>(), reason in text(), topks in proptest::collection::vec(0i64..1000, 0..8),
        counts in (any::<i64>(), any::<i64>(), any::<i64>()),
    ) {
        #[allow(deprecated)]
        let status = Status { code, reason: reason.clone(), ..Default::default() };
        let expect_failure = |outcome: &Outcome| {
            if code != 0 {
                assert_eq!(outcome.milvus_code, code);
                assert_eq!(outcome.message.as_deref(), Some(reason.as_str()));
            } else {
                assert!(outcome.is_success());
            }
        };

        let mut outcome = Outcome::default();
        views::read_reply(Rpc::DropCollection.reply(), &status.encode_to_vec(), &mut outcome).unwrap();
        expect_failure(&outcome);

        let search = SearchResults {
            status: Some(status.clone()),
            results: Some(SearchResultData { num_queries: topks.len() as i64, top_k: 10, topks: topks.clone(), ..Default::default() }),
            ..Default::default()
        };
        let mut outcome = Outcome::default();
        let detail = views::read_reply(Rpc::Search.reply(), &search.encode_to_vec(), &mut outcome).unwrap();
        expect_failure(&outcome);
        prop_assert_eq!(detail, ReplyDetail::Search { num_queries: topks.len() as i64, top_k: 10, hits: topks.iter().sum() });

        let (inserted, deleted, upserted) = counts;
        let mutation = MutationResult { status: Some(status), insert_cnt: inserted, delete_cnt: deleted, upsert_cnt: upserted, ..Default::default() };
        let mut outcome = Outcome::default();
        let detail = views::read_reply(Rpc::Insert.reply(), &mutation.encode_to_vec(), &mut outcome).unwrap();
        expect_failure(&outcome);
        prop_assert_eq!(detail, ReplyDetail::Mutation { inserted, deleted, upserted });
    }

    #[test]
    fn credentials_round_trip(user in "[^:]*", password in any::<String>()) {
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let mut headers = HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, encoded.parse().unwrap());
        match identity::credential(&headers) {
            Ok(identity::Credential::Password { user: u, password: p }) => {
                prop_assert_eq!(&u, &user);
                prop_assert_eq!(p, password);
            }
            other => prop_assert!(false, "{:?}", other),
        }
        prop_assert_eq!(claimed_user(&headers), non_empty(&user).map(str::to_owned));
    }

    #[test]
    fn dbname_round_trips(name in "[!-~]{0,32}") {
        let mut headers = HeaderMap::new();
        headers.insert("dbname", name.parse().unwrap());
        prop_assert_eq!(identity::database(&headers), non_empty(&name).unwrap_or("default"));
    }

    #[test]
    #[allow(deprecated)] // in_memory_percentages: deprecated, still sent and still cut
    fn show_collections_rewrite_keeps_names_and_ids_aligned(
        rows in proptest::collection::vec((text(), any::<i64>(), any::<u64>(), any::<u64>(), 0i64..=100, any::<bool>(), any::<i32>(), any::<bool>()), 0..12),
        reason in text(),
    ) {
        // Names made unique, since the filter decides by name.
        let name = |i: usize, s: &str| format!("{i}:{s}");
        let reply = ShowCollectionsResponse {
            status: Some(Status { reason: reason.clone(), ..Default::default() }),
            collection_names: rows.iter().enumerate().map(|(i, r)| name(i, &r.0)).collect(),
            collection_ids: rows.iter().map(|r| r.1).collect(),
            created_timestamps: rows.iter().map(|r| r.2).collect(),
            created_utc_timestamps: rows.iter().map(|r| r.3).collect(),
            in_memory_percentages: rows.iter().map(|r| r.4).collect(),
            query_service_available: rows.iter().map(|r| r.5).collect(),
            shards_num: rows.iter().map(|r| r.6).collect(),
        };
        let kept: Vec<_> = rows.iter().enumerate().filter(|(_, r)| r.7).map(|(i, r)| (i, r.clone())).collect();
        let keep: std::collections::HashSet<String> = kept.iter().map(|(i, r)| name(*i, &r.0)).collect();

        let out = filter_show_collections(&reply.encode_to_vec(), |n| keep.contains(n)).expect("a real reply is rewritten");
        let got = ShowCollectionsResponse::decode(&out[..]).expect("the rewrite is a valid ShowCollectionsResponse");
        prop_assert_eq!(got.status.map(|s| s.reason), Some(reason));
        prop_assert_eq!(got.collection_names, kept.iter().map(|(i, r)| name(*i, &r.0)).collect::<Vec<_>>());
        prop_assert_eq!(got.collection_ids, kept.iter().map(|(_, r)| r.1).collect::<Vec<_>>());
        prop_assert_eq!(got.created_timestamps, kept.iter().map(|(_, r)| r.2).collect::<Vec<_>>());
        prop_assert_eq!(got.created_utc_timestamps, kept.iter().map(|(_, r)| r.3).collect::<Vec<_>>());
        prop_assert_eq!(got.in_memory_percentages, kept.iter().map(|(_, r)| r.4).collect::<Vec<_>>());
        prop_assert_eq!(got.query_service_available, kept.iter().map(|(_, r)| r.5).collect::<Vec<_>>());
        prop_assert_eq!(got.shards_num, kept.iter().map(|(_, r)| r.6).collect::<Vec<_>>());
    }
}

/// Cases kept as plain tests.
mod regressions {
    use super::*;

    /// A singular field sent twice, the last time empty: Milvus reads "" (then takes the
    /// `dbname` header); authorization must not read the earlier value (tests/auth.rs has
    /// the end-to-end case).
    #[test]
    fn repeated_db_name_last_empty() {
        let msg = [0x12, 0x01, b'a', 0x1a, 0x01, b'c', 0x12, 0x00];
        assert_eq!(wire::strings(&msg, 2), Some(vec!["a", ""]));
        let decoded = <views::CollectionRequest as prost::Message>::decode(&msg[..]).unwrap();
        assert_eq!(decoded.db_name, "");
    }
}

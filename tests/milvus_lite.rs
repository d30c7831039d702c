//! The real path: the official Rust SDK (milvus-sdk-rust) talks to milvus-lite directly
//! and through the sidecar; results must match and the sidecar must account for the calls.

mod common;

use std::collections::HashMap;

use common::Sidecar;
use common::lite::MilvusLite;
use milvus::client::Client;
use milvus::data::FieldColumn;
use milvus::index::{IndexParams, IndexType, MetricType};
use milvus::query::SearchOptions;
use milvus::schema::{CollectionSchemaBuilder, FieldSchema};
use milvus_sidecar::facts::{ReplyDetail, RequestDetail};

const DIM: i64 = 8;

/// Creates, fills, indexes and loads `name`, then searches it; returns (ids, scores).
async fn workflow(client: &Client, name: &str) -> Vec<(Vec<String>, Vec<f32>)> {
    let schema = CollectionSchemaBuilder::new(name, "sidecar test")
        .add_field(FieldSchema::new_primary_int64("id", "", false))
        .add_field(FieldSchema::new_float_vector("vec", "", DIM))
        .build()
        .unwrap();
    client.create_collection(schema.clone(), None).await.expect("create collection");
    let ids: Vec<i64> = (0..200).collect();
    let vectors: Vec<f32> = (0..200 * DIM).map(|i| ((i * 7919) % 1000) as f32 / 1000.0).collect();
    client
        .insert(
            name,
            vec![
                FieldColumn::new(schema.get_field("id").unwrap(), ids),
                FieldColumn::new(schema.get_field("vec").unwrap(), vectors),
            ],
            None,
        )
        .await
        .expect("insert");
    client.flush(name).await.expect("flush");
    let index = IndexParams::new("vec_idx".into(), IndexType::Flat, MetricType::L2, HashMap::new());
    // The SDK then waits for DescribeIndex to list the index under its own name, which
    // milvus-lite does not do; the index itself is created, so that wait's error is expected.
    let _ = client.create_index(name, "vec", index).await;
    client.load_collection(name, None).await.expect("load");
    let queries = vec![vec![0.1f32; DIM as usize].into(), vec![0.9f32; DIM as usize].into()];
    let options = SearchOptions::new().limit(5).add_param("metric_type", "L2");
    let results = client.search(name, queries, Some(options)).await.expect("search");
    let out = results.iter().map(|r| (r.id.iter().map(|v| format!("{v:?}")).collect(), r.score.clone())).collect();
    client.drop_collection(name).await.expect("drop");
    out
}

#[tokio::test]
async fn rust_sdk_gets_the_same_results_through_the_sidecar_and_calls_are_accounted() {
    let lite = MilvusLite::start().await;
    let sidecar = Sidecar::start(lite.addr).await;

    let direct = Client::new(format!("http://{}", lite.addr)).await.expect("connect direct");
    let expected = workflow(&direct, "rust_direct").await;
    let through = Client::new(sidecar.url()).await.expect("connect through the sidecar");
    let got = workflow(&through, "rust_sidecar").await;

    assert_eq!(got.len(), 2);
    assert_eq!(got, expected, "search results are identical direct and through the sidecar");

    let insert = sidecar.captured.wait_for("Insert").await;
    assert_eq!(insert.request.collection.as_deref(), Some("rust_sidecar"));
    assert_eq!(insert.request.detail, RequestDetail::Insert { rows: 200 });
    assert_eq!(insert.reply, ReplyDetail::Mutation { inserted: 200, deleted: 0, upserted: 0 });

    let search = sidecar.captured.wait_for("Search").await;
    let RequestDetail::Search(s) = &search.request.detail else { panic!("{:?}", search.request.detail) };
    assert_eq!((s.nq, s.top_k), (2, Some(5)));
    assert_eq!(search.reply, ReplyDetail::Search { num_queries: 2, top_k: 5, hits: 10 });
    assert!(search.outcome.is_success(), "{:?}", search.outcome);

    let create = sidecar.captured.wait_for("CreateCollection").await;
    let RequestDetail::CreateCollection { schema, .. } = &create.request.detail else { panic!() };
    assert!(!schema.is_empty(), "the schema travels with the facts for the store to read");
    for method in ["CreateIndex", "LoadCollection", "DropCollection"] {
        let facts = sidecar.captured.wait_for(method).await;
        assert_eq!(facts.request.collection.as_deref(), Some("rust_sidecar"), "{method}");
        assert!(facts.outcome.is_success(), "{method}: {:?}", facts.outcome);
    }
}

#[tokio::test]
async fn missing_collection_is_milvus_s_answer_and_recorded_as_a_failure() {
    let lite = MilvusLite::start().await;
    let sidecar = Sidecar::start(lite.addr).await;
    let direct = Client::new(format!("http://{}", lite.addr)).await.unwrap();
    let through = Client::new(sidecar.url()).await.unwrap();

    let query = || vec![vec![0.5f32; DIM as usize].into()];
    let options = || Some(SearchOptions::new().limit(3));
    let direct_err = direct.search("no_such_collection", query(), options()).await.unwrap_err();
    let through_err = through.search("no_such_collection", query(), options()).await.unwrap_err();
    assert_eq!(format!("{through_err:?}"), format!("{direct_err:?}"));

    // The SDK looks the collection up (DescribeCollection) before searching it.
    let facts = sidecar.captured.wait_for("DescribeCollection").await;
    assert_eq!(facts.request.collection.as_deref(), Some("no_such_collection"));
    assert_eq!(facts.outcome.grpc, tonic::Code::Ok, "Milvus answers with an OK gRPC status");
    assert_ne!(facts.outcome.milvus_code, 0);
    assert!(!facts.outcome.is_success());
}

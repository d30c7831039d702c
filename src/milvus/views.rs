//! Reading requests and replies through our views (`proto/views.proto`).

use prost::Message;

use crate::facts::{IndexProgress, Outcome, ReplyDetail, RequestDetail, RequestFacts, SearchFacts};
use crate::milvus::{Reply, Request};

#[allow(clippy::all)]
mod pb {
    include!(concat!(env!("OUT_DIR"), "/milvus_sidecar.views.rs"));
}
pub use pb::*;

/// Reads the facts a request carries. Fails only when the bytes are not the message
/// Milvus expects for this method.
pub fn read_request(kind: Request, msg: &[u8]) -> Result<RequestFacts, prost::DecodeError> {
    let facts = match kind {
        Request::Search => {
            let mut r = SearchRequest::decode(msg)?;
            // Taken, not cloned: the rest of the request goes into the search's facts.
            let database = std::mem::take(&mut r.db_name);
            let collection = std::mem::take(&mut r.collection_name);
            let partitions = std::mem::take(&mut r.partition_names);
            scoped(database, collection, partitions, search_facts(r))
        }
        Request::HybridSearch => {
            let r = HybridSearchRequest::decode(msg)?;
            let nq = r.requests.first().map_or(0, |s| s.nq);
            let detail = RequestDetail::Search(SearchFacts {
                nq,
                top_k: top_k(&r.rank_params).or_else(|| r.requests.first().and_then(|s| top_k(&s.search_params))),
                filter: String::new(),
                output_fields: r.output_fields,
                params: pairs(r.rank_params),
                sub_searches: r.requests.len(),
            });
            scoped(r.db_name, r.collection_name, r.partition_names, detail)
        }
        Request::Query => {
            let r = QueryRequest::decode(msg)?;
            let limit = r.query_params.iter().find(|kv| kv.key == "limit").and_then(|kv| kv.value.parse().ok());
            let detail = RequestDetail::Query { filter: r.expr, output_fields: r.output_fields, limit };
            scoped(r.db_name, r.collection_name, r.partition_names, detail)
        }
        Request::Insert => {
            let r = InsertRequest::decode(msg)?;
            let detail = RequestDetail::Insert { rows: u64::from(r.num_rows) };
            scoped(r.db_name, r.collection_name, one(r.partition_name), detail)
        }
        Request::Delete => {
            let r = DeleteRequest::decode(msg)?;
            scoped(r.db_name, r.collection_name, one(r.partition_name), RequestDetail::Delete { filter: r.expr })
        }
        Request::Import => {
            let r = ImportRequest::decode(msg)?;
            scoped(r.db_name, r.collection_name, one(r.partition_name), RequestDetail::Import { files: r.files })
        }
        Request::CreateCollection => {
            let r = CreateCollectionRequest::decode(msg)?;
            let detail = RequestDetail::CreateCollection { schema: r.schema, shards: r.shards_num };
            scoped(r.db_name, r.collection_name, Vec::new(), detail)
        }
        Request::RenameCollection => {
            let r = RenameCollectionRequest::decode(msg)?;
            let detail = RequestDetail::Rename { new_name: r.new_name, new_database: non_empty(r.new_db_name) };
            scoped(r.db_name, r.old_name, Vec::new(), detail)
        }
        Request::Collection => {
            let r = CollectionRequest::decode(msg)?;
            scoped(r.db_name, r.collection_name, Vec::new(), RequestDetail::None)
        }
        Request::Partition => {
            let r = PartitionRequest::decode(msg)?;
            scoped(r.db_name, r.collection_name, one(r.partition_name), RequestDetail::None)
        }
        Request::Partitions => {
            let r = PartitionsRequest::decode(msg)?;
            scoped(r.db_name, r.collection_name, r.partition_names, RequestDetail::None)
        }
        Request::CreateIndex => {
            let r = CreateIndexRequest::decode(msg)?;
            let detail = RequestDetail::Index {
                field_name: r.field_name,
                index_name: r.index_name,
                params: pairs(r.extra_params),
            };
            scoped(r.db_name, r.collection_name, Vec::new(), detail)
        }
        Request::AlterIndex => {
            let r = AlterIndexRequest::decode(msg)?;
            let detail = RequestDetail::Index {
                field_name: String::new(),
                index_name: r.index_name,
                params: pairs(r.extra_params),
            };
            scoped(r.db_name, r.collection_name, Vec::new(), detail)
        }
        Request::IndexName => {
            let r = IndexNameRequest::decode(msg)?;
            let detail =
                RequestDetail::Index { field_name: r.field_name, index_name: r.index_name, params: Vec::new() };
            scoped(r.db_name, r.collection_name, Vec::new(), detail)
        }
        Request::Database => {
            let r = DatabaseRequest::decode(msg)?;
            RequestFacts { database: non_empty(r.db_name), ..RequestFacts::default() }
        }
    };
    Ok(facts)
}

/// Reads Milvus's in-reply status (folded into `outcome`) and the reply's other facts.
pub fn read_reply(kind: Reply, msg: &[u8], outcome: &mut Outcome) -> Result<ReplyDetail, prost::DecodeError> {
    let (status, detail) = match kind {
        Reply::BareStatus => (Some(Status::decode(msg)?), ReplyDetail::None),
        Reply::StatusField => (StatusReply::decode(msg)?.status, ReplyDetail::None),
        Reply::SearchResults => {
            let r = SearchResults::decode(msg)?;
            let detail = r.results.map_or(ReplyDetail::None, |d| ReplyDetail::Search {
                num_queries: d.num_queries,
                top_k: d.top_k,
                hits: d.topks.iter().sum(),
            });
            (r.status, detail)
        }
        Reply::QueryResults => {
            let r = QueryResults::decode(msg)?;
            let rows = r.fields_data.first().map_or(0, row_count);
            (r.status, ReplyDetail::Rows(rows))
        }
        Reply::Mutation => {
            let r = MutationResult::decode(msg)?;
            let detail =
                ReplyDetail::Mutation { inserted: r.insert_cnt, deleted: r.delete_cnt, upserted: r.upsert_cnt };
            (r.status, detail)
        }
        Reply::DescribeIndex => {
            let r = DescribeIndexResponse::decode(msg)?;
            let indexes = r
                .index_descriptions
                .into_iter()
                .map(|d| IndexProgress {
                    index_name: d.index_name,
                    field_name: d.field_name,
                    params: pairs(d.params),
                    indexed_rows: d.indexed_rows,
                    total_rows: d.total_rows,
                    pending_rows: d.pending_index_rows,
                    state: d.state,
                    fail_reason: d.index_state_fail_reason,
                })
                .collect();
            (r.status, ReplyDetail::Indexes(indexes))
        }
    };
    if let Some(status) = status {
        let code = if status.code != 0 { status.code } else { status.error_code };
        if code != 0 {
            outcome.milvus_code = code;
            outcome.message = Some(status.reason);
        }
    }
    Ok(detail)
}

/// Rows in one column of a query result: every column has one value per row.
fn row_count(field: &FieldData) -> i64 {
    if let Some(s) = &field.scalars {
        let n = [
            s.bool_data.as_ref().map(|a| a.data.len()),
            s.int_data.as_ref().map(|a| a.data.len()),
            s.long_data.as_ref().map(|a| a.data.len()),
            s.float_data.as_ref().map(|a| a.data.len()),
            s.double_data.as_ref().map(|a| a.data.len()),
            s.string_data.as_ref().map(|a| a.data.len()),
            s.json_data.as_ref().map(|a| a.data.len()),
        ];
        return n.into_iter().flatten().next().unwrap_or(0) as i64;
    }
    match &field.vectors {
        Some(v) if v.dim > 0 => v.float_vector.as_ref().map_or(0, |f| f.data.len() as i64 / v.dim),
        _ => 0,
    }
}

fn search_facts(r: SearchRequest) -> RequestDetail {
    RequestDetail::Search(SearchFacts {
        nq: r.nq,
        top_k: top_k(&r.search_params),
        filter: r.dsl,
        output_fields: r.output_fields,
        params: pairs(r.search_params),
        sub_searches: 0,
    })
}

fn top_k(params: &[KeyValuePair]) -> Option<i64> {
    params.iter().find(|kv| kv.key == "topk" || kv.key == "limit").and_then(|kv| kv.value.trim().parse().ok())
}

fn scoped(database: String, collection: String, partitions: Vec<String>, detail: RequestDetail) -> RequestFacts {
    RequestFacts { database: non_empty(database), collection: non_empty(collection), partitions, detail }
}

fn pairs(kvs: Vec<KeyValuePair>) -> Vec<(String, String)> {
    kvs.into_iter().map(|kv| (kv.key, kv.value)).collect()
}

fn one(partition: String) -> Vec<String> {
    non_empty(partition).into_iter().collect()
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str) -> KeyValuePair {
        KeyValuePair { key: key.into(), value: value.into() }
    }

    #[test]
    fn search_request_yields_collection_nq_and_top_k() {
        let msg = SearchRequest {
            db_name: String::new(),
            collection_name: "docs".into(),
            partition_names: vec!["p1".into()],
            dsl: "id > 3".into(),
            output_fields: vec!["title".into()],
            search_params: vec![kv("metric_type", "L2"), kv("topk", "10")],
            nq: 5,
        }
        .encode_to_vec();
        let facts = read_request(Request::Search, &msg).unwrap();
        assert_eq!(facts.database, None, "an empty db_name defers to the dbname header");
        assert_eq!(facts.collection.as_deref(), Some("docs"));
        assert_eq!(facts.partitions, vec!["p1".to_string()]);
        let RequestDetail::Search(s) = facts.detail else { panic!("not a search: {:?}", facts.detail) };
        assert_eq!((s.nq, s.top_k, s.filter.as_str()), (5, Some(10), "id > 3"));
    }

    #[test]
    fn hybrid_search_takes_limit_from_rank_params_and_nq_from_sub_requests() {
        let sub = SearchRequest { nq: 3, search_params: vec![kv("limit", "7")], ..Default::default() };
        let msg = HybridSearchRequest {
            collection_name: "c".into(),
            requests: vec![sub.clone(), sub],
            rank_params: vec![kv("limit", "4"), kv("strategy", "rrf")],
            ..Default::default()
        }
        .encode_to_vec();
        let RequestDetail::Search(s) = read_request(Request::HybridSearch, &msg).unwrap().detail else {
            panic!("not a search")
        };
        assert_eq!((s.nq, s.top_k, s.sub_searches), (3, Some(4), 2));
    }

    #[test]
    fn a_body_of_the_wrong_shape_is_an_error_not_a_guess() {
        // Field 3 as a varint where collection_name (a string) is expected.
        let err = read_request(Request::Collection, &[0x18, 0x01]).unwrap_err();
        assert!(err.to_string().contains("invalid wire type"), "{err}");
    }

    #[test]
    fn milvus_failure_inside_an_ok_reply_becomes_the_outcome() {
        let status = Status { error_code: 4, reason: "collection not found[collection=Z]".into(), code: 100 };
        let msg = SearchResults { status: Some(status), results: None }.encode_to_vec();
        let mut outcome = Outcome::default();
        read_reply(Reply::SearchResults, &msg, &mut outcome).unwrap();
        assert!(!outcome.is_success());
        assert_eq!(outcome.milvus_code, 100);
        assert_eq!(outcome.message.as_deref(), Some("collection not found[collection=Z]"));
    }

    #[test]
    fn legacy_error_code_counts_when_code_is_unset() {
        let msg = Status { error_code: 1, reason: "unexpected".into(), code: 0 }.encode_to_vec();
        let mut outcome = Outcome::default();
        read_reply(Reply::BareStatus, &msg, &mut outcome).unwrap();
        assert_eq!(outcome.milvus_code, 1);
    }

    #[test]
    fn search_reply_counts_hits_over_all_queries() {
        let msg = SearchResults {
            status: Some(Status::default()),
            results: Some(SearchResultData { num_queries: 2, top_k: 10, topks: vec![10, 4] }),
        }
        .encode_to_vec();
        let mut outcome = Outcome::default();
        let detail = read_reply(Reply::SearchResults, &msg, &mut outcome).unwrap();
        assert!(outcome.is_success());
        assert_eq!(detail, ReplyDetail::Search { num_queries: 2, top_k: 10, hits: 14 });
    }

    #[test]
    fn mutation_reply_carries_acknowledged_counts() {
        let msg = MutationResult { status: None, insert_cnt: 1000, delete_cnt: 0, upsert_cnt: 0 }.encode_to_vec();
        let mut outcome = Outcome::default();
        let detail = read_reply(Reply::Mutation, &msg, &mut outcome).unwrap();
        assert_eq!(detail, ReplyDetail::Mutation { inserted: 1000, deleted: 0, upserted: 0 });
    }
}

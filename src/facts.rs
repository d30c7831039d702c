//! The typed account of one forwarded call: what was asked, what Milvus answered, how long
//! it took. Built by the proxy, handed to a [`crate::record::Recorder`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use uuid::Uuid;

use crate::milvus::Rpc;

/// Database Milvus uses when a call names none.
pub const DEFAULT_DATABASE: &str = "default";

/// A time-ordered (v7) id for a call that started `at`. Unlike `Uuid::now_v7`, which
/// serializes every caller on one global mutex to keep a monotonic counter, this takes the
/// call's own start time and thread-local randomness: ids stay ordered to the
/// millisecond, which is all the log tables need.
pub fn call_id(at: SystemTime) -> Uuid {
    let since = at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, since.as_secs(), since.subsec_nanos()))
}

#[derive(Debug, Clone)]
pub struct CallFacts {
    /// Time-ordered (v7), so ids sort like the calls they name.
    pub id: Uuid,
    pub started_at: SystemTime,
    pub duration: Duration,
    pub method: Method,
    /// From the body's `db_name`, else the `dbname` header, else [`DEFAULT_DATABASE`].
    pub database: String,
    pub request: RequestFacts,
    pub reply: ReplyDetail,
    pub outcome: Outcome,
    /// gRPC-framed bytes as they crossed the sidecar (compressed, if they were).
    pub request_bytes: u64,
    pub reply_bytes: u64,
    pub client: Client,
}

impl CallFacts {
    /// What the request's view read; a database it names replaces the header's.
    pub fn set_request(&mut self, request: RequestFacts) {
        if let Some(db) = &request.database {
            self.database.clone_from(db);
        }
        self.request = request;
    }

    /// About how many bytes of memory these facts hold: the struct and the text and lists
    /// it owns. One call's filter or schema can run to megabytes, so the writer's queue is
    /// bounded by this as well as by its count of records.
    pub fn footprint(&self) -> usize {
        let method = match &self.method {
            Method::Inspected(_) => 0,
            Method::Other(path) => path.len(),
        };
        let client = &self.client;
        let headers =
            [&client.user_agent, &client.request_id].into_iter().flatten().map(HeaderValue::len).sum::<usize>();
        size_of::<Self>()
            + method
            + self.database.len()
            + self.request.footprint()
            + self.reply.footprint()
            + self.outcome.message.as_ref().map_or(0, String::len)
            + client.user.as_ref().map_or(0, String::len)
            + headers
    }
}

/// Bytes held by a list of strings.
fn texts(list: &[String]) -> usize {
    list.iter().map(|s| size_of::<String>() + s.len()).sum()
}

/// Bytes held by a list of key-value pairs.
fn pairs(list: &[(String, String)]) -> usize {
    list.iter().map(|(k, v)| 2 * size_of::<String>() + k.len() + v.len()).sum()
}

/// The called method: one this build inspects, or any other by a copy of its path, so
/// that methods this build has never heard of are still named exactly. (The request's own
/// path points into the connection's read buffer, which a record waiting in the writer's
/// queue must not pin.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    Inspected(Rpc),
    Other(Arc<str>),
}

impl Method {
    pub fn from_path(path: &str) -> Self {
        match Rpc::from_path(path) {
            Some(rpc) => Method::Inspected(rpc),
            None => Method::Other(Arc::from(path)),
        }
    }

    pub fn rpc(&self) -> Option<Rpc> {
        match self {
            Method::Inspected(rpc) => Some(*rpc),
            Method::Other(_) => None,
        }
    }

    /// The last path segment: `Search` for `/milvus.proto.milvus.MilvusService/Search`.
    pub fn name(&self) -> &str {
        match self {
            Method::Inspected(rpc) => rpc.name(),
            Method::Other(path) => path.rsplit_once('/').map_or(path, |(_, name)| name),
        }
    }
}

/// Who called, as far as the transport and headers tell.
#[derive(Debug, Clone, Default)]
pub struct Client {
    pub peer: Option<SocketAddr>,
    /// The user named by the `authorization` header. Not verified: authentication is a
    /// later step; until then this is who the caller claims to be.
    pub user: Option<String>,
    pub user_agent: Option<HeaderValue>,
    pub request_id: Option<HeaderValue>,
}

/// What the request body said, read through a view. Empty for calls not inspected.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestFacts {
    pub database: Option<String>,
    pub collection: Option<String>,
    pub partitions: Vec<String>,
    pub detail: RequestDetail,
}

impl RequestFacts {
    fn footprint(&self) -> usize {
        let detail = match &self.detail {
            RequestDetail::None | RequestDetail::Insert { .. } => 0,
            RequestDetail::Search(search) => search.filter.len() + texts(&search.output_fields) + pairs(&search.params),
            RequestDetail::Query { filter, output_fields, .. } => filter.len() + texts(output_fields),
            RequestDetail::Delete { filter } => filter.len(),
            RequestDetail::Import { files } => texts(files),
            RequestDetail::CreateCollection { schema, .. } => schema.len(),
            RequestDetail::Rename { new_name, new_database } => {
                new_name.len() + new_database.as_ref().map_or(0, String::len)
            }
            RequestDetail::Index { field_name, index_name, params } => {
                field_name.len() + index_name.len() + pairs(params)
            }
        };
        let names = self.database.as_ref().map_or(0, String::len) + self.collection.as_ref().map_or(0, String::len);
        names + texts(&self.partitions) + detail
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub enum RequestDetail {
    #[default]
    None,
    Search(SearchFacts),
    Query {
        filter: String,
        output_fields: Vec<String>,
        limit: Option<i64>,
    },
    Insert {
        rows: u64,
    },
    Delete {
        filter: String,
    },
    Import {
        files: Vec<String>,
    },
    CreateCollection {
        /// Serialized `schema.CollectionSchema`, kept for the store to read later.
        schema: Vec<u8>,
        shards: i32,
    },
    Rename {
        new_name: String,
        new_database: Option<String>,
    },
    Index {
        field_name: String,
        index_name: String,
        params: Vec<(String, String)>,
    },
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SearchFacts {
    pub nq: i64,
    /// From `topk` or `limit` in the search parameters.
    pub top_k: Option<i64>,
    pub filter: String,
    pub output_fields: Vec<String>,
    pub params: Vec<(String, String)>,
    /// Number of sub-searches of a HybridSearch; 0 for a plain Search.
    pub sub_searches: usize,
}

/// What the reply body said beyond its status.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum ReplyDetail {
    #[default]
    None,
    Search {
        num_queries: i64,
        top_k: i64,
        /// Hits over all queries (sum of `topks`).
        hits: i64,
    },
    Mutation {
        inserted: i64,
        deleted: i64,
        upserted: i64,
    },
    Indexes(Vec<IndexProgress>),
    /// Rows a Query returned.
    Rows(i64),
}

impl ReplyDetail {
    fn footprint(&self) -> usize {
        match self {
            ReplyDetail::Indexes(indexes) => indexes
                .iter()
                .map(|i| {
                    size_of::<IndexProgress>()
                        + i.index_name.len()
                        + i.field_name.len()
                        + pairs(&i.params)
                        + i.fail_reason.len()
                })
                .sum(),
            ReplyDetail::None | ReplyDetail::Search { .. } | ReplyDetail::Mutation { .. } | ReplyDetail::Rows(_) => 0,
        }
    }
}

/// One index as DescribeIndex reported it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IndexProgress {
    pub index_name: String,
    pub field_name: String,
    pub params: Vec<(String, String)>,
    pub indexed_rows: i64,
    pub total_rows: i64,
    pub pending_rows: i64,
    /// Milvus's `common.IndexState`: 1 unissued, 2 in progress, 3 finished, 4 failed, 5 retry.
    pub state: i32,
    pub fail_reason: String,
}

/// How the call ended: the gRPC status and, inside an OK reply, Milvus's own status.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub grpc: tonic::Code,
    /// Milvus's `code` (or legacy `error_code` when `code` is 0); 0 is success.
    pub milvus_code: i32,
    /// The gRPC message or Milvus's reason.
    pub message: Option<String>,
}

impl Outcome {
    pub fn grpc(code: tonic::Code, message: impl Into<String>) -> Self {
        Outcome { grpc: code, milvus_code: 0, message: Some(message.into()) }
    }

    pub fn is_success(&self) -> bool {
        self.grpc == tonic::Code::Ok && self.milvus_code == 0
    }
}

impl Default for Outcome {
    fn default() -> Self {
        Outcome { grpc: tonic::Code::Ok, milvus_code: 0, message: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_ids_are_v7_distinct_and_ordered_by_start_time() {
        let t = SystemTime::now();
        let (a, same_ms, later) = (call_id(t), call_id(t), call_id(t + Duration::from_millis(1)));
        assert_eq!(a.get_version_num(), 7);
        assert_ne!(a, same_ms, "random bits tell calls of the same millisecond apart");
        assert!(a < later && same_ms < later);
        let (secs, _) = a.get_timestamp().expect("v7 carries a timestamp").to_unix();
        assert_eq!(secs, t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs());
    }

    fn query(filter: &str) -> CallFacts {
        CallFacts {
            id: call_id(SystemTime::now()),
            started_at: SystemTime::now(),
            duration: Duration::from_millis(1),
            method: Method::from_path("/milvus.proto.milvus.MilvusService/Query"),
            database: DEFAULT_DATABASE.into(),
            request: RequestFacts {
                collection: Some("docs".into()),
                detail: RequestDetail::Query { filter: filter.into(), output_fields: vec!["id".into()], limit: None },
                ..RequestFacts::default()
            },
            reply: ReplyDetail::Rows(3),
            outcome: Outcome::default(),
            request_bytes: 100,
            reply_bytes: 100,
            client: Client { user: Some("alice".into()), ..Client::default() },
        }
    }

    #[test]
    fn a_footprint_counts_what_the_facts_hold() {
        let small = query("id > 0").footprint();
        assert!(small >= size_of::<CallFacts>() + "default".len() + "docs".len() + "id > 0".len() + "alice".len());
        assert!(small < 1024, "a plain query's facts hold well under a KiB: {small}");
        // `id in [...]` with a hundred thousand ids: a megabyte the queue must count.
        let ids = (0..100_000).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
        let large = query(&format!("id in [{ids}]")).footprint();
        assert_eq!(large - small, ids.len() + "id in []".len() - "id > 0".len());
    }

    #[test]
    fn methods_are_named_by_the_last_segment_of_their_path() {
        let search = Method::from_path("/milvus.proto.milvus.MilvusService/Search");
        assert_eq!((search.rpc(), search.name()), (Some(Rpc::Search), "Search"));
        // A method newer than this build, or of another service: named as the client called it.
        let newer = Method::from_path("/milvus.proto.milvus.MilvusService/RunAnalyzer");
        assert_eq!((newer.rpc(), newer.name()), (None, "RunAnalyzer"));
        let other = Method::from_path("/grpc.health.v1.Health/Check");
        assert_eq!((other.rpc(), other.name()), (None, "Check"));
        assert_eq!(Method::from_path("unrooted").name(), "unrooted");
    }
}

//! Turning one call's facts into the rows it should leave behind. Runs in the writer task,
//! never on the request path.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tonic::Code;

use crate::facts::{CallFacts, ReplyDetail, RequestDetail};
use crate::milvus::Rpc;
use crate::milvus::views::CollectionSchema;
use crate::settings::Settings;
use crate::store::logs::{AuditRow, CallRow, IngestionRow, JsonText, PerfRow, QueryRow};
use crate::store::mirror::{IndexState, MirrorOp, index_state_name};

/// Everything one call leaves in PostgreSQL. Serializable: this is also what the spill
/// file keeps while PostgreSQL is away.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub call: CallRow,
    pub perf: Option<PerfRow>,
    pub query: Option<QueryRow>,
    pub ingestion: Option<IngestionRow>,
    pub audit: Option<AuditRow>,
    pub mirror: Option<MirrorOp>,
}

impl Record {
    /// None when the settings switch off every row this call would produce.
    pub fn from_facts(mut f: CallFacts, settings: &Settings) -> Option<Record> {
        super::scrub::facts(&mut f);
        let success = f.outcome.is_success();
        // The rows that only read the facts come first; the query row and the call row
        // then take their strings out of the facts instead of copying them.
        let method = f.method.name();
        let perf = settings.performance().then(|| perf_row(&f, method));
        let audit = (settings.audit() && (settings.audit_every_call() || should_audit(method, &f)))
            .then(|| audit_row(&f, method));
        let mirror = if success { mirror_op(&f) } else { None };
        let ingestion = ingestion_row(&f);
        let query = query_row(&mut f);
        let call = CallRow {
            id: f.id,
            at: f.started_at,
            user: f.client.user.take(),
            database: std::mem::take(&mut f.database),
            collection: f.request.collection.take(),
            duration_ms: f.duration.as_secs_f64() * 1000.0,
            success,
            grpc_code: f.outcome.grpc as i16,
            milvus_code: f.outcome.milvus_code,
            error: if success { None } else { f.outcome.message.take() },
        };
        let record = Record { call, perf, query, ingestion, audit, mirror };
        let empty = record.perf.is_none()
            && record.query.is_none()
            && record.ingestion.is_none()
            && record.audit.is_none()
            && record.mirror.is_none();
        (!empty).then_some(record)
    }
}

/// `CreateCollection` -> `create_collection`.
pub fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Methods that only read. Everything else, including methods newer than this build,
/// is taken to change state and is audited.
const READ_ONLY_PREFIXES: &[&str] = &[
    "Describe",
    "Get",
    "Show",
    "List",
    "Has",
    "Check",
    "Search",
    "HybridSearch",
    "Query",
    "Connect",
    "Dump",
    "Run",
    "Alloc",
    "Select",
];

pub fn changes_state(method: &str) -> bool {
    !READ_ONLY_PREFIXES.iter().any(|p| method.starts_with(p))
}

/// Audited besides state changes: calls refused, by the sidecar or by Milvus.
fn should_audit(method: &str, f: &CallFacts) -> bool {
    let refused = matches!(
        f.outcome.grpc,
        Code::PermissionDenied | Code::Unauthenticated | Code::InvalidArgument | Code::ResourceExhausted
    );
    changes_state(method) || refused
}

pub fn resource_type(method: &str) -> &'static str {
    const BY_NAME: &[(&str, &str)] = &[
        ("Partition", "partition"),
        ("Index", "index"),
        ("Alias", "alias"),
        ("Database", "database"),
        ("Collection", "collection"),
        ("Credential", "user"),
        ("User", "user"),
        ("PrivilegeGroup", "permission"),
        ("Privilege", "permission"),
        ("Role", "role"),
        ("ResourceGroup", "resource_group"),
        ("Replica", "resource_group"),
        ("Node", "resource_group"),
    ];
    if matches!(method, "Insert" | "Upsert" | "Delete" | "Import" | "Flush" | "FlushAll" | "ManualCompaction") {
        return "data";
    }
    BY_NAME.iter().find(|(part, _)| method.contains(part)).map_or("system", |(_, t)| t)
}

/// `performance_metrics.metadata`: what a call's size and outcome were, where known.
#[derive(Serialize, Default)]
struct PerfMetadata<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    nq: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rows: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result_count: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    acknowledged: Option<i64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    partitions: &'a [String],
}

fn perf_row(f: &CallFacts, method: &str) -> PerfRow {
    let mut meta = PerfMetadata { partitions: &f.request.partitions, ..Default::default() };
    match &f.request.detail {
        RequestDetail::Search(s) => {
            meta.nq = Some(s.nq);
            meta.top_k = s.top_k;
        }
        RequestDetail::Insert { rows } => meta.rows = Some(*rows),
        _ => {}
    }
    match &f.reply {
        ReplyDetail::Search { hits, .. } => meta.result_count = Some(*hits),
        ReplyDetail::Mutation { inserted, deleted, upserted } => {
            meta.acknowledged = Some(inserted + deleted + upserted)
        }
        _ => {}
    }
    PerfRow {
        operation: snake_case(method),
        request_bytes: f.request_bytes as i64,
        reply_bytes: f.reply_bytes as i64,
        metadata: JsonText::of(&meta),
    }
}

/// Takes the filter and output fields out of `f`: nothing reads them after this row.
fn query_row(f: &mut CallFacts) -> Option<QueryRow> {
    let query_type = match f.method.rpc()? {
        Rpc::Search => "search",
        Rpc::HybridSearch => "hybrid_search",
        Rpc::Query => "query",
        _ => return None,
    };
    let result_count = match f.reply {
        ReplyDetail::Search { hits, .. } => Some(hits),
        ReplyDetail::Rows(rows) => Some(rows),
        _ => None,
    };
    let row = match &mut f.request.detail {
        RequestDetail::Search(s) => QueryRow {
            query_type: query_type.into(),
            top_k: s.top_k.map(clamp_i32),
            nq: Some(clamp_i32(s.nq)),
            search_params: JsonText::of(&Pairs(&s.params)),
            filter: non_empty(&mut s.filter),
            output_fields: std::mem::take(&mut s.output_fields),
            result_count,
        },
        RequestDetail::Query { filter, output_fields, limit } => QueryRow {
            query_type: query_type.into(),
            top_k: limit.map(clamp_i32),
            nq: None,
            search_params: JsonText::empty_object(),
            filter: non_empty(filter),
            output_fields: std::mem::take(output_fields),
            result_count,
        },
        // Refused before its body was read: still a query that was attempted.
        _ => QueryRow {
            query_type: query_type.into(),
            top_k: None,
            nq: None,
            search_params: JsonText::empty_object(),
            filter: None,
            output_fields: Vec::new(),
            result_count: None,
        },
    };
    Some(row)
}

/// `s` moved out, or None when it is empty.
fn non_empty(s: &mut String) -> Option<String> {
    (!s.is_empty()).then(|| std::mem::take(s))
}

fn ingestion_row(f: &CallFacts) -> Option<IngestionRow> {
    let operation = match f.method.rpc()? {
        Rpc::Insert => "insert",
        Rpc::Upsert => "upsert",
        Rpc::Delete => "delete",
        Rpc::Import => "import",
        _ => return None,
    };
    let rows_sent = match f.request.detail {
        RequestDetail::Insert { rows } => Some(rows as i64),
        _ => None,
    };
    let rows_acknowledged = match f.reply {
        ReplyDetail::Mutation { inserted, deleted, upserted } => Some(match operation {
            "insert" => inserted,
            "upsert" => upserted,
            _ => deleted,
        }),
        _ => None,
    };
    Some(IngestionRow {
        operation: operation.into(),
        partition: f.request.partitions.first().cloned(),
        rows_sent,
        rows_acknowledged,
        bytes: f.request_bytes as i64,
    })
}

fn audit_row(f: &CallFacts, method: &str) -> AuditRow {
    let resource_type = resource_type(method);
    let collection = f.request.collection.as_deref();
    let db = &f.database;
    let resource_id = match (&f.request.detail, collection) {
        (RequestDetail::Index { index_name, field_name, .. }, Some(c)) => {
            Some(format!("{db}.{c}/{}", if index_name.is_empty() { field_name } else { index_name }))
        }
        (_, Some(c)) if resource_type == "partition" && !f.request.partitions.is_empty() => {
            Some(format!("{db}.{c}/{}", f.request.partitions.join(",")))
        }
        (_, Some(c)) => Some(format!("{db}.{c}")),
        (_, None) if resource_type == "database" => f.request.database.clone(),
        _ => None,
    };
    let mut details = Map::new();
    details.insert("method".into(), json!(method));
    if let Some(id) = f.client.request_id.as_ref().and_then(|v| v.to_str().ok()).filter(|id| !id.is_empty()) {
        details.insert("client_request_id".into(), json!(id));
    }
    if !f.request.partitions.is_empty() {
        details.insert("partitions".into(), json!(f.request.partitions));
    }
    match &f.request.detail {
        RequestDetail::Insert { rows } => {
            details.insert("rows".into(), json!(rows));
        }
        RequestDetail::Delete { filter } if !filter.is_empty() => {
            details.insert("filter".into(), json!(filter));
        }
        RequestDetail::Import { files } => {
            details.insert("files".into(), json!(files));
        }
        RequestDetail::Rename { new_name, new_database } => {
            details.insert("new_name".into(), json!(new_name));
            if let Some(db) = new_database {
                details.insert("new_database".into(), json!(db));
            }
        }
        RequestDetail::Index { field_name, index_name, params } => {
            details.insert("field_name".into(), json!(field_name));
            details.insert("index_name".into(), json!(index_name));
            if !params.is_empty() {
                details.insert("params".into(), json!(Pairs(params)));
            }
        }
        _ => {}
    }
    AuditRow {
        action: snake_case(method),
        resource_type: resource_type.into(),
        resource_id,
        details: JsonText::of(&details),
        ip: f.client.peer.map(|p| p.ip()),
        user_agent: f.client.user_agent.as_ref().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
    }
}

fn mirror_op(f: &CallFacts) -> Option<MirrorOp> {
    let database = f.database.clone();
    let collection = f.request.collection.clone();
    let op = match (f.method.rpc()?, &f.request.detail) {
        (Rpc::CreateCollection, RequestDetail::CreateCollection { schema, shards }) => {
            let (dimension, fields, description) = read_schema(schema);
            MirrorOp::CreateCollection {
                database,
                name: collection?,
                dimension,
                fields,
                description,
                shards: *shards,
                created_by: f.client.user.clone(),
            }
        }
        (Rpc::DropCollection, _) => MirrorOp::DropCollection { database, name: collection? },
        (Rpc::RenameCollection, RequestDetail::Rename { new_name, new_database }) => MirrorOp::RenameCollection {
            new_database: new_database.clone().unwrap_or_else(|| database.clone()),
            database,
            name: collection?,
            new_name: new_name.clone(),
        },
        (Rpc::CreatePartition, _) => MirrorOp::CreatePartition {
            database,
            collection: collection?,
            partition: f.request.partitions.first()?.clone(),
        },
        (Rpc::DropPartition, _) => MirrorOp::DropPartition {
            database,
            collection: collection?,
            partition: f.request.partitions.first()?.clone(),
        },
        (Rpc::CreateIndex, RequestDetail::Index { field_name, index_name, params }) => MirrorOp::CreateIndex {
            database,
            collection: collection?,
            field: field_name.clone(),
            index_name: index_name.clone(),
            params: params.clone(),
        },
        (Rpc::DropIndex, RequestDetail::Index { field_name, index_name, .. }) => MirrorOp::DropIndex {
            database,
            collection: collection?,
            field: field_name.clone(),
            index_name: index_name.clone(),
        },
        (Rpc::DescribeIndex, _) => {
            let ReplyDetail::Indexes(indexes) = &f.reply else { return None };
            MirrorOp::IndexProgress {
                database,
                collection: collection?,
                indexes: indexes
                    .iter()
                    .map(|i| IndexState {
                        field: i.field_name.clone(),
                        index_name: i.index_name.clone(),
                        params: i.params.clone(),
                        state: index_state_name(i.state).into(),
                        indexed_rows: i.indexed_rows,
                        total_rows: i.total_rows,
                        pending_rows: i.pending_rows,
                        fail_reason: (!i.fail_reason.is_empty()).then(|| i.fail_reason.clone()),
                    })
                    .collect(),
            }
        }
        _ => return None,
    };
    Some(op)
}

/// Milvus data types by number (schema.proto `DataType`), for the `fields` column.
fn data_type_name(t: i32) -> &'static str {
    match t {
        1 => "Bool",
        2 => "Int8",
        3 => "Int16",
        4 => "Int32",
        5 => "Int64",
        10 => "Float",
        11 => "Double",
        20 => "String",
        21 => "VarChar",
        22 => "Array",
        23 => "JSON",
        24 => "Geometry",
        25 => "Text",
        26 => "Timestamptz",
        100 => "BinaryVector",
        101 => "FloatVector",
        102 => "Float16Vector",
        103 => "BFloat16Vector",
        104 => "SparseFloatVector",
        105 => "Int8Vector",
        106 => "ArrayOfVector",
        _ => "Other",
    }
}

/// Dimension (of the first dense vector field), the fields, and the description.
pub fn read_schema(bytes: &[u8]) -> (Option<i32>, Value, String) {
    use prost::Message;
    let Ok(schema) = CollectionSchema::decode(bytes) else {
        return (None, Value::Array(Vec::new()), String::new());
    };
    let mut dimension = None;
    let fields = schema
        .fields
        .iter()
        .map(|field| {
            let dim = field.type_params.iter().find(|kv| kv.key == "dim").and_then(|kv| kv.value.parse::<i32>().ok());
            if dimension.is_none() && (100..=105).contains(&field.data_type) && field.data_type != 104 {
                dimension = dim;
            }
            let mut out = Map::new();
            out.insert("name".into(), json!(field.name));
            out.insert("data_type".into(), json!(data_type_name(field.data_type)));
            if field.is_primary_key {
                out.insert("is_primary_key".into(), json!(true));
            }
            if field.auto_id {
                out.insert("auto_id".into(), json!(true));
            }
            if let Some(dim) = dim {
                out.insert("dim".into(), json!(dim));
            }
            for kv in field.type_params.iter().filter(|kv| kv.key != "dim") {
                out.insert(kv.key.clone(), json!(kv.value));
            }
            Value::Object(out)
        })
        .collect();
    let (mut fields, mut description) = (Value::Array(fields), schema.description);
    super::scrub::json(&mut fields);
    super::scrub::string(&mut description);
    (dimension, fields, description)
}

/// Key-value parameters as a JSON object; of a repeated key, the last one counts (as in
/// `jsonb`).
struct Pairs<'a>(&'a [(String, String)]);

impl Serialize for Pairs<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

fn clamp_i32(v: i64) -> i32 {
    v.clamp(i32::MIN as i64, i32::MAX as i64) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names_become_actions_and_resource_types() {
        assert_eq!(snake_case("CreateCollection"), "create_collection");
        assert_eq!(snake_case("Search"), "search");
        assert_eq!(resource_type("CreatePartition"), "partition");
        assert_eq!(resource_type("DropIndex"), "index");
        assert_eq!(resource_type("ShowCollections"), "collection");
        assert_eq!(resource_type("Insert"), "data");
        assert_eq!(resource_type("CreateCredential"), "user");
        assert_eq!(resource_type("OperatePrivilege"), "permission");
        assert_eq!(resource_type("CreateRole"), "role");
        assert_eq!(resource_type("SomethingNew"), "system");
    }

    #[test]
    fn only_reads_are_left_out_of_the_audit() {
        for m in ["CreateCollection", "Insert", "Delete", "LoadCollection", "Flush", "OperatePrivilege", "FutureThing"]
        {
            assert!(changes_state(m), "{m}");
        }
        for m in ["Search", "Query", "DescribeCollection", "ShowCollections", "GetVersion", "HasCollection", "Connect"]
        {
            assert!(!changes_state(m), "{m}");
        }
    }

    #[test]
    fn schema_gives_dimension_and_fields() {
        use crate::milvus::views::{FieldSchema, KeyValuePair};
        use prost::Message;
        let schema = CollectionSchema {
            name: "c".into(),
            description: "docs".into(),
            fields: vec![
                FieldSchema { name: "id".into(), is_primary_key: true, data_type: 5, ..Default::default() },
                FieldSchema {
                    name: "vec".into(),
                    data_type: 101,
                    type_params: vec![KeyValuePair { key: "dim".into(), value: "768".into() }],
                    ..Default::default()
                },
            ],
            enable_dynamic_field: false,
        }
        .encode_to_vec();
        let (dim, fields, description) = read_schema(&schema);
        assert_eq!(dim, Some(768));
        assert_eq!(description, "docs");
        assert_eq!(fields[0]["data_type"], "Int64");
        assert_eq!(fields[0]["is_primary_key"], true);
        assert_eq!(fields[1]["dim"], 768);
    }
}

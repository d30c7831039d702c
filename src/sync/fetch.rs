//! The Milvus side of a sync: what Milvus holds, read with the sidecar's own calls
//! (ListDatabases, ShowCollections, then DescribeCollection, ShowPartitions and
//! DescribeIndex for each collection).

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use prost::Message;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{SyncError, pb};
use crate::facts::DEFAULT_DATABASE;
use crate::milvus::headers::DBNAME;
use crate::milvus::views::{self, DescribeIndexResponse, IndexNameRequest};
use crate::proxy::Upstream;
use crate::record::rows::read_schema;
use crate::store::mirror::{IndexState, index_state_name};

/// Longest wait for any one call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Collections described at the same time.
const CONCURRENCY: usize = 8;

/// What Milvus holds, as far as it answered.
pub struct Snapshot {
    /// Databases whose collections Milvus listed: only these are reconciled.
    pub databases: Vec<Database>,
    pub warnings: Vec<String>,
}

pub struct Database {
    pub name: String,
    /// Every collection Milvus listed (less those gone before they could be described):
    /// mirror rows of this database not named here are marked dropped.
    pub present: BTreeSet<String>,
    /// Those Milvus described; a listed collection it would not describe is left as it is.
    pub described: Vec<Collection>,
}

pub struct Collection {
    pub name: String,
    /// None when Milvus reports 0 (milvus-lite does).
    pub milvus_id: Option<i64>,
    pub dimension: Option<i32>,
    pub fields: serde_json::Value,
    pub description: String,
    /// 0 when Milvus does not say.
    pub shards: i32,
    /// None when Milvus would not list them: the mirror's partitions are left as they are.
    pub partitions: Option<Vec<String>>,
    /// None when Milvus would not describe them.
    pub indexes: Option<Vec<IndexState>>,
}

pub async fn snapshot(upstream: &Upstream) -> Result<Snapshot, SyncError> {
    let mut warnings = Vec::new();
    let names = match list_databases(upstream).await {
        Ok(names) if !names.is_empty() => names,
        Ok(_) => vec![DEFAULT_DATABASE.to_owned()],
        // Milvus before 2.2 has no databases (UNIMPLEMENTED): everything is in `default`.
        Err(e) => {
            warnings.push(format!("Milvus did not list its databases ({e}); only `{DEFAULT_DATABASE}` was read"));
            vec![DEFAULT_DATABASE.to_owned()]
        }
    };
    let mut databases = Vec::new();
    let mut last_error = None;
    for name in names {
        match show_collections(upstream, &name).await {
            Ok(listed) => {
                let (database, mut problems) = describe_all(upstream, &name, listed).await;
                warnings.append(&mut problems);
                databases.push(database);
            }
            Err(e) => {
                warnings.push(format!("database {name}: {e}; its collections were left as they are"));
                last_error = Some(e);
            }
        }
    }
    match (databases.is_empty(), last_error) {
        (true, Some(e)) => Err(SyncError::Milvus(e)),
        _ => Ok(Snapshot { databases, warnings }),
    }
}

async fn list_databases(upstream: &Upstream) -> Result<Vec<String>, String> {
    let reply: pb::ListDatabasesResponse =
        call(upstream, "ListDatabases", "", &pb::ListDatabasesRequest::default()).await?;
    check(reply.status.as_ref().map(Refusal::of))?;
    Ok(reply.db_names)
}

async fn show_collections(upstream: &Upstream, db: &str) -> Result<Vec<String>, String> {
    let request = pb::ShowCollectionsRequest { db_name: db.to_owned() };
    let reply: pb::ShowCollectionsResponse = call(upstream, "ShowCollections", db, &request).await?;
    check(reply.status.as_ref().map(Refusal::of)).map_err(|e| format!("ShowCollections: {e}"))?;
    Ok(reply.collection_names)
}

/// Describes the listed collections, a few at a time. Returns the database and warnings.
async fn describe_all(upstream: &Upstream, db: &str, listed: Vec<String>) -> (Database, Vec<String>) {
    let limit = Arc::new(Semaphore::new(CONCURRENCY));
    let mut tasks = JoinSet::new();
    for name in &listed {
        let (upstream, db, name, limit) = (upstream.clone(), db.to_owned(), name.clone(), limit.clone());
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await;
            let described = describe(&upstream, &db, &name).await;
            (name, described)
        });
    }
    let mut present: BTreeSet<String> = listed.into_iter().collect();
    let mut described = Vec::new();
    let mut warnings = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        // A task that panicked leaves its collection listed but undescribed: untouched.
        let Ok((name, outcome)) = joined else { continue };
        match outcome {
            Described::Found(collection, mut problems) => {
                warnings.append(&mut problems);
                described.push(collection);
            }
            Described::Gone => {
                present.remove(&name);
            }
            Described::Refused(e) => warnings.push(format!("collection {db}.{name}: {e}; left as it is")),
        }
    }
    described.sort_by(|a, b| a.name.cmp(&b.name));
    (Database { name: db.to_owned(), present, described }, warnings)
}

enum Described {
    /// The collection, and what Milvus would not tell about its partitions or indexes.
    Found(Collection, Vec<String>),
    /// Dropped between ShowCollections and DescribeCollection.
    Gone,
    Refused(String),
}

async fn describe(upstream: &Upstream, db: &str, name: &str) -> Described {
    let request = views::CollectionRequest { db_name: db.to_owned(), collection_name: name.to_owned() };
    let index_request =
        IndexNameRequest { db_name: db.to_owned(), collection_name: name.to_owned(), ..Default::default() };
    let (described, partitions, indexes) = tokio::join!(
        call::<pb::DescribeCollectionResponse>(upstream, "DescribeCollection", db, &request),
        call::<pb::ShowPartitionsResponse>(upstream, "ShowPartitions", db, &request),
        call::<DescribeIndexResponse>(upstream, "DescribeIndex", db, &index_request),
    );
    let described = match described {
        Ok(reply) => reply,
        Err(e) => return Described::Refused(e),
    };
    match check(described.status.as_ref().map(Refusal::of)) {
        Ok(()) => {}
        Err(Refused::Milvus(r)) if r.collection_missing() => return Described::Gone,
        Err(e) => return Described::Refused(format!("DescribeCollection: {e}")),
    }
    if described.schema.is_empty() {
        return Described::Refused("DescribeCollection answered without a schema".into());
    }
    let (dimension, fields, description) = read_schema(&described.schema);
    let mut problems = Vec::new();
    let partitions = match partitions {
        Ok(reply) => match check(reply.status.as_ref().map(Refusal::of)) {
            Ok(()) => Some(reply.partition_names),
            Err(e) => {
                problems.push(format!("partitions of {db}.{name}: ShowPartitions: {e}; left as they are"));
                None
            }
        },
        Err(e) => {
            problems.push(format!("partitions of {db}.{name}: {e}; left as they are"));
            None
        }
    };
    let indexes = match indexes {
        Ok(reply) => match check(reply.status.as_ref().map(Refusal::of)) {
            Ok(()) => Some(reply.index_descriptions.into_iter().map(index_state).collect()),
            // No index at all is an error in Milvus's eyes, an empty list in ours.
            Err(Refused::Milvus(r)) if r.index_missing() => Some(Vec::new()),
            Err(e) => {
                problems.push(format!("indexes of {db}.{name}: DescribeIndex: {e}; left as they are"));
                None
            }
        },
        Err(e) => {
            problems.push(format!("indexes of {db}.{name}: {e}; left as they are"));
            None
        }
    };
    let collection = Collection {
        name: name.to_owned(),
        milvus_id: (described.collection_id != 0).then_some(described.collection_id),
        dimension,
        fields,
        description,
        shards: described.shards_num,
        partitions,
        indexes,
    };
    Described::Found(collection, problems)
}

fn index_state(d: views::IndexDescription) -> IndexState {
    IndexState {
        field: d.field_name,
        index_name: d.index_name,
        params: d.params.into_iter().map(|kv| (kv.key, kv.value)).collect(),
        state: index_state_name(d.state).into(),
        indexed_rows: d.indexed_rows,
        total_rows: d.total_rows,
        pending_rows: d.pending_index_rows,
        fail_reason: (!d.index_state_fail_reason.is_empty()).then_some(d.index_state_fail_reason),
    }
}

/// One call to Milvus, in database `db` (the `dbname` header, as SDKs send it).
async fn call<R: Message + Default>(
    upstream: &Upstream,
    method: &str,
    db: &str,
    request: &impl Message,
) -> Result<R, String> {
    let headers: Vec<(HeaderName, HeaderValue)> =
        HeaderValue::from_str(db).ok().filter(|_| !db.is_empty()).map(|v| (DBNAME, v)).into_iter().collect();
    let reply =
        upstream.unary(method, &request.encode_to_vec(), &headers, CALL_TIMEOUT).await.map_err(|e| e.to_string())?;
    R::decode(reply).map_err(|e| format!("{method} reply is not a Milvus reply: {e}"))
}

/// Milvus's refusal inside an OK reply.
#[derive(Debug)]
struct Refusal {
    error_code: i32,
    code: i32,
    reason: String,
}

impl Refusal {
    fn of(s: &views::Status) -> Refusal {
        Refusal { error_code: s.error_code, code: s.code, reason: s.reason.clone() }
    }

    /// `CollectionNotExists` (legacy code 4) / `ErrCollectionNotFound` (100).
    fn collection_missing(&self) -> bool {
        self.error_code == 4 || self.code == 100
    }

    /// `IndexNotExist` (legacy code 25) / `ErrIndexNotFound` (700). milvus-lite sends 700
    /// with the legacy code 11 (`IllegalRowRecord`).
    fn index_missing(&self) -> bool {
        self.error_code == 25 || self.code == 700
    }
}

enum Refused {
    /// Milvus answered, and said no.
    Milvus(Refusal),
    /// No status in the reply. Every Milvus reply carries one (even on success), so this
    /// is not Milvus's answer (something else on that port): never read it as "nothing".
    NoStatus,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::Milvus(r) => {
                write!(f, "Milvus refused: {} (code {}, error_code {})", r.reason, r.code, r.error_code)
            }
            Refused::NoStatus => f.write_str("the reply has no status, so it is not from Milvus"),
        }
    }
}

impl From<Refused> for String {
    fn from(r: Refused) -> String {
        r.to_string()
    }
}

fn check(status: Option<Refusal>) -> Result<(), Refused> {
    match status {
        None => Err(Refused::NoStatus),
        Some(r) if r.error_code != 0 || r.code != 0 => Err(Refused::Milvus(r)),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_without_status_is_not_taken_for_an_empty_answer() {
        // What an echoing server would send back for ShowCollections: db_name at 2 reads as
        // one collection name, and there is no status.
        let echoed = pb::ShowCollectionsRequest { db_name: "default".into() }.encode_to_vec();
        let reply = pb::ShowCollectionsResponse::decode(echoed.as_slice()).unwrap();
        assert_eq!(reply.collection_names, vec!["default".to_string()]);
        assert!(matches!(check(reply.status.as_ref().map(Refusal::of)), Err(Refused::NoStatus)));
    }

    #[test]
    fn an_empty_status_is_success_and_missing_things_are_recognised() {
        assert!(check(Some(Refusal::of(&views::Status::default()))).is_ok());
        let missing = views::Status { error_code: 4, reason: "collection not found".into(), code: 100 };
        let Err(Refused::Milvus(r)) = check(Some(Refusal::of(&missing))) else { panic!("a refusal") };
        assert!(r.collection_missing() && !r.index_missing());
        let no_index = views::Status { error_code: 25, reason: "index not found".into(), code: 700 };
        let Err(Refused::Milvus(r)) = check(Some(Refusal::of(&no_index))) else { panic!("a refusal") };
        assert!(r.index_missing());
    }
}

//! `collections`, `collection_partitions` and `index_management`: kept in step with what
//! Milvus did, and the name -> id lookups the log rows need.

use std::time::{Duration, Instant};

use foldhash::HashMap;
use serde::{Deserialize, Serialize};
use tokio_postgres::Transaction;
use uuid::Uuid;

/// A change Milvus confirmed, to be mirrored. Applying one twice changes nothing more
/// (records may be replayed after an outage).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MirrorOp {
    CreateCollection {
        database: String,
        name: String,
        dimension: Option<i32>,
        fields: serde_json::Value,
        description: String,
        shards: i32,
        created_by: Option<String>,
    },
    DropCollection {
        database: String,
        name: String,
    },
    RenameCollection {
        database: String,
        name: String,
        new_database: String,
        new_name: String,
    },
    CreatePartition {
        database: String,
        collection: String,
        partition: String,
    },
    DropPartition {
        database: String,
        collection: String,
        partition: String,
    },
    CreateIndex {
        database: String,
        collection: String,
        field: String,
        index_name: String,
        params: Vec<(String, String)>,
    },
    DropIndex {
        database: String,
        collection: String,
        field: String,
        index_name: String,
    },
    IndexProgress {
        database: String,
        collection: String,
        indexes: Vec<IndexState>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexState {
    pub field: String,
    pub index_name: String,
    pub params: Vec<(String, String)>,
    pub state: String,
    pub indexed_rows: i64,
    pub total_rows: i64,
    pub pending_rows: i64,
    pub fail_reason: Option<String>,
}

/// Milvus's `common.IndexState` as the `index_management.state` values.
pub fn index_state_name(state: i32) -> &'static str {
    match state {
        2 | 5 => "in_progress",
        3 => "finished",
        4 => "failed",
        _ => "pending",
    }
}

#[derive(Debug, Clone, Copy)]
pub struct CollectionRef {
    pub id: Uuid,
    pub dimension: Option<i32>,
}

/// Name -> id lookups, so log rows cost no query once a name has been seen.
#[derive(Default)]
pub struct Catalog {
    /// By database, then name: a lookup borrows the record's names instead of building a
    /// key (two allocations per row, on every row the writer resolves).
    collections: HashMap<String, HashMap<String, CollectionRef>>,
    users: HashMap<String, Option<Uuid>>,
    users_loaded: Option<Instant>,
}

/// Users may be created at any time; unknown names are looked up again after this.
const USER_CACHE_TTL: Duration = Duration::from_secs(30);

impl Catalog {
    /// Forgets everything (after a rolled-back transaction the cache may name rows that
    /// do not exist).
    pub fn clear(&mut self) {
        *self = Catalog::default();
    }

    pub async fn user_id(&mut self, tx: &Transaction<'_>, name: &str) -> Result<Option<Uuid>, tokio_postgres::Error> {
        if self.users_loaded.is_none_or(|t| t.elapsed() > USER_CACHE_TTL) {
            self.users.clear();
            self.users_loaded = Some(Instant::now());
        }
        if let Some(id) = self.users.get(name) {
            return Ok(*id);
        }
        let id = tx.query_opt("SELECT id FROM users WHERE username = $1", &[&name]).await?.map(|r| r.get(0));
        self.users.insert(name.to_owned(), id);
        Ok(id)
    }

    /// The live collection `database.name`. When Milvus just served a call on a collection
    /// the mirror does not know (created before the sidecar, or elsewhere), `create` adds it.
    pub async fn collection(
        &mut self,
        tx: &Transaction<'_>,
        database: &str,
        name: &str,
        create: bool,
    ) -> Result<Option<CollectionRef>, tokio_postgres::Error> {
        if let Some(found) = self.collections.get(database).and_then(|names| names.get(name)) {
            return Ok(Some(*found));
        }
        let row = tx
            .query_opt(
                "SELECT id, dimension FROM collections
                 WHERE database_name = $1 AND collection_name = $2 AND status = 'active'",
                &[&database, &name],
            )
            .await?;
        let found = match row {
            Some(row) => Some(CollectionRef { id: row.get(0), dimension: row.get(1) }),
            None if create => {
                let row = tx
                    .query_one(
                        "INSERT INTO collections (id, database_name, collection_name) VALUES ($1, $2, $3)
                         ON CONFLICT (database_name, collection_name) WHERE status = 'active'
                         DO UPDATE SET updated_at = now()
                         RETURNING id, dimension",
                        &[&Uuid::now_v7(), &database, &name],
                    )
                    .await?;
                Some(CollectionRef { id: row.get(0), dimension: row.get(1) })
            }
            None => None,
        };
        if let Some(found) = found {
            self.remember(database, name, found);
        }
        Ok(found)
    }

    fn remember(&mut self, database: &str, name: &str, found: CollectionRef) {
        self.collections.entry(database.to_owned()).or_default().insert(name.to_owned(), found);
    }

    fn forget(&mut self, database: &str, name: &str) {
        if let Some(names) = self.collections.get_mut(database) {
            names.remove(name);
        }
    }

    /// Applies `op` inside `tx`.
    pub async fn apply(&mut self, tx: &Transaction<'_>, op: &MirrorOp) -> Result<(), tokio_postgres::Error> {
        match op {
            MirrorOp::CreateCollection { database, name, dimension, fields, description, shards, created_by } => {
                let created_by = match created_by {
                    Some(user) => self.user_id(tx, user).await?,
                    None => None,
                };
                let row = tx
                    .query_one(
                        "INSERT INTO collections
                             (id, database_name, collection_name, dimension, fields, description, shards_num, created_by)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                         ON CONFLICT (database_name, collection_name) WHERE status = 'active'
                         DO UPDATE SET dimension = EXCLUDED.dimension, fields = EXCLUDED.fields,
                                       description = EXCLUDED.description, shards_num = EXCLUDED.shards_num,
                                       created_by = coalesce(collections.created_by, EXCLUDED.created_by),
                                       updated_at = now()
                         RETURNING id, dimension",
                        &[&Uuid::now_v7(), database, name, dimension, fields, description, shards, &created_by],
                    )
                    .await?;
                let found = CollectionRef { id: row.get(0), dimension: row.get(1) };
                self.remember(database, name, found);
                // The creator administers what they created.
                if let Some(user) = created_by {
                    tx.execute(
                        "INSERT INTO permissions (id, user_id, collection_id, permission_type) VALUES ($1, $2, $3, 'admin')
                         ON CONFLICT (user_id, collection_id, permission_type) DO NOTHING",
                        &[&Uuid::now_v7(), &user, &found.id],
                    )
                    .await?;
                }
            }
            MirrorOp::DropCollection { database, name } => {
                if let Some(c) = self.collection(tx, database, name, false).await? {
                    tx.execute(
                        "UPDATE collections SET status = 'dropped', dropped_at = now(), updated_at = now() WHERE id = $1",
                        &[&c.id],
                    )
                    .await?;
                    // Grants die with the collection: a new one of the same name starts clean.
                    tx.execute("DELETE FROM permissions WHERE collection_id = $1", &[&c.id]).await?;
                    tx.execute(
                        "UPDATE collection_partitions SET status = 'dropped', dropped_at = now()
                         WHERE collection_id = $1 AND status = 'active'",
                        &[&c.id],
                    )
                    .await?;
                    tx.execute(
                        "UPDATE index_management SET state = 'dropped', updated_at = now()
                         WHERE collection_id = $1 AND state <> 'dropped'",
                        &[&c.id],
                    )
                    .await?;
                }
                self.forget(database, name);
            }
            MirrorOp::RenameCollection { database, name, new_database, new_name } => {
                if let Some(c) = self.collection(tx, database, name, false).await? {
                    tx.execute(
                        "UPDATE collections SET database_name = $2, collection_name = $3, updated_at = now()
                         WHERE id = $1",
                        &[&c.id, new_database, new_name],
                    )
                    .await?;
                    self.forget(database, name);
                    self.remember(new_database, new_name, c);
                }
            }
            MirrorOp::CreatePartition { database, collection, partition } => {
                if let Some(c) = self.collection(tx, database, collection, true).await? {
                    tx.execute(
                        "INSERT INTO collection_partitions (id, collection_id, partition_name) VALUES ($1, $2, $3)
                         ON CONFLICT (collection_id, partition_name) WHERE status = 'active' DO NOTHING",
                        &[&Uuid::now_v7(), &c.id, partition],
                    )
                    .await?;
                }
            }
            MirrorOp::DropPartition { database, collection, partition } => {
                if let Some(c) = self.collection(tx, database, collection, false).await? {
                    tx.execute(
                        "UPDATE collection_partitions SET status = 'dropped', dropped_at = now()
                         WHERE collection_id = $1 AND partition_name = $2 AND status = 'active'",
                        &[&c.id, partition],
                    )
                    .await?;
                }
            }
            MirrorOp::CreateIndex { database, collection, field, index_name, params } => {
                if let Some(c) = self.collection(tx, database, collection, true).await? {
                    upsert_index(tx, c.id, field, index_name, params, None).await?;
                }
            }
            MirrorOp::DropIndex { database, collection, field, index_name } => {
                if let Some(c) = self.collection(tx, database, collection, false).await? {
                    // Milvus drops by index name, or by field when the name is empty.
                    tx.execute(
                        "UPDATE index_management SET state = 'dropped', updated_at = now()
                         WHERE collection_id = $1 AND state <> 'dropped'
                           AND (index_name = $2 OR ($2 = '' AND field_name = $3))",
                        &[&c.id, index_name, field],
                    )
                    .await?;
                }
            }
            MirrorOp::IndexProgress { database, collection, indexes } => {
                if let Some(c) = self.collection(tx, database, collection, true).await? {
                    for index in indexes {
                        upsert_index(tx, c.id, &index.field, &index.index_name, &index.params, Some(index)).await?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Index type and metric come from the index parameters (`index_type`, `metric_type`);
/// the metric also becomes the collection's when it has none yet.
async fn upsert_index(
    tx: &Transaction<'_>,
    collection: Uuid,
    field: &str,
    index_name: &str,
    params: &[(String, String)],
    progress: Option<&IndexState>,
) -> Result<(), tokio_postgres::Error> {
    let param = |key: &str| params.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v.clone());
    let index_type = param("index_type");
    let metric_type = param("metric_type");
    // Milvus names an unnamed index after its field.
    let index_name = if index_name.is_empty() { field } else { index_name };
    let params_json = serde_json::Value::Object(
        params.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect(),
    );
    let state = progress.map(|p| p.state.as_str());
    tx.execute(
        "INSERT INTO index_management
             (id, collection_id, field_name, index_name, index_type, metric_type, params, state,
              indexed_rows, total_rows, pending_rows, fail_reason)
         VALUES ($1, $2, $3, $4, $5, $6, $7, coalesce($8, 'pending'), $9, $10, $11, $12)
         ON CONFLICT (collection_id, index_name) WHERE state <> 'dropped'
         DO UPDATE SET field_name = CASE WHEN EXCLUDED.field_name = '' THEN index_management.field_name
                                         ELSE EXCLUDED.field_name END,
                       index_type = coalesce(EXCLUDED.index_type, index_management.index_type),
                       metric_type = coalesce(EXCLUDED.metric_type, index_management.metric_type),
                       -- merged: DescribeIndex may leave out build parameters CreateIndex sent
                       params = index_management.params || EXCLUDED.params,
                       state = coalesce($8, index_management.state),
                       indexed_rows = coalesce(EXCLUDED.indexed_rows, index_management.indexed_rows),
                       total_rows = coalesce(EXCLUDED.total_rows, index_management.total_rows),
                       pending_rows = coalesce(EXCLUDED.pending_rows, index_management.pending_rows),
                       fail_reason = EXCLUDED.fail_reason,
                       updated_at = now()",
        &[
            &Uuid::now_v7(),
            &collection,
            &field,
            &index_name,
            &index_type,
            &metric_type,
            &params_json,
            &state,
            &progress.map(|p| p.indexed_rows),
            &progress.map(|p| p.total_rows),
            &progress.map(|p| p.pending_rows),
            &progress.and_then(|p| p.fail_reason.clone()),
        ],
    )
    .await?;
    if let Some(metric) = metric_type {
        tx.execute(
            "UPDATE collections SET metric_type = $2, updated_at = now() WHERE id = $1 AND metric_type IS DISTINCT FROM $2",
            &[&collection, &metric],
        )
        .await?;
    }
    Ok(())
}

//! The PostgreSQL side of a sync: compare the mirror with the snapshot of Milvus and apply
//! the differences as [`MirrorOp`]s, inside the caller's transaction. Rows that already
//! match are not touched, so a second sync changes nothing (not even `updated_at`).

use std::collections::{BTreeSet, HashMap};
use std::time::SystemTime;

use serde_json::Value;
use tokio_postgres::Transaction;
use uuid::Uuid;

use super::Report;
use super::fetch::{Collection, Database, Snapshot};
use crate::store::mirror::{Catalog, IndexState, MirrorOp};

type Result<T> = std::result::Result<T, tokio_postgres::Error>;

/// The partition Milvus makes with every collection. The mirror records the partitions
/// clients create (as the record writer does), so a collection reads the same whether it
/// came through the sidecar or from a sync.
const DEFAULT_PARTITION: &str = "_default";

/// `since`: PostgreSQL's clock before Milvus was read. Rows written after it are newer than
/// the snapshot: they are never dropped for being absent from it, and what was dropped
/// after it is not brought back.
pub async fn reconcile(
    tx: &Transaction<'_>,
    snapshot: &Snapshot,
    since: SystemTime,
    report: &mut Report,
) -> Result<()> {
    let mut catalog = Catalog::default();
    for database in &snapshot.databases {
        Reconcile { tx, catalog: &mut catalog, database, since, report }.run().await?;
    }
    let listed: Vec<&str> = snapshot.databases.iter().map(|d| d.name.as_str()).collect();
    let unlisted = tx
        .query(
            "SELECT database_name, count(*) FROM collections
             WHERE status = 'active' AND NOT (database_name = ANY($1))
             GROUP BY database_name ORDER BY database_name",
            &[&listed],
        )
        .await?;
    for row in unlisted {
        let (name, count): (String, i64) = (row.get(0), row.get(1));
        report.warnings.push(format!(
            "database {name}: {count} active collection(s) in the mirror, but Milvus did not list that database's \
             collections; left as they are"
        ));
    }
    Ok(())
}

/// A live `collections` row, as the sync compares it.
struct Live {
    dimension: Option<i32>,
    fields: Value,
    description: String,
    shards: Option<i32>,
    milvus_id: Option<i64>,
    /// Created and last changed before the snapshot: safe to judge by it.
    settled: bool,
}

struct Reconcile<'a, 't> {
    tx: &'a Transaction<'t>,
    catalog: &'a mut Catalog,
    database: &'a Database,
    since: SystemTime,
    report: &'a mut Report,
}

impl Reconcile<'_, '_> {
    async fn run(mut self) -> Result<()> {
        let db = self.database;
        // FOR NO KEY UPDATE: the record writer's changes to these rows wait for this
        // transaction, while its log rows (which only reference them) do not.
        let rows = self
            .tx
            .query(
                "SELECT collection_name, dimension, fields, coalesce(description, ''), shards_num,
                        milvus_collection_id, created_at < $2 AND updated_at < $2
                 FROM collections WHERE database_name = $1 AND status = 'active'
                 FOR NO KEY UPDATE",
                &[&db.name, &self.since],
            )
            .await?;
        let live: HashMap<String, Live> = rows
            .iter()
            .map(|r| {
                let live = Live {
                    dimension: r.get(1),
                    fields: r.get(2),
                    description: r.get(3),
                    shards: r.get(4),
                    milvus_id: r.get(5),
                    settled: r.get(6),
                };
                (r.get(0), live)
            })
            .collect();

        for collection in &db.described {
            let found = live.get(&collection.name);
            // Milvus does not always say (0); keep what the mirror knows then.
            let shards = match collection.shards {
                0 => found.and_then(|l| l.shards).unwrap_or(0),
                n => n,
            };
            match found {
                // Written after Milvus was read (the record writer, for a call Milvus
                // served meanwhile): newer than the snapshot, so left as it is.
                Some(l) if !l.settled => continue,
                // Same name, another Milvus collection: dropped and recreated behind our
                // back. Grants for the old one must not carry over to the new one.
                Some(l) if replaced(l, collection) => {
                    self.apply(MirrorOp::DropCollection { database: db.name.clone(), name: collection.name.clone() })
                        .await?;
                    self.report.dropped += 1;
                    self.create(collection, shards).await?;
                    self.report.added += 1;
                }
                Some(l) if differs(l, collection, shards) => {
                    self.create(collection, shards).await?;
                    self.report.updated += 1;
                }
                Some(_) => {}
                None if self.dropped_since(&collection.name).await? => continue,
                None => {
                    self.create(collection, shards).await?;
                    self.report.added += 1;
                }
            }
            let Some(row) = self.catalog.collection(self.tx, &db.name, &collection.name, false).await? else {
                continue;
            };
            if let Some(partitions) = &collection.partitions {
                self.partitions(&collection.name, row.id, partitions).await?;
            }
            if let Some(indexes) = &collection.indexes {
                self.indexes(&collection.name, row.id, indexes).await?;
            }
        }

        let mut gone: Vec<&String> =
            live.iter().filter(|(name, l)| l.settled && !db.present.contains(*name)).map(|(name, _)| name).collect();
        gone.sort();
        for name in gone {
            self.apply(MirrorOp::DropCollection { database: db.name.clone(), name: name.clone() }).await?;
            self.report.dropped += 1;
        }
        Ok(())
    }

    async fn apply(&mut self, op: MirrorOp) -> Result<()> {
        self.catalog.apply(self.tx, &op).await
    }

    /// Adds or updates the collection (an upsert), with Milvus's id for it.
    async fn create(&mut self, c: &Collection, shards: i32) -> Result<()> {
        let database = self.database.name.clone();
        self.apply(MirrorOp::CreateCollection {
            database: database.clone(),
            name: c.name.clone(),
            dimension: c.dimension,
            fields: c.fields.clone(),
            description: c.description.clone(),
            shards,
            created_by: None,
        })
        .await?;
        if let Some(milvus_id) = c.milvus_id {
            self.tx
                .execute(
                    "UPDATE collections SET milvus_collection_id = $3
                     WHERE database_name = $1 AND collection_name = $2 AND status = 'active'
                       AND milvus_collection_id IS DISTINCT FROM $3",
                    &[&database, &c.name, &milvus_id],
                )
                .await?;
        }
        Ok(())
    }

    /// Whether the mirror saw this collection dropped after Milvus was read.
    async fn dropped_since(&self, name: &str) -> Result<bool> {
        let row = self
            .tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM collections WHERE database_name = $1 AND collection_name = $2
                                AND status = 'dropped' AND dropped_at >= $3)",
                &[&self.database.name, &name, &self.since],
            )
            .await?;
        Ok(row.get(0))
    }

    async fn partitions(&mut self, collection: &str, id: Uuid, names: &[String]) -> Result<()> {
        let rows = self
            .tx
            .query(
                "SELECT partition_name, created_at < $2 FROM collection_partitions
                 WHERE collection_id = $1 AND status = 'active' FOR NO KEY UPDATE",
                &[&id, &self.since],
            )
            .await?;
        let live: HashMap<String, bool> =
            rows.iter().map(|r| (r.get(0), r.get(1))).filter(|(name, _)| name != DEFAULT_PARTITION).collect();
        let in_milvus: BTreeSet<&String> = names.iter().filter(|name| *name != DEFAULT_PARTITION).collect();
        for &name in &in_milvus {
            if live.contains_key(name) {
                continue;
            }
            let dropped_since: bool = self
                .tx
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM collection_partitions WHERE collection_id = $1
                                    AND partition_name = $2 AND status = 'dropped' AND dropped_at >= $3)",
                    &[&id, name, &self.since],
                )
                .await?
                .get(0);
            if !dropped_since {
                let op = MirrorOp::CreatePartition {
                    database: self.database.name.clone(),
                    collection: collection.to_owned(),
                    partition: name.clone(),
                };
                self.apply(op).await?;
                self.report.partitions_added += 1;
            }
        }
        let mut gone: Vec<&String> =
            live.iter().filter(|(name, settled)| **settled && !in_milvus.contains(name)).map(|(n, _)| n).collect();
        gone.sort();
        for name in gone {
            let op = MirrorOp::DropPartition {
                database: self.database.name.clone(),
                collection: collection.to_owned(),
                partition: name.clone(),
            };
            self.apply(op).await?;
            self.report.partitions_dropped += 1;
        }
        Ok(())
    }

    /// Records Milvus's indexes and their progress. Indexes the mirror has and Milvus does
    /// not list are left alone: milvus-lite, for one, lists an index under its field's
    /// name rather than the name it was created with.
    async fn indexes(&mut self, collection: &str, id: Uuid, indexes: &[IndexState]) -> Result<()> {
        let rows = self
            .tx
            .query(
                "SELECT index_name, field_name, params, state, indexed_rows, total_rows, pending_rows, fail_reason
                 FROM index_management WHERE collection_id = $1 AND state <> 'dropped'",
                &[&id],
            )
            .await?;
        let live: HashMap<String, &tokio_postgres::Row> = rows.iter().map(|r| (r.get(0), r)).collect();
        let mut changed = Vec::new();
        for index in indexes {
            // Milvus names an unnamed index after its field (as the mirror does).
            let name = if index.index_name.is_empty() { &index.field } else { &index.index_name };
            match live.get(name) {
                Some(row) if index_differs(row, index) => {
                    changed.push(index.clone());
                    self.report.indexes_updated += 1;
                }
                Some(_) => {}
                None => {
                    let dropped_since: bool = self
                        .tx
                        .query_one(
                            "SELECT EXISTS (SELECT 1 FROM index_management WHERE collection_id = $1
                                            AND index_name = $2 AND state = 'dropped' AND updated_at >= $3)",
                            &[&id, name, &self.since],
                        )
                        .await?
                        .get(0);
                    if !dropped_since {
                        changed.push(index.clone());
                        self.report.indexes_added += 1;
                    }
                }
            }
        }
        if !changed.is_empty() {
            let op = MirrorOp::IndexProgress {
                database: self.database.name.clone(),
                collection: collection.to_owned(),
                indexes: changed,
            };
            self.apply(op).await?;
        }
        Ok(())
    }
}

fn replaced(live: &Live, c: &Collection) -> bool {
    matches!((live.milvus_id, c.milvus_id), (Some(ours), Some(theirs)) if ours != theirs)
}

fn differs(live: &Live, c: &Collection, shards: i32) -> bool {
    live.dimension != c.dimension
        || live.fields != c.fields
        || live.description != c.description
        || live.shards != Some(shards)
        || (c.milvus_id.is_some() && live.milvus_id != c.milvus_id)
}

/// Whether recording `index` would change its row (as `upsert_index` in the mirror writes it).
fn index_differs(row: &tokio_postgres::Row, index: &IndexState) -> bool {
    let field: String = row.get(1);
    let params: Value = row.get(2);
    let state: String = row.get(3);
    let counts: [Option<i64>; 3] = [row.get(4), row.get(5), row.get(6)];
    let fail_reason: Option<String> = row.get(7);
    let wanted_params =
        Value::Object(index.params.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect());
    (!index.field.is_empty() && index.field != field)
        || (!index.params.is_empty() && wanted_params != params)
        || index.state != state
        || counts != [Some(index.indexed_rows), Some(index.total_rows), Some(index.pending_rows)]
        || index.fail_reason != fail_reason
}

//! The four log tables, written in batches: binary COPY into a temporary table, then one
//! INSERT ... ON CONFLICT DO NOTHING, so a batch replayed after an outage (PostgreSQL may
//! have committed it before the connection broke) never lands twice.

use std::net::IpAddr;
use std::time::SystemTime;

use futures_util::pin_mut;
use serde::{Deserialize, Serialize};
use tokio_postgres::Transaction;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

/// What every row of one call shares. `collection_id` / `user_id` are resolved from the
/// names when the batch is written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallRow {
    pub id: Uuid,
    pub at: SystemTime,
    pub user: Option<String>,
    pub database: String,
    pub collection: Option<String>,
    pub duration_ms: f64,
    pub success: bool,
    pub grpc_code: i16,
    pub milvus_code: i32,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerfRow {
    pub operation: String,
    pub request_bytes: i64,
    pub reply_bytes: i64,
    pub metadata: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryRow {
    pub query_type: String,
    pub top_k: Option<i32>,
    pub nq: Option<i32>,
    pub search_params: serde_json::Value,
    pub filter: Option<String>,
    pub output_fields: Vec<String>,
    pub result_count: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IngestionRow {
    pub operation: String,
    pub partition: Option<String>,
    pub rows_sent: Option<i64>,
    pub rows_acknowledged: Option<i64>,
    pub bytes: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRow {
    pub action: String,
    pub resource_type: String,
    pub resource_id: Option<String>,
    pub details: serde_json::Value,
    pub ip: Option<IpAddr>,
    pub user_agent: Option<String>,
}

/// The rows of one batch, with names already resolved to ids.
#[derive(Default)]
pub struct Batch<'a> {
    pub perf: Vec<(&'a CallRow, Ids, &'a PerfRow)>,
    pub query: Vec<(&'a CallRow, Ids, &'a QueryRow, Option<i32>)>,
    pub ingestion: Vec<(&'a CallRow, Ids, &'a IngestionRow)>,
    pub audit: Vec<(&'a CallRow, Ids, &'a AuditRow)>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Ids {
    pub user: Option<Uuid>,
    pub collection: Option<Uuid>,
}

impl Batch<'_> {
    pub fn rows(&self) -> usize {
        self.perf.len() + self.query.len() + self.ingestion.len() + self.audit.len()
    }

    pub async fn write(&self, tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
        if !self.perf.is_empty() {
            let rows = self.perf.iter().map(|(c, ids, p)| -> Vec<&(dyn ToSql + Sync)> {
                vec![
                    &c.id,
                    &c.at,
                    &p.operation,
                    &ids.user,
                    &c.database,
                    &ids.collection,
                    &c.duration_ms,
                    &c.success,
                    &c.grpc_code,
                    &c.milvus_code,
                    &c.error,
                    &p.request_bytes,
                    &p.reply_bytes,
                    &p.metadata,
                ]
            });
            copy(
                tx,
                "performance_metrics",
                "id, recorded_at, operation_type, user_id, database_name, collection_id, duration_ms, success, \
                 grpc_code, milvus_code, error_message, request_bytes, reply_bytes, metadata",
                &[
                    Type::UUID,
                    Type::TIMESTAMPTZ,
                    Type::TEXT,
                    Type::UUID,
                    Type::TEXT,
                    Type::UUID,
                    Type::FLOAT8,
                    Type::BOOL,
                    Type::INT2,
                    Type::INT4,
                    Type::TEXT,
                    Type::INT8,
                    Type::INT8,
                    Type::JSONB,
                ],
                rows,
            )
            .await?;
        }
        if !self.query.is_empty() {
            let rows = self.query.iter().map(|(c, ids, q, dim)| -> Vec<&(dyn ToSql + Sync)> {
                vec![
                    &c.id,
                    &c.at,
                    &ids.user,
                    &c.user,
                    &c.database,
                    &ids.collection,
                    &q.query_type,
                    &c.duration_ms,
                    &c.success,
                    &q.top_k,
                    &q.nq,
                    dim,
                    &q.search_params,
                    &q.filter,
                    &q.output_fields,
                    &q.result_count,
                    &c.error,
                ]
            });
            copy(
                tx,
                "query_logs",
                "id, executed_at, user_id, username, database_name, collection_id, query_type, duration_ms, \
                 success, top_k, nq, query_vector_dimension, search_params, filter_expression, output_fields, \
                 result_count, error_message",
                &[
                    Type::UUID,
                    Type::TIMESTAMPTZ,
                    Type::UUID,
                    Type::TEXT,
                    Type::TEXT,
                    Type::UUID,
                    Type::TEXT,
                    Type::FLOAT8,
                    Type::BOOL,
                    Type::INT4,
                    Type::INT4,
                    Type::INT4,
                    Type::JSONB,
                    Type::TEXT,
                    Type::TEXT_ARRAY,
                    Type::INT8,
                    Type::TEXT,
                ],
                rows,
            )
            .await?;
        }
        if !self.ingestion.is_empty() {
            let rows = self.ingestion.iter().map(|(c, ids, i)| -> Vec<&(dyn ToSql + Sync)> {
                vec![
                    &c.id,
                    &c.at,
                    &ids.user,
                    &c.user,
                    &c.database,
                    &ids.collection,
                    &i.partition,
                    &i.operation,
                    &i.rows_sent,
                    &i.rows_acknowledged,
                    &i.bytes,
                    &c.duration_ms,
                    &c.success,
                    &c.error,
                ]
            });
            copy(
                tx,
                "ingestion_logs",
                "id, ingested_at, user_id, username, database_name, collection_id, partition_name, operation, \
                 rows_sent, rows_acknowledged, bytes, duration_ms, success, error_message",
                &[
                    Type::UUID,
                    Type::TIMESTAMPTZ,
                    Type::UUID,
                    Type::TEXT,
                    Type::TEXT,
                    Type::UUID,
                    Type::TEXT,
                    Type::TEXT,
                    Type::INT8,
                    Type::INT8,
                    Type::INT8,
                    Type::FLOAT8,
                    Type::BOOL,
                    Type::TEXT,
                ],
                rows,
            )
            .await?;
        }
        if !self.audit.is_empty() {
            let rows = self.audit.iter().map(|(c, ids, a)| -> Vec<&(dyn ToSql + Sync)> {
                vec![
                    &c.id,
                    &c.at,
                    &ids.user,
                    &c.user,
                    &a.action,
                    &a.resource_type,
                    &a.resource_id,
                    &c.database,
                    &ids.collection,
                    &c.success,
                    &c.grpc_code,
                    &c.milvus_code,
                    &c.error,
                    &a.details,
                    &a.ip,
                    &a.user_agent,
                ]
            });
            copy(
                tx,
                "audit_logs",
                "id, occurred_at, user_id, username, action, resource_type, resource_id, database_name, \
                 collection_id, success, grpc_code, milvus_code, error_message, details, ip_address, user_agent",
                &[
                    Type::UUID,
                    Type::TIMESTAMPTZ,
                    Type::UUID,
                    Type::TEXT,
                    Type::TEXT,
                    Type::TEXT,
                    Type::TEXT,
                    Type::TEXT,
                    Type::UUID,
                    Type::BOOL,
                    Type::INT2,
                    Type::INT4,
                    Type::TEXT,
                    Type::JSONB,
                    Type::INET,
                    Type::TEXT,
                ],
                rows,
            )
            .await?;
        }
        Ok(())
    }
}

/// COPY `rows` into a temporary twin of `table`, then move them across, skipping rows
/// whose id is already there.
async fn copy<'a, I>(
    tx: &Transaction<'_>,
    table: &str,
    columns: &str,
    types: &[Type],
    rows: I,
) -> Result<(), tokio_postgres::Error>
where
    I: Iterator<Item = Vec<&'a (dyn ToSql + Sync)>>,
{
    let staging = format!("staging_{table}");
    // The staging table lives as long as the pooled connection; the notice that it already
    // exists would otherwise be logged for every batch.
    tx.batch_execute(&format!(
        "SET LOCAL client_min_messages = warning;
         CREATE TEMPORARY TABLE IF NOT EXISTS {staging} (LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
    ))
    .await?;
    let sink = tx.copy_in(&format!("COPY {staging} ({columns}) FROM STDIN (FORMAT binary)")).await?;
    let writer = BinaryCopyInWriter::new(sink, types);
    pin_mut!(writer);
    for row in rows {
        writer.as_mut().write(&row).await?;
    }
    writer.finish().await?;
    tx.batch_execute(&format!(
        "INSERT INTO {table} ({columns}) SELECT {columns} FROM {staging} ON CONFLICT DO NOTHING"
    ))
    .await?;
    Ok(())
}

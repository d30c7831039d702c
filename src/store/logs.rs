//! The four log tables, written in batches by binary COPY. A batch replayed from the spill
//! file (PostgreSQL may have committed it before the connection broke) goes through a
//! temporary table and INSERT ... ON CONFLICT DO NOTHING instead, so it never lands twice.

use std::net::IpAddr;
use std::time::SystemTime;

use bytes::{BufMut, BytesMut};
use futures_util::{SinkExt, pin_mut};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio_postgres::Transaction;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use uuid::Uuid;

/// A `jsonb` column's value kept as its JSON text: COPYed as is, and written to the spill
/// file as the JSON it is. Building a `serde_json::Value` tree for each row, serializing it
/// and dropping it was the largest part of the writer thread's profile.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JsonText(Box<RawValue>);

impl JsonText {
    /// `value` as JSON text; our row types always serialize, `{}` should one not.
    pub fn of(value: &impl Serialize) -> JsonText {
        serde_json::value::to_raw_value(value).map_or_else(|_| JsonText::empty_object(), JsonText)
    }

    pub fn empty_object() -> JsonText {
        JsonText(RawValue::from_string("{}".to_owned()).expect("{} is JSON"))
    }

    pub fn as_str(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for JsonText {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl ToSql for JsonText {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        // jsonb's binary form is a version byte, then the text.
        if *ty == Type::JSONB {
            out.put_u8(1);
        }
        out.put_slice(self.as_str().as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::JSON | Type::JSONB)
    }

    to_sql_checked!();
}

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
    pub metadata: JsonText,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryRow {
    pub query_type: String,
    pub top_k: Option<i32>,
    pub nq: Option<i32>,
    pub search_params: JsonText,
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
    pub details: JsonText,
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

    /// One COPY per table. A `replay` (rows that may be there already) takes two round
    /// trips more: one to make the staging tables, one to move every table's rows across,
    /// skipping those present. With `--durable-records` every call waits for this.
    pub async fn write(&self, tx: &Transaction<'_>, replay: bool) -> Result<(), BatchError> {
        let tables: Vec<&LogTable> = [
            (!self.perf.is_empty()).then_some(&PERFORMANCE_METRICS),
            (!self.query.is_empty()).then_some(&QUERY_LOGS),
            (!self.ingestion.is_empty()).then_some(&INGESTION_LOGS),
            (!self.audit.is_empty()).then_some(&AUDIT_LOGS),
        ]
        .into_iter()
        .flatten()
        .collect();
        if tables.is_empty() {
            return Ok(());
        }
        // Fresh rows carry ids made for them: straight into the tables, no conflict to skip.
        let target = if replay { "staging_" } else { "" };
        if replay {
            // The staging tables live as long as the pooled connection; the notice that one
            // already exists would otherwise be logged for every batch.
            let mut prepare = String::from("SET LOCAL client_min_messages = warning;");
            for table in &tables {
                prepare.push_str(&format!(
                    "CREATE TEMPORARY TABLE IF NOT EXISTS staging_{0} (LIKE {0} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;",
                    table.name
                ));
            }
            tx.batch_execute(&prepare).await?;
        }
        if !self.perf.is_empty() {
            let rows = self.perf.iter().map(|(c, ids, p)| -> [&(dyn ToSql + Sync); 14] {
                [
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
            copy(tx, target, &PERFORMANCE_METRICS, rows).await?;
        }
        if !self.query.is_empty() {
            let rows = self.query.iter().map(|(c, ids, q, dim)| -> [&(dyn ToSql + Sync); 17] {
                [
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
            copy(tx, target, &QUERY_LOGS, rows).await?;
        }
        if !self.ingestion.is_empty() {
            let rows = self.ingestion.iter().map(|(c, ids, i)| -> [&(dyn ToSql + Sync); 14] {
                [
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
            copy(tx, target, &INGESTION_LOGS, rows).await?;
        }
        if !self.audit.is_empty() {
            let rows = self.audit.iter().map(|(c, ids, a)| -> [&(dyn ToSql + Sync); 16] {
                [
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
            copy(tx, target, &AUDIT_LOGS, rows).await?;
        }
        if !replay {
            return Ok(());
        }
        let moves: String = tables
            .iter()
            .map(|table| {
                let columns = table.column_list();
                format!(
                    "INSERT INTO {0} ({columns}) SELECT {columns} FROM staging_{0} ON CONFLICT DO NOTHING;",
                    table.name
                )
            })
            .collect();
        Ok(tx.batch_execute(&moves).await?)
    }
}

/// A log table's columns as the batch writes them: names and binary COPY types side by
/// side, in the order of the values in `Batch::write`.
struct LogTable {
    name: &'static str,
    columns: &'static [(&'static str, Type)],
}

const PERFORMANCE_METRICS: LogTable = LogTable {
    name: "performance_metrics",
    columns: &[
        ("id", Type::UUID),
        ("recorded_at", Type::TIMESTAMPTZ),
        ("operation_type", Type::TEXT),
        ("user_id", Type::UUID),
        ("database_name", Type::TEXT),
        ("collection_id", Type::UUID),
        ("duration_ms", Type::FLOAT8),
        ("success", Type::BOOL),
        ("grpc_code", Type::INT2),
        ("milvus_code", Type::INT4),
        ("error_message", Type::TEXT),
        ("request_bytes", Type::INT8),
        ("reply_bytes", Type::INT8),
        ("metadata", Type::JSONB),
    ],
};

const QUERY_LOGS: LogTable = LogTable {
    name: "query_logs",
    columns: &[
        ("id", Type::UUID),
        ("executed_at", Type::TIMESTAMPTZ),
        ("user_id", Type::UUID),
        ("username", Type::TEXT),
        ("database_name", Type::TEXT),
        ("collection_id", Type::UUID),
        ("query_type", Type::TEXT),
        ("duration_ms", Type::FLOAT8),
        ("success", Type::BOOL),
        ("top_k", Type::INT4),
        ("nq", Type::INT4),
        ("query_vector_dimension", Type::INT4),
        ("search_params", Type::JSONB),
        ("filter_expression", Type::TEXT),
        ("output_fields", Type::TEXT_ARRAY),
        ("result_count", Type::INT8),
        ("error_message", Type::TEXT),
    ],
};

const INGESTION_LOGS: LogTable = LogTable {
    name: "ingestion_logs",
    columns: &[
        ("id", Type::UUID),
        ("ingested_at", Type::TIMESTAMPTZ),
        ("user_id", Type::UUID),
        ("username", Type::TEXT),
        ("database_name", Type::TEXT),
        ("collection_id", Type::UUID),
        ("partition_name", Type::TEXT),
        ("operation", Type::TEXT),
        ("rows_sent", Type::INT8),
        ("rows_acknowledged", Type::INT8),
        ("bytes", Type::INT8),
        ("duration_ms", Type::FLOAT8),
        ("success", Type::BOOL),
        ("error_message", Type::TEXT),
    ],
};

const AUDIT_LOGS: LogTable = LogTable {
    name: "audit_logs",
    columns: &[
        ("id", Type::UUID),
        ("occurred_at", Type::TIMESTAMPTZ),
        ("user_id", Type::UUID),
        ("username", Type::TEXT),
        ("action", Type::TEXT),
        ("resource_type", Type::TEXT),
        ("resource_id", Type::TEXT),
        ("database_name", Type::TEXT),
        ("collection_id", Type::UUID),
        ("success", Type::BOOL),
        ("grpc_code", Type::INT2),
        ("milvus_code", Type::INT4),
        ("error_message", Type::TEXT),
        ("details", Type::JSONB),
        ("ip_address", Type::INET),
        ("user_agent", Type::TEXT),
    ],
};

impl LogTable {
    fn column_list(&self) -> String {
        self.columns.iter().map(|(name, _)| *name).collect::<Vec<_>>().join(", ")
    }
}

/// COPY `rows` into `table`, or into its temporary twin when `prefix` is `staging_`. A row
/// is an array of references, not a `Vec`: one allocation less per row.
///
/// The rows are encoded first and go to PostgreSQL as one message. tokio-postgres's
/// `BinaryCopyInWriter` sends a message each 4 KiB, each one its own socket write for the
/// writer's thread to make and for PostgreSQL to wake up for; and a value that cannot be
/// encoded now fails the batch before its COPY has begun.
async fn copy<'a, const N: usize, I>(
    tx: &Transaction<'_>,
    prefix: &str,
    table: &LogTable,
    rows: I,
) -> Result<(), BatchError>
where
    I: Iterator<Item = [&'a (dyn ToSql + Sync); N]>,
{
    let data = encode_binary_copy(table, rows)?.freeze();
    let columns = table.column_list();
    let sink = tx.copy_in(&format!("COPY {prefix}{} ({columns}) FROM STDIN (FORMAT binary)", table.name)).await?;
    pin_mut!(sink);
    sink.as_mut().send(data).await?;
    sink.finish().await?;
    Ok(())
}

/// PostgreSQL's binary COPY format: a header, each row as its field count then each value
/// as its length (-1: NULL) and bytes, and a trailer.
fn encode_binary_copy<'a, const N: usize>(
    table: &LogTable,
    rows: impl Iterator<Item = [&'a (dyn ToSql + Sync); N]>,
) -> Result<BytesMut, BatchError> {
    debug_assert_eq!(N, table.columns.len(), "{}: one value per column", table.name);
    const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
    let header_and_trailer = SIGNATURE.len() + 4 + 4 + 2;
    let mut buf = BytesMut::with_capacity(header_and_trailer + rows.size_hint().0 * N * COPY_BYTES_PER_VALUE);
    buf.put_slice(SIGNATURE);
    buf.put_i32(0); // flags
    buf.put_i32(0); // header extension length
    for row in rows {
        buf.put_i16(N as i16);
        for (value, (column, ty)) in row.iter().zip(table.columns) {
            let at = buf.len();
            buf.put_i32(0);
            let encoded = value.to_sql_checked(ty, &mut buf).map_err(|e| BatchError::Encode {
                table: table.name,
                column,
                reason: e.to_string(),
            })?;
            let len = match encoded {
                IsNull::Yes => {
                    buf.truncate(at + 4);
                    -1
                }
                IsNull::No => i32::try_from(buf.len() - at - 4).map_err(|_| BatchError::Encode {
                    table: table.name,
                    column,
                    reason: "value longer than 2 GiB".into(),
                })?,
            };
            buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
        }
    }
    buf.put_i16(-1);
    Ok(buf)
}

/// What a log row's value takes in the COPY at most, about (its length included; a search's
/// parameters are the longest): the buffer is sized for the rows at once rather than grown,
/// and copied, as they are encoded.
const COPY_BYTES_PER_VALUE: usize = 24;

/// Why a batch was not written.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
    /// A value PostgreSQL's binary form cannot hold: the row is at fault, not PostgreSQL.
    #[error("cannot encode {table}.{column}: {reason}")]
    Encode { table: &'static str, column: &'static str, reason: String },
}

//! The four log tables, written in batches by binary COPY. A batch replayed from the spill
//! file (PostgreSQL may have committed it before the connection broke) goes through a
//! temporary table and INSERT ... ON CONFLICT DO NOTHING instead, so it never lands twice.

use std::net::IpAddr;
use std::time::SystemTime;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::future::{join, try_join_all};
use futures_util::{SinkExt, pin_mut};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{CopyInSink, Statement, Transaction};
use uuid::Uuid;

/// A `jsonb` column's value kept as its JSON text: COPYed as is, and written to the spill
/// file as the JSON it is. Building a `serde_json::Value` tree for each row, serializing it
/// and dropping it was the largest part of the writer thread's profile.
///
/// A `String` rather than a `Box<RawValue>`: making the box shrinks the text's buffer to
/// fit, a reallocation for every such value the writer makes. The spill file, written only
/// while PostgreSQL is away, checks the text instead.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonText(String);

impl JsonText {
    /// `value` as JSON text; our row types always serialize, `{}` should one not.
    pub fn of(value: &impl Serialize) -> JsonText {
        serde_json::to_string(value).map_or_else(|_| JsonText::empty_object(), JsonText)
    }

    pub fn empty_object() -> JsonText {
        JsonText("{}".to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Serialize for JsonText {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let raw: &RawValue = serde_json::from_str(&self.0).map_err(serde::ser::Error::custom)?;
        raw.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for JsonText {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(deserializer)?;
        Ok(JsonText(Box::<str>::from(raw).into_string()))
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

    /// Encodes the rows, one COPY per table, and prepares those COPYs in `tx`, all in one
    /// round trip (tokio-postgres pipelines requests polled together, in the order they
    /// are first polled). A value that cannot be encoded fails the batch before anything
    /// is sent. A `replay` (rows that may be there already) goes through staging tables,
    /// made in the same round trip.
    pub async fn prepare(&self, tx: &Transaction<'_>, replay: bool) -> Result<Copies, BatchError> {
        let encoded = self.encode()?;
        if encoded.is_empty() {
            return Ok(Copies { copies: Vec::new(), moves: None });
        }
        // Fresh rows carry ids made for them: straight into the tables, no conflict to skip.
        let target = if replay { "staging_" } else { "" };
        let prepares = try_join_all(encoded.iter().map(|(table, _)| {
            let columns = table.column_list();
            let statement = format!("COPY {target}{} ({columns}) FROM STDIN (FORMAT binary)", table.name);
            async move { tx.prepare(&statement).await }
        }));
        let statements = if replay {
            // The staging tables live as long as the pooled connection; the notice that one
            // already exists would otherwise be logged for every batch.
            let mut staging = String::from("SET LOCAL client_min_messages = warning;");
            for (table, _) in &encoded {
                staging.push_str(&format!(
                    "CREATE TEMPORARY TABLE IF NOT EXISTS staging_{0} (LIKE {0} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;",
                    table.name
                ));
            }
            let (made, statements) = join(tx.batch_execute(&staging), prepares).await;
            made?;
            statements?
        } else {
            prepares.await?
        };
        let moves = replay.then(|| {
            encoded
                .iter()
                .map(|(table, _)| {
                    let columns = table.column_list();
                    format!(
                        "INSERT INTO {0} ({columns}) SELECT {columns} FROM staging_{0} ON CONFLICT DO NOTHING;",
                        table.name
                    )
                })
                .collect()
        });
        let copies = statements.into_iter().zip(encoded).map(|(statement, (_, data))| (statement, data)).collect();
        Ok(Copies { copies, moves })
    }

    /// Each table's rows in PostgreSQL's binary COPY format, tables without rows left out.
    fn encode(&self) -> Result<Vec<(&'static LogTable, Bytes)>, BatchError> {
        let mut encoded = Vec::with_capacity(4);
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
            encoded.push((&PERFORMANCE_METRICS, encode_binary_copy(&PERFORMANCE_METRICS, rows)?.freeze()));
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
            encoded.push((&QUERY_LOGS, encode_binary_copy(&QUERY_LOGS, rows)?.freeze()));
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
            encoded.push((&INGESTION_LOGS, encode_binary_copy(&INGESTION_LOGS, rows)?.freeze()));
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
            encoded.push((&AUDIT_LOGS, encode_binary_copy(&AUDIT_LOGS, rows)?.freeze()));
        }
        Ok(encoded)
    }
}

/// A batch's COPYs, encoded and prepared, ready to send.
pub struct Copies {
    copies: Vec<(Statement, Bytes)>,
    /// For a replay: moves the staged rows into the log tables, skipping those present.
    moves: Option<String>,
}

impl Copies {
    /// Sends the COPYs and commits `tx`. Each COPY is started behind the rows of the one
    /// before and the COMMIT goes behind the last rows, so a batch of two tables takes three
    /// round trips here instead of five. Should a COPY fail, PostgreSQL answers the
    /// statements queued behind it in the aborted transaction with errors, and the COMMIT
    /// with a rollback; the COPY's error is the one returned.
    pub async fn commit(self, tx: Transaction<'_>) -> Result<(), BatchError> {
        let mut copying = None;
        for (statement, data) in self.copies {
            let start = tx.copy_in::<_, Bytes>(&statement);
            let sink = match copying.take() {
                Some(previous) => {
                    let (sent, sink) = join(send_rows(previous), start).await;
                    sent?;
                    sink?
                }
                None => start.await?,
            };
            copying = Some((sink, data));
        }
        let Some(last) = copying else {
            return Ok(tx.commit().await?);
        };
        if let Some(moves) = &self.moves {
            let (sent, moved) = join(send_rows(last), tx.batch_execute(moves)).await;
            sent?;
            moved?;
            return Ok(tx.commit().await?);
        }
        let (sent, committed) = join(send_rows(last), tx.commit()).await;
        sent?;
        Ok(committed?)
    }
}

/// Sends a COPY's rows, as one message: tokio-postgres's `BinaryCopyInWriter` would send a
/// message each 4 KiB, each one its own socket write for the writer's thread to make and
/// for PostgreSQL to wake up for.
async fn send_rows((sink, data): (CopyInSink<Bytes>, Bytes)) -> Result<(), tokio_postgres::Error> {
    pin_mut!(sink);
    sink.as_mut().send(data).await?;
    sink.finish().await?;
    Ok(())
}

/// A log table's columns as the batch writes them: names and binary COPY types side by
/// side, in the order of the values in `Batch::encode`.
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

#[cfg(test)]
mod tests {
    use super::JsonText;

    #[test]
    fn json_text_is_spilled_as_the_json_it_holds_and_read_back_unchanged() {
        let text = JsonText::of(&serde_json::json!({"metric_type": "L2", "params": "{\"nprobe\": 10}"}));
        let spilled = serde_json::to_string(&text).unwrap();
        assert_eq!(spilled, text.as_str(), "the JSON itself, not a string holding it");
        let back: JsonText = serde_json::from_str(&spilled).unwrap();
        assert_eq!(back, text);
        assert!(serde_json::to_string(&JsonText("{not json".into())).is_err(), "a broken text is an error");
    }
}

//! `milvus-sidecar audit`: the audit trail, newest first, filtered.

use std::time::SystemTime;

use serde_json::{Value, json};
use tokio_postgres::Client;

use super::output::{self, Column, Fmt, Row, col, object};
use super::{CliError, Outcome, connect, time};
use crate::config::AuditArgs;

const COLUMNS: &[Column] = &[
    col("TIME", "occurred_at", Fmt::Time),
    col("USER", "username", Fmt::Text),
    col("ACTION", "action", Fmt::Text),
    col("TYPE", "resource_type", Fmt::Text),
    col("RESOURCE", "resource", Fmt::Text),
    col("OK", "success", Fmt::YesNo),
    col("ERROR", "problem", Fmt::Text),
];

pub async fn audit(args: AuditArgs) -> Result<Outcome, CliError> {
    let client = connect(&args.database).await?;
    let since = match &args.since {
        Some(s) => Some(parse_since(&client, s).await?),
        None => None,
    };
    let limit = i64::from(args.limit);
    let rows: Vec<Row> = client
        .query(
            "SELECT a.occurred_at, coalesce(a.username, u.username), a.action, a.resource_type, a.resource_id,
                    a.database_name, c.database_name || '.' || c.collection_name, a.success, a.grpc_code,
                    a.milvus_code, a.error_message, a.details, host(a.ip_address), a.user_agent
             FROM audit_logs a
             LEFT JOIN users u ON u.id = a.user_id
             LEFT JOIN collections c ON c.id = a.collection_id
             WHERE ($1::text IS NULL OR a.username = $1 OR u.username = $1)
               AND ($2::text IS NULL OR a.action = $2)
               AND ($3::text IS NULL OR a.resource_type = $3)
               AND ($4::timestamptz IS NULL OR a.occurred_at >= $4)
             ORDER BY a.occurred_at DESC, a.id DESC
             LIMIT $5",
            &[&args.user, &args.action, &args.resource_type, &since, &limit],
        )
        .await?
        .iter()
        .map(|r| {
            object(json!({
                "occurred_at": time(r.get(0)),
                "username": r.get::<_, Option<String>>(1),
                "action": r.get::<_, String>(2),
                "resource_type": r.get::<_, String>(3),
                "resource_id": r.get::<_, Option<String>>(4),
                "database_name": r.get::<_, Option<String>>(5),
                "collection": r.get::<_, Option<String>>(6),
                "success": r.get::<_, bool>(7),
                "grpc_code": r.get::<_, i16>(8),
                "milvus_code": r.get::<_, i32>(9),
                "error_message": r.get::<_, Option<String>>(10),
                "details": r.get::<_, Value>(11),
                "ip_address": r.get::<_, Option<String>>(12),
                "user_agent": r.get::<_, Option<String>>(13),
            }))
        })
        .collect();
    if args.json {
        output::print_rows(&rows, COLUMNS, true)?;
    } else {
        let shown: Vec<Row> = rows.into_iter().map(for_people).collect();
        output::print_rows(&shown, COLUMNS, false)?;
    }
    Ok(Outcome::Done)
}

/// Adds the table's combined columns: what was acted on, and what went wrong.
fn for_people(mut row: Row) -> Row {
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
    let resource =
        text(row.get("resource_id")).or_else(|| text(row.get("collection"))).or_else(|| text(row.get("database_name")));
    let grpc = row.get("grpc_code").and_then(Value::as_i64).unwrap_or(0);
    let milvus = row.get("milvus_code").and_then(Value::as_i64).unwrap_or(0);
    let message = text(row.get("error_message")).unwrap_or_default();
    let problem = match (grpc, milvus) {
        (0, 0) if message.is_empty() => None,
        (0, 0) => Some(message),
        (0, m) => Some(format!("milvus {m}: {message}")),
        (g, _) => Some(format!("grpc {g}: {message}")),
    };
    row.insert("resource".into(), resource.into());
    row.insert("problem".into(), problem.map(|p| p.trim_end_matches([' ', ':']).to_owned()).into());
    row
}

/// `--since`: a duration ago (`24h`, `7d`, `90min`) or a point in time (RFC 3339; an offset
/// other than `Z` is read by PostgreSQL).
async fn parse_since(client: &Client, s: &str) -> Result<SystemTime, CliError> {
    if let Ok(ago) = humantime::parse_duration(s) {
        return SystemTime::now()
            .checked_sub(ago)
            .ok_or_else(|| CliError::Usage(format!("--since {s:?} reaches back before the epoch")));
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t);
    }
    let bad = || {
        CliError::Usage(format!(
            "--since {s:?} is neither a duration (`24h`, `7d`) nor a time (`2025-01-31T12:00:00Z`)"
        ))
    };
    // Only things that look like a date go to PostgreSQL (which would also take `today`).
    if !s.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(bad());
    }
    match client.query_one("SELECT $1::text::timestamptz", &[&s]).await {
        Ok(row) => Ok(row.get(0)),
        Err(e) if e.code().is_some_and(|c| c.code().starts_with("22")) => Err(bad()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn people_see_what_was_touched_and_what_went_wrong() {
        let row = object(json!({
            "resource_id": null, "collection": "default.docs", "database_name": "default",
            "grpc_code": 7, "milvus_code": 0, "error_message": "PrivilegeSearch: permission deny to bob",
        }));
        let row = for_people(row);
        assert_eq!(row["resource"], "default.docs");
        assert_eq!(row["problem"], "grpc 7: PrivilegeSearch: permission deny to bob");
        let ok = for_people(object(json!({"resource_id": "docs", "grpc_code": 0, "milvus_code": 0})));
        assert_eq!(ok["resource"], "docs");
        assert_eq!(ok["problem"], Value::Null);
        let milvus = for_people(object(json!({"grpc_code": 0, "milvus_code": 100, "error_message": null})));
        assert_eq!(milvus["problem"], "milvus 100");
    }
}

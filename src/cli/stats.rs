//! `milvus-sidecar stats performance|collections`: what the recorded rows say.

use serde_json::json;
use uuid::Uuid;

use super::output::{self, Column, Fmt, Row, col, object};
use super::{CliError, CollectionName, Outcome, collection_ids, connect};
use crate::config::{ListArgs, StatsPerformanceArgs};

const PERFORMANCE_COLUMNS: &[Column] = &[
    col("OPERATION", "operation_type", Fmt::Text),
    col("CALLS", "calls", Fmt::Num),
    col("SUCCESS", "success_rate", Fmt::Percent),
    col("AVG_MS", "avg_ms", Fmt::Num),
    col("P50_MS", "p50_ms", Fmt::Num),
    col("P95_MS", "p95_ms", Fmt::Num),
    col("MAX_MS", "max_ms", Fmt::Num),
];

const COLLECTION_COLUMNS: &[Column] = &[
    col("COLLECTION", "collection", Fmt::Text),
    col("DIM", "dimension", Fmt::Num),
    col("PARTITIONS", "partition_count", Fmt::Num),
    col("USERS", "user_count", Fmt::Num),
    col("QUERIES", "total_queries", Fmt::Num),
    col("OK", "successful_queries", Fmt::Num),
    col("AVG_QUERY_MS", "avg_query_duration", Fmt::Num),
];

pub async fn performance(args: StatsPerformanceArgs) -> Result<Outcome, CliError> {
    let collection: Option<CollectionName> = args.collection.as_deref().map(str::parse).transpose()?;
    let client = connect(&args.database).await?;
    // Every row that ever held the name: a collection dropped and created again is one history.
    let ids: Option<Vec<Uuid>> = match &collection {
        Some(c) => Some(collection_ids(&client, c).await?),
        None => None,
    };
    let days = args.days as i32;
    let rows: Vec<Row> = client
        .query(
            "SELECT operation_type,
                    count(*),
                    count(*) FILTER (WHERE success),
                    avg(duration_ms),
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms),
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms),
                    max(duration_ms)
             FROM performance_metrics
             WHERE recorded_at >= now() - make_interval(days => $1)
               AND ($2::uuid[] IS NULL OR collection_id = ANY($2))
             GROUP BY operation_type
             ORDER BY count(*) DESC, operation_type",
            &[&days, &ids],
        )
        .await?
        .iter()
        .map(|r| {
            let calls: i64 = r.get(1);
            let ok: i64 = r.get(2);
            object(json!({
                "operation_type": r.get::<_, String>(0),
                "calls": calls,
                "successes": ok,
                "success_rate": if calls > 0 { ok as f64 / calls as f64 } else { 0.0 },
                "avg_ms": r.get::<_, Option<f64>>(3),
                "p50_ms": r.get::<_, Option<f64>>(4),
                "p95_ms": r.get::<_, Option<f64>>(5),
                "max_ms": r.get::<_, Option<f64>>(6),
            }))
        })
        .collect();
    output::print_rows(&rows, PERFORMANCE_COLUMNS, args.json)?;
    Ok(Outcome::Done)
}

pub async fn collections(args: ListArgs) -> Result<Outcome, CliError> {
    let client = connect(&args.database).await?;
    let rows: Vec<Row> = client
        .query(
            "SELECT database_name, collection_name, dimension, partition_count, user_count,
                    avg_query_duration, total_queries, successful_queries
             FROM collection_stats ORDER BY database_name, collection_name",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            let database: String = r.get(0);
            let name: String = r.get(1);
            object(json!({
                "collection": format!("{database}.{name}"),
                "database_name": database,
                "collection_name": name,
                "dimension": r.get::<_, Option<i32>>(2),
                "partition_count": r.get::<_, i64>(3),
                "user_count": r.get::<_, i64>(4),
                "avg_query_duration": r.get::<_, Option<f64>>(5),
                "total_queries": r.get::<_, i64>(6),
                "successful_queries": r.get::<_, i64>(7),
            }))
        })
        .collect();
    output::print_rows(&rows, COLLECTION_COLUMNS, args.json)?;
    Ok(Outcome::Done)
}

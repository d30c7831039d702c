//! How fast the sidecar's record writer empties a backlog into PostgreSQL. The writer is driven
//! directly, in this process, through the library's own `Recording` (the queue, the batch
//! writer with its binary COPY, the mirror lookups): N Search records are queued at once, far
//! faster than the writer can drain them, and the clock runs until the writer's own counter
//! says they are all written; the rows are then counted on the database side too.
//!
//! The queue is made large enough (over twice N) that the writer never takes its "falling
//! behind" path, which would send the backlog to the spill file instead of PostgreSQL: what is
//! measured is the PostgreSQL write path at its default batch size and flush interval.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use milvus_sidecar::config::RecordingArgs;
use milvus_sidecar::facts::{
    CallFacts, Client, Method, Outcome, ReplyDetail, RequestDetail, RequestFacts, SearchFacts,
};
use milvus_sidecar::record::{Recorder, Recording};
use milvus_sidecar::settings::Settings;
use milvus_sidecar::store::{self, system_config};

use crate::procstat;

/// What one backlog drain measured.
pub struct WriterResult {
    pub calls: usize,
    pub rows: u64,
    pub secs: f64,
    /// Rows the log tables grew by, counted with SQL.
    pub rows_in_database: i64,
    /// CPU time per row of this process (where the writer runs) and of the PostgreSQL backends
    /// serving this database, over the drain.
    pub writer_cpu_us_per_row: f64,
    pub postgres_cpu_us_per_row: f64,
}

impl WriterResult {
    pub fn rows_per_sec(&self) -> f64 {
        self.rows as f64 / self.secs
    }
}

/// Queues `calls` Search records by `user` on `collection` and times their writing.
pub async fn measure(database_url: &str, calls: usize, user: &str, collection: &str) -> Result<WriterResult> {
    let pg: tokio_postgres::Config = database_url.parse().context("DATABASE_URL")?;
    let settings = Arc::new(Settings::default());
    let client = store::connect(&pg).await.context("connecting to DATABASE_URL")?;
    system_config::load(&client, &settings).await?;
    let spill_dir = std::env::temp_dir().join(format!("milvus-sidecar-bench-writer-{}", std::process::id()));
    let args = RecordingArgs {
        no_recording: false,
        skip_migrations: true,
        queue_capacity: (2 * calls + 2).max(65_536),
        queue_max_bytes: usize::MAX,
        batch_rows: 2_000,
        flush_interval: Duration::from_millis(20),
        write_timeout: Duration::from_secs(2),
        spill_dir: spill_dir.clone(),
        spill_max_bytes: 0,
        durable_records: false,
        recorder_normal_priority: false,
    };
    let recording = Recording::start(pg, settings, &args).await?;
    let template = search_facts(user, collection);
    // A first record warms the writer up (user and collection ids are looked up once, then
    // cached) and tells how many rows one Search makes.
    let before = log_rows(&client).await?;
    recording.recorder.record(fresh(&template));
    let per_call = wait_for_rows(&recording, 1, Duration::from_secs(10)).await?;
    let facts: Vec<CallFacts> = (0..calls).map(|_| fresh(&template)).collect();
    let backends = backend_pids(&client).await?;
    let me = [std::process::id()];
    let (writer_before, pg_before) = (procstat::usage(&me)?, procstat::cpu_by_pid(&backends));
    let start = Instant::now();
    for f in facts {
        recording.recorder.record(f);
    }
    let expected = per_call * (calls as u64 + 1);
    let written = wait_for_rows(&recording, expected, Duration::from_secs(300)).await?;
    let secs = start.elapsed().as_secs_f64();
    let (writer_after, pg_after) = (procstat::usage(&me)?, procstat::cpu_by_pid(&backends));
    let rows = written - per_call;
    let per_row = |cpu_secs: f64| cpu_secs * 1e6 / rows as f64;
    let stats = &recording.stats;
    let (spilled, dropped) =
        (stats.records_spilled.load(Ordering::Relaxed), stats.records_dropped.load(Ordering::Relaxed));
    recording.finish().await;
    let _ = std::fs::remove_dir_all(&spill_dir);
    ensure!(spilled == 0 && dropped == 0, "the writer spilled {spilled} and dropped {dropped} records");
    let rows_in_database = log_rows(&client).await? - before;
    Ok(WriterResult {
        calls,
        rows,
        secs,
        rows_in_database,
        writer_cpu_us_per_row: per_row(writer_after.cpu_secs - writer_before.cpu_secs),
        postgres_cpu_us_per_row: per_row(procstat::cpu_between(&pg_before, &pg_after)),
    })
}

/// Waits until the writer has written at least `rows` rows; returns how many it has.
async fn wait_for_rows(recording: &Recording, rows: u64, within: Duration) -> Result<u64> {
    let deadline = Instant::now() + within;
    loop {
        let written = recording.stats.rows_written.load(Ordering::Relaxed);
        if written >= rows {
            return Ok(written);
        }
        if Instant::now() > deadline {
            bail!("the writer wrote {written} of {rows} rows within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The server processes of every session on this database (PostgreSQL runs one per
/// connection): their CPU time is what recording costs PostgreSQL.
pub async fn backend_pids(client: &tokio_postgres::Client) -> Result<Vec<u32>> {
    let rows = client
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND backend_type = 'client backend'",
            &[],
        )
        .await?;
    // Only those this user can see in /proc (all of them on a local server).
    Ok(rows.iter().map(|row| row.get::<_, i32>(0) as u32).filter(|pid| procstat::usage(&[*pid]).is_ok()).collect())
}

/// Rows in the four log tables.
pub async fn log_rows(client: &tokio_postgres::Client) -> Result<i64> {
    let sql = "SELECT (SELECT count(*) FROM performance_metrics) + (SELECT count(*) FROM query_logs) \
               + (SELECT count(*) FROM ingestion_logs) + (SELECT count(*) FROM audit_logs)";
    Ok(client.query_one(sql, &[]).await?.get(0))
}

fn fresh(template: &CallFacts) -> CallFacts {
    let mut facts = template.clone();
    facts.id = uuid::Uuid::now_v7();
    facts.started_at = SystemTime::now();
    facts
}

/// What the proxy learns from one successful pymilvus Search of the bench.
fn search_facts(user: &str, collection: &str) -> CallFacts {
    CallFacts {
        id: uuid::Uuid::now_v7(),
        started_at: SystemTime::now(),
        duration: Duration::from_micros(180),
        method: Method::from_path(crate::load::SEARCH_PATH),
        database: "default".into(),
        request: RequestFacts {
            database: None,
            collection: Some(collection.into()),
            partitions: Vec::new(),
            detail: RequestDetail::Search(SearchFacts {
                nq: 1,
                top_k: Some(crate::TOP_K),
                filter: String::new(),
                output_fields: vec!["title".into(), "category".into()],
                params: vec![("metric_type".into(), "COSINE".into()), ("params".into(), r#"{"nprobe": 10}"#.into())],
                sub_searches: 0,
            }),
        },
        reply: ReplyDetail::Search { num_queries: 1, top_k: crate::TOP_K, hits: crate::TOP_K },
        outcome: Outcome::default(),
        request_bytes: 3_215,
        reply_bytes: 160,
        client: Client {
            peer: Some("127.0.0.1:50000".parse().expect("a socket address")),
            user: Some(user.into()),
            user_agent: Some(http::HeaderValue::from_static("grpc-python/1.66.2 grpc-c/43.0.0 (linux; chttp2)")),
            request_id: Some(http::HeaderValue::from_static("0123456789abcdef0123456789abcdef")),
        },
    }
}

//! Log partitions: created ahead of time, dropped whole once past the retention period.
//! Rows that reached a table's DEFAULT partition (their day had no partition yet) move into
//! their day's partition when it is created, or are deleted with the rest of their day.
//! Partitions that lack one of their table's indexes (migration V4 leaves those that held
//! rows to this) get it built here, without blocking the record writer; so do the (time, id)
//! indexes that become the log tables' primary keys (migration V5), each table's key swapped
//! once its partitions have theirs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use super::Pool;
use crate::settings::Settings;

/// Days of partitions kept ready beyond today.
const DAYS_AHEAD: i32 = 7;

/// What one round of maintenance did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Maintained {
    /// Day partitions created.
    pub created: u32,
    /// Day partitions that could not be created (each logged); tried again next round.
    pub failed: u32,
    /// Day partitions dropped for being past the retention period.
    pub dropped: u32,
    /// Partitions' indexes built (see [`complete_log_indexes`]).
    pub indexes_built: u32,
    /// Log tables whose primary key became (time, id) (see [`swap_log_keys`]).
    pub keys_swapped: u32,
}

/// What maintenance has done since the sidecar started, read by the metrics at scrape time.
#[derive(Debug, Default)]
pub struct MaintenanceStats {
    pub runs_ok: AtomicU64,
    /// Rounds that stopped early (PostgreSQL away, a statement refused).
    pub runs_failed: AtomicU64,
    /// Unix time in seconds of the last round that completed; 0 before the first.
    pub last_success: AtomicU64,
    pub partitions_created: AtomicU64,
    pub partitions_failed: AtomicU64,
    pub partitions_dropped: AtomicU64,
    pub indexes_built: AtomicU64,
    pub keys_swapped: AtomicU64,
}

impl MaintenanceStats {
    fn count(&self, round: &anyhow::Result<Maintained>) {
        let Ok(done) = round else {
            self.runs_failed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        for (counter, n) in [
            (&self.partitions_created, done.created),
            (&self.partitions_failed, done.failed),
            (&self.partitions_dropped, done.dropped),
            (&self.indexes_built, done.indexes_built),
            (&self.keys_swapped, done.keys_swapped),
        ] {
            counter.fetch_add(u64::from(n), Ordering::Relaxed);
        }
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        self.last_success.store(now.as_secs(), Ordering::Relaxed);
        self.runs_ok.fetch_add(1, Ordering::Relaxed);
    }
}

/// Times one round of maintenance goes back to a log table whose key swap found a partition
/// filled while the others' indexes were built.
const KEY_SWAP_ROUNDS: usize = 3;

/// Lock id that keeps two sidecars from building the same index at once.
const INDEX_BUILD_LOCK: i64 = 0x6d69_6c76_7569; // "milvui"

/// Creates the partitions missing from yesterday to [`DAYS_AHEAD`] days ahead, drops the
/// expired ones, then builds the indexes partitions lack.
pub async fn run_once(pool: &Pool, retention_days: u32) -> anyhow::Result<Maintained> {
    let mut conn = pool.get().await?;
    let tables: Vec<String> = conn.query_one("SELECT log_tables()", &[]).await?.get(0);
    let mut done = Maintained::default();
    for table in &tables {
        for day in -1..=DAYS_AHEAD {
            // One transaction per day: a day that fails leaves the others to be created.
            match ensure_partition(&mut conn, table, day).await {
                Ok(true) => done.created += 1,
                Ok(false) => {}
                Err(e) => {
                    done.failed += 1;
                    tracing::warn!(table = table.as_str(), days_from_today = day, error = %crate::error_chain(&e),
                        "cannot create a log partition; its rows wait in the DEFAULT partition until the next try");
                }
            }
        }
    }
    let dropped: i32 = conn
        .query_one("SELECT drop_expired_log_partitions(current_date, $1)", &[&(retention_days as i32)])
        .await?
        .get(0);
    done.dropped = dropped as u32;
    // Last: a build may take minutes on a large day, and the days ahead must not wait for it.
    match complete_log_indexes(&conn, &mut done).await {
        Ok(()) => {}
        Err(e) => tracing::warn!(error = %crate::error_chain(&e),
            "cannot look for log partitions' missing indexes; trying again in an hour"),
    }
    Ok(done)
}

/// Builds, one at a time, the indexes log partitions lack, with CREATE INDEX CONCURRENTLY
/// (writes go on meanwhile): first the (time, id) indexes of the tables whose primary key is
/// still to be swapped, swapping each table's key once they are there, then the copies of
/// their table's indexes, each attached to it (PostgreSQL marks the table's index valid once
/// every partition has its copy). Another sidecar already at it: nothing to do. Counts what
/// it did in `done`.
async fn complete_log_indexes(
    conn: &tokio_postgres::Client,
    done: &mut Maintained,
) -> Result<(), tokio_postgres::Error> {
    let locked: bool = conn.query_one("SELECT pg_try_advisory_lock($1)", &[&INDEX_BUILD_LOCK]).await?.get(0);
    if !locked {
        return Ok(());
    }
    // A statement_timeout set for the role would cancel the build of a large day every hour.
    let mut result = conn.batch_execute("SET statement_timeout = 0").await;
    if result.is_ok() {
        // A failure here (a schema older than V5) leaves the other indexes to be built.
        if let Err(e) = swap_log_keys(conn, done).await {
            tracing::warn!(error = %crate::error_chain(&e),
                "cannot give the log tables their (time, id) keys; trying again in an hour");
        }
        // After the swaps: a table's time index goes with its swap, so no copy of it is
        // built for nothing.
        result = build_missing_indexes(conn).await.map(|built| done.indexes_built += built);
    }
    // Session-level settings and lock: undone on this pooled connection whatever happened.
    let undone = conn
        .batch_execute(&format!(
            "RESET statement_timeout; RESET lock_timeout; SELECT pg_advisory_unlock({INDEX_BUILD_LOCK})"
        ))
        .await;
    result?;
    undone
}

/// Gives each log table still keyed by (id, time) its (time, id) key (migration V5): builds
/// the unique index of every partition that holds rows, then swaps the key, which builds
/// nothing, in one short transaction per table. A partition that filled during the builds
/// (the record writer's first rows of a day) sends the table round again, up to
/// [`KEY_SWAP_ROUNDS`] times; a build that failed or a lock not granted, to the next hour.
async fn swap_log_keys(conn: &tokio_postgres::Client, done: &mut Maintained) -> Result<(), tokio_postgres::Error> {
    for _ in 0..KEY_SWAP_ROUNDS {
        build_key_indexes(conn, done).await?;
        let pending: Vec<String> = conn
            .query("SELECT t FROM unnest(log_tables()) AS t WHERE log_key_swap_pending(t::regclass)", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        // The swap locks the whole table; the record writer's COPY waits behind it, and
        // must not wait until its own statement timeout sends the batch to the spill file.
        conn.batch_execute("SET lock_timeout = '1s'").await?;
        let mut refilled = false;
        for table in &pending {
            match conn.query_one("SELECT swap_log_primary_key($1::text::regclass)", &[table]).await {
                Ok(row) if row.get::<_, bool>(0) => {
                    done.keys_swapped += 1;
                    tracing::info!(
                        table = table.as_str(),
                        "log table's primary key is (time, id) now; its time index is dropped"
                    );
                }
                Ok(_) => refilled = true,
                Err(e) => tracing::warn!(table = table.as_str(), error = %crate::error_chain(&e),
                    "cannot swap a log table's primary key to (time, id); trying again in an hour"),
            }
        }
        conn.batch_execute("RESET lock_timeout").await?;
        if !refilled {
            break;
        }
    }
    Ok(())
}

/// Builds the (time, id) indexes `log_keys_missing()` lists, one at a time, CONCURRENTLY.
async fn build_key_indexes(conn: &tokio_postgres::Client, done: &mut Maintained) -> Result<(), tokio_postgres::Error> {
    let missing = conn
        .query(
            "SELECT log_partition::text, index_name, quote_ident(index_name), definition FROM log_keys_missing()",
            &[],
        )
        .await?;
    if !missing.is_empty() {
        tracing::info!(
            indexes = missing.len(),
            "building the (time, id) indexes that become the log tables' primary keys, one at a time"
        );
    }
    for row in &missing {
        let (partition, name, quoted, definition): (&str, &str, &str, &str) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let started = std::time::Instant::now();
        let create = format!("UNIQUE INDEX CONCURRENTLY {quoted} ON {partition} {definition}");
        match build_concurrently(conn, quoted, &create).await {
            Ok(()) => {
                done.indexes_built += 1;
                tracing::info!(index = name, partition, took = ?started.elapsed(), "built a log partition's key index");
            }
            Err(e) => tracing::warn!(index = name, partition, error = %crate::error_chain(&e),
                "cannot build a log partition's key index; its table keeps its old key until the next try"),
        }
    }
    Ok(())
}

async fn build_missing_indexes(conn: &tokio_postgres::Client) -> Result<u32, tokio_postgres::Error> {
    let missing = conn
        .query(
            "SELECT parent_index::text, log_partition::text, index_name, quote_ident(index_name), definition
             FROM log_indexes_missing()",
            &[],
        )
        .await?;
    if missing.is_empty() {
        return Ok(0);
    }
    tracing::info!(
        indexes = missing.len(),
        "building the indexes log partitions lack, one at a time; reads of their days scan them until then"
    );
    let mut built = 0;
    for row in &missing {
        let (parent, partition, name, quoted, definition): (&str, &str, &str, &str, &str) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        let started = std::time::Instant::now();
        // One that fails (a lock not granted, a cancel) leaves the others to be built.
        match build_index(conn, parent, partition, quoted, definition).await {
            Ok(()) => {
                built += 1;
                tracing::info!(index = name, partition, took = ?started.elapsed(), "built a log partition's index");
            }
            Err(e) => tracing::warn!(index = name, partition, error = %crate::error_chain(&e),
                "cannot build a log partition's index; reads of its day scan it until the next try"),
        }
    }
    Ok(built)
}

/// Builds `partition`'s copy of `parent` and attaches it; see [`complete_log_indexes`].
async fn build_index(
    conn: &tokio_postgres::Client,
    parent: &str,
    partition: &str,
    quoted: &str,
    definition: &str,
) -> Result<(), tokio_postgres::Error> {
    build_concurrently(conn, quoted, &format!("INDEX CONCURRENTLY {quoted} ON {partition} {definition}")).await?;
    conn.batch_execute(&format!("ALTER INDEX {parent} ATTACH PARTITION {quoted}")).await
}

/// Runs `CREATE <create>`, which builds the index `quoted`, unless a valid index of that
/// name is there already.
async fn build_concurrently(
    conn: &tokio_postgres::Client,
    quoted: &str,
    create: &str,
) -> Result<(), tokio_postgres::Error> {
    // A build broken off (connection lost, cancelled) leaves an invalid index of this name
    // behind; one that ended before what follows it (an attach, a key swap), a valid one.
    let leftover: Option<bool> = conn
        .query_opt("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)", &[&quoted])
        .await?
        .map(|r| r.get(0));
    if leftover == Some(false) {
        conn.batch_execute(&format!("DROP INDEX CONCURRENTLY {quoted}")).await?;
    }
    if leftover != Some(true) {
        conn.batch_execute(&format!("CREATE {create}")).await?;
    }
    Ok(())
}

async fn ensure_partition(
    conn: &mut tokio_postgres::Client,
    table: &str,
    day: i32,
) -> Result<bool, tokio_postgres::Error> {
    let tx = conn.transaction().await?;
    // The DEFAULT partition is locked while a day is created; the record writer queues
    // behind a lock that is still being waited for, so that wait must stay short.
    tx.batch_execute("SET LOCAL lock_timeout = '5s'").await?;
    let created: bool =
        tx.query_one("SELECT ensure_log_partition($1::text, current_date + $2::int)", &[&table, &day]).await?.get(0);
    tx.commit().await?;
    Ok(created)
}

/// Runs the maintenance now and then every hour, for as long as the sidecar runs, counting
/// each round in `stats`.
pub fn spawn(pool: Pool, settings: Arc<Settings>, stats: Arc<MaintenanceStats>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(3600));
        loop {
            every.tick().await;
            let round = run_once(&pool, settings.retention_days()).await;
            stats.count(&round);
            match round {
                Ok(Maintained { created, failed, dropped, indexes_built, keys_swapped })
                    if created + failed + dropped + indexes_built + keys_swapped > 0 =>
                {
                    tracing::info!(created, failed, dropped, indexes_built, keys_swapped, "log partitions maintained")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "log partition maintenance failed; will retry in an hour"),
            }
        }
    })
}

//! Log partitions: created ahead of time, dropped whole once past the retention period.
//! Rows that reached a table's DEFAULT partition (their day had no partition yet) move into
//! their day's partition when it is created, or are deleted with the rest of their day.

use std::sync::Arc;
use std::time::Duration;

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
}

/// Creates the partitions missing from yesterday to [`DAYS_AHEAD`] days ahead and drops
/// the expired ones.
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
    Ok(done)
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

/// Runs the maintenance now and then every hour, for as long as the sidecar runs.
pub fn spawn(pool: Pool, settings: Arc<Settings>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(3600));
        loop {
            every.tick().await;
            match run_once(&pool, settings.retention_days()).await {
                Ok(Maintained { created, failed, dropped }) if created + failed + dropped > 0 => {
                    tracing::info!(created, failed, dropped, "log partitions maintained")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "log partition maintenance failed; will retry in an hour"),
            }
        }
    })
}

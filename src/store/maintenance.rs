//! Log partitions: created ahead of time, dropped whole once past the retention period.

use std::sync::Arc;
use std::time::Duration;

use super::Pool;
use crate::settings::Settings;

/// Days of partitions kept ready beyond today.
const DAYS_AHEAD: i32 = 7;

/// Creates missing partitions and drops expired ones; returns (created, dropped).
pub async fn run_once(pool: &Pool, retention_days: u32) -> anyhow::Result<(i32, i32)> {
    let conn = pool.get().await?;
    let created: i32 =
        conn.query_one("SELECT ensure_log_partitions(current_date - 1, $1)", &[&(DAYS_AHEAD + 1)]).await?.get(0);
    let dropped: i32 = conn
        .query_one("SELECT drop_expired_log_partitions(current_date, $1)", &[&(retention_days as i32)])
        .await?
        .get(0);
    Ok((created, dropped))
}

/// Runs the maintenance now and then every hour, for as long as the sidecar runs.
pub fn spawn(pool: Pool, settings: Arc<Settings>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(3600));
        loop {
            every.tick().await;
            match run_once(&pool, settings.retention_days()).await {
                Ok((created, dropped)) if created + dropped > 0 => {
                    tracing::info!(created, dropped, "log partitions maintained")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "log partition maintenance failed; will retry in an hour"),
            }
        }
    })
}

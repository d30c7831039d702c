//! Schema migrations, embedded in the binary (`migrations/*.sql`, run in order once each).

use anyhow::Context;
use tokio_postgres::Client;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Lock id that serializes migrations when several sidecars start together.
const MIGRATION_LOCK: i64 = 0x6d69_6c76_7573; // "milvus"

/// Brings the schema up to date over `client` (the connection start-up's wait for
/// PostgreSQL made); returns the names of the migrations applied now.
pub async fn run(client: &mut Client) -> anyhow::Result<Vec<String>> {
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await?;
    let result = embedded::migrations::runner().run_async(client).await;
    client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await?;
    let report = result.context("migration failed")?;
    Ok(report.applied_migrations().iter().map(|m| m.to_string()).collect())
}

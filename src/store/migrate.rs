//! Schema migrations, embedded in the binary (`migrations/*.sql`, run in order once each).

use anyhow::Context;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Lock id that serializes migrations when several sidecars start together.
const MIGRATION_LOCK: i64 = 0x6d69_6c76_7573; // "milvus"

/// Brings the schema up to date; returns the names of the migrations applied now.
pub async fn run(config: &tokio_postgres::Config) -> anyhow::Result<Vec<String>> {
    let mut client = super::connect(config).await.context("cannot connect to PostgreSQL to migrate")?;
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await?;
    let result = embedded::migrations::runner().run_async(&mut client).await;
    client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await?;
    let report = result.context("migration failed")?;
    Ok(report.applied_migrations().iter().map(|m| m.to_string()).collect())
}

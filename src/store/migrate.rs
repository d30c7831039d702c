//! Schema migrations, embedded in the binary (`migrations/*.sql`, run in order once each).

use anyhow::Context;
use refinery::Target;
use tokio_postgres::Client;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Lock id that serializes migrations when several sidecars start together.
const MIGRATION_LOCK: i64 = 0x6d69_6c76_7573; // "milvus"

/// Brings the schema up to date over `client` (the connection start-up's wait for
/// PostgreSQL made); returns the names of the migrations applied now.
pub async fn run(client: &mut Client) -> anyhow::Result<Vec<String>> {
    run_to(client, Target::Latest).await
}

/// The same, up to `version` only: an older schema, for tests of what an upgrade does to it.
pub async fn run_up_to(client: &mut Client, version: i32) -> anyhow::Result<Vec<String>> {
    run_to(client, Target::Version(version)).await
}

async fn run_to(client: &mut Client, target: Target) -> anyhow::Result<Vec<String>> {
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await?;
    let result = embedded::migrations::runner().set_target(target).run_async(client).await;
    client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await?;
    let report = result.context("migration failed")?;
    Ok(report.applied_migrations().iter().map(|m| m.to_string()).collect())
}

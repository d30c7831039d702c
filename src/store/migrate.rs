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
    let result = async {
        refuse_newer_schema(client).await?;
        embedded::migrations::runner().set_target(target).run_async(client).await.context("migration failed")
    }
    .await;
    client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await?;
    Ok(result?.applied_migrations().iter().map(|m| m.to_string()).collect())
}

/// A database a newer build has migrated (this one is a rollback, or an old replica that
/// restarted during an upgrade): refinery would only call the newer migration "missing
/// from the filesystem". Says what happened and what the operator can do instead.
async fn refuse_newer_schema(client: &Client) -> anyhow::Result<()> {
    let has_history: bool =
        client.query_one("SELECT to_regclass('refinery_schema_history') IS NOT NULL", &[]).await?.get(0);
    if !has_history {
        return Ok(());
    }
    let Some(newest) = client
        .query_opt("SELECT version, name FROM refinery_schema_history ORDER BY version DESC LIMIT 1", &[])
        .await?
    else {
        return Ok(());
    };
    let (version, name): (i32, String) = (newest.get(0), newest.get(1));
    let runner = embedded::migrations::runner();
    let known = runner.get_migrations().iter().map(|m| m.version()).max().unwrap_or(0);
    if version > known {
        anyhow::bail!(
            "the database schema is at V{version} ({name}), newer than this build of milvus-sidecar knows \
             (up to V{known}): a newer build migrated it. Run a build that knows V{version}; or, where this \
             build is known to work with that schema (rolling back), start it with --skip-migrations"
        );
    }
    Ok(())
}

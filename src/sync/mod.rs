//! Reconciling the mirror (`collections`, `collection_partitions`, `index_management`) with
//! what the upstream Milvus actually holds, so collections created before the sidecar
//! existed, or behind its back, appear too and those dropped behind its back go.
//!
//! Runs once in the background at start-up and on demand (`milvus-sidecar sync`). Milvus is
//! read first ([`fetch`]), then every change is applied in one PostgreSQL transaction
//! ([`apply`]) through the same [`MirrorOp`](crate::store::mirror::MirrorOp)s the record
//! writer uses. Only what Milvus answered for is changed: a database or collection Milvus
//! would not describe is left as it is, never taken for gone.

mod apply;
mod fetch;

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::config::Config;
use crate::proxy::Upstream;

#[allow(clippy::all)]
mod pb {
    include!(concat!(env!("OUT_DIR"), "/milvus_sidecar.sync.rs"));
}

/// Why a sync did not happen. Nothing was changed in PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot read what Milvus holds: {0}")]
    Milvus(String),
    #[error("PostgreSQL: {0}")]
    Postgres(String),
}

impl From<tokio_postgres::Error> for SyncError {
    fn from(e: tokio_postgres::Error) -> Self {
        SyncError::Postgres(crate::error_chain(&e))
    }
}

/// What one sync saw and changed.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Databases whose collections Milvus listed, and so were reconciled.
    pub databases: Vec<String>,
    pub collections_seen: usize,
    pub added: usize,
    pub updated: usize,
    pub dropped: usize,
    pub partitions_added: usize,
    pub partitions_dropped: usize,
    pub indexes_added: usize,
    pub indexes_updated: usize,
    /// What Milvus would not tell, and what was left as it is because of that.
    pub warnings: Vec<String>,
}

impl Report {
    /// Rows added, changed or dropped: 0 when the mirror already matched Milvus.
    pub fn changes(&self) -> usize {
        self.added
            + self.updated
            + self.dropped
            + self.partitions_added
            + self.partitions_dropped
            + self.indexes_added
            + self.indexes_updated
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "databases:   {} ({})", self.databases.len(), self.databases.join(", "))?;
        writeln!(
            f,
            "collections: {} in Milvus; {} added, {} updated, {} marked dropped",
            self.collections_seen, self.added, self.updated, self.dropped
        )?;
        writeln!(f, "partitions:  {} added, {} marked dropped", self.partitions_added, self.partitions_dropped)?;
        writeln!(f, "indexes:     {} added, {} updated", self.indexes_added, self.indexes_updated)?;
        if self.changes() == 0 {
            writeln!(f, "the mirror already matched Milvus")?;
        }
        for warning in &self.warnings {
            writeln!(f, "warning: {warning}")?;
        }
        Ok(())
    }
}

/// Reads what `upstream` holds and brings the mirror in `client`'s database in step, in
/// one transaction.
pub async fn run(upstream: &Upstream, client: &mut tokio_postgres::Client) -> Result<Report, SyncError> {
    // PostgreSQL's clock before Milvus is read: a mirror row written after this (by the
    // record writer, for a call Milvus served meanwhile) is newer than what we read and
    // is never dropped for being absent from it.
    let since: SystemTime = client.query_one("SELECT clock_timestamp()", &[]).await?.get(0);
    let snapshot = fetch::snapshot(upstream).await?;
    let mut report = Report {
        databases: snapshot.databases.iter().map(|d| d.name.clone()).collect(),
        collections_seen: snapshot.databases.iter().map(|d| d.present.len()).sum(),
        warnings: snapshot.warnings.clone(),
        ..Report::default()
    };
    let tx = client.transaction().await?;
    apply::reconcile(&tx, &snapshot, since, &mut report).await?;
    tx.commit().await?;
    Ok(report)
}

/// The upstream connection for `milvus-sidecar sync`, with serve's defaults.
pub fn upstream(uri: &http::Uri, credential: Option<String>) -> Upstream {
    let mut config = Config::local(uri.clone());
    config.auth.upstream_credential = credential;
    Upstream::new(&config)
}

/// The upstream `milvus-sidecar sync` reads, TLS settings included.
pub fn upstream_for(args: &crate::config::SyncArgs) -> Upstream {
    let mut config = Config::local(args.upstream.clone());
    config.auth.upstream_credential.clone_from(&args.upstream_credential);
    config.upstream_tls = args.upstream_tls.clone();
    Upstream::new(&config)
}

/// Delays between attempts of the start-up sync: Milvus often starts after the sidecar.
const RETRY_DELAYS: &[u64] = &[2, 4, 8, 16, 30, 60, 60, 60, 60];

/// The start-up sync, in the background: serving never waits for it. Retries for about
/// five minutes while Milvus or PostgreSQL is not there yet, then logs why it gave up.
pub fn spawn(config: &Config, pg: tokio_postgres::Config) -> tokio::task::JoinHandle<()> {
    let upstream = Upstream::new(config);
    tokio::spawn(async move {
        let mut delays = RETRY_DELAYS.iter();
        loop {
            let result = match crate::store::connect(&pg).await {
                Ok(mut client) => run(&upstream, &mut client).await,
                Err(e) => Err(e.into()),
            };
            match result {
                Ok(report) => {
                    tracing::info!(
                        databases = ?report.databases,
                        collections = report.collections_seen,
                        added = report.added,
                        updated = report.updated,
                        dropped = report.dropped,
                        partitions_added = report.partitions_added,
                        partitions_dropped = report.partitions_dropped,
                        indexes_added = report.indexes_added,
                        indexes_updated = report.indexes_updated,
                        "mirror synced with upstream Milvus"
                    );
                    for warning in &report.warnings {
                        tracing::warn!("sync: {warning}");
                    }
                    return;
                }
                Err(e) => match delays.next() {
                    Some(&secs) => {
                        tracing::info!(error = %e, "start-up sync failed; retrying in {secs} s");
                        tokio::time::sleep(Duration::from_secs(secs)).await;
                    }
                    None => {
                        tracing::warn!(error = %e, "start-up sync gave up; run `milvus-sidecar sync` once Milvus is up");
                        return;
                    }
                },
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_reads_as_a_summary() {
        let report = Report {
            databases: vec!["default".into(), "analytics".into()],
            collections_seen: 3,
            added: 2,
            dropped: 1,
            partitions_added: 4,
            warnings: vec!["database x: refused".into()],
            ..Report::default()
        };
        let text = report.to_string();
        assert!(text.contains("databases:   2 (default, analytics)"), "{text}");
        assert!(text.contains("3 in Milvus; 2 added, 0 updated, 1 marked dropped"), "{text}");
        assert!(text.contains("warning: database x: refused"), "{text}");
        assert_eq!(report.changes(), 7);
        assert!(Report::default().to_string().contains("already matched"));
    }
}

//! Where call facts go once a call is over: a log line, and (with PostgreSQL) a bounded
//! queue that the writer task drains into the tables. `record` is called on the request
//! path, so it never blocks and never waits for PostgreSQL.

pub mod rows;
mod scrub;
mod spill;
mod writer;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};

use crate::config::RecordingArgs;
use crate::facts::{CallFacts, ReplyDetail, RequestDetail};
use crate::settings::Settings;
use crate::store::Pool;
use crate::store::mirror::Catalog;

pub trait Recorder: Send + Sync + 'static {
    fn record(&self, facts: CallFacts);
}

/// What the recording pipeline did, for metrics and tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub rows_written: AtomicU64,
    pub batches_written: AtomicU64,
    pub records_spilled: AtomicU64,
    pub records_replayed: AtomicU64,
    pub records_rejected: AtomicU64,
    /// Lost: the queue was full, or the spill file could not be written. Should stay 0.
    pub records_dropped: AtomicU64,
}

/// Logs each call and queues it for the PostgreSQL writer.
pub struct PgRecorder {
    queue: mpsc::Sender<CallFacts>,
    stats: Arc<Stats>,
}

/// The running writer: call [`Recording::finish`] after the proxy has drained.
pub struct Recording {
    pub recorder: Arc<PgRecorder>,
    pub stats: Arc<Stats>,
    finish: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Recording {
    pub async fn start(pool: Pool, settings: Arc<Settings>, args: &RecordingArgs) -> std::io::Result<Recording> {
        let stats = Arc::new(Stats::default());
        let spill = spill::Spill::open(&args.spill_dir).await?;
        let (queue, rx) = mpsc::channel(args.queue_capacity.max(1));
        let (finish, finished) = oneshot::channel();
        let writer = writer::Writer {
            pool,
            settings,
            spill,
            stats: stats.clone(),
            batch_rows: args.batch_rows.max(1),
            queue_capacity: args.queue_capacity.max(1),
            flush_interval: args.flush_interval,
            catalog: Catalog::default(),
        };
        let task = tokio::spawn(writer.run(rx, finished));
        let recorder = Arc::new(PgRecorder { queue, stats: stats.clone() });
        Ok(Recording { recorder, stats, finish, task })
    }

    /// Writes what is queued (or spills it, if PostgreSQL is away) and stops the writer.
    pub async fn finish(self) {
        let _ = self.finish.send(());
        let _ = self.task.await;
    }
}

impl Recorder for PgRecorder {
    fn record(&self, facts: CallFacts) {
        log_call(&facts);
        if let Err(e) = self.queue.try_send(facts) {
            let dropped = self.stats.records_dropped.fetch_add(1, Ordering::Relaxed) + 1;
            // Once per 10 000 so that a stuck writer cannot flood the log as well.
            if dropped % 10_000 == 1 {
                tracing::error!(dropped, reason = %e, "record queue full: call records are being dropped");
            }
        }
    }
}

/// Writes one tracing event per call under the `milvus_sidecar::call` target: failures at
/// info (warn when the sidecar or upstream failed), successes at debug.
#[derive(Debug, Default)]
pub struct LogRecorder;

impl Recorder for LogRecorder {
    fn record(&self, f: CallFacts) {
        log_call(&f);
    }
}

fn log_call(f: &CallFacts) {
    {
        use tonic::Code;
        let (nq, top_k, rows) = match &f.request.detail {
            RequestDetail::Search(s) => (Some(s.nq), s.top_k, None),
            RequestDetail::Insert { rows } => (None, None, Some(*rows)),
            _ => (None, None, None),
        };
        let (hits, acked) = match f.reply {
            ReplyDetail::Search { hits, .. } => (Some(hits), None),
            ReplyDetail::Mutation { inserted, deleted, upserted } => (None, Some(inserted + deleted + upserted)),
            ReplyDetail::Rows(rows) => (Some(rows), None),
            ReplyDetail::None | ReplyDetail::Indexes(_) => (None, None),
        };
        macro_rules! event {
            ($level:expr) => {
                tracing::event!(
                    target: "milvus_sidecar::call",
                    $level,
                    id = %f.id,
                    method = f.method.name(),
                    // Strings from clients go in quoted and escaped (`?`-style: str values
                    // are recorded with Debug), never raw: no escape sequences, no forged lines.
                    database = f.database.as_str(),
                    collection = f.request.collection.as_deref(),
                    partitions = ?f.request.partitions,
                    nq,
                    top_k,
                    rows,
                    hits,
                    acked,
                    grpc = ?f.outcome.grpc,
                    milvus_code = f.outcome.milvus_code,
                    error = f.outcome.message.as_deref(),
                    request_bytes = f.request_bytes,
                    reply_bytes = f.reply_bytes,
                    duration_us = f.duration.as_micros() as u64,
                    peer = ?f.client.peer,
                    user = f.client.user.as_deref(),
                    "call"
                )
            };
        }
        match f.outcome.grpc {
            Code::Ok if f.outcome.is_success() => event!(tracing::Level::DEBUG),
            Code::Unavailable | Code::DeadlineExceeded | Code::Internal | Code::Unknown => {
                event!(tracing::Level::WARN)
            }
            _ => event!(tracing::Level::INFO),
        }
    }
}

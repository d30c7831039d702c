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
use crate::facts::CallFacts;
use crate::settings::Settings;
use crate::store::Pool;
use crate::store::mirror::Catalog;

pub trait Recorder: Send + Sync + 'static {
    fn record(&self, facts: CallFacts);
}

/// What the recording pipeline did, for metrics and tests.
#[derive(Debug)]
pub struct Stats {
    pub rows_written: AtomicU64,
    pub batches_written: AtomicU64,
    pub records_spilled: AtomicU64,
    pub records_replayed: AtomicU64,
    pub records_rejected: AtomicU64,
    /// Lost: the queue was full, or the spill file could not be written. Should stay 0.
    pub records_dropped: AtomicU64,
    /// Rows per batch written to PostgreSQL (exported as is by the metrics).
    pub batch_rows: prometheus::Histogram,
}

impl Default for Stats {
    fn default() -> Self {
        let buckets = vec![1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0];
        let opts = prometheus::HistogramOpts::new(
            "milvus_sidecar_recording_batch_rows",
            "Rows per batch the writer put into PostgreSQL",
        )
        .buckets(buckets);
        Stats {
            rows_written: AtomicU64::default(),
            batches_written: AtomicU64::default(),
            records_spilled: AtomicU64::default(),
            records_replayed: AtomicU64::default(),
            records_rejected: AtomicU64::default(),
            records_dropped: AtomicU64::default(),
            batch_rows: prometheus::Histogram::with_opts(opts).expect("static histogram options are valid"),
        }
    }
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

impl PgRecorder {
    /// Records queued and not yet taken by the writer.
    pub fn queue_depth(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
    }
}

impl Recorder for PgRecorder {
    fn record(&self, facts: CallFacts) {
        if let Err(e) = self.queue.try_send(facts) {
            let dropped = self.stats.records_dropped.fetch_add(1, Ordering::Relaxed) + 1;
            // Once per 10 000 so that a stuck writer cannot flood the log as well.
            if dropped % 10_000 == 1 {
                tracing::error!(dropped, reason = %e, "record queue full: call records are being dropped");
            }
        }
    }
}

/// Records nothing (`--no-recording`): the call log is all there is.
#[derive(Debug, Default)]
pub struct NoRecorder;

impl Recorder for NoRecorder {
    fn record(&self, _: CallFacts) {}
}

//! Where call facts go once a call is over: a log line, and (with PostgreSQL) a bounded
//! queue that the writer thread drains into the tables. `record` is called on the request
//! path, so it never blocks and never waits for PostgreSQL.
//!
//! With `--durable-records` the request path does wait, but only at the very end: a call's
//! status is held back from the client until the writer reports its records durable
//! (committed, or fsynced to the spill file); see [`Recorder::record_durably`].

mod priority;
pub mod rows;
mod scrub;
mod spill;
mod writer;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

use crate::config::RecordingArgs;
use crate::facts::CallFacts;
use crate::settings::Settings;
use crate::store::CheckOut;
use crate::store::mirror::Catalog;

pub trait Recorder: Send + Sync + 'static {
    fn record(&self, facts: CallFacts);

    /// Whether a call must wait for its records to be durable before its client sees it
    /// end (`--durable-records`). When true, the proxy calls [`Recorder::record_durably`]
    /// as the reply's status arrives and holds the status back until the receipt resolves.
    fn durable(&self) -> bool {
        false
    }

    /// Records `facts`; the receipt resolves once they are durable.
    fn record_durably(&self, facts: CallFacts) -> Receipt {
        self.record(facts);
        Box::pin(std::future::ready(Ok(())))
    }
}

/// Resolves once a call's records are durable, or with [`NotDurable`] when they were lost.
pub type Receipt = Pin<Box<dyn Future<Output = Result<(), NotDurable>> + Send>>;

/// A call's records could not be made durable (the spill file cannot be written, or the
/// writer stopped).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the sidecar could not record this call durably; Milvus did carry it out")]
pub struct NotDurable;

/// The writer uses one connection at a time; a second can connect while the first is
/// found broken.
const WRITER_CONNECTIONS: u32 = 2;

/// A call's facts on their way to the writer, with who to tell once they are durable.
pub(crate) struct Queued {
    facts: CallFacts,
    ack: Option<oneshot::Sender<()>>,
    /// The facts' [`CallFacts::footprint`], counted in [`Stats::queued_bytes`] until the
    /// writer takes them.
    bytes: usize,
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
    /// Memory held by the records in the queue (their [`CallFacts::footprint`]).
    pub queued_bytes: AtomicUsize,
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
            queued_bytes: AtomicUsize::default(),
            batch_rows: prometheus::Histogram::with_opts(opts).expect("static histogram options are valid"),
        }
    }
}

/// Logs each call and queues it for the PostgreSQL writer.
pub struct PgRecorder {
    queue: mpsc::Sender<Queued>,
    stats: Arc<Stats>,
    durable: bool,
    /// `--queue-max-bytes`: past it, records are dropped as from a full queue.
    max_bytes: usize,
}

/// The running writer: call [`Recording::finish`] after the proxy has drained.
pub struct Recording {
    pub recorder: Arc<PgRecorder>,
    pub stats: Arc<Stats>,
    finish: oneshot::Sender<()>,
    finished: oneshot::Receiver<()>,
}

impl Recording {
    /// Starts the writer on a thread of its own, with its own PostgreSQL connections
    /// (made from `pg`): encoding rows and talking to PostgreSQL then runs beside the
    /// calls rather than between them. A call's thread only queues its facts; the writer
    /// is woken once per batch, not per record (see `Writer::run`).
    pub async fn start(
        pg: tokio_postgres::Config,
        settings: Arc<Settings>,
        args: &RecordingArgs,
    ) -> std::io::Result<Recording> {
        let stats = Arc::new(Stats::default());
        let durable = args.durable_records;
        // The spill file is plain paths and counters: opened here, used on the writer's thread.
        let spill = spill::Spill::open(&args.spill_dir, durable, args.spill_max_bytes).await?;
        let (queue, rx) = mpsc::channel(args.queue_capacity.max(1));
        let (finish, finish_rx) = oneshot::channel();
        let (done, finished) = oneshot::channel();
        let writer_stats = stats.clone();
        let (batch_rows, queue_capacity) = (args.batch_rows.max(1), args.queue_capacity.max(1));
        let queue_max_bytes = args.queue_max_bytes.max(1);
        // Callers wait for their records: write what is there at once. Batches still form
        // by themselves, from the calls that end while the previous one commits.
        let flush_interval = if durable { std::time::Duration::ZERO } else { args.flush_interval };
        let write_timeout = args.write_timeout;
        // Calls wait for durable records: their writer must not give way to them.
        let yields = !durable && !args.recorder_normal_priority;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        std::thread::Builder::new().name("recorder".into()).spawn(move || {
            let priority = if yields { priority::Priority::adaptive() } else { priority::Priority::fixed() };
            runtime.block_on(async move {
                let writer = writer::Writer {
                    // Its connections' tasks run on this thread's runtime. A query to test
                    // each connection would be a round trip in every batch: the writer
                    // checks what the client already knows instead.
                    pool: crate::store::pool(pg, WRITER_CONNECTIONS, CheckOut::Untested),
                    settings,
                    spill,
                    stats: writer_stats,
                    batch_rows,
                    queue_capacity,
                    queue_max_bytes,
                    pending_bytes: 0,
                    flush_interval,
                    write_timeout,
                    catalog: Catalog::default(),
                    acks: Vec::new(),
                    retry_at: tokio::time::Instant::now(),
                    durable,
                    spill_full: false,
                    priority,
                    normal_until: tokio::time::Instant::now(),
                };
                writer.run(rx, finish_rx).await;
                let _ = done.send(());
            })
        })?;
        if durable {
            tracing::info!(
                "durable records: a call ends only once its records are committed or fsynced to the spill file"
            );
        }
        let recorder = Arc::new(PgRecorder { queue, stats: stats.clone(), durable, max_bytes: queue_max_bytes });
        Ok(Recording { recorder, stats, finish, finished })
    }

    /// Writes what is queued (or spills it, if PostgreSQL is away) and stops the writer.
    pub async fn finish(self) {
        let _ = self.finish.send(());
        let _ = self.finished.await;
    }
}

impl PgRecorder {
    /// Records queued and not yet taken by the writer.
    pub fn queue_depth(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
    }

    /// Memory those records hold, about.
    pub fn queue_bytes(&self) -> usize {
        self.stats.queued_bytes.load(Ordering::Relaxed)
    }

    /// Counts `bytes` as queued; false, undone, when that would take the queue past
    /// `--queue-max-bytes`. A record larger than that by itself is still taken into an
    /// otherwise empty queue: the memory stays bounded, and a huge call is recorded too.
    fn hold(&self, bytes: usize) -> bool {
        let held = self.stats.queued_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if held > self.max_bytes && held > bytes {
            self.release(bytes);
            return false;
        }
        true
    }

    fn release(&self, bytes: usize) {
        self.stats.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    fn dropped(&self, reason: &dyn std::fmt::Display) {
        let dropped = self.stats.records_dropped.fetch_add(1, Ordering::Relaxed) + 1;
        // Once per 10 000 so that a stuck writer cannot flood the log as well.
        if dropped % 10_000 == 1 {
            tracing::error!(dropped, reason = %reason, "record queue full: call records are being dropped");
        }
    }
}

impl Recorder for PgRecorder {
    fn record(&self, facts: CallFacts) {
        let bytes = facts.footprint();
        if !self.hold(bytes) {
            self.dropped(&format_args!("the queued records hold --queue-max-bytes ({} bytes)", self.max_bytes));
            return;
        }
        if let Err(e) = self.queue.try_send(Queued { facts, ack: None, bytes }) {
            self.release(bytes);
            self.dropped(&e);
        }
    }

    fn durable(&self) -> bool {
        self.durable
    }

    /// A full queue is waited on, not dropped from: the caller waits anyway. Its bytes are
    /// counted but never refused: each call waits for its own record, so the queue holds
    /// at most one record per call in flight.
    fn record_durably(&self, facts: CallFacts) -> Receipt {
        let (ack, acked) = oneshot::channel();
        let durable = async move { acked.await.map_err(|_| NotDurable) };
        let bytes = facts.footprint();
        self.stats.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        match self.queue.try_send(Queued { facts, ack: Some(ack), bytes }) {
            Ok(()) => Box::pin(durable),
            Err(TrySendError::Full(queued)) => {
                let queue = self.queue.clone();
                let stats = self.stats.clone();
                Box::pin(async move {
                    if queue.send(queued).await.is_err() {
                        stats.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
                        return Err(NotDurable);
                    }
                    durable.await
                })
            }
            Err(TrySendError::Closed(_)) => {
                self.release(bytes);
                Box::pin(std::future::ready(Err(NotDurable)))
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::facts::{Method, Outcome, ReplyDetail, RequestDetail, RequestFacts};

    /// A recorder whose queue nobody drains: what a writer that cannot keep up leaves.
    fn undrained(capacity: usize, max_bytes: usize) -> (PgRecorder, mpsc::Receiver<Queued>) {
        let (queue, rx) = mpsc::channel(capacity);
        (PgRecorder { queue, stats: Arc::new(Stats::default()), durable: false, max_bytes }, rx)
    }

    fn query(filter_bytes: usize) -> CallFacts {
        CallFacts {
            id: crate::facts::call_id(SystemTime::now()),
            started_at: SystemTime::now(),
            duration: Duration::from_millis(1),
            method: Method::from_path("/milvus.proto.milvus.MilvusService/Query"),
            database: "default".into(),
            request: RequestFacts {
                collection: Some("docs".into()),
                detail: RequestDetail::Query { filter: "x".repeat(filter_bytes), output_fields: vec![], limit: None },
                ..RequestFacts::default()
            },
            reply: ReplyDetail::Rows(0),
            outcome: Outcome::default(),
            request_bytes: 0,
            reply_bytes: 0,
            client: Default::default(),
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_what_it_cannot_take() {
        let (recorder, rx) = undrained(8, 64 << 20);
        for _ in 0..20 {
            recorder.record(query(10));
        }
        assert_eq!(rx.len(), 8, "the queue takes its capacity");
        assert_eq!(recorder.stats.records_dropped.load(Ordering::Relaxed), 12, "and counts the rest as lost");
        let held: usize = 8 * query(10).footprint();
        assert_eq!(recorder.queue_bytes(), held, "a dropped record's bytes are not counted as held");
    }

    #[test]
    fn a_queue_at_its_bytes_drops_and_counts_the_rest_however_few_records_it_holds() {
        const FILTER: usize = 32 * 1024;
        const CAP: usize = 256 * 1024;
        let (recorder, rx) = undrained(1024, CAP);
        for _ in 0..20 {
            recorder.record(query(FILTER));
        }
        let footprint = query(FILTER).footprint();
        assert_eq!(rx.len(), CAP / footprint, "as many records as fit in {CAP} bytes");
        assert_eq!(recorder.stats.records_dropped.load(Ordering::Relaxed), (20 - CAP / footprint) as u64);
        assert!(recorder.queue_bytes() <= CAP);

        // A record larger than the cap by itself is still taken into an empty queue.
        let (recorder, rx) = undrained(8, 1024);
        recorder.record(query(FILTER));
        assert_eq!(rx.len(), 1);
        recorder.record(query(10));
        assert_eq!(recorder.stats.records_dropped.load(Ordering::Relaxed), 1, "but nothing after it");
    }
}

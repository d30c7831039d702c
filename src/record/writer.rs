//! The writer, on a thread of its own: drains the record queue in batches (what is queued a
//! flush interval after the first record, up to a batch) and writes each batch in one
//! transaction. While PostgreSQL is unreachable, batches go to the spill file and are
//! replayed, in order, before anything newer once it is back.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bb8::PooledConnection;
use futures_util::future::join;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_postgres::Transaction;

use super::priority::Priority;
use super::rows::Record;
use super::spill::Spill;
use super::{Queued, Stats};
use crate::settings::Settings;
use crate::store::logs::{Batch, BatchError, Copies, Ids};
use crate::store::mirror::{Catalog, MirrorOp};
use crate::store::{Connection, Manager, Pool, is_transient};

/// Smallest batch replayed from the spill file.
const REPLAY_BATCH_MIN: usize = 1_000;

/// Most a batch holds, about, whatever its count of records (long filters): a batch
/// PostgreSQL cannot take within `--write-timeout` would spill, and its replay time out,
/// over and over. A few MiB take PostgreSQL a fraction of a second.
const BATCH_MAX_BYTES: usize = 8 << 20;

/// How often the writer tries PostgreSQL again while records wait in the spill file.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Longest wait for a pooled connection before a batch goes to the spill file instead.
/// Shorter than the pool's own timeout: while PostgreSQL is unreachable, records wait in
/// memory (and durable calls wait for them) no longer than this before reaching the disk.
const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(1);

/// The same while records wait in the spill file: a retry only probes. The pool goes on
/// connecting in the background, so a connection made after the probe gave up is there
/// for the next one.
const RETRY_CHECKOUT_TIMEOUT: Duration = Duration::from_millis(250);

/// A batch that takes this much longer than the flush interval, from its first record to
/// its commit, keeps the writer at normal priority for [`STAY_NORMAL`].
const SLOW_BATCH: Duration = Duration::from_millis(100);
const STAY_NORMAL: Duration = Duration::from_secs(10);

/// How often a batch in progress looks at the queue behind it (see [`Crowding`]).
const CROWDING_CHECK: Duration = Duration::from_millis(10);

pub struct Writer {
    pub pool: Pool,
    pub settings: Arc<Settings>,
    pub spill: Spill,
    pub stats: Arc<Stats>,
    pub batch_rows: usize,
    pub queue_capacity: usize,
    /// `--queue-max-bytes`: the queue's other bound, on the memory its records hold.
    pub queue_max_bytes: usize,
    /// Bytes of the records in the pending batch. They stay counted in
    /// [`Stats::queued_bytes`] until the batch is complete, and are subtracted then, once
    /// per batch rather than per record, so that the writer does not contend with the call
    /// threads' additions on every record.
    pub pending_bytes: usize,
    pub flush_interval: Duration,
    /// PostgreSQL's `statement_timeout` for the writer's statements (zero: none).
    pub write_timeout: Duration,
    pub catalog: Catalog,
    /// Who waits for the records in the pending batch (durable mode).
    pub acks: Vec<oneshot::Sender<()>>,
    /// No replay before this: PostgreSQL was unreachable at the last attempt. Each attempt
    /// holds up the writer, so they are spaced by [`RETRY_EVERY`], not made every batch.
    pub retry_at: Instant,
    /// Calls wait for their records' commit (`--durable-records`).
    pub durable: bool,
    /// The last append found the spill file at its cap (`--spill-max-bytes`).
    pub spill_full: bool,
    /// The thread's CPU priority, lowered while the writer keeps up.
    pub priority: Priority,
    /// No idle priority before this: a batch took far longer than its interval.
    pub normal_until: Instant,
}

/// What waits in the queue.
#[derive(Debug, Clone, Copy)]
struct Backlog {
    records: usize,
    bytes: usize,
}

/// The queue behind a batch in progress. A writer held inside a batch (a lock held
/// elsewhere, a PostgreSQL gone slow) takes nothing from the queue while calls go on adding
/// to it; were it to wait out `--write-timeout`, a busy sidecar's queue would fill and drop
/// records that the spill file could have kept.
struct Crowding<'a> {
    queue: &'a mpsc::Receiver<Queued>,
    stats: Arc<Stats>,
    half: Backlog,
}

impl Crowding<'_> {
    /// Resolves once the queue holds more than half its records or bytes.
    async fn past_half(&self) {
        loop {
            tokio::time::sleep(CROWDING_CHECK).await;
            let bytes = self.stats.queued_bytes.load(Ordering::Relaxed);
            if self.queue.len() > self.half.records || bytes > self.half.bytes {
                return;
            }
        }
    }
}

enum WriteError {
    /// Try again later (PostgreSQL away, connection lost).
    Transient(String),
    /// The data itself was refused; retrying cannot help.
    Rejected(String),
}

impl Writer {
    pub async fn run(mut self, mut queue: mpsc::Receiver<Queued>, mut finish: oneshot::Receiver<()>) {
        let mut pending: Vec<Record> = Vec::with_capacity(self.batch_rows);
        let mut finishing = false;
        loop {
            // Wait for a first record (or, with records spilled, for the next retry). This is
            // the only wait a call's `try_send` wakes: the batch then fills while the writer
            // sleeps, so a call costs its thread no wake-up of this one.
            let retry = tokio::time::sleep(if self.spill.waiting() > 0 { RETRY_EVERY } else { Duration::MAX / 4 });
            tokio::select! {
                got = queue.recv() => match got {
                    Some(facts) => self.push(&mut pending, facts),
                    None => finishing = true,
                },
                _ = retry => {}
                _ = &mut finish, if !finishing => finishing = true,
            }
            let started = Instant::now();
            let filling = !pending.is_empty()
                && queue.len() + pending.len() < self.batch_rows
                && self.stats.queued_bytes.load(Ordering::Relaxed) < BATCH_MAX_BYTES;
            if !finishing && filling && !self.flush_interval.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(self.flush_interval) => {}
                    // Shutdown does not wait for the batch to fill.
                    _ = &mut finish => finishing = true,
                }
            }
            let queued_bytes = self.stats.queued_bytes.load(Ordering::Relaxed).saturating_sub(self.pending_bytes);
            let backlog = Backlog { records: queue.len(), bytes: queued_bytes };
            self.priority.keep_up(self.behind(backlog));
            // Falling behind: what is queued now goes to disk in this round; shutting down:
            // everything queued is written, and the writer stops. Either way a batch at a
            // time, so that what was taken from the queue is never more than one batch
            // (going to disk, a batch is bounded by its bytes only: an append costs far
            // less than a transaction, and the queue must drain fast).
            let behind = self.past(backlog, 2);
            let mut left = if finishing {
                usize::MAX
            } else if behind {
                backlog.records
            } else {
                0
            };
            let batch_rows = if behind && !finishing { usize::MAX } else { self.batch_rows };
            loop {
                finishing |= self.fill(&mut pending, &mut queue, batch_rows);
                left = left.saturating_sub(pending.len());
                self.stats.queued_bytes.fetch_sub(self.pending_bytes, Ordering::Relaxed);
                let more = left > 0 && !queue.is_empty();
                let state = if finishing { Backlog { records: 0, bytes: 0 } } else { backlog };
                let crowding = Crowding { queue: &queue, stats: self.stats.clone(), half: self.half() };
                self.flush(&mut pending, state, !more, &crowding).await;
                // Written, spilled or rejected: a flush leaves no record pending.
                self.pending_bytes = 0;
                if !more {
                    break;
                }
            }
            if finishing {
                break;
            }
            // A batch far slower than its interval: PostgreSQL slow, or this thread starved
            // of CPU at idle priority. Either way the writer stays at normal priority a while.
            if started.elapsed() > self.flush_interval + SLOW_BATCH {
                self.normal_until = Instant::now() + STAY_NORMAL;
            }
        }
        let waiting = self.spill.waiting();
        if waiting > 0 {
            tracing::warn!(
                records = waiting,
                "PostgreSQL unreachable at shutdown; records stay in the spill file for the next start"
            );
        }
    }

    /// Moves queued records into `pending` up to a batch of `batch_rows` and
    /// [`BATCH_MAX_BYTES`]; true when the queue is closed.
    fn fill(&mut self, pending: &mut Vec<Record>, queue: &mut mpsc::Receiver<Queued>, batch_rows: usize) -> bool {
        while pending.len() < batch_rows && self.pending_bytes < BATCH_MAX_BYTES {
            match queue.try_recv() {
                Ok(queued) => self.push(pending, queued),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return true,
            }
        }
        false
    }

    fn push(&mut self, pending: &mut Vec<Record>, queued: Queued) {
        let Queued { facts, ack, bytes } = queued;
        self.pending_bytes += bytes;
        match Record::from_facts(facts, &self.settings) {
            Some(record) => {
                pending.push(record);
                self.acks.extend(ack);
            }
            // Nothing to keep: durable at once.
            None => {
                if let Some(ack) = ack {
                    let _ = ack.send(());
                }
            }
        }
    }

    /// Whether `backlog` fills more than `1 / part` of the queue, by count or by bytes.
    fn past(&self, backlog: Backlog, part: usize) -> bool {
        backlog.records > self.queue_capacity / part || backlog.bytes > self.queue_max_bytes / part
    }

    /// Half the queue: past it, the writer is falling behind.
    fn half(&self) -> Backlog {
        Backlog { records: self.queue_capacity / 2, bytes: self.queue_max_bytes / 2 }
    }

    /// Tells the callers of the pending batch whether its records are durable now; those
    /// not told (dropped senders) learn that they were lost.
    fn settle(&mut self, durable: bool) {
        for ack in self.acks.drain(..) {
            if durable {
                let _ = ack.send(());
            }
        }
    }

    /// Writes `pending`. `backlog` is what waits in the queue: when PostgreSQL falls behind
    /// (over half the queue, by count or by bytes), batches go to the spill file, which is
    /// far cheaper than a transaction, so the queue never fills while the disk has room;
    /// they are written to PostgreSQL, in order, as it catches up: after the `last` batch
    /// of a round.
    async fn flush(&mut self, pending: &mut Vec<Record>, backlog: Backlog, last: bool, crowding: &Crowding<'_>) {
        let behind = self.past(backlog, 2);
        if self.spill.waiting() > 0 || behind {
            // Older records wait on disk: newer ones queue behind them to keep the order.
            if !pending.is_empty() {
                if behind && self.spill.waiting() == 0 {
                    tracing::warn!(
                        records = backlog.records,
                        bytes = backlog.bytes,
                        "PostgreSQL is falling behind: spilling records to disk until it catches up"
                    );
                }
                let kept = self.spill_out(pending).await;
                self.settle(kept);
            }
            // While behind, one batch per round, so the queue keeps draining.
            if last {
                self.replay(if behind { 1 } else { usize::MAX }, crowding).await;
            }
            return;
        }
        if pending.is_empty() {
            return;
        }
        match self.write(pending, false, crowding).await {
            Ok(rows) => {
                self.stats.rows_written.fetch_add(rows as u64, Ordering::Relaxed);
                self.stats.batches_written.fetch_add(1, Ordering::Relaxed);
                self.stats.batch_rows.observe(rows as f64);
                pending.clear();
                self.settle(true);
            }
            Err(WriteError::Transient(reason)) => {
                self.retry_at = Instant::now() + RETRY_EVERY;
                tracing::warn!(
                    reason = reason.as_str(),
                    records = pending.len(),
                    "PostgreSQL unavailable: spilling records to disk until it returns"
                );
                let kept = self.spill_out(pending).await;
                self.settle(kept);
            }
            Err(WriteError::Rejected(reason)) => {
                // Kept for an operator, as durably as a spilled record.
                let kept = self.reject(pending, &reason).await;
                self.settle(kept);
            }
        }
    }

    /// Appends `pending` to the spill file; false when it could not (the records are lost).
    async fn spill_out(&mut self, pending: &mut Vec<Record>) -> bool {
        let kept = match self.spill.append(pending).await {
            Ok(()) => {
                self.stats.records_spilled.fetch_add(pending.len() as u64, Ordering::Relaxed);
                self.spill_full = false;
                true
            }
            Err(e) => {
                // Nowhere left to keep them: count and say so, loudly. A full spill file
                // refuses every batch until PostgreSQL is back: said once, counted always.
                self.stats.records_dropped.fetch_add(pending.len() as u64, Ordering::Relaxed);
                let full = e.kind() == std::io::ErrorKind::StorageFull;
                if !(full && self.spill_full) {
                    tracing::error!(error = %e, records = pending.len(), "cannot write the spill file; these records are lost");
                }
                self.spill_full = full;
                false
            }
        };
        pending.clear();
        kept
    }

    async fn reject(&mut self, records: &mut Vec<Record>, reason: &str) -> bool {
        self.stats.records_rejected.fetch_add(records.len() as u64, Ordering::Relaxed);
        // Quoted and escaped: PostgreSQL's message may quote a client's string.
        tracing::error!(reason, records = records.len(), path = %self.spill.rejected_path().display(),
            "PostgreSQL refused a batch; kept in the rejected file");
        let kept = match self.spill.reject(records).await {
            Ok(()) => true,
            Err(e) => {
                self.stats.records_dropped.fetch_add(records.len() as u64, Ordering::Relaxed);
                tracing::error!(error = %e, "cannot write the rejected file; these records are lost");
                false
            }
        };
        records.clear();
        kept
    }

    /// Replays up to `batches` batches of spilled records, oldest first, stopping early when
    /// none are left or PostgreSQL fails again.
    async fn replay(&mut self, batches: usize, crowding: &Crowding<'_>) {
        if Instant::now() < self.retry_at {
            return;
        }
        for _ in 0..batches {
            // Catching up: batches at least as large as the usual ones, larger when the
            // configured batch is small.
            let most = self.batch_rows.max(REPLAY_BATCH_MIN);
            let (mut chunk, offset) = match self.spill.peek(most, BATCH_MAX_BYTES as u64).await {
                Ok(read) => read,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the spill file");
                    return;
                }
            };
            let count = chunk.len();
            if count == 0 {
                let _ = self.spill.advance(offset, 0).await;
                return;
            }
            match self.write(&chunk, true, crowding).await {
                Ok(rows) => {
                    self.stats.rows_written.fetch_add(rows as u64, Ordering::Relaxed);
                    self.stats.records_replayed.fetch_add(count as u64, Ordering::Relaxed);
                }
                Err(WriteError::Transient(_)) => {
                    self.retry_at = Instant::now() + RETRY_EVERY;
                    return;
                }
                Err(WriteError::Rejected(reason)) => {
                    self.reject(&mut chunk, &reason).await;
                }
            }
            if let Err(e) = self.spill.advance(offset, count).await {
                tracing::error!(error = %e, "cannot update the spill file");
                return;
            }
            if self.spill.waiting() == 0 {
                tracing::info!("every spilled record has now been written to PostgreSQL");
                return;
            }
        }
    }

    /// One transaction: mirror changes in call order, then the log rows by COPY.
    /// Writes `records` in one transaction; `replay`: they may have been written before.
    async fn write(&mut self, records: &[Record], replay: bool, crowding: &Crowding<'_>) -> Result<usize, WriteError> {
        let result = self.try_write(records, replay, crowding).await;
        if result.is_err() {
            // The transaction rolled back: ids learned inside it may not exist.
            self.catalog.clear();
        }
        result.map_err(|failure| match failure {
            Failure::NoConnection => WriteError::Transient("no PostgreSQL connection within the pool timeout".into()),
            Failure::NoAnswer { step, after } => {
                WriteError::Transient(format!("PostgreSQL did not finish {step} within {after:?}"))
            }
            Failure::Overtaken { after } => WriteError::Transient(format!(
                "PostgreSQL had not finished the batch after {after:?}, and the calls made meanwhile filled half the record queue"
            )),
            Failure::Db(e) if is_transient(&e) => WriteError::Transient(crate::error_chain(&e)),
            Failure::Db(e) => WriteError::Rejected(crate::error_chain(&e)),
            Failure::Encode(reason) => WriteError::Rejected(reason),
        })
    }

    /// Records back up (with some slack once they have, so the priority does not flap),
    /// or wait in the spill file to be replayed.
    fn behind(&self, backlog: Backlog) -> bool {
        let part = if self.priority.is_idle() { 16 } else { 64 };
        self.past(backlog, part) || self.spill.waiting() > 0 || Instant::now() < self.normal_until
    }

    async fn try_write(&mut self, records: &[Record], replay: bool, crowding: &Crowding<'_>) -> Result<usize, Failure> {
        let patience = if self.spill.waiting() > 0 { RETRY_CHECKOUT_TIMEOUT } else { CHECKOUT_TIMEOUT };
        let mut conn = match tokio::time::timeout(patience, open_connection(&self.pool)).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(bb8::RunError::User(e))) => return Err(Failure::Db(e)),
            Ok(Err(bb8::RunError::TimedOut)) | Err(_) => return Err(Failure::NoConnection),
        };
        let written = self.transact(&mut conn, records, replay, patience, crowding).await;
        if let Err(Failure::NoAnswer { .. } | Failure::Overtaken { .. }) = written {
            // Pooled again, it would hold up the next batch in turn (until TCP gives up on
            // it, which may take many seconds): closed instead.
            conn.abandon();
        }
        written
    }

    /// The batch's transaction on `conn`.
    async fn transact(
        &mut self,
        conn: &mut Connection,
        records: &[Record],
        replay: bool,
        patience: Duration,
        crowding: &Crowding<'_>,
    ) -> Result<usize, Failure> {
        // The pool no longer tests a connection by a query, which this patience bounded: one
        // gone silent (a network lost without a reset) would hold the writer at BEGIN, so
        // BEGIN gets the same patience, and the batch goes to the spill file.
        let tx = match tokio::time::timeout(patience, conn.transaction()).await {
            Ok(begun) => begun?,
            Err(_) => return Err(Failure::NoAnswer { step: "BEGIN", after: patience }),
        };
        // A writer blocked inside a statement (a lock held elsewhere, a stalled server)
        // drains nothing while calls go on queueing: PostgreSQL cancels the statement
        // instead, the transaction rolls back, and the batch goes to the spill file.
        // Per transaction (SET LOCAL), so a pooler in transaction mode keeps no trace.
        let mut settings = format!("SET LOCAL statement_timeout = {};", timeout_ms(self.write_timeout));
        if !self.durable {
            // Without durable records a crash of the sidecar may already lose the last
            // flush interval; a commit that waits for the WAL to reach disk only holds up
            // the writer (a backlog drained at 70-110k rows/s, from run to run, waiting on
            // fsync). PostgreSQL still writes the WAL within a fraction of a second.
            settings.push_str("SET LOCAL synchronous_commit = off;");
        }
        let work = async {
            // The settings go out with the batch's first statements, not in a round trip of
            // their own: requests polled together are pipelined in the order they are first
            // polled, so they still come first.
            let (set, prepared) =
                join(tx.batch_execute(&settings), prepare(&mut self.catalog, &tx, records, replay)).await;
            set?;
            let (copies, rows) = prepared?;
            copies.commit(tx).await?;
            Ok(rows)
        };
        // PostgreSQL's statement_timeout cannot end a wait for a server or network gone
        // silent after BEGIN: the batch gets the same bound, and a little more, from here.
        // And a batch that is still going when the calls made meanwhile fill half the queue
        // is given up at once: the writer is falling behind, and the queue must drain to the
        // spill file before it fills and drops records. Either way, whether the batch
        // committed is then unknown; the spill file's replay skips the rows that did arrive.
        let started = Instant::now();
        let bound = (!self.write_timeout.is_zero()).then(|| self.write_timeout + patience);
        let timeout = async {
            match bound {
                Some(bound) => tokio::time::sleep(bound).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            written = work => written,
            () = timeout => Err(Failure::NoAnswer { step: "the batch", after: bound.unwrap_or_default() }),
            () = crowding.past_half() => Err(Failure::Overtaken { after: started.elapsed() }),
        }
    }
}

/// A pooled connection PostgreSQL has not closed. The pool does not test its connections (a
/// round trip in every batch): one PostgreSQL closed while it was idle (a restart, an
/// administrator's `pg_terminate_backend`) is known to its client by then, and is dropped
/// here, which takes it out of the pool. One that breaks later fails its batch, which goes
/// to the spill file and is replayed.
async fn open_connection(
    pool: &Pool,
) -> Result<PooledConnection<'static, Manager>, bb8::RunError<tokio_postgres::Error>> {
    loop {
        // Owned (it holds the pool, not a borrow of the writer's field), so the writer's
        // other fields stay free to borrow while the batch holds it.
        let conn = pool.get_owned().await?;
        if !conn.is_closed() {
            return Ok(conn);
        }
    }
}

/// Resolves the records' names to ids, applies their mirror changes in call order and
/// prepares the COPYs of their log rows; returns those and how many rows they hold.
async fn prepare(
    catalog: &mut Catalog,
    tx: &Transaction<'_>,
    records: &[Record],
    replay: bool,
) -> Result<(Copies, usize), Failure> {
    let mut batch = Batch::default();
    for record in records {
        let call = &record.call;
        let user = match &call.user {
            Some(name) => catalog.user_id(tx, name).await?,
            None => None,
        };
        // Resolved before the mirror change, so a drop or rename is logged against the
        // collection it acted on. A collection Milvus just served exists even if the
        // mirror has not seen it yet; a dropped one must not come back.
        let create = call.success && !matches!(record.mirror, Some(MirrorOp::DropCollection { .. }));
        let collection = match &call.collection {
            Some(name) => catalog.collection(tx, &call.database, name, create).await?,
            None => None,
        };
        if let Some(op) = &record.mirror {
            catalog.apply(tx, op).await?;
        }
        let ids = Ids { user, collection: collection.map(|c| c.id) };
        if let Some(p) = &record.perf {
            batch.perf.push((call, ids, p));
        }
        if let Some(q) = &record.query {
            batch.query.push((call, ids, q, collection.and_then(|c| c.dimension)));
        }
        if let Some(i) = &record.ingestion {
            batch.ingestion.push((call, ids, i));
        }
        if let Some(a) = &record.audit {
            batch.audit.push((call, ids, a));
        }
    }
    let rows = batch.rows();
    Ok((batch.prepare(tx, replay).await?, rows))
}

/// `statement_timeout` in milliseconds: 0 (none) only for a zero duration.
fn timeout_ms(timeout: Duration) -> u128 {
    if timeout.is_zero() { 0 } else { timeout.as_millis().max(1) }
}

enum Failure {
    Db(tokio_postgres::Error),
    NoConnection,
    /// PostgreSQL did not finish `step` of the batch within `after`.
    NoAnswer {
        step: &'static str,
        after: Duration,
    },
    /// The batch was still going after `after`, when the queue behind it passed half.
    Overtaken {
        after: Duration,
    },
    /// A row holds a value PostgreSQL's binary form cannot.
    Encode(String),
}

impl From<BatchError> for Failure {
    fn from(e: BatchError) -> Self {
        match e {
            BatchError::Db(e) => Failure::Db(e),
            e @ BatchError::Encode { .. } => Failure::Encode(e.to_string()),
        }
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Failure::Db(e)
    }
}

//! The record queue's cap (`--queue-capacity`): when the writer is stuck and the queue is
//! full, records are dropped, and what was dropped is counted, exported and logged.
//! Its own test binary: it installs the process-wide log subscriber it reads.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::fake::FakeUpstream;
use common::pg::TestDb;
use common::{RawClient, TempDir, http_get};
use milvus_sidecar::App;

const CAPACITY: usize = 8;

#[tokio::test]
async fn a_full_queue_drops_records_and_counts_and_logs_what_it_dropped() {
    let logs = common::logs::captured("info");
    let db = TestDb::create().await;
    let upstream = FakeUpstream::start().await;
    let spill = TempDir::new("drops-spill");
    let mut config = common::recording_config(upstream.addr, &db.url(), &spill.path);
    config.recording.queue_capacity = CAPACITY;
    let app = App::start(config).await.expect("sidecar starts");
    let mut client = RawClient::connect(app.running.listen_addr).await;

    // The writer's next COPY waits behind this lock for as long as the test holds it, and
    // a writer that waits takes nothing from the queue.
    let mut admin = db.client().await;
    let lock = admin.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE performance_metrics IN ACCESS EXCLUSIVE MODE").await.unwrap();
    client.unary("GetVersion", Bytes::new()).await.unwrap();
    assert_eq!(db.writers_waiting_on("performance_metrics").await, 1, "the writer is stuck on the lock");

    let calls = 20;
    for _ in 0..calls {
        client.unary("GetVersion", Bytes::new()).await.expect("calls go on while records are dropped");
    }
    let stats = &app.recording.as_ref().unwrap().stats;
    let dropped = calls - CAPACITY as u64;
    // A call's record may be handed over just after its client has the reply.
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats.records_dropped.load(Ordering::Relaxed) < dropped && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stats.records_dropped.load(Ordering::Relaxed), dropped, "the queue held {CAPACITY}");
    let (_, metrics) = http_get(app.running.admin_addr, "/metrics").await;
    assert!(metrics.contains(&format!("milvus_sidecar_recording_rows_dropped_total {dropped}")), "{metrics}");
    let text = logs.text();
    let said = text.lines().filter(|l| l.contains("record queue full: call records are being dropped")).count();
    assert_eq!(said, 1, "logged once, not once per record:\n{text}");
    assert!(text.contains("ERROR"), "{text}");

    lock.commit().await.unwrap();
    // The stuck call, and what the queue held; nothing of what was dropped.
    let kept = 1 + CAPACITY as i64;
    assert_eq!(db.wait_for_count("SELECT count(*) FROM performance_metrics", kept).await, kept);
    app.shutdown().await;
    assert_eq!(db.count("SELECT count(*) FROM performance_metrics").await, kept);
    assert_eq!(upstream.count("GetVersion"), 1 + calls as usize, "every call reached Milvus");
}

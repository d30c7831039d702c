//! A writer held inside a batch (a table locked elsewhere, and a `--write-timeout` longer
//! than the test) while calls go on: once the calls made meanwhile fill half the record
//! queue, the batch is given up and the queue drains to the spill file, so nothing is
//! dropped, and every call arrives, once, when the lock is gone.
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
async fn a_writer_stuck_in_a_batch_spills_before_the_queue_fills() {
    let logs = common::logs::captured("info");
    let db = TestDb::create().await;
    let upstream = FakeUpstream::start().await;
    let spill = TempDir::new("stuck-writer-spill");
    let mut config = common::recording_config(upstream.addr, &db.url(), &spill.path);
    config.recording.queue_capacity = CAPACITY;
    // Only the queue behind the batch can end the wait.
    config.recording.write_timeout = Duration::from_secs(120);
    let app = App::start(config).await.expect("sidecar starts");
    let mut client = RawClient::connect(app.running.listen_addr).await;

    // The writer's next COPY waits behind this lock for as long as the test holds it.
    let mut admin = db.client().await;
    let lock = admin.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE performance_metrics IN ACCESS EXCLUSIVE MODE").await.unwrap();
    client.unary("GetVersion", Bytes::new()).await.unwrap();
    assert_eq!(db.writers_waiting_on("performance_metrics").await, 1, "the writer is stuck on the lock");

    let calls = 20;
    for _ in 0..calls {
        client.unary("GetVersion", Bytes::new()).await.expect("calls go on while the writer is stuck");
    }
    let stats = &app.recording.as_ref().unwrap().stats;
    // A call's record may be handed over just after its client has the reply.
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats.records_spilled.load(Ordering::Relaxed) < 1 + calls && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stats.records_dropped.load(Ordering::Relaxed), 0, "nothing lost; {stats:?}");
    assert_eq!(stats.records_spilled.load(Ordering::Relaxed), 1 + calls, "the stuck batch and every call after it");
    let (_, metrics) = http_get(app.running.admin_addr, "/metrics").await;
    assert!(metrics.contains("milvus_sidecar_recording_rows_dropped_total 0"), "{metrics}");
    let text = logs.text();
    assert!(text.contains("the calls made meanwhile filled half the record queue"), "{text}");
    assert!(!text.contains("record queue full"), "{text}");

    lock.commit().await.unwrap();
    let all = 1 + calls as i64;
    assert_eq!(db.wait_for_count("SELECT count(*) FROM performance_metrics", all).await, all);
    app.shutdown().await;
    assert_eq!(db.count("SELECT count(*) FROM performance_metrics").await, all, "none twice");
    assert_eq!(upstream.count("GetVersion"), 1 + calls as usize, "every call reached Milvus");
}

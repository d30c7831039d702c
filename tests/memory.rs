//! The built binary's resident set after a burst of large inserts: what the burst's HTTP/2
//! buffers took goes back to the system once the sidecar is idle, not at the next call.
//! (Only the real process runs the binary's allocator.) No PostgreSQL: `--no-auth
//! --no-recording`.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::bin::Process;
use common::fake::FakeUpstream;
use common::{RawClient, encode};
use milvus::proto::milvus::InsertRequest;
use milvus::proto::schema::{FieldData, FloatArray, VectorField, field_data, vector_field};

/// A 4 MiB insert of 768-dim vectors, the bench's large case.
fn large_insert() -> Bytes {
    const DIM: usize = 768;
    const ROWS: usize = 1_361;
    encode(&InsertRequest {
        collection_name: "docs".into(),
        num_rows: ROWS as u32,
        fields_data: vec![FieldData {
            field_name: "embedding".into(),
            field: Some(field_data::Field::Vectors(VectorField {
                dim: DIM as i64,
                data: Some(vector_field::Data::FloatVector(FloatArray {
                    data: (0..ROWS * DIM).map(|i| i as f32).collect(),
                })),
                ..Default::default()
            })),
            ..Default::default()
        }],
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_of_a_burst_goes_back_while_idle() {
    const IN_FLIGHT: usize = 4;
    const ROUNDS: usize = 8;
    let upstream = FakeUpstream::start().await;
    let address = format!("http://{}", upstream.addr);
    let p = Process::serve(&["--no-auth", "--no-recording", "--upstream", &address], &[]).await;
    let body = large_insert();
    assert!(body.len() > 4_000_000);
    let before = p.rss_mib();

    let mut clients = Vec::new();
    for _ in 0..IN_FLIGHT {
        clients.push(RawClient::connect(p.listen).await);
    }
    for _ in 0..ROUNDS {
        let calls = clients.iter_mut().map(|client| client.unary("Insert", body.clone()));
        for reply in futures::future::join_all(calls).await {
            assert!(reply.is_ok(), "{reply:?}\n{}", p.log());
        }
    }
    let burst = p.rss_mib();

    // Nothing more is sent; the connections stay open, as a client's would.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut idle = p.rss_mib();
    while idle - before > 4.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        idle = p.rss_mib();
    }
    drop(clients);
    let (status, log) = p.stop().await;
    assert_eq!(status.code(), Some(0), "{log}");
    eprintln!("RSS {before:.1} MiB before, {burst:.1} after the burst, {idle:.1} when idle");
    assert!(burst - before > 8.0, "the burst itself holds memory: {before:.1} -> {burst:.1} MiB");
    assert!(
        idle - before <= 4.0,
        "RSS {before:.1} MiB before the burst, {burst:.1} after it, still {idle:.1} after 5 s idle"
    );
}

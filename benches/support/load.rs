//! The load generator: unary `Search` calls shaped like pymilvus's (same request size, same
//! metadata), sent by N tasks over tonic channels and timed with hdrhistogram.
//!
//! The request is encoded once and sent through a pass-through codec so that protobuf encoding
//! stays out of the measured path: what is timed is the network hop, plus the sidecar when it is
//! in the way.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use bytes::{Buf, BufMut, Bytes};
use hdrhistogram::Histogram;
use http::uri::PathAndQuery;
use milvus::proto::common::{
    ConsistencyLevel, DslType, KeyValuePair, PlaceholderGroup, PlaceholderType, PlaceholderValue, Status,
};
use milvus::proto::milvus::{SearchRequest, SearchResults, search_request::SearchInput};
use prost013::Message;
use tokio::task::JoinHandle;
use tonic::client::Grpc;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::transport::{Channel, Endpoint};

const SEARCH_PATH: &str = "/milvus.proto.milvus.MilvusService/Search";
/// Dimension of the query vector: 768 floats make the ~3 KiB request of a typical text embedding.
const DIM: usize = 768;
/// What grpcio (under pymilvus) announces; tonic appends its own token.
const USER_AGENT: &str = "grpc-python/1.66.2 grpc-c/43.0.0 (linux; chttp2)";
/// base64("root:Milvus"), with no scheme prefix, exactly as pymilvus sends it.
const AUTHORIZATION: &str = "cm9vdDpNaWx2dXM=";
/// The connection identifier Milvus hands out on `Connect`; pymilvus echoes it on every call.
const IDENTIFIER: &str = "457385193726437377";
/// Latencies above a minute are not a benchmark result any more; they saturate.
const MAX_LATENCY_US: u64 = 60_000_000;

/// A pymilvus-like `SearchRequest`: one 768-dim float query, top 10, two output fields.
pub fn search_request() -> Bytes {
    let vector: Vec<u8> = (0..DIM).flat_map(|i| (i as f32 / DIM as f32).to_le_bytes()).collect();
    let group = PlaceholderGroup {
        placeholders: vec![PlaceholderValue {
            tag: "$0".into(),
            r#type: PlaceholderType::FloatVector as i32,
            values: vec![vector],
            ..Default::default()
        }],
    };
    let top_k = crate::TOP_K.to_string();
    let params = [
        ("anns_field", "embedding"),
        ("topk", top_k.as_str()),
        ("metric_type", "COSINE"),
        ("params", r#"{"nprobe": 10}"#),
        ("round_decimal", "-1"),
        ("ignore_growing", "False"),
    ];
    let request = SearchRequest {
        collection_name: crate::COLLECTION.into(),
        dsl_type: DslType::BoolExprV1 as i32,
        nq: 1,
        output_fields: vec!["title".into(), "category".into()],
        search_params: params
            .iter()
            .map(|(key, value)| KeyValuePair { key: (*key).into(), value: (*value).into() })
            .collect(),
        search_input: Some(SearchInput::PlaceholderGroup(group.encode_to_vec())),
        consistency_level: ConsistencyLevel::Bounded as i32,
        use_default_consistency: true,
        ..Default::default()
    };
    Bytes::from(request.encode_to_vec())
}

/// Opens `count` HTTP/2 connections (one per channel) to `addr`.
pub async fn connect(addr: std::net::SocketAddr, count: usize) -> Result<Vec<Channel>> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?.user_agent(USER_AGENT)?.tcp_nodelay(true);
    let mut channels = Vec::with_capacity(count);
    for _ in 0..count {
        let channel = endpoint.connect().await.with_context(|| format!("connecting to {addr}"))?;
        channels.push(channel);
    }
    Ok(channels)
}

/// One call whose reply is decoded and checked, so that a run never measures a fast failure (a
/// refused credential, a wrong route) as if it were a search.
pub async fn check_search(channel: &Channel, payload: &Bytes) -> Result<()> {
    let reply = SearchClient::new(channel.clone(), u64::MAX)
        .search(payload)
        .await
        .map_err(|status| anyhow::anyhow!("Search failed: {status}"))?;
    let results = SearchResults::decode(reply).context("the reply is not a SearchResults")?;
    let (code, error_code, reason) = milvus_status(results.status.unwrap_or_default());
    ensure!(
        code == 0 && error_code == 0,
        "Search answered with Milvus error code {code} (error_code {error_code}): {reason}"
    );
    let data = results.results.context("the Search reply has no results")?;
    let top_k = crate::TOP_K;
    ensure!(
        data.num_queries == 1 && data.topks == [top_k] && data.scores.len() == top_k as usize,
        "the Search reply is not the fake upstream's {top_k} hits: {data:?}"
    );
    Ok(())
}

/// `code`, `error_code` and `reason` of a Milvus status.
#[allow(deprecated)] // `error_code` is deprecated, yet Milvus 2.3 still reports failures only there
fn milvus_status(status: Status) -> (i32, i32, String) {
    (status.code, status.error_code, status.reason)
}

/// When a run warms up and when it measures: calls that start before `measure_from` or end after
/// `until` are not recorded; no call starts after `until`.
#[derive(Clone, Copy)]
pub struct Window {
    pub measure_from: Instant,
    pub until: Instant,
}

/// Starts `concurrency` closed-loop tasks spread round-robin over `channels`.
pub fn spawn_workers(
    channels: &[Channel],
    payload: &Bytes,
    concurrency: usize,
    window: Window,
) -> Vec<JoinHandle<Stats>> {
    (0..concurrency)
        .map(|task| {
            let client = SearchClient::new(channels[task % channels.len()].clone(), task as u64);
            tokio::spawn(worker(client, payload.clone(), window))
        })
        .collect()
}

/// Waits for the tasks and merges what they recorded.
pub async fn join(workers: Vec<JoinHandle<Stats>>) -> Result<Stats> {
    let mut total = Stats::new();
    for worker in workers {
        let stats = worker.await.context("a load task panicked")?;
        total.latency_us.add(&stats.latency_us)?;
        total.errors += stats.errors;
        total.first_error = total.first_error.or(stats.first_error);
    }
    Ok(total)
}

async fn worker(mut client: SearchClient, payload: Bytes, window: Window) -> Stats {
    let mut stats = Stats::new();
    loop {
        let start = Instant::now();
        if start >= window.until {
            return stats;
        }
        let result = client.search(&payload).await;
        let end = Instant::now();
        match result {
            Ok(_) if start >= window.measure_from && end <= window.until => {
                let micros = u64::try_from((end - start).as_micros()).unwrap_or(u64::MAX);
                stats.latency_us.saturating_record(micros.max(1));
            }
            Ok(_) => {} // warm-up, or straddling the end of the window
            Err(status) => {
                stats.errors += 1;
                stats.first_error.get_or_insert_with(|| status.to_string());
            }
        }
    }
}

/// What the tasks of one run observed.
pub struct Stats {
    pub latency_us: Histogram<u64>,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl Stats {
    fn new() -> Self {
        Self {
            latency_us: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("static histogram bounds are valid"),
            errors: 0,
            first_error: None,
        }
    }
}

/// One task's client: a `Grpc` handle plus what it needs to make pymilvus's per-call metadata.
struct SearchClient {
    grpc: Grpc<Channel>,
    task: u64,
    sequence: u64,
}

impl SearchClient {
    fn new(channel: Channel, task: u64) -> Self {
        Self { grpc: Grpc::new(channel), task, sequence: 0 }
    }

    /// Times nothing itself: the caller's clock includes waiting for the channel to be ready,
    /// as a real client's would.
    async fn search(&mut self, payload: &Bytes) -> Result<Bytes, tonic::Status> {
        let mut request = tonic::Request::new(payload.clone());
        self.add_pymilvus_metadata(request.metadata_mut());
        self.grpc.ready().await.map_err(|e| tonic::Status::unavailable(format!("channel not ready: {e}")))?;
        let reply = self.grpc.unary(request, PathAndQuery::from_static(SEARCH_PATH), RawCodec).await?;
        Ok(reply.into_inner())
    }

    /// The headers pymilvus adds to every call after `Connect` (user-agent is the channel's).
    fn add_pymilvus_metadata(&mut self, metadata: &mut MetadataMap) {
        self.sequence += 1;
        // A unique 32-hex-digit id, like pymilvus's uuid hex, without a random source.
        let request_id = format!("{:016x}{:016x}", self.task, self.sequence);
        let unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        metadata.insert("dbname", AsciiMetadataValue::from_static("default"));
        metadata.insert("client-request-id", AsciiMetadataValue::try_from(request_id).expect("hex digits are ASCII"));
        metadata.insert("client-request-unixmsec", AsciiMetadataValue::from(unix_ms as u64));
        metadata.insert("identifier", AsciiMetadataValue::from_static(IDENTIFIER));
        metadata.insert("authorization", AsciiMetadataValue::from_static(AUTHORIZATION));
    }
}

/// Sends pre-encoded message bytes and hands back the reply's bytes undecoded.
#[derive(Clone, Copy)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        *self
    }

    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Self::Error> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

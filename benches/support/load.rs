//! The load generator: unary Milvus calls shaped like pymilvus's (same request sizes, same
//! metadata), sent by N closed-loop tasks over tonic channels and timed with hdrhistogram.
//!
//! Each request is encoded once and sent through a pass-through codec so that protobuf encoding
//! stays out of the measured path: what is timed is the network hop, plus the proxy when one is
//! in the way.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use base64::Engine;
use bytes::{Buf, BufMut, Bytes};
use hdrhistogram::Histogram;
use http::uri::PathAndQuery;
use milvus::proto::common::{
    ConsistencyLevel, DslType, KeyValuePair, PlaceholderGroup, PlaceholderType, PlaceholderValue, Status,
};
use milvus::proto::milvus::{InsertRequest, MutationResult, SearchRequest, SearchResults, search_request::SearchInput};
use milvus::proto::schema::{
    DataType, FieldData, FloatArray, LongArray, ScalarField, VectorField, field_data, scalar_field, vector_field,
};
use prost013::Message;
use tokio::task::JoinHandle;
use tonic::client::Grpc;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::transport::{Channel, Endpoint};

pub const SEARCH_PATH: &str = "/milvus.proto.milvus.MilvusService/Search";
pub const INSERT_PATH: &str = "/milvus.proto.milvus.MilvusService/Insert";
/// Dimension of the vectors: 768 floats make the ~3 KiB query of a typical text embedding.
pub const DIM: usize = 768;
/// What grpcio (under pymilvus) announces; tonic appends its own token.
const USER_AGENT: &str = "grpc-python/1.66.2 grpc-c/43.0.0 (linux; chttp2)";
/// The connection identifier Milvus hands out on `Connect`; pymilvus echoes it on every call.
const IDENTIFIER: &str = "457385193726437377";
/// Latencies above a minute are not a benchmark result any more; they saturate.
const MAX_LATENCY_US: u64 = 60_000_000;

/// What the tasks send: one pre-encoded request to one method.
#[derive(Clone)]
pub struct Workload {
    pub kind: Kind,
    pub payload: Bytes,
    /// Rows an Insert carries (0 for a Search).
    pub rows: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Search,
    Insert,
}

impl Workload {
    fn path(&self) -> &'static str {
        match self.kind {
            Kind::Search => SEARCH_PATH,
            Kind::Insert => INSERT_PATH,
        }
    }
}

/// `authorization` as pymilvus sends it: base64 of `user:password`, no scheme prefix.
pub fn authorization(user: &str, password: &str) -> AsciiMetadataValue {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    AsciiMetadataValue::try_from(encoded).expect("base64 is ASCII")
}

fn query_vector() -> Vec<u8> {
    (0..DIM).flat_map(|i| (i as f32 / DIM as f32).to_le_bytes()).collect()
}

/// A pymilvus-like `SearchRequest` on `collection`: one 768-dim float query, top 10, and the
/// given output fields (about 3 KiB with two of them).
pub fn search(collection: &str, output_fields: &[&str]) -> Workload {
    let group = PlaceholderGroup {
        placeholders: vec![PlaceholderValue {
            tag: "$0".into(),
            r#type: PlaceholderType::FloatVector as i32,
            values: vec![query_vector()],
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
        collection_name: collection.into(),
        dsl_type: DslType::BoolExprV1 as i32,
        nq: 1,
        output_fields: output_fields.iter().map(|f| (*f).into()).collect(),
        search_params: params
            .iter()
            .map(|(key, value)| KeyValuePair { key: (*key).into(), value: (*value).into() })
            .collect(),
        search_input: Some(SearchInput::PlaceholderGroup(group.encode_to_vec())),
        consistency_level: ConsistencyLevel::Bounded as i32,
        use_default_consistency: true,
        ..Default::default()
    };
    Workload { kind: Kind::Search, payload: Bytes::from(request.encode_to_vec()), rows: 0 }
}

/// A pymilvus-like `InsertRequest` of about `bytes` bytes: rows of an Int64 primary key `id`
/// and a 768-dim FloatVector `embedding`, in schema order, as pymilvus encodes them. Ids start
/// at `first_id`.
pub fn insert(collection: &str, bytes: usize, first_id: i64) -> Workload {
    let per_row = DIM * 4 + 8;
    let rows = (bytes / per_row).max(1);
    let ids: Vec<i64> = (first_id..first_id + rows as i64).collect();
    let floats: Vec<f32> = (0..rows * DIM).map(|i| ((i * 7919) % 1000) as f32 / 1000.0).collect();
    let request = InsertRequest {
        collection_name: collection.into(),
        fields_data: vec![
            FieldData {
                r#type: DataType::Int64 as i32,
                field_name: "id".into(),
                field: Some(field_data::Field::Scalars(ScalarField {
                    data: Some(scalar_field::Data::LongData(LongArray { data: ids })),
                    ..Default::default()
                })),
                ..Default::default()
            },
            FieldData {
                r#type: DataType::FloatVector as i32,
                field_name: "embedding".into(),
                field: Some(field_data::Field::Vectors(VectorField {
                    dim: DIM as i64,
                    data: Some(vector_field::Data::FloatVector(FloatArray { data: floats })),
                    ..Default::default()
                })),
                ..Default::default()
            },
        ],
        num_rows: rows as u32,
        ..Default::default()
    };
    Workload { kind: Kind::Insert, payload: Bytes::from(request.encode_to_vec()), rows: rows as u32 }
}

/// Opens `count` HTTP/2 connections (one per channel) to `addr`.
pub async fn connect(addr: std::net::SocketAddr, count: usize) -> Result<Vec<Channel>> {
    // BDP-sized flow-control windows, as grpcio (under pymilvus) negotiates them.
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .user_agent(USER_AGENT)?
        .tcp_nodelay(true)
        .http2_adaptive_window(true);
    let mut channels = Vec::with_capacity(count);
    for _ in 0..count {
        let channel = endpoint.connect().await.with_context(|| format!("connecting to {addr}"))?;
        channels.push(channel);
    }
    Ok(channels)
}

/// One call whose reply is decoded and checked, so that a run never measures a fast failure (a
/// refused credential, a wrong route) as if it were the real thing.
pub async fn check(channel: &Channel, workload: &Workload, auth: &AsciiMetadataValue) -> Result<()> {
    let reply = Client::new(channel.clone(), u64::MAX, workload, auth.clone())
        .call()
        .await
        .map_err(|status| anyhow::anyhow!("{:?} failed: {status}", workload.kind))?;
    match workload.kind {
        Kind::Search => {
            let results = SearchResults::decode(reply).context("the reply is not a SearchResults")?;
            ok_status(results.status, "Search")?;
            let data = results.results.context("the Search reply has no results")?;
            let top_k = crate::TOP_K;
            ensure!(
                data.num_queries == 1 && data.topks == [top_k] && data.scores.len() == top_k as usize,
                "the Search reply does not have {top_k} hits: {data:?}"
            );
        }
        Kind::Insert => {
            let result = MutationResult::decode(reply).context("the reply is not a MutationResult")?;
            ok_status(result.status, "Insert")?;
        }
    }
    Ok(())
}

#[allow(deprecated)] // `error_code` is deprecated, yet Milvus 2.3 still reports failures only there
fn ok_status(status: Option<Status>, method: &str) -> Result<()> {
    let status = status.unwrap_or_default();
    ensure!(
        status.code == 0 && status.error_code == 0,
        "{method} answered with Milvus error code {} (error_code {}): {}",
        status.code,
        status.error_code,
        status.reason
    );
    Ok(())
}

/// One unary call of `path` with an encoded `message`, and pymilvus's metadata: for set-up.
pub async fn unary(channel: &Channel, path: &str, message: Vec<u8>) -> Result<Bytes, tonic::Status> {
    let path = PathAndQuery::try_from(path).map_err(|e| tonic::Status::internal(format!("{path}: {e}")))?;
    let mut grpc = Grpc::new(channel.clone()).max_encoding_message_size(usize::MAX);
    let mut request = tonic::Request::new(Bytes::from(message));
    request.metadata_mut().insert("dbname", AsciiMetadataValue::from_static("default"));
    grpc.ready().await.map_err(|e| tonic::Status::unavailable(format!("channel not ready: {e}")))?;
    Ok(grpc.unary(request, path, RawCodec).await?.into_inner())
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
    workload: &Workload,
    auth: &AsciiMetadataValue,
    concurrency: usize,
    window: Window,
) -> Vec<JoinHandle<Stats>> {
    (0..concurrency)
        .map(|task| {
            let client = Client::new(channels[task % channels.len()].clone(), task as u64, workload, auth.clone());
            tokio::spawn(worker(client, window))
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
        total.completed += stats.completed;
        total.first_error = total.first_error.or(stats.first_error);
    }
    Ok(total)
}

async fn worker(mut client: Client, window: Window) -> Stats {
    let mut stats = Stats::new();
    loop {
        let start = Instant::now();
        if start >= window.until {
            return stats;
        }
        let result = client.call().await;
        let end = Instant::now();
        match result {
            Ok(_) => {
                stats.completed += 1;
                if start >= window.measure_from && end <= window.until {
                    let micros = u64::try_from((end - start).as_micros()).unwrap_or(u64::MAX);
                    stats.latency_us.saturating_record(micros.max(1));
                }
            }
            Err(status) => {
                stats.errors += 1;
                stats.first_error.get_or_insert_with(|| status.to_string());
            }
        }
    }
}

/// What the tasks of one run observed.
pub struct Stats {
    /// Calls that ended inside the measured window.
    pub latency_us: Histogram<u64>,
    /// Every successful call, warm-up included: what the proxy should have recorded.
    pub completed: u64,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl Stats {
    fn new() -> Self {
        Self {
            latency_us: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("static histogram bounds are valid"),
            completed: 0,
            errors: 0,
            first_error: None,
        }
    }
}

/// One task's client: a `Grpc` handle plus what it needs to make pymilvus's per-call metadata.
struct Client {
    grpc: Grpc<Channel>,
    path: PathAndQuery,
    payload: Bytes,
    auth: AsciiMetadataValue,
    task: u64,
    sequence: u64,
}

impl Client {
    fn new(channel: Channel, task: u64, workload: &Workload, auth: AsciiMetadataValue) -> Self {
        // Replies are small; requests may be large.
        let grpc = Grpc::new(channel).max_encoding_message_size(usize::MAX).max_decoding_message_size(64 << 20);
        let path = PathAndQuery::from_static(workload.path());
        Self { grpc, path, payload: workload.payload.clone(), auth, task, sequence: 0 }
    }

    /// Times nothing itself: the caller's clock includes waiting for the channel to be ready,
    /// as a real client's would.
    async fn call(&mut self) -> Result<Bytes, tonic::Status> {
        let mut request = tonic::Request::new(self.payload.clone());
        self.add_pymilvus_metadata(request.metadata_mut());
        self.grpc.ready().await.map_err(|e| tonic::Status::unavailable(format!("channel not ready: {e}")))?;
        let reply = self.grpc.unary(request, self.path.clone(), RawCodec).await?;
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
        metadata.insert("authorization", self.auth.clone());
    }
}

/// Sends pre-encoded message bytes and hands back the reply's bytes undecoded.
#[derive(Clone, Copy)]
pub struct RawCodec;

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

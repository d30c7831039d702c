//! Test harness: a scriptable fake upstream (for proxy behaviour: faults, timing, exact
//! bytes), a raw-bytes gRPC client, a capturing recorder, and the sidecar started
//! in-process in front of whichever upstream a test picks.
#![allow(dead_code)] // each test crate uses a different part of the harness

pub mod bin;
pub mod certs;
pub mod fake;
pub mod lite;
pub mod logs;
pub mod pg;
pub mod relay;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use milvus_sidecar::config::Config;
use milvus_sidecar::facts::CallFacts;
use milvus_sidecar::record::Recorder;
use tokio::sync::Notify;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

pub const SERVICE: &str = "/milvus.proto.milvus.MilvusService/";

/// Collects every call's facts so tests can assert on them.
#[derive(Default)]
pub struct Captured {
    facts: Mutex<Vec<CallFacts>>,
    added: Notify,
}

impl Recorder for Captured {
    fn record(&self, facts: CallFacts) {
        self.facts.lock().unwrap().push(facts);
        self.added.notify_waiters();
    }
}

impl Captured {
    /// Waits (up to 5 s) for the facts of a call to `method` and returns the latest.
    pub async fn wait_for(&self, method: &str) -> CallFacts {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let notified = self.added.notified();
            if let Some(f) = self.facts.lock().unwrap().iter().rev().find(|f| f.method.name() == method) {
                return f.clone();
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("no facts recorded for {method} within 5 s");
            }
        }
    }

    pub fn count(&self, method: &str) -> usize {
        self.facts.lock().unwrap().iter().filter(|f| f.method.name() == method).count()
    }
}

/// The sidecar under test, started in-process with a capturing recorder.
pub struct Sidecar {
    pub running: milvus_sidecar::Running,
    pub captured: Arc<Captured>,
}

impl Sidecar {
    pub async fn start(upstream: SocketAddr) -> Sidecar {
        Sidecar::start_with(upstream, |_| {}).await
    }

    pub async fn start_with(upstream: SocketAddr, tweak: impl FnOnce(&mut Config)) -> Sidecar {
        let mut config = Config::local(format!("http://{upstream}").parse().unwrap());
        config.drain_timeout = Duration::from_secs(5);
        tweak(&mut config);
        let captured = Arc::new(Captured::default());
        let running = start(config, captured.clone()).await.expect("sidecar starts");
        Sidecar { running, captured }
    }

    pub fn addr(&self) -> SocketAddr {
        self.running.listen_addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.running.listen_addr)
    }

    pub async fn raw_client(&self) -> RawClient {
        RawClient::connect(self.addr()).await
    }
}

/// A gRPC client that sends and receives messages as raw bytes, to any path.
#[derive(Clone)]
pub struct RawClient {
    pub grpc: tonic::client::Grpc<Channel>,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.expect("connect");
        let grpc = tonic::client::Grpc::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        RawClient { grpc }
    }

    /// A client that connects at its first call: for an address that may refuse, where
    /// the call's status is what a test looks at.
    pub fn connect_lazy(addr: SocketAddr) -> RawClient {
        let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
        RawClient { grpc: tonic::client::Grpc::new(channel) }
    }

    pub async fn unary(&mut self, method: &str, body: Bytes) -> Result<tonic::Response<Bytes>, tonic::Status> {
        self.unary_with(method, tonic::Request::new(body)).await
    }

    pub async fn unary_with(
        &mut self,
        method: &str,
        request: tonic::Request<Bytes>,
    ) -> Result<tonic::Response<Bytes>, tonic::Status> {
        self.grpc.ready().await.expect("channel ready");
        self.grpc.unary(request, path(method), RawCodec).await
    }
}

/// A client of the standard gRPC health service (what load balancers and probes use).
pub async fn health_client(addr: SocketAddr) -> tonic_health::pb::health_client::HealthClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.expect("connect");
    tonic_health::pb::health_client::HealthClient::new(channel)
}

pub fn path(method: &str) -> http::uri::PathAndQuery {
    format!("{SERVICE}{method}").parse().unwrap()
}

/// Passes message bytes through unchanged.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// Encodes a Milvus message (from milvus-sdk-rust, on prost 0.13).
pub fn encode(msg: &impl prost013::Message) -> Bytes {
    Bytes::from(msg.encode_to_vec())
}

/// Frames a message the way gRPC puts it on the wire (uncompressed).
pub fn framed(msg: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(msg.len() + 5);
    out.push(0);
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(msg);
    Bytes::from(out)
}

/// A loopback address nothing listens on (yet).
pub fn unused_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// A bare HTTP/2 connection to `addr`, driven in the background: for requests a gRPC
/// library would not send.
pub async fn h2_connect<B>(addr: SocketAddr) -> Result<hyper::client::conn::http2::SendRequest<B>, hyper::Error>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await?;
    tokio::spawn(conn);
    Ok(send)
}

/// One unary call over a bare HTTP/2 connection, for what a gRPC library would not let a
/// test do (a `grpc-timeout` the client itself does not enforce). Returns the reply's
/// header block merged with its trailers.
pub async fn bare_call(
    addr: SocketAddr,
    method: &str,
    extra: &[(&'static str, &'static str)],
    body: Bytes,
) -> http::HeaderMap {
    use http_body_util::BodyExt;
    let mut send = h2_connect(addr).await.unwrap();
    let mut request = http::Request::post(format!("http://{addr}{SERVICE}{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    let reply = send.send_request(request.body(http_body_util::Full::new(framed(&body))).unwrap()).await.unwrap();
    let (parts, body) = reply.into_parts();
    let mut headers = parts.headers;
    if let Some(trailers) = body.collect().await.unwrap().trailers() {
        headers.extend(trailers.clone());
    }
    headers
}

/// The Milvus `.proto` files shipped in the milvus-sdk-rust crate (found through
/// `cargo metadata`, wherever the registry keeps it).
pub fn milvus_proto_dir() -> std::path::PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
    let manifest = meta["packages"]
        .as_array()
        .and_then(|packages| packages.iter().find(|p| p["name"] == "milvus-sdk-rust"))
        .and_then(|p| p["manifest_path"].as_str())
        .expect("milvus-sdk-rust is a dev-dependency");
    std::path::Path::new(manifest).parent().unwrap().join("milvus-proto/proto")
}

/// Starts the proxy alone (no PostgreSQL), recording into `recorder`.
pub async fn start(config: Config, recorder: Arc<Captured>) -> std::io::Result<milvus_sidecar::Running> {
    let telemetry = Arc::new(milvus_sidecar::telemetry::Telemetry::new(&config.telemetry));
    milvus_sidecar::start(config, recorder, telemetry, Default::default(), None).await
}

/// A minimal HTTP/1.1 GET, enough for the admin endpoints.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let code = raw[9..12].parse().unwrap();
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (code, body)
}

/// The value of one sample in a Prometheus text scrape (`name{labels}` exactly as
/// exposed), 0 when the series does not exist yet.
pub fn sample(scrape: &str, series: &str) -> f64 {
    scrape.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0.0)
}

/// Waits (up to 5 s) for the sample `series` on the admin listener to reach `value`; returns it.
pub async fn at_least(admin: std::net::SocketAddr, series: &str, value: f64) -> f64 {
    sample_until(admin, series, |now| now >= value, &format!("waiting for {value}")).await
}

/// Waits (up to 5 s) for the sample `series` on the admin listener to fall to `value`.
pub async fn at_most(admin: std::net::SocketAddr, series: &str, value: f64) {
    sample_until(admin, series, |now| now <= value, &format!("waiting for it to fall to {value}")).await;
}

async fn sample_until(admin: std::net::SocketAddr, series: &str, done: impl Fn(f64) -> bool, what: &str) -> f64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let now = sample(&http_get(admin, "/metrics").await.1, series);
        if done(now) {
            return now;
        }
        assert!(std::time::Instant::now() < deadline, "{series} still {now} after 5 s, {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A sidecar in front of `upstream` that records into `database_url` (migrated at
/// start-up) and spills to `spill_dir`; otherwise as `Config::local` leaves it.
pub fn recording_config(upstream: SocketAddr, database_url: &str, spill_dir: &std::path::Path) -> Config {
    let mut config = Config::local(format!("http://{upstream}").parse().unwrap());
    config.database = milvus_sidecar::config::DatabaseArgs::from_url(database_url);
    config.recording.no_recording = false;
    config.recording.spill_dir = spill_dir.to_path_buf();
    config
}

/// A fresh directory under the system's temporary directory, removed on drop.
pub struct TempDir {
    pub path: std::path::PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("milvus-sidecar-{tag}-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&path).unwrap();
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

//! milvus-lite as a realistic upstream: started from the project's venv (`MILVUS_LITE_BIN`, as
//! the tests do) on a free port with its own data dir, then given a loaded collection the
//! bench's Search can hit (Int64 `id`, 768-dim FloatVector `embedding`, FLAT/COSINE index).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use milvus::proto::common::{KeyValuePair, Status};
use milvus::proto::milvus::{
    CreateCollectionRequest, CreateIndexRequest, FlushRequest, GetLoadStateRequest, GetLoadStateResponse,
    LoadCollectionRequest, MutationResult,
};
use milvus::proto::schema::{CollectionSchema, DataType, FieldSchema};
use prost013::Message;

const PREFIX: &str = "/milvus.proto.milvus.MilvusService/";
/// Rows the collection holds: enough for an index to matter, few enough to load in a second.
const ROWS: usize = 2_000;

pub struct MilvusLite {
    pub addr: SocketAddr,
    child: Child,
    dir: PathBuf,
}

impl MilvusLite {
    pub async fn start(bin: &Path) -> Result<MilvusLite> {
        let [addr, _] = crate::sidecar::free_local_addrs()?;
        let dir = std::env::temp_dir().join(format!("milvus-sidecar-bench-lite-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::File::create(dir.join("milvus-lite.log"))?;
        let child = Command::new(bin)
            .args(["server", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--host", "127.0.0.1", "--port", &addr.port().to_string()])
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let lite = MilvusLite { addr, child, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(lite.dir.join("milvus-lite.log")).unwrap_or_default();
                bail!("milvus-lite did not listen on {addr} within 60 s; its log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(lite)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Creates, fills, indexes and loads `collection`.
    pub async fn prepare(&self, collection: &str) -> Result<()> {
        let channel = crate::load::connect(self.addr, 1).await?.remove(0);
        let call = |method: &'static str, message: Vec<u8>| {
            let channel = channel.clone();
            async move {
                crate::load::unary(&channel, &format!("{PREFIX}{method}"), message)
                    .await
                    .map_err(|s| anyhow::anyhow!("{method}: {s}"))
            }
        };
        let field = |id: i64, name: &str, data_type: DataType, primary: bool, params: Vec<KeyValuePair>| FieldSchema {
            field_id: id,
            name: name.into(),
            is_primary_key: primary,
            data_type: data_type as i32,
            type_params: params,
            ..Default::default()
        };
        let schema = CollectionSchema {
            name: collection.into(),
            fields: vec![
                field(100, "id", DataType::Int64, true, Vec::new()),
                field(101, "embedding", DataType::FloatVector, false, vec![kv("dim", &crate::load::DIM.to_string())]),
            ],
            ..Default::default()
        };
        let create = CreateCollectionRequest {
            collection_name: collection.into(),
            schema: schema.encode_to_vec(),
            shards_num: 1,
            ..Default::default()
        };
        status(&call("CreateCollection", create.encode_to_vec()).await?, "CreateCollection")?;
        let insert = crate::load::insert(collection, ROWS * (crate::load::DIM * 4 + 8), 1);
        let inserted = MutationResult::decode(call("Insert", insert.payload.to_vec()).await?)?;
        status_of(inserted.status, "Insert")?;
        let flush = FlushRequest { collection_names: vec![collection.into()], ..Default::default() };
        call("Flush", flush.encode_to_vec()).await?;
        let index = CreateIndexRequest {
            collection_name: collection.into(),
            field_name: "embedding".into(),
            index_name: "embedding_idx".into(),
            extra_params: vec![kv("index_type", "FLAT"), kv("metric_type", "COSINE"), kv("params", "{}")],
            ..Default::default()
        };
        status(&call("CreateIndex", index.encode_to_vec()).await?, "CreateIndex")?;
        let load =
            LoadCollectionRequest { collection_name: collection.into(), replica_number: 1, ..Default::default() };
        status(&call("LoadCollection", load.encode_to_vec()).await?, "LoadCollection")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ask = GetLoadStateRequest { collection_name: collection.into(), ..Default::default() };
            let state = GetLoadStateResponse::decode(call("GetLoadState", ask.encode_to_vec()).await?)?;
            // common.LoadState: 3 = Loaded.
            if state.state == 3 {
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "milvus-lite did not load {collection} within 60 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn kv(key: &str, value: &str) -> KeyValuePair {
    KeyValuePair { key: key.into(), value: value.into() }
}

fn status(reply: &[u8], method: &str) -> Result<()> {
    status_of(Some(Status::decode(reply)?), method)
}

#[allow(deprecated)] // `error_code` is deprecated, yet older servers report failures only there
fn status_of(status: Option<Status>, method: &str) -> Result<()> {
    let status = status.unwrap_or_default();
    ensure!(status.code == 0 && status.error_code == 0, "{method} on milvus-lite: {}", status.reason);
    Ok(())
}

impl Drop for MilvusLite {
    fn drop(&mut self) {
        // SIGTERM lets it flush; it exits within a second or two.
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

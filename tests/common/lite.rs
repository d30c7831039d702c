//! A real Milvus-protocol server for tests: milvus-lite, started from the project's venv
//! (`MILVUS_LITE_BIN`, which `scripts/test.sh` sets) on a free port with its own data dir.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct MilvusLite {
    pub addr: SocketAddr,
    child: Child,
    dir: PathBuf,
}

impl MilvusLite {
    pub async fn start() -> MilvusLite {
        let bin = std::env::var("MILVUS_LITE_BIN").unwrap_or_else(|_| {
            panic!(
                "MILVUS_LITE_BIN is not set: run the tests with scripts/test.sh, or point it at .venv/bin/milvus-lite"
            )
        });
        let addr = super::unused_addr();
        let dir = std::env::temp_dir().join(format!("milvus-sidecar-test-{}-{}", std::process::id(), addr.port()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = std::fs::File::create(dir.join("milvus-lite.log")).unwrap();
        let child = Command::new(&bin)
            .args(["server", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--host", "127.0.0.1", "--port", &addr.port().to_string()])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        let lite = MilvusLite { addr, child, dir };
        lite.wait_until_listening(Duration::from_secs(60)).await;
        lite
    }

    async fn wait_until_listening(&self, within: Duration) {
        let start = Instant::now();
        while tokio::net::TcpStream::connect(self.addr).await.is_err() {
            if start.elapsed() > within {
                let log = std::fs::read_to_string(self.dir.join("milvus-lite.log")).unwrap_or_default();
                panic!("milvus-lite did not listen on {} within {within:?}; its log:\n{log}", self.addr);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for MilvusLite {
    fn drop(&mut self) {
        // SIGTERM lets it flush; it exits within a second or two.
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_dir_all(&self.dir);
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

//! nginx as the plain gRPC pass-through a user would otherwise put in front of Milvus: Debian's
//! package, started by the bench as a child process with a config file of its own (in a temp
//! directory that also holds its pid file, error log and temp paths), run as the current user.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::procstat;

pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
    dir: PathBuf,
    workers: Vec<u32>,
}

/// `BENCH_NGINX_BIN`, else `nginx` on PATH or in /usr/sbin (where Debian puts it).
pub fn find_binary() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("BENCH_NGINX_BIN") {
        return Some(PathBuf::from(bin));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|bin| bin.is_file())
}

impl Nginx {
    /// Starts nginx with `workers` worker processes (`auto`, or a number) in front of `upstream`.
    pub fn start(bin: &Path, upstream: SocketAddr, workers: &str) -> Result<Self> {
        let [addr, _] = crate::sidecar::free_local_addrs()?;
        // One directory per instance (the bench may run one per upstream).
        let dir =
            std::env::temp_dir().join(format!("milvus-sidecar-bench-nginx-{}-{}", std::process::id(), addr.port()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let conf = dir.join("nginx.conf");
        fs::write(&conf, config(&dir, addr, upstream, workers))
            .with_context(|| format!("writing {}", conf.display()))?;
        let error_log = dir.join("error.log");
        let child = Command::new(bin)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(&error_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("stderr.log"))?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut nginx = Nginx { child, addr, dir, workers: Vec::new() };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = nginx.child.try_wait()? {
                bail!("nginx exited ({status}) at start-up; {}", nginx.logs());
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                nginx.workers = procstat::children(nginx.child.id());
                if !nginx.workers.is_empty() {
                    return Ok(nginx);
                }
            }
            if Instant::now() >= deadline {
                bail!("nginx did not listen on {addr} within 10 s; {}", nginx.logs());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The master and its workers: their CPU time and memory are nginx's.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.child.id()];
        pids.extend(&self.workers);
        pids
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("nginx.conf")
    }

    fn logs(&self) -> String {
        let read = |name: &str| fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!("stderr:\n{}\nerror.log:\n{}", read("stderr.log"), read("error.log"))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM to the master stops the workers too (SIGKILL would orphan them).
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for worker in &self.workers {
            if Path::new(&format!("/proc/{worker}")).exists() {
                let _ = Command::new("kill").arg("-KILL").arg(worker.to_string()).status();
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The configuration a user would write for a plain gRPC pass-through: HTTP/2 listener,
/// `grpc_pass` to an upstream block with `keepalive`, no access log, no body size limit (gRPC
/// messages are bounded by the servers, not by nginx's 1 MiB default). Client and upstream
/// connections are kept open for many requests: nginx 1.22 closes them after 1000 by default,
/// which would make the load reconnect every 1000 calls.
fn config(dir: &Path, listen: SocketAddr, upstream: SocketAddr, workers: &str) -> String {
    let dir = dir.display();
    // A root master would switch its workers to `nobody`; keep them as the current user.
    let user = if running_as_root() { "user root;" } else { "" };
    format!(
        "# Generated by benches/passthrough.rs.
daemon off;
master_process on;
worker_processes {workers};
{user}
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_max_body_size 0;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    upstream milvus {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen {listen} http2;
        location / {{
            grpc_pass grpc://milvus;
        }}
    }}
}}
"
    )
}

fn running_as_root() -> bool {
    // The effective uid is the second number of the `Uid:` line.
    fs::read_to_string("/proc/self/status").ok().and_then(|status| {
        status.lines().find_map(|line| {
            line.strip_prefix("Uid:").and_then(|ids| ids.split_whitespace().nth(1)?.parse::<u32>().ok())
        })
    }) == Some(0)
}

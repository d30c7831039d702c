//! The sidecar under test: built, started as a child process, watched through /proc, and killed
//! when the bench ends, including when it ends by a panic.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

const BIN: &str = "milvus-sidecar";
/// How much of the sidecar's output an error message shows.
const LOG_TAIL_LINES: usize = 40;

/// A running sidecar. Dropping it kills the process.
pub struct Sidecar {
    child: Child,
    /// Where clients connect (its `--listen`).
    pub addr: SocketAddr,
    admin: SocketAddr,
    log_path: PathBuf,
}

impl Sidecar {
    /// Starts `bin serve` in front of `upstream` and waits until its admin `/healthz` says 200.
    /// `name` tells this sidecar's log file apart from the others'.
    pub fn start(
        bin: &Path,
        name: &str,
        upstream: SocketAddr,
        extra_args: &[String],
        startup_timeout: Duration,
    ) -> Result<Self> {
        ensure!(bin.is_file(), "no {BIN} binary at {}", bin.display());
        let [addr, admin] = free_local_addrs()?;
        // Output goes to a file, not a pipe: a pipe nobody drains would block a chatty sidecar.
        let log_path = bin.with_file_name(format!("passthrough-{name}.log"));
        let log = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let child = Command::new(bin)
            .arg("serve")
            .args(["--listen", &addr.to_string()])
            .args(["--upstream", &format!("http://{upstream}")])
            .args(["--admin-listen", &admin.to_string()])
            .args(extra_args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut sidecar = Sidecar { child, addr, admin, log_path };
        sidecar.wait_healthy(startup_timeout)?;
        Ok(sidecar)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("{BIN} exited ({status}) before becoming healthy; its output:\n{}", self.log_tail());
            }
            let last = match http_status(self.admin, "/healthz") {
                Ok(200) => return Ok(()),
                Ok(code) => format!("HTTP {code}"),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                bail!(
                    "{BIN} did not answer 200 on http://{}/healthz within {timeout:?} (last: {last}); \
                     its output:\n{}",
                    self.admin,
                    self.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The end of the sidecar's output, for error messages.
    pub fn log_tail(&self) -> String {
        let text = fs::read(&self.log_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log_path.display()));
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
        if tail.is_empty() {
            format!("(nothing in {})", self.log_path.display())
        } else {
            format!("{tail}\n(full output: {})", self.log_path.display())
        }
    }

    /// The lines the sidecar logged at ERROR level (e.g. dropped records): a run whose figures
    /// look fine can still have cost something the table does not show.
    pub fn logged_errors(&self) -> Vec<String> {
        let text = fs::read(&self.log_path).map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
        text.unwrap_or_default().lines().filter(|line| line.contains(" ERROR ")).map(String::from).collect()
    }

    /// The sidecar's output from byte `from` on (see `log_len`).
    pub fn log_since(&self, from: u64) -> String {
        let bytes = fs::read(&self.log_path).unwrap_or_default();
        String::from_utf8_lossy(bytes.get(from as usize..).unwrap_or_default()).into_owned()
    }

    pub fn log_len(&self) -> u64 {
        fs::metadata(&self.log_path).map_or(0, |m| m.len())
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two distinct free loopback ports. Both listeners are held until both ports are known, so the
/// kernel cannot hand out the same port twice; the sidecar binds them right after.
pub fn free_local_addrs() -> Result<[SocketAddr; 2]> {
    let a = TcpListener::bind("127.0.0.1:0")?;
    let b = TcpListener::bind("127.0.0.1:0")?;
    Ok([a.local_addr()?, b.local_addr()?])
}

/// The status code of `GET path`, over plain HTTP/1.1 with short timeouts: enough for a health
/// check without an HTTP client.
fn http_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let timeout = Duration::from_secs(1);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    // "HTTP/1.1 200 OK"
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP reply: {line:?}")))
}

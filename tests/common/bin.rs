//! The built `milvus-sidecar` binary run as its own process, for what only the real
//! process shows: its stderr log from start to exit, signals, its exit status.

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_milvus-sidecar");

/// A running `milvus-sidecar serve`, its stderr collected as it is written.
pub struct Process {
    child: Child,
    log: Arc<Mutex<String>>,
    /// Reads stderr until the process closes it (at exit).
    reader: Option<std::thread::JoinHandle<()>>,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
}

impl Process {
    /// Runs `milvus-sidecar serve ARGS` on free loopback ports with only `env` set (the
    /// test's own environment could hold MILVUS_SIDECAR_* or DATABASE_URL and change what
    /// runs), and waits (up to 60 s) until it says it is serving.
    pub async fn serve(args: &[&str], env: &[(&str, &str)]) -> Process {
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(args)
            .env_clear()
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the milvus-sidecar binary runs");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = log.lock().unwrap().clone();
            if let Some(line) = text.lines().find(|l| l.contains("milvus-sidecar serving")) {
                let listen = field(line, "listen");
                let admin = field(line, "admin");
                return Process { child, log, reader: Some(reader), listen, admin };
            }
            if let Some(status) = child.try_wait().unwrap() {
                let _ = reader.join();
                panic!("milvus-sidecar exited ({status}) before serving:\n{}", log.lock().unwrap());
            }
            assert!(Instant::now() < deadline, "milvus-sidecar not serving within 60 s:\n{text}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Everything written to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Sends `signal` (libc::SIGTERM, say) to the process.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) only sends a signal; the pid is our own child, not yet reaped.
        let sent = unsafe { libc::kill(pid, signal) };
        assert_eq!(sent, 0, "kill({pid}, {signal}): {}", std::io::Error::last_os_error());
    }

    /// Its resident set now (VmRSS), in MiB.
    pub fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in /proc/PID/status:\n{status}"));
        kib / 1024.0
    }

    /// Waits up to `within` for the process to exit; None if it is still running then.
    pub async fn exited_within(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then the exit status (within 30 s) and the whole log, once the reader has
    /// seen the end of stderr.
    pub async fn stop(mut self) -> (ExitStatus, String) {
        self.signal(libc::SIGTERM);
        let status = self.exited_within(Duration::from_secs(30)).await;
        let status = status.unwrap_or_else(|| panic!("no exit within 30 s of SIGTERM:\n{}", self.log()));
        (status, self.full_log())
    }

    /// The whole log, once the process has exited (else it waits for the exit).
    pub fn full_log(&mut self) -> String {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.log()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `name=value` in a text-format log line, as an address.
fn field(line: &str, name: &str) -> SocketAddr {
    let prefix = format!("{name}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(prefix.as_str()))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name}=ADDRESS in {line:?}"))
}

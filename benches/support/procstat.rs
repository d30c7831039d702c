//! CPU time and memory of the proxy processes under test, read from /proc: a sidecar is one
//! process, nginx a master and its workers (their figures are summed).

use std::fs;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result};

/// A reading of a group of processes.
#[derive(Clone, Copy, Default)]
pub struct Usage {
    /// User plus system CPU time, in seconds.
    pub cpu_secs: f64,
    pub rss_kib: u64,
    /// Peak RSS since start, or since the last `reset_peak`.
    pub peak_kib: u64,
}

/// Sums the usage of `pids`.
pub fn usage(pids: &[u32]) -> Result<Usage> {
    let mut total = Usage::default();
    for &pid in pids {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("reading /proc/{pid}/stat: has the process died?"))?;
        let fields = stat_fields(&stat);
        // utime and stime (fields 14 and 15 of the whole line) are the 12th and 13th after the
        // command name's closing parenthesis, counting the state as the 1st.
        let ticks = |i: usize| -> Result<u64> { Ok(fields.get(i).context("short /proc/PID/stat")?.parse()?) };
        total.cpu_secs += (ticks(11)? + ticks(12)?) as f64 / clock_ticks_per_sec();
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        total.rss_kib += status_kib(&status, "VmRSS:")?;
        total.peak_kib += status_kib(&status, "VmHWM:")?;
    }
    Ok(total)
}

/// CPU seconds of each of `pids` that is alive (those that are not are left out).
pub fn cpu_by_pid(pids: &[u32]) -> Vec<(u32, f64)> {
    pids.iter().filter_map(|&pid| Some((pid, usage(&[pid]).ok()?.cpu_secs))).collect()
}

/// CPU seconds spent between two `cpu_by_pid` readings by the processes alive at both.
pub fn cpu_between(before: &[(u32, f64)], after: &[(u32, f64)]) -> f64 {
    after.iter().filter_map(|(pid, end)| before.iter().find(|(p, _)| p == pid).map(|(_, start)| end - start)).sum()
}

/// Resets the kernel's peak-RSS mark (VmHWM) of each process, so that the next `usage` reports
/// the peak since now. Best effort: returns false where the kernel refused, and the peak is then
/// the process's lifetime peak.
pub fn reset_peak(pids: &[u32]) -> bool {
    pids.iter().all(|pid| fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok())
}

/// The processes whose parent is `parent` (nginx's workers).
pub fn children(parent: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| stat_fields(&stat).get(1).and_then(|ppid| ppid.parse::<u32>().ok()))
                == Some(parent)
        })
        .collect()
}

/// The fields after the command name, which may itself contain spaces and parentheses.
fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default()
}

fn status_kib(status: &str, key: &str) -> Result<u64> {
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .with_context(|| format!("no {key} in /proc/PID/status"))?;
    Ok(line.trim().trim_end_matches("kB").trim().parse()?)
}

/// USER_HZ, the unit of /proc/PID/stat CPU times; 100 on every Linux this runs on, but asked for
/// rather than assumed since no libc binding is at hand.
fn clock_ticks_per_sec() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

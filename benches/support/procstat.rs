//! CPU time and memory of the proxy processes under test, read from /proc: a sidecar is one
//! process, nginx a master and its workers (their figures are summed). Also where the rest of
//! the machine's CPU went: the bench's own threads, and time no process used.

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
        total.cpu_secs += cpu_secs(&stat)?;
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        total.rss_kib += status_kib(&status, "VmRSS:")?;
        total.peak_kib += status_kib(&status, "VmHWM:")?;
    }
    Ok(total)
}

/// User plus system CPU seconds of a `/proc/PID/stat` (or `/proc/PID/task/TID/stat`) line.
fn cpu_secs(stat: &str) -> Result<f64> {
    let fields = stat_fields(stat);
    // utime and stime (fields 14 and 15 of the whole line) are the 12th and 13th after the
    // command name's closing parenthesis, counting the state as the 1st.
    let ticks = |i: usize| -> Result<u64> { Ok(fields.get(i).context("short /proc/PID/stat")?.parse()?) };
    Ok((ticks(11)? + ticks(12)?) as f64 / clock_ticks_per_sec())
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

/// CPU seconds of this process's threads: (those named `name`, all the others).
fn own_threads_cpu(name: &str) -> (f64, f64) {
    let Ok(tasks) = fs::read_dir("/proc/self/task") else { return (0.0, 0.0) };
    let mut split = (0.0, 0.0);
    for task in tasks.filter_map(|entry| entry.ok()) {
        let path = task.path();
        let Some(secs) = fs::read_to_string(path.join("stat")).ok().and_then(|stat| cpu_secs(&stat).ok()) else {
            continue;
        };
        let comm = fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            split.0 += secs;
        } else {
            split.1 += secs;
        }
    }
    split
}

/// Seconds, summed over the machine's CPUs since boot, that no process ran (idle and waiting
/// for I/O) and that the hypervisor took for others (steal).
#[derive(Clone, Copy, Default)]
struct Machine {
    idle_secs: f64,
    steal_secs: f64,
}

fn machine() -> Result<Machine> {
    let stat = fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    // "cpu  user nice system idle iowait irq softirq steal ..."
    let fields: Vec<u64> = line.split_whitespace().skip(1).map(str::parse).collect::<Result<_, _>>()?;
    let field = |i: usize| fields.get(i).copied().context("short cpu line in /proc/stat");
    Ok(Machine {
        idle_secs: (field(3)? + field(4)?) as f64 / clock_ticks_per_sec(),
        steal_secs: field(7)? as f64 / clock_ticks_per_sec(),
    })
}

/// Where the upstream runs, for its CPU time.
#[derive(Clone, Copy)]
pub enum Upstream {
    /// The fake, a thread of this process.
    Fake,
    /// A process of its own (milvus-lite) and its children.
    Process(u32),
}

/// A reading of where the CPU went besides the proxy and PostgreSQL.
pub struct Others {
    upstream_secs: f64,
    load_secs: f64,
    machine: Machine,
}

/// Per call of a window: the bench's load generator (its runtime, and the few queries it makes
/// to count rows), the upstream, and CPU time nobody used or the hypervisor took.
/// With the proxy's and PostgreSQL's figures this is the whole of the machine's CPU.
#[derive(Clone, Copy, Default)]
pub struct OthersPerCall {
    pub load_us: f64,
    pub upstream_us: f64,
    pub idle_us: f64,
    pub steal_us: f64,
}

impl Others {
    pub fn read(upstream: Upstream) -> Result<Others> {
        let (fake_secs, load_secs) = own_threads_cpu(crate::fake_milvus::THREAD);
        let upstream_secs = match upstream {
            Upstream::Fake => fake_secs,
            Upstream::Process(pid) => {
                let mut pids = children(pid);
                pids.push(pid);
                cpu_by_pid(&pids).iter().map(|(_, secs)| secs).sum()
            }
        };
        Ok(Others { upstream_secs, load_secs, machine: machine()? })
    }

    pub fn since(&self, before: &Others, calls: u64) -> OthersPerCall {
        let per_call = |secs: f64| secs * 1e6 / calls.max(1) as f64;
        OthersPerCall {
            load_us: per_call(self.load_secs - before.load_secs),
            upstream_us: per_call(self.upstream_secs - before.upstream_secs),
            idle_us: per_call(self.machine.idle_secs - before.machine.idle_secs),
            steal_us: per_call(self.machine.steal_secs - before.machine.steal_secs),
        }
    }
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

/// How the kernel schedules PostgreSQL's `backends` beside the calls, for the report: whether
/// they sit in a CPU cgroup marked idle (`cpu.idle`, which `scripts/bench.sh --isolate-postgres`
/// sets up), where a woken call preempts their bursts at once.
pub fn scheduling(backends: &[u32]) -> String {
    let cpu = CpuCgroups::find();
    let idle = backends.iter().filter(|&&pid| cpu.as_ref().is_some_and(|cpu| cpu.idle(pid))).count();
    let how = match idle {
        0 => "normal CPU priority".to_string(),
        n if n == backends.len() => "idle CPU priority (a cgroup with cpu.idle 1)".to_string(),
        n => format!("idle CPU priority for {n} of them (a cgroup with cpu.idle 1)"),
    };
    format!("{} PostgreSQL backend(s) at {how}", backends.len())
}

/// The cgroup hierarchy with the cpu controller: cgroup v1's `cpu` mount, else v2's.
struct CpuCgroups {
    root: String,
    v2: bool,
}

impl CpuCgroups {
    fn find() -> Option<CpuCgroups> {
        let mounts = fs::read_to_string("/proc/mounts").ok()?;
        // Lines are `source mountpoint type options ...`.
        let mounted = |v2: bool| {
            mounts.lines().find_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let fits = if v2 {
                    f.get(2) == Some(&"cgroup2")
                } else {
                    f.get(2) == Some(&"cgroup") && f.get(3).is_some_and(|o| o.split(',').any(|o| o == "cpu"))
                };
                fits.then(|| CpuCgroups { root: f[1].to_string(), v2 })
            })
        };
        mounted(false).or_else(|| mounted(true))
    }

    /// Whether `pid`'s cgroup in this hierarchy has `cpu.idle` set.
    fn idle(&self, pid: u32) -> bool {
        let Ok(cgroups) = fs::read_to_string(format!("/proc/{pid}/cgroup")) else { return false };
        // Lines are `id:controllers:path`; v2's has no controllers.
        let path = cgroups.lines().find_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let fits = if self.v2 { controllers.is_empty() } else { controllers.split(',').any(|c| c == "cpu") };
            fits.then_some(path)
        });
        path.and_then(|path| fs::read_to_string(format!("{}{path}/cpu.idle", self.root)).ok())
            .is_some_and(|v| v.trim() == "1")
    }
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

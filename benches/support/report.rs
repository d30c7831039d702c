//! Figures of one run, the side-by-side table of the targets (medians over rounds with their
//! min–max spread, since one run on a shared 2-core machine is not a result), and the issue's
//! targets with PASS/FAIL.

use std::fmt::Write as _;

use crate::load::Stats;
use crate::procstat::{OthersPerCall, Usage};

/// The ways the load can go.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Target {
    /// Load generator → upstream.
    Direct,
    /// Through the sidecar: authentication, permission check and recording on.
    Sidecar,
    /// As `Sidecar`, with `--busy-poll`: the call thread polls before it sleeps.
    SidecarBusy,
    /// Through the sidecar with `--no-recording --no-auth`: forwarding alone.
    SidecarNoRec,
    /// Through nginx's `grpc_pass`.
    Nginx,
}

impl Target {
    pub const ALL: [Target; 5] =
        [Target::Direct, Target::Sidecar, Target::SidecarBusy, Target::SidecarNoRec, Target::Nginx];

    pub fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Sidecar => "sidecar",
            Target::SidecarBusy => "sidecar-busy",
            Target::SidecarNoRec => "sidecar-norec",
            Target::Nginx => "nginx",
        }
    }

    pub fn parse(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// What one run against one target measured.
pub struct RunResult {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub rps: f64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Only for runs through a proxy.
    pub cost: Option<ProxyCost>,
    /// Where the rest of the machine's CPU went, per call.
    pub others: Option<OthersPerCall>,
}

pub struct ProxyCost {
    pub cpu_us_per_req: f64,
    pub rss_mib: f64,
    pub peak_mib: f64,
    /// The sidecar's recording, when it is on.
    pub recording: Option<RecordingFigures>,
}

#[derive(Clone, Copy, Default)]
pub struct RecordingFigures {
    /// Rows the log tables grew by per second over the measured window.
    pub rows_per_sec: f64,
    /// Calls answered OK (warm-up included) whose `performance_metrics` row never arrived.
    pub lost: i64,
    /// Lines the sidecar logged about spilling to disk or dropping records during the run.
    pub spill_or_drop_lines: usize,
    /// CPU time of the PostgreSQL backends serving the sidecar's database (its pool and
    /// LISTEN connections, and the bench's counting queries) per measured call.
    pub postgres_cpu_us_per_req: f64,
}

impl RunResult {
    /// `usage` is the proxy's reading at the start and at the end of the measured window.
    pub fn new(stats: &Stats, measured_secs: f64, usage: Option<(Usage, Usage)>) -> Self {
        let requests = stats.latency_us.len();
        let cost = usage.map(|(before, after)| ProxyCost {
            cpu_us_per_req: (after.cpu_secs - before.cpu_secs) * 1e6 / requests.max(1) as f64,
            rss_mib: after.rss_kib as f64 / 1024.0,
            peak_mib: after.peak_kib as f64 / 1024.0,
            recording: None,
        });
        RunResult {
            p50_us: stats.latency_us.value_at_quantile(0.50) as f64,
            p99_us: stats.latency_us.value_at_quantile(0.99) as f64,
            p999_us: stats.latency_us.value_at_quantile(0.999) as f64,
            rps: requests as f64 / measured_secs,
            errors: stats.errors,
            first_error: stats.first_error.clone(),
            cost,
            others: None,
        }
    }

    /// One progress line, printed as each run ends.
    pub fn summary(&self) -> String {
        let mut line = format!(
            "p50 {:.0} µs  p99 {:.0} µs  p99.9 {:.0} µs  {:.0} req/s",
            self.p50_us, self.p99_us, self.p999_us, self.rps
        );
        if let Some(cost) = &self.cost {
            line += &format!(
                "  CPU {:.1} µs/req  RSS {:.1} MiB (peak {:.1})",
                cost.cpu_us_per_req, cost.rss_mib, cost.peak_mib
            );
            if let Some(r) = cost.recording {
                line += &format!(
                    "  writer {:.0} rows/s, PostgreSQL CPU {:.1} µs/req, lost {}, spill/drop log lines {}",
                    r.rows_per_sec, r.postgres_cpu_us_per_req, r.lost, r.spill_or_drop_lines
                );
            }
        }
        if let Some(o) = &self.others {
            line += &format!(
                "  others µs/req: load {:.1}, upstream {:.1}, idle {:.1}, steal {:.1}",
                o.load_us, o.upstream_us, o.idle_us, o.steal_us
            );
        }
        if self.errors > 0 {
            line += &format!("  {} ERRORS", self.errors);
        }
        line
    }
}

/// All rounds of one scenario, per target (in `targets` order).
pub struct ScenarioResult {
    pub name: String,
    pub key: String,
    pub targets: Vec<Target>,
    pub runs: Vec<Vec<RunResult>>,
}

impl ScenarioResult {
    pub fn errors(&self) -> u64 {
        self.runs.iter().flatten().map(|run| run.errors).sum()
    }

    pub fn runs_of(&self, target: Target) -> Option<&[RunResult]> {
        self.targets.iter().position(|&t| t == target).map(|i| self.runs[i].as_slice())
    }

    /// Median over rounds of a figure of `target`.
    pub fn median(&self, target: Target, figure: impl Fn(&RunResult) -> Option<f64>) -> Option<f64> {
        let values: Vec<f64> = self.runs_of(target)?.iter().filter_map(figure).collect();
        (!values.is_empty()).then(|| Spread::of(values).median)
    }

    /// Latency added over direct: rounds are paired (each round runs every target back to
    /// back), so this is the median of the per-round differences.
    pub fn added(&self, target: Target, figure: impl Fn(&RunResult) -> f64) -> Option<Spread> {
        let direct = self.runs_of(Target::Direct)?;
        let other = self.runs_of(target)?;
        let diffs: Vec<f64> = direct.iter().zip(other).map(|(d, o)| figure(o) - figure(d)).collect();
        (!diffs.is_empty()).then(|| Spread::of(diffs))
    }

    /// The scenario's block of the final table: one column per target.
    pub fn table(&self) -> String {
        let mut out = format!("\n{}\n", self.name);
        let _ = write!(out, "  {:<22}", "");
        for target in &self.targets {
            let _ = write!(out, "{:>CELL$}", target.name());
        }
        out.push('\n');
        let mut row = |label: &str, cell: &dyn Fn(Target, &[RunResult]) -> String| {
            let cells: Vec<String> = self.targets.iter().zip(&self.runs).map(|(&t, runs)| cell(t, runs)).collect();
            if cells.iter().all(|c| c == "—") {
                return;
            }
            let _ = write!(out, "  {label:<22}");
            for c in cells {
                let _ = write!(out, "{c:>CELL$}");
            }
            out.push('\n');
        };
        let plain = |figure: fn(&RunResult) -> f64, decimals: usize| {
            move |_: Target, runs: &[RunResult]| Spread::of(runs.iter().map(figure)).cell(decimals)
        };
        row("req/s", &plain(|r| r.rps, 0));
        row("p50 µs", &plain(|r| r.p50_us, 0));
        row("p99 µs", &plain(|r| r.p99_us, 0));
        row("p99.9 µs", &plain(|r| r.p999_us, 0));
        let added = |figure: fn(&RunResult) -> f64| {
            move |t: Target, _: &[RunResult]| match t {
                Target::Direct => "—".to_owned(),
                _ => self.added(t, figure).map_or_else(|| "—".to_owned(), |s| s.signed_cell()),
            }
        };
        row("added p50 µs", &added(|r| r.p50_us));
        row("added p99 µs", &added(|r| r.p99_us));
        let cost = |figure: fn(&ProxyCost) -> Option<f64>, decimals: usize| {
            move |_: Target, runs: &[RunResult]| {
                let values: Vec<f64> = runs.iter().filter_map(|r| r.cost.as_ref().and_then(figure)).collect();
                if values.is_empty() { "—".to_owned() } else { Spread::of(values).cell(decimals) }
            }
        };
        row("CPU µs/req", &cost(|c| Some(c.cpu_us_per_req), 1));
        row("RSS MiB at end", &cost(|c| Some(c.rss_mib), 1));
        row("peak RSS MiB", &cost(|c| Some(c.peak_mib), 1));
        row("writer rows/s", &cost(|c| c.recording.map(|r| r.rows_per_sec), 0));
        row("PostgreSQL CPU µs/req", &cost(|c| c.recording.map(|r| r.postgres_cpu_us_per_req), 1));
        let others = |figure: fn(&OthersPerCall) -> f64| {
            move |_: Target, runs: &[RunResult]| {
                let values: Vec<f64> = runs.iter().filter_map(|r| r.others.as_ref().map(figure)).collect();
                if values.is_empty() { "—".to_owned() } else { Spread::of(values).cell(1) }
            }
        };
        row("load gen CPU µs/req", &others(|o| o.load_us));
        row("upstream CPU µs/req", &others(|o| o.upstream_us));
        row("idle CPU µs/req", &others(|o| o.idle_us));
        row("steal CPU µs/req", &others(|o| o.steal_us));
        row("rows lost (sum)", &|_, runs: &[RunResult]| {
            let recs: Vec<RecordingFigures> = runs.iter().filter_map(|r| r.cost.as_ref()?.recording).collect();
            if recs.is_empty() { "—".to_owned() } else { recs.iter().map(|r| r.lost).sum::<i64>().to_string() }
        });
        row("spill/drop log lines", &|_, runs: &[RunResult]| {
            let recs: Vec<RecordingFigures> = runs.iter().filter_map(|r| r.cost.as_ref()?.recording).collect();
            if recs.is_empty() {
                "—".to_owned()
            } else {
                recs.iter().map(|r| r.spill_or_drop_lines).sum::<usize>().to_string()
            }
        });
        row("errors", &|_, runs: &[RunResult]| {
            let errors: u64 = runs.iter().map(|r| r.errors).sum();
            if errors == 0 { "—".to_owned() } else { errors.to_string() }
        });
        if let Some(first) = self.runs.iter().flatten().find_map(|r| r.first_error.as_deref()) {
            let _ = writeln!(out, "  first error: {first}");
        }
        out
    }
}

/// Width of a table cell: "12345 (12000–13000)".
const CELL: usize = 24;

/// Median and range of a handful of values.
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: impl IntoIterator<Item = f64>) -> Self {
        let mut values: Vec<f64> = values.into_iter().collect();
        values.sort_by(f64::total_cmp);
        let n = values.len();
        if n == 0 {
            return Spread { median: f64::NAN, min: f64::NAN, max: f64::NAN };
        }
        let median = if n.is_multiple_of(2) { (values[n / 2 - 1] + values[n / 2]) / 2.0 } else { values[n / 2] };
        Spread { median, min: values[0], max: values[n - 1] }
    }

    fn cell(&self, decimals: usize) -> String {
        if self.min == self.max {
            format!("{:.decimals$}", self.median)
        } else {
            format!("{:.decimals$} ({:.decimals$}–{:.decimals$})", self.median, self.min, self.max)
        }
    }

    /// For differences, which may be negative: explicit signs and a range dash that is not a minus.
    fn signed_cell(&self) -> String {
        if self.min == self.max {
            format!("{:+.0}", self.median)
        } else {
            format!("{:+.0} ({:+.0}…{:+.0})", self.median, self.min, self.max)
        }
    }
}

/// One of the targets, judged.
pub struct Verdict {
    pub target: String,
    /// None: not measured in this session (a scenario or target left out, nginx missing).
    pub pass: Option<bool>,
    pub detail: String,
}

impl Verdict {
    pub fn line(&self) -> String {
        let mark = match self.pass {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "n/a ",
        };
        format!("{mark}  {:<58} {}", self.target, self.detail)
    }
}

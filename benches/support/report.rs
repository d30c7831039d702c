//! Figures of one run, and the table that compares the two targets: medians over rounds with
//! their min–max spread, since one run on a shared 2-core machine is not a result.

use crate::load::Stats;
use crate::sidecar::Usage;

/// What one run against one target measured.
pub struct RunResult {
    pub p50_us: f64,
    pub p99_us: f64,
    pub rps: f64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Only for runs through the sidecar.
    pub sidecar: Option<SidecarCost>,
}

pub struct SidecarCost {
    pub cpu_us_per_req: f64,
    pub rss_mib: f64,
    pub peak_mib: f64,
    /// Rows the writer put into PostgreSQL per second over the window (recording on).
    pub rows_per_sec: Option<f64>,
}

impl RunResult {
    /// `usage` is the sidecar's reading at the start and at the end of the measured window.
    pub fn new(stats: Stats, measured_secs: f64, usage: Option<(Usage, Usage)>) -> Self {
        let requests = stats.latency_us.len();
        let sidecar = usage.map(|(before, after)| SidecarCost {
            cpu_us_per_req: (after.cpu_secs - before.cpu_secs) * 1e6 / requests.max(1) as f64,
            rss_mib: after.rss_kib as f64 / 1024.0,
            peak_mib: after.peak_kib as f64 / 1024.0,
            rows_per_sec: None,
        });
        RunResult {
            p50_us: stats.latency_us.value_at_quantile(0.50) as f64,
            p99_us: stats.latency_us.value_at_quantile(0.99) as f64,
            rps: requests as f64 / measured_secs,
            errors: stats.errors,
            first_error: stats.first_error,
            sidecar,
        }
    }

    /// One progress line, printed as each run ends.
    pub fn summary(&self) -> String {
        let mut line = format!("p50 {:.0} µs  p99 {:.0} µs  {:.0} req/s", self.p50_us, self.p99_us, self.rps);
        if let Some(cost) = &self.sidecar {
            line += &format!(
                "  CPU {:.1} µs/req  RSS {:.1} MiB (peak {:.1})",
                cost.cpu_us_per_req, cost.rss_mib, cost.peak_mib
            );
            if let Some(rows) = cost.rows_per_sec {
                line += &format!("  writer {rows:.0} rows/s");
            }
        }
        if self.errors > 0 {
            line += &format!("  {} ERRORS", self.errors);
        }
        line
    }
}

/// All rounds at one concurrency level.
pub struct Scenario {
    pub concurrency: usize,
    pub direct: Vec<RunResult>,
    pub sidecar: Vec<RunResult>,
}

impl Scenario {
    pub fn errors(&self) -> u64 {
        self.direct.iter().chain(&self.sidecar).map(|run| run.errors).sum()
    }

    /// The scenario's block of the final table: medians, with (min–max) over rounds.
    pub fn table(&self) -> String {
        let label = format!("c={}", self.concurrency);
        let direct = Figures::of(&self.direct);
        let sidecar = Figures::of(&self.sidecar);
        let mut out = format!("{label:<7} direct   {}\n", direct.line());
        out += &format!("{:<7} sidecar  {}\n", "", sidecar.line());
        // Rounds are paired (each round runs both targets back to back), so the spread of the
        // added latency is the range of the per-round differences.
        let added = |figure: fn(&RunResult) -> f64| {
            Spread::of(self.direct.iter().zip(&self.sidecar).map(|(d, s)| figure(s) - figure(d)))
        };
        let (added_p50, added_p99) = (added(|r| r.p50_us), added(|r| r.p99_us));
        out += &format!(
            "{:<7} added    p50 {:>+6.0} µs {:<RANGE_WIDTH$} p99 {:>+6.0} µs {:<RANGE_WIDTH$} throughput x{:.2} of direct\n",
            "",
            sidecar.p50.median - direct.p50.median,
            added_p50.signed_range(),
            sidecar.p99.median - direct.p99.median,
            added_p99.signed_range(),
            sidecar.rps.median / direct.rps.median
        );
        let costs: Vec<&SidecarCost> = self.sidecar.iter().filter_map(|r| r.sidecar.as_ref()).collect();
        if !costs.is_empty() {
            let cpu = Spread::of(costs.iter().map(|c| c.cpu_us_per_req));
            let rss = Spread::of(costs.iter().map(|c| c.rss_mib));
            let peak = Spread::of(costs.iter().map(|c| c.peak_mib));
            out += &format!(
                "{:<7} sidecar  CPU {:.1} µs/req ({:.1}–{:.1})   RSS {:.1} MiB (peak {:.1} MiB)\n",
                "", cpu.median, cpu.min, cpu.max, rss.median, peak.max
            );
        }
        if self.errors() > 0 {
            let count = |runs: &[RunResult]| runs.iter().map(|r| r.errors).sum::<u64>();
            let first = self.direct.iter().chain(&self.sidecar).find_map(|r| r.first_error.as_deref()).unwrap_or("?");
            out += &format!(
                "{:<7} ERRORS   direct {}, sidecar {}; first: {first}\n",
                "",
                count(&self.direct),
                count(&self.sidecar)
            );
        }
        out
    }
}

/// Latency and throughput of one target over its rounds.
struct Figures {
    p50: Spread,
    p99: Spread,
    rps: Spread,
}

impl Figures {
    fn of(runs: &[RunResult]) -> Self {
        Figures {
            p50: Spread::of(runs.iter().map(|r| r.p50_us)),
            p99: Spread::of(runs.iter().map(|r| r.p99_us)),
            rps: Spread::of(runs.iter().map(|r| r.rps)),
        }
    }

    fn line(&self) -> String {
        format!(
            "p50 {:>6.0} µs {:<RANGE_WIDTH$} p99 {:>6.0} µs {:<RANGE_WIDTH$} {:>7.0} req/s {}",
            self.p50.median,
            self.p50.range(),
            self.p99.median,
            self.p99.range(),
            self.rps.median,
            self.rps.range()
        )
    }
}

/// Width the "(min–max)" cells are padded to, so that the table's columns line up.
const RANGE_WIDTH: usize = 15;

/// Median and range of a handful of values.
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(values: impl IntoIterator<Item = f64>) -> Self {
        let mut values: Vec<f64> = values.into_iter().collect();
        values.sort_by(f64::total_cmp);
        let n = values.len();
        if n == 0 {
            return Spread { median: f64::NAN, min: f64::NAN, max: f64::NAN };
        }
        let median = if n.is_multiple_of(2) { (values[n / 2 - 1] + values[n / 2]) / 2.0 } else { values[n / 2] };
        Spread { median, min: values[0], max: values[n - 1] }
    }

    fn range(&self) -> String {
        format!("({:.0}–{:.0})", self.min, self.max)
    }

    /// For differences, which may be negative: explicit signs and a dash that is not a minus.
    fn signed_range(&self) -> String {
        format!("({:+.0}…{:+.0})", self.min, self.max)
    }
}

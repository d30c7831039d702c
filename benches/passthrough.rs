//! What the sidecar costs on a unary Milvus `Search`: the same pymilvus-shaped load is sent to a
//! fast fake Milvus directly and through `milvus-sidecar`, alternating the two round by round, and
//! the medians are compared. Run it with `cargo bench --bench passthrough`.
//!
//! Settings (environment):
//! - `BENCH_SECS` (5): measured seconds per run; `BENCH_WARMUP_SECS` (1): warm-up before each.
//! - `BENCH_ROUNDS` (3): runs per target and concurrency level.
//! - `BENCH_CONCURRENCY` (`1,32`): concurrency levels, each a number of closed-loop tasks.
//! - `BENCH_CONNECTIONS` (1): HTTP/2 connections the tasks are spread over.
//! - `BENCH_SIDECAR_BIN`: use this binary instead of the `milvus-sidecar` cargo built for the bench.
//! - `BENCH_SIDECAR_ARGS`: extra arguments for `milvus-sidecar serve`, split on whitespace.
//! - `BENCH_STARTUP_SECS` (30): how long the sidecar may take to become healthy.
//!
//! The sidecar gets the environment of the bench plus `RUST_LOG=warn`. With `DATABASE_URL` set it
//! authenticates (pymilvus's `root:Milvus`: the admin a fresh database starts with), authorizes and
//! records every call there, as in production; without, it runs with `--no-recording --no-auth`.

#[path = "support/fake_milvus.rs"]
mod fake_milvus;
#[path = "support/load.rs"]
mod load;
#[path = "support/report.rs"]
mod report;
#[path = "support/sidecar.rs"]
mod sidecar;

use std::env;
use std::fmt::Display;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use tokio::time::sleep_until;

use report::{RunResult, Scenario};
use sidecar::Sidecar;

/// The collection both sides name, and the hits the fake returns and the client checks.
const COLLECTION: &str = "bench_passthrough";
const TOP_K: i64 = 10;

fn main() -> ExitCode {
    match run() {
        Ok(0) => ExitCode::SUCCESS,
        Ok(errors) => {
            eprintln!("{errors} calls failed: the figures above are not trustworthy");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("passthrough bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs every scenario and prints the table; returns how many calls failed.
fn run() -> Result<u64> {
    let config = Config::from_env()?;
    let bin = &config.sidecar_bin;
    let upstream = fake_milvus::start()?;
    let sidecar = Sidecar::start(bin, upstream, &config.serve_args(), config.startup_timeout)?;
    let payload = load::search_request();
    print_header(&config, upstream, &sidecar, &payload);

    // The load generator gets its own runtime, apart from the fake upstream's thread.
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("load").enable_all().build()?;
    let scenarios = runtime
        .block_on(measure_all(&config, upstream, &sidecar, &payload))
        .inspect_err(|_| eprintln!("{} output:\n{}", bin.display(), sidecar.log_tail()))?;

    println!("\nSearch, median of {} round(s) (min–max):", config.rounds);
    for scenario in &scenarios {
        print!("{}", scenario.table());
    }
    report_logged_errors(&sidecar);
    Ok(scenarios.iter().map(Scenario::errors).sum())
}

fn report_logged_errors(sidecar: &Sidecar) {
    let errors = sidecar.logged_errors();
    if let Some(last) = errors.last() {
        println!("\nthe sidecar logged {} ERROR line(s); the last:\n  {last}", errors.len());
    }
}

fn print_header(config: &Config, upstream: SocketAddr, sidecar: &Sidecar, payload: &Bytes) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "passthrough: unary Search ({} B request), direct to a fake Milvus on {upstream} vs through \
         milvus-sidecar on {} (pid {})",
        payload.len(),
        sidecar.addr,
        sidecar.pid()
    );
    let mode = if config.with_database {
        "authenticating root:Milvus, authorizing and recording every call with PostgreSQL (DATABASE_URL)"
    } else {
        "--no-recording --no-auth: forwarding alone (set DATABASE_URL for auth and recording)"
    };
    println!("sidecar: {mode}");
    println!(
        "{:.1} s per run after {:.1} s warm-up, {} round(s) alternating targets, {} connection(s); \
         load generator, sidecar and upstream share {cores} cores",
        config.measure.as_secs_f64(),
        config.warmup.as_secs_f64(),
        config.rounds,
        config.connections
    );
}

/// Which way the load goes.
#[derive(Clone, Copy, PartialEq)]
enum Target {
    Direct,
    Sidecar,
}

async fn measure_all(
    config: &Config,
    upstream: SocketAddr,
    sidecar: &Sidecar,
    payload: &Bytes,
) -> Result<Vec<Scenario>> {
    let mut scenarios = Vec::new();
    for &concurrency in &config.concurrency {
        let mut scenario = Scenario { concurrency, direct: Vec::new(), sidecar: Vec::new() };
        for round in 0..config.rounds {
            // Swap which target goes first each round, so slow drift (caches, CPU frequency,
            // allocator growth) does not favour either.
            let order = if round.is_multiple_of(2) {
                [Target::Direct, Target::Sidecar]
            } else {
                [Target::Sidecar, Target::Direct]
            };
            for target in order {
                let (addr, watched) = match target {
                    Target::Direct => (upstream, None),
                    Target::Sidecar => (sidecar.addr, Some(sidecar)),
                };
                let result = measure_run(config, addr, watched, payload, concurrency)
                    .await
                    .with_context(|| format!("c={concurrency} round {} via {addr}", round + 1))?;
                let name = if watched.is_some() { "sidecar" } else { "direct" };
                eprintln!("  c={concurrency} round {}/{} {name:<7} {}", round + 1, config.rounds, result.summary());
                match target {
                    Target::Direct => scenario.direct.push(result),
                    Target::Sidecar => scenario.sidecar.push(result),
                }
            }
        }
        scenarios.push(scenario);
    }
    Ok(scenarios)
}

/// One warm-up plus measured window against `addr`, on fresh connections; `watched` is the
/// sidecar whose CPU and memory the window is charged to.
async fn measure_run(
    config: &Config,
    addr: SocketAddr,
    watched: Option<&Sidecar>,
    payload: &Bytes,
    concurrency: usize,
) -> Result<RunResult> {
    let channels = load::connect(addr, config.connections).await?;
    load::check_search(&channels[0], payload).await?;
    if let Some(sidecar) = watched {
        sidecar.reset_peak_rss();
    }
    let start = Instant::now();
    let window = load::Window { measure_from: start + config.warmup, until: start + config.warmup + config.measure };
    let workers = load::spawn_workers(&channels, payload, concurrency, window);
    // Sample the sidecar at the window's edges so that warm-up CPU is not charged to the run.
    sleep_until(window.measure_from.into()).await;
    let before = watched.map(Sidecar::usage).transpose()?;
    let rows_before = if watched.is_some() && config.with_database { logged_rows().await } else { None };
    sleep_until(window.until.into()).await;
    let after = watched.map(Sidecar::usage).transpose()?;
    let rows_after = if rows_before.is_some() { logged_rows().await } else { None };
    let stats = load::join(workers).await?;
    let mut result = RunResult::new(stats, config.measure.as_secs_f64(), before.zip(after));
    if let (Some(cost), Some(b), Some(a)) = (result.sidecar.as_mut(), rows_before, rows_after) {
        cost.rows_per_sec = Some((a - b) as f64 / config.measure.as_secs_f64());
    }
    Ok(result)
}

/// Rows in the four log tables of the sidecar's database (DATABASE_URL): their growth over
/// the window is what the writer put into PostgreSQL.
async fn logged_rows() -> Option<i64> {
    let url = env::var("DATABASE_URL").ok()?;
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.ok()?;
    tokio::spawn(conn);
    let sql = "SELECT (SELECT count(*) FROM performance_metrics) + (SELECT count(*) FROM query_logs) \
               + (SELECT count(*) FROM ingestion_logs) + (SELECT count(*) FROM audit_logs)";
    client.query_one(sql, &[]).await.ok().map(|row| row.get(0))
}

struct Config {
    measure: Duration,
    warmup: Duration,
    rounds: usize,
    concurrency: Vec<usize>,
    connections: usize,
    sidecar_bin: PathBuf,
    /// Whether the sidecar authenticates, authorizes and records calls with PostgreSQL: only when
    /// DATABASE_URL says where it is.
    with_database: bool,
    sidecar_args: Vec<String>,
    startup_timeout: Duration,
}

impl Config {
    fn from_env() -> Result<Self> {
        let concurrency = env::var("BENCH_CONCURRENCY").unwrap_or_else(|_| "1,32".into());
        let concurrency = concurrency
            .split(',')
            .map(|level| level.trim().parse::<usize>())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("BENCH_CONCURRENCY={concurrency:?}: expected e.g. 1,32"))?;
        let config = Config {
            measure: env_secs("BENCH_SECS", 5.0)?,
            warmup: env_secs("BENCH_WARMUP_SECS", 1.0)?,
            rounds: env_parse("BENCH_ROUNDS", 3)?,
            concurrency,
            connections: env_parse("BENCH_CONNECTIONS", 1)?,
            // Cargo builds a package's binaries, with the bench's own profile, before it runs a
            // bench, so this is never stale.
            sidecar_bin: env::var_os("BENCH_SIDECAR_BIN")
                .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_milvus-sidecar")), PathBuf::from),
            with_database: env::var_os("DATABASE_URL").is_some(),
            sidecar_args: env::var("BENCH_SIDECAR_ARGS")
                .map(|args| args.split_whitespace().map(String::from).collect())
                .unwrap_or_default(),
            startup_timeout: env_secs("BENCH_STARTUP_SECS", 30.0)?,
        };
        ensure!(config.rounds >= 1, "BENCH_ROUNDS must be at least 1");
        ensure!(config.connections >= 1, "BENCH_CONNECTIONS must be at least 1");
        ensure!(
            !config.concurrency.is_empty() && !config.concurrency.contains(&0),
            "BENCH_CONCURRENCY levels must be at least 1"
        );
        ensure!(!config.measure.is_zero(), "BENCH_SECS must be positive");
        Ok(config)
    }

    /// Arguments of `milvus-sidecar serve` beyond the addresses. Without a database the sidecar
    /// can neither record nor check credentials, so the bench then measures forwarding alone.
    fn serve_args(&self) -> Vec<String> {
        let mut args = self.sidecar_args.clone();
        if !self.with_database {
            args.extend(["--no-recording".into(), "--no-auth".into()]);
        }
        args
    }
}

fn env_parse<T: FromStr>(name: &str, default: T) -> Result<T>
where
    T::Err: Display,
{
    match env::var(name) {
        Ok(text) => match text.trim().parse() {
            Ok(value) => Ok(value),
            Err(e) => bail!("{name}={text:?}: {e}"),
        },
        Err(_) => Ok(default),
    }
}

fn env_secs(name: &str, default: f64) -> Result<Duration> {
    let secs: f64 = env_parse(name, default)?;
    Duration::try_from_secs_f64(secs).with_context(|| format!("{name}={secs}: not a duration"))
}

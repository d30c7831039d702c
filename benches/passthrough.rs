//! What the sidecar costs, side by side with the alternatives (issue 6). The same pymilvus-shaped
//! load goes to a fast fake Milvus five ways, alternated round by round:
//!
//! - `direct`: load generator → upstream;
//! - `sidecar`: → milvus-sidecar with authentication (a cached credential of a user with role
//!   `user`), the per-collection permission check and recording into PostgreSQL all on → upstream;
//! - `sidecar-busy`: the same with `--busy-poll 100us` (its call thread polls before it sleeps,
//!   for latency at low concurrency, at the cost of CPU);
//! - `sidecar-norec`: → milvus-sidecar `--no-recording --no-auth` (forwarding alone: the binary
//!   cannot check credentials without PostgreSQL, so recording off means auth off too);
//! - `nginx`: → Debian's nginx as a plain `grpc_pass` proxy with upstream keepalive and no
//!   access log, started with a config file of its own (see `support/nginx.rs`).
//!
//! Scenarios: Search (~3 KiB) at concurrency 1 and 32, Insert of 64 KiB and of 4 MiB (a valid
//! InsertRequest with an Int64 key and a 768-dim FloatVector) at concurrency 4; plus, when
//! milvus-lite is at hand, Search at concurrency 1 against milvus-lite for a realistic figure.
//! Then the record writer's throughput on a backlog (`support/writer.rs`) and the cost of a
//! cached permission check (`support/auth_check.rs`). At the end: a table
//! per scenario (medians over rounds, min–max in brackets) and the targets, PASS/FAIL.
//!
//! Run it with `scripts/bench.sh` (installs nginx, finds or starts PostgreSQL, creates a fresh
//! database, then runs this), or `cargo bench --bench passthrough [-- FLAGS]` yourself.
//!
//! Flags (after `--`) and environment, flags first:
//! - `--quick`: a smoke run (1 s runs, 1 round, a 20 000-call writer backlog).
//! - `--secs S` / `BENCH_SECS` (5): measured seconds per run; `--warmup S` / `BENCH_WARMUP_SECS` (1).
//! - `--rounds N` / `BENCH_ROUNDS` (3): runs per target and scenario.
//! - `--connections N` / `BENCH_CONNECTIONS` (1): HTTP/2 connections the load is spread over.
//! - `--load-threads N` / `BENCH_LOAD_THREADS` (1): worker threads of the load generator.
//! - `--scenarios LIST` / `BENCH_SCENARIOS` (`search-c1,search-c32,insert-64k,insert-4m,lite`).
//!   Besides those: `search-c<N>` (the Search at concurrency N) and `insert-<size>[-c<N>]` (an
//!   Insert of about `<size>` bytes, a number with `k` or `m`, at concurrency N, 4 if not
//!   given), e.g. `search-c8,insert-1m-c16`. The targets are judged on the four
//!   default names only.
//! - `--targets LIST` / `BENCH_TARGETS` (`direct,sidecar,sidecar-busy,sidecar-norec,nginx`).
//! - `--writer-calls N` / `BENCH_WRITER_CALLS` (100000): Search records in the writer's backlog
//!   (2 rows each); 0 skips that measurement.
//! - `BENCH_NGINX_BIN` (nginx on PATH or /usr/sbin), `BENCH_NGINX_WORKERS` (`auto`).
//! - `MILVUS_LITE_BIN` (else `.venv/bin/milvus-lite`): the lite scenario runs when it exists.
//! - `BENCH_SIDECAR_BIN`: use this binary instead of the `milvus-sidecar` cargo built for the bench.
//! - `BENCH_SIDECAR_ARGS`: extra arguments for every sidecar's `serve`, split on whitespace.
//! - `BENCH_STARTUP_SECS` (30): how long a sidecar may take to become healthy.
//! - `DATABASE_URL`: the database the sidecar records into and reads users from (migrated by
//!   the sidecar; a fresh one is best). Without it the `sidecar` and `sidecar-busy` targets and
//!   the writer measurement are skipped.
//!
//! The header's `scheduling` line says whether PostgreSQL's backends ran at idle CPU priority
//! (`scripts/bench.sh --isolate-postgres` puts them in a CPU cgroup marked idle for the run).

/// The sidecar binary's allocator (src/main.rs), so that the measures made in this process
/// (the writer backlog, the permission check) run on the allocator the sidecar runs on. The
/// load generator and the fake upstream use it too, for every target alike.
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[path = "support/auth_check.rs"]
mod auth_check;
#[path = "support/fake_milvus.rs"]
mod fake_milvus;
#[path = "support/lite.rs"]
mod lite;
#[path = "support/load.rs"]
mod load;
#[path = "support/nginx.rs"]
mod nginx;
#[path = "support/procstat.rs"]
mod procstat;
#[path = "support/report.rs"]
mod report;
#[path = "support/sidecar.rs"]
mod sidecar;
#[path = "support/writer.rs"]
mod writer;

use std::env;
use std::fmt::Display;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tokio::time::sleep_until;
use tonic::metadata::AsciiMetadataValue;

use load::Workload;
use nginx::Nginx;
use report::{RecordingFigures, RunResult, ScenarioResult, Target, Verdict};
use sidecar::Sidecar;

/// The collection every call names, and the hits the fake returns and the client checks.
const COLLECTION: &str = "bench_passthrough";
const TOP_K: i64 = 10;
/// The user the load authenticates as: role `user`, with `write` (hence read) on COLLECTION.
const BENCH_USER: &str = "bench";
const BENCH_PASSWORD: &str = "bench-pass";
/// The admin a fresh database starts with; used once, to make the sidecar see the collection.
const ROOT_PASSWORD: &str = "Milvus";
/// The `sidecar-busy` target's `--busy-poll` window.
const BUSY_POLL: &str = "100us";
const SCENARIOS: &str = "search-c1,search-c32,insert-64k,insert-4m,lite";

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

/// Runs everything and prints the tables; returns how many calls failed.
fn run() -> Result<u64> {
    let config = Config::load()?;
    let upstream = fake_milvus::start()?;
    // The load generator gets its own runtime, apart from the fake upstream's thread. One
    // worker by default: on two cores shared with the proxy, the upstream and PostgreSQL, a
    // second one spent more on waking the first than it added (README, "The load generator's
    // threads").
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.load_threads)
        .thread_name("load")
        .enable_all()
        .build()?;
    runtime.block_on(session(&config, upstream))
}

/// The proxies in front of one upstream.
struct Stack {
    upstream: SocketAddr,
    /// Where the upstream's CPU time is read.
    upstream_cpu: procstat::Upstream,
    sidecar: Option<Sidecar>,
    busy: Option<Sidecar>,
    norec: Option<Sidecar>,
    nginx: Option<Nginx>,
    /// The recording sidecars' spill directories.
    spill_dirs: Vec<PathBuf>,
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Only when empty: anything spilled or rejected stays there to be looked at.
        for dir in &self.spill_dirs {
            if std::fs::remove_dir(dir).is_err() && dir.exists() {
                println!("the sidecar left records in {}", dir.display());
            }
        }
    }
}

impl Stack {
    fn start(config: &Config, upstream: SocketAddr, upstream_cpu: procstat::Upstream, label: &str) -> Result<Stack> {
        let wants = |t| config.targets.contains(&t);
        let mut spill_dirs = Vec::new();
        // One after the other: the first to start migrates the database.
        let mut recording = |target: Target, extra: &[&str]| -> Result<Option<Sidecar>> {
            if !wants(target) || config.database_url.is_none() {
                return Ok(None);
            }
            let name = format!("{}-{label}", target.name());
            let spill = env::temp_dir().join(format!("milvus-sidecar-bench-spill-{}-{name}", std::process::id()));
            let mut args = config.sidecar_args.clone();
            args.extend(["--spill-dir".into(), spill.display().to_string()]);
            spill_dirs.push(spill);
            args.extend(["--root-password".into(), ROOT_PASSWORD.into()]);
            args.extend(extra.iter().map(|&a| a.to_owned()));
            Ok(Some(Sidecar::start(&config.sidecar_bin, &name, upstream, &args, config.startup)?))
        };
        let sidecar = recording(Target::Sidecar, &[])?;
        let busy = recording(Target::SidecarBusy, &["--busy-poll", BUSY_POLL])?;
        let norec = if wants(Target::SidecarNoRec) {
            let mut args = config.sidecar_args.clone();
            args.extend(["--no-recording".into(), "--no-auth".into()]);
            Some(Sidecar::start(&config.sidecar_bin, &format!("norec-{label}"), upstream, &args, config.startup)?)
        } else {
            None
        };
        let nginx = match (&config.nginx_bin, wants(Target::Nginx)) {
            (Some(bin), true) => Some(Nginx::start(bin, upstream, &config.nginx_workers)?),
            _ => None,
        };
        Ok(Stack { upstream, upstream_cpu, sidecar, busy, norec, nginx, spill_dirs })
    }

    /// The targets this stack can serve, in the configured order.
    fn targets(&self, config: &Config) -> Vec<Target> {
        config.targets.iter().copied().filter(|&t| self.addr(t).is_some()).collect()
    }

    fn addr(&self, target: Target) -> Option<SocketAddr> {
        match target {
            Target::Direct => Some(self.upstream),
            Target::Sidecar | Target::SidecarBusy | Target::SidecarNoRec => self.sidecar_for(target).map(|s| s.addr),
            Target::Nginx => self.nginx.as_ref().map(|n| n.addr),
        }
    }

    fn sidecar_for(&self, target: Target) -> Option<&Sidecar> {
        match target {
            Target::Sidecar => self.sidecar.as_ref(),
            Target::SidecarBusy => self.busy.as_ref(),
            Target::SidecarNoRec => self.norec.as_ref(),
            Target::Direct | Target::Nginx => None,
        }
    }

    /// The sidecars that authenticate and record, the first one set up first.
    fn recording(&self) -> impl Iterator<Item = &Sidecar> {
        self.sidecar.iter().chain(&self.busy)
    }

    /// The processes whose CPU and memory a run through `target` is charged to.
    fn pids(&self, target: Target) -> Vec<u32> {
        match target {
            Target::Direct => Vec::new(),
            Target::Sidecar | Target::SidecarBusy | Target::SidecarNoRec => {
                self.sidecar_for(target).iter().map(|s| s.pid()).collect()
            }
            Target::Nginx => self.nginx.as_ref().map(Nginx::pids).unwrap_or_default(),
        }
    }

    fn log_errors(&self) {
        for sidecar in self.recording().chain(&self.norec) {
            let errors = sidecar.logged_errors();
            if let Some(last) = errors.last() {
                println!(
                    "\nthe sidecar on {} logged {} ERROR line(s); the last:\n  {last}",
                    sidecar.addr,
                    errors.len()
                );
            }
        }
    }
}

async fn session(config: &Config, upstream: SocketAddr) -> Result<u64> {
    let db = match &config.database_url {
        Some(url) => Some(connect_db(url).await?),
        None => None,
    };
    let stack = Stack::start(config, upstream, procstat::Upstream::Fake, "fake")?;
    print_header(config, &stack);
    // Whether PostgreSQL's bursts can hold up the calls on the cores they share.
    let scheduling = match &db {
        Some(db) => Some(procstat::scheduling(&writer::backend_pids(db).await?)),
        None => None,
    };
    if let Some(scheduling) = &scheduling {
        println!("  scheduling     {scheduling}");
    }
    let auth = load::authorization(BENCH_USER, BENCH_PASSWORD);
    if let Some(db) = &db {
        let mut recording = stack.recording();
        if let Some(first) = recording.next() {
            grant_bench_user(config, first, db, &auth)
                .await
                .inspect_err(|_| eprintln!("sidecar output:\n{}", first.log_tail()))?;
        }
        for other in recording {
            let (search, insert) = (load::search(COLLECTION, &["title", "category"]), bench_insert());
            until_allowed(other, &[&search, &insert], &auth, Duration::from_secs(10))
                .await
                .inspect_err(|_| eprintln!("sidecar output:\n{}", other.log_tail()))?;
        }
    }
    // Idle memory: after start-up and set-up, before any load.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle: Vec<(Target, f64)> = stack
        .targets(config)
        .into_iter()
        .filter(|&t| t != Target::Direct)
        .filter_map(|t| Some((t, procstat::usage(&stack.pids(t)).ok()?.rss_kib as f64 / 1024.0)))
        .collect();

    let mut results = Vec::new();
    for key in &config.scenarios {
        let (name, workload, concurrency) = match Scenario::parse(key) {
            Some(Scenario::Search { concurrency }) => (
                format!("Search 3 KiB, concurrency {concurrency}"),
                load::search(COLLECTION, &["title", "category"]),
                concurrency,
            ),
            Some(Scenario::Insert { bytes, concurrency }) => (
                format!("Insert {}, concurrency {concurrency}", size_name(bytes)),
                load::insert(COLLECTION, bytes, 0),
                concurrency,
            ),
            Some(Scenario::Lite) | None => continue,
        };
        let rows = if workload.rows > 0 { format!(", {} rows", workload.rows) } else { String::new() };
        let name = format!("{name} (fake upstream, {} B request{rows})", workload.payload.len());
        let result = measure_scenario(config, &stack, db.as_ref(), &auth, key, &name, &workload, concurrency)
            .await
            .with_context(|| format!("scenario {key}"))?;
        results.push(result);
    }
    if config.scenarios.iter().any(|s| s == "lite") {
        match &config.lite_bin {
            Some(bin) => {
                let result = lite_scenario(config, bin, db.as_ref(), &auth).await.context("scenario lite")?;
                results.push(result);
            }
            None => println!("\nno milvus-lite (MILVUS_LITE_BIN, .venv/bin/milvus-lite): the lite scenario is skipped"),
        }
    }
    // Idle again: two seconds after the last call, as long as the sidecar takes to give back
    // what the runs freed (src/main.rs, give_back_freed_pages).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_after: Vec<(Target, f64)> = idle
        .iter()
        .filter_map(|&(t, _)| Some((t, procstat::usage(&stack.pids(t)).ok()?.rss_kib as f64 / 1024.0)))
        .collect();

    // Both in-process measures use the schema, user and grant the recording sidecars set up.
    let prepared = if stack.recording().next().is_some() { config.database_url.as_ref() } else { None };
    if prepared.is_none() && config.database_url.is_some() {
        println!("\nwithout a recording sidecar target, the writer backlog and permission check are not measured");
    }
    let backlog = match (prepared, config.writer_calls) {
        (Some(url), calls) if calls > 0 => {
            eprintln!("  writer backlog: {calls} Search records queued at once ...");
            let measured = writer::measure(url, calls, BENCH_USER, COLLECTION).await.context("writer backlog")?;
            eprintln!("  writer backlog: {:.0} rows/s", measured.rows_per_sec());
            Some(measured)
        }
        _ => None,
    };

    let auth_check = match prepared {
        Some(url) => {
            Some(auth_check::measure(url, BENCH_USER, BENCH_PASSWORD, COLLECTION).await.context("auth check")?)
        }
        None => None,
    };

    println!("\n=== Results: median of {} round(s), (min–max) over rounds ===", config.rounds);
    for result in &results {
        print!("{}", result.table());
    }
    println!("\nRSS when idle (MiB): after start-up / after all runs");
    for ((target, before), (_, after)) in idle.iter().zip(&idle_after) {
        println!("  {:<16} {before:>6.1} / {after:.1}", target.name());
    }
    if let Some(b) = &backlog {
        println!(
            "\nWriter backlog: {} Search records queued at once -> {} rows written in {:.2} s = {:.0} rows/s \
             (the log tables grew by {} rows, counted with SQL); CPU per row: writer {:.1} µs, PostgreSQL {:.1} µs",
            b.calls,
            b.rows,
            b.secs,
            b.rows_per_sec(),
            b.rows_in_database,
            b.writer_cpu_us_per_row,
            b.postgres_cpu_us_per_row
        );
    }
    if let Some(a) = &auth_check {
        println!(
            "\nPermission check on a cache hit (in process, {} Search checks): {:.0} ns = identify {:.0} ns \
             (keyed hash of the credential, cache lookup) + authorize {:.0} ns (cached grants)",
            a.checks,
            a.identify_ns + a.authorize_ns,
            a.identify_ns,
            a.authorize_ns
        );
    }
    println!("\n=== Targets of issue 6 (sidecar with authentication, permission check and recording on) ===");
    for verdict in verdicts(&results, &idle, backlog.as_ref()) {
        println!("{}", verdict.line());
    }
    println!(
        "\n(Load generator, fake upstream, proxies and PostgreSQL share {} cores; CPU per request counts the \
         proxy process only — nginx: master + workers; the sidecar's includes its writer, not PostgreSQL. \
         The load generator's, the fake upstream's and the idle CPU per request are the rest of the machine's \
         time: idle is CPU time no process used, steal what the hypervisor took.)",
        cores()
    );
    if let Some(scheduling) = &scheduling {
        println!("(Scheduling: {scheduling}.)");
    }
    stack.log_errors();
    Ok(results.iter().map(ScenarioResult::errors).sum())
}

fn print_header(config: &Config, stack: &Stack) {
    println!("passthrough: milvus-sidecar vs nginx vs direct, fake Milvus on {}", stack.upstream);
    if let Some(s) = &stack.sidecar {
        println!(
            "  sidecar        {} (pid {}): auth as {BENCH_USER} (role user, write on {COLLECTION}), recording into DATABASE_URL",
            s.addr,
            s.pid()
        );
    } else if config.targets.contains(&Target::Sidecar) {
        println!("  sidecar        skipped: no DATABASE_URL to authenticate and record with");
    }
    if stack.busy.is_none() && config.targets.contains(&Target::SidecarBusy) {
        println!("  sidecar-busy   skipped: no DATABASE_URL to authenticate and record with");
    }
    if let Some(s) = &stack.busy {
        println!("  sidecar-busy   {} (pid {}): as sidecar, with --busy-poll {BUSY_POLL}", s.addr, s.pid());
    }
    if let Some(s) = &stack.norec {
        println!("  sidecar-norec  {} (pid {}): --no-recording --no-auth", s.addr, s.pid());
    }
    match &stack.nginx {
        Some(n) => println!(
            "  nginx          {} (pids {:?}, {} worker(s) setting `{}`), config {}",
            n.addr,
            n.pids(),
            n.pids().len() - 1,
            config.nginx_workers,
            n.config_path().display()
        ),
        None if config.targets.contains(&Target::Nginx) => {
            println!("  nginx          skipped: not found (scripts/bench.sh installs it; or set BENCH_NGINX_BIN)")
        }
        None => {}
    }
    println!(
        "  {:.1} s per run after {:.1} s warm-up, {} round(s) alternating targets, {} connection(s), \
         {} load thread(s), {} cores shared",
        config.measure.as_secs_f64(),
        config.warmup.as_secs_f64(),
        config.rounds,
        config.connections,
        config.load_threads,
        cores()
    );
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

#[allow(clippy::too_many_arguments)]
async fn measure_scenario(
    config: &Config,
    stack: &Stack,
    db: Option<&tokio_postgres::Client>,
    auth: &AsciiMetadataValue,
    key: &str,
    name: &str,
    workload: &Workload,
    concurrency: usize,
) -> Result<ScenarioResult> {
    let targets = stack.targets(config);
    let mut runs: Vec<Vec<RunResult>> = targets.iter().map(|_| Vec::new()).collect();
    for round in 0..config.rounds {
        // Rotate which target goes first each round, so slow drift (caches, CPU frequency,
        // allocator growth, other jobs on the machine) does not favour one.
        for i in 0..targets.len() {
            let index = (i + round) % targets.len();
            let target = targets[index];
            let result = measure_run(config, stack, target, db, auth, workload, concurrency)
                .await
                .with_context(|| format!("round {} via {}", round + 1, target.name()))?;
            eprintln!("  {key} round {}/{} {:<14} {}", round + 1, config.rounds, target.name(), result.summary());
            runs[index].push(result);
        }
    }
    Ok(ScenarioResult { name: name.to_owned(), key: key.to_owned(), targets, runs })
}

/// One warm-up plus measured window through `target`, on fresh connections.
async fn measure_run(
    config: &Config,
    stack: &Stack,
    target: Target,
    db: Option<&tokio_postgres::Client>,
    auth: &AsciiMetadataValue,
    workload: &Workload,
    concurrency: usize,
) -> Result<RunResult> {
    let addr = stack.addr(target).context("target not running")?;
    let pids = stack.pids(target);
    let recording = match (target, db) {
        (Target::Sidecar | Target::SidecarBusy, Some(db)) => stack.sidecar_for(target).map(|s| (s, db)),
        _ => None,
    };
    let accounting = match recording {
        Some((sidecar, db)) => Some((perf_rows(db).await?, sidecar.log_len())),
        None => None,
    };
    let channels = load::connect(addr, config.connections).await?;
    load::check(&channels[0], workload, auth).await?;
    if !procstat::reset_peak(&pids) {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| eprintln!("  (cannot reset VmHWM through /proc/PID/clear_refs: peak RSS is since start)"));
    }
    let start = Instant::now();
    let window = load::Window { measure_from: start + config.warmup, until: start + config.warmup + config.measure };
    let workers = load::spawn_workers(&channels, workload, auth, concurrency, window);
    // Sample at the window's edges so that warm-up CPU is not charged to the run.
    sleep_until(window.measure_from.into()).await;
    let others_before = procstat::Others::read(stack.upstream_cpu)?;
    let before = if pids.is_empty() { None } else { Some(procstat::usage(&pids)?) };
    let (rows_before, backends) = match recording {
        Some((_, db)) => (Some(writer::log_rows(db).await?), writer::backend_pids(db).await?),
        None => (None, Vec::new()),
    };
    let pg_before = procstat::cpu_by_pid(&backends);
    sleep_until(window.until.into()).await;
    let others_after = procstat::Others::read(stack.upstream_cpu)?;
    let after = if pids.is_empty() { None } else { Some(procstat::usage(&pids)?) };
    let pg_after = procstat::cpu_by_pid(&backends);
    let rows_after = match recording {
        Some((_, db)) => Some(writer::log_rows(db).await?),
        None => None,
    };
    let stats = load::join(workers).await?;
    let mut result = RunResult::new(&stats, config.measure.as_secs_f64(), before.zip(after));
    result.others = Some(others_after.since(&others_before, stats.latency_us.len()));
    if let (Some((sidecar, db)), Some((perf_before, log_from))) = (recording, accounting) {
        // Every OK call (the check call, warm-up and measured ones) must get its
        // performance_metrics row; give the writer time to catch up, then count.
        let expected = perf_before + stats.completed as i64 + 1;
        let arrived = wait_for_perf_rows(db, expected).await?;
        let spill_or_drop_lines = sidecar
            .log_since(log_from)
            .lines()
            .filter(|line| {
                line.contains("spilling") || line.contains("record queue full") || line.contains("records are lost")
            })
            .count();
        let rows_per_sec = (rows_after.unwrap_or(0) - rows_before.unwrap_or(0)) as f64 / config.measure.as_secs_f64();
        if let Some(cost) = result.cost.as_mut() {
            let postgres_cpu_us_per_req =
                procstat::cpu_between(&pg_before, &pg_after) * 1e6 / stats.latency_us.len().max(1) as f64;
            cost.recording = Some(RecordingFigures {
                rows_per_sec,
                lost: expected - arrived,
                spill_or_drop_lines,
                postgres_cpu_us_per_req,
            });
        }
    }
    Ok(result)
}

/// Waits until `performance_metrics` holds `expected` rows, or stops growing for 2 s.
async fn wait_for_perf_rows(db: &tokio_postgres::Client, expected: i64) -> Result<i64> {
    let mut last = perf_rows(db).await?;
    let mut changed = Instant::now();
    while last < expected && changed.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = perf_rows(db).await?;
        if now != last {
            last = now;
            changed = Instant::now();
        }
    }
    Ok(last)
}

async fn perf_rows(db: &tokio_postgres::Client) -> Result<i64> {
    Ok(db.query_one("SELECT count(*) FROM performance_metrics", &[]).await?.get(0))
}

async fn connect_db(url: &str) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to DATABASE_URL {url}"))?;
    tokio::spawn(conn);
    Ok(client)
}

/// Makes the bench user able to search and insert through the sidecar, as an operator would:
/// root calls once so that the sidecar mirrors the collection, then `milvus-sidecar user
/// create` and `grant ... write` (the CLI), then the bench user's own call must succeed.
async fn grant_bench_user(
    config: &Config,
    sidecar: &Sidecar,
    db: &tokio_postgres::Client,
    auth: &AsciiMetadataValue,
) -> Result<()> {
    let channel = load::connect(sidecar.addr, 1).await?.remove(0);
    let search = load::search(COLLECTION, &["title", "category"]);
    load::check(&channel, &search, &load::authorization("root", ROOT_PASSWORD))
        .await
        .context("root's first call through the sidecar (is DATABASE_URL a fresh database?)")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let known = "SELECT EXISTS (SELECT 1 FROM collections WHERE collection_name = $1 AND status = 'active')";
    while !db.query_one(known, &[&COLLECTION]).await?.get::<_, bool>(0) {
        ensure!(Instant::now() < deadline, "the sidecar did not record collection {COLLECTION} within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let exists = db.query_opt("SELECT 1 FROM users WHERE username = $1", &[&BENCH_USER]).await?.is_some();
    if exists {
        cli(config, &["user", "set-password", BENCH_USER, "--password-stdin"], Some(BENCH_PASSWORD))?;
    } else {
        cli(config, &["user", "create", BENCH_USER, "--role", "user", "--password-stdin"], Some(BENCH_PASSWORD))?;
    }
    cli(config, &["grant", BENCH_USER, COLLECTION, "write"], None)?;
    // Grants reach the sidecar through LISTEN/NOTIFY, within a second.
    until_allowed(sidecar, &[&search, &bench_insert()], auth, Duration::from_secs(10))
        .await
        .context("the bench user's calls after the grant")
}

/// A small Insert, to check the bench user may insert.
fn bench_insert() -> load::Workload {
    load::insert(COLLECTION, 4 << 10, 0)
}

/// Waits until every one of `calls` succeeds through `sidecar` for `auth`, or `patience` ends.
async fn until_allowed(
    sidecar: &Sidecar,
    calls: &[&load::Workload],
    auth: &AsciiMetadataValue,
    patience: Duration,
) -> Result<()> {
    let channel = load::connect(sidecar.addr, 1).await?.remove(0);
    let deadline = Instant::now() + patience;
    loop {
        let result = async {
            for call in calls {
                load::check(&channel, call, auth).await?;
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        match result {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("the bench user's calls through the sidecar on {}", sidecar.addr)));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Runs `milvus-sidecar ARGS` against DATABASE_URL (from the environment), feeding `stdin`.
fn cli(config: &Config, args: &[&str], stdin: Option<&str>) -> Result<()> {
    let mut child = Command::new(&config.sidecar_bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running milvus-sidecar {}", args.join(" ")))?;
    if let Some(text) = stdin {
        child.stdin.take().context("stdin")?.write_all(format!("{text}\n").as_bytes())?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "milvus-sidecar {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Search at concurrency 1 against milvus-lite holding a loaded collection, every target in
/// front of it: what the proxies add next to a real server's own time.
async fn lite_scenario(
    config: &Config,
    bin: &std::path::Path,
    db: Option<&tokio_postgres::Client>,
    auth: &AsciiMetadataValue,
) -> Result<ScenarioResult> {
    eprintln!("  lite: starting milvus-lite and loading {COLLECTION} ...");
    let lite = lite::MilvusLite::start(bin).await?;
    lite.prepare(COLLECTION).await?;
    let stack = Stack::start(config, lite.addr, procstat::Upstream::Process(lite.pid()), "lite")?;
    // Each sidecar's start-up sync mirrors the collection; the grant made for the fake's stack
    // names it already. Wait until these sidecars let the bench user search.
    for sidecar in stack.recording() {
        until_allowed(sidecar, &[&load::search(COLLECTION, &[])], auth, Duration::from_secs(15))
            .await
            .inspect_err(|_| eprintln!("sidecar output:\n{}", sidecar.log_tail()))
            .context("the bench user's Search on milvus-lite")?;
    }
    let workload = load::search(COLLECTION, &[]);
    let name = format!("Search 3 KiB, concurrency 1 (milvus-lite upstream, {} B request)", workload.payload.len());
    measure_scenario(config, &stack, db, auth, "lite", &name, &workload, 1).await
}

/// The targets, judged on the medians.
fn verdicts(
    results: &[ScenarioResult],
    idle: &[(Target, f64)],
    backlog: Option<&writer::WriterResult>,
) -> Vec<Verdict> {
    let find = |key: &str| results.iter().find(|r| r.key == key);
    let mut out = Vec::new();
    let mut judge = |target: &str, measured: Option<(bool, String)>| {
        out.push(match measured {
            Some((pass, detail)) => Verdict { target: target.to_owned(), pass: Some(pass), detail },
            None => Verdict { target: target.to_owned(), pass: None, detail: "not measured".into() },
        });
    };
    let s = Target::Sidecar;
    let cpu = |r: &RunResult| r.cost.as_ref().map(|c| c.cpu_us_per_req);
    let peak = |r: &RunResult| r.cost.as_ref().map(|c| c.peak_mib);

    let c1 = find("search-c1");
    let added = |r: &ScenarioResult, t, f: fn(&RunResult) -> f64| r.added(t, f).map(|s| s.median);
    // The sidecar, then the same with --busy-poll, an opt-in that trades CPU for latency at
    // low concurrency.
    for (label, target) in [("", s), (", sidecar-busy", Target::SidecarBusy)] {
        let p50: fn(&RunResult) -> f64 = |r| r.p50_us;
        for (name, bound, latency) in [("p50", 60.0, p50), ("p99", 120.0, |r| r.p99_us)] {
            judge(
                &format!("c=1 Search{label}: added {name} <= {bound} µs"),
                c1.and_then(|r| added(r, target, latency)).map(|v| (v <= bound, format!("{v:+.0} µs"))),
            );
        }
    }
    let c32 = find("search-c32");
    judge(
        "c=32 Search: CPU per request <= 30 µs",
        c32.and_then(|r| r.median(s, cpu)).map(|v| (v <= 30.0, format!("{v:.1} µs"))),
    );
    judge(
        "c=32 Search: req/s >= nginx's",
        c32.and_then(|r| Some((r.median(s, |r| Some(r.rps))?, r.median(Target::Nginx, |r| Some(r.rps))?)))
            .map(|(a, b)| (a >= b, format!("{a:.0} vs nginx {b:.0} req/s ({:+.0}%)", (a / b - 1.0) * 100.0))),
    );
    let big = find("insert-4m");
    judge(
        "4 MiB Insert: added p50 <= nginx's",
        big.and_then(|r| Some((added(r, s, |r| r.p50_us)?, added(r, Target::Nginx, |r| r.p50_us)?)))
            .map(|(a, b)| (a <= b, format!("{a:+.0} µs vs nginx {b:+.0} µs"))),
    );
    judge(
        "4 MiB Insert: CPU per request <= nginx's",
        big.and_then(|r| Some((r.median(s, cpu)?, r.median(Target::Nginx, cpu)?)))
            .map(|(a, b)| (a <= b, format!("{a:.0} µs vs nginx {b:.0} µs"))),
    );
    judge(
        "4 MiB Insert: peak RSS <= 32 MiB (4 in flight)",
        big.and_then(|r| r.runs_of(s)?.iter().filter_map(peak).reduce(f64::max))
            .map(|v| (v <= 32.0, format!("{v:.1} MiB (highest of the rounds)"))),
    );
    judge(
        "RSS idle <= 16 MiB",
        idle.iter().find(|(t, _)| *t == s).map(|&(_, v)| (v <= 16.0, format!("{v:.1} MiB after start-up"))),
    );
    judge(
        "RSS during c=32 <= 32 MiB",
        c32.and_then(|r| r.runs_of(s)?.iter().filter_map(peak).reduce(f64::max))
            .map(|v| (v <= 32.0, format!("{v:.1} MiB peak (highest of the rounds)"))),
    );
    judge(
        "c=32: zero records dropped or spilled",
        c32.and_then(|r| {
            let recs: Vec<RecordingFigures> = r.runs_of(s)?.iter().filter_map(|r| r.cost.as_ref()?.recording).collect();
            (!recs.is_empty()).then(|| {
                let lost: i64 = recs.iter().map(|r| r.lost).sum();
                let lines: usize = recs.iter().map(|r| r.spill_or_drop_lines).sum();
                (lost == 0 && lines == 0, format!("{lost} rows missing, {lines} spill/drop log lines"))
            })
        }),
    );
    judge(
        "writer >= 100k rows/s on a backlog",
        backlog.map(|b| (b.rows_per_sec() >= 100_000.0, format!("{:.0} rows/s", b.rows_per_sec()))),
    );
    out
}

/// What a scenario name asks for (see the flags at the top).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Search { concurrency: usize },
    Insert { bytes: usize, concurrency: usize },
    Lite,
}

impl Scenario {
    fn parse(name: &str) -> Option<Scenario> {
        let count = |n: &str| n.parse::<usize>().ok().filter(|&n| n >= 1);
        if name == "lite" {
            return Some(Scenario::Lite);
        }
        if let Some(c) = name.strip_prefix("search-c") {
            return Some(Scenario::Search { concurrency: count(c)? });
        }
        let rest = name.strip_prefix("insert-")?;
        let (size, concurrency) = match rest.split_once("-c") {
            Some((size, c)) => (size, count(c)?),
            None => (rest, 4),
        };
        let (number, unit) = match (size.strip_suffix('k'), size.strip_suffix('m')) {
            (Some(n), _) => (n, 1 << 10),
            (_, Some(n)) => (n, 1 << 20),
            _ => return None,
        };
        // Up to 256 MiB, the largest message the sidecar accepts by default.
        let bytes = count(number)?.checked_mul(unit).filter(|&b| b <= 256 << 20)?;
        Some(Scenario::Insert { bytes, concurrency })
    }
}

/// `bytes` as the scenario tables name it: 64 KiB, 4 MiB.
fn size_name(bytes: usize) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

struct Config {
    measure: Duration,
    warmup: Duration,
    rounds: usize,
    connections: usize,
    /// Worker threads of the load generator's runtime.
    load_threads: usize,
    scenarios: Vec<String>,
    targets: Vec<Target>,
    writer_calls: usize,
    sidecar_bin: PathBuf,
    sidecar_args: Vec<String>,
    startup: Duration,
    database_url: Option<String>,
    nginx_bin: Option<PathBuf>,
    nginx_workers: String,
    lite_bin: Option<PathBuf>,
}

impl Config {
    /// Flags (after `cargo bench --bench passthrough --`) over environment over defaults.
    fn load() -> Result<Self> {
        let mut flags: Vec<(String, String)> = Vec::new();
        let mut quick = false;
        let mut args = env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                // cargo passes --bench to every bench binary
                "--bench" => {}
                "--quick" => quick = true,
                "--secs" | "--warmup" | "--rounds" | "--connections" | "--load-threads" | "--scenarios"
                | "--targets" | "--writer-calls" => {
                    let value = args.next().with_context(|| format!("{arg} needs a value"))?;
                    flags.push((arg.trim_start_matches("--").to_owned(), value));
                }
                "--help" | "-h" => {
                    println!("see the comment at the top of benches/passthrough.rs for flags and settings");
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?} (try --quick, --secs S, --rounds N, --scenarios LIST)"),
            }
        }
        let setting = |flag: &str, var: &str| -> Option<String> {
            flags.iter().rev().find(|(f, _)| f == flag).map(|(_, v)| v.clone()).or_else(|| env::var(var).ok())
        };
        let (secs, warmup, rounds, writer_calls) = if quick { (1.0, 0.3, 1, 20_000) } else { (5.0, 1.0, 3, 100_000) };
        let list = |flag: &str, var: &str, default: &str| -> Vec<String> {
            setting(flag, var)
                .unwrap_or_else(|| default.into())
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        };
        let scenarios = list("scenarios", "BENCH_SCENARIOS", SCENARIOS);
        for s in &scenarios {
            ensure!(
                Scenario::parse(s).is_some(),
                "unknown scenario {s:?}: pick from {SCENARIOS}, or search-c<N>, insert-<size>[-c<N>] \
                 (size a number with k or m, e.g. insert-1m-c16)"
            );
        }
        let targets = list("targets", "BENCH_TARGETS", "direct,sidecar,sidecar-busy,sidecar-norec,nginx")
            .iter()
            .map(|name| Target::parse(name).with_context(|| format!("unknown target {name:?}")))
            .collect::<Result<Vec<_>>>()?;
        ensure!(targets.contains(&Target::Direct), "the direct target is needed: added latency is measured against it");
        let lite_bin = env::var_os("MILVUS_LITE_BIN")
            .map(PathBuf::from)
            .or_else(|| Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/milvus-lite")))
            .filter(|bin| bin.is_file());
        let config = Config {
            measure: secs_of(setting("secs", "BENCH_SECS"), "BENCH_SECS", secs)?,
            warmup: secs_of(setting("warmup", "BENCH_WARMUP_SECS"), "BENCH_WARMUP_SECS", warmup)?,
            rounds: parse_of(setting("rounds", "BENCH_ROUNDS"), "BENCH_ROUNDS", rounds)?,
            connections: parse_of(setting("connections", "BENCH_CONNECTIONS"), "BENCH_CONNECTIONS", 1)?,
            load_threads: parse_of(setting("load-threads", "BENCH_LOAD_THREADS"), "BENCH_LOAD_THREADS", 1)?,
            scenarios,
            targets,
            writer_calls: parse_of(setting("writer-calls", "BENCH_WRITER_CALLS"), "BENCH_WRITER_CALLS", writer_calls)?,
            // Cargo builds a package's binaries, with the bench's own profile, before it runs a
            // bench, so this is never stale.
            sidecar_bin: env::var_os("BENCH_SIDECAR_BIN")
                .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_milvus-sidecar")), PathBuf::from),
            sidecar_args: env::var("BENCH_SIDECAR_ARGS")
                .map(|args| args.split_whitespace().map(String::from).collect())
                .unwrap_or_default(),
            startup: secs_of(env::var("BENCH_STARTUP_SECS").ok(), "BENCH_STARTUP_SECS", 30.0)?,
            database_url: env::var("DATABASE_URL").ok().filter(|url| !url.is_empty()),
            nginx_bin: nginx::find_binary(),
            nginx_workers: env::var("BENCH_NGINX_WORKERS").unwrap_or_else(|_| "auto".into()),
            lite_bin,
        };
        ensure!(config.rounds >= 1, "BENCH_ROUNDS must be at least 1");
        ensure!(config.connections >= 1, "BENCH_CONNECTIONS must be at least 1");
        ensure!(config.load_threads >= 1, "BENCH_LOAD_THREADS must be at least 1");
        ensure!(!config.measure.is_zero(), "BENCH_SECS must be positive");
        Ok(config)
    }
}

fn parse_of<T: FromStr>(text: Option<String>, name: &str, default: T) -> Result<T>
where
    T::Err: Display,
{
    match text {
        Some(text) => match text.trim().parse() {
            Ok(value) => Ok(value),
            Err(e) => bail!("{name}={text:?}: {e}"),
        },
        None => Ok(default),
    }
}

fn secs_of(text: Option<String>, name: &str, default: f64) -> Result<Duration> {
    let secs: f64 = parse_of(text, name, default)?;
    Duration::try_from_secs_f64(secs).with_context(|| format!("{name}={secs}: not a duration"))
}

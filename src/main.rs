use clap::Parser;
use milvus_sidecar::App;
use milvus_sidecar::busy_poll::BusyPoll;
use milvus_sidecar::config::{Cli, Command, Config, DatabaseArgs, LogFormat, SyncArgs};
use std::process::ExitCode;
use std::sync::Arc;
use tracing_subscriber::EnvFilter;

/// jemalloc rather than glibc's malloc. `perf` of the sidecar at 32 concurrent searches had
/// 30 % of the call thread's samples in libc, two thirds of them malloc and free: glibc
/// locks an arena for each free of a block another thread allocated (every call's record
/// is freed by the writer thread), and consolidates its fast bins. jemalloc's per-thread
/// caches take 6-22 % off the CPU per call (bench, paired runs; README, Performance).
///
/// It also keeps argon2's 19 MiB per password check off the resident set: blocks of 8 MiB
/// and more come from an arena that gives its pages back as soon as they are freed. glibc
/// needed a fixed mmap threshold for that (else one such block stayed per thread that ever
/// checked a password: 68 MiB idle), and then a raised trim threshold so that large HTTP/2
/// buffers were not unmapped and faulted in again on every 4 MiB insert. mimalloc saved
/// more CPU but held 37-53 MiB idle.
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once at its start (`malloc_conf`; `_rjem_` is tikv-jemalloc-sys's
/// prefix). Freed pages go back to the system within about a second rather than ten: with
/// ten seconds' worth kept, four 4 MiB inserts in flight reached 29-32.2 MiB of RSS (the
/// issue's bound is 32), and a search load after them 29-31; with one second's, 22-31.5 and
/// 24-25. Giving pages back at once (0) doubled the CPU per insert; a background purging
/// thread (`background_thread`) added 3-4 µs per search call at c=32 with its wake-ups.
#[cfg(target_os = "linux")]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: Option<&std::ffi::c_char> = Some(unsafe { &*c"dirty_decay_ms:1000".as_ptr() });

/// Once a second, has jemalloc give back the pages its decay has let go of by now. jemalloc
/// purges only when it is called into, and without a background thread (see above) nothing
/// calls it while the sidecar is idle: the pages a burst of calls freed stayed resident
/// until traffic resumed (four 4 MiB inserts at a time left 45 MiB against 21 before, in
/// `tests/memory.rs`). Under load this purges what the next allocations would have.
#[cfg(target_os = "linux")]
async fn give_back_freed_pages() -> std::convert::Infallible {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // SAFETY: `arena.<i>.decay` reads and writes no value, so every pointer is null
        // and the length 0; 4096 is MALLCTL_ARENAS_ALL, every arena. The name is a C string.
        let failed = unsafe {
            tikv_jemalloc_sys::mallctl(
                c"arena.4096.decay".as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        debug_assert_eq!(failed, 0, "mallctl arena.4096.decay");
    }
}

/// Elsewhere the system's allocator keeps its own policy.
#[cfg(not(target_os = "linux"))]
async fn give_back_freed_pages() -> std::convert::Infallible {
    std::future::pending().await
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let result = match cli.command {
        Command::Serve(config) => serve_runtime(&config).and_then(|(rt, busy)| rt.block_on(serve(*config, busy))),
        Command::Migrate(database) => runtime(1).and_then(|rt| rt.block_on(migrate(database))),
        Command::Sync(args) => runtime(1).and_then(|rt| rt.block_on(sync(args))),
        // Administration commands report their own errors and choose their exit status.
        Command::User(_)
        | Command::Grant(_)
        | Command::Revoke(_)
        | Command::Check(_)
        | Command::Config(_)
        | Command::Stats(_)
        | Command::Audit(_) => return milvus_sidecar::cli::run(cli.command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: escape codes in a log file or collector are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn runtime(worker_threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(builder(worker_threads).build()?)
}

/// The calls' runtime, spinning before it parks with `--busy-poll`.
fn serve_runtime(config: &Config) -> anyhow::Result<(tokio::runtime::Runtime, Option<Arc<BusyPoll>>)> {
    if config.busy_poll.is_zero() {
        return Ok((runtime(config.worker_threads)?, None));
    }
    if config.worker_threads != 1 {
        anyhow::bail!(
            "--busy-poll needs --worker-threads 1: with more, the threads that do not hold the epoll instance would spin for nothing"
        );
    }
    let busy = BusyPoll::new(config.busy_poll);
    let runtime = busy.build(&mut builder(1))?;
    Ok((runtime, Some(busy)))
}

fn builder(worker_threads: usize) -> tokio::runtime::Builder {
    let mut builder = match worker_threads {
        // One thread runs everything: no call hops between threads on its way through.
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    };
    builder.enable_all();
    builder
}

async fn serve(config: Config, busy: Option<Arc<BusyPoll>>) -> anyhow::Result<()> {
    let upstream = config.upstream.clone();
    let window = config.busy_poll;
    let app = App::start(config).await?;
    if let Some(busy) = busy
        && busy.active()
    {
        busy.watch_calls(app.calls_in_flight.clone());
        tracing::info!(
            window = ?window,
            max_calls_in_flight = milvus_sidecar::busy_poll::MAX_CALLS_IN_FLIGHT,
            "busy polling: the call thread polls before it sleeps while few calls are in flight"
        );
    }
    tracing::info!(
        listen = %app.running.listen_addr,
        admin = %app.running.admin_addr,
        %upstream,
        recording = app.recording.is_some(),
        "milvus-sidecar serving"
    );
    tokio::select! {
        signal = shutdown_signal() => signal?,
        never = give_back_freed_pages() => match never {},
    }
    tracing::info!("shutdown requested");
    app.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

async fn migrate(database: DatabaseArgs) -> anyhow::Result<()> {
    let pg = database.pg_config()?;
    let mut client = milvus_sidecar::store::wait_for_postgres(&pg, database.db_startup_wait).await?;
    let applied = milvus_sidecar::store::migrate::run(&mut client).await?;
    if applied.is_empty() {
        println!("schema is up to date");
    } else {
        for name in applied {
            println!("applied {name}");
        }
    }
    Ok(())
}

async fn sync(args: SyncArgs) -> anyhow::Result<()> {
    let mut client = milvus_sidecar::store::connect(&args.database.pg_config()?)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to PostgreSQL: {}", milvus_sidecar::error_chain(&e)))?;
    let upstream = milvus_sidecar::sync::upstream_for(&args);
    let report = milvus_sidecar::sync::run(&upstream, &mut client).await?;
    println!("synced the mirror with Milvus at {}", upstream.name());
    print!("{report}");
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        r = tokio::signal::ctrl_c() => r?,
    }
    Ok(())
}

use clap::Parser;
use milvus_sidecar::App;
use milvus_sidecar::config::{Cli, Command, Config, DatabaseArgs, LogFormat, SyncArgs};
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    return_large_blocks_to_the_system();
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let result = match cli.command {
        Command::Serve(config) => runtime(config.worker_threads).and_then(|rt| rt.block_on(serve(*config))),
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

/// glibc serves a large block from mmap and unmaps it when freed, until its dynamic
/// threshold has risen past that size (it does, on the first such free): from then on each
/// allocator arena keeps one. argon2's 19 MiB per password check then stays resident, one
/// per thread that ever checked a password (idle RSS 68 MiB after start-up; a soak grew
/// 180 -> 260 MB in 19 MiB steps). A fixed 16 MiB threshold keeps argon2's block on mmap,
/// given back as soon as it is freed (13 MiB idle). A lower one (1 MiB) would also map and
/// unmap every 4 MiB insert buffer: 7 ms of CPU per 4 MiB insert instead of 4.8 (bench).
///
/// Fixing the mmap threshold also fixes the trim threshold at its 128 KiB default: the
/// heap then gives back, and faults in again, every large HTTP/2 read buffer a
/// large insert passes through (page faults and unmapping were ~15 % of the CPU of a
/// 4 MiB insert). Keeping up to 4 MiB of free heap took a 4 MiB insert from 2.3 to 1.7 ms
/// of CPU (nginx: 1.6), for at most 4 MiB more RSS after such traffic.
fn return_large_blocks_to_the_system() {
    // SAFETY: mallopt only sets tuning parameters of the C allocator; called before any
    // other thread exists.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 4 << 20);
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
    Ok(builder.enable_all().build()?)
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let upstream = config.upstream.clone();
    let app = App::start(config).await?;
    tracing::info!(
        listen = %app.running.listen_addr,
        admin = %app.running.admin_addr,
        %upstream,
        recording = app.recording.is_some(),
        "milvus-sidecar serving"
    );
    shutdown_signal().await?;
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

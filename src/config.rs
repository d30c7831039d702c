//! Settings from flags and environment variables (flags win).

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "milvus-sidecar", version, about = "A transparent gRPC sidecar for Milvus")]
pub struct Cli {
    /// Log line format.
    #[arg(long, env = "MILVUS_SIDECAR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Accept Milvus gRPC calls and forward them to the upstream Milvus proxy.
    Serve(Box<Config>),
    /// Create or update the PostgreSQL schema, then exit (a no-op when up to date).
    Migrate(DatabaseArgs),
}

/// Where PostgreSQL is: `--database-url` / `DATABASE_URL`, else the seed's `POSTGRES_*`.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL connection string (`postgres://user:pass@host:port/db` or key=value form).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    #[arg(long, env = "POSTGRES_HOST", default_value = "postgresql.postgres.svc.cluster.local")]
    pub postgres_host: String,

    #[arg(long, env = "POSTGRES_PORT", default_value_t = 5432)]
    pub postgres_port: u16,

    #[arg(long, env = "POSTGRES_DB", default_value = "milvus_metadata")]
    pub postgres_db: String,

    #[arg(long, env = "POSTGRES_USER", default_value = "milvus_user")]
    pub postgres_user: String,

    #[arg(
        long,
        env = "POSTGRES_PASSWORD",
        default_value = "milvus_password",
        hide_default_value = true,
        hide_env_values = true
    )]
    pub postgres_password: String,

    /// Connections the sidecar keeps to PostgreSQL.
    #[arg(long, env = "MILVUS_SIDECAR_DB_POOL_SIZE", default_value_t = 4)]
    pub db_pool_size: u32,
}

impl DatabaseArgs {
    pub fn from_url(url: &str) -> Self {
        DatabaseArgs {
            database_url: Some(url.to_owned()),
            postgres_host: String::new(),
            postgres_port: 5432,
            postgres_db: String::new(),
            postgres_user: String::new(),
            postgres_password: String::new(),
            db_pool_size: 4,
        }
    }

    pub fn pg_config(&self) -> anyhow::Result<tokio_postgres::Config> {
        let mut config = match &self.database_url {
            // The URL is not echoed back: it may carry a password.
            Some(url) => {
                url.parse::<tokio_postgres::Config>().map_err(|e| anyhow::anyhow!("invalid DATABASE_URL: {e}"))?
            }
            None => {
                let mut c = tokio_postgres::Config::new();
                c.host(&self.postgres_host)
                    .port(self.postgres_port)
                    .dbname(&self.postgres_db)
                    .user(&self.postgres_user)
                    .password(&self.postgres_password);
                c
            }
        };
        config.application_name("milvus-sidecar").connect_timeout(Duration::from_secs(5));
        Ok(config)
    }
}

/// How calls are recorded in PostgreSQL.
#[derive(Debug, Clone, Args)]
pub struct RecordingArgs {
    /// Do not use PostgreSQL at all: calls are only logged.
    #[arg(long, env = "MILVUS_SIDECAR_NO_RECORDING")]
    pub no_recording: bool,

    /// Do not run migrations at start-up (run `milvus-sidecar migrate` instead).
    #[arg(long, env = "MILVUS_SIDECAR_SKIP_MIGRATIONS")]
    pub skip_migrations: bool,

    /// Records waiting for the writer. When full, new records are dropped, counted and
    /// logged (the writer spills to disk long before that while PostgreSQL is away).
    #[arg(long, env = "MILVUS_SIDECAR_QUEUE_CAPACITY", default_value_t = 65_536)]
    pub queue_capacity: usize,

    /// Largest batch the writer sends in one transaction.
    #[arg(long, env = "MILVUS_SIDECAR_BATCH_ROWS", default_value_t = 2_000)]
    pub batch_rows: usize,

    /// Longest a record waits for its batch to fill before it is written.
    #[arg(long, env = "MILVUS_SIDECAR_FLUSH_INTERVAL", default_value = "20ms", value_parser = humantime::parse_duration)]
    pub flush_interval: Duration,

    /// Directory of the spill file that keeps records while PostgreSQL is unreachable.
    #[arg(long, env = "MILVUS_SIDECAR_SPILL_DIR", default_value = "/tmp/milvus-sidecar-spill")]
    pub spill_dir: std::path::PathBuf,
}

/// Everything `serve` needs. Tests build it with [`Config::local`].
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address for Milvus SDK clients (gRPC over HTTP/2).
    #[arg(long, env = "MILVUS_SIDECAR_LISTEN", default_value = "0.0.0.0:19538")]
    pub listen: SocketAddr,

    /// The Milvus proxy every call is forwarded to.
    #[arg(long, env = "MILVUS_SIDECAR_UPSTREAM", default_value = "http://127.0.0.1:19530", value_parser = parse_upstream)]
    pub upstream: http::Uri,

    /// Address of the health endpoints (`/healthz`, `/readyz`).
    #[arg(long, env = "MILVUS_SIDECAR_ADMIN_LISTEN", default_value = "0.0.0.0:9531")]
    pub admin_listen: SocketAddr,

    /// Largest gRPC message the sidecar reads into memory to inspect (bytes). Larger
    /// inspected calls are refused with RESOURCE_EXHAUSTED; calls that are not inspected
    /// stream through whatever their size.
    #[arg(long, env = "MILVUS_SIDECAR_MAX_MESSAGE_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// How long to wait for a TCP connection to the upstream.
    #[arg(long, env = "MILVUS_SIDECAR_UPSTREAM_CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub upstream_connect_timeout: Duration,

    /// Longest a call may wait for the upstream's reply headers when the client set no
    /// deadline of its own (`grpc-timeout`); unset means no limit, as with Milvus itself.
    #[arg(long, env = "MILVUS_SIDECAR_UPSTREAM_TIMEOUT", value_parser = humantime::parse_duration)]
    pub upstream_timeout: Option<Duration>,

    /// On SIGTERM, how long in-flight calls may take to finish before they are cut.
    #[arg(long, env = "MILVUS_SIDECAR_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Tokio worker threads (0: one per CPU).
    #[arg(long, env = "MILVUS_SIDECAR_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,

    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub recording: RecordingArgs,
}

impl Config {
    /// Loopback listeners on free ports in front of `upstream`, other settings at their defaults.
    pub fn local(upstream: http::Uri) -> Self {
        let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
        Config {
            listen: loopback,
            upstream,
            admin_listen: loopback,
            max_message_bytes: 256 * 1024 * 1024,
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_timeout: None,
            drain_timeout: Duration::from_secs(30),
            worker_threads: 0,
            database: DatabaseArgs::from_url("host=127.0.0.1 user=postgres dbname=postgres"),
            recording: RecordingArgs {
                no_recording: true,
                skip_migrations: false,
                queue_capacity: 65_536,
                batch_rows: 2_000,
                flush_interval: Duration::from_millis(20),
                spill_dir: std::env::temp_dir().join("milvus-sidecar-spill"),
            },
        }
    }
}

fn parse_upstream(s: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("{e}"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http"), Some(_)) => Ok(uri),
        (Some("https"), _) => Err("TLS to the upstream is not supported yet; use http://".into()),
        _ => Err(format!("expected http://HOST:PORT, got {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_must_be_plain_http_with_an_authority() {
        assert!(parse_upstream("http://milvus:19530").is_ok());
        assert!(parse_upstream("milvus:19530").is_err());
        assert!(parse_upstream("https://milvus:19530").is_err());
        assert!(parse_upstream("http:///x").is_err());
    }

    #[test]
    fn defaults_match_the_documented_ports() {
        let cli = Cli::try_parse_from(["milvus-sidecar", "serve"]).unwrap();
        let Command::Serve(cfg) = cli.command else { panic!("serve parses as Serve") };
        let cfg = *cfg;
        assert_eq!(cfg.listen.port(), 19538);
        assert_eq!(cfg.admin_listen.port(), 9531);
        assert_eq!(cfg.upstream, "http://127.0.0.1:19530");
        assert_eq!(cfg.max_message_bytes, 268_435_456);
        assert_eq!(cfg.upstream_timeout, None);
    }
}

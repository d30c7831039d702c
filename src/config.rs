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
    /// Bring the mirror (collections, partitions, indexes) in step with what the upstream
    /// Milvus holds, then exit. `serve` also does this once at start-up.
    Sync(SyncArgs),

    // ---- administration (src/cli/): users, grants, settings, statistics, audit trail ----
    /// Create, list, show, disable, enable users, or set a user's password.
    #[command(subcommand)]
    User(UserCommand),
    /// Grant USER a permission level on COLLECTION (`coll` or `db.coll`). Idempotent.
    Grant(GrantArgs),
    /// Revoke USER's grant on COLLECTION: one LEVEL, or all of them when LEVEL is left out.
    Revoke(RevokeArgs),
    /// Whether USER may do what needs LEVEL on COLLECTION.
    #[command(after_help = "Exit status: 0 allowed, 1 denied, 2 unknown user or collection or bad usage, \
                            3 PostgreSQL unreachable or another failure.")]
    Check(CheckArgs),
    /// Read or change the settings in `system_config` (running sidecars pick changes up).
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Call statistics from the recorded rows.
    #[command(subcommand)]
    Stats(StatsCommand),
    /// The audit trail, newest first.
    Audit(AuditArgs),
}

/// What `sync` reads (`--upstream`, as for `serve`) and the PostgreSQL it updates.
#[derive(Debug, Clone, Args)]
pub struct SyncArgs {
    /// The Milvus proxy whose collections are read.
    #[arg(long, env = "MILVUS_SIDECAR_UPSTREAM", default_value = "http://127.0.0.1:19530", value_parser = parse_upstream)]
    pub upstream: http::Uri,

    /// Credential for a Milvus with authentication of its own (`user:password` or a token).
    #[arg(long, env = "MILVUS_SIDECAR_UPSTREAM_CREDENTIAL", hide_env_values = true)]
    pub upstream_credential: Option<String>,

    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub upstream_tls: UpstreamTlsArgs,
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

    /// Connections the sidecar keeps to PostgreSQL, besides the record writer's own.
    #[arg(long, env = "MILVUS_SIDECAR_DB_POOL_SIZE", default_value_t = 4)]
    pub db_pool_size: u32,

    /// How long `serve` and `migrate` wait at start for an unreachable PostgreSQL (one
    /// started at the same time, still starting up) before giving up; 0 tries once. A PostgreSQL that answers with an
    /// error (wrong password, no such database) fails start-up at once.
    #[arg(long, env = "MILVUS_SIDECAR_DB_STARTUP_WAIT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub db_startup_wait: Duration,
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
            db_startup_wait: Duration::from_secs(60),
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
        detect_dead_peers(&mut config);
        Ok(config)
    }
}

/// How long a PostgreSQL connection may go without an answer at the TCP level (data sent
/// and not acknowledged, or keep-alive probes unanswered) before it is closed.
const DEAD_PEER_AFTER: Duration = Duration::from_secs(30);

/// A PostgreSQL that vanishes without a reset (its node lost, a network partition) would
/// hold the sidecar's connections until TCP gives up on its own: about 15 minutes with
/// data unacknowledged, two hours when idle (tokio-postgres's keep-alive default). Until
/// then the pool hands them out and permission lookups on them time out, even once a
/// replacement PostgreSQL is up. Keep-alive probes after 10 s idle, then every 5 s, and a
/// TCP user timeout close such a connection within [`DEAD_PEER_AFTER`]. Values the URL sets
/// (`keepalives_idle`, `keepalives_interval`, `keepalives_retries`, `tcp_user_timeout`) stay.
fn detect_dead_peers(config: &mut tokio_postgres::Config) {
    let defaults = tokio_postgres::Config::new();
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(DEAD_PEER_AFTER);
    }
    if config.get_keepalives_idle() == defaults.get_keepalives_idle() {
        config.keepalives_idle(Duration::from_secs(10));
    }
    if config.get_keepalives_interval().is_none() {
        config.keepalives_interval(Duration::from_secs(5));
    }
    if config.get_keepalives_retries().is_none() {
        config.keepalives_retries(4);
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

    /// Memory the waiting records may hold, in bytes (about: their text and lists). Past
    /// half of it they go to the spill file, past all of it new records are dropped, as
    /// with `--queue-capacity`; a record larger than this alone is still taken into an
    /// empty queue. One call's filter or schema can run to megabytes.
    #[arg(long, env = "MILVUS_SIDECAR_QUEUE_MAX_BYTES", default_value_t = 64 << 20)]
    pub queue_max_bytes: usize,

    /// Largest batch the writer sends in one transaction.
    #[arg(long, env = "MILVUS_SIDECAR_BATCH_ROWS", default_value_t = 2_000)]
    pub batch_rows: usize,

    /// Longest a record waits for its batch to fill before it is written.
    #[arg(long, env = "MILVUS_SIDECAR_FLUSH_INTERVAL", default_value = "20ms", value_parser = humantime::parse_duration)]
    pub flush_interval: Duration,

    /// Longest PostgreSQL may take over one statement of the writer (a lock held elsewhere,
    /// a stalled disk) before the batch goes to the spill file instead; a batch unanswered
    /// this long plus 1 s after its BEGIN (a server or network gone silent) spills too, and
    /// its connection is closed. 0 waits forever. While the writer waits, records pile up in
    /// the queue; past this they spill.
    #[arg(long, env = "MILVUS_SIDECAR_WRITE_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub write_timeout: Duration,

    /// Directory of the spill file that keeps records while PostgreSQL is unreachable.
    #[arg(long, env = "MILVUS_SIDECAR_SPILL_DIR", default_value = "/tmp/milvus-sidecar-spill")]
    pub spill_dir: std::path::PathBuf,

    /// Largest the spill file may grow, in bytes (0: no cap). Past it, records are dropped,
    /// counted and logged: keep it below the volume's size (a Kubernetes emptyDir past its
    /// sizeLimit evicts the whole pod).
    #[arg(long, env = "MILVUS_SIDECAR_SPILL_MAX_BYTES", default_value_t = 1 << 30)]
    pub spill_max_bytes: u64,

    /// A call's reply ends (its status reaches the client) only once its records are
    /// durable: committed to PostgreSQL, or written and fsynced to the spill file.
    #[arg(long, env = "MILVUS_SIDECAR_DURABLE_RECORDS")]
    pub durable_records: bool,

    /// Keep the record writer's thread at normal CPU priority. By default it runs at idle
    /// priority (SCHED_IDLE) while it keeps up, where the process may raise it back when
    /// records back up (CAP_SYS_NICE, or an RLIMIT_NICE of 20 or more).
    #[arg(long, env = "MILVUS_SIDECAR_RECORDER_NORMAL_PRIORITY")]
    pub recorder_normal_priority: bool,
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

    /// Threads serving calls. One (the default) runs every call on a single thread with no
    /// hand-off between threads: the least CPU and latency per call (see README,
    /// Performance). More spreads calls over that many threads, for a sidecar that must
    /// carry more than one core's worth of calls; 0 is one per CPU.
    #[arg(long, env = "MILVUS_SIDECAR_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,

    /// Before the call thread sleeps for want of work, it polls for this long first, so a
    /// reply or request that arrives meanwhile is taken without a wake-up (0, the default:
    /// off). Cuts the latency the sidecar adds at low concurrency, for a core's CPU while
    /// calls come one at a time; spins only while at most two calls are in flight and
    /// recent waits were within the window, and needs --worker-threads 1 (README,
    /// Performance). At most 1ms.
    #[arg(long, env = "MILVUS_SIDECAR_BUSY_POLL", default_value = "0s", value_parser = parse_busy_poll)]
    pub busy_poll: Duration,

    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub recording: RecordingArgs,

    #[command(flatten)]
    pub auth: AuthArgs,

    #[command(flatten)]
    pub tls: TlsArgs,

    #[command(flatten)]
    pub upstream_tls: UpstreamTlsArgs,

    #[command(flatten)]
    pub limits: ListenerLimits,

    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// TLS on the client listener. Plaintext is allowed only on a loopback address or with
/// `--plaintext`.
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// Certificate chain (PEM) the client listener presents; with --tls-key, clients must
    /// use TLS (1.2 or 1.3). Reloaded when the file changes.
    #[arg(long, env = "MILVUS_SIDECAR_TLS_CERT")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1) of --tls-cert. Reloaded when it changes.
    #[arg(long, env = "MILVUS_SIDECAR_TLS_KEY")]
    pub tls_key: Option<std::path::PathBuf>,

    /// CA certificates (PEM): clients must present a certificate signed by one (mutual TLS).
    #[arg(long, env = "MILVUS_SIDECAR_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<std::path::PathBuf>,

    /// Accept unencrypted client connections on a non-loopback --listen address. Without
    /// TLS and without this, such an address is refused at start-up. A certificate
    /// (--tls-cert) wins over it.
    #[arg(long, env = "MILVUS_SIDECAR_PLAINTEXT")]
    pub plaintext: bool,

    /// How often the TLS files are checked for changes.
    #[arg(long, env = "MILVUS_SIDECAR_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub tls_reload_interval: Duration,
}

impl Default for TlsArgs {
    fn default() -> Self {
        TlsArgs {
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            plaintext: false,
            tls_reload_interval: Duration::from_secs(10),
        }
    }
}

/// TLS towards an `https://` upstream.
#[derive(Debug, Clone, Default, Args)]
pub struct UpstreamTlsArgs {
    /// CA certificates (PEM) an `https://` upstream's certificate must chain to. Without it,
    /// the public web PKI roots are trusted.
    #[arg(long, env = "MILVUS_SIDECAR_UPSTREAM_TLS_CA", value_parser = crate::tls::parse_ca_file)]
    pub upstream_tls_ca: Option<crate::tls::CaFile>,

    /// Name the upstream's certificate is checked against (and sent as SNI), instead of
    /// the host in --upstream.
    #[arg(long, env = "MILVUS_SIDECAR_UPSTREAM_TLS_SERVER_NAME", value_parser = crate::tls::parse_server_name)]
    pub upstream_tls_server_name: Option<String>,
}

impl UpstreamTlsArgs {
    pub fn is_set(&self) -> bool {
        self.upstream_tls_ca.is_some() || self.upstream_tls_server_name.is_some()
    }
}

/// Bounds on what one client can hold of the sidecar.
#[derive(Debug, Clone, Args)]
pub struct ListenerLimits {
    /// Client connections served at once. Past it, new connections wait in the listen
    /// backlog (not accepted) until one closes.
    #[arg(long, env = "MILVUS_SIDECAR_MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Calls (HTTP/2 streams) in flight on one client connection; the client is told this
    /// limit and queues its further calls.
    #[arg(long, env = "MILVUS_SIDECAR_MAX_CONCURRENT_STREAMS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,

    /// Largest header block (decoded, as HTTP/2 counts it) of one call; larger ones are refused.
    #[arg(long, env = "MILVUS_SIDECAR_MAX_HEADER_LIST_BYTES", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u32).range(1024..))]
    pub max_header_list_bytes: u32,

    /// Longest a client may take, from connecting, to finish its TLS handshake (with TLS)
    /// and send the HTTP/2 preface. Past it the connection is closed, so connections that
    /// never speak do not hold --max-connections slots.
    #[arg(long, env = "MILVUS_SIDECAR_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_handshake_timeout)]
    pub handshake_timeout: Duration,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits {
            max_connections: 4096,
            max_concurrent_streams: 1024,
            max_header_list_bytes: 64 * 1024,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// What the sidecar tells its operators: the per-call log and the metrics' labels.
#[derive(Debug, Clone, Default, Args)]
pub struct TelemetryArgs {
    /// Log one line per call at info level (otherwise only failed calls are logged at
    /// info; successful ones at debug under the `milvus_sidecar::call` target).
    #[arg(long, env = "MILVUS_SIDECAR_ACCESS_LOG")]
    pub access_log: bool,

    /// Collections (`db.name`, or `name` in the default database) that get their own
    /// label in `milvus_sidecar_collection_calls_total`, comma-separated. When empty, the
    /// first `--metrics-collection-limit` collections called get one.
    #[arg(long, env = "MILVUS_SIDECAR_METRICS_COLLECTIONS", value_delimiter = ',')]
    pub metrics_collections: Vec<String>,

    /// Most collections with their own metrics label when no allow-list is given; calls
    /// on any other collection count under `other`. 0 turns per-collection labels off.
    #[arg(long, env = "MILVUS_SIDECAR_METRICS_COLLECTION_LIMIT", default_value_t = 20)]
    pub metrics_collection_limit: usize,
}

/// Who may call, and how the sidecar presents itself to Milvus.
#[derive(Debug, Clone, Args)]
pub struct AuthArgs {
    /// Let every call through without authentication or permission checks. Only for a
    /// trusted network; the log says so at start-up.
    #[arg(long, env = "MILVUS_SIDECAR_NO_AUTH")]
    pub no_auth: bool,

    /// Initial password of the `root` admin created on a fresh database.
    #[arg(
        long,
        env = "MILVUS_SIDECAR_ROOT_PASSWORD",
        default_value = "Milvus",
        hide_default_value = true,
        hide_env_values = true
    )]
    pub root_password: String,

    /// Calls without an `authorization` header act as this user (off unless set).
    #[arg(long, env = "MILVUS_SIDECAR_ANONYMOUS_USER")]
    pub anonymous_user: Option<String>,

    /// Methods this build does not know (newer Milvus): admins only, or allowed to all.
    #[arg(long, env = "MILVUS_SIDECAR_UNKNOWN_METHODS", value_enum, default_value_t = crate::auth::authority::UnknownMethods::AdminOnly)]
    pub unknown_methods: crate::auth::authority::UnknownMethods,

    /// When PostgreSQL is unreachable and a permission is not cached, allow the call
    /// instead of refusing it with UNAVAILABLE.
    #[arg(long, env = "MILVUS_SIDECAR_AUTH_FAIL_OPEN")]
    pub auth_fail_open: bool,

    /// How long a verified credential is trusted before PostgreSQL is asked again
    /// (changes to users and grants apply at once regardless, through NOTIFY).
    #[arg(long, env = "MILVUS_SIDECAR_CREDENTIAL_CACHE_TTL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub credential_cache_ttl: Duration,

    /// Credential sent to Milvus instead of the caller's (`user:password` or a token),
    /// for a Milvus with authentication of its own. Unset: the caller's header passes through.
    #[arg(long, env = "MILVUS_SIDECAR_UPSTREAM_CREDENTIAL", hide_env_values = true)]
    pub upstream_credential: Option<String>,
}

impl AuthArgs {
    /// The `authorization` value to send upstream, if the caller's is replaced.
    pub fn upstream_credential_header(&self) -> Option<http::HeaderValue> {
        use base64::Engine;
        let credential = self.upstream_credential.as_ref()?;
        let encoded = base64::engine::general_purpose::STANDARD.encode(credential);
        let mut value = http::HeaderValue::from_str(&encoded).expect("base64 is a valid header value");
        value.set_sensitive(true);
        Some(value)
    }
}

impl Default for AuthArgs {
    fn default() -> Self {
        AuthArgs {
            no_auth: false,
            root_password: "Milvus".into(),
            anonymous_user: None,
            unknown_methods: crate::auth::authority::UnknownMethods::AdminOnly,
            auth_fail_open: false,
            credential_cache_ttl: Duration::from_secs(60),
            upstream_credential: None,
        }
    }
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
            worker_threads: 1,
            busy_poll: Duration::ZERO,
            database: DatabaseArgs::from_url("host=127.0.0.1 user=postgres dbname=postgres"),
            recording: RecordingArgs {
                no_recording: true,
                skip_migrations: false,
                queue_capacity: 65_536,
                queue_max_bytes: 64 << 20,
                batch_rows: 2_000,
                flush_interval: Duration::from_millis(20),
                write_timeout: Duration::from_secs(2),
                spill_dir: std::env::temp_dir().join("milvus-sidecar-spill"),
                spill_max_bytes: 1 << 30,
                durable_records: false,
                recorder_normal_priority: false,
            },
            auth: AuthArgs { no_auth: true, ..AuthArgs::default() },
            telemetry: TelemetryArgs { metrics_collection_limit: 20, ..TelemetryArgs::default() },
            tls: TlsArgs::default(),
            upstream_tls: UpstreamTlsArgs::default(),
            limits: ListenerLimits::default(),
        }
    }
}

fn parse_busy_poll(s: &str) -> Result<Duration, String> {
    let window = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if window > crate::busy_poll::MAX_WINDOW {
        return Err(format!(
            "{s} is longer than the 1ms allowed: a longer spin only burns CPU between calls that are not coming"
        ));
    }
    Ok(window)
}

fn parse_handshake_timeout(s: &str) -> Result<Duration, String> {
    let limit = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if limit.is_zero() {
        return Err("0 would close every connection before it could speak; give a time such as 10s".into());
    }
    Ok(limit)
}

fn parse_upstream(s: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("{e}"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(_)) => Ok(uri),
        _ => Err(format!("expected http://HOST:PORT or https://HOST:PORT, got {s:?}")),
    }
}

// ---------------------------------------------------------------- administration commands
// Arguments of the `user`, `grant`, `revoke`, `check`, `config`, `stats` and `audit`
// commands; src/cli/ carries them out. Every command takes the database flags itself, so
// they may follow the command's own arguments. Passwords are never arguments.

fn role_parser() -> impl clap::builder::TypedValueParser<Value = crate::auth::policy::Role> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["admin", "user"])
        .map(|s| crate::auth::policy::Role::parse(&s).expect("one of the possible values"))
}

fn level_parser() -> impl clap::builder::TypedValueParser<Value = crate::auth::policy::Level> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["read", "write", "admin"])
        .map(|s| crate::auth::policy::Level::parse(&s).expect("one of the possible values"))
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user. The password is prompted for twice on a terminal, else read as one
    /// line from standard input.
    Create(UserCreateArgs),
    /// List the users.
    List(ListArgs),
    /// Show one user and their grants.
    Show(UserShowArgs),
    /// Disable a user: every call they make is refused (their grants are kept).
    Disable(UserNameArgs),
    /// Enable a disabled user again.
    Enable(UserNameArgs),
    /// Set a user's password (prompted for, or read from standard input).
    SetPassword(SetPasswordArgs),
}

#[derive(Debug, Clone, Args)]
pub struct UserCreateArgs {
    /// The user name, as the Milvus SDKs send it (`user:password`).
    pub name: String,
    #[arg(long)]
    pub email: Option<String>,
    /// `admin` may do everything; `user` needs grants.
    #[arg(long, default_value = "user", value_parser = role_parser())]
    pub role: crate::auth::policy::Role,
    /// Read the password as one line from standard input, even on a terminal.
    #[arg(long)]
    pub password_stdin: bool,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

#[derive(Debug, Clone, Args)]
pub struct SetPasswordArgs {
    pub name: String,
    /// Read the password as one line from standard input, even on a terminal.
    #[arg(long)]
    pub password_stdin: bool,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

#[derive(Debug, Clone, Args)]
pub struct UserNameArgs {
    pub name: String,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

#[derive(Debug, Clone, Args)]
pub struct UserShowArgs {
    pub name: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

/// A listing with no arguments of its own.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Print a JSON array of objects instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

#[derive(Debug, Clone, Args)]
pub struct GrantArgs {
    pub user: String,
    /// `collection` (database `default`) or `database.collection`, as in Milvus.
    pub collection: String,
    #[arg(value_parser = level_parser())]
    pub level: crate::auth::policy::Level,
    /// The user recorded as having granted it.
    #[arg(long)]
    pub granted_by: Option<String>,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

#[derive(Debug, Clone, Args)]
pub struct RevokeArgs {
    pub user: String,
    /// `collection` (database `default`) or `database.collection`, as in Milvus.
    pub collection: String,
    /// The level to revoke; all of the user's grants on the collection when left out.
    #[arg(value_parser = level_parser())]
    pub level: Option<crate::auth::policy::Level>,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    pub user: String,
    /// `collection` (database `default`) or `database.collection`, as in Milvus.
    pub collection: String,
    #[arg(value_parser = level_parser())]
    pub level: crate::auth::policy::Level,
    /// Print a JSON object instead of `allowed` / `denied: why`.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print one setting's value.
    Get(ConfigGetArgs),
    /// Change (or add) a setting. Values of the settings the sidecar uses are checked.
    Set(ConfigSetArgs),
    /// List every setting.
    List(ListArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ConfigGetArgs {
    pub key: String,
    /// Print the whole row as a JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ConfigSetArgs {
    pub key: String,
    pub value: String,
    /// The value's type; an existing setting keeps its type when left out, a new one is a string.
    #[arg(long = "type", value_parser = ["string", "integer", "boolean", "json"])]
    pub config_type: Option<String>,
    /// A description for people (kept as it was when left out).
    #[arg(long)]
    pub description: Option<String>,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

#[derive(Debug, Subcommand)]
pub enum StatsCommand {
    /// Per operation: calls, success rate and durations (performance_metrics).
    Performance(StatsPerformanceArgs),
    /// Per live collection: partitions, users with grants, queries (the collection_stats view).
    Collections(ListArgs),
}

#[derive(Debug, Clone, Args)]
pub struct StatsPerformanceArgs {
    /// Only this collection (`collection` or `database.collection`).
    #[arg(long)]
    pub collection: Option<String>,
    /// How many days back.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..=36_500))]
    pub days: u32,
    /// Print a JSON array of objects instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

#[derive(Debug, Clone, Args)]
pub struct AuditArgs {
    /// Only calls made by this user name.
    #[arg(long)]
    pub user: Option<String>,
    /// Only this action (`create_collection`, `insert`, `search`...).
    #[arg(long)]
    pub action: Option<String>,
    /// Only this resource type.
    #[arg(long, value_parser = [
        "collection", "partition", "index", "database", "alias", "data", "user", "role",
        "permission", "resource_group", "system", "other",
    ])]
    pub resource_type: Option<String>,
    /// Only entries since this time: RFC 3339 (`2025-01-31T12:00:00Z`) or a duration ago (`24h`, `7d`).
    #[arg(long)]
    pub since: Option<String>,
    /// At most this many entries.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: u32,
    /// Print a JSON array of objects instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `milvus-sidecar serve` with these flags.
    fn serve_with(args: &[&str]) -> Result<Config, clap::Error> {
        let argv = ["milvus-sidecar", "serve"].iter().chain(args).copied();
        Cli::try_parse_from(argv).map(|cli| match cli.command {
            Command::Serve(cfg) => *cfg,
            _ => panic!("serve parses as Serve"),
        })
    }

    #[test]
    fn upstream_must_be_plain_http_with_an_authority() {
        assert!(parse_upstream("http://milvus:19530").is_ok());
        assert!(parse_upstream("milvus:19530").is_err());
        assert!(parse_upstream("https://milvus:19530").is_ok());
        assert!(parse_upstream("http:///x").is_err());
    }

    #[test]
    fn defaults_match_the_documented_ports() {
        let cfg = serve_with(&[]).unwrap();
        assert_eq!(cfg.listen.port(), 19538);
        assert_eq!(cfg.admin_listen.port(), 9531);
        assert_eq!(cfg.upstream, "http://127.0.0.1:19530");
        assert_eq!(cfg.max_message_bytes, 268_435_456);
        assert_eq!(cfg.upstream_timeout, None);
        let local = Config::local(cfg.upstream.clone());
        assert_eq!(format!("{:?}", cfg.tls), format!("{:?}", local.tls), "TlsArgs::default matches the flags");
        assert_eq!(format!("{:?}", cfg.limits), format!("{:?}", local.limits));
    }

    #[test]
    fn the_handshake_timeout_is_ten_seconds_unless_asked_and_never_zero() {
        let serve = |args: &[&str]| serve_with(args).map(|cfg| cfg.limits.handshake_timeout);
        assert_eq!(serve(&[]).unwrap(), Duration::from_secs(10));
        assert_eq!(serve(&["--handshake-timeout", "3s"]).unwrap(), Duration::from_secs(3));
        let err = serve(&["--handshake-timeout", "0s"]).unwrap_err().to_string();
        assert!(err.contains("would close every connection"), "{err}");
    }

    #[test]
    fn busy_poll_is_off_unless_asked_and_at_most_a_millisecond() {
        let serve = |args: &[&str]| serve_with(args).map(|cfg| cfg.busy_poll);
        assert_eq!(serve(&[]).unwrap(), Duration::ZERO);
        assert_eq!(serve(&["--busy-poll", "50us"]).unwrap(), Duration::from_micros(50));
        let err = serve(&["--busy-poll", "5ms"]).unwrap_err().to_string();
        assert!(err.contains("longer than the 1ms allowed"), "{err}");
    }

    #[test]
    fn postgres_connections_detect_a_dead_peer_unless_the_url_says_otherwise() {
        let config = DatabaseArgs::from_url("postgres://u@db:5432/d").pg_config().unwrap();
        assert!(config.get_keepalives());
        assert_eq!(config.get_tcp_user_timeout(), Some(&DEAD_PEER_AFTER));
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(10));
        assert_eq!(config.get_keepalives_interval(), Some(Duration::from_secs(5)));
        assert_eq!(config.get_keepalives_retries(), Some(4));

        let url = "postgres://u@db:5432/d?keepalives_idle=600&keepalives_interval=60&keepalives_retries=9&tcp_user_timeout=120";
        let config = DatabaseArgs::from_url(url).pg_config().unwrap();
        assert_eq!(config.get_tcp_user_timeout(), Some(&Duration::from_secs(120)));
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(600));
        assert_eq!(config.get_keepalives_interval(), Some(Duration::from_secs(60)));
        assert_eq!(config.get_keepalives_retries(), Some(9));
    }
}

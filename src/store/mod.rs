//! PostgreSQL: the connection pool, migrations, and one module per family of tables.

pub mod logs;
pub mod maintenance;
pub mod migrate;
pub mod mirror;
pub mod system_config;

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use tokio::task::AbortHandle;
use tokio_postgres::{Client, NoTls};

pub type Pool = bb8::Pool<Manager>;

/// How a pool makes sure of a connection before handing it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckOut {
    /// By a query: a connection PostgreSQL dropped (a restart) is found out, at the cost of
    /// a round trip.
    Tested,
    /// Not at all: the caller checks `is_closed()` (see `record::writer`).
    Untested,
}

/// A pool that connects lazily: the sidecar serves calls while PostgreSQL is away.
pub fn pool(config: tokio_postgres::Config, size: u32, check_out: CheckOut) -> Pool {
    bb8::Pool::builder()
        .max_size(size.max(1))
        .connection_timeout(Duration::from_secs(5))
        .test_on_check_out(check_out == CheckOut::Tested)
        .build_unchecked(Manager { config })
}

/// Makes the pool's connections.
pub struct Manager {
    config: tokio_postgres::Config,
}

/// A pooled connection: a client, and the task that drives its socket.
pub struct Connection {
    client: Client,
    driver: AbortHandle,
    abandoned: bool,
}

impl Connection {
    /// Gives up on the connection: it is closed when handed back, not pooled again. For one
    /// that stopped answering, which would hold up its next user the same way until TCP
    /// gives up on it.
    pub fn abandon(&mut self) {
        self.abandoned = true;
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if self.abandoned {
            // Closes the socket now: dropping the client alone would leave its task waiting
            // for the peer to take what was sent.
            self.driver.abort();
        }
    }
}

impl Deref for Connection {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl DerefMut for Connection {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

impl bb8::ManageConnection for Manager {
    type Connection = Connection;
    type Error = tokio_postgres::Error;

    async fn connect(&self) -> Result<Connection, tokio_postgres::Error> {
        let (client, driver) = spawn_connection(&self.config).await?;
        Ok(Connection { client, driver, abandoned: false })
    }

    async fn is_valid(&self, conn: &mut Connection) -> Result<(), tokio_postgres::Error> {
        conn.simple_query("").await.map(drop)
    }

    fn has_broken(&self, conn: &mut Connection) -> bool {
        conn.abandoned || conn.is_closed()
    }
}

/// One connection outside the pool, for migrations and LISTEN.
pub async fn connect(config: &tokio_postgres::Config) -> Result<Client, tokio_postgres::Error> {
    Ok(spawn_connection(config).await?.0)
}

/// Connects, and spawns the task that drives the connection's socket.
async fn spawn_connection(config: &tokio_postgres::Config) -> Result<(Client, AbortHandle), tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    let driver = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection ended");
        }
    });
    Ok((client, driver.abort_handle()))
}

/// How often start-up tries an unreachable PostgreSQL again.
const STARTUP_RETRY: Duration = Duration::from_secs(1);

/// Waits up to `within` for PostgreSQL to accept a connection (returned), for a sidecar started beside
/// a PostgreSQL that is still starting (a whole cluster coming up): exiting instead would
/// leave Milvus unreachable behind a container in crash-loop back-off for minutes after
/// PostgreSQL is up. An error PostgreSQL itself answers with (wrong password, no such
/// database) returns at once: waiting cannot fix it.
pub async fn wait_for_postgres(
    config: &tokio_postgres::Config,
    within: Duration,
) -> anyhow::Result<tokio_postgres::Client> {
    let started = tokio::time::Instant::now();
    let deadline = started + within;
    let mut waited = false;
    loop {
        // A connection attempt to a host that drops packets would hang past the deadline.
        let left = deadline.saturating_duration_since(tokio::time::Instant::now()).max(STARTUP_RETRY);
        let error = match tokio::time::timeout(left, connect(config)).await {
            Ok(Ok(client)) => {
                if waited {
                    tracing::info!(waited = ?started.elapsed(), "PostgreSQL is reachable");
                }
                return Ok(client);
            }
            Ok(Err(e)) if !is_transient(&e) => {
                return Err(anyhow::anyhow!("cannot connect to PostgreSQL: {}", crate::error_chain(&e)));
            }
            Ok(Err(e)) => crate::error_chain(&e),
            Err(_) => format!("no answer within {left:?}"),
        };
        let now = tokio::time::Instant::now();
        if now >= deadline {
            let after = if waited {
                format!(" (waited {} s, --db-startup-wait)", started.elapsed().as_secs())
            } else {
                String::new()
            };
            anyhow::bail!("cannot connect to PostgreSQL{after}: {error}");
        }
        if !waited {
            tracing::warn!(error = error.as_str(), wait = ?within, "PostgreSQL is not reachable yet; trying again every second");
            waited = true;
        }
        // The last try at the deadline itself.
        tokio::time::sleep(STARTUP_RETRY.min(deadline - now)).await;
    }
}

/// Whether an error may go away by itself (PostgreSQL restarting, network), as opposed to
/// a problem with the data that retrying cannot fix.
pub fn is_transient(err: &tokio_postgres::Error) -> bool {
    match err.code() {
        // Class 08 connection exceptions, 57P01-03 shutdown/cannot connect now, 53 resources,
        // 40 serialization/deadlock, 57014 a statement cancelled (its timeout, or an
        // operator), 55P03 a lock not granted in time.
        Some(code) => {
            let c = code.code();
            c.starts_with("08")
                || c.starts_with("57P")
                || c.starts_with("53")
                || c.starts_with("40")
                || c == "57014"
                || c == "55P03"
        }
        // No SQLSTATE: the connection itself failed.
        None => true,
    }
}

/// Whether PostgreSQL answers within `within`, for `/readyz` and the metrics.
pub async fn probe(pool: &Pool, within: Duration) -> Result<(), String> {
    let check = async {
        let conn = pool.get().await.map_err(|e| e.to_string())?;
        conn.simple_query("SELECT 1").await.map_err(|e| crate::error_chain(&e))?;
        Ok(())
    };
    tokio::time::timeout(within, check).await.map_err(|_| format!("no answer within {within:?}"))?
}

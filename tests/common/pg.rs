//! A PostgreSQL database of its own for each test, on the server `TEST_DATABASE_URL` names
//! (scripts/test.sh sets it; the default is this machine kind's local trust-auth server).

use std::sync::atomic::{AtomicU32, Ordering};

use tokio_postgres::NoTls;

pub struct TestDb {
    pub name: String,
    admin: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

impl TestDb {
    pub async fn create() -> TestDb {
        let name = format!("sidecar_t_{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let admin = admin_url();
        let client = connect(&admin).await;
        client.batch_execute(&format!("DROP DATABASE IF EXISTS {name}")).await.unwrap();
        client.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        TestDb { name, admin }
    }

    /// This database's URL, on `host:port` (to go through a relay) or the admin server's.
    pub fn url_via(&self, host_port: Option<&str>) -> String {
        let mut config: tokio_postgres::Config = self.admin.parse().unwrap();
        config.dbname(&self.name);
        if let Some(hp) = host_port {
            let (host, port) = hp.rsplit_once(':').unwrap();
            config = rebuild(&config, host, port.parse().unwrap());
        }
        to_url(&config)
    }

    pub fn url(&self) -> String {
        self.url_via(None)
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url()).await
    }

    /// The server's host:port, for a relay to forward to.
    pub fn server(&self) -> String {
        let config: tokio_postgres::Config = self.admin.parse().unwrap();
        let host = match &config.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            #[allow(unreachable_patterns)]
            _ => "127.0.0.1".into(),
        };
        format!("{host}:{}", config.get_ports().first().copied().unwrap_or(5432))
    }

    pub async fn count(&self, sql: &str) -> i64 {
        self.client().await.query_one(sql, &[]).await.unwrap().get(0)
    }

    /// How many rows, of every table, hold `needle` anywhere (as JSON text).
    pub async fn rows_containing(&self, needle: &str) -> i64 {
        let client = self.client().await;
        let tables = client
            .query(
                "SELECT quote_ident(table_name) FROM information_schema.tables
                 WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
                &[],
            )
            .await
            .unwrap();
        let mut found = 0;
        for table in tables {
            let table: String = table.get(0);
            let sql = format!("SELECT count(*) FROM {table} x WHERE strpos(row_to_json(x)::text, $1) > 0");
            found += client.query_one(&sql, &[&needle]).await.unwrap().get::<_, i64>(0);
        }
        found
    }

    /// How many of the sidecar's connections wait for a lock in a `COPY` into `table` (its
    /// writer, held up by a lock the test took), once that is 1 or after 10 s.
    pub async fn writers_waiting_on(&self, table: &str) -> i64 {
        let sql = format!(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'milvus-sidecar'
               AND wait_event_type = 'Lock' AND query LIKE 'COPY {table}%'"
        );
        self.wait_for_count(&sql, 1).await
    }

    /// Polls `sql` (a count) until it returns `want` or 10 s pass; returns the last value.
    pub async fn wait_for_count(&self, sql: &str, want: i64) -> i64 {
        let client = self.client().await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let got: i64 = client.query_one(sql, &[]).await.unwrap().get(0);
            if got == want || std::time::Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let name = self.name.clone();
        // Dropped from a plain thread: the test's runtime may be shutting down.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let client = connect(&admin).await;
                let _ = client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
            });
        })
        .join();
    }
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL at {url}: {e} (set TEST_DATABASE_URL)"));
    tokio::spawn(conn);
    client
}

fn rebuild(c: &tokio_postgres::Config, host: &str, port: u16) -> tokio_postgres::Config {
    let mut out = tokio_postgres::Config::new();
    out.host(host).port(port);
    if let Some(u) = c.get_user() {
        out.user(u);
    }
    if let Some(p) = c.get_password() {
        out.password(p);
    }
    if let Some(d) = c.get_dbname() {
        out.dbname(d);
    }
    out
}

fn to_url(c: &tokio_postgres::Config) -> String {
    let host = match &c.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        #[allow(unreachable_patterns)]
        _ => "127.0.0.1".into(),
    };
    let port = c.get_ports().first().copied().unwrap_or(5432);
    let user = c.get_user().unwrap_or("postgres");
    let auth = match c.get_password() {
        Some(p) => format!("{user}:{}", String::from_utf8_lossy(p)),
        None => user.to_owned(),
    };
    format!("postgres://{auth}@{host}:{port}/{}", c.get_dbname().unwrap_or("postgres"))
}

//! The administration commands: `user`, `grant`, `revoke`, `check`, `config`, `stats` and
//! `audit`. Each opens one PostgreSQL connection, does its work and prints either aligned
//! columns for people or (`--json`) JSON for scripts.
//!
//! Exit status: 0 done (or `check`: allowed), 1 `check`: denied, 2 bad usage or an unknown
//! user, collection or setting, 3 PostgreSQL unreachable (or another failure). A failure is
//! never 1, so a script calling `check` cannot mistake an outage for a refusal.

mod audit;
mod config;
mod grants;
pub mod output;
mod stats;
mod users;

use std::fmt;
use std::process::ExitCode;
use std::str::FromStr;

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use crate::auth::policy::Role;
use crate::config::{Command, ConfigCommand, DatabaseArgs, StatsCommand, UserCommand};

/// How a command that did not fail ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// `check` said no.
    Denied,
}

/// Why a command failed; each kind has its exit status.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments or input (exit 2).
    #[error("{0}")]
    Usage(String),
    /// An unknown user, collection or setting (exit 2).
    #[error("{0}")]
    NotFound(String),
    /// PostgreSQL unreachable, schema missing, or a query failed (exit 3).
    #[error("{0}")]
    Database(String),
    /// Anything else, reading standard input for one (exit 3).
    #[error("{0}")]
    Other(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) | CliError::NotFound(_) => 2,
            CliError::Database(_) | CliError::Other(_) => 3,
        }
    }
}

impl From<tokio_postgres::Error> for CliError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.code() {
            Some(code) if *code == SqlState::UNDEFINED_TABLE || *code == SqlState::UNDEFINED_FUNCTION => {
                CliError::Database(format!(
                    "the database has no milvus-sidecar schema ({}); run `milvus-sidecar migrate` first",
                    crate::error_chain(&e)
                ))
            }
            Some(_) => CliError::Database(format!("PostgreSQL: {}", crate::error_chain(&e))),
            None => CliError::Database(format!("lost the PostgreSQL connection: {}", crate::error_chain(&e))),
        }
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        CliError::Other(e.to_string())
    }
}

/// Runs one administration command to the end and gives its exit status. Errors go to
/// standard error as `error: ...`.
pub fn run(command: Command) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(3);
        }
    };
    match runtime.block_on(dispatch(command)) {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Denied) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn dispatch(command: Command) -> Result<Outcome, CliError> {
    match command {
        Command::User(cmd) => match cmd {
            UserCommand::Create(a) => users::create(a).await,
            UserCommand::List(a) => users::list(a).await,
            UserCommand::Show(a) => users::show(a).await,
            UserCommand::Disable(a) => users::set_active(a, false).await,
            UserCommand::Enable(a) => users::set_active(a, true).await,
            UserCommand::SetPassword(a) => users::set_password(a).await,
        },
        Command::Grant(a) => grants::grant(a).await,
        Command::Revoke(a) => grants::revoke(a).await,
        Command::Check(a) => grants::check(a).await,
        Command::Config(cmd) => match cmd {
            ConfigCommand::Get(a) => config::get(a).await,
            ConfigCommand::Set(a) => config::set(a).await,
            ConfigCommand::List(a) => config::list(a).await,
        },
        Command::Stats(cmd) => match cmd {
            StatsCommand::Performance(a) => stats::performance(a).await,
            StatsCommand::Collections(a) => stats::collections(a).await,
        },
        Command::Audit(a) => audit::audit(a).await,
        other => Err(CliError::Other(format!("not an administration command: {other:?}"))),
    }
}

/// One connection for the command. The message names the server, never the URL (which may
/// carry a password).
pub(crate) async fn connect(database: &DatabaseArgs) -> Result<Client, CliError> {
    let config = database.pg_config().map_err(|e| CliError::Usage(format!("{e:#}")))?;
    crate::store::connect(&config).await.map_err(|e| {
        CliError::Database(format!("cannot connect to PostgreSQL {}: {}", describe(&config), crate::error_chain(&e)))
    })
}

fn describe(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[allow(unreachable_patterns)]
        Some(other) => format!("{other:?}"),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config.get_dbname().or(config.get_user()).unwrap_or("postgres");
    format!("at {host}:{port} (database {db})")
}

/// A collection named as in Milvus: `collection` (in database `default`) or
/// `database.collection`. Milvus names cannot contain dots, so the first one separates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectionName {
    pub database: String,
    pub name: String,
}

impl FromStr for CollectionName {
    type Err = CliError;

    fn from_str(s: &str) -> Result<Self, CliError> {
        let bad = || {
            CliError::Usage(format!("{s:?} is not a collection name: expected `collection` or `database.collection`"))
        };
        let (database, name) = match s.split_once('.') {
            Some((db, name)) => (db, name),
            None => ("default", s),
        };
        if database.is_empty() || name.is_empty() || name.contains('.') || s.chars().any(char::is_whitespace) {
            return Err(bad());
        }
        Ok(CollectionName { database: database.into(), name: name.into() })
    }
}

impl fmt::Display for CollectionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.database, self.name)
    }
}

/// A row of `users`, as the commands need it.
#[derive(Debug, Clone)]
pub(crate) struct User {
    pub id: Uuid,
    pub name: String,
    pub role: Role,
    pub is_active: bool,
}

pub(crate) async fn find_user(client: &Client, name: &str) -> Result<User, CliError> {
    let row = client
        .query_opt("SELECT id, role, is_active FROM users WHERE username = $1", &[&name])
        .await?
        .ok_or_else(|| CliError::NotFound(format!("no user named {name:?} (see `milvus-sidecar user list`)")))?;
    let role: String = row.get(1);
    let role =
        Role::parse(&role).ok_or_else(|| CliError::Database(format!("user {name:?} has an unknown role {role:?}")))?;
    Ok(User { id: row.get(0), name: name.to_owned(), role, is_active: row.get(2) })
}

/// The live (`active`) row of a collection. The sidecar mirrors collections from Milvus, so
/// a missing one usually means the mirror is behind.
pub(crate) async fn find_collection(client: &Client, collection: &CollectionName) -> Result<Uuid, CliError> {
    let row = client
        .query_opt(
            "SELECT id FROM collections WHERE database_name = $1 AND collection_name = $2 AND status = 'active'",
            &[&collection.database, &collection.name],
        )
        .await?;
    if let Some(row) = row {
        return Ok(row.get(0));
    }
    let dropped: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM collections WHERE database_name = $1 AND collection_name = $2)",
            &[&collection.database, &collection.name],
        )
        .await?
        .get(0);
    let what = if dropped { "was dropped" } else { "is not known to the sidecar" };
    Err(CliError::NotFound(format!(
        "collection {collection} {what}: no active row in `collections`. The sidecar mirrors collections \
         from Milvus; if it exists there, run `milvus-sidecar sync` and try again"
    )))
}

/// Every row (live or dropped) that ever held this name: what history is filtered by.
pub(crate) async fn collection_ids(client: &Client, collection: &CollectionName) -> Result<Vec<Uuid>, CliError> {
    let ids: Vec<Uuid> = client
        .query(
            "SELECT id FROM collections WHERE database_name = $1 AND collection_name = $2",
            &[&collection.database, &collection.name],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if ids.is_empty() {
        return Err(CliError::NotFound(format!(
            "collection {collection} is not known to the sidecar (no row in `collections`); \
             if it exists in Milvus, run `milvus-sidecar sync`"
        )));
    }
    Ok(ids)
}

/// A timestamp for output: RFC 3339 UTC with milliseconds.
pub(crate) fn time(t: Option<std::time::SystemTime>) -> serde_json::Value {
    match t {
        Some(t) => humantime::format_rfc3339_millis(t).to_string().into(),
        None => serde_json::Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collections_are_named_as_in_milvus() {
        let c: CollectionName = "docs".parse().unwrap();
        assert_eq!((c.database.as_str(), c.name.as_str()), ("default", "docs"));
        let c: CollectionName = "sales.docs".parse().unwrap();
        assert_eq!((c.database.as_str(), c.name.as_str()), ("sales", "docs"));
        assert_eq!(c.to_string(), "sales.docs");
        for bad in ["", ".docs", "sales.", "a.b.c", "my docs"] {
            assert!(bad.parse::<CollectionName>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn failures_never_exit_like_a_denial() {
        assert_eq!(CliError::Usage("x".into()).exit_code(), 2);
        assert_eq!(CliError::NotFound("x".into()).exit_code(), 2);
        assert_eq!(CliError::Database("x".into()).exit_code(), 3);
        assert_eq!(CliError::Other("x".into()).exit_code(), 3);
    }
}

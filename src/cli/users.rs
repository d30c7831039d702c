//! `milvus-sidecar user create|list|show|disable|enable|set-password`.
//!
//! Passwords never travel in arguments: they are prompted for (twice, without echo) on a
//! terminal, or read as one line from standard input. Only their argon2id hash is stored;
//! the password itself is neither printed nor logged.

use std::io::{BufRead, IsTerminal};

use serde_json::json;
use tokio_postgres::error::SqlState;

use super::output::{self, Column, Fmt, Row, col, object as row};
use super::{CliError, Outcome, connect, find_user, time};
use crate::auth::password;
use crate::config::{ListArgs, SetPasswordArgs, UserCreateArgs, UserNameArgs, UserShowArgs};

const USER_COLUMNS: &[Column] = &[
    col("USER", "username", Fmt::Text),
    col("ROLE", "role", Fmt::Text),
    col("ACTIVE", "is_active", Fmt::YesNo),
    col("EMAIL", "email", Fmt::Text),
    col("GRANTS", "grants", Fmt::Num),
    col("CREATED", "created_at", Fmt::Time),
    col("LAST_LOGIN", "last_login", Fmt::Time),
];

const SHOW_COLUMNS: &[Column] = &[
    col("user", "username", Fmt::Text),
    col("id", "id", Fmt::Text),
    col("role", "role", Fmt::Text),
    col("active", "is_active", Fmt::YesNo),
    col("email", "email", Fmt::Text),
    col("password", "password_set", Fmt::YesNo),
    col("created", "created_at", Fmt::Time),
    col("updated", "updated_at", Fmt::Time),
    col("last login", "last_login", Fmt::Time),
];

const GRANT_COLUMNS: &[Column] = &[
    col("COLLECTION", "collection", Fmt::Text),
    col("LEVEL", "level", Fmt::Text),
    col("STATUS", "collection_status", Fmt::Text),
    col("GRANTED_BY", "granted_by", Fmt::Text),
    col("GRANTED_AT", "granted_at", Fmt::Time),
];

pub async fn create(args: UserCreateArgs) -> Result<Outcome, CliError> {
    let client = connect(&args.database).await?;
    // Fail before asking for a password that could not be used.
    if client.query_opt("SELECT 1 FROM users WHERE username = $1", &[&args.name]).await?.is_some() {
        return Err(CliError::Usage(format!(
            "a user named {:?} already exists (use `milvus-sidecar user set-password` to change the password)",
            args.name
        )));
    }
    let hash = password::hash(&read_new_password(args.password_stdin)?);
    let inserted = client
        .execute(
            "INSERT INTO users (username, email, password_hash, role) VALUES ($1, $2, $3, $4)",
            &[&args.name, &args.email, &password::HashParam(&hash), &args.role.as_str()],
        )
        .await;
    match inserted {
        Ok(_) => {}
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            return Err(CliError::Usage(format!("a user named {:?} already exists", args.name)));
        }
        Err(e) if e.code() == Some(&SqlState::CHECK_VIOLATION) => {
            return Err(CliError::Usage(format!("{:?} is not a valid user name (1 to 256 characters)", args.name)));
        }
        Err(e) => return Err(e.into()),
    }
    output::emit(&format!("created user {} (role {})\n", args.name, args.role.as_str()))?;
    Ok(Outcome::Done)
}

pub async fn set_password(args: SetPasswordArgs) -> Result<Outcome, CliError> {
    let client = connect(&args.database).await?;
    let user = find_user(&client, &args.name).await?;
    let hash = password::hash(&read_new_password(args.password_stdin)?);
    let updated = client
        .execute(
            "UPDATE users SET password_hash = $2, updated_at = now() WHERE id = $1",
            &[&user.id, &password::HashParam(&hash)],
        )
        .await?;
    if updated == 0 {
        return Err(CliError::NotFound(format!("no user named {:?}", args.name)));
    }
    output::emit(&format!("set the password of user {}\n", user.name))?;
    Ok(Outcome::Done)
}

pub async fn set_active(args: UserNameArgs, active: bool) -> Result<Outcome, CliError> {
    let client = connect(&args.database).await?;
    let user = find_user(&client, &args.name).await?;
    let verb = if active { "enabled" } else { "disabled" };
    if user.is_active == active {
        output::emit(&format!("user {} is already {verb}\n", user.name))?;
        return Ok(Outcome::Done);
    }
    client.execute("UPDATE users SET is_active = $2, updated_at = now() WHERE id = $1", &[&user.id, &active]).await?;
    output::emit(&format!("{verb} user {}\n", user.name))?;
    Ok(Outcome::Done)
}

pub async fn list(args: ListArgs) -> Result<Outcome, CliError> {
    let client = connect(&args.database).await?;
    let rows: Vec<Row> = client
        .query(
            "SELECT u.username, u.email, u.role, u.is_active, u.created_at, u.last_login,
                    (SELECT count(*) FROM permissions p WHERE p.user_id = u.id)
             FROM users u ORDER BY u.username",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            row(json!({
                "username": r.get::<_, String>(0),
                "email": r.get::<_, Option<String>>(1),
                "role": r.get::<_, String>(2),
                "is_active": r.get::<_, bool>(3),
                "created_at": time(r.get(4)),
                "last_login": time(r.get(5)),
                "grants": r.get::<_, i64>(6),
            }))
        })
        .collect();
    output::print_rows(&rows, USER_COLUMNS, args.json)?;
    Ok(Outcome::Done)
}

pub async fn show(args: UserShowArgs) -> Result<Outcome, CliError> {
    let client = connect(&args.database).await?;
    let r = client
        .query_opt(
            "SELECT id, username, email, role, is_active, password_hash IS NOT NULL,
                    created_at, updated_at, last_login
             FROM users WHERE username = $1",
            &[&args.name],
        )
        .await?
        .ok_or_else(|| CliError::NotFound(format!("no user named {:?} (see `milvus-sidecar user list`)", args.name)))?;
    let id: uuid::Uuid = r.get(0);
    let mut user = row(json!({
        "id": id.to_string(),
        "username": r.get::<_, String>(1),
        "email": r.get::<_, Option<String>>(2),
        "role": r.get::<_, String>(3),
        "is_active": r.get::<_, bool>(4),
        "password_set": r.get::<_, bool>(5),
        "created_at": time(r.get(6)),
        "updated_at": time(r.get(7)),
        "last_login": time(r.get(8)),
    }));
    let grants: Vec<Row> = client
        .query(
            "SELECT c.database_name || '.' || c.collection_name, p.permission_type, c.status, g.username, p.granted_at
             FROM permissions p
             JOIN collections c ON c.id = p.collection_id
             LEFT JOIN users g ON g.id = p.granted_by
             WHERE p.user_id = $1
             ORDER BY c.database_name, c.collection_name, c.status,
                      array_position(ARRAY['read', 'write', 'admin'], p.permission_type)",
            &[&id],
        )
        .await?
        .iter()
        .map(|g| {
            row(json!({
                "collection": g.get::<_, String>(0),
                "level": g.get::<_, String>(1),
                "collection_status": g.get::<_, String>(2),
                "granted_by": g.get::<_, Option<String>>(3),
                "granted_at": time(g.get(4)),
            }))
        })
        .collect();
    if args.json {
        user.insert("grants".into(), grants.into_iter().map(serde_json::Value::Object).collect());
        output::emit(&output::json_text(&user))?;
    } else {
        let mut text = output::record(&user, SHOW_COLUMNS);
        if grants.is_empty() {
            text.push_str("\nno grants\n");
        } else {
            text.push_str("\ngrants:\n");
            text.push_str(&output::table(&grants, GRANT_COLUMNS));
        }
        output::emit(&text)?;
    }
    Ok(Outcome::Done)
}

/// A new password: prompted for twice without echo on a terminal (unless `from_stdin`),
/// else the first line of standard input.
fn read_new_password(from_stdin: bool) -> Result<String, CliError> {
    let stdin = std::io::stdin();
    let password = if !from_stdin && stdin.is_terminal() {
        let first = rpassword::prompt_password("New password: ")?;
        let again = rpassword::prompt_password("Repeat the password: ")?;
        if first != again {
            return Err(CliError::Usage("the passwords differ; nothing was changed".into()));
        }
        first
    } else {
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            return Err(CliError::Usage(
                "no password on standard input (give it as one line, e.g. `printf '%s\\n' \"$PW\" | ...`)".into(),
            ));
        }
        let end = line.trim_end_matches(['\n', '\r']).len();
        line.truncate(end);
        line
    };
    if password.is_empty() {
        return Err(CliError::Usage("the password is empty; nothing was changed".into()));
    }
    Ok(password)
}

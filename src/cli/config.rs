//! `milvus-sidecar config get|set|list`: the `system_config` table. Running sidecars are
//! notified of every change (the table's trigger) and apply it within moments.

use serde_json::json;
use tokio_postgres::Row as PgRow;

use super::output::{self, Column, Fmt, Row, col, object};
use super::{CliError, Outcome, connect, time};
use crate::config::{ConfigGetArgs, ConfigSetArgs, ListArgs};
use crate::settings::Settings;

/// Who `updated_by` names for changes made here.
const UPDATED_BY: &str = "cli";

const COLUMNS: &[Column] = &[
    col("KEY", "key", Fmt::Text),
    col("VALUE", "value", Fmt::Text),
    col("TYPE", "type", Fmt::Text),
    col("UPDATED", "updated_at", Fmt::Time),
    col("BY", "updated_by", Fmt::Text),
    col("DESCRIPTION", "description", Fmt::Text),
];

const SELECT: &str =
    "SELECT config_key, config_value, config_type, description, updated_at, updated_by FROM system_config";

fn to_row(r: &PgRow) -> Row {
    object(json!({
        "key": r.get::<_, String>(0),
        "value": r.get::<_, String>(1),
        "type": r.get::<_, String>(2),
        "description": r.get::<_, Option<String>>(3),
        "updated_at": time(r.get(4)),
        "updated_by": r.get::<_, Option<String>>(5),
    }))
}

pub async fn get(args: ConfigGetArgs) -> Result<Outcome, CliError> {
    let client = connect(&args.database).await?;
    let r = client.query_opt(&format!("{SELECT} WHERE config_key = $1"), &[&args.key]).await?.ok_or_else(|| {
        CliError::NotFound(format!("no setting named {:?} (see `milvus-sidecar config list`)", args.key))
    })?;
    if args.json {
        output::emit(&output::json_text(&to_row(&r)))?;
    } else {
        output::emit(&format!("{}\n", r.get::<_, String>(1)))?;
    }
    Ok(Outcome::Done)
}

pub async fn list(args: ListArgs) -> Result<Outcome, CliError> {
    let client = connect(&args.database).await?;
    let rows: Vec<Row> =
        client.query(&format!("{SELECT} ORDER BY config_key"), &[]).await?.iter().map(to_row).collect();
    output::print_rows(&rows, COLUMNS, args.json)?;
    Ok(Outcome::Done)
}

pub async fn set(args: ConfigSetArgs) -> Result<Outcome, CliError> {
    let client = connect(&args.database).await?;
    let current: Option<String> = client
        .query_opt("SELECT config_type FROM system_config WHERE config_key = $1", &[&args.key])
        .await?
        .map(|r| r.get(0));
    // An existing setting keeps its type unless told otherwise; a new one is a string.
    let config_type = args.config_type.clone().or(current).unwrap_or_else(|| "string".into());
    validate(&args.key, &args.value, &config_type)
        .map_err(|why| CliError::Usage(format!("{why}; nothing was changed")))?;
    client
        .execute(
            "INSERT INTO system_config (config_key, config_value, config_type, description, updated_at, updated_by)
             VALUES ($1, $2, $3, $4, now(), $5)
             ON CONFLICT (config_key) DO UPDATE SET
                 config_value = EXCLUDED.config_value,
                 config_type = EXCLUDED.config_type,
                 description = coalesce(EXCLUDED.description, system_config.description),
                 updated_at = now(),
                 updated_by = EXCLUDED.updated_by",
            &[&args.key, &args.value, &config_type, &args.description, &UPDATED_BY],
        )
        .await?;
    output::emit(&format!("set {} = {:?} ({config_type})\n", args.key, args.value))?;
    Ok(Outcome::Done)
}

/// Whether `value` may be stored under `key` with `config_type`: it must be of that type,
/// and a setting the sidecar reads must accept it exactly as the sidecar will (its own
/// [`Settings::apply`], on a throwaway instance).
fn validate(key: &str, value: &str, config_type: &str) -> Result<(), String> {
    let bad = |what: &str| format!("system_config {key} = {value:?} is not {what}");
    if key.is_empty() {
        return Err("the key is empty".into());
    }
    match config_type {
        "integer" if value.trim().parse::<i64>().is_err() => return Err(bad("an integer")),
        "boolean" if !is_bool(value) => return Err(bad("a boolean (true or false)")),
        "json" if serde_json::from_str::<serde_json::Value>(value).is_err() => return Err(bad("valid JSON")),
        _ => {}
    }
    Settings::default().apply(key, value).map_err(|e| e.trim_end_matches("; keeping the previous value").to_owned())
}

/// The spellings the sidecar reads as booleans (settings.rs).
fn is_bool(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "true" | "t" | "yes" | "on" | "1" | "false" | "f" | "no" | "off" | "0"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_must_fit_their_type_and_the_sidecar() {
        assert!(validate("enable_audit_logging", "false", "boolean").is_ok());
        let why = validate("enable_audit_logging", "maybe", "boolean").unwrap_err();
        assert!(why.contains("not a boolean"), "{why}");
        // Known to the sidecar: its own check applies whatever the declared type.
        let why = validate("enable_audit_logging", "maybe", "string").unwrap_err();
        assert!(why.contains("not a boolean") && !why.contains("keeping"), "{why}");
        assert!(validate("data_retention_days", "30", "integer").is_ok());
        assert!(validate("data_retention_days", "0", "integer").is_err());
        assert!(validate("default_top_k", "ten", "integer").is_err());
        assert!(validate("dashboard", "{\"a\": 1}", "json").is_ok());
        assert!(validate("dashboard", "{a", "json").is_err());
        assert!(validate("motd", "anything at all", "string").is_ok());
    }
}

//! `milvus-sidecar grant|revoke|check`: per-collection permissions. `check` decides with
//! [`policy::allows`], the rule the sidecar itself applies.

use serde_json::json;
use tokio_postgres::Client;
use uuid::Uuid;

use super::output;
use super::{CliError, CollectionName, Outcome, User, collection_ids, connect, find_collection, find_user};
use crate::auth::policy::{self, Level, Role};
use crate::config::{CheckArgs, GrantArgs, RevokeArgs};

pub async fn grant(args: GrantArgs) -> Result<Outcome, CliError> {
    let collection: CollectionName = args.collection.parse()?;
    let client = connect(&args.database).await?;
    let user = find_user(&client, &args.user).await?;
    let collection_id = find_collection(&client, &collection).await?;
    let granted_by = match &args.granted_by {
        Some(name) => Some(find_user(&client, name).await?.id),
        None => None,
    };
    let inserted = client
        .execute(
            "INSERT INTO permissions (user_id, collection_id, permission_type, granted_by)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (user_id, collection_id, permission_type) DO NOTHING",
            &[&user.id, &collection_id, &args.level.as_str(), &granted_by],
        )
        .await?;
    let level = args.level.as_str();
    let mut text = if inserted == 1 {
        format!("granted {level} on {collection} to {}\n", user.name)
    } else {
        format!("{} already has {level} on {collection}\n", user.name)
    };
    if user.role == Role::Admin {
        text.push_str(&format!("note: {} has the admin role, which may do everything without grants\n", user.name));
    }
    if !user.is_active {
        text.push_str(&format!("note: {} is disabled; the grant applies once they are enabled\n", user.name));
    }
    output::emit(&text)?;
    Ok(Outcome::Done)
}

pub async fn revoke(args: RevokeArgs) -> Result<Outcome, CliError> {
    let collection: CollectionName = args.collection.parse()?;
    let client = connect(&args.database).await?;
    let user = find_user(&client, &args.user).await?;
    // Grants on earlier (dropped) collections of the same name go too: after a revoke the
    // user holds nothing under that name.
    let ids = collection_ids(&client, &collection).await?;
    let level = args.level.map(Level::as_str);
    let removed = client
        .execute(
            "DELETE FROM permissions
             WHERE user_id = $1 AND collection_id = ANY($2) AND ($3::text IS NULL OR permission_type = $3)",
            &[&user.id, &ids, &level],
        )
        .await?;
    let what = match level {
        Some(l) => format!("{l} grant"),
        None if removed == 1 => "grant".to_owned(),
        None => "grants".to_owned(),
    };
    let text = if removed == 0 {
        format!("{} had no {what} on {collection}; nothing to revoke\n", user.name)
    } else {
        format!("revoked {removed} {what} on {collection} from {}\n", user.name)
    };
    output::emit(&text)?;
    Ok(Outcome::Done)
}

pub async fn check(args: CheckArgs) -> Result<Outcome, CliError> {
    let collection: CollectionName = args.collection.parse()?;
    let client = connect(&args.database).await?;
    let user = find_user(&client, &args.user).await?;
    let collection_id = find_collection(&client, &collection).await?;
    let granted = highest_grant(&client, user.id, collection_id).await?;
    let decision = decide(&user, granted, args.level, &collection);
    if args.json {
        let value = json!({
            "user": user.name,
            "collection": collection.to_string(),
            "level": args.level.as_str(),
            "role": user.role.as_str(),
            "is_active": user.is_active,
            "granted": granted.map(Level::as_str),
            "allowed": decision.is_ok(),
            "reason": decision.as_ref().err(),
        });
        output::emit(&output::json_text(&value))?;
    } else {
        match &decision {
            Ok(()) => output::emit("allowed\n")?,
            Err(why) => output::emit(&format!("denied: {why}\n"))?,
        }
    }
    Ok(if decision.is_ok() { Outcome::Done } else { Outcome::Denied })
}

async fn highest_grant(client: &Client, user: Uuid, collection: Uuid) -> Result<Option<Level>, CliError> {
    let rows = client
        .query(
            "SELECT permission_type FROM permissions WHERE user_id = $1 AND collection_id = $2",
            &[&user, &collection],
        )
        .await?;
    Ok(rows.iter().filter_map(|r| Level::parse(r.get(0))).max())
}

/// The decision and, when denied, why. A disabled user is refused everything; otherwise
/// [`policy::allows`] decides.
fn decide(user: &User, granted: Option<Level>, needed: Level, collection: &CollectionName) -> Result<(), String> {
    if !user.is_active {
        return Err(format!("user {} is disabled", user.name));
    }
    if policy::allows(user.role, granted, needed) {
        return Ok(());
    }
    Err(match granted {
        None => format!("{} has no grant on {collection}", user.name),
        Some(g) => format!(
            "{} has only {} on {collection}; {} needs a {} grant or higher",
            user.name,
            g.as_str(),
            needed.as_str(),
            needed.as_str()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(role: Role, is_active: bool) -> User {
        User { id: Uuid::nil(), name: "alice".into(), role, is_active }
    }

    #[test]
    fn decisions_follow_the_policy_and_disabled_users_get_nothing() {
        let c: CollectionName = "docs".parse().unwrap();
        assert!(decide(&user(Role::User, true), Some(Level::Write), Level::Read, &c).is_ok());
        let why = decide(&user(Role::User, true), Some(Level::Read), Level::Write, &c).unwrap_err();
        assert!(why.contains("only read on default.docs"), "{why}");
        let why = decide(&user(Role::User, true), None, Level::Read, &c).unwrap_err();
        assert!(why.contains("no grant"), "{why}");
        assert!(decide(&user(Role::Admin, true), None, Level::Admin, &c).is_ok());
        let why = decide(&user(Role::Admin, false), None, Level::Read, &c).unwrap_err();
        assert_eq!(why, "user alice is disabled");
    }
}

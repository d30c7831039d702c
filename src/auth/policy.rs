//! Who may do what: the rule every decision (and `milvus-sidecar check`) goes through.

use serde::{Deserialize, Serialize};

/// A user's role (`users.role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Admin,
    User,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "user" => Some(Role::User),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
        }
    }
}

/// A grant on one collection (`permissions.permission_type`). Each level includes the ones
/// below it: admin > write > read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Level {
    Read,
    Write,
    Admin,
}

impl Level {
    pub fn parse(s: &str) -> Option<Level> {
        match s {
            "read" => Some(Level::Read),
            "write" => Some(Level::Write),
            "admin" => Some(Level::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Level::Read => "read",
            Level::Write => "write",
            Level::Admin => "admin",
        }
    }
}

/// Whether a user with `role` and the highest grant `granted` on a collection may do what
/// needs `needed` there. The admin role may do everything.
pub fn allows(role: Role, granted: Option<Level>, needed: Level) -> bool {
    role == Role::Admin || granted.is_some_and(|g| g >= needed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_include_the_ones_below_and_admins_need_no_grant() {
        assert!(allows(Role::User, Some(Level::Admin), Level::Read));
        assert!(allows(Role::User, Some(Level::Write), Level::Write));
        assert!(!allows(Role::User, Some(Level::Read), Level::Write));
        assert!(!allows(Role::User, Some(Level::Write), Level::Admin));
        assert!(!allows(Role::User, None, Level::Read));
        assert!(allows(Role::Admin, None, Level::Admin));
    }
}

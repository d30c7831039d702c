//! Settings operators change while the sidecar runs (`system_config` in PostgreSQL).
//! Read on the request path with relaxed atomic loads: no lock, no PostgreSQL round trip.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug)]
pub struct Settings {
    audit: AtomicBool,
    audit_every_call: AtomicBool,
    performance: AtomicBool,
    /// Milliseconds; 0 means no cap.
    max_query_timeout_ms: AtomicU64,
    retention_days: AtomicU32,
    users_may_create_collections: AtomicBool,
}

impl Default for Settings {
    /// The seed's defaults, in force until `system_config` has been read.
    fn default() -> Self {
        Settings {
            audit: AtomicBool::new(true),
            audit_every_call: AtomicBool::new(false),
            performance: AtomicBool::new(true),
            max_query_timeout_ms: AtomicU64::new(300_000),
            retention_days: AtomicU32::new(90),
            users_may_create_collections: AtomicBool::new(true),
        }
    }
}

impl Settings {
    pub fn audit(&self) -> bool {
        self.audit.load(Ordering::Relaxed)
    }

    /// Audit every call, not only the ones that change state or were refused.
    pub fn audit_every_call(&self) -> bool {
        self.audit_every_call.load(Ordering::Relaxed)
    }

    pub fn performance(&self) -> bool {
        self.performance.load(Ordering::Relaxed)
    }

    /// Longest deadline a Search or Query may have.
    pub fn max_query_timeout(&self) -> Option<Duration> {
        match self.max_query_timeout_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Whether role `user` may create collections (else only admins).
    pub fn users_may_create_collections(&self) -> bool {
        self.users_may_create_collections.load(Ordering::Relaxed)
    }

    pub fn retention_days(&self) -> u32 {
        self.retention_days.load(Ordering::Relaxed)
    }

    /// Applies one `system_config` row. Unknown keys are ignored (they may be meant for
    /// people or other tools); a value that does not parse is reported and leaves the
    /// setting as it was.
    pub fn apply(&self, key: &str, value: &str) -> Result<(), String> {
        let bad = |what: &str| format!("system_config {key} = {value:?} is not {what}; keeping the previous value");
        match key {
            "enable_audit_logging" => {
                self.audit.store(parse_bool(value).ok_or_else(|| bad("a boolean"))?, Ordering::Relaxed)
            }
            "audit_all_calls" => {
                self.audit_every_call.store(parse_bool(value).ok_or_else(|| bad("a boolean"))?, Ordering::Relaxed)
            }
            "enable_performance_monitoring" => {
                self.performance.store(parse_bool(value).ok_or_else(|| bad("a boolean"))?, Ordering::Relaxed)
            }
            "max_query_timeout" => {
                let secs: f64 =
                    value.trim().parse().ok().filter(|s: &f64| *s >= 0.0).ok_or_else(|| bad("a number of seconds"))?;
                self.max_query_timeout_ms.store((secs * 1000.0) as u64, Ordering::Relaxed)
            }
            "users_may_create_collections" => self
                .users_may_create_collections
                .store(parse_bool(value).ok_or_else(|| bad("a boolean"))?, Ordering::Relaxed),
            "data_retention_days" => {
                let days: u32 =
                    value.trim().parse().ok().filter(|d| *d > 0).ok_or_else(|| bad("a positive number of days"))?;
                self.retention_days.store(days, Ordering::Relaxed)
            }
            _ => {}
        }
        Ok(())
    }
}

fn parse_bool(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "t" | "yes" | "on" | "1" => Some(true),
        "false" | "f" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_switch_settings_and_bad_values_change_nothing() {
        let s = Settings::default();
        assert!(s.audit() && s.performance());
        s.apply("enable_audit_logging", "false").unwrap();
        s.apply("enable_performance_monitoring", "off").unwrap();
        s.apply("max_query_timeout", "2.5").unwrap();
        assert!(!s.audit() && !s.performance());
        assert_eq!(s.max_query_timeout(), Some(Duration::from_millis(2500)));
        assert!(s.apply("max_query_timeout", "soon").is_err());
        assert_eq!(s.max_query_timeout(), Some(Duration::from_millis(2500)));
        s.apply("max_query_timeout", "0").unwrap();
        assert_eq!(s.max_query_timeout(), None);
        assert!(s.apply("data_retention_days", "0").is_err());
        s.apply("some_note_for_humans", "anything").unwrap();
    }
}

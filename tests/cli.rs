//! The administration commands, run as the real binary against a real PostgreSQL: a fresh
//! database per test (on `TEST_DATABASE_URL`), migrated by `milvus-sidecar migrate`, with
//! the rows the sidecar would have recorded inserted directly.

#[allow(dead_code)] // this crate uses only part of the helper
#[path = "common/pg.rs"]
mod pg;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use milvus_sidecar::auth::password;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_milvus-sidecar");

/// A migrated database of its own, dropped (WITH (FORCE)) when the test ends.
struct Env {
    db: pg::TestDb,
    url: String,
}

impl Env {
    async fn new() -> Env {
        let db = pg::TestDb::create().await;
        let url = db.url();
        let env = Env { db, url };
        let out = env.run(&["migrate"], None);
        assert_eq!(code(&out), 0, "migrate: {}", text(&out.stderr));
        // The mirror the sidecar keeps: two live collections, one of them in another database.
        env.sql(
            "INSERT INTO collections (database_name, collection_name, dimension) VALUES
                 ('default', 'docs', 8), ('sales', 'orders', 4)",
        )
        .await;
        env
    }

    /// Runs `milvus-sidecar ARGS --database-url URL`, feeding `stdin` if given (else no input).
    fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .args(["--database-url", &self.url])
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        let mut child = cmd.spawn().expect("the milvus-sidecar binary runs");
        if let Some(input) = stdin {
            child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        }
        child.wait_with_output().unwrap()
    }

    /// Runs and expects exit status `want`; gives stdout.
    fn expect(&self, want: i32, args: &[&str]) -> String {
        let out = self.run(args, None);
        assert_eq!(
            code(&out),
            want,
            "milvus-sidecar {args:?}\nstdout: {}\nstderr: {}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.expect(0, &all);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} --json printed no JSON ({e}): {out}"))
    }

    async fn sql(&self, sql: &str) {
        self.db.client().await.batch_execute(sql).await.unwrap();
    }
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited, not killed")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn users_grants_and_checks() {
    let env = Env::new().await;
    let secret = "Corr3ct-Horse-Battery-Staple";

    // Create: the password comes from standard input, only its argon2id hash is stored.
    let out = env.run(
        &["user", "create", "alice", "--email", "alice@example.com", "--password-stdin"],
        Some(&format!("{secret}\n")),
    );
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    for stream in [&out.stdout, &out.stderr] {
        assert!(!text(stream).contains(secret), "the password was printed: {}", text(stream));
    }
    let client = env.db.client().await;
    let row = client
        .query_one("SELECT password_hash, role, is_active, email FROM users WHERE username = 'alice'", &[])
        .await
        .unwrap();
    let hash: String = row.get(0);
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(password::verify(&hash, secret));
    assert_eq!((row.get::<_, String>(1).as_str(), row.get::<_, bool>(2)), ("user", true));
    assert_eq!(row.get::<_, String>(3), "alice@example.com");
    assert_eq!(env.db.rows_containing(secret).await, 0, "the plaintext password is stored somewhere");

    // Without the flag and without a terminal, the first line of standard input is the password.
    let out = env.run(&["user", "create", "bob", "--role", "admin"], Some("bobs-password\r\nignored\n"));
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let bob: String =
        client.query_one("SELECT password_hash FROM users WHERE username = 'bob'", &[]).await.unwrap().get(0);
    assert!(password::verify(&bob, "bobs-password"));

    // No password, an existing name, a bad role: usage errors, and nothing is created.
    let out = env.run(&["user", "create", "carol"], None);
    assert_eq!(code(&out), 2);
    assert!(text(&out.stderr).contains("no password"), "{}", text(&out.stderr));
    let out = env.run(&["user", "create", "alice", "--password-stdin"], Some("x\n"));
    assert_eq!(code(&out), 2);
    assert!(text(&out.stderr).contains("already exists"), "{}", text(&out.stderr));
    env.expect(2, &["user", "create", "carol", "--role", "root"]);
    assert_eq!(env.db.count("SELECT count(*) FROM users").await, 2);

    let users = env.json(&["user", "list"]);
    let names: Vec<&str> = users.as_array().unwrap().iter().map(|u| u["username"].as_str().unwrap()).collect();
    assert_eq!(names, ["alice", "bob"]);
    assert_eq!(users[1]["role"], "admin");
    let table = env.expect(0, &["user", "list"]);
    assert!(table.starts_with("USER "), "{table}");
    assert_eq!(table.lines().count(), 3);

    // Grants: idempotent; collections named `coll` (database default) or `db.coll`.
    assert!(env.expect(0, &["grant", "alice", "docs", "read"]).contains("granted read on default.docs to alice"));
    assert!(env.expect(0, &["grant", "alice", "default.docs", "read"]).contains("already has read"));
    env.expect(0, &["grant", "alice", "sales.orders", "write", "--granted-by", "bob"]);
    assert_eq!(env.db.count("SELECT count(*) FROM permissions").await, 2);

    assert_eq!(env.expect(0, &["check", "alice", "docs", "read"]), "allowed\n");
    let denied = env.expect(1, &["check", "alice", "docs", "write"]);
    assert!(denied.starts_with("denied: ") && denied.contains("only read"), "{denied}");
    env.expect(0, &["check", "alice", "sales.orders", "read"]);
    env.expect(1, &["check", "alice", "sales.orders", "admin"]);
    env.expect(0, &["check", "bob", "docs", "admin"]); // the admin role needs no grant
    let decision: Value = serde_json::from_str(&env.expect(1, &["check", "alice", "docs", "write", "--json"])).unwrap();
    assert_eq!(decision["allowed"], false);
    assert_eq!(decision["granted"], "read");

    let shown = env.json(&["user", "show", "alice"]);
    assert_eq!(shown["username"], "alice");
    assert_eq!(shown["password_set"], true);
    assert!(shown.get("password_hash").is_none());
    let grants = shown["grants"].as_array().unwrap();
    assert_eq!(grants.len(), 2);
    assert_eq!(grants[1]["collection"], "sales.orders");
    assert_eq!(grants[1]["level"], "write");
    assert_eq!(grants[1]["granted_by"], "bob");
    let shown = env.expect(0, &["user", "show", "alice"]);
    assert!(shown.contains("grants:") && shown.contains("sales.orders"), "{shown}");
    assert!(!shown.contains("$argon2id$"), "{shown}");

    // Unknown users and collections: clear errors, exit 2 (not 1, which means denied).
    let out = env.run(&["grant", "alice", "nosuch", "read"], None);
    assert_eq!(code(&out), 2);
    let err = text(&out.stderr);
    assert!(err.contains("default.nosuch") && err.contains("milvus-sidecar sync"), "{err}");
    let out = env.run(&["check", "nobody", "docs", "read"], None);
    assert_eq!(code(&out), 2);
    assert!(text(&out.stderr).contains("no user named \"nobody\""), "{}", text(&out.stderr));
    env.expect(2, &["check", "alice", "nosuch", "read"]);
    env.expect(2, &["grant", "alice", "docs", "read", "--granted-by", "nobody"]);
    env.expect(2, &["grant", "alice", "docs", "superuser"]);
    env.expect(2, &["grant", "alice", "a.b.c", "read"]);
    env.expect(2, &["user", "show", "nobody"]);
    env.expect(2, &["user", "disable", "nobody"]);

    // Revoke one level, or all of them.
    env.expect(0, &["grant", "alice", "docs", "write"]);
    env.expect(0, &["check", "alice", "docs", "write"]);
    assert!(env.expect(0, &["revoke", "alice", "docs", "write"]).contains("revoked 1 write grant"));
    env.expect(1, &["check", "alice", "docs", "write"]);
    env.expect(0, &["check", "alice", "docs", "read"]);
    env.expect(0, &["revoke", "alice", "docs"]);
    env.expect(1, &["check", "alice", "docs", "read"]);
    assert!(env.expect(0, &["revoke", "alice", "docs"]).contains("nothing to revoke"));

    // A disabled user is refused everything, grants or not; enabling restores them.
    env.expect(0, &["grant", "alice", "docs", "read"]);
    env.expect(0, &["user", "disable", "alice"]);
    assert!(
        !client.query_one("SELECT is_active FROM users WHERE username = 'alice'", &[]).await.unwrap().get::<_, bool>(0)
    );
    assert_eq!(env.expect(1, &["check", "alice", "docs", "read"]), "denied: user alice is disabled\n");
    env.expect(0, &["user", "enable", "alice"]);
    env.expect(0, &["check", "alice", "docs", "read"]);

    // A new password replaces the hash.
    let out = env.run(&["user", "set-password", "alice", "--password-stdin"], Some("second-Secret\n"));
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert!(!text(&out.stdout).contains("second-Secret") && !text(&out.stderr).contains("second-Secret"));
    let hash: String =
        client.query_one("SELECT password_hash FROM users WHERE username = 'alice'", &[]).await.unwrap().get(0);
    assert!(password::verify(&hash, "second-Secret") && !password::verify(&hash, secret));
    assert_eq!(env.db.rows_containing("second-Secret").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn config_get_set_list() {
    let env = Env::new().await;
    assert_eq!(env.expect(0, &["config", "get", "enable_audit_logging"]), "true\n");

    assert!(env.expect(0, &["config", "set", "enable_audit_logging", "false"]).contains("set enable_audit_logging"));
    assert_eq!(env.expect(0, &["config", "get", "enable_audit_logging"]), "false\n");
    let row = env.json(&["config", "get", "enable_audit_logging"]);
    assert_eq!(row["value"], "false");
    assert_eq!(row["type"], "boolean");
    assert_eq!(row["updated_by"], "cli");

    // Bad values are refused with the sidecar's own reason, and change nothing.
    let out = env.run(&["config", "set", "enable_audit_logging", "maybe"], None);
    assert_eq!(code(&out), 2);
    assert!(text(&out.stderr).contains("not a boolean"), "{}", text(&out.stderr));
    assert_eq!(env.expect(0, &["config", "get", "enable_audit_logging"]), "false\n");
    let out = env.run(&["config", "set", "data_retention_days", "0"], None);
    assert_eq!(code(&out), 2);
    assert!(text(&out.stderr).contains("positive number of days"), "{}", text(&out.stderr));
    env.expect(2, &["config", "set", "default_top_k", "ten"]); // an integer setting by its type
    env.expect(0, &["config", "set", "default_top_k", "20"]);
    assert_eq!(env.expect(0, &["config", "get", "default_top_k"]), "20\n");

    // New keys: a string unless typed; typed values are checked.
    env.expect(0, &["config", "set", "motd", "hello there", "--description", "shown to nobody"]);
    env.expect(2, &["config", "set", "limits", "{oops", "--type", "json"]);
    env.expect(0, &["config", "set", "limits", "{\"a\": 1}", "--type", "json"]);
    env.expect(2, &["config", "set", "x", "1", "--type", "float"]);
    env.expect(2, &["config", "get", "nosuch"]);

    let all = env.json(&["config", "list"]);
    let all = all.as_array().unwrap();
    assert_eq!(all.len(), 10, "8 seeded + 2 new: {all:?}");
    let motd = all.iter().find(|r| r["key"] == "motd").unwrap();
    assert_eq!((motd["value"].as_str(), motd["type"].as_str()), (Some("hello there"), Some("string")));
    assert_eq!(motd["description"], "shown to nobody");
    let table = env.expect(0, &["config", "list"]);
    assert!(table.starts_with("KEY "), "{table}");
    assert!(table.lines().any(|l| l.starts_with("motd ") && l.contains("hello there")), "{table}");
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_and_audit() {
    let env = Env::new().await;
    env.sql(
        "INSERT INTO users (username, role) VALUES ('alice', 'user'), ('bob', 'user');
         INSERT INTO permissions (user_id, collection_id, permission_type)
             SELECT u.id, c.id, 'read' FROM users u, collections c WHERE c.collection_name = 'docs';
         INSERT INTO performance_metrics (id, recorded_at, operation_type, collection_id, duration_ms, success, grpc_code)
             SELECT uuid_v7(), now() - interval '1 hour', 'search', c.id, d, d <> 40, 0
             FROM collections c, unnest(ARRAY[10.0, 20.0, 30.0, 40.0]) AS d WHERE c.collection_name = 'docs';
         INSERT INTO performance_metrics (id, recorded_at, operation_type, collection_id, duration_ms, success, grpc_code)
             SELECT uuid_v7(), now() - interval '2 hours', 'insert', c.id, 5, true, 0
             FROM collections c WHERE c.collection_name = 'orders';
         INSERT INTO performance_metrics (id, recorded_at, operation_type, collection_id, duration_ms, success, grpc_code)
             SELECT uuid_v7(), now() - interval '10 days', 'search', c.id, 1000, true, 0
             FROM collections c WHERE c.collection_name = 'docs';
         INSERT INTO query_logs (id, executed_at, collection_id, query_type, duration_ms, success)
             SELECT uuid_v7(), now(), c.id, 'search', d, d < 30
             FROM collections c, unnest(ARRAY[10.0, 20.0, 30.0]) AS d WHERE c.collection_name = 'docs';
         INSERT INTO audit_logs (id, occurred_at, user_id, username, action, resource_type, resource_id,
                                 database_name, success, grpc_code, error_message)
         VALUES (uuid_v7(), now() - interval '2 hours', (SELECT id FROM users WHERE username = 'alice'), 'alice',
                 'create_collection', 'collection', 'docs', 'default', true, 0, NULL),
                (uuid_v7(), now() - interval '30 minutes', NULL, 'bob', 'search', 'collection', 'docs', 'default',
                 false, 7, 'PrivilegeSearch: permission deny to bob'),
                (uuid_v7(), now() - interval '3 days', NULL, 'alice', 'insert', 'data', 'orders', 'sales',
                 true, 0, NULL);",
    )
    .await;

    // Default window: 7 days, so the 10-day-old search is left out.
    let perf = env.json(&["stats", "performance"]);
    let perf = perf.as_array().unwrap();
    assert_eq!(perf.len(), 2, "{perf:?}");
    let search = &perf[0];
    assert_eq!(search["operation_type"], "search");
    assert_eq!(search["calls"], 4);
    assert_eq!(search["successes"], 3);
    assert_eq!(search["success_rate"], 0.75);
    assert_eq!(search["avg_ms"], 25.0);
    assert_eq!(search["p50_ms"], 25.0);
    assert_eq!(search["p95_ms"], 38.5);
    assert_eq!(search["max_ms"], 40.0);
    let wide = env.json(&["stats", "performance", "--days", "30"]);
    assert_eq!(wide[0]["calls"], 5);
    assert_eq!(wide[0]["max_ms"], 1000.0);
    let orders = env.json(&["stats", "performance", "--collection", "sales.orders"]);
    assert_eq!(orders.as_array().unwrap().len(), 1);
    assert_eq!(orders[0]["operation_type"], "insert");
    assert_eq!(env.json(&["stats", "performance", "--collection", "docs"]).as_array().unwrap().len(), 1);
    env.expect(2, &["stats", "performance", "--collection", "nosuch"]);
    env.expect(2, &["stats", "performance", "--days", "0"]);
    let table = env.expect(0, &["stats", "performance"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("OPERATION  CALLS  SUCCESS"), "{table}");
    assert!(lines[1].starts_with("search") && lines[1].contains("75.0%") && lines[1].contains("38.50"), "{table}");

    let colls = env.json(&["stats", "collections"]);
    let colls = colls.as_array().unwrap();
    assert_eq!(colls.len(), 2);
    let docs = colls.iter().find(|c| c["collection"] == "default.docs").unwrap();
    assert_eq!(docs["user_count"], 2);
    assert_eq!(docs["total_queries"], 3);
    assert_eq!(docs["successful_queries"], 2);
    assert_eq!(docs["dimension"], 8);
    assert!(env.expect(0, &["stats", "collections"]).contains("default.docs"));

    // Audit: newest first, filtered.
    let all = env.json(&["audit"]);
    let actions: Vec<&str> = all.as_array().unwrap().iter().map(|r| r["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["search", "create_collection", "insert"]);
    assert_eq!(all[0]["grpc_code"], 7);
    assert_eq!(env.json(&["audit", "--user", "alice"]).as_array().unwrap().len(), 2);
    assert_eq!(env.json(&["audit", "--action", "search"]).as_array().unwrap().len(), 1);
    assert_eq!(env.json(&["audit", "--resource-type", "data"]).as_array().unwrap().len(), 1);
    assert_eq!(env.json(&["audit", "--since", "24h"]).as_array().unwrap().len(), 2);
    assert_eq!(env.json(&["audit", "--since", "7d"]).as_array().unwrap().len(), 3);
    let hour_ago =
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() - std::time::Duration::from_secs(3600));
    let recent = env.json(&["audit", "--since", &hour_ago.to_string()]);
    assert_eq!(recent.as_array().unwrap().len(), 1, "{recent}");
    let recent = env.json(&["audit", "--since", "2000-01-01T00:00:00+02:00"]);
    assert_eq!(recent.as_array().unwrap().len(), 3);
    let newest = env.json(&["audit", "--limit", "1"]);
    assert_eq!(newest.as_array().unwrap().len(), 1);
    assert_eq!(newest[0]["action"], "search");
    env.expect(2, &["audit", "--since", "yesterday-ish"]);
    env.expect(2, &["audit", "--resource-type", "spaceship"]);
    env.expect(2, &["audit", "--limit", "0"]);
    let table = env.expect(0, &["audit"]);
    assert!(table.starts_with("TIME "), "{table}");
    assert!(table.contains("grpc 7: PrivilegeSearch: permission deny to bob"), "{table}");
}

#[tokio::test(flavor = "multi_thread")]
async fn database_problems_are_clear_and_never_look_like_a_denial() {
    // Nothing listens on port 1.
    let out = Command::new(BIN)
        .args(["check", "alice", "docs", "read", "--database-url", "postgres://postgres:hunter2@127.0.0.1:1/x"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(code(&out), 3);
    let err = text(&out.stderr);
    assert!(err.contains("cannot connect to PostgreSQL at 127.0.0.1:1"), "{err}");
    assert!(!err.contains("hunter2"), "the URL's password was printed: {err}");

    // A database without the schema: told to migrate.
    let db = pg::TestDb::create().await;
    let out = Command::new(BIN).args(["user", "list", "--database-url", &db.url()]).output().unwrap();
    assert_eq!(code(&out), 3);
    assert!(text(&out.stderr).contains("milvus-sidecar migrate"), "{}", text(&out.stderr));
}

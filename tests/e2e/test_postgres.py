"""The sidecar with PostgreSQL: it starts, migrates its database and serves; `milvus-sidecar
migrate` creates the schema in an empty database and is a no-op on a migrated one; SIGTERM
writes the records still queued; --no-recording needs no PostgreSQL at all."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from pymilvus import MilvusClient

from pgdb import Db, conn_params, url_with_db, wait_for
from services import call_lines, free_port, http_get, run_cli, start_sidecar, stop_sidecar_checked

TABLES = {
    "users",
    "permissions",
    "collections",
    "collection_partitions",
    "index_management",
    "audit_logs",
    "performance_metrics",
    "query_logs",
    "ingestion_logs",
    "system_config",
}
SYSTEM_CONFIG_KEYS = {
    "milvus_api_endpoint",
    "max_query_timeout",
    "default_top_k",
    "enable_audit_logging",
    "enable_performance_monitoring",
    "data_retention_days",
}
MIGRATE_TIMEOUT = 60
MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def migrations() -> list[tuple[int, str]]:
    """(version, name) of the repository's migrations, V<version>__<name>.sql, in order."""
    found = []
    for path in MIGRATIONS_DIR.glob("V*__*.sql"):
        m = re.fullmatch(r"V(\d+)__(\w+)\.sql", path.name)
        if m:
            found.append((int(m.group(1)), m.group(2)))
    return sorted(found)


def applied_lines() -> list[str]:
    """What `migrate` prints on an empty database."""
    return [f"applied V{version}__{name}" for version, name in migrations()]


def migrate(bin_path: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_cli(bin_path, "migrate", *args, env=env, timeout=MIGRATE_TIMEOUT)


def schema_fingerprint(url: str) -> dict:
    """What a migration creates: relations (tables, partitions, views, indexes), functions,
    the schema history and the seeded configuration keys."""
    db = Db(url)
    try:
        return {
            "relations": sorted(
                (r["relname"], r["relkind"])
                for r in db.rows(
                    """SELECT c.relname, c.relkind::text FROM pg_class c
                       JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'"""
                )
            ),
            "functions": sorted(
                r["proname"]
                for r in db.rows(
                    """SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                       WHERE n.nspname = 'public'"""
                )
            ),
            "history": [
                (r["version"], r["name"])
                for r in db.rows("SELECT version, name FROM refinery_schema_history ORDER BY version")
            ],
            "config": sorted(r["config_key"] for r in db.rows("SELECT config_key FROM system_config")),
        }
    finally:
        db.close()


def check_schema(fingerprint: dict) -> None:
    names = {name for name, _ in fingerprint["relations"]}
    assert TABLES <= names, f"missing tables: {TABLES - names}"
    assert ("collection_stats", "v") in fingerprint["relations"]
    # The log tables are partitioned (kind p) with a default partition and daily ones.
    for table in ("audit_logs", "performance_metrics", "query_logs", "ingestion_logs"):
        assert (table, "p") in fingerprint["relations"], table
        assert f"{table}_default" in names, table
        assert any(n.startswith(f"{table}_p") for n in names), f"no daily partition of {table}"
    assert fingerprint["history"] == migrations()
    assert SYSTEM_CONFIG_KEYS <= set(fingerprint["config"])


def test_sidecar_serves_and_records_with_postgres(sidecar, sidecar_database):
    """The session's sidecar migrated its fresh database at start-up and records calls."""
    assert http_get(f"{sidecar.admin_url}/healthz")[0] == 200
    assert "recording=true" in sidecar.log_text()
    check_schema(schema_fingerprint(sidecar_database))

    client = MilvusClient(uri=sidecar.uri, token=sidecar.token, timeout=30)
    try:
        version = client.get_server_version()
    finally:
        client.close()
    assert version

    db = Db(sidecar_database)
    try:
        ids = {c.id for c in call_lines(sidecar.log_text()) if c.method == "GetVersion"}
        assert ids, "no GetVersion call in the sidecar's log"
        stored = wait_for(
            lambda: {
                r["id"]
                for r in db.rows(
                    "SELECT id::text AS id FROM performance_metrics WHERE operation_type = 'get_version'"
                )
            },
            lambda got: ids <= got,
        )
        assert ids <= stored
    finally:
        db.close()


def test_migrate_creates_the_schema_in_an_empty_database_then_is_a_noop(binaries, new_database):
    _, url = new_database("migrate")
    first = migrate(binaries["sidecar"], "--database-url", url)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == applied_lines(), first
    assert applied_lines()[0] == "applied V1__schema"
    before = schema_fingerprint(url)
    check_schema(before)

    again = migrate(binaries["sidecar"], "--database-url", url)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "schema is up to date", again
    assert schema_fingerprint(url) == before


def test_migrate_is_a_noop_on_the_database_the_sidecar_migrated(binaries, sidecar, sidecar_database):
    before = schema_fingerprint(sidecar_database)
    result = migrate(binaries["sidecar"], "--database-url", sidecar_database)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "schema is up to date", result
    assert schema_fingerprint(sidecar_database) == before


def test_migrate_from_environment_variables(binaries, new_database, pg_admin_url):
    """DATABASE_URL, else POSTGRES_HOST/PORT/DB/USER/PASSWORD (the seed's variables)."""
    name, url = new_database("migrate_env")
    by_url = migrate(binaries["sidecar"], env={"DATABASE_URL": url})
    assert (by_url.returncode, by_url.stdout.splitlines()) == (0, applied_lines()), by_url

    name2, url2 = new_database("migrate_pgenv")
    params = conn_params(pg_admin_url)
    env = {
        "POSTGRES_HOST": params.get("host", "127.0.0.1"),
        "POSTGRES_PORT": params.get("port", "5432"),
        "POSTGRES_DB": name2,
        "POSTGRES_USER": params.get("user", "postgres"),
    }
    if "password" in params:
        env["POSTGRES_PASSWORD"] = params["password"]
    by_parts = migrate(binaries["sidecar"], env=env)
    assert (by_parts.returncode, by_parts.stdout.splitlines()) == (0, applied_lines()), by_parts
    check_schema(schema_fingerprint(url2))


def test_migrate_fails_clearly_when_postgres_is_unreachable(binaries, pg_admin_url):
    url = url_with_db(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", "nowhere")
    started = time.monotonic()
    result = migrate(binaries["sidecar"], "--database-url", url, "--db-startup-wait", "3s")
    took = time.monotonic() - started
    assert result.returncode != 0, result
    assert "applied" not in result.stdout and "up to date" not in result.stdout
    assert "cannot connect to PostgreSQL (waited" in result.stderr, result.stderr
    # It waits (PostgreSQL may be starting beside it), but no longer than it was told.
    assert 2 <= took < 30, took


def sigterm_run(binaries, milvus_lite, tmp_path, new_database, name, extra_args=()):
    """Start a recording sidecar, make four calls, SIGTERM it at once. Returns (exit status,
    seconds it took to exit, call ids logged, performance_metrics ids stored)."""
    _, url = new_database(name)
    svc = start_sidecar(
        binaries["sidecar"],
        milvus_lite.port,
        tmp_path / f"sidecar-{name}.log",
        database_url=url,
        spill_dir=tmp_path / f"spill-{name}",
        extra_args=extra_args,
    )
    try:
        client = MilvusClient(uri=svc.uri, token=svc.token, timeout=30)
        try:
            for _ in range(3):
                client.list_collections()
        finally:
            client.close()
    finally:
        started = time.monotonic()
        status = svc.stop(60)
        took = time.monotonic() - started
    calls = {c.id for c in call_lines(svc.log_text())}
    assert len(calls) >= 4, svc.log_text()  # Connect, then ShowCollections three times
    db = Db(url)
    try:
        stored = {r["id"] for r in db.rows("SELECT id::text AS id FROM performance_metrics")}
    finally:
        db.close()
    return status, took, calls, stored


def test_sigterm_writes_the_records_still_queued(binaries, milvus_lite, tmp_path, new_database):
    status, took, calls, stored = sigterm_run(binaries, milvus_lite, tmp_path, new_database, "sigterm")
    assert status == 0
    assert calls == stored
    assert took < 10


def test_sigterm_does_not_wait_for_the_flush_interval(binaries, milvus_lite, tmp_path, new_database):
    status, took, calls, stored = sigterm_run(
        binaries, milvus_lite, tmp_path, new_database, "sigterm_slow",
        extra_args=("--flush-interval", "10s", "--batch-rows", "100000"),
    )
    assert status == 0
    assert calls == stored
    assert took < 5, f"the sidecar took {took:.1f}s to exit after SIGTERM"


def test_no_recording_serves_without_postgres(binaries, milvus_lite, tmp_path):
    """--no-recording (with --no-auth, which it needs): no database is touched, even when
    DATABASE_URL points nowhere."""
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    svc = start_sidecar(
        binaries["sidecar"],
        milvus_lite.port,
        tmp_path / "sidecar-no-recording.log",
        env={"DATABASE_URL": nowhere},
    )
    try:
        client = MilvusClient(uri=svc.uri, timeout=30)
        try:
            assert client.get_server_version()
        finally:
            client.close()
        assert http_get(f"{svc.admin_url}/readyz")[0] == 200
        assert "recording=false" in svc.log_text()
    finally:
        stop_sidecar_checked(svc)

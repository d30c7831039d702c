"""PostgreSQL for the end-to-end tests: databases of their own on the server named by
TEST_DATABASE_URL, and polling for rows the sidecar writes asynchronously.

    TEST_DATABASE_URL   an admin URL (postgresql://user@host:port/db, or key=value form) of a
                        server where the tests may create and drop databases; scripts/test.sh
                        sets it (see ensure_postgres in scripts/lib.sh)
"""

from __future__ import annotations

import os
import secrets
import time
from typing import Any, Callable, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

ENV = "TEST_DATABASE_URL"
# Rows are written within ~20 ms of a call ending; this leaves room for a slow machine.
ROWS_TIMEOUT = 15.0
POLL_INTERVAL = 0.05

T = TypeVar("T")


def admin_url_problem() -> str | None:
    """Why TEST_DATABASE_URL cannot be used, or None."""
    url = os.environ.get(ENV)
    if not url:
        return f"{ENV} is not set: it must be an admin URL of a PostgreSQL server where tests may create databases"
    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            ok = conn.execute(
                "SELECT rolsuper OR rolcreatedb FROM pg_roles WHERE rolname = current_user"
            ).fetchone()
    except psycopg.Error as e:
        return f"{ENV}: cannot connect ({str(e).strip()})"
    if not (ok and ok[0]):
        return f"{ENV}: its user may not create databases"
    return None


def url_with_db(url: str, dbname: str) -> str:
    """`url` naming database `dbname` instead (URLs stay URLs: the sidecar logs them masked)."""
    if url.startswith(("postgres://", "postgresql://")):
        parts = urlsplit(url)
        return urlunsplit(parts._replace(path="/" + quote(dbname, safe="")))
    return make_conninfo(url, dbname=dbname)


def conn_params(url: str) -> dict[str, str]:
    """host, port, dbname, user, password (when given) of a connection string."""
    return {k: str(v) for k, v in conninfo_to_dict(url).items()}


def create_database(admin_url: str, prefix: str) -> str:
    """Create an empty database with a unique name starting with `prefix`; returns the name."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


class Db:
    """An autocommit connection: every query sees what the sidecar has committed so far."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn = psycopg.connect(url, autocommit=True, row_factory=dict_row)

    def rows(self, query: str, params: Any = None) -> list[dict[str, Any]]:
        return self.conn.execute(query, params).fetchall()

    def value(self, query: str, params: Any = None) -> Any:
        row = self.conn.execute(query, params).fetchone()
        return None if row is None else next(iter(row.values()))

    def close(self) -> None:
        self.conn.close()


def wait_for(read: Callable[[], T], done: Callable[[T], bool], timeout: float = ROWS_TIMEOUT) -> T:
    """Call `read` until `done(result)` holds or `timeout` passes; return the last result
    either way (the caller's assertion then shows what was there)."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(POLL_INTERVAL)

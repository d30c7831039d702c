"""Session fixtures for the end-to-end tests: one milvus-lite, one sidecar in front of it
that records into a database of its own, and a factory of further databases.

Binaries and PostgreSQL come from the environment (scripts/test.sh sets them):

    MILVUS_LITE_BIN     path to the `milvus-lite` executable (.venv/bin/milvus-lite)
    SIDECAR_BIN         path to the built sidecar (target/release/milvus-sidecar)
    TEST_DATABASE_URL   admin URL of a PostgreSQL server where tests create and drop databases

Every process started here is stopped with SIGTERM at the end of the session; the sidecar
must then drain and exit with status 0 within 30 seconds. Every database created here is
dropped at the end of the session, unless E2E_KEEP_DATABASES=1 (to look at the rows after a
failure; the names start with e2e_).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import pgdb
from services import binary_problem, log_tail, required_bin, start_milvus_lite, start_sidecar, stop_sidecar_checked

BINARIES = {
    "MILVUS_LITE_BIN": "the milvus-lite executable (.venv/bin/milvus-lite)",
    "SIDECAR_BIN": "the built sidecar (target/release/milvus-sidecar)",
}


def pytest_sessionstart(session):
    """Every test needs both binaries and PostgreSQL: say once, up front, what is missing."""
    problems = [p for var, hint in BINARIES.items() if (p := binary_problem(var, hint))]
    if problem := pgdb.admin_url_problem():
        problems.append(problem)
    if problems:
        pytest.exit(
            "cannot run the end-to-end tests:\n  "
            + "\n  ".join(problems)
            + "\nRun them with scripts/test.sh, or set MILVUS_LITE_BIN, SIDECAR_BIN and TEST_DATABASE_URL.",
            returncode=4,
        )


@pytest.fixture(scope="session")
def binaries() -> dict[str, str]:
    return {
        "milvus_lite": required_bin("MILVUS_LITE_BIN", BINARIES["MILVUS_LITE_BIN"]),
        "sidecar": required_bin("SIDECAR_BIN", BINARIES["SIDECAR_BIN"]),
    }


@pytest.fixture(scope="session")
def e2e_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def milvus_lite(binaries, e2e_dir):
    """The one milvus-lite of the session, on a free port with its data in a temporary dir."""
    svc = start_milvus_lite(binaries["milvus_lite"], e2e_dir / "milvus-data", e2e_dir / "milvus-lite.log")
    yield svc
    status = svc.stop(15)
    if status is None:
        pytest.fail("milvus-lite did not exit within 15s of SIGTERM (killed)\n" + log_tail(svc.log), pytrace=False)


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    return os.environ[pgdb.ENV]


@pytest.fixture(scope="session")
def new_database(pg_admin_url):
    """new_database(prefix) -> (name, url): a fresh, empty database, dropped at session end."""
    created: list[str] = []

    def make(prefix: str) -> tuple[str, str]:
        name = pgdb.create_database(pg_admin_url, f"e2e_{prefix}")
        created.append(name)
        return name, pgdb.url_with_db(pg_admin_url, name)

    yield make
    if os.environ.get("E2E_KEEP_DATABASES") == "1":
        print(f"\nE2E_KEEP_DATABASES=1: kept databases {', '.join(created)}")
        return
    for name in reversed(created):
        pgdb.drop_database(pg_admin_url, name)


@pytest.fixture(scope="session")
def sidecar_database(new_database) -> str:
    """URL of the database the session's sidecar records into."""
    return new_database("session")[1]


@pytest.fixture(scope="session")
def sidecar(binaries, milvus_lite, e2e_dir, sidecar_database):
    """The one sidecar of the session, in front of `milvus_lite`, recording into
    `sidecar_database`."""
    svc = start_sidecar(
        binaries["sidecar"],
        milvus_lite.port,
        e2e_dir / "sidecar.log",
        database_url=sidecar_database,
        spill_dir=e2e_dir / "sidecar-spill",
    )
    yield svc
    stop_sidecar_checked(svc)

"""Session fixtures for the end-to-end tests: one milvus-lite, one sidecar in front of it.

Both binaries come from the environment (scripts/test.sh sets them):

    MILVUS_LITE_BIN   path to the `milvus-lite` executable (.venv/bin/milvus-lite)
    SIDECAR_BIN       path to the built sidecar (target/release/milvus-sidecar)

Every process started here is stopped with SIGTERM at the end of the session; the sidecar
must then drain and exit with status 0 within 30 seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services import binary_problem, log_tail, required_bin, start_milvus_lite, start_sidecar, stop_sidecar_checked

BINARIES = {
    "MILVUS_LITE_BIN": "the milvus-lite executable (.venv/bin/milvus-lite)",
    "SIDECAR_BIN": "the built sidecar (target/release/milvus-sidecar)",
}


def pytest_sessionstart(session):
    """Every test needs both binaries: say once, up front, what is missing."""
    problems = [p for var, hint in BINARIES.items() if (p := binary_problem(var, hint))]
    if problems:
        pytest.exit(
            "cannot run the end-to-end tests:\n  "
            + "\n  ".join(problems)
            + "\nRun them with scripts/test.sh, or set MILVUS_LITE_BIN and SIDECAR_BIN.",
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
def sidecar(binaries, milvus_lite, e2e_dir):
    """The one sidecar of the session, in front of `milvus_lite`."""
    svc = start_sidecar(binaries["sidecar"], milvus_lite.port, e2e_dir / "sidecar.log")
    yield svc
    stop_sidecar_checked(svc)

"""The sidecar's admin listener: /healthz says the process is up, /readyz that Milvus answers."""

from __future__ import annotations

from services import free_port, http_get, start_sidecar, stop_sidecar_checked


def test_healthz_and_readyz_ok_while_milvus_is_up(sidecar):
    assert http_get(f"{sidecar.admin_url}/healthz")[0] == 200
    status, body = http_get(f"{sidecar.admin_url}/readyz")
    assert status == 200, body


def test_readyz_503_when_upstream_is_down(binaries, tmp_path):
    # A second sidecar whose upstream port has nothing listening on it.
    dead_port = free_port()
    svc = start_sidecar(binaries["sidecar"], dead_port, tmp_path / "sidecar-no-upstream.log")
    try:
        assert http_get(f"{svc.admin_url}/healthz")[0] == 200
        status, body = http_get(f"{svc.admin_url}/readyz")
        assert status == 503, body
    finally:
        stop_sidecar_checked(svc)

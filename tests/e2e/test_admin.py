"""The sidecar's admin listener: /healthz says the process is up, /readyz that Milvus answers.
And the standard gRPC health service on the client port, which says what /readyz says."""

from __future__ import annotations

import grpc
import pytest

from services import free_port, http_get, start_sidecar, stop_sidecar_checked

SERVING, NOT_SERVING = 1, 2


def health_check(port: int, service: str = "") -> int:
    """grpc.health.v1.Health/Check through grpcio (pymilvus's transport), with no credential,
    as a load balancer or Kubernetes' grpc probe sends it. Returns the ServingStatus."""
    name = service.encode()
    request = b"\x0a" + bytes([len(name)]) + name if name else b""  # HealthCheckRequest.service
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        reply = check(request, timeout=10)
    assert len(reply) == 2 and reply[0] == 0x08, reply.hex()  # HealthCheckResponse.status
    return reply[1]


def test_healthz_and_readyz_ok_while_milvus_is_up(sidecar):
    assert http_get(f"{sidecar.admin_url}/healthz")[0] == 200
    status, body = http_get(f"{sidecar.admin_url}/readyz")
    assert status == 200, body


def test_grpc_health_check_on_the_client_port_needs_no_credential(sidecar, milvus_lite):
    assert sidecar.token, "this sidecar checks credentials"
    assert health_check(sidecar.port) == SERVING
    assert health_check(sidecar.port, "milvus.proto.milvus.MilvusService") == SERVING
    with pytest.raises(grpc.RpcError) as unknown:
        health_check(sidecar.port, "no.such.Service")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    # milvus-lite has no health service: the sidecar answers it itself.
    with pytest.raises(grpc.RpcError) as direct:
        health_check(milvus_lite.port)
    assert direct.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_readyz_503_when_upstream_is_down(binaries, tmp_path):
    # A second sidecar whose upstream port has nothing listening on it.
    dead_port = free_port()
    svc = start_sidecar(binaries["sidecar"], dead_port, tmp_path / "sidecar-no-upstream.log")
    try:
        assert http_get(f"{svc.admin_url}/healthz")[0] == 200
        status, body = http_get(f"{svc.admin_url}/readyz")
        assert status == 503, body
        assert health_check(svc.port) == NOT_SERVING
    finally:
        stop_sidecar_checked(svc)

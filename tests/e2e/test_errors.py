"""Failures reach the pymilvus user through the sidecar exactly as they do without it: the same
exception type, code and message, whether Milvus reported them inside an OK reply (in-reply
status) or as a gRPC error status."""

from __future__ import annotations

import pytest
from pymilvus import MilvusClient

from milvus_workflow import DIM, plain_error

EXISTING = "e2e_errors"
MISSING = "e2e_missing_collection"

CASES = {
    # In-reply status: code 100, collection not found.
    "search missing collection": lambda c: c.search(MISSING, [[0.1] * DIM], limit=3),
    "describe missing collection": lambda c: c.describe_collection(MISSING),
    "drop partition of missing collection": lambda c: c.drop_partition(MISSING, "p"),
    # In-reply status: the server rejects a malformed filter expression.
    "query with a bad filter": lambda c: c.query(EXISTING, filter="id >>> 3"),
    # gRPC error status: milvus-lite answers LoadPartitions with UNIMPLEMENTED and a message.
    "load_partitions (grpc UNIMPLEMENTED)": lambda c: c.load_partitions(EXISTING, ["_default"]),
}


@pytest.fixture(scope="module")
def clients(milvus_lite, sidecar):
    direct = MilvusClient(uri=milvus_lite.uri, timeout=30)
    via_sidecar = MilvusClient(uri=sidecar.uri, token=sidecar.token, timeout=30)  # as root: every call allowed
    direct.create_collection(EXISTING, dimension=DIM, metric_type="L2")
    yield direct, via_sidecar
    direct.drop_collection(EXISTING)
    via_sidecar.close()
    direct.close()


def caught(call, client):
    with pytest.raises(Exception) as info:
        call(client)
    return info.value


@pytest.mark.parametrize("case", list(CASES))
def test_error_is_the_same_through_the_sidecar(clients, case):
    direct, via_sidecar = clients
    expected = plain_error(caught(CASES[case], direct))
    got = plain_error(caught(CASES[case], via_sidecar))
    assert got == expected


def test_search_missing_collection_is_collection_not_found(clients):
    """Pins what the comparison above compares, so that it cannot pass on two unrelated errors."""
    _, via_sidecar = clients
    err = plain_error(caught(CASES["search missing collection"], via_sidecar))
    assert err["raised"] == "pymilvus.exceptions.MilvusException"
    assert err["code"] == 100
    assert MISSING in err["message"]

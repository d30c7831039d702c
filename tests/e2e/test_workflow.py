"""The same pymilvus workflow, straight at milvus-lite and through the sidecar, must give the
same results step by step."""

from __future__ import annotations

import difflib
import pprint
import re

import pytest

from milvus_workflow import (
    COLLECTION,
    INDEXED_COLLECTION,
    INDEXED_FIELD,
    N_PARTITION_ROWS,
    N_ROWS,
    NQ,
    TOP_K,
    run_workflow,
)
from services import start_sidecar, stop_sidecar_checked


@pytest.fixture(scope="module")
def transcripts(milvus_lite, sidecar):
    """(direct, via_sidecar): run one after the other on the same milvus-lite. Each run drops
    what it created, so both start from the same empty server. Through the sidecar the
    workflow calls as its root admin (the sidecar checks credentials; milvus-lite has none)."""
    direct = run_workflow(milvus_lite.uri)
    via_sidecar = run_workflow(sidecar.uri, token=sidecar.token)
    return direct, via_sidecar


def result_of(transcript, step):
    for name, result in transcript:
        if name == step:
            return result
    raise AssertionError(f"step {step!r} missing from the transcript")


def test_direct_workflow_is_sane(transcripts):
    """Guards the comparison below: identical garbage on both sides must not pass."""
    direct, _ = transcripts
    errors = [(name, r) for name, r in direct if isinstance(r, dict) and "raised" in r]
    assert not errors, f"steps failed against milvus-lite directly: {errors}"

    assert result_of(direct, "list_collections") == []
    assert result_of(direct, "has_collection") is True
    assert result_of(direct, "has_collection(missing)") is False
    assert result_of(direct, "insert")["insert_count"] == N_ROWS
    assert result_of(direct, "insert(partition)")["insert_count"] == N_PARTITION_ROWS
    assert result_of(direct, "upsert")["upsert_count"] == 5
    assert result_of(direct, "query(count(*))")["rows"] == [{"count(*)": N_ROWS + N_PARTITION_ROWS}]
    for step in ("search", "search(filter)", "hybrid_search(WeightedRanker)", "hybrid_search(RRFRanker)"):
        hits = result_of(direct, step)["hits"]
        assert [len(h) for h in hits] == [TOP_K] * NQ, step
    for hits in result_of(direct, "search(filter)")["hits"]:
        assert all(h["entity"]["title"] != "row-4" for h in hits)
    assert [r["id"] for r in result_of(direct, "query")["rows"]] == list(range(12))
    assert result_of(direct, "get_load_state") == {"state": "LoadState.Loaded"}
    assert COLLECTION not in result_of(direct, "list_collections(end)")

    # Schema and index_params in one create_collection call: the index exists and is
    # built, and the collection is loaded (which only index_params makes pymilvus do).
    fields = result_of(direct, "describe_collection(indexed)")["fields"]
    assert [f["name"] for f in fields] == ["id", INDEXED_FIELD, "label"]
    assert result_of(direct, "list_indexes(indexed)") == [INDEXED_FIELD]
    index = result_of(direct, "describe_index(indexed)")
    assert (index["field_name"], index["index_type"], index["metric_type"], index["state"]) == (
        INDEXED_FIELD,
        "HNSW",
        "L2",
        "Finished",
    )
    assert result_of(direct, "get_load_state(indexed)") == {"state": "LoadState.Loaded"}
    assert result_of(direct, "has_collection(indexed, after drop)") is False
    assert INDEXED_COLLECTION not in result_of(direct, "list_collections(end)")


def test_sidecar_transcript_matches_direct(transcripts):
    assert_same_transcripts(*transcripts)


def assert_same_transcripts(direct, via_sidecar):
    assert [name for name, _ in via_sidecar] == [name for name, _ in direct], "different steps ran"

    mismatches = [
        (name, d, s) for (name, d), (_, s) in zip(direct, via_sidecar) if d != s
    ]
    if mismatches:
        name, d, s = mismatches[0]
        diff = "\n".join(
            difflib.unified_diff(
                pprint.pformat(d, width=100).splitlines(),
                pprint.pformat(s, width=100).splitlines(),
                "direct",
                "via sidecar",
                lineterm="",
            )
        )
        pytest.fail(
            f"{len(mismatches)} step(s) differ through the sidecar: {[m[0] for m in mismatches]}\n"
            f"first difference, step {name!r}:\n{diff}",
            pytrace=False,
        )


def test_workflow_went_through_the_sidecar(transcripts, sidecar):
    """The second run really used the sidecar: its call log (one line per forwarded call under
    the milvus_sidecar::call target) names the RPCs the workflow made."""
    call_lines = [line for line in sidecar.log_text().splitlines() if "milvus_sidecar::call" in line]
    for method in ("CreateCollection", "Insert", "Upsert", "CreateIndex", "Search", "HybridSearch", "Query", "Delete"):
        assert any(re.search(rf"\b{method}\b", line) for line in call_lines), (
            f"no {method} call in the sidecar's call log ({len(call_lines)} call lines):\n"
            + "\n".join(call_lines[-20:])
        )


def test_workflow_through_a_busy_polling_sidecar_matches_direct(binaries, milvus_lite, e2e_dir, new_database):
    """With --busy-poll the call thread polls tokio's epoll instance before each sleep; an
    event it saw there and failed to leave to tokio would stall or break a call. The whole
    workflow, with authentication and recording on, must come out as it does directly."""
    svc = start_sidecar(
        binaries["sidecar"],
        milvus_lite.port,
        e2e_dir / "busy-poll-sidecar.log",
        database_url=new_database("busy_poll")[1],
        extra_args=("--busy-poll", "200us"),
    )
    try:
        direct = run_workflow(milvus_lite.uri)
        via_sidecar = run_workflow(svc.uri, token=svc.token)
    finally:
        stop_sidecar_checked(svc)
    assert "busy polling" in svc.log_text(), "the sidecar did not report busy polling on:\n" + svc.log_text()[-2000:]
    assert_same_transcripts(direct, via_sidecar)

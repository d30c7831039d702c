"""The Grafana dashboard (deploy/grafana/milvus-sidecar.json) shows only metrics that a running
sidecar exports on its admin listener's /metrics, and those metrics move with the calls.

The names a dashboard uses and what a scrape holds are read by deploy/grafana/dashboard_metrics.py
(shared with scripts/validate_deploy.py); the first tests pin that reading on the dashboard itself
and on a scrape written out here, so that the test against the live sidecar cannot pass by
reading nothing.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from pymilvus import MilvusClient
from pymilvus.exceptions import MilvusException

from milvus_workflow import DIM
from services import scrape, total

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "deploy" / "grafana"))
import dashboard_metrics as dm  # noqa: E402

DASHBOARD = json.loads((REPO / "deploy" / "grafana" / "milvus-sidecar.json").read_text())
COLLECTION = "e2e_deploy_metrics"
SCRAPE_WAIT = 10.0  # seconds for the writer to flush, so that the recording metrics have samples

# The metric families the dashboard is built on (what the binary is to export).
FAMILIES = dm.EXPORTED_METRICS


# ------------------------------------------------------------- the reading, pinned


def test_dashboard_names_are_read_from_its_queries():
    series = dm.series_names(DASHBOARD)
    # Histograms are queried through their series, and reduced to their family.
    assert "milvus_sidecar_overhead_seconds_bucket" in series
    assert "milvus_sidecar_recording_batch_rows_sum" in series
    assert dm.family_name("milvus_sidecar_overhead_seconds_bucket") == "milvus_sidecar_overhead_seconds"
    assert dm.family_name("milvus_sidecar_recording_batch_rows_count") == "milvus_sidecar_recording_batch_rows"
    assert dm.family_name("milvus_sidecar_calls_total") == "milvus_sidecar_calls_total"
    assert dm.family_names(DASHBOARD) == FAMILIES


def test_only_queries_count_and_names_are_taken_whole():
    dashboard = {
        "description": "mentions milvus_sidecar_in_prose, which is no query",
        "panels": [
            {"title": "milvus_sidecar_title", "targets": [
                {"expr": 'rate(milvus_sidecar_a_bucket{x="1"}[5m]) / ignore_milvus_sidecar_b + milvus_sidecar_c:rule'},
            ]},
            {"type": "row", "panels": [{"targets": [{"expr": "milvus_sidecar_nested"}]}]},
        ],
        "templating": {"list": [
            {"query": {"query": "label_values(milvus_sidecar_d, method)"}, "definition": "label_values(milvus_sidecar_d, method)"},
            {"query": "label_values(milvus_sidecar_e, instance)"},
        ]},
    }
    assert dm.series_names(dashboard) == {
        "milvus_sidecar_a_bucket", "milvus_sidecar_c:rule", "milvus_sidecar_nested", "milvus_sidecar_d", "milvus_sidecar_e",
    }
    assert dm.family_names(dashboard) == {
        "milvus_sidecar_a", "milvus_sidecar_c:rule", "milvus_sidecar_nested", "milvus_sidecar_d", "milvus_sidecar_e",
    }


SCRAPE = """\
# HELP milvus_sidecar_calls_total Calls by method and outcome.
# TYPE milvus_sidecar_calls_total counter
milvus_sidecar_calls_total{method="Search",outcome="ok"} 3
# TYPE milvus_sidecar_overhead_seconds histogram
milvus_sidecar_overhead_seconds_bucket{method="Search",le="0.001"} 2
milvus_sidecar_overhead_seconds_bucket{method="Search",le="+Inf"} 3
milvus_sidecar_overhead_seconds_sum{method="Search"} 0.0021
milvus_sidecar_overhead_seconds_count{method="Search"} 3
# TYPE milvus_sidecar_upstream_up gauge
milvus_sidecar_upstream_up 1
# TYPE milvus_sidecar_auth_decisions counter
milvus_sidecar_auth_decisions_total{decision="allowed"} 4
# TYPE milvus_sidecar_postgres_up gauge
"""


def test_a_scrape_is_read_by_type_lines_and_samples():
    types, samples = dm.parse_scrape(SCRAPE)
    assert types["milvus_sidecar_overhead_seconds"] == "histogram"
    assert "milvus_sidecar_overhead_seconds_count" in samples
    assert "milvus_sidecar_calls_total" in samples
    # OpenMetrics names a counter's family without `_total`.
    assert dm.has_type_line(types, "milvus_sidecar_auth_decisions_total")
    assert not dm.has_type_line(types, "milvus_sidecar_inflight_calls")

    missing = dm.missing_from_scrape(DASHBOARD, SCRAPE)
    assert "milvus_sidecar_calls_total" not in missing["type"]
    assert "milvus_sidecar_overhead_seconds" not in missing["type"]
    assert "milvus_sidecar_overhead_seconds_bucket" not in missing["samples"]
    # A TYPE line without a sample is not enough, and absent families are reported.
    assert "milvus_sidecar_postgres_up" not in missing["type"]
    assert "milvus_sidecar_postgres_up" in missing["samples"]
    assert "milvus_sidecar_recording_queue_depth" in missing["type"]
    assert "milvus_sidecar_upstream_seconds_bucket" in missing["samples"]


def test_a_complete_scrape_lacks_nothing():
    histograms = dm.HISTOGRAMS
    lines = []
    for family in sorted(FAMILIES):
        if family in histograms:
            lines.append(f"# TYPE {family} histogram")
            lines += [f'{family}_bucket{{le="+Inf"}} 1', f"{family}_sum 0.5", f"{family}_count 1"]
        else:
            lines += [f"# TYPE {family} gauge", f'{family}{{x="y"}} 0']
    assert dm.missing_from_scrape(DASHBOARD, "\n".join(lines) + "\n") == {"type": [], "samples": []}
    # One family short: reported.
    short = [line for line in lines if "inflight" not in line]
    assert dm.missing_from_scrape(DASHBOARD, "\n".join(short)) == {
        "type": ["milvus_sidecar_inflight_calls"], "samples": ["milvus_sidecar_inflight_calls"],
    }


# ------------------------------------------------------------- against the running sidecar


def make_traffic(sidecar) -> int:
    """Calls that touch every part the dashboard shows: collection calls, reads and writes
    (recording), and a refused credential. Returns how many calls were allowed."""
    client = MilvusClient(uri=sidecar.uri, token=sidecar.token, timeout=30)
    try:
        if client.has_collection(COLLECTION):
            client.drop_collection(COLLECTION)
        client.create_collection(COLLECTION, dimension=DIM, metric_type="L2")
        client.insert(COLLECTION, [{"id": i, "vector": [float(i)] * DIM} for i in range(10)])
        client.search(COLLECTION, [[0.5] * DIM], limit=3)
        client.query(COLLECTION, filter="id >= 0", limit=5)
        client.drop_collection(COLLECTION)
    finally:
        client.close()
    with pytest.raises(MilvusException, match="Fail connecting"):
        MilvusClient(uri=sidecar.uri, token="root:not-the-password", timeout=10)
    return 5


def test_every_dashboard_metric_is_in_the_scrape(sidecar):
    make_traffic(sidecar)
    deadline = time.monotonic() + SCRAPE_WAIT
    while True:
        missing = dm.missing_from_scrape(DASHBOARD, scrape(sidecar))
        if not (missing["type"] or missing["samples"]) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert missing == {"type": [], "samples": []}, (
        "the dashboard uses metrics the sidecar's /metrics lacks:\n"
        f"  families without a '# TYPE' line: {missing['type']}\n"
        f"  series without a sample: {missing['samples']}"
    )


def test_counters_move_with_the_calls(sidecar):
    before = scrape(sidecar)
    allowed = make_traffic(sidecar)
    time.sleep(1.0)
    after = scrape(sidecar)

    def moved(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    assert moved("milvus_sidecar_calls_total") >= allowed
    # Exactly the workflow's one search, insert and query, each by its method.
    for method in ("Search", "Insert", "Query", "CreateCollection"):
        assert moved("milvus_sidecar_calls_total", method=method, outcome="ok") == 1, method
        assert moved("milvus_sidecar_upstream_seconds_count", method=method) == 1, method
    assert moved("milvus_sidecar_overhead_seconds_count") >= allowed
    assert moved("milvus_sidecar_upstream_seconds_count") >= allowed
    assert moved("milvus_sidecar_auth_decisions_total", decision="allowed") >= allowed
    assert moved("milvus_sidecar_auth_decisions_total", decision="unauthenticated") >= 1
    assert moved("milvus_sidecar_collection_calls_total") >= 1
    assert moved("milvus_sidecar_recording_rows_written_total") >= 1
    assert total(after, "milvus_sidecar_upstream_up") >= 1
    assert total(after, "milvus_sidecar_postgres_up") >= 1
    assert total(after, "milvus_sidecar_recording_rows_dropped_total") == 0

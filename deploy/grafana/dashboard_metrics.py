"""Which milvus_sidecar_* metrics a Grafana dashboard uses, and whether a Prometheus scrape has
them. Shared by scripts/validate_deploy.py (the dashboard against the list of exported
metrics) and tests/e2e/test_deploy.py (the dashboard against a running sidecar's /metrics).

A dashboard names metrics in PromQL: panel target `expr`s and templating queries such as
`label_values(milvus_sidecar_calls_total, method)`. A histogram is queried through its series
`NAME_bucket`, `NAME_sum`, `NAME_count`; its family (what `# TYPE` names) is NAME.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

PREFIX = "milvus_sidecar_"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# What the sidecar exports on /metrics (histograms add _bucket, _sum, _count). The dashboard
# may use only these; tests/e2e/test_deploy.py checks them against a running sidecar as well.
EXPORTED_METRICS = {
    "milvus_sidecar_build_info",
    "milvus_sidecar_calls_total",
    "milvus_sidecar_overhead_seconds",
    "milvus_sidecar_upstream_seconds",
    "milvus_sidecar_inflight_calls",
    "milvus_sidecar_client_connections",
    "milvus_sidecar_client_connections_limit",
    "milvus_sidecar_client_connections_unserved_total",
    "milvus_sidecar_health_checks_total",
    "milvus_sidecar_collection_calls_total",
    "milvus_sidecar_auth_decisions_total",
    "milvus_sidecar_auth_cache_lookups_total",
    "milvus_sidecar_recording_queue_depth",
    "milvus_sidecar_recording_batch_rows",
    "milvus_sidecar_recording_rows_written_total",
    "milvus_sidecar_recording_rows_spilled_total",
    "milvus_sidecar_recording_rows_replayed_total",
    "milvus_sidecar_recording_rows_rejected_total",
    "milvus_sidecar_recording_rows_dropped_total",
    "milvus_sidecar_postgres_pool_connections",
    "milvus_sidecar_postgres_up",
    "milvus_sidecar_upstream_up",
    "milvus_sidecar_log_maintenance_runs_total",
    "milvus_sidecar_log_maintenance_last_success_timestamp_seconds",
    "milvus_sidecar_log_maintenance_actions_total",
}
HISTOGRAMS = {"milvus_sidecar_overhead_seconds", "milvus_sidecar_upstream_seconds", "milvus_sidecar_recording_batch_rows"}

# A metric name in PromQL: not preceded by a name character (so `xmilvus_sidecar_a` is not
# one), and taken whole.
_METRIC = re.compile(r"(?<![A-Za-z0-9_:])(milvus_sidecar_[A-Za-z0-9_:]+)")


def _strings_with_promql(node) -> Iterator[str]:
    """Every PromQL string in a dashboard: `expr` of targets and templating `query`/`definition`."""
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, str) and key in ("expr", "query", "definition"):
                yield value
            elif isinstance(value, dict) and key == "query" and isinstance(value.get("query"), str):
                yield value["query"]  # newer Grafana: templating query as an object
            else:
                yield from _strings_with_promql(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings_with_promql(item)


def series_names(dashboard: dict) -> set[str]:
    """The milvus_sidecar_* series names the dashboard's queries use, as written
    (e.g. `milvus_sidecar_overhead_seconds_bucket`)."""
    names: set[str] = set()
    for text in _strings_with_promql(dashboard):
        names.update(_METRIC.findall(text))
    return names


def family_name(series: str) -> str:
    """The metric family a series belongs to: `_bucket`, `_sum` and `_count` stripped."""
    for suffix in HISTOGRAM_SUFFIXES:
        if series.endswith(suffix):
            return series[: -len(suffix)]
    return series


def family_names(dashboard: dict) -> set[str]:
    return {family_name(s) for s in series_names(dashboard)}


def parse_scrape(text: str) -> tuple[dict[str, str], set[str]]:
    """A Prometheus text-format scrape -> ({family: type} from `# TYPE` lines, sample names)."""
    types: dict[str, str] = {}
    samples: set[str] = set()
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split()
            if len(parts) >= 4 and parts[1] == "TYPE":
                types[parts[2]] = parts[3]
            continue
        name = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line)
        if name:
            samples.add(name.group(0))
    return types, samples


def has_type_line(types: dict[str, str], family: str) -> bool:
    """`# TYPE family ...`, or, for a counter `X_total`, OpenMetrics' `# TYPE X counter`."""
    if family in types:
        return True
    return family.endswith("_total") and types.get(family[: -len("_total")]) == "counter"


def missing_from_scrape(dashboard: dict, scrape: str) -> dict[str, list[str]]:
    """What the dashboard uses and the scrape lacks: {"type": [families without a TYPE line],
    "samples": [series without a sample]}. Both empty when the scrape has everything."""
    types, samples = parse_scrape(scrape)
    used = series_names(dashboard)
    return {
        "type": sorted(f for f in {family_name(s) for s in used} if not has_type_line(types, f)),
        "samples": sorted(s for s in used if s not in samples),
    }

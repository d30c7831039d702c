"""What the sidecar records in PostgreSQL, checked against what the pymilvus workflow did and
what Milvus answered.

The module runs `milvus_workflow.run_workflow` once through a sidecar of its own, recording
into a fresh database, as user alice (token "alice:secret", an admin created with
`milvus-sidecar user create` after `milvus-sidecar migrate`). Between some steps it waits for
the rows to be written and takes a snapshot of the mirror tables, so that the state in the
middle of the workflow (collection live, partition live, indexes built) can be checked as
well as the state at the end (everything dropped).

Rows are written asynchronously (batched, within ~20 ms of a call), so every check first
waits for them: until there is one performance_metrics row per call the sidecar logged (its
`milvus_sidecar::call` log lines), or, for a single call, until its row is there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from unittest.mock import ANY

import pytest
from pymilvus import MilvusClient
from pymilvus.exceptions import MilvusException

from milvus_workflow import (
    COLLECTION,
    DIM,
    INDEXED_COLLECTION,
    INDEXED_FIELD,
    N_PARTITION_ROWS,
    N_ROWS,
    NQ,
    PARTITION,
    QUICK_COLLECTION,
    TOP_K,
    run_workflow,
)
from pgdb import ROWS_TIMEOUT, Db, wait_for
from services import CallLine, Service, call_lines, run_cli, start_sidecar, stop_sidecar_checked

USER = "alice"
PASSWORD = "alice-secret"
TOKEN = f"{USER}:{PASSWORD}"
DATABASE = "default"
MISSING = "e2e_recording_missing"

# Steps after which the mirror tables are snapshotted (see `mirror_state`).
AFTER_INDEXES = "create_index(HNSW vec, vec2)"
AFTER_STATS = "get_collection_stats"
AFTER_DROP_PARTITION = "drop_partition"
SNAPSHOT_AFTER = (AFTER_INDEXES, AFTER_STATS, AFTER_DROP_PARTITION)

# The workflow's state-changing calls, in order: (audit action, resource_type, collection).
# create_collection(quick) is CreateCollection + CreateIndex (AUTOINDEX) + LoadCollection,
# and so is create_collection(schema, index_params), with the index given.
EXPECTED_AUDIT = [
    ("create_collection", "collection", COLLECTION),
    ("create_collection", "collection", QUICK_COLLECTION),
    ("create_index", "index", QUICK_COLLECTION),
    ("load_collection", "collection", QUICK_COLLECTION),
    ("create_partition", "partition", COLLECTION),
    ("insert", "data", COLLECTION),
    ("insert", "data", COLLECTION),
    ("upsert", "data", COLLECTION),
    ("insert", "data", QUICK_COLLECTION),
    ("flush", "data", COLLECTION),
    ("create_index", "index", COLLECTION),
    ("create_index", "index", COLLECTION),
    ("load_collection", "collection", COLLECTION),
    ("delete", "data", COLLECTION),
    ("delete", "data", COLLECTION),
    ("release_collection", "collection", COLLECTION),
    ("drop_partition", "partition", COLLECTION),
    ("drop_collection", "collection", COLLECTION),
    ("drop_collection", "collection", QUICK_COLLECTION),
    ("create_collection", "collection", INDEXED_COLLECTION),
    ("create_index", "index", INDEXED_COLLECTION),
    ("load_collection", "collection", INDEXED_COLLECTION),
    ("drop_collection", "collection", INDEXED_COLLECTION),
]

EXPECTED_FIELDS = {
    COLLECTION: [
        {"name": "id", "data_type": "Int64", "is_primary_key": True},
        {"name": "vec", "data_type": "FloatVector", "dim": DIM},
        {"name": "vec2", "data_type": "FloatVector", "dim": DIM},
        {"name": "title", "data_type": "VarChar"},
        {"name": "bucket", "data_type": "Int64"},
    ],
    QUICK_COLLECTION: [
        {"name": "id", "data_type": "Int64", "is_primary_key": True},
        {"name": "vector", "data_type": "FloatVector", "dim": DIM},
    ],
    INDEXED_COLLECTION: [
        {"name": "id", "data_type": "Int64", "is_primary_key": True},
        {"name": INDEXED_FIELD, "data_type": "FloatVector", "dim": DIM},
        {"name": "label", "data_type": "VarChar"},
    ],
}


def snake_case(method: str) -> str:
    return "".join(("_" + c.lower()) if c.isupper() and i else c.lower() for i, c in enumerate(method))


@dataclass
class Recorded:
    sidecar: Service
    db: Db
    steps: list[tuple[str, Any]]
    started: datetime
    finished: datetime
    snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def user_id(self) -> Any:
        return self.db.value("SELECT id FROM users WHERE username = %s", (USER,))

    def result(self, step: str) -> Any:
        for name, result in self.steps:
            if name == step:
                return result
        raise AssertionError(f"step {step!r} missing from the transcript")

    def settle(self) -> list[CallLine]:
        """Wait until performance_metrics has as many rows as the log has call lines, the
        same over two polls; return the call lines (the caller compares them)."""
        deadline = time.monotonic() + ROWS_TIMEOUT
        last = None
        while True:
            calls = call_lines(self.sidecar.log_text())
            state = (len(calls), self.db.value("SELECT count(*) FROM performance_metrics"))
            if (state[0] == state[1] and state == last) or time.monotonic() > deadline:
                return calls
            last = state
            time.sleep(0.1)


def mirror_state(db: Db) -> dict[str, Any]:
    """The mirror tables and the collection_stats view, keyed by names rather than ids."""
    return {
        "collections": db.rows(
            """SELECT id, database_name, collection_name, dimension, metric_type, fields, status,
                      dropped_at, created_by
               FROM collections ORDER BY created_at, collection_name"""
        ),
        "partitions": db.rows(
            """SELECT c.collection_name, p.partition_name, p.status, p.dropped_at
               FROM collection_partitions p JOIN collections c ON c.id = p.collection_id
               ORDER BY p.created_at"""
        ),
        "indexes": db.rows(
            """SELECT c.collection_name, i.field_name, i.index_name, i.index_type, i.metric_type,
                      i.params, i.state, i.indexed_rows, i.total_rows
               FROM index_management i JOIN collections c ON c.id = i.collection_id
               ORDER BY c.collection_name, i.index_name"""
        ),
        "permissions": sorted(
            (r["collection_name"], r["username"], r["permission_type"])
            for r in db.rows(
                """SELECT c.collection_name, u.username, p.permission_type
                   FROM permissions p JOIN collections c ON c.id = p.collection_id
                   JOIN users u ON u.id = p.user_id"""
            )
        ),
        "stats": {
            r["collection_name"]: r
            for r in db.rows("SELECT * FROM collection_stats ORDER BY database_name, collection_name")
        },
    }


@pytest.fixture(scope="module")
def recorded(binaries, milvus_lite, e2e_dir, new_database):
    _, url = new_database("recording")
    for args, stdin in (
        (("migrate", "--database-url", url), None),
        (("user", "create", USER, "--role", "admin", "--password-stdin", "--database-url", url), PASSWORD + "\n"),
    ):
        done = run_cli(binaries["sidecar"], *args, stdin=stdin)
        assert done.returncode == 0, f"milvus-sidecar {' '.join(args[:2])} failed:\n{done.stdout}\n{done.stderr}"
    svc = start_sidecar(
        binaries["sidecar"],
        milvus_lite.port,
        e2e_dir / "sidecar-recording.log",
        database_url=url,
        spill_dir=e2e_dir / "spill-recording",
    )
    db = Db(url)
    snapshots: dict[str, dict[str, Any]] = {}
    rec = Recorded(svc, db, [], datetime.now(timezone.utc), datetime.now(timezone.utc), snapshots)

    def on_step(name: str, _transcript) -> None:
        if name in SNAPSHOT_AFTER:
            rec.settle()
            snapshots[name] = mirror_state(db)

    rec.steps = run_workflow(svc.uri, token=TOKEN, on_step=on_step)
    rec.finished = datetime.now(timezone.utc)
    yield rec
    db.close()
    stop_sidecar_checked(svc)


def by_collection(rows: list[dict], name: str) -> list[dict]:
    return [r for r in rows if r["collection_name"] == name]


def one(rows: list[dict], what: str) -> dict:
    assert len(rows) == 1, f"expected one {what}, found {len(rows)}: {rows}"
    return rows[0]


def field_summary(fields: list[dict]) -> list[dict]:
    keys = ("name", "data_type", "dim", "is_primary_key")
    return [{k: f[k] for k in keys if k in f} for f in fields]


def deleted_count(result: Any) -> int:
    return result["delete_count"] if isinstance(result, dict) else len(result)


# ---------------------------------------------------------------- the workflow itself


def test_workflow_through_the_recording_sidecar_succeeded(recorded):
    failed = [(name, r) for name, r in recorded.steps if isinstance(r, dict) and "raised" in r]
    assert not failed, f"workflow steps failed through the recording sidecar: {failed}"
    assert set(recorded.snapshots) == set(SNAPSHOT_AFTER)


# ---------------------------------------------------------------- query_logs


def test_query_logs_match_the_workflows_searches_and_queries(recorded):
    r = recorded

    def hits(step: str) -> int:
        return sum(len(per_query) for per_query in r.result(step)["hits"])

    def rows(step: str) -> int:
        return len(r.result(step)["rows"])

    def search(coll, qtype, nq, top_k, result_count, filt, output_fields):
        return dict(
            collection=coll,
            query_type=qtype,
            nq=nq,
            top_k=top_k,
            result_count=result_count,
            filter_expression=filt,
            output_fields=output_fields,
        )

    def query(result_count, filt=ANY, output_fields=ANY):
        # nq and top_k mean nothing for a Query without a limit.
        return dict(
            collection=COLLECTION,
            query_type="query",
            nq=ANY,
            top_k=ANY,
            result_count=result_count,
            filter_expression=filt,
            output_fields=output_fields,
        )

    expected = [
        search(COLLECTION, "search", NQ, TOP_K, hits("search"), None, ["title", "bucket"]),
        search(
            COLLECTION, "search", NQ, TOP_K, hits("search(filter)"),
            "bucket in [1, 3, 5] and title != 'row-4'", ["title"],
        ),
        search(COLLECTION, "search", 2, 3, hits("search(partition)"), None, ["id"]),
        search(QUICK_COLLECTION, "search", 1, 3, hits("search(quick)"), None, ["note"]),
        search(COLLECTION, "hybrid_search", NQ, TOP_K, hits("hybrid_search(WeightedRanker)"), None, ["title"]),
        search(COLLECTION, "hybrid_search", NQ, TOP_K, hits("hybrid_search(RRFRanker)"), None, ["bucket"]),
        query(rows("query"), "id < 12", ["id", "title", "bucket"]),
        query(rows("get(ids)")),
        query(1, None, ["count(*)"]),
        query(1, None, ["count(*)"]),
    ]
    # The numbers above come from Milvus's answers; pin them too.
    assert [e["result_count"] for e in expected[:6]] == [NQ * TOP_K, NQ * TOP_K, 2 * 3, 3, NQ * TOP_K, NQ * TOP_K]
    assert [e["result_count"] for e in expected[6:8]] == [12, 4]

    def read():
        return r.db.rows(
            """SELECT c.collection_name AS collection, q.query_type, q.nq, q.top_k, q.result_count,
                      q.filter_expression, q.output_fields, q.username, q.success, q.error_message,
                      q.duration_ms, q.executed_at, q.query_vector_dimension, q.search_params,
                      q.database_name, q.user_id
               FROM query_logs q LEFT JOIN collections c ON c.id = q.collection_id
               WHERE q.executed_at <= %s
               ORDER BY q.executed_at, q.id""",
            (r.finished,),
        )

    got = wait_for(read, lambda rows: len(rows) >= len(expected))
    keys = list(expected[0])
    assert [{k: row[k] for k in keys} for row in got] == expected

    for row in got:
        assert row["username"] == USER and row["database_name"] == DATABASE, row
        assert row["user_id"] is not None and row["user_id"] == r.user_id, row
        assert row["success"] is True and row["error_message"] is None, row
        assert row["duration_ms"] > 0, row
        assert r.started <= row["executed_at"] <= r.finished, row
    for row in got[:6]:
        assert row["search_params"], f"a search without its search_params: {row}"
        assert row["query_vector_dimension"] == DIM, row


# ---------------------------------------------------------------- ingestion_logs


def test_ingestion_logs_match_the_rows_written(recorded):
    r = recorded
    expected = [
        dict(collection=COLLECTION, operation="insert", partition_name=None, rows_sent=N_ROWS, rows_acknowledged=N_ROWS),
        dict(
            collection=COLLECTION, operation="insert", partition_name=PARTITION,
            rows_sent=N_PARTITION_ROWS, rows_acknowledged=N_PARTITION_ROWS,
        ),
        dict(collection=COLLECTION, operation="upsert", partition_name=None, rows_sent=5, rows_acknowledged=5),
        dict(collection=QUICK_COLLECTION, operation="insert", partition_name=None, rows_sent=20, rows_acknowledged=20),
        # A delete sends a filter, not rows: only what Milvus deleted is known.
        dict(
            collection=COLLECTION, operation="delete", partition_name=None,
            rows_sent=ANY, rows_acknowledged=deleted_count(r.result("delete(ids)")),
        ),
        dict(
            collection=COLLECTION, operation="delete", partition_name=None,
            rows_sent=ANY, rows_acknowledged=deleted_count(r.result("delete(filter)")),
        ),
    ]
    assert r.result("insert")["insert_count"] == N_ROWS
    assert deleted_count(r.result("delete(ids)")) == 3
    # bucket == 9: every tenth of the 1000 rows, and id 100009 of the partition's ten.
    assert deleted_count(r.result("delete(filter)")) == N_ROWS // 10 + 1

    def read():
        return r.db.rows(
            """SELECT c.collection_name AS collection, i.operation, i.partition_name, i.rows_sent,
                      i.rows_acknowledged, i.username, i.success, i.error_message, i.bytes,
                      i.duration_ms, i.ingested_at, i.database_name, i.user_id
               FROM ingestion_logs i LEFT JOIN collections c ON c.id = i.collection_id
               WHERE i.ingested_at <= %s
               ORDER BY i.ingested_at, i.id""",
            (r.finished,),
        )

    got = wait_for(read, lambda rows: len(rows) >= len(expected))
    keys = list(expected[0])
    assert [{k: row[k] for k in keys} for row in got] == expected
    for row in got:
        assert row["username"] == USER and row["database_name"] == DATABASE, row
        assert row["user_id"] is not None and row["user_id"] == r.user_id, row
        assert row["success"] is True and row["error_message"] is None, row
        assert row["bytes"] and row["bytes"] > 0, row
        assert r.started <= row["ingested_at"] <= r.finished, row
    # 1000 rows of two 8-float vectors and more: the request is well over 64 KB.
    assert got[0]["bytes"] > N_ROWS * 2 * DIM * 4


# ---------------------------------------------------------------- audit_logs


def audit_rows(r: Recorded) -> list[dict]:
    def read():
        return r.db.rows(
            """SELECT a.action, a.resource_type, a.resource_id, a.database_name, a.username,
                      a.success, a.grpc_code, a.milvus_code, a.error_message, a.details,
                      host(a.ip_address) AS ip, a.user_agent, a.occurred_at, a.user_id,
                      c.collection_name AS collection
               FROM audit_logs a LEFT JOIN collections c ON c.id = a.collection_id
               WHERE a.occurred_at <= %s
               ORDER BY a.occurred_at, a.id""",
            (r.finished,),
        )

    return wait_for(read, lambda rows: len(rows) >= len(EXPECTED_AUDIT))


def test_audit_logs_name_every_state_change(recorded):
    got = audit_rows(recorded)
    assert [(row["action"], row["resource_type"]) for row in got] == [(a, t) for a, t, _ in EXPECTED_AUDIT]

    user_id = recorded.user_id
    for row, (action, _, coll) in zip(got, EXPECTED_AUDIT):
        assert row["username"] == USER and row["user_id"] == user_id and user_id is not None, row
        assert row["success"] is True and row["grpc_code"] == 0 and row["milvus_code"] == 0, row
        assert row["error_message"] is None, row
        assert row["ip"] == "127.0.0.1", row
        assert row["database_name"] == DATABASE, row
        assert (row["user_agent"] or "").startswith("grpc-python/"), row
        assert recorded.started <= row["occurred_at"] <= recorded.finished, row
        # 'db.collection', or 'db.collection/<partition or index>' for partitions and indexes.
        rid = row["resource_id"] or ""
        assert rid == f"{DATABASE}.{coll}" or rid.startswith(f"{DATABASE}.{coll}/"), row
        assert row["collection"] == coll, f"audit row not linked to collection {coll}: {row}"

    partition_rows = [row for row in got if row["resource_type"] == "partition"]
    assert [row["resource_id"] for row in partition_rows] == [f"{DATABASE}.{COLLECTION}/{PARTITION}"] * 2
    index_ids = sorted(row["resource_id"] for row in got if row["action"] == "create_index")
    assert index_ids == sorted(
        [
            f"{DATABASE}.{COLLECTION}/vec",
            f"{DATABASE}.{COLLECTION}/vec2",
            f"{DATABASE}.{QUICK_COLLECTION}/vector",
            f"{DATABASE}.{INDEXED_COLLECTION}/{INDEXED_FIELD}",
        ]
    )
    inserts = [row["details"].get("rows") for row in got if row["action"] in ("insert", "upsert")]
    assert inserts == [N_ROWS, N_PARTITION_ROWS, 5, 20]


# ---------------------------------------------------------------- the Milvus mirror


def check_live_collections(state: dict[str, Any]) -> None:
    for name in (COLLECTION, QUICK_COLLECTION):
        c = one(by_collection(state["collections"], name), f"collections row for {name}")
        assert c["status"] == "active" and c["dropped_at"] is None, c
        assert c["database_name"] == DATABASE, c
        assert c["dimension"] == DIM, c
        assert c["metric_type"] == "L2", c
        assert field_summary(c["fields"]) == EXPECTED_FIELDS[name], c["fields"]


def test_mirror_after_create_index(recorded):
    state = recorded.snapshots[AFTER_INDEXES]
    check_live_collections(state)
    for c in state["collections"]:
        assert c["created_by"] == recorded.user_id, f"created by alice: {c}"
    # The creator administers what they created.
    assert state["permissions"] == sorted([(COLLECTION, USER, "admin"), (QUICK_COLLECTION, USER, "admin")])

    part = one(by_collection(state["partitions"], COLLECTION), "partition row")
    assert (part["partition_name"], part["status"], part["dropped_at"]) == (PARTITION, "active", None)

    indexes = [
        (i["collection_name"], i["field_name"], i["index_name"], i["index_type"], i["metric_type"])
        for i in state["indexes"]
    ]
    assert sorted(indexes) == sorted(
        [
            (COLLECTION, "vec", "vec", "HNSW", "L2"),
            (COLLECTION, "vec2", "vec2", "HNSW", "L2"),
            (QUICK_COLLECTION, "vector", "vector", "AUTOINDEX", "L2"),
        ]
    )
    assert all(i["state"] != "dropped" for i in state["indexes"]), state["indexes"]


def test_index_rows_keep_their_build_parameters(recorded):
    state = recorded.snapshots[AFTER_INDEXES]
    for i in by_collection(state["indexes"], COLLECTION):
        assert i["params"].get("M") == "16" and i["params"].get("efConstruction") == "200", i


def test_mirror_and_collection_stats_while_the_collection_is_live(recorded):
    """After get_collection_stats: indexes built, and collection_stats sums the query rows."""
    r = recorded
    state = r.snapshots[AFTER_STATS]
    check_live_collections(state)

    described = r.result("describe_index(vec)")
    assert described["state"] == "Finished"
    for i in by_collection(state["indexes"], COLLECTION):
        assert i["state"] == "finished", i
        assert (i["indexed_rows"], i["total_rows"]) == (described["indexed_rows"], described["total_rows"]), i

    # Searches, hybrid searches and queries on each collection up to this step.
    queries_before = {COLLECTION: 3 + 2 + 4, QUICK_COLLECTION: 1}
    assert {COLLECTION, QUICK_COLLECTION} <= set(state["stats"])
    for name, n in queries_before.items():
        stats = state["stats"][name]
        assert stats["database_name"] == DATABASE, stats
        assert stats["dimension"] == DIM, stats
        assert (stats["total_queries"], stats["successful_queries"]) == (n, n), stats
        assert stats["avg_query_duration"] is not None and stats["avg_query_duration"] > 0, stats
        assert stats["user_count"] == 1, stats  # alice, who created it
    assert state["stats"][COLLECTION]["partition_count"] == 1
    assert state["stats"][QUICK_COLLECTION]["partition_count"] == 0


def test_mirror_after_drop_partition(recorded):
    state = recorded.snapshots[AFTER_DROP_PARTITION]
    check_live_collections(state)
    part = one(by_collection(state["partitions"], COLLECTION), "partition row")
    assert part["partition_name"] == PARTITION
    assert part["status"] == "dropped" and part["dropped_at"] is not None, part
    assert state["stats"][COLLECTION]["partition_count"] == 0


def test_mirror_at_the_end_everything_dropped(recorded):
    r = recorded
    r.settle()
    state = mirror_state(r.db)
    names = [c["collection_name"] for c in state["collections"]]
    assert sorted(n for n in names if n in (COLLECTION, QUICK_COLLECTION)) == sorted([COLLECTION, QUICK_COLLECTION])
    assert "e2e_no_such_collection" not in names, "a failed describe must not create a collection row"
    state["collections"] = [c for c in state["collections"] if c["collection_name"] in (COLLECTION, QUICK_COLLECTION)]
    state["partitions"] = [p for p in state["partitions"] if p["collection_name"] == COLLECTION]
    state["indexes"] = [i for i in state["indexes"] if i["collection_name"] in (COLLECTION, QUICK_COLLECTION)]
    for c in state["collections"]:
        assert c["status"] == "dropped" and c["dropped_at"] is not None, c
        assert c["dimension"] == DIM, c
        assert field_summary(c["fields"]) == EXPECTED_FIELDS[c["collection_name"]], c["fields"]
    assert [(p["partition_name"], p["status"]) for p in state["partitions"]] == [(PARTITION, "dropped")]
    assert len(state["indexes"]) == 3 and all(i["state"] == "dropped" for i in state["indexes"]), state["indexes"]
    assert not {COLLECTION, QUICK_COLLECTION} & set(state["stats"]), "collection_stats lists live collections only"
    assert not [p for p in state["permissions"] if p[0] in (COLLECTION, QUICK_COLLECTION)], "grants die with the collection"


def test_mirror_of_a_collection_created_with_its_index_in_one_call(recorded):
    """create_collection(schema=..., index_params=...): the mirror has the collection with
    its fields, and the index with the parameters given, both dropped at the end."""
    r = recorded
    r.settle()
    state = mirror_state(r.db)
    c = one(by_collection(state["collections"], INDEXED_COLLECTION), f"collections row for {INDEXED_COLLECTION}")
    assert c["status"] == "dropped" and c["dropped_at"] is not None, c
    assert c["created_by"] == r.user_id, c
    assert c["dimension"] == DIM, c
    assert field_summary(c["fields"]) == EXPECTED_FIELDS[INDEXED_COLLECTION], c["fields"]
    i = one(by_collection(state["indexes"], INDEXED_COLLECTION), f"index row for {INDEXED_COLLECTION}")
    assert (i["field_name"], i["index_name"], i["index_type"], i["metric_type"], i["state"]) == (
        INDEXED_FIELD,
        INDEXED_FIELD,
        "HNSW",
        "L2",
        "dropped",
    ), i
    assert i["params"].get("M") == "16" and i["params"].get("efConstruction") == "200", i
    assert not [p for p in state["permissions"] if p[0] == INDEXED_COLLECTION], "grants die with the collection"


# ---------------------------------------------------------------- a failed call


def test_failed_search_on_a_missing_collection(recorded):
    r = recorded
    client = MilvusClient(uri=r.sidecar.uri, token=TOKEN, timeout=30)
    started = datetime.now(timezone.utc)
    try:
        with pytest.raises(MilvusException) as info:
            client.search(MISSING, [[0.5] * DIM], limit=3)
    finally:
        client.close()
    reason = info.value.message
    assert info.value.code == 100 and MISSING in reason

    q = wait_for(
        lambda: r.db.rows("SELECT * FROM query_logs WHERE executed_at >= %s AND NOT success", (started,)),
        lambda rows: len(rows) >= 1,
    )
    q = one(q, "failed query_logs row")
    assert (q["query_type"], q["nq"], q["top_k"], q["result_count"]) == ("search", 1, 3, None), q
    assert q["error_message"] == reason, q
    assert q["username"] == USER and q["user_id"] == r.user_id and q["collection_id"] is None, q

    perf = wait_for(
        lambda: r.db.rows(
            "SELECT * FROM performance_metrics WHERE recorded_at >= %s AND operation_type = 'search'", (started,)
        ),
        lambda rows: len(rows) >= 1,
    )
    perf = one(perf, "performance_metrics row of the failed search")
    assert perf["success"] is False, perf
    assert (perf["grpc_code"], perf["milvus_code"]) == (0, info.value.code), perf
    assert perf["error_message"] == reason, perf

    assert r.db.value("SELECT count(*) FROM collections WHERE collection_name = %s", (MISSING,)) == 0


def test_refused_call_is_recorded(recorded):
    """A wrong password: the sidecar refuses the connection (UNAUTHENTICATED) and records it
    as a failed call, in performance_metrics and in the audit trail."""
    r = recorded
    started = datetime.now(timezone.utc)
    with pytest.raises(MilvusException) as info:
        MilvusClient(uri=r.sidecar.uri, token=f"{USER}:wrong-password", timeout=10)
    assert info.value.code == 2, info.value  # pymilvus: "Fail connecting to server"

    perf = wait_for(
        lambda: r.db.rows("SELECT * FROM performance_metrics WHERE recorded_at >= %s", (started,)),
        lambda rows: len(rows) >= 1,
    )
    assert perf and all(p["success"] is False and p["grpc_code"] == 16 for p in perf), perf
    assert all(p["error_message"] for p in perf), perf
    audit = wait_for(
        lambda: r.db.rows("SELECT * FROM audit_logs WHERE occurred_at >= %s", (started,)),
        lambda rows: len(rows) >= len(perf),
    )
    assert [(a["action"], a["success"], a["grpc_code"]) for a in audit] == [
        (p["operation_type"], False, 16) for p in sorted(perf, key=lambda p: (p["recorded_at"], p["id"]))
    ], audit


# ---------------------------------------------------------------- performance_metrics


def test_one_performance_row_per_call(recorded):
    """Every call the sidecar forwarded (workflow, failed search) has exactly one row, with
    the call's id, its method in snake_case and its outcome."""
    r = recorded
    calls = r.settle()
    rows = r.db.rows(
        """SELECT p.id::text AS id, p.operation_type, p.success, p.duration_ms, p.database_name,
                  p.user_id, p.grpc_code, c.collection_name AS collection
           FROM performance_metrics p LEFT JOIN collections c ON c.id = p.collection_id"""
    )
    assert len(calls) > 60, f"only {len(calls)} call lines in {r.sidecar.log}"
    assert len(rows) == len(calls), f"{len(rows)} performance_metrics rows for {len(calls)} calls"

    logged = {c.id: (snake_case(c.method), c.success) for c in calls}
    stored = {row["id"]: (row["operation_type"], row["success"]) for row in rows}
    missing = {k: v for k, v in logged.items() if k not in stored}
    unexpected = {k: v for k, v in stored.items() if k not in logged}
    assert not missing and not unexpected, f"calls without a row: {missing}; rows without a call: {unexpected}"
    differ = {k: (logged[k], stored[k]) for k in logged if logged[k] != stored[k]}
    assert not differ, f"(logged, stored) differ: {differ}"
    assert all(row["duration_ms"] >= 0 for row in rows)
    assert {row["database_name"] for row in rows} == {DATABASE}
    # Every call was made as alice, except the refused one (wrong password: no user).
    assert {row["user_id"] for row in rows if row["grpc_code"] != 16} == {r.user_id}

    # A successful call on a collection is linked to that collection's row.
    by_id = {row["id"]: row for row in rows}
    unlinked = [
        (c.method, c.collection, by_id[c.id]["collection"])
        for c in calls
        if c.success and c.collection and by_id[c.id]["collection"] != c.collection
    ]
    assert not unlinked, f"(method, collection called, collection linked): {unlinked}"

    # The workflow's data calls, all successful (the failed search is the only failed Search).
    ops = [snake_case(c.method) for c in calls if c.success]
    for op, n in {"search": 4, "hybrid_search": 2, "query": 4, "insert": 3, "upsert": 1, "delete": 2}.items():
        assert ops.count(op) == n, f"{ops.count(op)} successful {op} calls, expected {n}"


def test_request_bytes_counted_for_every_call(recorded):
    recorded.settle()
    # A call refused at authentication (grpc 16) is answered before its body is read, so
    # its size is not known; every call that went on has at least its 5-byte frame header.
    zero = recorded.db.rows(
        "SELECT DISTINCT operation_type FROM performance_metrics"
        " WHERE grpc_code <> 16 AND (request_bytes IS NULL OR request_bytes < 5)"
    )
    assert zero == []

"""A complete pymilvus MilvusClient workflow that records what every step returned.

`run_workflow(uri)` runs the same steps against any Milvus-protocol address and returns a
transcript: a list of (step name, normalized result). Run once straight at Milvus and once
through the sidecar, the two transcripts must be identical.

`token` is passed to MilvusClient ("user:password" names the caller to the sidecar), and
`on_step(name, transcript)` is called after every step, so that a test can look at the
recorded state between steps.

Every run creates its own collections and drops them at the end (also after a failure), so
consecutive runs against the same server start from the same empty state.
"""

from __future__ import annotations

import enum
import random
from typing import Any, Callable

from pymilvus import AnnSearchRequest, DataType, MilvusClient, RRFRanker, WeightedRanker
from pymilvus.exceptions import MilvusException

COLLECTION = "e2e_workflow"
QUICK_COLLECTION = "e2e_quick"
# Created with an explicit schema and index_params in one create_collection call.
INDEXED_COLLECTION = "e2e_indexed"
INDEXED_FIELD = "embedding"
PARTITION = "e2e_part"
DIM = 8
N_ROWS = 1000
N_PARTITION_ROWS = 10
PARTITION_ID_BASE = 100_000
SEED = 20240611
NQ = 5
TOP_K = 10
# ef far above the row count: HNSW then visits every vector, so results are exact and do not
# depend on how the graph happened to be built.
SEARCH_PARAMS = {"metric_type": "L2", "params": {"ef": 4096}}
HNSW = {"index_type": "HNSW", "metric_type": "L2", "params": {"M": 16, "efConstruction": 200}}

# Values that legitimately differ between two runs of the same steps, and only those:
# Milvus allocates collection ids and stamps creation/update times and session timestamps
# from its clock (TSO) at the moment of the call, so a second run gets new ones even though
# nothing else changed. (milvus-lite reports 0 for several of these today; a real Milvus
# does not.) Everything else must match exactly, floats included: the sidecar forwards the
# same bytes, so distances are bit-for-bit equal.
VOLATILE_KEYS = frozenset(
    {
        "collection_id",
        "created_timestamp",
        "created_utc_timestamp",
        "update_timestamp",
        "update_utc_timestamp",
        "session_ts",
        "iterator_session_ts",
    }
)
VOLATILE = "<volatile>"

Transcript = list[tuple[str, Any]]


def plain(value: Any) -> Any:
    """Turn pymilvus results (dict/list subclasses, enums, numpy scalars) into plain data."""
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, dict):
        return {str(k): (VOLATILE if k in VOLATILE_KEYS else plain(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if hasattr(value, "__len__") and hasattr(value, "__getitem__"):  # protobuf repeated fields
        return [plain(v) for v in list(value)]
    return repr(value)


def plain_search(result: Any) -> dict:
    """A SearchResult: per query, the hits (id, distance, entity); plus its extra info."""
    return {
        "hits": [[plain(dict(hit)) for hit in hits] for hits in result],
        "extra": plain(getattr(result, "extra", None)),
        "recalls": plain(getattr(result, "recalls", None)),
    }


def plain_rows(result: Any) -> dict:
    """A query/get result: the rows, plus its extra info (cost, session timestamp)."""
    return {"rows": [plain(dict(row)) for row in result], "extra": plain(getattr(result, "extra", None))}


def plain_error(exc: BaseException) -> dict:
    """What a caller can see of an exception."""
    out: dict[str, Any] = {"raised": f"{type(exc).__module__}.{type(exc).__name__}"}
    if isinstance(exc, MilvusException):
        out.update(code=exc.code, message=exc.message, compatible_code=exc.compatible_code)
    elif callable(getattr(exc, "code", None)) and callable(getattr(exc, "details", None)):
        out.update(grpc_code=str(exc.code()), details=exc.details())  # grpc.RpcError
    else:
        out["message"] = str(exc)
    return out


def vectors(rng: random.Random, n: int) -> list[list[float]]:
    return [[rng.random() for _ in range(DIM)] for _ in range(n)]


def make_rows(rng: random.Random, ids: range, title: str) -> list[dict]:
    return [
        {
            "id": i,
            "vec": [rng.random() for _ in range(DIM)],
            "vec2": [rng.random() for _ in range(DIM)],
            "title": f"{title}-{i % 13}",
            "bucket": i % 10,
        }
        for i in ids
    ]


StepHook = Callable[[str, Transcript], None]


class Recorder:
    def __init__(self, on_step: StepHook | None = None) -> None:
        self.transcript: Transcript = []
        self.on_step = on_step

    def step(self, name: str, fn: Callable[[], Any], shape: Callable[[Any], Any] = plain) -> Any:
        """Run one step and record its shaped result, or the error it raised."""
        try:
            result = fn()
        except Exception as exc:  # recorded, so that the comparison names the step
            self.transcript.append((name, plain(plain_error(exc))))
            result = None
        else:
            self.transcript.append((name, shape(result)))
        if self.on_step is not None:
            self.on_step(name, self.transcript)
        return result


def run_workflow(uri: str, token: str | None = None, on_step: StepHook | None = None) -> Transcript:
    rec = Recorder(on_step)
    step = rec.step
    rng = random.Random(SEED)
    rows = make_rows(rng, range(N_ROWS), "row")
    part_rows = make_rows(rng, range(PARTITION_ID_BASE, PARTITION_ID_BASE + N_PARTITION_ROWS), "part")
    upsert_rows = make_rows(rng, range(5), "upserted")
    queries = vectors(rng, NQ)
    quick_rows = [{"id": i, "vector": v, "note": f"dynamic-{i}"} for i, v in enumerate(vectors(rng, 20))]

    auth = {"token": token} if token else {}
    # A connection of its own: pymilvus otherwise reuses the channel an earlier test left open
    # to the same address, and grpcio, even for a new channel (dedicated), the connection
    # under it from its process-wide pool. milvus-lite may have answered that connection's
    # idle keepalive pings with a GOAWAY (too_many_pings), failing this connect (seen twice
    # in CI, the second time with dedicated=True alone).
    client = step(
        "connect",
        lambda: MilvusClient(
            uri=uri,
            timeout=60,
            dedicated=True,
            grpc_options={"grpc.use_local_subchannel_pool": 1},
            **auth,
        ),
        lambda c: {"server_type": c.get_server_type()},
    )
    if client is None:
        return rec.transcript
    try:
        step("get_server_version", client.get_server_version)
        step("list_collections", client.list_collections, lambda r: sorted(r))

        def create_with_schema():
            schema = client.create_schema(auto_id=False, enable_dynamic_field=False, description="e2e workflow")
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vec", DataType.FLOAT_VECTOR, dim=DIM)
            schema.add_field("vec2", DataType.FLOAT_VECTOR, dim=DIM)
            schema.add_field("title", DataType.VARCHAR, max_length=64)
            schema.add_field("bucket", DataType.INT64)
            return client.create_collection(COLLECTION, schema=schema)

        step("create_collection(schema)", create_with_schema)
        # Quick-setup form: pymilvus creates the schema, an AUTOINDEX with this metric on
        # "vector", and loads the collection (in 3.0.2 the quick form takes its index settings
        # from metric_type; an index_params argument is ignored there).
        step(
            "create_collection(quick)",
            lambda: client.create_collection(QUICK_COLLECTION, dimension=DIM, metric_type="L2"),
        )
        step("has_collection", lambda: client.has_collection(COLLECTION))
        step("has_collection(quick)", lambda: client.has_collection(QUICK_COLLECTION))
        step("has_collection(missing)", lambda: client.has_collection("e2e_no_such_collection"))
        step("describe_collection", lambda: client.describe_collection(COLLECTION))
        step("describe_collection(quick)", lambda: client.describe_collection(QUICK_COLLECTION))
        step("list_collections(after create)", client.list_collections, lambda r: sorted(r))

        step("create_partition", lambda: client.create_partition(COLLECTION, PARTITION))
        step("has_partition", lambda: client.has_partition(COLLECTION, PARTITION))
        step("list_partitions", lambda: client.list_partitions(COLLECTION))

        step("insert", lambda: client.insert(COLLECTION, rows))
        step("insert(partition)", lambda: client.insert(COLLECTION, part_rows, partition_name=PARTITION))
        step("upsert", lambda: client.upsert(COLLECTION, upsert_rows))
        step("insert(quick, dynamic field)", lambda: client.insert(QUICK_COLLECTION, quick_rows))
        step("flush", lambda: client.flush(COLLECTION))

        def create_hnsw():
            params = client.prepare_index_params()
            for field in ("vec", "vec2"):
                params.add_index(field, **HNSW)  # index name defaults to the field name
            return client.create_index(COLLECTION, params)

        step("create_index(HNSW vec, vec2)", create_hnsw)
        step("list_indexes", lambda: sorted(client.list_indexes(COLLECTION)))
        step("describe_index(vec)", lambda: client.describe_index(COLLECTION, "vec"))
        step("describe_index(vec2)", lambda: client.describe_index(COLLECTION, "vec2"))
        step("load_collection", lambda: client.load_collection(COLLECTION))
        step("get_load_state", lambda: client.get_load_state(COLLECTION))

        step(
            "search",
            lambda: client.search(
                COLLECTION,
                queries,
                limit=TOP_K,
                anns_field="vec",
                search_params=SEARCH_PARAMS,
                output_fields=["title", "bucket"],
            ),
            plain_search,
        )
        step(
            "search(filter)",
            lambda: client.search(
                COLLECTION,
                queries,
                filter="bucket in [1, 3, 5] and title != 'row-4'",
                limit=TOP_K,
                anns_field="vec",
                search_params=SEARCH_PARAMS,
                output_fields=["title"],
            ),
            plain_search,
        )
        step(
            "search(partition)",
            lambda: client.search(
                COLLECTION,
                queries[:2],
                limit=3,
                anns_field="vec2",
                search_params=SEARCH_PARAMS,
                partition_names=[PARTITION],
                output_fields=["id"],
            ),
            plain_search,
        )
        step(
            "search(quick)",
            lambda: client.search(QUICK_COLLECTION, queries[:1], limit=3, output_fields=["note"]),
            plain_search,
        )

        def reqs():
            return [
                AnnSearchRequest(queries, "vec", SEARCH_PARAMS, TOP_K),
                AnnSearchRequest(queries, "vec2", SEARCH_PARAMS, TOP_K, filter="bucket < 8"),
            ]

        step(
            "hybrid_search(WeightedRanker)",
            lambda: client.hybrid_search(
                COLLECTION, reqs(), WeightedRanker(0.7, 0.3), limit=TOP_K, output_fields=["title"]
            ),
            plain_search,
        )
        step(
            "hybrid_search(RRFRanker)",
            lambda: client.hybrid_search(COLLECTION, reqs(), RRFRanker(60), limit=TOP_K, output_fields=["bucket"]),
            plain_search,
        )

        step(
            "query",
            lambda: client.query(COLLECTION, filter="id < 12", output_fields=["id", "title", "bucket"]),
            plain_rows,
        )
        step("get(ids)", lambda: client.get(COLLECTION, ids=[0, 3, 999, PARTITION_ID_BASE + 1]), plain_rows)
        step("query(count(*))", lambda: client.query(COLLECTION, output_fields=["count(*)"]), plain_rows)
        step("delete(ids)", lambda: client.delete(COLLECTION, ids=[0, 1, 2]))
        step("delete(filter)", lambda: client.delete(COLLECTION, filter="bucket == 9"))
        step("query(count(*) after delete)", lambda: client.query(COLLECTION, output_fields=["count(*)"]), plain_rows)
        step("get_collection_stats", lambda: client.get_collection_stats(COLLECTION))

        step("release_collection", lambda: client.release_collection(COLLECTION))
        step("get_load_state(released)", lambda: client.get_load_state(COLLECTION))
        step("drop_partition", lambda: client.drop_partition(COLLECTION, PARTITION))
        step("list_partitions(after drop)", lambda: client.list_partitions(COLLECTION))
        step("drop_collection", lambda: client.drop_collection(COLLECTION))
        step("drop_collection(quick)", lambda: client.drop_collection(QUICK_COLLECTION))

        # Schema and index in one call: pymilvus creates the collection, then the index,
        # then loads it (three RPCs the sidecar sees one after the other).
        def create_with_schema_and_index():
            schema = client.create_schema(auto_id=False, enable_dynamic_field=False, description="e2e indexed")
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field(INDEXED_FIELD, DataType.FLOAT_VECTOR, dim=DIM)
            schema.add_field("label", DataType.VARCHAR, max_length=32)
            params = client.prepare_index_params()
            # (No index_name: milvus-lite ignores one and names the index after the field.)
            params.add_index(INDEXED_FIELD, **HNSW)
            return client.create_collection(INDEXED_COLLECTION, schema=schema, index_params=params)

        step("create_collection(schema, index_params)", create_with_schema_and_index)
        step("describe_collection(indexed)", lambda: client.describe_collection(INDEXED_COLLECTION))
        step("list_indexes(indexed)", lambda: sorted(client.list_indexes(INDEXED_COLLECTION)))
        step("describe_index(indexed)", lambda: client.describe_index(INDEXED_COLLECTION, INDEXED_FIELD))
        step("get_load_state(indexed)", lambda: client.get_load_state(INDEXED_COLLECTION))
        step("drop_collection(indexed)", lambda: client.drop_collection(INDEXED_COLLECTION))
        step("has_collection(indexed, after drop)", lambda: client.has_collection(INDEXED_COLLECTION))
        step("has_collection(after drop)", lambda: client.has_collection(COLLECTION))
        step("list_collections(end)", client.list_collections, lambda r: sorted(r))
    finally:
        # Leave the server as we found it even when a step failed half-way.
        for name in (COLLECTION, QUICK_COLLECTION, INDEXED_COLLECTION):
            try:
                if client.has_collection(name):
                    client.drop_collection(name)
            except Exception:
                pass
        client.close()
    return rec.transcript

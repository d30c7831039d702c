#!/usr/bin/env python3
"""A short pymilvus quick start: create a collection, insert, index, load, search, query, drop.

    python scripts/quickstart.py [URI]

URI defaults to $MILVUS_URI, else http://127.0.0.1:19538 (the sidecar of scripts/run-local.sh).
$MILVUS_TOKEN, when set ("user:password"), is sent as the pymilvus token: the sidecar records
that user in its query, ingestion and audit rows.
Each step prints what it did and what came back. Exits non-zero if a step fails.
"""

from __future__ import annotations

import os
import random
import sys
import time

from pymilvus import DataType, MilvusClient

COLLECTION = "quickstart_demo"
DIM = 8
ROWS = 200
COLORS = ["red", "green", "blue", "yellow"]


def show(step: str, detail: str, started: float) -> None:
    ms = (time.perf_counter() - started) * 1000
    print(f"  {step:<22} {detail}  ({ms:.0f} ms)")


def main() -> int:
    uri = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MILVUS_URI", "http://127.0.0.1:19538")
    print(f"pymilvus quick start against {uri}")
    rng = random.Random(7)

    t = time.perf_counter()
    token = os.environ.get("MILVUS_TOKEN")
    client = MilvusClient(uri=uri, timeout=30, **({"token": token} if token else {}))
    show("connect", f"server version {client.get_server_version()}", t)

    if client.has_collection(COLLECTION):
        t = time.perf_counter()
        client.drop_collection(COLLECTION)
        show("drop leftover", f"{COLLECTION} existed from an earlier run; dropped", t)

    t = time.perf_counter()
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=DIM)
    schema.add_field("color", DataType.VARCHAR, max_length=16)
    client.create_collection(COLLECTION, schema=schema)
    show("create_collection", f"{COLLECTION}: id INT64 (primary), embedding FLOAT_VECTOR({DIM}), color VARCHAR", t)

    t = time.perf_counter()
    rows = [
        {"id": i, "embedding": [rng.random() for _ in range(DIM)], "color": COLORS[i % len(COLORS)]}
        for i in range(ROWS)
    ]
    res = client.insert(COLLECTION, rows)
    show("insert", f"{res['insert_count']} rows", t)

    t = time.perf_counter()
    client.flush(COLLECTION)
    show("flush", "segments sealed", t)

    t = time.perf_counter()
    index_params = client.prepare_index_params()
    index_params.add_index("embedding", index_type="HNSW", metric_type="L2", params={"M": 16, "efConstruction": 64})
    client.create_index(COLLECTION, index_params)
    info = client.describe_index(COLLECTION, "embedding")
    show("create_index", f"{info['index_type']} on embedding, metric {info['metric_type']}", t)

    t = time.perf_counter()
    client.load_collection(COLLECTION)
    show("load_collection", f"state {client.get_load_state(COLLECTION)['state'].name}", t)

    t = time.perf_counter()
    query_vector = [rng.random() for _ in range(DIM)]
    hits = client.search(
        COLLECTION,
        [query_vector],
        limit=3,
        search_params={"metric_type": "L2", "params": {"ef": 64}},
        output_fields=["color"],
    )[0]
    show("search", f"top 3 of {ROWS}:", t)
    for hit in hits:
        print(f"  {'':<22}   id={hit['id']:<4} distance={hit['distance']:.4f} color={hit['entity']['color']}")

    t = time.perf_counter()
    hits = client.search(
        COLLECTION,
        [query_vector],
        limit=3,
        filter='color == "blue"',
        search_params={"metric_type": "L2", "params": {"ef": 64}},
        output_fields=["color"],
    )[0]
    show("search (filtered)", f'color == "blue": ids {[h["id"] for h in hits]}', t)

    t = time.perf_counter()
    rows = client.query(COLLECTION, filter="id < 3", output_fields=["id", "color"])
    show("query", f"id < 3: {[dict(r) for r in rows]}", t)

    t = time.perf_counter()
    count = client.query(COLLECTION, output_fields=["count(*)"])[0]["count(*)"]
    show("count", f"{count} rows", t)

    t = time.perf_counter()
    client.release_collection(COLLECTION)
    client.drop_collection(COLLECTION)
    show("drop_collection", f"{COLLECTION} released and dropped; exists now: {client.has_collection(COLLECTION)}", t)

    client.close()
    print("quick start finished: every step succeeded")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # one readable line instead of a traceback
        print(f"quick start FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)

"""Tagged pymilvus traffic from several threads, and what each call's client saw, so that
the rows the sidecar wrote can be matched call by call afterwards.

Every search and query carries a filter `id >= <tag>` with a tag no other call uses: its
`query_logs` row is found by `filter_expression`. Inserts are counted per collection (each
worker has a collection of its own): `ingestion_logs` rows per collection. Used by the crash
and outage tests and by scripts/soak.py.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
from pymilvus import MilvusClient
from pymilvus.exceptions import MilvusException

# pymilvus logs every failed attempt with a traceback; failures are counted here instead.
logging.getLogger("pymilvus").setLevel(logging.CRITICAL)

DIM = 4
# Every call's tag is at least this: filters below it are not the workers'.
TAG_BASE = 1_000_000
KINDS = ("search", "query", "insert")


@dataclass(frozen=True)
class Call:
    kind: str
    collection: str
    tag: int
    started: float  # time.monotonic()
    ended: float
    # "OK", a gRPC code name (UNAVAILABLE, PERMISSION_DENIED...), or "MILVUS_<code>" for
    # a failure Milvus reported inside an OK reply.
    code: str

    @property
    def ok(self) -> bool:
        return self.code == "OK"

    @property
    def filter(self) -> str:
        return filter_for(self.tag)


def filter_for(tag: int) -> str:
    return f"id >= {tag}"


def is_tagged(filter_expression: str) -> bool:
    """Whether a filter is one of the workers' (not, say, a check made after a reload)."""
    prefix, _, tag = filter_expression.partition("id >= ")
    return not prefix and tag.isdigit() and int(tag) >= TAG_BASE


def error_code(e: Exception) -> str:
    """A short name for how a call failed, whichever way pymilvus reports it."""
    if isinstance(e, grpc.RpcError) and hasattr(e, "code"):
        return e.code().name
    if isinstance(e, MilvusException):
        cause = e.__cause__ or e.__context__
        if isinstance(cause, grpc.RpcError) and hasattr(cause, "code"):
            return cause.code().name
        code = getattr(e, "code", None)
        # pymilvus answers UNAVAILABLE by reconnecting (Connect through the sidecar); when
        # that fails too, it raises this instead of the gRPC error.
        if "Fail connecting to server" in str(e):
            return "UNAVAILABLE"
        # pymilvus gives transport failures its own codes; keep the text's gRPC code if any.
        for name in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "PERMISSION_DENIED", "UNAUTHENTICATED", "CANCELLED"):
            if name in str(e):
                return name
        return f"MILVUS_{code}"
    return type(e).__name__


def setup_collections(uri: str, token: str | None, names: list[str]) -> None:
    """Fresh, empty collections (quick setup: id + vector, indexed and loaded)."""
    client = MilvusClient(uri=uri, token=token or "", timeout=60)
    try:
        for name in names:
            if client.has_collection(name):
                client.drop_collection(name)
            client.create_collection(name, dimension=DIM)
    finally:
        client.close()


def reload_collections(uri: str, token: str | None, names: list[str], timeout: float = 120.0) -> None:
    """Loads `names` again on a restarted Milvus, retrying until a query on each works:
    milvus-lite sometimes accepts a load sent while it is still starting and then never
    loads (it reports success, queries keep saying "released")."""
    deadline = time.monotonic() + timeout
    pending = list(names)
    while pending:
        try:
            client = MilvusClient(uri=uri, token=token or "", timeout=10)
            try:
                for name in list(pending):
                    client.load_collection(name, timeout=10)
                    client.query(name, filter="id >= 0", limit=1)
                    pending.remove(name)
            finally:
                client.close()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


_tags = itertools.count(TAG_BASE)
_tags_lock = threading.Lock()


def next_tag() -> int:
    with _tags_lock:
        return next(_tags)


class Worker(threading.Thread):
    """Calls `uri` in a loop (search, query, insert in turn; or `kinds`) on `collection`
    until stopped; `rate` calls per second at most (None: as fast as it can)."""

    def __init__(self, uri: str, token: str | None, collection: str, *, rate: float | None = None,
                 kinds: tuple[str, ...] = KINDS, timeout: float = 10.0, seed: int = 0) -> None:
        super().__init__(daemon=True)
        self.uri, self.token, self.collection = uri, token, collection
        self.rate, self.kinds, self.timeout = rate, kinds, timeout
        self.calls: list[Call] = []
        self._halt = threading.Event()
        self._random = random.Random(seed)
        self.client: MilvusClient | None = None

    def stop(self) -> None:
        self._halt.set()

    def connect(self) -> MilvusClient:
        return MilvusClient(uri=self.uri, token=self.token or "", timeout=self.timeout)

    def run(self) -> None:
        period = 1.0 / self.rate if self.rate else 0.0
        next_at = time.monotonic()
        turn = 0
        while not self._halt.is_set():
            if self.client is None:
                try:
                    self.client = self.connect()
                except Exception:  # the sidecar may be down: try again shortly
                    time.sleep(0.2)
                    continue
            kind = self.kinds[turn % len(self.kinds)]
            turn += 1
            self.calls.append(self.one(kind))
            if period:
                next_at += period
                delay = next_at - time.monotonic()
                if delay > 0:
                    self._halt.wait(delay)
                else:
                    next_at = time.monotonic()
        if self.client is not None:
            try:
                self.client.close()
            except Exception:
                pass

    def one(self, kind: str) -> Call:
        tag = next_tag()
        started = time.monotonic()
        code = "OK"
        try:
            assert self.client is not None
            if kind == "search":
                self.client.search(self.collection, [[self._random.random() for _ in range(DIM)]],
                                   filter=filter_for(tag), limit=3)
            elif kind == "query":
                self.client.query(self.collection, filter=filter_for(tag), limit=3)
            elif kind == "insert":
                self.client.insert(self.collection, [{"id": tag, "vector": [0.2] * DIM}])
            elif kind == "list":
                self.client.list_collections()
            else:
                raise ValueError(kind)
        except Exception as e:  # every failure is an outcome to count, not a test error
            code = error_code(e)
        return Call(kind, self.collection, tag, started, time.monotonic(), code)


@dataclass
class Expected:
    """What the clients saw, in the shape the tables are checked in."""

    # filter -> the call, for searches and queries
    queries: dict[str, Call] = field(default_factory=dict)
    # collection -> inserts that succeeded / that were made at all
    inserts_ok: Counter = field(default_factory=Counter)
    inserts_made: Counter = field(default_factory=Counter)
    calls: list[Call] = field(default_factory=list)

    @classmethod
    def of(cls, calls: list[Call]) -> Expected:
        e = cls()
        for c in calls:
            e.calls.append(c)
            if c.kind in ("search", "query"):
                e.queries[c.filter] = c
            elif c.kind == "insert":
                e.inserts_made[c.collection] += 1
                if c.ok:
                    e.inserts_ok[c.collection] += 1
        return e


def recorded_filters(db, collections: list[str]) -> dict[str, list[dict]]:
    """filter_expression -> its query_logs rows (a call pymilvus retried has several), each
    with whether its performance_metrics twin is there, for the workers' searches and
    queries on `collections`."""
    rows = db.rows(
        """SELECT q.id, q.filter_expression, q.query_type, q.success, q.error_message,
                  (p.id IS NOT NULL) AS has_perf
           FROM query_logs q
           LEFT JOIN collections c ON c.id = q.collection_id
           LEFT JOIN performance_metrics p ON p.id = q.id
           WHERE c.collection_name = ANY(%s) AND q.filter_expression IS NOT NULL""",
        (collections,),
    )
    out: dict[str, list[dict]] = {}
    for r in rows:
        if not is_tagged(r["filter_expression"]):
            continue
        out.setdefault(r["filter_expression"], []).append(r)
    return out


def recorded_inserts(db, collections: list[str]) -> Counter:
    """collection -> ingestion_logs rows of operation insert."""
    rows = db.rows(
        """SELECT c.collection_name AS name, count(*) AS n FROM ingestion_logs i
           JOIN collections c ON c.id = i.collection_id
           WHERE c.collection_name = ANY(%s) AND i.operation = 'insert'
           GROUP BY c.collection_name""",
        (collections,),
    )
    return Counter({r["name"]: r["n"] for r in rows})


def wait_until_stable(read, settle: float = 2.0, timeout: float = 60.0):
    """Polls `read` until its value stays the same for `settle` seconds."""
    deadline = time.monotonic() + timeout
    last, since = read(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        value = read()
        if value != last:
            last, since = value, time.monotonic()
        elif time.monotonic() - since >= settle:
            break
    return last

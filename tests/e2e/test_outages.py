"""Outages under load, through a recording sidecar.

- The upstream Milvus restarts: calls in flight and calls made while it is down fail with
  UNAVAILABLE, the sidecar reconnects by itself, later calls succeed, and every call (the
  failed ones too) has its rows.
- PostgreSQL restarts (a relay between the sidecar and the server is cut, closing every
  connection, then restored): no call fails, cached credentials and grants keep serving, and
  every record arrives exactly once (spilled, then replayed).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg
import pytest

from load import (
    Expected,
    Worker,
    recorded_filters,
    recorded_inserts,
    reload_collections,
    setup_collections,
    wait_until_stable,
)
from pgdb import Db, conn_params, url_with_db, wait_for
from relay import Relay
from services import log_tail, run_cli, scrape, start_milvus_lite, start_sidecar, stop_sidecar_checked, total

THREADS = 3
RATE = 25.0  # calls per second per worker


@pytest.fixture(scope="module")
def milvus_lite(binaries, e2e_dir):
    """A milvus-lite of this module's own (it overrides the session's): the collections and
    the load made here must not reach the other tests."""
    svc = start_milvus_lite(binaries["milvus_lite"], e2e_dir / "outages-milvus-data", e2e_dir / "outages-milvus-lite.log")
    yield svc
    svc.stop(15)


def check_every_call_recorded(db: Db, calls, collections, *, exactly_once: bool) -> str:
    """Every search/query made has its query_logs row(s) (one per attempt: pymilvus retries
    UNAVAILABLE), a successful call exactly one successful row; inserts are counted."""
    expected = Expected.of(calls)

    def read():
        return (sum(map(len, recorded_filters(db, collections).values())),
                sum(recorded_inserts(db, collections).values()))

    wait_until_stable(read, settle=3.0)
    found = recorded_filters(db, collections)
    inserts = recorded_inserts(db, collections)
    missing = [c for f, c in expected.queries.items() if f not in found]
    assert not missing, f"{len(missing)} calls without rows, e.g. {missing[:3]}"
    unknown = set(found) - set(expected.queries)
    assert not unknown, f"rows for calls never made: {sorted(unknown)[:5]}"
    for f, rows in found.items():
        call = expected.queries[f]
        assert all(r["has_perf"] for r in rows), f"{f}: a query row without its performance row"
        ok_rows = [r for r in rows if r["success"]]
        if call.ok:
            assert len(ok_rows) == 1, f"{call}: {len(ok_rows)} successful rows: {rows}"
        else:
            assert not ok_rows, f"{call} failed at the client but has a successful row: {rows}"
        if exactly_once:
            assert len(rows) == 1, f"{call}: recorded {len(rows)} times: {rows}"
    for name in collections:
        if exactly_once:
            assert inserts[name] == expected.inserts_made[name], (name, inserts[name], expected.inserts_made[name])
        else:
            assert inserts[name] >= expected.inserts_made[name], (name, inserts[name], expected.inserts_made[name])
    return (f"{len(calls)} calls, {sum(map(len, found.values()))} query rows for "
            f"{len(expected.queries)} searches/queries, {sum(inserts.values())} insert rows for "
            f"{sum(expected.inserts_made.values())} inserts")


def test_upstream_restart_under_load(binaries, e2e_dir, new_database):
    data = e2e_dir / "restart-milvus-data"
    milvus = start_milvus_lite(binaries["milvus_lite"], data, e2e_dir / "restart-milvus-1.log")
    _, url = new_database("upstream_restart")
    sidecar = start_sidecar(binaries["sidecar"], milvus.port, e2e_dir / "restart-sidecar.log",
                            database_url=url, spill_dir=e2e_dir / "restart-spill")
    collections = [f"restart_{i}" for i in range(THREADS)]
    workers = []
    try:
        setup_collections(sidecar.uri, sidecar.token, collections)
        workers = [Worker(sidecar.uri, sidecar.token, c, rate=RATE, timeout=3, seed=i)
                   for i, c in enumerate(collections)]
        for w in workers:
            w.start()
        time.sleep(3)
        down_at = time.monotonic()
        milvus.stop(15)
        time.sleep(2)
        milvus = start_milvus_lite(binaries["milvus_lite"], data, e2e_dir / "restart-milvus-2.log", port=milvus.port)
        # Reloading after a restart is the application's business, not the sidecar's.
        reload_collections(sidecar.uri, sidecar.token, collections)
        loaded_at = time.monotonic()
        time.sleep(4)
    finally:
        for w in workers:
            w.stop()
        for w in workers:
            w.join(30)
    calls = sorted((c for w in workers for c in w.calls), key=lambda c: c.started)
    db = Db(url)
    try:
        summary = check_every_call_recorded(db, calls, collections, exactly_once=False)
        unavailable_rows = db.value("SELECT count(*) FROM performance_metrics WHERE grpc_code = 14")
    finally:
        db.close()
        stop_sidecar_checked(sidecar)
        milvus.stop(15)

    failed = [c for c in calls if not c.ok]
    codes = {c.code for c in failed}
    print(f"\nupstream restart: {summary}; failed {len(failed)} ({sorted(codes)}), "
          f"UNAVAILABLE rows {unavailable_rows}")
    assert [c for c in calls if c.ok and c.ended < down_at], "calls succeeded before the restart"
    assert failed, "no call failed while Milvus was down"
    # MILVUS_101: "collection not loaded", Milvus's own answer until the reload is done.
    assert codes <= {"UNAVAILABLE", "DEADLINE_EXCEEDED", "MILVUS_101"}, codes
    assert "UNAVAILABLE" in codes
    assert unavailable_rows > 0, "the sidecar's UNAVAILABLE answers are recorded"
    assert all(down_at - 0.5 <= c.ended for c in failed), "a call failed before the restart"
    after = [c for c in failed if c.started > loaded_at]
    assert not after, f"calls failed after the reload: {after[:5]}"
    late = [c for c in calls if c.started > loaded_at]
    assert late and all(c.ok for c in late), f"calls after the restart failed: {[c for c in late if not c.ok][:5]}"


@pytest.mark.parametrize("durable", [False, True], ids=["default", "durable"])
def test_postgres_restart_under_load(binaries, milvus_lite, e2e_dir, new_database, pg_admin_url, durable):
    name, url = new_database("pg_restart")
    params = conn_params(url)
    relay = Relay(params.get("host", "127.0.0.1"), int(params.get("port", 5432)))
    relayed = url_with_db(pg_admin_url, name).replace(
        f"{params.get('host', '127.0.0.1')}:{params.get('port', '5432')}", f"127.0.0.1:{relay.port}")
    assert str(relay.port) in relayed, relayed
    # alice: a user with grants, which the sidecar must keep serving from its cache.
    tag = "durable" if durable else "default"
    collections = [f"pgr_{tag}_{i}" for i in range(THREADS)]
    mode = ("--durable-records",) if durable else ()
    sidecar = start_sidecar(binaries["sidecar"], milvus_lite.port, e2e_dir / f"pgr-{tag}.log",
                            database_url=relayed, spill_dir=e2e_dir / f"pgr-{tag}-spill", extra_args=mode)
    workers = []
    try:
        setup_collections(sidecar.uri, sidecar.token, collections)
        env = {"DATABASE_URL": url}
        made = run_cli(binaries["sidecar"], "user", "create", "alice", "--role", "user", "--password-stdin",
                       stdin="alice-pw\n", env=env)
        assert made.returncode == 0, made.stderr
        for c in collections[1:]:
            granted = run_cli(binaries["sidecar"], "grant", "alice", c, "write", env=env)
            assert granted.returncode == 0, granted.stderr
            granted = run_cli(binaries["sidecar"], "grant", "alice", c, "read", env=env)
            assert granted.returncode == 0, granted.stderr
        time.sleep(1.5)  # the grants reach the sidecar through LISTEN/NOTIFY
        tokens = [sidecar.token] + ["alice:alice-pw"] * (len(collections) - 1)
        workers = [Worker(sidecar.uri, t, c, rate=RATE, timeout=10, seed=i)
                   for i, (t, c) in enumerate(zip(tokens, collections))]
        for w in workers:
            w.start()
        time.sleep(3)
        relay.cut()
        time.sleep(4)
        relay.restore()
        time.sleep(4)
    finally:
        for w in workers:
            w.stop()
        for w in workers:
            w.join(30)
    calls = [c for w in workers for c in w.calls]
    failed = [c for c in calls if not c.ok]
    db = Db(url)
    try:
        summary = check_every_call_recorded(db, calls, collections, exactly_once=True)
    finally:
        db.close()
        stop_sidecar_checked(sidecar)
        relay.close()
    log = sidecar.log_text()
    print(f"\nPostgreSQL restart ({tag}): {summary}; failed {len(failed)}")
    assert not failed, f"calls failed during the PostgreSQL outage: {failed[:5]}\n{log_tail(sidecar.log)}"
    assert "spilling records to disk" in log, "the outage was noticed"
    assert "every spilled record has now been written to PostgreSQL" in log


def test_long_filters_while_postgres_is_stuck(binaries, milvus_lite, e2e_dir, new_database):
    """A writer held by a locked table while clients send Query calls with long filters
    (`id in [...]` over 32 000 ids, 256 KB each): the batch it is stuck in is given up as soon
    as the calls made meanwhile fill half of --queue-max-bytes, well before the 2 s
    --write-timeout, and the records go to the spill file rather than fill the queue. The
    sidecar's memory stays near the bound, and once the lock is gone every record kept
    arrives, in batches PostgreSQL takes within the timeout. At this rate (about 300 MB/s of
    records on a 2-core machine) the writer spills a little slower than the records come, so
    a few are dropped and counted; when a stuck batch held the writer until the timeout, all
    but the queue's worth were.

    The Query goes to a collection Milvus does not have, so that Milvus answers at once (it
    would take a third of a second to evaluate such a filter) and the records pile up fast."""
    import grpc
    from pymilvus.grpc_gen import milvus_pb2, milvus_pb2_grpc

    cap = 16 << 20
    _, url = new_database("long_filters")
    sidecar = start_sidecar(binaries["sidecar"], milvus_lite.port, e2e_dir / "long-filters.log",
                            database_url=url, auth=False, spill_dir=e2e_dir / "long-filters-spill",
                            extra_args=("--queue-max-bytes", str(cap)))
    expr = "id in [" + ",".join(str(1_000_000 + i) for i in range(32_000)) + "]"
    request = milvus_pb2.QueryRequest(collection_name="e2e_long_filters_absent", expr=expr, output_fields=["id"])
    channels = [grpc.insecure_channel(f"127.0.0.1:{sidecar.port}") for _ in range(2)]
    db = Db(url)
    try:
        milvus_pb2_grpc.MilvusServiceStub(channels[0]).Query(request, timeout=10)
        rows = "SELECT count(*) FROM query_logs"
        assert wait_for(lambda: db.value(rows), lambda n: n == 1) == 1, "the first call's row"
        status = Path(f"/proc/{sidecar.proc.pid}/status")
        before = kib(status, "VmRSS")
        lock = psycopg.connect(url)
        lock.execute("LOCK TABLE query_logs IN ACCESS EXCLUSIVE MODE")
        made = [0] * len(channels)
        # About 1 000 calls/s of 256 KB records: 2 s stay within the spill file's 1 GiB.
        stop = time.monotonic() + 2

        def load(i: int) -> None:
            stub = milvus_pb2_grpc.MilvusServiceStub(channels[i])
            while time.monotonic() < stop:
                reply = stub.Query(request, timeout=10)
                assert reply.status.code != 0, "Milvus has no such collection"
                made[i] += 1

        threads = [threading.Thread(target=load, args=(i,)) for i in range(len(channels))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        peak = kib(status, "VmHWM")
        metrics = scrape(sidecar)
        assert "\nmilvus_sidecar_recording_queue_bytes " in metrics, metrics
        dropped = int(total(metrics, "milvus_sidecar_recording_rows_dropped_total"))
        held = int(total(metrics, "milvus_sidecar_recording_queue_bytes"))
        lock.rollback()
        lock.close()
        calls = sum(made)
        kept = 1 + calls - dropped
        arrived = wait_for(lambda: db.value(rows), lambda n: n >= kept, timeout=90)
        spilled = int(total(scrape(sidecar), "milvus_sidecar_recording_rows_spilled_total"))
    finally:
        for c in channels:
            c.close()
        db.close()
        stop_sidecar_checked(sidecar)
    grown = (peak - before) / 1024
    print(f"\nlong filters, PostgreSQL stuck: {calls} calls in 2 s, {dropped} records dropped, "
          f"{spilled} spilled, {held} bytes queued at the end, "
          f"RSS {before / 1024:.1f} -> peak {peak / 1024:.1f} MiB")
    assert dropped < calls // 4, "the queue drained to the spill file rather than fill and drop"
    assert spilled + dropped >= calls, f"{spilled} records spilled, {dropped} dropped, for {calls} calls"
    assert held <= cap, held
    # The queue (16 MiB), one batch taken from it and its encoding (8 MiB each), the calls'
    # buffers and what the allocator keeps: about 50 MiB here, where the same load piled up
    # gigabytes without the bound.
    assert grown < 96, f"RSS grew by {grown:.1f} MiB"
    assert arrived == kept, f"{arrived} rows for {kept} records kept"
    log = sidecar.log_text()
    assert "the calls made meanwhile filled half the record queue" in log, log_tail(sidecar.log)
    assert ("record queue full" in log) == (dropped > 0), "drops are logged, and only drops"


def kib(status: Path, field: str) -> int:
    line = next(ln for ln in status.read_text().splitlines() if ln.startswith(field + ":"))
    return int(line.split()[1])

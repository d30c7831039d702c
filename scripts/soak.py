"""Soak: mixed pymilvus traffic at a fixed rate through a recording sidecar to milvus-lite,
with PostgreSQL "restarted" (a relay between the sidecar and the server is cut, then
restored) and milvus-lite restarted once each along the way. Run it with scripts/soak.sh.

At the end it prints the calls made, the calls failed by code inside and outside the outage
windows, the records expected and found in each log table, and the sidecar's RSS and open
file descriptors sampled over the run (idle, after warm-up, last, max). It exits 1 when a
check fails: a call failed outside an outage window, a call failed during the PostgreSQL
outage, a record is missing or is there twice, or RSS / fds grew by more than the allowed
margin after warm-up.

Traffic (per second, spread over the workers): root searches, queries and inserts on its
collections; alice (a user with read and write grants) searches, queries, inserts and lists
collections; bob (a user without grants) searches a collection he may not read, and is
refused (PERMISSION_DENIED, audited).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))

# pytest is only needed by services.py's failure helpers; the soak reports through exceptions.
import pgdb  # noqa: E402
from load import (  # noqa: E402
    Expected,
    Worker,
    recorded_filters,
    recorded_inserts,
    reload_collections,
    setup_collections,
    wait_until_stable,
)
from relay import Relay  # noqa: E402
from services import call_lines, run_cli, start_milvus_lite, start_sidecar  # noqa: E402

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600, help="seconds of traffic (default 600)")
    p.add_argument("--rate", type=float, default=40, help="calls per second, all workers together (default 40)")
    p.add_argument("--pg-outage", type=float, default=10, help="seconds PostgreSQL stays away (default 10)")
    p.add_argument("--upstream-down", type=float, default=3, help="seconds milvus-lite stays down (default 3)")
    p.add_argument("--durable-records", action="store_true", help="run the sidecar with --durable-records")
    p.add_argument("--sample-every", type=float, default=5, help="seconds between RSS/fd samples (default 5)")
    p.add_argument("--rss-growth-mb", type=float, default=64, help="allowed RSS growth after warm-up (MB, default 64)")
    p.add_argument("--fd-growth", type=int, default=32, help="allowed growth of open fds after warm-up (default 32)")
    p.add_argument("--keep", action="store_true", help="keep the database and milvus-lite's data")
    return p.parse_args()


def proc_sample(pid: int) -> tuple[float, int] | None:
    """(RSS in MB, open fds) of a process, None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return None


class Sampler(threading.Thread):
    def __init__(self, pid: int, every: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, float, int]] = []  # (t, rss MB, fds)
        self.done = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.done.is_set():
            s = proc_sample(self.pid)
            if s:
                self.samples.append((time.monotonic() - t0, *s))
            self.done.wait(self.every)


def main() -> int:
    args = parse_args()
    admin_url = os.environ.get("TEST_DATABASE_URL") or os.environ.get("DATABASE_URL")
    milvus_bin = os.environ.get("MILVUS_LITE_BIN", str(REPO / ".venv/bin/milvus-lite"))
    sidecar_bin = os.environ.get("SIDECAR_BIN", str(REPO / "target/release/milvus-sidecar"))
    if not admin_url:
        print("soak: set TEST_DATABASE_URL (an admin URL of a PostgreSQL server)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="milvus-sidecar-soak-"))
    print(f"soak: work directory {work}, {args.duration:.0f} s at {args.rate:g} calls/s", flush=True)

    db_name = pgdb.create_database(admin_url, "soak")
    db_url = pgdb.url_with_db(admin_url, db_name)
    params = pgdb.conn_params(db_url)
    host, port = params.get("host", "127.0.0.1"), params.get("port", "5432")
    relay = Relay(host, int(port))
    relayed = db_url.replace(f"{host}:{port}", f"127.0.0.1:{relay.port}")
    if str(relay.port) not in relayed:
        print(f"soak: cannot route {pgdb.conn_params(db_url)} through the relay", file=sys.stderr)
        return 2

    milvus_data = work / "milvus-data"
    milvus = start_milvus_lite(milvus_bin, milvus_data, work / "milvus-lite-1.log")
    extra = ["--durable-records"] if args.durable_records else []
    sidecar = start_sidecar(sidecar_bin, milvus.port, work / "sidecar.log", database_url=relayed,
                            spill_dir=work / "spill", extra_args=tuple(extra))
    root = sidecar.token  # the admin the sidecar created in the fresh database
    workers: list[Worker] = []
    sampler = Sampler(sidecar.proc.pid, args.sample_every)
    windows: dict[str, tuple[float, float]] = {}
    failed_checks: list[str] = []
    try:
        root_colls = ["soak_root_0", "soak_root_1"]
        alice_colls = ["soak_alice_0"]
        setup_collections(sidecar.uri, root, root_colls + alice_colls)
        env = {"DATABASE_URL": db_url}
        for user, pw in (("alice", "alice-pw"), ("bob", "bob-pw")):
            r = run_cli(sidecar_bin, "user", "create", user, "--role", "user", "--password-stdin",
                        stdin=pw + "\n", env=env)
            assert r.returncode == 0, r.stderr
        for perm in ("read", "write"):
            r = run_cli(sidecar_bin, "grant", "alice", alice_colls[0], perm, env=env)
            assert r.returncode == 0, r.stderr
        time.sleep(1.5)  # grants reach the sidecar through LISTEN/NOTIFY

        plan = [  # (token, collection, kinds, share of the rate)
            (root, root_colls[0], ("search", "query", "insert"), 0.3),
            (root, root_colls[1], ("search", "query", "insert"), 0.3),
            ("alice:alice-pw", alice_colls[0], ("search", "query", "insert", "list"), 0.3),
            ("bob:bob-pw", root_colls[0], ("search",), 0.1),
        ]
        for i, (token, coll, kinds, share) in enumerate(plan):
            workers.append(Worker(sidecar.uri, token, coll, rate=args.rate * share, kinds=kinds,
                                  timeout=10, seed=i))
        sampler.start()
        t0 = time.monotonic()
        for w in workers:
            w.start()

        def at(fraction: float) -> None:
            delay = t0 + args.duration * fraction - time.monotonic()
            if delay > 0:
                time.sleep(delay)

        at(1 / 3)
        print(f"soak: {time.monotonic() - t0:.0f} s: cutting PostgreSQL for {args.pg_outage:g} s", flush=True)
        cut = time.monotonic()
        relay.cut()
        time.sleep(args.pg_outage)
        relay.restore()
        windows["postgres"] = (cut, time.monotonic())

        at(2 / 3)
        print(f"soak: {time.monotonic() - t0:.0f} s: restarting milvus-lite", flush=True)
        down = time.monotonic()
        milvus.stop(15)
        time.sleep(args.upstream_down)
        milvus = start_milvus_lite(milvus_bin, milvus_data, work / "milvus-lite-2.log", port=milvus.port)
        reload_collections(sidecar.uri, root, root_colls + alice_colls)
        # Calls in flight at the restart, and pymilvus's retries, end within their timeout.
        windows["upstream"] = (down, time.monotonic() + 10)
        print(f"soak: milvus-lite back after {time.monotonic() - down:.1f} s", flush=True)

        at(1.0)
    finally:
        for w in workers:
            w.stop()
        for w in workers:
            w.join(60)
    ended = time.monotonic()
    calls = sorted((c for w in workers for c in w.calls), key=lambda c: c.started)

    # The records: wait until the writer has caught up.
    db = pgdb.Db(db_url)
    colls = root_colls + alice_colls

    def read():
        return (db.value("SELECT count(*) FROM performance_metrics"),
                sum(map(len, recorded_filters(db, colls).values())),
                sum(recorded_inserts(db, colls).values()),
                db.value("SELECT count(*) FROM audit_logs"))

    wait_until_stable(read, settle=3.0, timeout=120)
    sampler.done.set()
    sampler.join()

    # --- calls ---------------------------------------------------------------------------
    def window_of(c) -> str:
        for name, (start, end) in windows.items():
            if start - 0.5 <= c.ended and c.started <= end:
                return name
        return "outside"

    print(f"\n== calls: {len(calls)} in {ended - t0:.0f} s ({len(calls) / (ended - t0):.1f}/s)")
    by_kind = Counter(c.kind for c in calls)
    print("   by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(by_kind.items())))
    bob = [c for c in calls if c.collection == root_colls[0] and c.kind == "search" and c.code == "PERMISSION_DENIED"]
    failures = Counter((window_of(c), c.code) for c in calls if not c.ok and c.code != "PERMISSION_DENIED")
    print(f"   refused as intended (bob, PERMISSION_DENIED): {len(bob)}")
    for name in ("postgres", "upstream", "outside"):
        got = {code: n for (w, code), n in failures.items() if w == name}
        span = windows.get(name)
        label = f"{name} window ({span[1] - span[0]:.1f} s)" if span else "outside the outage windows"
        print(f"   failed {label}: {sum(got.values())} {dict(sorted(got.items()))}")
    if any(w == "outside" for (w, _) in failures):
        failed_checks.append("calls failed outside the outage windows")
    if any(w == "postgres" for (w, _) in failures):
        failed_checks.append("calls failed because PostgreSQL was away")
    bob_unexpected = [c for w in workers if w.token == "bob:bob-pw" for c in w.calls if c.code != "PERMISSION_DENIED"
                      and window_of(c) == "outside"]
    if bob_unexpected:
        failed_checks.append(f"bob's calls not refused: {bob_unexpected[:3]}")

    # --- records -------------------------------------------------------------------------
    expected = Expected.of(calls)  # bob's refused searches have their query_logs rows too
    found = recorded_filters(db, colls)
    inserts = recorded_inserts(db, colls)
    logged = {c.id for c in call_lines(sidecar.log_text())}
    perf_ids = {str(r["id"]) for r in db.rows("SELECT id FROM performance_metrics")}
    bob_audit = db.value("SELECT count(*) FROM audit_logs WHERE username = 'bob' AND grpc_code = 7")
    print("\n== records (expected -> found)")
    missing_perf = logged - perf_ids
    print(f"   performance_metrics: {len(logged)} calls in the sidecar's log -> {len(perf_ids)} rows "
          f"({len(missing_perf)} missing, {len(perf_ids - logged)} not in the log)")
    missing_q = [f for f in expected.queries if f not in found]
    twice_q = [f for f, rows in found.items() if sum(r["success"] for r in rows) > 1]
    print(f"   query_logs: {len(expected.queries)} searches/queries -> {len(found)} with rows "
          f"({sum(map(len, found.values()))} rows counting retried attempts; {len(missing_q)} missing, "
          f"{len(twice_q)} with two successful rows)")
    made, got = sum(expected.inserts_made.values()), sum(inserts.values())
    ok_ins = sum(expected.inserts_ok.values())
    print(f"   ingestion_logs: {made} inserts ({ok_ins} succeeded) -> {got} rows")
    print(f"   audit_logs: {len(bob)} refused calls by bob -> {bob_audit} PERMISSION_DENIED rows for bob")
    if missing_perf:
        failed_checks.append(f"{len(missing_perf)} calls without a performance_metrics row")
    if missing_q or twice_q:
        failed_checks.append(f"query_logs: {len(missing_q)} missing, {len(twice_q)} twice")
    if got < made or any(inserts[k] < n for k, n in expected.inserts_made.items()):
        failed_checks.append("ingestion_logs rows missing")
    if bob_audit < len(bob):
        failed_checks.append("refused calls missing from audit_logs")

    # --- the sidecar process -------------------------------------------------------------
    s = sampler.samples
    if s:
        # "first" is the first sample once traffic has warmed up (a tenth of the run, at
        # most a minute): buffers and pools grow to their working size in the first seconds.
        warm = next((i for i, x in enumerate(s) if x[0] >= min(60.0, args.duration / 10)), 0)
        rss, fds = [x[1] for x in s], [x[2] for x in s]
        print(f"\n== sidecar process ({len(s)} samples every {args.sample_every:g} s)")
        print(f"   RSS MB: idle {rss[0]:.1f}, first {rss[warm]:.1f} (at {s[warm][0]:.0f} s), "
              f"last {rss[-1]:.1f}, max {max(rss):.1f}")
        print(f"   open fds: idle {fds[0]}, first {fds[warm]}, last {fds[-1]}, max {max(fds)}")
        print(f"   samples: {work / 'samples.tsv'}")
        if rss[-1] - rss[warm] > args.rss_growth_mb:
            failed_checks.append(f"RSS grew by {rss[-1] - rss[warm]:.1f} MB")
        if fds[-1] - fds[warm] > args.fd_growth:
            failed_checks.append(f"open fds grew by {fds[-1] - fds[warm]}")
        with open(work / "samples.tsv", "w") as f:  # noqa: PTH123
            f.write("seconds\trss_mb\tfds\n")
            f.writelines(f"{t:.1f}\t{r:.1f}\t{n}\n" for t, r, n in s)

    db.close()
    status = sidecar.stop(30)
    milvus.stop(15)
    relay.close()
    if status != 0:
        failed_checks.append(f"the sidecar exited with status {status} after SIGTERM")
    print()
    if failed_checks:
        print("soak: FAILED: " + "; ".join(failed_checks))
        print(f"soak: kept {work} and database {db_name}")
        return 1
    print("soak: passed")
    if args.keep:
        print(f"soak: kept {work} and database {db_name}")
    else:
        pgdb.drop_database(admin_url, db_name)
        shutil.rmtree(milvus_data, ignore_errors=True)
        print(f"soak: logs and samples in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Who may do what, seen from pymilvus: a permission matrix over real users, grants made
with the sidecar's own CLI, and a real milvus-lite behind it; and how bad credentials are
refused. Refused calls must never reach Milvus, and pymilvus must see PERMISSION_DENIED or
UNAUTHENTICATED just as it would from a Milvus with RBAC on."""

from __future__ import annotations

import base64
import random

import grpc
import pytest
from pymilvus import MilvusClient
from pymilvus.exceptions import MilvusException

from pgdb import Db, wait_for
from services import run_cli, start_milvus_lite, start_sidecar, stop_sidecar_checked

DIM = 8
PASSWORD = "matrix-pw"
# user -> (role, level granted on the shared collection; None: no grant)
USERS = {
    "reader": ("user", "read"),
    "writer": ("user", "write"),
    "owner": ("user", "admin"),
    "nobody": ("user", None),
    "boss": ("admin", None),
}
# (create_index is left out: milvus-lite stalls the client after refusing a second index on
# a field, which would test milvus-lite, not the sidecar; load and drop cover admin level.)
ALL = {"search", "query", "describe", "list", "insert", "delete", "load", "drop", "create"}
READ = {"search", "query", "describe", "list", "create"}
EXPECTED = {
    "reader": READ,
    "writer": READ | {"insert", "delete"},
    "owner": ALL,
    "nobody": {"list", "create"},
    "boss": ALL,
}


def vectors(n: int) -> list[list[float]]:
    rng = random.Random(7)
    return [[rng.random() for _ in range(DIM)] for _ in range(n)]


@pytest.fixture(scope="module")
def rbac(binaries, e2e_dir, new_database):
    """A recording sidecar with the five users, each granted its level on `shared` and on
    a collection of its own to try dropping (`drop_<user>`). It has a milvus-lite of its own,
    so the collections made here stay out of the other tests' way."""
    _, url = new_database("rbac")
    lite = start_milvus_lite(binaries["milvus_lite"], e2e_dir / "rbac-milvus-data", e2e_dir / "rbac-milvus-lite.log")
    svc = start_sidecar(binaries["sidecar"], lite.port, e2e_dir / "rbac-sidecar.log", database_url=url,
                        spill_dir=e2e_dir / "rbac-spill")
    root = MilvusClient(uri=svc.uri, token=svc.token)
    targets = ["shared"] + [f"drop_{u}" for u in USERS]
    for name in targets:
        if root.has_collection(name):
            root.drop_collection(name)
        root.create_collection(name, dimension=DIM, metric_type="L2")
        root.insert(name, [{"id": i, "vector": v} for i, v in enumerate(vectors(20))])
    db = Db(url)
    # The mirror learns of the collections from the traffic; grants need it to.
    wait_for(lambda: db.value("SELECT count(*) FROM collections WHERE status = 'active'"), lambda n: n >= len(targets))
    cli = lambda *args, stdin=None: run_cli(binaries["sidecar"], *args, "--database-url", url, stdin=stdin)  # noqa: E731
    for user, (role, level) in USERS.items():
        made = cli("user", "create", user, "--role", role, "--password-stdin", stdin=PASSWORD + "\n")
        assert made.returncode == 0, made.stderr
        if level:
            for collection in ("shared", f"drop_{user}"):
                granted = cli("grant", user, collection, level)
                assert granted.returncode == 0, granted.stderr
    yield svc, root, db, cli
    root.close()
    db.close()
    stop_sidecar_checked(svc)
    lite.stop(15)


def attempt(client: MilvusClient, user: str, action: str):
    """Runs `action` as the client's user; returns None when allowed, else the error."""
    c = "shared"
    try:
        if action == "search":
            client.search(c, vectors(2), limit=3)
        elif action == "query":
            client.query(c, filter="id < 5")
        elif action == "describe":
            client.describe_collection(c)
        elif action == "list":
            client.list_collections()
        elif action == "insert":
            client.insert(c, [{"id": 1000 + len(user), "vector": vectors(1)[0]}])
        elif action == "delete":
            client.delete(c, ids=[19])
        elif action == "load":
            client.load_collection(c)
        elif action == "drop":
            client.drop_collection(f"drop_{user}")
        elif action == "create":
            client.create_collection(f"made_by_{user}", dimension=DIM)
        return None
    except (grpc.RpcError, MilvusException) as e:
        return e


def status_code(error) -> grpc.StatusCode | None:
    """The gRPC status behind a pymilvus error (pymilvus raises some raw, wraps others)."""
    while error is not None:
        if isinstance(error, grpc.RpcError) and hasattr(error, "code"):
            return error.code()
        error = error.__cause__ or error.__context__
    return None


@pytest.mark.parametrize("user", list(USERS))
def test_permission_matrix(rbac, user):
    svc, _, _, _ = rbac
    client = MilvusClient(uri=svc.uri, token=f"{user}:{PASSWORD}", timeout=20)
    allowed, refused = set(), {}
    for action in sorted(ALL):
        error = attempt(client, user, action)
        # Allowed means it reached Milvus: Milvus may still say no for its own reasons (an
        # index that already exists), inside an OK reply, which pymilvus raises without a
        # gRPC status behind it.
        if error is None or status_code(error) is None:
            allowed.add(action)
        else:
            refused[action] = error
    assert allowed == EXPECTED[user], f"{user}: allowed {sorted(allowed)}, refused {sorted(refused)}"
    for action, error in refused.items():
        assert status_code(error) == grpc.StatusCode.PERMISSION_DENIED, f"{user} {action}: {error!r}"
        assert f"permission deny to {user}" in str(error), f"{user} {action}: {error}"
    client.close()


def test_listing_shows_only_what_the_caller_may_read(rbac):
    svc, root, _, _ = rbac
    everything = set(root.list_collections())
    reader = MilvusClient(uri=svc.uri, token=f"reader:{PASSWORD}")
    nobody = MilvusClient(uri=svc.uri, token=f"nobody:{PASSWORD}")
    assert {"shared", "drop_reader"} <= set(reader.list_collections()) < everything
    assert not {"drop_owner", "drop_writer", "drop_nobody", "drop_boss"} & set(reader.list_collections())
    assert set(nobody.list_collections()) <= {"made_by_nobody"}, "only what nobody created"
    reader.close()
    nobody.close()


def test_refusals_are_audited_and_never_forwarded(rbac):
    svc, _, db, _ = rbac
    client = MilvusClient(uri=svc.uri, token=f"reader:{PASSWORD}")
    before = db.value("SELECT count(*) FROM ingestion_logs")
    assert attempt(client, "reader", "insert") is not None
    rows = wait_for(
        lambda: db.rows(
            "SELECT action, username, grpc_code, error_message FROM audit_logs "
            "WHERE username = 'reader' AND action = 'insert' AND NOT success"
        ),
        lambda r: len(r) >= 1,
    )
    assert rows[-1]["grpc_code"] == 7
    assert "PrivilegeInsert: permission deny to reader" in rows[-1]["error_message"]
    # An ingestion row records the attempt, with no rows acknowledged by Milvus.
    refused = db.rows(
        "SELECT rows_acknowledged, success FROM ingestion_logs WHERE username = 'reader' ORDER BY ingested_at DESC LIMIT 1"
    )
    assert db.value("SELECT count(*) FROM ingestion_logs") >= before
    assert refused and refused[0]["success"] is False and refused[0]["rows_acknowledged"] is None
    client.close()


def raw_connect(uri: str, authorization: str | None) -> grpc.RpcError:
    """A bare Connect with exactly this authorization header (pymilvus would encode it)."""
    target = uri.removeprefix("http://")
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary("/milvus.proto.milvus.MilvusService/Connect")
        metadata = [("authorization", authorization)] if authorization is not None else []
        try:
            call(b"", metadata=metadata, timeout=10)
        except grpc.RpcError as e:
            return e
    raise AssertionError("Connect succeeded")


@pytest.mark.parametrize(
    "credential, message",
    [
        (None, "missing authorization in header"),
        ("root:not-the-password", "auth check failure, please check username and password are correct"),
        ("ghost:whatever", "auth check failure, please check username and password are correct"),
        ("an-api-key-without-colon", "auth check failure, please check api key is correct"),
    ],
)
def test_bad_credentials_are_unauthenticated(rbac, credential, message):
    svc, _, _, _ = rbac
    header = None if credential is None else base64.b64encode(credential.encode()).decode()
    error = raw_connect(svc.uri, header)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == message
    if credential is not None:
        with pytest.raises(MilvusException) as raised:
            MilvusClient(uri=svc.uri, token=credential, timeout=5)
        assert raised.value.code == 2, "pymilvus reports a failed Connect as code 2"


def test_garbage_and_disabled_users_are_unauthenticated(rbac):
    svc, _, _, cli = rbac
    error = raw_connect(svc.uri, "***not base64***")
    assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, "invalid token format")
    made = cli("user", "create", "leaver", "--password-stdin", stdin=PASSWORD + "\n")
    assert made.returncode == 0, made.stderr
    MilvusClient(uri=svc.uri, token=f"leaver:{PASSWORD}").close()
    assert cli("user", "disable", "leaver").returncode == 0
    header = base64.b64encode(f"leaver:{PASSWORD}".encode()).decode()
    # The change reaches the running sidecar through NOTIFY.
    error = wait_for(lambda: raw_connect_or_none(svc.uri, header), lambda e: e is not None, timeout=2)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def raw_connect_or_none(uri: str, header: str):
    try:
        return raw_connect(uri, header)
    except AssertionError:
        return None

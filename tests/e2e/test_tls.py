"""pymilvus over TLS: a sidecar with a certificate made here (a CA and a server certificate
for localhost / 127.0.0.1, by the openssl command) serves a small workflow to a client that
trusts the CA (`secure=True`, `server_pem_path`), and refuses clients that do not trust it or
that speak plaintext; with --tls-client-ca, a client without a certificate is refused too."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest
from pymilvus import MilvusClient
from pymilvus.exceptions import MilvusException

from pgdb import Db, wait_for
from services import run_cli, start_sidecar, stop_sidecar_checked

DIM = 8
COLLECTION = "e2e_tls"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(dir: Path, name: str) -> None:
    """name.key and name.pem: a self-signed CA."""
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
            cwd=dir)


def make_leaf(dir: Path, ca: str, name: str, san: str, usage: str) -> None:
    """name.key and name.pem, signed by `ca`."""
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=dir)
    (dir / f"{name}.ext").write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=dir)


@pytest.fixture(scope="module")
def certs(e2e_dir) -> Path:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make the test certificates (apt-get install openssl)")
    dir = e2e_dir / "tls"
    dir.mkdir()
    make_ca(dir, "ca")
    make_ca(dir, "other-ca")
    make_ca(dir, "client-ca")
    make_leaf(dir, "ca", "server", "DNS:localhost,IP:127.0.0.1", "serverAuth")
    make_leaf(dir, "client-ca", "client", "DNS:client", "clientAuth")
    return dir


@pytest.fixture(scope="module")
def tls_sidecar(binaries, milvus_lite, e2e_dir, new_database, certs):
    _, url = new_database("tls")
    svc = start_sidecar(binaries["sidecar"], milvus_lite.port, e2e_dir / "tls-sidecar.log", database_url=url,
                        spill_dir=e2e_dir / "tls-spill",
                        extra_args=("--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key")))
    yield svc, url
    stop_sidecar_checked(svc)


def tls_client(port: int, token: str, ca: Path | None, host: str = "localhost", **extra) -> MilvusClient:
    kwargs = {"server_pem_path": str(ca)} if ca else {}
    # dedicated: pymilvus would otherwise reuse an open connection to the same address.
    return MilvusClient(uri=f"https://{host}:{port}", token=token, secure=True, timeout=5, dedicated=True,
                        **kwargs, **extra)


def test_log_says_tls_is_on(tls_sidecar):
    svc, _ = tls_sidecar
    assert "client listener: TLS 1.2+" in svc.log_text()


def test_workflow_through_the_tls_listener(tls_sidecar, certs):
    svc, url = tls_sidecar
    client = tls_client(svc.port, svc.token, certs / "ca.pem")
    rng = random.Random(7)
    try:
        if client.has_collection(COLLECTION):
            client.drop_collection(COLLECTION)
        client.create_collection(COLLECTION, dimension=DIM, metric_type="L2")
        rows = [{"id": i, "vector": [rng.random() for _ in range(DIM)]} for i in range(50)]
        assert client.insert(COLLECTION, rows)["insert_count"] == 50
        hits = client.search(COLLECTION, [rows[3]["vector"]], limit=3)
        assert hits[0][0]["id"] == 3
        got = client.query(COLLECTION, filter="id < 5", output_fields=["id"])
        assert sorted(r["id"] for r in got) == [0, 1, 2, 3, 4]
        assert COLLECTION in client.list_collections()
        client.drop_collection(COLLECTION)
    finally:
        client.close()

    # The calls made over TLS are recorded like any other.
    db = Db(url)
    try:
        ops = wait_for(
            lambda: {r["operation_type"] for r in db.rows("SELECT DISTINCT operation_type FROM performance_metrics")},
            lambda ops: {"search", "query", "insert"} <= ops,
        )
        assert {"search", "query", "insert"} <= ops
    finally:
        db.close()


def refused(make) -> Exception:
    """The client cannot even connect (not a refusal of the call by the sidecar)."""
    with pytest.raises(MilvusException) as info:
        client = make()
        client.list_collections()
    assert "Fail connecting" in info.value.message, info.value
    return info.value


def test_clients_that_do_not_trust_the_certificate_are_refused(tls_sidecar, certs):
    svc, _ = tls_sidecar
    # No CA given: the system's roots do not know the test CA.
    refused(lambda: tls_client(svc.port, svc.token, None))
    # Another CA.
    refused(lambda: tls_client(svc.port, svc.token, certs / "other-ca.pem", host="127.0.0.1"))
    # Plaintext to the TLS port.
    refused(lambda: MilvusClient(uri=f"http://127.0.0.1:{svc.port}", token=svc.token, timeout=5, dedicated=True))
    assert "TLS handshake refused" in svc.log_text()


def test_mutual_tls_refuses_a_client_without_a_certificate(binaries, milvus_lite, e2e_dir, certs):
    svc = start_sidecar(binaries["sidecar"], milvus_lite.port, e2e_dir / "mtls-sidecar.log",
                        extra_args=("--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"),
                                    "--tls-client-ca", str(certs / "client-ca.pem")))
    try:
        refused(lambda: tls_client(svc.port, "", certs / "ca.pem"))
        # (pymilvus sends a client certificate only without server_pem_path: the server's
        # CA then goes in ca_pem_path.)
        client = MilvusClient(uri=f"https://localhost:{svc.port}", secure=True, timeout=5, dedicated=True,
                              client_pem_path=str(certs / "client.pem"), client_key_path=str(certs / "client.key"),
                              ca_pem_path=str(certs / "ca.pem"))
        try:
            assert isinstance(client.list_collections(), list)
        finally:
            client.close()
    finally:
        stop_sidecar_checked(svc)


def test_plaintext_on_a_network_address_is_refused_unless_asked_for(binaries, milvus_lite):
    args = ("serve", "--listen", "0.0.0.0:0", "--admin-listen", "127.0.0.1:0", "--no-recording", "--no-auth",
            "--upstream", milvus_lite.uri)
    refused = run_cli(binaries["sidecar"], *args, timeout=30)
    assert refused.returncode == 1, refused
    assert "refusing to serve clients on 0.0.0.0:0 without TLS" in refused.stderr
    assert "--plaintext" in refused.stderr

"""Starting and stopping milvus-lite and the sidecar for the end-to-end tests.

Failures are reported with pytest.fail and the tail of the process's log. Also reads the
sidecar's per-call log lines (`call_lines`, `CallLine`)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

MILVUS_START_TIMEOUT = 60.0
SIDECAR_START_TIMEOUT = 30.0
SIDECAR_STOP_TIMEOUT = 30.0
# One log line per forwarded call: test_workflow reads them, and they help when a test fails.
SIDECAR_RUST_LOG = "info,milvus_sidecar::call=debug"
# The password of the `root` admin a recording sidecar creates in its fresh database
# (--root-password); tests call through such a sidecar with Service.token.
ROOT_PASSWORD = "e2e-root-password"


def binary_problem(var: str, hint: str) -> str | None:
    """Why the executable named by environment variable `var` cannot be used, or None."""
    value = os.environ.get(var)
    if not value:
        return f"{var} is not set: it must point to {hint}"
    path = Path(value)
    if not (path.is_file() and os.access(path, os.X_OK)):
        return f"{var}={value} is not an executable file: it must point to {hint}"
    return None


def required_bin(var: str, hint: str) -> str:
    problem = binary_problem(var, hint)
    if problem:
        pytest.fail(problem, pytrace=False)
    return os.environ[var]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def http_get(url: str) -> tuple[int, str]:
    """GET url; return (status, body). Connection failures raise OSError."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def scrape(sidecar) -> str:
    """The sidecar's /metrics, as text."""
    status, body = http_get(f"{sidecar.admin_url}/metrics")
    assert status == 200, f"GET /metrics answered {status}: {body[:300]}"
    return body


def total(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    result = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            result += float(m.group(3))
    return result


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} unreadable)"
    return f"---- last {lines} lines of {path} ----\n" + "\n".join(text[-lines:])


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    log: Path
    port: int
    admin_port: int | None = None
    # The pymilvus token to call a sidecar with (None: no authentication to pass).
    token: str | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def fail_if_exited(self, what: str) -> None:
        if self.proc.poll() is not None:
            pytest.fail(
                f"{self.name} exited with status {self.proc.returncode} {what}\n{log_tail(self.log)}",
                pytrace=False,
            )

    def stop(self, timeout: float) -> int | None:
        """SIGTERM and wait; returns the exit status, or None if it had to be killed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


def start_process(name: str, argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )


def start_milvus_lite(bin_path: str, data_dir: Path, log: Path, port: int | None = None) -> Service:
    """`port`: a given one (to restart a server where its clients expect it), else a free one."""
    port = port or free_port()
    argv = [bin_path, "server", "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", str(port)]
    svc = Service("milvus-lite", start_process("milvus-lite", argv, log), log, port)
    deadline = time.monotonic() + MILVUS_START_TIMEOUT
    while not port_open(port):
        svc.fail_if_exited(f"before listening on 127.0.0.1:{port}")
        if time.monotonic() > deadline:
            svc.stop(5)
            pytest.fail(
                f"milvus-lite not listening on 127.0.0.1:{port} after {MILVUS_START_TIMEOUT:.0f}s\n"
                + log_tail(log),
                pytrace=False,
            )
        time.sleep(0.1)
    return svc


# Settings the sidecar could pick up from the test runner's environment: tests pass what
# they mean on the command line, so none of these may leak in.
SIDECAR_ENV_PREFIXES = ("MILVUS_SIDECAR_", "POSTGRES_")
SIDECAR_ENV_NAMES = ("DATABASE_URL",)


def sidecar_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(SIDECAR_ENV_PREFIXES) and k not in SIDECAR_ENV_NAMES
    }
    env["RUST_LOG"] = SIDECAR_RUST_LOG
    env.update(extra or {})
    return env


def start_sidecar(
    bin_path: str,
    upstream_port: int,
    log: Path,
    *,
    database_url: str | None = None,
    spill_dir: Path | None = None,
    auth: bool = True,
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Service:
    """Start a sidecar in front of 127.0.0.1:upstream_port and wait for its /healthz.

    With `database_url` it records into that database (migrating it at start-up), with its
    spill file in `spill_dir` (default: next to the log), and checks every call's credential
    against the users there: the `root` admin it creates has ROOT_PASSWORD, and the returned
    Service's `token` is root's. `auth=False` adds --no-auth. Without `database_url` it runs
    --no-recording --no-auth (authentication needs PostgreSQL). `env` adds environment
    variables (the sidecar's own are otherwise cleared)."""
    port, admin_port = free_port(), free_port()
    argv = [
        bin_path,
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        f"http://127.0.0.1:{upstream_port}",
        "--admin-listen",
        f"127.0.0.1:{admin_port}",
    ]
    token = None
    if database_url is not None:
        spill = spill_dir or log.with_name(log.stem + "-spill")
        argv += ["--database-url", database_url, "--spill-dir", str(spill)]
        if auth:
            argv += ["--root-password", ROOT_PASSWORD]
            token = f"root:{ROOT_PASSWORD}"
        else:
            argv.append("--no-auth")
    else:
        argv += ["--no-recording", "--no-auth"]
    argv += list(extra_args)
    proc = start_process("milvus-sidecar", argv, log, sidecar_env(env))
    svc = Service("milvus-sidecar", proc, log, port, admin_port, token)
    deadline = time.monotonic() + SIDECAR_START_TIMEOUT
    while True:
        try:
            if http_get(f"{svc.admin_url}/healthz")[0] == 200 and port_open(port):
                return svc
        except OSError:
            pass
        svc.fail_if_exited("before /healthz answered 200")
        if time.monotonic() > deadline:
            svc.stop(5)
            pytest.fail(
                f"sidecar /healthz did not answer 200 within {SIDECAR_START_TIMEOUT:.0f}s\n" + log_tail(log),
                pytrace=False,
            )
        time.sleep(0.1)


def run_cli(bin_path: str, *args: str, stdin: str | None = None, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `milvus-sidecar ARGS...` (migrate, user, grant, ...) to completion."""
    return subprocess.run(
        [bin_path, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=sidecar_env(env),
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


def stop_sidecar_checked(svc: Service) -> None:
    """SIGTERM the sidecar; it must drain and exit 0 within SIDECAR_STOP_TIMEOUT."""
    status = svc.stop(SIDECAR_STOP_TIMEOUT)
    if status is None:
        pytest.fail(
            f"sidecar did not exit within {SIDECAR_STOP_TIMEOUT:.0f}s of SIGTERM (killed)\n" + log_tail(svc.log),
            pytrace=False,
        )
    if status != 0:
        pytest.fail(f"sidecar exited with status {status} after SIGTERM\n" + log_tail(svc.log), pytrace=False)


@dataclass(frozen=True)
class CallLine:
    """One `milvus_sidecar::call` log line: a call the sidecar forwarded and recorded."""

    id: str
    method: str
    grpc: str
    milvus_code: int
    collection: str | None
    text: str

    @property
    def success(self) -> bool:
        return self.grpc == "Ok" and self.milvus_code == 0


_CALL_ID = re.compile(r"milvus_sidecar::call: call id=(\S+) ")
_COLLECTION = re.compile(r' collection="([^"]*)"')
_FIELD = {
    "method": re.compile(r' method="?(\w+)"?'),
    "grpc": re.compile(r" grpc=(\w+)"),
    "milvus_code": re.compile(r" milvus_code=(-?\d+)"),
}


def call_lines(log_text: str) -> list[CallLine]:
    """The calls in a sidecar log (RUST_LOG must include milvus_sidecar::call=debug)."""
    calls = []
    for line in log_text.splitlines():
        m = _CALL_ID.search(line)
        if not m:
            continue
        fields = {}
        for name, pattern in _FIELD.items():
            f = pattern.search(line, m.end() - 1)
            if not f:
                raise AssertionError(f"call log line without {name}: {line}")
            fields[name] = f.group(1)
        coll = _COLLECTION.search(line, m.end() - 1)
        calls.append(
            CallLine(
                m.group(1),
                fields["method"],
                fields["grpc"],
                int(fields["milvus_code"]),
                coll.group(1) if coll else None,
                line,
            )
        )
    return calls

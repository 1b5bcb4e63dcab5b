"""Session-scoped real services for integration tests (star-imported by conftest.py).

- ``s3_endpoint_url``: moto's S3 server (``ThreadedMotoServer``) on 127.0.0.1, a free port.
- ``s3_bucket``: a bucket there (``pfstorer-test``); ``s3_storage_options``: s3fs options for it;
  ``s3_url``: a fresh ``s3://pfstorer-test/<test>-<random>`` prefix per test.
- ``mlflow_local``: MLflow on one SQLite database for the session (fresh tenants per test keep
  tests apart), artifacts in a temporary directory.
- ``mlflow_server``: an ``mlflow server`` subprocess on 127.0.0.1 (SQLite backend, artifacts
  proxied to ``s3://pfstorer-test/mlflow-artifacts`` on the moto server).
- ``mlflow_pg_server``: an ``mlflow server`` on a throwaway PostgreSQL (``infra/local``), as on
  the cluster; skipped where PostgreSQL is not installed.
- ``unique_name()``: a fresh safe key (for tenants/identities that must not collide).

No Ray here: the core fixtures add it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = [
    "MlflowService",
    "free_port",
    "mlflow_local",
    "mlflow_pg_server",
    "mlflow_server",
    "s3_bucket",
    "s3_endpoint_url",
    "s3_storage_options",
    "s3_url",
    "unique_name",
]

S3_BUCKET = "pfstorer-test"
LOCAL_INFRA = Path(__file__).resolve().parents[1] / "infra" / "local"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unique_name(prefix: str = "t") -> str:
    """A fresh safe key, e.g. ``t-3f9a1c2b``."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------------------------
# S3 (moto server)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_endpoint_url() -> Iterator[str]:
    """http://127.0.0.1:PORT of a moto S3 server running for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint_url: str) -> str:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=S3_BUCKET)
    return S3_BUCKET


@pytest.fixture(scope="session")
def s3_storage_options(s3_endpoint_url: str, s3_bucket: str) -> dict:
    """s3fs storage options for the moto server (pass to every pfstorer URL function)."""
    return {
        "endpoint_url": s3_endpoint_url,
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "us-east-1"},
    }


@pytest.fixture
def s3_url(s3_bucket: str, request: pytest.FixtureRequest) -> str:
    """A fresh prefix ``s3://pfstorer-test/<test name>-<random>`` (nothing under it yet)."""
    name = re.sub(r"[^A-Za-z0-9-]+", "-", request.node.name)[:40].strip("-").lower()
    return f"s3://{s3_bucket}/{name}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------------------------
# MLflow
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MlflowService:
    tracking_uri: str
    artifact_location: str | None  # None: the server decides (proxied artifacts)
    backend_uri: str
    log_path: Path | None = None


@pytest.fixture(scope="session")
def mlflow_local(tmp_path_factory: pytest.TempPathFactory) -> MlflowService:
    """MLflow straight on one SQLite file for the session (created on first use, ~2 s)."""
    root = tmp_path_factory.mktemp("mlflow-local")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return MlflowService(
        tracking_uri=uri, artifact_location=(root / "artifacts").as_uri(), backend_uri=uri
    )


def _mlflow_executable() -> list[str]:
    exe = Path(sys.executable).with_name("mlflow")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]


@contextlib.contextmanager
def _mlflow_server(
    root: Path, backend: str, artifacts: str, env: dict[str, str] | None = None
) -> Iterator[MlflowService]:
    """``mlflow server --workers 1`` on a free port of 127.0.0.1 over ``backend``, artifacts
    proxied to ``artifacts``; stopped (its whole process group) on exit."""
    port = free_port()
    log_path = root / "server.log"
    env = dict(
        os.environ,
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="true",
        # the job executor spawns huey consumers (not installed): off
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        **(env or {}),
    )
    cmd = _mlflow_executable() + [
        "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", backend,
        "--artifacts-destination", artifacts,
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"mlflow server did not start (rc={proc.poll()}):\n{tail}")
            time.sleep(0.25)
        yield MlflowService(
            tracking_uri=url, artifact_location=None, backend_uri=backend, log_path=log_path
        )
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(
    tmp_path_factory: pytest.TempPathFactory, s3_endpoint_url: str, s3_bucket: str
) -> Iterator[MlflowService]:
    """``mlflow server`` on 127.0.0.1 (SQLite backend, artifacts on moto S3). ~15-25 s to start
    on 2 busy cores: request it only from tests that need a remote tracking server."""
    root = tmp_path_factory.mktemp("mlflow-server")
    s3_env = {
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with _mlflow_server(
        root, f"sqlite:///{root / 'mlflow.db'}", f"s3://{s3_bucket}/mlflow-artifacts", s3_env
    ) as service:
        yield service


def _postgres_missing() -> str | None:
    """Why PostgreSQL cannot be started here (None: it can)."""
    import glob
    import importlib.util

    if importlib.util.find_spec("psycopg2") is None:
        return "psycopg2 is not installed (pip install psycopg2-binary; part of the dev extra)"
    bins = [os.environ.get("PG_BIN", ""), os.path.dirname(shutil.which("initdb") or "")]
    bins += sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not any(b and os.access(os.path.join(b, "postgres"), os.X_OK) for b in bins):
        return "PostgreSQL server binaries not found (apt-get install postgresql, or set PG_BIN)"
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        return "running as root needs setpriv (util-linux) to start PostgreSQL as another user"
    return None


@pytest.fixture(scope="session")
def mlflow_pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowService]:
    """``mlflow server`` on a throwaway PostgreSQL (``infra/local/start_postgres.sh``, fsync off;
    as root the server runs as an unprivileged user), artifacts in a local directory. Skipped,
    naming what to install, where PostgreSQL or psycopg2 is missing. ~20-40 s to start on 2 busy
    cores."""
    if (why := _postgres_missing()) is not None:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("mlflow-pg-server")
    # not under pytest's tmp root: that is private to this user, and the server's user must
    # reach its data directory
    run_dir = Path(tempfile.mkdtemp(prefix="pfstorer-pg-"))
    env = dict(
        os.environ,
        PFSTORER_LOCAL_DIR=str(run_dir),
        PFSTORER_VENV=str(Path(sys.executable).parents[1]),
        PG_PORT=str(free_port()),
        PG_OPTIONS="-c fsync=off -c synchronous_commit=off -c full_page_writes=off",
    )
    try:
        out = subprocess.run(
            [str(LOCAL_INFRA / "start_postgres.sh")], env=env, capture_output=True, text=True, timeout=120
        )
        if out.returncode != 0:
            raise RuntimeError(f"start_postgres.sh failed:\n{out.stderr[-3000:]}")
        backend = out.stdout.strip().removeprefix("export MLFLOW_BACKEND_STORE_URI=")
        with _mlflow_server(root, backend, str(root / "artifacts")) as service:
            yield service
    finally:
        subprocess.run([str(LOCAL_INFRA / "stop.sh"), "postgres"], env=env, capture_output=True, timeout=60)
        shutil.rmtree(run_dir, ignore_errors=True)


def prometheus_sum(port: int, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` carrying ``labels`` that the Prometheus endpoint on
    127.0.0.1:``port`` serves now (0 if none)."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(v for got, v in parse_prometheus(text, name) if labels.items() <= got.items())


def parse_prometheus(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of metric ``name`` in a Prometheus text exposition: (labels, value) pairs."""
    import re

    out: list[tuple[dict[str, str], float]] = []
    pattern = re.compile(r'^' + re.escape(name) + r'(?:\{(.*)\})?\s+(\S+)$')
    for line in text.splitlines():
        m = pattern.match(line)
        if m:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1) or ""))
            out.append((labels, float(m.group(2))))
    return out

"""Session-scoped real services for integration tests (star-imported by conftest.py).

- ``s3_endpoint_url``: moto's S3 server (``ThreadedMotoServer``) on 127.0.0.1, a free port.
- ``s3_bucket``: a bucket there (``pfstorer-test``); ``s3_storage_options``: s3fs options for it;
  ``s3_url``: a fresh ``s3://pfstorer-test/<test>-<random>`` prefix per test.
- ``mlflow_local``: MLflow on one SQLite database for the session (fresh tenants per test keep
  tests apart), artifacts in a temporary directory.
- ``mlflow_server``: an ``mlflow server`` subprocess on 127.0.0.1 (SQLite backend, artifacts
  proxied to ``s3://pfstorer-test/mlflow-artifacts`` on the moto server).
- ``unique_name()``: a fresh safe key (for tenants/identities that must not collide).

No Ray here: the core fixtures add it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
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
    "mlflow_server",
    "s3_bucket",
    "s3_endpoint_url",
    "s3_storage_options",
    "s3_url",
    "unique_name",
]

S3_BUCKET = "pfstorer-test"


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


@pytest.fixture(scope="session")
def mlflow_server(
    tmp_path_factory: pytest.TempPathFactory, s3_endpoint_url: str, s3_bucket: str
) -> Iterator[MlflowService]:
    """``mlflow server`` on 127.0.0.1 (SQLite backend, artifacts on moto S3). ~15-25 s to start
    on 2 busy cores: request it only from tests that need a remote tracking server."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    backend = f"sqlite:///{root / 'mlflow.db'}"
    log_path = root / "server.log"
    env = dict(
        os.environ,
        MLFLOW_S3_ENDPOINT_URL=s3_endpoint_url,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="true",
        # the job executor spawns huey consumers (not installed): off
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )
    cmd = _mlflow_executable() + [
        "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", backend,
        "--artifacts-destination", f"s3://{s3_bucket}/mlflow-artifacts",
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

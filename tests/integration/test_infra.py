"""infra/: the local scripts really start their services."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


INFRA = REPO / "infra"


LOCAL = INFRA / "local"


VENV = REPO / ".venv"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exports(stdout: str) -> dict[str, str]:
    out = {}
    for line in stdout.splitlines():
        m = re.fullmatch(r"export (\w+)=(.*)", line.strip())
        assert m, f"stdout must only hold export lines, got {line!r}"
        out[m.group(1)] = m.group(2).strip("'")
    return out


def _listening_on(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp) listening on port."""
    addrs = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:  # 0A = LISTEN
                addrs.add(addr)
    return addrs


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_local_s3_and_mlflow_scripts_start_answer_and_stop(tmp_path: Path) -> None:
    if not (VENV / "bin" / "moto_server").exists() or not (VENV / "bin" / "mlflow").exists():
        pytest.skip(".venv lacks moto_server or mlflow")
    boto3 = pytest.importorskip("boto3")
    t0 = time.monotonic()
    s3_port, mlflow_port = _free_port(), _free_port()
    bucket = "pfstorer-infra-test"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.pop("PORT", None)
    env.update(
        PFSTORER_LOCAL_DIR=str(tmp_path / "local"),
        PFSTORER_VENV=str(VENV),
        S3_PORT=str(s3_port),
        MLFLOW_PORT=str(mlflow_port),
        BUCKET=bucket,
        MLFLOW_ARTIFACTS_DESTINATION=f"s3://{bucket}/mlflow",
    )

    def run(script: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(LOCAL / script)], env={**env, **extra}, capture_output=True, text=True, timeout=120
        )

    pids: dict[str, int] = {}
    try:
        r = run("start_s3.sh")
        assert r.returncode == 0, r.stderr
        s3_env = _exports(r.stdout)
        endpoint = f"http://127.0.0.1:{s3_port}"
        assert s3_env["AWS_ENDPOINT_URL"] == s3_env["MLFLOW_S3_ENDPOINT_URL"] == endpoint
        assert s3_env["AWS_ACCESS_KEY_ID"] == "testing"
        assert f'"endpoint_url": "{endpoint}"' in s3_env["PFSTORER_STORAGE_OPTIONS"]
        pids["s3"] = int((tmp_path / "local" / "s3.pid").read_text())
        client = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )
        assert bucket in [b["Name"] for b in client.list_buckets()["Buckets"]]

        again = run("start_s3.sh")  # idempotent: already running, same exports
        assert again.returncode == 0 and again.stdout == r.stdout

        busy = run("start_mlflow.sh", MLFLOW_PORT=str(s3_port))  # port taken: refused at once
        assert busy.returncode != 0 and "in use" in busy.stderr

        r = run("start_mlflow.sh")  # picks up the local S3 from s3.env for its artifacts
        assert r.returncode == 0, r.stderr
        ml_env = _exports(r.stdout)
        uri = f"http://127.0.0.1:{mlflow_port}"
        assert ml_env["MLFLOW_TRACKING_URI"] == ml_env["PFSTORER_TRACKING_URI"] == uri
        pids["mlflow"] = int((tmp_path / "local" / "mlflow.pid").read_text())
        with urllib.request.urlopen(f"{uri}/health", timeout=10) as resp:
            assert resp.status == 200
        # the artifact proxy writes to the S3 bucket
        req = urllib.request.Request(
            f"{uri}/api/2.0/mlflow-artifacts/artifacts/infra-test/hello.txt",
            data=b"hello", method="PUT",
        )
        with urllib.request.urlopen(req, timeout=20) as resp:
            assert resp.status == 200
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert "mlflow/infra-test/hello.txt" in keys

        # loopback only: both listen on 127.0.0.1 (0100007F), not on all interfaces
        if os.path.exists("/proc/net/tcp"):  # Linux
            for port in (s3_port, mlflow_port):
                assert _listening_on(port) == {"0100007F"}, port
    finally:
        r = run("stop.sh")
    assert r.returncode == 0, r.stderr
    for name, pid in pids.items():
        assert not _group_alive(pid), f"{name} (process group {pid}) still running"
    assert not (tmp_path / "local" / "s3.pid").exists()
    assert not (tmp_path / "local" / "mlflow.pid").exists()
    for port in (s3_port, mlflow_port):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"
    again = run("stop.sh")  # stopping twice is fine
    assert again.returncode == 0 and "not running" in again.stderr
    print(f"local stack start+check+stop: {time.monotonic() - t0:.1f} s")
    shutil.rmtree(tmp_path / "local", ignore_errors=True)

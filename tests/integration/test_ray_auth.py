"""Every Ray the project starts has token authentication on and listens on loopback only.

The token file is ours (mode 0600); a client on this host without the token is refused by the GCS
(the first RPC of joining a cluster), by the dashboard's job API and by ``JobSubmissionClient``,
and succeeds with it; every port of a local run is on loopback or refuses a client without it.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pfstorer.ray_env import ensure_token, read_token

from _services import free_port

GCS_FIRST_RPC = "/ray.rpc.NodeInfoGcsService/GetClusterId"  # what ray.init(address=...) asks first


def _gcs_call(address: str, token: str | None) -> str:
    """Status of the GCS's first RPC sent with ``token`` (None: no authorization header)."""
    import grpc

    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(GCS_FIRST_RPC, request_serializer=bytes, response_deserializer=bytes)
        try:
            call(b"", timeout=10, metadata=None if token is None else (("authorization", f"Bearer {token}"),))
        except grpc.RpcError as err:
            return err.code().name
    return "OK"


def _http_status(url: str, token: str | None) -> int:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.integration
def test_gcs_of_a_local_ray_refuses_a_client_without_the_token(ray_session):
    address = ray_session.get_runtime_context().gcs_address
    assert _gcs_call(address, None) == "UNAUTHENTICATED"
    assert _gcs_call(address, "0" * 64) == "UNAUTHENTICATED"
    assert _gcs_call(address, read_token()) == "OK"


def _on_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def _refuses_without_token(ip: str, port: int) -> bool:
    """An HTTP server that answers 401/403, or a gRPC server that answers UNAUTHENTICATED."""
    addr = ipaddress.ip_address(ip)
    host = "127.0.0.1" if addr.is_unspecified else f"[{ip}]" if addr.version == 6 else ip
    host = f"{host}:{port}"
    try:
        if _http_status(f"http://{host}/", None) in (401, 403):
            return True
    except (OSError, http.client.HTTPException):  # not HTTP (gRPC speaks HTTP/2)
        pass
    return _gcs_call(host, None) == "UNAUTHENTICATED"


@pytest.mark.integration
def test_every_listening_port_of_a_local_run_is_on_loopback_or_refuses_without_the_token(ray_session):
    import psutil

    @ray_session.remote
    def ping() -> int:
        return os.getpid()

    ray_session.get(ping.remote())  # at least one worker is up and listening
    listening = []
    for proc in psutil.Process().children(recursive=True):
        try:
            conns = proc.net_connections("inet")
            name = proc.name()
        except psutil.Error:  # exited meanwhile
            continue
        listening += [(name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    names = {n for n, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, listening
    exposed = [(n, ip, port) for n, ip, port in listening if not _on_loopback(ip) and not _refuses_without_token(ip, port)]
    assert not exposed, f"listening beyond loopback without authentication: {exposed}"


@pytest.fixture(scope="module")
def head():
    """``ray start --head --block`` with the dashboard on 127.0.0.1 and ports of its own (beside the
    session's Ray); stopped by signalling its process group, never ``ray stop`` (which stops
    every Ray on the machine)."""
    ports = {k: free_port() for k in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                       "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")}
    ensure_token()
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--num-cpus=1",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
           *(f"--{k}={v}" for k, v in ports.items())]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                _http_status(f"{url}/api/version", read_token())
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"ray start --head did not come up: {proc.stderr.read().decode()[-2000:]}")
                time.sleep(0.5)
        yield {"url": url, "gcs": f"127.0.0.1:{ports['port']}"}
    finally:  # `ray start` may exit before its GCS and raylet do: the whole group goes. `ray start
        # --block` can sit out SIGTERM for long; nothing of this throwaway cluster needs to be saved.
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=grace)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass


@pytest.mark.integration
def test_cluster_gcs_and_job_api_refuse_a_client_without_the_token(head):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobStatus, JobSubmissionClient

    token = read_token()
    assert _gcs_call(head["gcs"], None) == "UNAUTHENTICATED"
    assert _gcs_call(head["gcs"], token) == "OK"
    jobs = f"{head['url']}/api/jobs/"
    assert [_http_status(jobs, t) for t in (None, "0" * 64, token)] == [401, 403, 200]
    with pytest.raises(AuthenticationError):
        JobSubmissionClient(head["url"], headers={"Authorization": "Bearer " + "0" * 64}).submit_job(
            entrypoint="echo should-not-run")

    client = JobSubmissionClient(head["url"])  # the token from where Ray looks for it
    job = client.submit_job(entrypoint="python -c 'print(6 * 7)'")
    deadline = time.monotonic() + 120
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, "the job did not finish in 120 s"
        time.sleep(0.5)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED
    assert "42" in client.get_job_logs(job)
    assert not any("should-not-run" in (j.entrypoint or "") for j in client.list_jobs())


JOIN = "import ray, sys; ray.init(address=sys.argv[1]); print(len(ray.nodes()), 'node')"


@pytest.mark.integration
def test_a_driver_with_the_token_joins_the_cluster(head):
    """The client side of the refusals above: the token from where Ray looks for it is enough."""
    proc = subprocess.run([sys.executable, "-c", JOIN, head["gcs"]], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("1 node")

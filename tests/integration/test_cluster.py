"""`pfstorer run` joining a Ray cluster through RAY_ADDRESS (as `ray job submit` does) whose head
has 0 CPUs (as the RayCluster manifest has): it waits, saying so, for a worker node to join, and
gives up with a clear error after `worker_wait_s`. The cluster is `ray.cluster_utils.Cluster`.
Beside it, a process that starts a Ray of its own (no RAY_ADDRESS) gets one, not that cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipelines.manifest import write_manifest

from _services import unique_name

pytestmark = pytest.mark.integration

PFSTORER = Path(sys.executable).with_name("pfstorer")

# Runs in its own process: a Cluster beside this test process's own Ray would share its globals.
SCRIPT = textwrap.dedent("""
    import json, os, subprocess, sys, time
    from ray.cluster_utils import Cluster

    pfstorer, manifest, state = sys.argv[1:4]
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "node_ip_address": "127.0.0.1"})
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: the driver keeps 127.0.0.1 as the head's address (Ray
    # would rewrite it to the host's IP, where this loopback-only cluster does not listen)
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "PFSTORER_STATE_DIR": state,
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    cmd = [pfstorer, "run", "--manifest", manifest, "--base", "tiny", "--steps", "1", "--dry-train",
           "--workers", "1", "--cpus-per-worker", "1", "--no-progress", "--json"]
    out = {}
    try:
        # with this cluster running and no RAY_ADDRESS, what starts a Ray of its own must not attach to it
        start_own = ("import ray; from serving.cli import _init_ray; _init_ray(None, num_cpus=1); "
                     "print(ray.get_runtime_context().gcs_address)")
        alone = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        own = subprocess.run([sys.executable, "-c", start_own], env=alone, capture_output=True, text=True,
                             timeout=120)
        out["own"] = [own.returncode, own.stdout.strip(), own.stderr[-2000:], cluster.address]
        gave_up = subprocess.run(cmd, env={**env, "PFSTORER_WORKER_WAIT_S": "2"}, capture_output=True,
                                 text=True, timeout=120)
        out["gave_up"] = [gave_up.returncode, gave_up.stdout, gave_up.stderr]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        waiting = []
        while not waiting or "waiting for workers" not in waiting[-1]:  # until the run says it waits
            line = proc.stderr.readline()
            if not line:
                break
            waiting.append(line)
        cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")  # a worker pod joins late
        stdout, stderr = proc.communicate(timeout=300)
        out["joined"] = [proc.returncode, stdout, "".join(waiting) + stderr]
    finally:
        cluster.shutdown()
    print(json.dumps(out))
""")


def test_run_on_a_0_cpu_head_waits_for_a_worker_node(lfw_bench, tmp_path):
    tenant = unique_name("late")
    name, photos = next((n, p) for n, p in lfw_bench.items() if len(p) >= 3)
    manifest = write_manifest(
        [{"tenant": tenant, "identity": name, "role": "ref", "uri": str(p)} for p in photos[:3]],
        str(tmp_path / "manifest.parquet"),
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(PFSTORER), manifest, str(tmp_path / "state")],
                          capture_output=True, text=True, timeout=480, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])

    rc, own_address, stderr, cluster_address = got["own"]
    assert rc == 0, stderr
    assert own_address and own_address != cluster_address

    rc, stdout, stderr = got["gave_up"]
    assert rc == 2 and stdout == "", stderr[-2000:]
    assert "the Ray cluster has 0 CPUs and 0 GPUs after 2 s" in stderr and "worker_wait_s" in stderr

    rc, stdout, stderr = got["joined"]
    assert rc == 0, stderr[-3000:]
    assert "waiting for workers to join: 0/1 CPUs" in stderr
    summary = json.loads(stdout)  # --json: the JSON alone, although Ray logs to this driver
    assert (summary["done"], summary["failed"]) == (1, 0)

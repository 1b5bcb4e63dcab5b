"""infra/: every manifest parses and holds what the project relies on."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


INFRA = REPO / "infra"


K8S = INFRA / "k8s"


LOCAL = INFRA / "local"


YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


SCRIPTS = sorted(INFRA.rglob("*.sh"))


# ---------------------------------------------------------------- helpers
def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def docs(kind: str) -> list[dict[str, Any]]:
    return [d for p in YAML_FILES for d in load_all(p) if d.get("kind") == kind]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs(kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''} under infra/, found {len(found)}"
    return found[0]


def containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_template["spec"]["containers"]


def gpus(container: dict[str, Any]) -> int:
    res = container.get("resources", {})
    return max(int(res.get(k, {}).get("nvidia.com/gpu", 0)) for k in ("requests", "limits"))


def config_maps() -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d.get("data", {}) for d in docs("ConfigMap")}


def secrets() -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d.get("stringData", {}) for d in docs("Secret")}


def env_of(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment: envFrom ConfigMaps (defined under infra/) then env."""
    env: dict[str, str] = {}
    cms = config_maps()
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            name = src["configMapRef"]["name"]
            assert name in cms, f"ConfigMap {name} is not defined under infra/"
            env.update(cms[name])
        elif "secretRef" in src:
            ref = src["secretRef"]
            assert ref.get("optional") or ref["name"] in secrets(), ref
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["key"] in secrets()[ref["name"]], f"{ref} not in secrets.example.yaml"
            env[item["name"]] = secrets()[ref["name"]][ref["key"]]
    return env


def ports(container: dict[str, Any]) -> set[int]:
    return {p["containerPort"] for p in container.get("ports", [])}


def ray_pin() -> str:
    m = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    assert m, "ray pin not found in pyproject.toml"
    return m.group(1)


def check_ray_cluster_spec(spec: dict[str, Any]) -> None:
    """What both the RayCluster and the RayService's cluster must have."""
    assert spec["rayVersion"] == ray_pin()
    assert spec["enableInTreeAutoscaling"] is True

    head = spec["headGroupSpec"]
    assert str(head["rayStartParams"]["num-cpus"]) == "0"  # no work on the head
    for c in containers(head["template"]):
        assert c["image"], "head image"
        assert gpus(c) == 0, "the head must not ask for a GPU"
        assert 8265 in ports(c), "dashboard port"
        check_env(c)

    groups = spec["workerGroupSpecs"]
    assert groups, "at least one worker group"
    gpu_groups = [g for g in groups if all(gpus(c) >= 1 for c in containers(g["template"]))]
    assert gpu_groups, "a GPU worker group"
    for g in groups:
        lo, hi = g["minReplicas"], g["maxReplicas"]
        assert 0 <= lo <= hi and hi >= 1, g["groupName"]
        assert lo <= g.get("replicas", lo) <= hi, g["groupName"]
        for c in containers(g["template"]):
            assert c["image"], "worker image"
            res = c["resources"]
            assert "cpu" in res["limits"] and "memory" in res["limits"]
            check_env(c)
    for g in gpu_groups:
        tol = g["template"]["spec"].get("tolerations", [])
        assert any(t.get("key") == "nvidia.com/gpu" for t in tol), "GPU taint toleration"


def check_env(container: dict[str, Any]) -> None:
    env = env_of(container)
    assert env.get("RAY_USAGE_STATS_ENABLED") == "0"
    assert env.get("MLFLOW_DISABLE_TELEMETRY") == "true"
    assert env.get("MLFLOW_TRACKING_URI", "").startswith("http")
    assert env.get("PFSTORER_TRACKING_URI") == env["MLFLOW_TRACKING_URI"]
    assert env.get("PFSTORER_STORE_URL", "").startswith("s3://")
    assert env.get("PFSTORER_INDEX_URL", "").startswith("s3://")


def serve_config() -> dict[str, Any]:
    return yaml.safe_load(one("RayService")["spec"]["serveConfigV2"])


# ---------------------------------------------------------------- manifests
def test_infra_has_the_expected_files() -> None:
    for rel in (
        "README.md",
        "k8s/README.md",
        "k8s/raycluster.yaml",
        "k8s/rayservice.yaml",
        "k8s/rayjob.yaml",
        "k8s/redis.yaml",
        "k8s/networkpolicy.yaml",
        "k8s/mlflow.yaml",
        "k8s/config.yaml",
        "local/README.md",
        "local/start_mlflow.sh",
        "local/start_postgres.sh",
        "local/start_s3.sh",
        "local/stop.sh",
    ):
        assert (INFRA / rel).is_file(), rel


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_parses_and_is_a_k8s_object(path: Path) -> None:
    objs = load_all(path)
    assert objs, f"{path} is empty"
    for d in objs:
        assert d.get("apiVersion") and d.get("kind"), path
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"]), path
        for c in _all_containers(d):
            assert c.get("image"), f"{path}: container {c.get('name')} has no image"


def _all_containers(d: dict[str, Any]) -> list[dict[str, Any]]:
    spec = d.get("spec", {})
    if d["kind"] in ("Deployment", "StatefulSet"):
        return containers(spec["template"])
    if d["kind"] == "RayService":
        spec = spec["rayClusterConfig"]
    if d["kind"] in ("RayCluster", "RayService"):
        out = containers(spec["headGroupSpec"]["template"])
        for g in spec["workerGroupSpecs"]:
            out += containers(g["template"])
        return out
    return []


def test_raycluster_cpu_head_and_autoscaling_gpu_workers() -> None:
    rc = one("RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    check_ray_cluster_spec(rc["spec"])
    gpu = rc["spec"]["workerGroupSpecs"][0]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 2  # scales to zero between jobs


def test_k8s_readme_has_a_ray_job_submit_example() -> None:
    text = (K8S / "README.md").read_text()
    cmd = re.search(r"ray job submit --address \S+ -- \\?\s*pfstorer run[^`]*", text)
    assert cmd, "ray job submit example"
    for opt in ("--manifest s3://", "--base", "--store s3://", "--tracking-uri http",
                "--index s3://", "--workers"):
        assert opt in cmd.group(0), opt


def _restorer_options() -> tuple[dict, object]:
    """The Restorer's deployment options as the app builds them from the RayService's args."""
    from pfstorer.settings import Settings

    (app,) = [a for a in serve_config()["applications"] if a["name"] == "pfstorer"]
    s = Settings.load(**app.get("args", {}))
    return s.serve.deployment_options(), s


def test_rayservice_serve_config() -> None:
    rs = one("RayService")
    assert rs["apiVersion"] == "ray.io/v1"
    cfg = serve_config()
    assert cfg["http_options"]["port"] == 8000
    (app,) = [a for a in cfg["applications"] if a["name"] == "pfstorer"]
    assert app["import_path"] == "serving.app:build_app"
    assert app["route_prefix"] == "/"
    # one owner of the deployment options: the Settings in args, never a `deployments:` override
    assert not [d for d in app.get("deployments", []) if d.get("name") == "Restorer"]
    dep, _ = _restorer_options()
    auto = dep["autoscaling_config"]
    assert 0 <= auto["min_replicas"] <= auto["max_replicas"] and auto["max_replicas"] >= 1
    assert auto["target_ongoing_requests"] > 0
    assert dep["max_ongoing_requests"] >= 1 and dep["max_queued_requests"] >= 1
    assert dep["ray_actor_options"]["num_gpus"] == 1
    # the cluster under it: autoscaling GPU workers with room for every replica
    spec = rs["spec"]["rayClusterConfig"]
    check_ray_cluster_spec(spec)
    head_ports = set().union(*(ports(c) for c in containers(spec["headGroupSpec"]["template"])))
    assert {8000, 8265} <= head_ports
    gpu_slots = sum(
        g["maxReplicas"] * min(gpus(c) for c in containers(g["template"]))
        for g in spec["workerGroupSpecs"]
    )
    assert gpu_slots >= auto["max_replicas"] * dep["ray_actor_options"]["num_gpus"]
    assert "/readyz" in (K8S / "README.md").read_text() + (K8S / "rayservice.yaml").read_text()
    # every node's Serve proxy closes connections whose request head is late
    from serving.http_guard import proxy_env

    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for c in containers(group["template"]):
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert proxy_env(10)["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"]
            assert float(env["PFSTORER_SERVE__HEADER_TIMEOUT_S"]) > 0


def test_rayservice_app_args_are_settings_overrides() -> None:
    dep, s = _restorer_options()
    assert s.index_url.startswith("s3://")
    # a replica only ever sees max_ongoing_requests at once, and the autoscaler keeps about
    # target_ongoing_requests there: below max_batch_size, full batches could never form
    assert dep["max_ongoing_requests"] == s.serve.max_ongoing_requests >= s.serve.max_batch_size > 1
    assert dep["autoscaling_config"]["target_ongoing_requests"] >= s.serve.max_batch_size
    # Ray Serve accepts every option the settings produce
    from ray.serve.config import AutoscalingConfig

    AutoscalingConfig(**dep["autoscaling_config"])


def test_rayservice_serve_config_matches_ray_schema() -> None:
    schema = pytest.importorskip("ray.serve.schema")
    schema.ServeDeploySchema.model_validate(serve_config())


def test_configmap_is_valid_pfstorer_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from pfstorer.settings import Settings

    for key in list(os.environ):
        if key.startswith("PFSTORER_"):
            monkeypatch.delenv(key)
    cm = config_maps()["pfstorer-config"]
    for key, value in cm.items():
        monkeypatch.setenv(key, str(value))
    s = Settings.load()
    assert s.tracking_uri == cm["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert s.store_url.startswith("s3://") and s.gpus_per_worker == 1
    assert all(isinstance(v, str) for v in cm.values()), "ConfigMap values must be strings"


def test_mlflow_server_uses_a_database_and_s3_artifacts() -> None:
    dep = one("Deployment", "mlflow")
    (c,) = containers(dep["spec"]["template"])
    assert c["image"]
    argv = " ".join(c.get("command", []) + c.get("args", []))
    assert "mlflow server" in argv and "--serve-artifacts" in argv
    assert re.search(r"--artifacts-destination[= ]s3://", argv)
    m = re.search(r"--backend-store-uri[= ](\S+)", argv)
    assert m, "--backend-store-uri"
    backend = m.group(1)
    env = env_of(c)
    ref = re.fullmatch(r"\$\((\w+)\)", backend)
    if ref:
        backend = env[ref.group(1)]
    assert "sqlite" not in backend and re.match(r"(postgresql|mysql)(\+\w+)?://", backend)
    assert env.get("MLFLOW_DISABLE_TELEMETRY") == "true"
    assert 5000 in ports(c) and "--port=5000" in argv.replace("--port 5000", "--port=5000")
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"

    svc = one("Service", "mlflow")
    assert [p["port"] for p in svc["spec"]["ports"]] == [5000]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_ray_clusters_use_token_auth_and_the_service_survives_its_head() -> None:
    """Ray's control plane checks a token on both clusters; the RayService's GCS writes to the
    Redis of redis.yaml (password from the same Secret), and the API has 2+ Gateway replicas."""
    from pfstorer.settings import Settings

    service = one("RayService")["spec"]["rayClusterConfig"]
    for spec in (one("RayCluster")["spec"], service):
        assert spec["authOptions"] == {"mode": "token"}
    ft = service["gcsFaultToleranceOptions"]
    host, port = ft["redisAddress"].split(":")
    redis = one("Service", host)
    assert int(port) in [p["port"] for p in redis["spec"]["ports"]]
    ref = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    (redis_pod,) = [d for d in docs("StatefulSet") if d["metadata"]["name"] == host]
    assert env_of(containers(redis_pod["spec"]["template"])[0])["REDIS_PASSWORD"] == secrets()[ref["name"]][ref["key"]]
    (app,) = serve_config()["applications"]
    assert Settings.load(None, **app["args"]).serve.gateway_replicas >= 2


def test_rayjob_runs_pfstorer_on_the_batch_cluster() -> None:
    import argparse

    from pipelines.run import register_cli

    job = one("RayJob")["spec"]
    assert job["clusterSelector"] == {"ray.io/cluster": one("RayCluster")["metadata"]["name"]}
    assert job["shutdownAfterJobFinishes"] is False  # the cluster is shared between jobs
    argv = job["entrypoint"].split()
    assert argv[:2] == ["pfstorer", "run"]
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv[1:])  # every flag is one `pfstorer run` knows
    assert args.manifest.startswith("s3://") and args.workers >= 1


def test_network_policies_leave_only_the_api_open() -> None:
    """Ray pods accept anything only from each other; from elsewhere only the API (8000), the
    operator's dashboard ports and metrics; the backends only from pfstorer pods."""
    (ray_policy,) = [p for p in docs("NetworkPolicy") if p["spec"]["podSelector"].get("matchLabels")]
    own = {"app.kubernetes.io/name": "pfstorer"}
    assert ray_policy["spec"]["podSelector"]["matchLabels"] == own
    for rule in ray_policy["spec"]["ingress"]:
        peers = rule["from"]
        if any(p.get("podSelector", {}).get("matchLabels") == own for p in peers):
            continue
        assert all("namespaceSelector" in p for p in peers) and rule["ports"], rule
        assert {p["port"] for p in rule["ports"]} <= {8000, 8080, 8265, 52365}, rule
    for kind in ("RayCluster", "RayService"):  # every Ray pod is covered by the policy
        spec = one(kind)["spec"]
        spec = spec.get("rayClusterConfig", spec)
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            assert own.items() <= group["template"]["metadata"]["labels"].items()
    (backends,) = [p for p in docs("NetworkPolicy") if p["spec"]["podSelector"].get("matchExpressions")]
    guarded = set(backends["spec"]["podSelector"]["matchExpressions"][0]["values"])
    assert {"mlflow", "mlflow-postgres", "pfstorer-redis"} <= guarded


def test_services_select_their_pods() -> None:
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in docs("Deployment") + docs("StatefulSet")
    }
    for svc in docs("Service"):
        sel = svc["spec"]["selector"]
        assert any(sel.items() <= labels.items() for labels in pods.values()), svc["metadata"]


def test_docker_base_matches_the_ray_pin() -> None:
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray_pin())}-", text, re.M)


# ---------------------------------------------------------------- scripts
@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(INFRA)))
def test_scripts_are_valid_bash_and_loopback_only(path: Path) -> None:
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = path.read_text()
    assert "0.0.0.0" not in text, f"{path.name} must not bind all interfaces"
    if path.name != "common.sh":
        assert os.access(path, os.X_OK), f"{path.name} is not executable"
    if path.name.startswith("start_"):
        assert "BIND_ADDRESS" in text and "127.0.0.1" in (LOCAL / "common.sh").read_text()


def test_every_exported_metric_is_documented() -> None:
    """Each Prometheus figure the serving code defines is listed, under its exported name (Ray
    prefixes ``ray_``; counters end in ``_total``), in the README and the cluster guide."""
    import re

    code = (REPO / "serving" / "metrics.py").read_text()
    defined = re.findall(r'(Counter|Gauge|Histogram)\(\s*"(pfstorer_\w+)"', code)
    assert len(defined) >= 6, defined
    for doc in (REPO / "README.md", K8S / "README.md"):
        text = doc.read_text()
        for kind, name in defined:
            assert (f"ray_{name}_total" if kind == "Counter" else f"ray_{name}") in text, (doc.name, name)

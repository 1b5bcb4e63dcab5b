"""Registration benchmark: N dry adapters published through an MLflow server on PostgreSQL.

What a run's publisher does per person, for real, minus the training and the upload: one MLflow
job run (params, loss curve, metrics, ``job.json``) and one registered model version with its
lineage tags and alias ``prod`` (:class:`pipelines.publisher.Publisher`, its writer threads and its
batched index writes). Adapters are "dry": a made-up ``adapter.json`` and a URI in the store; no
file is trained or uploaded (uploads happen in the workers, beside registration).

PostgreSQL (``infra/local/start_postgres.sh``) and ``mlflow server`` on it
(``infra/local/start_mlflow.sh``) are started in a temporary directory and stopped at the end,
unless ``--tracking-uri`` names a running server. Every MLflow client call is timed by name. At
the end every identity is checked: exactly one version, carrying its job key, behind ``prod``;
then the same records are published again (a retried run) and nothing new may appear.

    python benchmarks/bench_registry.py                       # 10,000 identities (recorded)
    python benchmarks/bench_registry.py -n 200 --no-save      # a quick look

Writes ``benchmarks/results/registry_cpu.json`` and ``.md`` (unless ``--no-save``).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import _common  # noqa: E402
from pfstorer.settings import Settings, use_offline_env  # noqa: E402

use_offline_env()
LOCAL = REPO / "infra" / "local"


def start_stack(run_dir: Path, workers: int) -> dict[str, str]:
    """PostgreSQL + ``mlflow server`` on it (infra/local scripts); their exports."""
    env = dict(os.environ, PFSTORER_LOCAL_DIR=str(run_dir), PFSTORER_VENV=str(Path(sys.executable).parents[1]),
               PG_PORT=str(_common.free_port()), MLFLOW_PORT=str(_common.free_port()),
               MLFLOW_WORKERS=str(workers), START_TIMEOUT_S="300")
    exports: dict[str, str] = {}
    for script in ("start_postgres.sh", "start_mlflow.sh"):
        out = subprocess.run([str(LOCAL / script)], env={**env, **exports}, capture_output=True, text=True,
                             timeout=600)
        if out.returncode != 0:
            raise SystemExit(f"{script} failed:\n{out.stderr[-3000:]}")
        for line in out.stdout.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            exports[key] = value
    return exports


def stop_stack(run_dir: Path) -> None:
    subprocess.run([str(LOCAL / "stop.sh"), "mlflow", "postgres"], capture_output=True, timeout=120,
                   env=dict(os.environ, PFSTORER_LOCAL_DIR=str(run_dir)))


class CallTimer:
    """Times every HTTP request MLflow's client makes (``requests.Session.request``), by endpoint:
    what each call costs and how many one identity needs (wrapper methods such as ``log_text``
    make several)."""

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = collections.defaultdict(list)
        self._lock = threading.Lock()

    def install(self) -> None:
        import requests

        original = requests.Session.request
        timer = self

        @functools.wraps(original)
        def request(session: Any, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(session, method, url, *args, **kwargs)
            finally:
                timer.record(method, url, time.perf_counter() - t0)

        requests.Session.request = request

    def record(self, method: str, url: str, seconds: float) -> None:
        path = urllib.parse.urlsplit(url).path
        for marker in ("/mlflow-artifacts/artifacts/", "/mlflow/"):
            if marker in path:
                head, _, rest = path.partition(marker)
                path = marker.strip("/") + ("" if marker.endswith("artifacts/") else "/" + rest)
                break
        with self._lock:
            self.calls[f"{method} {path}"].append(seconds)

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()


def stack_cpu_s(run_dir: Path | None) -> dict[str, float]:
    """CPU seconds used so far by the MLflow server and PostgreSQL (each process tree) and by
    this process (the publisher threads): what a registration costs whatever else runs here."""
    import psutil

    out = {"client": sum(os.times()[:2])}
    for name in ("mlflow", "postgres"):
        pidfile = run_dir / f"{name}.pid" if run_dir else None
        if pidfile is None or not pidfile.is_file():
            continue
        try:
            root = psutil.Process(int(pidfile.read_text()))
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
                if p is root:  # children that ended (PostgreSQL's per-connection backends)
                    total += t.children_user + t.children_system
            except psutil.Error:
                pass
        out[name] = total
    return out


def records(n: int, tenant: str, store: str) -> list[Any]:
    from pipelines.records import JobRecord, PersonJob, RefPhoto, StoredAdapter

    out = []
    for i in range(n):
        identity = f"p{i:07d}"
        key = uuid.uuid5(uuid.NAMESPACE_URL, f"{tenant}/{identity}").hex
        refs = tuple(RefPhoto(f"{store}/photos/{identity}/{j}.jpg", f"{i:08x}{j:056x}") for j in range(3))
        job = PersonJob(job_id=f"{tenant}/{identity}", tenant=tenant, identity=identity, job_key=key, refs=refs)
        meta = {"format": "pfstorer-adapter", "identity": identity, "tenant": tenant,
                "base_fingerprint": "dry-base", "final_losses": {"loss": 0.1},
                "loss_curve": [1.0 / (s + 1) for s in range(50)]}
        stored = StoredAdapter(uri=f"{store}/{tenant}/{identity}/{key}/adapter.safetensors", sha256=key * 2,
                               meta=meta, train_s=0.0, upload_s=0.0)
        out.append(JobRecord(job=job, stored=stored, worker="bench"))
    return out


def publish_all(settings: Settings, recs: list[Any], threads: int, timer: CallTimer) -> tuple[float, dict, list]:
    """Publish ``recs`` with a :class:`Publisher`; (seconds, its stats, failures)."""
    from pipelines.publisher import Publisher

    done = threading.Event()
    indexed: list[str] = []
    failed: list[tuple[str, str]] = []
    lock = threading.Lock()

    def on_indexed(jids: list[str], error: str | None) -> None:
        with lock:
            indexed.extend(jids)
            if error:
                failed.extend((j, error) for j in jids)
            if len(indexed) + len(failed) >= len(recs):
                done.set()

    def on_failed(jid: str, error: str) -> None:
        with lock:
            failed.append((jid, error))
            if len(indexed) + len(failed) >= len(recs):
                done.set()

    pub = Publisher(settings, lineage={"pipeline_run": "bench", "manifest_uri": "bench://manifest"},
                    params={"steps": 0, "dry_train": True}, on_failed=on_failed, on_indexed=on_indexed,
                    drained=lambda: True, threads=threads, index_batch=1000, index_interval_s=2.0)
    _ = pub._get_registry().models.client
    timer.reset()
    t0 = time.perf_counter()
    for r in recs:
        pub.submit(r)
    done.wait()
    dt = time.perf_counter() - t0
    pub.close()
    return dt, dict(pub.stats), failed


def verify(settings: Settings, tenant: str, recs: list[Any]) -> dict[str, int]:
    """Every identity: one version, with its job key, behind ``prod``; index row for it."""
    from registry import AdapterRegistry
    from registry.keys import model_name

    reg = AdapterRegistry.from_settings(settings)
    bad = collections.Counter()
    client = reg.models.client
    by_name: dict[str, list[Any]] = collections.defaultdict(list)
    token = None
    while True:  # all versions of the tenant, by pages (one search, not one per identity)
        page = client.search_model_versions(f"name LIKE '{model_name(tenant, 'x')[:-1]}%'", max_results=10000, page_token=token)
        for mv in page:
            by_name[mv.name].append(mv)
        token = page.token
        if not token:
            break
    index = {(e.tenant, e.identity): e for e in reg.index.list(tenant)}
    for r in recs:
        versions = by_name.get(model_name(tenant, r.job.identity), [])
        if len(versions) != 1:
            bad["versions!=1"] += 1
        elif versions[0].tags.get("job_key") != r.job.job_key:
            bad["job_key"] += 1
        entry = index.get((tenant, r.job.identity))
        if entry is None or len(versions) != 1 or entry.version != int(versions[0].version):
            bad["index"] += 1
    sample = recs[0].job.identity
    prod = reg.models.get_prod(tenant, sample)
    if prod is None or prod.run_id is None:
        bad["prod/run"] += 1
    return dict(bad)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--identities", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=None, help="publisher threads (default: the Publisher's)")
    ap.add_argument("--server-workers", type=int, default=2, help="mlflow server --workers")
    ap.add_argument("--tracking-uri", default=None, help="a running MLflow server (default: start one on PostgreSQL)")
    ap.add_argument("--run-dir", type=Path, default=None,
                    help="with --tracking-uri: the PFSTORER_LOCAL_DIR of its infra/local stack (for CPU accounting)")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--stem", default="registry_cpu")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="pfstorer-bench-registry-"))
    tmp.chmod(0o711)  # PostgreSQL may run as another user (under root): it must reach tmp/local
    load_before = os.getloadavg()
    started = None
    try:
        if args.tracking_uri:
            uri, backend = args.tracking_uri, "given"
        else:
            t0 = time.perf_counter()
            exports = start_stack(tmp / "local", args.server_workers)
            started = time.perf_counter() - t0
            uri, backend = exports["MLFLOW_TRACKING_URI"], exports["MLFLOW_BACKEND_STORE_URI"].split("@")[-1]
        store = "s3://pfstorer-bench/adapters"  # never written: registration only names the URI
        tenant = f"bench-{uuid.uuid4().hex[:6]}"
        settings = Settings(state_dir=tmp / "state", tracking_uri=uri, store_url=store,
                            index_url=str(tmp / "index.parquet"))
        recs = records(args.identities, tenant, store)
        timer = CallTimer()
        timer.install()
        run_dir = args.run_dir if args.tracking_uri else tmp / "local"
        cpu0 = stack_cpu_s(run_dir)
        seconds, stats, failed = publish_all(settings, recs, args.threads, timer)
        cpu1 = stack_cpu_s(run_dir)
        calls = {k: list(v) for k, v in timer.calls.items()}
        # a retried run: the same job keys again must find their versions and create nothing
        again_n = min(len(recs), 200)
        again_s, _, again_failed = publish_all(settings, records(again_n, tenant, store),
                                               args.threads, timer)
        again_calls = {k: len(v) for k, v in timer.calls.items()}
        bad = verify(settings, tenant, recs)
    finally:
        if not args.tracking_uri:  # also after a failed start: PostgreSQL may be up alone
            stop_stack(tmp / "local")
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()

    n = len(recs)
    rate = n / seconds
    cpu_ms = {k: round(1000 * (cpu1[k] - cpu0[k]) / n, 2) for k in cpu1 if k in cpu0}
    cpu_total_ms = sum(cpu_ms.values())
    rows = [{"call": k, "calls": len(v), "per_identity": round(len(v) / n, 2),
             "mean_ms": 1000 * sum(v) / len(v), "p50_ms": 1000 * sorted(v)[len(v) // 2],
             "p99_ms": 1000 * sorted(v)[min(len(v) - 1, int(0.99 * len(v)))]}
            for k, v in sorted(calls.items(), key=lambda kv: -sum(kv[1]))]
    summary = {"identities": n, "seconds": round(seconds, 2), "identities_per_s": round(rate, 1),
               "publisher_threads": stats["publish_threads"], "mlflow_calls_per_identity":
               round(sum(len(v) for v in calls.values()) / n, 2), "failed": len(failed),
               "exactly_once_violations": sum(bad.values()), "retry_run_identities": again_n,
               "retry_run_s": round(again_s, 2), "retry_run_calls": again_calls,
               "retry_run_failed": len(again_failed),
               "cpu_ms_per_identity": cpu_ms,
               # what 2 otherwise idle cores could register at this CPU cost (other load aside)
               "identities_per_s_cpu_bound_2_cores": round(2000 / cpu_total_ms, 1) if cpu_total_ms else None}
    payload = {
        "device": f"{_common.cpu_model()}, {os.cpu_count()} cores, no GPU",
        "command": _common.command_line(),
        "backend": f"mlflow server (--workers {args.server_workers}) on PostgreSQL {backend}" if started is not None
        else uri,
        "server_start_s": round(started, 1) if started is not None else None,
        "load_average_before": [round(x, 1) for x in load_before],
        "load_average_after": [round(x, 1) for x in load_after],
        "summary": summary, "calls": rows, "violations": bad,
        "failures_sample": failed[:5],
    }
    table = _common.markdown_table([summary | {"retry_run_calls": json.dumps(again_calls),
                                                "cpu_ms_per_identity": json.dumps(cpu_ms)}])
    table += "\n\nMLflow client calls during the timed run:\n\n" + _common.markdown_table(rows)
    table += (f"\n\nOther load on the machine: load average {payload['load_average_before']} before, "
              f"{payload['load_average_after']} after (1/5/15 min, {os.cpu_count()} cores).")
    print(table)
    if not args.no_save:
        js, md = _common.write_results(args.stem, payload, table)
        print(f"wrote {js} and {md}")
    if bad or failed or again_failed:
        raise SystemExit(f"exactly-once check failed: {bad} failures {failed[:3]} {again_failed[:3]}")


if __name__ == "__main__":
    main()

"""Registration benchmark: N dry adapters published through an MLflow server on PostgreSQL.

What a run's publisher does per person, for real, minus the training and the upload: the
person's job in a job run shared by its publishing batch (params, metrics, loss curve) and one
registered model version with its lineage tags (:class:`pipelines.publisher.Publisher`, its
writer threads and its batched index writes). Adapters are "dry": a made-up ``adapter.json`` and a URI in the store; no
file is trained or uploaded (uploads happen in the workers, beside registration).

PostgreSQL (``infra/local/start_postgres.sh``) and ``mlflow server`` on it
(``infra/local/start_mlflow.sh``) are started in a temporary directory and stopped at the end,
unless ``--tracking-uri`` names a running server. Every MLflow client call is timed by name. At
the end every identity is checked: exactly one version, carrying its job key, behind ``prod``;
then the same records are published again (a retried run) and nothing new may appear.

    python benchmarks/bench_registry.py                       # 10,000 identities (recorded)
    python benchmarks/bench_registry.py -n 200 --no-save      # a quick look
    python benchmarks/bench_registry.py --index               # the adapter index alone: 1,000,000
                                                              # people over 100 tenants (recorded)

Writes ``benchmarks/results/registry_cpu.json`` and ``.md`` (unless ``--no-save``);
``--index`` writes ``registry_index_cpu.json`` and ``.md``: upsert time at 10,000 and at
1,000,000 people, and a replica-style reader's lookup latency and memory in its own process.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import functools
import json
import os
import shutil
import statistics
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
    """Every identity: one version, with its job key, and its index row; a sample's versions
    name a job run that holds their job."""
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
    for r in recs[:: max(1, len(recs) // 20)]:
        versions = by_name.get(model_name(tenant, r.job.identity), [])
        record = client.get_run(versions[0].run_id).data.tags.get(f"job.{r.job.identity}") if versions else None
        if record is None or json.loads(record)["job_key"] != r.job.job_key:
            bad["job run"] += 1
    return dict(bad)


# ---------------------------------------------------------------------------------------------
# --index: the adapter index alone at scale (no MLflow, no PostgreSQL)
# ---------------------------------------------------------------------------------------------


def _rss_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MB."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out["VmRSS"], out["VmHWM"]


def build_index(root: Path, people: int, tenants: int) -> float:
    """An index of ``people`` dry rows over ``tenants``, written in bulk (one compacted file per
    bucket, as compaction leaves them, in the index's own file format); seconds taken."""
    import pyarrow as pa

    from registry.index import DELTA_SCHEMA, AdapterIndex, bucket_of, delta_name, file_bytes

    t0 = time.perf_counter()
    index = AdapterIndex(root, compact_after=0)
    meta = index.create()
    buckets = int(meta["buckets"])
    per_tenant = people // tenants
    at = pa.scalar(datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC), pa.timestamp("us", tz="UTC"))
    ids = [f"p{i:07d}" for i in range(per_tenant)]
    by_bucket: dict[int, list[str]] = collections.defaultdict(list)
    for ident in ids:
        by_bucket[bucket_of(ident, buckets)].append(ident)
    for t in range(tenants):
        tenant = f"t{t:03d}"
        for b, names in by_bucket.items():
            n = len(names)
            keys = [uuid.uuid5(uuid.NAMESPACE_URL, f"{tenant}/{i}").hex for i in names]
            table = pa.table({
                "tenant": [tenant] * n, "identity": names, "version": [1] * n,
                "uri": [f"s3://pfstorer/adapters/{tenant}/{i}/{k}/adapter.safetensors" for i, k in zip(names, keys)],
                "sha256": [k * 2 for k in keys], "base_fingerprint": ["dry-base"] * n, "job_key": keys,
                "updated_at": pa.array([at.as_py()] * n, pa.timestamp("us", tz="UTC")), "removed": [False] * n,
            }, schema=DELTA_SCHEMA)
            index._put(f"{index._bucket_dir(tenant, b)}/{delta_name(kind='c')}", file_bytes(table))
    return time.perf_counter() - t0


def time_upserts(root: Path, people: int, tenants: int, rows: int, reps: int, spread: bool) -> dict[str, Any]:
    """``reps`` upserts of ``rows`` rows (half updates, half new people) into one random tenant,
    or one row per tenant when ``spread``; seconds per upsert and files written."""
    import random

    from registry import AdapterIndex, IndexEntry

    rng = random.Random(1)
    index = AdapterIndex(root)  # background compaction on, as in a run
    per_tenant = people // tenants
    times, files = [], []
    for r in range(reps):
        tenant0 = f"t{rng.randrange(tenants):03d}"
        entries = []
        for j in range(rows):
            t = f"t{j % tenants:03d}" if spread else tenant0
            ident = f"p{rng.randrange(per_tenant):07d}" if j % 2 else f"n{r:03d}x{j:04d}"
            entries.append(IndexEntry(t, ident, 2 + r, f"s3://pfstorer/adapters/{t}/{ident}/r{r}", f"{r:064x}",
                                      "dry-base", f"r{r}"))
        before = index.stats["files_written"]
        t0 = time.perf_counter()
        index.upsert(entries)
        times.append(time.perf_counter() - t0)
        files.append(index.stats["files_written"] - before)
    index.wait_background(120)
    times.sort()
    return {"median_s": round(statistics.median(times), 4), "max_s": round(times[-1], 4),
            "files_per_upsert": round(statistics.mean(files), 1), "compactions": index.stats["compactions"]}


def reader_phase(root: Path, people: int, tenants: int, lookups: int) -> dict[str, Any]:
    """Run in a fresh process: a replica-style reader (max_age 2 s) answering random lookups;
    latency of first lookups (a bucket read unless the bucket is cached) and of repeat lookups
    (cache), its memory, and how long until a new version written meanwhile is seen. First
    lookups are timed twice: wall clock, and CPU time of this thread (what the lookup itself
    costs, without the waits for a core that a loaded machine adds). Timings are kept in
    ``array("d")`` (8 bytes each), so the memory measured is the reader's, not theirs."""
    import random
    from array import array

    from registry import AdapterIndex, IndexEntry

    rss0, _ = _rss_mb()
    rng = random.Random(2)
    per_tenant = people // tenants
    asked = [(f"t{rng.randrange(tenants):03d}", f"p{rng.randrange(per_tenant):07d}") for _ in range(lookups)]
    reader = AdapterIndex(root, max_age_s=2.0)
    reader.check()
    first, first_cpu, again = array("d"), array("d"), array("d")
    for t, i in asked:
        t0, c0 = time.perf_counter(), time.thread_time()
        e = reader.get(t, i)
        first.append(time.perf_counter() - t0)
        first_cpu.append(time.thread_time() - c0)
        assert e is not None and e.identity == i and e.tenant == t
    t_end = time.monotonic() + 5.0  # long enough for revalidations (max age 2 s) to run meanwhile
    while time.monotonic() < t_end or len(again) < lookups:
        t, i = asked[rng.randrange(len(asked))]
        t0 = time.perf_counter()
        e = reader.get(t, i)
        again.append(time.perf_counter() - t0)
    rss1, hwm = _rss_mb()
    t, i = asked[0]
    old = reader.get(t, i)
    AdapterIndex(root, compact_after=0).upsert([IndexEntry(t, i, old.version + 100, old.uri + "-new", old.sha256)])
    t0 = time.monotonic()
    while reader.get(t, i).version != old.version + 100:
        if time.monotonic() - t0 > 30:
            break
        time.sleep(0.01)
    seen_s = time.monotonic() - t0

    def pct(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], 3)

    return {"lookups": lookups, "first_lookup_p50_ms": pct(first, 0.5), "first_lookup_p99_ms": pct(first, 0.99),
            "first_lookup_cpu_p50_ms": pct(first_cpu, 0.5), "first_lookup_cpu_p99_ms": pct(first_cpu, 0.99),
            "cached_lookups": len(again), "cached_lookup_p50_ms": pct(again, 0.5),
            "cached_lookup_p99_ms": pct(again, 0.99), "cached_lookup_max_ms": pct(again, 1.0),
            "rows_cached": reader.rows_cached, "reader_rss_mb_before": round(rss0, 1),
            "reader_rss_mb_after": round(rss1, 1), "reader_rss_delta_mb": round(rss1 - rss0, 1),
            "reader_vmhwm_mb": round(hwm, 1), "new_version_seen_s": round(seen_s, 2),
            "bucket_lists": reader.stats["lists"], "files_read": reader.stats["files_read"]}


def index_main(args: argparse.Namespace) -> None:
    """``--index``: build indexes of ``--small`` and ``--people`` dry rows, time upserts at both,
    and lookups plus memory in a separate reader process at the large one."""
    if args.reader_root:
        print(json.dumps(reader_phase(Path(args.reader_root), args.people, args.tenants, args.lookups)), flush=True)
        os._exit(0)
    tmp = Path(tempfile.mkdtemp(prefix="pfstorer-bench-index-"))
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    reader: dict[str, Any] = {}
    try:
        for people in (args.small, args.people):
            root = tmp / f"index-{people}.parquet"
            built = build_index(root, people, args.tenants)
            one = time_upserts(root, people, args.tenants, args.upsert_rows, args.reps, spread=False)
            spread = time_upserts(root, people, args.tenants, args.upsert_rows, max(3, args.reps // 3), spread=True)
            rows.append({"people": people, "tenants": args.tenants, "build_s": round(built, 1),
                         "upsert_rows": args.upsert_rows, "upsert_one_tenant_median_s": one["median_s"],
                         "upsert_one_tenant_max_s": one["max_s"], "files_per_upsert_one_tenant": one["files_per_upsert"],
                         "upsert_all_tenants_median_s": spread["median_s"],
                         "files_per_upsert_all_tenants": spread["files_per_upsert"],
                         "compactions": one["compactions"] + spread["compactions"]})
            print(rows[-1], flush=True)
            if people == args.people:
                out = subprocess.run([sys.executable, __file__, "--index", "--reader-root", str(root), "--people",
                                      str(people), "--tenants", str(args.tenants), "--lookups", str(args.lookups)],
                                     capture_output=True, text=True, timeout=1200)
                if out.returncode != 0:
                    raise SystemExit(f"reader failed:\n{out.stderr[-3000:]}")
                reader = json.loads(out.stdout.strip().splitlines()[-1])
                print(reader, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()
    ratio = round(rows[-1]["upsert_one_tenant_median_s"] / rows[0]["upsert_one_tenant_median_s"], 2)
    payload = {
        "device": f"{_common.cpu_model()}, {os.cpu_count()} cores, no GPU",
        "command": _common.command_line(), "storage": "local disk (fsync per file)",
        "load_average_before": [round(x, 1) for x in load_before],
        "load_average_after": [round(x, 1) for x in load_after],
        "upserts": rows, "upsert_median_ratio_large_to_small": ratio, "reader": reader,
    }
    table = _common.markdown_table(rows)
    table += f"\n\nUpsert median at {rows[-1]['people']:,} / at {rows[0]['people']:,} people: {ratio}x.\n\n"
    table += "Replica-style reader (separate process, max age 2 s) at the large index:\n\n"
    table += _common.markdown_table([reader])
    _publish(args, payload, table)


def _publish(args: argparse.Namespace, payload: dict, table: str) -> None:
    """Print the table with the machine's load, and write it with the payload (unless --no-save)."""
    table += (f"\n\nOther load on the machine: load average {payload['load_average_before']} before, "
              f"{payload['load_average_after']} after (1/5/15 min, {os.cpu_count()} cores).")
    print(table)
    if not args.no_save:
        js, md = _common.write_results(args.stem, payload, table)
        print(f"wrote {js} and {md}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--identities", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=None, help="publisher threads (default: the Publisher's)")
    ap.add_argument("--server-workers", type=int, default=2, help="mlflow server --workers")
    ap.add_argument("--tracking-uri", default=None, help="a running MLflow server (default: start one on PostgreSQL)")
    ap.add_argument("--run-dir", type=Path, default=None,
                    help="with --tracking-uri: the PFSTORER_LOCAL_DIR of its infra/local stack (for CPU accounting)")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--stem", default=None, help="results file stem (default: registry_cpu, "
                    "registry_index_cpu with --index)")
    ap.add_argument("--index", action="store_true", help="benchmark the adapter index alone at scale")
    ap.add_argument("--people", type=int, default=1_000_000, help="--index: people in the large index")
    ap.add_argument("--small", type=int, default=10_000, help="--index: people in the small index")
    ap.add_argument("--tenants", type=int, default=100, help="--index: tenants the people are spread over")
    ap.add_argument("--upsert-rows", type=int, default=100, help="--index: rows per upsert")
    ap.add_argument("--reps", type=int, default=15, help="--index: upserts timed per index size")
    ap.add_argument("--lookups", type=int, default=10_000, help="--index: lookups timed by the reader")
    ap.add_argument("--reader-root", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.index:
        args.stem = args.stem or "registry_index_cpu"
        index_main(args)
        return
    args.stem = args.stem or "registry_cpu"

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
    _publish(args, payload, table)
    if bad or failed or again_failed:
        raise SystemExit(f"exactly-once check failed: {bad} failures {failed[:3]} {again_failed[:3]}")


if __name__ == "__main__":
    main()

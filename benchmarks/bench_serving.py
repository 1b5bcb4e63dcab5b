"""Bounded load benchmark of the serving API on 127.0.0.1 (real Ray Serve, real HTTP).

    python benchmarks/bench_serving.py                      # 300 requests, 8 at a time, tiny, 2 steps
    python benchmarks/bench_serving.py --requests 100 --concurrency 4 --steps 4

Set-up: a local Ray, ``people`` adapters personalized on the ``tiny`` base (2 steps each) from the
lfw128 bench photos of ``../shared/data``, published to a temporary store/index/MLflow (SQLite),
the ``pfstorer`` app on a free port with one ``Restorer`` replica (``--slots`` device slots, so
cycling more people than slots exercises the host-RAM tier). Load: ``--requests`` POST
/v1/restore of 128 px photos, ``--concurrency`` in flight, people drawn round-robin with every
``--base-every``-th request base-only; all traffic to 127.0.0.1, bounded by count and by
``--max-seconds``.

Reports p50/p95/p99 latency, throughput, answers by status, and adapter load latency - cold
(store read + sha256 + parse + copy into a slot) and warm (from host RAM + copy) - both as seen by
the replica (``Restorer.get_stats``) and from an in-process micro-benchmark of the same steps.
Writes ``benchmarks/results/serving_cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from pfstorer.ray_env import prepare_ray  # noqa: E402
from pfstorer.settings import use_offline_env  # noqa: E402

use_offline_env()
for _k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
    os.environ.setdefault(_k, "testing")
from _common import RESULTS, cpu_model, free_port, lfw_people  # noqa: E402


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def setup_people(root: Path, n: int, tenants: list[str]) -> tuple[Any, dict[tuple[str, str], Path], Any]:
    """Personalize and publish ``n`` people; return (registry, photo per person, base model)."""
    import torch

    from pfstorer.images import load_image
    from pfstorer.model import load_base
    from pfstorer.training import PersonalizeConfig, personalize
    from registry import AdapterRegistry

    torch.set_num_threads(1)
    bench = lfw_people(REPO.parent / "shared" / "data" / "lfw128")
    names = [k for k, v in bench.items() if len(v) >= 6][:n]
    registry = AdapterRegistry.from_urls(
        str(root / "store"), f"sqlite:///{root / 'mlflow.db'}", str(root / "index.parquet")
    )
    model = load_base("tiny")
    photos = {}
    for i, name in enumerate(names):
        tenant = tenants[i % len(tenants)]
        refs = [load_image(p) for p in bench[name][:5]]
        adapter = personalize(model, refs, identity=name, tenant=tenant, config=PersonalizeConfig(steps=2, lr=0.05))
        registry.publish(adapter.save(root / "adapters" / tenant / name), tenant, name, job_key=f"bench{i}")
        photos[(tenant, name)] = bench[name][5]
    return registry, photos, model


def microbench_loads(registry: Any, model: Any, repeats: int) -> dict[str, Any]:
    """Cold (store -> verified -> slot) vs warm (host RAM -> slot) adapter loads, in process."""
    from pfstorer.personalization import AdapterSlots
    from registry.adapter_cache import HostAdapterCache

    entries = registry.index.list()
    slots = AdapterSlots.for_model(model, 1)
    cold, warm = [], []
    nbytes = 0
    for _ in range(repeats):
        cache = HostAdapterCache(len(entries))
        for e in entries:
            t = time.perf_counter()
            a, src = cache.get(e.sha256, e.key, lambda e=e: registry.load_adapter(e, model))
            slots.load(0, a.tensors)
            cold.append((time.perf_counter() - t) * 1e3)
            assert src == "store"
            nbytes = sum(x.numel() * x.element_size() for x in a.tensors.values())
        for e in entries:
            t = time.perf_counter()
            a, src = cache.get(e.sha256, e.key, lambda: None)
            slots.load(0, a.tensors)
            warm.append((time.perf_counter() - t) * 1e3)
            assert src == "host"
    return {
        "adapter_bytes": nbytes,
        "cold_store_ms": {"n": len(cold), "p50": _pct(cold, 0.5), "p95": _pct(cold, 0.95)},
        "warm_host_ms": {"n": len(warm), "p50": _pct(warm, 0.5), "p95": _pct(warm, 0.95)},
    }


async def run_load(url: str, keys: dict[str, str], plan: list[tuple[str, str | None, bytes]],
                   concurrency: int, max_seconds: float) -> list[dict[str, Any]]:
    import httpx

    results: list[dict[str, Any]] = []
    queue: asyncio.Queue[tuple[int, tuple[str, str | None, bytes]]] = asyncio.Queue()
    for i, item in enumerate(plan):
        queue.put_nowait((i, item))
    deadline = time.monotonic() + max_seconds

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            try:
                i, (tenant, identity, data) = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            form = {"seed": str(i)}
            if identity:
                form["identity"] = identity
            t = time.perf_counter()
            try:
                r = await client.post("/v1/restore", headers={"X-API-Key": keys[tenant]},
                                      files={"image": ("p.jpg", data)}, data=form)
                status, adapter = r.status_code, r.headers.get("X-PFStorer-Adapter")
                timing = dict(
                    (part.split(";dur=")[0].strip(), float(part.split(";dur=")[1]) / 1e3)
                    for part in r.headers.get("Server-Timing", "").split(",") if ";dur=" in part
                )
            except httpx.HTTPError as exc:
                status, adapter, timing = f"client:{type(exc).__name__}", None, {}
            results.append({"i": i, "status": status, "latency_s": time.perf_counter() - t,
                            "adapter": adapter, "identity": identity,
                            "restore_s": timing.get("restore"), "queue_s": timing.get("queue")})

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--people", type=int, default=8)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--base-every", type=int, default=10, help="every N-th request is base-only (0: none)")
    ap.add_argument("--max-ongoing", type=int, default=4)
    ap.add_argument("--max-queued", type=int, default=16)
    ap.add_argument("--replica-cpus", type=float, default=1.0)
    ap.add_argument("--max-batch", type=int, default=1,
                    help="serve.max_batch_size: requests restored together, people mixed (1: alone)")
    ap.add_argument("--batch-wait", type=float, default=0.01, help="serve.batch_wait_timeout_s")
    ap.add_argument("--max-seconds", type=float, default=180.0, help="stop sending after this long")
    ap.add_argument("--micro-repeats", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS / "serving_cpu"), help="results path without extension")
    args = ap.parse_args(argv)

    import httpx
    import ray
    import torch
    from ray import serve

    from serving.app import build_app
    from serving.auth import generate_key, hash_key

    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO)] + (argv if argv is not None else sys.argv[1:]))
    load_before = os.getloadavg()
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pfstorer-bench-") as tmp:
        root = Path(tmp)
        tenants = ["bench-acme", "bench-globex"]
        t0 = time.perf_counter()
        registry, photos, model = setup_people(root, args.people, tenants)
        setup_s = time.perf_counter() - t0
        print(f"{len(photos)} people personalized and published in {setup_s:.1f}s", flush=True)
        micro = microbench_loads(registry, model, args.micro_repeats)

        keys = {t: generate_key() for t in tenants}
        (root / "keys.yaml").write_text("tenants:\n" + "".join(f"  {t}: ['{hash_key(k)}']\n" for t, k in keys.items()))
        prepare_ray(local=True)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        serve_cfg = {
            "api_keys_file": str(root / "keys.yaml"),
            "adapter_slots": args.slots,
            "host_cache_adapters": 64,
            "max_ongoing_requests": args.max_ongoing,
            "max_queued_requests": args.max_queued,
            "num_cpus": args.replica_cpus,
            "default_steps": args.steps,
            "max_batch_size": args.max_batch,
            "batch_wait_timeout_s": args.batch_wait,
        }
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            t0 = time.perf_counter()
            serve.run(build_app({"base": "tiny", "device": "cpu", "state_dir": str(root / "state"),
                                 "index_url": str(root / "index.parquet"), "store_url": str(root / "store"),
                                 "serve": serve_cfg}), name="pfstorer-bench", route_prefix="/", blocking=False)
            with httpx.Client(base_url=url, timeout=30) as c:
                while (r := c.get("/readyz")).status_code != 200 or r.json().get("base") is None:
                    time.sleep(0.5)  # ready, and the model replica's description has arrived
                ready = r.json()
            deploy_s = time.perf_counter() - t0
            print(f"app ready in {deploy_s:.1f}s on {url}", flush=True)

            people = sorted(photos)
            data = {p: photos[p].read_bytes() for p in people}
            plan: list[tuple[str, str | None, bytes]] = []
            for i in range(args.requests):
                tenant, name = people[i % len(people)]
                base_only = args.base_every and i % args.base_every == args.base_every - 1
                plan.append((tenant, None if base_only else name, data[(tenant, name)]))
            t0 = time.perf_counter()
            results = asyncio.run(run_load(url, keys, plan, args.concurrency, args.max_seconds))
            wall = time.perf_counter() - t0
            stats = serve.get_deployment_handle("Restorer", app_name="pfstorer-bench").get_stats.remote().result()
        finally:
            with contextlib.suppress(Exception):
                serve.delete("pfstorer-bench")
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()

    ok = [r["latency_s"] for r in results if r["status"] == 200]
    service = [r["restore_s"] for r in results if r["status"] == 200 and r["restore_s"] is not None]
    wrong = sum(1 for r in results if r["status"] == 200 and r["identity"]
                and not str(r["adapter"]).split("@")[0].endswith("/" + r["identity"]))
    by_status = Counter(str(r["status"]) for r in results)
    adapters = stats["adapters"]
    report = {
        "benchmark": "serving_cpu",
        "command": command,
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "note": "2-core VM shared with other engineers' jobs: absolute numbers are noisy",
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "torch": torch.__version__,
            "ray": ray.__version__,
        },
        "config": {
            "base": "tiny", "steps": args.steps, "image_px": 128, "requests": args.requests,
            "concurrency": args.concurrency, "people": len(photos), "tenants": len(tenants),
            "adapter_slots": args.slots, "base_only_every": args.base_every,
            "max_ongoing_requests": args.max_ongoing, "max_queued_requests": args.max_queued,
            "max_batch_size": args.max_batch, "batch_wait_timeout_s": args.batch_wait,
            "replicas": 1, "replica_cpus": args.replica_cpus, "torch_threads": ready.get("torch_threads"),
            "max_seconds": args.max_seconds,
        },
        "setup_s": round(setup_s, 1),
        "deploy_s": round(deploy_s, 1),
        "sent": len(results),
        "wall_s": round(wall, 2),
        "throughput_rps": round(len(ok) / wall, 3) if wall else None,
        "latency_s": {
            "p50": round(_pct(ok, 0.5), 4), "p95": round(_pct(ok, 0.95), 4),
            "p99": round(_pct(ok, 0.99), 4), "mean": round(statistics.fmean(ok), 4) if ok else None,
            "max": round(max(ok), 4) if ok else None,
        },
        "restore_s": {"p50": round(_pct(service, 0.5), 4), "p95": round(_pct(service, 0.95), 4),
                      "note": "time on the model thread per request (adapter slot load + restore), "
                              "from the Server-Timing header"},
        "status_counts": dict(sorted(by_status.items())),
        "wrong_adapter_header": wrong,
        "replica": {
            "adapter_load_counts": adapters.get("counts", {}),
            "cold_load_from_store_ms": adapters.get("load_from_store_ms"),
            "warm_load_from_host_ms": adapters.get("load_from_host_ms"),
            "store_read_ms": adapters.get("store_read_ms"),
            "host_hit_ms": adapters.get("host_hit_ms"),
            "affinity_lock": stats.get("affinity_lock"),
            "batches": stats.get("batches"),
        },
        "in_process_adapter_loads": micro,
        "total_s": round(time.perf_counter() - t_all, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    md = _markdown(report)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


def _ms(d: dict[str, Any] | None, key: str = "p50") -> str:
    return "-" if not d else f"{d[key]:.2f}"


def _batches(b: dict[str, int] | None) -> str:
    if not b or not b.get("batches"):
        return "- (each request alone)"
    return " / ".join(str(b[k]) for k in ("batches", "runs", "rows", "mixed_runs", "largest_run"))


def _markdown(r: dict[str, Any]) -> str:
    m, c, lat, rep, mic = r["machine"], r["config"], r["latency_s"], r["replica"], r["in_process_adapter_loads"]
    counts = rep["adapter_load_counts"]
    lines = [
        "# Serving benchmark (CPU)",
        "",
        f"Command: `{r['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['note']}); load average before "
        f"{m['load_average_before']}, after {m['load_average_after']}; Python {m['python']}, "
        f"torch {m['torch']}, Ray {m['ray']}.",
        "",
        f"Set-up: `{c['base']}` base, {c['steps']} denoising steps, {c['image_px']} px photos, "
        f"{c['people']} people in {c['tenants']} tenants, {c['adapter_slots']} device slots, one "
        f"Restorer replica ({c['replica_cpus']} CPU, {c['torch_threads']} torch thread), "
        f"max_ongoing={c['max_ongoing_requests']}, max_queued={c['max_queued_requests']}; "
        f"{c['requests']} requests planned ({r['sent']} sent before the {c.get('max_seconds')} s bound), "
        f"{c['concurrency']} in flight, every {c['base_only_every']}th base-only; HTTP to 127.0.0.1.",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| requests sent / wall time | {r['sent']} / {r['wall_s']} s |",
        f"| throughput (200s) | {r['throughput_rps']} req/s |",
        f"| latency p50 / p95 / p99 | {lat['p50']} / {lat['p95']} / {lat['p99']} s |",
        f"| latency mean / max | {lat['mean']} / {lat['max']} s |",
        f"| service time on the replica p50 / p95 (slot load + restore) | {r['restore_s']['p50']} / {r['restore_s']['p95']} s |",
        f"| answers by status | {', '.join(f'{k}: {v}' for k, v in r['status_counts'].items())} |",
        f"| wrong adapter header | {r['wrong_adapter_header']} |",
        f"| adapter loads into a slot: cold (store) / warm (host RAM) / already resident | "
        f"{counts.get('load_from_store', 0)} / {counts.get('load_from_host', 0)} / {counts.get('device_hit', 0)} |",
        f"| replica: cold load p50 / p95 (store read + sha256 + parse + slot copy) | "
        f"{_ms(rep['cold_load_from_store_ms'])} / {_ms(rep['cold_load_from_store_ms'], 'p95')} ms |",
        f"| replica: warm load p50 / p95 (host RAM + slot copy) | "
        f"{_ms(rep['warm_load_from_host_ms'])} / {_ms(rep['warm_load_from_host_ms'], 'p95')} ms |",
        f"| in-process: cold p50 / p95 ({mic['cold_store_ms']['n']} loads, {mic['adapter_bytes']} B adapters) | "
        f"{mic['cold_store_ms']['p50']:.2f} / {mic['cold_store_ms']['p95']:.2f} ms |",
        f"| in-process: warm p50 / p95 | {mic['warm_host_ms']['p50']:.3f} / {mic['warm_host_ms']['p95']:.3f} ms |",
        f"| batches (max_batch_size {c['max_batch_size']}): batches / runs / rows / runs mixing people / largest run | "
        f"{_batches(rep.get('batches'))} |",
        f"| affinity lock turns / reordered by identity | {rep['affinity_lock']['granted']} / {rep['affinity_lock']['reordered']} |",
        f"| set-up (personalize + publish) / deploy | {r['setup_s']} s / {r['deploy_s']} s |",
        "",
        "Latency is client-side (upload, queueing, restore, PNG). Loads by source are counted per "
        "request that found its person outside the device slots; the replica's timings include "
        "waiting for the I/O thread pool under load.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

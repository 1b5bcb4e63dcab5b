"""``pfstorer serve``, ``pfstorer restore-batch`` and ``pfstorer demo`` (registered through the ``pfstorer.cli``
entry-point group by :func:`register_cli`).

``pfstorer serve --base tiny --index URL --port 8000 --api-keys keys.yaml`` runs the HTTP API on
a local Ray (or ``--ray-address``) until Ctrl-C. ``pfstorer serve --new-key`` prints a fresh API
key and the hash line for the key file; ``--hash-key KEY`` (``-``: stdin) hashes an existing one.

``pfstorer restore-batch --manifest URL --out URL [--index URL] [--base PRESET]`` restores every
``role=restore`` row of a manifest with Ray Data and writes ``{out}/images/...`` PNGs and
``{out}/results.parquet``.

Defaults come from :class:`pfstorer.settings.Settings` (options > ``PFSTORER_*`` env > config
file > defaults). Exit codes: 0 ok, 2 a user error (bad option, no API keys, unreadable manifest).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any
from pathlib import Path

from pfstorer.cli import add_sampling_args, lazy

__all__ = ["register_cli"]


def _json_arg(text: str | None, what: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise SystemExit(f"error: {what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise SystemExit(f"error: {what} must be a JSON object")
    return value


def _init_ray(address: str | None, num_cpus: float | None = None) -> bool:
    """Start or join Ray; True if this process started it (and should shut it down)."""
    import os

    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1",
                 num_cpus=int(num_cpus) if num_cpus else None, **kwargs)
    return True


# ---------------------------------------------------------------------------------------------
# serve
# ---------------------------------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    from pfstorer.errors import PFStorerError
    from pfstorer.settings import Settings
    from serving.auth import ApiKeys, generate_key, hash_key

    if args.new_key:
        key = generate_key()
        print(f"key:  {key}")
        print(f"hash: {hash_key(key)}")
        print("put the hash under your tenant in the API key file; give the key to the tenant")
        return 0
    if args.hash_key is not None:
        from serving.auth import MIN_KEY_LENGTH

        key = sys.stdin.readline().strip() if args.hash_key == "-" else args.hash_key
        if len(key) < MIN_KEY_LENGTH:
            print(f"warning: keys shorter than {MIN_KEY_LENGTH} characters are always refused",
                  file=sys.stderr)
        print(hash_key(key))
        return 0

    serve_overrides = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "api_keys_file": args.api_keys,
            "num_replicas": args.replicas,
            "adapter_slots": args.slots,
            "num_cpus": args.num_cpus,
            "num_gpus": args.num_gpus,
        }.items()
        if v is not None
    }
    settings = Settings.load(
        args.config,
        base=args.base,
        base_weights=args.weights,
        index_url=args.index,
        store_url=args.store,
        storage_options=_json_arg(args.store_options, "--store-options"),
        ray_address=args.ray_address,
        serve=serve_overrides or None,
    )
    try:
        ApiKeys.configured(settings.serve.api_keys_file)
    except PFStorerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from ray import serve

    from serving.app import APP_NAME, build_application

    started = _init_ray(settings.ray_address)
    host, port = settings.serve.host, settings.serve.port
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_application(settings), name=APP_NAME, route_prefix="/", blocking=False)
        print(f"pfstorer serving base {settings.base!r} on http://{host}:{port} "
              f"(index {settings.index_url}); docs at /docs; Ctrl-C stops", flush=True)
        import time

        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        try:
            serve.delete(APP_NAME)
            if started:
                serve.shutdown()
        except Exception:
            pass
        if started:
            import ray

            ray.shutdown()
    return 0


# ---------------------------------------------------------------------------------------------
# restore-batch
# ---------------------------------------------------------------------------------------------


def _cmd_restore_batch(args: argparse.Namespace) -> int:
    from pfstorer.errors import PFStorerError
    from pfstorer.settings import Settings
    from pipelines.batch_restore import restore_manifest

    settings = Settings.load(
        args.config,
        base=args.base,
        base_weights=args.weights,
        index_url=args.index,
        storage_options=_json_arg(args.store_options, "--store-options"),
        ray_address=args.ray_address,
    )
    opts = dict(settings.storage_options)
    if args.s3_endpoint_url:
        opts["endpoint_url"] = args.s3_endpoint_url
    started = _init_ray(settings.ray_address)
    try:
        report = restore_manifest(
            args.manifest,
            args.out,
            index_url=settings.index_url,
            store_url=settings.store_url,
            base=settings.base,
            weights=settings.base_weights,
            device=args.device or settings.device,
            steps=args.steps,
            seed=args.seed,
            scale=args.scale,
            tile=args.tile,
            overlap=args.overlap,
            sampler=args.sampler,
            t_start=args.t_start,
            color_fix=args.color_fix,
            storage_options=opts or None,
            workers=args.workers or settings.workers,
            cpus_per_worker=args.cpus_per_worker if args.cpus_per_worker is not None else settings.cpus_per_worker,
            gpus_per_worker=settings.gpus_per_worker,
            batch_size=args.batch_size,
            max_image_bytes=settings.limits.max_image_bytes,
            max_image_pixels=settings.limits.max_image_pixels,
            min_image_side=args.min_side,
        )
    except PFStorerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if started:
            import ray

            ray.shutdown()
    if args.json:
        print(json.dumps(report.summary(), indent=2))
    else:
        print(f"restored {report.ok} of {report.rows} photos ({report.errors} errors) "
              f"in {report.elapsed_s:.1f} s; results: {report.results_uri}")
        errors = [r for r in report.table.to_pylist() if r["status"] == "error"]
        for row in errors[:20]:
            print(f"  error  {row['tenant']}/{row['identity']}  {row['uri']}: {row['error']}")
    return 0


# ---------------------------------------------------------------------------------------------


def register_cli(subparsers: Any) -> None:
    """Add ``serve``, ``restore-batch`` and ``demo`` to pfstorer's sub-commands."""
    p = subparsers.add_parser(
        "serve",
        help="run the multi-tenant HTTP API (Ray Serve) until Ctrl-C",
        description="Serve POST /v1/restore, GET /v1/identities, /healthz and /readyz on Ray Serve: "
                    "one base model per replica, each person's adapter hot-loaded from the adapter "
                    "index. API keys (hashed) map callers to tenants. OpenAPI at /docs.",
    )
    p.add_argument("--base", help="base model preset or checkpoint (settings: base)")
    p.add_argument("--weights", help="checkpoint for the preset (sd21)")
    p.add_argument("--index", metavar="URL", help="adapter index Parquet (settings: index_url)")
    p.add_argument("--store", metavar="URL", help="adapter store (settings: store_url)")
    p.add_argument("--store-options", metavar="JSON",
                   help='fsspec options for s3:// URLs, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'')
    p.add_argument("--host", help="address to bind (settings: serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (settings: serve.port, 8000)")
    p.add_argument("--api-keys", metavar="FILE",
                   help="YAML/JSON file: tenants -> sha256 hashes of their keys (or $PFSTORER_API_KEYS)")
    p.add_argument("--replicas", type=int, help="model replicas (settings: serve.num_replicas)")
    p.add_argument("--slots", type=int, help="adapters on the device per replica (serve.adapter_slots)")
    p.add_argument("--num-cpus", type=float, help="CPUs per model replica (serve.num_cpus)")
    p.add_argument("--num-gpus", type=float, help="GPUs per model replica (serve.num_gpus)")
    p.add_argument("--ray-address", help="join this Ray cluster (default: start one here)")
    p.add_argument("--config", metavar="FILE", help="pfstorer settings file (YAML/TOML)")
    p.add_argument("--new-key", action="store_true", help="print a new random API key and its hash, then exit")
    p.add_argument("--hash-key", metavar="KEY", help="print the hash of KEY ('-': read stdin), then exit")
    p.set_defaults(func=_cmd_serve)

    b = subparsers.add_parser(
        "restore-batch",
        help="restore every role=restore photo of a manifest with Ray Data",
        description="Restore the manifest's role=restore photos, each with its person's adapter "
                    "(resolved through the adapter index). Writes OUT/images/... PNGs and "
                    "OUT/results.parquet (tenant, identity, uri, output_uri, adapter, status, error); "
                    "a bad row gets status=error and never stops the batch.",
    )
    b.add_argument("--manifest", required=True, metavar="URL", help="Parquet manifest (file or dataset)")
    b.add_argument("--out", required=True, metavar="URL", help="output folder/prefix (any fsspec URL)")
    b.add_argument("--index", metavar="URL", help="adapter index (settings: index_url)")
    b.add_argument("--base", help="base model preset or checkpoint (settings: base)")
    b.add_argument("--weights", help="checkpoint for the preset (sd21)")
    b.add_argument("--device", help="cpu, cuda or auto (settings: device)")
    b.add_argument("--seed", type=int, default=0, help="noise seed (a manifest 'seed' column wins)")
    b.add_argument("--scale", type=float, default=1.0, help="upscaling factor")
    b.add_argument("--tile", type=int, help="tile size in output pixels (default: the model's native size)")
    b.add_argument("--overlap", type=int, help="tile overlap in output pixels (default: a quarter tile)")
    add_sampling_args(b)
    b.add_argument("--color-fix", choices=["wavelet", "adain", "none"], default="wavelet")
    b.add_argument("--workers", type=int, help="Ray Data actors, one base model each (settings: workers)")
    b.add_argument("--cpus-per-worker", type=float, help="CPUs per actor (settings: cpus_per_worker)")
    b.add_argument("--batch-size", type=int, default=4, help="rows per map_batches call")
    b.add_argument("--min-side", type=int, default=16, help="refuse photos with a shorter side")
    b.add_argument("--store-options", metavar="JSON", help="fsspec options for s3:// URLs")
    b.add_argument("--s3-endpoint-url", metavar="URL", help="S3 endpoint (MinIO, moto...)")
    b.add_argument("--ray-address", help="join this Ray cluster (default: start one here)")
    b.add_argument("--config", metavar="FILE", help="pfstorer settings file (YAML/TOML)")
    b.add_argument("--json", action="store_true", help="print the summary as JSON")
    b.set_defaults(func=_cmd_restore_batch)

    d = subparsers.add_parser(
        "demo", help="run the whole job end to end on embedded defaults (make demo)",
        description="Personalize every person of a photo folder on a local Ray (Ray Train), register the "
                    "adapters in MLflow (SQLite), serve them with Ray Serve on 127.0.0.1, restore a degraded "
                    "held-out photo of each person over HTTP with and without their adapter, and write a "
                    "report (input | base | personalized | original + metrics) under .pfstorer-state/demo/report.")
    d.add_argument("--photos", type=Path, help="folder with one sub-folder of photos per person "
                                               "(default: ../shared/data/demo and ../shared/data/wild)")
    d.add_argument("--base", help="base preset (default: compact when its weights are shipped, else tiny)")
    d.add_argument("--steps", type=int, help="personalization steps per person (default: see docs/personalization.md)")
    d.add_argument("--restore-steps", type=int, help="denoising steps per restore (default: the base's)")
    d.add_argument("--max-side", type=int, default=192, help="held-out photos are shrunk to this long side")
    d.add_argument("--state-dir", type=Path, help="where the demo keeps its state (default: .pfstorer-state/demo)")
    d.add_argument("--keep", action="store_true", help="keep earlier demo state (reruns skip trained people)")
    d.set_defaults(func=lazy("serving.demo:run_cli"))

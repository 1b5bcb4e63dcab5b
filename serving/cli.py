"""``pfstorer serve`` (registered through the ``pfstorer.cli`` entry-point group by :func:`register_cli`).

``pfstorer serve --base tiny --index URL --port 8000 --api-keys keys.yaml`` runs the HTTP API on
a local Ray (or ``--ray-address``) until Ctrl-C. ``pfstorer serve --new-key`` prints a fresh API
key and the hash line for the key file; ``--hash-key KEY`` (``-``: stdin) hashes an existing one.

Defaults come from :class:`pfstorer.settings.Settings` (options > ``PFSTORER_*`` env > config
file > defaults). Exit codes: 0 ok, 2 a user error (bad option, no API keys, unreadable manifest).
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from pfstorer.cli import json_option

__all__ = ["register_cli"]


def _init_ray(address: str | None, num_cpus: float | None = None, metrics_port: int | None = None,
              header_timeout_s: float | None = None) -> bool:
    """Start or join Ray; True if this process started it (and should shut it down). A Ray
    started here passes ``header_timeout_s`` to its Serve proxies (:mod:`serving.http_guard`)."""
    import os

    from pfstorer.ray_env import prepare_ray
    from serving.http_guard import proxy_env

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    prepare_ray(local=not address)
    if not address and header_timeout_s is not None:
        os.environ.update(proxy_env(header_timeout_s))  # the node's processes inherit it
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", include_dashboard=False, _metrics_export_port=metrics_port,
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
        storage_options=json_option(args.store_options, "--store-options"),
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

    started = _init_ray(settings.ray_address, metrics_port=settings.serve.metrics_port,
                        header_timeout_s=settings.serve.header_timeout_s)
    # SIGTERM (Kubernetes, systemd, `kill`) stops as Ctrl-C does: Serve and the Ray this process
    # started are shut down in order, so no Ray process outlives it. Set after ray.init, whose
    # core worker installs a handler that dumps a stack and aborts.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    host, port = settings.serve.host, settings.serve.port
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_application(settings), name=APP_NAME, route_prefix="/", blocking=False)
        import ray

        node = ray.nodes()[0] if started else {}
        metrics = node.get("MetricsExportPort")  # bound to the node's address: loopback on a local Ray
        print(f"pfstorer serving base {settings.base!r} on http://{host}:{port} "
              f"(index {settings.index_url}); docs at /docs"
              + (f"; Prometheus metrics at http://{node['NodeManagerAddress']}:{metrics}/metrics" if metrics else "")
              + "; Ctrl-C or SIGTERM stops", flush=True)
        import time

        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr, flush=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut the shutdown short
            signal.signal(sig, signal.SIG_IGN)
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


def register_cli(subparsers: Any) -> None:
    """Add ``serve`` to pfstorer's sub-commands."""
    p = subparsers.add_parser(
        "serve",
        help="run the multi-tenant HTTP API (Ray Serve) until Ctrl-C",
        description="Serve POST /v1/restore, GET /v1/identities, /healthz and /readyz on Ray Serve: "
                    "one base model per replica, each person's adapter hot-loaded from the adapter "
                    "index. API keys (hashed) map callers to tenants. OpenAPI at /docs.",
    )
    p.add_argument("--base", help="base model preset or checkpoint (settings: base)")
    p.add_argument("--weights", help="checkpoint for the preset (sd21)")
    p.add_argument("--index", metavar="URL", help="adapter index URL (settings: index_url)")
    p.add_argument("--store", metavar="URL", help="adapter store (settings: store_url)")
    p.add_argument("--store-options", metavar="JSON",
                   help='fsspec options for s3:// URLs, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'')
    from pfstorer.settings import ServeSettings

    d = {name: f.default for name, f in ServeSettings.model_fields.items()}  # help shows the real defaults
    p.add_argument("--host", help=f"address to bind (settings: serve.host, {d['host']})")
    p.add_argument("--port", type=int, help=f"HTTP port (settings: serve.port, {d['port']})")
    p.add_argument("--api-keys", metavar="FILE",
                   help="YAML/JSON file: tenants -> sha256 hashes of their keys (or $PFSTORER_API_KEYS)")
    p.add_argument("--replicas", type=int, help=f"model replicas (settings: serve.num_replicas, {d['num_replicas']})")
    p.add_argument("--slots", type=int, help=f"adapters on the device per replica (serve.adapter_slots, {d['adapter_slots']})")
    p.add_argument("--num-cpus", type=float, help=f"CPUs per model replica (serve.num_cpus, {d['num_cpus']:g})")
    p.add_argument("--num-gpus", type=float, help=f"GPUs per model replica (serve.num_gpus, {d['num_gpus']:g})")
    p.add_argument("--ray-address", help="join this Ray cluster (default: start one here)")
    p.add_argument("--config", metavar="FILE", help="pfstorer settings file (YAML/TOML)")
    p.add_argument("--new-key", action="store_true", help="print a new random API key and its hash, then exit")
    p.add_argument("--hash-key", metavar="KEY", help="print the hash of KEY ('-': read stdin), then exit")
    p.set_defaults(func=_cmd_serve)

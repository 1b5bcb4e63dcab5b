"""``pfstorer run``: a manifest in, one registered adapter per person out.

validate -> plan (job keys, skip what is registered) -> train on a Ray Train worker group ->
publish (store, MLflow, index) -> summary. Python API::

    from pipelines.run import run_manifest
    summary = run_manifest("s3://bucket/manifest.parquet", base="tiny", steps=2, workers=2)
    print(summary.table())

:func:`~pipelines.run_plan.prepare_run` (validate on Ray Data, then plan: job keys, skips) and
:func:`~pipelines.run_train.execute_run` (train on Ray Train, publish, sum up) are its two halves.

- **Validate first**: bad rows go to the quarantine Parquet (``--quarantine-out``, default
  ``{state_dir}/runs/{run_id}/quarantine.parquet``); quarantined people never reach training.
- **Idempotent**: a person whose adapter for the same photos, base and config is registered is
  *skipped*; if nobody is left, Ray Train is not even started.
- **Train**: :mod:`pipelines.job_queue` (the job queue actor and its publisher for MLflow and the
  index) and :mod:`pipelines.train_worker` (long-lived workers with the frozen base loaded once,
  packed multi-identity batches).
- **Summary**: a progress bar while training (stderr), a table at the end (done, skipped, failed,
  quarantined, time per identity) and :class:`~pipelines.run_summary.RunSummary` as JSON in
  ``{state_dir}/runs/{run_id}/summary.json``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from pipelines.records import QueueProgress
from pipelines.run_plan import RunPlan, prepare_run
from pipelines.run_summary import IdentityOutcome, RunSummary
from pipelines.run_train import execute_run

__all__ = [
    "IdentityOutcome",
    "RunPlan",
    "RunSummary",
    "execute_run",
    "prepare_run",
    "register_cli",
    "run_manifest",
]


def run_manifest(
    manifest_url: str,
    settings: Any = None,
    *,
    pack: int = 4,
    quarantine_out: str | None = None,
    dry_train: bool = False,
    job_retries: int | None = None,
    report_interval_s: float = 2.0,
    train_storage: str | None = None,
    publish_threads: int | None = None,
    progress: bool = False,
    on_progress: Callable[[QueueProgress], None] | None = None,
    run_id: str | None = None,
    **overrides: Any,
) -> RunSummary:
    """Validate, plan, train and publish a manifest; see the module docstring.

    ``settings``: a :class:`pfstorer.settings.Settings` (default ``Settings.load()``);
    ``overrides``: any of its fields (``base``, ``store_url``, ``tracking_uri``, ``index_url``,
    ``storage_options``, ``ray_address``, ``workers``, ``cpus_per_worker``, ``gpus_per_worker``,
    ``max_retries``, ``state_dir``) and ``steps``. ``dry_train``: skip the UNet (adapters of the
    real shapes, untrained) - for benchmarks of the scheduler; its job keys differ from real ones.
    """
    plan = prepare_run(
        manifest_url, settings, quarantine_out=quarantine_out, dry_train=dry_train,
        run_id=run_id, **overrides,
    )
    return execute_run(
        plan, pack=pack, job_retries=job_retries, report_interval_s=report_interval_s,
        train_storage=train_storage, publish_threads=publish_threads, progress=progress,
        on_progress=on_progress,
    )


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    from pfstorer.cli import stdout_to_stderr
    from pfstorer.errors import PFStorerError
    from pfstorer.settings import Settings
    from pipelines.cli import with_endpoint

    with stdout_to_stderr(args.json):
        try:
            settings = Settings.load(
                args.config,
                state_dir=args.state_dir, base=args.base, base_weights=args.base_weights,
                store_url=args.store, tracking_uri=args.tracking_uri, index_url=args.index,
                ray_address=args.ray_address, workers=args.workers,
                cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                max_retries=args.max_retries,
            )
            settings.storage_options = with_endpoint(args, dict(settings.storage_options))
            summary = run_manifest(
                args.manifest, settings, steps=args.steps, pack=args.pack,
                quarantine_out=args.quarantine_out, dry_train=args.dry_train,
                train_storage=args.train_storage, progress=not args.no_progress and not args.json,
            )
        except PFStorerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.json:
        print(summary.model_dump_json(indent=2))
    else:
        print(summary.table())
    return 0 if summary.ok else 1


def register_cli(subparsers: Any) -> None:
    """Add ``run`` to ``pfstorer``'s sub-commands."""
    p = subparsers.add_parser(
        "run",
        help="personalize every person of a manifest on Ray and register the adapters",
        description="Validate a manifest (bad rows to quarantine), skip people whose adapter for "
        "the same photos, base and config is registered, train the rest on a Ray Train worker "
        "group (frozen base loaded once per worker, people packed into batches, pulled from a "
        "queue), register each adapter in MLflow and the index, and print a summary. Exit code "
        "0: everyone done or skipped; 1: someone failed; 2: a user error. Defaults come from "
        "pfstorer's settings (PFSTORER_* environment, --config file, local state dir).",
    )
    from pfstorer.settings import Settings

    d = {name: f.default for name, f in Settings.model_fields.items()}  # help shows the real defaults
    p.add_argument("--manifest", required=True, metavar="URL", help="Parquet manifest (fsspec URL)")
    p.add_argument("--base", help=f"base preset or checkpoint (settings: base, {d['base']})")
    p.add_argument("--base-weights", metavar="URL", help="weights for the preset (sd21)")
    p.add_argument("--store", metavar="URL", help="artifact store (default {state_dir}/adapters)")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow (default sqlite in the state dir)")
    p.add_argument("--index", metavar="URL", help="adapter index (default {state_dir}/index.parquet)")
    p.add_argument("--steps", type=int, help="personalization steps per person (settings: personalize.steps, "
                   f"{Settings.model_fields['personalize'].default_factory().steps})")
    p.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray on 127.0.0.1)")
    p.add_argument("--workers", type=int, help=f"Ray Train workers (settings: workers, {d['workers']})")
    p.add_argument("--pack", type=int, default=4, help="people trained together per worker (4)")
    p.add_argument("--cpus-per-worker", type=float, help=f"CPUs per worker (settings: cpus_per_worker, {d['cpus_per_worker']:g})")
    p.add_argument("--gpus-per-worker", type=float, help=f"GPUs per worker (settings: gpus_per_worker, {d['gpus_per_worker']:g})")
    p.add_argument("--max-retries", type=int, help="worker-group restarts; also per-person retries "
                   f"(settings: max_retries, {d['max_retries']})")
    p.add_argument("--quarantine-out", metavar="URL", help="quarantine Parquet (default in the run's state dir)")
    p.add_argument("--train-storage", metavar="URL", help="Ray Train storage (default {state_dir}/ray-train)")
    p.add_argument("--state-dir", metavar="DIR", help="local state (default .pfstorer-state)")
    p.add_argument("--config", metavar="FILE", help="pfstorer settings file (YAML/TOML)")
    p.add_argument("--s3-endpoint-url", metavar="URL", help="S3 endpoint for s3:// URLs")
    p.add_argument("--dry-train", action="store_true",
                   help="skip the UNet: untrained adapters, for scheduler benchmarks; refused unless the store, "
                        "index and MLflow are the state dir's own (never a production registry)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.run")
    register_cli(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main(["run", *sys.argv[1:]]))

"""``pfstorer manifest validate|from-folders``, ``pfstorer forget`` and ``pfstorer restore-batch``.

``pfstorer restore-batch --manifest URL --out URL [--index URL] [--base PRESET]`` restores every
``role=restore`` row of a manifest with Ray Data, streaming: ``{out}/images/...`` PNGs and
``{out}/results/`` Parquet files written as batches finish; a rerun skips finished rows.

``pfstorer.cli`` calls :func:`register_cli` with its sub-parsers; each handler takes the parsed
namespace and returns the exit code (0 ok, 2 a user error such as an unreadable manifest).
``python -m pipelines.cli ...`` runs the same commands on their own.

Defaults come from :class:`pfstorer.settings.Settings` (``PFSTORER_*`` environment, the config
file, local state under ``.pfstorer-state``). Remote URLs (``s3://``) use the settings'
``storage_options``, else an endpoint from ``--s3-endpoint-url`` or the environment
(``PFSTORER_S3_ENDPOINT_URL``, ``MLFLOW_S3_ENDPOINT_URL``, ``AWS_ENDPOINT_URL``); credentials
from the usual AWS variables.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pfstorer.cli import json_option, restore_defaults, stdout_to_stderr
from pfstorer.restore_options import RestoreOptions, add_restore_arguments

__all__ = ["main", "register_cli"]


def _storage_options(
    args: argparse.Namespace, url: str, base: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """Options for one URL: ``base`` (settings) or the environment, plus --s3-endpoint-url."""
    from registry import default_storage_options, is_local_url

    if is_local_url(url):
        return None
    return with_endpoint(args, dict(base) if base else default_storage_options(url))


def with_endpoint(args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with ``--s3-endpoint-url`` on top: the one place the flag is applied."""
    if getattr(args, "s3_endpoint_url", None):
        return {**options, "endpoint_url": args.s3_endpoint_url}
    return options


def _add_endpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--s3-endpoint-url",
        metavar="URL",
        help="S3 endpoint for s3:// URLs (MinIO, moto...); default from the environment",
    )


# ---------------------------------------------------------------------------------------------


def _cmd_validate(args: argparse.Namespace) -> int:
    from pfstorer.errors import PFStorerError
    from pipelines.cluster import using_ray
    from pipelines.manifest import manifest_hash
    from pipelines.validate import validate_from_settings, write_quarantine

    settings = _settings(args, ray_address=getattr(args, "ray_address", None))
    opts = with_endpoint(args, dict(settings.storage_options))
    with stdout_to_stderr(args.json), using_ray(settings):
        try:
            result = validate_from_settings(
                args.url, settings, min_refs=args.min_refs, max_refs=args.max_refs,
                storage_options=opts or None,
            )
        except PFStorerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    table = result.manifest
    summary = {"manifest": args.url, "rows": table.num_rows, "hash": manifest_hash(table)}
    summary.update(result.summary())
    if out := args.quarantine_out:
        try:
            write_quarantine(result, out, _storage_options(args, out))
        except (PFStorerError, OSError) as exc:
            print(f"error: cannot write quarantine to {out}: {exc}", file=sys.stderr)
            return 2
        summary["quarantine_out"] = args.quarantine_out
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"manifest {args.url}: {table.num_rows} rows, hash {summary['hash'][:16]}")
    print(
        f"good rows: {summary['good_rows']} "
        f"({summary['good_refs']} references, {summary['good_restore']} to restore)"
    )
    print(f"people ready: {summary['people_ready']}")
    print(f"quarantined rows: {summary['quarantined_rows']}")
    print(f"photos read: {summary['photos_read']}, unchanged since the last probe: {summary['photos_cached']}")
    for reason, count in summary["quarantined_by_reason"].items():
        print(f"  {count:6d}  {reason}")
    if args.quarantine_out:
        print(f"quarantine written to {args.quarantine_out}")
    return 0


def _cmd_from_folders(args: argparse.Namespace) -> int:
    from pfstorer.errors import PFStorerError
    from pipelines.manifest import manifest_from_folders, write_manifest

    try:
        table = manifest_from_folders(
            args.dir,
            args.tenant,
            holdout=args.holdout,
            refs=args.refs,
            storage_options=_storage_options(args, args.dir),
        )
        write_manifest(table, args.out, _storage_options(args, args.out))
    except (PFStorerError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    people = len(set(table.column("identity").to_pylist()))
    roles = table.column("role").to_pylist()
    print(
        f"wrote {args.out}: {table.num_rows} photos of {people} people "
        f"({roles.count('ref')} references, {roles.count('restore')} to restore)"
    )
    return 0


def _settings(args: argparse.Namespace, **overrides: Any) -> Any:
    """pfstorer's Settings: CLI options > PFSTORER_* env > config file > defaults."""
    from pfstorer.settings import Settings

    return Settings.load(getattr(args, "config", None), **overrides)


def _cmd_forget(args: argparse.Namespace) -> int:
    from pfstorer.errors import PFStorerError
    from registry import AdapterRegistry

    try:
        settings = _settings(
            args,
            store_url=args.store,
            tracking_uri=args.tracking_uri,
            index_url=args.index,
            state_dir=args.state_dir,
        )
        opts = with_endpoint(args, dict(settings.storage_options))
        registry = AdapterRegistry.from_settings(settings, storage_options=opts or None)
        report = registry.forget(args.tenant, args.identity)
    except PFStorerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not report.found_anything:
        print(f"nothing stored for {args.tenant}/{args.identity}")
        return 0
    index = "removed" if report.index_removed else "absent"
    model = "deleted" if report.model_deleted else "absent"
    print(
        f"forgot {args.tenant}/{args.identity}: index row {index}, "
        f"registered model {model} "
        f"({report.versions_deleted} versions), job records removed from {report.job_records_deleted} "
        f"runs ({report.runs_deleted} runs deleted, left without jobs), "
        f"{report.files_deleted} files deleted"
    )
    if report.runs_pending_gc:
        print(
            f"note: {report.runs_pending_gc} job runs are deleted (their artifacts removed) but "
            "stay in the tracking database until `mlflow gc` runs against it"
        )
    return 0


# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# restore-batch
# ---------------------------------------------------------------------------------------------


def _cmd_restore_batch(args: argparse.Namespace) -> int:
    from pfstorer.errors import PFStorerError
    from pfstorer.settings import Settings
    import pyarrow.compute as pc

    from pipelines.batch_restore import restore_manifest
    from pipelines.cluster import using_ray

    settings = Settings.load(
        args.config,
        base=args.base,
        base_weights=args.weights,
        index_url=args.index,
        storage_options=json_option(args.store_options, "--store-options"),
        ray_address=args.ray_address,
    )
    opts = with_endpoint(args, dict(settings.storage_options))
    with stdout_to_stderr(args.json), using_ray(settings):
        try:
            report = restore_manifest(
                args.manifest,
                args.out,
                index_url=settings.index_url,
                store_url=settings.store_url,
                base=settings.base,
                weights=settings.base_weights,
                device=args.device or settings.device,
                options=RestoreOptions.from_args(args, settings.restore),
                limits=settings.limits.restores(),
                storage_options=opts or None,
                workers=args.workers or settings.workers,
                cpus_per_worker=args.cpus_per_worker if args.cpus_per_worker is not None else settings.cpus_per_worker,
                gpus_per_worker=settings.gpus_per_worker,
                batch_size=args.batch_size,
            )
        except PFStorerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(report.summary(), indent=2))
    else:
        print(f"restored {report.ok} photos ({report.errors} errors, {report.skipped} finished "
              f"before) in {report.elapsed_s:.1f} s; results: {report.results_uri}")
        errors = report.table.filter(pc.equal(report.table.column("status"), "error")).to_pylist()
        for row in errors[:20]:
            print(f"  error  {row['tenant']}/{row['identity']}  {row['uri']}: {row['error']}")
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``manifest validate``, ``manifest from-folders``, ``forget`` and ``restore-batch`` to ``subparsers``."""
    manifest = subparsers.add_parser("manifest", help="check and build photo manifests")
    msub = manifest.add_subparsers(dest="manifest_command", metavar="COMMAND", required=True)

    v = msub.add_parser(
        "validate",
        help="validate a manifest; print a summary (exit 0 even with bad rows, 2 if unreadable)",
        description="Check every row of a manifest on Ray Data: references are read, hashed and "
        "decoded, restore photos judged from their headers; bad rows are quarantined with a "
        "reason and a stage. Probes are cached (settings: probe_cache_url) by uri, size and "
        "ETag/mtime, so a rerun of an unchanged manifest reads no photo.",
    )
    v.add_argument("url", metavar="URL", help="Parquet file or dataset directory (any fsspec URL)")
    v.add_argument("--quarantine-out", metavar="URL", help="write quarantined rows as Parquet here")
    from pfstorer.config import PersonalizeConfig

    refs = PersonalizeConfig.model_fields  # help shows the real defaults
    v.add_argument("--min-refs", type=int, default=None,
                   help=f"fewest good references (settings: personalize.min_refs, {refs['min_refs'].default})")
    v.add_argument("--max-refs", type=int, default=None,
                   help=f"most references kept (settings: personalize.max_refs, {refs['max_refs'].default})")
    v.add_argument("--json", action="store_true", help="print the summary as JSON")
    v.add_argument("--ray-address", help="join this Ray cluster (default: start one here)")
    v.add_argument("--config", metavar="FILE", help="pfstorer settings file (YAML/TOML)")
    _add_endpoint(v)
    v.set_defaults(func=_cmd_validate)

    f = msub.add_parser("from-folders", help="a manifest from DIR/<identity>/<photos>")
    f.add_argument("dir", metavar="DIR", help="one sub-folder per person")
    f.add_argument("--tenant", required=True)
    f.add_argument("--out", required=True, metavar="URL", help="where to write the Parquet file")
    group = f.add_mutually_exclusive_group()
    group.add_argument(
        "--holdout", type=int, default=0, metavar="N",
        help="the last N photos of each person (by name) are role=restore",
    )
    group.add_argument(
        "--refs", type=int, default=None, metavar="N",
        help="the first N photos of each person are references, the rest role=restore",
    )
    _add_endpoint(f)
    f.set_defaults(func=_cmd_from_folders)

    g = subparsers.add_parser(
        "forget",
        help="remove a person's adapters from registry, store and index (biometric data)",
    )
    g.add_argument("--tenant", required=True)
    g.add_argument("--identity", required=True)
    g.add_argument("--store", metavar="URL", help="artifact store URL (default: local state dir)")
    g.add_argument(
        "--tracking-uri", metavar="URI", help="MLflow tracking URI (default: local SQLite)"
    )
    g.add_argument("--index", metavar="URL", help="adapter index URL (default: local state dir)")
    g.add_argument(
        "--state-dir", metavar="DIR", help="local defaults live here (default .pfstorer-state)"
    )
    _add_endpoint(g)
    g.set_defaults(func=_cmd_forget)

    b = subparsers.add_parser(
        "restore-batch",
        help="restore every role=restore photo of a manifest with Ray Data",
        description="Restore the manifest's role=restore photos, each with its person's adapter "
                    "(resolved through the adapter index), streaming on Ray Data. Writes "
                    "OUT/images/... PNGs and OUT/results/*.parquet (tenant, identity, uri, "
                    "output_uri, adapter, status, error) as batches finish; a bad row gets "
                    "status=error and never stops the batch. A rerun into the same OUT skips the "
                    "rows already ok (after a crash, too) and retries the others.",
    )
    b.add_argument("--manifest", required=True, metavar="URL", help="Parquet manifest (file or dataset)")
    b.add_argument("--out", required=True, metavar="URL", help="output folder/prefix (any fsspec URL)")
    b.add_argument("--index", metavar="URL", help="adapter index (settings: index_url)")
    b.add_argument("--base", help="base model preset or checkpoint (settings: base)")
    b.add_argument("--weights", help="checkpoint for the preset (sd21)")
    b.add_argument("--device", help="cpu, cuda or auto (settings: device)")
    add_restore_arguments(b, restore_defaults())  # a manifest 'seed' column wins over --seed
    b.add_argument("--workers", type=int, help="Ray Data actors, one base model each (settings: workers)")
    b.add_argument("--cpus-per-worker", type=float, help="CPUs per actor (settings: cpus_per_worker)")
    b.add_argument("--batch-size", type=int, default=4, help="rows per map_batches call")
    b.add_argument("--store-options", metavar="JSON", help="fsspec options for s3:// URLs")
    b.add_argument("--s3-endpoint-url", metavar="URL", help="S3 endpoint (MinIO, moto...)")
    b.add_argument("--ray-address", help="join this Ray cluster (default: start one here)")
    b.add_argument("--config", metavar="FILE", help="pfstorer settings file (YAML/TOML)")
    b.add_argument("--json", action="store_true", help="print the summary as JSON")
    b.set_defaults(func=_cmd_restore_batch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.cli")
    register_cli(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

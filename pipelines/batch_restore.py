"""Batch restore with Ray Data: every ``role=restore`` photo of a manifest, with its person's adapter.

``pfstorer restore-batch --manifest URL --out URL [--index URL] [--base PRESET]``

It streams, so memory does not grow with the manifest and a crash loses at most the batches in
flight:

1. ``read_parquet`` of the manifest (its own filesystem, any fsspec URL), keeping the
   ``role=restore`` rows not already ``ok`` in ``{out}/results/``, as blocks of ``batch_size``
   rows in the object store (keys only: tenant, identity, uri, seed); within a block rows are
   sorted by (tenant, identity, uri), so consecutive rows share a person.
2. ``map_batches(BatchRestorer, concurrency=workers)``: each actor loads the base model once,
   resolves each row's person through the adapter index (the same index serving reads; MLflow
   is not touched), reads the adapter with its sha256 verified (``AdapterRegistry.load_adapter``),
   keeps the last few adapters in RAM, copies the current one into a device slot in place,
   restores the photo (tiled for any size) and writes a PNG to
   ``{out}/images/{tenant}/{identity}/{stem}-{hash of uri}.png``.
3. ``write_parquet`` into ``{out}/results/`` as batches finish: one row per attempt -
   ``tenant, identity, uri, output_uri, adapter`` (``tenant/identity@version``), ``status``
   (``ok`` / ``error``), ``error`` (the reason), ``seed``, ``elapsed_s``, ``finished_at``.
   :func:`read_results` gives the latest per row. A bad row (unreadable photo, no adapter,
   adapter for another base) gets ``status=error``; it never stops the batch, and a rerun
   tries it again.

Outputs equal ``pfstorer restore --adapter ... --seed S`` of the same photo bit for bit (same
steps, scale, tile, colour fix, device and torch thread count: each actor uses
``max(1, floor(cpus_per_worker))`` threads). A ``seed`` column in the manifest sets per-photo
seeds; otherwise every photo uses ``--seed``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pfstorer.errors import AdapterError, InputError, PFStorerError, TooLargeError
from pfstorer.image_checks import ImageLimits
from pfstorer.restore_options import RestoreOptions
from pfstorer.settings import Settings

log = logging.getLogger(__name__)

__all__ = [
    "RESULTS_SCHEMA",
    "BatchConfig",
    "BatchReport",
    "BatchRestorer",
    "output_uri_for",
    "read_results",
    "restore_manifest",
]

RESULTS_DIR = "results"

RESULTS_SCHEMA = pa.schema(
    [
        pa.field("tenant", pa.string()),
        pa.field("identity", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("output_uri", pa.string()),
        pa.field("adapter", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("elapsed_s", pa.float64()),
        pa.field("finished_at", pa.timestamp("us", tz="UTC")),
    ]
)
_KEY = ("tenant", "identity", "uri")


# ---------------------------------------------------------------------------------------------
# shared with serving
# ---------------------------------------------------------------------------------------------


def output_uri_for(out_url: str, tenant: str, identity: str, uri: str) -> str:
    """Where the restored PNG of ``uri`` goes (stable, unique per input URI)."""
    stem = PurePosixPath(str(uri).rstrip("/")).stem or "image"
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in stem)[:80]
    digest = hashlib.sha256(str(uri).encode()).hexdigest()[:10]
    return f"{out_url.rstrip('/')}/images/{tenant}/{identity}/{stem}-{digest}.png"


# ---------------------------------------------------------------------------------------------
# the Ray Data worker
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """What every actor needs (plain values: shipped to the actors)."""

    index_url: str
    out_url: str
    base: str
    options: RestoreOptions  # its seed is the default of rows without a 'seed' column
    limits: ImageLimits
    host_cache_adapters: int  # settings serve.host_cache_adapters: the same host-RAM tier as a replica's
    store_url: str | None = None
    weights: str | None = None
    device: str = "auto"
    threads: int = 1
    storage_options: dict[str, Any] | None = None


class BatchRestorer:
    """``map_batches`` callable: one base model per actor, adapters resolved through the index."""

    def __init__(self, config: BatchConfig) -> None:
        import torch

        from pfstorer.model import load_base
        from pfstorer.personalization import AdapterSlots
        from registry import AdapterRegistry
        from registry.adapter_cache import HostAdapterCache

        torch.set_num_threads(max(1, int(config.threads)))
        self.config = config
        self.model = load_base(config.base, weights=config.weights, device=config.device)
        self.slots = AdapterSlots.for_model(self.model, 1)
        self.current: str | None = None  # sha256 of the adapter in slot 0
        opts = config.storage_options
        # read-only: the index (re-read when it changes, checked at most every 30 s) and the
        # store reached through each entry's URI; no MLflow
        self.registry = AdapterRegistry.from_urls(
            config.store_url or config.out_url, None, config.index_url, storage_options=opts, index_max_age_s=30.0
        )
        self.cache = HostAdapterCache(config.host_cache_adapters)
        self.limits = config.limits

    # -- one row ----------------------------------------------------------------------------
    def _adapter(self, tenant: str, identity: str) -> tuple[Any, Any]:
        from registry import check_key

        check_key(tenant, "tenant")
        check_key(identity)
        entry = self.registry.resolve(tenant, identity)
        if entry is None:
            raise AdapterError(f"no adapter for {tenant}/{identity} in the index")
        adapter, _ = self.cache.get(entry.sha256, f"{tenant}/{identity}",
                                    lambda: self.registry.load_adapter(entry, self.model))
        return entry, adapter

    def _read(self, uri: str) -> bytes:
        from registry import url_to_fs

        fs, path = url_to_fs(uri, self.config.storage_options)
        try:
            size = fs.size(path)
        except FileNotFoundError:
            raise InputError(f"{uri}: no such file") from None
        except Exception:  # a store that cannot tell: bounded read below
            size = None
        if size is not None and size > self.limits.max_bytes:
            raise TooLargeError(f"{uri} is {size} bytes, over the limit of {self.limits.max_bytes}")
        try:
            with fs.open(path, "rb") as fh:
                data = fh.read(self.limits.max_bytes + 1)
        except (FileNotFoundError, IsADirectoryError):
            raise InputError(f"{uri}: no such file") from None
        if len(data) > self.limits.max_bytes:
            raise TooLargeError(f"{uri} is over the limit of {self.limits.max_bytes} bytes")
        return data

    def _write(self, uri: str, data: bytes) -> None:
        from registry import is_local_url, url_to_fs

        fs, path = url_to_fs(uri, self.config.storage_options)
        if is_local_url(uri):
            fs.makedirs(str(PurePosixPath(path).parent), exist_ok=True)
        fs.pipe_file(path, data)

    def restore_one(self, tenant: str, identity: str, uri: str, seed: int) -> tuple[str, str]:
        """Restore one photo; return ``(output_uri, adapter label)``."""
        import torch

        from pfstorer.images import decode_image, encode_png
        from pfstorer.sampling import restore_batch

        c = self.config
        entry, adapter = self._adapter(tenant, identity)
        image = decode_image(self._read(uri), limits=self.limits, name=uri, dtype=torch.uint8)
        if self.current != entry.sha256:
            self.slots.load(0, adapter.tensors)
            self.current = entry.sha256
        out = restore_batch(
            self.model, image.unsqueeze(0), adapters=self.slots, slots=[0], seeds=[seed],
            **c.options.sampling_kwargs(),
        )[0]
        dest = output_uri_for(c.out_url, tenant, identity, uri)
        self._write(dest, encode_png(out))
        return dest, entry.label

    # -- one batch --------------------------------------------------------------------------
    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out: list[dict[str, Any]] = []
        for r in rows:
            t0 = time.perf_counter()
            seed = r.get("seed")
            try:
                seed = self.config.options.seed if seed is None else int(seed)
            except (TypeError, ValueError):
                seed = self.config.options.seed
            result: dict[str, Any] = {
                "tenant": r.get("tenant"),
                "identity": r.get("identity"),
                "uri": r.get("uri"),
                "output_uri": None,
                "adapter": None,
                "status": "ok",
                "error": None,
                "seed": seed,
            }
            try:
                result["output_uri"], result["adapter"] = self.restore_one(
                    str(r.get("tenant")), str(r.get("identity")), str(r.get("uri")), seed
                )
            except PFStorerError as exc:
                result.update(status="error", error=str(exc))
            except Exception as exc:  # a bad row never kills the batch; the reason is kept
                log.exception("restore of %s failed", r.get("uri"))
                result.update(status="error", error=f"{type(exc).__name__}: {exc}")
            result["elapsed_s"] = time.perf_counter() - t0
            result["finished_at"] = datetime.now(UTC)
            out.append(result)
        return pa.Table.from_pylist(out, schema=RESULTS_SCHEMA)


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BatchReport:
    """What a batch restore did: ``restored`` rows this run (``ok`` + ``errors``), ``skipped``
    rows finished by an earlier run; ``table``: the latest result of every row (see
    :func:`read_results`)."""

    results_uri: str
    rows: int
    ok: int
    errors: int
    skipped: int
    elapsed_s: float
    table: pa.Table = dataclasses.field(repr=False, compare=False)

    def summary(self) -> dict[str, Any]:
        return {
            "results": self.results_uri,
            "rows": self.rows,
            "ok": self.ok,
            "errors": self.errors,
            "skipped": self.skipped,
            "elapsed_s": round(self.elapsed_s, 2),
        }


def _restore_rows(batch: pa.Table, done: list[Any]) -> pa.Table:
    """``map_batches``: the batch's ``role=restore`` rows not finished before (``done``: a
    one-item list with the ref of their keys), sorted so a person's rows are together."""
    import ray

    from pipelines.manifest import _as_string_columns

    batch = _as_string_columns(batch, "manifest")
    batch = batch.filter(pc.fill_null(pc.equal(batch.column("role"), "restore"), False))
    keep = [*_KEY] + (["seed"] if "seed" in batch.column_names else [])
    rows = batch.select(keep)
    if "seed" in rows.column_names:
        try:
            rows = rows.set_column(keep.index("seed"), "seed", pc.cast(rows.column("seed"), pa.int64()))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            rows = rows.drop_columns(["seed"])  # not integers: --seed for every row
    finished = ray.get(done[0])
    if len(finished):
        rows = rows.filter(pc.invert(pc.is_in(_keys(rows), value_set=finished)))
    return rows.sort_by([(k, "ascending") for k in _KEY])


def _keys(table: pa.Table) -> pa.Array:
    return pc.binary_join_element_wise(*(pc.fill_null(table.column(k), "") for k in _KEY), "\x00")


def read_results(out_url: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """The latest result of every row restored into ``out_url`` (all runs), sorted by key.

    ``{out_url}/results/`` holds one row per attempt, written as batches finish; a file cut
    short by a crash is skipped with a warning (its rows are simply restored again).
    """
    from registry import url_to_fs

    fs, path = url_to_fs(f"{out_url.rstrip('/')}/{RESULTS_DIR}", storage_options)
    parts: list[pa.Table] = []
    if fs.exists(path):
        for name in sorted(fs.find(path)):
            if not name.endswith(".parquet"):
                continue
            try:
                with fs.open(name, "rb") as fh:
                    parts.append(pq.read_table(fh).cast(RESULTS_SCHEMA))
            except Exception as exc:
                log.warning("skipping unreadable results file %s: %s", name, exc)
    if not parts:
        return RESULTS_SCHEMA.empty_table()
    table = pa.concat_tables(parts).sort_by([*((k, "ascending") for k in _KEY), ("finished_at", "descending")])
    keys = _keys(table).to_pylist()
    first = [i for i, k in enumerate(keys) if i == 0 or k != keys[i - 1]]
    return table.take(pa.array(first, pa.int64()))


def restore_manifest(
    manifest_url: str,
    out_url: str,
    *,
    index_url: str,
    store_url: str | None = None,
    base: str | None = None,
    weights: str | None = None,
    device: str = "auto",
    options: RestoreOptions | None = None,
    limits: ImageLimits | None = None,
    storage_options: Mapping[str, Any] | None = None,
    workers: int = 1,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    batch_size: int = 4,
) -> BatchReport:
    """Restore every ``role=restore`` row of a manifest on Ray Data (Ray must be initialised).

    Streams: ``read_parquet`` -> the restore rows not yet ``ok`` in ``{out_url}/results/`` ->
    ``map_batches`` (:class:`BatchRestorer` actors) -> ``write_parquet`` into
    ``{out_url}/results/`` as batches finish; PNGs go under ``{out_url}/images/``. A crash keeps
    every batch written; a rerun skips rows already ``ok`` and retries the rest.
    """
    import ray

    from pipelines.manifest import arrow_filesystem, check_manifest_schema, ray_read_manifest

    t0 = time.perf_counter()
    out_url = os.fspath(out_url).rstrip("/")
    opts = dict(storage_options) if storage_options else None
    check_manifest_schema(manifest_url, opts)
    before = read_results(out_url, opts)
    finished = _keys(before.filter(pc.equal(before.column("status"), "ok")))
    defaults = Settings.load()  # what the caller leaves open: settings (config file, environment)
    config = BatchConfig(
        index_url=index_url, out_url=out_url, store_url=store_url, base=base or defaults.base, weights=weights,
        device=device, options=options or defaults.restore, limits=limits or defaults.limits.restores(),
        host_cache_adapters=defaults.serve.host_cache_adapters,
        threads=max(1, int(cpus_per_worker)), storage_options=opts,
    )
    batch_size = max(1, int(batch_size))
    results_url = f"{out_url}/{RESULTS_DIR}"
    filesystem, results_path = arrow_filesystem(results_url, opts)
    ctx = ray.data.DataContext.get_current()
    old_progress, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    try:
        ds = (
            ray_read_manifest(manifest_url, opts)
            .map_batches(_restore_rows, fn_kwargs={"done": [ray.put(finished)]}, batch_format="pyarrow",
                         batch_size=None, num_cpus=0)
            .repartition(target_num_rows_per_block=batch_size)  # small blocks: written as they finish
            # the rows to do (keys, not photos) are made first: restoring actors that hold every
            # CPU would otherwise starve the manifest's read tasks
            .materialize()
        )
        todo = ds.count()
        ds = (
            ds.map_batches(
                BatchRestorer,
                fn_constructor_kwargs={"config": config},
                batch_size=batch_size,
                batch_format="pyarrow",
                concurrency=max(1, int(workers)),
                num_cpus=cpus_per_worker,
                num_gpus=gpus_per_worker or None,
            )
        )
        if todo:  # else nothing to restore: no actor loads a model
            ds.write_parquet(results_path, filesystem=filesystem, ray_remote_args={"num_cpus": 0})
    finally:
        ctx.enable_progress_bars = old_progress
    table = read_results(out_url, opts)
    new = table.filter(pc.invert(pc.is_in(_keys(table), value_set=finished))) if len(finished) else table
    status = new.column("status").to_pylist()
    return BatchReport(
        results_uri=results_url,
        rows=table.num_rows,
        ok=status.count("ok"),
        errors=status.count("error"),
        skipped=len(finished),
        elapsed_s=time.perf_counter() - t0,
        table=table,
    )

"""Batch restore with Ray Data: every ``role=restore`` photo of a manifest, with its person's adapter.

``pfstorer restore-batch --manifest URL --out URL [--index URL] [--base PRESET]``

1. The manifest (``pipelines.manifest``; a Parquet file or dataset at any fsspec URL) is read on
   the driver and its ``role=restore`` rows kept - a manifest is a list of URIs, small next to
   the photos. Rows are sorted by (tenant, identity, uri), so consecutive rows share a person.
2. ``ray.data.from_arrow(...).map_batches(BatchRestorer, concurrency=workers)``: each actor loads
   the base model once, resolves each row's person through the adapter index (the same index
   serving reads; MLflow is not touched), reads the adapter into memory with its sha256 verified
   (``AdapterRegistry.read``), keeps the last few adapters in RAM, copies the current one into a
   device slot in place, restores the photo (tiled for any size) and writes a PNG to
   ``{out}/images/{tenant}/{identity}/{stem}-{hash of uri}.png``.
3. One result row per photo - ``tenant, identity, uri, output_uri, adapter`` (the label
   ``tenant/identity@version``), ``status`` (``ok`` / ``error``), ``error`` (the reason), plus
   ``row`` (position in the manifest), ``seed`` and ``elapsed_s`` - is written to
   ``{out}/results.parquet``. A bad row (unreadable photo, no adapter, adapter for another base)
   gets ``status=error`` with the reason; it never stops the batch.

Outputs equal ``pfstorer restore --adapter ... --seed S`` of the same photo bit for bit (same
steps, scale, tile, colour fix, device and torch thread count: each actor uses
``max(1, floor(cpus_per_worker))`` threads). A ``seed`` column in the manifest sets per-photo
seeds; otherwise every photo uses ``--seed``.

Adapters come through :meth:`registry.AdapterRegistry.load_adapter` (index entry ->
sha256-verified :class:`~pfstorer.adapter.Adapter`), the same path ``serving`` uses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pfstorer.errors import AdapterError, InputError, PFStorerError, TooLargeError

log = logging.getLogger(__name__)

__all__ = [
    "RESULTS_SCHEMA",
    "BatchConfig",
    "BatchReport",
    "BatchRestorer",
    "output_uri_for",
    "restore_manifest",
]

RESULTS_FILE = "results.parquet"

RESULTS_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64()),
        pa.field("tenant", pa.string()),
        pa.field("identity", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("output_uri", pa.string()),
        pa.field("adapter", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("elapsed_s", pa.float64()),
    ]
)


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
    store_url: str | None = None
    base: str = "tiny"
    weights: str | None = None
    device: str = "auto"
    steps: int | None = None  # None: the base preset's sampling defaults
    seed: int = 0
    scale: float = 1.0
    tile: int | None = None
    overlap: int | None = None
    sampler: str | None = None
    t_start: int | None = None
    color_fix: str = "wavelet"
    threads: int = 1
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    min_image_side: int = 16
    host_cache_adapters: int = 8
    storage_options: dict[str, Any] | None = None


class BatchRestorer:
    """``map_batches`` callable: one base model per actor, adapters resolved through the index."""

    def __init__(self, config: BatchConfig) -> None:
        import torch

        from pfstorer.images import ImageLimits
        from pfstorer.model import load_base
        from pfstorer.personalization import AdapterSlots
        from registry import AdapterIndex, ArtifactStore, AdapterRegistry

        torch.set_num_threads(max(1, int(config.threads)))
        self.config = config
        self.model = load_base(config.base, weights=config.weights, device=config.device)
        self.slots = AdapterSlots.for_model(self.model, 1)
        self.current: str | None = None  # sha256 of the adapter in slot 0
        opts = config.storage_options
        # read-only: the index (re-read when it changes, checked at most every 30 s) and the
        # store reached through each entry's URI; no MLflow
        self.registry = AdapterRegistry(
            ArtifactStore(config.store_url or config.out_url, opts),
            AdapterIndex(config.index_url, opts, max_age_s=30.0),
            None,
        )
        self.cache: OrderedDict[str, Any] = OrderedDict()
        self.limits = ImageLimits(
            max_bytes=config.max_image_bytes,
            max_pixels=config.max_image_pixels,
            min_side=config.min_image_side,
        )

    # -- one row ----------------------------------------------------------------------------
    def _adapter(self, tenant: str, identity: str) -> tuple[Any, Any]:
        from registry import check_key

        check_key(tenant, "tenant")
        check_key(identity)
        entry = self.registry.resolve(tenant, identity)
        if entry is None:
            raise AdapterError(f"no adapter for {tenant}/{identity} in the index")
        adapter = self.cache.get(entry.sha256)
        if adapter is None:
            adapter = self.registry.load_adapter(entry, self.model)
            self.cache[entry.sha256] = adapter
            while len(self.cache) > max(1, self.config.host_cache_adapters):
                self.cache.popitem(last=False)
        self.cache.move_to_end(entry.sha256)
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
            scale=c.scale, steps=c.steps, sampler=c.sampler, t_start=c.t_start, tile=c.tile, overlap=c.overlap,
            color_fix=c.color_fix,
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
                seed = self.config.seed if seed is None else int(seed)
            except (TypeError, ValueError):
                seed = self.config.seed
            result: dict[str, Any] = {
                "row": r.get("row"),
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
            out.append(result)
        return pa.Table.from_pylist(out, schema=RESULTS_SCHEMA)


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BatchReport:
    """What a batch restore did."""

    results_uri: str
    rows: int
    ok: int
    errors: int
    elapsed_s: float
    table: pa.Table = dataclasses.field(repr=False, compare=False)

    def summary(self) -> dict[str, Any]:
        return {
            "results": self.results_uri,
            "rows": self.rows,
            "ok": self.ok,
            "errors": self.errors,
            "elapsed_s": round(self.elapsed_s, 2),
        }


def _restore_rows(table: pa.Table) -> pa.Table:
    """``role=restore`` rows with their manifest position, sorted so a person's rows are together."""
    table = table.append_column("row", pa.array(range(table.num_rows), pa.int64()))
    keep = ["row", "tenant", "identity", "uri"] + (["seed"] if "seed" in table.column_names else [])
    mask = pc.fill_null(pc.equal(table.column("role"), "restore"), False)
    rows = table.filter(mask).select(keep)
    if "seed" in rows.column_names:
        try:
            rows = rows.set_column(keep.index("seed"), "seed", pc.cast(rows.column("seed"), pa.int64()))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            rows = rows.drop(["seed"])  # not integers: --seed for every row
    return rows.sort_by([("tenant", "ascending"), ("identity", "ascending"), ("uri", "ascending")])


def write_results(table: pa.Table, url: str, storage_options: Mapping[str, Any] | None) -> None:
    from registry import is_local_url, url_to_fs

    fs, path = url_to_fs(url, storage_options)
    if is_local_url(url):
        fs.makedirs(str(PurePosixPath(path).parent), exist_ok=True)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs.pipe_file(path, buf.getvalue())


def restore_manifest(
    manifest_url: str,
    out_url: str,
    *,
    index_url: str,
    store_url: str | None = None,
    base: str = "tiny",
    weights: str | None = None,
    device: str = "auto",
    steps: int | None = None,
    seed: int = 0,
    scale: float = 1.0,
    tile: int | None = None,
    overlap: int | None = None,
    sampler: str | None = None,
    t_start: int | None = None,
    color_fix: str = "wavelet",
    storage_options: Mapping[str, Any] | None = None,
    workers: int = 1,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    batch_size: int = 4,
    max_image_bytes: int = 20 * 1024 * 1024,
    max_image_pixels: int = 4096 * 4096,
    min_image_side: int = 16,
) -> BatchReport:
    """Restore every ``role=restore`` row of a manifest on Ray Data (Ray must be initialised).

    Writes the PNGs under ``{out_url}/images/`` and ``{out_url}/results.parquet``; returns a
    :class:`BatchReport` with the results table.
    """
    import ray

    from pipelines.manifest import read_manifest

    t0 = time.perf_counter()
    out_url = os.fspath(out_url).rstrip("/")
    opts = dict(storage_options) if storage_options else None
    rows = _restore_rows(read_manifest(manifest_url, opts))
    results_uri = f"{out_url}/{RESULTS_FILE}"
    if rows.num_rows == 0:
        table = RESULTS_SCHEMA.empty_table()
    else:
        config = BatchConfig(
            index_url=index_url, out_url=out_url, store_url=store_url, base=base, weights=weights, device=device,
            steps=steps, seed=seed, scale=scale, tile=tile, overlap=overlap, sampler=sampler, t_start=t_start,
            color_fix=color_fix, threads=max(1, int(cpus_per_worker)),
            max_image_bytes=max_image_bytes, max_image_pixels=max_image_pixels,
            min_image_side=min_image_side, storage_options=opts,
        )
        workers = max(1, int(workers))
        # contiguous blocks (a person's rows stay together), a few per actor for balance
        blocks = max(1, min(rows.num_rows, workers * 4))
        ds = ray.data.from_arrow(rows)
        if blocks > 1:
            ds = ds.repartition(blocks)
        ds = ds.map_batches(
            BatchRestorer,
            fn_constructor_kwargs={"config": config},
            batch_size=max(1, int(batch_size)),
            batch_format="pyarrow",
            concurrency=workers,
            num_cpus=cpus_per_worker,
            num_gpus=gpus_per_worker or None,
        )
        parts = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
        table = pa.concat_tables([p.cast(RESULTS_SCHEMA) for p in parts]) if parts else RESULTS_SCHEMA.empty_table()
        table = table.sort_by([("row", "ascending")])
    write_results(table, results_uri, opts)
    status = table.column("status").to_pylist()
    return BatchReport(
        results_uri=results_uri,
        rows=table.num_rows,
        ok=status.count("ok"),
        errors=status.count("error"),
        elapsed_s=time.perf_counter() - t0,
        table=table,
    )

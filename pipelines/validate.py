"""Validation of a manifest before any training: bad rows go to quarantine, never raise.

Checks, in stages (the ``stage`` column of a quarantine row names the one that failed):

``schema``  required fields present and non-empty, ``role`` is ``ref``/``restore``, tenant and
            identity are safe keys (see :func:`registry.is_safe_key`).
``read``    the ``uri`` exists and can be read.
``image``   an image of an accepted format, not over the byte or pixel limits (checked from the
            header, before decoding), sides at least ``min_side``. References are also decoded
            whole (truncated files) and hashed; restore photos are judged from their header
            only, since restoring decodes them anyway (a truncated one fails there, as its row).
``dedup``   within one person, a photo listed twice (same uri), or a reference whose bytes
            (sha256) equal an earlier one's; "earlier" means references before restore photos,
            then by uri.
``refs``    a person keeps at most ``max_refs`` references (the first by uri); a person with
            fewer than ``min_refs`` good references is quarantined as a whole (all its rows).

Rows are judged independently of their order in the manifest. Two executors run the same
checks: :func:`validate_on_ray` (Ray Data: photos are probed on the cluster's workers, the
driver sees only the probe columns, and a probe cache makes reruns cost a listing) and
:func:`validate_manifest` (an in-memory table, in this process). The image checks are
:func:`pfstorer.image_checks.decode_photo`'s, the same as the HTTP API's.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import ValidationError

from pfstorer.image_checks import ImageLimits
from pipelines.manifest import REQUIRED_COLUMNS, ManifestRow, _as_string_columns
from pipelines.probe import CACHE_SCHEMA, Probe, ProbeCache, ProbeSpec, probe_many
from registry import job_key as _job_key

__all__ = [
    "DEFAULT_LIMITS",
    "STAGES",
    "IdentityJob",
    "ImageLimits",
    "ValidationResult",
    "cache_rows",
    "judge",
    "limits_from_settings",
    "probe_table",
    "validate_from_settings",
    "validate_manifest",
    "validate_on_ray",
    "write_quarantine",
]

#: Limits for reference photos of faces: up to 20 MiB and 4096x4096 pixels (as serving), sides
#: of at least 64 px, JPEG/PNG/WEBP.
DEFAULT_LIMITS = ImageLimits(
    max_bytes=20 * 1024 * 1024,
    max_pixels=4096 * 4096,
    min_side=64,
    formats=frozenset({"JPEG", "PNG", "WEBP"}),
)


def limits_from_settings(limits: Any) -> ImageLimits:
    """:class:`ImageLimits` for references from ``pfstorer.settings.LimitsSettings``."""
    return ImageLimits(
        max_bytes=limits.max_image_bytes,
        max_pixels=limits.max_image_pixels,
        min_side=limits.min_image_side,
        formats=DEFAULT_LIMITS.formats,
    )


STAGES = ("schema", "read", "image", "dedup", "refs")


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class IdentityJob:
    """One person ready for personalization."""

    tenant: str
    identity: str
    refs: list[dict[str, Any]]  # good reference rows (manifest columns + sha256, width, height)
    ref_sha256s: list[str]  # their content hashes, same order (sorted by uri)
    restores: list[dict[str, Any]]  # good restore rows

    @property
    def key(self) -> str:
        return f"{self.tenant}/{self.identity}"

    @property
    def ref_uris(self) -> list[str]:
        return [r["uri"] for r in self.refs]

    def job_key(self, base_fingerprint: str, config: Mapping[str, Any]) -> str:
        """:func:`registry.job_key` of this person's references."""
        return _job_key(self.ref_sha256s, base_fingerprint, config)


@dataclasses.dataclass
class ValidationResult:
    """``good``: good rows (original columns + ``sha256``, ``width``, ``height``), in manifest
    order. ``quarantine``: bad rows (original columns + ``reason`` + ``stage``), in manifest
    order. ``jobs``: (tenant, identity) -> :class:`IdentityJob`, sorted."""

    good: pa.Table
    quarantine: pa.Table
    jobs: dict[tuple[str, str], IdentityJob]
    manifest: pa.Table | None = None  # the manifest as read (rows in order, probe columns dropped)
    probes: dict[str, int] = dataclasses.field(default_factory=dict)  # rows, photos_read, photos_cached

    def reason_counts(self) -> dict[str, int]:
        """Quarantined rows per kind of reason (``stage: reason`` with uris and numbers
        stripped), most frequent first."""
        counts: dict[str, int] = defaultdict(int)
        for stage, reason in zip(
            self.quarantine.column("stage").to_pylist(),
            self.quarantine.column("reason").to_pylist(),
            strict=True,
        ):
            counts[f"{stage}: {_reason_kind(reason)}"] += 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def summary(self) -> dict[str, Any]:
        roles = self.good.column("role").to_pylist() if self.good.num_rows else []
        return {
            "good_rows": self.good.num_rows,
            "good_refs": roles.count("ref"),
            "good_restore": roles.count("restore"),
            "people_ready": len(self.jobs),
            "quarantined_rows": self.quarantine.num_rows,
            "quarantined_by_reason": self.reason_counts(),
            **{k: v for k, v in self.probes.items() if k != "rows"},
        }


def _reason_kind(reason: str) -> str:
    if reason.startswith("person has "):
        return "person has N good references, needs >= N"
    kind = reason.split(":", 1)[0]
    return re.sub(r"\d+", "N", kind)


# ---------------------------------------------------------------------------------------------
# the checks
# ---------------------------------------------------------------------------------------------


def _schema_reason(row: Mapping[str, Any]) -> str | None:
    """The quarantine reason of a row that fails the pydantic model, or None."""
    try:
        ManifestRow.model_validate({k: row.get(k) for k in REQUIRED_COLUMNS})
    except ValidationError as exc:
        reasons = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            value = row.get(field)
            if value is None or value == "":
                reasons.append(f"missing field: {field}")
            elif field == "role":
                reasons.append(f"bad role: {value!r} (must be 'ref' or 'restore')")
            elif field in ("tenant", "identity"):
                reasons.append(f"unsafe {field}: {value!r} is not a safe key")
            else:
                reasons.append(f"bad {field}: {err['msg']}")
        return "; ".join(reasons)
    return None


_PROBE_COLUMNS = ("_probe_sha256", "_probe_width", "_probe_height", "_probe_stage",
                  "_probe_reason", "_probe_size", "_probe_version", "_probe_cached")


def probe_table(table: pa.Table, spec: ProbeSpec, cache: ProbeCache | None = None) -> pa.Table:
    """``table`` (manifest rows) with the per-row checks appended as ``_probe_*`` columns.

    The ``schema`` stage and each distinct photo's ``read``/``image`` stage
    (:func:`pipelines.probe.probe_many`); rows of other rows' outcome (per person) come later,
    in :func:`judge`. This is the part that touches photos: it runs on Ray Data's workers.
    """
    table = _as_string_columns(table, "table")
    rows = table.select(list(REQUIRED_COLUMNS)).to_pylist()
    schema = [_schema_reason(r) for r in rows]
    wanted = [(r["uri"], r["role"]) for r, bad in zip(rows, schema, strict=True) if bad is None]
    probes = probe_many(wanted, spec, cache)
    out: list[Probe] = []
    for r, bad in zip(rows, schema, strict=True):
        out.append(Probe(stage="schema", reason=bad) if bad is not None else probes[(r["uri"], r["role"])])
    types = (pa.string(), pa.int32(), pa.int32(), pa.string(), pa.string(), pa.int64(), pa.string(), pa.bool_())
    fields = ("sha256", "width", "height", "stage", "reason", "size", "version", "cached")
    for name, field, kind in zip(_PROBE_COLUMNS, fields, types, strict=True):
        table = table.append_column(name, pa.array([getattr(p, field) for p in out], kind))
    return table


def cache_rows(probed: pa.Table, spec: ProbeSpec) -> pa.Table:
    """The probes of ``probed`` worth remembering (:data:`pipelines.probe.CACHE_SCHEMA`): photos
    that were read and have a version; a read error is not remembered (the file may come back)."""
    stage = probed.column("_probe_stage")
    keep = pc.and_(
        pc.is_valid(probed.column("_probe_version")),
        pc.fill_null(pc.not_equal(stage, "read"), True),
    )
    keep = pc.and_(keep, pc.fill_null(pc.not_equal(stage, "schema"), True))
    sel = probed.filter(keep)
    tags = [spec.tag(role) for role in sel.column("role").to_pylist()]
    return pa.table(
        {
            "uri": sel.column("uri"),
            "limits": pa.array(tags, pa.string()),
            "size": sel.column("_probe_size"),
            "version": sel.column("_probe_version"),
            "sha256": sel.column("_probe_sha256"),
            "width": sel.column("_probe_width"),
            "height": sel.column("_probe_height"),
            "stage": sel.column("_probe_stage"),
            "reason": sel.column("_probe_reason"),
        }
    ).cast(CACHE_SCHEMA)


def judge(probed: pa.Table, *, min_refs: int = 3, max_refs: int = 20) -> ValidationResult:
    """The per-person stages (``dedup``, ``refs``) over :func:`probe_table`'s output; the result.

    Runs where all of a manifest's probe results meet (the driver): it reads only the small
    columns, never a photo.
    """
    n = probed.num_rows
    cols = {c: probed.column(c).to_pylist() for c in ("tenant", "identity", "role", "uri", *_PROBE_COLUMNS[:5])}
    sha, width, height = cols["_probe_sha256"], cols["_probe_width"], cols["_probe_height"]
    bad: dict[int, tuple[str, str]] = {
        i: (stage, reason)
        for i, (stage, reason) in enumerate(zip(cols["_probe_stage"], cols["_probe_reason"], strict=True))
        if reason is not None
    }
    tenant, identity, role, uri = cols["tenant"], cols["identity"], cols["role"], cols["uri"]

    people: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i in range(n):
        if i not in bad:
            people[(tenant[i], identity[i])].append(i)
    ready: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    for person, idxs in people.items():
        idxs.sort(key=lambda i: (role[i] != "ref", uri[i], i))
        seen_bytes: dict[str, int] = {}
        seen_uri: dict[str, int] = {}
        refs: list[int] = []
        restores: list[int] = []
        for i in idxs:
            if uri[i] in seen_uri:
                bad[i] = ("dedup", f"duplicate: same photo as {uri[seen_uri[uri[i]]]}")
                continue
            if sha[i] is not None and sha[i] in seen_bytes:
                bad[i] = ("dedup", f"duplicate: same bytes as {uri[seen_bytes[sha[i]]]}")
                continue
            seen_uri[uri[i]] = i
            if sha[i] is not None:
                seen_bytes[sha[i]] = i
            (refs if role[i] == "ref" else restores).append(i)
        for i in refs[max_refs:]:
            bad[i] = ("refs", f"too many references: keeping the first {max_refs} by uri")
        refs = refs[:max_refs]
        if len(refs) < min_refs:
            for i in refs + restores:
                bad[i] = ("refs", f"person has {len(refs)} good references, needs >= {min_refs}")
            continue
        ready[person] = (refs, restores)

    manifest = probed.drop_columns(list(_PROBE_COLUMNS))
    good_idx = pa.array([i for i in range(n) if i not in bad], pa.int64())
    bad_idx = [i for i in range(n) if i in bad]
    good = manifest.take(good_idx)
    for name, col in (("sha256", "_probe_sha256"), ("width", "_probe_width"), ("height", "_probe_height")):
        good = good.append_column(name, probed.column(col).take(good_idx))
    quarantine = manifest.take(pa.array(bad_idx, pa.int64()))
    quarantine = quarantine.append_column(
        "reason", pa.array([bad[i][1] for i in bad_idx], pa.string())
    ).append_column("stage", pa.array([bad[i][0] for i in bad_idx], pa.string()))

    wanted = sorted({i for refs, restores in ready.values() for i in refs + restores})
    full = dict(zip(wanted, manifest.take(pa.array(wanted, pa.int64())).to_pylist(), strict=True))

    def row_out(i: int) -> dict[str, Any]:
        return {**full[i], "sha256": sha[i], "width": width[i], "height": height[i]}

    jobs = {
        person: IdentityJob(
            tenant=person[0],
            identity=person[1],
            refs=[row_out(i) for i in refs],
            ref_sha256s=[sha[i] or "" for i in refs],
            restores=[row_out(i) for i in restores],
        )
        for person, (refs, restores) in sorted(ready.items())
    }
    cached = probed.column("_probe_cached").to_pylist()
    stats = {"rows": n, "photos_read": cached.count(False), "photos_cached": cached.count(True)}
    return ValidationResult(good=good, quarantine=quarantine, jobs=jobs, manifest=manifest, probes=stats)


def validate_manifest(
    table: pa.Table,
    *,
    limits: ImageLimits | None = None,
    min_refs: int = 3,
    max_refs: int = 20,
    storage_options: Mapping[str, Any] | None = None,
    restore_limits: ImageLimits | None = None,
    max_workers: int = 4,
    cache: ProbeCache | None = None,
) -> ValidationResult:
    """Validate a manifest table in this process; see the module docstring for the checks.

    ``limits`` (an ``ImageLimits``; default :data:`DEFAULT_LIMITS`) apply to references,
    ``restore_limits`` (default: the same) to restore photos. ``storage_options`` are used for
    remote photo URIs. Only a table without the required columns raises (:class:`ManifestError`).
    For manifests at scale use :func:`validate_on_ray`, which runs the same checks on Ray Data.
    """
    spec = _spec(limits, restore_limits, storage_options, max_workers)
    return judge(probe_table(table, spec, cache), min_refs=min_refs, max_refs=max_refs)


def _spec(
    limits: ImageLimits | None,
    restore_limits: ImageLimits | None,
    storage_options: Mapping[str, Any] | None,
    threads: int,
) -> ProbeSpec:
    limits = limits or DEFAULT_LIMITS
    return ProbeSpec(limits, restore_limits or limits, dict(storage_options) if storage_options else None, threads)


_CACHES: dict[str, ProbeCache] = {}
"""Per worker process: the probe cache of each recent validation (by object id), fetched once."""


def _probe_batch(batch: pa.Table, spec: ProbeSpec, cache_ref: list[Any]) -> pa.Table:
    """Ray Data task: :func:`probe_table` on one batch.

    A task, not an actor: tasks run in Ray's pooled worker processes, which stay warm between
    validations (a fresh actor costs a process start and imports on every run). The probe cache
    is fetched from the object store once per process and validation.
    """
    import ray

    key = cache_ref[0].hex()
    cache = _CACHES.get(key)
    if cache is None:
        while len(_CACHES) >= 2:  # keep the last validations' caches only
            _CACHES.pop(next(iter(_CACHES)))
        cache = _CACHES[key] = ProbeCache(ray.get(cache_ref[0]))
    return probe_table(batch, spec, cache)


def validate_on_ray(
    url: str,
    *,
    limits: ImageLimits | None = None,
    min_refs: int = 3,
    max_refs: int = 20,
    storage_options: Mapping[str, Any] | None = None,
    restore_limits: ImageLimits | None = None,
    cache_url: str | None = None,
    concurrency: int | None = None,
    batch_size: int = 256,
    threads: int = 8,
) -> ValidationResult:
    """Validate the manifest at ``url`` on Ray Data (Ray must be initialised).

    ``read_parquet`` with the manifest's filesystem -> ``map_batches`` of probing tasks
    (``concurrency``: at most this many at once, default one per cluster CPU; each reads
    ``threads`` photos at a time) -> the probe columns meet on the driver for :func:`judge`.
    The driver never holds a photo. ``cache_url``: the :class:`~pipelines.probe.ProbeCache`
    read before and written after (None: no cache).
    """
    import ray

    from pipelines.manifest import check_manifest_schema, ray_read_manifest

    spec = _spec(limits, restore_limits, storage_options, threads)
    check_manifest_schema(url, spec.storage_options)
    cache = ProbeCache.read(cache_url, spec.storage_options)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order, old_order = True, ctx.execution_options.preserve_order
    old_progress, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        top = max(1, min(concurrency or cpus, cpus or 1))
        ds = ray_read_manifest(url, spec.storage_options).map_batches(
            _probe_batch,
            fn_kwargs={"spec": spec, "cache_ref": [ray.put(cache.table)]},
            batch_size=batch_size,
            batch_format="pyarrow",
            concurrency=top,
            num_cpus=1,
        )
        parts = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    finally:
        ctx.execution_options.preserve_order = old_order
        ctx.enable_progress_bars = old_progress
    if not parts:
        from pipelines.manifest import read_manifest

        return validate_manifest(read_manifest(url, spec.storage_options), limits=spec.limits,
                                 restore_limits=spec.restore_limits, min_refs=min_refs, max_refs=max_refs)
    probed = pa.concat_tables(parts, promote_options="default")
    result = judge(probed, min_refs=min_refs, max_refs=max_refs)
    if cache_url:
        cache.merged(cache_rows(probed, spec)).write(cache_url, spec.storage_options)
    return result


def validate_from_settings(
    url: str,
    settings: Any,
    *,
    min_refs: int | None = None,
    max_refs: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> ValidationResult:
    """:func:`validate_on_ray` with limits, reference counts, storage options and the probe
    cache of ``settings`` (a :class:`pfstorer.settings.Settings`); what ``pfstorer run`` and
    ``pfstorer manifest validate`` do."""
    cache = settings.probe_cache_url
    opts = storage_options if storage_options is not None else dict(settings.storage_options) or None
    return validate_on_ray(
        url,
        limits=limits_from_settings(settings.limits),
        min_refs=min_refs or settings.personalize.min_refs,
        max_refs=max_refs or settings.personalize.max_refs,
        storage_options=opts,
        cache_url=None if cache == "off" else cache,
    )


def write_quarantine(
    result: ValidationResult,
    url: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write the quarantine table as one Parquet file (also when empty); return the URL."""
    from pipelines.manifest import write_manifest

    return write_manifest(result.quarantine, url, storage_options)

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

Rows are judged independently of their order in the manifest. Both executors run the same
:func:`probe_table` and :func:`judge` on the manifest's columns: :func:`validate_on_ray` reads
the manifest once and probes photos in Ray tasks on the cluster's workers (the driver sees only
the probe columns), :func:`validate_manifest` probes in this process. With a probe cache, the
photos' folders are listed in bulk and only new or changed photos are probed, so a rerun costs
in proportion to what changed (:mod:`pipelines.probe`). The image checks are
:func:`pfstorer.image_checks.decode_photo`'s, the same as the HTTP API's.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import ValidationError

from pfstorer.image_checks import ImageLimits
from pfstorer.settings import LimitsSettings
from pipelines.manifest import REQUIRED_COLUMNS, ManifestRow, _as_string_columns
from pipelines.probe import CACHE_SCHEMA, PROBE_SCHEMA, ProbeCache, ProbeSpec, known_probes, probe_photos
from registry import job_key as _job_key

__all__ = [
    "STAGES",
    "IdentityJob",
    "ImageLimits",
    "ValidationResult",
    "cache_rows",
    "judge",
    "probe_table",
    "validate_from_settings",
    "validate_manifest",
    "validate_on_ray",
    "write_quarantine",
]

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
        roles = pc.value_counts(self.good.column("role"))
        count = dict(zip(roles.field("values").to_pylist(), roles.field("counts").to_pylist(), strict=True))
        return {
            "good_rows": self.good.num_rows,
            "good_refs": count.get("ref", 0),
            "good_restore": count.get("restore", 0),
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

#: Probes the photos a listing did not vouch for: ``(photos, spec, cache)`` -> PROBE_SCHEMA rows.
Prober = Callable[[pa.Table, ProbeSpec, ProbeCache | None], pa.Table]


def _schema_reasons(table: pa.Table) -> pa.ChunkedArray:
    """Each row's ``schema`` reason (null: none), judged by :func:`_schema_reason` once per
    distinct (tenant, identity, role, uri given) rather than once per row."""
    parts = {c: pc.fill_null(table.column(c), "") for c in ("tenant", "identity", "role")}
    parts["uri"] = pc.if_else(pc.fill_null(pc.not_equal(table.column("uri"), ""), False), "u", "")
    keys = pa.table({**parts, "_row": _row_numbers(table.num_rows)})
    distinct = keys.select(list(parts)).group_by(list(parts)).aggregate([])
    reasons = pa.array([_schema_reason(r) for r in distinct.to_pylist()], pa.string())
    joined = keys.join(distinct.append_column("_reason", reasons), list(parts), join_type="left outer")
    return joined.sort_by("_row").column("_reason")


def _photo_key(table: pa.Table) -> pa.ChunkedArray:
    """One string per ``(uri, role)``: a photo is probed once per role (the limits differ)."""
    return _joined(table.column("uri"), table.column("role"))


def probe_table(
    table: pa.Table, spec: ProbeSpec, cache: ProbeCache | None = None, prober: Prober = probe_photos
) -> pa.Table:
    """``table`` (manifest rows) with the per-row checks appended as ``_probe_*`` columns.

    The ``schema`` stage, then each distinct photo's ``read``/``image`` stage: photos whose listed
    size and version match the cache are taken from it untouched
    (:func:`pipelines.probe.known_probes`), only the others go to ``prober`` (in this process by
    default; on Ray's workers in :func:`validate_on_ray`). The per-person stages come later, in
    :func:`judge`. Columnar throughout: the cost of a rerun grows with what changed.
    """
    table = _as_string_columns(table, "table")
    schema = _schema_reasons(table)
    ok = pc.is_null(schema)
    photos = table.filter(ok).select(["uri", "role"]).group_by(["uri", "role"]).aggregate([])
    known, unknown = known_probes(photos, spec, cache)
    fresh = prober(unknown, spec, cache) if unknown.num_rows else PROBE_SCHEMA.empty_table()
    found = pa.concat_tables([known, fresh.cast(PROBE_SCHEMA)])
    at = pc.index_in(_photo_key(table), value_set=_photo_key(found))
    rows = found.take(pc.if_else(ok, at, pa.scalar(None, pa.int32())))
    for name in _PROBE_COLUMNS:
        col = rows.column(name.removeprefix("_probe_"))
        if name == "_probe_stage":
            col = pc.if_else(ok, col, "schema")
        elif name == "_probe_reason":
            col = pc.if_else(ok, col, schema)
        table = table.append_column(name, col)
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
    return pa.table(
        {
            "uri": sel.column("uri"),
            "limits": spec.tags(sel.column("role")),
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
    columns, never a photo, and judges them as Arrow columns (sorts, hash lookups, counts); only
    the ready people's rows become Python objects, as their :class:`IdentityJob`. A photo is
    probed once per ``(uri, role)``, so rows that share both share their probe.
    """
    n = probed.num_rows
    flagged, ready = _person_stages(probed, min_refs, max_refs)
    at = pc.index_in(_row_numbers(n), value_set=flagged.column("_row"))
    probe_failed = pc.is_valid(probed.column("_probe_reason"))
    reason = pc.if_else(probe_failed, probed.column("_probe_reason"), flagged.column("reason").take(at))
    stage = pc.if_else(probe_failed, probed.column("_probe_stage"), flagged.column("stage").take(at))
    ok = pc.is_null(reason)

    manifest = probed.drop_columns(list(_PROBE_COLUMNS))
    results = probed.select(["_probe_sha256", "_probe_width", "_probe_height"])
    good = _with_results(manifest.filter(ok), results.filter(ok))
    bad = pc.invert(ok)
    quarantine = manifest.filter(bad)
    quarantine = quarantine.append_column("reason", reason.filter(bad)).append_column("stage", stage.filter(bad))

    jobs: dict[tuple[str, str], IdentityJob] = {}
    records = _with_results(manifest.take(ready.column("_row")), results.take(ready.column("_row")))
    for record, restore in zip(records.to_pylist(), ready.column("_restore").to_pylist(), strict=True):
        person = (record["tenant"], record["identity"])
        job = jobs.get(person)
        if job is None:
            job = jobs[person] = IdentityJob(*person, refs=[], ref_sha256s=[], restores=[])
        if restore:
            job.restores.append(record)
        else:
            job.refs.append(record)
            job.ref_sha256s.append(record["sha256"] or "")

    cached = probed.column("_probe_cached")
    stats = {
        "rows": n,
        "photos_read": pc.sum(pc.equal(cached, False)).as_py() or 0,
        "photos_cached": pc.sum(pc.equal(cached, True)).as_py() or 0,
    }
    return ValidationResult(good=good, quarantine=quarantine, jobs=jobs, manifest=manifest, probes=stats)


def _with_results(rows: pa.Table, results: pa.Table) -> pa.Table:
    """``rows`` with ``results``' ``_probe_sha256``, ``_probe_width``, ``_probe_height`` as
    ``sha256``, ``width``, ``height`` (in place of manifest columns of those names)."""
    for col in results.column_names:
        name, names = col.removeprefix("_probe_"), rows.column_names
        if name in names:
            rows = rows.set_column(names.index(name), name, results.column(col))
        else:
            rows = rows.append_column(name, results.column(col))
    return rows


def _row_numbers(n: int) -> pa.Array:
    return pa.array(np.arange(n, dtype=np.int64))


def _joined(*columns: Any) -> pa.ChunkedArray:
    """One string per row, equal where every column is (null where any is)."""
    return pc.binary_join_element_wise(*columns, "\x00")


def _person_stages(probed: pa.Table, min_refs: int, max_refs: int) -> tuple[pa.Table, pa.Table]:
    """``(flagged, ready)`` over the rows whose probe passed: ``flagged`` (``_row``, ``stage``,
    ``reason``) the rows the ``dedup`` and ``refs`` stages quarantine, ``ready`` (``_row``,
    ``_restore``) the rows of ready people, by person, references first, then by uri.

    Within a person, rows are taken references first, then by uri, then in manifest order, and a
    row is a duplicate when a row taken before it has its uri or its bytes. In columns: per role,
    the first row of each person's bytes (or, without sha256, uri) is taken, and the others name
    it; a restore photo is first checked against the references taken.
    """
    rows = pa.table(
        {
            "_row": _row_numbers(probed.num_rows),
            **{c: probed.column(c) for c in ("tenant", "identity", "uri")},
            "sha": probed.column("_probe_sha256"),
            "_restore": pc.not_equal(probed.column("role"), "ref"),
        }
    ).filter(pc.is_null(probed.column("_probe_reason")))
    rows = rows.sort_by([(c, "ascending") for c in ("tenant", "identity", "_restore", "uri", "_row")])
    taken_refs, dup_refs = _first_of_each(rows.filter(pc.invert(rows.column("_restore"))))

    restores = rows.filter(rows.column("_restore"))
    same_uri = pc.is_in(_person_key(restores, "uri"), value_set=_person_key(taken_refs, "uri"))
    at = pc.index_in(_person_key(restores, "sha"), value_set=_person_key(taken_refs, "sha"), skip_nulls=True)
    of_a_ref = pc.or_(same_uri, pc.is_valid(at))
    dup_of_ref = _flags(
        restores.column("_row"), "dedup",
        pc.if_else(same_uri, _duplicate("photo", restores.column("uri")),
                   _duplicate("bytes", taken_refs.column("uri").take(at))),
    ).filter(of_a_ref)
    taken_restores, dup_restores = _first_of_each(restores.filter(pc.invert(of_a_ref)))

    # references past max_refs (by uri) are dropped; a person left with fewer than min_refs is out
    person = _person_key(taken_refs)
    too_many = pc.greater_equal(pc.subtract(_row_numbers(len(person)), pc.index_in(person, value_set=person)), max_refs)
    counts = pc.value_counts(person)
    taken = pa.concat_tables([taken_refs.filter(pc.invert(too_many)), taken_restores])
    at = pc.index_in(_person_key(taken), value_set=counts.field("values"))
    kept = pc.min_element_wise(pc.fill_null(counts.field("counts").take(at), 0), max_refs)
    short = pc.less(kept, min_refs)
    flagged = pa.concat_tables(
        [
            dup_refs,
            dup_of_ref,
            dup_restores,
            _flags(taken_refs.column("_row"), "refs", f"too many references: keeping the first {max_refs} by uri")
            .filter(too_many),
            _flags(taken.column("_row"), "refs", pc.binary_join_element_wise(
                "person has ", pc.cast(kept, pa.string()), f" good references, needs >= {min_refs}", ""
            )).filter(short),
        ]
    )
    ready = taken.filter(pc.invert(short)).select(["tenant", "identity", "_restore", "uri", "_row"])
    ready = ready.sort_by([(c, "ascending") for c in ready.column_names]).select(["_row", "_restore"])
    return flagged, ready


def _person_key(rows: pa.Table, *columns: str) -> pa.ChunkedArray:
    """One string per row of ``rows``: its person and ``columns`` (null where any is)."""
    return _joined(*(rows.column(c) for c in ("tenant", "identity", *columns)))


def _flags(rows: pa.Array | pa.ChunkedArray, stage: str, reason: str | pa.Array | pa.ChunkedArray) -> pa.Table:
    """Quarantine verdicts (``_row``, ``stage``, ``reason``) for the manifest rows ``rows``."""
    if isinstance(reason, str):
        reason = pa.repeat(reason, len(rows))
    return pa.table({"_row": rows, "stage": pa.repeat(stage, len(rows)), "reason": reason})


def _first_of_each(rows: pa.Table) -> tuple[pa.Table, pa.Table]:
    """``(taken, duplicates)`` of ``rows`` (sorted; one role): the first row of each person's
    bytes (uri where there is no sha256) is taken; each other one is a ``dedup`` row naming it."""
    what = pc.coalesce(pc.binary_join_element_wise("b", rows.column("sha"), ":"),
                       pc.binary_join_element_wise("u", rows.column("uri"), ":"))
    key = _joined(rows.column("tenant"), rows.column("identity"), what)
    first = pc.index_in(key, value_set=key)
    taken = pc.equal(first, pc.cast(_row_numbers(rows.num_rows), pa.int32()))
    first_uri = rows.column("uri").take(first)
    same_photo = pc.equal(rows.column("uri"), first_uri)
    reason = pc.if_else(same_photo, _duplicate("photo", rows.column("uri")), _duplicate("bytes", first_uri))
    return rows.filter(taken), _flags(rows.column("_row"), "dedup", reason).filter(pc.invert(taken))


def _duplicate(what: str, uris: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    return pc.binary_join_element_wise(f"duplicate: same {what} as ", uris, "")


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

    ``limits`` (an ``ImageLimits``; default: settings' ``limits.references()``) apply to references,
    ``restore_limits`` (default: the same) to restore photos. ``storage_options`` are used for
    remote photo URIs. Only a table without the required columns raises (:class:`ManifestError`).
    ``cache``: earlier probes (only photos it cannot vouch for are probed). For manifests at
    scale use :func:`validate_on_ray`, which probes on Ray's workers.
    """
    spec = _spec(limits, restore_limits, storage_options, max_workers)
    return judge(probe_table(table, spec, cache), min_refs=min_refs, max_refs=max_refs)


def _spec(
    limits: ImageLimits | None,
    restore_limits: ImageLimits | None,
    storage_options: Mapping[str, Any] | None,
    threads: int,
) -> ProbeSpec:
    limits = limits or LimitsSettings().references()
    return ProbeSpec(limits, restore_limits or limits, dict(storage_options) if storage_options else None, threads)


def _probe_chunk(photos: pa.Table, spec: ProbeSpec, cache: pa.Table) -> pa.Table:
    """Ray task: :func:`pipelines.probe.probe_photos` on a chunk of photos and their cache rows.

    Plain tasks, not a Ray Data pipeline: they run in Ray's pooled worker processes, so a rerun
    that has a handful of photos to probe pays milliseconds of scheduling, not a pipeline's start.
    """
    return probe_photos(photos, spec, ProbeCache(cache))


def _ray_prober(concurrency: int | None, batch_size: int) -> Prober:
    """A :data:`Prober` that spreads the photos over Ray tasks of ``batch_size`` photos (at most
    ``concurrency`` running, default one per cluster CPU), each sent only its photos' cache rows."""

    def prober(photos: pa.Table, spec: ProbeSpec, cache: ProbeCache | None) -> pa.Table:
        import ray

        known = CACHE_SCHEMA.empty_table() if cache is None else cache.table
        known = known.filter(pc.is_in(known.column("uri"), value_set=photos.column("uri")))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        task = ray.remote(num_cpus=1)(_probe_chunk)
        limit, pending, parts = max(1, min(concurrency or cpus, cpus or 1)), [], []
        for start in range(0, photos.num_rows, batch_size):
            chunk = photos.slice(start, batch_size)
            if len(pending) >= 2 * limit:  # keep every CPU busy, the queue short
                ready, pending = ray.wait(pending, num_returns=1)
                parts += ray.get(ready)
            mine = known.filter(pc.is_in(known.column("uri"), value_set=chunk.column("uri")))
            pending.append(task.remote(chunk, spec, mine))
        parts += ray.get(pending)
        return pa.concat_tables([p.cast(PROBE_SCHEMA) for p in parts])

    return prober


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
    """Validate the manifest at ``url``, probing photos on Ray's workers (Ray must be initialised).

    The manifest is read once, as columns, on the driver; :func:`probe_table` lists the photos'
    folders and joins them with the :class:`~pipelines.probe.ProbeCache` at ``cache_url`` (None:
    no cache), and only new or changed photos go to Ray tasks of ``batch_size`` photos
    (``concurrency`` at once, default one per cluster CPU; each reads ``threads`` photos at a
    time). The driver never holds a photo. The cache is written back when a photo was read.
    """
    from pipelines.manifest import read_manifest

    spec = _spec(limits, restore_limits, storage_options, threads)
    table = read_manifest(url, spec.storage_options)
    cache = ProbeCache.read(cache_url, spec.storage_options)
    probed = probe_table(table, spec, cache, _ray_prober(concurrency, batch_size))
    result = judge(probed, min_refs=min_refs, max_refs=max_refs)
    if cache_url and result.probes["photos_read"]:
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
        limits=settings.limits.references(),
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

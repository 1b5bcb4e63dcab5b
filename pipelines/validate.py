"""Validation of a manifest before any training: bad rows go to quarantine, never raise.

Checks, in stages (the ``stage`` column of a quarantine row names the one that failed):

``schema``  required fields present and non-empty, ``role`` is ``ref``/``restore``, tenant and
            identity are safe keys (see :func:`registry.is_safe_key`).
``read``    the ``uri`` can be opened and read.
``image``   a decodable image of an accepted format, not over the byte or pixel limits (checked
            from the header, before decoding), sides at least ``min_side``, not truncated.
``dedup``   within one person, a photo whose bytes (sha256) equal an earlier one is a
            duplicate; "earlier" means references before restore photos, then by uri.
``refs``    a person keeps at most ``max_refs`` references (the first by uri); a person with
            fewer than ``min_refs`` good references is quarantined as a whole (all its rows).

Rows are judged independently of their order in the manifest. Images are read in a thread pool,
each distinct uri once, at most ``max_bytes + 1`` bytes of it; the image checks are
:func:`pfstorer.images.decode_image`'s (the same as the HTTP API's).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
from pydantic import ValidationError

from pfstorer.errors import PFStorerError
from pipelines.manifest import REQUIRED_COLUMNS, ManifestRow, _as_string_columns
from registry import job_key as _job_key
from registry import url_to_fs

from pfstorer.images import ImageLimits, decode_image

__all__ = [
    "DEFAULT_LIMITS",
    "STAGES",
    "IdentityJob",
    "ImageLimits",
    "ValidationResult",
    "limits_from_settings",
    "probe_image",
    "validate_manifest",
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
# one image
# ---------------------------------------------------------------------------------------------


def probe_image(data: bytes, limits: ImageLimits, name: str = "image") -> tuple[int, int]:
    """Judge one image file's bytes under ``limits``; return ``(width, height)``.

    This is :func:`pfstorer.images.decode_image`, the one place untrusted bytes are judged:
    bytes, then the type by magic bytes (only accepted formats reach Pillow), then the header's
    pixel count (a decompression bomb is never decoded), then a full decode (truncated files).
    Raises :class:`TooLargeError`, :class:`UnsupportedMediaError` or :class:`InputError`; the
    message is the quarantine reason.
    """
    img = decode_image(data, limits=limits, name=name)
    return int(img.shape[-1]), int(img.shape[-2])


def _read_limited(uri: str, max_bytes: int, storage_options: Mapping[str, Any] | None) -> bytes:
    fs, path = url_to_fs(uri, storage_options)
    with fs.open(path, "rb") as fh:
        return fh.read(max_bytes + 1)


def _unreadable(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "unreadable: file not found"
    if isinstance(exc, PermissionError):
        return "unreadable: permission denied"
    if isinstance(exc, IsADirectoryError):
        return "unreadable: is a directory"
    text = " ".join(str(exc).split())[:200]
    kind = type(exc).__name__
    return f"unreadable: {kind}: {text}" if text else f"unreadable: {kind}"


@dataclasses.dataclass(frozen=True)
class _Probe:
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    stage: str | None = None
    reason: str | None = None


def _probe_uri(uri: str, limits: ImageLimits, storage_options: Mapping[str, Any] | None) -> _Probe:
    try:
        data = _read_limited(uri, limits.max_bytes, storage_options)
    except Exception as exc:
        return _Probe(stage="read", reason=_unreadable(exc))
    try:
        width, height = probe_image(data, limits)
    except PFStorerError as exc:
        return _Probe(stage="image", reason=str(exc))
    return _Probe(hashlib.sha256(data).hexdigest(), width, height)


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


def validate_manifest(
    table: pa.Table,
    *,
    limits: ImageLimits | None = None,
    min_refs: int = 3,
    max_refs: int = 20,
    storage_options: Mapping[str, Any] | None = None,
    restore_limits: ImageLimits | None = None,
    max_workers: int = 4,
) -> ValidationResult:
    """Validate a manifest table; see the module docstring for the checks.

    ``limits`` (an ``ImageLimits``; default :data:`DEFAULT_LIMITS`) apply to references,
    ``restore_limits`` (default: the same) to restore photos. ``storage_options`` are used for
    remote photo URIs. Only a table without the required columns raises (:class:`ManifestError`).
    """
    limits = limits or DEFAULT_LIMITS
    restore_limits = restore_limits or limits
    table = _as_string_columns(table, "table")
    rows = table.select(list(REQUIRED_COLUMNS)).to_pylist()
    n = len(rows)
    bad: dict[int, tuple[str, str]] = {}  # row index -> (stage, reason)

    # schema
    for i, row in enumerate(rows):
        if (reason := _schema_reason(row)) is not None:
            bad[i] = ("schema", reason)

    # read + image: each distinct (uri, limits) once, in parallel
    def limits_of(role: str) -> tuple[str, Any]:
        if role == "restore" and restore_limits is not limits:
            return "restore", restore_limits
        return "ref", limits

    wanted: dict[tuple[str, str], Any] = {}
    for i, row in enumerate(rows):
        if i not in bad:
            tag, lim = limits_of(row["role"])
            wanted[(row["uri"], tag)] = lim
    probes: dict[tuple[str, str], _Probe] = {}
    if wanted:
        with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(wanted)))) as pool:
            futures = {
                key: pool.submit(_probe_uri, key[0], lim, storage_options)
                for key, lim in wanted.items()
            }
            probes = {key: fut.result() for key, fut in futures.items()}
    info: dict[int, _Probe] = {}
    for i, row in enumerate(rows):
        if i in bad:
            continue
        probe = probes[(row["uri"], limits_of(row["role"])[0])]
        if probe.reason is not None:
            bad[i] = (probe.stage or "image", probe.reason)
        else:
            info[i] = probe

    # per person: duplicates, too many, too few
    people: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i in info:
        people[(rows[i]["tenant"], rows[i]["identity"])].append(i)
    ready: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    for person, idxs in people.items():
        idxs.sort(key=lambda i: (rows[i]["role"] != "ref", rows[i]["uri"], i))
        seen: dict[str, int] = {}
        refs: list[int] = []
        restores: list[int] = []
        for i in idxs:
            sha = info[i].sha256 or ""
            if sha in seen:
                bad[i] = ("dedup", f"duplicate: same bytes as {rows[seen[sha]]['uri']}")
                continue
            seen[sha] = i
            (refs if rows[i]["role"] == "ref" else restores).append(i)
        for i in refs[max_refs:]:
            bad[i] = ("refs", f"too many references: keeping the first {max_refs} by uri")
        refs = refs[:max_refs]
        if len(refs) < min_refs:
            for i in refs + restores:
                bad[i] = ("refs", f"person has {len(refs)} good references, needs >= {min_refs}")
            continue
        ready[person] = (refs, restores)

    # tables
    good_idx = [i for i in range(n) if i not in bad]
    bad_idx = [i for i in range(n) if i in bad]
    good = table.take(pa.array(good_idx, pa.int64()))
    good = good.append_column("sha256", pa.array([info[i].sha256 for i in good_idx], pa.string()))
    good = good.append_column("width", pa.array([info[i].width for i in good_idx], pa.int32()))
    good = good.append_column("height", pa.array([info[i].height for i in good_idx], pa.int32()))
    quarantine = table.take(pa.array(bad_idx, pa.int64()))
    quarantine = quarantine.append_column(
        "reason", pa.array([bad[i][1] for i in bad_idx], pa.string())
    ).append_column("stage", pa.array([bad[i][0] for i in bad_idx], pa.string()))

    full_rows = table.to_pylist() if ready else []

    def row_out(i: int) -> dict[str, Any]:
        return {
            **full_rows[i],
            "sha256": info[i].sha256,
            "width": info[i].width,
            "height": info[i].height,
        }

    jobs = {
        person: IdentityJob(
            tenant=person[0],
            identity=person[1],
            refs=[row_out(i) for i in refs],
            ref_sha256s=[info[i].sha256 or "" for i in refs],
            restores=[row_out(i) for i in restores],
        )
        for person, (refs, restores) in sorted(ready.items())
    }
    return ValidationResult(good=good, quarantine=quarantine, jobs=jobs)


def write_quarantine(
    result: ValidationResult,
    url: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write the quarantine table as one Parquet file (also when empty); return the URL."""
    from pipelines.manifest import write_manifest

    return write_manifest(result.quarantine, url, storage_options)

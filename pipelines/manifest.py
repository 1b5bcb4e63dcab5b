"""Photo manifests: one row per photo, as Parquet at any fsspec URL.

Columns (``MANIFEST_SCHEMA``; extra columns are allowed and kept):

=========  ========  ==========================================================================
column     type      meaning
=========  ========  ==========================================================================
tenant     string    the customer (platform) the person belongs to; required
identity   string    the person, unique within a tenant; required
role       string    ``ref`` (a reference photo to personalize on) or ``restore`` (a photo to
                     restore with the person's adapter); required
uri        string    the photo: local path (relative to the working directory), ``file://``,
                     ``s3://``... any fsspec URL; required
credit     string    optional: who took / owns the photo
licence    string    optional: the photo's licence
notes      string    optional: free text
=========  ========  ==========================================================================

A manifest is a single Parquet file or a (hive-)partitioned Parquet dataset directory, e.g.
``manifest/tenant=acme/part-0.parquet``; partition keys are read back as strings.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import PurePosixPath
from typing import Any, Literal

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pfstorer.errors import PFStorerError
from registry import is_local_url, is_safe_key, url_to_fs

__all__ = [
    "IMAGE_EXTENSIONS",
    "MANIFEST_SCHEMA",
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "ManifestError",
    "ManifestRow",
    "arrow_filesystem",
    "check_manifest_schema",
    "manifest_from_folders",
    "manifest_hash",
    "ray_read_manifest",
    "read_manifest",
    "write_manifest",
]

REQUIRED_COLUMNS = ("tenant", "identity", "role", "uri")
OPTIONAL_COLUMNS = ("credit", "licence", "notes")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

MANIFEST_SCHEMA = pa.schema(
    [pa.field(c, pa.string(), metadata={"required": "true"}) for c in REQUIRED_COLUMNS]
    + [pa.field(c, pa.string()) for c in OPTIONAL_COLUMNS],
    metadata={"pfstorer.manifest": "1"},
)


class ManifestError(PFStorerError):
    """A manifest that cannot be read at all (missing, not Parquet, lacking columns)."""


class ManifestRow(BaseModel):
    """One photo of a manifest; validation turns its errors into quarantine reasons."""

    model_config = ConfigDict(extra="allow", frozen=True)

    tenant: str = Field(min_length=1)
    identity: str = Field(min_length=1)
    role: Literal["ref", "restore"]
    uri: str = Field(min_length=1)
    credit: str | None = None
    licence: str | None = None
    notes: str | None = None

    @field_validator("tenant")
    @classmethod
    def _safe_tenant(cls, v: str) -> str:
        if not is_safe_key(v, "tenant"):
            raise ValueError("not a safe key")
        return v

    @field_validator("identity")
    @classmethod
    def _safe_identity(cls, v: str) -> str:
        if not is_safe_key(v, "identity"):
            raise ValueError("not a safe key")
        return v


# ---------------------------------------------------------------------------------------------


def _as_string_columns(table: pa.Table, url: str) -> pa.Table:
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ManifestError(
            f"manifest {url} lacks required column(s) {', '.join(missing)} "
            f"(has: {', '.join(table.column_names) or 'none'})"
        )
    for name in REQUIRED_COLUMNS + OPTIONAL_COLUMNS:
        if name not in table.column_names:
            continue
        col = table.column(name)
        if col.type == pa.string():
            continue
        try:
            if pa.types.is_dictionary(col.type):
                col = col.cast(col.type.value_type)
            col = col.cast(pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ManifestError(f"manifest {url}: column {name} is not text ({col.type})") from exc
        table = table.set_column(table.column_names.index(name), name, col)
    return table


def _dataset(url: str, storage_options: Mapping[str, Any] | None) -> ds.Dataset:
    """The manifest at ``url`` as a pyarrow dataset (hive partition keys as strings)."""
    try:
        fs, path = url_to_fs(url, storage_options)
        if not fs.exists(path):
            raise ManifestError(f"manifest {url} does not exist")
        if not fs.isdir(path):
            return ds.dataset(path, filesystem=fs, format="parquet")
        dataset = ds.dataset(path, filesystem=fs, format="parquet", partitioning="hive")
        part = getattr(dataset.partitioning, "schema", None)
        if part is not None and len(part):
            # partition values are strings in a manifest ("001" must stay "001")
            strings = ds.partitioning(
                pa.schema([(f.name, pa.string()) for f in part]), flavor="hive"
            )
            dataset = ds.dataset(path, filesystem=fs, format="parquet", partitioning=strings)
        return dataset
    except ManifestError:
        raise
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise ManifestError(f"cannot read manifest {url}: {exc}") from exc


def read_manifest(
    url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> pa.Table:
    """Read a manifest (a Parquet file or a partitioned dataset directory) from any fsspec URL.

    Required columns come back as strings; extra columns are kept. Raises
    :class:`ManifestError` if it cannot be read or lacks a required column.
    """
    url = os.fspath(url)
    dataset = _dataset(url, storage_options)
    try:
        table = dataset.to_table()
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise ManifestError(f"cannot read manifest {url}: {exc}") from exc
    return _as_string_columns(table, url)


def check_manifest_schema(url: str, storage_options: Mapping[str, Any] | None = None) -> pa.Schema:
    """The manifest's schema, from its file footers only; :class:`ManifestError` if the manifest
    is missing, not Parquet, or lacks a required column."""
    schema = _dataset(url, storage_options).schema
    _as_string_columns(schema.empty_table(), url)
    return schema


def arrow_filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """``(pyarrow filesystem, path)`` of a URL, as Ray Data's readers and writers want them."""
    import pyarrow.fs as pafs

    fs, path = url_to_fs(url, storage_options)
    return (pafs.LocalFileSystem() if is_local_url(url) else pafs.PyFileSystem(pafs.FSSpecHandler(fs))), path


def ray_read_manifest(url: str, storage_options: Mapping[str, Any] | None = None) -> Any:
    """The manifest as a Ray Data dataset (``read_parquet`` on the manifest's own filesystem,
    partition keys as strings); blocks are cast like :func:`read_manifest`'s table by its users."""
    import ray.data
    from ray.data.datasource import Partitioning

    filesystem, path = arrow_filesystem(url, storage_options)
    fs, _ = url_to_fs(url, storage_options)
    if fs.isdir(path):
        parts = Partitioning("hive", base_dir=path, field_types={})
    else:
        parts = None
    # reading a manifest is light: no CPU reserved, so actors that hold every CPU cannot starve it
    return ray.data.read_parquet(path, filesystem=filesystem, partitioning=parts, num_cpus=0)


def _rows_to_table(rows: Iterable[ManifestRow | Mapping[str, Any]]) -> pa.Table:
    dicts = [r.model_dump() if isinstance(r, BaseModel) else dict(r) for r in rows]
    extra: list[str] = []
    for d in dicts:
        extra += [k for k in d if k not in MANIFEST_SCHEMA.names and k not in extra]
    if not extra:
        return pa.Table.from_pylist(dicts, schema=MANIFEST_SCHEMA)
    base = pa.Table.from_pylist(
        [{k: d.get(k) for k in MANIFEST_SCHEMA.names} for d in dicts], schema=MANIFEST_SCHEMA
    )
    rest = pa.Table.from_pylist([{k: d.get(k) for k in extra} for d in dicts])
    for name in extra:
        base = base.append_column(name, rest.column(name))
    return base


def write_manifest(
    rows: pa.Table | Iterable[ManifestRow | Mapping[str, Any]],
    url: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    partition_by: list[str] | None = None,
) -> str:
    """Write rows (``ManifestRow``s, dicts or a table) as Parquet; return the URL.

    Rows are written as given - bad rows included - so that validation can quarantine them.
    ``partition_by`` (e.g. ``["tenant"]``) writes a hive-partitioned dataset directory instead
    of a single file.
    """
    url = os.fspath(url)
    table = rows if isinstance(rows, pa.Table) else _rows_to_table(rows)
    fs, path = url_to_fs(url, storage_options)
    if partition_by:
        ds.write_dataset(
            table,
            path,
            filesystem=fs,
            format="parquet",
            partitioning=partition_by,
            partitioning_flavor="hive",
            existing_data_behavior="delete_matching",
        )
        return url
    if is_local_url(url):
        fs.makedirs(str(PurePosixPath(path).parent), exist_ok=True)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs.pipe_file(path, buf.getvalue())
    return url


def _canonical(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$bytes": value.hex()}
    if isinstance(value, float) and value != value:
        return {"$float": "nan"}
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def manifest_hash(table: pa.Table) -> str:
    """Content hash of a manifest (sha256 hex).

    Independent of row and column order and of how the table was stored (file, partitioned
    dataset); a null value counts as an absent one, so an all-null optional column changes
    nothing. Sensitive to every non-null value, to which row it is in, and to duplicated rows.
    """
    names = sorted(table.column_names)
    row_hashes = sorted(
        hashlib.sha256(
            json.dumps(
                _canonical({k: v for k, v in row.items() if v is not None}),
                sort_keys=True,
                separators=(",", ":"),
            ).encode()
        ).digest()
        for row in table.select(names).to_pylist()
    )
    h = hashlib.sha256(b"pfstorer-manifest-v1")
    for rh in row_hashes:
        h.update(rh)
    return h.hexdigest()


def manifest_from_folders(
    root: str | os.PathLike[str],
    tenant: str,
    *,
    holdout: int = 0,
    refs: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
) -> pa.Table:
    """A manifest from ``root/<identity>/<photo>`` folders (local or any fsspec URL).

    Every sub-folder is a person (folder name = identity); its image files (by extension,
    hidden files skipped) are sorted by file name. By default all are ``role=ref``. With
    ``holdout=N`` the last N photos of each person are ``role=restore``; with ``refs=N`` the
    first N are references and the rest ``restore`` (the lfw128 bench convention, N=5). Names are
    not checked here: validation quarantines unsafe ones. URIs are absolute paths for local
    folders, full URLs otherwise.
    """
    if holdout and refs is not None:
        raise ValueError("give holdout or refs, not both")
    if holdout < 0 or (refs is not None and refs < 0):
        raise ValueError("holdout and refs must be >= 0")
    root = os.fspath(root)
    fs, base = url_to_fs(root, storage_options)
    if not fs.isdir(base):
        raise ManifestError(f"{root} is not a directory")
    local = is_local_url(root)
    exts = tuple(e.lower() for e in extensions)
    rows: list[dict[str, Any]] = []
    for entry in sorted(fs.ls(base, detail=True), key=lambda e: e["name"]):
        if entry["type"] != "directory":
            continue
        identity = PurePosixPath(entry["name"]).name
        if identity.startswith("."):
            continue
        photos = sorted(
            e["name"]
            for e in fs.ls(entry["name"], detail=True)
            if e["type"] == "file"
            and not PurePosixPath(e["name"]).name.startswith(".")
            and PurePosixPath(e["name"]).suffix.lower() in exts
        )
        n_ref = max(len(photos) - holdout, 0) if refs is None else min(refs, len(photos))
        for i, p in enumerate(photos):
            rows.append(
                {
                    "tenant": tenant,
                    "identity": identity,
                    "role": "ref" if i < n_ref else "restore",
                    "uri": p if local else fs.unstrip_protocol(p),
                }
            )
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
